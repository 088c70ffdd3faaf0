"""Verify overhead: one verify step (target forward over k+1 tokens + accept) / the bare forward.

    python bench/verify_overhead.py [--k 5] [--context 512] [--temperature 0 1] [--json]

The two are timed interleaved in one process (best of --repeats), batch 1.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

import specjax as sj
from specjax.verify import accept_chain


def timed(fns, repeats):
  """Best time in ms of each fn, calling them round-robin so machine noise hits all alike."""
  for f in fns:
    f()
  best = [float("inf")] * len(fns)
  for _ in range(repeats):
    for i, f in enumerate(fns):
      t0 = time.perf_counter()
      f()
      best[i] = min(best[i], time.perf_counter() - t0)
  return [1e3 * b for b in best]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--k", type=int, default=5)
  ap.add_argument("--context", type=int, default=512)
  ap.add_argument("--temperature", type=float, nargs="+", default=[0.0, 1.0])
  ap.add_argument("--repeats", type=int, default=20)
  ap.add_argument("--json", action="store_true")
  args = ap.parse_args(argv)

  model = sj.load_model()
  k, T = args.k, args.k + 1
  cache = model.new_cache(1, -(-(args.context + T + 1) // 128) * 128)
  cache = cache.replace(lengths=jnp.array([args.context], jnp.int32))
  tokens = jnp.arange(100, 100 + T, dtype=jnp.int32)[None]
  pos = args.context + jnp.arange(T, dtype=jnp.int32)[None]
  keys = jax.random.split(jax.random.key(0), 1)

  @jax.jit
  def bare(params, cache):
    logits, cache, _ = model.module(params)(tokens, pos, cache)
    return logits, cache

  def verify_fn(sampling):
    @jax.jit
    def verify(params, cache):
      logits, cache, _ = model.module(params)(tokens, pos, cache)
      n_acc, out = accept_chain(logits, tokens[:, 1:], None, sampling, keys)
      return n_acc, out, cache
    return verify

  results = {}
  for t in args.temperature:
    verify = verify_fn(sj.Sampling(temperature=t))
    b, v = timed([lambda: jax.block_until_ready(bare(model.params, cache)),
                  lambda: jax.block_until_ready(verify(model.params, cache))], args.repeats)
    results[f"T={t:g}"] = {"bare_forward_ms": b, "verify_ms": v, "overhead": v / b}
  out = {"k": k, "context": args.context, "overhead": max(r["overhead"] for r in results.values()),
         "by_temperature": results, "device": str(jax.devices()[0])}
  if args.json:
    print(json.dumps(out, indent=1))
  else:
    for name, r in results.items():
      print(f"{name}: bare forward({T}) {r['bare_forward_ms']:.2f} ms, verify {r['verify_ms']:.2f} ms, "
            f"overhead {r['overhead']:.3f}")


if __name__ == "__main__":
  main()
