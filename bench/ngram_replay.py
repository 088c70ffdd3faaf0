"""Replays prompt-lookup policies over the target's own greedy outputs, offline.

    python bench/ngram_replay.py bench/results/results.json [--cost bench/results/ar_step.json]

At T=0 the speculative output equals the AR output, so the AR tokens a harness run
recorded (`runs[]` of `none`) say exactly which drafts a verify would accept. For
each policy this walks every prompt step by step as the engine does (propose from
prompt + output so far; accept the matching prefix; emit it plus the bonus token),
and prices each step with the measured forward(T) cost curve at the verify size
the engine would use (the smallest of `verify_sizes(k)` covering the proposal).
It prints tau and the modelled decode speedup (prefill excluded) per category.
The proposer here is a plain re-implementation of `specjax.drafters.ngram`,
checked against it on every step of the first prompt.
"""
from __future__ import annotations

import argparse
import collections
import json

import numpy as np


def propose(hist: list[int], L: int, k: int, min_n: int, max_n: int, k_short: int) -> list[int]:
  """Drafts after the most recent match of the longest suffix n in [min_n, max_n]; at most
  k_short drafts when only a 1-token suffix matched."""
  best, best_n = -1, 0
  for n in range(min_n, max_n + 1):
    if L < n + 1:
      continue
    suffix = hist[L - n:L]
    for i in range(L - n - 1, -1, -1):  # most recent first; i + n < L keeps a known token after
      if hist[i:i + n] == suffix:
        best, best_n = i + n, n
        break
  if best < 0:
    return []
  return hist[best:min(best + (k_short if best_n == 1 else k), L)]


def cost_curve(path: str):
  with open(path) as f:
    by_t = {int(t): ms for t, ms in json.load(f)["forward_ms_by_T"].items()}
  ts = sorted(by_t)
  return lambda t: float(np.interp(t, ts, [by_t[x] for x in ts]))


def replay(prompt: list[int], out: list[int], k: int, min_n: int, max_n: int, k_short: int, sizes, cost):
  hist, L, end = prompt + out, len(prompt), len(prompt) + len(out)
  steps = time = 0.0
  while L < end:
    drafts = propose(hist, L, k, min_n, max_n, k_short)
    acc = 0
    while acc < len(drafts) and L + acc < end and drafts[acc] == hist[L + acc]:
      acc += 1
    size = min(s for s in sizes if s >= len(drafts))
    time += cost(size + 1)
    steps += 1
    L += acc + 1
  return steps, time


def check_against_library(prompt, out, k, min_n, max_n):
  import jax.numpy as jnp
  from specjax.drafters.ngram import propose_ngram
  hist = prompt + out
  S = len(hist) + 8
  h = jnp.asarray(hist + [0] * 8, jnp.int32)
  for L in range(len(prompt), len(hist)):
    lib = [int(t) for t in propose_ngram(h, jnp.int32(L), k, max_n, min_n) if t >= 0]
    mine = propose(hist, L, k, min_n, max_n, k)
    assert lib == mine, (L, lib, mine)
  return S


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("results")
  ap.add_argument("--cost", default="bench/results/ar_step.json", help="ar_step.py --json output")
  ap.add_argument("--policies", default="5:2:3:5,5:1:3:5,5:1:3:1,5:1:3:2,8:2:3:8,8:1:3:2,3:1:3:1",
                  help="k:min_n:max_n:k_short,...")
  args = ap.parse_args(argv)
  import specjax as sj
  from specjax.decode import verify_sizes
  from specjax.harness.questions import load_questions, prompt_ids

  with open(args.results) as f:
    res = json.load(f)
  questions = {q.question_id: q for q in load_questions(res["settings"]["questions_file"])[0]}
  tok = sj.load_model().tokenizer
  ar = sorted((r for r in res["runs"] if r["drafter"] == "none"), key=lambda r: (r["question_id"], r["turn"]))
  answers = collections.defaultdict(list)
  items = []
  for r in ar:
    q = questions[r["question_id"]]
    items.append((r["category"], prompt_ids(tok, q.turns[:r["turn"]], answers[q.question_id]), r["tokens"]))
    answers[q.question_id].append(tok.decode(r["tokens"], skip_special_tokens=True))
  for (cat, p, o) in items[:1]:
    check_against_library(p, o, 5, 1, 3)
  cost = cost_curve(args.cost)
  print(f"{len(items)} prompts from {args.results}; cost curve {args.cost}")
  for pol in args.policies.split(","):
    k, min_n, max_n, k_short = map(int, pol.split(":"))
    sizes = verify_sizes(k)
    per = collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])  # tokens, steps, time, ar time
    for cat, p, o in items:
      steps, t = replay(p, o, k, min_n, max_n, k_short, sizes, cost)
      for key in (cat, "overall"):
        per[key][0] += len(o)
        per[key][1] += steps
        per[key][2] += t
        per[key][3] += len(o) * cost(1)
    row = "  ".join(f"{c[:8]} {v[0] / v[1]:.2f}/{v[3] / v[2]:.2f}x" for c, v in sorted(per.items()))
    print(f"k={k} n={min_n}..{max_n} k_short={k_short}: tau/speedup  {row}")


if __name__ == "__main__":
  main()
