"""Training survives real interruptions: a subprocess is SIGKILLed mid-run (twice) and restarted;
the result equals an uninterrupted run bit for bit, with no lost or repeated optimizer steps."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from specjax import testing

import test_train  # the tiny feature set
import train_worker

STEPS, SAVE_EVERY = 120, 10
WORKER = os.path.join(os.path.dirname(__file__), "train_worker.py")


def _run_until_checkpoint(args, ckpt_dir, at_least):
  """Starts a worker and SIGKILLs it as soon as a checkpoint >= at_least exists."""
  proc = subprocess.Popen([sys.executable, WORKER, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline:
    steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
    if steps and max(steps) >= at_least:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return max(steps)
    if proc.poll() is not None:
      raise AssertionError(f"worker finished before it could be interrupted: {proc.stdout.read()!r}")
    time.sleep(0.02)
  proc.kill()
  raise AssertionError("worker made no checkpoint in time")


def test_killed_training_resumes_exactly(tmp_path):
  model = testing.tiny_model()
  fdir, _ = test_train._features(tmp_path, model)
  ckpt, log = str(tmp_path / "run"), str(tmp_path / "log.jsonl")
  args = [fdir, ckpt, log, str(STEPS), str(SAVE_EVERY)]
  killed_at = [_run_until_checkpoint(args, ckpt, 30), _run_until_checkpoint(args, ckpt, 70)]
  assert killed_at[0] < killed_at[1] < STEPS
  out = subprocess.run([sys.executable, WORKER, *args], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  starts = [int(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("start")]
  assert starts and starts[0] >= killed_at[1] - SAVE_EVERY  # resumed from a late checkpoint, not from 0

  reference = train_worker.make_trainer(fdir, str(tmp_path / "ref"), STEPS, SAVE_EVERY)
  ref_logs = reference.train(progress=False)
  resumed = train_worker.make_trainer(fdir, ckpt, STEPS, SAVE_EVERY)  # restores the final checkpoint
  assert resumed.step == STEPS
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               reference._tree(), resumed._tree())
  # Every step 1..STEPS was logged; steps redone after a kill logged the same loss both times.
  logged = {}
  for line in open(log):
    rec = json.loads(line)
    logged.setdefault(rec["step"], set()).add(rec["loss"])
  assert sorted(logged) == list(range(1, STEPS + 1))
  assert all(len(v) == 1 for v in logged.values())
  assert [next(iter(logged[s])) for s in range(1, STEPS + 1)] == [r["loss"] for r in ref_logs]
  print(f"interruption points survived: {killed_at}")
