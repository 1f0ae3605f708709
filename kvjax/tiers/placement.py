"""Where L2 lives: its page axis sharded over a named mesh axis, in host memory when it can.

``l2_shardings(config, tiers, mesh)`` is an ``L2State``-shaped pytree of
``NamedSharding``: the K/V payload arrays (``[L, P2, ...]``: data, scales, zero points)
are split along P2 over the mesh axis ``tiers.mesh_axis``, in memory kind
``l2_memory_kind(mesh)`` ("pinned_host" on GPU and TPU, so L2 can be larger than device
memory; the default memory kind on CPU); the metadata is replicated in default memory
(the host bookkeeping reads it). The shardings come from the config and the state's
structure, not from field names. ``shard_tiers`` places a ``TieredState``: L1 per
``kvjax.sharding.cache_shardings``, L2 per ``l2_shardings``; page moves then keep the
destination's placement (``kvjax.tiers.move.move_pages`` is given it).

>>> import jax
>>> import kvjax
>>> from kvjax.sharding import page_mesh
>>> from kvjax.tiers.config import TierConfig
>>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
...                         num_pages=4, max_seqs=1, max_pages_per_seq=2)
>>> sh = l2_shardings(cfg, TierConfig(l2_pages=8), page_mesh(jax.devices()[:1]))
>>> sh.k.data.spec, sh.meta.filled.spec
(P(None, 'pages'), P())
"""

from __future__ import annotations

from typing import Optional

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from kvjax.cache.config import CacheConfig
from kvjax.sharding import cache_shardings
from kvjax.tiers.config import TierConfig
from kvjax.tiers.state import init
from kvjax.tiers.state import L2State
from kvjax.tiers.state import TieredState

HOST_MEMORY_PLATFORMS = ("gpu", "cuda", "rocm", "tpu")


def l2_memory_kind(mesh: Mesh) -> Optional[str]:
  """"pinned_host" when the mesh's devices are GPUs or TPUs that offer it, else None
  (the default memory kind: on CPU host memory is device memory)."""
  d = mesh.devices.reshape(-1)[0]
  if d.platform not in HOST_MEMORY_PLATFORMS:
    return None
  kinds = {m.kind for m in d.addressable_memories()}
  return "pinned_host" if "pinned_host" in kinds else None


def l2_shardings(config: CacheConfig, tiers: TierConfig, mesh: Mesh,
                 memory_kind: Optional[str] = "auto") -> L2State:
  """An ``L2State``-shaped pytree of ``NamedSharding`` (see the module docstring).

  Args:
    config: the L1 config (L2 pages take its layer/head shapes).
    tiers: the tier config; ``tiers.l2_pages`` must divide by the mesh axis size.
    mesh: the device mesh; ``tiers.mesh_axis`` must be one of its axes.
    memory_kind: of the payload arrays; "auto" = ``l2_memory_kind(mesh)``, None = default.

  Raises:
    ValueError: naming the axis or the page count.
  """
  axis = tiers.mesh_axis
  if axis not in mesh.axis_names:
    raise ValueError(f"TierConfig.mesh_axis {axis!r} is not a mesh axis; mesh axes are "
                     f"{mesh.axis_names}")
  n = mesh.shape[axis]
  if tiers.l2_pages % n:
    raise ValueError(f"TierConfig.l2_pages ({tiers.l2_pages}) must be divisible by the mesh "
                     f"axis {axis!r} size ({n})")
  kind = l2_memory_kind(mesh) if memory_kind == "auto" else memory_kind
  split = NamedSharding(mesh, PartitionSpec(None, axis), memory_kind=kind)
  replicated = NamedSharding(mesh, PartitionSpec())
  shapes = jax.eval_shape(lambda: init(config, tiers).l2)
  pages = jax.tree_util.tree_map(lambda _: split, (shapes.k, shapes.v))
  meta = jax.tree_util.tree_map(lambda _: replicated, shapes.meta)
  return L2State(k=pages[0], v=pages[1], meta=meta)


def shard_tiers(ts: TieredState, config: CacheConfig, tiers: TierConfig, mesh: Mesh,
                memory_kind: Optional[str] = "auto") -> TieredState:
  """``ts`` placed on ``mesh``: L1 by ``cache_shardings`` (over ``tiers.mesh_axis``), L2 by
  ``l2_shardings``, the copy map and counters replicated.

  >>> import jax
  >>> import kvjax
  >>> from kvjax.sharding import page_mesh
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                         num_pages=4, max_seqs=1, max_pages_per_seq=2)
  >>> tc = TierConfig(l2_pages=8)
  >>> ts = shard_tiers(init(cfg, tc), cfg, tc, page_mesh(jax.devices()[:1]))
  >>> ts.l2.k.data.sharding.spec
  P(None, 'pages')
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  l1 = jax.device_put(ts.l1, cache_shardings(config, mesh, tiers.mesh_axis))
  l2 = jax.device_put(ts.l2, l2_shardings(config, tiers, mesh, memory_kind))
  return ts.replace(l1=l1, l2=l2, l1_copy=jax.device_put(ts.l1_copy, replicated),
                    stats=jax.device_put(ts.stats, replicated))
