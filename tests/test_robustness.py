"""Determinism across batch positions, and no memory growth across long runs and many turns."""
import gc

import jax
import numpy as np
import pytest

import specjax as sj
from specjax import testing


@pytest.fixture(scope="module")
def model():
  return testing.tiny_model(seed=11)


def _rss_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * 4096 / 2**20


def _live_bytes() -> int:
  return sum(a.nbytes for a in jax.live_arrays())


@pytest.mark.parametrize("name", ["none", "ngram", "draft"])
def test_batch_position_does_not_matter(model, name):
  """Permuting the batch permutes the outputs (seeded sampling; seeds travel with their prompts)."""
  kw = {"layers": 1} if name == "draft" else {}
  drafter = sj.make_drafter(name, model, k=3, **kw)
  prompts = testing.random_prompts(4, 64, seed=3)
  seeds = [21, 22, 23, 24]
  sampling = sj.Sampling(temperature=0.9, top_p=0.95)
  a = sj.generate(model, prompts, drafter=drafter, sampling=sampling, max_new_tokens=10, seed=seeds)
  order = [2, 0, 3, 1]
  b = sj.generate(model, [prompts[i] for i in order], drafter=drafter, sampling=sampling, max_new_tokens=10,
                  seed=[seeds[i] for i in order])
  assert b.tokens == [a.tokens[i] for i in order]


def test_many_turns_do_not_grow_memory(model):
  """A 30-turn conversation in one cache bucket: host RSS and live device arrays stay flat."""
  drafter = sj.make_drafter("ngram", model, k=4)
  history = [3, 4, 5]

  def turn(i):
    out = sj.generate(model, [history[-40:]], drafter=drafter, max_new_tokens=8, seed=i, stop_ids=(),
                      sampling=sj.Sampling(temperature=1.0))
    history.extend(out.tokens[0] + [7])
    return out

  for i in range(3):  # warm-up: compile for every prompt bucket used below
    turn(i)
  gc.collect()
  rss0, live0 = _rss_mb(), _live_bytes()
  for i in range(3, 33):
    turn(i)
  gc.collect()
  rss1, live1 = _rss_mb(), _live_bytes()
  assert live1 <= live0, f"live device arrays grew from {live0} to {live1} bytes"
  assert rss1 - rss0 < 40, f"host RSS grew by {rss1 - rss0:.1f} MB over 30 turns"


def test_long_generation_up_to_the_cache_limit_uses_static_memory(model):
  """Memory does not depend on steps taken: 10 vs 300 new tokens in the same cache leave the same live state."""
  prompt = [[3, 4, 5, 6]]
  sj.generate(model, prompt, max_new_tokens=300, cache_len=320, stop_ids=())  # compile
  gc.collect()
  live0, rss0 = _live_bytes(), _rss_mb()
  out = sj.generate(model, prompt, max_new_tokens=300, cache_len=320, stop_ids=())
  assert len(out.tokens[0]) == 300
  del out
  gc.collect()
  assert _live_bytes() <= live0
  assert _rss_mb() - rss0 < 40
