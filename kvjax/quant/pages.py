"""Quantize, dequantize and requantize whole pages, and write single tokens into them:
the pure-jnp reference the Pallas kernels are tested against.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from kvjax.layout.pages import Pages
from kvjax.layout.pages import scatter_rows
from kvjax.layout.shapes import page_shapes
from kvjax.layout.shapes import zero_storage_dtype
from kvjax.layout.spec import QuantSpec
from kvjax.quant.codecs import clip_values
from kvjax.quant.codecs import decode_scale
from kvjax.quant.codecs import decode_values
from kvjax.quant.codecs import encode_values
from kvjax.quant.codecs import group_params
from kvjax.quant.codecs import group_stats
from kvjax.quant.codecs import grouped
from kvjax.quant.codecs import pack_codes
from kvjax.quant.codecs import ungrouped
from kvjax.quant.codecs import unpack_codes

def quantize_pages(x: jax.Array, spec: QuantSpec) -> Pages:
  """Quantize full pages.

  Args:
    x: float ``[..., S, H, D]`` (any leading axes: layers, pages). For
      ``axis="channel"`` S must be the whole page (groups run along it); for
      ``axis="token"`` rows are independent and S may be any token count.
    spec: a quantized ``QuantSpec`` (bits=16 returns ``Pages(x)`` unchanged).

  Values beyond ``max_abs(spec)`` and ``+-inf`` are clipped to ``+-max_abs``,
  NaN is stored as 0 and counts as 0 in its group's statistics (``clip_values``,
  ``group_stats``): an outlier costs precision in its own group only.

  Returns:
    ``Pages(data, scale, zero)`` in the module's layout; ``zero`` is None for
    symmetric specs.

  >>> p = quantize_pages(jnp.ones((4, 1, 8)), QuantSpec(bits=4))
  >>> p.data.shape, p.scale.shape, p.zero
  ((4, 1, 4), (4, 1, 1), None)
  """
  if not spec.is_quantized:
    return Pages(data=x)
  g = spec.group(head_dim=x.shape[-1], page_size=x.shape[-3])
  check_divides(spec, g, x.shape)
  xg, ax = grouped(x.astype(jnp.float32), spec, g)
  # one clipped array for the statistics and the encoder: recomputed inside the
  # encoder's loop on XLA:CPU, the NaN select made per-channel quantize slower
  xg = jax.lax.optimization_barrier(clip_values(xg, spec))
  enc, s, z = group_params(*group_stats(xg, ax, spec), spec)
  codes = encode_values(xg, jnp.expand_dims(s, ax),
                        None if z is None else jnp.expand_dims(z, ax), spec)
  codes = ungrouped(codes, x.shape)
  if spec.kind == "fp8":
    return Pages(data=codes, scale=enc)
  return Pages(data=pack_codes(codes, spec.bits), scale=enc,
                zero=None if z is None else z.astype(zero_storage_dtype(spec)))


def check_divides(spec: QuantSpec, g: int, shape) -> None:
  d, s = shape[-1], shape[-3]
  if d % spec.codes_per_byte:
    raise ValueError(f"head_dim={d} is not a multiple of {spec.codes_per_byte} codes per byte")
  extent = d if spec.axis == "token" else s
  if extent % g:
    raise ValueError(f"group_size={g} does not divide the {spec.axis} group axis "
                     f"(size {extent}) of shape {tuple(shape)}")


def dequantize_pages(pages: Pages, spec: QuantSpec) -> jax.Array:
  """float32 ``[..., S, H, D]`` from ``Pages`` made by ``quantize_pages``.

  >>> x = jnp.arange(8.0).reshape(1, 1, 8)
  >>> spec = QuantSpec(bits=8, symmetric=False)
  >>> float(jnp.max(jnp.abs(dequantize_pages(quantize_pages(x, spec), spec) - x))) < 0.02
  True
  """
  if not spec.is_quantized:
    return pages.data.astype(jnp.float32)
  if spec.kind == "fp8":
    vals = pages.data.astype(jnp.float32)
  else:
    vals = unpack_codes(pages.data, spec.bits).astype(jnp.float32)
  shape = vals.shape
  g = spec.group(head_dim=shape[-1], page_size=shape[-3])
  vg, ax = grouped(vals, spec, g)
  s = jnp.expand_dims(decode_scale(pages.scale, spec.scale_dtype), ax)
  z = None if pages.zero is None else jnp.expand_dims(pages.zero, ax)
  return ungrouped(decode_values(vg, s, z, spec), shape)


def requantize(pages: Pages, from_spec: QuantSpec, to_spec: QuantSpec) -> Pages:
  """Pages re-encoded from one spec to another (e.g. demotion to a colder tier).

  Args:
    pages: ``Pages`` of full pages ``[..., S, H, *]`` in ``from_spec``'s layout.

  >>> x = jnp.ones((4, 1, 8))
  >>> p = requantize(quantize_pages(x, QuantSpec(bits=8)), QuantSpec(bits=8), QuantSpec(bits=2))
  >>> p.data.shape
  (4, 1, 2)
  """
  if from_spec == to_spec:
    return pages
  return quantize_pages(dequantize_pages(pages, from_spec), to_spec)


def quantize_tokens(x: jax.Array, spec: QuantSpec) -> Pages:
  """Per-token quantization of new tokens ``[T, H, D]`` for a direct write.

  Only for ``axis="token"`` specs (each row has its own scales): the result's
  row ``t`` is stored at the token's slot, ``data[page, slot] = out.data[t]``
  and the same for ``scale``/``zero``. Channel-axis specs need the whole page:
  stage the tokens in full precision and ``fold_page`` when the page fills.

  >>> quantize_tokens(jnp.ones((3, 2, 8)), QuantSpec(bits=4)).scale.shape
  (3, 2, 1)
  """
  if spec.is_quantized and spec.axis != "token":
    raise ValueError(f"quantize_tokens: spec.axis must be 'token', got {spec.axis!r}; "
                     f"channel-axis pages are quantized whole by fold_page")
  return quantize_pages(x, spec)


def fold_page(page: jax.Array, spec: QuantSpec) -> Pages:
  """Quantize one full page (or a batch of them) held in full precision.

  Args:
    page: float ``[..., S, H, D]``: the staged page(s) once all S tokens are
      written (and, with a residual window, once ``residual`` newer tokens exist).

  Returns:
    ``Pages`` to store at the page's id with ``store_pages``.

  >>> fold_page(jnp.ones((2, 4, 1, 8)), QuantSpec(bits=4, axis="channel")).scale.shape
  (2, 1, 1, 8)
  """
  return quantize_pages(page, spec)



def init_quant_pages(spec: QuantSpec, **shape_kwargs) -> Pages:
  """Zero pages stored in ``spec`` (arguments as ``page_shapes``).

  >>> init_quant_pages(QuantSpec(bits=2, symmetric=False), num_pages=2, page_size=4,
  ...                  num_kv_heads=1, head_dim=8).zero.shape
  (2, 4, 1, 1)
  """
  shapes = page_shapes(spec, **shape_kwargs)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def copy_pages(pool: Pages, src: jax.Array, dst: jax.Array) -> Pages:
  """Copy whole pages (data, scale, zero) from ``src`` to ``dst`` ids (copy on write).

  Args:
    pool: ``Pages`` with arrays ``[P, ...]``.
    src / dst: int32 ``[N]``; pairs with ``dst < 0`` are skipped.

  >>> pool = quantize_pages(jnp.arange(16.0).reshape(2, 2, 1, 4), QuantSpec(bits=8))
  >>> out = copy_pages(pool, jnp.array([1]), jnp.array([0]))
  >>> bool((out.data[0] == pool.data[1]).all())
  True
  """
  taken = jax.tree.map(lambda a: a[jnp.clip(src, 0, a.shape[0] - 1)], pool)
  return store_pages(pool, dst, taken)


def store_pages(pool: Pages, page_ids: jax.Array, new: Pages) -> Pages:
  """Scatter whole pages into a pool (one layer, or all with matching leading axes).

  Args:
    pool: ``Pages`` with arrays ``[P, ...]``.
    page_ids: int32 ``[N]`` page ids; out-of-range ids (e.g. -1) are dropped.
    new: ``Pages`` with arrays ``[N, ...]`` in the pool's spec.

  >>> pool = init_quant_pages(QuantSpec(bits=8), num_pages=3, page_size=2,
  ...                         num_kv_heads=1, head_dim=4)
  >>> new = quantize_pages(jnp.ones((2, 2, 1, 4)), QuantSpec(bits=8))
  >>> out = store_pages(pool, jnp.array([1, -1]), new)
  >>> int(out.data[0].max()), int(out.data[1].min()) > 0
  (0, True)
  """
  ids = jnp.where(page_ids < 0, pool.data.shape[0], page_ids)
  put = lambda a, b: None if a is None else scatter_rows(a, ids, b)  # noqa
  # replace: a cache's Pages keep their static spec and staging ring
  return pool.replace(data=put(pool.data, new.data), scale=put(pool.scale, new.scale),
                      zero=put(pool.zero, new.zero))



# ----------------------------------------------------------------------------- writes


def write_tokens(pool: Pages, slots: jax.Array, x: jax.Array, spec: QuantSpec) -> Pages:
  """Quantize new tokens and scatter them into their slots (token-axis specs).

  Args:
    pool: one layer's ``Pages``, arrays ``[P, S, H, *]``.
    slots: int32 ``[N]`` flat slots ``page * S + offset``; out of range (-1) dropped.
    x: float ``[N, H, D]`` the tokens' K or V.
    spec: the pool's spec; ``axis="token"`` or unquantized.

  >>> spec = QuantSpec(bits=4)
  >>> pool = init_quant_pages(spec, num_pages=2, page_size=2, num_kv_heads=1, head_dim=8)
  >>> out = write_tokens(pool, jnp.array([3, -1]), jnp.full((2, 1, 8), 7.0), spec)
  >>> float(dequantize_pages(out, spec)[1, 1, 0, 0])
  7.0
  """
  new = quantize_tokens(x, spec)
  p, s = pool.data.shape[:2]
  idx = jnp.where((slots < 0) | (slots >= p * s), p * s, slots)

  def put(a, b):
    if a is None:
      return None
    flat = a.reshape(p * s, *a.shape[2:])
    return scatter_rows(flat, idx, b).reshape(a.shape)

  return pool.replace(data=put(pool.data, new.data), scale=put(pool.scale, new.scale),
                      zero=put(pool.zero, new.zero))


