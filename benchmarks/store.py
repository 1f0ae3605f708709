"""The L3 BlockStore against plain file I/O of the same bytes, in one run, and its warm restart.

Reported (JSON, benchmarks/results/store.json):
  l3_write_over_raw / l3_read_over_raw: batched put / get throughput (64-page
    batches of SmolLM2 int4 pages, 105 KB each, in the order written) over a raw
    sequential write / read of the same bytes to one file with plain Python file
    I/O (with ``sync`` the store fsyncs each put's segment rows and then its index
    record; the raw run fsyncs once at the end, and in
    ``l3_write_over_raw_batch_fsync`` after every 64-page batch, the durability
    a put gives). Reads are cold: every
    file's pages are dropped from the OS page cache first (fsync +
    POSIX_FADV_DONTNEED), so both read the disk, as an L3 does;
    ``*_warm``: from the page cache, where the store's checksum pass alone
    costs about what the raw read does. ``l3_random_read_over_raw``: 64 random
    pages a batch against one positioned read per page of the raw file. Best
    of ``reps`` interleaved runs each; target >= 0.8. The stores hold the
    issue's L3 (65,536 pages: 256 MiB segments, so the pages written lie in a few
    files); the default (segments, sync) is the headline, then without fsync,
    then a store of only the pages written (capacity n: segments of at most
    max(n / 16, one put batch) pages, more and smaller files), then ``chunks`` (a zarr3 chunk per page);
    ``segment_files_read``: the store's own segment files read whole with plain
    file I/O (``l3_read_over_segment_files``: the store's cost on its layout);
    ``raw_files_*``: the same bytes one file per page with plain file I/O (the
    chunks layout's floor).
  commit_ab: writes alone (2,048 pages in puts of 64, a fresh store each, best and
    median of 10 interleaved): the default (a group commit of 8 puts) and
    ``commit_every=1`` (``l3_write_over_raw_per_put`` above) over the raw file
    fsynced once and after every batch.
  latency_ms: get and put of one page and of a 64-page batch, p50 / p99.
  restart_hit_retention: replay the first half of the conversation trace's
    block hashes through a store of ``--capacity`` pages (get; put the
    misses), SIGKILL the process, replay the second half in a new process on
    the same directory; its hits over the hits of the second half in one
    uninterrupted run. A generated trace stands in when the file is absent.
  prefetch_hidden / prefetch_accuracy / prefetch_wasted_bytes: the trace's
    requests served in order from a store under a stated L3 model (each read
    of n pages waits ``L3_LATENCY_S + n * SMOLLM2_PAGE_BYTES / L3_BYTES_PER_S``
    on top of the real read) with modeled compute (``COMPUTE_BASE_S`` per
    request plus ``COMPUTE_BLOCK_S`` per block not found); once without
    prefetch (every listed block read when its request starts), once with a
    ``Prefetcher`` issuing the listed blocks of the next ``QUEUE_DEPTH``
    queued requests while the current one computes (and again after it
    stores its new blocks), handed over with ``wait_complete``. Hidden = 1 - (L3 wait
    with prefetch) / (L3 wait without); accuracy = pages handed over / read
    ahead; wasted bytes at the modeled page size. ``prefetch_ranking``: the same
    with no queue: the ``RANK_DEPTH`` pages the store's eviction policy ranks
    best (``BlockStore.ranked``, LRU: the most recent) read ahead instead.

  three_tier / tier_hit_ratio / tier_predicted_hit_ratio / tier_prefill_tokens_saved /
  sim_vs_cache_max_diff:
    the conversation trace's first ``--tier-requests`` requests through the real
    ``kvjax.tiers`` cache (``kvjax.sim.replay.replay_cache``) with L1 1,024 / L2 4,096
    (int8) / L3 65,536 (int4, write_back) pages, a tiny model config (1 layer, 1 kv head,
    head_dim 8), each 512-token trace block one page of ``TIER_PAGE_SIZE`` synthetic
    tokens derived from its id; per request: tiered attach, plan the rest, release. Hit
    ratios per tier (pages served / blocks looked up), prefill tokens saved (the trace's
    tokens of the blocks served), beside the exact model's (``kvjax.sim.tiers.three_tier``)
    on the same requests; ``sim_vs_cache_max_diff`` is the largest absolute per-tier
    hit-ratio difference; ``model_whole_trace``: the model alone on every request.
    ``--only-tiers`` runs this section alone.

  python benchmarks/store.py [--quick] [--out FILE] [--dir DIR] [--tier-requests N] [--only-tiers]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional

import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax.layout import PRESETS
from kvjax.layout import QuantSpec
from kvjax.sim import traces
from kvjax.store import BlockStore
from kvjax.store import PageFormat
from kvjax.store import PageInfo
from kvjax.store import Prefetcher
from kvjax.store import PrefetchPolicy
from kvjax.store import StoreConfig
from kvjax.sim.replay import replay_cache
from kvjax.sim.tiers import three_tier

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

BATCH = 64
L3_PAGES = 65_536   # the issue's L3 (the three-tier replay's too): 256 MiB segments of these pages
SMOLLM2 = dict(num_layers=30, page_size=16, num_kv_heads=3, head_dim=64)
# the replay's pages: small (the replay measures the index across a restart, not bandwidth)
REPLAY_FMT = PageFormat.for_specs(QuantSpec(), QuantSpec(), num_layers=1, page_size=16,
                                  num_kv_heads=1, head_dim=8)


def hashes_of(ids: np.ndarray) -> np.ndarray:
  ids = np.asarray(ids, np.int64) + 1
  return np.stack([(ids >> 32).astype(np.uint32), (ids & 0xFFFFFFFF).astype(np.uint32)], 1)


# ----------------------------------------------------------------------------- throughput


def raw_write(path: str, rows: np.ndarray, sync: bool, each: bool = False) -> float:
  """``rows`` to one file in ``BATCH``-page writes; fsync once at the end when ``sync``, or
  after every batch when ``each`` too (the durability a store put gives)."""
  t0 = time.perf_counter()
  with open(path, "wb") as f:
    for b in range(0, len(rows), BATCH):
      f.write(rows[b:b + BATCH].tobytes())
      if sync and each:
        f.flush()
        os.fsync(f.fileno())
    f.flush()
    if sync:
      os.fsync(f.fileno())
  return time.perf_counter() - t0


def raw_read(path: str, n: int, page_bytes: int) -> float:
  t0 = time.perf_counter()
  with open(path, "rb") as f:
    for _ in range(0, n, BATCH):
      np.frombuffer(f.read(BATCH * page_bytes), np.uint8)
  return time.perf_counter() - t0


def raw_random_read(path: str, batches: list, page_bytes: int) -> float:
  """The pages of each batch (random page numbers) with one positioned read each."""
  buf = np.empty((BATCH, page_bytes), np.uint8)
  t0 = time.perf_counter()
  fd = os.open(path, os.O_RDONLY)
  try:
    for idx in batches:
      for j, i in enumerate(idx):
        os.preadv(fd, [buf[j]], int(i) * page_bytes)
  finally:
    os.close(fd)
  return time.perf_counter() - t0


def drop_cache(path: str) -> None:
  """Evict a file's (or a tree's) pages from the OS page cache, so the next read hits the disk.

  fsync first (dirty pages cannot be dropped), then POSIX_FADV_DONTNEED; no root needed.
  """
  files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path)
                                               for f in fs]
  for f in files:
    fd = os.open(f, os.O_RDONLY)
    try:
      os.fsync(fd)
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def raw_files_write(path: str, rows: np.ndarray, sync: bool) -> float:
  """One file per page (the chunks layout) with plain file I/O: write, [fsync], rename."""
  os.makedirs(path, exist_ok=True)
  t0 = time.perf_counter()
  for i, row in enumerate(rows):
    tmp = os.path.join(path, f"{i}.tmp")
    with open(tmp, "wb") as f:
      f.write(row.tobytes())
      if sync:
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, str(i)))
  return time.perf_counter() - t0


def raw_files_read(path: str, n: int) -> float:
  t0 = time.perf_counter()
  for i in range(n):
    with open(os.path.join(path, str(i)), "rb") as f:
      np.frombuffer(f.read(), np.uint8)
  return time.perf_counter() - t0


def store_write(store: BlockStore, hashes, arrays) -> float:
  t0 = time.perf_counter()
  for b in range(0, len(hashes), BATCH):
    store.put(hashes[b:b + BATCH], {k: a[b:b + BATCH] for k, a in arrays.items()})
  store.flush()   # all of it durable, a group that did not fill included
  return time.perf_counter() - t0


def store_read(store: BlockStore, hashes) -> float:
  t0 = time.perf_counter()
  for b in range(0, len(hashes), BATCH):
    r = store.get(hashes[b:b + BATCH])
    assert r.found.all()
  return time.perf_counter() - t0


def store_random_read(store: BlockStore, hashes, batches: list) -> float:
  t0 = time.perf_counter()
  for idx in batches:
    assert store.get(hashes[idx]).found.all()
  return time.perf_counter() - t0


def segment_files_read(store: BlockStore) -> float:
  """The store's own segment files read whole in order with plain file I/O (the layout's floor:
  what reading these files costs without the store's index, checksums and scatter)."""
  d = store.segments.path
  t0 = time.perf_counter()
  for name in sorted(os.listdir(d)):
    with open(os.path.join(d, name), "rb") as f:
      while f.read(BATCH * store.format.page_bytes):
        pass
  return time.perf_counter() - t0


def page_set(n: int) -> tuple:
  """``n`` random SmolLM2 int4 pages: (format, packed rows uint8 [n, page_bytes], their
  arrays, hashes uint32 [n, 2])."""
  fmt = PageFormat.for_specs(*PRESETS["int4"], **SMOLLM2)
  rows = np.random.default_rng(0).integers(0, 256, (n, fmt.page_bytes), np.uint8)
  return fmt, rows, fmt.unpack(rows), hashes_of(np.arange(n))


def throughput(base: str, n: int, reps: int, layout: str, compression: str, sync: bool,
               capacity: int = L3_PAGES, commit_every: Optional[int] = None) -> dict:
  """Write, then read back cold (page cache dropped: the disk) and warm (the page cache), the
  store against plain file I/O of the same bytes, interleaved, best of ``reps``.

  ``capacity``: the store's pages (``n`` of them written); it sets the segment size (at most
  ``capacity / 16`` pages, ``StoreConfig.segment_bytes``), so the number of files ``n`` pages
  are spread over. ``commit_every``: puts made durable together (``StoreConfig``; None:
  its default, 8 for segments on a path, else 1)."""
  fmt, rows, arrays, hashes = page_set(n)
  rng = np.random.default_rng(2)
  batches = [rng.choice(n, BATCH, replace=False) for _ in range(n // BATCH)]
  mb = n * fmt.page_bytes / 1e6
  t = collections.defaultdict(list)
  for rep in range(reps):
    d = tempfile.mkdtemp(dir=base)
    try:
      store = BlockStore(StoreConfig(path=d, capacity=capacity, layout=layout,
                                     compression=compression, sync=sync,
                                     commit_every=commit_every), fmt)
      raw, files = os.path.join(d, "raw.bin"), os.path.join(d, "files")
      # each write starts with nothing dirty in the page cache (os.sync, untimed), and the
      # order alternates: neither pays for the other's writeback
      writes = {"l3_write": lambda: store_write(store, hashes, arrays),
                "raw_write": lambda: raw_write(raw, rows, sync)}
      if sync:
        writes["raw_write_batch_fsync"] = lambda: raw_write(raw, rows, sync, each=True)
      for name in list(writes)[::1 if rep % 2 == 0 else -1]:
        os.sync()
        t[name].append(writes[name]())
      for when in ("cold", "warm"):
        for name, fn in (("l3_read", lambda: store_read(store, hashes)),
                         ("raw_read", lambda: raw_read(raw, n, fmt.page_bytes)),
                         ("l3_random_read", lambda: store_random_read(store, hashes, batches)),
                         ("raw_random_read", lambda: raw_random_read(raw, batches,
                                                                     fmt.page_bytes))):
          if when == "cold":
            drop_cache(d)
          elif rep == 0 and name == "l3_read":
            fn()   # warm: every file in the page cache
          t[f"{name}_{when}"].append(fn())
      if layout == "segments":
        drop_cache(d)
        t["segment_files_read_cold"].append(segment_files_read(store))
        files_written = len(os.listdir(store.segments.path))
      t["raw_files_write"].append(raw_files_write(files, rows, sync))
      drop_cache(files)
      t["raw_files_read_cold"].append(raw_files_read(files, n))
      if rep == 0:
        lat = latency(store, hashes, arrays, fmt)
      assert store.stats()["futures_outstanding"] == 0
      store.close()   # no group left for a timer to commit into the next rep's timing
    finally:
      shutil.rmtree(d, ignore_errors=True)
  best = {k: min(v) for k, v in t.items()}
  seg = {} if layout != "segments" else {
      "segment_files": files_written,
      # the store's read over plain reads of its own files: what the store itself costs
      "l3_read_over_segment_files": best["segment_files_read_cold"] / best["l3_read_cold"]}
  return {"layout": layout, "compression": compression, "sync": sync, "pages": n,
          "capacity": capacity, "commit_every": store.config.commit_every, **seg,
          "page_bytes": fmt.page_bytes, "mb_per_s": {k: mb / v for k, v in best.items()},
          "l3_write_over_raw": best["raw_write"] / best["l3_write"],
          # against a raw write that is durable batch by batch, as each put is
          **({"l3_write_over_raw_batch_fsync": best["raw_write_batch_fsync"] / best["l3_write"]}
             if sync else {}),
          # cold: read from the disk (the L3 case); warm: from the page cache (memory speed,
          # where the checksum pass alone costs as much as the raw read)
          "l3_read_over_raw": best["raw_read_cold"] / best["l3_read_cold"],
          "l3_read_over_raw_warm": best["raw_read_warm"] / best["l3_read_warm"],
          "l3_random_read_over_raw": best["raw_random_read_cold"] / best["l3_random_read_cold"],
          "l3_random_read_over_raw_warm": (best["raw_random_read_warm"]
                                           / best["l3_random_read_warm"]),
          # the same bytes one file per page (the chunks layout) with plain file I/O
          "raw_files_over_raw_write": best["raw_write"] / best["raw_files_write"],
          "raw_files_over_raw_read": best["raw_read_cold"] / best["raw_files_read_cold"],
          "latency_ms": lat}


def commit_ab(base: str, n: int, reps: int) -> dict:
  """Writes alone, a fresh store each, interleaved, best and median of ``reps``: the default
  (group commit of 8 puts) and a commit every put, against the raw file fsynced once and
  after every batch. The write figures of ``throughput`` are best of 3 and noisier."""
  fmt, rows, arrays, hashes = page_set(n)
  t = {"default": [], "per_put": [], "raw_once": [], "raw_batch": []}
  for rep in range(reps):
    for name in list(t)[::1 if rep % 2 == 0 else -1]:
      d = tempfile.mkdtemp(dir=base)
      try:
        os.sync()
        if name.startswith("raw"):
          t[name].append(raw_write(os.path.join(d, "raw.bin"), rows, True,
                                   each=name == "raw_batch"))
        else:
          store = BlockStore(StoreConfig(path=d, capacity=L3_PAGES,
                                         commit_every=1 if name == "per_put" else None), fmt)
          t[name].append(store_write(store, hashes, arrays))
          store.close()
      finally:
        shutil.rmtree(d, ignore_errors=True)
  best = {k: min(v) for k, v in t.items()}
  med = {k: float(np.median(v)) for k, v in t.items()}
  return {"pages": n, "reps": reps, "best_s": best, "median_s": med,
          **{f"{s}_over_raw": best["raw_once"] / best[s] for s in ("default", "per_put")},
          **{f"{s}_over_raw_median": med["raw_once"] / med[s] for s in ("default", "per_put")},
          **{f"{s}_over_raw_batch_fsync": best["raw_batch"] / best[s]
             for s in ("default", "per_put")}}


def latency(store: BlockStore, hashes, arrays, fmt) -> dict:
  rng = np.random.default_rng(1)
  n = len(hashes)

  def pct(samples):
    ms = np.asarray(samples) * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}

  out = {}
  for size, reps in ((1, 100), (BATCH, 20)):
    gets = []
    for _ in range(reps):
      idx = rng.choice(n, size, replace=False)
      t0 = time.perf_counter()
      store.get(hashes[idx])
      gets.append(time.perf_counter() - t0)
    out[f"get_{size}"] = pct(gets)
    puts = []
    for r in range(reps):
      idx = rng.choice(n, size, replace=False)
      store.evict(hashes[idx])
      t0 = time.perf_counter()
      store.put(hashes[idx], {k: a[idx] for k, a in arrays.items()})
      puts.append(time.perf_counter() - t0)
    out[f"put_{size}"] = pct(puts)
  return out


# ----------------------------------------------------------------------------- replay


def replay(store: BlockStore, blocks: list) -> tuple:
  """Requests' block ids through the store (get, put the misses): (hits, references, wrong)."""
  hits = refs = wrong = 0
  s = REPLAY_FMT.page_size
  for ids in blocks:
    if len(ids) == 0:
      continue
    ids = np.unique(ids)
    h = hashes_of(ids)
    r = store.get(h)
    hits += int(r.found.sum())
    refs += len(ids)
    want = (ids[:, None] * 7 + np.arange(s)).astype(np.int32)
    wrong += int((r.info.tokens[r.found] != want[r.found]).any(axis=1).sum())
    miss = ~r.found
    if miss.any():
      m = int(miss.sum())
      rows = np.repeat((ids[miss] % 251).astype(np.uint8)[:, None], REPLAY_FMT.page_bytes, 1)
      info = PageInfo(want[miss], np.zeros((m, 2), np.uint32), np.zeros((m, 2), np.uint32))
      store.put(h[miss], REPLAY_FMT.unpack(rows), info)
  return hits, refs, wrong


def replay_child(args) -> None:
  with np.load(args.blocks) as z:
    flat, starts = z["flat"], z["starts"]
  blocks = [flat[a:b] for a, b in zip(starts[:-1], starts[1:])]
  half = len(blocks) // 2
  part = {"first": blocks[:half], "second": blocks[half:], "both": blocks}[args.replay]
  store = BlockStore(StoreConfig(path=args.dir, capacity=args.capacity, layout=args.layout),
                     REPLAY_FMT)
  warm = store.warm_pages
  if args.replay == "both":
    replay(store, blocks[:half])
    part = blocks[half:]
  t0 = time.perf_counter()
  hits, refs, wrong = replay(store, part)
  print(json.dumps({"hits": hits, "refs": refs, "wrong": wrong, "warm_pages": warm,
                    "seconds": time.perf_counter() - t0, "stats": store.stats()}), flush=True)
  if args.replay == "first":
    os.kill(os.getpid(), signal.SIGKILL)   # no close, no flush: a crash


def request_blocks(num_requests: int) -> tuple:
  """The first requests of the conversation trace (a generated one when the file is absent).

  Returns ``(source, flat block ids int64 [refs], starts int [R + 1], unique blocks)``:
  request r's blocks are ``flat[starts[r]:starts[r + 1]]``.
  """
  path = traces.default_trace_path()
  if os.path.exists(path):
    trace, source = traces.load_mooncake(path), path
  else:
    trace, source = traces.generate(num_requests, seed=0), "generated"
  req = trace.request
  r_max = min(num_requests, int(req.max()) + 1)
  keep = req < r_max
  starts = np.searchsorted(req[keep], np.arange(r_max + 1))
  flat = trace.block[keep].astype(np.int64)
  return source, flat, starts, int(np.unique(flat).size)


def restart_retention(base: str, capacity: int, num_requests: int,
                      layout: str = "segments") -> dict:
  source, flat, starts, unique = request_blocks(num_requests)
  r_max = len(starts) - 1
  d = tempfile.mkdtemp(dir=base)
  blocks = os.path.join(d, "blocks.npz")
  np.savez(blocks, flat=flat, starts=starts)

  def child(phase, directory):
    cmd = [sys.executable, os.path.abspath(__file__), "--replay", phase, "--blocks", blocks,
           "--dir", directory, "--capacity", str(capacity), "--layout", layout]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if phase != "first" and out.returncode != 0:
      raise RuntimeError(out.stderr[-3000:])
    if phase == "first" and out.returncode != -signal.SIGKILL:
      raise RuntimeError(f"first half did not end by SIGKILL: {out.returncode}\n"
                         f"{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])

  try:
    whole = child("both", os.path.join(d, "whole"))
    first = child("first", os.path.join(d, "restart"))
    second = child("second", os.path.join(d, "restart"))
  finally:
    shutil.rmtree(d, ignore_errors=True)
  return {"trace": source, "requests": r_max, "references": len(flat),
          "unique_blocks": unique, "capacity": capacity,
          "uninterrupted_second_half_hits": whole["hits"],
          "restarted_second_half_hits": second["hits"],
          "second_half_references": second["refs"],
          "pages_at_kill": first["stats"]["pages"], "warm_pages_after_restart":
              second["warm_pages"],
          "wrong_pages_served": whole["wrong"] + first["wrong"] + second["wrong"],
          "checksum_failures": second["stats"]["checksum_failures"],
          # pages written by compaction on top of the pages put (uninterrupted run)
          "write_amplification": (whole["stats"]["writes"] + whole["stats"].get(
              "compacted_pages", 0)) / max(whole["stats"]["writes"], 1),
          "read_errors": whole["stats"]["read_errors"] + second["stats"]["read_errors"],
          "restart_hit_retention": second["hits"] / max(whole["hits"], 1),
          "second_half_hit_ratio_uninterrupted": whole["hits"] / max(whole["refs"], 1),
          "second_half_hit_ratio_restarted": second["hits"] / max(second["refs"], 1)}


# ----------------------------------------------------------------------------- prefetch

L3_LATENCY_S = 1e-3           # per read (a batch): an NVMe queue round trip plus software
L3_BYTES_PER_S = 2e9          # per read's pages, at the SmolLM2 int4 page size
SMOLLM2_PAGE_BYTES = 105120   # 30 layers x 16 tokens x 3 kv heads x 64, int4 K and V + scales
COMPUTE_BASE_S = 4e-3         # per request (its decode share and scheduling)
COMPUTE_BLOCK_S = 2e-3        # per 512-token block computed (not found in L3)
QUEUE_DEPTH = 4               # queued requests whose prefixes are known ahead
RANK_DEPTH = 64               # pages the ranking prefetch reads ahead per request


class ModeledStore:
  """A ``BlockStore`` whose reads also wait the L3 model's latency and transfer time."""

  def __init__(self, store: BlockStore):
    self.store, self.format = store, store.format

  def get(self, hashes):
    time.sleep(L3_LATENCY_S + len(hashes) * SMOLLM2_PAGE_BYTES / L3_BYTES_PER_S)
    return self.store.get(hashes)


def issue_queue(pf: Prefetcher, store: BlockStore, queued: list) -> None:
  """Read ahead the blocks of the queued requests that the store lists."""
  for ids in queued:
    if len(ids) == 0:
      continue
    ahead = hashes_of(np.unique(ids))
    ahead = ahead[store.contains(ahead)]
    if len(ahead):
      pf.issue(ahead)


def serve(store: BlockStore, blocks: list, prefetch: Optional[str]) -> dict:
  """Serve requests in order: read the listed blocks, compute (sleep) the rest, store them;
  ``prefetch``: None, ``"queue"`` (the next requests' listed blocks) or ``"ranking"``
  (the store's ``RANK_DEPTH`` best-ranked pages)."""
  modeled = ModeledStore(store)
  pf = Prefetcher(modeled, workers=2, capacity=1024, batch=16) if prefetch else None

  def ahead(i):
    if prefetch == "queue":
      issue_queue(pf, store, blocks[i + 1: i + 1 + QUEUE_DEPTH])
    elif prefetch == "ranking":
      pf.issue(store.ranked(RANK_DEPTH))

  wait = 0.0
  found = refs = 0
  s = REPLAY_FMT.page_size
  t_all = time.perf_counter()
  try:
    for i, ids in enumerate(blocks):
      ids = np.unique(ids)
      if len(ids) == 0:
        continue
      h = hashes_of(ids)
      t0 = time.perf_counter()
      have = np.zeros(len(ids), bool)
      if pf is not None:   # what was read ahead; a read still in flight is waited for
        have = pf.take(h, PrefetchPolicy("wait_complete")).found
      rest = ~have & store.contains(h)
      if rest.any():
        have[rest] = modeled.get(h[rest]).found
      wait += time.perf_counter() - t0
      if pf is not None:
        ahead(i)
      found += int(have.sum())
      refs += len(ids)
      miss = ~have
      time.sleep(COMPUTE_BASE_S + COMPUTE_BLOCK_S * int(miss.sum()))
      if miss.any():
        m = int(miss.sum())
        want = (ids[miss][:, None] * 7 + np.arange(s)).astype(np.int32)
        rows = np.repeat((ids[miss] % 251).astype(np.uint8)[:, None], REPLAY_FMT.page_bytes, 1)
        info = PageInfo(want, np.zeros((m, 2), np.uint32), np.zeros((m, 2), np.uint32))
        store.put(h[miss], REPLAY_FMT.unpack(rows), info)
        if pf is not None:   # the queue's blocks this request just stored
          ahead(i)
  finally:
    stats = {}
    if pf is not None:
      pf.close()
      stats = pf.stats()
  return {"l3_wait_s": wait, "found": found, "references": refs,
          "wall_s": time.perf_counter() - t_all, "prefetcher": stats}


def prefetch_effect(base: str, num_requests: int) -> dict:
  source, flat, starts, _ = request_blocks(num_requests)
  r_max = len(starts) - 1
  blocks = [flat[a:b] for a, b in zip(starts[:-1], starts[1:])]
  runs = {}
  for name, mode in (("off", None), ("on", "queue"), ("ranking", "ranking")):
    d = tempfile.mkdtemp(dir=base)
    try:
      store = BlockStore(StoreConfig(path=d, capacity=1 << 16, sync=False), REPLAY_FMT)
      runs[name] = serve(store, blocks, mode)
      store.close()
    finally:
      shutil.rmtree(d, ignore_errors=True)
  on, off, rk = runs["on"], runs["off"], runs["ranking"]
  pst = on["prefetcher"]
  return {"trace": source, "requests": r_max,
          "model": {"l3_latency_s": L3_LATENCY_S, "l3_bytes_per_s": L3_BYTES_PER_S,
                    "page_bytes": SMOLLM2_PAGE_BYTES, "compute_base_s": COMPUTE_BASE_S,
                    "compute_block_s": COMPUTE_BLOCK_S, "queue_depth": QUEUE_DEPTH},
          "prefetch_hidden": 1.0 - on["l3_wait_s"] / max(off["l3_wait_s"], 1e-12),
          "prefetch_accuracy": pst["accuracy"],
          "prefetch_wasted_bytes": pst["wasted"] * SMOLLM2_PAGE_BYTES,
          "found_off": off["found"], "found_on": on["found"], "references": off["references"],
          "l3_wait_s_off": off["l3_wait_s"], "l3_wait_s_on": on["l3_wait_s"],
          "wall_s_off": off["wall_s"], "wall_s_on": on["wall_s"], "prefetcher": pst,
          "prefetch_ranking": {
              "rank_depth": RANK_DEPTH,
              "hidden": 1.0 - rk["l3_wait_s"] / max(off["l3_wait_s"], 1e-12),
              "accuracy": rk["prefetcher"]["accuracy"],
              "wasted_bytes": rk["prefetcher"]["wasted"] * SMOLLM2_PAGE_BYTES,
              "l3_wait_s": rk["l3_wait_s"], "prefetcher": rk["prefetcher"]}}


# ----------------------------------------------------------------------------- three tiers

TIER_PAGES = {"l1": 1024, "l2": 4096, "l3": 65536}
TIER_PAGE_SIZE = 4            # synthetic tokens per page (one 512-token trace block)
TIER_DIMS = dict(num_layers=1, num_kv_heads=1, head_dim=8)   # kvjax.sim.replay's config
TIER_L2_PRESET = "int8"       # the seed's L2
TIER_L3_PRESET = "int4"
TIER_WRITE = "write_back"


def three_tier_replay(base: str, num_requests: int, model_all: bool = True) -> dict:
  """The conversation trace through L1 / L2 / L3 (``TIER_PAGES``) of ``kvjax.tiers``
  (``kvjax.sim.replay.replay_cache``), beside the exact model
  (``kvjax.sim.tiers.three_tier``) on the same requests, and the model alone on the
  whole trace (``model_all``)."""
  path = traces.default_trace_path()
  if os.path.exists(path):
    trace, source = traces.load_mooncake(path), path
  else:
    trace, source = traces.generate(max(num_requests, 1), seed=0), "generated"
  r_ = min(num_requests, trace.num_requests)
  bounds = np.searchsorted(trace.request, np.arange(trace.num_requests + 1))
  kw = dict(l1_pages=TIER_PAGES["l1"], l2_pages=TIER_PAGES["l2"], l3_pages=TIER_PAGES["l3"],
            write=TIER_WRITE)
  d = tempfile.mkdtemp(dir=base)
  t0 = time.perf_counter()
  try:
    got = replay_cache(trace, requests=r_, l3_path=d, page_size=TIER_PAGE_SIZE,
                 l2_preset=TIER_L2_PRESET, l3_preset=TIER_L3_PRESET, **kw)
  finally:
    shutil.rmtree(d, ignore_errors=True)
  seconds = time.perf_counter() - t0
  t1 = time.perf_counter()
  want = three_tier(trace, requests=r_, **kw)
  model_seconds = time.perf_counter() - t1
  refs = got["lookups"]

  def saved(per):   # the trace's tokens of the blocks served
    return int(sum(trace.filled[bounds[r]:bounds[r] + int(per[r].sum())].sum()
                   for r in range(len(per))))

  def ratios(res):
    q = max(res["lookups"], 1)
    out = {k: res[f"{k}_hits"] / q for k in ("l1", "l2", "l3")}
    return {**out, "total": sum(out.values())}

  measured, predicted = ratios(got), ratios(want)
  diff_rows = np.flatnonzero(np.any(got["per_request"] != want["per_request"], axis=1))
  prompt = int(trace.filled[:bounds[r_]].sum())
  out = {"trace": source, "requests": r_, "references": refs,
         "unique_blocks": int(np.unique(trace.block[:bounds[r_]]).size),
         "pages": TIER_PAGES, "page_size_tokens": TIER_PAGE_SIZE, "dims": TIER_DIMS,
         "l2_preset": TIER_L2_PRESET, "l3_preset": TIER_L3_PRESET, "write": TIER_WRITE,
         "hit_ratio": measured, "predicted_hit_ratio": predicted,
         "sim_vs_cache_max_diff": max(abs(measured[k] - predicted[k]) for k in ("l1", "l2", "l3")),
         "requests_differing": int(len(diff_rows)),
         "first_request_differing": int(diff_rows[0]) if len(diff_rows) else None,
         "prefill_tokens_saved": saved(got["per_request"]),
         "predicted_prefill_tokens_saved": saved(want["per_request"]),
         "prompt_tokens": prompt,
         "prefill_saved_fraction": saved(got["per_request"]) / max(prompt, 1),
         "l3_writes": got["store"].get("writes"), "predicted_l3_writes": want["l3_writes"],
         "l3_evictions": got["store"].get("evictions"),
         "predicted_l3_evictions": want["l3_evictions"],
         "counters": got["stats"],
         "store": {k: got["store"].get(k) for k in ("pages", "writes", "hits", "misses",
                                                    "evictions", "checksum_failures")},
         "seconds": seconds, "seconds_per_request": seconds / max(r_, 1),
         "model_seconds": model_seconds}
  if model_all:
    t2 = time.perf_counter()
    whole = three_tier(trace, **kw)
    out["model_whole_trace"] = {
        "requests": trace.num_requests, "references": whole["lookups"],
        "hit_ratio": ratios(whole), "prefill_tokens_saved": saved(whole["per_request"]),
        "prompt_tokens": int(trace.filled.sum()), "l3_writes": whole["l3_writes"],
        "l3_evictions": whole["l3_evictions"], "seconds": time.perf_counter() - t2}
  return out


def print_three(three: dict) -> None:
  """The three-tier table: measured and predicted per tier, prefill tokens saved."""
  hr, pr = three["hit_ratio"], three["predicted_hit_ratio"]
  print(f"three tiers: {three['requests']} requests, {three['references']} blocks, L1/L2/L3 "
        f"{TIER_PAGES['l1']}/{TIER_PAGES['l2']}/{TIER_PAGES['l3']} pages, {three['write']}")
  print(f"{'':<10}{'L1':>8}{'L2':>8}{'L3':>8}{'total':>8}{'tokens saved':>15}")
  print(f"{'cache':<10}{hr['l1']:>8.4f}{hr['l2']:>8.4f}{hr['l3']:>8.4f}{hr['total']:>8.4f}"
        f"{three['prefill_tokens_saved']:>15}")
  print(f"{'model':<10}{pr['l1']:>8.4f}{pr['l2']:>8.4f}{pr['l3']:>8.4f}{pr['total']:>8.4f}"
        f"{three['predicted_prefill_tokens_saved']:>15}")
  print(f"sim_vs_cache_max_diff {three['sim_vs_cache_max_diff']:.4f}, requests differing "
        f"{three['requests_differing']}, prompt tokens {three['prompt_tokens']}")
  w = three.get("model_whole_trace")
  if w:
    h = w["hit_ratio"]
    print(f"model, whole trace ({w['requests']} requests, {w['references']} blocks): "
          f"{h['l1']:.4f} / {h['l2']:.4f} / {h['l3']:.4f} / {h['total']:.4f}, tokens saved "
          f"{w['prefill_tokens_saved']} of {w['prompt_tokens']} ({w['seconds']:.0f} s)")


def headline(configs: list) -> dict:
  """The JSON keys of the default config (segments, sync: the first) and all configs."""
  d = configs[0]
  return {"l3_write_over_raw": d["l3_write_over_raw"],
          "l3_write_over_raw_batch_fsync": d.get("l3_write_over_raw_batch_fsync"),
          "l3_read_over_raw": d["l3_read_over_raw"],
          "l3_random_read_over_raw": d["l3_random_read_over_raw"],
          # the default groups 8 puts a commit (one fsync and one index record); committing
          # every put (commit_every=1) is the durability of a batch-fsynced raw file
          **{"l3_write_over_raw_per_put": c["l3_write_over_raw"] for c in configs
             if c["layout"] == "segments" and c["sync"] and c["commit_every"] == 1},
          "latency_ms": d["latency_ms"], "configs": configs}


def print_ab(ab: dict) -> None:
  print(f"writes alone, best of {ab['reps']} (median): default (group of 8) "
        f"{ab['default_over_raw']:.2f} ({ab['default_over_raw_median']:.2f}), a commit per put "
        f"{ab['per_put_over_raw']:.2f} ({ab['per_put_over_raw_median']:.2f}) of the raw file "
        f"fsynced once; of the raw file fsynced per batch {ab['default_over_raw_batch_fsync']:.2f}"
        f" / {ab['per_put_over_raw_batch_fsync']:.2f}")


def print_configs(configs: list) -> None:
  default = configs[0]
  print(f"{'config':<32}{'l3 write':>10}{'raw write':>11}{'ratio':>7}{'l3 read':>10}"
        f"{'raw read':>10}{'ratio':>7}{'random':>8}{'warm':>7}   MB/s, reads cold")
  for c in configs:
    m = c["mb_per_s"]
    name = (f"{c['layout']} {c['compression']}{' sync' if c['sync'] else ''}"
            f"{'' if c['capacity'] == L3_PAGES else ' cap ' + str(c['capacity'])}"
            f"{' group ' + str(c['commit_every']) if c['commit_every'] > 1 else ''}")
    each = (f"; raw fsync a batch {m['raw_write_batch_fsync']:.0f}: "
            f"{c['l3_write_over_raw_batch_fsync']:.2f}" if c["sync"] else "")
    print(f"{name:<32}{m['l3_write']:>10.0f}{m['raw_write']:>11.0f}{c['l3_write_over_raw']:>7.2f}"
          f"{m['l3_read_cold']:>10.0f}{m['raw_read_cold']:>10.0f}{c['l3_read_over_raw']:>7.2f}"
          f"{c['l3_random_read_over_raw']:>8.2f}{c['l3_read_over_raw_warm']:>7.2f}"
          f"   one file a page (plain I/O): {m['raw_files_write']:.0f} / "
          f"{m['raw_files_read_cold']:.0f}"
          + (f"; its {c['segment_files']} segment files (plain I/O) read "
             f"{m['segment_files_read_cold']:.0f}: store over them "
             f"{c['l3_read_over_segment_files']:.2f}" if "segment_files" in c else "") + each)
  for k, v in default["latency_ms"].items():
    print(f"latency {k:<8} p50 {v['p50']:7.2f} ms  p99 {v['p99']:7.2f} ms")


# ----------------------------------------------------------------------------- main


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                "store.json"))
  ap.add_argument("--dir", default=None, help="where the stores live (default: a temp dir)")
  ap.add_argument("--capacity", type=int, default=None, help="replay store pages")
  ap.add_argument("--tier-requests", type=int, default=None,
                  help="requests of the three-tier replay (default 300 quick, 1000 full)")
  ap.add_argument("--only-throughput", action="store_true",
                  help="run only the throughput configs (with --out)")
  ap.add_argument("--only-tiers", action="store_true",
                  help="run only the three-tier replay (with --tier-requests, --out)")
  ap.add_argument("--replay", choices=["first", "second", "both"], help=argparse.SUPPRESS)
  ap.add_argument("--blocks", help=argparse.SUPPRESS)
  ap.add_argument("--layout", default="segments", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.replay:
    return replay_child(args)
  base = args.dir or tempfile.gettempdir()
  if args.only_tiers:   # the three-tier replay alone (e.g. the whole trace: slow)
    three = three_tier_replay(base, args.tier_requests or (300 if args.quick else 1000))
    common.write_json(args.out, {"benchmark": "store", "machine": common.machine(),
                                 "quick": args.quick, "tier_hit_ratio": three["hit_ratio"],
                                 "tier_predicted_hit_ratio": three["predicted_hit_ratio"],
                                 "sim_vs_cache_max_diff": three["sim_vs_cache_max_diff"],
                                 "tier_prefill_tokens_saved": three["prefill_tokens_saved"],
                                 "three_tier": three})
    print_three(three)
    return None
  n, reps = (512, 2) if args.quick else (2048, 3)
  requests = 1500 if args.quick else 1 << 30
  capacity = args.capacity or (2048 if args.quick else 8192)
  configs = [throughput(base, n, reps, *c) for c in
             (("segments", "none", True), ("segments", "none", False),
              ("segments", "none", True, L3_PAGES, 1),   # a commit every put
              ("segments", "none", True, n),   # a store of n pages: smaller segments, more files
              ("chunks", "zstd", True), ("chunks", "none", False))]
  ab = commit_ab(base, n, 4 if args.quick else 10)
  if args.only_throughput:
    common.write_json(args.out, {"benchmark": "store", "machine": common.machine(),
                                 "quick": args.quick, **headline(configs), "commit_ab": ab})
    print_configs(configs)
    print_ab(ab)
    return None
  restart = restart_retention(base, capacity, requests)
  pre = prefetch_effect(base, 300 if args.quick else 2000)
  three = three_tier_replay(base, args.tier_requests or (300 if args.quick else 1000))
  default = configs[0]
  result = {"benchmark": "store", "machine": common.machine(), "quick": args.quick,
            "dir": base, **headline(configs), "commit_ab": ab,
            "restart_hit_retention": restart["restart_hit_retention"], "restart": restart,
            "prefetch_hidden": pre["prefetch_hidden"],
            "prefetch_accuracy": pre["prefetch_accuracy"],
            "prefetch_wasted_bytes": pre["prefetch_wasted_bytes"], "prefetch": pre,
            "tier_hit_ratio": three["hit_ratio"],
            "tier_predicted_hit_ratio": three["predicted_hit_ratio"],
            "tier_prefill_tokens_saved": three["prefill_tokens_saved"], "three_tier": three}
  common.write_json(args.out, result)
  print_configs(configs)
  print_ab(ab)
  print(f"restart_hit_retention {restart['restart_hit_retention']:.3f} "
        f"({restart['restarted_second_half_hits']} / "
        f"{restart['uninterrupted_second_half_hits']} hits, capacity {capacity}, "
        f"{restart['requests']} requests, wrong pages served {restart['wrong_pages_served']})")
  print(f"prefetch: hidden {pre['prefetch_hidden']:.3f} of the L3 wait "
        f"({pre['l3_wait_s_off']:.2f} s -> {pre['l3_wait_s_on']:.2f} s), accuracy "
        f"{pre['prefetch_accuracy']:.3f}, wasted {pre['prefetch_wasted_bytes'] / 1e6:.1f} MB, "
        f"found {pre['found_off']} / {pre['found_on']} of {pre['references']} blocks (off / on), "
        f"{pre['requests']} requests")
  rk = pre["prefetch_ranking"]
  print(f"prefetch by the store's ranking (top {rk['rank_depth']}): hidden {rk['hidden']:.3f}, "
        f"accuracy {rk['accuracy']:.3f}, wasted {rk['wasted_bytes'] / 1e6:.1f} MB")
  print_three(three)

if __name__ == "__main__":
  main()
