"""Tree verification in the target and the cache: a tree forward gives every node the logits
and K/V of a plain forward over its root-to-node path, and compaction of an accepted path
leaves the cache a plain forward over the same tokens would have written."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax import cache as cache_lib
from specjax import kernels, testing
from specjax.models.llama import causal_mask, tree_cache_mask

# node:    0    1    2    3    4    5        a 2-level tree: 1, 2 children of the root 0;
# parent: -1    0    0    1    1    2        3, 4 children of 1; 5 child of 2
PARENT = np.array([-1, 0, 0, 1, 1, 2])
DEPTH = np.array([0, 1, 1, 2, 2, 2])


def ancestors(parent) -> np.ndarray:
  """mask[i, j]: j is i or an ancestor of i (written here from parents, independently of tree.py)."""
  n = len(parent)
  mask = np.eye(n, dtype=bool)
  for i in range(n):
    j = parent[i]
    while j >= 0:
      mask[i, j] = True
      j = parent[j]
  return mask


def path_to(node: int) -> list[int]:
  out = [node]
  while PARENT[out[-1]] >= 0:
    out.append(int(PARENT[out[-1]]))
  return out[::-1]


@pytest.fixture(scope="module")
def model():
  return testing.tiny_model(seed=3, scale=2.0)


def _forward(model, tokens, positions, cache, **kw):
  return jax.jit(lambda p, t, pos, c: model.module(p)(t, pos, c, **kw))(model.params, tokens, positions, cache)


def _prefilled(model, prefix, max_len=64):
  B = len(prefix)
  P = max(map(len, prefix))
  toks = np.zeros((B, P), np.int32)
  for b, row in enumerate(prefix):
    toks[b, :len(row)] = row
  cache = model.new_cache(B, max_len)
  pos = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  _, cache, _ = _forward(model, jnp.asarray(toks), pos, cache)
  return cache.replace(lengths=jnp.asarray([len(r) for r in prefix], jnp.int32))


def test_the_tree_mask_of_a_chain_is_the_causal_mask():
  lengths = jnp.asarray([0, 3, 7], jnp.int32)
  chain = np.tril(np.ones((4, 4), bool))
  np.testing.assert_array_equal(tree_cache_mask(lengths, chain, 16), causal_mask(lengths, 4, 16))


def test_tree_cache_mask_per_row_trees():
  lengths = jnp.asarray([2, 5], jnp.int32)
  tm = np.stack([ancestors(PARENT), np.tril(np.ones((6, 6), bool))])
  m = np.asarray(tree_cache_mask(lengths, tm, 16))
  for b, L in enumerate([2, 5]):
    assert m[b, :, :L].all() and not m[b, :, L + 6:].any()
    np.testing.assert_array_equal(m[b, :, L:L + 6], tm[b])


@pytest.mark.parametrize("kernel", [True, False], ids=["cpu_kernel", "xla"])
def test_every_tree_node_gets_the_logits_of_its_path(model, kernel, monkeypatch):
  if not kernel:
    monkeypatch.setattr("specjax.models.llama.attention_kernel_applies", lambda *a: False)
  rng = np.random.default_rng(0)
  V = model.config.vocab_size
  prefix = [rng.integers(3, V, 5).tolist(), rng.integers(3, V, 9).tolist()]
  nodes = rng.integers(3, V, (2, len(PARENT))).astype(np.int32)
  cache = _prefilled(model, prefix)
  pos = cache.lengths[:, None] + jnp.asarray(DEPTH)[None]
  logits, _, _ = _forward(model, jnp.asarray(nodes), pos, cache, tree_mask=jnp.asarray(ancestors(PARENT)))
  for b in range(2):
    for node in range(len(PARENT)):
      seq = prefix[b] + [int(nodes[b, i]) for i in path_to(node)]
      want = _plain_logits(model, seq)[-1]
      np.testing.assert_allclose(logits[b, node], want, atol=1e-4, rtol=1e-4)


def _plain_logits(model, seq):
  from specjax.models.model import forward_logits
  return np.asarray(forward_logits(model, seq))


@pytest.mark.parametrize("write_cache", [True, False], ids=["written_in_forward", "written_after"])
def test_compacting_the_accepted_path_equals_a_plain_forward(model, write_cache):
  rng = np.random.default_rng(1)
  V = model.config.vocab_size
  prefix = [rng.integers(3, V, 6).tolist(), rng.integers(3, V, 4).tolist()]
  nodes = rng.integers(3, V, (2, len(PARENT))).astype(np.int32)
  accepted = [[0, 2, 5], [0, 1]]  # per row: the path the accept rule kept (root first)
  cache = _prefilled(model, prefix)
  pos = cache.lengths[:, None] + jnp.asarray(DEPTH)[None]
  _, tree_cache, feats = _forward(model, jnp.asarray(nodes), pos, cache, tree_mask=jnp.asarray(ancestors(PARENT)),
                                  write_cache=write_cache)
  if not write_cache:  # the decode loop's verify switch writes the nodes after the forward
    new_k, new_v = feats["new_kv"]
    tree_cache = cache.replace(k=tuple(kernels.cache_write(c, n, cache.lengths) for c, n in zip(cache.k, new_k)),
                               v=tuple(kernels.cache_write(c, n, cache.lengths) for c, n in zip(cache.v, new_v)))
  path = np.full((2, 3), -1, np.int32)
  for b, p in enumerate(accepted):
    path[b, :len(p)] = p
  compact = jax.jit(lambda c, p, s: cache_lib.compact(c, p, s))
  ks = [compact(c, jnp.asarray(path), cache.lengths) for c in tree_cache.k]
  vs = [compact(c, jnp.asarray(path), cache.lengths) for c in tree_cache.v]
  for b in range(2):
    seq = prefix[b] + [int(nodes[b, i]) for i in accepted[b]]
    plain = _prefilled(model, [seq])
    hi = len(seq)
    for layer in range(model.config.layers):
      np.testing.assert_allclose(ks[layer][b, :, :hi], plain.k[layer][0, :, :hi], atol=1e-5)
      np.testing.assert_allclose(vs[layer][b, :, :hi], plain.v[layer][0, :, :hi], atol=1e-5)


def test_compaction_of_the_root_alone_changes_nothing(model):
  cache = _prefilled(model, [[5, 6, 7, 8]])
  layer = jnp.asarray(np.random.default_rng(2).normal(size=cache.k[0].shape), jnp.float32)
  out = cache_lib.compact(layer, jnp.asarray([[0, -1, -1]], jnp.int32), cache.lengths)
  np.testing.assert_array_equal(out, layer)
