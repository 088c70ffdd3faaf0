"""A training run in its own process, for tests/test_resume.py to kill and restart.

    python tests/train_worker.py FEATURE_DIR CKPT_DIR LOG_PATH STEPS SAVE_EVERY
"""
import sys

from specjax import testing
from specjax.train import trainer


def make_trainer(feature_dir, ckpt_dir, steps, save_every):
  model = testing.tiny_model()
  cfg = trainer.head_config_for(model, "eagle3", 48, (0, 1))
  tc = trainer.TrainConfig(steps=steps, batch=4, seq=32, lr=3e-3, warmup=5, unroll=2, save_every=save_every)
  return trainer.Trainer(model, cfg, tc, trainer.FeatureData(feature_dir, "eagle3"), ckpt_dir)


if __name__ == "__main__":
  feature_dir, ckpt_dir, log_path, steps, save_every = sys.argv[1:6]
  tr = make_trainer(feature_dir, ckpt_dir, int(steps), int(save_every))
  print(f"start {tr.step}", flush=True)
  tr.train(log_path=log_path, progress=False)
  print(f"done {tr.step}", flush=True)
