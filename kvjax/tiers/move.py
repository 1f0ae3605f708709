"""Jitted page moves between the tiers: L1 -> L2 (``demote_pages``) and back (``promote_pages``).

Each moves whole pages of all layers, re-encoding from the source's spec to the
destination's (``kvjax.quant``); an unquantized pair is a plain copy (bit-exact).
Page id lists are padded to a power of two (``pad_ids``) so a few shapes compile.

>>> import jax.numpy as jnp
>>> pad_ids(jnp.array([3]), 9).tolist()
[3, 9, 9, 9, 9, 9, 9, 9]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.layout.pages import Pages
from kvjax.quant.pages import dequantize_pages
from kvjax.quant.pages import quantize_pages


def pow2_at_least(n: int, minimum: int) -> int:
  """The next power of two >= ``n``, at least ``minimum``: padded sizes, few compiles.

  >>> pow2_at_least(33, 8), pow2_at_least(3, 8)
  (64, 8)
  """
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def pad_ids(ids, fill: int, minimum: int = 8) -> jax.Array:
  """int32 [N']: ``ids`` padded with ``fill`` to the next power of two >= ``minimum``."""
  ids = np.asarray(ids, np.int32).reshape(-1)
  n = pow2_at_least(len(ids), minimum)
  out = np.full((n,), fill, np.int32)
  out[:len(ids)] = ids
  return jax.device_put(out)


def take_pages(pool: Pages, ids: jax.Array) -> Pages:
  """The pages ``ids`` (int32 [N], clipped) of a ``[L, P, ...]`` pool, as ``[L, N, ...]``."""
  p_ = pool.data.shape[1]
  safe = jnp.clip(ids, 0, p_ - 1)

  def pick(a):
    return None if a is None else a[:, safe]
  return Pages(data=pick(pool.data), scale=pick(pool.scale), zero=pick(pool.zero),
               spec=pool.spec)


def put_pages(pool: Pages, ids: jax.Array, new: Pages) -> Pages:
  """``pool`` with pages ``ids`` (int32 [N]; >= P dropped) set to ``new`` ([L, N, ...])."""
  def put(a, b):
    return None if a is None else a.at[:, ids].set(b.astype(a.dtype), mode="drop")
  return pool.replace(data=put(pool.data, new.data), scale=put(pool.scale, new.scale),
                      zero=put(pool.zero, new.zero))


def recode(pages: Pages, to_spec) -> Pages:
  """``pages`` re-encoded into ``to_spec`` (unchanged when the specs are equal)."""
  if pages.spec == to_spec:
    return pages
  return quantize_pages(dequantize_pages(pages, pages.spec), to_spec)


def _move_pages(src_k: Pages, src_v: Pages, dst_k: Pages, dst_v: Pages, src: jax.Array,
                dst: jax.Array) -> tuple[Pages, Pages]:
  """Copy pages ``src`` of one pool into pages ``dst`` of another (K and V, all layers).

  Args:
    src_k, src_v: source pools, arrays ``[L, P_src, S, H, *]``.
    dst_k, dst_v: destination pools ``[L, P_dst, S, H, *]`` (their own specs).
    src, dst: int32 [N]; pairs with ``dst >= P_dst`` are skipped.

  Returns:
    ``(dst_k, dst_v)`` updated.
  """
  k = recode(take_pages(src_k, src), dst_k.spec)
  v = recode(take_pages(src_v, src), dst_v.spec)
  return put_pages(dst_k, dst, k), put_pages(dst_v, dst, v)


move_pages = jax.jit(_move_pages)
# The destination pools donated: updated in place, not copied whole (the SmolLM2 demo's
# 189 MB L1 or L2 pools: a copy per move). For a caller that drops its old pools.
_move_pages_donated = jax.jit(_move_pages, donate_argnames=("dst_k", "dst_v"))


def move_into(src_k: Pages, src_v: Pages, dst_k: Pages, dst_v: Pages, src: jax.Array,
              dst: jax.Array, *, donate: bool = False) -> tuple[Pages, Pages]:
  """``move_pages``; with ``donate`` the destination pools' buffers are updated in place
  (``dst_k`` / ``dst_v`` are invalid afterwards: use the returned pools).

  >>> import jax.numpy as jnp
  >>> a, b = Pages(data=jnp.ones((1, 2, 1, 1, 1))), Pages(data=jnp.zeros((1, 2, 1, 1, 1)))
  >>> k, _ = move_into(a, a, b, Pages(data=jnp.zeros((1, 2, 1, 1, 1))), jnp.array([0]),
  ...                  jnp.array([1]), donate=True)
  >>> k.data.reshape(-1).tolist(), b.data.is_deleted()
  ([0.0, 1.0], True)
  """
  return (_move_pages_donated if donate else move_pages)(src_k, src_v, dst_k, dst_v, src, dst)


def page_bytes(pool: Pages) -> int:
  """Bytes of one page of ``pool`` across layers (data, scale, zero)."""
  arrays = [a for a in (pool.data, pool.scale, pool.zero) if a is not None]
  return int(sum(a.nbytes // a.shape[1] for a in arrays))


def keep_placement(new, old):
  """``new`` (a pytree of arrays) placed like ``old`` (same structure) where they differ.

  A jitted move returns the destination pool where the compiler put it; a pool placed
  by ``kvjax.tiers.placement`` (sharded, or in pinned host memory) is put back there.

  >>> import jax.numpy as jnp
  >>> keep_placement(jnp.ones(2), jnp.zeros(2)).tolist()
  [1.0, 1.0]
  """
  def put(n, o):
    if n is None or o is None or getattr(o, "sharding", None) is None:
      return n
    return n if n.sharding == o.sharding else jax.device_put(n, o.sharding)
  return jax.tree_util.tree_map(put, new, old)
