"""Batch-1 decode step vs the memory-bandwidth floor, the verify cost curve forward(T), and the
cost model dynamic speculation uses (`sj.cost_model`, measured once per machine and cached).

    python bench/ar_step.py [--context 512] [--json]

All figures come from one run (ratios are what is stable on a shared machine).
"""
from __future__ import annotations

import argparse
import json

import jax
import numpy as np

import specjax as sj
from specjax.cost_model import best_ms, cache_path, forward_ms  # the one timing of a forward


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
  cost = sj.cost_model(model)
  out = {
      "context": args.context, "step_ms": step_ms, "weight_bytes": weights, "kv_bytes": kv,
      "read_bandwidth_gbs": bw, "floor_ms": floor_ms, "ratio": step_ms / floor_ms,
      "forward_ms_by_T": fwd, "forward_T8_over_T1": fwd[8] / fwd[1], "forward_T6_over_T1": fwd[6] / fwd[1],
      "cost_model": {"verify": list(cost.verify), "cache": cache_path(model)},
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
    print("cost model c(T) = forward(T)/forward(1) for T = 1..: "
          + ", ".join(f"{c:.2f}" for c in cost.verify) + f"  ({cache_path(model)})")


if __name__ == "__main__":
  main()
