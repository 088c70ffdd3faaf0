"""report.md and the PNG plots, from a results dict (the contents of results.json)."""
from __future__ import annotations

import os

from specjax.harness import metrics

PLOTS = ("speedup_by_category.png", "acceptance_per_position.png", "accepted_length_hist.png")
_HATCH = {"hf-": "//", "llamacpp-": "xx"}  # other engines' bars in the tokens/s plot


def _fmt(x, spec=".2f", none="–"):
  """x formatted by spec; a trailing "×" in spec is appended as text."""
  if x is None:
    return none
  return format(x, spec[:-1]) + "×" if spec.endswith("×") else format(x, spec)


def _methods(results: dict) -> tuple[list[str], list[str]]:
  """(specjax's methods, `none` first; other engines' methods)."""
  names = [m for m in results["summary"] if m not in metrics.COMPARISONS]
  return ([m for m in names if metrics.peer_prefix(m) is None],
          [m for m in names if metrics.peer_prefix(m) is not None])


def _categories(results: dict) -> list[str]:
  return [c for c in results["summary"]["none"] if c != metrics.OVERALL] + [metrics.OVERALL]


def markdown(results: dict, command: str | None = None) -> str:
  s, st, mach = results["summary"], results["settings"], results["machine"]
  ours, theirs = _methods(results)
  cats = _categories(results)
  greedy = st["temperature"] == 0.0
  lines = ["# specjax benchmark", ""]
  if command:
    lines += ["```", command, "```", ""]
  ks = ", ".join(f"{n} k={k}" for n, k in st["k"].items())
  lines += [f"Model {st['model']}; {st['prompts']} prompts ({st['questions']} questions, every turn), batch 1, "
            f"{st['max_new_tokens']} new tokens max, temperature {st['temperature']}, top-p {st['top_p']}, "
            f"seed {st['seed']}; {ks or 'no drafters'}.",
            f"Machine: {mach['cpu']}, {mach['cores']} cores, jax {mach['jax']} ({mach['backend']}), {mach['date']}"
            + (f"; load average {mach['loadavg_start'][0]:.1f} at start, {mach.get('loadavg_end', [0])[0]:.1f} at end"
               if "loadavg_start" in mach else "") + ".",
            "", "Speedup = mean over prompts of tokens/s of the method / the same for `none` (Spec-Bench); "
            "τ = tokens per verify step; compilation excluded. AR prefill = share of AR's wall time spent in "
            "prefill; ceiling = the speedup a drafter would reach if decoding cost nothing (Amdahl's bound "
            "from AR's own prefill and fixed costs).", ""]
  lines += ["## Speedup × (τ) per category", ""]
  lines += ["| category | " + " | ".join(ours[1:]) + " | AR tok/s | AR prefill | ceiling |", "|---" * (len(ours) + 3) + "|"]
  for c in cats:
    cells = []
    for m in ours[1:]:
      e = s[m].get(c)
      cells.append("–" if e is None else f"{_fmt(e['speedup'])}× ({_fmt(e['mean_accepted'])})")
    name = f"**{c}**" if c == metrics.OVERALL else c
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {_fmt(s['none'][c]['tokens_per_s'], '.1f')} | "
                 f"{_fmt(s['none'][c].get('prefill_share'), '.0%')} | {_fmt(s['none'][c].get('ceiling'), '.2f×')} |")
  lines += ["", "## Overall per method", "",
            "| method | tokens/s | speedup | τ | predicted τ (from α) | identical to AR | compile s |",
            "|---|---|---|---|---|---|---|"]
  for m in ours + theirs:
    e = s[m][metrics.OVERALL]
    comp = results.get("compile_s", {}).get(m)
    lines.append(f"| {m} | {_fmt(e['tokens_per_s'], '.1f')} | {_fmt(e['speedup'])}× | {_fmt(e['mean_accepted'])} | "
                 f"{_fmt(e['predicted_tau'])} | {_fmt(e['identical_to_ar'], '.0%') if greedy else 'n/a (T>0)'} | "
                 f"{_fmt(comp, '.1f')} |")
  if "vs_hf" in s:
    v = s["vs_hf"]
    lines += ["", "## specjax vs HF transformers (same GGUF, same prompt ids, same process)", "",
              f"HF: torch {st['hf']['torch']}, transformers {st['hf']['transformers']}, {_threads(st['hf'])}, "
              f"float32, prompt_lookup_num_tokens={st['hf']['prompt_lookup_num_tokens']}. HF speedups are vs "
              "hf-greedy; identical-to-AR compares with specjax `none`.", "",
              "| category | specjax best | tok/s | HF best | tok/s | ratio |", "|---|---|---|---|---|---|"]
    for c in cats:
      e = v[c]
      if e.get("ratio") is None:
        continue
      name = f"**{c}**" if c == metrics.OVERALL else c
      lines.append(f"| {name} | {e['specjax_best']} | {e['specjax_tokens_per_s']:.1f} | {e['hf_best']} | "
                   f"{e['hf_tokens_per_s']:.1f} | {e['ratio']:.2f}× |")
  if "vs_llamacpp" in s:
    lines += _llamacpp_section(s["vs_llamacpp"], st["llamacpp"], cats, greedy)
  if results.get("skipped"):
    lines += ["", "Skipped:", ""] + [f"- {x}" for x in results["skipped"]]
  lines += ["", f"Harness wall time {results['bench_wall_s'] / 60:.1f} min (warm-up and compilation included).",
            "", "Plots: " + ", ".join(f"[{p}]({p})" for p in PLOTS), ""]
  return "\n".join(lines)


def _llamacpp_section(v: dict, lc: dict, cats: list[str], greedy: bool) -> list[str]:
  lines = ["", "## specjax vs llama.cpp (same GGUF, same prompt ids, same process)", "",
           f"llama.cpp through llama-cpp-python {lc['llama_cpp_python']}, {_threads(lc)}, its own "
           "quantized arithmetic" + ("" if lc.get("extra_buffer_types", True) else ", extra buffer types off "
                                     "(its AMX path segfaults here, see specjax/harness/llamacpp_peer.py)")
           + f"; llamacpp-lookup = LlamaPromptLookupDecoding(num_pred_tokens="
           f"{lc['lookup_num_pred_tokens']}, max_ngram_size={lc['lookup_max_ngram_size']}). Each call starts "
           "from an empty KV cache and is timed from the call to its last token (prefill + decode), after a "
           "warm-up call. AR ratio = specjax `none` tok/s / llama.cpp greedy tok/s; best ratio = specjax's "
           "fastest method / llama.cpp's fastest."
           + (" Greedy = AR: prompts on which llama.cpp's greedy tokens equal specjax's AR tokens; agreement: "
              "mean share of tokens equal before the first difference." if greedy else ""), ""]
  if lc.get("system_info"):
    lines += [f"llama.cpp system info: `{lc['system_info']}`", ""]
  lines += ["| category | AR tok/s | llama.cpp greedy tok/s | AR ratio | specjax best | tok/s | llama.cpp best | "
            "tok/s | best ratio | greedy = AR | agreement |", "|---" * 11 + "|"]
  for c in cats:
    e = v.get(c, {})
    if e.get("ratio") is None:
      continue
    name = f"**{c}**" if c == metrics.OVERALL else c
    lines.append(f"| {name} | {e['ar_tokens_per_s']:.1f} | {e['llamacpp_greedy_tokens_per_s']:.1f} | "
                 f"{e['ratio']:.2f}× | {e['specjax_best']} | {e['specjax_tokens_per_s']:.1f} | {e['llamacpp_best']} | "
                 f"{e['llamacpp_tokens_per_s']:.1f} | {_fmt(e['best_ratio'], '.2f×')} | "
                 f"{_fmt(e['greedy_identical_to_ar'], '.0%')} | {_fmt(e.get('greedy_token_agreement'), '.0%')} |")
  return lines


def _threads(peer: dict) -> str:
  """A peer's thread count, or with threads="auto" every timing that chose it (HF and llama.cpp)."""
  if peer.get("thread_mode") != "auto":
    return f"{peer['threads']} threads"
  cals = peer.get("calibrations", [])
  cal = "; ".join(", ".join(f"{t} thr {r:.1f} tok/s" for t, r in c.items()) for c in cals)
  choices = " and ".join(cals[0]) if cals else "1 and 2"
  return f"threads auto (the faster of {choices}, re-timed every few questions: {cal})"


def plot_all(results: dict, out_dir: str) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  s = results["summary"]
  ours, theirs = _methods(results)
  cats = _categories(results)
  paths = []

  # 1. Speedup per category (specjax drafters vs none) and tokens/s of every method, HF included.
  fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, 1.0 * len(cats) + 3), 8), constrained_layout=True)
  x = np.arange(len(cats))
  drafted = ours[1:]
  w = 0.8 / max(len(drafted), 1)
  for i, m in enumerate(drafted):
    vals = [(s[m].get(c) or {}).get("speedup") or 0.0 for c in cats]
    ax1.bar(x + (i - (len(drafted) - 1) / 2) * w, vals, w, label=m)
  ax1.axhline(1.0, color="k", lw=0.8, ls="--")
  ax1.set_xticks(x, cats, rotation=30, ha="right")
  ax1.set_ylabel("speedup vs AR (×)")
  ax1.set_title("specjax speedup per category (Spec-Bench definition)")
  if drafted:
    ax1.legend(fontsize=8)
  allm = ours + theirs
  w = 0.8 / len(allm)
  for i, m in enumerate(allm):
    vals = [(s[m].get(c) or {}).get("tokens_per_s") or 0.0 for c in cats]
    ax2.bar(x + (i - (len(allm) - 1) / 2) * w, vals, w, label=m, hatch=_HATCH.get(metrics.peer_prefix(m)))
  ax2.set_xticks(x, cats, rotation=30, ha="right")
  ax2.set_ylabel("tokens/s (mean over prompts)")
  engines = [f"{n} ({_HATCH[p]})" for p, n in (("hf-", "HF transformers"), ("llamacpp-", "llama.cpp"))
             if any(m.startswith(p) for m in theirs)]
  ax2.set_title("tokens/s per category, every method" + (f" (hatched: {', '.join(engines)})" if engines else ""))
  ax2.legend(fontsize=8, ncol=2)
  paths.append(_save(fig, out_dir, PLOTS[0]))

  # 2. Per-position acceptance α_i, with the τ they predict beside the measured τ.
  fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
  for m in drafted:
    e = s[m][metrics.OVERALL]
    a = e["acceptance_per_position"]
    if a:
      ax.plot(np.arange(1, len(a) + 1), a, "o-",
              label=f"{m}: τ measured {e['mean_accepted']:.2f}, predicted {_fmt(e['predicted_tau'])}")
  kmax = max((len(s[m][metrics.OVERALL]["acceptance_per_position"]) for m in drafted), default=1)
  ax.set_xticks(np.arange(1, kmax + 1))
  ax.set_xlabel("draft position i")
  ax.set_ylabel("α_i = P(accept i | accepted < i)")
  ax.set_ylim(0, 1.05)
  ax.set_title("per-position acceptance (predicted τ = 1 + Σ_i Π_{j≤i} α_j)")
  if drafted:
    ax.legend(fontsize=8)
  paths.append(_save(fig, out_dir, PLOTS[1]))

  # 3. Tokens emitted per verify step.
  fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
  hists = results.get("histograms", {})
  width = 0.8 / max(len(hists), 1)
  for i, (m, counts) in enumerate(hists.items()):
    counts = np.asarray(counts, float)
    if counts.sum():
      xs = np.arange(1, len(counts) + 1) + (i - (len(hists) - 1) / 2) * width
      ax.bar(xs, counts / counts.sum(), width, label=m)
  ax.set_xlabel("tokens emitted by a verify step (accepted + 1)")
  ax.set_ylabel("fraction of steps")
  ax.set_title("accepted-length histogram")
  if hists:
    ax.legend(fontsize=8)
  paths.append(_save(fig, out_dir, PLOTS[2]))
  return paths


def _save(fig, out_dir: str, name: str) -> str:
  import matplotlib.pyplot as plt
  path = os.path.join(out_dir, name)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
