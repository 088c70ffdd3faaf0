"""Draft heads that read the target's own features: EAGLE-1, EAGLE-3 and MTP, one family.

Every kind is the same small network around one target-shaped decoder block:

    feature f_t ──(eagle3: concat low/mid/high layers -> fuse [3D, D])──┐
                 (mtp: RMSNorm)                                          ├─ concat -> proj [2D, D] -> Block -> h_t
    Emb(x_{t+1}) (the target's embedding; mtp: RMSNorm) ────────────────┘
    h_t -> logits over the draft vocabulary (predicts x_{t+2}):
      eagle1: h_t @ W_out             (h_t regresses the target's next feature f_{t+1})
      eagle3: RMSNorm(h_t) @ own head (trained on tokens only)
      mtp:    RMSNorm(h_t) @ W_out    (DeepSeek-V3: shared output head)

W_out is the target's LM head restricted to the draft vocabulary `d2t` [N] (the
N most frequent target tokens; FR-Spec / EAGLE-3's d2t): the head scores only N
of the V tokens, and q puts zero mass on the rest, which keeps verification
lossless. Drafting k > 1 tokens feeds h_t back as the next step's feature (all
kinds), which is why training unrolls on the head's own outputs.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from specjax.kernels import dense, quantize_q8_0
from specjax.models.llama import Block, LlamaConfig, Packed, _packed, _weight, rms_norm

KINDS = ("eagle1", "eagle3", "mtp")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """kind: one of KINDS; target: the target's LlamaConfig (the block copies its shapes);
  feature_layers: target blocks whose outputs eagle3 fuses (others use the final hidden);
  draft_vocab: N, the size of the reduced vocabulary."""

  kind: str
  target: LlamaConfig
  draft_vocab: int
  feature_layers: tuple[int, ...] = ()

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"head kind={self.kind!r} must be one of {KINDS}")
    if not 1 <= self.draft_vocab <= self.target.vocab_size:
      raise ValueError(f"draft_vocab={self.draft_vocab} must be in [1, {self.target.vocab_size}] "
                       "(the target vocabulary)")
    if self.kind == "eagle3":
      if len(self.feature_layers) < 1:
        raise ValueError("eagle3 needs feature_layers (e.g. low, mid, high target layers)")
      bad = [i for i in self.feature_layers if not 0 <= i < self.target.layers]
      if bad:
        raise ValueError(f"feature_layers {bad} outside the target's {self.target.layers} layers")
    elif self.feature_layers:
      raise ValueError(f"{self.kind} reads the final hidden state; feature_layers={self.feature_layers} "
                       "is only for eagle3")

  @property
  def own_head(self) -> bool:
    return self.kind == "eagle3"


def default_feature_layers(layers: int) -> tuple[int, ...]:
  """EAGLE-3's low / mid / high choice: block 2, the middle one and the third from last."""
  return tuple(sorted({min(2, layers - 1), layers // 2, max(layers - 3, 0)}))


class DraftHead(nnx.Module):

  def __init__(self, cfg: HeadConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    D = cfg.target.hidden
    if cfg.kind == "eagle3":
      self.fuse = _weight(rngs, D * len(cfg.feature_layers), D)
    if cfg.kind == "mtp":
      self.norm_h = nnx.Param(jnp.ones((D,), jnp.float32))
      self.norm_e = nnx.Param(jnp.ones((D,), jnp.float32))
    self.proj = _weight(rngs, 2 * D, D)
    self.block = Block(cfg.target, rngs)
    if cfg.kind != "eagle1":
      self.norm = nnx.Param(jnp.ones((D,), jnp.float32))
    if cfg.own_head:
      self.lm_head = _weight(rngs, D, cfg.draft_vocab)
    self.packed: Packed | None = None  # see pack_head

  def input_features(self, features: dict) -> jax.Array:
    """Target features of a forward ({"hidden": [B,T,D], "layers": [B,T,n,D]}) -> [B, T, D]."""
    if self.cfg.kind == "eagle3":
      layers = features["layers"]
      return dense(layers.reshape(layers.shape[:2] + (-1,)), self.fuse[...], _packed(self).get("fuse"))
    return features["hidden"]

  def __call__(self, feat, emb, positions, k_cache, v_cache, starts, mask):
    """One pass of the block. feat, emb [B, T, D]; caches [B, K, S, H]; mask [B, T, S].

    Returns h [B, T, D] (the next step's feature) and the updated caches.
    """
    eps = self.cfg.target.norm_eps
    if self.cfg.kind == "mtp":
      feat, emb = rms_norm(feat, self.norm_h[...], eps), rms_norm(emb, self.norm_e[...], eps)
    x = dense(jnp.concatenate([feat, emb], axis=-1), self.proj[...], _packed(self).get("proj"))
    return self.block(x, positions, k_cache, v_cache, starts, mask)

  def logits(self, h: jax.Array, w_out: jax.Array | None, w_out_packed=None) -> jax.Array:
    """h [..., D] -> float32 logits over the draft vocabulary [..., N].

    w_out [D, N]: the target's LM head columns for d2t (unused by eagle3), and optionally
    its packed copy (see pack_head)."""
    if self.cfg.kind != "eagle1":
      h = rms_norm(h, self.norm[...], self.cfg.target.norm_eps)
    if self.cfg.own_head:
      return dense(h, self.lm_head[...], _packed(self).get("lm_head")).astype(jnp.float32)
    return dense(h, w_out, w_out_packed).astype(jnp.float32)


def pack_head(module: DraftHead) -> None:
  """Adds Q8_0 copies of the head's matrices, which the CPU kernel reads in draft steps
  (4x fewer bytes than float32: a draft step is then ~5% of a packed target step, not
  ~12%). Drafts may be approximate: verification keeps the output exactly the target's."""
  def attach(owner, names):
    mats = {n: quantize_q8_0(getattr(owner, n)[...]) for n in names if getattr(owner, n, None) is not None}
    mats = {n: m for n, m in mats.items() if m is not None}
    if mats:
      owner.packed = nnx.data(Packed(mats))
  attach(module.block, ("qkv", "out", "gate_up", "down"))
  attach(module, ("fuse", "proj", "lm_head"))


def target_tables(target_params, target_cfg: LlamaConfig, d2t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The frozen target arrays a head reads: embedding [V, D] and W_out [D, N] (LM head at d2t)."""
  embed = target_params["embed"][...]
  if target_cfg.tie_embeddings:
    w_out = jnp.take(embed, d2t, axis=0).T
  else:
    w_out = jnp.take(target_params["head"][...], d2t, axis=1)
  return embed, w_out


def frequent_tokens(token_counts, n: int) -> jax.Array:
  """d2t: ids of the n most frequent tokens (ties by id), sorted ascending."""
  import numpy as np
  counts = np.asarray(token_counts, np.int64)
  order = np.lexsort((np.arange(len(counts)), -counts))[:n]
  return jnp.asarray(np.sort(order), jnp.int32)


def draft_to_full(logits: jax.Array, d2t: jax.Array, vocab: int) -> jax.Array:
  """Scatters draft logits [..., N] into [..., V] with -inf outside the draft vocabulary."""
  full = jnp.full(logits.shape[:-1] + (vocab,), -jnp.inf, jnp.float32)
  return full.at[..., d2t].set(logits)
