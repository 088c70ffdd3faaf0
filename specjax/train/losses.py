"""Head losses with training-time test (TTT): the head is unrolled on its own outputs.

Unroll step j (0-based) at index t reads the token x_{t+1+j} and, as its feature,
the true target feature f_t (j = 0) or its own output of step j-1 at t (j > 0),
exactly what drafting token j+1 sees at inference. It predicts x_{t+2+j}.
Attention of step j at index t (RoPE position t + j) sees step-0 keys at s <= t
(the cache of true features) and the keys of steps 1..j at the same t
(the drafts already fed back), a block-diagonal mask over U stacked copies:

      keys:   step 0 (s=0..L-1)   step 1      step 2
  step 0, t   s <= t              -           -
  step 1, t   s <= t              s == t      -
  step 2, t   s <= t              s == t      s == t

Losses: eagle3 and mtp: CE over the draft vocabulary, against the target's own
distribution at that position (soft labels, softmax of the stored final hidden
state through W_out; the default) or against the sampled token (hard labels);
eagle1: SmoothL1 between the predicted and the target's next feature plus 0.1
hard CE (EAGLE-1's weights). Soft labels matter here because half the responses
were sampled at T=1: a sampled token is a noisy label, the target's
distribution is the exact one. Hard labels outside the draft vocabulary are
ignored (no q mass can go there anyway).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from specjax.models.heads import DraftHead


def ttt_mask(L: int, j: int, U: int) -> jax.Array:
  """[1, L, U*L] bool: the keys step j sees (see the module docstring)."""
  t = jnp.arange(L)[:, None]
  s = jnp.arange(U * L)[None, :]
  step, idx = s // L, s % L
  return (((step == 0) & (idx <= t)) | ((step >= 1) & (step <= j) & (idx == t)))[None]


def _shift(x: jax.Array, n: int, fill=0) -> jax.Array:
  """x[:, t] -> x[:, t + n] along axis 1, filling the end."""
  pad = jnp.full((x.shape[0], n) + x.shape[2:], fill, x.dtype)
  return jnp.concatenate([x[:, n:], pad], axis=1)


def smooth_l1(x, y):
  d = jnp.abs(x - y)
  return jnp.where(d < 1.0, 0.5 * d * d, d - 0.5).mean(-1)


def unroll(module: DraftHead, frozen: dict, batch: dict, steps: int):
  """Yields (j, h [B, L, D], logits [B, L, N]) for unroll steps j = 0..steps-1 (see module doc)."""
  tokens = batch["tokens"]
  B, L = tokens.shape
  cfg = module.cfg.target
  feats = batch["feats"]
  feat = module.input_features({"layers": feats}) if module.cfg.kind == "eagle3" else feats[:, :, 0]
  k_cache = jnp.zeros((B, cfg.kv_heads, steps * L, cfg.head_dim), jnp.float32)
  v_cache = jnp.zeros_like(k_cache)
  t = jnp.arange(L)[None, :]
  for j in range(steps):
    emb = jnp.take(frozen["embed"], _shift(tokens, 1 + j), axis=0)
    positions = batch["pos0"][:, None] + t + j
    h, k_cache, v_cache = module(feat, emb, positions, k_cache, v_cache, jnp.full((B,), j * L, jnp.int32),
                                 ttt_mask(L, j, steps))
    yield j, h, module.logits(h, frozen["w_out"], frozen.get("w_out_packed"))
    feat = h


def head_loss(params, graphdef, frozen: dict, batch: dict, unroll_steps: int, prompt_weight: float = 0.2,
              soft_labels: bool = True):
  """Mean loss over valid positions and unroll steps, and per-step top-1 accuracy.

  batch: feats [B, L, n, D] (input features), hidden [B, L, D] (eagle1 targets),
  tokens [B, L], length [B] (valid tokens in the window), resp_start [B]
  (window index of the first response token), pos0 [B] (absolute position of index 0).
  frozen: embed [V, D], w_out [D, N], t2d [V] (draft index or -1).
  """
  module: DraftHead = nnx.merge(graphdef, params)
  tokens, length = batch["tokens"], batch["length"]
  t = jnp.arange(tokens.shape[1])[None, :]
  total, weight_sum, accs = 0.0, 0.0, []
  soft = soft_labels and module.cfg.kind != "eagle1"
  if soft:  # the target's distribution at every index, once: step j reads it shifted by 1 + j
    dist = jax.lax.stop_gradient(jax.nn.softmax(batch["hidden"] @ frozen["w_out"], axis=-1))
  for j, h, logits in unroll(module, frozen, batch, unroll_steps):
    label = jnp.take(frozen["t2d"], _shift(tokens, 2 + j))
    valid = t + 2 + j <= length[:, None] - 1
    w = valid * jnp.where(t + 2 + j >= batch["resp_start"][:, None], 1.0, prompt_weight)
    in_vocab = label >= 0
    if soft:
      loss_j = optax.softmax_cross_entropy(logits, _shift(dist, 1 + j))
    else:
      loss_j = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(label, 0)) * in_vocab
    if module.cfg.kind == "eagle1":
      loss_j = smooth_l1(h, _shift(batch["hidden"], 1 + j)) + 0.1 * loss_j
    total = total + jnp.sum(loss_j * w)
    weight_sum = weight_sum + jnp.sum(w)
    hit = (jnp.argmax(logits, -1) == label) & in_vocab
    accs.append(jnp.sum(hit * valid) / jnp.maximum(jnp.sum(valid), 1))
  return total / jnp.maximum(weight_sum, 1.0), jnp.stack(accs)
