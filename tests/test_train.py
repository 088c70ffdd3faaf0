"""Training pipeline on a tiny model: data parsing, loss falls, checkpoints round-trip and resume."""
import json
import os

import jax
import numpy as np
import pytest

from specjax import testing
from specjax.train import data, trainer
from specjax.train.losses import ttt_mask


def _features(tmp_path, model, n=12, seed=0):
  rng = np.random.default_rng(seed)
  examples = []
  for i in range(n):  # a learnable pattern: responses count upward mod 60
    start = int(rng.integers(3, 60))
    examples.append({"prompt": rng.integers(3, 64, size=int(rng.integers(3, 8))).tolist(),
                     "response": [3 + (start + j) % 60 for j in range(20)]})
  examples += [{"prompt": [5, 6], "response": []}, {"prompt": [5] * 40, "response": [7] * 40}]
  index = data.extract_features(model, examples, str(tmp_path / "features"), (0, 1), max_len=48, batch=4)
  return str(tmp_path / "features"), index


def test_truncated_json_array_keeps_complete_records():
  text = '[\n {"a": 1},\n {"b": [1, 2]},\n {"c": "trunc'
  records, dropped = data.parse_json_array_prefix(text)
  assert records == [{"a": 1}, {"b": [1, 2]}]
  assert dropped == len('{"c": "trunc')
  assert data.parse_json_array_prefix("[{\"a\": 1}]") == ([{"a": 1}], 0)


def test_sharegpt_parse_reports_what_it_dropped(tmp_path):
  path = tmp_path / "share.json"
  recs = [{"conversations": [{"from": "human", "value": "hi"}]},
          {"conversations": [{"from": "gpt", "value": "x"}]},
          {"conversations": [{"from": "human", "value": "  "}]},
          {"conversations": [{"from": "human", "value": "hi"}]}]
  path.write_text(json.dumps(recs)[:-1] + ', {"conversations": [{"from": "hu')
  prompts, rep = data.sharegpt_prompts(str(path))
  assert prompts == ["hi"]
  assert (rep.records, rep.skipped_not_human, rep.skipped_empty, rep.duplicates) == (4, 1, 1, 1)
  assert rep.dropped_chars > 0


def test_refuses_specbench_dev(tmp_path):
  p = tmp_path / "specbench_dev.jsonl"
  p.write_text("[]")
  with pytest.raises(ValueError, match="measurement set"):
    data.sharegpt_prompts(str(p))


def test_extract_features_skips_and_counts(tmp_path):
  model = testing.tiny_model()
  _, index = _features(tmp_path, model)
  assert index["skipped_empty"] == 1 and index["skipped_too_long"] == 1
  assert len(index["offsets"]) == 13


def test_ttt_mask_shape_and_blocks():
  m = np.asarray(ttt_mask(3, 2, 3))[0]
  assert m.shape == (3, 9)
  assert m[1].tolist() == [1, 1, 0, 0, 1, 0, 0, 1, 0]
  assert np.asarray(ttt_mask(3, 0, 3))[0, 2].tolist() == [1, 1, 1] + [0] * 6


@pytest.mark.parametrize("kind", ["eagle3", "eagle1", "mtp"])
def test_loss_falls(tmp_path, kind):
  model = testing.tiny_model()
  fdir, _ = _features(tmp_path, model)
  cfg = trainer.head_config_for(model, kind, 48, (0, 1))
  # Hard labels: the tiny target's own distribution is near uniform, so soft labels leave
  # almost nothing to learn here (test_soft_labels_are_the_targets_next_distribution covers them).
  tc = trainer.TrainConfig(steps=40, batch=4, seq=32, lr=1e-2, warmup=3, unroll=3, save_every=100,
                           soft_labels=False)
  tr = trainer.Trainer(model, cfg, tc, trainer.FeatureData(fdir, kind), str(tmp_path / "ckpt"))
  logs = tr.train(progress=False)
  first, last = np.mean([r["loss"] for r in logs[:3]]), np.mean([r["loss"] for r in logs[-3:]])
  assert last < first - 0.3, (first, last)  # nats; shared-head kinds start lower


def test_soft_labels_are_the_targets_next_distribution(tmp_path):
  """Unroll step j at index t must be scored against the target's distribution for token
  t+2+j, recomputed here from the model's own forward (not from the stored features)."""
  import jax.numpy as jnp
  from flax import nnx
  from specjax.train.losses import head_loss, unroll
  model = testing.tiny_model(scale=30.0)  # peaked logits, so a wrong shift shows
  fdir, _ = _features(tmp_path, model)
  cfg = trainer.head_config_for(model, "mtp", model.config.vocab_size, None)
  tc = trainer.TrainConfig(steps=1, batch=2, seq=24, unroll=2, prompt_weight=1.0)
  tr = trainer.Trainer(model, cfg, tc, trainer.FeatureData(fdir, "mtp"), str(tmp_path / "ckpt"))
  batch = jax.tree.map(jnp.asarray, tr.data.batch(0, 2, 24))
  got, _ = head_loss(tr.params, tr.graphdef, tr.frozen, batch, 2, 1.0, True)
  from specjax.models.model import forward_logits
  assert np.all(np.asarray(batch["pos0"]) == 0)  # windows start at the example's first token
  ref_logits = [np.asarray(forward_logits(model, np.asarray(batch["tokens"][b, :int(batch["length"][b])])),
                           np.float64) for b in range(2)]
  module = nnx.merge(tr.graphdef, tr.params)
  total, count = 0.0, 0
  d2t = np.asarray(tr.d2t)
  for j, _, logits in unroll(module, tr.frozen, batch, 2):
    logq = np.asarray(jax.nn.log_softmax(logits), np.float64)
    for b in range(2):
      for t in range(int(batch["length"][b]) - 2 - j):
        p = np.exp(ref_logits[b][t + 1 + j, d2t] - ref_logits[b][t + 1 + j, d2t].max())
        p /= p.sum()
        total -= float(p @ logq[b, t])
        count += 1
  np.testing.assert_allclose(float(got), total / count, rtol=2e-3)


def test_checkpoint_roundtrip_and_resume_is_exact(tmp_path):
  model = testing.tiny_model()
  fdir, _ = _features(tmp_path, model)
  cfg = trainer.head_config_for(model, "eagle3", 48, (0, 1))
  tc = trainer.TrainConfig(steps=8, batch=4, seq=32, lr=3e-3, warmup=2, unroll=2, save_every=4)
  mk = lambda d: trainer.Trainer(model, cfg, tc, trainer.FeatureData(fdir, "eagle3"), str(tmp_path / d))
  full = mk("a")
  full_logs = full.train(progress=False)
  part = mk("b")
  part.train(until=4, progress=False)
  saved = jax.tree.map(np.asarray, part._tree())
  resumed = mk("b")  # a new process would do exactly this
  assert resumed.step == 4
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, np.asarray(y)), saved, resumed._tree())
  logs = resumed.train(progress=False)
  assert [r["step"] for r in logs] == [5, 6, 7, 8]
  assert [r["lr"] for r in logs] == [r["lr"] for r in full_logs[4:]]
  assert [r["loss"] for r in logs] == [r["loss"] for r in full_logs[4:]]
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               full._tree(), resumed._tree())


def test_corrupt_training_checkpoint_is_a_clear_error(tmp_path):
  model = testing.tiny_model()
  fdir, _ = _features(tmp_path, model)
  cfg = trainer.head_config_for(model, "mtp", 48)
  tc = trainer.TrainConfig(steps=2, batch=2, seq=32, unroll=1, save_every=2, warmup=1)
  tr = trainer.Trainer(model, cfg, tc, trainer.FeatureData(fdir, "mtp"), str(tmp_path / "c"))
  tr.train(progress=False)
  for root, _, files in os.walk(tmp_path / "c" / "2"):
    for f in files:
      p = os.path.join(root, f)
      if os.path.getsize(p) > 100:
        with open(p, "r+b") as fh:
          fh.truncate(50)
  with pytest.raises(ValueError, match="corrupt or partial"):
    trainer.Trainer(model, cfg, tc, trainer.FeatureData(fdir, "mtp"), str(tmp_path / "c"))
