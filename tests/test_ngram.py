"""Prompt lookup proposals against a brute-force reference on random histories."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax.drafters.ngram import propose_ngram


def reference(hist, L, k, min_n, max_n, short_k):
  """Longest suffix first; its most recent earlier occurrence with a known token after it."""
  for n in range(max_n, min_n - 1, -1):
    if L < n + 1:
      continue
    starts = [i for i in range(L - n) if hist[i:i + n] == hist[L - n:L]]
    if starts:
      begin = max(starts) + n
      count = short_k if n == 1 else k
      return hist[begin:min(begin + count, L)]
  return []


@pytest.mark.parametrize("k,min_n,max_n,short_k", [(5, 1, 3, 1), (5, 2, 3, 5), (3, 1, 1, 2), (8, 1, 4, 8)])
def test_proposals_match_reference(k, min_n, max_n, short_k):
  rng = np.random.default_rng(k * 100 + min_n * 10 + max_n)
  S = 40
  fn = jax.jit(lambda h, n: propose_ngram(h, n, k, max_n, min_n, short_k))
  for _ in range(60):
    vocab = int(rng.integers(2, 6))  # small vocabularies: many matches of every length
    hist = rng.integers(0, vocab, size=S).tolist()
    L = int(rng.integers(1, S + 1))
    got = np.asarray(fn(jnp.asarray(hist, jnp.int32), jnp.int32(L))).tolist()
    want = reference(hist, L, k, min_n, max_n, short_k)
    assert got == want + [-1] * (k - len(want)), (hist[:L], L, got, want)
