"""generate(): prefill, then one jitted lax.while_loop of draft -> verify -> accept -> commit.

Autoregressive decoding is the same loop with no drafter (k = 0), so every
"speculative vs AR" comparison measures only speculation. With dynamic
speculation (`dynamic.py`, on by default) each row verifies, each step, only the
drafts its past acceptance and the machine's cost model (`cost_model.py`) say
will pay, 0 included; a step where no row drafts skips the drafter. Shapes are static
(batch bucket, prompt bucket, cache bucket, k); what changes between calls
(prompt lengths, max_new_tokens, seeds) is an array, so nothing recompiles.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from specjax import cache as cache_lib
from specjax import dynamic as dynamic_lib
from specjax.cost_model import CostModel, cost_model
from specjax.drafters.base import Context, Drafter
from specjax import kernels
from specjax.kernels import cache_write
from specjax.models.model import Model
from specjax.sampling import Sampling
from specjax.tree import buffers_from_parents
from specjax.verify import accept_chain, accept_tree


@struct.dataclass
class LoopState:
  cache: cache_lib.KVCache
  history: jax.Array  # [B, S] prompt + emitted ids
  logprobs: jax.Array  # [B, S] target log-prob of each emitted id (0 for the prompt)
  length: jax.Array  # [B] tokens in history; the last is not yet in the cache
  done: jax.Array  # [B]
  nan: jax.Array  # [B] a NaN logit was seen (checked mode stops the row)
  step: jax.Array  # []
  steps: jax.Array  # [B] verify steps while active
  emitted_per_step: jax.Array  # [B, max_steps] tokens emitted by each step
  reached: jax.Array  # [B, max(k,1)] steps where draft position i was examined
  accepted: jax.Array  # [B, max(k,1)] ... and accepted
  features: Any
  feature_start: jax.Array  # [B]
  last_acc: jax.Array  # [B] drafts accepted by the last step (the drafter's update needs it)
  dstate: Any
  est: Any  # dynamic.Estimates with dynamic speculation on, else ()
  chosen: jax.Array  # [B] drafts each row verifies at the next step (dynamic speculation; else k)
  size_steps: jax.Array  # [k+1] loop steps by the verify size that ran (drafts)
  row_size_steps: jax.Array  # [B, k+1] active steps of each row by the drafts it had verified
  proposes: jax.Array  # [] steps that ran the drafter's propose


@dataclasses.dataclass(frozen=True)
class _Static:
  graphdef: Any
  sampling: Sampling
  drafter: Drafter | None
  eos_ids: tuple[int, ...]
  max_steps: int
  check_nan: bool
  policy: dynamic_lib.Policy | None = None  # None: every step verifies what the drafter proposes


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _bucket_batch(b: int) -> int:
  return 1 << (b - 1).bit_length()


def _row_keys(seeds, step, salt):
  return jax.vmap(lambda s: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), step), salt))(seeds)


def _prefill(static: _Static, params, dweights, prompt, prompt_len, max_new, seeds, max_len: int) -> LoopState:
  """Prefills the padded prompt and builds the loop state."""
  module = nnx.merge(static.graphdef, params)
  drafter = static.drafter
  k = drafter.k if drafter else 0
  B, P = prompt.shape
  cache = cache_lib.init_cache(module.cfg.layers, B, max_len, module.cfg.kv_heads, module.cfg.head_dim)
  # Only slots < prompt_len - 1 count: the last prompt token is the first input
  # of the loop, which keeps every step alike (and AR is the k = 0 case).
  cache, features = module.prefill(prompt, cache, feature_layers=drafter.feature_layers if drafter else ())
  cache = cache_lib.advance(cache, prompt_len - 1)
  ctx = Context(prompt, prompt_len, features, jnp.zeros((B,), jnp.int32))
  dstate = drafter.init(dweights, ctx, static.sampling, max_len) if drafter else ()
  # The loop carries the features of the last verify pass ([B, k+1, ...]).
  features = jax.tree.map(lambda x: jnp.zeros((B, k + 1) + x.shape[2:], x.dtype), features)
  kk = max(k, 1)
  est, chosen = (), jnp.full((B,), k, jnp.int32)
  if static.policy is not None:
    est = dynamic_lib.init(B, k)
    chosen = jnp.where(max_new > 0, static.policy.choose(est), 0)
  return LoopState(
      cache=cache, history=jnp.zeros((B, max_len), jnp.int32).at[:, :P].set(prompt),
      logprobs=jnp.zeros((B, max_len), jnp.float32), length=prompt_len, done=max_new <= 0,
      nan=jnp.zeros((B,), bool), step=jnp.int32(0), steps=jnp.zeros((B,), jnp.int32),
      emitted_per_step=jnp.zeros((B, static.max_steps), jnp.int32), reached=jnp.zeros((B, kk), jnp.int32),
      accepted=jnp.zeros((B, kk), jnp.int32), features=features, feature_start=jnp.zeros((B,), jnp.int32),
      last_acc=jnp.zeros((B,), jnp.int32),
      dstate=dstate, est=est, chosen=chosen,
      size_steps=jnp.zeros((k + 1,), jnp.int32), row_size_steps=jnp.zeros((B, k + 1), jnp.int32),
      proposes=jnp.int32(0))


def verify_sizes(k: int, dynamic: bool = False) -> tuple[int, ...]:
  """Draft counts the verify pass is compiled for when drafts may be padded.

  A drafter that may propose fewer than k tokens (n-gram without a match)
  gets the smallest verify that covers every row's proposal, so a step with
  nothing to check costs one AR forward instead of a (k+1)-token one. With
  dynamic speculation every size 0..k is compiled for k <= 8 (the policy picks
  any; each size adds ~1.3 s of compile for SmolLM2 on a 2-core Xeon: k = 5
  compiles in ~12 s instead of ~5 s), and a ladder of them beyond.
  """
  if dynamic:
    ladder = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24)
    return tuple(range(k + 1)) if k <= 8 else tuple(sorted({n for n in ladder if n < k} | {k}))
  return tuple(sorted({0, min(1, k), min(3, k), k}))


def _judge(logits, drafts, q, sampling, keys, check_nan, k):
  """Accept rule, emitted tokens' log-probs and the NaN check for a verify over n = drafts.shape[1]
  drafts, padded to k: (n_acc [B], out [B, k+1] (-1 padded), logp [B, k+1], nan [B])."""
  n = drafts.shape[1]
  # One pass over [B, n+1, V] gives both: a NaN logit makes its row's logsumexp NaN, and
  # log p(x) = logit(x) - logsumexp (a full log_softmax would be materialised, then gathered).
  lse = jax.nn.logsumexp(logits, axis=-1)  # [B, n+1]
  nan = jnp.any(jnp.isnan(lse), axis=1) if check_nan else jnp.zeros(logits.shape[:1], bool)
  n_acc, out = accept_chain(logits, drafts, q, sampling, keys)
  logp = jnp.take_along_axis(logits, jnp.maximum(out, 0)[..., None], axis=-1)[..., 0] - lse
  pad = lambda x, v: jnp.pad(x, [(0, 0), (0, k - n)], constant_values=v)
  return n_acc, pad(out, -1), pad(logp, 0.0), nan


def _verify(module, tokens, pos, cache, feature_layers, sizes, drafts, q, sampling, keys, check_nan):
  """Target forward over [last, drafts] and the accept rule, at the smallest compiled size
  covering the proposals: -> (n_acc, out, logp, nan) as `_judge` gives them, cache, features,
  and the index in `sizes` of the size that ran."""
  k = tokens.shape[1] - 1
  if len(sizes) == 1:
    logits, cache, feats = module(tokens, pos, cache, feature_layers=feature_layers)
    return _judge(logits, drafts, q, sampling, keys, check_nan, k), cache, feats, jnp.int32(0)

  # The branches only read the cache and return the new K/V, written once after the
  # switch: a cache written inside lax.switch is copied in and out of every branch.
  # The accept rule and log-softmax run inside too, over the rows that exist (a
  # [B, k+1, V] result costs (k+1)/(n+1) times the work on short steps).
  def run(n, tokens, pos, cache, drafts, q):
    logits, _, feats = module(tokens[:, :n + 1], pos[:, :n + 1], cache, feature_layers=feature_layers,
                              write_cache=False)
    judged = _judge(logits, drafts[:, :n], None if q is None else q[:, :n], sampling, keys, check_nan, k)
    pad = lambda x: jnp.pad(x, [(0, 0), (0, k - n)] + [(0, 0)] * (x.ndim - 2))
    return judged, jax.tree.map(pad, feats)

  need = jnp.max(jnp.sum(jnp.cumprod(tokens[:, 1:] >= 0, axis=1), axis=1))
  idx = jnp.searchsorted(jnp.asarray(sizes), need)
  judged, feats = jax.lax.switch(idx, [functools.partial(run, n) for n in sizes], tokens, pos, cache, drafts, q)
  new_k, new_v = feats.pop("new_kv")
  cache = cache.replace(k=tuple(cache_write(c, n, cache.lengths) for c, n in zip(cache.k, new_k)),
                        v=tuple(cache_write(c, n, cache.lengths) for c, n in zip(cache.v, new_v)))
  return judged, cache, feats, idx


def _loop(static: _Static, params, dweights, state: LoopState, prompt_len, max_new, seeds) -> LoopState:
  """Draft -> verify -> accept -> commit until every row is done."""
  module = nnx.merge(static.graphdef, params)
  drafter = static.drafter
  k = drafter.k if drafter else 0
  tree = drafter.tree if drafter else None  # a tree drafter: k = its depth, nodes = its size - 1
  nodes = drafter.nodes if drafter else 0
  # A dynamic tree (EAGLE-2): propose returns (tokens [B, N], parent [B, N+1]), a topology per row.
  dynamic_tree = tree is not None and tree.is_dynamic
  parent = None
  feature_layers = drafter.feature_layers if drafter else ()
  policy = static.policy
  if policy is not None:
    sizes = policy.sizes
  else:
    sizes = verify_sizes(k) if drafter is not None and drafter.may_pad else (k,)
  B, max_len = state.history.shape
  kk = max(k, 1)
  eos = jnp.asarray(static.eos_ids or (-2,), jnp.int32)
  rows = jnp.arange(B)

  def step(s: LoopState, plain: bool = False) -> LoopState:
    """One draft -> verify -> accept -> commit step. plain: every row chose 0 drafts (dynamic
    speculation), so the step is exactly an AR step: one token, no drafter, no verify switch."""
    active = ~s.done
    last = s.history[rows, s.length - 1]
    chosen = s.chosen  # drafts each row may verify
    proposed = jnp.int32(0)
    width = 0 if plain else k  # drafts in this step's arrays
    if drafter and not plain:
      ctx = Context(s.history, s.length, s.features, s.feature_start)

      def propose(d):
        # The drafter first catches up on the last step (its features are the state's), so a
        # drafter skipped by plain steps is updated only before a step that proposes.
        update = lambda d: drafter.update(dweights, d, ctx, s.last_acc)
        d = jax.lax.cond(s.step > 0, update, lambda d: d, d)
        return drafter.propose(dweights, d, ctx, _row_keys(seeds, s.step, 1), static.sampling)

      if policy is None:
        dstate, drafts, q = propose(s.dstate)
        proposed = jnp.int32(1)
        if dynamic_tree:
          drafts, parent = drafts
      else:
        chosen = jnp.where(active, chosen, 0)
        proposed = jnp.any(chosen > 0)

        def skip(d):  # no row verifies a draft: the drafter is not asked
          shapes = jax.eval_shape(propose, d)
          q0 = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes[2])
          return d, jax.tree.map(lambda x: jnp.full(x.shape, -1, x.dtype), shapes[1]), q0  # tokens (, parent)

        dstate, drafts, q = jax.lax.cond(proposed, propose, skip, s.dstate)
        if dynamic_tree:
          drafts, parent = drafts
        chosen = policy.trim(chosen, drafts, q)
        keep = (chosen > 0)[:, None] if tree else jnp.arange(k)[None, :] < chosen[:, None]  # a tree: all or none
        drafts = jnp.where(keep, drafts, -1)
        proposed = proposed.astype(jnp.int32)
      drafts = jnp.where(active[:, None], drafts, -1)  # finished rows ask for no verify work
      step_sizes = sizes
    else:
      dstate, drafts, q, step_sizes = s.dstate, jnp.zeros((B, 0), jnp.int32), None, (0,)
    tokens = jnp.concatenate([last[:, None], drafts], axis=1)
    if tree is not None and not plain:
      if dynamic_tree:  # per-row topology from this step's parent arrays
        buffers = buffers_from_parents(parent, tree.width, tree.max_depth)
      else:
        buffers = tuple(jnp.asarray(b) for b in (tree.mask, tree.depth, tree.children))
      (n_acc, out, logp, nan), cache, feats = _verify_tree(
          module, tokens, s.cache, feature_layers, *buffers, tree.max_depth, drafter.tree_mode, q,
          static.sampling, _row_keys(seeds, s.step, 2), static.check_nan,
          (tree.num_nodes,) if dynamic_tree else tree_sizes(tree, drafter.may_pad))
      size_idx = jnp.int32(len(step_sizes) - 1)
      verified = jnp.where(jnp.any(drafts >= 0, axis=1), k, 0)  # [B] depths each row had checked
    else:
      pos = s.cache.lengths[:, None] + jnp.arange(width + 1)[None, :]
      (n_acc, out, logp, nan), cache, feats, size_idx = _verify(
          module, tokens, pos, s.cache, feature_layers, step_sizes, drafts, q, static.sampling,
          _row_keys(seeds, s.step, 2), static.check_nan)
      verified = jnp.sum(jnp.cumprod(drafts >= 0, axis=1), axis=1)  # [B] drafts each row had checked
    if width < k:  # the state carries the features of k + 1 tokens
      feats = jax.tree.map(lambda x: jnp.pad(x, [(0, 0), (0, k - width)] + [(0, 0)] * (x.ndim - 2)), feats)
    # Truncate at EOS and at max_new_tokens, both possibly inside the accepted block.
    j = jnp.arange(width + 1)[None, :]
    is_eos = jnp.any(out[..., None] == eos, axis=-1) & (j <= n_acc[:, None])
    eos_at = jnp.min(jnp.where(is_eos, j, width + 1), axis=1)
    budget = max_new - (s.length - prompt_len)
    n_emit = jnp.minimum(jnp.minimum(n_acc + 1, budget), eos_at + 1)
    n_emit = jnp.where(active & ~nan, n_emit, 0)
    done = s.done | nan | (eos_at < n_emit) | (n_emit >= budget)
    # Commit: write emitted ids and their log-probs after each row's history.
    write = j < n_emit[:, None]
    idx = jnp.where(write, s.length[:, None] + j, max_len)  # max_len: dropped
    history = s.history.at[rows[:, None], idx].set(out, mode="drop")
    logprobs = s.logprobs.at[rows[:, None], idx].set(logp, mode="drop")
    cache = cache_lib.advance(cache.replace(lengths=s.cache.lengths), n_emit)
    counted = active & ~nan
    ii = jnp.arange(kk)[None, :]
    reached = s.reached + (counted[:, None] & (ii < jnp.minimum(chosen, width)[:, None]) & (ii <= n_acc[:, None]))
    est, next_chosen = s.est, chosen
    if policy is not None:
      est = policy.observe(s.est, verified, n_acc, counted)
      next_chosen = jnp.where(done, 0, policy.choose(est))
    size = jnp.asarray(step_sizes, jnp.int32)[size_idx]
    accepted = s.accepted + (counted[:, None] & (ii < n_acc[:, None]))
    return LoopState(
        cache=cache, history=history, logprobs=logprobs, length=s.length + n_emit, done=done, nan=s.nan | nan,
        step=s.step + 1, steps=s.steps + counted, emitted_per_step=s.emitted_per_step.at[:, s.step].set(n_emit),
        reached=reached, accepted=accepted, features=feats, feature_start=s.length - 1, last_acc=n_acc,
        dstate=dstate, est=est, chosen=next_chosen,
        size_steps=s.size_steps.at[size].add(1),
        row_size_steps=s.row_size_steps.at[rows, verified].add(counted.astype(jnp.int32)),
        proposes=s.proposes + proposed)

  going = lambda s: (s.step < static.max_steps) & ~jnp.all(s.done)
  if policy is None or not drafter:
    return jax.lax.while_loop(going, step, state)

  # While every row chooses plain steps, run them in an inner loop whose body is an AR step:
  # the drafter's cond and the verify switch cost ~6% of a step when every branch is skipped.
  def body(s: LoopState) -> LoopState:
    s = step(s)
    plain = lambda s: going(s) & jnp.all(s.chosen == 0)
    return jax.lax.while_loop(plain, functools.partial(step, plain=True), s)

  return jax.lax.while_loop(going, body, state)


def tree_sizes(tree, may_pad: bool) -> tuple[int, ...]:
  """Node counts a tree verify is compiled for. Parents come before children in a Tree's
  node order, so every prefix of it is a tree: a drafter that may leave nodes out (-1)
  gets the smallest prefix covering every row's last proposed node (0: the root alone)."""
  N = tree.num_nodes
  if not may_pad:
    return (N,)
  return tuple(sorted({n for n in (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48) if n < N} | {N}))


def _verify_tree(module, tokens, cache, feature_layers, mask, depth, children, max_depth, mode, q, sampling, keys,
                 check_nan, sizes):
  """Target forward over [last, N tree nodes] (node i at slot length + i and position
  length + depth(i), seeing the prefix and its ancestors), the tree accept rule, and
  compaction of the accepted path into contiguous slots: -> (n_acc, out, logp, nan) as
  `_judge` gives them with k = max_depth, the cache, and the features along the path.

  The topology is arrays, shared by all rows (a static `tree.Tree`: mask [N+1, N+1], depth
  [N+1], children [N+1, W]) or per row (a dynamic tree, `tree.buffers_from_parents`: mask
  [B, N+1, N+1], depth [B, N+1], children [B, N+1, W]). With several `sizes` (`tree_sizes`),
  the smallest node prefix covering every row's nodes runs, inside a `lax.switch` that only
  reads the cache (as `_verify` does for chains)."""
  N1 = tokens.shape[1]
  pos = cache.lengths[:, None] + jnp.broadcast_to(depth, tokens.shape).astype(jnp.int32)

  def judge(logits, n):
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, n+1]; NaN where a node's logits hold one
    nan = jnp.any(jnp.isnan(lse), axis=1) if check_nan else jnp.zeros(logits.shape[:1], bool)
    kids = children[..., :n + 1, :]
    kids = jnp.where(kids <= n, kids, -1)  # the prefix's own children
    n_acc, path, out = accept_tree(logits, tokens[:, :n + 1], kids, None if q is None else q[:, :n + 1], sampling,
                                   keys, mode=mode, max_depth=max_depth)
    at = jnp.maximum(path, 0)  # [B, D+1]: the node whose logits drew each emitted token
    logp = (jnp.take_along_axis(jnp.take_along_axis(logits, at[:, :, None], axis=1),
                                jnp.maximum(out, 0)[..., None], axis=-1)[..., 0] - jnp.take_along_axis(lse, at, axis=1))
    return (n_acc, out, jnp.where(out >= 0, logp, 0.0), nan), path

  along = lambda feats, path: jax.tree.map(
      lambda x: jnp.take_along_axis(x, jnp.maximum(path, 0).reshape(path.shape + (1,) * (x.ndim - 2)), axis=1), feats)
  if len(sizes) == 1:
    logits, written, feats = module(jnp.maximum(tokens, 0), pos, cache, tree_mask=mask, feature_layers=feature_layers)
    judged, path = judge(logits, N1 - 1)
  else:
    def run(n, tokens, cache, q):
      logits, _, feats = module(jnp.maximum(tokens[:, :n + 1], 0), pos[:, :n + 1], cache,
                                tree_mask=mask[..., :n + 1, :n + 1], feature_layers=feature_layers, write_cache=False)
      judged, path = judge(logits, n)
      pad = lambda x: jnp.pad(x, [(0, 0), (0, N1 - 1 - n)] + [(0, 0)] * (x.ndim - 2))
      return judged, path, jax.tree.map(pad, feats)

    last = jnp.max(jnp.where(tokens[:, 1:] >= 0, jnp.arange(1, N1)[None, :], 0))  # the last node any row has
    idx = jnp.searchsorted(jnp.asarray(sizes), last)
    judged, path, feats = jax.lax.switch(idx, [functools.partial(run, n) for n in sizes], tokens, cache, q)
    new_k, new_v = feats.pop("new_kv")
    written = cache.replace(k=tuple(cache_write(c, n, cache.lengths) for c, n in zip(cache.k, new_k)),
                            v=tuple(cache_write(c, n, cache.lengths) for c, n in zip(cache.v, new_v)))
  written = written.replace(k=tuple(cache_lib.compact(c, path, cache.lengths) for c in written.k),
                            v=tuple(cache_lib.compact(c, path, cache.lengths) for c in written.v))
  return judged, written, along(feats, path)


def verify_ms(model: Model, drafts: int, context: int, repeats: int, n: int = 8,
              sampling: Sampling | None = None) -> float:
  """One loop step's verify of `drafts` drafts (batch 1, greedy unless `sampling`, after `context` cached tokens),
  timed as the loop runs it: a plain step (0 drafts) is the AR step, a drafting one goes through
  the verify switch (written-after K/V, features padded) and the accept rule; n steps in one
  jitted loop that carries the cache. The cost model's curve is made of these."""
  sizes = (0,) if drafts == 0 else (0, drafts)  # one branch runs; a 2-way switch compiles fast
  max_len = _round_up(context + drafts + 2, 128)
  cache = model.new_cache(1, max_len).replace(lengths=jnp.array([context], jnp.int32))
  tokens = jnp.full((1, drafts + 1), 7, jnp.int32)  # greedy rejects or accepts alike: same work
  pos = context + jnp.arange(drafts + 1, dtype=jnp.int32)[None]
  keys = jax.random.split(jax.random.key(0), 1)

  @jax.jit
  def run(params, cache):
    module = nnx.merge(model.graphdef, params)

    def body(_, carry):
      cache, acc = carry
      (n_acc, out, logp, nan), written, feats, _ = _verify(
          module, tokens, pos, cache, (), sizes, tokens[:, 1:], None, sampling or Sampling(), keys, True)
      return written.replace(lengths=cache.lengths), acc + logp[0, 0] + n_acc[0] + feats["hidden"][0, 0, 0]

    return jax.lax.fori_loop(0, n, body, (cache, jnp.float32(0)))[1]

  from specjax.cost_model import best_ms  # the one timing helper (cost_model imports this module lazily)
  return best_ms(lambda: jax.block_until_ready(run(model.params, cache)), repeats) / n


_COMPILED: dict = {}
# Executables kept, least recently used dropped first: each holds a few hundred memory maps
# of JIT code (~800 with dynamic speculation's verify branches), and Linux stops a process at
# vm.max_map_count (65530 by default) with a segfault in XLA's compiler, not an error.
MAX_COMPILED = 40


def _compiled(static: _Static, args, max_len: int):
  """(prefill, loop) executables for this static config and these shapes, and the compile seconds."""
  key = (static, max_len, jax.tree.map(lambda a: (a.shape, a.dtype), args[2:]),
         jax.tree.structure(args[0]), jax.tree.structure(args[1]))
  if key in _COMPILED:
    _COMPILED[key] = _COMPILED.pop(key)  # most recently used last
    return _COMPILED[key], 0.0
  t0 = time.perf_counter()
  prefill = jax.jit(functools.partial(_prefill, static, max_len=max_len)).lower(*args).compile()
  state = jax.eval_shape(functools.partial(_prefill, static, max_len=max_len), *args)
  loop = jax.jit(functools.partial(_loop, static), donate_argnums=(2,)).lower(
      args[0], args[1], state, *args[3:]).compile()
  _COMPILED[key] = (prefill, loop)
  while len(_COMPILED) > MAX_COMPILED:
    _COMPILED.pop(next(iter(_COMPILED)))
  return _COMPILED[key], time.perf_counter() - t0


@dataclasses.dataclass
class GenerateOutput:
  """Per row: new tokens only (not the prompt)."""

  tokens: list[list[int]]
  texts: list[str] | None
  logprobs: list[np.ndarray]
  stats: dict


def _prepare_prompts(model: Model, prompts, chat: bool) -> list[list[int]]:
  if isinstance(prompts, (str, bytes)) or (isinstance(prompts, Sequence) and prompts
                                           and isinstance(prompts[0], (int, np.integer))):
    raise ValueError("prompts must be a list of prompts (strings or lists of ids); wrap a single prompt in a list")
  prompts = list(prompts) if prompts is not None else []
  if not prompts:
    raise ValueError("prompts is empty; pass at least one prompt (a string or a list of token ids)")
  out = []
  vocab = model.config.vocab_size
  for i, p in enumerate(prompts):
    if isinstance(p, str):
      if model.tokenizer is None:
        raise ValueError(f"prompt {i} is a string but the model has no tokenizer; pass token ids")
      ids = model.tokenizer.encode(model.tokenizer.apply_chat_template(p) if chat else p)
    else:
      arr = np.asarray(p)
      if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"prompt {i} must be a string or a 1-D list of int token ids, got {type(p).__name__} "
                         f"with dtype {arr.dtype} and shape {arr.shape}")
      ids = arr.astype(np.int64).tolist()
    if not ids:
      raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
      raise ValueError(f"prompt {i} has token ids outside [0, {vocab}): {bad[:5]}")
    out.append(ids)
  return out


def generate(model: Model, prompts, drafter: Drafter | None = None, sampling: Sampling | None = None,
             max_new_tokens: int = 128, seed: int | Sequence[int] = 0, *, chat: bool = False,
             cache_len: int | None = None, check_nan: bool = True,
             stop_ids: Sequence[int] | None = None, dynamic: bool | CostModel = True) -> GenerateOutput:
  """Generates up to max_new_tokens per prompt, speculatively when a drafter is given.

  Args:
    model: target model (`load_model()`).
    prompts: list of strings (encoded as plain text, or through the chat template
      when chat=True) or of lists of token ids.
    drafter: None for autoregressive decoding, or any drafter (`make_drafter`).
    sampling: the policy; default greedy.
    max_new_tokens: per-row budget of new tokens (EOS stops a row earlier).
    seed: one seed for all rows, or one per row. A row's randomness depends only
      on its seed and step, never on its batch position or neighbours.
    cache_len: cache slots per row; default: enough for prompt + max_new_tokens + k.
    check_nan: stop and raise ValueError if the target ever produces NaN logits.
    stop_ids: token ids that end a row (default: the model's EOS ids); the stop
      token is emitted, nothing after it.
    dynamic: dynamic speculation (`specjax/dynamic.py`): each step, each row verifies the
      number of drafts (0 = a plain step) that maximises its expected tokens per unit cost,
      from its running acceptance and the machine's cost model. True: the measured, cached
      `cost_model(model, drafter)`; a `CostModel`: that one; a `dynamic.Policy`: that policy
      (its own cost and compiled sizes); False: every step verifies what the drafter proposes
      (the behaviour before dynamic speculation). Lossless either way.
  """
  kernels.selected_isa()  # a bad SPECJAX_CPU_ISA fails here, before anything compiles
  sampling = Sampling() if sampling is None else sampling
  if not isinstance(sampling, Sampling):
    raise ValueError(f"sampling must be a specjax.Sampling, got {type(sampling).__name__}")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")
  ids = _prepare_prompts(model, prompts, chat)
  k = nodes = 0
  if drafter is not None:
    if not isinstance(drafter, Drafter):
      raise ValueError(f"drafter must be None or a specjax drafter (make_drafter), got {type(drafter).__name__}")
    k, nodes = drafter.k, drafter.nodes  # nodes: drafted tokens one verify holds (a tree's N; k for a chain)
    if drafter.vocab_size is not None and drafter.vocab_size != model.config.vocab_size:
      raise ValueError(f"drafter vocabulary {drafter.vocab_size} != target vocabulary {model.config.vocab_size}; "
                       "a drafter must share the target's tokenizer")
    if (drafter.tokenizer_fingerprint and model.tokenizer is not None
        and drafter.tokenizer_fingerprint != model.tokenizer.fingerprint()):
      raise ValueError(f"drafter tokenizer {drafter.tokenizer_fingerprint} differs from the target's "
                       f"{model.tokenizer.fingerprint()}; build the drafter for this target")
  if not (isinstance(dynamic, (bool, CostModel, dynamic_lib.Policy))):
    raise ValueError(f"dynamic={dynamic!r} must be True, False or a specjax.CostModel")
  policy, setup_s = None, 0.0
  if drafter is not None and dynamic is not False:
    t0 = time.perf_counter()
    if isinstance(dynamic, dynamic_lib.Policy):
      policy = dynamic
      policy.cost.check_k(nodes)
      if policy.sizes[0] != 0 or max(policy.sizes) > k or list(policy.sizes) != sorted(set(policy.sizes)):
        raise ValueError(f"dynamic policy sizes={policy.sizes} must be increasing, start at 0 and end <= k={k}")
      if drafter.tree is not None and policy.sizes != (0, k):
        raise ValueError(f"dynamic policy sizes={policy.sizes}: a tree drafter verifies its whole tree or "
                         f"nothing, sizes=(0, {k})")
    else:
      cm = cost_model(model, drafter, sampling=sampling) if dynamic is True else dynamic
      cm.check_k(nodes)
      cost = CostModel(cm.verify[:nodes + 1], cm.draft)
      if drafter.tree is None:
        policy = dynamic_lib.Policy(cost, verify_sizes(k, dynamic=True))
      else:  # plain, or the tree: its depth k priced as a verify of its nodes -- or, when the
        # drafter leaves nodes out and the verify shrinks to what it proposed, of one chain of k
        policy = dynamic_lib.Policy(cost, (0, k), verify_tokens=(1, (k if drafter.may_pad else nodes) + 1))
    setup_s = time.perf_counter() - t0
  seeds = [seed] * len(ids) if isinstance(seed, (int, np.integer)) else list(seed)
  if len(seeds) != len(ids) or not all(isinstance(s, (int, np.integer)) for s in seeds):
    raise ValueError(f"seed must be an int or one int per prompt ({len(ids)}), got {seed!r}")
  longest = max(map(len, ids))
  need = longest + max_new_tokens + nodes + 1
  if cache_len is not None:
    if need > cache_len:
      raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} + {nodes} drafted "
                       f"{'tree nodes' if drafter is not None and drafter.tree is not None else 'tokens (k)'} needs "
                       f"{need} cache slots > cache_len={cache_len}; shorten the prompt or raise cache_len")
    max_len = cache_len
  else:
    max_len = _round_up(need, 128)
  if need > model.config.max_context:
    raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} + {nodes} drafted needs {need} positions, "
                     f"beyond the model's context of {model.config.max_context}; shorten the prompt")
  B = len(ids)
  Bp, P = _bucket_batch(B), min(_round_up(longest, 64), max_len)  # the padded prompt must fit the cache
  prompt = np.zeros((Bp, P), np.int32)
  plen = np.ones((Bp,), np.int32)
  budget = np.zeros((Bp,), np.int32)  # padding rows start done
  for i, row in enumerate(ids):
    prompt[i, :len(row)] = row
    plen[i], budget[i] = len(row), max_new_tokens
  seeds_arr = np.zeros((Bp,), np.uint32)
  seeds_arr[:B] = np.asarray(seeds, np.int64) % (1 << 32)
  max_steps = _round_up(max_new_tokens, 32)
  stop = tuple(model.config.eos_ids) if stop_ids is None else tuple(int(t) for t in stop_ids)
  static = _Static(model.graphdef, sampling, drafter, stop, max_steps, check_nan, policy)
  dweights = drafter.weights if drafter is not None else ()
  args = (model.params, dweights, jnp.asarray(prompt), jnp.asarray(plen), jnp.asarray(budget), jnp.asarray(seeds_arr))
  (prefill, loop), compile_s = _compiled(static, args, max_len)
  t0 = time.perf_counter()
  state = jax.block_until_ready(prefill(*args))
  t1 = time.perf_counter()
  state = jax.block_until_ready(loop(args[0], args[1], state, *args[3:]))
  t2 = time.perf_counter()
  times = {"wall_s": t2 - t0, "prefill_s": t1 - t0, "decode_s": t2 - t1, "cost_model_s": setup_s}
  return _collect(model, state, ids, k, times, compile_s, policy)


def _by_drafts(counts) -> dict[int, int]:
  return {n: int(c) for n, c in enumerate(counts) if c}


def _collect(model, state: LoopState, ids, k, times, compile_s, policy) -> GenerateOutput:
  history, logprobs, length, steps, per_step, reached, accepted, nan, size_steps, row_size_steps, proposes = (
      jax.device_get((state.history, state.logprobs, state.length, state.steps, state.emitted_per_step,
                      state.reached, state.accepted, state.nan, state.size_steps, state.row_size_steps,
                      state.proposes)))
  if nan[:len(ids)].any():
    rows = np.nonzero(nan[:len(ids)])[0].tolist()
    raise ValueError(f"the target produced NaN logits for rows {rows}; check the model weights and inputs "
                     "(generation stopped for those rows instead of emitting a wrong token)")
  tokens, lps, rows = [], [], []
  for i, row in enumerate(ids):
    lo, hi = len(row), int(length[i])
    tokens.append(history[i, lo:hi].tolist())
    lps.append(logprobs[i, lo:hi])
    n_steps = int(steps[i])
    acc_pos = (accepted[i, :k] / np.maximum(reached[i, :k], 1)).tolist() if k else []
    rows.append({"new_tokens": hi - lo, "steps": n_steps,
                 "mean_accepted": (hi - lo) / n_steps if n_steps else 0.0,
                 "accepted_per_step": per_step[i, :n_steps].tolist(),
                 "acceptance_per_position": acc_pos,
                 "reached_per_position": reached[i, :k].tolist() if k else [],
                 "accepted_per_position": accepted[i, :k].tolist() if k else [],
                 "steps_by_drafts": _by_drafts(row_size_steps[i])})
  total_new = sum(r["new_tokens"] for r in rows)
  total_steps = sum(r["steps"] for r in rows)
  reach = np.sum([r["reached_per_position"] for r in rows], axis=0) if k else np.zeros(0)
  acc = np.sum([r["accepted_per_position"] for r in rows], axis=0) if k else np.zeros(0)
  wall = times["wall_s"]
  stats = {"rows": rows, **times, "compile_s": compile_s, "new_tokens": total_new, "steps": total_steps,
           "tokens_per_s": total_new / wall if wall > 0 else 0.0,
           "decode_step_ms": 1e3 * times["decode_s"] / max(int(state.step), 1),
           "mean_accepted": total_new / total_steps if total_steps else 0.0,
           "acceptance_per_position": (acc / np.maximum(reach, 1)).tolist(), "k": k,
           "steps_by_drafts": _by_drafts(size_steps), "propose_steps": int(proposes),
           "dynamic": policy is not None,
           "cost_model": None if policy is None else {"verify": list(policy.cost.verify), "draft": policy.cost.draft}}
  texts = [model.tokenizer.decode(t) for t in tokens] if model.tokenizer is not None else None
  return GenerateOutput(tokens, texts, lps, stats)
