"""Pallas quantize / dequantize of K/V pages, beside their jnp references.

The references are ``quantize_pages`` / ``dequantize_pages``; the
kernels share their elementwise formulas (``clip_values``, ``group_stats``,
``encode_values``, ``decode_values``, scale encodings) and do their own
blocking and bit packing. So they clip alike: a value beyond
``max_abs(spec)`` or an inf saturates to ``+-max_abs``, a NaN is stored
as 0 (and counts as 0 in its group's statistics), and no other element of the
group is disturbed beyond what the clipped value does to its scale.

Names used in shapes: N = pages, S = page_size (or tokens), H = kv heads,
D = head_dim, n = codes per byte, W = D // n, ng = D // g (token groups),
nt = S // g (channel groups).

Grid: one step per (page, kv head); the block is one head of one page.
Channels are visited in *segments* ``(c0, w, k, o)``: channels
``c0 .. c0 + w`` sit in bits ``k * bits`` of bytes ``o .. o + w`` and belong to
one scale group, so a segment is a static ref slice, a shift and a mask.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from kvjax.layout.pages import Pages
from kvjax.layout.shapes import page_shapes
from kvjax.layout.spec import QuantSpec
from kvjax.quant.codecs import clip_values
from kvjax.quant.codecs import decode_scale
from kvjax.quant.codecs import decode_values
from kvjax.quant.codecs import encode_values
from kvjax.quant.codecs import group_params
from kvjax.quant.codecs import group_stats



def compiler_params(interpret: bool = False, platform: Optional[str] = None):
  """Backend options for our ``pallas_call`` s: Triton on GPU, defaults elsewhere.

  JAX's GPU default for ``pallas_call`` is Mosaic GPU, which wants warp-group
  shaped blocks and a different kernel style; these kernels are written for the
  Triton lowering (power-of-two tiles, pointer loads). Chosen on the host at
  trace time, like ``ops.use_pallas``; ``platform`` overrides the backend (the
  GPU lowering test cross-lowers from CPU). ``$KVJAX_PALLAS_GPU=mosaic``
  leaves the choice to JAX.

  >>> compiler_params(interpret=True) is None
  True
  """
  if interpret or (platform or jax.default_backend()) not in ("gpu", "cuda", "rocm"):
    return None
  if os.environ.get("KVJAX_PALLAS_GPU", "triton").strip().lower() == "mosaic":
    return None
  from jax.experimental.pallas import triton as pltriton   # GPU-only import
  return pltriton.CompilerParams(num_warps=4, num_stages=2)


def segments(spec: QuantSpec, head_dim: int, page_size: int) -> list[tuple[int, int, int, int]]:
  """Static ``(c0, w, k, o)`` segments covering channels ``0 .. D`` in order.

  >>> segments(QuantSpec(bits=4, group_size=16), 64, 16)[:3]
  [(0, 16, 0, 0), (16, 16, 0, 16), (32, 16, 1, 0)]
  """
  if not spec.is_quantized or spec.kind == "fp8":
    n = 1
  else:
    n = spec.codes_per_byte
  width = head_dim // n
  w = width
  if spec.is_quantized and spec.axis == "token":
    w = min(spec.group(head_dim=head_dim, page_size=page_size), width)
  return [(k * width + o, w, k, o) for k in range(n) for o in range(0, width, w)]


def check_kernel_spec(spec: QuantSpec, head_dim: int, page_size: int, what: str) -> None:
  """Host check: token groups and packed pieces must nest (one divides the other).

  ``page_size`` is the block's token count; token-axis groups ignore it.
  """
  spec.validate_for(head_dim=head_dim, page_size=page_size if spec.axis == "channel" else 1,
                    what=what)
  if spec.is_quantized and spec.axis == "token":
    g, width = spec.group(head_dim=head_dim, page_size=page_size), head_dim // spec.codes_per_byte
    if width % g and g % width:
      raise ValueError(f"{what}: group_size={g} and packed width {width} (head_dim={head_dim}, "
                       f"bits={spec.bits}) must divide one another for the kernels")


def load_segment(data_ref, scale_ref, zero_ref, idx: tuple, seg, spec: QuantSpec,
                 head_dim: int) -> jax.Array:
  """float32 ``[S, w]`` values of one segment of one (page, head) block.

  Args:
    data_ref: ``[..., S, W]`` codes (or ``[..., S, D]`` floats when unquantized).
    scale_ref / zero_ref: ``[..., S, ng]`` ("token") or ``[..., nt, D]``
      ("channel"); None when absent.
    idx: leading (possibly dynamic) indices selecting the block, e.g. ``(page,)``.
  """
  c0, w, k, o = seg
  raw = data_ref[idx + (slice(None), pl.ds(o, w))]
  if not spec.is_quantized:
    return raw.astype(jnp.float32)
  s_ = raw.shape[0]
  if spec.kind == "int" and spec.codes_per_byte > 1:
    raw = (raw >> (spec.bits * k)) & ((1 << spec.bits) - 1)
  if spec.axis == "token":
    grp = c0 // spec.group(head_dim=head_dim, page_size=s_)
    sel = idx + (slice(None), pl.ds(grp, 1))                       # [S, 1]
  else:
    sel = idx + (slice(None), pl.ds(c0, w))                        # [nt, w]
  s = decode_scale(scale_ref[sel], spec.scale_dtype, kernel=True)
  z = None if zero_ref is None else zero_ref[sel]
  if spec.axis == "channel" and s.shape[0] > 1:                    # token groups: repeat rows
    nt = s.shape[0]
    s = jnp.broadcast_to(s[:, None, :], (nt, s_ // nt, w)).reshape(s_, w)
    if z is not None:
      z = jnp.broadcast_to(z[:, None, :], (nt, s_ // nt, w)).reshape(s_, w)
  return decode_values(raw, s, z, spec)


# ----------------------------------------------------------------------------- quantize


def _quantize_kernel(x_ref, *out_refs, spec: QuantSpec):
  """One head of one page.

  Refs:
    x_ref: float ``[S, D]``.
    out_refs: data ``[S, W]`` (uint8 or fp8 ``[S, D]``), scale ``[S, ng]`` or
      ``[nt, D]``, then zero (same shape, int8, bfloat16 or float16 per ``spec.zero_dtype``)
      for asymmetric specs.
  """
  data_ref, scale_ref = out_refs[0], out_refs[1]
  zero_ref = out_refs[2] if spec.has_zero else None
  s_, d = x_ref.shape
  g = spec.group(head_dim=d, page_size=s_)

  def params(x, axis):   # clipped to the spec's range, NaN as 0 (group_stats)
    return group_params(*group_stats(x, axis, spec, keepdims=True), spec,
                              kernel=True)

  # Per-group scale/zero: token axis -> [S, 1] per group; channel axis -> [S, D] rows.
  if spec.axis == "token":
    group_sz = []
    for grp in range(d // g):
      enc, s, z = params(x_ref[:, pl.ds(grp * g, g)].astype(jnp.float32), 1)
      scale_ref[:, pl.ds(grp, 1)] = enc
      if zero_ref is not None:
        zero_ref[:, pl.ds(grp, 1)] = z.astype(zero_ref.dtype)
      group_sz.append((s, z))
    sz_of = lambda c0, w: group_sz[c0 // g]  # noqa: E731
  else:
    # Per-channel groups are independent, so each packed segment computes its
    # own channels' params (Triton lowers no in-register slice of a tile).
    nt = s_ // g

    def sz_of(c0, w):
      x = x_ref[:, pl.ds(c0, w)].astype(jnp.float32)
      if nt == 1:    # one group per page (the presets): no 3-d reshape
        enc, s, z = params(x, 0)                                   # [1, w]
        rows = lambda a: a  # noqa: E731  (broadcasts against [S, w])
      else:
        enc, s, z = params(x.reshape(nt, g, w), 1)                 # [nt, 1, w]
        enc, s, z = (None if a is None else a.reshape(nt, w) for a in (enc, s, z))
        rows = lambda a: jnp.broadcast_to(a[:, None, :], (nt, g, w)).reshape(s_, w)  # noqa: E731
      scale_ref[:, pl.ds(c0, w)] = enc
      if zero_ref is not None:
        zero_ref[:, pl.ds(c0, w)] = z.astype(zero_ref.dtype)
      return rows(s), (None if z is None else rows(z))

  packed = {}
  for c0, w, k, o in segments(spec, d, s_):
    s, z = sz_of(c0, w)
    x = clip_values(x_ref[:, pl.ds(c0, w)].astype(jnp.float32), spec)   # NaN -> 0
    codes = encode_values(x, s, z, spec, kernel=True)
    if spec.kind == "fp8" or spec.codes_per_byte == 1:
      data_ref[:, pl.ds(o, w)] = codes
    else:
      part = codes.astype(jnp.uint8) << (spec.bits * k)
      packed[o] = part if o not in packed else packed[o] | part
  for o, byte in packed.items():
    data_ref[:, pl.ds(o, byte.shape[1])] = byte


@functools.partial(jax.jit, static_argnames=("spec", "interpret"))
def quantize_pages(x: jax.Array, spec: QuantSpec, *, interpret: bool = False) -> Pages:
  """Pallas ``quantize_pages``: same inputs, same outputs, bit for bit.

  Args:
    x: float ``[..., S, H, D]``; leading axes are flattened into the grid.
    spec: a quantized spec (bits=16 returns ``Pages(x)``).
    interpret: run the kernel in the Pallas interpreter (CPU tests).

  >>> p = quantize_pages(jnp.ones((1, 4, 1, 8)), QuantSpec(bits=4), interpret=True)
  >>> p.data.shape
  (1, 4, 1, 4)
  """
  if not spec.is_quantized:
    return Pages(data=x)
  if x.ndim < 3:
    raise ValueError(f"quantize_pages: x must be [..., S, H, D], got shape {x.shape}")
  *lead, s_, h, d = x.shape
  check_kernel_spec(spec, d, s_, "quantize_pages")
  xf = x.reshape(-1, s_, h, d)
  n = xf.shape[0]
  shapes = page_shapes(spec, num_pages=n, page_size=s_, num_kv_heads=h, head_dim=d)
  outs = [shapes.data, shapes.scale] + ([shapes.zero] if spec.has_zero else [])

  def head_block(shape):
    return pl.BlockSpec((None, shape[1], None, shape[3]), lambda i, j: (i, 0, j, 0))

  res = pl.pallas_call(
      functools.partial(_quantize_kernel, spec=spec),
      grid=(n, h),
      in_specs=[head_block(xf.shape)],
      out_specs=[head_block(o.shape) for o in outs],
      out_shape=outs,
      interpret=interpret,
      compiler_params=compiler_params(interpret),
      name=f"quantize_{spec.bits}b_{spec.axis}",
  )(xf)
  unflat = lambda a: a.reshape(*lead, *a.shape[1:])  # noqa: E731
  return Pages(data=unflat(res[0]), scale=unflat(res[1]),
               zero=unflat(res[2]) if spec.has_zero else None)


# ----------------------------------------------------------------------------- dequantize


def _dequantize_kernel(data_ref, *refs, spec: QuantSpec, head_dim: int):
  """One head of one page.

  Refs:
    data_ref: ``[S, W]`` codes; then scale, zero (if any) as in ``load_segment``.
    out (last ref): float32 ``[S, D]``.
  """
  scale_ref = refs[0]
  zero_ref = refs[1] if spec.has_zero else None
  out_ref = refs[-1]
  for seg in segments(spec, head_dim, data_ref.shape[0]):
    c0, w = seg[0], seg[1]
    out_ref[:, pl.ds(c0, w)] = load_segment(data_ref, scale_ref, zero_ref, (), seg, spec,
                                            head_dim)


@functools.partial(jax.jit, static_argnames=("spec", "interpret"))
def dequantize_pages(pages: Pages, spec: QuantSpec, *, interpret: bool = False) -> jax.Array:
  """Pallas ``dequantize_pages``: float32 ``[..., S, H, D]``.

  >>> spec = QuantSpec(bits=4)
  >>> x = dequantize_pages(quantize_pages(jnp.full((1, 4, 1, 8), 7.0), spec, interpret=True), spec,
  ...                      interpret=True)
  >>> x.shape, float(x[0, 0, 0, 0])
  ((1, 4, 1, 8), 7.0)
  """
  if not spec.is_quantized:
    return pages.data.astype(jnp.float32)
  if pages.data.ndim < 3:
    raise ValueError(f"dequantize_pages: pages.data must be [..., S, H, W], got shape "
                     f"{pages.data.shape}")
  *lead, s_, h, width = pages.data.shape
  d = width if spec.kind == "fp8" else width * spec.codes_per_byte
  check_kernel_spec(spec, d, s_, "dequantize_pages")
  ins = [pages.data, pages.scale] + ([pages.zero] if spec.has_zero else [])
  ins = [a.reshape(-1, *a.shape[len(lead):]) for a in ins]
  n = ins[0].shape[0]

  def head_block(shape):
    return pl.BlockSpec((None, shape[1], None, shape[3]), lambda i, j: (i, 0, j, 0))

  out = pl.pallas_call(
      functools.partial(_dequantize_kernel, spec=spec, head_dim=d),
      grid=(n, h),
      in_specs=[head_block(a.shape) for a in ins],
      out_specs=head_block((n, s_, h, d)),
      out_shape=jax.ShapeDtypeStruct((n, s_, h, d), jnp.float32),
      interpret=interpret,
      compiler_params=compiler_params(interpret),
      name=f"dequantize_{spec.bits}b_{spec.axis}",
  )(*ins)
  return out.reshape(*lead, s_, h, d)
