"""EAGLE-2 dynamic trees: per-row tree buffers from parent arrays, the proposed tree's shape and
its nodes against the head fed one path at a time, greedy identity with AR, chi-square
losslessness at T = 1 through the loop."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import specjax as sj
from specjax import testing
from specjax.drafters import Context
from specjax.drafters.eagle import Eagle
from specjax.drafters.eagle2 import Eagle2
from specjax.models.heads import DraftHead, HeadConfig
from specjax.tree import Tree, buffers_from_parents


def _eagle2(model, depth=4, top_k=3, node_budget=8, draft_vocab=40, seed=1):
  cfg = HeadConfig("eagle3", model.config, draft_vocab=draft_vocab, feature_layers=(0, 1))
  d2t = np.sort(np.random.default_rng(seed).choice(model.config.vocab_size, draft_vocab, replace=False))
  head = Eagle.from_head(model, cfg, nnx.state(DraftHead(cfg, nnx.Rngs(seed))), d2t, k=depth)
  return Eagle2.from_eagle(head, top_k=top_k, node_budget=node_budget)


def test_per_row_buffers_agree_with_static_trees_from_the_same_parents():
  rng = np.random.default_rng(0)
  n, width, max_depth = 10, 10, 9
  parents = np.stack([np.concatenate([[-1], [rng.integers(0, i) for i in range(1, n)]]) for _ in range(40)])
  mask, depth, children = (np.asarray(x) for x in buffers_from_parents(jnp.asarray(parents, jnp.int32), width,
                                                                       max_depth))
  for b, par in enumerate(parents):
    t = Tree.from_parents(par)
    np.testing.assert_array_equal(mask[b], t.mask)
    np.testing.assert_array_equal(depth[b], t.depth)
    np.testing.assert_array_equal(children[b, :, :t.width], t.children)
    assert (children[b, :, t.width:] == -1).all()


def test_absent_nodes_are_nobody_s_children():
  parent = jnp.asarray([[-1, 0, -1, 1, -1]], jnp.int32)  # nodes 2 and 4 absent
  mask, depth, children = buffers_from_parents(parent, 2, 4)
  assert np.asarray(depth).tolist() == [[0, 1, 0, 2, 0]]
  assert np.asarray(children).tolist() == [[[1, -1], [3, -1], [-1, -1], [-1, -1], [-1, -1]]]
  assert not np.asarray(mask)[0, 2, :2].any() and not np.asarray(mask)[0, 4, :4].any()


def test_bad_configs_name_the_value():
  model = testing.tiny_model(seed=7)
  with pytest.raises(ValueError, match="node_budget=11 exceeds the 10 nodes eagle2 draws with depth=3 and top_k=2"):
    _eagle2(model, depth=3, top_k=2, node_budget=11)
  with pytest.raises(ValueError, match="top_k=0 must be an int >= 1"):
    _eagle2(model, top_k=0)
  with pytest.raises(ValueError, match="top_k=41 exceeds the head's draft vocabulary of 40"):
    _eagle2(model, depth=2, top_k=41, node_budget=8)


def test_make_drafter_loads_the_shipped_eagle3_head():
  from specjax.drafters import default_k
  assert default_k("eagle2") == 4
  # The shipped head is SmolLM2's: it is found, read, and refused for the tiny target.
  with pytest.raises(ValueError, match="draft head was trained for a target with"):
    sj.make_drafter("eagle2", testing.tiny_model(), k=4)


@pytest.fixture(scope="module")
def model():
  return testing.tiny_model(seed=7, scale=4.0)


def test_proposed_tree_is_valid_and_its_nodes_are_the_head_s_top_k(model):
  """Each node's token is among the top_k of the head fed its ancestors one at a time (the
  chain's causal feed), so the scratch mask hides siblings and cousins; the tree is
  depth-ordered, within depth, with every parent kept and no duplicate siblings."""
  d = _eagle2(model, depth=4, top_k=3, node_budget=8)
  rng = np.random.default_rng(5)
  lengths = [7, 11]
  prompt = np.zeros((2, 12), np.int32)
  for b, n in enumerate(lengths):
    prompt[b, :n] = rng.integers(3, 64, n)
  prompt, length = jnp.asarray(prompt), jnp.asarray(lengths, jnp.int32)
  mod = model.module()
  _, _, feats = mod(prompt, jnp.broadcast_to(jnp.arange(12), (2, 12)), model.new_cache(2, 12), feature_layers=(0, 1))
  ctx = Context(prompt, length, feats, jnp.zeros((2,), jnp.int32))
  sampling = sj.Sampling()
  dstate = d.init(d.weights, ctx, sampling, 32)
  _, (tokens, parent), q = d.propose(d.weights, dstate, ctx, jax.random.split(jax.random.key(0), 2), sampling)
  assert q is None and tokens.shape == (2, 8) and parent.shape == (2, 9)
  tokens, parent = np.asarray(tokens), np.asarray(parent)
  head = d._module(d.weights)
  d2t = set(np.asarray(d.weights["d2t"]).tolist())
  for b in range(2):
    par = parent[b]
    t = Tree.from_parents(par)  # raises unless parents come before children
    assert t.max_depth <= d.depth and (np.diff(t.depth) >= 0).all()
    assert (par[1:] >= 0).all() and (tokens[b] >= 0).all() and set(tokens[b].tolist()) <= d2t
    for node in range(t.size):
      kids = [tokens[b, c - 1] for c in t.children[node] if c > 0]
      assert len(kids) == len(set(kids)), (b, node, kids)
    row = jax.tree.map(lambda x: x[b:b + 1], dstate)
    for node in range(1, t.size):
      line = [int(a) for a in np.flatnonzero(t.mask[node])[1:-1]]  # ancestors below the root
      h, state = row.h, row
      for i, a in enumerate(line, start=1):  # the chain's feed at slot length - 2 + i
        slot = jnp.asarray([lengths[b] - 2 + i], jnp.int32)
        out, k, v = d._pass(head, d.weights, h[:, None], jnp.asarray([[tokens[b, a - 1]]], jnp.int32), slot[:, None],
                            state, slot)
        h, state = out[:, 0], state.replace(k=k, v=v)
      _, top = d._expand(head, d.weights, h[:, None])
      assert tokens[b, node - 1] in np.asarray(top).ravel().tolist(), (b, node, line)


@pytest.mark.parametrize("dynamic_on", [False, True], ids=["every_step", "dynamic"])
def test_greedy_eagle2_equals_ar(dynamic_on):
  model = testing.tiny_model(seed=3, scale=2.0, vocab_size=8)  # a small vocabulary: the head's top-3 often hits
  prompts = testing.random_prompts(3, 8, lo=3, hi=9, seed=2)
  d = _eagle2(model, depth=3, top_k=2, node_budget=5, draft_vocab=6)
  ar = sj.generate(model, prompts, max_new_tokens=30, stop_ids=())
  cost = sj.CostModel((1.0,) + (1.05,) * 9, draft=0.0)  # trees nearly free: the policy drafts
  sp = sj.generate(model, prompts, drafter=d, max_new_tokens=30, stop_ids=(), dynamic=cost if dynamic_on else False)
  assert sp.tokens == ar.tokens
  assert sp.stats["steps_by_drafts"].get(3, 0) > 0  # the tree was verified
  assert sp.stats["steps"] < ar.stats["steps"]  # and it accepted something


N_ROWS = 20000  # as tests/test_tree_decode.py: >= 20,000 samples per law
N_TOKENS = 3


def test_eagle2_is_lossless_at_temperature_one():
  model = testing.tiny_model(seed=3, scale=2.0, vocab_size=8)
  prompt = [5, 3, 6, 4, 5, 3]
  d = _eagle2(model, depth=2, top_k=2, node_budget=4, draft_vocab=6)
  sampling = sj.Sampling(temperature=1.0)
  # In batches of 2,000 (one compile): a row's randomness is its seed and step alone, and the
  # head's prefill pass grows faster than linearly at a 32768-row bucket (minutes here).
  samples, steps, emitted = [], 0, 0
  for lo in range(0, N_ROWS, 2000):
    out = sj.generate(model, [prompt] * 2000, drafter=d, sampling=sampling, max_new_tokens=N_TOKENS + 1,
                      seed=list(range(lo, lo + 2000)), stop_ids=(), dynamic=False)
    samples += [t[:N_TOKENS] for t in out.tokens]
    steps, emitted = steps + out.stats["steps"], emitted + out.stats["new_tokens"]
  assert emitted / steps > 1.05  # the trees were accepted into
  samples = np.asarray(samples)
  law = testing.exact_law(model, prompt, sampling, N_TOKENS)
  pvalues = {n: testing.gof_pvalue(samples[:, :n], law.sum(axis=tuple(range(n, N_TOKENS)))) for n in (1, 2, 3)}
  print(f"\neagle2 tree, T=1: chi-square p-values {pvalues}")
  assert min(pvalues.values()) >= 1e-3, pvalues
