"""The tree-verification Pallas kernel (interpret mode on CPU) against its jnp reference,
the reference against an independent float64 numpy softmax, and the input checks.

Cache padding (slots >= prefix_len[b]) is filled with NaN, so any read of it into a
result shows up as NaN; test_nan_padding_is_caught shows a kernel that reads it fails.
"""
import functools
import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ref_tree_attention, tree_attention

# The package's `tree_attention` attribute is the function; the module is reached by name.
ta = importlib.import_module("pallas_kernels.tree_attention")


def mask_from_parents(parents):
  """bool [N, N]: node i sees j when j is i or an ancestor of i (parents[0] = -1)."""
  n = len(parents)
  mask = np.zeros((n, n), bool)
  for i in range(n):
    j = i
    while j >= 0:
      mask[i, j] = True
      j = parents[j]
  return mask


#   chain 0-1-2-3-4     wide: 0 -> 1..5     two levels: 0 -> {1, 2}, 1 -> {3, 4}, 2 -> {5, 6}
CHAIN = [-1, 0, 1, 2, 3]
WIDE = [-1, 0, 0, 0, 0, 0]
TWO_LEVEL = [-1, 0, 0, 1, 1, 2, 2]
TREES = {"chain": CHAIN, "wide": WIDE, "two_level": TWO_LEVEL}


def make_inputs(*, B=3, N=5, Hq=9, Hkv=3, S=64, D=16, prefix=(0, 37, 64), seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(dtype)
  q, k_tree, v_tree = normal(B, N, Hq, D), normal(B, N, Hkv, D), normal(B, N, Hkv, D)
  k_cache, v_cache = normal(B, Hkv, S, D), normal(B, Hkv, S, D)
  prefix_len = np.asarray(prefix, np.int32)
  for b, n in enumerate(prefix_len):  # padding: NaN, so a read of it cannot pass unseen
    k_cache[b, :, n:] = np.nan
    v_cache[b, :, n:] = np.nan
  return q, k_cache, v_cache, k_tree, v_tree, jnp.asarray(prefix_len)


def naive_numpy(q, k_cache, v_cache, k_tree, v_tree, prefix_len, tree_mask, scale=None):
  """Per (row, node, head): gather the keys it sees, float64 softmax. No shared code."""
  q, k_cache, v_cache, k_tree, v_tree = (
      np.asarray(x, np.float64) for x in (q, k_cache, v_cache, k_tree, v_tree))
  B, N, Hq, D = q.shape
  Hkv = k_cache.shape[1]
  masks = np.broadcast_to(np.asarray(tree_mask), (B, N, N))
  scale = 1 / np.sqrt(D) if scale is None else scale
  out = np.zeros_like(q)
  for b in range(B):
    L = int(prefix_len[b])
    for i in range(N):
      nodes = np.flatnonzero(masks[b, i])
      for h in range(Hq):
        kv = h // (Hq // Hkv)
        keys = np.concatenate([k_cache[b, kv, :L], k_tree[b, nodes, kv]])
        vals = np.concatenate([v_cache[b, kv, :L], v_tree[b, nodes, kv]])
        logits = keys @ q[b, i, h] * scale
        w = np.exp(logits - logits.max())
        out[b, i, h] = (w / w.sum()) @ vals
  return out


def check(inputs, tree_mask, *, atol=1e-5, **kw):
  tree_mask = jnp.asarray(tree_mask)
  got = np.asarray(tree_attention(*inputs, tree_mask, interpret=True, **kw))
  ref = np.asarray(ref_tree_attention(*inputs, tree_mask, scale=kw.get("scale")))
  assert not np.isnan(got).any() and not np.isnan(ref).any()
  np.testing.assert_allclose(got, ref, atol=atol, rtol=0)
  return got, ref


@pytest.mark.parametrize("tree", TREES)
def test_kernel_matches_reference_per_tree(tree):
  # B=3 rows of prefix 0, 37 (a partly filled block, one block skipped) and S=64.
  mask = mask_from_parents(TREES[tree])
  check(make_inputs(N=len(mask), seed=len(tree)), mask, block_s=16)


def test_per_row_tree_mask():
  masks = np.stack([mask_from_parents(p + [0] * (7 - len(p))) for p in (CHAIN, WIDE, TWO_LEVEL)])
  assert masks.shape == (3, 7, 7)
  check(make_inputs(N=7, prefix=(64, 5, 0), seed=3), masks, block_s=16)


@pytest.mark.parametrize("Hq,Hkv,D", [(3, 3, 16), (9, 3, 64), (8, 2, 16)])
def test_gqa_ratios(Hq, Hkv, D):
  # GQA ratios 1, 3 (the real model: 9 query heads, 3 kv heads, head_dim 64) and 4.
  mask = mask_from_parents(TWO_LEVEL)
  check(make_inputs(N=7, Hq=Hq, Hkv=Hkv, D=D, prefix=(1, 48, 17), seed=Hq), mask, block_s=16)


def test_block_size_and_scale_do_not_change_the_result():
  inputs = make_inputs(S=128, prefix=(128, 0, 77), seed=5)
  mask = mask_from_parents(CHAIN)
  outs = [check(inputs, mask, block_s=bs, scale=0.3)[0] for bs in (8, 64, 128)]
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
  np.testing.assert_allclose(outs[0], outs[2], atol=1e-5)
  # The default block_s (S=128 -> 128) and the default scale 1/sqrt(D).
  check(inputs, mask)


def test_bfloat16():
  inputs = make_inputs(B=2, prefix=(9, 64), seed=6)
  inputs = tuple(x.astype(jnp.bfloat16) for x in inputs[:5]) + inputs[5:]
  got, ref = check(inputs, mask_from_parents(WIDE[:5]), atol=3e-2, block_s=32)
  assert got.dtype == jnp.bfloat16


@pytest.mark.parametrize("tree", ["chain", "two_level"])
def test_reference_matches_naive_numpy(tree):
  mask = mask_from_parents(TREES[tree])
  inputs = make_inputs(N=len(mask), Hq=8, Hkv=2, prefix=(0, 13, 64), seed=7)
  ref = np.asarray(ref_tree_attention(*inputs, jnp.asarray(mask)))
  np.testing.assert_allclose(ref, naive_numpy(*inputs, mask), atol=1e-5, rtol=0)
  per_row = np.stack([mask, np.eye(len(mask), dtype=bool), mask])
  ref = np.asarray(ref_tree_attention(*inputs, jnp.asarray(per_row), scale=0.2))
  np.testing.assert_allclose(ref, naive_numpy(*inputs, per_row, scale=0.2), atol=1e-5, rtol=0)


def test_nan_padding_is_caught():
  """The NaN fill really catches a read of padding: the same kernel without the
  jnp.where on the partly filled block gives NaN in that row (prefix 37 of 64) only."""
  inputs = make_inputs(prefix=(0, 37, 64), seed=8)
  mask = jnp.asarray(mask_from_parents(CHAIN))
  broken = np.asarray(ta._tree_attention(*inputs, mask, scale=0.25, block_s=16, interpret=True,
                                         mask_padding=False))
  assert np.isnan(broken).any(axis=(1, 2, 3)).tolist() == [False, True, False]
  # The reference must not leak it either: zeroing after the multiply would (0 * NaN).
  assert not np.isnan(np.asarray(ref_tree_attention(*inputs, mask))).any()


def test_only_the_live_prefix_matters():
  """Rewriting padding (NaN -> big finite values) leaves the kernel's output unchanged."""
  inputs = make_inputs(prefix=(3, 37, 20), seed=9)
  mask = jnp.asarray(mask_from_parents(WIDE[:5]))
  a = np.asarray(tree_attention(*inputs, mask, block_s=16, interpret=True))
  k, v = (np.nan_to_num(np.asarray(x), nan=1e4) for x in inputs[1:3])
  b = np.asarray(tree_attention(inputs[0], k, v, *inputs[3:], mask, block_s=16, interpret=True))
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_to_mosaic_for_tpu(dtype):
  """Exporting for platform "tpu" runs Pallas's Mosaic lowering here, without a TPU:
  an op with no Mosaic lowering fails now, not on the first TPU run. (Mosaic's own
  compile passes run only on a TPU.) The real model's shapes: 9/3 heads, head_dim 64."""
  B, N, Hq, Hkv, S, D = 2, 8, 9, 3, 256, 64
  shapes = [(B, N, Hq, D), (B, Hkv, S, D), (B, Hkv, S, D), (B, N, Hkv, D), (B, N, Hkv, D)]
  args = [jax.ShapeDtypeStruct(s, dtype) for s in shapes]
  args += [jax.ShapeDtypeStruct((B,), jnp.int32), jax.ShapeDtypeStruct((N, N), jnp.bool_)]
  kernel = jax.jit(functools.partial(tree_attention, block_s=128))
  exported = jax.export.export(kernel, platforms=["tpu"])(*args)
  assert "tpu_custom_call" in exported.mlir_module()


BAD_INPUTS = [
    (dict(q=(3, 5, 9)), ValueError, "q must be [B, N, Hq, D]; got shape (3, 5, 9)"),
    (dict(k_cache=(2, 3, 64, 16), v_cache=(2, 3, 64, 16)), ValueError,
     "k_cache must be [B, Hkv, S, D] with B=3, D=16 from q; got shape (2, 3, 64, 16)"),
    (dict(v_cache=(3, 3, 32, 16)), ValueError,
     "v_cache.shape=(3, 3, 32, 16) must equal k_cache.shape=(3, 3, 64, 16)"),
    (dict(k_tree=(3, 5, 9, 16)), ValueError,
     "k_tree must be [B, N, Hkv, D] = (3, 5, 3, 16) (from q and k_cache); got shape (3, 5, 9, 16)"),
    (dict(k_cache=(3, 4, 64, 16), v_cache=(3, 4, 64, 16), k_tree=(3, 5, 4, 16), v_tree=(3, 5, 4, 16)),
     ValueError, "Hq=9 query heads must be a multiple of Hkv=4 kv heads "
     "(query head h uses kv head h // (Hq // Hkv))"),
    (dict(prefix_len=np.zeros(3, np.int64)), ValueError,
     "prefix_len must be int32[B] = int32[3]; got int64[3] (use jnp.asarray(prefix_len, jnp.int32))"),
    (dict(prefix_len=np.zeros((3, 1), np.int32)), ValueError,
     "prefix_len must be int32[B] = int32[3]; got int32[3, 1] (use jnp.asarray(prefix_len, jnp.int32))"),
    (dict(tree_mask=np.ones((5, 6), bool)), ValueError,
     "tree_mask must be [N, N] = (5, 5) or [B, N, N] = (3, 5, 5); got shape (5, 6)"),
    (dict(tree_mask=np.ones((2, 5, 5), bool)), ValueError,
     "tree_mask must be [N, N] = (5, 5) or [B, N, N] = (3, 5, 5); got shape (2, 5, 5)"),
    (dict(tree_mask=np.ones((5, 5), np.int32)), ValueError,
     "tree_mask must be bool; got dtype int32 (use tree_mask.astype(bool))"),
    (dict(v_tree=np.zeros((3, 5, 3, 16), jnp.bfloat16)), ValueError,
     "v_tree.dtype=bfloat16 must equal q.dtype=float32; cast it with .astype"),
    (dict(block_s=24), ValueError,
     "block_s=24 must be a positive divisor of S=64 (k_cache.shape[2]); "
     "pick a divisor or pad the cache to a multiple of block_s"),
    (dict(block_s=4), ValueError, "block_s=4 must be a multiple of 8 (a TPU sublane tile) or equal S=64"),
    (dict(scale=-1.0), ValueError, "scale=-1.0 must be a positive Python number (default 1/sqrt(D))"),
]


@pytest.mark.parametrize("bad,exc,message", BAD_INPUTS, ids=[m[:40] for _, _, m in BAD_INPUTS])
def test_bad_inputs(bad, exc, message):
  shapes = dict(q=(3, 5, 9, 16), k_cache=(3, 3, 64, 16), v_cache=(3, 3, 64, 16),
                k_tree=(3, 5, 3, 16), v_tree=(3, 5, 3, 16))
  args = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
  args.update(prefix_len=np.zeros(3, np.int32), tree_mask=np.eye(5, dtype=bool))
  kwargs = {}
  for name, value in bad.items():
    if name in ("block_s", "scale"):
      kwargs[name] = value
    elif isinstance(value, tuple):
      args[name] = np.zeros(value, np.float32)
    else:
      args[name] = value
  order = ("q", "k_cache", "v_cache", "k_tree", "v_tree", "prefix_len", "tree_mask")
  with pytest.raises(exc, match=f"^{re.escape(message)}$"):
    tree_attention(*(args[n] for n in order), interpret=True, **kwargs)
  if "block_s" not in kwargs:  # the reference validates the same way
    with pytest.raises(exc, match=f"^{re.escape(message)}$"):
      ref_tree_attention(*(args[n] for n in order), **kwargs)
