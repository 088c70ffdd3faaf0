"""The drafter protocol.

A drafter is a frozen, hashable config (static under jit) plus pure functions
over a pytree state. Its weights travel separately as `drafter.weights` (a
pytree of arrays passed to jit as an argument, never baked in as constants):

  init(weights, ctx, sampling, max_len)   -> dstate   (ctx.history = padded prompt [B, P])
  propose(weights, dstate, ctx, keys, sampling) -> (dstate, tokens [B, k], q [B, k, V] | None)
                                                    (a tree drafter: tokens [B, N], q [B, N+1, V] | None;
                                                     a dynamic tree, `tree.is_dynamic`: (tokens [B, N],
                                                     parent [B, N+1]) in place of tokens, root -1,
                                                     parents before children, -1 tokens absent)
  update(weights, dstate, ctx, n_acc)     -> dstate   (ctx after the commit)

With dynamic speculation the engine calls propose only on steps where some row verifies
drafts, and update only after a step that is followed by such a step: a drafter must
accept being skipped for a while (its state then misses those positions, e.g. holes in
a draft cache, which may lower its acceptance when it resumes but never its correctness).

`ctx` is what the engine knows about each row; nothing in the engine knows
which drafter it runs, and drafters do not know the loop.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import struct


@struct.dataclass
class Context:
  """Per-row view of the sequence, handed to the drafter at each step.

  history[b, :length[b]] are all tokens of row b (prompt + emitted). The last
  one, history[b, length[b] - 1], is not yet in the target's cache: it is the
  first token of the next verify pass. `features` are the target's outputs
  for the tokens of the last forward (prefill or verify), a dict with "hidden"
  [B, T, D] and, if the drafter asked for `feature_layers`, "layers" [B, T, n, D];
  `feature_start[b]` is the history index of features[:, 0].
  """

  history: jax.Array  # [B, S] int32
  length: jax.Array  # [B] int32
  features: Any = None
  feature_start: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Drafter:
  """Base config. Subclasses are frozen dataclasses; `weights` is excluded from
  equality and hashing so configs that differ only in weights share one compile."""

  k: int
  weights: Any = dataclasses.field(default=None, compare=False, repr=False)

  name = "base"
  vocab_size: int | None = None  # None: any vocabulary (n-gram)
  tokenizer_fingerprint: str | None = dataclasses.field(default=None, compare=False)
  feature_layers: tuple[int, ...] = ()
  may_pad = False  # True when propose may return fewer than k drafts (-1 padded)
  # A tree drafter (`tree.Tree`, static): propose returns tokens [B, N] for nodes 1..N
  # (-1 = absent) and k is the tree's depth; tree_mode says how children were drawn
  # (`verify.accept_tree`). A dynamic tree (`Tree.dynamic`) also returns each row's parents.
  # None: a chain of k.
  tree = None
  tree_mode = "topk"

  def __post_init__(self):
    if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
      raise ValueError(f"k={self.k!r} must be an int >= 1 (the number of drafted tokens per step)")

  @property
  def nodes(self) -> int:
    """Drafted tokens one verify holds: k for a chain, N for a tree."""
    return self.k if self.tree is None else self.tree.num_nodes

  def init(self, weights, ctx: Context, sampling, max_len: int):
    return ()

  def propose(self, weights, dstate, ctx: Context, keys, sampling):
    raise NotImplementedError

  def update(self, weights, dstate, ctx: Context, n_acc):
    return dstate
