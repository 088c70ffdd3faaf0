"""Dynamic speculation: per step and per row, how many drafts to verify (0 = a plain step).

Each row keeps a running estimate of the conditional acceptance a_i of draft position i
(the chance draft i is accepted when drafts 1 .. i-1 were): discounted counts of
acceptances and of examinations, shrunk towards a prior. The prior of position i is
the estimate at position i - 1 (position 1's is PRIOR), so positions a row has not
verified lately follow the ones it has: a row that accepts well at position 1 is
willing to try deeper, one that does not is not. Counts decay by DECAY per step, so an
estimate forgets a few dozen steps back and slowly returns to the prior when unobserved.

With the machine's cost model (`cost_model.CostModel`), a row verifying n drafts
expects E(n) = 1 + sum_{i<=n} prod_{j<=i} a_j tokens for a cost of c(n + 1), plus one
drafter step if any draft is asked for; the row takes the compiled size n that
maximises E(n) / cost(n), sizes n > 0 discounted by 1 + MARGIN (ties go to the smaller
n). A row that has verified nothing for PROBE_EVERY steps probes once with the smallest
size > 0, so a drafter that starts paying again is noticed even where the prior alone
would not try it. While no row drafts, the drafter is not run at all (decode.py).

Lossless: the choice depends only on past acceptance and step counts, never on the
drafts of this step or on the token about to be drawn (`Policy.trim` is the seam a
test uses to show that a policy which peeks is caught).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from specjax.cost_model import CostModel

PRIOR = 0.6  # position 1's prior acceptance
STRENGTH = 1.0  # the prior's weight, in examinations
DECAY = 0.98  # per-step discount of the counts (a memory of ~50 steps)
PROBE_EVERY = 32  # a row idle this many steps verifies once at the smallest size > 0
# Drafting must promise this much more than a plain step: the cost model is timed on a
# machine others share and leaves out per-step overheads of ~1-3% (the verify switch).
MARGIN = 0.05


@struct.dataclass
class Estimates:
  hits: jax.Array  # [B, k] discounted count of steps where draft position i was accepted
  seen: jax.Array  # [B, k] ... where it was examined (verified, all earlier ones accepted)
  idle: jax.Array  # [B] consecutive steps without a draft verified


def init(batch: int, k: int) -> Estimates:
  return Estimates(jnp.zeros((batch, k), jnp.float32), jnp.zeros((batch, k), jnp.float32),
                   jnp.zeros((batch,), jnp.int32))


def acceptance(est: Estimates) -> jax.Array:
  """Conditional acceptance per position [B, k], each shrunk towards the previous position's."""
  prior = jnp.full(est.hits.shape[:1], PRIOR, jnp.float32)
  out = []
  for i in range(est.hits.shape[1]):
    prior = (est.hits[:, i] + STRENGTH * prior) / (est.seen[:, i] + STRENGTH)
    out.append(prior)
  return jnp.stack(out, axis=1)


@dataclasses.dataclass(frozen=True)
class Policy:
  """How many drafts each row verifies. `sizes` are the verify sizes compiled (drafts, 0 first)."""

  cost: CostModel
  sizes: tuple[int, ...]
  # Tokens one verify of each size holds (default n + 1; a tree drafter's sizes are depths
  # (0, D), verified as 1 and N + 1 tokens).
  verify_tokens: tuple[int, ...] | None = None

  def __post_init__(self):
    if self.verify_tokens is not None and len(self.verify_tokens) != len(self.sizes):
      raise ValueError(f"Policy verify_tokens={self.verify_tokens} needs one entry per size in {self.sizes}")

  def expected_tokens(self, est: Estimates) -> jax.Array:
    """E(n) [B, len(sizes)]: expected tokens emitted by a step verifying each size."""
    reach = jnp.cumprod(acceptance(est), axis=1)  # P(drafts 1..i all accepted)
    gained = jnp.concatenate([jnp.zeros_like(reach[:, :1]), jnp.cumsum(reach, axis=1)], axis=1)
    return 1.0 + gained[:, jnp.asarray(self.sizes)]

  def step_costs(self) -> jax.Array:
    """cost(n) [len(sizes)] in one-token forwards: the verify, and a drafter step when n > 0."""
    tokens = self.verify_tokens or tuple(n + 1 for n in self.sizes)
    return jnp.asarray([self.cost.c(t) + (self.cost.draft if n else 0.0) for n, t in zip(self.sizes, tokens)],
                       jnp.float32)

  def choose(self, est: Estimates) -> jax.Array:
    """Drafts to verify per row [B]: the size with the most expected tokens per unit cost."""
    margin = jnp.asarray([1.0] + [1.0 + MARGIN] * (len(self.sizes) - 1), jnp.float32)
    best = jnp.argmax(self.expected_tokens(est) / (self.step_costs() * margin)[None], axis=1)
    n = jnp.asarray(self.sizes, jnp.int32)[best]
    probe = min(s for s in self.sizes if s > 0)
    return jnp.where((n == 0) & (est.idle >= PROBE_EVERY), probe, n)

  def trim(self, n: jax.Array, drafts: jax.Array, q) -> jax.Array:
    """Identity. The policy never looks at this step's drafts (that would break losslessness);
    tests/test_dynamic.py overrides this to show that a policy which does is caught."""
    return n

  def observe(self, est: Estimates, verified: jax.Array, n_acc: jax.Array, counted: jax.Array) -> Estimates:
    """After a step: `verified` [B] drafts each row had verified, `n_acc` [B] accepted, for the
    `counted` [B] rows (active ones; others keep their estimates)."""
    i = jnp.arange(est.hits.shape[1])[None]
    seen = ((i < verified[:, None]) & (i <= n_acc[:, None])).astype(jnp.float32)
    hits = (i < n_acc[:, None]).astype(jnp.float32)
    c = counted[:, None]
    return Estimates(hits=jnp.where(c, DECAY * est.hits + hits, est.hits),
                     seen=jnp.where(c, DECAY * est.seen + seen, est.seen),
                     idle=jnp.where(counted, jnp.where(verified > 0, 0, est.idle + 1), est.idle))
