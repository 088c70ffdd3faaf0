"""Tree verify step (target pass + accept_tree + compaction) / the bare forward over the same nodes.

    python bench/tree_verify_overhead.py [--paths medusa|chain5|branches3x4] [--context 512]
                                         [--temperature 0 1] [--repeats 7] [--json]

Both are timed as the decode loop runs them (`cost_model.best_ms`, several calls in one
jitted loop that carries the cache, so no cache copy is timed), batch 1, interleaved
round-robin so load hits both alike. The step is `decode._verify_tree`, the code the loop
runs; the bare forward is the model over the same N+1 nodes with the same tree mask.
Issue 14's goal: step / bare <= 1.10.
"""
from __future__ import annotations

import argparse
import importlib
import json

import jax
import jax.numpy as jnp

import specjax as sj
from specjax import decode
from specjax.harness.runner import machine_info
from specjax.tree import Tree

cost_model = importlib.import_module("specjax.cost_model")  # the module (sj.cost_model is its function)

TREES = {
    # Medusa's / EAGLE's small default-like shape: 3 root children, 2 + 1 grandchildren, one great-grandchild.
    "medusa": [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)],
    "chain5": [(0,) * d for d in range(1, 6)],
    "branches3x4": [(b,) + (0,) * d for b in range(3) for d in range(4)],  # ngram-tree's shape
}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--paths", choices=sorted(TREES), nargs="+", default=sorted(TREES))
  ap.add_argument("--context", type=int, default=512)
  ap.add_argument("--temperature", type=float, nargs="+", default=[0.0, 1.0])
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--loops", type=int, default=8)
  ap.add_argument("--json", action="store_true")
  args = ap.parse_args(argv)

  model = sj.load_model()
  results = {}
  for name in args.paths:
    tree = Tree.from_paths(TREES[name])
    n1 = tree.size
    max_len = -(-(args.context + n1 + 1) // 128) * 128
    cache = model.new_cache(1, max_len).replace(lengths=jnp.array([args.context], jnp.int32))
    tokens = jnp.arange(100, 100 + n1, dtype=jnp.int32)[None]
    pos = args.context + jnp.asarray(tree.depth, jnp.int32)[None]
    keys = jax.random.split(jax.random.key(0), 1)

    def looped(one):
      @jax.jit
      def run(params, cache):
        module = model.module(params)

        def body(_, carry):
          cache, acc = carry
          out, written = one(module, cache)
          return written.replace(lengths=cache.lengths), acc + out

        return jax.lax.fori_loop(0, args.loops, body, (cache, jnp.float32(0)))[1]
      return lambda: jax.block_until_ready(run(model.params, cache))

    def bare(module, cache):
      logits, written, _ = module(tokens, pos, cache, tree_mask=jnp.asarray(tree.mask))
      return logits[0, -1, 0], written

    def step_fn(sampling):
      def step(module, cache):
        (n_acc, out, logp, nan), written, feats = decode._verify_tree(
            module, tokens, cache, (), jnp.asarray(tree.mask), jnp.asarray(tree.depth), jnp.asarray(tree.children),
            tree.max_depth, "topk", None, sampling, keys, True, (tree.num_nodes,))
        return logp[0, 0] + n_acc[0] + feats["hidden"][0, 0, 0], written
      return step

    for t in args.temperature:
      b_fn, s_fn = looped(bare), looped(step_fn(sj.Sampling(temperature=t)))
      b_fn(), s_fn()  # compile
      b = s = float("inf")
      for _ in range(args.repeats):  # round-robin: load hits both alike
        b = min(b, cost_model.best_ms(b_fn, 1) / args.loops)
        s = min(s, cost_model.best_ms(s_fn, 1) / args.loops)
      results[f"{name} T={t:g}"] = {"nodes": n1 - 1, "bare_forward_ms": b, "verify_step_ms": s, "overhead": s / b}
      if not args.json:
        print(f"{name} ({n1 - 1} nodes), T={t:g}: bare forward {b:.2f} ms, tree verify step {s:.2f} ms, "
              f"step/bare {s / b:.3f}", flush=True)
  out = {"context": args.context, "results": results, "machine": machine_info(), "worst": max(
      r["overhead"] for r in results.values())}
  if args.json:
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
