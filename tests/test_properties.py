"""Hypothesis properties of accept_chain's output contract, on batches of random rows.

Hypothesis draws the structure of a case (seed, shape, policy, how q and the drafts are made,
how many -inf logits, ties and placeholder ids); numpy builds a batch of ROWS rows from it, one
jitted accept_chain call evaluates them all, and vectorised checks assert the contract on every
row. Shapes and policies come from small fixed sets so each compiles once. `property_cases`
(tests/conftest.py) counts examples and rows for the terminal summary.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specjax.sampling import Sampling, warp
from specjax.verify import accept_chain

ROWS = 64
SHAPES = [(4, 16), (1, 3)]  # (k, V)
POLICIES = [Sampling(1.0), Sampling(0.7, top_k=3, top_p=0.8), Sampling(0.0)]
BAD_IDS = np.asarray([-1, -2, -(2**31), 16, 17, 2**31 - 1], np.int64)  # never valid for V <= 16

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.partial(jax.jit, static_argnames=("sampling",))
def evaluate(logits, drafts, q, keys, sampling):
  n_acc, tokens = accept_chain(logits, drafts, q, sampling, keys)
  return n_acc, tokens, warp(logits, sampling)


_warp = jax.jit(warp, static_argnames=("sampling",))


def _sample_rows(rng, probs):
  """One id per row of probs [..., V] by inverse CDF; always an id with probability > 0."""
  cum = np.cumsum(probs, axis=-1)
  u = rng.random(probs.shape[:-1] + (1,)) * cum[..., -1:]
  return np.minimum((cum < u).sum(-1), probs.shape[-1] - 1)


def _random_logits(rng, shape, scale, inf_frac, ties):
  logits = rng.normal(size=shape) * scale
  if ties:
    logits = np.round(logits)
  logits[rng.random(shape) < inf_frac] = -np.inf
  keep = rng.integers(0, shape[-1], shape[:-1])  # at least one finite logit per row
  np.put_along_axis(logits, keep[..., None], rng.normal(size=shape[:-1] + (1,)), axis=-1)
  return logits.astype(np.float32)


@st.composite
def cases(draw, q_modes=("random", "p", "none", "mixed"), draft_modes=("from_q", "argmax", "uniform", "outside"),
          policies=POLICIES, bad_frac=st.sampled_from([0.0, 0.0, 0.1, 0.5])):
  return dict(
      seed=draw(st.integers(0, 2**32 - 1)),
      shape=draw(st.sampled_from(SHAPES)),
      sampling=draw(st.sampled_from(policies)),
      q_mode=draw(st.sampled_from(q_modes)),
      draft_mode=draw(st.sampled_from(draft_modes)),
      scale=draw(st.sampled_from([0.1, 1.0, 4.0, 30.0])),
      inf_frac=draw(st.sampled_from([0.0, 0.3, 0.9])),
      ties=draw(st.booleans()),
      bad_frac=draw(bad_frac),
  )


def build(case):
  """numpy inputs for one batch: logits [B, k+1, V], drafts [B, k], q [B, k, V] or None, keys, p."""
  rng = np.random.default_rng(case["seed"])
  (k, V), sampling = case["shape"], case["sampling"]
  logits = _random_logits(rng, (ROWS, k + 1, V), case["scale"], case["inf_frac"], case["ties"])
  p = np.asarray(_warp(logits, sampling))
  q_mode = case["q_mode"]
  q = None
  if q_mode != "none":
    q = np.array(_warp(_random_logits(rng, (ROWS, k, V), case["scale"], case["inf_frac"], case["ties"]), sampling))
    if q_mode == "p":
      q = p[:, :k].copy()
    elif q_mode == "mixed":  # per row: q == p, random q, or q with a hole at a likely draft
      pick = rng.integers(0, 3, ROWS)
      q[pick == 0] = p[pick == 0, :k]
      hole = np.argmax(p[:, :k], axis=-1)
      rows = np.flatnonzero(pick == 2)
      q[rows[:, None], np.arange(k)[None], hole[rows]] = 0.0
  mode = case["draft_mode"]
  if mode == "from_q":
    drafts = _sample_rows(rng, p[:, :k] if q is None else q)
  elif mode == "argmax":
    drafts = np.argmax(logits[:, :k], axis=-1)
  elif mode == "uniform":
    drafts = rng.integers(0, V, (ROWS, k))
  else:  # prefer ids the target cannot emit (p = 0): rejection, and with q == p a zero residual
    drafts = _sample_rows(rng, (p[:, :k] == 0) + 1e-9)
  bad = rng.random((ROWS, k)) < case["bad_frac"]
  drafts = np.where(bad, rng.choice(BAD_IDS, (ROWS, k)), drafts).astype(np.int32)
  keys = jax.random.split(jax.random.key(case["seed"] % 2**31), ROWS)
  return logits, drafts, q, keys


def check_contract(case, logits, drafts, q, n_acc, tokens, p):
  """Every property of one evaluated batch, vectorised over rows."""
  n_acc, tokens, p = np.asarray(n_acc), np.asarray(tokens), np.asarray(p)
  B, k = drafts.shape
  V = logits.shape[-1]
  rows, pos = np.arange(B), np.arange(k + 1)
  assert n_acc.dtype == np.int32 and tokens.dtype == np.int32
  assert n_acc.shape == (B,) and tokens.shape == (B, k + 1)
  assert not np.isnan(p).any() and np.isfinite(p).all()
  # n_acc in [0, k]; accepted prefix = drafts; then one valid id; then -1.
  assert ((n_acc >= 0) & (n_acc <= k)).all()
  accepted = pos[None, :k] < n_acc[:, None]
  np.testing.assert_array_equal(tokens[:, :k][accepted], drafts[accepted])
  last = tokens[rows, n_acc]
  assert ((last >= 0) & (last < V)).all(), last
  assert (tokens[pos[None] > n_acc[:, None]] == -1).all()
  assert ((tokens >= -1) & (tokens < V)).all()
  # Placeholder / out-of-range drafts are never accepted, nor anything after them.
  valid = (drafts >= 0) & (drafts < V)
  first_invalid = np.where(valid.all(1), k, np.argmin(valid, axis=1))
  assert (n_acc <= first_invalid).all()
  # Accepted drafts and the emitted correction / bonus have target probability > 0.
  p_draft = np.take_along_axis(p[:, :k], np.clip(drafts, 0, V - 1)[..., None], -1)[..., 0]
  assert (p_draft[accepted] > 0).all()
  assert (p[rows, n_acc, last] > 0).all()
  if case["sampling"].greedy:
    target = np.argmax(logits, axis=-1)
    expected = np.cumprod(drafts == target[:, :k], axis=1).sum(1)
    np.testing.assert_array_equal(n_acc, expected)
    np.testing.assert_array_equal(last, target[rows, n_acc])
    return
  rejected = n_acc < k
  i = np.minimum(n_acc, k - 1)
  d_i, valid_i = drafts[rows, i], valid[rows, i]
  if q is None:  # deterministic drafter: the residual is p with the rejected draft removed
    assert (last != d_i)[rejected & valid_i].all()
  else:
    residual = np.maximum(p[rows, n_acc] - q[rows, i], np.float32(0))
    z_positive = residual.sum(-1) > 0
    in_residual = residual[rows, last] > 0
    assert in_residual[rejected & valid_i & z_positive].all()
    # q == p: every draft the target can emit is accepted (u * q < p whenever q == p > 0).
    q_is_p = (q == p[:, :k]).all(axis=(1, 2))
    stop = ~valid | (p_draft == 0)
    first_stop = np.where(stop.any(1), np.argmax(stop, axis=1), k)
    np.testing.assert_array_equal(n_acc[q_is_p], first_stop[q_is_p])


def run_case(case):
  logits, drafts, q, keys = build(case)
  n_acc, tokens, p = evaluate(logits, drafts, q, keys, sampling=case["sampling"])
  check_contract(case, logits, drafts, q, n_acc, tokens, p)
  return n_acc, tokens


@SETTINGS
@given(case=cases())
def test_output_contract(case, property_cases):
  run_case(case)
  property_cases("test_output_contract", ROWS)


@SETTINGS
@given(case=cases(q_modes=("p",), draft_modes=("outside", "from_q"), policies=POLICIES[:2]))
def test_zero_residual_falls_back_to_the_target(case, property_cases):
  # q == p: drafts the target can emit are all accepted; drafts it cannot emit (p = q = 0) are
  # rejected with residual max(0, p - q) = 0, and the correction must still come from p.
  run_case(case)
  property_cases("test_zero_residual_falls_back_to_the_target", ROWS)


@SETTINGS
@given(case=cases(bad_frac=st.sampled_from([0.3, 0.7, 1.0])))
def test_placeholder_and_out_of_range_drafts(case, property_cases):
  run_case(case)
  property_cases("test_placeholder_and_out_of_range_drafts", ROWS)


@SETTINGS
@given(case=cases(policies=POLICIES[2:], draft_modes=("argmax", "uniform", "from_q")),
       corrupt=st.integers(0, 4))
def test_greedy_emits_the_argmax_path(case, corrupt, property_cases):
  # Drafts = the argmax path with at most one position corrupted: the output is exactly the
  # argmax path up to and including the first disagreement.
  logits, drafts, q, keys = build(case)
  k = drafts.shape[1]
  target = np.argmax(logits, axis=-1)
  drafts = target[:, :k].astype(np.int32).copy()
  if corrupt < k:
    drafts[:, corrupt] = np.where(np.arange(ROWS) % 2 == 0, -1, (drafts[:, corrupt] + 1) % logits.shape[-1])
  n_acc, tokens, p = evaluate(logits, drafts, q, keys, sampling=case["sampling"])
  check_contract(case, logits, drafts, q, n_acc, tokens, p)
  stop = min(corrupt, k)
  np.testing.assert_array_equal(np.asarray(n_acc), np.full(ROWS, stop))
  np.testing.assert_array_equal(np.asarray(tokens)[:, :stop + 1], target[:, :stop + 1])
  property_cases("test_greedy_emits_the_argmax_path", ROWS)


@settings(max_examples=50, deadline=None)
@given(case=cases(policies=POLICIES[:2]), perm_seed=st.integers(0, 2**32 - 1))
def test_rows_do_not_depend_on_their_batch(case, perm_seed, property_cases):
  # One key per row: permuting the rows (with their keys) permutes the outputs exactly.
  logits, drafts, q, keys = build(case)
  perm = np.random.default_rng(perm_seed).permutation(ROWS)
  n_acc, tokens, _ = evaluate(logits, drafts, q, keys, sampling=case["sampling"])
  n_acc2, tokens2, _ = evaluate(logits[perm], drafts[perm], None if q is None else q[perm], keys[perm],
                                sampling=case["sampling"])
  np.testing.assert_array_equal(np.asarray(n_acc)[perm], n_acc2)
  np.testing.assert_array_equal(np.asarray(tokens)[perm], tokens2)
  property_cases("test_rows_do_not_depend_on_their_batch", ROWS)
