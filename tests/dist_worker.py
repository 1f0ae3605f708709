"""One process of the two-process L2 test (``tests/test_tiers_distributed.py`` starts two).

Usage: ``python tests/dist_worker.py PROCESS_ID NUM_PROCESSES COORDINATOR OUT_DIR``.

Both processes run the same tiered operations on one global ``TieredState`` (lockstep):

1. Process 0's request A (tenant "t0", 25 tokens: 6 full blocks) is attached, planned,
   its K/V computed on process 0 (a host "model": each token's K/V a function of the
   tenant and the whole prefix) and written into L1 from process 0's rows, then released.
2. ``sync`` demotes A's 6 blocks into L2 (8 pages, one per device: pages 4.. live on
   process 1's devices); L1 pressure relief evicts them from L1.
3. Process 1's request (tenant "t0", A's first 24 tokens + another tail) and process 0's
   request (A's tokens, tenant "t1") are attached: process 1's row is served A's 6 blocks
   from L2 (promoted into L1), tenant t1 gets nothing.

Process 1 recomputes its prefix's K/V itself and compares, bit for bit, with the pages it
was served and with the L2 pages held on its own devices. Each process writes
``OUT_DIR/worker{PROCESS_ID}.json``.
"""

import hashlib
import json
import os
import sys
import time

T0 = time.perf_counter()
PID, NPROC, COORD, OUT = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]


def dump(result):
  with open(os.path.join(OUT, f"worker{PID}.json"), "w") as f:
    json.dump(result, f, indent=1)


import jax  # noqa: E402

try:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
except (ValueError, AttributeError) as e:   # a jax without gloo on CPU: the test skips
  dump({"unsupported": f"{type(e).__name__}: {e}"})
  sys.exit(0)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import kvjax  # noqa: E402
from kvjax import tiers  # noqa: E402
from kvjax.pressure import PressureConfig  # noqa: E402
from kvjax.tiers import distributed as dist  # noqa: E402

dist.initialize(COORD, NPROC, PID, cpu_devices=4, timeout_s=30)

S, T, ROWS = 4, 32, 2   # page size, batch width, rows each process may contribute
CFG = kvjax.CacheConfig(num_layers=2, num_kv_heads=2, head_dim=8, page_size=S, num_pages=8,
                        max_seqs=NPROC * ROWS, max_pages_per_seq=8, dtype="bfloat16")
# L2 pressure relief off (thresholds at 100 %): the test wants all 6 demoted pages to stay
TC = tiers.TierConfig(l2_pages=8, l2_preset="bf16", thresholds=(0.98, 0.99, 1.0),
                      targets=(0.98, 0.99, 1.0))
EVICT_ALL = PressureConfig(thresholds=(0.05, 0.1, 0.15), targets=(0.0, 0.0, 0.0), batch=1)
A = [int(x) for x in (np.arange(25) * 7 + 3) % 50 + 1]


def seed_of(tenant):
  return np.asarray(kvjax.tenant_seed(CFG, tenant_salt=tenant), np.uint32)


def model_kv(seed, prompt) -> np.ndarray:
  """bf16 [n, 2, L, H, D]: K and V of each token, a function of the seed and its prefix."""
  out = []
  for i in range(len(prompt)):
    h = hashlib.sha256(repr((seed.tolist(), list(prompt[:i + 1]))).encode()).digest()
    rng = np.random.default_rng(int.from_bytes(h[:8], "little"))
    out.append(rng.standard_normal((2, CFG.num_layers, CFG.num_kv_heads, CFG.head_dim)))
  return np.asarray(out, np.float32).astype(jnp.bfloat16)


MESH = dist.global_mesh(TC.mesh_axis)


def batch(local):
  """The global batch from each process's own requests [(prompt, tenant)].

  Returns (seq_ids, tokens, num_tokens, seeds, kv): numpy, the same on every process,
  except ``kv``, a global array of each row's K/V held by the process it came from.
  """
  toks = np.zeros((len(local), T), np.int32)
  lens = np.zeros((len(local),), np.int32)
  seeds = np.zeros((len(local), 2), np.uint32)
  kv = np.zeros((ROWS, T, 2, CFG.num_layers, CFG.num_kv_heads, CFG.head_dim), jnp.bfloat16)
  for r, (prompt, tenant) in enumerate(local):
    toks[r, :len(prompt)] = prompt
    lens[r] = len(prompt)
    seeds[r] = seed_of(tenant)
    kv[r, :len(prompt)] = model_kv(seeds[r], prompt)   # computed where the request lives
  tokens, valid = dist.gather_rows(toks, ROWS)
  num_tokens, _ = dist.gather_rows(lens, ROWS)
  seed_rows, _ = dist.gather_rows(seeds, ROWS)
  seq_ids = np.arange(NPROC * ROWS, dtype=np.int32)    # global row g -> slot g
  return seq_ids, tokens, np.where(valid, num_tokens, 0), seed_rows, dist.rows_array(kv, MESH)


@jax.jit
def write_kv(k, v, kv, rows, cols, pages, offsets):
  """Write kv[rows, cols] ([N, 2, L, H, D]) into page slots (pages, offsets) of L1."""
  vals = kv[rows, cols]
  k = k.at[:, pages, offsets].set(jnp.moveaxis(vals[:, 0], 0, 1), mode="drop")
  v = v.at[:, pages, offsets].set(jnp.moveaxis(vals[:, 1], 0, 1), mode="drop")
  return k, v


def step(ts, local):
  """Attach the global batch across tiers, plan the rest, write its K/V. -> (cached, ts)."""
  ids, toks, nt, seeds, kv = batch(local)
  cached, ts = tiers.attach_prefix(ts, jnp.asarray(ids), jnp.asarray(toks), jnp.asarray(nt),
                                   jnp.asarray(seeds), config=CFG, tiers=TC)
  cached = np.asarray(cached)
  rest = np.zeros_like(toks)
  for r in range(len(ids)):
    rest[r, :nt[r] - cached[r]] = toks[r, cached[r]:nt[r]]
  ts = tiers.plan_step(ts, jnp.asarray(ids), jnp.asarray(rest), jnp.asarray(nt - cached),
                       jnp.asarray(seeds), config=CFG, tiers=TC)
  table = np.asarray(ts.l1.page_table)
  rows, cols, pages, offs = [], [], [], []
  for r in range(len(ids)):
    for i in range(cached[r], nt[r]):
      rows.append(r)
      cols.append(i)
      pages.append(table[ids[r], i // S])
      offs.append(i % S)
  n = NPROC * ROWS * T
  pad = lambda a, fill: jnp.asarray(np.array(a + [fill] * (n - len(a)), np.int32))
  k, v = write_kv(ts.l1.k.data, ts.l1.v.data, kv, pad(rows, 0), pad(cols, 0),
                  pad(pages, CFG.num_pages), pad(offs, 0))
  k, v = jax.device_put((k, v), (ts.l1.k.data.sharding, ts.l1.v.data.sharding))
  ts = ts.replace(l1=ts.l1.replace(k=ts.l1.k.replace(data=k), v=ts.l1.v.replace(data=v)))
  return cached, ts


def stats_dict(ts):
  return {n: int(getattr(ts.stats, n)) for n in tiers.TierStats.__dataclass_fields__}


def mark(result, name):
  """Seconds since start at ``name``: wall and this process's CPU."""
  result.setdefault("marks", {})[name] = (round(time.perf_counter() - T0, 2),
                                          round(time.process_time(), 2))


def main():
  result = {"process_id": jax.process_index(), "process_count": jax.process_count(),
            "devices": jax.device_count(), "local_devices": jax.local_device_count(),
            "collectives": jax.config.jax_cpu_collectives_implementation}
  mark(result, 'start')
  ts = dist.place_tiers(tiers.init(CFG, TC), CFG, TC, MESH)
  mark(result, 'placed')
  result["l2_page_owners"] = dist.page_owners(ts.l2.k).tolist()

  # 1. process 0's request A: computed, written from process 0's rows, released
  mine = [(A, "t0")] if PID == 0 else []
  cached1, ts = step(ts, mine)
  mark(result, 'step1')
  result["cached_step1"] = cached1.tolist()
  slot_a = 0                                            # process 0's first row
  a_pages = np.asarray(ts.l1.page_table[slot_a])[:len(A) // S]
  ts = tiers.release(ts, jnp.arange(CFG.max_seqs), config=CFG)

  # 2. demoted into L2 (write-through sync), then evicted from L1 by pressure relief
  ts = tiers.sync(ts, config=CFG, tiers=TC)
  mark(result, 'synced')
  copies = np.asarray(ts.l1_copy)[a_pages]
  result["a_l2_pages"] = copies.tolist()
  result["a_l2_owners"] = dist.page_owners(ts.l2.k)[copies].tolist()
  relief, ts = tiers.relieve(ts, config=CFG, tiers=TC, pressure=EVICT_ALL)
  result["l1_evicted"] = int(relief.evicted)
  result["l1_cached_after_relief"] = int(np.sum(np.any(np.asarray(ts.l1.meta.block_hash) != 0,
                                                       axis=-1)))
  mark(result, 'relieved')
  # the L2 bytes on this process's own devices, before anyone reads them
  local_l2 = {}
  for shard_k, shard_v in zip(ts.l2.k.data.addressable_shards, ts.l2.v.data.addressable_shards):
    assert shard_k.device == shard_v.device
    pages = np.arange(TC.l2_pages)[shard_k.index[1]]
    for j, q in enumerate(pages):
      if q in copies:
        local_l2[int(q)] = (np.asarray(shard_k.data)[:, j], np.asarray(shard_v.data)[:, j])
  dist.check_lockstep(ts)

  # 3. process 1: A's prefix, same tenant (an L2 hit); process 0: A, another tenant (no hit)
  b = A[:24] + [97, 98, 99]
  mine = [(A, "t1")] if PID == 0 else [(b, "t0")]
  before = stats_dict(ts)
  cached3, ts = step(ts, mine)
  mark(result, 'step3')
  after = stats_dict(ts)
  result["cached_step3"] = cached3.tolist()
  result["stats_step3"] = {n: after[n] - before[n] for n in after}
  slot_b, slot_t1 = ROWS, 0                             # process 1's first row, process 0's
  served = np.asarray(ts.l1.page_table[slot_b])[:24 // S]
  served_k = dist.read_pages(ts.l1.k, served)           # collective: both processes call it
  served_v = dist.read_pages(ts.l1.v, served)
  if PID == 1:                                          # process 1 checks what it was served
    ref = model_kv(seed_of("t0"), b)[:24]              # [24, 2, L, H, D] recomputed here
    ref_k = np.moveaxis(ref[:, 0].reshape(6, S, *ref.shape[2:]), 2, 0)  # [L, 6, S, H, D]
    ref_v = np.moveaxis(ref[:, 1].reshape(6, S, *ref.shape[2:]), 2, 0)
    result["served_bit_identical"] = bool(
        np.array_equal(served_k.view(np.uint16), ref_k.view(np.uint16))
        and np.array_equal(served_v.view(np.uint16), ref_v.view(np.uint16)))
    result["served_max_abs_diff"] = float(np.max(np.abs(
        served_k.astype(np.float32) - ref_k.astype(np.float32))))
    other = model_kv(seed_of("t1"), b)[:24]            # what tenant t1 would have computed
    other_k = np.moveaxis(other[:, 0].reshape(6, S, *other.shape[2:]), 2, 0)
    result["other_tenant_differs"] = not np.array_equal(served_k.view(np.uint16),
                                                        other_k.view(np.uint16))
    blocks = {int(q): j for j, q in enumerate(copies)}
    result["local_l2_pages_checked"] = sorted(local_l2)
    result["local_l2_bit_identical"] = bool(all(
        np.array_equal(local_l2[q][0].view(np.uint16), ref_k[:, blocks[q]].view(np.uint16))
        and np.array_equal(local_l2[q][1].view(np.uint16), ref_v[:, blocks[q]].view(np.uint16))
        for q in local_l2))
  mark(result, 'checked')
  result["t1_cached"] = int(cached3[slot_t1])
  result["stats"] = after
  result["hit_ratios"] = tiers.hit_ratios(ts.stats)
  tiers.check_tiers(ts, config=CFG)
  dist.check_lockstep(ts)
  result["digest"] = dist.state_digest(ts).tobytes().hex()
  result["seconds"] = time.perf_counter() - T0
  result["cpu_seconds"] = time.process_time()
  dump(result)


if __name__ == "__main__":
  main()
  jax.distributed.shutdown()
