"""Chain accept rules: lossless rejection sampling over k drafted tokens.

For each row, draft x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i));
at the first rejection the next token is drawn from norm(max(0, p_i - q_i)),
and if all k are accepted a bonus token is drawn from p_k. p and q both come
from `sampling.warp`, so the emitted text follows the warped target law exactly.
A deterministic drafter (q = None) proposes x with q one-hot: accept with
probability p(x), residual = p with x removed. Placeholder or out-of-range draft
ids (e.g. -1) are rejected and never used as an index.

Rows are independent: the rule is written for one row and vmapped, with one
PRNG key per row, so a row's randomness does not depend on its batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from specjax.sampling import Sampling, argmax, sample, warp


def _accept_row(p, drafts, q, key):
  """p [k+1, V] warped target probs, drafts [k], q [k, V] or None, key -> (n_acc, token)."""
  k, vocab = drafts.shape[0], p.shape[-1]
  key_u, key_s = jax.random.split(key)
  valid = (drafts >= 0) & (drafts < vocab)
  safe = jnp.where(valid, drafts, 0)
  px = p[jnp.arange(k), safe]
  qx = jnp.ones_like(px) if q is None else q[jnp.arange(k), safe]
  # One uniform per position from its own key, so position i's draw does not depend on
  # how many positions this verify has (the engine verifies at several sizes).
  u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key_u, i), (), jnp.float32))(jnp.arange(k))

  def step(carry, x):
    alive, n = carry
    px_i, qx_i, u_i, valid_i = x
    alive = alive & valid_i & (u_i * qx_i < px_i)  # u < p/q, without dividing by q = 0
    return (alive, n + alive.astype(jnp.int32)), None

  (_, n_acc), _ = jax.lax.scan(step, (jnp.bool_(True), jnp.int32(0)), (px, qx, u, valid))

  p_n = p[n_acc]
  if k:
    i = jnp.minimum(n_acc, k - 1)
    if q is None:
      residual = p_n * (jnp.arange(vocab) != jnp.where(valid[i], drafts[i], -1))
    else:
      # A placeholder was not drawn from q, so its forced rejection corrects from p itself.
      residual = jnp.where(valid[i], jnp.maximum(p_n - q[i], 0.0), p_n)
    residual = jnp.where(n_acc < k, residual, p_n)
    # Z = 0 (p == q, or p's whole mass on the rejected token): fall back to p.
    residual = jnp.where(jnp.sum(residual) > 0, residual, p_n)
  else:
    residual = p_n
  token = jnp.clip(sample(key_s, residual), 0, vocab - 1)
  return n_acc, token


def _greedy(logits, drafts):
  target = argmax(logits)  # [B, k+1]
  match = (drafts == target[:, :-1]).astype(jnp.int32)
  n_acc = jnp.sum(jnp.cumprod(match, axis=-1), axis=-1)
  return n_acc, jnp.take_along_axis(target, n_acc[:, None], axis=1)[:, 0]


def accept_chain(logits: jax.Array, drafts: jax.Array, q: jax.Array | None, sampling: Sampling,
                 keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Verifies a chain of k drafts per row.

  Args:
    logits: [B, k+1, V] target logits at the last committed token and each draft.
    drafts: [B, k] int32 draft ids (-1 = placeholder).
    q: [B, k, V] drafter probabilities (already warped), or None for deterministic drafts.
    sampling: the policy; temperature 0 is greedy (accept while draft == argmax p).
    keys: [B] PRNG keys, one per row.

  Returns:
    n_acc [B] accepted drafts, and tokens [B, k+1]: the accepted drafts, then the
    correction (or bonus) token at index n_acc, then -1.
  """
  k = drafts.shape[1]
  if sampling.greedy:
    n_acc, last = _greedy(logits, drafts)
  else:
    p = warp(logits, sampling)
    n_acc, last = jax.vmap(_accept_row, in_axes=(0, 0, None if q is None else 0, 0))(p, drafts, q, keys)
  pos = jnp.arange(k + 1)[None, :]
  padded = jnp.concatenate([drafts, jnp.zeros((drafts.shape[0], 1), drafts.dtype)], axis=1)
  tokens = jnp.where(pos < n_acc[:, None], padded, jnp.where(pos == n_acc[:, None], last[:, None], -1))
  return n_acc, tokens.astype(jnp.int32)
