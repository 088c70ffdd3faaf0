"""The CPU small-matmul kernel against float64 numpy, its gradients, and the model with and without it."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax import kernels, testing

pytestmark = pytest.mark.skipif(not kernels.kernel_available(), reason="no C++ compiler for the CPU kernel")


@pytest.fixture(autouse=True, params=kernels.executable_isas())
def isa(request):
  """Every test here runs once per kernel variant this CPU can execute (avx512, avx2, generic)."""
  with kernels.forced_isa(request.param):
    if not kernels.kernel_available():
      pytest.skip(f"the {request.param} kernels do not build here")
    yield request.param

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
  np.testing.assert_allclose(loss_k(x, w, e), loss_x(x, w, e), rtol=1e-5, atol=2e-4)  # 480 terms of |.| <~ 40
  for gk, gx in zip(jax.grad(loss_k, (0, 1, 2))(x, w, e), jax.grad(loss_x, (0, 1, 2))(x, w, e)):
    np.testing.assert_allclose(gk, gx, rtol=1e-4, atol=1e-4)
  vm = jax.vmap(kernels.dense, in_axes=(0, None))(x, w)
  np.testing.assert_allclose(vm, x @ w, rtol=1e-5, atol=1e-5)


def test_large_or_low_precision_inputs_use_xla():
  x = jnp.ones((kernels.MAX_ROWS + 1, 8), jnp.float32)
  assert not kernels._use_kernel(x, jnp.ones((8, 4), jnp.float32))
  assert not kernels._use_kernel(x[:2].astype(jnp.bfloat16), jnp.ones((8, 4), jnp.bfloat16))
  assert kernels._use_kernel(x[:2], jnp.ones((8, 4), jnp.float32))


def test_model_logits_with_and_without_kernel_agree(isa):
  """The same tiny model decoded in a process with SPECJAX_CPU_KERNEL=0 gives the same greedy
  tokens and logits to float rounding (the kernel process runs variant `isa`)."""
  code = ("import numpy as np, specjax as sj; from specjax import testing;"
          "m = testing.tiny_model(scale=4.0);"
          "o = sj.generate(m, testing.random_prompts(3, m.config.vocab_size), max_new_tokens=12);"
          "print(repr(o.tokens)); print(repr([l.tolist() for l in o.logprobs]))")
  outs = []
  for flag in ("1", "0"):
    env = {**__import__("os").environ, "SPECJAX_CPU_KERNEL": flag, "SPECJAX_CPU_ISA": isa}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    outs.append(done.stdout.splitlines()[-2:])
  assert outs[0][0] == outs[1][0]
  np.testing.assert_allclose(np.array(eval(outs[0][1])), np.array(eval(outs[1][1])), atol=1e-4)


# ---- block-quantized weights (GGUF Q4_1 / Q8_0), reference: gguf-py's own quantize/dequantize ----

def _quantized(kind, N, K, seed):
  import gguf
  qtype = {"q4_1": gguf.GGMLQuantizationType.Q4_1, "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]
  w = np.random.default_rng(seed).standard_normal((N, K), np.float32)
  blocks = gguf.quants.quantize(w, qtype)
  return np.asarray(gguf.quants.dequantize(blocks, qtype), np.float32), kernels.pack(kind, blocks)


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@pytest.mark.parametrize("M,K,N", [(1, 576, 960), (6, 576, 3072), (7, 1536, 576), (13, 64, 102), (32, 32, 3)])
def test_packed_kernel_matches_gguf_dequantized_float64(kind, M, K, N):
  w, packed = _quantized(kind, N, K, M + K + N)
  x = np.random.default_rng(M).standard_normal((M, K), np.float32)
  ref = x.astype(np.float64) @ w.T.astype(np.float64)
  tol = 1e-5 * np.sqrt(K) * np.abs(ref).max()
  got = np.asarray(jax.jit(kernels.dense)(x, np.ascontiguousarray(w.T), packed))
  np.testing.assert_allclose(got, ref, atol=tol)


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_packed_rows_independent_and_bitwise_the_float32_nk_path(kind):
  """The kernel dequantizes to exactly gguf-py's float32 weights: its unembed equals the
  float32 nk kernel bit for bit, and a row does not depend on the row count."""
  w, packed = _quantized(kind, 200, 576, 1)
  x = np.random.default_rng(2).standard_normal((9, 576), np.float32)
  got = np.asarray(jax.jit(kernels.unembed)(x, w, packed))
  np.testing.assert_array_equal(got, np.asarray(jax.jit(kernels.unembed)(x, w)))
  for m in (0, 5, 8):
    np.testing.assert_array_equal(np.asarray(jax.jit(kernels.unembed)(x[m:m + 1], w, packed))[0], got[m])


def test_packed_gradient_is_the_float32_one():
  w, packed = _quantized("q4_1", 96, 64, 3)
  x = np.random.default_rng(4).standard_normal((3, 64), np.float32)
  wt = np.ascontiguousarray(w.T)
  loss = lambda x, wt, p: jnp.sum(jnp.sin(kernels.dense(x, wt, p)))
  gx, gw = jax.grad(loss, argnums=(0, 1))(x, wt, packed)
  rx, rw = jax.grad(lambda x, wt: jnp.sum(jnp.sin(x @ wt)), argnums=(0, 1))(x, wt)
  np.testing.assert_allclose(gx, rx, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(gw, rw, rtol=1e-4, atol=1e-4)


def test_pack_rejects_unknown_kind():
  with pytest.raises(ValueError, match="q4_0"):
    kernels.pack("q4_0", np.zeros((2, 18), np.uint8))


# ---- attention of decode / verify steps -------------------------------------------------------

def _attention_case(B, T, S, K=3, G=3, H=64, seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(s, np.float32)
  starts = rng.integers(0, S - T + 1, size=B).astype(np.int32)
  mask = (np.arange(S)[None, None, :] <= starts[:, None, None] + np.arange(T)[None, :, None])
  mask = np.broadcast_to(mask, (B, T, S)).copy()
  mask[..., 0] &= rng.random((B, T)) < 0.7  # holes, as a tree mask has
  return f(B, T, K, G, H), f(B, K, S, H), f(B, K, S, H), f(B, T, K, H), f(B, T, K, H), mask, starts


@pytest.mark.parametrize("B,T,S", [(1, 1, 128), (1, 6, 640), (3, 4, 96), (2, 16, 64)])
def test_attention_kernel_matches_xla(B, T, S):
  """Kernel vs XLA: the same attention and the same cache writes, for ragged rows and masks."""
  from specjax.models.llama import _split_mask
  q, kc, vc, kn, vn, mask, starts = _attention_case(B, T, S, seed=B * T + S)
  split = _split_mask(jnp.asarray(mask), jnp.asarray(starts), T)
  want = kernels._attention_xla(True, q, kc, vc, kn, vn, split, starts)
  got = jax.jit(kernels.attention, static_argnums=0)(True, q, kc, vc, kn, vn, split, starts)
  np.testing.assert_allclose(got[0], want[0], atol=2e-5, rtol=1e-5)
  np.testing.assert_array_equal(got[1], want[1])
  np.testing.assert_array_equal(got[2], want[2])
  read = jax.jit(kernels.attention, static_argnums=0)(False, q, kc, vc, kn, vn, split, starts)
  np.testing.assert_array_equal(read, got[0])


def test_attention_kernel_token_result_does_not_depend_on_T():
  """Token t of a 5-token step equals a 1-token step at the same position (bitwise):
  greedy speculation then reproduces AR exactly."""
  from specjax.models.llama import _split_mask
  q, kc, vc, kn, vn, mask, starts = _attention_case(1, 5, 64, seed=3)
  mask = np.arange(64)[None, None, :] <= starts[:, None, None] + np.arange(5)[None, :, None]
  full = jax.jit(kernels.attention, static_argnums=0)(True, q, kc, vc, kn, vn,
                                                         _split_mask(jnp.asarray(mask), jnp.asarray(starts), 5), starts)
  kc2, vc2 = np.asarray(full[1]), np.asarray(full[2])  # the cache with all 5 written
  for t in range(5):
    one_mask = mask[:, t:t + 1]
    s1 = starts + t
    one = jax.jit(kernels.attention, static_argnums=0)(
        True, q[:, t:t + 1], kc2, vc2, kn[:, t:t + 1], vn[:, t:t + 1],
        _split_mask(jnp.asarray(one_mask), jnp.asarray(s1), 1), s1)
    np.testing.assert_array_equal(np.asarray(one[0])[:, 0], np.asarray(full[0])[:, t])


def test_attention_kernel_gradient_is_xla_one():
  from specjax.models.llama import _split_mask
  q, kc, vc, kn, vn, mask, starts = _attention_case(1, 2, 32, H=16, seed=5)
  split = _split_mask(jnp.asarray(mask), jnp.asarray(starts), 2)
  f = lambda fn: lambda q, kn: jnp.sum(jnp.sin(fn(False, q, kc, vc, kn, vn, split, starts)))
  got = jax.grad(f(kernels.attention), argnums=(0, 1))(q, kn)
  want = jax.grad(f(kernels._attention_xla), argnums=(0, 1))(q, kn)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_cache_write_kernel_equals_xla_write():
  """The in-place cache write (used after the padded verify's switch) writes exactly what
  cache.write does, per row at its own start, inside a jitted function as in the loop."""
  from specjax import cache as cache_lib
  if not kernels.kernel_available():
    pytest.skip("no CPU kernel here")
  rng = np.random.default_rng(0)
  cache = jnp.asarray(rng.normal(size=(3, 2, 40, 16)), jnp.float32)
  new = jnp.asarray(rng.normal(size=(3, 5, 2, 16)), jnp.float32)
  starts = jnp.asarray([0, 17, 35], jnp.int32)
  got = jax.jit(kernels.cache_write)(cache, new, starts)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(cache_lib.write(cache, new, starts)))
