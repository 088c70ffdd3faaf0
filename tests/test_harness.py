"""The benchmark harness: metrics arithmetic on hand-made runs, questions parsing, bad input, and an
end-to-end run on a tiny model whose results.json must hold every documented key."""
from __future__ import annotations

import json
import os
import sys

import pytest

from specjax.harness import cli, metrics, questions, report, runner
from specjax.harness.questions import QuestionsError


def _run(drafter, tps, tokens=10, cat="qa", qid=1, turn=1, steps=None, toks=None, **extra):
  return {"drafter": drafter, "category": cat, "question_id": qid, "turn": turn, "new_tokens": tokens,
          "wall_s": tokens / tps, "steps": steps or tokens, "tokens": toks or [1] * tokens, **extra}


# ---------------------------------------------------------------- metrics


def test_speedup_is_ratio_of_mean_rates_not_mean_of_ratios():
  base = [_run("none", 10, qid=1), _run("none", 40, qid=2)]
  meth = [_run("ngram", 20, qid=1), _run("ngram", 40, qid=2)]
  # mean(20, 40) / mean(10, 40) = 30 / 25, whereas the mean of ratios would be (2 + 1) / 2.
  assert metrics.speedup(meth, base) == pytest.approx(1.2)
  assert metrics.mean_tokens_per_s(base) == pytest.approx(25.0)


def test_speedup_pairs_prompts_and_ignores_unshared_ones():
  base = [_run("none", 10, qid=1), _run("none", 10, qid=1, turn=2)]
  meth = [_run("ngram", 30, qid=1), _run("ngram", 1000, qid=9)]
  assert metrics.speedup(meth, base) == pytest.approx(3.0)
  assert metrics.speedup(meth, []) is None


def test_tau_is_pooled_over_steps():
  runs = [_run("ngram", 10, tokens=12, steps=4), _run("ngram", 10, tokens=3, steps=3)]
  assert metrics.mean_accepted(runs) == pytest.approx(15 / 7)  # not mean(3, 1) = 2
  assert metrics.mean_accepted([]) == 0.0


def test_acceptance_per_position_pools_counts():
  runs = [_run("ngram", 1, reached_per_position=[10, 5, 2], accepted_per_position=[5, 2, 1]),
          _run("ngram", 1, reached_per_position=[10, 5, 0], accepted_per_position=[5, 3, 0])]
  assert metrics.acceptance_per_position(runs) == pytest.approx([0.5, 0.5, 0.5])
  assert metrics.acceptance_per_position([_run("none", 1)]) == []
  with pytest.raises(ValueError, match="mix draft lengths"):
    metrics.acceptance_per_position(runs + [_run("x", 1, reached_per_position=[1], accepted_per_position=[1])])


def test_predicted_tau_from_alphas():
  assert metrics.predicted_tau([0.5, 0.5]) == pytest.approx(1 + 0.5 + 0.25)
  assert metrics.predicted_tau([1.0] * 4) == pytest.approx(5.0)
  assert metrics.predicted_tau([0.0, 1.0]) == pytest.approx(1.0)
  assert metrics.predicted_tau([]) == 1.0


def test_predicted_tau_matches_measured_for_a_consistent_chain():
  # 4 steps with k = 2: accepted 0, 1, 2, 2 -> emitted 1, 2, 3, 3 (τ = 9/4).
  # Position 1 reached 4x, accepted 3x; position 2 reached 3x, accepted 2x.
  run = _run("ngram", 1, tokens=9, steps=4, accepted_per_step=[1, 2, 3, 3],
             reached_per_position=[4, 3], accepted_per_position=[3, 2])
  alphas = metrics.acceptance_per_position([run])
  assert metrics.predicted_tau(alphas) == pytest.approx(1 + 3 / 4 + 3 / 4 * 2 / 3)
  assert metrics.mean_accepted([run]) == pytest.approx(9 / 4)
  assert metrics.accepted_length_histogram([run], k=2) == [1, 1, 2]


def test_identical_fraction():
  base = [_run("none", 1, qid=1, toks=[1, 2]), _run("none", 1, qid=2, toks=[3])]
  meth = [_run("ngram", 1, qid=1, toks=[1, 2]), _run("ngram", 1, qid=2, toks=[4])]
  assert metrics.identical_fraction(meth, base) == 0.5


def test_ceiling_is_the_speedup_of_a_free_decode_loop():
  base = [_run("none", 10, qid=1, prefill_s=0.4, decode_s=0.5), _run("none", 20, qid=2, prefill_s=0.2, decode_s=0.25)]
  # Without their decode loops the calls take 0.5 s and 0.25 s: mean(20, 40) / mean(10, 20).
  assert metrics.ceiling(base) == pytest.approx(30 / 15)
  assert metrics.prefill_share(base) == pytest.approx(0.6 / 1.5)
  for shrink in (0.5, 0.1, 1e-6):  # a method keeping AR's fixed costs never beats the ceiling
    meth = [{**r, "drafter": "ngram", "wall_s": r["wall_s"] - (1 - shrink) * r["decode_s"]} for r in base]
    assert metrics.speedup(meth, base) < metrics.ceiling(base)
  assert metrics.speedup(meth, base) == pytest.approx(metrics.ceiling(base), rel=1e-4)
  s = metrics.summarize(base + meth)
  assert s["none"]["overall"]["ceiling"] == pytest.approx(2.0) and s["ngram"]["overall"]["ceiling"] is None
  assert metrics.ceiling([_run("none", 10)]) is None and metrics.prefill_share([_run("none", 10)]) is None


def test_summarize_categories_overall_and_vs_hf():
  runs = [_run("none", 10, cat="qa"), _run("ngram", 20, cat="qa", steps=5),
          _run("none", 10, cat="rag"), _run("ngram", 10, cat="rag"),
          _run("hf-greedy", 4, cat="qa"), _run("hf-prompt-lookup", 5, cat="qa"),
          _run("hf-greedy", 4, cat="rag"), _run("hf-prompt-lookup", 8, cat="rag")]
  s = metrics.summarize(runs, greedy=True)
  assert s["ngram"]["qa"]["speedup"] == pytest.approx(2.0)
  assert s["ngram"]["overall"]["speedup"] == pytest.approx(15 / 10)
  assert s["ngram"]["qa"]["mean_accepted"] == pytest.approx(2.0)
  assert s["hf-prompt-lookup"]["overall"]["speedup"] == pytest.approx(6.5 / 4)  # vs hf-greedy
  assert s["ngram"]["overall"]["identical_to_ar"] == 1.0
  v = s["vs_hf"]["overall"]
  assert (v["specjax_best"], v["hf_best"]) == ("ngram", "hf-prompt-lookup")
  assert v["ratio"] == pytest.approx(15 / 6.5)
  assert s["vs_hf"]["qa"]["ratio"] == pytest.approx(20 / 5)
  assert metrics.summarize(runs, greedy=False)["ngram"]["qa"]["identical_to_ar"] is None


# ---------------------------------------------------------------- questions


GOOD = [{"question_id": 1, "category": "writing", "turns": ["Write a haiku about the sea.", "Make it rhyme."]},
        {"question_id": 2, "category": "summarization", "turns": ["Summarize: the cat sat on the mat. " * 3]},
        {"question_id": 3, "category": "qa", "turns": ["What is 2+2?"]}]


def _lines(rows):
  return [json.dumps(r) if not isinstance(r, str) else r for r in rows]


@pytest.mark.parametrize("bad, message", [
    ("{not json", "line 2: not valid JSON"),
    ('{"question_id": 4, "turns": ["x"]}', "line 2: missing key(s) category"),
    ('{"question_id": 4, "category": "qa", "turns": []}', "line 2: turns must be a non-empty list"),
    ('{"question_id": 4, "category": "qa", "turns": "hello"}', "line 2: turns must be"),
    ('[1, 2]', "line 2: expected a JSON object"),
    ('{"question_id": 1, "category": "writing", "turns": ["again"]}', "line 2: duplicate question_id 1"),
])
def test_malformed_line_is_named(bad, message):
  lines = _lines([GOOD[0], bad, GOOD[2]])
  with pytest.raises(QuestionsError) as e:
    questions.parse_questions(lines, source="q.jsonl")
  assert f"q.jsonl {message}" in str(e.value) and "--skip-bad" in str(e.value)
  kept, skipped = questions.parse_questions(lines, source="q.jsonl", skip_bad=True)
  assert [q.question_id for q in kept] == [1, 3] and len(skipped) == 1 and "line 2" in skipped[0]


def test_blank_lines_are_not_errors_and_line_numbers_count_them():
  kept, _ = questions.parse_questions(_lines([GOOD[0], "", "  ", GOOD[2]]))
  assert [q.line for q in kept] == [1, 4]


def test_select_limit_and_categories():
  qs = questions.as_questions([{"question_id": i, "category": c, "turns": ["x"]}
                               for i, c in enumerate(["a", "b", "a", "a", "b"])])
  assert [q.question_id for q in questions.select(qs, limit=2)] == [0, 1, 2, 4]
  assert [q.question_id for q in questions.select(qs, ["b"], limit=1)] == [1]
  with pytest.raises(ValueError, match=r"unknown categories \['c'\]; the questions file has: a, b"):
    questions.select(qs, ["c"])


def test_second_turn_continues_the_conversation():
  from specjax.testing import ByteTokenizer
  msgs = questions.conversation(["q1", "q2"], ["a1"])
  assert msgs == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                  {"role": "user", "content": "q2"}]
  tok = ByteTokenizer()
  assert tok.decode(questions.prompt_ids(tok, ["q1", "q2"], ["a1"])) == "user: q1\na1\nq2\nassistant:"
  with pytest.raises(ValueError, match="nothing left to ask"):
    questions.conversation(["q1"], ["a1"])


# ---------------------------------------------------------------- CLI bad input


def _args(tmp_path, *extra, rows=GOOD):
  qfile = tmp_path / "q.jsonl"
  qfile.write_text("\n".join(_lines(rows)) + "\n")
  import argparse
  ap = argparse.ArgumentParser()
  cli.add_arguments(ap)
  argv = ["--questions", str(qfile), "--out", str(tmp_path / "out"), "--no-progress", *extra]
  args = ap.parse_args(argv)
  args.argv = argv
  return args


def test_unknown_drafter_lists_known_ones(tmp_path, capsys):
  assert cli.main(_args(tmp_path).argv[:-1] + ["--drafters", "none,nope"]) == 2
  err = capsys.readouterr().err
  assert "unknown or unavailable drafter(s) 'nope'; available: none, ngram" in err


def test_malformed_questions_file_via_cli(tmp_path, capsys):
  args = _args(tmp_path, rows=[GOOD[0], "{oops"])
  assert cli.main(args.argv) == 2
  assert "q.jsonl line 2: not valid JSON" in capsys.readouterr().err


def test_compare_hf_without_torch_says_how_to_install(tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  args = _args(tmp_path, "--compare-hf")
  assert cli.run(args, model=object()) == 2
  assert "pip install -e '.[hf]'" in capsys.readouterr().err


def test_parse_k():
  assert cli.parse_k("4", ["none", "ngram", "draft"]) == {"ngram": 4, "draft": 4}
  assert cli.parse_k("ngram=3", ["none", "ngram"]) == {"ngram": 3}
  with pytest.raises(ValueError, match="'eagle3' is not among --drafters"):
    cli.parse_k("eagle3=3", ["none", "ngram"])
  with pytest.raises(ValueError, match="is not an int"):
    cli.parse_k("ngram=x", ["none", "ngram"])


# ---------------------------------------------------------------- end to end on a tiny model

SUMMARY_KEYS = {"speedup", "mean_accepted", "tokens_per_s", "identical_to_ar", "prefill_share", "ceiling"}
RUN_KEYS = {"drafter", "question_id", "category", "turn", "new_tokens", "wall_s", "prefill_s", "decode_s",
            "tokens_per_s", "mean_accepted", "tokens"}


class FakeHF:
  """Stands in for HFPeer: replays the AR tokens at a fixed rate (tests the plumbing without torch)."""

  methods = ("hf-greedy", "hf-prompt-lookup")
  versions = {"torch": "fake", "transformers": "fake", "threads": 1, "prompt_lookup_num_tokens": 10}

  def __init__(self, model):
    self.model = model

  def generate(self, ids, method, max_new_tokens, temperature=0.0, top_p=1.0, seed=0):
    import specjax as sj
    toks = sj.generate(self.model, [ids], max_new_tokens=max_new_tokens).tokens[0]
    rate = 1.0 if method == "hf-greedy" else 2.0
    return {"tokens": toks, "new_tokens": len(toks), "wall_s": len(toks) / rate, "steps": len(toks)}


@pytest.fixture(scope="module")
def tiny():
  from specjax.testing import tiny_model
  return tiny_model(vocab_size=259, scale=4.0)


def test_end_to_end_results_json(tmp_path, tiny):
  args = _args(tmp_path, "--drafters", "ngram", "--max-new-tokens", "12", "--k", "3")
  assert cli.run(args, model=tiny) == 0
  out = tmp_path / "out"
  res = json.loads((out / "results.json").read_text())
  cats = {"writing", "summarization", "qa"}
  for m in ("none", "ngram"):
    assert cats | {"overall"} <= set(res["summary"][m])
    for c in cats | {"overall"}:
      assert SUMMARY_KEYS <= set(res["summary"][m][c]), (m, c)
  assert res["summary"]["none"]["overall"]["speedup"] == pytest.approx(1.0)
  assert res["summary"]["none"]["overall"]["mean_accepted"] == pytest.approx(1.0)
  assert 0 < res["summary"]["none"]["overall"]["prefill_share"] < 1
  assert res["summary"]["none"]["overall"]["ceiling"] > 1
  assert res["summary"]["ngram"]["overall"]["identical_to_ar"] == 1.0  # lossless at T = 0
  assert len(res["runs"]) == 2 * 4  # 2 methods x (2 + 1 + 1 turns)
  for r in res["runs"]:
    assert RUN_KEYS <= set(r)
    assert r["new_tokens"] == len(r["tokens"]) and 1 <= r["new_tokens"] <= 12
  assert {(r["question_id"], r["turn"]) for r in res["runs"]} == {(1, 1), (1, 2), (2, 1), (3, 1)}
  assert res["settings"]["k"] == {"ngram": 3} and res["settings"]["max_new_tokens"] == 12
  assert res["settings"]["command"].startswith("python -m specjax bench --questions")
  assert {"cpu", "cores", "jax", "backend", "date"} <= set(res["machine"])
  assert set(res["compile_s"]) == {"none", "ngram"}
  assert "| **overall** |" in (out / "report.md").read_text()
  for png in report.PLOTS:
    assert (out / png).stat().st_size > 1000


def test_a_run_that_compiled_is_timed_again_warm(tmp_path, tiny, monkeypatch):
  """A freshly compiled executable's first call pays one-time warm-up: the harness times a
  second, identical call instead, and still reports the compile seconds."""
  import specjax as sj
  calls, real = [], sj.generate

  def spy(model, prompts, **kw):
    out = real(model, prompts, **kw)
    calls.append((tuple(prompts[0]), kw.get("drafter"), out.stats["compile_s"]))
    return out

  from specjax import decode
  monkeypatch.setattr(decode, "_COMPILED", {})  # other tests compiled these buckets already
  monkeypatch.setattr(sj, "generate", spy)
  assert cli.run(_args(tmp_path, "--drafters", "ngram", "--max-new-tokens", "12", "--k", "3"), model=tiny) == 0
  compiled = [i for i, c in enumerate(calls) if c[2] > 0]
  assert compiled  # every method compiles at least once
  for i in compiled:
    assert calls[i + 1][:2] == calls[i][:2] and calls[i + 1][2] == 0
  res = json.loads((tmp_path / "out" / "results.json").read_text())
  assert sum(r["compile_s"] for r in res["runs"]) > 0  # compile seconds are still reported


def test_turn_two_prompt_holds_the_ar_answer(tiny):
  import specjax as sj
  qs = questions.as_questions([GOOD[0]])
  res = runner.run_benchmark(tiny, qs, ["none"], max_new_tokens=8, progress=False, log=lambda s: None)
  t1, t2 = [r for r in res["runs"] if r["drafter"] == "none"]
  answer = tiny.tokenizer.decode(t1["tokens"])
  expect = questions.prompt_ids(tiny.tokenizer, GOOD[0]["turns"], [answer])
  assert t2["prompt_tokens"] == len(expect)
  assert sj.generate(tiny, [expect], max_new_tokens=8).tokens[0] == t2["tokens"]


def test_hf_peer_plumbing_with_a_fake_peer(tiny):
  qs = questions.as_questions(GOOD[1:])
  res = runner.run_benchmark(tiny, qs, ["none"], max_new_tokens=8, hf=FakeHF(tiny), progress=False,
                             log=lambda s: None)
  s = res["summary"]
  assert s["hf-greedy"]["overall"]["tokens_per_s"] == pytest.approx(1.0)
  assert s["hf-prompt-lookup"]["overall"]["speedup"] == pytest.approx(2.0)
  assert s["hf-greedy"]["overall"]["identical_to_ar"] == 1.0
  v = s["vs_hf"]["overall"]
  assert v["hf_best"] == "hf-prompt-lookup" and v["ratio"] == pytest.approx(s["none"]["overall"]["tokens_per_s"] / 2)
  assert "specjax vs HF transformers" in report.markdown(res)


@pytest.mark.real
def test_hf_peer_matches_specjax_greedy_on_the_embedded_model():
  """The real peer (needs the hf extra): same GGUF, same ids, same greedy tokens, stops at EOS."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  import specjax as sj
  from specjax.harness.hf_peer import HFPeer
  from specjax.io import default_model_path
  model = sj.load_model()
  peer = HFPeer(default_model_path(), model.config.eos_ids)
  ids = questions.prompt_ids(model.tokenizer, ["What is the capital of France? One sentence."], [])
  ours = sj.generate(model, [ids], max_new_tokens=24).tokens[0]
  for method in peer.methods:
    r = peer.generate(ids, method, 24)
    assert r["tokens"] == ours, method
    assert r["steps"] >= 1 and r["new_tokens"] == len(ours)


def test_drafter_at_k_labels():
  assert runner.split_label("ngram@3") == ("ngram", 3) and runner.split_label("ngram") == ("ngram", None)
  assert runner.check_drafter_names(["ngram@3", "ngram@8"]) == ["none", "ngram@3", "ngram@8"]
  with pytest.raises(ValueError, match="must be k >= 1"):
    runner.split_label("ngram@x")
  with pytest.raises(ValueError, match="unknown or unavailable drafter"):
    runner.check_drafter_names(["nope@3"])
  assert runner.split_label("eagle3@5:0.3") == ("eagle3", 5)
  assert runner.label_options("eagle3@5:0.3") == {"min_confidence": 0.3} and runner.label_options("eagle3@5") == {}
  for bad in ("eagle3@5:x", "eagle3@5:1.5"):
    with pytest.raises(ValueError, match="confidence"):
      runner.check_drafter_names([bad])
