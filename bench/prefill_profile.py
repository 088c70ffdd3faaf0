"""Prefill time of one prompt, and where it goes (XLA ops by kind and shape).

    python bench/prefill_profile.py --tokens 832 [--chunk 256] [--trace]

Prints the best of 5 jitted prefills (random ids, batch 1, cache 1024) and the
dense-layer GFLOP/s; --trace adds a jax.profiler trace of 3 more runs with op
time summed per (fusion kind, output shape), the view that found the attention
transposes (see `specjax.kernels.attention_reference`).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import specjax as sj
from specjax import cache as cache_lib
from specjax.models.llama import PREFILL_CHUNK


def op_table(fn, args, reps: int = 3, top: int = 25) -> list[str]:
  """Trace `reps` calls of jitted fn; op wall time per call summed by (kind, shape)."""
  shapes = {}
  for line in fn.lower(*args).compile().as_text().splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \(?([a-z0-9]+\[[0-9,]*\])", line)  # tuples: 1st
    if m:
      shapes[m.group(1)] = m.group(2)
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    for _ in range(reps):
      jax.block_until_ready(fn(*args))
    jax.profiler.stop_trace()
    events = json.load(gzip.open(glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)[0]))["traceEvents"]
  total, count = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in shapes:
      key = f"{re.sub(r'[.][0-9]+$', '', e['name'])} {shapes[e['name']]}"
      total[key] += e["dur"] / reps
      count[key] += 1
  return [f"{us / 1e3:8.1f} ms {count[k] // reps:5d}x  {k}" for k, us in total.most_common(top)]


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tokens", type=int, default=832)
  ap.add_argument("--chunk", type=int, default=PREFILL_CHUNK)
  ap.add_argument("--cache", type=int, default=1024)
  ap.add_argument("--trace", action="store_true")
  args = ap.parse_args()
  if not 1 <= args.tokens <= args.cache:
    raise ValueError(f"--tokens {args.tokens} must be in [1, --cache {args.cache}]")
  model = sj.load_model()
  cfg = model.config

  @jax.jit
  def prefill(params, tokens):
    module = nnx.merge(model.graphdef, params)
    cache = cache_lib.init_cache(cfg.layers, 1, args.cache, cfg.kv_heads, cfg.head_dim)
    cache, _ = module.prefill(tokens, cache, chunk=args.chunk)
    return cache.k[-1][0, 0, args.tokens - 1, 0]

  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, args.tokens)), jnp.int32)
  jax.block_until_ready(prefill(model.params, tokens))
  times = []
  for _ in range(5):
    t = time.perf_counter()
    jax.block_until_ready(prefill(model.params, tokens))
    times.append(time.perf_counter() - t)
  dense = 2 * args.tokens * cfg.layers * cfg.hidden * (
      (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim + cfg.heads * cfg.head_dim + 3 * cfg.ffn)
  best = min(times)
  print(f"prefill {args.tokens} tokens, chunk {args.chunk}: {best * 1e3:.1f} ms "
        f"(dense layers {dense / best / 1e9:.0f} GFLOP/s)")
  if args.trace:
    print("\n".join(op_table(prefill, (model.params, tokens))))


if __name__ == "__main__":
  main()
