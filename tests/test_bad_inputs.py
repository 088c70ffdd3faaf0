"""The bad-input matrix: every row of docs/bad_inputs.md, walked by one parametrised test.

Each case builds its bad input, calls the public API, and must raise the listed error type
with a message naming the offending value. The doc table is checked against this list,
so the two cannot drift apart.
"""
import dataclasses
import os
import re

import pytest

import specjax as sj
from specjax import testing

import test_io  # the GGUF / HF-directory writers

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "bad_inputs.md")
V = 64


@pytest.fixture(scope="module")
def model():
  return testing.tiny_model(seed=7)


def _gen(model, prompts, **kw):
  return sj.generate(model, prompts, max_new_tokens=kw.pop("max_new_tokens", 4), **kw)


def _gguf(tmp, model, **kw):
  return str(test_io.write_gguf(tmp / "m.gguf", model, **kw))


def _truncate(path, keep=0.5):
  data = open(path, "rb").read()
  open(path, "wb").write(data[: int(len(data) * keep)])
  return path


def _with_isa(value, fn, flags=None):
  """Runs fn with SPECJAX_CPU_ISA=value (and, given flags, a CPU reporting only those flags)."""
  from specjax import kernels
  old_env, old_flags = os.environ.get("SPECJAX_CPU_ISA"), kernels.cpu_flags
  os.environ["SPECJAX_CPU_ISA"] = value
  if flags is not None:
    kernels.cpu_flags = lambda: frozenset(flags)
  try:
    return fn()
  finally:
    kernels.cpu_flags = old_flags
    if old_env is None:
      os.environ.pop("SPECJAX_CPU_ISA")
    else:
      os.environ["SPECJAX_CPU_ISA"] = old_env


ZEN3_FLAGS = ("sse2", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2")

# (id, area, what, build(model, tmp_path) -> raises, error type, message regex)
CASES = [
    ("gguf-missing", "loader", "GGUF path that does not exist",
     lambda m, t: sj.load_model(str(t / "absent.gguf")), FileNotFoundError, r"GGUF file not found: .*absent\.gguf"),
    ("gguf-truncated", "loader", "GGUF file cut in half",
     lambda m, t: sj.load_model(_truncate(_gguf(t, m))), ValueError, r"cannot read GGUF file .*truncated"),
    ("gguf-not-gguf", "loader", "file that is not GGUF",
     lambda m, t: (t / "x.gguf").write_bytes(b"no" * 100) and sj.load_model(str(t / "x.gguf")), ValueError,
     r"x\.gguf.*not a GGUF file"),
    ("gguf-architecture", "loader", "GGUF of an unsupported architecture",
     lambda m, t: sj.load_model(_gguf(t, m, arch="gpt2")), ValueError, r"unsupported architecture 'gpt2'"),
    ("gguf-missing-tensor", "loader", "GGUF missing a weight tensor",
     lambda m, t: sj.load_model(_gguf(t, m, drop=("blk.0.attn_q.weight",))), ValueError,
     r"missing 1 weight tensors.*layers\.0\.self_attn\.q_proj"),
    ("hf-no-config", "loader", "HF directory without config.json",
     lambda m, t: (t / "d").mkdir() or sj.load_model(str(t / "d")), FileNotFoundError, r"config\.json.*not found"),
    ("hf-architecture", "loader", "HF directory of another model_type",
     lambda m, t: sj.load_model(str(test_io._write_hf_dir(t / "d", m, {"model_type": "gpt2"}))), ValueError,
     r"unsupported model_type='gpt2'"),
    ("hf-truncated", "loader", "truncated .safetensors file",
     lambda m, t: sj.load_model(str(_truncate(str(test_io._write_hf_dir(t / "d", m) / "model.safetensors"), 0.01)
                                    .rsplit("/", 1)[0])), ValueError, r"truncated or corrupt"),
    ("hf-shape", "loader", "safetensors shapes that disagree with config.json",
     lambda m, t: sj.load_model(str(test_io._write_hf_dir(t / "d", m, {"intermediate_size": 10}))), ValueError,
     r"mlp\.gate_proj\.weight has shape \(64, 32\), expected \(10, 32\)"),
    ("path-type", "loader", "model path that is not a string",
     lambda m, t: sj.load_model(3.5), ValueError, r"load_model takes a path \(str\) or None, got float"),
    ("temperature-negative", "config", "Sampling(temperature=-0.5)",
     lambda m, t: sj.Sampling(temperature=-0.5), ValueError, r"temperature=-0\.5 must be a finite number >= 0"),
    ("temperature-nan", "config", "Sampling(temperature=nan)",
     lambda m, t: sj.Sampling(temperature=float("nan")), ValueError, r"temperature=nan must be"),
    ("top-p-zero", "config", "Sampling(top_p=0)",
     lambda m, t: sj.Sampling(top_p=0.0), ValueError, r"top_p=0\.0 must be in \(0, 1\]"),
    ("top-p-above-one", "config", "Sampling(top_p=1.5)",
     lambda m, t: sj.Sampling(top_p=1.5), ValueError, r"top_p=1\.5 must be in \(0, 1\]"),
    ("top-k-negative", "config", "Sampling(top_k=-1)",
     lambda m, t: sj.Sampling(top_k=-1), ValueError, r"top_k=-1 must be an int >= 0"),
    ("k-zero", "config", "make_drafter(..., k=0)",
     lambda m, t: sj.make_drafter("ngram", m, k=0), ValueError, r"k=0 must be an int >= 1"),
    ("ngram-sizes", "config", "NGram(min_n=3, max_n=2)",
     lambda m, t: sj.make_drafter("ngram", m, k=2, min_n=3, max_n=2), ValueError, r"min_n=3, max_n=2"),
    ("ngram-short-k", "config", "NGram(k=2, short_k=3)",
     lambda m, t: sj.make_drafter("ngram", m, k=2, short_k=3), ValueError, r"short_k=3 .* must be in \[1, k=2\]"),
    ("draft-layers", "config", "default draft with more layers than the target",
     lambda m, t: sj.make_drafter("draft", m, k=2, layers=9), ValueError, r"draft layers=9 must be in \[1, 2\]"),
    ("drafter-unknown", "config", "unknown drafter name",
     lambda m, t: sj.make_drafter("nope", m), ValueError, r"unknown or unavailable drafter 'nope'; available: none"),
    ("drafter-option", "config", "unknown drafter option",
     lambda m, t: sj.make_drafter("ngram", m, k=2, windows=3), ValueError, r"bad options for drafter 'ngram'"),
    ("max-new-zero", "config", "max_new_tokens=0",
     lambda m, t: _gen(m, [[3, 4]], max_new_tokens=0), ValueError, r"max_new_tokens=0 must be an int >= 1"),
    ("seed-count", "config", "one seed per prompt, but too few",
     lambda m, t: _gen(m, [[3, 4], [5]], seed=[1]), ValueError, r"seed must be an int or one int per prompt \(2\)"),
    ("sampling-type", "config", "sampling given as a dict",
     lambda m, t: _gen(m, [[3]], sampling={"temperature": 1}), ValueError, r"sampling must be a specjax\.Sampling"),
    ("cache-too-small", "config", "cache_len too small for prompt + max_new_tokens + k",
     lambda m, t: _gen(m, [[3] * 10], cache_len=12, drafter=sj.make_drafter("ngram", m, k=3)), ValueError,
     r"needs 18 cache slots > cache_len=12"),
    ("prompt-too-long", "prompt", "prompt beyond the model's context",
     lambda m, t: _gen(m, [[3] * 1030]), ValueError, r"prompt of 1030 tokens .* beyond the model's context of 1024"),
    ("prompts-empty", "prompt", "empty prompt list",
     lambda m, t: _gen(m, []), ValueError, r"prompts is empty"),
    ("prompt-empty", "prompt", "an empty prompt",
     lambda m, t: _gen(m, [[3], []]), ValueError, r"prompt 1 is empty"),
    ("prompt-oov", "prompt", "token id >= vocabulary",
     lambda m, t: _gen(m, [[3, V + 5]]), ValueError, rf"prompt 0 has token ids outside \[0, {V}\): \[{V + 5}\]"),
    ("prompt-negative", "prompt", "negative token id",
     lambda m, t: _gen(m, [[3, -2]]), ValueError, r"outside \[0, 64\): \[-2\]"),
    ("prompt-dtype", "prompt", "float token ids",
     lambda m, t: _gen(m, [[1.0, 2.0]]), ValueError, r"prompt 0 must be a string or a 1-D list of int token ids"),
    ("prompt-unwrapped", "prompt", "a single prompt not wrapped in a list",
     lambda m, t: _gen(m, [3, 4, 5]), ValueError, r"wrap a single prompt in a list"),
    ("prompt-text-no-tokenizer", "prompt", "text prompt for a model without tokenizer",
     lambda m, t: _gen(m, ["hello"]), ValueError, r"prompt 0 is a string but the model has no tokenizer"),
    ("forward-ids", "prompt", "forward_logits with out-of-range ids",
     lambda m, t: sj.forward_logits(m, [1, 99]), ValueError, r"token ids must be in \[0, 64\)"),
    ("drafter-vocab", "mismatch", "draft model with another vocabulary",
     lambda m, t: _gen(m, [[3]], drafter=sj.make_drafter("draft", m, k=2, draft=testing.tiny_model(vocab_size=96))),
     ValueError, r"drafter vocabulary 96 != target vocabulary 64"),
    ("drafter-tokenizer", "mismatch", "drafter built for another tokenizer",
     lambda m, t: _gen(testing.tiny_model(vocab_size=300), [[3]], drafter=dataclasses.replace(
         sj.make_drafter("draft", testing.tiny_model(vocab_size=300), k=2, layers=1), tokenizer_fingerprint="abc")),
     ValueError, r"drafter tokenizer abc differs"),
    ("isa-unknown", "kernels", "SPECJAX_CPU_ISA naming no kernel variant",
     lambda m, t: _with_isa("avx9", lambda: _gen(m, [[3, 4]])), ValueError,
     r"SPECJAX_CPU_ISA='avx9' is not a kernel variant; use one of avx512, avx2, generic"),
    ("isa-unexecutable", "kernels", "SPECJAX_CPU_ISA=avx512 on a CPU without AVX-512 (an AMD Zen 3's flags)",
     lambda m, t: _with_isa("avx512", lambda: sj.load_model(), flags=ZEN3_FLAGS), ValueError,
     r"SPECJAX_CPU_ISA='avx512': this CPU cannot execute it \(missing avx512bw, avx512dq, avx512f, avx512vl; "
     r"its vector flags: avx avx2 f16c fma sse2 .*\); use one of avx2, generic"),
    ("nan-logits", "runtime", "target producing NaN logits (checked mode, the default)",
     lambda m, t: _gen(dataclasses.replace(m, params=__import__("jax").tree.map(lambda x: x * float("nan"), m.params)),
                       [[3, 4]]), ValueError, r"NaN logits for rows \[0\]"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, model, tmp_path):
  _, _, _, build, exc, pattern = case
  with pytest.raises(exc, match=pattern):
    build(model, tmp_path)


def test_doc_table_lists_every_case():
  doc = open(DOC).read()
  rows = re.findall(r"^\| `([a-z0-9-]+)` \|", doc, flags=re.M)
  assert rows == [c[0] for c in CASES], "docs/bad_inputs.md is out of date: run python tests/test_bad_inputs.py"


def render_doc() -> str:
  lines = ["# Bad input and the error it gets", "",
           "Generated from `tests/test_bad_inputs.py` (`python tests/test_bad_inputs.py > docs/bad_inputs.md`);",
           "the test walks every row. All but the runtime NaN check are raised before any compilation.", "",
           "| case | area | input | error | message (regex) |", "|---|---|---|---|---|"]
  for cid, area, what, _, exc, pattern in CASES:
    lines.append(f"| `{cid}` | {area} | {what} | `{exc.__name__}` | `{pattern.replace('|', '¦')}` |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  print(render_doc(), end="")
