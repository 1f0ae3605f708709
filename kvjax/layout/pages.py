"""``Pages``: one of K or V as stored (codes, scales, zeros, staging ring, sink), and
one-layer views of it.

The bottom of the package: the quantization codecs, the kernels and the cache
all read a layout from a ``Pages``. Names in shapes: L = num_layers, P =
num_pages, S = page_size, H = num_kv_heads, D = head_dim, B = max_seqs.

>>> import jax.numpy as jnp
>>> p = Pages(data=jnp.zeros((2, 4, 1, 8)))
>>> head_dim_of(p), p.spec.is_quantized
(8, False)
"""

from __future__ import annotations

from typing import Optional

from flax import struct
import jax
import jax.numpy as jnp

from kvjax.layout.spec import QuantSpec


@struct.dataclass
class Pages:
  """One of K or V for all layers of one tier, with how it is stored.

  ``spec`` and ``residual`` are static (part of the tree structure, not
  arrays): ``write`` and ``attend`` read the layout from the pages they are
  given. A cache whose specs need staging (a channel-axis spec or a residual
  window, ``needs_staging``) also holds each sequence's newest pages in
  full precision in ``stage``, a ring of ``NS = staging_pages(...)``
  pages per sequence slot; page ``j`` of a sequence lives in ring slot
  ``j % NS`` until it is folded (quantized) into its pool page. A spec with a
  ``sink`` also keeps each sequence's first N tokens in ``sink`` (attention
  reads them from there; the pool page holds them quantized too, for
  sharing). Shapes below are for all layers; the layer scan sees them
  without the leading L.

  ``written`` and ``ring_before`` are never part of a cache: ``write`` sets
  them on the one layer's pages it returns for a prefill chunk (T > 1) through
  a staging ring, so that ``attend`` on those pages keeps attention causal
  (each query sees what a decode step at its position would; the pages that
  fold during the chunk are lost from the ring otherwise). ``as_stored`` drops
  them; ``with_layer_pages`` and ``write_attend`` do so for you.
  """

  data: jax.Array                    # [L, P, S, H, D] config dtype; uint8 [L, P, S, H, D/n]
  #                                    packed codes (n per byte) or float8_e4m3fn when quantized
  scale: Optional[jax.Array] = None  # [L, P, S, H, D/g] ("token") or [L, P, S/g, H, D]
  #                                    ("channel"), bf16/f16 or uint8 log8; None when unquantized
  zero: Optional[jax.Array] = None   # int8, scale's shape; asymmetric specs only, else None
  stage: Optional[jax.Array] = None  # [L, B, NS, S, H, D] config dtype: full-precision ring of
  #                                    each sequence slot's unfolded pages; None without staging
  sink: Optional[jax.Array] = None   # [L, B, N, H, D] config dtype: each sequence slot's first
  #                                    N tokens in full precision (``sink_tokens``); None if N=0
  spec: QuantSpec = struct.field(pytree_node=False, default=QuantSpec())  # static: the layout
  residual: int = struct.field(pytree_node=False, default=0)  # static: the cache's window
  #                                    (tokens, max of the K and V specs'), same on K and V
  rope_base: float = struct.field(pytree_node=False, default=0.0)  # static: > 0 on keys stored
  #                                    before RoPE (``CacheConfig.key_rope``); attend rotates them
  written: Optional[jax.Array] = None  # [B, T, H, D] ring dtype: the step's new tokens of the
  #                                    plan's rows, as ``write`` staged them (one layer, T > 1,
  #                                    staging only); None in a cache
  ring_before: Optional[jax.Array] = None  # [B, NS, S, H, D] ring dtype: the plan rows' ring
  #                                    before that ``write``; None in a cache


def head_dim_of(pages: Pages) -> int:
  """D of one layer's pages (the data's last axis is D / codes per byte when packed)."""
  spec = pages.spec
  if spec.is_quantized and spec.kind == "int":
    return pages.data.shape[-1] * spec.codes_per_byte
  return pages.data.shape[-1]


def pool_only(pages: Pages) -> Pages:
  """The pages without their staging ring and sink rows (what the quant/kernel functions take)."""
  if pages.stage is None and pages.sink is None and pages.written is None:
    return pages
  return pages.replace(stage=None, sink=None, written=None, ring_before=None)


def as_stored(pages: Pages) -> Pages:
  """The pages as a cache stores them: without the step fields ``write`` attaches.

  >>> p = Pages(data=jnp.zeros((2, 4, 1, 8)), written=jnp.zeros((1, 2, 1, 8)))
  >>> as_stored(p).written is None
  True
  """
  if pages.written is None and pages.ring_before is None:
    return pages
  return pages.replace(written=None, ring_before=None)


def layer_of(pages: Pages, i) -> Pages:
  """Layer ``i`` of all-layer pages: every array without its leading L axis.

  Args:
    pages: ``Pages`` with arrays ``[L, P, S, H, *]`` (a cache's ``k`` or ``v``).
    i: int or int32 scalar (may be traced), ``0 <= i < L``.

  >>> p = Pages(data=jnp.arange(6.0).reshape(3, 1, 1, 1, 2))
  >>> layer_of(p, 1).data.tolist()
  [[[[2.0, 3.0]]]]
  """
  if pages.data.ndim != 5:
    raise ValueError(f"layer_of: pages must hold all layers [L, P, S, H, D], got data shape "
                     f"{tuple(pages.data.shape)}")
  return jax.tree.map(lambda a: a[i], as_stored(pages))


def with_layer(pages: Pages, i, layer: Pages) -> Pages:
  """All-layer ``pages`` with layer ``i`` replaced by the one-layer ``layer``.

  ``layer`` must have the layout of ``pages`` (spec, window, ring and sink
  present or not) and one layer's shapes; its step fields (``as_stored``) are
  dropped.

  >>> p = Pages(data=jnp.zeros((2, 1, 1, 1, 2)))
  >>> with_layer(p, 1, Pages(data=jnp.ones((1, 1, 1, 2)))).data[:, 0, 0, 0, 0].tolist()
  [0.0, 1.0]
  """
  check_layer("layer", layer)
  layer = as_stored(layer)
  _check_fits("with_layer", "layer", layer, jax.eval_shape(layer_of, pages, 0))
  return jax.tree.map(lambda all_, one: all_.at[i].set(one), pages, layer)


def scatter_rows(a: jax.Array, idx: jax.Array, values: jax.Array) -> jax.Array:
  """``a.at[idx].set(values, mode="drop")`` that stays an in-place scatter.

  XLA rewrites a scatter of one update into a dynamic-update-slice plus a
  select over the whole of ``a`` (to keep out-of-range updates dropped): a
  copy of the pool per layer and step, where a scatter writes one row. A
  second update that is always dropped keeps it a scatter.

  Args:
    a: ``[N, ...]``; idx: int ``[K]`` rows (``>= N``: dropped; a negative id wraps as
      in NumPy, so callers write "none" as ``N``);
    values: ``[K, ...]`` (cast to ``a``'s dtype).

  >>> scatter_rows(jnp.zeros((3, 2)), jnp.array([1]), jnp.ones((1, 2))).tolist()
  [[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]
  """
  idx = jnp.asarray(idx).reshape(-1)
  values = values.astype(a.dtype)
  if idx.shape[0] == 1:
    idx = jnp.concatenate([idx, jnp.full((1,), a.shape[0], idx.dtype)])
    values = jnp.concatenate([values, values])
  plain = lambda a, idx, values: a.at[idx].set(values, mode="drop")  # noqa: E731
  if not jnp.issubdtype(a.dtype, jnp.floating) or a.dtype.itemsize not in _BITS:
    return plain(a, idx, values)
  return jax.lax.platform_dependent(a, idx, values, cpu=_scatter_bits, default=plain)


def _scatter_bits(a, idx, values):
  """``scatter_rows`` of a bfloat16 / float16 / fp8 ``a`` as the unsigned ints of its bits.

  XLA:CPU has no scatter in those dtypes: it upcasts the scatter to float32 through the
  whole of ``a`` and back (a pool: every layer, every step; measured, SmolLM2, batch 4, 256
  bfloat16 pages: 2.1 s per decode step, against 0.07 s with float32 pages, and growing with
  the pool). A set only moves bits, so scattering them is exact; it still copies ``a`` into
  and out of its bits (0.67 s there), which is why float32 pages stay the CPU default.
  """
  cast, bits = jax.lax.bitcast_convert_type, _BITS[a.dtype.itemsize]
  return cast(cast(a, bits).at[idx].set(cast(values, bits), mode="drop"), a.dtype)


_BITS = {1: jnp.uint8, 2: jnp.uint16}   # itemsize -> the unsigned int a narrow float's bits fit


_POOL_FIELDS = ("data", "scale", "zero")   # page-axis arrays
_ROW_FIELDS = ("stage", "sink")             # per sequence slot


def flat_layer(pages: Pages, i) -> Pages:
  """Layer ``i``'s in-place view of all-layer pages: the pool with L folded into P.

  The pool arrays (``data``, ``scale``, ``zero``) are reshaped, not copied, to
  ``[L * P, S, H, *]`` (page ``p`` of layer ``i`` is flat page ``i * P + p``);
  the ring and sink rows are layer ``i``'s. ``write`` / ``attend`` take it as
  one layer's pages when the plan's page ids are offset to layer ``i``
  (``kvjax.cache.plan.layer_plan``): a write then scatters only its new slots
  into the whole pool, and attention gathers only the pages it reads, where
  ``layer_of`` + ``with_layer`` copy a whole layer each way. Put it back with
  ``with_flat_layer``.

  Args:
    pages: ``Pages`` with arrays ``[L, P, S, H, *]`` (a cache's ``k`` or ``v``).
    i: int or int32 scalar (may be traced), ``0 <= i < L``.

  >>> p = Pages(data=jnp.arange(12.0).reshape(3, 2, 1, 1, 2))
  >>> v = flat_layer(p, 1)
  >>> v.data.shape, v.data[2 * 1 + 1].tolist()    # layer 1, page 1
  ((6, 1, 1, 2), [[[6.0, 7.0]]])
  """
  if pages.data.ndim != 5:
    raise ValueError(f"flat_layer: pages must hold all layers [L, P, S, H, D], got data shape "
                     f"{tuple(pages.data.shape)}")
  pages = as_stored(pages)
  flat = {f: _fold(getattr(pages, f)) for f in _POOL_FIELDS}
  rows = {f: None if getattr(pages, f) is None else getattr(pages, f)[i] for f in _ROW_FIELDS}
  return pages.replace(**flat, **rows)


def with_flat_layer(pages: Pages, i, view: Pages) -> Pages:
  """All-layer ``pages`` updated from layer ``i``'s ``flat_layer`` view (after ``write``).

  The pool arrays are the view's, unfolded back to ``[L, P, ...]``; layer
  ``i``'s ring and sink rows are set from the view's. Step fields are dropped.

  >>> p = Pages(data=jnp.zeros((2, 2, 1, 1, 2)))
  >>> v = flat_layer(p, 1)
  >>> v = v.replace(data=v.data.at[3].set(1.0))   # layer 1, page 1
  >>> with_flat_layer(p, 1, v).data[:, :, 0, 0, 0].tolist()
  [[0.0, 0.0], [0.0, 1.0]]
  """
  view = as_stored(view)
  _check_fits("with_flat_layer", "view", view, jax.eval_shape(flat_layer, pages, 0))
  l_, p_ = pages.data.shape[:2]
  pool = {f: _unfold(getattr(view, f), l_, p_) for f in _POOL_FIELDS}
  rows = {f: None if getattr(pages, f) is None else getattr(pages, f).at[i].set(getattr(view, f))
          for f in _ROW_FIELDS}
  return pages.replace(**pool, **rows)


def _fold(a: Optional[jax.Array]) -> Optional[jax.Array]:
  return None if a is None else a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])


def _unfold(a: Optional[jax.Array], l_: int, p_: int) -> Optional[jax.Array]:
  return None if a is None else a.reshape(l_, p_, *a.shape[1:])


def _check_fits(fn: str, name: str, got: Pages, ref) -> None:
  """ValueError unless ``got`` has ``ref``'s layout and every array's shape and dtype.

  ``ref``: the ``Pages`` expected, or its ``jax.eval_shape`` (nothing computed).
  """
  if jax.tree.structure(got) != jax.tree.structure(ref):
    raise ValueError(f"{fn}: {name}'s layout (spec, residual, rope_base, ring/sink/scale "
                     "present) differs from the pages'")
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    if a.shape != b.shape or a.dtype != b.dtype:
      raise ValueError(f"{fn}: {name} array {a.dtype}{list(a.shape)} does not fit the "
                       f"pages' {b.dtype}{list(b.shape)}")


def check_layer(name: str, pages: Pages) -> None:
  if not isinstance(pages, Pages):
    raise ValueError(f"{name} must be a kvjax.Pages of one layer, got {type(pages).__name__}")
  if pages.data.ndim != 4:
    raise ValueError(f"{name}.data must be one layer's pages [P, S, H, D], got shape "
                     f"{tuple(pages.data.shape)}")
  if pages.stage is not None and pages.stage.ndim != 5:
    raise ValueError(f"{name}.stage must be one layer's ring [B, NS, S, H, D], got shape "
                     f"{tuple(pages.stage.shape)}")
  if pages.sink is not None and pages.sink.ndim != 4:
    raise ValueError(f"{name}.sink must be one layer's sink rows [B, N, H, D], got shape "
                     f"{tuple(pages.sink.shape)}")
  if pages.written is not None and pages.written.ndim != 4:
    raise ValueError(f"{name}.written must be one step's tokens [B, T, H, D], got shape "
                     f"{tuple(pages.written.shape)}")
  if (pages.written is None) != (pages.ring_before is None):
    raise ValueError(f"{name}: written and ring_before are set together (by write) or not at all")
