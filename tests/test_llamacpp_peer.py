"""The llama.cpp peer (`bench --compare-llamacpp`): the missing-extra error, argument handling, the
vs_llamacpp arithmetic on hand-made runs, the runner/report plumbing with a fake peer, and (only where
the optional llama-cpp-python is installed) a short real run."""
from __future__ import annotations

import json
import sys

import pytest

from specjax.harness import cli, llamacpp_peer, metrics, questions, report, runner

GOOD = [{"question_id": 1, "category": "qa", "turns": ["What is the capital of France? One sentence."]},
        {"question_id": 2, "category": "summarization", "turns": [
            "Summarize in one sentence: " + " ".join(f"On day {i} the cat sat on mat number {i}." for i in range(60))]}]


def _args(tmp_path, *extra):
  qfile = tmp_path / "q.jsonl"
  qfile.write_text("\n".join(json.dumps(r) for r in GOOD) + "\n")
  import argparse
  ap = argparse.ArgumentParser()
  cli.add_arguments(ap)
  argv = ["--questions", str(qfile), "--out", str(tmp_path / "out"), "--no-progress", *extra]
  args = ap.parse_args(argv)
  args.argv = argv
  return args


@pytest.fixture
def no_model_work(monkeypatch):
  """Any model loading or compiling now fails the test."""
  import specjax as sj

  def refuse(*a, **k):
    raise AssertionError("model work started before the llama.cpp checks")
  monkeypatch.setattr(sj, "load_model", refuse)
  monkeypatch.setattr(runner, "run_benchmark", refuse)


# ---------------------------------------------------------------- bad input, before any model work


def test_missing_extra_says_how_to_install_before_any_model_work(tmp_path, capsys, monkeypatch, no_model_work):
  monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now raises ImportError
  assert cli.run(_args(tmp_path, "--compare-llamacpp")) == 2
  err = capsys.readouterr().err
  assert "pip install -e '.[llamacpp]'" in err and "cmake" in err and "C++ compiler" in err
  with pytest.raises(ImportError, match=r"pip install -e '\.\[llamacpp\]'"):
    llamacpp_peer.require_llamacpp()


def test_a_non_gguf_model_is_refused_before_any_model_work(tmp_path, capsys, monkeypatch, no_model_work):
  monkeypatch.setattr(llamacpp_peer, "require_llamacpp", lambda: None)  # as if installed
  argv = _args(tmp_path).argv + ["--compare-llamacpp", "--model", str(tmp_path)]  # a directory
  assert cli.main(argv) == 2
  assert "--compare-llamacpp loads a .gguf file" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--llamacpp-threads", "0", "--llamacpp-threads '0' must be 'auto' or an int >= 1"),
    ("--llamacpp-threads", "two", "--llamacpp-threads 'two' must be 'auto' or an int >= 1"),
    ("--llamacpp-lookup", "0", "--llamacpp-lookup 0 must be >= 1"),
])
def test_bad_llamacpp_arguments(tmp_path, capsys, no_model_work, flag, value, message):
  assert cli.main(_args(tmp_path).argv + ["--compare-llamacpp", flag, value]) == 2
  assert message in capsys.readouterr().err


def test_llamacpp_argument_defaults(tmp_path):
  args = _args(tmp_path)
  assert (args.compare_llamacpp, args.llamacpp_threads, args.llamacpp_lookup) == (False, "auto", 10)
  args = _args(tmp_path, "--compare-llamacpp", "--llamacpp-threads", "2", "--llamacpp-lookup", "4")
  assert (args.compare_llamacpp, args.llamacpp_threads, args.llamacpp_lookup) == (True, "2", 4)
  assert llamacpp_peer.default_threads() >= 1


# ---------------------------------------------------------------- arithmetic on hand-made runs


def _run(drafter, tps, cat="qa", qid=1, toks=None, tokens=10):
  toks = toks or [1] * tokens
  return {"drafter": drafter, "category": cat, "question_id": qid, "turn": 1, "new_tokens": len(toks),
          "wall_s": len(toks) / tps, "steps": len(toks), "tokens": toks}


def test_vs_llamacpp_ratios_per_category_and_overall():
  ar_qa, ar_rag = [1, 2, 3, 4], [5, 6, 7, 8]
  runs = [_run("none", 10, "qa", toks=ar_qa), _run("ngram", 30, "qa", toks=ar_qa),
          _run("none", 20, "rag", toks=ar_rag), _run("ngram", 10, "rag", toks=ar_rag),
          _run("llamacpp-greedy", 40, "qa", toks=ar_qa), _run("llamacpp-lookup", 20, "qa", toks=ar_qa),
          _run("llamacpp-greedy", 10, "rag", toks=[5, 6, 9, 9]),  # diverges after 2 of 4 tokens
          _run("llamacpp-lookup", 50, "rag", toks=[5, 6, 9, 9])]
  s = metrics.summarize(runs, greedy=True)
  v = s["vs_llamacpp"]
  assert v["qa"]["ratio"] == pytest.approx(10 / 40)  # specjax AR / llama.cpp greedy
  assert v["rag"]["ratio"] == pytest.approx(20 / 10)
  assert v["overall"]["ratio"] == pytest.approx(15 / 25)  # means over prompts, then the ratio
  assert (v["qa"]["specjax_best"], v["qa"]["llamacpp_best"]) == ("ngram", "llamacpp-greedy")
  assert v["qa"]["best_ratio"] == pytest.approx(30 / 40)
  assert (v["rag"]["specjax_best"], v["rag"]["llamacpp_best"]) == ("none", "llamacpp-lookup")
  assert v["rag"]["best_ratio"] == pytest.approx(20 / 50)
  assert v["overall"]["specjax_best"] == "ngram" and v["overall"]["best_ratio"] == pytest.approx(20 / 35)
  assert v["overall"]["ar_tokens_per_s"] == pytest.approx(15)
  assert v["overall"]["llamacpp_greedy_tokens_per_s"] == pytest.approx(25)
  # Agreement of llama.cpp's greedy with specjax's AR: whole prompts, and tokens before the first difference.
  assert v["qa"]["greedy_identical_to_ar"] == 1.0 and v["rag"]["greedy_identical_to_ar"] == 0.0
  assert v["overall"]["greedy_identical_to_ar"] == 0.5
  assert v["qa"]["greedy_token_agreement"] == 1.0 and v["rag"]["greedy_token_agreement"] == 0.5
  assert v["overall"]["greedy_token_agreement"] == pytest.approx(0.75)
  # llama.cpp's lookup is measured against llama.cpp's greedy, never against specjax's AR.
  assert s["llamacpp-lookup"]["qa"]["speedup"] == pytest.approx(0.5)
  assert s["llamacpp-lookup"]["rag"]["speedup"] == pytest.approx(5.0)
  assert "vs_hf" not in s
  assert metrics.summarize(runs, greedy=False)["vs_llamacpp"]["overall"].get("greedy_token_agreement") is None


def test_both_peers_keep_their_own_baselines():
  runs = [_run("none", 10), _run("ngram", 12), _run("hf-greedy", 5), _run("hf-prompt-lookup", 8),
          _run("llamacpp-greedy", 40), _run("llamacpp-lookup", 30)]
  s = metrics.summarize(runs)
  assert s["vs_hf"]["overall"]["specjax_best"] == "ngram"  # llama.cpp is not one of specjax's methods
  assert s["vs_hf"]["overall"]["ratio"] == pytest.approx(12 / 8)
  assert s["vs_llamacpp"]["overall"]["llamacpp_best"] == "llamacpp-greedy"
  assert s["vs_llamacpp"]["overall"]["best_ratio"] == pytest.approx(12 / 40)
  assert s["hf-prompt-lookup"]["overall"]["speedup"] == pytest.approx(8 / 5)
  assert s["llamacpp-lookup"]["overall"]["speedup"] == pytest.approx(30 / 40)


def test_common_prefix_fraction():
  base = [_run("none", 1, qid=1, toks=[1, 2, 3, 4]), _run("none", 1, qid=2, toks=[1, 2])]
  assert metrics.common_prefix_fraction([_run("x", 1, qid=1, toks=[1, 2, 3, 4])], base) == 1.0
  assert metrics.common_prefix_fraction([_run("x", 1, qid=1, toks=[9, 2, 3, 4])], base) == 0.0
  assert metrics.common_prefix_fraction([_run("x", 1, qid=2, toks=[1, 2, 3, 4])], base) == 0.5  # ran on past EOS
  assert metrics.common_prefix_fraction([_run("x", 1, qid=3)], base) is None


# ---------------------------------------------------------------- plumbing with a fake peer


class FakeLlamaCpp:
  """Stands in for LlamaCppPeer: replays specjax's AR tokens at fixed rates."""

  methods = llamacpp_peer.METHODS
  versions = {"llama_cpp_python": "fake", "threads": 2, "thread_mode": "fixed", "n_ctx": 512, "lookup_num_pred_tokens": 10,
              "lookup_max_ngram_size": 2, "system_info": "AVX2 = 1"}

  def __init__(self, model):
    self.model = model

  def generate(self, ids, method, max_new_tokens, temperature=0.0, top_p=1.0, seed=0):
    import specjax as sj
    toks = sj.generate(self.model, [ids], max_new_tokens=max_new_tokens).tokens[0]
    rate = 1.0 if method == "llamacpp-greedy" else 0.5
    return {"tokens": toks, "new_tokens": len(toks), "wall_s": len(toks) / rate, "prefill_s": 0.1,
            "steps": len(toks)}


def test_llamacpp_peer_plumbing_with_a_fake_peer():
  from specjax.testing import tiny_model
  tiny = tiny_model(vocab_size=259, scale=4.0)
  res = runner.run_benchmark(tiny, questions.as_questions(GOOD), ["none"], max_new_tokens=8,
                             llamacpp=FakeLlamaCpp(tiny), progress=False, log=lambda s: None)
  s = res["summary"]
  assert s["llamacpp-greedy"]["overall"]["tokens_per_s"] == pytest.approx(1.0)
  assert s["llamacpp-lookup"]["overall"]["speedup"] == pytest.approx(0.5)
  v = s["vs_llamacpp"]["overall"]
  assert v["ratio"] == pytest.approx(s["none"]["overall"]["tokens_per_s"])
  assert v["greedy_identical_to_ar"] == 1.0 and v["greedy_token_agreement"] == 1.0
  assert res["settings"]["llamacpp"]["threads"] == 2
  md = report.markdown(res)
  assert "specjax vs llama.cpp" in md and "| **overall** |" in md and "AVX2 = 1" in md
  assert "## Speedup × (τ) per category" in md and "| category | llamacpp" not in md  # not a specjax column
  cli._print_summary(res)


def test_thread_calibration_keeps_the_faster_count():
  """threads="auto": greedy is timed at each count, both methods get the faster (the calls are faked)."""
  peer = object.__new__(llamacpp_peer.LlamaCppPeer)  # no llama_cpp needed: only the calibration logic
  peer.auto, peer.thread_choices, peer.versions, peer.llms = True, (1, 2), {"threads": 2, "calibrations": []}, {}
  rate = {1: 30.0, 2: 5.0}  # an oversubscribed machine: 2 spinning threads lose
  peer.set_threads = lambda t: peer.versions.update(threads=t)
  peer.generate = lambda ids, method, n: {"new_tokens": n, "wall_s": n / rate[peer.versions["threads"]]}
  assert peer.calibrate([1, 2, 3]) == 1 and peer.versions["threads"] == 1
  rate.update({1: 10.0, 2: 18.0})
  assert peer.calibrate([1, 2, 3]) == 2
  assert peer.versions["calibrations"] == [{"1": 30.0, "2": 5.0}, {"1": 10.0, "2": 18.0}]
  peer.auto = False
  assert peer.calibrate([1]) == 2 and len(peer.versions["calibrations"]) == 2


# ---------------------------------------------------------------- the real peer (optional extra)


@pytest.mark.real
def test_real_llamacpp_run(tmp_path):
  """Needs llama-cpp-python (the `llamacpp` extra; CI does not install it): 1 prompt, 16 new tokens."""
  pytest.importorskip("llama_cpp")
  # The summarization prompt is longer than llama.cpp's n_batch (512), which once broke its lookup.
  # One thread: timing 2 threads on a busy 2-core machine can take a minute (test_thread_calibration).
  args = _args(tmp_path, "--compare-llamacpp", "--drafters", "none", "--max-new-tokens", "16", "--limit", "1",
               "--categories", "summarization", "--llamacpp-threads", "1")
  assert cli.run(args) == 0
  res = json.loads((tmp_path / "out" / "results.json").read_text())
  s = res["summary"]
  for m in ("none", "llamacpp-greedy", "llamacpp-lookup"):
    assert s[m]["overall"]["tokens_per_s"] > 0, m
    assert s[m]["overall"]["prompts"] == 1
  v = s["vs_llamacpp"]["overall"]
  assert v["ratio"] > 0 and v["best_ratio"] > 0 and 0 <= v["greedy_token_agreement"] <= 1
  assert {"ar_tokens_per_s", "llamacpp_greedy_tokens_per_s", "specjax_best", "llamacpp_best",
          "greedy_identical_to_ar"} <= set(v)
  runs = [r for r in res["runs"] if r["drafter"].startswith("llamacpp-")]
  assert all(1 <= r["new_tokens"] <= 16 and 0 < r["prefill_s"] <= r["wall_s"] for r in runs)
  assert runs[0]["prompt_tokens"] > 512
  lc = res["settings"]["llamacpp"]
  assert (lc["threads"], lc["thread_mode"], lc["calibrations"]) == (1, "fixed", [])
  assert "specjax vs llama.cpp" in (tmp_path / "out" / "report.md").read_text()
