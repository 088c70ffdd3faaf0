"""Cost model and dynamic speculation: the measured curve and its cache, greedy identity with
AR for every drafter, chi-square losslessness at T = 1 (and a peeking policy that must fail),
a garbage drafter that falls back to plain steps, an oracle that keeps its speedup, bad input."""
import dataclasses
import importlib
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import specjax as sj
from specjax import dynamic, testing
from specjax.drafters import Drafter
from specjax.drafters.eagle import Eagle
from specjax.models.heads import DraftHead, HeadConfig

cm_lib = importlib.import_module("specjax.cost_model")  # the module (sj.cost_model is its function)
V = 64
# forward(T) / forward(1) of the embedded model, measured with the packed kernels on two machines.
AVX512_CURVE = (1.0, 1.30, 1.53, 1.77, 1.98, 2.21, 2.50, 2.79)
AVX2_CURVE = (1.0, 1.37, 1.93, 2.56, 3.2, 3.77, 4.1, 4.44)


@pytest.fixture()
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv("SPECJAX_CACHE", str(tmp_path))
  monkeypatch.setattr(cm_lib, "_LOADED", {})
  return tmp_path


@pytest.fixture(scope="module")
def model():
  return testing.tiny_model(seed=7, scale=4.0)


@pytest.fixture(scope="module")
def prompts():
  return testing.random_prompts(3, V, lo=3, hi=9, seed=1)


def _eagle(model, kind, k=3, seed=1):
  layers = (0, 1) if kind == "eagle3" else ()
  cfg = HeadConfig(kind, model.config, draft_vocab=40, feature_layers=layers)
  d2t = np.sort(np.random.default_rng(seed).choice(model.config.vocab_size, 40, replace=False))
  return Eagle.from_head(model, cfg, nnx.state(DraftHead(cfg, nnx.Rngs(seed))), d2t, k=k)


DRAFTERS = {
    "ngram": lambda m: sj.make_drafter("ngram", m, k=4, min_n=1, max_n=3),
    "draft": lambda m: sj.make_drafter("draft", m, k=3, layers=1),
    "eagle1": lambda m: _eagle(m, "eagle1"),
    "eagle3": lambda m: _eagle(m, "eagle3"),
    "mtp": lambda m: _eagle(m, "mtp"),
    "eagle3-confident": lambda m: dataclasses.replace(_eagle(m, "eagle3"), min_confidence=0.2),
}


def _cost(st, cost: sj.CostModel) -> float:
  """The loop's own cost in one-token forwards: each verify at its size, each propose."""
  return sum(n * cost.c(size + 1) for size, n in st["steps_by_drafts"].items()) + st["propose_steps"] * cost.draft


# ----------------------------------------------------------------------------------------------
# (a) the cost model


def test_curve_is_monotone_from_one_and_cached(cache, model, monkeypatch):
  cm = sj.cost_model(model)
  assert cm.verify[0] == 1.0 and len(cm.verify) == cm_lib.K_MAX + 1
  assert all(b >= a for a, b in zip(cm.verify, cm.verify[1:]))
  path = cm_lib.cache_path(model)
  assert os.path.dirname(path) == str(cache) and os.path.exists(path)
  # The second use reads the file: nothing is timed.
  monkeypatch.setattr(cm_lib, "_LOADED", {})
  monkeypatch.setattr(cm_lib, "measure_verify", lambda *a, **k: pytest.fail("re-measured a cached curve"))
  assert sj.cost_model(model) == cm


def test_noisy_timings_become_a_monotone_curve():
  assert cm_lib.monotone_curve([4.0, 5.0, 4.6, 6.0, 5.9]) == (1.0, 1.25, 1.25, 1.5, 1.5)


def test_drafter_cost_is_measured_once_per_drafter(cache, model, monkeypatch):
  d = DRAFTERS["draft"](model)
  cm = sj.cost_model(model, d)
  assert cm.draft > 0
  data = json.load(open(cm_lib.cache_path(model)))
  assert list(data["modes"]["greedy"]["draft"]) == [cm_lib.drafter_key(d)]
  monkeypatch.setattr(cm_lib, "_LOADED", {})
  monkeypatch.setattr(cm_lib, "propose_ms", lambda *a, **k: pytest.fail("re-measured a cached drafter"))
  assert sj.cost_model(model, d) == cm
  assert cm_lib.drafter_key(d) != cm_lib.drafter_key(DRAFTERS["ngram"](model))


def test_sampling_is_priced_apart_from_greedy(cache, model, monkeypatch):
  """Greedy and sampled policies get their own curve and drafter price, each measured under
  its own sampling (on the real model a sampled propose warps a 49k-wide q per draft)."""
  d = DRAFTERS["eagle3"](model)
  seen = []
  real_propose, real_verify = cm_lib.propose_ms, cm_lib.measure_verify
  monkeypatch.setattr(cm_lib, "propose_ms", lambda *a, **k: seen.append(("propose", k["sampling"])) or real_propose(*a, **k))
  monkeypatch.setattr(cm_lib, "measure_verify", lambda *a, **k: seen.append(("verify", k["sampling"])) or real_verify(*a, **k))
  top_p = sj.Sampling(temperature=1.0, top_p=0.9)
  greedy = sj.cost_model(model, d)
  sampled = sj.cost_model(model, d, sampling=top_p)
  assert seen == [("verify", None), ("propose", None), ("verify", top_p), ("propose", top_p)]
  data = json.load(open(cm_lib.cache_path(model)))
  assert set(data["modes"]) == {"greedy", "sampled top_k=0 top_p=0.9"}
  assert data["modes"]["greedy"]["verify"] == list(greedy.verify)
  assert data["modes"]["sampled top_k=0 top_p=0.9"]["verify"] == list(sampled.verify)
  # The temperature does not change the price: the same entry, nothing re-measured.
  monkeypatch.setattr(cm_lib, "_LOADED", {})
  assert sj.cost_model(model, d, sampling=sj.Sampling(temperature=0.5, top_p=0.9)) == sampled
  assert len(seen) == 4


def test_cache_file_is_keyed_by_cpu_isa_sources_and_model(cache, model, monkeypatch):
  from specjax import kernels
  monkeypatch.delenv("SPECJAX_CPU_ISA", raising=False)
  base = cm_lib.cache_path(model)
  other_isa = [i for i in kernels.executable_isas() if i != kernels.selected_isa()][0]
  monkeypatch.setenv("SPECJAX_CPU_ISA", other_isa)
  isa = cm_lib.cache_path(model)
  monkeypatch.delenv("SPECJAX_CPU_ISA")
  assert cm_lib.cache_path(model) == base
  monkeypatch.setattr(cm_lib, "_cpu_flags", lambda: "flags : fpu sse2 avx2 fma")
  cpu = cm_lib.cache_path(model)
  monkeypatch.undo()
  monkeypatch.setenv("SPECJAX_CACHE", str(cache))
  monkeypatch.setattr(cm_lib, "_kernel_sources", lambda: "0123456789abcdef")
  src = cm_lib.cache_path(model)
  monkeypatch.undo()
  monkeypatch.setenv("SPECJAX_CACHE", str(cache))
  other = cm_lib.cache_path(testing.tiny_model(seed=7, hidden=48))
  assert len({base, isa, cpu, src, other}) == 5


@pytest.mark.parametrize("junk", [b"{not json", b'{"verify": [1.0, 0.5]}', b"[]", b""])
def test_corrupt_cache_warns_and_is_rebuilt(cache, model, junk):
  path = cm_lib.cache_path(model)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  open(path, "wb").write(junk)
  with pytest.warns(UserWarning, match="unreadable.*measuring it again"):
    cm = sj.cost_model(model)
  assert cm.verify[0] == 1.0
  assert json.load(open(path))["modes"]["greedy"]["verify"] == list(cm.verify)


# ----------------------------------------------------------------------------------------------
# (b) greedy identity with AR, for every drafter, under costs that make the policy vary n


COSTS = {"cheap": sj.CostModel(tuple(1 + 0.02 * t for t in range(9)), draft=0.01),
         "avx512": sj.CostModel(AVX512_CURVE + (3.0,), draft=0.05)}


@pytest.mark.parametrize("cost", list(COSTS))
@pytest.mark.parametrize("name", list(DRAFTERS))
def test_greedy_dynamic_equals_ar(model, prompts, name, cost):
  drafter = DRAFTERS[name](model)
  ar = sj.generate(model, prompts, max_new_tokens=24)
  sp = sj.generate(model, prompts, drafter=drafter, max_new_tokens=24, dynamic=COSTS[cost])
  assert sp.tokens == ar.tokens
  for a, b in zip(sp.logprobs, ar.logprobs):
    np.testing.assert_allclose(a, b, atol=1e-4)
  st = sp.stats
  assert st["dynamic"] and sum(st["steps_by_drafts"].values()) >= max(r["steps"] for r in st["rows"])
  assert set(st["steps_by_drafts"]) <= set(range(drafter.k + 1))
  for row in st["rows"]:
    assert sum(row["steps_by_drafts"].values()) == row["steps"]
  if cost == "cheap":  # drafting is nearly free: the policy verifies drafts
    assert max(st["steps_by_drafts"]) > 0 and st["propose_steps"] > 0


def test_measured_cost_model_by_default(cache, model, prompts):
  drafter = DRAFTERS["ngram"](model)
  sp = sj.generate(model, prompts, drafter=drafter, max_new_tokens=16)
  assert sp.stats["dynamic"] and sp.stats["cost_model"]["verify"] == list(sj.cost_model(model).verify[:5])
  assert sp.tokens == sj.generate(model, prompts, max_new_tokens=16).tokens


# ----------------------------------------------------------------------------------------------
# (c) losslessness at T = 1 through the real loop, and a peeking policy that must fail

N_ROWS = 8192
N_TOKENS = 3


@dataclasses.dataclass(frozen=True)
class PeekingPolicy(dynamic.Policy):
  """Wrong: verifies the drafts only when the first one is an even id (it looks at this step's draft)."""

  def trim(self, n, drafts, q):
    return jnp.where(drafts[:, 0] % 2 == 0, n, 0)


@pytest.fixture(scope="module")
def small_vocab():
  model = testing.tiny_model(seed=3, scale=2.0, vocab_size=8)
  return model, [5, 3, 6, 4]


def _sample_law(small_vocab, policy_cls):
  model, prompt = small_vocab
  sampling = sj.Sampling(temperature=1.0)
  drafter = sj.make_drafter("draft", model, k=3, layers=1)
  policy = policy_cls(sj.CostModel((1.0, 1.2, 1.4, 1.6), draft=0.05), sizes=(0, 1, 2, 3))
  out = sj.generate(model, [prompt] * N_ROWS, drafter=drafter, sampling=sampling, max_new_tokens=N_TOKENS + 1,
                    seed=list(range(N_ROWS)), stop_ids=(), dynamic=policy)
  samples = np.asarray([t[:N_TOKENS] for t in out.tokens])
  return samples, testing.exact_law(model, prompt, sampling, N_TOKENS), out.stats


def test_dynamic_is_lossless_at_temperature_one(small_vocab):
  samples, law, st = _sample_law(small_vocab, dynamic.Policy)
  # The choice varied with each row's past: several sizes ran, rows differ.
  assert len(st["steps_by_drafts"]) >= 2
  assert len({tuple(sorted(r["steps_by_drafts"].items())) for r in st["rows"][:200]}) >= 3
  pvalues = {n: testing.gof_pvalue(samples[:, :n], law.sum(axis=tuple(range(n, N_TOKENS)))) for n in (1, 2, 3)}
  print(f"\ndynamic, T=1: chi-square p-values by number of tokens {pvalues}")
  assert min(pvalues.values()) >= 1e-3, pvalues


def test_a_policy_that_peeks_at_the_drafts_is_caught(small_vocab):
  samples, law, _ = _sample_law(small_vocab, PeekingPolicy)
  pvalues = {n: testing.gof_pvalue(samples[:, :n], law.sum(axis=tuple(range(n, N_TOKENS)))) for n in (1, 2, 3)}
  print(f"\npeeking policy, T=1: chi-square p-values by number of tokens {pvalues}")
  assert min(pvalues.values()) < 1e-6, f"the test missed a policy that looks at the drafts ({pvalues})"


# ----------------------------------------------------------------------------------------------
# (d) a drafter that cannot pay falls back to plain steps; one that pays keeps its speedup


@dataclasses.dataclass(frozen=True)
class Garbage(Drafter):
  """Proposes ids derived from the step, never from the target: almost always rejected."""

  name = "garbage"

  def propose(self, weights, dstate, ctx, keys, sampling):
    B = ctx.length.shape[0]
    toks = (ctx.length[:, None] * 17 + jnp.arange(self.k)[None] * 5 + 11) % V
    return dstate, toks.astype(jnp.int32), None


@dataclasses.dataclass(frozen=True)
class Oracle(Drafter):
  """Proposes the target's own greedy continuation (weights = [B, S] full AR sequences), from
  history index `start` on (garbage before it)."""

  start: int = 0
  name = "oracle"

  def propose(self, weights, dstate, ctx, keys, sampling):
    idx = ctx.length[:, None] + jnp.arange(self.k)[None]
    good = jnp.take_along_axis(weights, jnp.minimum(idx, weights.shape[1] - 1), axis=1)
    bad = (idx * 17 + 11) % V
    return dstate, jnp.where(ctx.length[:, None] >= self.start, good, bad).astype(jnp.int32), None


@pytest.mark.parametrize("curve", [AVX512_CURVE, AVX2_CURVE], ids=["avx512", "avx2"])
def test_garbage_drafter_costs_at_most_three_percent(model, prompts, curve):
  cost = sj.CostModel(curve[:6], draft=0.05)
  ar = sj.generate(model, prompts, max_new_tokens=128, stop_ids=())
  sp = sj.generate(model, prompts, drafter=Garbage(k=5), max_new_tokens=128, stop_ids=(), dynamic=cost)
  assert sp.tokens == ar.tokens
  ar_cost = sum(ar.stats["steps_by_drafts"].values())  # one-token steps
  ratio = ar_cost / _cost(sp.stats, cost)
  print(f"\ngarbage drafter: {sp.stats['steps_by_drafts']}, proposes {sp.stats['propose_steps']}, "
        f"speed vs AR by the cost model {ratio:.3f}")
  assert ratio >= 0.97
  off = sj.generate(model, prompts, drafter=Garbage(k=5), max_new_tokens=128, stop_ids=(), dynamic=False)
  assert ar_cost / _cost(off.stats, cost) < 0.5  # without the policy the garbage is verified every step


def _oracle_weights(ar, prompts, S=256):
  seqs = np.zeros((4, S), np.int32)  # the loop's batch bucket for 3 prompts
  for i, (p, t) in enumerate(zip(prompts, ar.tokens)):
    seqs[i, :len(p) + len(t)] = p + t
  return jnp.asarray(seqs)


@pytest.mark.parametrize("start", [0, 60], ids=["from_the_start", "after_60_tokens"])
def test_a_drafter_that_pays_keeps_its_speedup(model, prompts, start):
  cost = sj.CostModel(AVX512_CURVE[:6], draft=0.05)
  ar = sj.generate(model, prompts, max_new_tokens=128, stop_ids=())
  drafter = Oracle(k=5, weights=_oracle_weights(ar, prompts), start=start)
  on = sj.generate(model, prompts, drafter=drafter, max_new_tokens=128, stop_ids=(), dynamic=cost)
  off = sj.generate(model, prompts, drafter=drafter, max_new_tokens=128, stop_ids=(), dynamic=False)
  assert on.tokens == ar.tokens == off.tokens
  ar_cost = sum(ar.stats["steps_by_drafts"].values())
  speed_on, speed_off = ar_cost / _cost(on.stats, cost), ar_cost / _cost(off.stats, cost)
  print(f"\noracle from token {start}: dynamic {speed_on:.2f}x {on.stats['steps_by_drafts']}, "
        f"static {speed_off:.2f}x")
  if start == 0:
    assert speed_on >= 0.95 * speed_off and speed_on > 2.0
  else:  # garbage first: the policy stops drafting, then re-probes and finds the drafter pays again
    assert speed_on > 1.15 * speed_off and speed_on > 1.0
    assert on.stats["steps_by_drafts"].get(5, 0) >= 5


# ----------------------------------------------------------------------------------------------
# (e) dynamic=False is the behaviour before dynamic speculation; bad input

GOLDEN = os.path.join(os.path.dirname(__file__), "fixtures", "dynamic_off_golden.json")


def test_dynamic_off_reproduces_the_previous_loop():
  """Tokens and accepted-per-step recorded by the loop before dynamic speculation existed."""
  model = testing.tiny_model(seed=7, scale=4.0)
  prompts = testing.random_prompts(3, V, lo=3, hi=9, seed=1)
  golden = json.load(open(GOLDEN))
  drafters = {"ngram-k4": DRAFTERS["ngram"](model), "draft-k3": DRAFTERS["draft"](model),
              "eagle3-k3": _eagle(model, "eagle3")}
  for name, d in drafters.items():
    for t in (0.0, 1.0):
      o = sj.generate(model, prompts, drafter=d, sampling=sj.Sampling(temperature=t), max_new_tokens=16,
                      seed=[3, 4, 5], dynamic=False)
      want = golden[f"{name}@{t}"]
      assert o.tokens == want["tokens"], (name, t)
      assert [r["accepted_per_step"] for r in o.stats["rows"]] == want["accepted_per_step"], (name, t)
      assert not o.stats["dynamic"] and o.stats["propose_steps"] == sum(o.stats["steps_by_drafts"].values())


@pytest.mark.parametrize("verify,draft,match", [
    ((1.0, 1.3, 1.2), 0.0, r"non-decreasing: c\(3\) = 1.2 < c\(2\) = 1.3"),
    ((1.1, 1.3), 0.0, r"c\(1\) = 1.1 must be 1"),
    ((), 0.0, "verify=\\(\\) is empty"),
    ((1.0, float("nan")), 0.0, "finite positive"),
    ("fast", 0.0, "must be a sequence of numbers|finite positive"),
    ((1.0, 1.2), -0.1, "draft=-0.1 must be a finite number >= 0"),
])
def test_malformed_cost_model_is_refused(verify, draft, match):
  with pytest.raises(ValueError, match=match):
    sj.CostModel(verify, draft=draft)


def test_cost_model_too_short_for_k_and_bad_dynamic(model, prompts):
  with pytest.raises(ValueError, match=r"verify has 3 entries but k=4 drafts need c\(1\) .. c\(5\)"):
    sj.generate(model, prompts, drafter=DRAFTERS["ngram"](model), max_new_tokens=4,
                dynamic=sj.CostModel((1.0, 1.1, 1.2)))
  with pytest.raises(ValueError, match="dynamic='yes' must be True, False or a specjax.CostModel"):
    sj.generate(model, prompts, drafter=DRAFTERS["ngram"](model), max_new_tokens=4, dynamic="yes")
