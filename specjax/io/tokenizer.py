"""Tokenizer (HF `tokenizers`) and chat template (jinja2), from GGUF metadata or an HF dir."""
from __future__ import annotations

import hashlib

import jinja2
from jinja2 import sandbox
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers


class Tokenizer:
  """encode(text) -> list[int], decode(ids) -> str, plus the chat template."""

  def __init__(self, tok: HFTokenizer, chat_template: str | None, bos_id=None, eos_ids=(), add_bos=False):
    self._tok = tok
    self.chat_template = chat_template
    self.bos_id = bos_id
    self.eos_ids = tuple(eos_ids)
    self.add_bos = add_bos
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    if not isinstance(text, str):
      raise ValueError(f"encode takes a str, got {type(text).__name__}")
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return ([self.bos_id] if self.add_bos and self.bos_id is not None else []) + ids

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
    if not self.chat_template:
      raise ValueError("this model has no chat template; pass plain text prompts (chat=False)")
    if isinstance(messages, str):
      messages = [{"role": "user", "content": messages}]
    env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                      bos_token="", eos_token="")

  def fingerprint(self) -> str:
    """Hash of the vocabulary, so a drafter from another tokenizer is refused."""
    vocab = sorted(self._tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    return hashlib.sha1("\n".join(t for t, _ in vocab).encode()).hexdigest()[:16]


def _raise(msg):
  raise jinja2.TemplateError(msg)


def tokenizer_from_gguf(meta: dict, eos_ids) -> Tokenizer:
  if meta["tokenizer_model"] != "gpt2":
    raise ValueError(f"unsupported GGUF tokenizer model {meta['tokenizer_model']!r}; specjax reads byte-level "
                     "BPE ('gpt2') tokenizers")
  tokens, merges = meta["tokens"], meta["merges"]
  vocab = {t: i for i, t in enumerate(tokens)}
  bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False)
  tok = HFTokenizer(bpe)
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if meta.get("tokenizer_pre") == "smollm":  # llama.cpp's smollm pre-tokenizer splits digits one by one
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  else:
    tok.pre_tokenizer = byte_level
  tok.decoder = decoders.ByteLevel()
  # token_type 3 = control tokens (<|im_start|>, ...): matched whole, never split.
  special = [tokens[i] for i, ty in enumerate(meta["token_type"]) if ty == 3]
  tok.add_special_tokens(special)
  return Tokenizer(tok, meta["chat_template"], meta["bos_id"], eos_ids, meta["add_bos"])


def tokenizer_from_hf_dir(path: str, eos_ids, bos_id=None) -> Tokenizer:
  import json
  import os
  tok_file = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(tok_file):
    raise FileNotFoundError(f"{tok_file!r} not found; an HF model directory needs its tokenizer.json")
  template = None
  cfg_file = os.path.join(path, "tokenizer_config.json")
  if os.path.isfile(cfg_file):
    with open(cfg_file) as f:
      template = json.load(f).get("chat_template")
  return Tokenizer(HFTokenizer.from_file(tok_file), template, bos_id, eos_ids, False)
