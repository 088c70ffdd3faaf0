"""The llama.cpp peer: the same GGUF, the same prompt ids, timed in the same process.

llama-cpp-python is an optional extra (`pip install -e '.[llamacpp]'`, which
compiles llama.cpp from source for the machine's own ISA) and is imported only
when the peer is built. Methods:

  llamacpp-greedy   Llama.generate(temp=0)                                   (sampling at T > 0)
  llamacpp-lookup   the same with draft_model=LlamaPromptLookupDecoding(...)  (its n-gram drafting)

Each method has its own `Llama`: llama-cpp-python needs `logits_all=True` to
verify drafts (it then computes and copies the logits of every prompt token),
which plain greedy does not pay. Its verify runs llama.cpp's batched kernels,
whose arithmetic differs from the one-token path's, so llamacpp-lookup's tokens
need not equal llamacpp-greedy's (6 of 21 prompts did here). Every call starts from an empty KV cache
(`reset()`), as specjax's calls do: otherwise `generate` would reuse the cache
of the previous call's matching prefix and skip most of the prefill.

llama.cpp's AMX path (its "extra buffer type" on CPUs with AMX_INT8) segfaults
in ggml_backend_amx_mul_mat on the first decode of this model here (Xeon with
AMX; upstream llama.cpp issue 20824): with extra_buffer_types="auto" the peer
turns extra buffer types off (llama_model_params.use_extra_bufts) only when
llama.cpp reports AMX_INT8 = 1, and keeps llama.cpp's default elsewhere.

Threads: llama.cpp's threads spin at their barriers, so on an oversubscribed
machine 2 threads can be many times slower than 1 (seen here with another
benchmark running: minutes for one 128-token answer). With threads="auto" the
peer times greedy decoding at 1 and `max_threads` threads on the warm-up prompt
(and again every few prompts, see `calibrate`) and uses the faster for both
methods, as the HF peer does; an int fixes the count.

Timed like specjax's runs: wall seconds from the call to the last new token
(prefill + decode, warm: the runner's warm-up calls each method once first);
prefill_s is the time to the first new token. Generation stops at the target's
EOS ids, the EOS token counted among the new tokens. Steps = `eval` calls (the
prefill is step 1 and yields the first token, as in specjax), so τ is tokens
per target forward.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Sequence

INSTALL_HINT = ("--compare-llamacpp needs llama-cpp-python: install the optional extra with  "
                "pip install -e '.[llamacpp]'  (from the specjax checkout). It compiles llama.cpp from source "
                "for this CPU: it needs cmake and a C++ compiler and takes several minutes")

METHODS = ("llamacpp-greedy", "llamacpp-lookup")


def require_llamacpp():
  """Imports llama_cpp, or raises ImportError saying how to install it."""
  try:
    import llama_cpp
  except ImportError as e:
    raise ImportError(f"{INSTALL_HINT} ({e})") from None
  return llama_cpp


def default_threads() -> int:
  """The cores this process may run on (2 on the shared development machines)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_gguf(path: str) -> str:
  path = os.path.abspath(path)
  if not (os.path.isfile(path) and path.endswith(".gguf")):
    raise ValueError(f"--compare-llamacpp loads a .gguf file, and {path!r} is not one; pass --model FILE.gguf "
                     "(or nothing, for the embedded default)")
  return path


class LlamaCppPeer:
  """llama.cpp on CPU through llama-cpp-python, `threads` threads for prefill and decode."""

  def __init__(self, model_path: str, eos_ids: Sequence[int], threads: int | str = "auto", n_ctx: int = 8192,
               lookup_tokens: int = 10, max_ngram_size: int = 2, extra_buffer_types: bool | str = "auto",
               max_threads: int | None = None):
    llama_cpp = require_llamacpp()
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    if threads != "auto" and (not isinstance(threads, int) or threads < 1):
      raise ValueError(f"threads={threads!r} must be 'auto' or an int >= 1")
    self.llama_cpp = llama_cpp
    self.auto = threads == "auto"
    max_threads = max_threads or default_threads()
    self.thread_choices = tuple(sorted({1, max_threads}))
    threads = max_threads if self.auto else threads
    if extra_buffer_types not in ("auto", True, False):
      raise ValueError(f"extra_buffer_types={extra_buffer_types!r} must be 'auto', True or False")
    path = check_gguf(model_path)
    info = _system_info(llama_cpp)
    if extra_buffer_types == "auto":
      extra_buffer_types = "AMX_INT8 = 1" not in info
    common = dict(n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_gpu_layers=0, verbose=False)
    draft = LlamaPromptLookupDecoding(max_ngram_size=max_ngram_size, num_pred_tokens=lookup_tokens)
    with _use_extra_bufts(llama_cpp, extra_buffer_types):
      self.llms = {"llamacpp-greedy": llama_cpp.Llama(path, **common),
                   # logits_all=True as well: with a draft model alone, llama-cpp-python sizes its logits
                   # buffer for n_batch rows and fails on any prompt longer than n_batch (512) tokens.
                   "llamacpp-lookup": llama_cpp.Llama(path, draft_model=draft, logits_all=True, **common)}
    self.eos_ids = {int(e) for e in eos_ids}
    self.n_ctx = n_ctx
    self.methods = METHODS
    self.evals = 0
    for llm in self.llms.values():
      llm.eval = self._counting(llm.eval)  # generate() calls self.eval once per target forward
    self.versions = {"llama_cpp_python": llama_cpp.__version__, "threads": threads,
                     "thread_mode": "auto" if self.auto else "fixed", "calibrations": [], "n_ctx": n_ctx,
                     "lookup_num_pred_tokens": lookup_tokens, "lookup_max_ngram_size": max_ngram_size,
                     "extra_buffer_types": extra_buffer_types, "system_info": info}

  def set_threads(self, threads: int):
    for llm in self.llms.values():
      self.llama_cpp.llama_set_n_threads(llm.ctx, threads, threads)
    self.versions["threads"] = threads

  def calibrate(self, ids: Sequence[int], new_tokens: int = 32, rounds: int = 2) -> int:
    """With threads="auto": times greedy generation at each thread count, keeps the fastest."""
    if not self.auto:
      return self.versions["threads"]
    rates = {t: [] for t in self.thread_choices}
    for _ in range(rounds):
      for t in self.thread_choices:
        self.set_threads(t)
        r = self.generate(ids, "llamacpp-greedy", new_tokens)
        rates[t].append(r["new_tokens"] / r["wall_s"])
    mean = {t: sum(v) / len(v) for t, v in rates.items()}
    best = max(mean, key=mean.get)
    self.set_threads(best)
    self.versions["calibrations"].append({str(t): round(v, 2) for t, v in mean.items()})
    return best

  def _counting(self, eval_fn):
    def counted(tokens):
      self.evals += 1
      return eval_fn(tokens)
    return counted

  def generate(self, ids: Sequence[int], method: str, max_new_tokens: int, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0) -> dict:
    """One batch-1 generation from an empty cache -> {tokens, new_tokens, wall_s, prefill_s, steps}."""
    if method not in self.llms:
      raise ValueError(f"unknown llama.cpp method {method!r}; known: {', '.join(self.methods)}")
    if len(ids) + max_new_tokens > self.n_ctx:
      raise ValueError(f"prompt of {len(ids)} tokens + {max_new_tokens} new exceeds llama.cpp's n_ctx {self.n_ctx}")
    llm = self.llms[method]
    # temp=0 is llama.cpp's greedy sampler; otherwise plain temperature + top-p (top_k=0: the whole vocabulary).
    kwargs = dict(temp=temperature, top_p=top_p, top_k=0, min_p=0.0, typical_p=1.0, repeat_penalty=1.0)
    llm.set_seed(seed)
    self.evals = 0
    tokens: list[int] = []
    t0 = time.perf_counter()
    llm.reset()
    prefill = None
    for tok in llm.generate(list(ids), **kwargs):
      if prefill is None:
        prefill = time.perf_counter() - t0
      tokens.append(int(tok))
      if tokens[-1] in self.eos_ids or len(tokens) >= max_new_tokens:
        break
    wall = time.perf_counter() - t0
    return {"tokens": tokens, "new_tokens": len(tokens), "wall_s": wall, "prefill_s": prefill,
            "steps": max(self.evals, 1)}


@contextlib.contextmanager
def _use_extra_bufts(llama_cpp, on: bool):
  """Llama() takes no argument for llama_model_params.use_extra_bufts: set it in the defaults it starts from."""
  lib = llama_cpp.llama_cpp
  defaults = lib.llama_model_default_params

  def params():
    p = defaults()
    p.use_extra_bufts = on
    return p
  lib.llama_model_default_params = params
  try:
    yield
  finally:
    lib.llama_model_default_params = defaults


def _system_info(llama_cpp) -> str:
  """llama.cpp's own report of the CPU features it was built for (AVX2 = 1 | AVX512 = 1 | ...)."""
  try:
    info = llama_cpp.llama_print_system_info()
    return (info.decode() if isinstance(info, bytes) else str(info)).strip()
  except Exception:  # an older binding without it: the report just lacks the line
    return ""
