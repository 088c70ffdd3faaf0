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
