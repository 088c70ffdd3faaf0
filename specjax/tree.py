"""Tree specs -> static numpy buffers: parents, depths, ranks, the node x node mask, paths.

A static tree is given Medusa-style as choice paths: `(0, 1)` is the 2nd-ranked child of
the 1st-ranked child of the root. The root (node 0) is the row's last committed token,
not drafted; the drafted nodes are 1..N in (depth, path) order. Buffers are built once
at config time with numpy and never traced; the accept rule (`verify.accept_tree`) reads
`children`, the model reads `mask` and `depth` (RoPE position = prefix_len + depth).

    paths [(0,), (1,), (0, 0), (0, 1), (1, 0)]

                 0            root: the last committed token
               /   \\
        (0,)  1     2  (1,)
             / \\     \\
     (0, 0) 3   4     5 (1, 0)
              (0, 1)

    parent   [-1, 0, 0, 1, 1, 2]        depth [0, 1, 1, 2, 2, 2]
    rank     [ 0, 0, 1, 0, 1, 0]        children [[1, 2], [3, 4], [5, -1], [-1, -1] x 3]
    paths    [[0, 1, 3], [0, 1, 4], [0, 2, 5]]   (root to leaf, one row per leaf)

    mask[i, j]: node i sees node j (j is i or an ancestor of i)
           j: 0 1 2 3 4 5
        i=0   x . . . . .
          1   x x . . . .
          2   x . x . . .
          3   x x . x . .
          4   x x . . x .
          5   x . x . . x

An EAGLE-2 dynamic tree (`Tree.dynamic`) fixes only the shape (node budget, depth,
width); each row chooses its topology at run time as a parent array, and
`mask_from_parents` / `children_from_parents` build the same buffers in jnp, so one
accept routine serves static and dynamic trees.
"""
from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp
import numpy as np


def _frozen(a: np.ndarray) -> np.ndarray:
  a.setflags(write=False)
  return a


@dataclasses.dataclass(frozen=True)
class Tree:
  """A tree of drafted nodes; node 0 is the root (the row's last committed token).

  Static trees carry numpy buffers (N drafted nodes, D = max depth, W = max children,
  L = leaves): parent [N+1] (root -1), depth [N+1], rank [N+1] (sibling rank, root 0),
  mask [N+1, N+1] bool, children [N+1, W] (by rank, -1 padded), paths [L, D+1] (root to
  leaf node ids, -1 padded), and choices (node i's choice path, root ()). A dynamic tree
  has only size, max_depth and width; its buffers are per row, built at run time.
  Equality and hashing go by the topology, so a Tree can be a static jit argument.
  """

  size: int  # N + 1
  max_depth: int  # D
  width: int  # W
  is_dynamic: bool = False
  choices: tuple[tuple[int, ...], ...] | None = None
  parent: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
  depth: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
  rank: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
  mask: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
  children: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
  paths: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)

  @property
  def num_nodes(self) -> int:
    """N, the drafted nodes (the root excluded)."""
    return self.size - 1

  @classmethod
  def from_paths(cls, paths) -> Tree:
    """A static tree from Medusa-style choice paths, e.g. [(0,), (1,), (0, 0)].

    Choice paths cannot form a cycle (a path's parent is its strict prefix), so only
    emptiness, ranks, missing parents, duplicates and skipped ranks are checked.
    """
    paths = list(paths)
    if not paths:
      raise ValueError("a tree needs at least one path; got an empty spec")
    clean = []
    for path in paths:
      if (isinstance(path, (str, bytes)) or not hasattr(path, "__len__") or len(path) == 0
          or not all(isinstance(r, numbers.Integral) and not isinstance(r, bool) for r in path)):
        raise ValueError(f"path {path!r} must be a non-empty tuple of ints (the root () is implied)")
      path = tuple(int(r) for r in path)
      if min(path) < 0:
        raise ValueError(f"path {path} has a negative rank {min(path)}")
      clean.append(path)
    order = sorted(clean, key=lambda p: (len(p), p))
    seen = set()
    for path in order:
      if path in seen:
        raise ValueError(f"path {path} appears more than once")
      seen.add(path)
    for path in order:
      if len(path) > 1 and path[:-1] not in seen:
        raise ValueError(f"path {path} has no parent: {path[:-1]} is not in the spec")
      if path[-1] > 0 and path[:-1] + (path[-1] - 1,) not in seen:
        raise ValueError(f"path {path} skips a rank: its sibling {path[:-1] + (path[-1] - 1,)} is not in the spec")
    ids = {(): 0, **{p: i + 1 for i, p in enumerate(order)}}
    parent = [-1] + [ids[p[:-1]] for p in order]
    rank = [0] + [p[-1] for p in order]
    return cls._build(np.asarray(parent), np.asarray(rank))

  @classmethod
  def chain(cls, k: int) -> Tree:
    """k drafts in a line: paths (0,), (0, 0), ... (the chain rule's topology)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
      raise ValueError(f"k={k!r} must be an int >= 1")
    return cls.from_paths([(0,) * d for d in range(1, k + 1)])

  @classmethod
  def from_parents(cls, parent) -> Tree:
    """A static tree from a parent array [N+1] (root -1); node ids are kept as given.

    Parents must come before their children (ids in topological order); siblings are
    ranked by id. Cycles, later parents and out-of-range parents are refused by node.
    """
    parent = np.asarray(parent)
    if parent.ndim != 1 or not np.issubdtype(parent.dtype, np.integer):
      raise ValueError(f"parent must be a 1-D int array, got shape {parent.shape} dtype {parent.dtype}")
    if parent.size < 2:
      raise ValueError(f"a tree needs at least one drafted node; got parent={parent.tolist()}")
    if parent[0] != -1:
      raise ValueError(f"node 0 is the root: its parent must be -1, got {parent[0]}")
    n = parent.size
    for i in range(1, n):
      p = int(parent[i])
      if not 0 <= p < n:
        raise ValueError(f"node {i} has parent {p}, out of range [0, {n})")
      if p >= i:
        cycle, j = [i], p
        while j > 0 and j not in cycle and len(cycle) <= n:
          cycle.append(j)
          j = int(parent[j]) if 0 <= parent[j] < n else 0
        if j == i:
          raise ValueError(f"node {i} is on a parent cycle {' -> '.join(map(str, cycle + [i]))}")
        raise ValueError(f"node {i} has parent {p}, which comes after it: parents must come before children")
    rank = np.zeros(n, np.int64)
    count = np.zeros(n, np.int64)
    for i in range(1, n):
      rank[i] = count[parent[i]]
      count[parent[i]] += 1
    return cls._build(parent, rank)

  @classmethod
  def dynamic(cls, depth: int, top_k: int, node_budget: int) -> Tree:
    """An EAGLE-2 dynamic tree: node_budget nodes, at most depth deep and top_k wide.

    Only the shape is static; each row's topology is a parent array chosen at run time
    (see `mask_from_parents`, `children_from_parents`).
    """
    for name, v in (("depth", depth), ("top_k", top_k), ("node_budget", node_budget)):
      if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{name}={v!r} must be an int >= 1")
    full = sum(top_k**d for d in range(1, depth + 1))
    if node_budget > full:
      raise ValueError(f"node_budget={node_budget} exceeds the {full} nodes a tree of depth={depth} and "
                       f"top_k={top_k} can hold")
    return cls(size=node_budget + 1, max_depth=depth, width=top_k, is_dynamic=True)

  @classmethod
  def _build(cls, parent: np.ndarray, rank: np.ndarray) -> Tree:
    """Buffers from a validated parent array (parents before children) and sibling ranks."""
    n = parent.size
    depth = np.zeros(n, np.int32)
    mask = np.eye(n, dtype=bool)
    choices = [()]
    for i in range(1, n):
      depth[i] = depth[parent[i]] + 1
      mask[i] |= mask[parent[i]]
      choices.append(choices[parent[i]] + (int(rank[i]),))
    width = int(max(np.bincount(parent[1:], minlength=n).max(), 1))
    children = np.full((n, width), -1, np.int32)
    children[parent[1:], rank[1:]] = np.arange(1, n)
    max_depth = int(depth.max())
    leaves = np.flatnonzero((children < 0).all(axis=1))
    paths = np.full((leaves.size, max_depth + 1), -1, np.int32)
    for row, leaf in enumerate(leaves):
      line = np.flatnonzero(mask[leaf])  # ancestors have smaller ids, so id order is root first
      paths[row, :line.size] = line
    return cls(size=n, max_depth=max_depth, width=width, choices=tuple(choices),
               parent=_frozen(parent.astype(np.int32)), depth=_frozen(depth), rank=_frozen(rank.astype(np.int32)),
               mask=_frozen(mask), children=_frozen(children), paths=_frozen(paths))

  def check_fits(self, slack: int) -> None:
    """Raises unless a verify step's N + 1 cache writes (root + nodes) fit in the slack.

    slack: cache slots free beyond the committed prefix (cache_len - prefix_len).
    """
    if self.size > slack:
      raise ValueError(f"a node budget of N={self.num_nodes} needs {self.size} cache slots (root + nodes) beyond "
                       f"the cache slack={slack}; lower the node budget or raise cache_len")


def mask_from_parents(parent: jax.Array, max_depth: int | None = None) -> jax.Array:
  """Ancestor closure of per-row parent arrays: parent [B, N+1] int32 -> mask [B, N+1, N+1] bool.

  mask[b, i, j]: node i sees node j (j is i or an ancestor). -1 (root, or an absent node)
  ends a line; out-of-range parents are treated as -1. max_depth parent lookups (default
  N, enough for any tree) give every ancestor. Traceable.
  """
  n = parent.shape[-1]
  max_depth = n - 1 if max_depth is None else max_depth
  parent = jnp.where((parent >= 0) & (parent < n), parent, -1).astype(jnp.int32)

  def row(par):
    ids = jnp.arange(n, dtype=jnp.int32)
    mask = ids[:, None] == ids[None, :]
    cur = ids
    for _ in range(max_depth):
      cur = jnp.where(cur >= 0, par[jnp.maximum(cur, 0)], -1)
      mask = mask | (cur[:, None] == ids[None, :])
    return mask

  return jax.vmap(row)(parent)


def children_from_parents(parent: jax.Array, rank: jax.Array, width: int) -> jax.Array:
  """Per-row children by rank: parent, rank [B, N+1] int32 -> children [B, N+1, W] int32, -1 padded.

  Node i goes to slot (parent[i], rank[i]); nodes whose parent is -1 / out of range or
  whose rank is outside [0, W) are left out. Two nodes in one slot: the larger id wins.
  """
  n = parent.shape[-1]

  def row(par, rnk):
    ok = (par >= 0) & (par < n) & (rnk >= 0) & (rnk < width) & (jnp.arange(n) > 0)
    slot = jnp.where(ok, par * width + rnk, n * width)  # n * width: dropped
    flat = jnp.full((n * width,), -1, jnp.int32).at[slot].max(jnp.arange(n, dtype=jnp.int32), mode="drop")
    return flat.reshape(n, width)

  return jax.vmap(row)(parent.astype(jnp.int32), rank.astype(jnp.int32))


def depth_from_parents(parent: jax.Array, max_depth: int | None = None) -> jax.Array:
  """Node depths of per-row parent arrays: parent [B, N+1] int32 -> depth [B, N+1] int32.

  The root and absent nodes (parent -1 or out of range) are depth 0; max_depth parent
  lookups (default N) bound the walk, as in `mask_from_parents`. Traceable.
  """
  n = parent.shape[-1]
  max_depth = n - 1 if max_depth is None else max_depth
  parent = jnp.where((parent >= 0) & (parent < n), parent, -1).astype(jnp.int32)

  def row(par):
    cur, depth = par, jnp.zeros((n,), jnp.int32)
    for _ in range(max_depth):
      depth = depth + (cur >= 0)
      cur = jnp.where(cur >= 0, par[jnp.maximum(cur, 0)], -1)
    return depth

  return jax.vmap(row)(parent)


def rank_from_parents(parent: jax.Array) -> jax.Array:
  """Sibling ranks by node id: parent [B, N+1] int32 -> rank [B, N+1] int32 (root and absent nodes 0).

  rank[b, i] = how many nodes j < i share node i's parent (as `Tree.from_parents` ranks).
  """
  n = parent.shape[-1]
  ids = jnp.arange(n, dtype=jnp.int32)
  same = (parent[:, :, None] == parent[:, None, :]) & (ids[None, None, :] < ids[None, :, None])  # [B, i, j]
  return jnp.where(parent >= 0, jnp.sum(same, axis=-1), 0).astype(jnp.int32)


def buffers_from_parents(parent: jax.Array, width: int, max_depth: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The per-row buffers a dynamic tree's verify reads, from parent [B, N+1] (root -1, -1 for
  absent nodes): mask [B, N+1, N+1] bool, depth [B, N+1] int32, children [B, N+1, W] int32 --
  for a valid parent array the same as `Tree.from_parents(parent[b])`'s mask, depth, children
  (the latter padded to W sibling slots)."""
  mask = mask_from_parents(parent, max_depth)
  depth = depth_from_parents(parent, max_depth)
  return mask, depth, children_from_parents(parent, rank_from_parents(parent), width)
