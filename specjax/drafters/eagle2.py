"""EAGLE-2: an EAGLE head drafting a dynamic tree, its topology chosen per row each step.

The head, its weights, its one-layer KV cache, `init` and `update` are `Eagle`'s; only
`propose` differs. From the head output h at the root (`dstate.h`, history index
length - 2) the head's top_k tokens are the depth-1 nodes, scored by log q. Each further
depth feeds the frontier -- the top_k nodes of the last depth by cumulative log q -- through
the head in one batched pass of top_k tokens, and each fed node gets its top_k children.
Of all nodes drawn, the node_budget with the best cumulative log q are kept (a kept node's
parent always is: log q <= 0, so a parent scores at least its child; ties keep the earlier,
shallower node) and numbered by depth, parents before children.

The fed nodes write the head's cache at scratch slots after the row's exact entries
(t <= length - 2), one batch of top_k per depth; each sees the exact prefix, its ancestors'
scratch slots and its own (`tree_cache_mask` over the scratch "tree"):

    slot:  0 .. length-2 | length-1 .. +K-1 | +K .. +2K-1 | ...
           exact entries | depth-1 frontier | depth-2 ... | (junk after; `update` overwrites)

Lossless at any temperature in mode "topk": the children are deterministic given the
history (the head's top-k, not a sample), so q is one-hot for the accept rule and is not
returned; the scores rank nodes only and never enter the accept rule.

Defaults (depth 4, top_k 3, node_budget 8): on the 2-core CPU here each verified row costs
~0.2-0.3 of a one-token forward, so a 9-token verify already costs ~3 forwards; a budget of
8 nodes is a 4-deep chain plus 4 alternatives where the head is least sure, and 3 head
passes of 3 tokens cost about what the chain's 3 single-token passes do.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from specjax.drafters.base import Context
from specjax.drafters.eagle import Eagle, EagleState
from specjax.models.llama import tree_cache_mask
from specjax.tree import Tree


@dataclasses.dataclass(frozen=True)
class Eagle2(Eagle):
  """k is the tree's depth; top_k: children per expanded node and nodes expanded per depth;
  node_budget: N, the nodes one verify holds."""

  top_k: int = 3
  node_budget: int = 8
  tree_mode = "topk"

  def __post_init__(self):
    super().__post_init__()
    if self.min_confidence:
      raise ValueError(f"min_confidence={self.min_confidence!r}: eagle2 sizes its tree by node_budget, "
                       "min_confidence is for the eagle chain drafters")
    tree = Tree.dynamic(self.k, self.top_k, self.node_budget)  # validates the three ints
    drawn = self.top_k + (self.k - 1) * self.top_k**2
    if self.node_budget > drawn:
      raise ValueError(f"node_budget={self.node_budget} exceeds the {drawn} nodes eagle2 draws with depth={self.k} "
                       f"and top_k={self.top_k} (top_k at depth 1, top_k**2 at each deeper one)")
    if self.head is not None and self.top_k > self.head.draft_vocab:
      raise ValueError(f"top_k={self.top_k} exceeds the head's draft vocabulary of {self.head.draft_vocab}")
    del tree

  @property
  def name(self) -> str:  # type: ignore[override]
    return "eagle2"

  @property
  def tree(self) -> Tree:  # type: ignore[override]
    return Tree.dynamic(self.k, self.top_k, self.node_budget)

  @property
  def depth(self) -> int:
    return self.k

  @property
  def scratch(self) -> int:
    """Head cache slots the fed frontiers use beyond a row's exact entries."""
    return (self.k - 1) * self.top_k

  @classmethod
  def from_eagle(cls, eagle: Eagle, top_k: int = 3, node_budget: int = 8) -> "Eagle2":
    """The tree drafter over an `Eagle` chain drafter's head (its k becomes the depth)."""
    fields = {f.name: getattr(eagle, f.name) for f in dataclasses.fields(Eagle)}
    return cls(**fields, top_k=top_k, node_budget=node_budget)

  def init(self, weights, ctx: Context, sampling, max_len: int):
    # Room for the scratch slots of a row at the end of the cache.
    return super().init(weights, ctx, sampling, max_len + self.scratch)

  def _expand(self, module, weights, h):
    """h [B, M, D] -> each node's top_k children: (log q [B, M, K] float32, tokens [B, M, K] int32)."""
    B, M, D = h.shape
    logits = module.logits(h.reshape(B * M, D), weights["w_out"], weights["w_out_packed"])  # [B*M, Nd]
    top, idx = jax.lax.top_k(logits, self.top_k)
    logq = top - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    tokens = jnp.take(weights["d2t"], idx).astype(jnp.int32)
    return logq.reshape(B, M, self.top_k), tokens.reshape(B, M, self.top_k)

  def propose(self, weights, dstate: EagleState, ctx: Context, keys, sampling):
    """-> (dstate, (tokens [B, N], parent [B, N+1]), None); parent[:, 0] = -1, node ids by depth."""
    module = self._module(weights)
    K, N = self.top_k, self.node_budget
    B, S = ctx.length.shape[0], dstate.k.shape[2]
    rows = jnp.arange(B)[:, None]
    base = jnp.maximum(ctx.length - 1, 0)  # the first scratch slot
    score, tok = (x[:, 0] for x in self._expand(module, weights, dstate.h[:, None]))  # depth 1: [B, K]
    pool_score, pool_tok, pool_parent = [score], [tok], [jnp.full((B, K), -1, jnp.int32)]  # parent: pool ids
    front = jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32), (B, K))  # the frontier's pool ids
    feat = jnp.broadcast_to(dstate.h[:, None], (B, K, dstate.h.shape[-1]))  # each frontier node's parent h
    sees = jnp.zeros((B, self.scratch, self.scratch), bool)  # fed node r sees fed node c
    k_c, v_c = dstate.k, dstate.v
    for d in range(1, self.k):  # feed the depth-d frontier, draw depth d + 1
      r0 = (d - 1) * K
      own = r0 + jnp.arange(K)
      sees = sees.at[:, own, own].set(True)
      mask = tree_cache_mask(base, sees, S)[:, r0:r0 + K]  # [B, K, S]
      pos = jnp.broadcast_to((ctx.length - 2 + d)[:, None], (B, K))
      h, k_c, v_c = self._pass(module, weights, feat, tok, pos, dstate.replace(k=k_c, v=v_c), base + r0, mask)
      logq, kids = self._expand(module, weights, h)  # [B, K, K]
      cand = (score[:, :, None] + logq).reshape(B, K * K)
      kids = kids.reshape(B, K * K)
      pool_score.append(cand), pool_tok.append(kids), pool_parent.append(jnp.repeat(front, K, axis=1))
      if d < self.k - 1:
        score, sel = jax.lax.top_k(cand, K)
        by = sel // K  # the fed node each new frontier node is a child of
        tok = jnp.take_along_axis(kids, sel, axis=1)
        front = (K + (d - 1) * K * K + sel).astype(jnp.int32)
        feat = jnp.take_along_axis(h, by[..., None], axis=1)
        sees = sees.at[:, r0 + K:r0 + 2 * K].set(jnp.take_along_axis(sees[:, r0:r0 + K], by[..., None], axis=1))
    score, tok, par = (jnp.concatenate(x, axis=1) for x in (pool_score, pool_tok, pool_parent))  # [B, P]
    # The pool is in depth order, so sorted pool ids number the kept nodes parents first.
    keep = jnp.sort(jax.lax.top_k(score, N)[1], axis=1)  # [B, N]
    node_id = jnp.full(score.shape, -1, jnp.int32).at[rows, keep].set(jnp.arange(1, N + 1, dtype=jnp.int32))
    up = jnp.take_along_axis(par, keep, axis=1)
    parent = jnp.where(up < 0, 0, jnp.take_along_axis(node_id, jnp.maximum(up, 0), axis=1))
    tokens = jnp.where(parent >= 0, jnp.take_along_axis(tok, keep, axis=1), -1)  # an orphan (never, see above) is absent
    parent = jnp.concatenate([jnp.full((B, 1), -1, jnp.int32), parent], axis=1)
    return dstate.replace(k=k_c, v=v_c), (tokens, parent), None


def make(model, k, head: str | None = None, top_k: int = 3, node_budget: int = 8) -> Eagle2:
  """Builder for make_drafter("eagle2"): the shipped EAGLE-3 head (or `head=` a path), depth k."""
  return Eagle2.from_eagle(Eagle.load(head or "smollm2-135m-eagle3", model=model, k=k), top_k=top_k,
                           node_budget=node_budget)
