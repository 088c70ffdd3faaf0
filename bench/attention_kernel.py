"""Time of the CPU attention kernel for one layer of a decode/verify step.

    python bench/attention_kernel.py [--context 512] [--tokens 1,6]

SmolLM2's shapes (3 KV heads x 3 query heads, head dim 64), a 1024-slot cache with
`--context` live slots, T new tokens attending causally; best of 7 runs of 300 calls
in one jitted loop. Compare two versions of `specjax/kernels/attention.cc` by running
this once per version (the library is rebuilt when the source changes).
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from specjax.cost_model import best_ms
from specjax.kernels import attention, kernel_available


def layer_us(T: int, context: int, slots: int = 1024, calls: int = 300) -> float:
  B, K, G, H = 1, 3, 3, 64
  r = np.random.default_rng(0)
  arr = lambda *shape: jnp.asarray(r.normal(size=shape), jnp.float32)
  q, kc, vc, kn, vn = arr(B, T, K, G, H), arr(B, K, slots, H), arr(B, K, slots, H), arr(B, T, K, H), arr(B, T, K, H)
  mask = jnp.concatenate([jnp.broadcast_to(jnp.arange(slots) < context, (B, T, slots)),
                          jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))], axis=-1)
  starts = jnp.full((B,), context, jnp.int32)

  @jax.jit
  def run(q):
    body = lambda _, acc: acc + 1e-3 * attention(False, acc, kc, vc, kn, vn, mask, starts)
    return jax.lax.fori_loop(0, calls, body, q)

  return best_ms(lambda: jax.block_until_ready(run(q)), 7) / calls * 1e3


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--context", type=int, default=512)
  ap.add_argument("--tokens", default="1,6")
  args = ap.parse_args()
  if not 0 <= args.context <= 1024 - 32:
    raise ValueError(f"--context {args.context} must be in [0, 992] (1024-slot cache)")
  if not kernel_available():
    raise SystemExit("the CPU kernels are not available here (no C++ compiler or not a CPU backend)")
  for T in (int(x) for x in args.tokens.split(",")):
    print(f"T={T}: {layer_us(T, args.context):.1f} us per layer (context {args.context})")


if __name__ == "__main__":
  main()
