"""Evaluation: per-position acceptance and tau of a drafter on held-out prompts."""
from __future__ import annotations


def acceptance(model, drafter, prompts: list, max_new: int = 128, temperature: float = 0.0) -> dict:
  """Runs the engine (batch 1 per prompt) and pools its acceptance statistics.

  prompts: chat-formatted token id lists (`data.encode_prompts`) or plain strings (sent
  through the chat template).

  Returns tau (mean tokens per verify step), acceptance per draft position, tokens/s
  and the AR tokens/s on the same prompts for the speedup.
  """
  from specjax.decode import generate  # evaluation drives the engine, as a user would
  from specjax.sampling import Sampling
  sampling = Sampling(temperature=temperature)
  new = steps = ar_new = 0
  wall = ar_wall = 0.0
  reached = accepted = None
  for i, p in enumerate(prompts):
    out = generate(model, [p], drafter=drafter, sampling=sampling, max_new_tokens=max_new, chat=isinstance(p, str),
                   seed=i)
    ar = generate(model, [p], drafter=None, sampling=sampling, max_new_tokens=max_new, chat=isinstance(p, str),
                  seed=i)
    row = out.stats["rows"][0]
    new, steps, wall = new + row["new_tokens"], steps + row["steps"], wall + out.stats["wall_s"]
    ar_new, ar_wall = ar_new + ar.stats["new_tokens"], ar_wall + ar.stats["wall_s"]
    r, a = row["reached_per_position"], row["accepted_per_position"]
    reached = r if reached is None else [x + y for x, y in zip(reached, r)]
    accepted = a if accepted is None else [x + y for x, y in zip(accepted, a)]
  return {"tau": new / max(steps, 1),
          "acceptance_per_position": [round(a / max(r, 1), 4) for a, r in zip(accepted, reached)],
          "tokens_per_s": new / wall, "ar_tokens_per_s": ar_new / ar_wall,
          "speedup": (new / wall) / (ar_new / ar_wall), "prompts": len(prompts)}


def draft_step_fraction(model, drafter, cache_len: int = 512, reps: int = 50) -> dict:
  """Wall time of one draft step ((propose + update) / k, batch 1) over one target decode step."""
  import time

  import jax
  import jax.numpy as jnp
  from flax import nnx

  from specjax.drafters.base import Context
  from specjax.sampling import Sampling

  cfg, k, sampling = model.config, drafter.k, Sampling()
  P = 64
  prompt = jnp.arange(3, 3 + P, dtype=jnp.int32)[None]
  layers = drafter.feature_layers

  @jax.jit
  def target_step(params, cache, tok, pos):
    logits, cache, feats = nnx.merge(model.graphdef, params)(tok, pos, cache, feature_layers=layers)
    return logits, cache, feats

  cache = model.new_cache(1, cache_len).replace(lengths=jnp.array([P], jnp.int32))
  one = (jnp.ones((1, 1), jnp.int32), jnp.array([[P]], jnp.int32))
  _, _, feats = target_step(model.params, cache, *one)
  feats_k = jax.tree.map(lambda x: jnp.repeat(x, k + 1, axis=1), feats)
  history = jnp.zeros((1, cache_len), jnp.int32).at[:, :P].set(prompt)
  ctx = Context(history, jnp.array([P]), feats_k, jnp.array([P - k - 1]))
  prompt_feats = jax.tree.map(lambda x: jnp.repeat(x, P, axis=1), feats)
  init = jax.jit(lambda w, c: drafter.init(w, c, sampling, cache_len))
  dstate = init(drafter.weights, Context(prompt, jnp.array([P]), prompt_feats, jnp.zeros((1,), jnp.int32)))
  keys = jax.random.split(jax.random.key(0), 1)

  @jax.jit
  def draft(w, dstate, ctx):
    dstate, drafts, _ = drafter.propose(w, dstate, ctx, keys, sampling)
    return drafter.update(w, dstate, ctx, jnp.zeros((1,), jnp.int32)), drafts

  def timeit(fn):
    jax.block_until_ready(fn())
    t0 = time.perf_counter()
    for _ in range(reps):
      out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps

  t_target = timeit(lambda: target_step(model.params, cache, *one))
  t_draft = timeit(lambda: draft(drafter.weights, dstate, ctx)) / k
  return {"target_step_ms": 1e3 * t_target, "draft_step_ms": 1e3 * t_draft, "fraction": t_draft / t_target}
