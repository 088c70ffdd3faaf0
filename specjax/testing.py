"""Tiny random models and fixtures for fast tests (never for claims)."""
from __future__ import annotations

import numpy as np
from flax import nnx

from specjax.models.llama import Llama, LlamaConfig
from specjax.models.model import Model


class ByteTokenizer:
  """A toy tokenizer over bytes (ids 3..258); ids 0-2 are pad/bos/eos."""

  chat_template = None

  def __init__(self, vocab_size: int = 259):
    self.vocab_size = vocab_size
    self.bos_id, self.eos_ids = 1, (2,)

  def encode(self, text: str) -> list[int]:
    return [3 + (b % (self.vocab_size - 3)) for b in text.encode()]

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    return bytes((i - 3) % 256 for i in ids if i >= 3).decode("utf-8", errors="replace")

  def apply_chat_template(self, messages, add_generation_prompt=True) -> str:
    text = messages if isinstance(messages, str) else "\n".join(m["content"] for m in messages)
    return f"user: {text}\nassistant:"

  def fingerprint(self) -> str:
    return f"bytes-{self.vocab_size}"


def tiny_config(**overrides) -> LlamaConfig:
  base = dict(vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, ffn=64, rope_base=10000.0,
              eos_ids=(2,), bos_id=1, max_context=1024)
  base.update(overrides)
  return LlamaConfig(**base)


def tiny_model(seed: int = 0, scale: float = 1.0, **overrides) -> Model:
  """A random Llama small enough to compile in seconds. `scale` sharpens its logits."""
  cfg = tiny_config(**overrides)
  module = Llama(cfg, nnx.Rngs(seed))
  if scale != 1.0:
    module.embed.set_value(module.embed[...] * scale)
  tok = ByteTokenizer(cfg.vocab_size) if cfg.vocab_size >= 259 else None
  return Model.from_module(module, tokenizer=tok, name=f"tiny-{seed}")


def random_prompts(n: int, vocab: int, lo: int = 3, hi: int = 12, seed: int = 0) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return [rng.integers(3, vocab, size=int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)]


def gof_pvalue(samples, law) -> float:
  """Chi-square goodness of fit of samples [N, n] (ids) to law [V]*n (probabilities, any
  scale); cells expected < 5 are pooled. An id outside [0, V), or in a cell of probability
  0, gives p-value 0 (the law forbids it). The one test of losslessness the tests share."""
  from scipy import stats  # a dev dependency, only for tests
  samples = np.asarray(samples).reshape(len(samples), -1)
  law = np.asarray(law, np.float64)
  n_seeds, n_tokens = samples.shape
  if law.ndim != n_tokens:
    raise ValueError(f"law has {law.ndim} axes but the samples have {n_tokens} tokens each")
  if samples.min() < 0 or samples.max() >= law.shape[0]:
    return 0.0
  counts = np.bincount(np.ravel_multi_index(samples.T, law.shape), minlength=law.size)
  expected = law.ravel() / law.sum() * n_seeds
  if counts[expected == 0].sum():
    return 0.0
  big = expected >= 5
  obs, exp = list(counts[big]), list(expected[big])
  small = (~big) & (expected > 0)
  if small.any():
    if expected[small].sum() >= 5:
      obs.append(counts[small].sum()), exp.append(expected[small].sum())
    else:  # too little to stand alone: pool it into the smallest big cell
      j = int(np.argmin(exp))
      obs[j] += counts[small].sum()
      exp[j] += expected[small].sum()
  if len(obs) < 2:
    return 1.0
  return float(stats.chisquare(obs, exp).pvalue)


def exact_law(model: Model, prompt, sampling, n_tokens: int) -> np.ndarray:
  """P(x_1 .. x_n) [V]*n of `model`'s next n tokens after `prompt` under the warped policy,
  in float64, by enumerating every prefix with plain forwards (small vocabularies only)."""
  from specjax.models.model import forward_logits
  from specjax.sampling import warp
  V = model.config.vocab_size

  def p(prefix):
    q = np.asarray(warp(forward_logits(model, list(prompt) + list(prefix))[-1], sampling), np.float64)
    return q / q.sum()

  def law(prefix, n):
    here = p(prefix)
    if n == 1:
      return here
    return np.stack([here[a] * law(prefix + [a], n - 1) for a in range(V)])

  return law([], n_tokens)
