"""`Model`: a loaded decoder with its tokenizer and chat template, split for jit."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from specjax import cache as cache_lib
from specjax.models.llama import Llama, LlamaConfig


@dataclasses.dataclass(eq=False)
class Model:
  """A target (or draft) model. `params` is a plain pytree (nnx.State) that can be
  placed with a sharding; `graphdef` is static and hashable."""

  config: LlamaConfig
  graphdef: Any
  params: Any
  tokenizer: Any = None
  chat_template: str | None = None
  name: str = "model"

  @classmethod
  def from_module(cls, module: Llama, **kwargs) -> "Model":
    graphdef, params = nnx.split(module)
    return cls(config=module.cfg, graphdef=graphdef, params=params, **kwargs)

  def module(self, params=None) -> Llama:
    return nnx.merge(self.graphdef, self.params if params is None else params)

  def new_cache(self, batch: int, max_len: int) -> cache_lib.KVCache:
    c = self.config
    return cache_lib.init_cache(c.layers, batch, max_len, c.kv_heads, c.head_dim)

  def __repr__(self):
    c = self.config
    return (f"Model({self.name!r}, layers={c.layers}, hidden={c.hidden}, heads={c.heads}/{c.kv_heads}, "
            f"vocab={c.vocab_size})")


@functools.partial(jax.jit, static_argnums=0)
def _forward_all(graphdef, params, ids):
  module = nnx.merge(graphdef, params)
  T = ids.shape[1]
  cache = cache_lib.init_cache(module.cfg.layers, 1, T, module.cfg.kv_heads, module.cfg.head_dim)
  logits, _, _ = module(ids, jnp.arange(T, dtype=jnp.int32)[None], cache)
  return logits[0]


def forward_logits(model: Model, ids) -> jax.Array:
  """Logits [T, V] float32 of one sequence of ids (for checks and parity tests)."""
  ids = np.asarray(ids)
  if ids.ndim != 1 or ids.size == 0:
    raise ValueError(f"ids must be a non-empty 1-D sequence of token ids, got shape {ids.shape}")
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
  if ids.min() < 0 or ids.max() >= model.config.vocab_size:
    raise ValueError(f"token ids must be in [0, {model.config.vocab_size}), got min {ids.min()} max {ids.max()}")
  return _forward_all(model.graphdef, model.params, jnp.asarray(ids, jnp.int32)[None])
