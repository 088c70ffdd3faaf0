"""A separate (smaller) draft model with its own KV cache, drafting k tokens autoregressively.

Any specjax `Model` with the target's vocabulary and tokenizer works:

    small = sj.load_model("path/to/small.gguf")
    drafter = sj.make_drafter("draft", target, k=4, draft=small)

For the embedded SmolLM2-135M no smaller sibling exists, so the default draft
is the target's own first `layers` blocks + final norm + head (weights shared,
no copy). Draft samples come with their q (the same `warp` policy), so
sampling stays lossless; at temperature 0 the drafts are the draft's argmax.

Cache invariant, as for the target: slots < length - 1 hold the committed
history. Propose feeds the last token, then its own drafts; if a row accepts
all k drafts, `update` runs one more forward to write d_k (only on such steps).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from specjax import cache as cache_lib
from specjax.drafters.base import Context, Drafter
from specjax.models.model import Model
from specjax.sampling import argmax, sample, warp


@struct.dataclass
class DraftState:
  cache: cache_lib.KVCache
  drafts: jax.Array  # [B, k] the last proposal
  base: jax.Array  # [B] history length at the last proposal


def truncated(model: Model, layers: int) -> Model:
  """The first `layers` blocks of `model` + its final norm and head, sharing its arrays."""
  if not 1 <= layers <= model.config.layers:
    raise ValueError(f"draft layers={layers} must be in [1, {model.config.layers}] for {model.name}")
  cfg = dataclasses.replace(model.config, layers=layers)
  module = model.module()  # new module objects over the same arrays (packed weights included)
  module.cfg = cfg
  module.blocks = nnx.List(list(module.blocks)[:layers])
  return Model.from_module(module, tokenizer=model.tokenizer, chat_template=model.chat_template,
                           name=f"{model.name}[:{layers}]")


@dataclasses.dataclass(frozen=True)
class DraftModel(Drafter):
  graphdef: Any = None
  name = "draft"

  def _step(self, module, cache, tokens, positions):
    logits, cache, _ = module(tokens, positions, cache)
    return logits[:, -1], cache

  def init(self, weights, ctx: Context, sampling, max_len: int):
    module = nnx.merge(self.graphdef, weights)
    B = ctx.history.shape[0]
    cache = cache_lib.init_cache(module.cfg.layers, B, max_len, module.cfg.kv_heads, module.cfg.head_dim)
    cache, _ = module.prefill(ctx.history, cache)
    cache = cache_lib.advance(cache, ctx.length - 1)
    return DraftState(cache, jnp.zeros((B, self.k), jnp.int32), ctx.length)

  def propose(self, weights, dstate: DraftState, ctx: Context, keys, sampling):
    module = nnx.merge(self.graphdef, weights)
    B = ctx.length.shape[0]
    rows = jnp.arange(B)
    cache = dstate.cache.replace(lengths=ctx.length - 1)
    token = ctx.history[rows, ctx.length - 1]
    drafts, qs = [], []
    for i in range(self.k):
      logits, cache = self._step(module, cache, token[:, None], cache.lengths[:, None])
      cache = cache_lib.advance(cache, jnp.ones((B,), jnp.int32))
      if sampling.greedy:
        token = argmax(logits)
      else:
        q = warp(logits, sampling)
        token = jax.vmap(lambda key, p: sample(jax.random.fold_in(key, i), p))(keys, q)
        qs.append(q)
      drafts.append(token)
    drafts = jnp.stack(drafts, axis=1)
    q = jnp.stack(qs, axis=1) if qs else None
    return DraftState(cache, drafts, ctx.length), drafts, q

  def update(self, weights, dstate: DraftState, ctx: Context, n_acc):
    module = nnx.merge(self.graphdef, weights)

    def write_last(cache):  # d_k is accepted but was never fed to the draft
      cache = cache.replace(lengths=dstate.base - 1 + self.k)
      _, cache = self._step(module, cache, dstate.drafts[:, -1:], cache.lengths[:, None])
      return cache

    cache = jax.lax.cond(jnp.any(n_acc == self.k), write_last, lambda c: c, dstate.cache)
    return dstate.replace(cache=cache)


def make(target: Model, k: int, draft: Model | None = None, layers: int = 4) -> DraftModel:
  """`draft`: a specjax Model sharing the target's vocabulary; default the target's first `layers` blocks."""
  if draft is None:
    draft = truncated(target, layers)
  if not isinstance(draft, Model):
    raise ValueError(f"draft must be a specjax Model (sj.load_model(...)), got {type(draft).__name__}")
  fp = draft.tokenizer.fingerprint() if draft.tokenizer is not None else None
  return DraftModel(k=k, weights=draft.params, vocab_size=draft.config.vocab_size, tokenizer_fingerprint=fp,
                    graphdef=draft.graphdef)
