"""The benchmark loop: batch 1, warm-up first, every method on each prompt before the next prompt.

Interleaving per prompt (with the method order rotated from prompt to prompt)
makes machine noise hit all methods alike, so the ratios within one run hold
even on a shared machine. Compilation is excluded from the timed wall seconds
and reported per method; a prompt that needs a new static shape compiles once
per method, outside the timing.
"""
from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from typing import Callable, Sequence

import numpy as np

from specjax.harness import metrics
from specjax.harness.questions import Question, prompt_ids

DEFAULT_K_FALLBACK = 5
HF_CALIBRATE_EVERY = 6  # questions between re-timings of a peer's thread count (HF's and llama.cpp's)


def default_k(name: str) -> int:
  from specjax import drafters
  fn = getattr(drafters, "default_k", None)
  return fn(name) if fn is not None else DEFAULT_K_FALLBACK


def available_drafters() -> tuple[str, ...]:
  from specjax import drafters
  fn = getattr(drafters, "available", None)
  return tuple(fn()) if fn is not None else ("none",) + tuple(drafters._builders())


def split_label(label: str) -> tuple[str, int | None]:
  """"ngram@3" -> ("ngram", 3): one drafter at several k in the same run; "ngram" -> ("ngram", None).
  "eagle3@5:0.3" also sets the drafter's min_confidence (see `label_options`)."""
  name, sep, rest = label.partition("@")
  if not sep:
    return name, None
  k = rest.partition(":")[0]
  if not k.isdigit() or int(k) < 1:
    raise ValueError(f"drafter {label!r}: the part after '@' must be k >= 1, e.g. ngram@3 or eagle3@5:0.3")
  return name, int(k)


def label_options(label: str) -> dict:
  """Drafter options a label carries: "eagle3@5:0.3" -> {"min_confidence": 0.3}."""
  _, sep, c = label.partition("@")[2].partition(":")
  if not sep:
    return {}
  try:
    return {"min_confidence": float(c)}
  except ValueError:
    raise ValueError(f"drafter {label!r}: the part after ':' must be a confidence in [0, 1), "
                     "e.g. eagle3@5:0.3") from None


def check_drafter_names(names: Sequence[str]) -> list[str]:
  """Validates names before any model is loaded; `none` (the baseline) is always first.

  "all" stands for every available drafter (those whose weights are missing are
  then skipped when built, instead of failing the run). "name@k" runs a drafter
  at a given k, so several k of one drafter can be compared in one run.
  """
  have = available_drafters()
  unknown = [n for n in names if split_label(n)[0] not in have and n != "all"]
  from specjax.drafters.eagle import check_min_confidence
  for n in names:
    try:
      check_min_confidence(label_options(n).get("min_confidence", 0.0))
    except ValueError as e:
      raise ValueError(f"drafter {n!r}: {e}") from None
  if unknown:
    raise ValueError(f"unknown or unavailable drafter(s) {', '.join(map(repr, unknown))}; available: "
                     f"{', '.join(have)}")
  return ["none"] + [n for n in dict.fromkeys(names) if n != "none"]


def machine_info() -> dict:
  import jax
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
  except OSError:
    pass
  info = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
          "python": platform.python_version(), "platform": platform.platform(), "jax": jax.__version__,
          "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  if hasattr(os, "getloadavg"):
    info["loadavg_start"] = list(os.getloadavg())
  return info


def _spec_record(out, elapsed: float) -> dict:
  st, row = out.stats, out.stats["rows"][0]
  wall = max(elapsed - st["compile_s"], 1e-9)  # end to end, as the HF peer is timed, compile excluded
  return {"new_tokens": row["new_tokens"], "wall_s": wall, "engine_wall_s": st["wall_s"],
          "compile_s": st["compile_s"], "prefill_s": st["prefill_s"], "decode_s": st["decode_s"],
          "tokens_per_s": metrics.tokens_per_s(row["new_tokens"], wall),
          "steps": row["steps"], "mean_accepted": row["mean_accepted"],
          "accepted_per_step": list(row["accepted_per_step"]),
          "reached_per_position": list(row["reached_per_position"]),
          "accepted_per_position": list(row["accepted_per_position"]), "tokens": list(out.tokens[0]),
          "steps_by_drafts": dict(row["steps_by_drafts"]), "propose_steps": st["propose_steps"]}


class _Methods:
  """Runs one method on one prompt and returns a run record (without the prompt's identity)."""

  def __init__(self, model, drafters: dict, sampling, max_new_tokens: int, seed: int, peers=(), dynamic=True):
    self.model, self.drafters, self.sampling, self.dynamic = model, drafters, sampling, dynamic
    self.max_new_tokens, self.seed = max_new_tokens, seed
    self.peer_of = {m: p for p in peers for m in p.methods}  # another engine's method -> its peer
    self.names = list(drafters) + list(self.peer_of)
    self.compile_s = {n: 0.0 for n in self.names}

  def run(self, name: str, ids: list[int]) -> dict:
    import specjax as sj
    if name in self.drafters:
      def timed():
        t0 = time.perf_counter()
        out = sj.generate(self.model, [ids], drafter=self.drafters[name], sampling=self.sampling,
                          max_new_tokens=self.max_new_tokens, seed=self.seed, dynamic=self.dynamic)
        return _spec_record(out, time.perf_counter() - t0)
      rec = timed()
      if rec["compile_s"] > 0:
        # A freshly compiled executable's first call also pays one-time warm-up (0.1-0.3 s
        # seen here, in its prefill), which a method compiling a bucket that another method
        # reuses would be charged alone: time a second, identical call instead.
        rec = {**timed(), "compile_s": rec["compile_s"]}
      self.compile_s[name] += rec["compile_s"]
      return rec
    r = self.peer_of[name].generate(ids, name, self.max_new_tokens, temperature=self.sampling.temperature,
                                    top_p=self.sampling.top_p, seed=self.seed)
    return {**r, "tokens_per_s": metrics.tokens_per_s(r["new_tokens"], r["wall_s"]),
            "mean_accepted": r["new_tokens"] / r["steps"]}


def run_benchmark(model, questions: Sequence[Question], drafters: Sequence[str], *, sampling=None,
                  ks: dict | None = None, max_new_tokens: int = 128, seed: int = 0, hf=None, llamacpp=None,
                  progress: bool = True, log: Callable[[str], None] | None = None, dynamic=True) -> dict:
  """Runs every method on every turn of every question; returns the results dict (see results.json).

  Args:
    model: a specjax Model with a tokenizer that has `apply_chat_template`.
    questions: `Question`s (already selected and limited).
    drafters: drafter names; `none` is added first as the baseline.
    ks: drafted tokens per step by drafter name (default: the drafter's own default).
    hf: an `HFPeer` to run beside specjax on the same prompt ids, or None.
    llamacpp: a `LlamaCppPeer` to run beside specjax on the same prompt ids, or None.
    dynamic: `generate`'s dynamic speculation (True, False or a CostModel); results record
      `steps_by_drafts` per run and summed per method.
  """
  import specjax as sj
  from tqdm.auto import tqdm

  log = log or (lambda s: print(s, file=sys.stderr))
  sampling = sampling if sampling is not None else sj.Sampling()
  if model.tokenizer is None:
    raise ValueError("the benchmark model needs a tokenizer (chat template + encode)")
  names = check_drafter_names(drafters)
  explicit = set(drafters)
  if "all" in explicit:
    names = [n for n in dict.fromkeys(names[:1] + list(available_drafters()) + names[1:]) if n != "all"]
  ks = {n: split_label(n)[1] or (ks or {}).get(n, default_k(n)) for n in names if n != "none"}
  built, unbuilt = {}, []
  for n in names:
    try:
      built[n] = sj.make_drafter(split_label(n)[0], model, k=ks[n], **label_options(n)) if n != "none" else None
    except (FileNotFoundError, ValueError) as e:
      if n in explicit:
        raise
      unbuilt.append(f"drafter {n}: {e}")
      ks.pop(n)
      log(f"skipping drafter {n}: {e}")
  names = list(built)
  methods = _Methods(model, built, sampling, max_new_tokens, seed, [p for p in (hf, llamacpp) if p is not None],
                     dynamic)
  greedy = sampling.temperature == 0.0
  t_start = time.perf_counter()
  machine = machine_info()

  # Warm-up: compile and run each method once on the first prompt (results discarded).
  warm_ids = prompt_ids(model.tokenizer, questions[0].turns, [])
  # Peers whose thread count is chosen by timing (threads="auto"), HF and llama.cpp.
  calibrations = {name: p.calibrate for name, p in (("HF", hf), ("llama.cpp", llamacpp))
                  if getattr(p, "calibrate", None) is not None}
  for name, calibrate in calibrations.items():
    log(f"{name} threads: {calibrate(warm_ids)}")
  warmup_s = {}
  for name in methods.names:
    t0 = time.perf_counter()
    methods.run(name, warm_ids)
    warmup_s[name] = time.perf_counter() - t0
  log("warm-up: " + ", ".join(f"{n} {s:.1f}s" for n, s in warmup_s.items()))

  runs, skipped = [], []
  longest_k = max(ks.values(), default=0)
  total = sum(len(q.turns) for q in questions) * len(methods.names)
  bar = tqdm(total=total, desc="bench", unit="run", disable=not progress, file=sys.stderr)
  for qi, q in enumerate(questions):
    answers: list[str] = []
    for turn in range(1, len(q.turns) + 1):
      ids = prompt_ids(model.tokenizer, q.turns, answers)
      if qi and turn == 1 and qi % HF_CALIBRATE_EVERY == 0:
        for calibrate in calibrations.values():
          calibrate(warm_ids)  # the machine's load changes; keep each peer on its faster thread count
      if len(ids) + max_new_tokens + longest_k + 1 > model.config.max_context:
        skipped.append(f"question {q.question_id} ({q.category}) turn {turn}: prompt of {len(ids)} tokens "
                       f"+ {max_new_tokens} new exceeds the context of {model.config.max_context}")
        bar.update(len(methods.names) * (len(q.turns) - turn + 1))
        break
      shift = (qi + turn) % len(methods.names)  # rotate the order so no method always runs first
      order = methods.names[shift:] + methods.names[:shift]
      recs = {}
      for name in order:
        bar.set_postfix_str(f"{q.category} q{q.question_id} t{turn} {name}", refresh=False)
        recs[name] = methods.run(name, ids)
        bar.update(1)
      for name in methods.names:
        runs.append({"drafter": name, "question_id": q.question_id, "category": q.category, "turn": turn,
                     "prompt_tokens": len(ids), "k": ks.get(name, 0), **recs[name]})
      # The next turn continues the conversation with the baseline's answer.
      answers.append(model.tokenizer.decode(recs["none"]["tokens"], skip_special_tokens=True))
  bar.close()
  if hasattr(os, "getloadavg"):
    machine["loadavg_end"] = list(os.getloadavg())
  return {
      "settings": {"drafters": names, "k": ks, "temperature": sampling.temperature, "top_k": sampling.top_k,
                   "top_p": sampling.top_p, "max_new_tokens": max_new_tokens, "seed": seed, "batch": 1,
                   "model": getattr(model, "name", "model"), "questions": len(questions),
                   "prompts": len(runs) // max(len(methods.names), 1),
                   "hf": hf.versions if hf is not None else None,
                   "llamacpp": llamacpp.versions if llamacpp is not None else None,
                   "dynamic": dynamic if isinstance(dynamic, bool) else repr(dynamic),
                   "timing": "wall_s = end-to-end generate call, compilation excluded (compile_s per method)"},
      "machine": machine,
      "compile_s": methods.compile_s,
      "warmup_s": warmup_s,
      "bench_wall_s": time.perf_counter() - t_start,
      "summary": metrics.summarize(runs, greedy=greedy),
      "histograms": {n: metrics.accepted_length_histogram([r for r in runs if r["drafter"] == n], ks[n])
                     for n in names if n != "none"},
      "steps_by_drafts": {n: _sum_counts(r.get("steps_by_drafts", {}) for r in runs if r["drafter"] == n)
                          for n in methods.names},
      "skipped": unbuilt + skipped,
      "runs": runs,
  }


def _sum_counts(dicts) -> dict:
  """{drafts verified: steps} summed over runs."""
  total: dict = {}
  for d in dicts:
    for n, c in d.items():
      total[int(n)] = total.get(int(n), 0) + int(c)
  return dict(sorted(total.items()))


def to_jsonable(obj):
  """numpy scalars/arrays -> Python, recursively (results.json must be plain JSON)."""
  if isinstance(obj, dict):
    return {str(k): to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v) for v in obj]
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  return obj
