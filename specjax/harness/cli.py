"""`python -m specjax bench`: the Spec-Bench-style harness (also `python -m specjax.harness`)."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

DEFAULT_QUESTIONS = os.path.join("..", "shared", "data", "specbench_dev.jsonl")


def _csv(text: str) -> list[str]:
  return [t.strip() for t in text.split(",") if t.strip()]


def parse_k(text: str | None, drafters) -> dict:
  """--k 5 (every drafter) or --k ngram=5,draft=3 (per drafter; the rest keep their defaults)."""
  if not text:
    return {}
  out = {}
  for part in _csv(text):
    name, _, value = part.rpartition("=")
    try:
      k = int(value)
    except ValueError:
      raise ValueError(f"--k {text!r}: {value!r} is not an int; use --k 5 or --k ngram=5,draft=3") from None
    if k < 1:
      raise ValueError(f"--k {text!r}: k={k} must be >= 1")
    if name:
      if name not in drafters:
        raise ValueError(f"--k {text!r}: {name!r} is not among --drafters {','.join(drafters)}")
      out[name] = k
    else:
      out.update({d: k for d in drafters if d != "none"})
  return out


def add_arguments(p: argparse.ArgumentParser):
  p.add_argument("--questions", default=DEFAULT_QUESTIONS,
                 help="Spec-Bench JSONL (question_id, category, turns); default %(default)s")
  p.add_argument("--drafters", default="none,ngram",
                 help="comma-separated drafter names, or 'all' (every available drafter whose weights exist); "
                 "name@k fixes k (ngram@3,ngram@8 compares two k in one run), name@k:c also sets an EAGLE/MTP "
                 "drafter's min_confidence (eagle3@5:0.3); 'none' (the AR baseline) "
                 "always runs")
  p.add_argument("--k", default=None, help="drafted tokens per step: 5, or per drafter ngram=5,draft=3 "
                 "(default: each drafter's own)")
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (identical_to_ar is checked)")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--max-new-tokens", type=int, default=128, help="per turn")
  p.add_argument("--limit", type=int, default=None, help="questions per category (file order)")
  p.add_argument("--categories", default=None, help="comma-separated categories (default: all)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=os.path.join("bench", "results"), help="output directory (default %(default)s)")
  p.add_argument("--skip-bad", action="store_true", help="skip malformed question lines (counted) instead of failing")
  p.add_argument("--model", default=None, help="a .gguf file or HF directory (default: embedded SmolLM2-135M)")
  p.add_argument("--compare-hf", action="store_true",
                 help="also run HF transformers (greedy, prompt lookup) on the same GGUF and prompt ids")
  p.add_argument("--hf-threads", default="auto",
                 help="torch threads for the HF peer: an int, or 'auto' (default): the faster of 1 and 2, "
                 "timed at warm-up and every few questions (torch's OpenMP pool collapses on a busy machine)")
  p.add_argument("--hf-prompt-lookup", type=int, default=10, help="HF prompt_lookup_num_tokens")
  p.add_argument("--hf-assistant", default=None, help="a draft model (.gguf / HF dir) for HF assisted generation")
  p.add_argument("--no-dynamic", action="store_true",
                 help="turn dynamic speculation off: every step verifies what the drafter proposes")
  p.add_argument("--compare-llamacpp", action="store_true",
                 help="also run llama.cpp (llama-cpp-python: greedy, prompt-lookup drafting) on the same GGUF and "
                 "prompt ids (optional extra: pip install -e '.[llamacpp]')")
  p.add_argument("--llamacpp-threads", default="auto",
                 help="llama.cpp threads (prefill and decode): an int, or 'auto' (default): the faster of 1 and "
                 "the cores this process may use, timed at warm-up and every few questions")
  p.add_argument("--llamacpp-lookup", type=int, default=10,
                 help="draft tokens per step of llama.cpp's prompt lookup (LlamaPromptLookupDecoding "
                 "num_pred_tokens; default %(default)s)")
  p.add_argument("--no-progress", action="store_true")


def add_parser(subparsers) -> argparse.ArgumentParser:
  p = subparsers.add_parser("bench", help="Spec-Bench-style benchmark: speedup and τ per category and method",
                            description=__doc__)
  add_arguments(p)
  p.set_defaults(fn=run)
  return p


def _validate(args) -> tuple[list[str], dict, list[str] | None]:
  from specjax.harness.runner import available_drafters, check_drafter_names
  if args.max_new_tokens < 1:
    raise ValueError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
  if args.limit is not None and args.limit < 1:
    raise ValueError(f"--limit {args.limit} must be >= 1")
  threads = getattr(args, "llamacpp_threads", "auto")
  if threads != "auto" and not (str(threads).isdigit() and int(threads) >= 1):
    raise ValueError(f"--llamacpp-threads {threads!r} must be 'auto' or an int >= 1")
  if getattr(args, "llamacpp_lookup", 10) < 1:
    raise ValueError(f"--llamacpp-lookup {args.llamacpp_lookup} must be >= 1")
  drafters = check_drafter_names(_csv(args.drafters))
  ks = parse_k(args.k, list(available_drafters()) if "all" in drafters else drafters)
  categories = _csv(args.categories) if args.categories else None
  return drafters, ks, categories


def run(args, model=None) -> int:
  """Runs the benchmark described by `args`; `model` overrides --model (tests pass a tiny one)."""
  import specjax as sj
  from specjax.harness import report
  from specjax.harness.questions import load_questions, select
  from specjax.harness.runner import run_benchmark, to_jsonable

  drafters, ks, categories = _validate(args)
  sampling = sj.Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
  questions, bad = load_questions(args.questions, skip_bad=args.skip_bad)
  if bad:
    print(f"skipped {len(bad)} malformed line(s) of {args.questions}:", *bad, sep="\n  ", file=sys.stderr)
  questions = select(questions, categories, args.limit)
  hf = llamacpp = None
  if args.compare_hf:
    from specjax.harness import hf_peer
    try:
      hf_peer.require_hf()  # before loading anything: fail in a second, not after compiling
    except ImportError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
  if args.compare_llamacpp:
    from specjax.harness import llamacpp_peer
    try:
      llamacpp_peer.require_llamacpp()  # likewise before any model work
    except ImportError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    from specjax.io import default_model_path
    gguf = llamacpp_peer.check_gguf(args.model or default_model_path())
  if model is None:
    model = sj.load_model(args.model)
  if args.compare_hf:
    from specjax.io import default_model_path
    path = args.model or default_model_path()
    if args.hf_threads != "auto" and not str(args.hf_threads).isdigit():
      raise ValueError(f"--hf-threads {args.hf_threads!r} must be 'auto' or a positive int")
    threads = args.hf_threads if args.hf_threads == "auto" else int(args.hf_threads)
    hf = hf_peer.HFPeer(path, model.config.eos_ids, threads=threads, prompt_lookup=args.hf_prompt_lookup,
                        assistant_path=args.hf_assistant)
  if args.compare_llamacpp:
    threads = args.llamacpp_threads if args.llamacpp_threads == "auto" else int(args.llamacpp_threads)
    llamacpp = llamacpp_peer.LlamaCppPeer(gguf, model.config.eos_ids, threads=threads,
                                          n_ctx=model.config.max_context, lookup_tokens=args.llamacpp_lookup)
  results = run_benchmark(model, questions, drafters, sampling=sampling, ks=ks, max_new_tokens=args.max_new_tokens,
                          seed=args.seed, hf=hf, llamacpp=llamacpp, progress=not args.no_progress,
                          dynamic=not args.no_dynamic)
  argv = getattr(args, "argv", None)
  if argv is None:  # called through `python -m specjax bench ...`
    argv = sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]
  command = "python -m specjax bench " + " ".join(shlex.quote(a) for a in argv)
  results["settings"].update({"questions_file": args.questions, "model_path": args.model or "embedded default", "limit": args.limit, "categories": categories,
                              "skipped_bad_lines": len(bad), "command": command.strip()})
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(to_jsonable(results), f, indent=1)
  with open(os.path.join(args.out, "report.md"), "w") as f:
    f.write(report.markdown(results, command=results["settings"]["command"]))
  report.plot_all(results, args.out)
  _print_summary(results)
  print(f"wrote {os.path.join(args.out, 'results.json')}, report.md and {len(report.PLOTS)} plots", file=sys.stderr)
  return 0


def _print_summary(results: dict):
  s = results["summary"]
  from specjax.harness.metrics import COMPARISONS
  for m, entry in s.items():
    if m in COMPARISONS:
      continue
    e = entry["overall"]
    sp = f"{e['speedup']:.2f}x" if e["speedup"] is not None else "-"
    same = f", identical {e['identical_to_ar']:.0%}" if e["identical_to_ar"] is not None else ""
    print(f"{m:>18}: {e['tokens_per_s']:7.1f} tok/s  speedup {sp:>6}  tau {e['mean_accepted']:.2f}{same}")
  if "vs_hf" in s and s["vs_hf"]["overall"].get("ratio") is not None:
    v = s["vs_hf"]["overall"]
    print(f"specjax best ({v['specjax_best']}) / HF best ({v['hf_best']}): {v['ratio']:.2f}x")
  if "vs_llamacpp" in s and s["vs_llamacpp"]["overall"].get("ratio") is not None:
    v = s["vs_llamacpp"]["overall"]
    same = v.get("greedy_token_agreement")
    print(f"specjax AR / llama.cpp greedy: {v['ratio']:.2f}x; specjax best ({v['specjax_best']}) / llama.cpp best "
          f"({v['llamacpp_best']}): {v['best_ratio']:.2f}x"
          + (f"; llama.cpp greedy = AR on {v['greedy_identical_to_ar']:.0%} of prompts, token agreement "
             f"{same:.0%}" if same is not None else ""))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m specjax.harness", description=__doc__)
  add_arguments(ap)
  argv = sys.argv[1:] if argv is None else argv
  args = ap.parse_args(argv)
  args.argv = argv
  try:
    return run(args)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
