"""Command line: python -m specjax {generate,demo,bench,train,audit}."""
from __future__ import annotations

import argparse
import json
import sys

# Copy-editing a given text: the answer repeats most of the prompt, which is where drafting pays.
DEMO_PROMPT = ("Correct the spelling mistakes in this text and return the corrected text only:\n\n"
               "Speculative decoding lets a cheap drafter gues several tokens, which the large modle then checks "
               "in a single forward pass. Acepted guesses are kept and the first wrong one is replaced, so the "
               "output folows the large model exactly. It makes decoding faster without changing the text, and "
               "it works best when the answer repeats words from the question, as in editing, extraction or "
               "translation of names.")


def _add_sampling(p: argparse.ArgumentParser):
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top-k", type=int, default=0, help="0 = off")
  p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
  p.add_argument("--seed", type=int, default=0)


def _add_model(p: argparse.ArgumentParser):
  p.add_argument("--model", default=None, help="a .gguf file or HF directory (default: embedded SmolLM2-135M)")
  p.add_argument("--drafter", default="none", help="none, ngram, draft, eagle1, eagle3, mtp, ...")
  p.add_argument("--k", type=int, default=None, help="drafted tokens per step (default: the drafter's own)")


def _drafter(args, model):
  import specjax as sj
  from specjax.drafters import default_k
  k = args.k if args.k is not None else default_k(args.drafter)
  return sj.make_drafter(args.drafter, model, k=k)


def cmd_generate(args) -> int:
  import specjax as sj
  sampling = sj.Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
  model = sj.load_model(args.model)
  drafter = _drafter(args, model)
  out = sj.generate(model, [args.prompt], drafter=drafter, sampling=sampling, max_new_tokens=args.max_new_tokens,
                    seed=args.seed, chat=args.chat, dynamic=args.dynamic)
  st = out.stats
  if args.json:
    print(json.dumps({
        "text": out.texts[0], "tokens": out.tokens[0], "new_tokens": st["new_tokens"], "wall_s": st["wall_s"],
        "prefill_s": st["prefill_s"], "compile_s": st["compile_s"], "tokens_per_s": st["tokens_per_s"],
        "drafter": args.drafter, "k": st["k"], "mean_accepted": st["mean_accepted"],
        "acceptance_per_position": st["acceptance_per_position"],
        "accepted_per_step": st["rows"][0]["accepted_per_step"], "dynamic": st["dynamic"],
        "steps_by_drafts": st["steps_by_drafts"], "cost_model": st["cost_model"],
        "logprobs": out.logprobs[0].tolist()}))
  else:
    print(out.texts[0])
    print(f"\n[{st['new_tokens']} tokens in {st['wall_s']:.2f} s = {st['tokens_per_s']:.1f} tokens/s; "
          f"drafter {args.drafter}, mean accepted {st['mean_accepted']:.2f}; steps by drafts verified "
          f"{st['steps_by_drafts']}; compile {st['compile_s']:.1f} s]",
          file=sys.stderr)
  return 0


def cmd_demo(args) -> int:
  """AR next to every shipped drafter on one chat prompt where drafting pays (copy-editing a given text)."""
  import specjax as sj
  from specjax import kernels
  from specjax.drafters import available, default_k
  model = sj.load_model(args.model)
  print(f"model: {model}\nCPU kernels: {kernels.selected_isa() if kernels.kernel_available() else 'off (XLA)'} "
        f"variant (runs here: {', '.join(kernels.executable_isas())})")
  drafters = [("none", None)]
  for name in (n for n in ("ngram", "eagle3", "mtp") if n in available()):
    try:
      drafters.append((name, sj.make_drafter(name, model, k=default_k(name))))
    except FileNotFoundError as e:  # a learned drafter without shipped weights
      print(f"({name} unavailable: {e})")
  prompt = [args.prompt]
  results = {}
  for name, d in drafters:
    sj.generate(model, prompt, drafter=d, max_new_tokens=args.max_new_tokens, chat=True)  # compile + warm-up
    runs = [sj.generate(model, prompt, drafter=d, max_new_tokens=args.max_new_tokens, chat=True) for _ in range(3)]
    results[name] = max(runs, key=lambda o: o.stats["tokens_per_s"])  # one short prompt: best of 3 steadies the rate
  ar = results["none"]
  print(f"\nprompt: {args.prompt}\n\n{ar.texts[0]}\n")
  for name, out in results.items():
    st = out.stats
    line = f"{name:<6} {st['tokens_per_s']:6.1f} tokens/s  ({st['new_tokens']} tokens"
    if name != "none":
      by = st.get("steps_by_drafts", {})
      plain = by.get(0, 0) / max(sum(by.values()), 1)
      line += (f", k={st['k']}, tau={st['mean_accepted']:.2f}; speedup "
               f"{st['tokens_per_s'] / ar.stats['tokens_per_s']:.2f}x; plain steps {100 * plain:.0f}%; "
               f"identical to AR: {out.tokens[0] == ar.tokens[0]}")
    print(line + ")")
  print("\n(tau: tokens per target forward; plain steps: steps where dynamic speculation verified no draft "
        "because the drafter's recent acceptance could not pay for its verify rows)")
  return 0


def cmd_audit(args) -> int:
  """Greedy identity of a drafter against AR on a few prompts (a quick correctness check)."""
  import specjax as sj
  model = sj.load_model(args.model)
  drafter = _drafter(args, model)
  prompts = args.prompt or [DEMO_PROMPT, "Write a haiku about the sea.", "List three prime numbers."]
  ar = sj.generate(model, prompts, max_new_tokens=args.max_new_tokens, chat=True)
  sp = sj.generate(model, prompts, drafter=drafter, max_new_tokens=args.max_new_tokens, chat=True)
  same = [a == b for a, b in zip(ar.tokens, sp.tokens)]
  print(json.dumps({"drafter": args.drafter, "identical": same, "mean_accepted": sp.stats["mean_accepted"]}))
  return 0 if all(same) else 1


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m specjax", description="Lossless speculative decoding in JAX.")
  sub = ap.add_subparsers(dest="command", required=True)
  g = sub.add_parser("generate", help="generate text for one prompt")
  g.add_argument("--prompt", required=True)
  g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
  g.add_argument("--max-new-tokens", type=int, default=128)
  g.add_argument("--json", action="store_true")
  g.add_argument("--dynamic", action=argparse.BooleanOptionalAction, default=True,
                 help="dynamic speculation: each step verifies as many drafts as pay on this machine, 0 included "
                      "(default on; --no-dynamic verifies every proposal)")
  _add_sampling(g)
  _add_model(g)
  g.set_defaults(fn=cmd_generate)
  d = sub.add_parser("demo", help="AR vs the best available drafter on the embedded model")
  d.add_argument("--prompt", default=DEMO_PROMPT)
  d.add_argument("--max-new-tokens", type=int, default=128)
  d.add_argument("--model", default=None)
  d.set_defaults(fn=cmd_demo)
  a = sub.add_parser("audit", help="check greedy speculative output equals autoregressive output")
  a.add_argument("--prompt", action="append")
  a.add_argument("--max-new-tokens", type=int, default=64)
  _add_model(a)
  a.set_defaults(fn=cmd_audit)
  for name, module in (("bench", "specjax.harness.cli"), ("train", "specjax.train.cli")):
    try:
      mod = __import__(module, fromlist=["add_parser"])
    except ImportError:
      continue
    mod.add_parser(sub).set_defaults(fn=mod.run)
  args = ap.parse_args(argv)
  try:
    return args.fn(args)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
