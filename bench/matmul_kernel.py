"""Time of the CPU small-M matmul kernels per variant: one step's matrices at M rows.

    python bench/matmul_kernel.py [--rows 1,2,4,6,8] [--isa avx512,avx2,generic] [--json]

SmolLM2-135M's matrices of one decode/verify step, as the model reads them: per layer
q/k/v/o (576 -> 576, 192, 192, 576), gate/up (576 -> 1536), down (1536 -> 576) in Q4_1,
and the tied 49152 x 576 head in Q8_0 (the embedded GGUF's types). Each is called in a
jitted loop of `calls`; best of 7. The cost of M rows relative to one row is the
matmul part of the verify cost curve; every variant the CPU executes is timed in one
process (the default), so the ratios between variants come from one run.
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from specjax import kernels
from specjax.cost_model import best_ms
from specjax.harness.runner import machine_info

# (N, K, kind, matrices per step)
STEP = [(576, 576, "q4_1", 30 * 2), (192, 576, "q4_1", 30 * 2), (1536, 576, "q4_1", 30 * 2),
        (576, 1536, "q4_1", 30), (49152, 576, "q8_0", 1)]


def _packed(N, K, kind, seed=0):
  import gguf
  qtype = {"q4_1": gguf.GGMLQuantizationType.Q4_1, "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]
  w = np.random.default_rng(seed).standard_normal((N, K), np.float32)
  return tuple(jnp.asarray(a) for a in kernels.pack(kind, gguf.quants.quantize(w, qtype)))


def matmul_us(M, N, K, kind, calls=50) -> float:
  packed = _packed(N, K, kind)
  w = jnp.zeros((K, N), jnp.float32)  # only the backward would read it
  x = jnp.asarray(np.random.default_rng(1).standard_normal((M, K)), jnp.float32)

  @jax.jit
  def run(x):
    def body(_, acc):
      y = kernels.dense(acc, w, packed)
      return acc + 1e-6 * y[:, :K] if N >= K else acc + 1e-6 * jnp.pad(y, ((0, 0), (0, K - N)))
    return jax.lax.fori_loop(0, calls, body, x)

  return best_ms(lambda: jax.block_until_ready(run(x)), 7) / calls * 1e3


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rows", default="1,2,4,6,8")
  ap.add_argument("--isa", default=",".join(kernels.executable_isas()))
  ap.add_argument("--json", action="store_true")
  args = ap.parse_args(argv)
  rows = [int(r) for r in args.rows.split(",")]
  out = {"cpu": machine_info()["cpu"], "executable": list(kernels.executable_isas()), "step_matmul_ms": {}}
  for isa in args.isa.split(","):
    with kernels.forced_isa(isa):
      if not kernels.kernel_available():
        raise SystemExit(f"the {isa} kernels do not build here")
      per = {M: sum(n * matmul_us(M, N, K, kind) for N, K, kind, n in STEP) / 1e3 for M in rows}
    out["step_matmul_ms"][isa] = per
    if not args.json:
      print(f"{isa:8s} " + "  ".join(f"M={M}: {ms:6.2f} ms ({ms / per[rows[0]]:.2f}x)" for M, ms in per.items()))
  if args.json:
    print(json.dumps(out, indent=1))
  else:
    print(f"CPU: {out['cpu']}; one step's matmuls (30 layers + head), best of 7")


if __name__ == "__main__":
  main()
