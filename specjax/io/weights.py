"""HF-named weight arrays -> a specjax `Llama` module. Every loader ends here.

Names follow HF transformers' Llama (`model.layers.{i}.self_attn.q_proj.weight`,
...), with matrices in torch's [out, in] layout; specjax stores [in, out] and
fuses Q/K/V and gate/up, so both conversions live in this one place.
"""
from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from specjax.kernels import pack
from specjax.models.llama import Llama, LlamaConfig, Packed


def expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
  D, q, kv, F = cfg.hidden, cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.ffn
  shapes = {"model.embed_tokens.weight": (cfg.vocab_size, D), "model.norm.weight": (D,)}
  for i in range(cfg.layers):
    p = f"model.layers.{i}."
    shapes.update({
        p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
        p + "self_attn.q_proj.weight": (q, D), p + "self_attn.k_proj.weight": (kv, D),
        p + "self_attn.v_proj.weight": (kv, D), p + "self_attn.o_proj.weight": (D, q),
        p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
        p + "mlp.down_proj.weight": (D, F)})
  if not cfg.tie_embeddings:
    shapes["lm_head.weight"] = (cfg.vocab_size, D)
  return shapes


def _packed(packed, names: list[str]):
  """The named tensors' GGUF blocks with their rows concatenated, in the kernel's layout;
  None unless all of them are block-quantized in one kind the kernel reads."""
  if not packed or any(n not in packed for n in names):
    return None
  kinds = {packed[n][0] for n in names}
  if len(kinds) != 1:
    return None
  (kind,) = kinds
  return tuple(jnp.asarray(a) for a in pack(kind, np.concatenate([packed[n][1] for n in names])))


def _attach(module: nnx.Module, weights: dict) -> None:
  weights = {k: v for k, v in weights.items() if v is not None}
  if weights:
    module.packed = nnx.data(Packed(weights))


def build_llama(cfg: LlamaConfig, tensors: Mapping[str, np.ndarray], source: str, packed=None) -> Llama:
  """Checks every tensor's presence and shape, then assembles the module. `packed`
  ({hf_name: (kind, blocks)}, from read_gguf) adds the block-quantized copies the
  CPU kernel reads (see `Packed`)."""
  shapes = expected_shapes(cfg)
  missing = [n for n in shapes if n not in tensors]
  if missing:
    raise ValueError(f"{source}: missing {len(missing)} weight tensors, e.g. {missing[:3]}; "
                     "the file is incomplete or not a Llama-family checkpoint")
  for name, shape in shapes.items():
    if tuple(tensors[name].shape) != shape:
      raise ValueError(f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape} "
                       f"for the config {cfg}")
  f32 = lambda a: jnp.asarray(np.asarray(a, dtype=np.float32))
  module = nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(0)))
  module.embed.set_value(f32(tensors["model.embed_tokens.weight"]))
  module.final_norm.set_value(f32(tensors["model.norm.weight"]))
  if not cfg.tie_embeddings:
    module.head.set_value(f32(np.asarray(tensors["lm_head.weight"]).T))
  for i, block in enumerate(module.blocks):
    t = lambda n: np.asarray(tensors[f"model.layers.{i}.{n}.weight"], dtype=np.float32)
    block.attn_norm.set_value(f32(t("input_layernorm")))
    block.mlp_norm.set_value(f32(t("post_attention_layernorm")))
    block.qkv.set_value(f32(np.concatenate([t("self_attn.q_proj"), t("self_attn.k_proj"), t("self_attn.v_proj")]).T))
    block.out.set_value(f32(t("self_attn.o_proj").T))
    block.gate_up.set_value(f32(np.concatenate([t("mlp.gate_proj"), t("mlp.up_proj")]).T))
    block.down.set_value(f32(t("mlp.down_proj").T))
    p = f"model.layers.{i}."
    _attach(block, {
        "qkv": _packed(packed, [p + f"self_attn.{n}_proj.weight" for n in "qkv"]),
        "out": _packed(packed, [p + "self_attn.o_proj.weight"]),
        "gate_up": _packed(packed, [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]),
        "down": _packed(packed, [p + "mlp.down_proj.weight"])})
  _attach(module, {"embed": _packed(packed, ["model.embed_tokens.weight"]) if cfg.tie_embeddings else None,
                   "head": _packed(packed, ["lm_head.weight"])})
  return module


def to_hf_tensors(module: Llama) -> dict[str, np.ndarray]:
  """The inverse of build_llama: HF-named [out, in] float32 arrays (for export and tests)."""
  cfg = module.cfg
  q_dim, kv_dim = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
  a = lambda p: np.asarray(p[...], np.float32)
  out = {"model.embed_tokens.weight": a(module.embed), "model.norm.weight": a(module.final_norm)}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = a(module.head).T
  for i, b in enumerate(module.blocks):
    p = f"model.layers.{i}."
    qkv, gate_up = a(b.qkv).T, a(b.gate_up).T
    out.update({
        p + "input_layernorm.weight": a(b.attn_norm), p + "post_attention_layernorm.weight": a(b.mlp_norm),
        p + "self_attn.q_proj.weight": qkv[:q_dim], p + "self_attn.k_proj.weight": qkv[q_dim:q_dim + kv_dim],
        p + "self_attn.v_proj.weight": qkv[q_dim + kv_dim:], p + "self_attn.o_proj.weight": a(b.out).T,
        p + "mlp.gate_proj.weight": gate_up[:cfg.ffn], p + "mlp.up_proj.weight": gate_up[cfg.ffn:],
        p + "mlp.down_proj.weight": a(b.down).T})
  return {k: np.ascontiguousarray(v) for k, v in out.items()}
