"""A Llama-family decoder in Flax NNX: GQA, RoPE, RMSNorm, SwiGLU, tied or untied head.

One forward serves prefill, decode, chain verification and (later) tree
verification: it takes T new tokens per row with their RoPE positions, writes
their K/V at slots `cache.lengths[b] + t`, and attends under a mask that is an
argument ([B, T, S] booleans over cache slots). The default mask is causal over
slots, which is what chains and prefill need; a tree passes its own.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from specjax import cache as cache_lib
from specjax.kernels import attention, attention_kernel_applies, attention_reference, dense, unembed


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  hidden: int
  layers: int
  heads: int
  kv_heads: int
  head_dim: int
  ffn: int
  rope_base: float = 10000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  bos_id: int | None = None
  eos_ids: tuple[int, ...] = ()
  max_context: int = 8192

  def __post_init__(self):
    for name in ("vocab_size", "hidden", "layers", "heads", "kv_heads", "head_dim", "ffn"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"LlamaConfig.{name}={value!r} must be a positive int")
    if self.heads % self.kv_heads:
      raise ValueError(f"heads={self.heads} must be a multiple of kv_heads={self.kv_heads} (GQA)")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")


class Packed(nnx.Variable):
  """{weight name: (quants, scales)}: weights also kept block-quantized (see
  `specjax.kernels.pack`) for the CPU kernel's decode/verify steps. A target's are its GGUF
  blocks, exactly the float32 weights beside them; a drafter's may be a lossy Q8_0 copy
  (`heads.pack_head`). A transform of the float32 weights must drop them (set to None)."""


def _packed(module: nnx.Module) -> dict:
  return {} if module.packed is None else module.packed.get_value()


def _weight(rngs: nnx.Rngs, d_in: int, d_out: int) -> nnx.Param:
  return nnx.Param(jax.random.normal(rngs.params(), (d_in, d_out), jnp.float32) * d_in**-0.5)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps) * scale).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotary embedding, HF "rotate_half" layout. x [B, T, ..., H], positions [B, T]."""
  half = x.shape[-1] // 2
  inv_freq = 1.0 / (base ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + (half,))
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


PREFILL_CHUNK = 256  # prompt tokens per prefill pass (see Llama.prefill)


def causal_mask(lengths: jax.Array, num_new: int, max_len: int) -> jax.Array:
  """[B, T, S]: new token t of row b sees slots < lengths[b] + t + 1.

      slot:   0 1 2 3 4 5        (lengths[b] = 3, T = 3)
      t=0     x x x x . .
      t=1     x x x x x .
      t=2     x x x x x x
  """
  slots = jnp.arange(max_len)[None, None, :]
  limit = lengths[:, None, None] + jnp.arange(num_new)[None, :, None]
  return slots <= limit


def tree_cache_mask(lengths: jax.Array, tree_mask: jax.Array, max_len: int) -> jax.Array:
  """[B, T, S] for T tree nodes written at slots lengths[b] + t: node t sees the row's
  prefix (slots < lengths[b]) and the nodes tree_mask [T, T] or [B, T, T] says it sees
  (itself and its ancestors). A chain's tree mask is lower-triangular: `causal_mask`.

      slot:   0 1 2 | 3 4 5        (lengths[b] = 3; node 1 and node 2 are children of node 0)
      t=0     x x x | x . .
      t=1     x x x | x x .
      t=2     x x x | x . x
  """
  B, T = lengths.shape[0], tree_mask.shape[-1]
  tm = jnp.broadcast_to(tree_mask.astype(bool), (B, T, T))
  rel = jnp.arange(max_len)[None, :] - lengths[:, None]  # [B, S] slot - prefix
  inside = (rel >= 0) & (rel < T)
  node = jnp.take_along_axis(tm, jnp.broadcast_to(jnp.clip(rel, 0, T - 1)[:, None, :], (B, T, max_len)), axis=2)
  return (rel < 0)[:, None, :] | (inside[:, None, :] & node)


def _split_mask(mask: jax.Array, starts: jax.Array, num_new: int) -> jax.Array:
  """A [B, T, S] mask over cache slots, where the new tokens go to slots starts[b] + t,
  as [B, T, S + T]: the slots before starts[b], then the new tokens themselves."""
  B, T, S = mask.shape
  before = mask & (jnp.arange(S)[None, None, :] < starts[:, None, None])
  own = jnp.broadcast_to((starts[:, None] + jnp.arange(num_new)[None, :])[:, None, :], (B, T, num_new))
  return jnp.concatenate([before, jnp.take_along_axis(mask, own, axis=2)], axis=-1)


class Block(nnx.Module):
  """Pre-norm decoder block. Q, K, V are one fused matmul and gate/up another."""

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    q_dim, kv_dim = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    self.attn_norm = nnx.Param(jnp.ones((cfg.hidden,), jnp.float32))
    self.qkv = _weight(rngs, cfg.hidden, q_dim + 2 * kv_dim)
    self.out = _weight(rngs, q_dim, cfg.hidden)
    self.mlp_norm = nnx.Param(jnp.ones((cfg.hidden,), jnp.float32))
    self.gate_up = _weight(rngs, cfg.hidden, 2 * cfg.ffn)
    self.down = _weight(rngs, cfg.ffn, cfg.hidden)
    self.packed: Packed | None = None

  def __call__(self, x, positions, k_cache, v_cache, starts, mask, write: bool = True, attend: int | None = None):
    """write=True: the new K/V go into the cache at slots starts[b] + t and the mask is
    [B, T, S]. write=False: the cache is only read, the mask is [B, T, S + T] (cache slots,
    then the new tokens), and the new K/V are returned instead of the cache.
    attend (static): attention reads only the first `attend` cache slots (mask [B, T, attend])."""
    cfg = self.cfg
    B, T, _ = x.shape
    G = cfg.heads // cfg.kv_heads
    q_dim, kv_dim = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    packed = _packed(self)
    h = rms_norm(x, self.attn_norm[...], cfg.norm_eps)
    qkv = dense(h, self.qkv[...], packed.get("qkv"))
    q = qkv[..., :q_dim].reshape(B, T, cfg.kv_heads, G, cfg.head_dim)
    k = qkv[..., q_dim:q_dim + kv_dim].reshape(B, T, cfg.kv_heads, cfg.head_dim)
    v = qkv[..., q_dim + kv_dim:].reshape(B, T, cfg.kv_heads, cfg.head_dim)
    q = rope(q, positions, cfg.rope_base)
    k = rope(k, positions, cfg.rope_base)
    if attend is None and attention_kernel_applies(q, k_cache):  # decode and verify steps on CPU
      attn = attention(write, q, k_cache, v_cache, k, v, _split_mask(mask, starts, T) if write else mask, starts)
      if write:
        attn, k_cache, v_cache = attn
    elif write:
      k_cache = cache_lib.write(k_cache, k, starts)
      v_cache = cache_lib.write(v_cache, v, starts)
      seen = (k_cache, v_cache) if attend is None else (k_cache[:, :, :attend], v_cache[:, :, :attend])
      attn = attention_reference(q, *seen, mask=mask)
    else:
      attn = attention_reference(q, k_cache, v_cache, k, v, mask=mask)
    x = x + dense(attn.reshape(B, T, q_dim), self.out[...], packed.get("out"))
    h = dense(rms_norm(x, self.mlp_norm[...], cfg.norm_eps), self.gate_up[...], packed.get("gate_up"))
    x = x + dense(jax.nn.silu(h[..., :cfg.ffn]) * h[..., cfg.ffn:], self.down[...], packed.get("down"))
    return (x, k_cache, v_cache) if write else (x, k, v)


class Llama(nnx.Module):
  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Param(jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden), jnp.float32) * 0.02)
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.layers)])
    self.final_norm = nnx.Param(jnp.ones((cfg.hidden,), jnp.float32))
    self.head = None if cfg.tie_embeddings else _weight(rngs, cfg.hidden, cfg.vocab_size)
    self.packed: Packed | None = None  # "embed" and/or "head", see Packed

  def logits(self, hidden: jax.Array) -> jax.Array:
    """LM head over already-normed hidden states [..., D] -> float32 logits [..., V]."""
    packed = _packed(self)
    if self.head is None:
      return unembed(hidden, self.embed[...], packed.get("embed")).astype(jnp.float32)
    return dense(hidden, self.head[...], packed.get("head")).astype(jnp.float32)

  def __call__(self, tokens: jax.Array, positions: jax.Array, cache: cache_lib.KVCache,
               mask: jax.Array | None = None, *, tree_mask: jax.Array | None = None,
               logit_index: jax.Array | None = None,
               feature_layers: Sequence[int] = (), layer_limit: int | None = None, write_cache: bool = True,
               attend: int | None = None):
    """Runs T new tokens per row through the model.

    Args:
      tokens: [B, T] int32 ids.
      positions: [B, T] int32 RoPE positions (slot order for chains; depth for trees).
      cache: K/V are written at slots cache.lengths[b] + t; lengths are NOT
        advanced (the caller commits what it accepts with cache.advance).
      mask: [B, T, S] bool, which cache slots each new token sees; default causal.
      tree_mask: [T, T] or [B, T, T] bool instead of `mask`: the T tokens are tree nodes
        (node t sees node j where tree_mask[.., t, j]; `tree.Tree.mask`), all seeing the
        row's prefix; positions carry each node's depth (lengths[b] + depth).
      logit_index: optional [B, M] indices into T: only those positions get logits
        (prefill needs one per row, and the 49k-wide head is expensive).
      feature_layers: indices of blocks whose output (residual stream) to return.
      layer_limit: run only the first `layer_limit` blocks (early exit drafts).
      write_cache: False leaves the cache untouched: the mask is then [B, T, S + T]
        (cache slots, then the new tokens; default: slots < lengths[b], causal among
        the new) and features["new_kv"] holds each layer's new (K, V) [B, T, K, H], for
        callers that write them later (inside lax.switch, writing would copy the cache).
      attend: static; attention reads only the first `attend` cache slots (default all);
        the mask is then [B, T, attend]. For prefill chunks (see `prefill`).

    Returns:
      logits [B, T or M, V] float32, the updated cache, and a dict with
      "hidden" (final-normed states [B, T, D]) and "layers" ([B, T, len(feature_layers), D]).
    """
    cfg = self.cfg
    B, T = tokens.shape
    if mask is not None and tree_mask is not None:
      raise ValueError("pass mask or tree_mask, not both")
    if mask is None and write_cache:
      mask = (causal_mask(cache.lengths, T, attend or cache.max_len) if tree_mask is None
              else tree_cache_mask(cache.lengths, tree_mask, cache.max_len))
    elif mask is None:
      prefix = jnp.arange(cache.max_len)[None, None, :] < cache.lengths[:, None, None]
      own = jnp.tril(jnp.ones((T, T), bool)) if tree_mask is None else tree_mask.astype(bool)
      mask = jnp.concatenate([jnp.broadcast_to(prefix, (B, T, cache.max_len)),
                              jnp.broadcast_to(own, (B, T, T))], axis=-1)
    x = jnp.take(self.embed[...], tokens, axis=0)
    blocks = list(self.blocks)[:layer_limit]
    new_k, new_v, feats = list(cache.k), list(cache.v), []
    for i, block in enumerate(blocks):
      x, new_k[i], new_v[i] = block(x, positions, cache.k[i], cache.v[i], cache.lengths, mask, write_cache, attend)
      if i in feature_layers:
        feats.append(x)
    hidden = rms_norm(x, self.final_norm[...], cfg.norm_eps)
    out = hidden if logit_index is None else jnp.take_along_axis(hidden, logit_index[..., None], axis=1)
    features = {"hidden": hidden}
    if feature_layers:
      features["layers"] = jnp.stack(feats, axis=2)
    if not write_cache:
      features["new_kv"] = (tuple(new_k), tuple(new_v))
      return self.logits(out), cache, features
    return self.logits(out), cache.replace(k=tuple(new_k), v=tuple(new_v)), features

  def prefill(self, tokens: jax.Array, cache: cache_lib.KVCache, *, chunk: int = PREFILL_CHUNK,
              feature_layers: Sequence[int] = (), layer_limit: int | None = None):
    """Writes tokens [B, P] (positions 0..P-1) into an empty cache, in causal chunks.

    Chunk [a, b) attends over cache slots [0, b) only, instead of the whole cache
    bucket: attention, its mask and softmax cost about half of one pass over
    [P, max_len] (a quarter of prefill time for 800-token prompts on XLA:CPU).
    Returns the cache (lengths unchanged: the caller commits) and the features of
    all P positions, as `__call__` does. No logits: callers take them from the loop.
    """
    B, P = tokens.shape
    feats = []
    for a in range(0, P, chunk):
      b = min(P, a + chunk)
      pos = jnp.broadcast_to(jnp.arange(a, b, dtype=jnp.int32), (B, b - a))
      part = cache.replace(lengths=jnp.full((B,), a, jnp.int32))
      _, part, f = self(tokens[:, a:b], pos, part, logit_index=jnp.zeros((B, 1), jnp.int32),
                        feature_layers=feature_layers, layer_limit=layer_limit, attend=b)
      cache = part.replace(lengths=cache.lengths)
      feats.append(f)
    return cache, jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *feats)
