"""The embedded SmolLM2-135M: every drafter's greedy output equals AR's, token for token; the CLI."""
import json

import numpy as np
import pytest

import specjax as sj
from specjax import cli
from specjax.drafters import available, default_k

pytestmark = pytest.mark.real

PROMPTS = [
    "Summarize: The city council voted on Tuesday to expand the bike lane network by 40 kilometres over the next "
    "three years, citing a rise in cycling and a drop in traffic injuries where lanes were already built.",
    "Translate to French: The weather is nice today and we are going to the park.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "What is the boiling point of water at sea level in Celsius and Fahrenheit?",
    "Explain in simple words why the sky is blue.",
    "If a train travels 60 km in 45 minutes, what is its average speed in km/h? Show your steps.",
    "List three tips for writing clear emails.",
    "Repeat the following sentence exactly twice: The quick brown fox jumps over the lazy dog.",
]
N_NEW = 64


@pytest.fixture(scope="module")
def model():
  return sj.load_model()


@pytest.fixture(scope="module")
def ar(model):
  return sj.generate(model, PROMPTS, max_new_tokens=N_NEW, chat=True)


def _top2_gap(model, prompt_ids, prefix):
  logits = np.sort(np.asarray(sj.forward_logits(model, list(prompt_ids) + list(prefix)))[-1])
  return float(logits[-1] - logits[-2])


@pytest.mark.parametrize("name", [n for n in available() if n != "none"])
def test_greedy_speculative_equals_autoregressive(model, ar, name):
  try:
    drafter = sj.make_drafter(name, model, k=default_k(name))
  except FileNotFoundError as e:  # a learned drafter whose trained head is not shipped yet
    pytest.skip(str(e))
  sp = sj.generate(model, PROMPTS, drafter=drafter, max_new_tokens=N_NEW, chat=True)
  near_ties = []
  for i, (a, b) in enumerate(zip(ar.tokens, sp.tokens)):
    if a == b:
      continue
    j = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    ids = model.tokenizer.encode(model.tokenizer.apply_chat_template(PROMPTS[i]))
    gap = _top2_gap(model, ids, a[:j])
    assert gap < 1e-4, f"{name}: prompt {i} diverges from AR at token {j} where the top-2 gap is {gap:.2e}"
    near_ties.append((i, j, gap))
  if near_ties:
    print(f"{name}: near-tie divergences (prompt, token, gap): {near_ties}")
  assert sp.stats["mean_accepted"] >= 1.0
  assert sum(len(t) for t in sp.tokens) == sp.stats["new_tokens"]


def test_ar_text_is_sensible(ar):
  assert "Paris" not in ar.texts[3]
  assert "100" in ar.texts[3]  # boiling point
  assert all(len(t) > 0 for t in ar.tokens)


def test_cli_generate_json(capsys):
  code = cli.main(["generate", "--prompt", "What is the capital of France?", "--chat", "--max-new-tokens", "12",
                   "--json", "--drafter", "ngram", "--k", "3"])
  assert code == 0
  out = json.loads(capsys.readouterr().out)
  for key in ("text", "tokens", "new_tokens", "wall_s", "tokens_per_s", "drafter", "mean_accepted",
              "acceptance_per_position"):
    assert key in out
  assert out["drafter"] == "ngram" and "Paris" in out["text"]
  assert out["new_tokens"] == len(out["tokens"]) and len(out["acceptance_per_position"]) == 3


def test_cli_bad_input_is_an_error_message(capsys):
  assert cli.main(["generate", "--prompt", "hi", "--temperature", "-1"]) == 2
  assert "temperature=-1.0 must be" in capsys.readouterr().err
  assert cli.main(["generate", "--prompt", "hi", "--drafter", "nope"]) == 2
  assert "unknown or unavailable drafter 'nope'" in capsys.readouterr().err


def test_packed_weights_cover_the_model_and_change_nothing_but_rounding(model, ar):
  """The GGUF's Q4_1/Q8_0 blocks are kept for every matrix (the kernel reads those); the
  float32-only model gives the same greedy text and logits to float summation order."""
  for block in model.params["blocks"].values():
    assert set(block["packed"].get_value()) == {"qkv", "out", "gate_up", "down"}
  assert set(model.params["packed"].get_value()) == {"embed"}
  plain = sj.load_model(packed=False)
  assert "packed" not in plain.params["blocks"][0] or plain.params["blocks"][0]["packed"] is None
  out = sj.generate(plain, PROMPTS[:2], max_new_tokens=N_NEW, chat=True)
  for got, want in zip(out.tokens, ar.tokens[:2]):
    assert list(got) == list(want)
  ids = np.asarray(ar.tokens[0][:24])
  from specjax.models.model import forward_logits
  np.testing.assert_allclose(forward_logits(model, ids), forward_logits(plain, ids), atol=2e-3)
