"""Draft head family: shapes, config validation, reduced-vocabulary helpers."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from specjax import testing
from specjax.models import heads
from specjax.models.llama import causal_mask


@pytest.mark.parametrize("kind,layers", [("eagle1", ()), ("eagle3", (0, 1)), ("mtp", ())])
def test_forward_shapes(kind, layers):
  model = testing.tiny_model()
  c = model.config
  cfg = heads.HeadConfig(kind, c, draft_vocab=40, feature_layers=layers)
  head = heads.DraftHead(cfg, nnx.Rngs(0))
  B, T, S = 2, 5, 16
  feats = {"hidden": jnp.ones((B, T, c.hidden)), "layers": jnp.ones((B, T, 2, c.hidden))}
  f = head.input_features(feats)
  assert f.shape == (B, T, c.hidden)
  kc = jnp.zeros((B, c.kv_heads, S, c.head_dim))
  h, k2, v2 = head(f, jnp.ones((B, T, c.hidden)), jnp.broadcast_to(jnp.arange(T), (B, T)), kc, kc,
                   jnp.zeros((B,), jnp.int32), causal_mask(jnp.zeros((B,), jnp.int32), T, S))
  assert h.shape == (B, T, c.hidden) and k2.shape == kc.shape
  d2t = jnp.arange(40)
  _, w_out = heads.target_tables(model.params, c, d2t)
  logits = head.logits(h, w_out)
  assert logits.shape == (B, T, 40) and logits.dtype == jnp.float32
  assert hasattr(head, "lm_head") == (kind == "eagle3")


def test_config_errors_name_the_value():
  c = testing.tiny_config()
  with pytest.raises(ValueError, match="kind='medusa'"):
    heads.HeadConfig("medusa", c, 10)
  with pytest.raises(ValueError, match=r"draft_vocab=100 must be in \[1, 64\]"):
    heads.HeadConfig("eagle3", c, 100, (0,))
  with pytest.raises(ValueError, match=r"feature_layers \[5\]"):
    heads.HeadConfig("eagle3", c, 10, (0, 5))
  with pytest.raises(ValueError, match="only for eagle3"):
    heads.HeadConfig("mtp", c, 10, (0,))


def test_frequent_tokens_and_scatter():
  counts = np.array([5, 0, 9, 9, 1])
  d2t = heads.frequent_tokens(counts, 3)
  assert d2t.tolist() == [0, 2, 3]
  full = heads.draft_to_full(jnp.array([[1.0, 2.0, 3.0]]), d2t, 5)
  assert full[0].tolist() == [1.0, -np.inf, 2.0, 3.0, -np.inf]
  assert heads.default_feature_layers(30) == (2, 15, 27)
