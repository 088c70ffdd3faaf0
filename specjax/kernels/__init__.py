"""Matmuls of the model, with a small-M kernel on XLA:CPU.

`dense(x, w)` is x @ w for a [K, N] kernel and `unembed(x, e)` is x @ e.T for a
tied [N, K] embedding. On the CPU backend, for at most MAX_ROWS rows (batch x
tokens: decode and verify steps), both run `small_matmul.cc` through the XLA FFI:
it reads each weight once for all rows, so a verify step over k + 1 tokens costs
little more than a one-token step (see that file for why XLA's own GEMM does not).
Everywhere else (prefill, training, GPU/TPU, float16/bfloat16) they are plain XLA
dots. Both are differentiable (the backward pass is XLA's).

A weight may also come `packed`: the same [N, K] matrix in its GGUF block
quantization (Q4_1 or Q8_0, see `pack`), which the kernel dequantizes in
registers to bitwise the float32 values while reading 4-6x fewer bytes. The
float32 weight stays beside it for the XLA paths, so results never depend on
which path ran beyond float summation order.

The kernels are compiled from source with the system C++ compiler on first use and
cached under $SPECJAX_CACHE (default ~/.cache/specjax), keyed by the source, the
jaxlib version and the CPU, in one of three variants sized for a register file
(`ISAS`: avx512, avx2, generic): the best this CPU executes, or the one
$SPECJAX_CPU_ISA names (so an AVX-512 machine runs and tests the AVX2 path too).
No compiler, or SPECJAX_CPU_KERNEL=0, means the XLA dots everywhere (same results
to float rounding, slower verify steps).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np

MAX_ROWS = 32
_DIR = os.path.dirname(os.path.abspath(__file__))
_SOURCES = [os.path.join(_DIR, f) for f in ("small_matmul.cc", "attention.cc")]
_HEADER = os.path.join(_DIR, "common.h")
# kernel -> the C symbol of its FFI handler (registered as target "specjax_<isa>_<kernel>").
_HANDLERS = {"kn": "SpecjaxMatmulKN", "nk": "SpecjaxMatmulNK", "q4_1": "SpecjaxMatmulQ41",
             "q8_0": "SpecjaxMatmulQ80", "attend_read": "SpecjaxAttendRead", "attend_write": "SpecjaxAttendWrite",
             "cache_write": "SpecjaxCacheWrite"}
# GGUF block layouts the kernel reads: (bytes of scales, bytes of quants) per 32 weights.
PACKED_KINDS = {"q4_1": (4, 16), "q8_0": (2, 32)}

# The kernels' variants, best first: each is the same source compiled for one register file
# (common.h), with the /proc/cpuinfo flags it needs and the compiler flags that give them.
# Explicit -m flags, not -march=native: the variant that runs is the one that was chosen
# (and tested), whichever machine compiles it.
ISAS = ("avx512", "avx2", "generic")
_ISA_NEEDS = {"avx512": ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma", "f16c"),
              "avx2": ("avx2", "fma", "f16c"), "generic": ()}
_ISA_CFLAGS = {"avx512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"],
               "avx2": ["-mavx2", "-mfma", "-mf16c"], "generic": []}
_override: str | None = None  # set by `forced_isa`


@functools.cache
def cpu_flags() -> frozenset[str]:
  """The CPU's feature flags (/proc/cpuinfo, read once: every kernel call consults the variant
  while tracing), empty where they cannot be read."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith(("flags", "Features")):
          return frozenset(line.split(":", 1)[1].split())
  except OSError:
    pass
  return frozenset()


def executable_isas() -> tuple[str, ...]:
  """The kernel variants this CPU can run, best first ('generic' always)."""
  x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
  flags = cpu_flags()
  return tuple(isa for isa in ISAS if isa == "generic" or (x86 and set(_ISA_NEEDS[isa]) <= flags))


def _check_isa(isa: str, source: str) -> str:
  if isa not in ISAS:
    raise ValueError(f"{source}={isa!r} is not a kernel variant; use one of {', '.join(ISAS)} (or unset it for the "
                     f"best this CPU runs: {executable_isas()[0]})")
  if isa not in executable_isas():
    missing = sorted(set(_ISA_NEEDS[isa]) - cpu_flags())
    shown = " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "fma", "f16c", "sse")))) or "none read"
    raise ValueError(f"{source}={isa!r}: this CPU cannot execute it (missing {', '.join(missing) or 'x86-64'}; "
                     f"its vector flags: {shown}); use one of {', '.join(executable_isas())}")
  return isa


def selected_isa() -> str:
  """The kernel variant in use: `forced_isa`'s, else $SPECJAX_CPU_ISA (avx512, avx2 or generic), else
  the best this CPU runs. A value the CPU cannot execute raises ValueError naming its flags."""
  if _override is not None:
    return _override
  env = os.environ.get("SPECJAX_CPU_ISA", "").strip().lower()
  return _check_isa(env, "SPECJAX_CPU_ISA") if env else executable_isas()[0]


@contextlib.contextmanager
def forced_isa(isa: str):
  """Runs the block with kernel variant `isa` (tests and benchmarks measure every variant the
  machine runs in one process). Clears JAX's caches on entry and exit: a traced function
  names its variant's kernels."""
  global _override
  previous = _override
  _override = _check_isa(isa, "forced_isa")
  jax.clear_caches()
  try:
    yield isa
  finally:
    _override = previous
    jax.clear_caches()


def _target(kind: str) -> str:
  return f"specjax_{selected_isa()}_{kind}"


def _cache_dir() -> str:
  return os.environ.get("SPECJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "specjax"))


def library_path(isa: str) -> str:
  """Where the compiled library of variant `isa` lives: keyed by the sources, the compile
  flags, the jaxlib version and the CPU's flags."""
  import jaxlib
  src = b""
  for path in _SOURCES + [_HEADER]:
    with open(path, "rb") as f:
      src += f.read()
  key = hashlib.sha256(src + " ".join(_ISA_CFLAGS[isa]).encode() + jaxlib.__version__.encode()
                       + " ".join(sorted(cpu_flags())).encode() + platform.machine().encode()).hexdigest()[:16]
  return os.path.join(_cache_dir(), f"kernels-{isa}-{key}.so")


def _compile(isa: str, lib: str) -> None:
  cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
  if cxx is None:
    raise RuntimeError("no C++ compiler (g++/clang++) on PATH")
  os.makedirs(os.path.dirname(lib), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(lib))
  os.close(fd)
  cmd = [cxx, "-O3", *_ISA_CFLAGS[isa], f"-DSPECJAX_ISA_{isa.upper()}", "-std=c++17", "-shared", "-fPIC", "-w",
         "-I", jax.ffi.include_dir(), *_SOURCES, "-o", tmp]
  done = subprocess.run(cmd, capture_output=True, text=True)
  if done.returncode:
    os.unlink(tmp)
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
  os.replace(tmp, lib)  # atomic: concurrent builders never load a half-written file


def _build(isa: str) -> ctypes.CDLL:
  """Compiles variant `isa` (once per source/flags/jaxlib/CPU) and loads it. A cached library that
  does not load (truncated, corrupt) is rebuilt, with a warning."""
  lib = library_path(isa)
  if os.path.exists(lib):
    try:
      return ctypes.cdll.LoadLibrary(lib)
    except OSError as e:
      warnings.warn(f"specjax: cached kernel library {lib} does not load ({e}); rebuilding it", stacklevel=3)
      os.unlink(lib)
  _compile(isa, lib)
  return ctypes.cdll.LoadLibrary(lib)


@functools.cache
def _registered(isa: str) -> bool:
  try:
    lib = _build(isa)
    for kind, symbol in _HANDLERS.items():
      jax.ffi.register_ffi_target(f"specjax_{isa}_{kind}", jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  except (OSError, RuntimeError, AttributeError) as e:
    warnings.warn(f"specjax: CPU kernels ({isa}) unavailable, using XLA dots ({e})", stacklevel=3)
    return False
  return True


def kernel_available() -> bool:
  """True when the CPU kernels of the selected variant are built and registered (compiles them
  on first call). SPECJAX_CPU_KERNEL=0 turns them off."""
  if os.environ.get("SPECJAX_CPU_KERNEL", "1") == "0":
    return False
  return _registered(selected_isa())


def cpu_kernels_serve(*arrays: jax.Array) -> bool:
  """The one condition every CPU kernel here shares: float32 operands on the CPU backend, kernels built."""
  return (all(a.dtype == jnp.float32 for a in arrays) and jax.default_backend() == "cpu"
          and kernel_available())


def _use_kernel(x: jax.Array, w: jax.Array) -> bool:
  rows = x.size // x.shape[-1] if x.shape[-1] else 0
  return 0 < rows <= MAX_ROWS and cpu_kernels_serve(x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _small(layout: str, x: jax.Array, w: jax.Array, packed=()) -> jax.Array:
  """x @ w ("kn") or x @ w.T ("nk") by the kernel; with `packed` (w.T block-quantized,
  see `pack`) it reads those blocks instead of w, which then only serves the backward."""
  n = w.shape[1] if layout == "kn" else w.shape[0]
  if packed and packed[0].shape[0] != n:
    raise ValueError(f"packed weight has {packed[0].shape[0]} rows, the float32 weight {n} outputs")
  x2 = x.reshape(-1, x.shape[-1])
  target = _target(_packed_kind(packed) if packed else layout)
  out = jax.ShapeDtypeStruct((x2.shape[0], n), jnp.float32)
  y = jax.ffi.ffi_call(target, out, vmap_method="sequential")(x2, *(packed or (w,)))
  return y.reshape(x.shape[:-1] + (n,))


def _small_fwd(layout, x, w, packed=()):
  return _small(layout, x, w, packed), (x, w, packed)


def _small_bwd(layout, res, g):
  x, w, packed = res
  zero = lambda a: (np.zeros(a.shape, jax.dtypes.float0) if jnp.issubdtype(a.dtype, jnp.integer)
                    else jnp.zeros_like(a))
  if layout == "kn":  # y = x @ w
    grads = g @ w.T, jnp.einsum("...k,...n->kn", x, g)
  else:  # y = x @ w.T
    grads = g @ w, jnp.einsum("...n,...k->nk", g, x)
  return grads + (tuple(zero(a) for a in packed),)


_small.defvjp(_small_fwd, _small_bwd)


def pack(kind: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """GGUF blocks [N, K / 32 * block_bytes] (uint8, as a GGUF file stores a [N, K]
  Q4_1 or Q8_0 tensor) -> (quants, scales) as the kernel reads them: q4_1: (uint8
  [N, K / 2], [N, K / 16] = d, m per block); q8_0: (int8 [N, K], [N, K / 32]). The
  float16 scales become float32 (exact), which spares the kernel the conversions."""
  if kind not in PACKED_KINDS:
    raise ValueError(f"unknown packed kind {kind!r}; the kernel reads {sorted(PACKED_KINDS)}")
  scale_bytes, quant_bytes = PACKED_KINDS[kind]
  blocks = np.ascontiguousarray(blocks, dtype=np.uint8)
  n = blocks.shape[0]
  b = blocks.reshape(n, -1, scale_bytes + quant_bytes)
  scales = np.ascontiguousarray(b[..., :scale_bytes]).view(np.float16).astype(np.float32).reshape(n, -1)
  quants = np.ascontiguousarray(b[..., scale_bytes:]).reshape(n, -1)
  return (quants if kind == "q4_1" else quants.view(np.int8)), scales


def quantize_q8_0(w) -> tuple[jax.Array, jax.Array] | None:
  """A float32 [K, N] kernel as packed Q8_0 rows (gguf-py's quantizer), or None when K is
  not a multiple of 32. Lossy: for drafters, whose approximations verification absorbs."""
  import gguf
  w = np.asarray(w, np.float32)
  if w.ndim != 2 or w.shape[0] % 32:
    return None
  blocks = gguf.quants.quantize(np.ascontiguousarray(w.T), gguf.GGMLQuantizationType.Q8_0)
  return tuple(jnp.asarray(a) for a in pack("q8_0", blocks))


def _packed_kind(packed) -> str:
  return "q4_1" if packed[0].dtype == jnp.uint8 else "q8_0"


def dense(x: jax.Array, w: jax.Array, packed=None) -> jax.Array:
  """x [..., K] @ w [K, N] -> [..., N]; `packed` is w.T quantized (see `pack`), or None."""
  if not _use_kernel(x, w):
    return x @ w
  return _small("kn", x, w, tuple(packed or ()))


def unembed(x: jax.Array, e: jax.Array, packed=None) -> jax.Array:
  """x [..., K] @ e.T for e [N, K] (a tied embedding used as the LM head) -> [..., N]."""
  if not _use_kernel(x, e):
    return jnp.einsum("...K,NK->...N", x, e)
  return _small("nk", x, e, tuple(packed or ()))


# ---- attention of decode / verify steps (attention.cc) ----------------------------------------

def attention_reference(q, k_cache, v_cache, k_new=None, v_new=None, *, mask):
  """XLA attention of T new tokens over cached slots (and themselves, when given).

  q [B, T, K, G, H]; k_cache, v_cache [B, K, S, H]; k_new, v_new [B, T, K, H] or None;
  mask [B, T, S (+ T)] (cache slots, then the new tokens) -> [B, T, K, G, H].

  Laid out for XLA:CPU's GEMMs: the G query heads of a KV head and the T tokens form
  one [G*T, H] operand, the caches are used as stored, and the softmax is normalised
  after P.V (one divide of [.., H] instead of [.., S]). The einsum form over [B, K, G, T, S]
  made XLA transpose K, the masked scores and the probabilities: 2.4x slower in prefill.
  """
  B, T, K, G, H = q.shape
  S = k_cache.shape[2]
  qm = jnp.transpose(q, (0, 2, 3, 1, 4)).reshape(B, K, G * T, H)
  scores = jnp.einsum("BKMH,BKSH->BKMS", qm, k_cache)
  if k_new is not None:
    scores = jnp.concatenate([scores, jnp.einsum("BKMH,BSKH->BKMS", qm, k_new)], axis=-1)
  scores = scores.reshape(B, K, G, T, -1).astype(jnp.float32) * H**-0.5
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)  # an empty row: uniform
  e = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
  denom = jnp.sum(e, axis=-1, keepdims=True)
  e = e.reshape(B, K, G * T, -1).astype(v_cache.dtype)
  out = jnp.einsum("BKMS,BKSH->BKMH", e[..., :S], v_cache)
  if v_new is not None:
    out = out + jnp.einsum("BKMS,BSKH->BKMH", e[..., S:], v_new)
  out = (out.reshape(B, K, G, T, H).astype(jnp.float32) / denom).astype(q.dtype)
  return jnp.transpose(out, (0, 3, 1, 2, 4))


def _attention_xla(write, q, k_cache, v_cache, k_new, v_new, mask, starts):
  from specjax import cache as cache_lib
  out = attention_reference(q, k_cache, v_cache, k_new, v_new, mask=mask)
  if not write:
    return out
  return out, cache_lib.write(k_cache, k_new, starts), cache_lib.write(v_cache, v_new, starts)


def attention_kernel_applies(q: jax.Array, k_cache: jax.Array) -> bool:
  """Whether `attention` runs the CPU kernel for these operands (else callers use XLA)."""
  B, T, K, G, H = q.shape
  return B * T <= MAX_ROWS and H % 16 == 0 and G <= 16 and cpu_kernels_serve(q, k_cache)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def attention(write: bool, q, k_cache, v_cache, k_new, v_new, mask, starts):
  """`attention_reference` by the CPU kernel; with write=True also returns the caches with
  k_new/v_new written at slots starts[b] + t (in place: no cache copies in a decode loop).
  Differentiable (the backward pass is XLA's)."""
  out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
  args = (q, k_cache, v_cache, k_new, v_new, mask.astype(bool), starts.astype(jnp.int32))
  if not write:
    return jax.ffi.ffi_call(_target("attend_read"), out, vmap_method="sequential")(*args)
  outs = (out, jax.ShapeDtypeStruct(k_cache.shape, jnp.float32), jax.ShapeDtypeStruct(v_cache.shape, jnp.float32))
  return tuple(jax.ffi.ffi_call(_target("attend_write"), outs, input_output_aliases={1: 1, 2: 2},
                                vmap_method="sequential")(*args))


def cache_write(layer_cache: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
  """`cache.write` (new [B, T, K, H] at slots starts[b] + t of [B, K, S, H]) in place by the CPU
  kernel when it applies (float32 on CPU), else by XLA. Not differentiable (decode only)."""
  from specjax import cache as cache_lib
  if not cpu_kernels_serve(layer_cache):
    return cache_lib.write(layer_cache, new, starts)
  return jax.ffi.ffi_call(_target("cache_write"), jax.ShapeDtypeStruct(layer_cache.shape, jnp.float32),
                          input_output_aliases={0: 0}, vmap_method="sequential")(
                              layer_cache, new.astype(jnp.float32), starts.astype(jnp.int32))


def _attention_fwd(write, *args):
  return attention(write, *args), args


def _attention_bwd(write, args, g):
  return jax.vjp(functools.partial(_attention_xla, write), *args)[1](g)


attention.defvjp(_attention_fwd, _attention_bwd)
