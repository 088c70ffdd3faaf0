"""warp() against a direct numpy reference, Sampling validation, sample()."""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from specjax.sampling import Sampling, sample, warp


def ref_warp(logits, temperature=0.0, top_k=0, top_p=1.0):
  """The policy written out in float64 numpy, one row at a time: temperature -> top-k -> top-p."""
  x = np.asarray(logits, np.float64)
  out = np.empty_like(x)
  for idx in np.ndindex(x.shape[:-1]):
    row = x[idx].copy()
    vocab = row.shape[-1]
    if temperature == 0:
      out[idx] = np.eye(vocab)[np.argmax(row)]
      continue
    row = row / temperature
    if top_k and top_k < vocab:
      kth = np.sort(row)[::-1][top_k - 1]
      row[row < kth] = -np.inf
    if top_p < 1:
      probs = _softmax(row)
      order = np.argsort(-probs, kind="stable")
      cum = np.cumsum(probs[order])
      n_keep = int(np.searchsorted(cum, top_p, side="left")) + 1  # first prefix with mass >= top_p
      threshold = probs[order[min(n_keep, vocab) - 1]]
      row[probs < threshold] = -np.inf  # ties at the threshold stay
    out[idx] = _softmax(row)
  return out


def _softmax(x):
  e = np.exp(x - np.max(x))
  return e / e.sum()


def _top_p_margin(logits, temperature, top_k, top_p):
  """Distance of top_p from any cumulative sum of the (temperature, top-k) sorted probs."""
  pre = ref_warp(logits, temperature, top_k, 1.0)
  cum = np.cumsum(-np.sort(-pre, axis=-1), axis=-1)
  return float(np.min(np.abs(cum - top_p)))


# ----------------------------------------------------------------------------------------------
# warp against the reference


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), vocab=st.sampled_from([2, 5, 16, 33]),
       temperature=st.sampled_from([0.0, 0.3, 1.0, 2.5]), top_k=st.sampled_from([0, 1, 3, 8, 40]),
       top_p=st.sampled_from([1.0, 0.95, 0.7, 0.3]))
def test_warp_matches_numpy_reference(seed, vocab, temperature, top_k, top_p):
  logits = np.random.default_rng(seed).normal(size=(3, vocab)).astype(np.float32) * 3
  # float32 vs float64 may disagree exactly at the top-p boundary: stay off it.
  if top_p < 1 and temperature > 0 and _top_p_margin(logits, temperature, top_k, top_p) < 1e-4:
    return
  got = np.asarray(warp(jnp.asarray(logits), Sampling(temperature, top_k, top_p)))
  np.testing.assert_allclose(got, ref_warp(logits, temperature, top_k, top_p), atol=2e-6)
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


def test_temperature_scales_logits():
  logits = jnp.asarray([[2.0, 1.0, 0.0, -1.0]])
  for t in (0.25, 1.0, 3.0):
    np.testing.assert_allclose(warp(logits, Sampling(t)), jax.nn.softmax(logits / t), rtol=1e-6)
  # Higher temperature flattens: the top probability falls monotonically.
  tops = [float(warp(logits, Sampling(t))[0, 0]) for t in (0.25, 1.0, 3.0)]
  assert tops[0] > tops[1] > tops[2] > 0.25


@pytest.mark.parametrize("top_k", [1, 2, 5, 9])
def test_top_k_keeps_exactly_the_k_largest(top_k):
  logits = np.random.default_rng(top_k).permutation(10).astype(np.float32)  # distinct values
  got = np.asarray(warp(jnp.asarray(logits), Sampling(1.0, top_k)))
  kept = set(np.flatnonzero(got > 0))
  assert kept == set(np.argsort(-logits)[:top_k])
  np.testing.assert_allclose(got[sorted(kept)], _softmax(logits[sorted(kept)]), rtol=1e-5)


def test_top_k_keeps_ties_at_the_kth_value_and_large_k_is_a_no_op():
  logits = jnp.asarray([3.0, 1.0, 1.0, 0.0, -2.0])
  got = np.asarray(warp(logits, Sampling(1.0, top_k=2)))
  assert set(np.flatnonzero(got > 0)) == {0, 1, 2}  # tie at the 2nd largest: both kept
  for k in (5, 6, 100, 0):
    np.testing.assert_allclose(warp(logits, Sampling(1.0, top_k=k)), jax.nn.softmax(logits), rtol=1e-6)


@pytest.mark.parametrize("top_p,expected", [
    (0.2, {0}), (0.39, {0}), (0.41, {0, 1}), (0.69, {0, 1}), (0.71, {0, 1, 2}), (0.95, {0, 1, 2, 3}),
    (1.0, {0, 1, 2, 3, 4})])
def test_top_p_keeps_the_smallest_prefix_reaching_top_p(top_p, expected):
  probs = np.asarray([0.4, 0.3, 0.2, 0.06, 0.04])
  order = [2, 0, 4, 1, 3]  # shuffled, so sortedness is not assumed
  logits = jnp.asarray(np.log(probs[order]), jnp.float32)
  got = np.asarray(warp(logits, Sampling(1.0, top_p=top_p)))
  kept = sorted(order[i] for i in np.flatnonzero(got > 0))
  assert set(kept) == expected
  mass = probs[kept].sum()
  assert mass >= top_p and mass - probs[kept].min() < top_p  # reaches top_p, and minimally
  np.testing.assert_allclose(got[np.argsort(order)][kept], probs[kept] / mass, rtol=1e-5)


def test_top_p_keeps_ties_at_the_threshold():
  logits = jnp.log(jnp.asarray([0.5, 0.2, 0.2, 0.1]))
  got = np.asarray(warp(logits, Sampling(1.0, top_p=0.6)))
  np.testing.assert_allclose(got, [0.5 / 0.9, 0.2 / 0.9, 0.2 / 0.9, 0.0], rtol=1e-5)


def test_order_is_temperature_then_top_k_then_top_p():
  # top-k before top-p: after top-2 the renormalised top prob is 0.4/0.7 > 0.5, so top-p 0.5
  # keeps one token; top-p first would keep {0, 1}.
  logits = jnp.log(jnp.asarray([0.4, 0.3, 0.2, 0.1]))
  got = np.asarray(warp(logits, Sampling(1.0, top_k=2, top_p=0.5)))
  np.testing.assert_allclose(got, [1.0, 0.0, 0.0, 0.0])
  # temperature before top-p: at T=1 top-p 0.5 keeps {0, 1}; at T=0.25 token 0 alone has > 0.5.
  got = np.asarray(warp(logits, Sampling(1.0, top_p=0.5)))
  assert set(np.flatnonzero(got > 0)) == {0, 1}
  got = np.asarray(warp(logits, Sampling(0.25, top_p=0.5)))
  np.testing.assert_allclose(got, [1.0, 0.0, 0.0, 0.0])
  np.testing.assert_allclose(got, ref_warp(np.asarray(logits), 0.25, 0, 0.5), atol=1e-7)


def test_greedy_is_one_hot_argmax_first_on_ties():
  logits = jnp.asarray([[0.0, 5.0, 5.0, 1.0], [-jnp.inf, -jnp.inf, 2.0, -jnp.inf], [9.0, 0.0, 0.0, 9.0]])
  for s in (Sampling(0.0), Sampling(0.0, top_k=3, top_p=0.5)):
    got = np.asarray(warp(logits, s))
    np.testing.assert_array_equal(got, np.eye(4)[[1, 2, 0]])
    assert got.dtype == np.float32


def test_single_finite_logit_is_one_hot_under_every_policy():
  logits = jnp.full((2, 3, 7), -jnp.inf).at[..., 4].set(0.3)
  for s in (Sampling(1.0), Sampling(0.5, 3), Sampling(2.0, 0, 0.2), Sampling(0.7, 1, 0.9)):
    got = np.asarray(warp(logits, s))
    assert got.shape == (2, 3, 7)
    np.testing.assert_array_equal(got, np.broadcast_to(np.eye(7)[4], (2, 3, 7)))


def test_bf16_logits_give_float32_probs():
  got = warp(jnp.asarray([[1.0, 2.0, 3.0]], jnp.bfloat16), Sampling(1.0))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, jax.nn.softmax(jnp.asarray([[1.0, 2.0, 3.0]])), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Sampling validation


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-0.1), "temperature=-0.1"),
    (dict(temperature=float("nan")), "temperature=nan"),
    (dict(temperature=float("inf")), "temperature=inf"),
    (dict(temperature=True), "temperature=True"),
    (dict(temperature="1.0"), "temperature='1.0'"),
    (dict(temperature=1.0, top_k=-1), "top_k=-1"),
    (dict(temperature=1.0, top_k=2.0), "top_k=2.0"),
    (dict(temperature=1.0, top_k=True), "top_k=True"),
    (dict(temperature=1.0, top_p=0.0), "top_p=0.0"),
    (dict(temperature=1.0, top_p=-0.5), "top_p=-0.5"),
    (dict(temperature=1.0, top_p=1.5), "top_p=1.5"),
    (dict(temperature=1.0, top_p=float("nan")), "top_p=nan"),
    (dict(temperature=1.0, top_p=True), "top_p=True"),
])
def test_sampling_rejects_bad_values_naming_them(kwargs, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    Sampling(**kwargs)


def test_sampling_accepts_edges_and_normalises_types():
  s = Sampling(temperature=0, top_k=0, top_p=1)
  assert s.greedy and isinstance(s.temperature, float) and isinstance(s.top_p, float)
  s = Sampling(temperature=1e-3, top_k=10**6, top_p=1e-9)
  assert not s.greedy
  assert hash(Sampling(1.0, 3, 0.5)) == hash(Sampling(1, 3, 0.5))  # usable as a jit static arg


# ----------------------------------------------------------------------------------------------
# sample


def test_sample_follows_probs_and_accepts_unnormalised_rows():
  probs = np.asarray([0.5, 0.0, 0.3, 0.2])
  keys = jax.random.split(jax.random.key(0), 20_000)
  draws = np.asarray(jax.vmap(sample, in_axes=(0, None))(keys, jnp.asarray(probs * 7.0)))
  assert draws.dtype == np.int32
  counts = np.bincount(draws, minlength=4)
  assert counts[1] == 0
  pvalue = stats.chisquare(counts[[0, 2, 3]], probs[[0, 2, 3]] * len(draws)).pvalue
  assert pvalue >= 1e-3, pvalue
  assert not math.isnan(pvalue)


def test_argmax_equals_jnp_argmax_with_ties_nan_and_inf():
  """The two-reduction argmax (used by greedy verify and drafting) against jnp.argmax."""
  from specjax.sampling import argmax
  rng = np.random.default_rng(0)
  for t in range(100):
    x = rng.integers(-3, 3, size=(4, 7, 50)).astype(np.float32)  # many ties
    if t % 3 == 0:
      x[0, 1, rng.integers(50)] = np.nan
      x[1, 2, rng.integers(50, size=2)] = np.nan
    if t % 5 == 0:
      x[2, 3, :] = -np.inf
    np.testing.assert_array_equal(argmax(jnp.asarray(x)), jnp.argmax(jnp.asarray(x), axis=-1))
