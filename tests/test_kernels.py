"""The CPU small-matmul kernel against float64 numpy, its gradients, and the model with and without it."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax import kernels, testing

pytestmark = pytest.mark.skipif(not kernels.kernel_available(), reason="no C++ compiler for the CPU kernel")

# Shapes: the model's own, and ragged ones that take the tail paths (N % 64, K % 16, M % 6).
SHAPES = [(1, 576, 960), (6, 576, 3072), (7, 1536, 576), (13, 48, 100), (3, 40, 70), (32, 17, 129), (2, 64, 4)]


@pytest.mark.parametrize("M,K,N", SHAPES)
def test_kernel_matches_float64(M, K, N):
  rng = np.random.default_rng(M * K + N)
  x = rng.standard_normal((M, K), np.float32)
  w = rng.standard_normal((K, N), np.float32)
  ref = x.astype(np.float64) @ w.astype(np.float64)
  tol = 1e-5 * np.sqrt(K) * np.abs(ref).max()
  got_kn = np.asarray(jax.jit(kernels._small, static_argnums=0)("kn", x, w))
  got_nk = np.asarray(jax.jit(kernels._small, static_argnums=0)("nk", x, np.ascontiguousarray(w.T)))
  np.testing.assert_allclose(got_kn, ref, atol=tol)
  np.testing.assert_allclose(got_nk, ref, atol=tol)


def test_rows_do_not_depend_on_how_many_rows():
  """A row's result is bitwise the same alone and among others (AR step vs verify step)."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((9, 576), np.float32)
  for layout, w in (("kn", rng.standard_normal((576, 960), np.float32)),
                    ("nk", rng.standard_normal((200, 576), np.float32))):
    f = jax.jit(kernels._small, static_argnums=0)
    batch = np.asarray(f(layout, x, w))
    for m in (0, 5, 8):
      np.testing.assert_array_equal(np.asarray(f(layout, x[m:m + 1], w))[0], batch[m])


def test_batch_dims_and_gradients_match_xla():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 3, 48), np.float32))
  w = jnp.asarray(rng.standard_normal((48, 80), np.float32))
  e = jnp.asarray(rng.standard_normal((80, 48), np.float32))
  loss_k = lambda x, w, e: jnp.sum(jnp.sin(kernels.dense(x, w)) * kernels.unembed(x, e))
  loss_x = lambda x, w, e: jnp.sum(jnp.sin(x @ w) * jnp.einsum("...k,nk->...n", x, e))
  np.testing.assert_allclose(loss_k(x, w, e), loss_x(x, w, e), rtol=1e-5)
  for gk, gx in zip(jax.grad(loss_k, (0, 1, 2))(x, w, e), jax.grad(loss_x, (0, 1, 2))(x, w, e)):
    np.testing.assert_allclose(gk, gx, rtol=1e-4, atol=1e-4)
  vm = jax.vmap(kernels.dense, in_axes=(0, None))(x, w)
  np.testing.assert_allclose(vm, x @ w, rtol=1e-5, atol=1e-5)


def test_large_or_low_precision_inputs_use_xla():
  x = jnp.ones((kernels.MAX_ROWS + 1, 8), jnp.float32)
  assert not kernels._use_kernel(x, jnp.ones((8, 4), jnp.float32))
  assert not kernels._use_kernel(x[:2].astype(jnp.bfloat16), jnp.ones((8, 4), jnp.bfloat16))
  assert kernels._use_kernel(x[:2], jnp.ones((8, 4), jnp.float32))


def test_model_logits_with_and_without_kernel_agree():
  """The same tiny model decoded in a process with SPECJAX_CPU_KERNEL=0 gives the same greedy
  tokens and logits to float rounding."""
  code = ("import numpy as np, specjax as sj; from specjax import testing;"
          "m = testing.tiny_model(scale=4.0);"
          "o = sj.generate(m, testing.random_prompts(3, m.config.vocab_size), max_new_tokens=12);"
          "print(repr(o.tokens)); print(repr([l.tolist() for l in o.logprobs]))")
  outs = []
  for flag in ("1", "0"):
    env = {**__import__("os").environ, "SPECJAX_CPU_KERNEL": flag}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    outs.append(done.stdout.splitlines()[-2:])
  assert outs[0][0] == outs[1][0]
  np.testing.assert_allclose(np.array(eval(outs[0][1])), np.array(eval(outs[1][1])), atol=1e-4)
