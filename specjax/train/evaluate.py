"""Evaluation: per-position acceptance and tau of a drafter on held-out prompts."""
from __future__ import annotations


def acceptance(model, drafter, prompts: list[str], max_new: int = 128, temperature: float = 0.0) -> dict:
  """Runs the engine (batch 1 per prompt, chat template) and pools its acceptance statistics.

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
    out = generate(model, [p], drafter=drafter, sampling=sampling, max_new_tokens=max_new, chat=True, seed=i)
    ar = generate(model, [p], drafter=None, sampling=sampling, max_new_tokens=max_new, chat=True, seed=i)
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
