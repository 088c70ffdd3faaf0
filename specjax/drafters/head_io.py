"""Draft-head files: `meta.json` (head config, target shapes, recipe) + an orbax tree.

    <dir>/meta.json     {"format": 1, "kind", "draft_vocab", "feature_layers", "target": {...}, "recipe": ...}
    <dir>/params/       orbax StandardCheckpointer tree {"head": {...}, "d2t": [N] int32}

Shipped heads are stored in bfloat16 (half the bytes; the head runs in float32).
Loading refuses a head made for another target before reading any array, and
turns a corrupt or partial directory into a ValueError that names the path.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from specjax.models.heads import DraftHead, HeadConfig
from specjax.models.llama import LlamaConfig

FORMAT = 1


def head_config_to_json(cfg: HeadConfig) -> dict:
  target = dataclasses.asdict(cfg.target)
  target["eos_ids"] = list(target["eos_ids"])
  return {"kind": cfg.kind, "draft_vocab": cfg.draft_vocab, "feature_layers": list(cfg.feature_layers),
          "target": target}


def head_config_from_json(meta: dict) -> HeadConfig:
  target = dict(meta["target"])
  target["eos_ids"] = tuple(target.get("eos_ids", ()))
  return HeadConfig(kind=meta["kind"], target=LlamaConfig(**target), draft_vocab=int(meta["draft_vocab"]),
                    feature_layers=tuple(meta.get("feature_layers", ())))


def trained_params(params) -> dict:
  """The pure dict of a head's trained parameters: without the packed copies a drafter
  adds at load (heads.pack_head), which are derived, lossy and not part of the file."""
  pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
  if isinstance(pure, dict):
    return {k: trained_params(v) for k, v in pure.items() if k != "packed"}
  return pure


def save_head(path: str, cfg: HeadConfig, params, d2t, *, dtype=jnp.bfloat16, recipe: dict | None = None):
  """Writes a head directory (overwrites). params: nnx.State or its pure dict (a drafter's
  `weights["head"]` too: its packed copies are left out)."""
  import orbax.checkpoint as ocp
  pure = trained_params(params)
  tree = {"head": jax.tree.map(lambda x: jnp.asarray(x, dtype), pure), "d2t": jnp.asarray(d2t, jnp.int32)}
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(path, "params"), tree, force=True)
  meta = {"format": FORMAT, **head_config_to_json(cfg), "dtype": jnp.dtype(dtype).name, "recipe": recipe or {}}
  with open(os.path.join(path, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1)


def read_meta(path: str) -> dict:
  meta_path = os.path.join(path, "meta.json")
  if not os.path.isfile(meta_path):
    raise ValueError(f"draft head at {path!r} is partial or not a head: meta.json is missing")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    if meta.get("format") != FORMAT:
      raise ValueError(f"format {meta.get('format')!r} != {FORMAT}")
    head_config_from_json(meta)
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"draft head at {path!r} has a corrupt meta.json: {e}") from e
  return meta


def load_head(path: str, target_cfg: LlamaConfig):
  """-> (HeadConfig, head params nnx.State float32, d2t [N] int32) for target_cfg."""
  import orbax.checkpoint as ocp
  from specjax.drafters.eagle import check_target
  path = os.path.abspath(path)
  meta = read_meta(path)
  cfg = head_config_from_json(meta)
  check_target(cfg, target_cfg)
  # The block must use this target's exact config (eos ids, context) for hashing.
  cfg = dataclasses.replace(cfg, target=target_cfg)
  abstract = nnx.state(nnx.eval_shape(lambda: DraftHead(cfg, nnx.Rngs(0))))
  stored = jnp.dtype(meta.get("dtype", "float32"))
  want = {"head": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, stored), nnx.to_pure_dict(abstract)),
          "d2t": jax.ShapeDtypeStruct((cfg.draft_vocab,), jnp.int32)}
  params_dir = os.path.join(path, "params")
  if not os.path.isdir(params_dir):
    raise ValueError(f"draft head at {path!r} is partial: the params/ directory is missing")
  try:
    with ocp.StandardCheckpointer() as ckpt:
      tree = ckpt.restore(params_dir, want)
  except Exception as e:  # orbax raises many types for truncated/corrupt files
    raise ValueError(f"draft head at {path!r} is corrupt or partial (orbax could not restore it: "
                     f"{type(e).__name__}: {str(e)[:300]})") from e
  got = jax.tree.map(lambda x: tuple(x.shape), tree["head"])
  exp = jax.tree.map(lambda x: tuple(x.shape), want["head"])
  if got != exp:
    raise ValueError(f"draft head at {path!r} has parameter shapes {got} but its meta.json implies {exp}")
  d2t = np.asarray(tree["d2t"])
  if d2t.min() < 0 or d2t.max() >= target_cfg.vocab_size:
    raise ValueError(f"draft head at {path!r}: d2t ids outside [0, {target_cfg.vocab_size})")
  nnx.replace_by_pure_dict(abstract, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree["head"]))
  return cfg, abstract, jnp.asarray(d2t, jnp.int32)
