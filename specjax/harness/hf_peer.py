"""The HF transformers peer: the same GGUF, the same prompt ids, timed in the same process.

torch and transformers are an optional extra (`pip install -e '.[hf]'`) and are
imported only when the peer is built. Methods:

  hf-greedy          model.generate(do_sample=False)            (or sampling at T > 0)
  hf-prompt-lookup   model.generate(prompt_lookup_num_tokens=N)  (HF's n-gram drafting)
  hf-assisted        model.generate(assistant_model=draft)       (only with a draft model)

Threads: torch's OpenMP pool degrades badly when the machine is oversubscribed
(measured here with other jobs running: 3 tokens/s with 2 threads vs 20 with 1).
With threads="auto" the peer times both 1 and `max_threads` threads on the
warm-up prompt (and again every few prompts, see `calibrate`) and uses the
faster, so HF is measured at its best on the machine as it is.

Generation stops at the target's EOS ids, as specjax does, and the EOS token is
counted among the new tokens (specjax counts it too). Verify steps are counted
with a forward hook on the target (one forward = one step that emits >= 1 token,
the prefill included, as in specjax where the prefill's token comes from step 1).
"""
from __future__ import annotations

import os
import time
from typing import Sequence

INSTALL_HINT = ("--compare-hf needs torch and transformers (+ accelerate for GGUF): install the optional extra "
                "with  pip install -e '.[hf]'  (from the specjax checkout; it pins torch==2.13.0. Where pip would "
                "fetch a CUDA build, install the CPU build first: pip install torch==2.13.0 --index-url "
                "https://download.pytorch.org/whl/cpu)")

METHODS = ("hf-greedy", "hf-prompt-lookup")


def require_hf():
  """Imports torch and transformers, or raises ImportError saying how to install them."""
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except ImportError as e:
    raise ImportError(f"{INSTALL_HINT} ({e})") from None
  import importlib.util
  if importlib.util.find_spec("accelerate") is None:
    raise ImportError(f"{INSTALL_HINT} (accelerate is missing)")
  return torch, transformers


class HFPeer:
  """A transformers model on CPU, float32, with `threads` torch threads."""

  def __init__(self, model_path: str, eos_ids: Sequence[int], threads: int | str = "auto", prompt_lookup: int = 10,
               max_matching_ngram: int = 2, assistant_path: str | None = None, max_threads: int = 2):
    torch, transformers = require_hf()
    self.torch = torch
    if threads != "auto" and (not isinstance(threads, int) or threads < 1):
      raise ValueError(f"threads={threads!r} must be 'auto' or an int >= 1")
    self.auto = threads == "auto"
    self.thread_choices = tuple(sorted({1, max_threads}))
    torch.set_num_threads(max_threads if self.auto else threads)
    self.model = _load(transformers, torch, model_path)
    self.assistant = _load(transformers, torch, assistant_path) if assistant_path else None
    self.eos_ids = [int(e) for e in eos_ids]
    self.prompt_lookup = prompt_lookup
    self.max_matching_ngram = max_matching_ngram
    self.forwards = 0
    self.model.register_forward_hook(self._count)
    self.methods = METHODS + (("hf-assisted",) if self.assistant is not None else ())
    self.versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                     "threads": torch.get_num_threads(), "thread_mode": "auto" if self.auto else "fixed",
                     "prompt_lookup_num_tokens": prompt_lookup, "max_matching_ngram_size": max_matching_ngram,
                     "calibrations": []}

  def calibrate(self, ids: Sequence[int], new_tokens: int = 32, rounds: int = 2) -> int:
    """With threads="auto": times greedy generation at each thread count, keeps the fastest."""
    if not self.auto:
      return self.torch.get_num_threads()
    rates = {t: [] for t in self.thread_choices}
    for _ in range(rounds):
      for t in self.thread_choices:
        self.torch.set_num_threads(t)
        r = self.generate(ids, "hf-greedy", new_tokens)
        rates[t].append(r["new_tokens"] / r["wall_s"])
    mean = {t: sum(v) / len(v) for t, v in rates.items()}
    best = max(mean, key=mean.get)
    self.torch.set_num_threads(best)
    self.versions["threads"] = best
    self.versions["calibrations"].append({str(t): round(v, 2) for t, v in mean.items()})
    return best

  def _count(self, module, inputs, output):
    self.forwards += 1

  def generate(self, ids: Sequence[int], method: str, max_new_tokens: int, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0) -> dict:
    """One batch-1 generation -> {tokens, new_tokens, wall_s, steps}."""
    torch = self.torch
    x = torch.tensor([list(ids)], dtype=torch.long)
    kwargs = dict(attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, eos_token_id=self.eos_ids,
                  pad_token_id=self.eos_ids[0])
    if temperature > 0:
      kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
      kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if method == "hf-prompt-lookup":
      kwargs.update(prompt_lookup_num_tokens=self.prompt_lookup, max_matching_ngram_size=self.max_matching_ngram)
    elif method == "hf-assisted":
      kwargs.update(assistant_model=self.assistant)
    elif method != "hf-greedy":
      raise ValueError(f"unknown HF method {method!r}; known: {', '.join(self.methods)}")
    torch.manual_seed(seed)
    self.forwards = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
      out = self.model.generate(x, **kwargs)
    wall = time.perf_counter() - t0
    tokens = out[0, x.shape[1]:].tolist()
    for i, t in enumerate(tokens):  # stop at the first EOS, as specjax does (HF pads after it)
      if t in self.eos_ids:
        tokens = tokens[:i + 1]
        break
    return {"tokens": tokens, "new_tokens": len(tokens), "wall_s": wall, "steps": max(self.forwards, 1)}


def _load(transformers, torch, path: str):
  path = os.path.abspath(path)
  if os.path.isdir(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  elif os.path.isfile(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                              dtype=torch.float32)
  else:
    raise FileNotFoundError(f"model path {path!r} does not exist; pass a .gguf file or an HF model directory")
  model.eval()
  return model
