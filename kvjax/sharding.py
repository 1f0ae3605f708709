"""Shardings of a cache over a device mesh: the page axis split, metadata replicated."""

from __future__ import annotations

import jax
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np

from kvjax.cache.config import CacheConfig
from kvjax.cache.state import CacheState
from kvjax.cache.state import init



def page_mesh(devices=None, axis: str = "pages") -> Mesh:
  """A 1-D mesh over ``devices`` (default: all) with ``Auto`` axis type.

  ``Auto`` keeps plain indexing (``pages[table]``) legal on sharded arrays;
  ``jax.make_mesh``'s default ``Explicit`` axes reject it.

  >>> page_mesh(jax.devices()[:1]).axis_names
  ('pages',)
  """
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (axis,), axis_types=(AxisType.Auto,))


def cache_shardings(config: CacheConfig, mesh: Mesh, axis: str = "pages") -> CacheState:
  """A ``CacheState``-shaped pytree of ``NamedSharding``: pages split on ``axis``.

  K/V payload arrays (``[L, P, ...]``: data, scales, zero points) are split
  along the page axis P over the mesh axis ``axis``; metadata, page table,
  counters, the eviction policy's history and parameters (``policy_params``) and the
  per-sequence staging ring of quantized caches are replicated.

  Args:
    config: the cache config; ``config.num_pages`` must divide evenly.
    mesh: the device mesh.
    axis: mesh axis name to split pages over.

  Returns:
    A pytree with the structure of ``init(config)`` whose leaves are shardings.

  >>> cfg = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                   num_pages=8, max_seqs=1, max_pages_per_seq=2)
  >>> cache_shardings(cfg, page_mesh(jax.devices()[:1])).k.data.spec
  P(None, 'pages')
  """
  if axis not in mesh.axis_names:
    raise ValueError(f"axis {axis!r} is not a mesh axis; mesh axes are {mesh.axis_names}")
  n = mesh.shape[axis]
  if config.num_pages % n:
    raise ValueError(f"config.num_pages ({config.num_pages}) must be divisible by the mesh "
                     f"axis {axis!r} size ({n})")
  shapes = jax.eval_shape(lambda: init(config))
  split = NamedSharding(mesh, PartitionSpec(None, axis))
  replicated = NamedSharding(mesh, PartitionSpec())

  def pick(path, leaf):
    del leaf
    names = [getattr(p, "name", None) for p in path]
    # Page arrays (data, scale, zero: [L, P, ...]) split; the full-precision
    # staging ring and sink rows ([L, max_seqs, ...]) are per sequence.
    return split if names[0] in ("k", "v") and names[-1] not in ("stage", "sink") else replicated

  return jax.tree_util.tree_map_with_path(pick, shapes)


def shard_cache(state: CacheState, config: CacheConfig, mesh: Mesh,
                axis: str = "pages") -> CacheState:
  """``state`` placed on ``mesh`` with ``cache_shardings``.

  >>> cfg = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                   num_pages=8, max_seqs=1, max_pages_per_seq=2)
  >>> st = shard_cache(init(cfg), cfg, page_mesh(jax.devices()[:1]))
  >>> st.k.data.sharding.spec
  P(None, 'pages')
  """
  return jax.device_put(state, cache_shardings(config, mesh, axis))
