"""Prompt lookup (n-gram) drafting, entirely on device.

The last n tokens of a row are matched against everything earlier in the row
(prompt + output), longest n first; the k tokens that followed the most recent
match are proposed. Positions past the known history are -1 placeholders,
which the accept rule rejects. One vectorised comparison per n: no host-side
search.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from specjax.drafters.base import Context, Drafter


def propose_ngram(history: jax.Array, length: jax.Array, k: int, max_n: int, min_n: int) -> jax.Array:
  """history [S], length [] -> drafts [k] (-1 where nothing is proposed)."""
  S = history.shape[0]
  idx = jnp.arange(S)
  best = jnp.int32(-1)  # history index where the proposal starts
  for n in range(min_n, max_n + 1):  # later (longer) matches override shorter ones
    suffix = jax.lax.dynamic_slice(history, (jnp.maximum(length - n, 0),), (n,)) if S >= n else None
    match = jnp.ones((S,), bool)
    for j in range(n):
      match &= jnp.roll(history, -j) == suffix[j]
    # A match starting at i covers i..i+n-1 and must end before the suffix itself,
    # with at least one known token after it.
    start_ok = (idx + n < length) & (length >= n + 1)
    cand = jnp.max(jnp.where(match & start_ok, idx, -1))
    best = jnp.where(cand >= 0, cand + n, best)
  pos = best + jnp.arange(k)
  ok = (best >= 0) & (pos < length)
  return jnp.where(ok, history[jnp.clip(pos, 0, S - 1)], -1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class NGram(Drafter):
  """Prompt lookup. min_n=2 by default: on SmolLM2's own greedy outputs (4 dev prompts x 7
  categories, replayed offline with the measured verify cost curve) single-token matches
  were right too rarely to pay for the wider verify: modelled decode speedup 1.28x mean
  with min_n=2 vs 1.17x with min_n=1, and writing stayed >= 1.0x only with min_n=2."""

  max_n: int = 3
  min_n: int = 2
  name = "ngram"
  may_pad = True

  def __post_init__(self):
    super().__post_init__()
    if not (1 <= self.min_n <= self.max_n):
      raise ValueError(f"n-gram sizes min_n={self.min_n}, max_n={self.max_n} must satisfy 1 <= min_n <= max_n")

  def propose(self, weights, dstate, ctx: Context, keys, sampling):
    fn = lambda h, n: propose_ngram(h, n, self.k, self.max_n, self.min_n)
    return dstate, jax.vmap(fn)(ctx.history, ctx.length), None
