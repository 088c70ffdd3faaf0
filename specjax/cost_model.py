"""The machine's cost of speculation: c(T) = forward(T) / forward(1), and each drafter's propose.

    cm = sj.cost_model(model)            # verify curve, measured once per machine, then cached
    cm = sj.cost_model(model, drafter)   # ... and that drafter's propose cost
    cm.verify[T - 1]                     # c(T): a verify of T tokens in units of a one-token step
    cm.draft                             # one propose, in the same unit

Every verify is timed as the decode loop runs it (`decode.verify_ms`: the forward, the
verify switch and the accept rule), several in one jitted `fori_loop` that carries the
KV cache (a bare jitted call would also time a copy of the cache). The curve is made non-decreasing (running max) so that timing noise
never makes a longer verify look cheaper, and c(1) = 1 by definition.

Cached as JSON under $SPECJAX_CACHE (default ~/.cache/specjax), beside the compiled
kernels, in a file keyed by the CPU's flags, the kernels' sources and selected ISA
variant ($SPECJAX_CPU_ISA, $SPECJAX_CPU_KERNEL), the jax/jaxlib versions and backend,
and the model's config and parameter shapes (packed or not). A corrupt file is
re-measured with a warning.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from specjax.drafters.base import Context, Drafter
from specjax.sampling import Sampling

FORMAT = 4  # 2: a drafter step is propose + update; 3: verify timed as the loop runs it; 4: per sampling mode
K_MAX = 8  # drafts per step the default curve covers (it grows when a drafter needs more)
CONTEXT = 256  # cached tokens behind every timed forward
_MEASURED_T = (1, 2, 3, 4, 5, 6)  # timed exactly; beyond these only the last T, in between interpolated


@dataclasses.dataclass(frozen=True)
class CostModel:
  """verify[T - 1] = c(T) = forward(T) / forward(1) for T = 1 .. len(verify), with c(1) = 1 and
  non-decreasing; draft = one drafter step (propose + update), relative to forward(1)."""

  verify: tuple[float, ...]
  draft: float = 0.0

  def __post_init__(self):
    try:
      verify = tuple(float(c) for c in self.verify)
    except (TypeError, ValueError):
      raise ValueError(f"CostModel verify={self.verify!r} must be a sequence of numbers c(1), c(2), ...") from None
    if not verify:
      raise ValueError("CostModel verify=() is empty; it needs c(1) = 1 and one c(T) per verify size")
    if not all(math.isfinite(c) and c > 0 for c in verify):
      raise ValueError(f"CostModel verify={verify} must hold finite positive costs")
    if verify[0] != 1.0:
      raise ValueError(f"CostModel verify[0] = c(1) = {verify[0]!r} must be 1 (costs are relative to one "
                       "one-token forward)")
    drops = [(t + 1, a, b) for t, (a, b) in enumerate(zip(verify, verify[1:])) if b < a]
    if drops:
      t, a, b = drops[0]
      raise ValueError(f"CostModel verify={verify} must be non-decreasing: c({t + 1}) = {b} < c({t}) = {a}")
    if isinstance(self.draft, bool) or not isinstance(self.draft, (int, float)) or not (
        math.isfinite(self.draft) and self.draft >= 0):
      raise ValueError(f"CostModel draft={self.draft!r} must be a finite number >= 0 (a propose's cost "
                       "relative to one one-token forward)")
    object.__setattr__(self, "verify", verify)
    object.__setattr__(self, "draft", float(self.draft))

  def check_k(self, k: int) -> None:
    if len(self.verify) < k + 1:
      raise ValueError(f"CostModel verify has {len(self.verify)} entries but k={k} drafts need c(1) .. c({k + 1}) "
                       f"({k + 1} entries)")

  def c(self, T: int) -> float:
    return self.verify[T - 1]


def monotone_curve(forward_ms) -> tuple[float, ...]:
  """forward_ms[T - 1] (noisy timings) -> c(T): relative to forward(1), made non-decreasing."""
  return tuple(float(c) for c in np.maximum.accumulate(np.asarray(forward_ms, np.float64) / forward_ms[0]))


# ----------------------------------------------------------------------------------------------
# Timing (the one implementation; bench/ar_step.py uses it too)


def best_ms(fn, repeats: int) -> float:
  """Best of `repeats` calls of fn after one warm-up, in ms."""
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return 1e3 * min(times)


def forward_ms(model, context: int, T: int, repeats: int, n: int = 16) -> float:
  """One target forward of T new tokens after `context` cached tokens (batch 1), timed as
  in the decode loop: n forwards in one jitted loop that carries the cache (a bare jitted
  call would also time a copy of the cache, which the generate loop never makes)."""
  max_len = -(-(context + T + 1) // 128) * 128
  cache = model.new_cache(1, max_len).replace(lengths=jnp.array([context], jnp.int32))
  tokens = jnp.ones((1, T), jnp.int32)
  pos = context + jnp.arange(T, dtype=jnp.int32)[None]

  @jax.jit
  def run(params, cache):
    module = model.module(params)

    def body(_, carry):
      cache, acc = carry
      logits, cache, _ = module(tokens, pos, cache)
      return cache, acc + logits[0, -1, 0]  # each forward feeds the result

    return jax.lax.fori_loop(0, n, body, (cache, jnp.float32(0)))[1]

  return best_ms(lambda: jax.block_until_ready(run(model.params, cache)), repeats) / n


def propose_ms(model, drafter: Drafter, context: int, repeats: int, n: int = 8, sampling: Sampling | None = None) -> float:
  """One drafter step, `propose` then `update` after a verify of k + 1 tokens (batch 1, after
  `context` tokens, under `sampling`: greedy by default; sampling makes a learned drafter warp
  its full-vocabulary q per draft), timed like `forward_ms`: n steps in one jitted loop that
  carries the drafter's state."""
  k, V = drafter.k, model.config.vocab_size
  max_len = -(-(context + k + 2) // 128) * 128
  prompt = jnp.asarray((np.arange(context) * 7919 % (V - 3) + 3)[None], jnp.int32)
  length = jnp.array([context], jnp.int32)
  sampling = Sampling() if sampling is None else sampling

  @jax.jit
  def init(params, dweights):
    module = model.module(params)
    _, feats = module.prefill(prompt, model.new_cache(1, max_len), feature_layers=drafter.feature_layers)
    dstate = drafter.init(dweights, Context(prompt, length, feats, jnp.zeros((1,), jnp.int32)), sampling, max_len)
    feats = jax.tree.map(lambda x: jnp.zeros((1, k + 1) + x.shape[2:], x.dtype), feats)
    return dstate, feats

  dstate, feats = init(model.params, drafter.weights)
  history = jnp.zeros((1, max_len), jnp.int32).at[:, :context].set(prompt)
  ctx = Context(history, length, feats, length - 1)
  keys = jax.random.split(jax.random.key(0), 1)

  @jax.jit
  def run(dweights, dstate):
    def body(_, carry):
      dstate, acc = carry
      dstate, drafts, _ = drafter.propose(dweights, dstate, ctx, keys, sampling)
      after = Context(history, length + 1, feats, length - 1)
      dstate = drafter.update(dweights, dstate, after, jnp.zeros((1,), jnp.int32))
      # Every draft (and a dynamic tree's parents) feeds the result: nothing is dead code.
      return dstate, acc + sum(jnp.sum(x) for x in jax.tree.leaves(drafts))

    return jax.lax.fori_loop(0, n, body, (dstate, jnp.int32(0)))[1]

  return best_ms(lambda: jax.block_until_ready(run(drafter.weights, dstate)), repeats) / n


# ----------------------------------------------------------------------------------------------
# The cache


def cache_dir() -> str:
  from specjax import kernels
  return kernels._cache_dir()  # beside the compiled kernels


def _cpu_flags() -> str:
  from specjax import kernels
  return " ".join(sorted(kernels.cpu_flags()))


def _isa() -> str:
  from specjax import kernels
  return kernels.selected_isa()  # the kernel variant in use (forced_isa, $SPECJAX_CPU_ISA or the best)


def _kernel_sources() -> str:
  import specjax.kernels as kernels
  root = os.path.dirname(os.path.abspath(kernels.__file__))
  h = hashlib.sha256()
  for name in sorted(os.listdir(root)):
    if name.endswith((".cc", ".h", ".py")):
      with open(os.path.join(root, name), "rb") as f:
        h.update(name.encode() + b"\0" + f.read())
  return h.hexdigest()[:16]


def _tree_shapes(tree) -> str:
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  text = ";".join(f"{jax.tree_util.keystr(p)}:{getattr(x, 'shape', ())}:{getattr(x, 'dtype', type(x).__name__)}"
                  for p, x in leaves)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def machine_key(model) -> dict:
  """What the verify curve depends on; its hash names the cache file."""
  import jaxlib
  return {"format": FORMAT, "cpu_flags": _cpu_flags(), "cpu_isa": _isa(),
          "cpu_kernel": os.environ.get("SPECJAX_CPU_KERNEL", "1"), "kernel_sources": _kernel_sources(),
          "jax": jax.__version__, "jaxlib": jaxlib.__version__, "backend": jax.default_backend(),
          "model": repr(model.config), "params": _tree_shapes(model.params), "context": CONTEXT}


def drafter_key(drafter: Drafter) -> str:
  """The drafter's class, name, config fields (not its weights' values) and weight shapes."""
  fields = {f.name: getattr(drafter, f.name) for f in dataclasses.fields(drafter)
            if f.name not in ("weights", "graphdef")}
  config = hashlib.sha256(repr(sorted(fields.items())).encode()).hexdigest()[:12]
  return f"{type(drafter).__name__}/{drafter.name}/{config}/{_tree_shapes(drafter.weights)}"


def cache_path(model) -> str:
  key = hashlib.sha256(json.dumps(machine_key(model), sort_keys=True).encode()).hexdigest()[:16]
  return os.path.join(cache_dir(), f"cost-{key}.json")


def _read(path: str, key: dict) -> dict | None:
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      data = json.load(f)
    if data.get("key") != key:
      raise ValueError("its key differs from this machine's")
    for curve in data["modes"].values():
      CostModel(tuple(curve["verify"]))
      if not all(isinstance(v, (int, float)) and v >= 0 for v in curve["draft"].values()):
        raise ValueError("a draft cost is not a number >= 0")
    return data
  except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
    warnings.warn(f"specjax: cached cost model {path} is unreadable ({e}); measuring it again", stacklevel=3)
    return None


def _write(path: str, data: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".json", dir=os.path.dirname(path))
  with os.fdopen(fd, "w") as f:
    json.dump(data, f, indent=1)
  os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file


def measure_verify(model, t_max: int, repeats: int = 3, n: int = 4, sampling: Sampling | None = None) -> list[float]:
  """Verify step ms for T = 1 .. t_max tokens (T - 1 drafts), as the decode loop runs it (accept
  rule and switch included: ~0.1 forward more than a bare forward(3) here, which the policy
  would otherwise leave out): T in _MEASURED_T and t_max timed, the rest interpolated."""
  from specjax.decode import verify_ms  # decode imports this module
  ts = sorted({t for t in _MEASURED_T if t <= t_max} | {t_max})
  ms = [verify_ms(model, t - 1, CONTEXT, repeats, n, sampling) for t in ts]
  return np.interp(np.arange(1, t_max + 1), ts, ms).tolist()


_LOADED: dict = {}


def sampling_mode(sampling: Sampling | None) -> str:
  """What the costs depend on in a policy: greedy, or sampling with its top-k / top-p (the
  warps over the vocabulary they add), not the temperature."""
  if sampling is None or sampling.greedy:
    return "greedy"
  return f"sampled top_k={sampling.top_k} top_p={sampling.top_p:g}"


def cost_model(model, drafter: Drafter | None = None, *, sampling: Sampling | None = None, k_max: int = K_MAX,
               refresh: bool = False) -> CostModel:
  """The cost model of this machine for `model` (and `drafter`'s propose) under `sampling`
  (greedy by default: at T > 0 the accept rule and a learned drafter's q warp the whole
  vocabulary, which costs more), measured on first use (a few seconds per curve, a second
  per drafter) and cached; see the module docstring.

  k_max: drafts per step the curve must cover (at least the drafter's k); refresh: measure again."""
  k_max = max(k_max, drafter.nodes if drafter is not None else 0)
  key = machine_key(model)
  path = cache_path(model)
  mode = sampling_mode(sampling)
  sampling = None if mode == "greedy" else sampling
  dkey = drafter_key(drafter) if drafter is not None else None
  memo = (path, mode, dkey, k_max)
  if not refresh and memo in _LOADED:
    return _LOADED[memo]
  data = None if refresh else _read(path, key)
  data = data or {"key": key, "modes": {}}
  dirty = False
  curve = data["modes"].get(mode)
  if curve is None or len(curve["verify"]) < k_max + 1:
    fwd = measure_verify(model, k_max + 1, sampling=sampling)
    curve = data["modes"][mode] = {"verify_ms": fwd, "verify": list(monotone_curve(fwd)), "draft": {}}
    dirty = True
  if dkey is not None and dkey not in curve["draft"]:
    curve["draft"][dkey] = propose_ms(model, drafter, CONTEXT, repeats=3, sampling=sampling) / curve["verify_ms"][0]
    dirty = True
  if dirty:
    _write(path, data)
  cm = CostModel(tuple(curve["verify"]), curve["draft"][dkey] if dkey is not None else 0.0)
  _LOADED[memo] = cm
  return cm
