"""Paged decode attention over quantized pages: jnp reference and Pallas kernel.

Names used in shapes: B = batch (sequences), Hq = query heads, H = KV heads,
G = Hq // H (GQA group), D = head_dim, P = pages in the pool, S = page_size,
M = page-table columns, NS = staging pages per sequence, W = D // codes per byte.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from kvjax.kernels import quantize as kq
from kvjax.layout.pages import Pages
from kvjax.layout.shapes import first_staged_page
from kvjax.layout.shapes import residual_tokens
from kvjax.layout.spec import QuantSpec
from kvjax.quant.pages import dequantize_pages
from kvjax.rope import inv_freq
from kvjax.rope import rope


def _check_args(q, k_pages, v_pages, page_table, kv_lens, k_spec, v_spec, k_stage, v_stage,
                what, k_sink=None, v_sink=None):
  """Host-side shape checks shared by the reference and the kernel wrapper."""
  if q.ndim != 3:
    raise ValueError(f"{what}: q must be [B, Hq, D], got shape {q.shape}")
  b, hq, d = q.shape
  for name, pages, spec in (("k_pages", k_pages, k_spec), ("v_pages", v_pages, v_spec)):
    if pages.data.ndim != 4:
      raise ValueError(f"{what}: {name}.data must be [P, S, H, *], got shape "
                       f"{pages.data.shape}")
    spec.validate_for(head_dim=d, page_size=pages.data.shape[1], what=f"{what}: {name}")
    width = d // spec.codes_per_byte if spec.kind == "int" and spec.is_quantized else d
    if pages.data.shape[-1] != width:
      raise ValueError(f"{what}: {name}.data last axis must be {width} for head_dim={d} "
                       f"and {spec}, got {pages.data.shape[-1]}")
  h = k_pages.data.shape[2]
  if hq % h:
    raise ValueError(f"{what}: query heads {hq} not a multiple of kv heads {h}")
  if page_table.ndim != 2 or page_table.shape[0] != b:
    raise ValueError(f"{what}: page_table must be [B={b}, M], got shape {page_table.shape}")
  if kv_lens.shape != (b,):
    raise ValueError(f"{what}: kv_lens must be [B={b}], got shape {kv_lens.shape}")
  if (k_stage is None) != (v_stage is None):
    raise ValueError(f"{what}: give both k_stage and v_stage or neither")
  if k_stage is not None:
    s = k_pages.data.shape[1]
    for name, st in (("k_stage", k_stage), ("v_stage", v_stage)):
      if st.ndim != 5 or st.shape[0] != b or st.shape[2:] != (s, h, d):
        raise ValueError(f"{what}: {name} must be [B={b}, NS, S={s}, H={h}, D={d}], "
                         f"got shape {st.shape}")
    need = residual_tokens(k_spec, v_spec) // s + 1
    if k_stage.shape[1] < need or v_stage.shape[1] != k_stage.shape[1]:
      raise ValueError(f"{what}: staging rings must hold the same number (>= {need}) of pages "
                       f"for these specs, got {k_stage.shape[1]} and {v_stage.shape[1]}")
  if (k_sink is None) != (v_sink is None):
    raise ValueError(f"{what}: give both k_sink and v_sink or neither")
  if k_sink is not None:
    s = k_pages.data.shape[1]
    for name, sk in (("k_sink", k_sink), ("v_sink", v_sink)):
      if sk.ndim != 4 or sk.shape[0] != b or sk.shape[2:] != (h, d) or not 0 < sk.shape[1] <= s:
        raise ValueError(f"{what}: {name} must be [B={b}, N, H={h}, D={d}] with "
                         f"0 < N <= S={s}, got shape {sk.shape}")


def gather_dequantized(pages: Pages, spec: QuantSpec, page_table: jax.Array,
                       kv_lens: jax.Array, stage: Optional[jax.Array] = None,
                       residual: int = 0, *, sink: Optional[jax.Array] = None) -> jax.Array:
  """Each sequence's K (or V) as dense float32 ``[B, M * S, H, D]`` (for prefill).

  Args:
    pages: one layer's ``Pages`` ``[P, S, H, *]`` in ``spec``.
    page_table: int32 ``[B, M]`` (-1 entries read page 0: mask by ``kv_lens``).
    kv_lens: int32 ``[B]``; decides which pages come from ``stage``.
    stage: optional float ``[B, NS, S, H, D]`` ring (see ``paged_attention_reference``).
    residual: the cache's window (``residual_tokens``).
    sink: optional float ``[B, N, H, D]``: each sequence's first N tokens,
      read from here instead of the pool (``QuantSpec.sink``).

  >>> from kvjax.quant.pages import quantize_pages
  >>> spec = QuantSpec(bits=8)
  >>> from kvjax.quant.pages import quantize_pages
  >>> p = quantize_pages(jnp.full((2, 4, 1, 8), 7.0), spec)
  >>> gather_dequantized(p, spec, jnp.array([[1, 0]]), jnp.array([5])).shape
  (1, 8, 1, 8)
  """
  pt = jnp.clip(page_table, 0, pages.data.shape[0] - 1)
  x = dequantize_pages(jax.tree.map(lambda a: a[pt], pages), spec)  # [B, M, S, H, D]
  if stage is not None:
    s, m, ns = x.shape[2], x.shape[1], stage.shape[1]
    j = jnp.arange(m)
    staged = j[None, :] >= first_staged_page(kv_lens, residual, s)[:, None]
    x = jnp.where(staged[:, :, None, None, None], stage[:, j % ns].astype(jnp.float32), x)
  b, m, s, h, d = x.shape
  x = x.reshape(b, m * s, h, d)
  if sink is not None:
    x = x.at[:, :sink.shape[1]].set(sink.astype(jnp.float32))
  return x


def paged_attention_reference(q: jax.Array, k_pages: Pages, v_pages: Pages,
                              page_table: jax.Array, kv_lens: jax.Array, k_spec: QuantSpec,
                              v_spec: QuantSpec, *, k_stage: Optional[jax.Array] = None,
                              v_stage: Optional[jax.Array] = None,
                              k_sink: Optional[jax.Array] = None,
                              v_sink: Optional[jax.Array] = None,
                              k_rope: float = 0.0) -> jax.Array:
  """Decode attention (one query token per sequence) over paged, quantized K/V.

  Args:
    q: float ``[B, Hq, D]``; query head ``i`` reads kv head ``i // G``.
    k_pages / v_pages: one layer's ``Pages`` with arrays ``[P, S, H, *]`` in
      ``k_spec`` / ``v_spec`` layout.
    page_table: int32 ``[B, M]``; entries past a sequence's pages are ignored.
    kv_lens: int32 ``[B]`` tokens to attend to (0 gives a zero output).
    k_spec / v_spec: the pools' ``QuantSpec``s.
    k_stage / v_stage: optional float ``[B, NS, S, H, D]`` full-precision
      staging rings: pages ``j >= first_staged_page(kv_len, residual, S)`` are
      read from ``stage[b, j % NS]`` instead of the pool.
    k_sink / v_sink: optional float ``[B, N, H, D]``: each sequence's first N
      tokens in full precision, read instead of the pool (``QuantSpec.sink``).
    k_rope: 0, or the RoPE base of keys stored before RoPE: the dequantized
      keys are rotated by their positions (``kvjax.rope.rope``) before the scores.

  Returns:
    float32 ``[B, Hq, D]``, softmax scale ``1 / sqrt(D)``. Positions at or past
    ``kv_len`` (stale slots, page 0 read for -1 columns, garbage codes or
    scales) contribute exactly nothing, whatever they hold: scores and values
    are selected, never multiplied by a weight of 0.

  >>> spec = QuantSpec()
  >>> k = Pages(data=jnp.ones((1, 2, 1, 4))); v = Pages(data=jnp.ones((1, 2, 1, 4)))
  >>> out = paged_attention_reference(jnp.ones((1, 2, 4)), k, v, jnp.zeros((1, 1), jnp.int32),
  ...                                 jnp.array([2]), spec, spec)
  >>> out.shape, float(out[0, 0, 0])
  ((1, 2, 4), 1.0)
  >>> v = Pages(data=jnp.ones((1, 2, 1, 4)).at[0, 1].set(jnp.nan))   # a stale slot
  >>> float(paged_attention_reference(jnp.ones((1, 2, 4)), k, v, jnp.zeros((1, 1), jnp.int32),
  ...                                 jnp.array([1]), spec, spec)[0, 0, 0])
  1.0
  """
  _check_args(q, k_pages, v_pages, page_table, kv_lens, k_spec, v_spec, k_stage, v_stage,
              "paged_attention_reference", k_sink, v_sink)
  b, hq, d = q.shape
  h = k_pages.data.shape[2]
  residual = residual_tokens(k_spec, v_spec)
  k = gather_dequantized(k_pages, k_spec, page_table, kv_lens, k_stage, residual, sink=k_sink)
  if k_rope:
    k = rope(k, jnp.broadcast_to(jnp.arange(k.shape[1], dtype=jnp.int32), k.shape[:2]), k_rope)
  v = gather_dequantized(v_pages, v_spec, page_table, kv_lens, v_stage, residual, sink=v_sink)
  qg = q.astype(jnp.float32).reshape(b, h, hq // h, d)
  scores = jnp.einsum("bhgd,bthd->bhgt", qg, k) / jnp.sqrt(jnp.float32(d))
  valid = jnp.arange(k.shape[1])[None, :] < kv_lens[:, None]          # [B, T]
  scores = jnp.where(valid[:, None, None, :], scores, -jnp.inf)
  v = jnp.where(valid[:, :, None, None], v, 0.0)   # masked slots: select (0 * nan = nan)
  m = jnp.max(scores, axis=-1, keepdims=True)
  p = jnp.exp(scores - jnp.where(jnp.isfinite(m), m, 0.0))
  l = jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum("bhgt,bthd->bhgd", p, v) / jnp.where(l > 0, l, 1.0)
  return out.reshape(b, hq, d)


# ----------------------------------------------------------------------------- Pallas kernel


def _attention_kernel(*refs, k_spec: QuantSpec, v_spec: QuantSpec, head_dim: int,
                      page_size: int, residual: int, num_stage: int, pages_per_split: int,
                      num_sink: int, k_rope: float):
  """One (sequence, kv head, split): online softmax over that split's pages.

  Split ``c`` covers pages ``[c * pages_per_split, (c + 1) * pages_per_split)``
  of the sequence and leaves its unnormalized output with the running max and
  sum; ``paged_attention`` merges the splits (flash-decoding). Rows of a tile
  at or past ``kv_len`` are selected out of the scores (``-inf``) and of the
  values (0): a NaN or inf in a stale slot never meets a weight of 0.

  Refs, in order:
    q_ref: float ``[G, D]`` the G query heads of this kv head.
    table_ref: int32 ``[B, M]`` page table (whole); lens_ref: int32 ``[B]``.
    k data ``[P, S, W]``, k scale, k zero (present per spec, see
    ``kernels.quantize.load_segment``), then the same for v.
    k_stage_ref / v_stage_ref: float ``[NS, S, D]`` when ``num_stage > 0``.
    k_sink_ref / v_sink_ref: float32 ``[S, D]`` when ``num_sink > 0``: rows
      below ``num_sink`` replace page 0's (the rest is padding).
    inv_ref: float32 ``[1, D/2]`` RoPE frequencies when ``k_rope > 0`` (keys
      stored before RoPE: each loaded key tile is rotated by its positions).
    o_ref: float32 ``[G, D]`` unnormalized output; m_ref, l_ref: float32
      ``[G, 1]`` the split's score max and softmax denominator (-inf, 0 if empty).
  """
  it = iter(refs)
  q_ref, table_ref, lens_ref = next(it), next(it), next(it)

  def pool(spec):
    data = next(it)
    scale = next(it) if spec.is_quantized else None
    zero = next(it) if spec.has_zero else None
    return data, scale, zero

  k_pool, v_pool = pool(k_spec), pool(v_spec)
  k_stage_ref = next(it) if num_stage else None
  v_stage_ref = next(it) if num_stage else None
  k_sink_ref = next(it) if num_sink else None
  v_sink_ref = next(it) if num_sink else None
  inv_ref = next(it) if k_rope else None
  o_ref, m_ref, l_ref = next(it), next(it), next(it)

  b = pl.program_id(0)
  kv_len = lens_ref[b]
  n_pages = (kv_len + page_size - 1) // page_size
  first_staged = jnp.minimum(first_staged_page(kv_len, residual, page_size), n_pages)
  if not num_stage:
    first_staged = n_pages
  lo = pl.program_id(2) * pages_per_split
  hi = jnp.minimum(lo + pages_per_split, n_pages)
  half = head_dim // 2
  k_segs = kq.segments(k_spec, head_dim, page_size)
  if k_rope:   # every key segment inside one half of the head: each has its RoPE partner
    k_segs = [piece for seg in k_segs for piece in _split_at(seg, half)]
  v_segs = kq.segments(v_spec, head_dim, page_size)
  sm_scale = 1.0 / float(head_dim) ** 0.5
  small_group = q_ref.shape[0] < 16
  q_parts = [q_ref[:, pl.ds(c0, w)].astype(jnp.float32) * sm_scale for c0, w, _, _ in k_segs]
  full = QuantSpec()

  def mm_t(a, b_):   # a [G, w] @ b_[S, w].T -> [G, S]
    if small_group:  # broadcast-reduce: no minimum block size (tl.dot wants >= 16 rows)
      return jnp.sum(a[:, None, :] * b_[None, :, :], axis=2)
    return jnp.dot(a, b_.T, preferred_element_type=jnp.float32)

  def mm(a, b_):     # a [G, S] @ b_[S, w] -> [G, w]
    if small_group:
      return jnp.sum(a[:, :, None] * b_[None, :, :], axis=1)
    return jnp.dot(a, b_, preferred_element_type=jnp.float32)

  def keys(j, load_k):   # the page's key segments, rotated when stored before RoPE
    ks = {seg[0]: load_k(seg) for seg in k_segs}
    if not k_rope:
      return [ks[c0] for c0, _, _, _ in k_segs]
    pos = (j * page_size + jax.lax.broadcasted_iota(jnp.int32, (page_size, 1), 0)).astype(
        jnp.float32)
    out = []
    for c0, w, _, _ in k_segs:   # as kvjax.rope.rope: [x1 cos - x2 sin, x2 cos + x1 sin]
      angle = pos * inv_ref[:, pl.ds(c0 % half, w)]                        # [S, w]
      cos, sin = jnp.cos(angle), jnp.sin(angle)
      if c0 < half:
        out.append(ks[c0] * cos - ks[c0 + half] * sin)
      else:
        out.append(ks[c0] * cos + ks[c0 - half] * sin)
    return out

  def step(j, carry, load_k, load_v):
    m, l, acc = carry
    scores = sum(mm_t(qp, kt) for qp, kt in zip(q_parts, keys(j, load_k)))   # [G, S]
    pos = j * page_size + jax.lax.broadcasted_iota(jnp.int32, scores.shape, 1)
    scores = jnp.where(pos < kv_len, scores, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(scores, axis=1, keepdims=True))   # [G, 1]
    corr = jnp.exp(m - m_new)
    p = jnp.exp(scores - m_new)
    l = corr * l + jnp.sum(p, axis=1, keepdims=True)
    # values past kv_len (stale slots, garbage codes or scales): select, not 0 * v
    row = j * page_size + jax.lax.broadcasted_iota(jnp.int32, (page_size, 1), 0)
    acc = tuple(corr * a + mm(p, jnp.where(row < kv_len, load_v(seg), 0.0))
                for a, seg in zip(acc, v_segs))
    return m_new, l, acc

  def with_sink(sink_ref, j, seg, x):   # page 0's first rows from the sink (full precision)
    if sink_ref is None:
      return x
    rows = jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
    return jnp.where((rows < num_sink) & (j == 0), sink_ref[:, pl.ds(seg[0], seg[1])], x)

  def pooled(j, carry):
    page = table_ref[b, j]
    return step(j, carry,
                lambda seg: with_sink(k_sink_ref, j, seg, kq.load_segment(
                    *k_pool, (page,), seg, k_spec, head_dim)),
                lambda seg: with_sink(v_sink_ref, j, seg, kq.load_segment(
                    *v_pool, (page,), seg, v_spec, head_dim)))

  def staged(j, carry):
    slot = j % max(num_stage, 1)
    return step(j, carry,   # (the sink wins here too: the reference reads it first)
                lambda seg: with_sink(k_sink_ref, j, seg, kq.load_segment(
                    k_stage_ref, None, None, (slot,), (seg[0], seg[1], 0, seg[0]), full,
                    head_dim)),
                lambda seg: with_sink(v_sink_ref, j, seg, kq.load_segment(
                    v_stage_ref, None, None, (slot,), (seg[0], seg[1], 0, seg[0]), full,
                    head_dim)))

  g = q_ref.shape[0]
  carry = (jnp.full((g, 1), -jnp.inf, jnp.float32), jnp.zeros((g, 1), jnp.float32),
           tuple(jnp.zeros((g, w), jnp.float32) for _, w, _, _ in v_segs))
  carry = jax.lax.fori_loop(lo, jnp.minimum(hi, first_staged), pooled, carry)
  if num_stage:
    carry = jax.lax.fori_loop(jnp.maximum(lo, first_staged), hi, staged, carry)
  m, l, acc = carry
  for a, (c0, w, _, _) in zip(acc, v_segs):
    o_ref[:, pl.ds(c0, w)] = a
  m_ref[...] = m
  l_ref[...] = l


PAGES_PER_SPLIT = 32   # pages one program walks (512 tokens at S=16, vLLM v2's partition)


def _split_at(seg, half: int) -> list:
  """A ``(c0, w, k, o)`` segment cut where it crosses channel ``half`` (unpacked data only:
  packed segments never cross it)."""
  c0, w, k, o = seg
  if not c0 < half < c0 + w:
    return [seg]
  return [(c0, half - c0, k, o), (half, c0 + w - half, k, o + half - c0)]


@functools.partial(jax.jit, static_argnames=("k_spec", "v_spec", "interpret",
                                             "pages_per_split", "k_rope"))
def paged_attention(q: jax.Array, k_pages: Pages, v_pages: Pages, page_table: jax.Array,
                    kv_lens: jax.Array, k_spec: QuantSpec, v_spec: QuantSpec, *,
                    k_stage: Optional[jax.Array] = None, v_stage: Optional[jax.Array] = None,
                    k_sink: Optional[jax.Array] = None, v_sink: Optional[jax.Array] = None,
                    k_rope: float = 0.0, interpret: bool = False,
                    pages_per_split: Optional[int] = None) -> jax.Array:
  """Pallas paged decode attention, dequantization fused; as ``paged_attention_reference``.

  Grid ``(B, H, C)``: each program runs an online softmax over up to
  ``pages_per_split`` pages of one sequence for the G query heads of one kv
  head, reading packed codes and scales and never writing dequantized K/V to
  memory; the C = ceil(M / pages_per_split) partial results are merged after
  (flash-decoding: a long sequence spreads over many programs instead of one
  program walking all its pages, which left the GPU idle at small batch).
  Staged pages (a residual window or the partial page of a channel-axis spec)
  are read from ``k_stage``/``v_stage``, a sequence's first N tokens from
  ``k_sink``/``v_sink`` when given; keys stored before RoPE (``k_rope`` > 0,
  the base) are rotated tile by tile after dequantization.

  Args:
    as ``paged_attention_reference``; ``interpret`` runs the Pallas interpreter;
    ``pages_per_split`` (static) defaults to ``PAGES_PER_SPLIT``.

  Returns:
    float32 ``[B, Hq, D]``.

  >>> spec = QuantSpec(bits=8)
  >>> from kvjax.quant.pages import quantize_pages
  >>> k = quantize_pages(jnp.ones((1, 2, 1, 4)), spec)
  >>> out = paged_attention(jnp.ones((1, 1, 4)), k, k, jnp.zeros((1, 1), jnp.int32),
  ...                       jnp.array([2]), spec, spec, interpret=True)
  >>> out.shape, round(float(out[0, 0, 0]), 3)
  ((1, 1, 4), 1.0)
  """
  _check_args(q, k_pages, v_pages, page_table, kv_lens, k_spec, v_spec, k_stage, v_stage,
              "paged_attention", k_sink, v_sink)
  b, hq, d = q.shape
  p, s, h, _ = k_pages.data.shape
  for name, spec in (("k_spec", k_spec), ("v_spec", v_spec)):
    kq.check_kernel_spec(spec, d, s, f"paged_attention: {name}")
  g = hq // h
  gp = max(pl.next_power_of_2(g), 2)   # power-of-two query rows per block (Triton); pad
  num_stage = 0 if k_stage is None else k_stage.shape[1]   # no ring: all pages from the pool
  residual = residual_tokens(k_spec, v_spec)

  m_cols = page_table.shape[1]
  pps = PAGES_PER_SPLIT if pages_per_split is None else pages_per_split
  if not isinstance(pps, int) or pps < 1:
    raise ValueError(f"paged_attention: pages_per_split must be a positive int, got {pps!r}")
  pps = min(pps, max(m_cols, 1))
  c = -(-max(m_cols, 1) // pps)

  whole = lambda a: pl.BlockSpec(a.shape, lambda i, j, k: (0,) * a.ndim)  # noqa: E731
  head = lambda a: pl.BlockSpec((a.shape[0], a.shape[1], None, a.shape[3]),  # noqa: E731
                                lambda i, j, k: (0, 0, j, 0))
  qg = jnp.pad(q.reshape(b, h, g, d), ((0, 0), (0, 0), (0, gp - g), (0, 0)))
  ins = [qg, page_table.astype(jnp.int32), kv_lens.astype(jnp.int32)]
  specs = [pl.BlockSpec((None, None, gp, d), lambda i, j, k: (i, j, 0, 0)), whole(ins[1]),
           whole(ins[2])]
  for pages, spec in ((k_pages, k_spec), (v_pages, v_spec)):
    arrays = [pages.data] + ([pages.scale] if spec.is_quantized else []) + (
        [pages.zero] if spec.has_zero else [])
    ins += arrays
    specs += [head(a) for a in arrays]
  if num_stage:
    for st in (k_stage, v_stage):
      ins.append(st.astype(jnp.float32))
      specs.append(pl.BlockSpec((None, num_stage, s, None, d),
                                lambda i, j, k: (i, 0, 0, j, 0)))
  num_sink = 0 if k_sink is None else k_sink.shape[1]
  if num_sink:   # padded to a whole page: the kernel swaps rows of equal-shaped tiles
    for sk in (k_sink, v_sink):
      ins.append(jnp.pad(sk.astype(jnp.float32), ((0, 0), (0, s - num_sink), (0, 0), (0, 0))))
      specs.append(pl.BlockSpec((None, s, None, d), lambda i, j, k: (i, 0, j, 0)))
  if k_rope:
    ins.append(inv_freq(d, k_rope)[None, :])
    specs.append(pl.BlockSpec((1, d // 2), lambda i, j, k: (0, 0)))
  split_block = lambda w: pl.BlockSpec((None, None, None, gp, w),  # noqa: E731
                                       lambda i, j, k: (i, j, k, 0, 0))
  acc, m, l = pl.pallas_call(
      functools.partial(_attention_kernel, k_spec=k_spec, v_spec=v_spec, head_dim=d,
                        page_size=s, residual=residual, num_stage=num_stage,
                        pages_per_split=pps, num_sink=num_sink, k_rope=float(k_rope)),
      grid=(b, h, c),
      in_specs=specs,
      out_specs=[split_block(d), split_block(1), split_block(1)],
      out_shape=[jax.ShapeDtypeStruct((b, h, c, gp, w), jnp.float32) for w in (d, 1, 1)],
      interpret=interpret,
      compiler_params=kq.compiler_params(interpret),
      name=f"paged_attention_k{k_spec.bits}_v{v_spec.bits}",
  )(*ins)
  return merge_splits(acc, m, l)[:, :, :g].reshape(b, hq, d)


def merge_splits(acc: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
  """Normalized attention output from per-split partial softmax results.

  Args:
    acc: float32 ``[..., C, G, D]`` unnormalized outputs ``sum_t exp(s_t - m_c) v_t``.
    m / l: float32 ``[..., C, G, 1]`` each split's max score (-inf when it saw
      no token) and ``sum_t exp(s_t - m_c)``.

  Returns:
    float32 ``[..., G, D]`` (zero where no split saw a token; a split that saw
    none adds nothing, selected out whatever its buffers hold).

  >>> acc = jnp.array([[[2.0]], [[0.0]]]); m = jnp.array([[[0.0]], [[-jnp.inf]]])
  >>> merge_splits(acc, m, jnp.array([[[1.0]], [[0.0]]])).tolist()
  [[2.0]]
  """
  top = jnp.max(m, axis=-3, keepdims=True)
  w = jnp.exp(m - jnp.where(jnp.isfinite(top), top, 0.0))          # 0 for empty splits
  seen = m > -jnp.inf   # an empty split adds nothing, whatever its buffers hold (select)
  num = jnp.sum(jnp.where(seen, w * acc, 0.0), axis=-3)
  den = jnp.sum(jnp.where(seen, w * l, 0.0), axis=-3)
  return num / jnp.where(den > 0, den, 1.0)
