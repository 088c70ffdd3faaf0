"""generate(): AR vs speculative equivalence, batches, truncation, stats and bad input (tiny models)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import specjax as sj
from specjax import testing

V = 64


@pytest.fixture(scope="module")
def model():
  return testing.tiny_model(seed=7)


@pytest.fixture(scope="module")
def prompts():
  return testing.random_prompts(3, V, lo=3, hi=9, seed=1)


def ref_greedy(model, ids, n, stop=(2,)):
  """Independent reference: re-run the whole sequence eagerly and take the argmax, n times."""
  module = model.module()
  seq, logps = list(ids), []
  for _ in range(n):
    T = len(seq)
    cache = model.new_cache(1, T)
    logits, _, _ = module(jnp.asarray([seq], jnp.int32), jnp.arange(T, dtype=jnp.int32)[None], cache)
    last = np.asarray(logits[0, -1], np.float64)
    tok = int(np.argmax(last))
    logps.append(last[tok] - np.log(np.sum(np.exp(last - last.max()))) - last.max())
    seq.append(tok)
    if tok in stop:
      break
  return seq[len(ids):], np.array(logps)


DRAFTERS = {
    "ngram-k1": lambda m: sj.make_drafter("ngram", m, k=1),
    "ngram-k4": lambda m: sj.make_drafter("ngram", m, k=4),
    "draft-k3": lambda m: sj.make_drafter("draft", m, k=3, layers=1),
}


def test_ar_greedy_matches_reference_batch1_and_batch3(model, prompts):
  ref = [ref_greedy(model, p, 10) for p in prompts]
  one = sj.generate(model, [prompts[0]], max_new_tokens=10)
  assert one.tokens[0] == ref[0][0]
  np.testing.assert_allclose(one.logprobs[0], ref[0][1], atol=1e-4)
  out = sj.generate(model, prompts, max_new_tokens=10)
  assert out.tokens == [r[0] for r in ref]
  assert out.stats["mean_accepted"] == 1.0 and out.stats["k"] == 0


@pytest.mark.parametrize("name", sorted(DRAFTERS))
def test_speculative_greedy_equals_ar(model, prompts, name):
  drafter = DRAFTERS[name](model)
  ar = sj.generate(model, prompts, max_new_tokens=24)
  # The static loop (every proposal verified); dynamic speculation: tests/test_dynamic.py.
  sp = sj.generate(model, prompts, drafter=drafter, max_new_tokens=24, dynamic=False)
  assert sp.tokens == ar.tokens
  for a, b in zip(sp.logprobs, ar.logprobs):
    np.testing.assert_allclose(a, b, atol=1e-4)
  st = sp.stats
  assert st["new_tokens"] == sum(map(len, sp.tokens))
  assert st["mean_accepted"] == pytest.approx(st["new_tokens"] / st["steps"])
  for row, toks in zip(st["rows"], sp.tokens):
    assert sum(row["accepted_per_step"]) == len(toks)
    assert all(1 <= a <= drafter.k + 1 for a in row["accepted_per_step"])
    assert all(0 <= x <= 1 for x in row["acceptance_per_position"])
    assert row["reached_per_position"][0] == row["steps"]  # position 0 is examined every step


@pytest.mark.parametrize("name", ["ngram-k4", "draft-k3"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batch_equals_rows_alone(model, prompts, name, temperature):
  """Ragged acceptance inside a batch changes nothing: each row equals itself run alone."""
  drafter = DRAFTERS[name](model)
  sampling = sj.Sampling(temperature=temperature)
  seeds = [11, 12, 13]
  batch = sj.generate(model, prompts, drafter=drafter, sampling=sampling, max_new_tokens=16, seed=seeds)
  for p, s, toks in zip(prompts, seeds, batch.tokens):
    alone = sj.generate(model, [p], drafter=drafter, sampling=sampling, max_new_tokens=16, seed=s)
    assert alone.tokens[0] == toks
  steps = [r["steps"] for r in batch.stats["rows"]]
  assert len(steps) == 3


def test_rows_do_not_influence_each_other(model, prompts):
  sampling = sj.Sampling(temperature=1.0, top_k=20)
  a = sj.generate(model, prompts, sampling=sampling, max_new_tokens=12, seed=[1, 2, 3])
  changed = [[9, 9, 9, 9, 9, 9, 9, 9]] + prompts[1:]
  b = sj.generate(model, changed, sampling=sampling, max_new_tokens=12, seed=[1, 2, 3])
  assert a.tokens[1:] == b.tokens[1:] and a.tokens[0] != b.tokens[0]


def test_seeds_reproduce_and_differ(model, prompts):
  sampling = sj.Sampling(temperature=1.0)
  a = sj.generate(model, prompts, sampling=sampling, max_new_tokens=12, seed=5)
  b = sj.generate(model, prompts, sampling=sampling, max_new_tokens=12, seed=5)
  c = sj.generate(model, prompts, sampling=sampling, max_new_tokens=12, seed=6)
  assert a.tokens == b.tokens and a.tokens != c.tokens


def test_stop_token_inside_an_accepted_block(model, prompts):
  drafter = DRAFTERS["ngram-k4"](model)
  free = sj.generate(model, prompts, max_new_tokens=24, stop_ids=())
  toks = free.tokens[0]
  stop = toks[5]
  first = toks.index(stop)
  sp = sj.generate(model, prompts, drafter=drafter, max_new_tokens=24, stop_ids=(stop,))
  assert sp.tokens[0] == toks[: first + 1]
  ar = sj.generate(model, prompts, max_new_tokens=24, stop_ids=(stop,))
  assert sp.tokens == ar.tokens


@pytest.mark.parametrize("n", [1, 7, 13])
def test_max_new_tokens_inside_a_block(model, prompts, n):
  drafter = DRAFTERS["ngram-k4"](model)
  full = sj.generate(model, prompts, max_new_tokens=24, stop_ids=())
  sp = sj.generate(model, prompts, drafter=drafter, max_new_tokens=n, stop_ids=())
  assert [len(t) for t in sp.tokens] == [n] * 3
  assert sp.tokens == [t[:n] for t in full.tokens]


def test_generation_up_to_a_full_cache(model, prompts):
  drafter = DRAFTERS["ngram-k4"](model)
  need = max(map(len, prompts)) + 20 + 4 + 1
  out = sj.generate(model, prompts, drafter=drafter, max_new_tokens=20, cache_len=need, stop_ids=())
  assert [len(t) for t in out.tokens] == [20] * 3
  with pytest.raises(ValueError, match=f"needs {need} cache slots > cache_len={need - 1}"):
    sj.generate(model, prompts, drafter=drafter, max_new_tokens=20, cache_len=need - 1)


# Bad input (prompts, arguments, drafter mismatches, NaN logits): tests/test_bad_inputs.py.
