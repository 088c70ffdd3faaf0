"""GGUF (llama.cpp) files -> config, HF-named fp32 tensors, tokenizer fields.

Two conversions undo what llama.cpp's converter did: ggml lists dimensions
fastest-first (so a torch [out, in] matrix shows as [in, out]; numpy data is
already [out, in]), and Q/K rows are permuted from HF's rotate-half RoPE
layout into interleaved pairs.
"""
from __future__ import annotations

import os

import numpy as np

from specjax.models.llama import LlamaConfig

_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
SUPPORTED_ARCHITECTURES = ("llama",)


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's `permute` on a [out, in] Q or K matrix."""
  out, d_in = w.shape
  return w.reshape(n_heads, out // n_heads // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def _field(reader, key, default=None):
  import gguf
  f = reader.fields.get(key)
  if f is None or not f.data:
    return default
  if f.types[0] == gguf.GGUFValueType.ARRAY:
    if f.types[-1] == gguf.GGUFValueType.STRING:
      return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]
    return [f.parts[i][0].item() for i in f.data]
  if f.types[0] == gguf.GGUFValueType.STRING:
    return bytes(f.parts[f.data[0]]).decode("utf-8")
  return f.parts[f.data[0]][0].item()


def open_gguf(path: str):
  import gguf
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file not found: {path!r}; pass the path of a .gguf file")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # the reader raises assorted errors on truncated/corrupt files
    size = os.path.getsize(path)
    raise ValueError(f"cannot read GGUF file {path!r} ({size} bytes): {type(e).__name__}: {e}; "
                     "the file is truncated or not a GGUF file, download or copy it again") from e


def read_gguf(path: str):
  """Returns (LlamaConfig, {hf_name: float32 array}, metadata dict).

  metadata["packed"] holds the block-quantized matrices as stored, for the CPU
  kernel: {hf_name: (kind, uint8 blocks [out, in / 32 * block bytes])}, rows in
  the same (un-permuted) order as the float32 tensor."""
  import gguf
  reader = open_gguf(path)
  arch = _field(reader, "general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ValueError(f"{path!r}: unsupported architecture {arch!r}; specjax loads {SUPPORTED_ARCHITECTURES}")
  g = lambda k, d=None: _field(reader, f"{arch}.{k}", d)
  tokens = _field(reader, "tokenizer.ggml.tokens", [])
  heads, hidden = g("attention.head_count"), g("embedding_length")
  kv_heads = g("attention.head_count_kv", heads)
  names = {t.name for t in reader.tensors}
  eos = _field(reader, "tokenizer.ggml.eos_token_id")
  extra_eos = [tokens.index(t) for t in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>") if t in tokens]
  cfg = LlamaConfig(
      vocab_size=g("vocab_size", len(tokens)), hidden=hidden, layers=g("block_count"), heads=heads,
      kv_heads=kv_heads, head_dim=g("rope.dimension_count", hidden // heads),
      ffn=g("feed_forward_length"), rope_base=float(g("rope.freq_base", 10000.0)),
      norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
      tie_embeddings="output.weight" not in names, bos_id=_field(reader, "tokenizer.ggml.bos_token_id"),
      eos_ids=tuple(sorted(set(([eos] if eos is not None else []) + extra_eos))),
      max_context=g("context_length", 8192))
  tensors, packed = {}, {}
  kinds = {gguf.GGMLQuantizationType.Q4_1: "q4_1", gguf.GGMLQuantizationType.Q8_0: "q8_0"}
  for t in reader.tensors:
    try:
      data = gguf.quants.dequantize(t.data, t.tensor_type)
    except Exception as e:
      raise ValueError(f"{path!r}: cannot dequantize tensor {t.name} of type {t.tensor_type.name}: {e}") from e
    data = np.asarray(data, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
    blocks = np.asarray(t.data).reshape(data.shape[0], -1) if t.tensor_type in kinds and data.ndim == 2 else None
    if t.name == "token_embd.weight":
      name = "model.embed_tokens.weight"
    elif t.name == "output_norm.weight":
      name = "model.norm.weight"
    elif t.name == "output.weight":
      name = "lm_head.weight"
    elif t.name.startswith("blk."):
      _, i, kind, _ = t.name.split(".", 3)
      if kind not in _NAMES:
        continue  # e.g. rope_freqs: not used by this architecture's default rope
      if kind in ("attn_q", "attn_k"):  # a row permutation: the same on the float and the block rows
        n = heads if kind == "attn_q" else kv_heads
        data = _unpermute(data, n)
        blocks = None if blocks is None else _unpermute(blocks, n)
      name = f"model.layers.{i}.{_NAMES[kind]}.weight"
    else:
      continue
    tensors[name] = data
    if blocks is not None:
      packed[name] = (kinds[t.tensor_type], blocks)
  meta = {
      "name": _field(reader, "general.name", os.path.basename(path)),
      "tokenizer_model": _field(reader, "tokenizer.ggml.model"),
      "tokenizer_pre": _field(reader, "tokenizer.ggml.pre"),
      "tokens": tokens,
      "merges": _field(reader, "tokenizer.ggml.merges", []),
      "token_type": _field(reader, "tokenizer.ggml.token_type", []),
      "bos_id": cfg.bos_id, "eos_id": eos,
      "add_bos": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
      "chat_template": _field(reader, "tokenizer.chat_template"),
      "packed": packed,
  }
  return cfg, tensors, meta
