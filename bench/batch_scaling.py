"""AR throughput at batch B against batch 1 on the same prompts (a memory-bound step gets rows almost free).

    python bench/batch_scaling.py [--batch 8] [--max-new-tokens 64] [--json]

The first B qa and math_reasoning prompts of the dev set (chat template, greedy). Batch 1
decodes them one at a time; batch B decodes them in one call. Tokens/s counts every new
token over the wall time of prefill + decode; each configuration is compiled and warmed
first, then timed best of `--repeats`. Prefill grows with B as decoding does not, so the
decode loop's own ratio (stats["decode_s"]) is printed beside the end-to-end one.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import specjax as sj
from specjax import kernels
from specjax.harness.questions import load_questions

DEV = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "specbench_dev.jsonl")


def timed(model, prompts, max_new, repeats) -> tuple[int, float, float]:
  """(new tokens, wall seconds, decode-loop seconds) of the fastest of `repeats` generate calls."""
  sj.generate(model, prompts, max_new_tokens=max_new, chat=True)  # compile + warm-up
  runs = [sj.generate(model, prompts, max_new_tokens=max_new, chat=True).stats for _ in range(repeats)]
  st = min(runs, key=lambda st: st["wall_s"])
  return st["new_tokens"], st["wall_s"], st["decode_s"]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--max-new-tokens", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--questions", default=DEV)
  ap.add_argument("--json", action="store_true")
  args = ap.parse_args(argv)
  qs = [q for q in load_questions(args.questions)[0] if q.category in ("qa", "math_reasoning")]
  qa = [q for q in qs if q.category == "qa"][:args.batch // 2]
  prompts = [q.turns[0] for q in qa + [q for q in qs if q.category == "math_reasoning"][:args.batch - len(qa)]]
  model = sj.load_model()
  singles = [timed(model, [p], args.max_new_tokens, args.repeats) for p in prompts]  # one at a time
  tokens = sum(r[0] for r in singles)
  b1, b1_decode = tokens / sum(r[1] for r in singles), tokens / sum(r[2] for r in singles)
  n, wall, dec = timed(model, prompts, args.max_new_tokens, args.repeats)
  B = len(prompts)
  res = {"isa": kernels.selected_isa(), "batch": B, "max_new_tokens": args.max_new_tokens,
         "tokens_per_s": {"1": b1, str(B): n / wall}, "ratio": n / wall / b1,
         "decode_tokens_per_s": {"1": b1_decode, str(B): n / dec}, "decode_ratio": n / dec / b1_decode}
  print(json.dumps(res, indent=1) if args.json else
        f"[{res['isa']}] batch 1: {b1:.1f} tok/s, batch {B}: {n / wall:.1f} tok/s: {res['ratio']:.2f}x "
        f"(decode loop alone: {b1_decode:.1f} vs {n / dec:.1f} tok/s: {res['decode_ratio']:.2f}x)")


if __name__ == "__main__":
  main()
