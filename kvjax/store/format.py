"""``PageFormat``: what one page of a cache is in the store, and how a batch of pages
packs into one byte row per page (the store's chunk) and back.

A page is the pool arrays of one page across layers, K then V, each as stored
in its ``QuantSpec`` (codes, scales and zeros as they are, nothing
requantized): fields ``k_data``, ``k_scale``, ``k_zero``, ``v_data``, ... of
per-page shape ``[L, S, H, *]``, the ones the specs have. Names in shapes:
n = pages in a batch, L = num_layers, S = page_size, H = num_kv_heads.

>>> from kvjax.layout import PRESETS
>>> fmt = PageFormat.for_specs(*PRESETS["int8"], num_layers=2, page_size=4, num_kv_heads=1,
...                            head_dim=8)
>>> [f.name for f in fmt.fields], fmt.page_bytes
(['k_data', 'k_scale', 'v_data', 'v_scale'], 160)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.layout.pages import Pages
from kvjax.layout.shapes import page_shapes
from kvjax.layout.spec import QuantSpec

POOL_FIELDS = ("data", "scale", "zero")   # the page-axis arrays of a ``Pages``


@dataclasses.dataclass(frozen=True)
class Field:
  """One array of a page: ``name`` (e.g. ``"k_scale"``), per-page ``shape``, numpy ``dtype`` name."""

  name: str
  shape: tuple
  dtype: str

  @functools.cached_property
  def nbytes(self) -> int:
    return int(np.prod(self.shape)) * jnp.dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class PageFormat:
  """The fields of one page and the specs they are stored in (static, host side).

  Build it with ``from_pages`` (from a cache's ``k`` / ``v``) or ``for_specs``.
  """

  fields: tuple          # of Field, K's then V's, in POOL_FIELDS order
  key_spec: QuantSpec
  value_spec: QuantSpec
  page_size: int

  @classmethod
  def from_pages(cls, k: Pages, v: Pages) -> "PageFormat":
    """The format of one page of all-layer pools ``k``, ``v`` (arrays ``[L, P, S, H, *]``).

    >>> p = Pages(data=jnp.zeros((2, 5, 4, 1, 8), jnp.bfloat16))
    >>> PageFormat.from_pages(p, p).fields[0]
    Field(name='k_data', shape=(2, 4, 1, 8), dtype='bfloat16')
    """
    fields = []
    for side, pages in (("k", k), ("v", v)):
      if not isinstance(pages, Pages) or pages.data.ndim != 5:
        raise ValueError(f"PageFormat.from_pages: {side} must be all-layer kvjax.Pages "
                         f"[L, P, S, H, *], got {type(pages).__name__}")
      for f in POOL_FIELDS:
        a = getattr(pages, f)
        if a is not None:
          fields.append(Field(f"{side}_{f}", (a.shape[0],) + tuple(a.shape[2:]),
                              jnp.dtype(a.dtype).name))
    return cls(tuple(fields), k.spec, v.spec, int(k.data.shape[2]))

  @classmethod
  def for_specs(cls, key_spec: QuantSpec, value_spec: QuantSpec, *, num_layers: int,
                page_size: int, num_kv_heads: int, head_dim: int,
                dtype="bfloat16") -> "PageFormat":
    """The format of a page stored in ``key_spec`` / ``value_spec`` at these dimensions."""
    dims = dict(num_pages=1, page_size=page_size, num_kv_heads=num_kv_heads,
                head_dim=head_dim, dtype=dtype, num_layers=num_layers)
    k = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), page_shapes(key_spec, **dims))
    v = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), page_shapes(value_spec, **dims))
    return cls.from_pages(k.replace(spec=key_spec), v.replace(spec=value_spec))

  @functools.cached_property
  def page_bytes(self) -> int:
    """Bytes of one packed page (every field's bytes, no padding)."""
    return sum(f.nbytes for f in self.fields)

  def check(self, arrays: Mapping[str, np.ndarray], name: str = "arrays") -> int:
    """n, the batch size of ``arrays`` ({field: [n, *field.shape]}); ValueError if they do not fit."""
    if not isinstance(arrays, Mapping) or set(arrays) != {f.name for f in self.fields}:
      got = sorted(arrays) if isinstance(arrays, Mapping) else type(arrays).__name__
      raise ValueError(f"{name} must map exactly the fields {[f.name for f in self.fields]}, "
                       f"got {got}")
    n = None
    for f in self.fields:
      a = arrays[f.name]
      if tuple(a.shape[1:]) != f.shape or jnp.dtype(a.dtype).name != f.dtype:
        raise ValueError(f"{name}[{f.name!r}] must be {f.dtype}[n, {', '.join(map(str, f.shape))}],"
                         f" got {jnp.dtype(a.dtype).name}{list(a.shape)}")
      if n is not None and a.shape[0] != n:
        raise ValueError(f"{name}: fields hold different numbers of pages ({n} and "
                         f"{a.shape[0]} in {f.name!r})")
      n = a.shape[0]
    return int(n)

  def pack(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """uint8 ``[n, page_bytes]``: each page's fields' bytes, in field order.

    >>> fmt = PageFormat.for_specs(QuantSpec(), QuantSpec(), num_layers=1, page_size=1,
    ...                            num_kv_heads=1, head_dim=2)
    >>> a = {f.name: np.ones((3, *f.shape), f.dtype) for f in fmt.fields}
    >>> fmt.pack(a).shape
    (3, 8)
    """
    n = self.check(arrays)
    if n == 0:
      return np.zeros((0, self.page_bytes), np.uint8)
    rows = np.empty((n, self.page_bytes), np.uint8)
    at = 0
    for f in self.fields:   # one copy per field, straight into its columns
      a = np.asarray(arrays[f.name]).reshape(n, -1)
      rows[:, at:at + f.nbytes] = (a if a.strides[1] == a.itemsize
                                   else np.ascontiguousarray(a)).view(np.uint8)
      at += f.nbytes
    return rows

  def parts(self, arrays: Mapping[str, np.ndarray]) -> list:
    """Each page's bytes as ``pack`` lays them out, without packing: ``[n][fields]`` uint8
    views (a copy only of a page whose field is not contiguous within the page).

    >>> fmt = PageFormat.for_specs(QuantSpec(), QuantSpec(), num_layers=1, page_size=1,
    ...                            num_kv_heads=1, head_dim=2)
    >>> a = {f.name: np.ones((3, *f.shape), f.dtype) for f in fmt.fields}
    >>> b"".join(bytes(p) for p in fmt.parts(a)[1]) == fmt.pack(a)[1].tobytes()
    True
    """
    n = self.check(arrays)
    if n == 0:
      return []
    cols = [np.asarray(arrays[f.name]).reshape(n, -1) for f in self.fields]
    return [[np.ascontiguousarray(c[i]).view(np.uint8) for c in cols] for i in range(n)]

  def unpack(self, rows: np.ndarray) -> dict:
    """{field: [n, *shape]} from packed rows uint8 ``[n, page_bytes]`` (``pack``'s inverse).

    The arrays are views into ``rows`` (no copy): strided on the page axis,
    contiguous within a page.
    """
    rows = np.asarray(rows)
    if rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != self.page_bytes:
      raise ValueError(f"rows must be uint8 [n, {self.page_bytes}], got {rows.dtype}"
                       f"{list(rows.shape)}")
    if rows.strides[1] != 1:
      rows = np.ascontiguousarray(rows)
    out, at = {}, 0
    for f in self.fields:
      col = rows[:, at:at + f.nbytes]      # contiguous within a row: view and split, no copy
      out[f.name] = col.view(jnp.dtype(f.dtype)).reshape(rows.shape[0], *f.shape)
      at += f.nbytes
    return out

  def to_json(self) -> dict:
    """A JSON-able description (saved with the store; a store reopens only in its format)."""
    def spec(s):
      return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(s).items()}
    return {"fields": [[f.name, list(f.shape), f.dtype] for f in self.fields],
            "key_spec": spec(self.key_spec), "value_spec": spec(self.value_spec),
            "page_size": self.page_size}

  @classmethod
  def from_json(cls, d: dict) -> "PageFormat":
    """``to_json``'s inverse.

    >>> fmt = PageFormat.for_specs(QuantSpec(bits=4), QuantSpec(), num_layers=1, page_size=2,
    ...                            num_kv_heads=1, head_dim=4)
    >>> PageFormat.from_json(fmt.to_json()) == fmt
    True
    """
    def spec(s):
      s = dict(s)
      if s.get("levels") is not None:
        s["levels"] = tuple(s["levels"])
      return QuantSpec(**s)
    fields = tuple(Field(n, tuple(s), t) for n, s, t in d["fields"])
    return cls(fields, spec(d["key_spec"]), spec(d["value_spec"]), int(d["page_size"]))


def page_arrays(k: Pages, v: Pages, page_ids: Sequence[int]) -> dict:
  """The arrays of pages ``page_ids`` of all-layer pools ``k``, ``v``, on the host.

  Args:
    k, v: a cache's ``Pages`` (arrays ``[L, P, S, H, *]``).
    page_ids: int ``[n]`` page numbers.

  Returns:
    {field: numpy ``[n, L, S, H, *]``} in ``PageFormat.from_pages(k, v)``.

  >>> p = Pages(data=jnp.arange(8.0).reshape(1, 4, 1, 1, 2))
  >>> page_arrays(p, p, [2])["v_data"].tolist()
  [[[[[4.0, 5.0]]]]]
  """
  ids = np.asarray(page_ids, np.int64).reshape(-1)
  out = {}
  for side, pages in (("k", k), ("v", v)):
    for f in POOL_FIELDS:
      a: Optional[jax.Array] = getattr(pages, f)
      if a is not None:
        out[f"{side}_{f}"] = np.moveaxis(np.asarray(a)[:, ids], 1, 0)
  return out
