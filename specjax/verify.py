"""Chain and tree accept rules: lossless rejection sampling over drafted tokens.

For each row, draft x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i));
at the first rejection the next token is drawn from norm(max(0, p_i - q_i)),
and if all k are accepted a bonus token is drawn from p_k. p and q both come
from `sampling.warp`, so the emitted text follows the warped target law exactly.
A deterministic drafter (q = None) proposes x with q one-hot: accept with
probability p(x), residual = p with x removed. Placeholder or out-of-range draft
ids (e.g. -1) are rejected and never used as an index.

A tree (`accept_tree`) is walked from the root: at each depth the current node's
children are tried in rank order against a residual that starts as p at that node;
an accepted child is descended into, and when none is accepted the correction is drawn
from the final residual. How the residual moves between siblings depends on how the
children were drawn (the `mode`): see `_SIBLING_RULES`.

Rows are independent: the rule is written for one row and vmapped, with one
PRNG key per row, so a row's randomness does not depend on its batch.
"""
from __future__ import annotations

import functools

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


# ----------------------------------------------------------------------------------------------
# Tree rule. A sibling rule takes the residual r [V] with its mass z (z = 1 while r = p: warp
# normalises, and keeping z = 1 exactly makes a one-path tree draw what accept_chain draws),
# the proposal state (qr, qz), the child's token x and its uniform u; it returns whether x is
# accepted and the state after a rejection. Each test is u * q(x) * z < r(x), min(1, r/q) without
# dividing by q = 0.


def _topk_sibling(r, z, qr, qz, x, u):
  """Deterministic children (q one-hot at x): accept with (r/z)(x); the residual is r without x,
  so a later sibling with the same token has r(x) = 0 and is always rejected."""
  return u * z < r[x], r.at[x].set(0.0), qr, qz


def _with_replacement_sibling(r, z, qr, qz, x, u):
  """Children iid from q (SpecInfer): accept with min(1, (r/z)(x) / q(x)); residual max(0, r/z - q)."""
  return u * qr[x] * z < r[x], jnp.maximum(r / z - qr, 0.0), qr, qz


def _without_replacement_sibling(r, z, qr, qz, x, u):
  """Children drawn from q without replacement (EAGLE-1): sibling j's proposal q_j is q with the
  earlier siblings' tokens removed, renormalised; accept with min(1, (r/z)(x) / q_j(x)), residual
  max(0, r/z - q_j), then x leaves q. Once q has no mass left a child cannot have come from it:
  it is judged as a deterministic proposal (q_j one-hot at x)."""
  qj = jnp.where(qz > 0, qr / jnp.where(qz > 0, qz, 1.0), jax.nn.one_hot(x, qr.shape[-1], dtype=qr.dtype))
  qr = qr.at[x].set(0.0)
  return u * qj[x] * z < r[x], jnp.maximum(r / z - qj, 0.0), qr, jnp.where(qz > 0, jnp.sum(qr), 0.0)


_SIBLING_RULES = {"topk": _topk_sibling, "with_replacement": _with_replacement_sibling,
                  "without_replacement": _without_replacement_sibling}


def _accept_tree_row(p, tokens, children, q, key, *, rule, max_depth):
  """One row: p [N+1, V], tokens [N+1], children [N+1, W], q [N+1, V] or None -> (kids [D], token).

  kids[d] is the node accepted at depth d + 1 (-1 from the first depth with none).
  """
  n, vocab = p.shape[0], p.shape[-1]
  width = children.shape[-1]
  key_u, key_s = jax.random.split(key)
  # Depth d, sibling j draws from fold_in(key_u, j << 16 | d): its own key, so a draw does not
  # depend on the tree's size, and sibling 0 draws what accept_chain draws at position d.
  slots = jnp.arange(width, dtype=jnp.int32)

  def sibling(node, d):
    def step(carry, j):
      r, z, qr, qz, child = carry
      c = children[node, j]
      c_ok = (c > 0) & (c < n)  # -1 padding (or a bad id) is never an index
      x = tokens[jnp.where(c_ok, c, 0)]
      ok = c_ok & (x >= 0) & (x < vocab) & (child < 0)  # an absent node is skipped, r unchanged
      u = jax.random.uniform(jax.random.fold_in(key_u, (j << 16) | d), (), jnp.float32)
      accept, r2, qr2, qz2 = rule(r, z, qr, qz, jnp.where(ok, x, 0), u)
      z2 = jnp.sum(r2)
      keep = z2 > 0  # Z = 0: keep the residual before this update (the chain's fallback to p)
      rejected = ok & ~accept
      r = jnp.where(rejected & keep, r2, r)
      z = jnp.where(rejected & keep, z2, z)
      qr, qz = jnp.where(rejected, qr2, qr), jnp.where(rejected, qz2, qz)
      return (r, z, qr, qz, jnp.where(ok & accept, c, child)), None

    qr = jnp.zeros((), jnp.float32) if q is None else q[node]
    init = (p[node], jnp.float32(1.0), qr, jnp.float32(1.0), jnp.int32(-1))
    (r, _, _, _, child), _ = jax.lax.scan(step, init, slots)
    return r, child

  def depth_step(carry, d):
    node, alive, stop = carry
    r, child = sibling(node, d)
    accepted = alive & (child >= 0)
    stop = jnp.where(alive & ~accepted, r, stop)
    return (jnp.where(accepted, child, node), accepted, stop), jnp.where(accepted, child, -1)

  (node, alive, stop), kids = jax.lax.scan(depth_step, (jnp.int32(0), jnp.bool_(True), p[0]),
                                           jnp.arange(max_depth, dtype=jnp.int32))
  stop = jnp.where(alive, p[node], stop)  # depth D reached: the bonus from p there (a leaf stops above, r = p)
  return kids, jnp.clip(sample(key_s, stop), 0, vocab - 1)


def _greedy_tree_row(target, tokens, children, *, max_depth):
  """target [N+1] argmax ids: descend into the first child (in rank order) whose token is the argmax."""
  n = target.shape[0]

  def depth_step(carry, _):
    node, alive = carry
    c = children[node]
    c_ok = (c > 0) & (c < n)
    match = alive & c_ok & (tokens[jnp.where(c_ok, c, 0)] == target[node])
    hit = jnp.any(match)
    child = jnp.where(hit, c[jnp.argmax(match)], -1)
    return (jnp.where(hit, child, node), hit), child

  (node, _), kids = jax.lax.scan(depth_step, (jnp.int32(0), jnp.bool_(True)), None, length=max_depth)
  return kids, target[node]


def _check_tree_inputs(logits, tokens, children, q, mode, max_depth):
  if mode not in _SIBLING_RULES:
    raise ValueError(f"mode={mode!r} must be one of {tuple(_SIBLING_RULES)}")
  if logits.ndim != 3 or tokens.shape != logits.shape[:2]:
    raise ValueError(f"logits {logits.shape} must be [B, N+1, V] and tokens {tokens.shape} [B, N+1]")
  B, n = tokens.shape
  if children.ndim not in (2, 3) or children.shape[-2] != n or (children.ndim == 3 and children.shape[0] != B):
    raise ValueError(f"children {children.shape} must be [N+1, W] or [B, N+1, W] with N+1={n}, B={B}")
  if mode != "topk" and q is None:
    raise ValueError(f"mode={mode!r} draws children from q: pass q [B, N+1, V]")
  if mode != "topk" and q.shape != logits.shape:
    raise ValueError(f"q {q.shape} must be [B, N+1, V] like logits {logits.shape}")
  if not (isinstance(max_depth, int) and 0 <= max_depth < 2**16):
    raise ValueError(f"max_depth={max_depth!r} must be an int in [0, 65536)")
  if children.shape[-1] >= 2**15:  # (sibling << 16 | depth) names each uniform's key
    raise ValueError(f"children {children.shape} has {children.shape[-1]} sibling slots; at most 32767")


def accept_tree(logits: jax.Array, tokens: jax.Array, children: jax.Array, q: jax.Array | None,
                sampling: Sampling, keys: jax.Array, *, mode: str,
                max_depth: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Verifies a tree of N drafted nodes per row (node 0 = the root, the last committed token).

  Args:
    logits: [B, N+1, V] target logits after each node (logits[:, 0] after the root).
    tokens: [B, N+1] int32 node tokens; tokens[:, 0] is ignored; -1 (or any id outside
      [0, V)) is a padded / absent node: never accepted, never an index, skipped by the
      residual.
    children: [N+1, W] (static tree, `Tree.children`) or [B, N+1, W] (per-row, e.g.
      `tree.children_from_parents`) int32 node ids by rank, -1 padded.
    q: [B, N+1, V] drafter probabilities (already warped): q[:, i] is the law node i's
      children were drawn from. Ignored (may be None) in mode "topk".
    sampling: the policy; temperature 0 is greedy: descend into the first child whose
      token is the argmax, the last token is the argmax (mode and q unused).
    keys: [B] PRNG keys, one per row.
    mode: how the children were drawn: "topk" (deterministic, e.g. EAGLE-2/3 top-k,
      n-gram), "with_replacement" (iid from q, SpecInfer), "without_replacement" (from q
      without replacement, EAGLE-1).
    max_depth: D, the deepest level walked (`Tree.max_depth`); default N. A deeper tree is
      cut at D, which stays lossless (the bonus is drawn at the depth-D node).

  Returns:
    n_acc [B] accepted depth; path [B, D+1] node ids visited, root (0) first, -1 after;
    out [B, D+1] the accepted nodes' tokens, then the correction (or bonus) at index
    n_acc, then -1. All int32.
  """
  max_depth = tokens.shape[1] - 1 if max_depth is None else max_depth
  _check_tree_inputs(logits, tokens, children, q, mode, max_depth)
  tokens, children = jnp.asarray(tokens, jnp.int32), jnp.asarray(children, jnp.int32)
  child_axis = 0 if children.ndim == 3 else None
  if sampling.greedy:
    row = functools.partial(_greedy_tree_row, max_depth=max_depth)
    kids, last = jax.vmap(row, in_axes=(0, 0, child_axis))(argmax(logits), tokens, children)
  else:
    q = None if mode == "topk" else jnp.asarray(q, jnp.float32)
    row = functools.partial(_accept_tree_row, rule=_SIBLING_RULES[mode], max_depth=max_depth)
    kids, last = jax.vmap(row, in_axes=(0, 0, child_axis, None if q is None else 0, 0))(
        warp(logits, sampling), tokens, children, q, keys)
  return _tree_outputs(tokens, kids, last)


def _tree_outputs(tokens, kids, last):
  """kids [B, D] accepted node per depth (-1 after), last [B] -> (n_acc, path, out)."""
  B = tokens.shape[0]
  n_acc = jnp.sum(kids >= 0, axis=1).astype(jnp.int32)
  path = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), kids], axis=1)
  accepted = jnp.take_along_axis(tokens, jnp.maximum(kids, 0), axis=1)
  pos = jnp.arange(kids.shape[1] + 1)[None, :]
  padded = jnp.concatenate([accepted, jnp.zeros((B, 1), jnp.int32)], axis=1)
  out = jnp.where(pos < n_acc[:, None], padded, jnp.where(pos == n_acc[:, None], last[:, None], -1))
  return n_acc, path.astype(jnp.int32), out.astype(jnp.int32)
