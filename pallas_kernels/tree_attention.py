"""Batched tree-verification attention: a Pallas TPU (Mosaic) kernel and its reference.

A verify step scores N drafted tree nodes per row at once. Node i attends to every
cached token of its row (slots [0, prefix_len[b])) and to the tree nodes it descends
from, itself included (tree_mask[i, j]):

            cache slots (prefix_len[b])        tree nodes j
            0 1 2 ... L-1 | L ... S-1          0 1 2 3 4
  node 0    x x x ...  x  | . ...  .           x . . . .      0
  node 1    x x x ...  x  | . ...  .           x x . . .     / \\
  node 2    x x x ...  x  | . ...  .           x . x . .    1   2
  node 3    x x x ...  x  | . ...  .           x x . x .    |   |
  node 4    x x x ...  x  | . ...  .           x . x . x    3   4
                            padding: never read

The prefix part is a per-row length, never a dense [B, N, S] mask; the tree part is
the compact [N, N] (or per-row [B, N, N]) mask.

Backends: the kernel is written for TPU through Mosaic (`jax.experimental.pallas.tpu`)
and runs anywhere with `interpret=True` (the tests run it that way on CPU). A GPU path
is not written: the body relies on TPU scalar prefetch, VMEM scratch and Mosaic grid
semantics, and a Mosaic GPU (`jax.experimental.pallas.mosaic_gpu`) kernel would be a
different program (warpgroup matmuls, its own pipelining), not a flag on this one. On
GPU/CPU the engine uses its XLA attention and the FFI kernels in `specjax/kernels/`.
Pallas Triton is deprecated and deliberately not used.
"""
from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np

# A finite "minus infinity": a masked score exponentiates to exactly 0 without the
# inf - inf = NaN that -inf would give when a row's running max is still -inf.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# The running max and sum live lane-dense in VMEM: one 128-lane row per query row.
NUM_LANES = 128
DEFAULT_BLOCK_S = 128
# Contract the last dims of both operands: q [R, D] x k [C, D] -> [R, C].
_TRANS_B = (((1,), (1,)), ((), ()))


def static_validate_inputs(
    q: jax.Array,  # [B, N, Hq, D]
    k_cache: jax.Array,  # [B, Hkv, S, D]
    v_cache: jax.Array,  # [B, Hkv, S, D]
    k_tree: jax.Array,  # [B, N, Hkv, D]
    v_tree: jax.Array,  # [B, N, Hkv, D]
    prefix_len: jax.Array,  # i32[B]
    tree_mask: jax.Array,  # bool[N, N] or bool[B, N, N]
    *,
    scale: float | None = None,
    block_s: int | None = None,
) -> None:
  """Checks shapes, dtypes and tuning values before tracing; raises ValueError.

  Values (prefix_len in [0, S], tree_mask[i, i] True) cannot be checked statically:
  a prefix_len above S reads all S slots, one below 0 reads none, and a node that sees
  neither a cached slot nor itself gets an undefined (but finite) kernel result.
  """
  if q.ndim != 4:
    raise ValueError(f"q must be [B, N, Hq, D]; got shape {q.shape}")
  B, N, Hq, D = q.shape
  if k_cache.ndim != 4 or k_cache.shape[0] != B or k_cache.shape[3] != D:
    raise ValueError(
        f"k_cache must be [B, Hkv, S, D] with B={B}, D={D} from q; got shape {k_cache.shape}")
  _, Hkv, S, _ = k_cache.shape
  if v_cache.shape != k_cache.shape:
    raise ValueError(f"v_cache.shape={v_cache.shape} must equal k_cache.shape={k_cache.shape}")
  for name, x in (("k_tree", k_tree), ("v_tree", v_tree)):
    if x.shape != (B, N, Hkv, D):
      raise ValueError(
          f"{name} must be [B, N, Hkv, D] = {(B, N, Hkv, D)} (from q and k_cache); got shape {x.shape}")
  if Hkv == 0 or Hq % Hkv:
    raise ValueError(
        f"Hq={Hq} query heads must be a multiple of Hkv={Hkv} kv heads "
        f"(query head h uses kv head h // (Hq // Hkv))")
  if S == 0:
    raise ValueError("k_cache has S=0 slots; give the cache at least one slot")
  if not jnp.issubdtype(q.dtype, jnp.floating):
    raise ValueError(f"q must be a float array; got dtype {q.dtype}")
  for name, x in (("k_cache", k_cache), ("v_cache", v_cache), ("k_tree", k_tree), ("v_tree", v_tree)):
    if x.dtype != q.dtype:
      raise ValueError(f"{name}.dtype={x.dtype} must equal q.dtype={q.dtype}; cast it with .astype")
  if prefix_len.shape != (B,) or prefix_len.dtype != jnp.int32:
    raise ValueError(
        f"prefix_len must be int32[B] = int32[{B}]; got {prefix_len.dtype}{list(prefix_len.shape)} "
        f"(use jnp.asarray(prefix_len, jnp.int32))")
  if tree_mask.shape not in ((N, N), (B, N, N)):
    raise ValueError(
        f"tree_mask must be [N, N] = {(N, N)} or [B, N, N] = {(B, N, N)}; got shape {tree_mask.shape}")
  if tree_mask.dtype != jnp.bool_:
    raise ValueError(f"tree_mask must be bool; got dtype {tree_mask.dtype} (use tree_mask.astype(bool))")
  if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
    raise ValueError(f"scale={scale!r} must be a positive Python number (default 1/sqrt(D))")
  if block_s is not None:
    if not isinstance(block_s, int) or block_s <= 0 or S % block_s:
      raise ValueError(
          f"block_s={block_s!r} must be a positive divisor of S={S} (k_cache.shape[2]); "
          f"pick a divisor or pad the cache to a multiple of block_s")
    if block_s % 8 and block_s != S:
      raise ValueError(f"block_s={block_s} must be a multiple of 8 (a TPU sublane tile) or equal S={S}")


def ref_tree_attention(
    q: jax.Array,  # [B, N, Hq, D]
    k_cache: jax.Array,  # [B, Hkv, S, D]
    v_cache: jax.Array,  # [B, Hkv, S, D]
    k_tree: jax.Array,  # [B, N, Hkv, D]
    v_tree: jax.Array,  # [B, N, Hkv, D]
    prefix_len: jax.Array,  # i32[B]
    tree_mask: jax.Array,  # bool[N, N] or bool[B, N, N]
    *,
    scale: float | None = None,
) -> jax.Array:  # [B, N, Hq, D]
  """Plain-jnp tree attention: one stable softmax over [prefix slots + N tree nodes]."""
  static_validate_inputs(q, k_cache, v_cache, k_tree, v_tree, prefix_len, tree_mask, scale=scale)
  B, N, Hq, D = q.shape
  _, Hkv, S, _ = k_cache.shape
  G = Hq // Hkv
  scale = D ** -0.5 if scale is None else scale
  f32 = jnp.float32
  seen = jnp.arange(S)[None, :] < prefix_len[:, None]  # [B, S]
  # Padding is zeroed before any multiply: NaN there cannot reach the result.
  k_cache = jnp.where(seen[:, None, :, None], k_cache, 0).astype(f32)
  v_cache = jnp.where(seen[:, None, :, None], v_cache, 0).astype(f32)
  qg = q.astype(f32).reshape(B, N, Hkv, G, D)  # query head h = k * G + g
  s_cache = jnp.einsum("bnkgd,bksd->bkgns", qg, k_cache) * scale
  s_tree = jnp.einsum("bnkgd,bmkd->bkgnm", qg, k_tree.astype(f32)) * scale
  mask = jnp.broadcast_to(tree_mask, (B, N, N))
  s_cache = jnp.where(seen[:, None, None, None, :], s_cache, -jnp.inf)
  s_tree = jnp.where(mask[:, None, None], s_tree, -jnp.inf)
  m = jnp.maximum(s_cache.max(-1, initial=-jnp.inf), s_tree.max(-1))[..., None]
  p_cache, p_tree = jnp.exp(s_cache - m), jnp.exp(s_tree - m)
  denom = p_cache.sum(-1, keepdims=True) + p_tree.sum(-1, keepdims=True)
  out = (jnp.einsum("bkgns,bksd->bnkgd", p_cache / denom, v_cache)
         + jnp.einsum("bkgnm,bmkd->bnkgd", p_tree / denom, v_tree.astype(f32)))
  return out.reshape(B, N, Hq, D).astype(q.dtype)


def _online_softmax_step(scores, v, m_ref, l_ref, acc_ref):
  """Folds one block of masked scores [R, C] (f32) and values v [C, D] into the running
  max m, sum l and unnormalised output acc."""
  m_prev, l_prev = m_ref[...][:, :1], l_ref[...][:, :1]  # [R, 1]: full-lane loads, then a value slice
  m_next = jnp.maximum(m_prev, scores.max(axis=1, keepdims=True))
  p = jnp.exp(scores - m_next)  # [R, C]; masked entries give exactly 0
  alpha = jnp.exp(m_prev - m_next)  # 0 on the first block (m_prev = -inf)
  l_next = alpha * l_prev + p.sum(axis=1, keepdims=True)
  m_ref[...] = jnp.broadcast_to(m_next, m_ref.shape)
  l_ref[...] = jnp.broadcast_to(l_next, l_ref.shape)
  acc_ref[...] = alpha * acc_ref[...] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)


def _tree_attention_kernel(
    # Scalar prefetch
    prefix_len_ref,  # i32[B] (SMEM)
    # Inputs (one block each)
    q_ref,  # [1, 1, R, D]  R = G * N rows: query head k * G + g of node n at row g * N + n
    k_ref,  # [1, 1, block_s, D]  cache block of kv head k
    v_ref,  # [1, 1, block_s, D]
    kt_ref,  # [1, 1, N, D]  tree K of kv head k
    vt_ref,  # [1, 1, N, D]
    mask_ref,  # i32[1, R, N]  tree_mask rows repeated per group member
    # Output
    o_ref,  # [1, 1, R, D]
    # Scratch (VMEM, persists across the cache-block grid axis)
    m_ref,  # f32[R, NUM_LANES]  running max
    l_ref,  # f32[R, NUM_LANES]  running sum
    acc_ref,  # f32[R, D]  unnormalised output
    *,
    scale: float,
    block_s: int,
    mask_padding: bool,
):
  b, s = pl.program_id(0), pl.program_id(2)
  length = prefix_len_ref[b]

  @pl.when(s == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  q = q_ref[0, 0]  # [R, D]

  # Blocks wholly beyond the row's length do no work (and their index map repeats the
  # last live block, so no copy is issued for them either).
  @pl.when(s * block_s < length)
  def _prefix_block():
    k, v = k_ref[0, 0], v_ref[0, 0]  # [block_s, D]
    slot = s * block_s + lax.broadcasted_iota(jnp.int32, k.shape, 0)
    if mask_padding:  # always, except the deliberately broken variant the tests run
      # Select in f32 (older TPUs have no bf16 VPU), before any multiply: 0 * NaN = NaN.
      k = jnp.where(slot < length, k.astype(jnp.float32), 0.0).astype(k.dtype)
      v = jnp.where(slot < length, v.astype(jnp.float32), 0.0).astype(v.dtype)
    scores = lax.dot_general(q, k, _TRANS_B, preferred_element_type=jnp.float32) * scale
    col = s * block_s + lax.broadcasted_iota(jnp.int32, scores.shape, 1)
    scores = jnp.where(col < length, scores, MASK_VALUE)
    _online_softmax_step(scores, v, m_ref, l_ref, acc_ref)

  @pl.when(s == pl.num_programs(2) - 1)
  def _tree_and_store():
    kt, vt = kt_ref[0, 0], vt_ref[0, 0]  # [N, D]
    scores = lax.dot_general(q, kt, _TRANS_B, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask_ref[0] != 0, scores, MASK_VALUE)  # [R, N]
    _online_softmax_step(scores, vt, m_ref, l_ref, acc_ref)
    o_ref[0, 0] = (acc_ref[...] / l_ref[...][:, :1]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "block_s", "interpret", "mask_padding"))
def _tree_attention(q, k_cache, v_cache, k_tree, v_tree, prefix_len, tree_mask, *,
                    scale: float, block_s: int, interpret: bool, mask_padding: bool = True):
  B, N, Hq, D = q.shape
  _, Hkv, S, _ = k_cache.shape
  G = Hq // Hkv
  R = G * N
  # Group the query heads of one kv head into R = G * N rows (row g * N + n), so one
  # grid step serves the whole GQA group with one [R, D] x [D, block_s] matmul.
  q_rows = q.reshape(B, N, Hkv, G, D).transpose(0, 2, 3, 1, 4).reshape(B, Hkv, R, D)
  k_tree = k_tree.transpose(0, 2, 1, 3)  # [B, Hkv, N, D]
  v_tree = v_tree.transpose(0, 2, 1, 3)
  mask3 = tree_mask if tree_mask.ndim == 3 else tree_mask[None]  # [1 or B, N, N]
  mask_rows = jnp.tile(mask3.astype(jnp.int32), (1, G, 1))  # [1 or B, R, N]; int32 for Mosaic
  per_row_mask = mask3.shape[0] > 1

  def cache_index(b, h, s, prefix_len_ref):
    last_live = jnp.maximum(pl.cdiv(prefix_len_ref[b], block_s) - 1, 0)
    return b, h, jnp.minimum(s, last_live), 0

  def per_head_index(b, h, s, prefix_len_ref):
    return b, h, 0, 0

  def mask_index(b, h, s, prefix_len_ref):
    return (b if per_row_mask else 0), 0, 0

  out = pl.pallas_call(
      functools.partial(_tree_attention_kernel, scale=scale, block_s=block_s,
                        mask_padding=mask_padding),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(B, Hkv, S // block_s),
          in_specs=[
              pl.BlockSpec((1, 1, R, D), per_head_index),
              pl.BlockSpec((1, 1, block_s, D), cache_index),
              pl.BlockSpec((1, 1, block_s, D), cache_index),
              pl.BlockSpec((1, 1, N, D), per_head_index),
              pl.BlockSpec((1, 1, N, D), per_head_index),
              pl.BlockSpec((1, R, N), mask_index),
          ],
          out_specs=pl.BlockSpec((1, 1, R, D), per_head_index),
          scratch_shapes=[
              pltpu.VMEM((R, NUM_LANES), jnp.float32),
              pltpu.VMEM((R, NUM_LANES), jnp.float32),
              pltpu.VMEM((R, D), jnp.float32),
          ],
      ),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      out_shape=jax.ShapeDtypeStruct((B, Hkv, R, D), q.dtype),
      interpret=interpret,
      name="tree_attention",
  )(prefix_len, q_rows, k_cache, v_cache, k_tree, v_tree, mask_rows)
  return out.reshape(B, Hkv, G, N, D).transpose(0, 3, 1, 2, 4).reshape(B, N, Hq, D)


def tree_attention(
    q: jax.Array,  # [B, N, Hq, D]
    k_cache: jax.Array,  # [B, Hkv, S, D]
    v_cache: jax.Array,  # [B, Hkv, S, D]
    k_tree: jax.Array,  # [B, N, Hkv, D]
    v_tree: jax.Array,  # [B, N, Hkv, D]
    prefix_len: jax.Array,  # i32[B]
    tree_mask: jax.Array,  # bool[N, N] or bool[B, N, N]
    *,
    scale: float | None = None,
    block_s: int | None = None,
    interpret: bool = False,
) -> jax.Array:  # [B, N, Hq, D]
  """Attention of N tree nodes per row over the row's cached prefix and their ancestors.

  Args:
    q: queries of the tree nodes; node 0 is the root (the row's last committed token).
    k_cache, v_cache: the cache; slots >= prefix_len[b] are padding, never read into
      the result (they may hold garbage or NaN).
    k_tree, v_tree: K/V of the tree nodes themselves (not yet in the cache).
    prefix_len: cached tokens per row; every node sees all of them.
    tree_mask: tree_mask[..., i, j] is True when node i sees node j (j is i or an
      ancestor of i); shared by all rows ([N, N]) or per row ([B, N, N]).
    scale: softmax scale, 1/sqrt(D) by default.
    block_s: cache slots per grid step (tuning; a divisor of S, a multiple of 8 or S
      itself); default 128 when that divides S, else S.
    interpret: run the Pallas interpreter (any backend) instead of compiling for TPU.

  Returns:
    [B, N, Hq, D]; query head h uses kv head h // (Hq // Hkv).

  Grid (B, Hkv, S // block_s): step (b, k, s) takes the G = Hq // Hkv query heads of kv
  head k for all N nodes as one [G * N, D] tile, folds cache block s into a flash-style
  running softmax (skipped when the block starts at or past prefix_len[b]; the partly
  filled block is zeroed with jnp.where before use), and on the last step folds in the
  N x N tree part under the compact mask and writes the normalised output.
  """
  S = k_cache.shape[2] if k_cache.ndim == 4 else 0
  if block_s is None and S:
    block_s = DEFAULT_BLOCK_S if S % DEFAULT_BLOCK_S == 0 else S
  static_validate_inputs(q, k_cache, v_cache, k_tree, v_tree, prefix_len, tree_mask,
                         scale=scale, block_s=block_s)
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  return _tree_attention(q, k_cache, v_cache, k_tree, v_tree, prefix_len, tree_mask,
                         scale=scale, block_s=block_s, interpret=interpret)
