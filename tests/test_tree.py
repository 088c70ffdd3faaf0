"""Tree specs and accept_tree: buffers against hand-drawn trees, every validation message,
chi-square losslessness for each child-sampling mode (and three wrong rules it must catch),
greedy against a brute-force walk, the sampled modes against the textbook rule run from the
same uniforms, a one-path tree against accept_chain, and hypothesis properties of the output
contract on random trees (per-row parent arrays, absent nodes, bad ids).

Losslessness. The toy target is an order-2 Markov chain over V tokens: a logit table
T [V+1, V+1, V] indexed by the last two tokens (BOS = V pads the start), so the logits after a
tree node depend on its path (its parent's token and its own), not only on its token. The
drafter is another table S, warped by the same policy. `simulate` drafts a tree from S by the
mode (top-k of S, iid from q, or from q without replacement), verifies it with accept_tree,
appends the emitted tokens and repeats from the new prefix until n tokens exist, vmapped over
tens of thousands of fixed PRNG keys; a chi-square test compares the joint law of those tokens
with the exact one from the warped table. The trees of one harness share a padded shape
(N_MAX nodes, W_MAX slots, absent nodes -1), so each (policy, mode) compiles once.
"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import test_properties  # random logits and draws, shared with accept_chain's properties
import test_verify  # V = 8 and peaked(), the chain rule's toy laws
from specjax import testing, verify
from specjax.sampling import Sampling, sample, warp
from specjax.tree import Tree, children_from_parents, mask_from_parents
from specjax.verify import accept_chain, accept_tree

V = test_verify.V
BOS = V
N_SEEDS = 20_000
P_OK = 1e-3  # a correct rule passes at this level, a wrong one must fail it
T1 = Sampling(1.0)
WARPED = Sampling(0.7, top_k=5, top_p=0.9)
MODES = ("topk", "with_replacement", "without_replacement")

# ----------------------------------------------------------------------------------------------
# Buffers of hand-drawn trees.


def test_the_docstring_tree():
  #          0
  #        /   \
  #       1     2
  #      / \     \
  #     3   4     5
  tree = Tree.from_paths([(1, 0), (0,), (0, 1), (1,), (0, 0)])  # any order: canonical ids
  assert (tree.size, tree.num_nodes, tree.max_depth, tree.width) == (6, 5, 2, 2)
  assert tree.choices == ((), (0,), (1,), (0, 0), (0, 1), (1, 0))
  np.testing.assert_array_equal(tree.parent, [-1, 0, 0, 1, 1, 2])
  np.testing.assert_array_equal(tree.depth, [0, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(tree.rank, [0, 0, 1, 0, 1, 0])
  np.testing.assert_array_equal(tree.children, [[1, 2], [3, 4], [5, -1], [-1, -1], [-1, -1], [-1, -1]])
  np.testing.assert_array_equal(tree.paths, [[0, 1, 3], [0, 1, 4], [0, 2, 5]])
  np.testing.assert_array_equal(tree.mask.astype(int), [[1, 0, 0, 0, 0, 0],
                                                         [1, 1, 0, 0, 0, 0],
                                                         [1, 0, 1, 0, 0, 0],
                                                         [1, 1, 0, 1, 0, 0],
                                                         [1, 1, 0, 0, 1, 0],
                                                         [1, 0, 1, 0, 0, 1]])
  for name in ("parent", "depth", "rank", "children", "paths"):
    assert getattr(tree, name).dtype == np.int32, name
  assert tree.mask.dtype == bool and not tree.mask.flags.writeable


def test_an_uneven_tree():
  #        0
  #     /  |  \
  #    1   2   3
  #    |
  #    4
  #   / \
  #  5   6
  tree = Tree.from_paths([(0,), (1,), (2,), (0, 0), (0, 0, 0), (0, 0, 1)])
  assert (tree.size, tree.max_depth, tree.width) == (7, 3, 3)
  np.testing.assert_array_equal(tree.parent, [-1, 0, 0, 0, 1, 4, 4])
  np.testing.assert_array_equal(tree.depth, [0, 1, 1, 1, 2, 3, 3])
  np.testing.assert_array_equal(tree.rank, [0, 0, 1, 2, 0, 0, 1])
  np.testing.assert_array_equal(tree.children, [[1, 2, 3], [4, -1, -1], [-1] * 3, [-1] * 3, [5, 6, -1], [-1] * 3,
                                                [-1] * 3])
  np.testing.assert_array_equal(tree.paths, [[0, 2, -1, -1], [0, 3, -1, -1], [0, 1, 4, 5], [0, 1, 4, 6]])
  np.testing.assert_array_equal(np.flatnonzero(tree.mask[6]), [0, 1, 4, 6])
  np.testing.assert_array_equal(np.flatnonzero(tree.mask[:, 4]), [4, 5, 6])  # who sees node 4


def test_chain_and_from_parents():
  chain = Tree.chain(3)
  np.testing.assert_array_equal(chain.parent, [-1, 0, 1, 2])
  np.testing.assert_array_equal(chain.children, [[1], [2], [3], [-1]])
  np.testing.assert_array_equal(chain.paths, [[0, 1, 2, 3]])
  np.testing.assert_array_equal(chain.mask, np.tril(np.ones((4, 4), bool)))
  assert chain == Tree.from_paths([(0,), (0, 0), (0, 0, 0)]) and hash(chain) == hash(Tree.chain(3))
  assert chain != Tree.chain(2)
  # from_parents keeps the ids given (siblings ranked by id), so it is not the canonical order.
  tree = Tree.from_parents([-1, 0, 0, 1, 2, 1])
  assert tree.choices == ((), (0,), (1,), (0, 0), (1, 0), (0, 1))
  np.testing.assert_array_equal(tree.children, [[1, 2], [3, 5], [4, -1], [-1, -1], [-1, -1], [-1, -1]])
  np.testing.assert_array_equal(tree.paths, [[0, 1, 3], [0, 2, 4], [0, 1, 5]])
  canonical = Tree.from_paths(tree.choices[1:])
  assert canonical.choices == ((), (0,), (1,), (0, 0), (0, 1), (1, 0))


def test_dynamic_spec_and_jnp_buffers():
  dyn = Tree.dynamic(depth=3, top_k=2, node_budget=5)
  assert (dyn.size, dyn.max_depth, dyn.width, dyn.is_dynamic) == (6, 3, 2, True)
  assert dyn.parent is None and dyn.mask is None and dyn.children is None
  assert dyn == Tree.dynamic(3, 2, 5) and dyn != Tree.dynamic(3, 2, 4)
  # Two rows, two topologies (row 1 has an absent node 5: parent -1), against the static builder.
  rows = [Tree.from_paths([(0,), (1,), (0, 0), (0, 1), (1, 0)]), Tree.from_parents([-1, 0, 1, 2, 1, 0])]
  parent = np.stack([rows[0].parent, rows[1].parent])
  rank = np.stack([rows[0].rank, rows[1].rank])
  parent[1, 5] = -1
  mask = np.asarray(mask_from_parents(jnp.asarray(parent), max_depth=3))
  children = np.asarray(children_from_parents(jnp.asarray(parent), jnp.asarray(rank), width=2))
  np.testing.assert_array_equal(mask[0], rows[0].mask)
  np.testing.assert_array_equal(children[0], rows[0].children)
  expected_mask = rows[1].mask.copy()
  expected_mask[5] = np.eye(6, dtype=bool)[5]  # an absent node sees only itself
  np.testing.assert_array_equal(mask[1], expected_mask)
  np.testing.assert_array_equal(children[1], [[1, -1], [2, 4], [3, -1], [-1, -1], [-1, -1], [-1, -1]])
  # max_depth lookups give every ancestor; fewer give only the nearer ones.
  assert not np.asarray(mask_from_parents(jnp.asarray(parent), max_depth=2))[1, 3, 0]
  np.testing.assert_array_equal(np.asarray(mask_from_parents(jnp.asarray(parent)))[1], expected_mask)


# ----------------------------------------------------------------------------------------------
# Validation messages.


def exact(message):
  return "^" + re.escape(message) + "$"


BAD_PATHS = [
    ([], "a tree needs at least one path; got an empty spec"),
    ([(0,), ()], "path () must be a non-empty tuple of ints (the root () is implied)"),
    ([(0,), "01"], "path '01' must be a non-empty tuple of ints (the root () is implied)"),
    ([(0,), (0, True)], "path (0, True) must be a non-empty tuple of ints (the root () is implied)"),
    ([(0,), (0, -1)], "path (0, -1) has a negative rank -1"),
    ([(0,), (0, 1)], "path (0, 1) skips a rank: its sibling (0, 0) is not in the spec"),
    ([(0,), (1, 0)], "path (1, 0) has no parent: (1,) is not in the spec"),
    ([(0,), (0, 0), (0, 0)], "path (0, 0) appears more than once"),
    ([(0, 1)], "path (0, 1) has no parent: (0,) is not in the spec"),
    ([(0,), (1,), (1, 1)], "path (1, 1) skips a rank: its sibling (1, 0) is not in the spec"),
    ([(0,), (2,)], "path (2,) skips a rank: its sibling (1,) is not in the spec"),
]


@pytest.mark.parametrize("paths,message", BAD_PATHS)
def test_from_paths_refuses(paths, message):
  with pytest.raises(ValueError, match=exact(message)):
    Tree.from_paths(paths)


BAD_PARENTS = [
    ([-1], "a tree needs at least one drafted node; got parent=[-1]"),
    ([[-1, 0]], "parent must be a 1-D int array, got shape (1, 2) dtype int64"),
    ([-1.0, 0.0], "parent must be a 1-D int array, got shape (2,) dtype float64"),
    ([0, 0], "node 0 is the root: its parent must be -1, got 0"),
    ([-1, 0, 7], "node 2 has parent 7, out of range [0, 3)"),
    ([-1, 0, -1], "node 2 has parent -1, out of range [0, 3)"),
    ([-1, 1], "node 1 is on a parent cycle 1 -> 1"),
    ([-1, 0, 3, 2], "node 2 is on a parent cycle 2 -> 3 -> 2"),
    ([-1, 2, 0], "node 1 has parent 2, which comes after it: parents must come before children"),
]


@pytest.mark.parametrize("parent,message", BAD_PARENTS)
def test_from_parents_refuses(parent, message):
  with pytest.raises(ValueError, match=exact(message)):
    Tree.from_parents(np.asarray(parent))


@pytest.mark.parametrize("args,message", [
    ((0, 2, 4), "depth=0 must be an int >= 1"),
    ((3, 0, 4), "top_k=0 must be an int >= 1"),
    ((3, 2, 0), "node_budget=0 must be an int >= 1"),
    ((3, 2.0, 4), "top_k=2.0 must be an int >= 1"),
    ((2, 2, 7), "node_budget=7 exceeds the 6 nodes a tree of depth=2 and top_k=2 can hold"),
])
def test_dynamic_refuses(args, message):
  with pytest.raises(ValueError, match=exact(message)):
    Tree.dynamic(*args)


def test_chain_refuses_and_the_cache_must_hold_the_nodes():
  for k in (0, -1, True):
    with pytest.raises(ValueError, match=exact(f"k={k!r} must be an int >= 1")):
      Tree.chain(k)
  tree = Tree.from_paths([(0,), (1,), (0, 0)])  # N = 3: the verify writes 4 slots
  tree.check_fits(4)
  Tree.dynamic(2, 2, 3).check_fits(4)
  message = ("a node budget of N=3 needs 4 cache slots (root + nodes) beyond the cache slack=3; "
             "lower the node budget or raise cache_len")
  for spec in (tree, Tree.dynamic(2, 2, 3)):
    with pytest.raises(ValueError, match=exact(message)):
      spec.check_fits(3)


def test_accept_tree_refuses_bad_inputs():
  logits, tokens = np.zeros((2, 4, V), np.float32), np.zeros((2, 4), np.int32)
  children, q = Tree.chain(3).children, np.full((2, 4, V), 1 / V, np.float32)
  call = functools.partial(accept_tree, sampling=T1, keys=jax.random.split(jax.random.key(0), 2))
  modes = "('topk', 'with_replacement', 'without_replacement')"
  with pytest.raises(ValueError, match=exact(f"mode='topK' must be one of {modes}")):
    call(logits, tokens, children, q, mode="topK")
  with pytest.raises(ValueError, match=exact("mode='with_replacement' draws children from q: pass q [B, N+1, V]")):
    call(logits, tokens, children, None, mode="with_replacement")
  with pytest.raises(ValueError, match=exact("q (2, 3, 8) must be [B, N+1, V] like logits (2, 4, 8)")):
    call(logits, tokens, children, q[:, 1:], mode="without_replacement")
  with pytest.raises(ValueError, match=exact("logits (2, 4, 8) must be [B, N+1, V] and tokens (2, 3) [B, N+1]")):
    call(logits, tokens[:, 1:], children, q, mode="topk")
  with pytest.raises(ValueError, match=exact("children (3, 1) must be [N+1, W] or [B, N+1, W] with N+1=4, B=2")):
    call(logits, tokens, children[1:], q, mode="topk")
  with pytest.raises(ValueError, match=exact("max_depth=-1 must be an int in [0, 65536)")):
    call(logits, tokens, children, q, mode="topk", max_depth=-1)
  with pytest.raises(ValueError, match=exact("children (4, 32768) has 32768 sibling slots; at most 32767")):
    call(logits, tokens, np.full((4, 2**15), -1, np.int32), q, mode="topk")


# ----------------------------------------------------------------------------------------------
# The losslessness harness.

N_MAX, W_MAX, D_MAX = 6, 4, 3  # every harness tree padded to this shape
TREES = {
    "chain": Tree.chain(3),
    "wide": Tree.from_paths([(0,), (1,), (2,), (3,)]),
    "two_level": Tree.from_paths([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0)]),
}
IDENTITY_RANKS = np.arange(W_MAX)
DUPLICATE_RANKS = np.asarray([0, 0, 1, 1])  # topk drafter: rank 1 repeats rank 0's token, rank 3 rank 2's


def padded(tree):
  """parent, rank [N_MAX+1] and children [N_MAX+1, W_MAX] with absent nodes (parent -1)."""
  n, w = tree.size, tree.width
  parent = np.full(N_MAX + 1, -1, np.int32)
  rank = np.zeros(N_MAX + 1, np.int32)
  children = np.full((N_MAX + 1, W_MAX), -1, np.int32)
  parent[:n], rank[:n], children[:n, :w] = tree.parent, tree.rank, tree.children
  return parent, rank, children


def toy_tables(seed, drafter_scale=1.5):
  """Target and drafter logit tables [V+1, V+1, V], indexed by (second-last, last) token."""
  rng = np.random.default_rng(seed)
  target, drafter = rng.normal(size=(V + 1, V + 1, V)) * 1.5, rng.normal(size=(V + 1, V + 1, V)) * drafter_scale
  return target.astype(np.float32), drafter.astype(np.float32)


def draft_tree(q_table, order_table, parent, rank, rank_map, a, b, key, draw):
  """Node tokens [N_MAX+1] (-1 absent) and their parents' tokens, drafted in id order (parents first).

  q_table [V+1, V+1, V] is the warped drafter, order_table its ids by decreasing logit; draw (an
  index into MODES, traced so the modes share a compilation) says how children are drawn."""
  ids = jnp.arange(N_MAX + 1)

  def node(i, carry):
    tok, prev = carry
    par = jnp.maximum(parent[i], 0)
    present = (parent[i] >= 0) & (tok[par] >= 0)
    ctx = (jnp.maximum(prev[par], 0), jnp.maximum(tok[par], 0))
    q, key_i = q_table[ctx], jax.random.fold_in(key, i)
    top = order_table[ctx][rank_map[rank[i]]]
    iid = sample(key_i, q)
    earlier = (ids < i) & (parent == parent[i]) & (tok >= 0)  # without replacement: siblings' tokens are out
    rest = q * (jnp.sum(jax.nn.one_hot(tok, V) * earlier[:, None], axis=0) == 0)
    fresh = jnp.where(jnp.sum(rest) > 0, sample(key_i, rest), -1)
    x = jnp.select([draw == 0, draw == 1], [top, iid], fresh)
    return tok.at[i].set(jnp.where(present, x, -1)), prev.at[i].set(tok[par])

  init = (jnp.full((N_MAX + 1,), -1, jnp.int32).at[0].set(b), jnp.full((N_MAX + 1,), -1, jnp.int32).at[0].set(a))
  return jax.lax.fori_loop(1, N_MAX + 1, node, init)


def by_target_probability(p, tok, children):
  """Wrong: each node's children reordered so the one the target likes most is tried first."""
  score = jnp.where(children >= 0, jnp.take_along_axis(p, tok[jnp.maximum(children, 0)], axis=1), -1.0)
  return jnp.take_along_axis(children, jnp.argsort(-score, axis=1, stable=True), axis=1)


@functools.partial(jax.jit, static_argnames=("sampling", "mode", "n_tokens"))
def _simulate(target, q_table, order_table, parent, rank, children, rank_map, draw, reorder, keys, *, sampling, mode,
              n_tokens):
  def step(carry, key):
    hist, n = carry
    key_draft, key_accept = jax.random.split(key)
    tok, prev = draft_tree(q_table, order_table, parent, rank, rank_map, hist[n - 2], hist[n - 1], key_draft, draw)
    ctx = (jnp.maximum(prev, 0), jnp.maximum(tok, 0))
    logits = target[ctx]
    kids = jnp.where(reorder, by_target_probability(warp(logits, sampling), tok, children), children)
    n_acc, _, out = accept_tree(logits[None], tok[None], kids, q_table[ctx][None], sampling, key_accept[None],
                                mode=mode, max_depth=D_MAX)
    return (jax.lax.dynamic_update_slice(hist, out[0], (n,)), n + n_acc[0] + 1), None

  def one(key):
    hist = jnp.full((2 + n_tokens * (D_MAX + 1),), -1, jnp.int32).at[:2].set(BOS)
    (hist, _), _ = jax.lax.scan(step, (hist, jnp.int32(2)), jax.random.split(key, n_tokens))
    return hist[2:2 + n_tokens]

  return jax.vmap(one)(keys)


def simulate(tables, tree, sampling, *, draw, mode=None, reorder=False, rank_map=IDENTITY_RANKS, n_tokens=3,
             n_seeds=N_SEEDS, seed=0):
  """First n_tokens emitted tokens of n_seeds independent runs: [n_seeds, n_tokens].

  draw: how children are drawn (a mode); mode: the accept rule's mode (default: draw's);
  reorder: try children in order of target probability (wrong)."""
  target, drafter = tables
  q_table = warp(jnp.asarray(drafter), sampling)  # the drafter's q, by the same policy as the target
  order_table = np.argsort(-drafter, axis=-1, kind="stable").astype(np.int32)
  parent, rank, children = padded(tree)
  keys = jax.random.split(jax.random.key(seed), n_seeds)
  arrays = (target, q_table, order_table, parent, rank, children, rank_map, MODES.index(draw), reorder)
  return np.asarray(_simulate(*map(jnp.asarray, arrays), keys, sampling=sampling, mode=mode or draw,
                              n_tokens=n_tokens))


def exact_law(target, sampling, n_tokens=3):
  """P(x_1..x_n) [V]*n of the order-2 target under the warped policy, in float64."""
  p = np.asarray(warp(jnp.asarray(target), sampling), np.float64)
  p /= p.sum(-1, keepdims=True)
  law = p[BOS, BOS]
  if n_tokens >= 2:
    law = law[:, None] * p[BOS, :V]
  if n_tokens >= 3:
    law = law[:, :, None] * p[:V, :V]
  return law


def pvalues(samples, law):
  """Chi-square p-values of the first 1, 2 and 3 emitted tokens."""
  return {n: testing.gof_pvalue(samples[:, :n], law.sum(axis=tuple(range(n, law.ndim))))
          for n in range(1, samples.shape[1] + 1)}


LOSSLESS_CASES = [(tree, mode, sampling) for tree in TREES for mode in MODES for sampling in ("T1", "warped")]
LOSSLESS_CASES += [("two_level_duplicates", "topk", "T1"), ("two_level_duplicates", "topk", "warped")]


@pytest.mark.parametrize("tree,mode,policy", LOSSLESS_CASES)
def test_emitted_tokens_follow_the_warped_target_law(tree, mode, policy, record_property):
  sampling = {"T1": T1, "warped": WARPED}[policy]
  duplicates = tree.endswith("_duplicates")
  seed = 1000 + LOSSLESS_CASES.index((tree, mode, policy))
  tables = toy_tables(seed)
  samples = simulate(tables, TREES[tree.removesuffix("_duplicates")], sampling, draw=mode,
                     rank_map=DUPLICATE_RANKS if duplicates else IDENTITY_RANKS, seed=seed)
  result = pvalues(samples, exact_law(tables[0], sampling))
  record_property("chi2_pvalues", result)
  print(f"\n{tree} {mode} {policy}: chi-square p-values by number of tokens {result}")
  assert min(result.values()) >= P_OK, f"{tree} {mode} {policy}: not the target law ({result})"


def _no_residual_update(r, z, qr, qz, x, u):
  """Wrong: the topk test, but a rejected sibling's token stays in the residual."""
  return u * z < r[x], r, qr, qz


CONTROLS = {
    # name: (draw, accept mode, reorder)
    "topk_without_residual_update": ("topk", "topk_without_residual_update", False),
    "without_replacement_draws_judged_with_replacement": ("without_replacement", "with_replacement", False),
    "most_probable_child_first": ("with_replacement", "with_replacement", True),
}


@pytest.mark.parametrize("control", list(CONTROLS))
def test_harness_rejects_wrong_rules(control, monkeypatch, record_property):
  monkeypatch.setitem(verify._SIBLING_RULES, "topk_without_residual_update", _no_residual_update)
  draw, mode, reorder = CONTROLS[control]
  tables = toy_tables(100, drafter_scale=3.0)  # a peaked q: later draws without replacement differ from q
  samples = simulate(tables, TREES["wide"], T1, draw=draw, mode=mode, reorder=reorder, seed=100)
  result = pvalues(samples, exact_law(tables[0], T1))
  record_property("chi2_pvalues", result)
  print(f"\n{control}: chi-square p-values by number of tokens {result}")
  assert min(result.values()) < P_OK, f"the harness missed {control} ({result})"


# ----------------------------------------------------------------------------------------------
# Random trees (per-row parent arrays) for the reference, greedy and property tests. One shape,
# so each (policy, mode) compiles once: B = ROWS, N + 1 = N_RAND + 1 nodes, W_RAND slots, V tokens.

ROWS, N_RAND, W_RAND = 64, 7, 3
POLICIES = [T1, Sampling(0.7, top_k=3, top_p=0.8), Sampling(0.0)]
BAD_IDS = test_properties.BAD_IDS  # never valid ids for V <= 16


run_chain = jax.jit(accept_chain, static_argnames=("sampling",))


@functools.partial(jax.jit, static_argnames=("sampling", "mode"))
def evaluate(logits, tokens, children, q, keys, sampling, mode):
  n_acc, path, out = accept_tree(logits, tokens, children, q, sampling, keys, mode=mode)
  return n_acc, path, out, warp(logits, sampling)


@functools.partial(jax.jit, static_argnames=("depth", "width"))
def tree_uniforms(keys, depth, width):
  """The uniforms accept_tree draws, [B, depth, width], and sample()'s uniform [B], per row key."""

  def row(key):
    key_u, key_s = jax.random.split(key)
    u = jax.vmap(lambda d: jax.vmap(lambda j: jax.random.uniform(jax.random.fold_in(key_u, (j << 16) | d), (),
                                                                  jnp.float32))(jnp.arange(width)))(jnp.arange(depth))
    return u, jax.random.uniform(key_s, (1,), jnp.float32)[0]

  return jax.vmap(row)(keys)


@st.composite
def tree_cases(draw, policies=POLICIES, bad_frac=st.sampled_from([0.0, 0.1, 0.4])):
  return dict(
      seed=draw(st.integers(0, 2**32 - 1)),
      sampling=draw(st.sampled_from(policies)),
      mode=draw(st.sampled_from(MODES)),
      shape=draw(st.sampled_from(["random", "chain", "star"])),
      q_mode=draw(st.sampled_from(["random", "p", "mixed"])),
      token_mode=draw(st.sampled_from(["from_q", "argmax", "uniform", "outside"])),
      scale=draw(st.sampled_from([0.1, 1.0, 4.0, 30.0])),
      inf_frac=draw(st.sampled_from([0.0, 0.3, 0.9])),
      ties=draw(st.booleans()),
      bad_frac=draw(bad_frac),
      bad_children=draw(st.sampled_from([0.0, 0.0, 0.2])),
  )


def random_parents(rng, shape):
  """Parent arrays [ROWS, N_RAND+1] (root -1; a node's parent has a smaller id) and sibling ranks by id."""
  n = N_RAND + 1
  if shape == "chain":
    parent = np.broadcast_to(np.arange(-1, n - 1), (ROWS, n)).copy()
  elif shape == "star":
    parent = np.zeros((ROWS, n), np.int64)
  else:
    parent = np.floor(rng.random((ROWS, n)) * np.arange(n)).astype(np.int64)
  parent[:, 0] = -1
  parent[rng.random((ROWS, n)) < 0.1] = -1  # absent nodes (and their subtrees)
  parent[:, 0] = -1
  rank = np.zeros_like(parent)
  for i in range(1, n):
    rank[:, i] = (parent[:, 1:i] == parent[:, i:i + 1]).sum(1)
  return parent.astype(np.int32), rank.astype(np.int32)


def build_tree_case(case):
  """numpy inputs: logits, tokens, children [ROWS, N+1, W] (per row), q [ROWS, N+1, V], keys, p."""
  rng = np.random.default_rng(case["seed"])
  sampling, n = case["sampling"], N_RAND + 1
  parent, rank = random_parents(rng, case["shape"])
  children = np.array(children_from_parents(jnp.asarray(parent), jnp.asarray(rank), W_RAND))  # rank >= W: left out
  corrupt = rng.random(children.shape) < case["bad_children"]  # ids that are no node: never followed
  children[corrupt] = rng.choice([-1, -5, 0, n, n + 3], corrupt.sum())
  logits = test_properties._random_logits(rng, (ROWS, n, V), case["scale"], case["inf_frac"], case["ties"])
  p = np.asarray(test_properties._warp(logits, sampling))
  q = np.array(test_properties._warp(test_properties._random_logits(rng, (ROWS, n, V), case["scale"],
                                                                    case["inf_frac"], case["ties"]), sampling))
  if case["q_mode"] == "p":
    q = p.copy()
  elif case["q_mode"] == "mixed":  # per row: q == p, random q, or q with a hole at p's argmax
    pick = rng.integers(0, 3, ROWS)
    q[pick == 0] = p[pick == 0]
    rows = np.flatnonzero(pick == 2)
    q[rows[:, None], np.arange(n)[None], np.argmax(p[rows], axis=-1)] = 0.0
  safe_parent = np.maximum(parent, 0)
  mode = case["token_mode"]
  gather = lambda a: np.take_along_axis(a, safe_parent[..., None], axis=1)  # a's row at each node's parent
  if mode == "from_q":
    tokens = test_properties._sample_rows(rng, gather(q))
  elif mode == "argmax":
    tokens = np.argmax(gather(logits), axis=-1)
  elif mode == "uniform":
    tokens = rng.integers(0, V, (ROWS, n))
  else:  # ids the target cannot emit
    tokens = test_properties._sample_rows(rng, (gather(p) == 0) + 1e-9)
  bad = rng.random((ROWS, n)) < case["bad_frac"]
  tokens = np.where(bad, rng.choice(BAD_IDS, (ROWS, n)), tokens).astype(np.int32)
  keys = jax.random.split(jax.random.key(case["seed"] % 2**31), ROWS)
  return logits, tokens, children, q, keys, p


def reference_walk(p, tokens, children, q, u, u_s, mode, margin=1e-5):
  """The textbook rule for one row in float64, from the same uniforms accept_tree draws.

  Returns (accepted nodes, emitted token), or None where a decision is within `margin` of its
  boundary (float32 and float64 may then disagree)."""
  n, vocab = p.shape
  node, path = 0, []
  for d in range(u.shape[0] + 1):
    r = p[node].astype(np.float64)
    if d == u.shape[0]:
      break
    qr, qz = q[node].astype(np.float64), 1.0  # q as given (warp normalises it), as accept_chain takes it
    child = None
    for j, c in enumerate(children[node]):
      if not 0 < c < n or not 0 <= tokens[c] < vocab:
        continue  # no node, or an absent one
      x = tokens[c]
      rn = r / r.sum()
      if mode == "topk":
        prop = np.eye(vocab)[x]
      elif mode == "with_replacement":
        prop = qr
      else:
        prop = qr / qz if qz > 0 else np.eye(vocab)[x]
      if abs(u[d, j] * prop[x] - rn[x]) < margin:
        return None
      if u[d, j] * prop[x] < rn[x]:
        child = c
        break
      residual = np.maximum(rn - prop, 0.0)
      r = residual if residual.sum() > margin else r  # Z = 0: the residual before this sibling
      if mode == "without_replacement":
        qr[x] = 0.0
        qz = qr.sum() if qz > 0 else 0.0
    if child is None:
      break
    path.append(child)
    node = child
  cdf = np.cumsum(r)
  if np.min(np.abs(cdf - u_s * cdf[-1])) < margin * cdf[-1]:
    return None
  return path, min(int((cdf <= u_s * cdf[-1]).sum()), int(np.flatnonzero(r > 0)[-1]))


def greedy_walk(logits, tokens, children):
  """The brute-force greedy walk of one row: (accepted nodes, emitted token)."""
  n = logits.shape[0]
  node, path = 0, []
  while True:
    target = int(np.argmax(logits[node]))
    hit = [c for c in children[node] if 0 < c < n and tokens[c] == target]
    if not hit:
      return path, target
    node = hit[0]
    path.append(node)


def check_tree_contract(case, logits, tokens, children, q, keys, n_acc, path, out, p):
  """Every property of one evaluated batch, row by row, against the reference walks."""
  n_acc, path, out, p = map(np.asarray, (n_acc, path, out, p))
  B, n = tokens.shape
  D = n - 1
  assert n_acc.dtype == path.dtype == out.dtype == np.int32
  assert n_acc.shape == (B,) and path.shape == out.shape == (B, D + 1)
  assert not np.isnan(p).any()
  assert ((path >= -1) & (path < n)).all() and ((out >= -1) & (out < V)).all()
  if not case["sampling"].greedy:
    u, u_s = map(np.asarray, tree_uniforms(keys, D, children.shape[-1]))
  checked = 0
  for b in range(B):
    k = n_acc[b]
    assert 0 <= k <= D and path[b, 0] == 0
    for d in range(k):  # each step goes to a real child of the node before, with a valid token
      assert path[b, d + 1] in children[b, path[b, d]] and 0 < path[b, d + 1] < n
    assert (path[b, k + 1:] == -1).all() and (out[b, k + 1:] == -1).all()
    nodes = path[b, 1:k + 1]
    np.testing.assert_array_equal(out[b, :k], tokens[b, nodes])
    assert ((out[b, :k] >= 0) & (out[b, :k] < V)).all() and 0 <= out[b, k] < V
    line = path[b, :k + 1]
    assert (p[b, line[:-1], out[b, :k]] > 0).all() and p[b, line[-1], out[b, k]] > 0  # all in the target's support
    if case["sampling"].greedy:
      assert greedy_walk(logits[b], tokens[b], children[b]) == (list(nodes), out[b, k])
      continue
    ref = reference_walk(p[b], tokens[b], children[b], q[b], u[b], u_s[b], case["mode"])
    if ref is not None:
      checked += 1
      assert ref == (list(nodes), out[b, k]), (b, ref, nodes, out[b, k])
  return checked


def run_tree_case(case):
  logits, tokens, children, q, keys, p = build_tree_case(case)
  n_acc, path, out, p = evaluate(logits, tokens, children, q, keys, sampling=case["sampling"], mode=case["mode"])
  return check_tree_contract(case, logits, tokens, children, q, keys, n_acc, path, out, p)


TREE_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@TREE_SETTINGS
@given(case=tree_cases())
def test_accept_tree_contract_and_reference(case, property_cases):
  """ids in range, path / out consistent, everything in the target's support; greedy = the
  brute-force walk, sampled modes = the textbook rule decision by decision from the same uniforms."""
  run_tree_case(case)
  property_cases("test_accept_tree_contract_and_reference", ROWS)


@TREE_SETTINGS
@given(case=tree_cases(bad_frac=st.sampled_from([0.5, 1.0])))
def test_accept_tree_absent_nodes(case, property_cases):
  run_tree_case(case)
  property_cases("test_accept_tree_absent_nodes", ROWS)


@settings(max_examples=20, deadline=None)
@given(case=tree_cases(policies=POLICIES[:2]), perm_seed=st.integers(0, 2**32 - 1))
def test_tree_rows_do_not_depend_on_their_batch(case, perm_seed, property_cases):
  logits, tokens, children, q, keys, _ = build_tree_case(case)
  perm = np.random.default_rng(perm_seed).permutation(ROWS)
  first = evaluate(logits, tokens, children, q, keys, sampling=case["sampling"], mode=case["mode"])
  second = evaluate(logits[perm], tokens[perm], children[perm], q[perm], keys[perm], sampling=case["sampling"],
                    mode=case["mode"])
  for a, b in zip(first[:3], second[:3]):
    np.testing.assert_array_equal(np.asarray(a)[perm], b)
  property_cases("test_tree_rows_do_not_depend_on_their_batch", ROWS)


def test_reference_comparison_is_not_vacuous():
  # The margin skips only rows with a decision at float precision: nearly every row is compared.
  case = dict(seed=5, sampling=T1, mode="with_replacement", shape="random", q_mode="random", token_mode="from_q",
              scale=1.0, inf_frac=0.0, ties=False, bad_frac=0.1, bad_children=0.0)
  assert run_tree_case(case) >= ROWS - 2


# ----------------------------------------------------------------------------------------------
# A one-path tree is the chain rule.


@pytest.mark.parametrize("sampling", POLICIES, ids=["T1", "warped", "greedy"])
@pytest.mark.parametrize("mode", MODES)
def test_one_path_tree_is_accept_chain(sampling, mode):
  """Same keys, same draws: n_acc and the emitted tokens equal accept_chain's exactly."""
  k = N_RAND  # the properties' shape, so `evaluate` is compiled once for both
  chain = Tree.chain(k)
  children = np.broadcast_to(np.pad(chain.children, ((0, 0), (0, W_RAND - 1)), constant_values=-1),
                             (ROWS, k + 1, W_RAND))
  accepted = []
  for seed in range(8):
    rng = np.random.default_rng(seed)
    logits = test_properties._random_logits(rng, (ROWS, k + 1, V), 2.0, 0.2, False)
    q = np.asarray(test_properties._warp(test_properties._random_logits(rng, (ROWS, k + 1, V), 2.0, 0.2, False),
                                         sampling))
    p = np.asarray(test_properties._warp(logits, sampling))
    drafts = test_properties._sample_rows(rng, (0.5 * p + 0.5 * q)[:, :k]).astype(np.int32)  # often accepted
    drafts[rng.random((ROWS, k)) < 0.05] = -1
    keys = jax.random.split(jax.random.key(seed), ROWS)
    n_chain, out_chain = run_chain(logits, drafts, None if mode == "topk" else q[:, :k], sampling, keys)
    tokens = np.concatenate([np.zeros((ROWS, 1), np.int32), drafts], axis=1)
    n_acc, path, out, _ = evaluate(logits, tokens, children, q, keys, sampling=sampling, mode=mode)
    np.testing.assert_array_equal(n_acc, n_chain)
    np.testing.assert_array_equal(out, out_chain)
    np.testing.assert_array_equal(path, np.where(np.arange(k + 1) <= np.asarray(n_acc)[:, None], np.arange(k + 1), -1))
    accepted.append(np.asarray(n_acc))
  assert 0 < np.mean(accepted) < k and np.max(accepted) >= 3  # rejections and long acceptances happened


# ----------------------------------------------------------------------------------------------
# Scenarios: deterministic by construction (logits -inf outside a chosen support).


def run_padded(logits, tokens, children, q, sampling, mode):
  """Runs a small scenario (b rows, n nodes, w slots) in the properties' shape, so it compiles
  nothing new: nodes past n are absent (-1, no parent), rows past b repeat row 0. Returns the b
  rows' (n_acc, path, out), checking that the padding left the columns past n as -1."""
  b, n = tokens.shape
  children = np.broadcast_to(children, (b,) + children.shape[-2:])
  rows = np.arange(ROWS) % b
  pad = lambda a, value: np.pad(a, [(0, 0), (0, N_RAND + 1 - a.shape[1])] + [(0, 0)] * (a.ndim - 2),
                                constant_values=value)[rows]
  children = np.pad(pad(children, -1), ((0, 0), (0, 0), (0, W_RAND - children.shape[-1])), constant_values=-1)
  results = evaluate(pad(logits, 0.0), pad(tokens, -1), children, pad(q, 1.0 / V),
                     jax.random.split(jax.random.key(0), ROWS), sampling=sampling, mode=mode)
  n_acc, path, out = (np.asarray(a)[:b] for a in results[:3])
  assert (path[:, n:] == -1).all() and (out[:, n:] == -1).all()
  return n_acc, path[:, :n], out[:, :n]


@pytest.mark.parametrize("sampling", [T1, Sampling(0.0)], ids=["T1", "greedy"])
@pytest.mark.parametrize("mode", MODES)
def test_scenario_padding_is_never_an_index(sampling, mode):
  #      0                 p at the root is one-hot at V-1; a -1 token read as an index wraps to V-1,
  #    / | \               and a -1 child id read as a node id is node 4, the last, whose token is V-1.
  #   1  2  3              Row 0: the children are -1 tokens then a real miss: correction V-1.
  #   |                    Row 1: child slots -1 around node 2 (token V-1): accepted, then node 2 is a
  #   4                    leaf whose bonus is 5. Row 2: node 1 (token 3) then node 4 (token -1).
  tokens = np.asarray([[0, -1, -1, 2, V - 1], [0, 1, V - 1, 2, V - 1], [0, V - 1, 1, 2, -1]], np.int32)
  children = np.asarray([[[1, 2, 3], [4, -1, -1], [-1] * 3, [-1] * 3, [-1] * 3],
                         [[-1, 2, -1], [4, -1, -1], [-1] * 3, [-1] * 3, [-1] * 3],
                         [[1, -1, -1], [4, -1, -1], [-1] * 3, [-1] * 3, [-1] * 3]], np.int32)
  logits = test_verify.peaked([[V - 1, 0, 5, 0, 0], [V - 1, 0, 5, 0, 0], [V - 1, 6, 0, 0, 0]])
  q = np.full((3, 5, V), 1.0 / V, np.float32)
  n_acc, path, out = run_padded(logits, tokens, children, q, sampling, mode)
  np.testing.assert_array_equal(n_acc, [0, 1, 1])
  np.testing.assert_array_equal(path[:, :3], [[0, -1, -1], [0, 2, -1], [0, 1, -1]])
  np.testing.assert_array_equal(out[:, :3], [[V - 1, -1, -1], [V - 1, 5, -1], [V - 1, 6, -1]])


@pytest.mark.parametrize("mode", MODES)
def test_scenario_duplicates_zero_and_nan(mode):
  # Row 0: siblings 3, 3, 5 under p = one-hot(5): the duplicate is rejected too, 5 accepted.
  # Row 1: every token has p = 0 under the root: all rejected, the correction comes from p.
  # Row 2: NaN logits: whatever happens, ids stay in range.
  tokens = np.asarray([[0, 3, 3, 5], [0, 1, 2, 3], [0, 1, 2, 3]], np.int32)
  children = Tree.from_paths([(0,), (1,), (2,)]).children
  logits = test_verify.peaked([[5, 0, 0, 0], [4, 0, 0, 0], [0, 0, 0, 0]])
  logits[2] = np.nan
  q = np.zeros((3, 4, V), np.float32)
  q[..., 3] = 1.0
  for sampling in (T1, Sampling(0.0)):
    n_acc, path, out = run_padded(logits, tokens, children, q, sampling, mode)
    np.testing.assert_array_equal(n_acc[:2], [1, 0])
    np.testing.assert_array_equal(out[:2, :2], [[5, 0], [4, -1]])
    assert 0 <= out[2, n_acc[2]] < V and 0 <= n_acc[2] <= 1 and (path[2] >= -1).all() and (path[2] < 4).all()


def test_static_and_per_row_children_agree():
  case = dict(seed=3, sampling=T1, mode="without_replacement", shape="random", q_mode="random", token_mode="from_q",
              scale=1.0, inf_frac=0.0, ties=False, bad_frac=0.1, bad_children=0.0)
  logits, tokens, _, q, keys, _ = build_tree_case(case)
  tree = Tree.from_paths([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])
  per_row = np.broadcast_to(tree.children, (ROWS,) + tree.children.shape)
  static = evaluate(logits, tokens, tree.children, q, keys, sampling=T1, mode="without_replacement")
  rows = evaluate(logits, tokens, per_row, q, keys, sampling=T1, mode="without_replacement")  # the properties' shape
  for a, b in zip(static, rows):
    np.testing.assert_array_equal(a, b)
