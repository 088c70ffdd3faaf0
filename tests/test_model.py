"""The NNX Llama: incremental decoding, per-row offsets, masks as arguments, features."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import specjax as sj
from specjax import testing
from specjax.models.llama import causal_mask


@pytest.fixture(scope="module")
def model():
  return testing.tiny_model(seed=1)


def _fwd(model, tokens, positions, cache, **kw):
  return model.module()(jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32), cache, **kw)


def test_incremental_equals_full_forward(model):
  ids = np.array([5, 9, 17, 3, 40, 22, 8, 11])
  full = np.asarray(sj.forward_logits(model, ids))
  cache = model.new_cache(1, 16)
  step = []
  for t, tok in enumerate(ids):
    logits, cache, _ = _fwd(model, [[tok]], [[t]], cache)
    cache = cache.replace(lengths=cache.lengths + 1)
    step.append(np.asarray(logits[0, 0]))
  np.testing.assert_allclose(np.stack(step), full, atol=1e-4)


def test_chunked_forward_at_offsets_equals_full(model):
  """Prefill 5 tokens, then 3 more in one call at offset 5 (the verify pattern)."""
  ids = np.array([5, 9, 17, 3, 40, 22, 8, 11])
  full = np.asarray(sj.forward_logits(model, ids))
  cache = model.new_cache(1, 16)
  _, cache, _ = _fwd(model, [ids[:5]], [np.arange(5)], cache)
  cache = cache.replace(lengths=cache.lengths + 5)
  logits, _, _ = _fwd(model, [ids[5:]], [np.arange(5, 8)], cache)
  np.testing.assert_allclose(np.asarray(logits[0]), full[5:], atol=1e-4)


def test_rows_at_different_offsets_match_rows_alone(model):
  a, b = np.array([4, 8, 15, 16, 23, 42, 7]), np.array([30, 31, 32])
  cache = model.new_cache(2, 16)
  prompt = np.zeros((2, 7), np.int32)
  prompt[0], prompt[1, :3] = a, b
  _, cache, _ = _fwd(model, prompt, np.tile(np.arange(7), (2, 1)), cache)
  lengths = jnp.array([6, 2])  # rows advance by different amounts; padding beyond is overwritten
  cache = cache.replace(lengths=lengths)
  nxt = np.array([[a[6], 9], [b[2], 9]])
  logits, _, _ = _fwd(model, nxt, np.asarray(lengths)[:, None] + np.arange(2), cache)
  ref_a = np.asarray(sj.forward_logits(model, np.r_[a, 9]))[-2:]
  ref_b = np.asarray(sj.forward_logits(model, np.r_[b, 9]))[-2:]
  np.testing.assert_allclose(np.asarray(logits[0]), ref_a, atol=1e-4)
  np.testing.assert_allclose(np.asarray(logits[1]), ref_b, atol=1e-4)


def test_mask_is_an_argument(model):
  """A tree-style mask: two sibling candidates after a shared prefix see the prefix, not each other."""
  prefix, c1, c2 = np.array([5, 9, 17]), 40, 22
  cache = model.new_cache(1, 8)
  _, cache, _ = _fwd(model, [prefix], [np.arange(3)], cache)
  cache = cache.replace(lengths=cache.lengths + 3)
  mask = np.zeros((1, 2, 8), bool)
  mask[0, :, :3] = True
  mask[0, 0, 3] = mask[0, 1, 4] = True  # each sibling sees itself at its own slot
  logits, _, _ = _fwd(model, [[c1, c2]], [[3, 3]], cache, mask=jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(logits[0, 0]), np.asarray(sj.forward_logits(model, np.r_[prefix, c1]))[-1],
                             atol=1e-4)
  np.testing.assert_allclose(np.asarray(logits[0, 1]), np.asarray(sj.forward_logits(model, np.r_[prefix, c2]))[-1],
                             atol=1e-4)


def test_default_mask_is_causal_over_slots():
  m = np.asarray(causal_mask(jnp.array([3]), 3, 6))[0]
  assert m.tolist() == [[True] * 4 + [False] * 2, [True] * 5 + [False], [True] * 6]


def test_features_and_layer_limit(model):
  cache = model.new_cache(2, 8)
  tok = jnp.ones((2, 3), jnp.int32)
  pos = jnp.tile(jnp.arange(3), (2, 1))
  logits, _, feats = model.module()(tok, pos, cache, feature_layers=(0, 1))
  assert logits.shape == (2, 3, model.config.vocab_size) and logits.dtype == jnp.float32
  assert feats["hidden"].shape == (2, 3, model.config.hidden)
  assert feats["layers"].shape == (2, 3, 2, model.config.hidden)
  early, _, f1 = model.module()(tok, pos, cache, layer_limit=1, feature_layers=(0,))
  np.testing.assert_allclose(np.asarray(f1["layers"][:, :, 0]), np.asarray(feats["layers"][:, :, 0]), atol=1e-6)
  assert not np.allclose(np.asarray(early), np.asarray(logits))
  idx = jnp.array([[2], [0]])
  picked, _, _ = model.module()(tok, pos, cache, logit_index=idx)
  np.testing.assert_allclose(np.asarray(picked[:, 0]), np.asarray(logits[jnp.arange(2), idx[:, 0]]), atol=1e-5)


def test_untied_head_and_params_are_a_pytree():
  m = testing.tiny_model(seed=2, tie_embeddings=False)
  leaves = jax.tree.leaves(m.params)
  assert all(isinstance(x, jax.Array) for x in leaves)
  n = sum(x.size for x in leaves)
  c = m.config
  assert n >= 2 * c.vocab_size * c.hidden  # embed + separate head
  assert np.isfinite(np.asarray(sj.forward_logits(m, [1, 2, 3]))).all()


@pytest.mark.parametrize("ids, match", [([], "non-empty"), ([1.5, 2.0], "integers"), ([3, 99999], "token ids must be in")])
def test_forward_logits_rejects_bad_ids(model, ids, match):
  with pytest.raises(ValueError, match=match):
    sj.forward_logits(model, np.asarray(ids))


def test_config_validation():
  with pytest.raises(ValueError, match="heads=4 must be a multiple of kv_heads=3"):
    testing.tiny_config(kv_heads=3)
  with pytest.raises(ValueError, match="hidden=0"):
    testing.tiny_config(hidden=0)


def test_read_only_forward_matches_the_writing_forward(model):
  """write_cache=False attends over cache + new tokens side by side and returns their K/V."""
  ids = np.array([5, 9, 17, 3, 40, 22, 8, 11])
  cache = model.new_cache(1, 16)
  _, cache, _ = _fwd(model, [ids[:5]], [np.arange(5)], cache)
  cache = cache.replace(lengths=cache.lengths + 5)
  written, new_cache, _ = _fwd(model, [ids[5:]], [np.arange(5, 8)], cache)
  read, same_cache, feats = _fwd(model, [ids[5:]], [np.arange(5, 8)], cache, write_cache=False)
  np.testing.assert_allclose(np.asarray(read), np.asarray(written), atol=1e-5)
  assert same_cache is cache
  new_k, new_v = feats["new_kv"]
  # new K/V are [B, T, K, H]; the cache is [B, K, S, H]
  np.testing.assert_allclose(np.asarray(new_k[1][0]), np.asarray(new_cache.k[1][0, :, 5:8]).swapaxes(0, 1), atol=1e-6)
  np.testing.assert_allclose(np.asarray(new_v[0][0]), np.asarray(new_cache.v[0][0, :, 5:8]).swapaxes(0, 1), atol=1e-6)


def test_chunked_prefill_equals_one_pass(model):
  """Causal chunks that attend only over the slots written so far give the same cache and
  features as one pass over the whole cache bucket."""
  rng = np.random.default_rng(3)
  tokens = jnp.asarray(rng.integers(3, model.config.vocab_size, size=(2, 23)), jnp.int32)
  module = model.module()
  pos = jnp.broadcast_to(jnp.arange(23, dtype=jnp.int32), (2, 23))
  _, ref_cache, ref = module(tokens, pos, model.new_cache(2, 32), feature_layers=(0,))
  for chunk in (5, 8, 23):
    cache, feats = module.prefill(tokens, model.new_cache(2, 32), chunk=chunk, feature_layers=(0,))
    assert np.all(np.asarray(cache.lengths) == 0)
    for a, b in zip(cache.k + cache.v, ref_cache.k + ref_cache.v):
      np.testing.assert_allclose(np.asarray(a)[:, :, :23], np.asarray(b)[:, :, :23], atol=2e-5)
    for name in ("hidden", "layers"):
      np.testing.assert_allclose(np.asarray(feats[name]), np.asarray(ref[name]), atol=2e-5)
