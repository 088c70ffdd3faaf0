"""EAGLE-1, EAGLE-3 and MTP drafters: a draft head over the target's own features.

No second target pass: the head reads the features the verify pass already
computed (`ctx.features`). The head keeps a one-layer KV cache whose entry t is
its pass over (f_t, x_{t+1}) -- the target feature of history token t and the
token after it. Invariant after `init`/`update`: entries t <= length - 2 are
exact (true features), and `dstate.h` is the head's output at t = length - 2,
whose logits give the first draft.

    update (after verify):  one block pass over the k+1 verified positions
        t = feature_start .. feature_start + k   (entries past length-2 are junk,
                                                   overwritten next time)
    propose:  d_1 from h;  then k-1 single-token passes (h, d_i) -> h', d_{i+1}

Lossless: at T > 0 each draft is sampled from q = warp(draft logits scattered
over the full vocabulary, -inf outside d2t), the same policy as the target.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from specjax.drafters.base import Context, Drafter
from specjax.kernels import quantize_q8_0
from specjax.models.heads import DraftHead, HeadConfig, draft_to_full, pack_head, target_tables
from specjax.models.llama import causal_mask
from specjax.sampling import argmax, sample, warp

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights")


@struct.dataclass
class EagleState:
  k: jax.Array  # [B, K, S, H] the head block's keys
  v: jax.Array  # [B, K, S, H]
  h: jax.Array  # [B, D] head output at history index length - 2


def _rows_at(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x [B, T, ...], idx [B] -> [B, ...]."""
  return jnp.take_along_axis(x, idx.reshape((-1,) + (1,) * (x.ndim - 1)), axis=1)[:, 0]


def check_min_confidence(c) -> None:
  """The one rule for `Eagle.min_confidence` (the harness checks labels with it before loading)."""
  if not 0.0 <= c < 1.0:
    raise ValueError(f"min_confidence={c!r} must be in [0, 1) (0 = always k drafts)")


@dataclasses.dataclass(frozen=True)
class Eagle(Drafter):
  """min_confidence: a row stops drafting at the first position where the head's top
  probability is below this (0 = always k drafts). The head's confidence predicts
  acceptance (EAGLE-2's observation), so unlikely drafts are not verified. Lossless: the
  decision uses q's top probability, never the drawn token's, so a position either runs
  the usual accept/residual rule or samples p directly."""
  head: HeadConfig | None = None
  graphdef: Any = None
  min_confidence: float = 0.0

  def __post_init__(self):
    super().__post_init__()
    check_min_confidence(self.min_confidence)

  @property
  def name(self) -> str:  # type: ignore[override]
    return self.head.kind if self.head else "eagle"

  def _module(self, weights) -> DraftHead:
    return nnx.merge(self.graphdef, weights["head"])

  def _pass(self, module, weights, feat, tokens, positions, dstate, starts, mask=None):
    """Block pass over T positions, written at cache slots starts[b] + t; mask [B, T, S]
    (default causal: each position sees every slot before it)."""
    emb = jnp.take(weights["embed"], tokens, axis=0)
    if mask is None:
      mask = causal_mask(starts, tokens.shape[1], dstate.k.shape[2])
    return module(feat, emb, positions, dstate.k, dstate.v, starts, mask)

  def init(self, weights, ctx: Context, sampling, max_len: int):
    module = self._module(weights)
    cfg = self.head.target
    B, P = ctx.history.shape
    state = EagleState(k=jnp.zeros((B, cfg.kv_heads, max_len, cfg.head_dim), jnp.float32),
                       v=jnp.zeros((B, cfg.kv_heads, max_len, cfg.head_dim), jnp.float32),
                       h=jnp.zeros((B, cfg.hidden), jnp.float32))
    feat = module.input_features(ctx.features)
    nxt = jnp.concatenate([ctx.history[:, 1:], jnp.zeros((B, 1), jnp.int32)], axis=1)
    positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    h, k, v = self._pass(module, weights, feat, nxt, positions, state, jnp.zeros((B,), jnp.int32))
    return EagleState(k=k, v=v, h=_rows_at(h, jnp.maximum(ctx.length - 2, 0)))

  def update(self, weights, dstate: EagleState, ctx: Context, n_acc):
    module = self._module(weights)
    T = self.k + 1
    S = ctx.history.shape[1]
    feat = module.input_features(ctx.features)
    idx = ctx.feature_start[:, None] + jnp.arange(T)[None, :]
    nxt = jnp.take_along_axis(ctx.history, jnp.minimum(idx + 1, S - 1), axis=1)
    # Keep the window inside the draft cache: rows near the end write no further.
    starts = jnp.minimum(ctx.feature_start, dstate.k.shape[2] - T)
    h, k, v = self._pass(module, weights, feat, nxt, idx, dstate, starts)
    last = jnp.clip(ctx.length - 2 - ctx.feature_start, 0, T - 1)
    return EagleState(k=k, v=v, h=_rows_at(h, last))

  @property
  def may_pad(self) -> bool:  # type: ignore[override]
    return self.min_confidence > 0

  def _draft(self, module, weights, h, i, keys, sampling):
    """Draft i from head output h [B, D]: (token [B], q [B, V] or None, the head's top probability [B])."""
    d2t, vocab = weights["d2t"], self.vocab_size
    logits = module.logits(h, weights["w_out"], weights["w_out_packed"])  # [B, N]
    if sampling.greedy:
      idx = argmax(logits)
      top = jnp.take_along_axis(logits, idx[:, None], axis=1)
      conf = 1.0 / jnp.sum(jnp.exp(logits - top), axis=-1)  # softmax at the argmax
      return jnp.take(d2t, idx).astype(jnp.int32), None, conf
    q = warp(draft_to_full(logits, d2t, vocab), sampling)
    token = jax.vmap(lambda key, p: sample(jax.random.fold_in(key, i), p))(keys, q).astype(jnp.int32)
    # The top probability of q, not q(token): whether a draft is proposed must not depend on
    # which token was drawn, or the residual correction no longer restores p.
    return token, q, jnp.max(q, axis=-1)

  def propose(self, weights, dstate: EagleState, ctx: Context, keys, sampling):
    module = self._module(weights)
    S = dstate.k.shape[2]

    def feed(h, token, k, v, i):  # feed back (h, d_i) at history index length - 2 + i
      slot = jnp.minimum(ctx.length - 2 + i, S - 1)
      h, k, v = self._pass(module, weights, h[:, None], token[:, None], slot[:, None], dstate.replace(k=k, v=v), slot)
      return h[:, 0], k, v

    if self.min_confidence <= 0:  # a fixed chain of k drafts
      h, k, v = dstate.h, dstate.k, dstate.v
      drafts, qs = [], []
      for i in range(self.k):
        if i:
          h, k, v = feed(h, token, k, v, i)
        token, q, _ = self._draft(module, weights, h, i, keys, sampling)
        drafts.append(token)
        qs.append(q)
      q = None if sampling.greedy else jnp.stack(qs, axis=1)
      return dstate.replace(k=k, v=v), jnp.stack(drafts, axis=1), q

    # A row stops drafting at the first position whose top probability is < min_confidence;
    # the loop stops when every row has stopped, and the verify runs at the smallest
    # compiled size covering the longest proposal.
    token, q0, conf = self._draft(module, weights, dstate.h, 0, keys, sampling)
    alive = conf >= self.min_confidence
    B = token.shape[0]
    drafts = jnp.full((B, self.k), -1, jnp.int32).at[:, 0].set(jnp.where(alive, token, -1))
    qs = None if q0 is None else jnp.zeros((B, self.k) + q0.shape[1:], q0.dtype).at[:, 0].set(q0)

    def body(c):
      i, h, token, alive, k, v, drafts, qs = c
      h, k, v = feed(h, token, k, v, i)
      token, q, conf = self._draft(module, weights, h, i, keys, sampling)
      alive = alive & (conf >= self.min_confidence)
      drafts = drafts.at[:, i].set(jnp.where(alive, token, -1))
      qs = None if q is None else jax.lax.dynamic_update_slice_in_dim(qs, q[:, None], i, axis=1)
      return i + 1, h, token, alive, k, v, drafts, qs

    cond = lambda c: (c[0] < self.k) & jnp.any(c[3])
    _, _, _, _, k, v, drafts, qs = jax.lax.while_loop(
        cond, body, (jnp.int32(1), dstate.h, token, alive, dstate.k, dstate.v, drafts, qs))
    return dstate.replace(k=k, v=v), drafts, qs

  # ---- construction and loading -------------------------------------------------

  @classmethod
  def from_head(cls, model, head_cfg: HeadConfig, head_params, d2t, k: int = 5) -> "Eagle":
    """A drafter for target `model` from head parameters (nnx.State) and d2t [N]."""
    check_target(head_cfg, model.config)
    module = nnx.eval_shape(lambda: DraftHead(head_cfg, nnx.Rngs(0)))
    graphdef, _ = nnx.split(module)
    module = nnx.merge(graphdef, head_params)
    pack_head(module)
    graphdef, head_params = nnx.split(module)
    d2t = jnp.asarray(d2t, jnp.int32)
    embed, w_out = target_tables(model.params, model.config, d2t)
    w_out_packed = None if head_cfg.own_head else quantize_q8_0(w_out)
    weights = {"head": head_params, "d2t": d2t, "embed": embed, "w_out": w_out, "w_out_packed": w_out_packed}
    fp = model.tokenizer.fingerprint() if model.tokenizer is not None else None
    return cls(k=k, weights=weights, vocab_size=model.config.vocab_size, tokenizer_fingerprint=fp,
               feature_layers=head_cfg.feature_layers, head=head_cfg, graphdef=graphdef)

  @classmethod
  def load(cls, name: str, model=None, k: int = 5) -> "Eagle":
    """Loads a shipped head by name (`specjax/weights/<name>`) or from a directory path."""
    from specjax.io import load_model
    from specjax.drafters.head_io import load_head
    if model is None:
      model = load_model()
    path = name if os.path.isdir(name) else os.path.join(WEIGHTS_DIR, name)
    if not os.path.isdir(path):
      have = sorted(os.listdir(WEIGHTS_DIR)) if os.path.isdir(WEIGHTS_DIR) else []
      raise FileNotFoundError(f"no draft head {name!r}: not a directory and not a shipped head "
                              f"(shipped: {', '.join(have) or 'none'})")
    head_cfg, params, d2t = load_head(path, model.config)
    return cls.from_head(model, head_cfg, params, d2t, k=k)


def head_shapes(cfg) -> dict:
  """The target shapes a head depends on."""
  return {name: getattr(cfg, name) for name in ("hidden", "layers", "vocab_size", "heads", "kv_heads", "head_dim",
                                                "ffn")}


def check_target(head_cfg: HeadConfig, target_cfg) -> None:
  """Refuses a head trained for another target, naming both shapes."""
  want, have = head_shapes(head_cfg.target), head_shapes(target_cfg)
  if want != have:
    raise ValueError(f"draft head was trained for a target with {want} but this target has {have}; "
                     "use a head trained for this model")


def make(kind: str):
  """Builder for make_drafter: a shipped head by name, or `head=` a path / `Eagle`."""
  default = {"eagle1": "smollm2-135m-eagle1", "eagle3": "smollm2-135m-eagle3", "mtp": "smollm2-135m-mtp"}[kind]

  def build(model, k, head: str | None = None, min_confidence: float = 0.0):
    d = Eagle.load(head or default, model=model, k=k)
    if d.head.kind != kind:
      raise ValueError(f"head {head or default!r} is a {d.head.kind} head, not {kind}")
    return dataclasses.replace(d, min_confidence=min_confidence) if min_confidence else d

  return build

