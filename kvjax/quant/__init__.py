"""Quantization of stored K/V pages: specs, layouts and the pure-jnp reference.

Names used in shapes: S = page_size, H = num_kv_heads, D = head_dim,
n = codes per byte (1 for 8 bits, 2 for 4 bits, 4 for 2 bits), W = D // n.

Layouts (see docs/quantization.md):

* ``data``: ``[..., S, H, W]`` uint8 codes (``int``) or ``[..., S, H, D]``
  float8_e4m3fn (``fp8``). Packing is *planar within a byte*: byte ``j`` holds
  elements ``j, j + W, ..., j + (n-1) W`` of the head, element ``j + k W`` in
  bits ``[k*bits, (k+1)*bits)``. A kernel thus reads ``n`` contiguous slices of
  ``W`` channels with a shift and a mask, never an interleave.
* ``scale`` / ``zero``: ``axis="token"``: ``[..., S, H, D // g]`` (one group of
  ``g`` channels of one token); ``axis="channel"``: ``[..., S // g, H, D]`` (one
  group of ``g`` tokens of one channel; ``g = S`` by default: one scale per
  channel per page, KIVI's key layout).
* Decoding is one formula for every integer spec: ``x = scale * (code + zero)``.
  Symmetric specs store no zero (it is the constant ``-2**(bits-1)``);
  asymmetric specs store ``zero`` as int8 in units of the scale
  (``zero_dtype="int8"``), or the group's minimum itself, rounded down to
  bfloat16 (``zero_dtype="bfloat16"``, KIVI) or float16 (``"float16"``: 3
  more mantissa bits, range +-65504): then ``x = scale * code + zero``.
* Scales are stored as bfloat16, float16 or ``"log8"``: a uint8 code ``c``
  meaning ``2 ** ((c - 160) / 8)`` (steps of 9 %, range ``9.5e-7 .. 3756``).
  Every encoding rounds the scale *up*, so a value inside the spec's range
  never clips.

What each spec guarantees (docs/quantization.md, "Range, outliers, NaN/inf"):

* **Range** ``max_abs(spec)``: any group whose values lie in
  ``[-max_abs, max_abs]`` is stored with no code clipped, each element within
  ``error_bound(spec, scale)`` of its group's decoded scale (half a step for
  integer specs, ``448 * scale * 2**-4`` for fp8, the widest half-gap or end
  for non-uniform levels). The range is set by the largest scale the scale
  dtype stores (log8 3756, f16 65504) and the zero's dtype; e.g. int4 log8
  26,267 (symmetric) / 27,205 (int8 zero), int2 log8 4,690 (int8 zero) /
  5,607 (bf16 minimum), f16 minimum 65504; bf16 scales 2**126 (float32's
  limit, kept below 2**127 so group arithmetic never overflows).
* **Outliers**: a value beyond the range, and ``+-inf``, is clipped to
  ``+-max_abs`` (the sign kept) *before* the group's statistics, so it costs
  precision only in its own group: that group's other elements decode
  within the bound of the clipped group (a scale up to ``max_abs``-sized),
  every other group is stored bit for bit as without it.
* **NaN** is stored as 0 and counts as 0 in its group's statistics: the
  group's other elements decode within the bound of the group with a 0 in
  its place (unchanged for symmetric and fp8 specs, and for any group that
  straddles 0), and the NaN decodes to 0 within that bound.
* Nothing decodes to inf, NaN or beyond ``max_abs`` plus one bound.
  ``out_of_range(x, spec)`` / ``non_finite(x)`` say, per token of ``x [..., H, D]``,
  where this rule was needed (the cache raises a status flag from them).

>>> import jax.numpy as jnp
>>> from kvjax.layout import QuantSpec
>>> from kvjax.quant import dequantize_pages, quantize_pages
>>> spec = QuantSpec(bits=8)
>>> x = jnp.linspace(-1, 1, 16).reshape(1, 2, 1, 8)
>>> bool(jnp.max(jnp.abs(dequantize_pages(quantize_pages(x, spec), spec) - x)) < 0.01)
True
"""

from __future__ import annotations

from kvjax.quant.codecs import clip_values
from kvjax.quant.codecs import decode_scale
from kvjax.quant.codecs import decode_values
from kvjax.quant.codecs import encode_scale
from kvjax.quant.codecs import encode_values
from kvjax.quant.codecs import error_bound
from kvjax.quant.codecs import f16_round
from kvjax.quant.codecs import group_params
from kvjax.quant.codecs import group_scale
from kvjax.quant.codecs import group_stats
from kvjax.quant.codecs import grouped
from kvjax.quant.codecs import inverse
from kvjax.quant.codecs import max_abs
from kvjax.quant.codecs import max_scale
from kvjax.quant.codecs import min_floor
from kvjax.quant.codecs import non_finite
from kvjax.quant.codecs import out_of_range
from kvjax.quant.codecs import pack_codes
from kvjax.quant.codecs import round_half_even
from kvjax.quant.codecs import split_float
from kvjax.quant.codecs import ungrouped
from kvjax.quant.codecs import unpack_codes
from kvjax.quant.codecs import zero_point
from kvjax.quant.pages import check_divides
from kvjax.quant.pages import copy_pages
from kvjax.quant.pages import dequantize_pages
from kvjax.quant.pages import fold_page
from kvjax.quant.pages import init_quant_pages
from kvjax.quant.pages import quantize_pages
from kvjax.quant.pages import quantize_tokens
from kvjax.quant.pages import requantize
from kvjax.quant.pages import store_pages
from kvjax.quant.pages import write_tokens
from kvjax.quant.staging import stage_and_fold
