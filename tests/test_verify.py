"""accept_chain: losslessness measured statistically, greedy exactness, and scenario tests.

Losslessness. The synthetic target is a Markov chain over a tiny vocabulary: fixed logit
tables T [V+1, V], row V for the empty prefix (BOS) and row x for "previous token x", so
p(next | prefix) = warp(T[last token]) is known exactly and the law of the first n emitted
tokens is a product of table rows. The drafter is another table S. `simulate` runs whole
speculative steps (draft k from S, verify with the accept rule, append accepted + correction)
vmapped over tens of thousands of PRNG keys until n tokens are emitted, and a chi-square test
compares the empirical joint law of those n tokens with the exact one. The keys are fixed, so
the test is deterministic; the same harness must reject two deliberately wrong accept rules.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from specjax import testing
from specjax.sampling import Sampling, sample, warp
from specjax.verify import accept_chain

V = 8
BOS = V
N_SEEDS = 40_000
P_OK = 1e-3  # a correct rule must pass at this level ...
P_WRONG = 1e-6  # ... and a wrong one must fail at this one


# ----------------------------------------------------------------------------------------------
# Two wrong rules with accept_chain's signature: the harness must catch both.


def accept_everything(logits, drafts, q, sampling, keys):
  """Wrong: keeps every draft and samples a bonus token (emits the drafter's law)."""
  B, k = drafts.shape
  bonus = jax.vmap(sample)(keys, warp(logits[:, k], sampling))
  return jnp.full((B,), k, jnp.int32), jnp.concatenate([drafts, bonus[:, None]], axis=1).astype(jnp.int32)


def accept_with_p_residual(logits, drafts, q, sampling, keys):
  """Wrong: the right acceptance test, but after a rejection it samples p instead of norm(max(0, p - q))."""
  B, k = drafts.shape
  p = warp(logits, sampling)
  rows = jnp.arange(B)[:, None]
  px = p[rows, jnp.arange(k)[None], drafts]
  qx = q[rows, jnp.arange(k)[None], drafts]
  ku = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, 1), (k,)))(keys)
  n_acc = jnp.sum(jnp.cumprod(ku * qx < px, axis=1), axis=1).astype(jnp.int32)
  last = jax.vmap(sample)(keys, p[jnp.arange(B), n_acc])
  pos = jnp.arange(k + 1)[None]
  padded = jnp.concatenate([drafts, jnp.zeros((B, 1), drafts.dtype)], axis=1)
  tokens = jnp.where(pos < n_acc[:, None], padded, jnp.where(pos == n_acc[:, None], last[:, None], -1))
  return n_acc, tokens.astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# The harness


def tables(seed, scale=1.5):
  """Random target and drafter logit tables [V+1, V] (row BOS = first position)."""
  target, drafter = np.random.default_rng(seed).normal(size=(2, V + 1, V)) * scale
  return target.astype(np.float32), drafter.astype(np.float32)


@functools.partial(jax.jit, static_argnames=("accept", "sampling", "k", "n_tokens", "deterministic", "stop"))
def _simulate(target, drafter, keys, *, accept, sampling, k, n_tokens, deterministic, stop=None, threshold=0.0):
  def draft(carry, key):
    prev, alive = carry
    if deterministic:  # an n-gram-like drafter: q is one-hot, passed to the rule as None
      x = jnp.argmax(drafter[prev]).astype(jnp.int32)
      return (x, alive), (x, ())
    q = warp(drafter[prev], sampling)
    x = sample(key, q)
    if stop is not None:  # stop drafting (-1 from here on) once the confidence is below threshold
      alive = alive & ((jnp.max(q) if stop == "top" else q[x]) >= threshold)
    return (x, alive), (jnp.where(alive, x, -1), q)

  def step(carry, key):
    out, n, prev = carry
    key_draft, key_accept = jax.random.split(key)
    _, (drafts, q) = jax.lax.scan(draft, (prev, jnp.bool_(True)), jax.random.split(key_draft, k))
    logits = target[jnp.concatenate([prev[None], jnp.maximum(drafts, 0)])]  # p at the last token and each draft
    n_acc, toks = accept(logits[None], drafts[None], None if deterministic else q[None], sampling,
                         key_accept[None])
    n_acc, toks = n_acc[0], toks[0]
    out = jax.lax.dynamic_update_slice(out, toks, (n,))
    return (out, n + n_acc + 1, toks[n_acc]), None

  def one(key):
    # Each step emits >= 1 token, so n_tokens steps always suffice.
    init = (jnp.full((n_tokens * (k + 1),), -1, jnp.int32), jnp.int32(0), jnp.int32(BOS))
    (out, _, _), _ = jax.lax.scan(step, init, jax.random.split(key, n_tokens))
    return out[:n_tokens]

  return jax.vmap(one)(keys)


def simulate(target, drafter, sampling, *, k, n_tokens=2, deterministic=False, accept=accept_chain,
             n_seeds=N_SEEDS, seed=0, stop=None, threshold=0.0):
  """First n_tokens emitted tokens for n_seeds independent runs: [n_seeds, n_tokens].

  stop: "top" stops drafting at the first position whose q has top probability < threshold
  (the EAGLE drafters' min_confidence); "drawn" at the first drawn token with q(x) < threshold
  (wrong: the decision then depends on the draft itself)."""
  keys = jax.random.split(jax.random.key(seed), n_seeds)
  return np.asarray(_simulate(jnp.asarray(target), jnp.asarray(drafter), keys, accept=accept,
                              sampling=sampling, k=k, n_tokens=n_tokens, deterministic=deterministic,
                              stop=stop, threshold=threshold))


def exact_law(target, sampling, n_tokens):
  """P(x_1..x_n) [V]*n for the Markov target under the warped policy, in float64."""
  p = np.asarray(warp(jnp.asarray(target), sampling), np.float64)
  p /= p.sum(-1, keepdims=True)
  law = p[BOS]
  for _ in range(n_tokens - 1):
    law = law[..., None] * p[:V].reshape((1,) * (law.ndim - 1) + (V, V))
  return law


gof_pvalue = testing.gof_pvalue  # the shared goodness-of-fit test


def disjoint_tables(seed):
  """Target supported on ids [0, V/2), drafter on [V/2, V): every draft is rejected."""
  target, drafter = tables(seed)
  target[:, V // 2:] = -np.inf
  drafter[:, :V // 2] = -np.inf
  return target, drafter


T1 = Sampling(1.0)
K = 3  # drafts per step
N_TOKENS = 3  # emitted tokens whose joint law is checked (and its 2- and 1-token marginals)
# name -> ((target, drafter) tables, sampling, deterministic drafter?)
LOSSLESS_CASES = {
    "random_q": (tables(1), T1, False),
    "q_equals_p": ((tables(3)[0], tables(3)[0]), T1, False),
    "disjoint_support": (disjoint_tables(4), T1, False),
    "one_hot_q": (tables(5), T1, True),
    "temp0.7_topk5": (tables(6), Sampling(0.7, top_k=5), False),
    "top_p0.8": (tables(7), Sampling(1.0, top_p=0.8), False),
    "one_hot_q_temp1.3_topk4_topp0.9": (tables(8), Sampling(1.3, top_k=4, top_p=0.9), True),
}


def _marginal(law, n):
  return law.sum(axis=tuple(range(n, law.ndim)))


@pytest.mark.parametrize("name", list(LOSSLESS_CASES))
def test_emitted_tokens_follow_the_warped_target_law(name, record_property):
  (target, drafter), sampling, deterministic = LOSSLESS_CASES[name]
  samples = simulate(target, drafter, sampling, k=K, n_tokens=N_TOKENS, deterministic=deterministic)
  law = exact_law(target, sampling, N_TOKENS)
  pvalues = {n: gof_pvalue(samples[:, :n], _marginal(law, n)) for n in (2, 1, 3)}
  record_property("chi2_pvalues", pvalues)
  print(f"\n{name}: chi-square p-values by number of tokens {pvalues}")
  for n, pvalue in pvalues.items():
    assert pvalue >= P_OK, f"{name}: first {n} emitted tokens do not follow the target law (p={pvalue:.3g})"


@pytest.mark.parametrize("accept", [accept_everything, accept_with_p_residual], ids=lambda f: f.__name__)
def test_harness_rejects_wrong_rules(accept, record_property):
  (target, drafter), sampling, _ = LOSSLESS_CASES["random_q"]
  samples = simulate(target, drafter, sampling, k=K, n_tokens=2, accept=accept)
  law = exact_law(target, sampling, 2)
  pvalues = {n: gof_pvalue(samples[:, :n], _marginal(law, n)) for n in (2, 1)}
  record_property("chi2_pvalues", pvalues)
  print(f"\n{accept.__name__}: chi-square p-values by number of tokens {pvalues}")
  assert pvalues[2] < P_WRONG, f"the harness failed to detect {accept.__name__} (p={pvalues[2]:.3g})"


def _median_top(drafter, sampling):
  return float(np.median(np.max(np.asarray(warp(jnp.asarray(drafter), sampling)), axis=-1)))


@pytest.mark.parametrize("stop,lossless", [("top", True), ("drawn", False)])
def test_drafts_stopped_by_confidence(stop, lossless, record_property):
  """Stopping a chain where q's top probability is low (about half the positions) keeps the
  law; stopping on the drawn token's own q(x) does not, and the harness must see it."""
  (target, drafter), sampling, _ = LOSSLESS_CASES["random_q"]
  c = _median_top(drafter, sampling)
  samples = simulate(target, drafter, sampling, k=K, n_tokens=N_TOKENS, stop=stop, threshold=c)
  law = exact_law(target, sampling, N_TOKENS)
  pvalues = {n: gof_pvalue(samples[:, :n], _marginal(law, n)) for n in (1, 2, 3)}
  record_property("chi2_pvalues", pvalues)
  print(f"\nstop={stop} at {c:.3f}: chi-square p-values by number of tokens {pvalues}")
  if lossless:
    assert min(pvalues.values()) >= P_OK, pvalues
  else:
    assert min(pvalues.values()) < P_WRONG, f"the harness missed stopping on q(x) (p-values {pvalues})"


@pytest.mark.parametrize("deterministic", [False, True])
def test_greedy_emits_exactly_the_argmax_path(deterministic):
  target, drafter = tables(9)
  agree = np.random.default_rng(0).random((V + 1, 1)) < 0.5  # the drafter agrees on some rows
  drafter = np.where(agree, target, drafter)
  samples = simulate(target, drafter, Sampling(0.0), k=K, n_tokens=5, deterministic=deterministic, n_seeds=256)
  path, prev = [], BOS
  for _ in range(5):
    prev = int(np.argmax(target[prev]))
    path.append(prev)
  np.testing.assert_array_equal(samples, np.broadcast_to(path, samples.shape))


# ----------------------------------------------------------------------------------------------
# Scenarios (after tpu-inference's rejection-sampler tests): deterministic by construction,
# logits are -inf outside a chosen support so acceptance is certain or impossible.

NEG = -np.inf


@functools.partial(jax.jit, static_argnames=("sampling",))
def run(logits, drafts, q, keys, sampling=T1):
  return accept_chain(logits, drafts, q, sampling, keys)


def keys_for(batch, seed=0):
  return jax.random.split(jax.random.key(seed), batch)


def peaked(ids, vocab=V):
  """Logits [..., V]: 0 at ids (int or list per position), -inf elsewhere."""
  ids = np.asarray(ids)
  out = np.full(ids.shape + (vocab,), NEG, np.float32)
  np.put_along_axis(out, ids[..., None], 0.0, axis=-1)
  return out


def log(p):
  """float32 logits from probabilities, -inf where p == 0 (without numpy's warning)."""
  p = np.asarray(p, np.float64)
  return np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), -np.inf).astype(np.float32)


def uniform_q(batch, k, vocab=V):
  return np.full((batch, k, vocab), 1.0 / vocab, np.float32)


def check_shape_contract(n_acc, tokens, drafts, vocab=V):
  """The output contract every scenario shares."""
  n_acc, tokens, drafts = np.asarray(n_acc), np.asarray(tokens), np.asarray(drafts)
  B, k = drafts.shape
  assert n_acc.dtype == np.int32 and tokens.dtype == np.int32 and tokens.shape == (B, k + 1)
  for b in range(B):
    n = n_acc[b]
    assert 0 <= n <= k
    np.testing.assert_array_equal(tokens[b, :n], drafts[b, :n])
    assert 0 <= tokens[b, n] < vocab
    assert (tokens[b, n + 1:] == -1).all()


POLICIES = [pytest.param((T1, True), id="q"), pytest.param((T1, False), id="q_none"),
            pytest.param((Sampling(0.0), True), id="greedy")]


@pytest.mark.parametrize("policy", POLICIES)
def test_scenario_all_accepted(policy):
  sampling, with_q = policy
  drafts = np.asarray([[1, 2, 3], [7, 7, 0], [4, 0, 6], [5, 5, 5]], np.int32)
  bonus = np.asarray([6, 1, 2, 3])
  logits = peaked(np.concatenate([drafts, bonus[:, None]], axis=1))
  q = uniform_q(4, 3) if with_q else None
  n_acc, tokens = run(logits, drafts, q, keys_for(4), sampling)
  np.testing.assert_array_equal(n_acc, [3, 3, 3, 3])
  np.testing.assert_array_equal(tokens, np.concatenate([drafts, bonus[:, None]], axis=1))


@pytest.mark.parametrize("policy", POLICIES)
def test_scenario_none_accepted(policy):
  sampling, with_q = policy
  drafts = np.asarray([[1, 2, 3], [7, 7, 0], [4, 0, 6], [5, 5, 5]], np.int32)
  first = np.asarray([0, 3, 5, 2])  # p at position 0 is one-hot elsewhere than the draft
  logits = peaked(np.concatenate([first[:, None], drafts], axis=1))
  q = uniform_q(4, 3) if with_q else None
  n_acc, tokens = run(logits, drafts, q, keys_for(4), sampling)
  np.testing.assert_array_equal(n_acc, [0, 0, 0, 0])
  np.testing.assert_array_equal(tokens, np.concatenate([first[:, None], np.full((4, 3), -1)], axis=1))


@pytest.mark.parametrize("policy", POLICIES)
def test_scenario_mixed_batch(policy):
  sampling, with_q = policy
  drafts = np.asarray([[1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3]], np.int32)
  # Row r accepts exactly n_acc[r] drafts: p at that position is one-hot at `fix`, not the draft.
  expected_n = np.asarray([3, 1, 2, 0])
  fix = np.asarray([6, 4, 0, 7])
  ids = np.tile([1, 2, 3, 5], (4, 1))
  ids[np.arange(4), expected_n] = fix
  logits = peaked(ids)
  q = uniform_q(4, 3) if with_q else None
  n_acc, tokens = run(logits, drafts, q, keys_for(4), sampling)
  np.testing.assert_array_equal(n_acc, expected_n)
  np.testing.assert_array_equal(tokens, [[1, 2, 3, 6], [1, 4, -1, -1], [1, 2, 0, -1], [7, -1, -1, -1]])


@pytest.mark.parametrize("policy", POLICIES)
def test_scenario_padding_and_out_of_range_drafts_are_rejected_never_indexed(policy):
  sampling, with_q = policy
  # Each bad id would be accepted if used as an index: -1 and -3 wrap to V-1 and V-3 in numpy
  # style, V and V+5 clamp to V-1, and the padding id -1 maps to 0 in a `where(valid, d, 0)`.
  drafts = np.asarray([[-1, 2, 3], [V, 2, 3], [V + 5, 2, 3], [-3, 2, 3], [4, -1, -1], [4, -1, 2]], np.int32)
  p_first = np.asarray([V - 1, V - 1, V - 1, V - 3, 4, 4])
  p_second = np.asarray([2, 2, 2, 2, 0, V - 1])
  ids = np.stack([p_first, p_second, np.full(6, 3), np.full(6, 5)], axis=1)
  logits = peaked(ids)
  q = uniform_q(6, 3) if with_q else None
  n_acc, tokens = run(logits, drafts, q, keys_for(6), sampling)
  np.testing.assert_array_equal(n_acc, [0, 0, 0, 0, 1, 1])
  np.testing.assert_array_equal(tokens[:, :2], [[V - 1, -1], [V - 1, -1], [V - 1, -1], [V - 3, -1], [4, 0],
                                                [4, V - 1]])
  assert (np.asarray(tokens)[:, 2:] == -1).all()


def test_scenario_k1_and_k0():
  drafts = np.asarray([[3], [3]], np.int32)
  logits = peaked([[3, 5], [2, 5]])
  for q in (uniform_q(2, 1), None):
    n_acc, tokens = run(logits, drafts, q, keys_for(2))
    np.testing.assert_array_equal(n_acc, [1, 0])
    np.testing.assert_array_equal(tokens, [[3, 5], [2, -1]])
  n_acc, tokens = run(peaked([[6], [1]]), np.zeros((2, 0), np.int32), None, keys_for(2))  # k = 0: plain AR
  np.testing.assert_array_equal(n_acc, [0, 0])
  np.testing.assert_array_equal(tokens, [[6], [1]])


def test_scenario_q_zero_at_the_drafted_token():
  # q(x) = 0 but p(x) > 0: min(1, p/q) = 1, always accepted; p(x) = q(x) = 0: always rejected.
  B = 512
  p_logits = log([0.5, 0.3, 0.2, 0, 0, 0, 0, 0])
  logits = np.broadcast_to(p_logits, (B, 2, V))
  q = np.zeros((B, 1, V), np.float32)
  q[..., 4] = 1.0  # the drafter never proposes 1 or 3
  for draft, expected in ((1, 1), (3, 0)):
    drafts = np.full((B, 1), draft, np.int32)
    n_acc, tokens = run(logits, drafts, q, keys_for(B))
    assert (np.asarray(n_acc) == expected).all()
    check_shape_contract(n_acc, tokens, drafts)


def test_scenario_single_finite_logit_rows_under_every_policy():
  drafts = np.asarray([[2, 5, 1], [2, 6, 1]], np.int32)
  logits = peaked([[2, 5, 1, 4], [2, 5, 1, 4]])  # row 1 rejects at position 1, correction 5
  for sampling in (Sampling(0.8, top_k=2, top_p=0.3), Sampling(0.0)):  # warp itself: test_sampling
    for q in (uniform_q(2, 3), None):
      n_acc, tokens = run(logits, drafts, q, keys_for(2), sampling)
      np.testing.assert_array_equal(n_acc, [3, 1])
      np.testing.assert_array_equal(tokens, [[2, 5, 1, 4], [2, 5, -1, -1]])


# ----------------------------------------------------------------------------------------------
# One-step statistics on a fixed p and q (k = 1): acceptance rate and the correction's law.

B_STAT = 20_000


def test_acceptance_rate_and_residual_law():
  p = np.asarray([0.3, 0.25, 0.2, 0.1, 0.1, 0.05, 0.0, 0.0])
  q = np.asarray([0.6, 0.05, 0.05, 0.1, 0.0, 0.1, 0.1, 0.0])
  logits = np.broadcast_to(log(p), (B_STAT, 2, V))
  drafts = np.zeros((B_STAT, 1), np.int32)  # token 0: accept with probability p/q = 0.5
  n_acc, tokens = run(logits, drafts, np.broadcast_to(q.astype(np.float32), (B_STAT, 1, V)), keys_for(B_STAT, seed=1))
  n_acc, tokens = np.asarray(n_acc), np.asarray(tokens)
  assert stats.binomtest(int(n_acc.sum()), B_STAT, 0.5).pvalue >= P_OK
  residual = np.maximum(p - q, 0) / np.maximum(p - q, 0).sum()
  rejected = tokens[n_acc == 0, 0]
  assert gof_pvalue(rejected[:, None], residual) >= P_OK
  assert gof_pvalue(tokens[n_acc == 1, 1][:, None], p) >= P_OK  # the bonus token


def test_zero_residual_falls_back_to_p():
  # q == p and the draft has p(x) = q(x) = 0: the draft is rejected and max(0, p - q) is all
  # zero, so the correction must come from p itself.
  p = np.asarray([0.4, 0.3, 0.2, 0.1, 0.0, 0.0, 0.0, 0.0])
  logits = np.broadcast_to(log(p), (B_STAT, 2, V))
  q = np.asarray(warp(jnp.asarray(logits[:, :1]), T1))
  drafts = np.full((B_STAT, 1), 6, np.int32)
  n_acc, tokens = run(logits, drafts, q, keys_for(B_STAT, seed=2))
  assert (np.asarray(n_acc) == 0).all()
  assert gof_pvalue(np.asarray(tokens)[:, :1], p) >= P_OK


@pytest.mark.parametrize("bad", [-1, V, V + 3])
def test_placeholder_draft_with_a_real_q_row_corrects_from_p(bad):
  # A placeholder is not a draw from q, so its forced rejection must not subtract q: the
  # correction follows p. (q is one-hot at 0 here; p - q would always give token 1.)
  p = np.asarray([0.5, 0.5, 0, 0, 0, 0, 0, 0])
  logits = np.broadcast_to(log(p), (B_STAT, 2, V))
  q = np.zeros((B_STAT, 1, V), np.float32)
  q[..., 0] = 1.0
  n_acc, tokens = run(logits, np.full((B_STAT, 1), bad, np.int32), q, keys_for(B_STAT, seed=3))
  assert (np.asarray(n_acc) == 0).all()
  assert gof_pvalue(np.asarray(tokens)[:, :1], p) >= P_OK


def test_deterministic_draft_rejection_removes_the_draft():
  # q = None: accept x with probability p(x); on rejection sample p with x removed.
  p = np.asarray([0.5, 0.2, 0.2, 0.1, 0, 0, 0, 0])
  logits = np.broadcast_to(log(p), (B_STAT, 2, V))
  n_acc, tokens = run(logits, np.zeros((B_STAT, 1), np.int32), None, keys_for(B_STAT, seed=4))
  n_acc, tokens = np.asarray(n_acc), np.asarray(tokens)
  assert stats.binomtest(int(n_acc.sum()), B_STAT, 0.5).pvalue >= P_OK
  without = p * (np.arange(V) != 0)
  assert gof_pvalue(tokens[n_acc == 0, :1], without / without.sum()) >= P_OK
  # Overall, the first emitted token follows p.
  assert gof_pvalue(tokens[:, :1], p) >= P_OK


@pytest.mark.parametrize("policy", POLICIES)
def test_a_shorter_verify_decides_exactly_as_the_padded_one(policy):
  """The engine verifies at the smallest compiled size n covering the proposals (`verify_sizes`):
  with seeded keys, judging n drafts must give the same n_acc and tokens as judging the same
  drafts padded with -1 to k (random logits and q, so acceptances and rejections both occur).
  One uniform of shape (k,) per row passed this only under jax_threefry_partitionable=True
  (the default); with it off, a (k,) draw is not a prefix-extension of an (n,) one."""
  sampling, with_q = policy
  rng = np.random.default_rng(3)
  B, k = 64, 5
  logits = rng.normal(0, 1.5, (B, k + 1, V)).astype(np.float32)
  q = np.asarray(warp(jnp.asarray(rng.normal(0, 1.5, (B, k, V)).astype(np.float32)), T1)) if with_q else None
  drafts = rng.integers(0, V, (B, k)).astype(np.int32)
  keys = keys_for(B, seed=7)
  for n in (0, 1, 3):
    padded = np.where(np.arange(k)[None] < n, drafts, -1).astype(np.int32)
    n_full, t_full = run(logits, padded, q, keys, sampling)
    n_short, t_short = run(logits[:, :n + 1], drafts[:, :n], None if q is None else q[:, :n], keys, sampling)
    np.testing.assert_array_equal(n_short, n_full)
    np.testing.assert_array_equal(t_short, np.asarray(t_full)[:, :n + 1])
    assert (np.asarray(t_full)[:, n + 1:] == -1).all()
    if n:
      assert 0 < np.mean(np.asarray(n_full) > 0) < 1  # both outcomes happen
