"""HF model directories (config.json + *.safetensors) -> config and HF-named tensors."""
from __future__ import annotations

import glob
import json
import os

import numpy as np

from specjax.models.llama import LlamaConfig


def read_hf_dir(path: str):
  cfg_file = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_file):
    raise FileNotFoundError(f"{cfg_file!r} not found; an HF model directory needs config.json and *.safetensors")
  with open(cfg_file) as f:
    hf = json.load(f)
  model_type = hf.get("model_type")
  if model_type != "llama" or hf.get("attention_bias") or hf.get("rope_scaling"):
    raise ValueError(f"{cfg_file!r}: unsupported model_type={model_type!r} (attention_bias="
                     f"{hf.get('attention_bias')}, rope_scaling={hf.get('rope_scaling')}); "
                     "specjax loads plain Llama-family decoders")
  files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not files:
    raise FileNotFoundError(f"no *.safetensors files in {path!r}")
  from safetensors import safe_open
  tensors = {}
  for file in files:
    try:
      with safe_open(file, framework="numpy") as f:
        for name in f.keys():
          tensors[name] = np.asarray(f.get_tensor(name), dtype=np.float32)
    except Exception as e:
      raise ValueError(f"cannot read {file!r}: {type(e).__name__}: {e}; the file is truncated or corrupt") from e
  heads = hf["num_attention_heads"]
  eos = hf.get("eos_token_id")
  eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
  cfg = LlamaConfig(
      vocab_size=hf["vocab_size"], hidden=hf["hidden_size"], layers=hf["num_hidden_layers"], heads=heads,
      kv_heads=hf.get("num_key_value_heads", heads), head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      ffn=hf["intermediate_size"], rope_base=float(hf.get("rope_theta", 10000.0)),
      norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", "lm_head.weight" not in tensors)),
      bos_id=hf.get("bos_token_id"), eos_ids=eos_ids, max_context=hf.get("max_position_embeddings", 8192))
  return cfg, tensors
