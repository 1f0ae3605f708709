"""L2 over several ``jax.distributed`` processes: one global ``TieredState``, run in lockstep.

Every process runs the same sequence of tiered operations (SPMD). The state is one
global pytree on a mesh over all processes' devices (``global_mesh``): L1's and L2's
page payloads are split over the mesh axis, so L2's page axis spans every process's
devices, and all metadata (page records, page table, index, ``l1_copy``, counters) is
replicated, so each process's host bookkeeping (numpy reads in ``kvjax.tiers.ops``)
takes the same decisions. A request "of process p" is one whose tokens originate on
process p: ``gather_rows`` hands every process the whole batch (a collective), and
``rows_array`` builds a global array from each process's own rows (its K/V, say),
which jitted writes then scatter into pages on any process's devices.

On CPU the collectives are gloo's (``initialize`` selects them); start one process per
host (or per group of host devices) with the same coordinator address.

>>> mesh = global_mesh()        # one process: the local devices
>>> mesh.axis_names, mesh.size == jax.device_count()
(('pages',), True)
"""

from __future__ import annotations

import functools
import hashlib
from typing import Optional

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np

from kvjax.cache.config import CacheConfig
from kvjax.layout.pages import Pages
from kvjax.sharding import page_mesh
from kvjax.tiers.config import TierConfig
from kvjax.tiers.placement import shard_tiers
from kvjax.tiers.state import TieredState


def initialize(coordinator_address: str, num_processes: int, process_id: int, *,
               cpu_devices: Optional[int] = None, timeout_s: int = 60) -> None:
  """Join a ``jax.distributed`` job (before any other jax call of this process).

  Selects gloo for CPU collectives and, with ``cpu_devices``, the number of host
  devices of this process (``jax_num_cpu_devices``; as
  ``--xla_force_host_platform_device_count``).

  Args:
    coordinator_address: "host:port" of process 0's coordinator (loopback in tests).
    num_processes: processes in the job.
    process_id: this process, 0 .. num_processes - 1.
    cpu_devices: host devices of this process, or None (the platform's default).
    timeout_s: how long to wait for the other processes to join.
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if cpu_devices is not None:
    jax.config.update("jax_num_cpu_devices", int(cpu_devices))
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=timeout_s)


def global_mesh(axis: str = "pages") -> Mesh:
  """A 1-D mesh over every process's devices (process 0's first), ``Auto`` axis type."""
  return page_mesh(jax.devices(), axis)


def process_mesh(mesh: Mesh, axes: tuple = ("process", "local")) -> Mesh:
  """``mesh``'s devices as [processes, local devices]: for arrays split by process."""
  devices = np.asarray(mesh.devices).reshape(jax.process_count(), -1)
  if any(d.process_index != p for p, row in enumerate(devices) for d in row):
    raise ValueError("process_mesh: the mesh's devices are not grouped by process in order")
  return Mesh(devices, axes, axis_types=(AxisType.Auto,) * 2)


def place_tiers(ts: TieredState, config: CacheConfig, tiers: TierConfig,
                mesh: Mesh) -> TieredState:
  """``ts`` as one global state on ``mesh`` (a collective: every process calls it).

  L1's prefix index draws a secret placement key per process
  (``kvjax.prefix.index.process_key``); the processes take process 0's, so the
  replicated index is the same everywhere. Then ``shard_tiers``: page payloads split
  over ``tiers.mesh_axis``, everything else replicated (``jax.device_put`` checks that
  each process passes the same values).

  Raises:
    ValueError: with an L3 tier (host-local, not shared between processes).

  >>> import kvjax
  >>> from kvjax.tiers.state import init
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                         num_pages=8, max_seqs=1, max_pages_per_seq=2)
  >>> tc = TierConfig(l2_pages=8)
  >>> place_tiers(init(cfg, tc), cfg, tc, global_mesh()).l2.k.data.sharding.spec
  P(None, 'pages')
  """
  if ts.l3 is not None:
    raise ValueError("place_tiers: an L3 tier is host-local; several processes cannot share "
                     "it (use L1 + L2 only)")
  key = np.asarray(ts.l1.index.placement_key)
  if jax.process_count() > 1:
    key = np.asarray(multihost_utils.broadcast_one_to_all(key), np.uint32)
  l1 = ts.l1.replace(index=ts.l1.index.replace(placement_key=jnp.asarray(key)))
  return shard_tiers(ts.replace(l1=l1), config, tiers, mesh)


def gather_rows(local: np.ndarray, max_rows: int) -> np.ndarray:
  """Every process's rows, on every process (a collective: all processes call it).

  Args:
    local: [n, ...] this process's rows, n <= ``max_rows`` (same trailing shape and
      dtype on every process).
    max_rows: rows each process may contribute.

  Returns:
    ``(rows [N * max_rows, ...], valid bool [N * max_rows])`` over N processes, process
    p's rows at ``p * max_rows`` onward; padding rows are zeros and not valid.

  >>> rows, valid = gather_rows(np.array([[1, 2]]), 2)  # one process
  >>> rows.tolist(), valid.tolist()
  ([[1, 2], [0, 0]], [True, False])
  """
  local = np.asarray(local)
  if local.shape[0] > max_rows:
    raise ValueError(f"gather_rows: {local.shape[0]} rows, more than max_rows={max_rows}")
  pad = np.zeros((max_rows,) + local.shape[1:], local.dtype)
  pad[:local.shape[0]] = local
  rows, counts = multihost_utils.process_allgather(
      (pad, np.array(local.shape[0], np.int32)))
  rows = np.asarray(rows).reshape((-1,) + local.shape[1:])
  counts = np.asarray(counts).reshape(-1)
  valid = (np.arange(max_rows)[None, :] < counts[:, None]).reshape(-1)
  return rows, valid


def rows_array(local: np.ndarray, mesh: Mesh) -> jax.Array:
  """A global array [N * n, ...] from each process's ``local`` rows [n, ...] (no copy out).

  Split over ``process_mesh(mesh)``'s process axis: process p's rows stay on its
  devices until a jitted computation moves them.
  """
  pm = process_mesh(mesh)
  sharding = NamedSharding(pm, PartitionSpec("process"))
  return jax.make_array_from_process_local_data(sharding, np.asarray(local))


def page_owners(pool: Pages, axis: int = 1) -> np.ndarray:
  """int32 [P]: the process holding each page of ``pool`` (its ``data`` split on ``axis``).

  >>> import kvjax
  >>> from kvjax.tiers.config import TierConfig
  >>> from kvjax.tiers.state import init
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                         num_pages=4, max_seqs=1, max_pages_per_seq=2)
  >>> page_owners(init(cfg, TierConfig(l2_pages=3)).l2.k).tolist()
  [0, 0, 0]
  """
  data = pool.data
  owners = np.full((data.shape[axis],), -1, np.int32)
  for device, index in data.sharding.devices_indices_map(data.shape).items():
    owners[np.arange(data.shape[axis])[index[axis]]] = device.process_index
  return owners


@functools.partial(jax.jit, static_argnames="out")
def _take_pages(data: jax.Array, ids: jax.Array, *, out: NamedSharding) -> jax.Array:
  """data [L, P, ...] -> [L, n, ...] pages ``ids`` (int32 [n]), placed as ``out``."""
  return jax.lax.with_sharding_constraint(data[:, ids], out)


def read_pages(pool: Pages, ids) -> np.ndarray:
  """[L, n, S, H, D] numpy: pages ``ids`` of an unquantized ``pool`` on this host.

  A collective when ``pool`` spans processes (all call it with the same ``ids``): the
  pages are gathered to a replicated array first.

  >>> import kvjax
  >>> from kvjax.tiers.config import TierConfig
  >>> from kvjax.tiers.state import init
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                         num_pages=4, max_seqs=1, max_pages_per_seq=2)
  >>> read_pages(init(cfg, TierConfig(l2_pages=4, l2_preset="bf16")).l2.k, [1, 3]).shape
  (1, 2, 2, 1, 2)
  """
  data = pool.data
  ids = jnp.asarray(np.asarray(ids, np.int32))
  if data.is_fully_addressable:
    return np.asarray(data[:, ids])
  return np.asarray(_take_pages(data, ids, out=NamedSharding(data.sharding.mesh,
                                                             PartitionSpec())))


def state_digest(ts: TieredState) -> np.ndarray:
  """uint8 [32]: SHA-256 of every replicated leaf (metadata, page table, copies, counters).

  Equal on all processes while they run in lockstep (``check_lockstep``).
  """
  h = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(ts):
    if isinstance(leaf, jax.Array) and leaf.is_fully_replicated:
      h.update(np.asarray(leaf).tobytes())
  return np.frombuffer(h.digest(), np.uint8)


def check_lockstep(ts: TieredState) -> None:
  """Raise ``AssertionError`` unless every process holds the same replicated state."""
  multihost_utils.assert_equal(state_digest(ts), "kvjax.tiers: processes out of lockstep")
