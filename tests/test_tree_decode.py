"""Trees through the decode loop: the multi-candidate n-gram's branches, greedy tree decoding
identical to AR, and chi-square losslessness of tree decoding at T = 1 (with a negative
control that must fail)."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import specjax as sj
from specjax import dynamic, testing
from specjax.drafters import Drafter
from specjax.drafters.ngram import NGram, propose_ngram, propose_ngram_branches
from specjax.tree import Tree

V = 64


def test_branch_zero_is_the_chain_proposal_and_branches_start_differently():
  rng = np.random.default_rng(0)
  for trial in range(200):
    S = 48
    hist = rng.integers(3, 7, S).astype(np.int32)  # a small alphabet: many matches
    length = int(rng.integers(1, S))
    k, m = int(rng.integers(1, 5)), int(rng.integers(2, 4))
    got = np.asarray(propose_ngram_branches(jnp.asarray(hist), jnp.int32(length), k, m, 3, 1, 2))
    np.testing.assert_array_equal(got[0], propose_ngram(jnp.asarray(hist), jnp.int32(length), k, 3, 1, 2))
    firsts = [int(b[0]) for b in got if b[0] >= 0]
    assert len(firsts) == len(set(firsts)), got
    for b in got:  # each branch is an earlier continuation of a suffix match, -1 after its end
      n = int(np.sum(b >= 0))
      assert (b[n:] == -1).all()
      if n:
        starts = [i for i in range(1, length - n + 1) if (hist[i:i + n] == b[:n]).all() and hist[i - 1] == hist[length - 1]]
        assert starts, (hist[:length], b)


def test_a_branch_tree_is_branches_chains_from_the_root():
  d = NGram(k=3, branches=2)
  assert d.tree.num_nodes == 6 and d.tree.max_depth == 3 and d.nodes == 6
  assert NGram(k=3).tree is None and NGram(k=3).nodes == 3
  with pytest.raises(ValueError, match="branches=0 must be an int >= 1"):
    NGram(k=3, branches=0)


@pytest.fixture(scope="module")
def model():
  return testing.tiny_model(seed=7, scale=4.0)


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(4)
  base = rng.integers(3, V, 6).tolist()
  return [base * 3 + rng.integers(3, V, 3).tolist(), base * 2, rng.integers(3, V, 9).tolist()]


@pytest.mark.parametrize("dynamic_on", [False, True], ids=["every_step", "dynamic"])
def test_greedy_tree_ngram_equals_ar(model, prompts, dynamic_on):
  drafter = sj.make_drafter("ngram", model, k=3, min_n=1, max_n=3, branches=3)
  ar = sj.generate(model, prompts, max_new_tokens=40, stop_ids=())
  cost = sj.CostModel((1.0,) + (1.05,) * 9, draft=0.0)  # trees are nearly free: the policy drafts
  sp = sj.generate(model, prompts, drafter=drafter, max_new_tokens=40, stop_ids=(),
                   dynamic=cost if dynamic_on else False)
  assert sp.tokens == ar.tokens
  assert sp.stats["steps_by_drafts"].get(3, 0) > 0  # the tree was verified
  assert sp.stats["steps"] < ar.stats["steps"]  # and it accepted something


def test_tree_cache_room_is_checked_before_compiling(model, prompts):
  drafter = sj.make_drafter("ngram", model, k=4, branches=3)
  with pytest.raises(ValueError, match=r"\+ 12 drafted tree nodes needs"):
    sj.generate(model, prompts, drafter=drafter, max_new_tokens=20, cache_len=40)


# ----------------------------------------------------------------------------------------------
# Losslessness at T = 1 through the loop

N_ROWS = 20480  # >= 20,000 samples per law, drawn in batches of 4096 rows (a batch bucket
BATCH = 4096  # exactly: one call of 20,000 rows would compute a 32,768-row bucket)
N_TOKENS = 3


@functools.cache
def _fixed_tree() -> Tree:
  return Tree.from_paths([(0,), (1,), (2,), (0, 0), (1, 0), (2, 0)])


@dataclasses.dataclass(frozen=True)
class FixedTree(Drafter):
  """Proposes the same tree every step: root children 1, 2, 3, each with one child (4, 5, 6)."""

  name = "fixed-tree"

  @property
  def tree(self):
    return _fixed_tree()

  def propose(self, weights, dstate, ctx, keys, sampling):
    return dstate, jnp.broadcast_to(jnp.arange(1, 7, dtype=jnp.int32), (ctx.length.shape[0], 6)), None


@dataclasses.dataclass(frozen=True)
class TreeAsChain(FixedTree):
  """Wrong on purpose: the target sees the tree as a chain (each node sees every earlier node,
  at position length + node index), the classic tree-verification bug."""

  @property
  def tree(self):
    t = _fixed_tree()
    return dataclasses.replace(t, mask=np.tril(np.ones((t.size, t.size), bool)), depth=np.arange(t.size))


@pytest.fixture(scope="module")
def small_vocab():
  model = testing.tiny_model(seed=3, scale=2.0, vocab_size=8)
  return model, [5, 3, 6, 4, 5, 3]


def _samples(small_vocab, drafter):
  model, prompt = small_vocab
  sampling = sj.Sampling(temperature=1.0)
  policy = dynamic.Policy(sj.CostModel((1.0,) + (1.1,) * 9, draft=0.0), sizes=(0, drafter.k),
                          verify_tokens=(1, drafter.nodes + 1))
  samples, rows = [], []
  for start in range(0, N_ROWS, BATCH):  # rows are independent: each depends on its seed only
    out = sj.generate(model, [prompt] * BATCH, drafter=drafter, sampling=sampling, max_new_tokens=N_TOKENS + 1,
                      seed=list(range(start, start + BATCH)), stop_ids=(), dynamic=policy)
    samples += [t[:N_TOKENS] for t in out.tokens]
    rows += out.stats["rows"]
  stats = {**out.stats, "rows": rows, "mean_accepted": sum(r["new_tokens"] for r in rows) / sum(r["steps"] for r in rows)}
  return np.asarray(samples), testing.exact_law(model, prompt, sampling, N_TOKENS), stats


@pytest.mark.parametrize("drafter", [NGram(k=2, min_n=1, max_n=2, branches=3), FixedTree(k=2)],
                         ids=["ngram_branches", "fixed_tree"])
def test_tree_decoding_is_lossless_at_temperature_one(small_vocab, drafter):
  samples, law, st = _samples(small_vocab, drafter)
  assert sum(r["steps_by_drafts"].get(2, 0) for r in st["rows"]) > N_ROWS  # rows' tree steps
  assert st["mean_accepted"] > 1.05
  pvalues = {n: testing.gof_pvalue(samples[:, :n], law.sum(axis=tuple(range(n, N_TOKENS)))) for n in (1, 2, 3)}
  print(f"\n{drafter.name} tree, T=1: chi-square p-values {pvalues}")
  assert min(pvalues.values()) >= 1e-3, pvalues


def test_a_tree_verified_as_a_chain_is_caught(small_vocab):
  samples, law, _ = _samples(small_vocab, TreeAsChain(k=2))
  pvalues = {n: testing.gof_pvalue(samples[:, :n], law.sum(axis=tuple(range(n, N_TOKENS)))) for n in (1, 2, 3)}
  print(f"\ntree verified as a chain, T=1: chi-square p-values {pvalues}")
  assert min(pvalues.values()) < 1e-3, pvalues
