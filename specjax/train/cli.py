"""`python -m specjax train`: data generation, feature extraction, head training, evaluation.

Stages (each resumable; all write under --work-dir):

  python -m specjax train data     --prompts 1200 --work-dir runs/distill
  python -m specjax train features --work-dir runs/distill
  python -m specjax train fit      --drafter eagle3 --work-dir runs/distill --steps 3000
  python -m specjax train eval     --drafter eagle3 --work-dir runs/distill
  python -m specjax train export   --drafter eagle3 --work-dir runs/distill --name smollm2-135m-eagle3

`data` and `features` are shared by every drafter (features store all layers any head needs).
"""
from __future__ import annotations

import argparse
import json
import os

DEFAULT_FEATURE_LAYERS = "2,15,27"


def add_parser(subparsers) -> argparse.ArgumentParser:
  p = subparsers.add_parser("train", help="train EAGLE-1 / EAGLE-3 / MTP draft heads by self-distillation")
  p.add_argument("stage", choices=["data", "features", "fit", "eval", "export"])
  p.add_argument("--drafter", choices=["eagle1", "eagle3", "mtp"], default="eagle3")
  p.add_argument("--work-dir", default="runs/distill")
  p.add_argument("--model", default=None, help="target model path (default: embedded SmolLM2-135M)")
  p.add_argument("--prompts", type=int, default=1200, help="ShareGPT prompts to generate responses for")
  p.add_argument("--eval-prompts", type=int, default=40, help="held-out prompts (never trained on)")
  p.add_argument("--max-prompt", type=int, default=192)
  p.add_argument("--max-new", type=int, default=128)
  p.add_argument("--gen-batch", type=int, default=16)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--feature-layers", default=DEFAULT_FEATURE_LAYERS)
  p.add_argument("--draft-vocab", type=int, default=8192)
  p.add_argument("--steps", type=int, default=3000)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=320)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--warmup", type=int, default=100)
  p.add_argument("--unroll", type=int, default=3, help="training-time-test steps")
  p.add_argument("--save-every", type=int, default=200)
  p.add_argument("--labels", choices=["soft", "hard"], default="soft",
                 help="eagle3/mtp targets: the target's distribution (soft) or the sampled token (hard)")
  p.add_argument("--init-head", default=None, help="fit: start from this exported head directory")
  p.add_argument("--k", type=int, default=5, help="eval: draft length")
  p.add_argument("--eval-n", type=int, default=8, help="eval: held-out prompts to decode")
  p.add_argument("--name", default=None, help="export: shipped head name, or a directory path")
  return p


def _model(args):
  from specjax.io import load_model
  return load_model(args.model)


def run(args) -> int:
  from specjax.train import data
  work = args.work_dir
  os.makedirs(work, exist_ok=True)
  if args.stage == "data":
    model = _model(args)
    prompts, rep = data.sharegpt_prompts()
    print(rep)
    train, held = data.split_prompts(prompts, args.seed, args.eval_prompts)
    with open(os.path.join(work, "eval_prompts.json"), "w") as f:
      json.dump(held, f)
    skips = data.SkipCounts()
    ids = data.encode_prompts(model, train[:args.prompts], args.max_prompt, skips)
    print(f"prompts: {len(ids)} kept, skipped {skips.empty} empty, {skips.too_long} over {args.max_prompt} tokens")
    data.generate_examples(model, ids, os.path.join(work, "examples.jsonl"), max_new=args.max_new,
                           batch=args.gen_batch, seed=args.seed)
    return 0
  if args.stage == "features":
    model = _model(args)
    examples = data.read_examples(os.path.join(work, "examples.jsonl"))
    layers = tuple(int(x) for x in args.feature_layers.split(","))
    index = data.extract_features(model, examples, os.path.join(work, "features"), layers,
                                  max_len=args.max_prompt + args.max_new)
    print(f"features: {len(index['offsets']) - 1} examples, {index['offsets'][-1]} tokens; skipped "
          f"{index['skipped_empty']} empty, {index['skipped_too_long']} too long")
    return 0
  from specjax.train import trainer
  return trainer.run_stage(args)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="specjax")
  sub = parser.add_subparsers(dest="command", required=True)
  add_parser(sub)
  args = parser.parse_args(argv)
  return run(args)


if __name__ == "__main__":
  raise SystemExit(main())
