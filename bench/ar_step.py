"""Batch-1 decode step vs the memory-bandwidth floor, and the verify cost curve forward(T).

    python bench/ar_step.py [--context 512] [--json]

All figures come from one run (ratios are what is stable on a shared machine).
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import specjax as sj


def best_ms(fn, repeats: int) -> float:
  fn()  # warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return 1e3 * min(times)


def read_bandwidth_gbs(nbytes: int = 1 << 29, repeats: int = 5) -> float:
  """Streaming-read bandwidth: a large numpy reduction (best of repeats)."""
  a = np.ones(nbytes // 4, np.float32)
  return nbytes / 1e9 / (best_ms(lambda: float(a.sum()), repeats) / 1e3)


def step_bytes(model: sj.Model, context: int) -> tuple[int, int]:
  """Bytes one decode step must read: every weight once (the embedding table once, as the
  tied head; the input lookup reads one row) plus the live K/V. A matrix kept packed
  (GGUF blocks, see specjax.models.llama.Packed) is read in that form, not as float32."""
  c = model.config
  weights = sum(x.nbytes for x in jax.tree.leaves(model.params))
  module = model.module()
  for owner in [module, *module.blocks]:
    for name in ({} if owner.packed is None else owner.packed.get_value()):
      weights -= getattr(owner, name)[...].nbytes  # the float32 copy is not read
  kv = 2 * c.layers * context * c.kv_heads * c.head_dim * 4
  return weights, kv


def forward_ms(model: sj.Model, context: int, T: int, repeats: int, n: int = 16) -> float:
  """One target forward of T new tokens after `context` cached tokens (batch 1), timed as
  in the decode loop: n forwards in one jitted loop that carries the cache (a bare jitted
  call would also time a copy of the cache, which the generate loop never makes)."""
  max_len = -(-(context + T + 1) // 128) * 128
  cache = model.new_cache(1, max_len).replace(lengths=jnp.array([context], jnp.int32))
  tokens = jnp.ones((1, T), jnp.int32)
  pos = context + jnp.arange(T, dtype=jnp.int32)[None]

  @jax.jit
  def run(params, cache):
    module = model.module(params)

    def body(_, carry):
      cache, acc = carry
      logits, cache, _ = module(tokens, pos, cache)
      return cache, acc + logits[0, -1, 0]  # each forward feeds the result

    return jax.lax.fori_loop(0, n, body, (cache, jnp.float32(0)))[1]

  return best_ms(lambda: jax.block_until_ready(run(model.params, cache)), repeats) / n


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--context", type=int, default=512)
  ap.add_argument("--steps", type=int, default=64, help="decode steps timed inside the generate loop")
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--json", action="store_true")
  args = ap.parse_args(argv)

  model = sj.load_model()
  prompt = (np.arange(args.context) % 5000 + 300).tolist()  # context tokens; content is irrelevant to speed
  sj.generate(model, [prompt], max_new_tokens=args.steps)  # compile
  runs = [sj.generate(model, [prompt], max_new_tokens=args.steps).stats for _ in range(3)]
  step_ms = min(r["decode_step_ms"] for r in runs)
  weights, kv = step_bytes(model, args.context)
  bw = read_bandwidth_gbs()
  floor_ms = (weights + kv) / 1e9 / bw * 1e3
  fwd = {T: forward_ms(model, args.context, T, args.repeats) for T in (1, 2, 4, 6, 8, 16)}
  out = {
      "context": args.context, "step_ms": step_ms, "weight_bytes": weights, "kv_bytes": kv,
      "read_bandwidth_gbs": bw, "floor_ms": floor_ms, "ratio": step_ms / floor_ms,
      "forward_ms_by_T": fwd, "forward_T8_over_T1": fwd[8] / fwd[1],
      "device": str(jax.devices()[0]), "jax": jax.__version__,
  }
  if args.json:
    print(json.dumps(out, indent=1))
  else:
    print(f"decode step (batch 1, context {args.context}): {step_ms:.2f} ms")
    print(f"bytes per step: weights {weights / 1e6:.0f} MB + KV {kv / 1e6:.1f} MB; read bandwidth {bw:.1f} GB/s")
    print(f"floor {floor_ms:.2f} ms -> step/floor = {out['ratio']:.2f}")
    print("forward(T) ms: " + ", ".join(f"T={T}: {ms:.2f}" for T, ms in fwd.items()))
    print(f"forward(T=8) / forward(T=1) = {out['forward_T8_over_T1']:.2f}")


if __name__ == "__main__":
  main()
