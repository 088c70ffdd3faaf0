"""Benchmark arithmetic (BENCHMARKS.md definitions), as small pure functions over run records.

A run record is a dict for one (method, question, turn) with at least
`drafter, question_id, category, turn, new_tokens, wall_s, tokens, steps`, and for
speculative methods `accepted_per_step` (tokens emitted by each verify step),
`reached_per_position` / `accepted_per_position` (counts per draft position).

- speedup = mean over prompts of tokens/s of the method / the same mean for the
  baseline, over the prompts both ran (Spec-Bench).
- τ (mean accepted) = tokens emitted / verify steps, pooled over all steps.
- α_i = accepted at position i / reached position i, pooled; predicted
  τ = 1 + Σ_i Π_{j<=i} α_j.
- identical_to_ar = fraction of prompts whose token ids equal the baseline's.
- ceiling (AR runs that record `decode_s`) = the speedup a method would have if its
  decode loop cost nothing: mean over prompts of new / (wall - decode_s), over the same
  mean of new / wall. Prefill and the call's other fixed costs bound every drafter by it.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

BASELINE = "none"
HF_BASELINE = "hf-greedy"
LLAMACPP_BASELINE = "llamacpp-greedy"
OVERALL = "overall"
# Other engines' methods, by name prefix, and the method each one's speedup is measured against.
PEER_BASELINES = {"hf-": HF_BASELINE, "llamacpp-": LLAMACPP_BASELINE}
COMPARISONS = ("vs_hf", "vs_llamacpp")  # summary keys that are not methods


def peer_prefix(method: str) -> str | None:
  """"hf-" or "llamacpp-" for another engine's method, None for specjax's own."""
  return next((p for p in PEER_BASELINES if method.startswith(p)), None)


def tokens_per_s(new_tokens: int, wall_s: float) -> float:
  return new_tokens / wall_s if wall_s > 0 else 0.0


def mean_tokens_per_s(runs: Iterable[dict]) -> float:
  """Mean over prompts of (new tokens / wall seconds)."""
  rates = [tokens_per_s(r["new_tokens"], r["wall_s"]) for r in runs]
  return float(np.mean(rates)) if rates else 0.0


def speedup(method_runs: Sequence[dict], baseline_runs: Sequence[dict]) -> float | None:
  """Spec-Bench speedup over the prompts both ran: mean tokens/s of the method / mean of the baseline."""
  base = {_prompt_key(r): r for r in baseline_runs}
  pairs = [(r, base[_prompt_key(r)]) for r in method_runs if _prompt_key(r) in base]
  if not pairs:
    return None
  denom = mean_tokens_per_s(b for _, b in pairs)
  return mean_tokens_per_s(m for m, _ in pairs) / denom if denom > 0 else None


def ceiling(baseline_runs: Sequence[dict]) -> float | None:
  """The Spec-Bench speedup of a method whose decode loop took no time (Amdahl's bound), or
  None when the runs do not record `decode_s`."""
  runs = [r for r in baseline_runs if r.get("decode_s") is not None]
  if not runs:
    return None
  free = mean_tokens_per_s({**r, "wall_s": r["wall_s"] - r["decode_s"]} for r in runs)
  denom = mean_tokens_per_s(runs)
  return free / denom if denom > 0 else None


def prefill_share(runs: Sequence[dict]) -> float | None:
  """Fraction of the wall time spent in prefill, pooled, or None when not recorded."""
  runs = [r for r in runs if r.get("prefill_s") is not None]
  wall = sum(r["wall_s"] for r in runs)
  return sum(r["prefill_s"] for r in runs) / wall if runs and wall > 0 else None


def mean_accepted(runs: Iterable[dict]) -> float:
  """τ: tokens emitted per verify step, pooled over every step of every run (AR gives 1)."""
  runs = list(runs)
  steps = sum(r["steps"] for r in runs)
  return sum(r["new_tokens"] for r in runs) / steps if steps else 0.0


def acceptance_per_position(runs: Iterable[dict]) -> list[float]:
  """α_i = P(draft position i accepted | positions < i accepted), pooled over runs."""
  reached = accepted = None
  for r in runs:
    re, ac = np.asarray(r.get("reached_per_position") or [], float), np.asarray(
        r.get("accepted_per_position") or [], float)
    if not re.size:
      continue
    if reached is None:
      reached, accepted = np.zeros_like(re), np.zeros_like(ac)
    if re.shape != reached.shape:
      raise ValueError(f"runs mix draft lengths {reached.size} and {re.size}; summarise one k at a time")
    reached, accepted = reached + re, accepted + ac
  if reached is None:
    return []
  return (accepted / np.maximum(reached, 1)).tolist()


def predicted_tau(alphas: Sequence[float]) -> float:
  """Expected tokens per step of a chain: 1 + Σ_i Π_{j<=i} α_j."""
  return float(1.0 + np.sum(np.cumprod(np.asarray(alphas, float)))) if len(alphas) else 1.0


def accepted_length_histogram(runs: Iterable[dict], k: int) -> list[int]:
  """Counts of steps that emitted 1 .. k+1 tokens (index 0 = 1 token)."""
  counts = np.zeros(k + 1, int)
  for r in runs:
    per_step = np.asarray(r.get("accepted_per_step") or [], int)
    per_step = per_step[(per_step >= 1) & (per_step <= k + 1)]
    counts += np.bincount(per_step - 1, minlength=k + 1)[:k + 1]
  return counts.tolist()


def identical_fraction(method_runs: Sequence[dict], baseline_runs: Sequence[dict]) -> float | None:
  """Fraction of shared prompts whose token ids equal the baseline's."""
  base = {_prompt_key(r): r["tokens"] for r in baseline_runs}
  same = [list(r["tokens"]) == list(base[_prompt_key(r)]) for r in method_runs if _prompt_key(r) in base]
  return sum(same) / len(same) if same else None


def common_prefix_fraction(method_runs: Sequence[dict], baseline_runs: Sequence[dict]) -> float | None:
  """Mean over shared prompts of (tokens equal to the baseline's before the first difference) / (the longer
  of the two): how far another engine's greedy output follows specjax's AR before diverging (1.0 = identical)."""
  base = {_prompt_key(r): list(r["tokens"]) for r in baseline_runs}
  fractions = []
  for r in method_runs:
    b = base.get(_prompt_key(r))
    if b is None:
      continue
    n = next((i for i, (x, y) in enumerate(zip(r["tokens"], b)) if x != y), min(len(r["tokens"]), len(b)))
    fractions.append(n / max(len(b), len(r["tokens"]), 1))
  return float(np.mean(fractions)) if fractions else None


def _prompt_key(run: dict):
  return (run["category"], run["question_id"], run["turn"])


def summarize_group(runs: Sequence[dict], baseline_runs: Sequence[dict], ar_runs: Sequence[dict] | None,
                    greedy: bool) -> dict:
  """The summary entry of one method over one group of prompts."""
  alphas = acceptance_per_position(runs)
  wall = sum(r["wall_s"] for r in runs)
  new = sum(r["new_tokens"] for r in runs)
  return {
      "prompts": len(runs),
      "new_tokens": new,
      "wall_s": wall,
      "tokens_per_s": mean_tokens_per_s(runs),
      "aggregate_tokens_per_s": tokens_per_s(new, wall),
      "speedup": speedup(runs, baseline_runs),
      "mean_accepted": mean_accepted(runs),
      "acceptance_per_position": alphas,
      "predicted_tau": predicted_tau(alphas) if alphas else None,
      "identical_to_ar": identical_fraction(runs, ar_runs) if greedy and ar_runs is not None else None,
      "prefill_share": prefill_share(runs),
      "ceiling": ceiling(runs) if runs and runs[0]["drafter"] == BASELINE else None,
  }


def summarize(runs: Sequence[dict], greedy: bool = True) -> dict:
  """summary[method][category | "overall"] for every method in `runs`, plus summary["vs_hf"] when HF ran
  and summary["vs_llamacpp"] when llama.cpp ran.

  specjax methods are compared with `none`; another engine's methods (names starting "hf-" or
  "llamacpp-") with that engine's greedy for their speedup and with specjax's `none` for identical_to_ar.
  """
  methods = list(dict.fromkeys(r["drafter"] for r in runs))
  categories = list(dict.fromkeys(r["category"] for r in runs))
  by = {(m, c): [r for r in runs if r["drafter"] == m and r["category"] == c] for m in methods for c in categories}
  by.update({(m, OVERALL): [r for r in runs if r["drafter"] == m] for m in methods})
  summary: dict = {}
  for m in methods:
    prefix = peer_prefix(m)
    base = PEER_BASELINES[prefix] if prefix else BASELINE
    summary[m] = {}
    for c in categories + [OVERALL]:
      if by[(m, c)]:
        summary[m][c] = summarize_group(by[(m, c)], by.get((base, c), []), by.get((BASELINE, c)), greedy)
  if any(m.startswith("hf-") for m in methods):
    summary["vs_hf"] = {c: vs_hf({m: s[c] for m, s in summary.items() if m not in COMPARISONS and c in s})
                        for c in categories + [OVERALL]}
  if LLAMACPP_BASELINE in methods:
    summary["vs_llamacpp"] = {}
    for c in categories + [OVERALL]:
      v = vs_llamacpp({m: s[c] for m, s in summary.items() if m not in COMPARISONS and c in s})
      if greedy and v["ratio"] is not None:
        v["greedy_token_agreement"] = common_prefix_fraction(by[(LLAMACPP_BASELINE, c)], by.get((BASELINE, c), []))
      summary["vs_llamacpp"][c] = v
  return summary


def _best(entries: dict, mine) -> tuple[str | None, float]:
  rates = {m: e["tokens_per_s"] for m, e in entries.items() if mine(m)}
  if not rates:
    return None, 0.0
  best = max(rates, key=rates.get)
  return best, rates[best]


def vs_hf(entries: dict) -> dict:
  """specjax's best tokens/s / HF's best tokens/s among the methods of one group."""
  best, best_tps = _best(entries, lambda m: peer_prefix(m) is None)
  hf_best, hf_tps = _best(entries, lambda m: m.startswith("hf-"))
  if best is None or hf_best is None:
    return {"ratio": None}
  return {"ratio": best_tps / hf_tps if hf_tps > 0 else None,
          "specjax_best": best, "specjax_tokens_per_s": best_tps, "hf_best": hf_best, "hf_tokens_per_s": hf_tps}


def vs_llamacpp(entries: dict) -> dict:
  """specjax AR tokens/s / llama.cpp greedy tokens/s ("ratio"), and specjax's best method / llama.cpp's
  best ("best_ratio"), among the methods of one group; identical_to_ar of llama.cpp's greedy (at T = 0)."""
  ar, greedy = entries.get(BASELINE), entries.get(LLAMACPP_BASELINE)
  if ar is None or greedy is None:
    return {"ratio": None}
  best, best_tps = _best(entries, lambda m: peer_prefix(m) is None)
  theirs, theirs_tps = _best(entries, lambda m: m.startswith("llamacpp-"))
  return {"ratio": ar["tokens_per_s"] / greedy["tokens_per_s"] if greedy["tokens_per_s"] > 0 else None,
          "ar_tokens_per_s": ar["tokens_per_s"], "llamacpp_greedy_tokens_per_s": greedy["tokens_per_s"],
          "best_ratio": best_tps / theirs_tps if theirs_tps > 0 else None,
          "specjax_best": best, "specjax_tokens_per_s": best_tps,
          "llamacpp_best": theirs, "llamacpp_tokens_per_s": theirs_tps,
          "greedy_identical_to_ar": greedy["identical_to_ar"]}
