"""The L3 BlockStore against plain file I/O of the same bytes, in one run, and its warm restart.

Reported (JSON, benchmarks/results/store.json):
  l3_write_over_raw / l3_read_over_raw: batched put / get throughput (64-page
    batches of SmolLM2 int4 pages, 105 KB each) over a raw sequential write /
    read of the same bytes to one file with plain Python file I/O (same fsync
    policy: the store fsyncs each file when ``sync``, the raw run fsyncs once
    at the end). Best of ``reps`` interleaved runs each; target >= 0.8.
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
    ahead; wasted bytes at the modeled page size.

  three_tier / tier_hit_ratio / tier_predicted_hit_ratio / tier_prefill_tokens_saved:
    the conversation trace's first ``--tier-requests`` requests through
    ``kvjax.tiers`` with L1 1,024 / L2 4,096 (int8) / L3 65,536 (int4, write_back)
    pages, a tiny model config (1 layer, 1 kv head, head_dim 8), each 512-token
    trace block one page of ``TIER_PAGE_SIZE`` synthetic tokens derived from its
    hash id; per request: tiered attach, plan the rest, release. Hit ratios per
    tier (pages served / blocks looked up), prefill tokens saved (the trace's tokens
    of the blocks served), beside ``chain_model``'s prediction (exact LRU per tier,
    chained the same way).

  python benchmarks/store.py [--quick] [--out FILE] [--dir DIR] [--tier-requests N]
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

import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax import tiers
from kvjax.layout import PRESETS
from kvjax.layout import QuantSpec
from kvjax.sim import traces
from kvjax.store import BlockStore
from kvjax.store import PageFormat
from kvjax.store import PageInfo
from kvjax.store import Prefetcher
from kvjax.store import PrefetchPolicy
from kvjax.store import StoreConfig
from kvjax.tiers import l3 as l3mod

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

BATCH = 64
SMOLLM2 = dict(num_layers=30, page_size=16, num_kv_heads=3, head_dim=64)
# the replay's pages: small (the replay measures the index across a restart, not bandwidth)
REPLAY_FMT = PageFormat.for_specs(QuantSpec(), QuantSpec(), num_layers=1, page_size=16,
                                  num_kv_heads=1, head_dim=8)


def hashes_of(ids: np.ndarray) -> np.ndarray:
  ids = np.asarray(ids, np.int64) + 1
  return np.stack([(ids >> 32).astype(np.uint32), (ids & 0xFFFFFFFF).astype(np.uint32)], 1)


# ----------------------------------------------------------------------------- throughput


def raw_write(path: str, rows: np.ndarray, sync: bool) -> float:
  t0 = time.perf_counter()
  with open(path, "wb") as f:
    for b in range(0, len(rows), BATCH):
      f.write(rows[b:b + BATCH].tobytes())
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


def store_write(store: BlockStore, hashes, arrays) -> float:
  t0 = time.perf_counter()
  for b in range(0, len(hashes), BATCH):
    store.put(hashes[b:b + BATCH], {k: a[b:b + BATCH] for k, a in arrays.items()})
  return time.perf_counter() - t0


def store_read(store: BlockStore, hashes) -> float:
  t0 = time.perf_counter()
  for b in range(0, len(hashes), BATCH):
    r = store.get(hashes[b:b + BATCH])
    assert r.found.all()
  return time.perf_counter() - t0


def throughput(base: str, n: int, reps: int, compression: str, sync: bool) -> dict:
  fmt = PageFormat.for_specs(*PRESETS["int4"], **SMOLLM2)
  rows = np.random.default_rng(0).integers(0, 256, (n, fmt.page_bytes), np.uint8)
  arrays = fmt.unpack(rows)
  hashes = hashes_of(np.arange(n))
  mb = n * fmt.page_bytes / 1e6
  t = {"l3_write": [], "raw_write": [], "l3_read": [], "raw_read": []}
  for rep in range(reps):
    d = tempfile.mkdtemp(dir=base)
    try:
      store = BlockStore(StoreConfig(path=d, capacity=n, compression=compression, sync=sync),
                         fmt)
      t["l3_write"].append(store_write(store, hashes, arrays))
      t["raw_write"].append(raw_write(os.path.join(d, "raw.bin"), rows, sync))
      t["l3_read"].append(store_read(store, hashes))
      t["raw_read"].append(raw_read(os.path.join(d, "raw.bin"), n, fmt.page_bytes))
      if rep == 0:
        lat = latency(store, hashes, arrays, fmt)
      assert store.stats()["futures_outstanding"] == 0
    finally:
      shutil.rmtree(d, ignore_errors=True)
  best = {k: min(v) for k, v in t.items()}
  return {"compression": compression, "sync": sync, "pages": n, "page_bytes": fmt.page_bytes,
          "mb_per_s": {k: mb / v for k, v in best.items()},
          "l3_write_over_raw": best["raw_write"] / best["l3_write"],
          "l3_read_over_raw": best["raw_read"] / best["l3_read"],
          "latency_ms": lat}


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
  store = BlockStore(StoreConfig(path=args.dir, capacity=args.capacity), REPLAY_FMT)
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


def restart_retention(base: str, capacity: int, num_requests: int) -> dict:
  source, flat, starts, unique = request_blocks(num_requests)
  r_max = len(starts) - 1
  d = tempfile.mkdtemp(dir=base)
  blocks = os.path.join(d, "blocks.npz")
  np.savez(blocks, flat=flat, starts=starts)

  def child(phase, directory):
    cmd = [sys.executable, os.path.abspath(__file__), "--replay", phase, "--blocks", blocks,
           "--dir", directory, "--capacity", str(capacity)]
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


def serve(store: BlockStore, blocks: list, prefetch: bool) -> dict:
  """Serve requests in order: read the listed blocks, compute (sleep) the rest, store them."""
  modeled = ModeledStore(store)
  pf = Prefetcher(modeled, workers=2, capacity=1024, batch=16) if prefetch else None
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
        issue_queue(pf, store, blocks[i + 1: i + 1 + QUEUE_DEPTH])
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
          issue_queue(pf, store, blocks[i + 1: i + 1 + QUEUE_DEPTH])
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
  for name, on in (("off", False), ("on", True)):
    d = tempfile.mkdtemp(dir=base)
    try:
      store = BlockStore(StoreConfig(path=d, capacity=1 << 16, sync=False), REPLAY_FMT)
      runs[name] = serve(store, blocks, on)
    finally:
      shutil.rmtree(d, ignore_errors=True)
  on, off = runs["on"], runs["off"]
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
          "wall_s_off": off["wall_s"], "wall_s_on": on["wall_s"], "prefetcher": pst}


# ----------------------------------------------------------------------------- three tiers

TIER_PAGES = {"l1": 1024, "l2": 4096, "l3": 65536}
TIER_PAGE_SIZE = 4            # synthetic tokens per page (one 512-token trace block)
TIER_DIMS = dict(num_layers=1, num_kv_heads=1, head_dim=8)


def block_tokens(ids: np.ndarray) -> np.ndarray:
  """int32 [n * S]: the synthetic tokens of trace blocks ``ids`` (distinct per block id)."""
  ids = np.asarray(ids, np.int64)
  return (ids[:, None] * TIER_PAGE_SIZE + np.arange(TIER_PAGE_SIZE) + 1).astype(
      np.int32).reshape(-1)


def chain_model(blocks: list, pages: dict = TIER_PAGES) -> dict:
  """The host simulator: exact LRU per tier, chained as the tiered attach matches.

  A request's blocks are matched in L1 while they are there, then in L2, then in L3,
  stopping at the first block no tier holds (each tier's phase ends the one above, as
  in ``kvjax.tiers.attach_prefix``). Then every block of the request is in L1 (most
  recent); L2 takes every block entering L1 that it lacks (write-through demotion,
  LRU; promotion from L2 refreshes it) and every block promoted from L3; an L2
  eviction is put into L3 (write_back; an L3 hit refreshes it). L2's structure is
  modelled too: a block in L2 serves only while its parent block's L2 entry it was
  linked to is there (an L2 eviction orphans the children; a block entering L2 with
  its parent absent is orphaned from the start), as L2's parent-pointer verification
  does. Returns hits per tier, references and blocks served per request.
  """
  l1, l2, l3 = (collections.OrderedDict() for _ in range(3))   # l2: block -> linked
  children = collections.defaultdict(set)                    # L2 block -> L2 children
  hits = {"l1": 0, "l2": 0, "l3": 0}
  saved = []
  refs = 0

  def put_l3(b):
    l3[b] = True
    l3.move_to_end(b)
    if len(l3) > pages["l3"]:
      l3.popitem(last=False)

  def put_l2(b, parent):
    if len(l2) >= pages["l2"]:
      old, _ = l2.popitem(last=False)
      for c in children.pop(old, ()):
        if c in l2:
          l2[c] = False
      put_l3(old)
    linked = parent is None or parent in l2
    l2[b] = linked
    if parent is not None and linked:
      children[parent].add(b)

  for ids in blocks:
    ids = ids.tolist()
    refs += len(ids)
    phase = 0
    n = 0
    for i, b in enumerate(ids):
      if phase == 0 and b not in l1:
        phase = 1
      if phase == 1 and not (b in l2 and l2[b] and (i == 0 or ids[i - 1] in l2)):
        phase = 2
      if phase == 2 and b not in l3:
        break
      hits[("l1", "l2", "l3")[phase]] += 1
      if phase == 1:
        l2.move_to_end(b)
      elif phase == 2:
        l3.move_to_end(b)
        l2.pop(b, None)
        put_l2(b, ids[i - 1] if i else None)
      n += 1
    saved.append(n)
    for i, b in enumerate(ids):
      l1[b] = True
      l1.move_to_end(b)
      if len(l1) > pages["l1"]:
        l1.popitem(last=False)
      if b not in l2:
        put_l2(b, ids[i - 1] if i else None)
  return {"hits": hits, "references": refs, "served_blocks": saved}


def three_tier_replay(base: str, num_requests: int) -> dict:
  """The conversation trace through L1 / L2 / L3 (``TIER_PAGES``) of ``kvjax.tiers``."""

  source, flat, starts, unique = request_blocks(num_requests)
  r_max = len(starts) - 1
  blocks = [flat[a:b] for a, b in zip(starts[:-1], starts[1:])]
  path = traces.default_trace_path()
  filled = (traces.load_mooncake(path).filled[:len(flat)] if source == path
            else np.full(len(flat), traces.MOONCAKE_BLOCK))
  s = TIER_PAGE_SIZE
  width = max(len(b) for b in blocks) + 1
  cfg = kvjax.CacheConfig(**TIER_DIMS, page_size=s, num_pages=TIER_PAGES["l1"], max_seqs=1,
                          max_pages_per_seq=width)
  tc = tiers.TierConfig(l2_pages=TIER_PAGES["l2"])           # int8 (the seed's L2)
  conf = l3mod.L3Config()                                     # int4, write_back
  d = tempfile.mkdtemp(dir=base)
  t = width * s
  served = []
  try:
    store = BlockStore(StoreConfig(path=d, capacity=TIER_PAGES["l3"], sync=False),
                       l3mod.l3_format(cfg, conf.preset))
    tier = l3mod.L3Tier(store, config=cfg, tiers=tc, l3=conf)
    ts = l3mod.with_l3(tiers.init(cfg, tc), tier)
    sid = jnp.array([0])
    t0 = time.perf_counter()
    for ids in blocks:
      toks = np.zeros((1, t), np.int32)
      n = len(ids) * s
      toks[0, :n] = block_tokens(ids)
      cached, ts = tiers.attach_prefix(ts, sid, jnp.asarray(toks), jnp.array([n + 1]),
                                       config=cfg, tiers=tc)
      c = int(cached[0])
      served.append(c // s)
      rest = np.zeros((1, t), np.int32)
      rest[0, :n + 1 - c] = toks[0, c:n + 1]
      ts = tiers.plan_step(ts, sid, jnp.asarray(rest), jnp.array([n + 1 - c]), config=cfg,
                           tiers=tc)
      ts = tiers.release(ts, sid, config=cfg)
    seconds = time.perf_counter() - t0
    st = {n: int(getattr(ts.stats, n)) for n in ts.stats.__dataclass_fields__}
    sst = store.stats()
    tier.close()
  finally:
    shutil.rmtree(d, ignore_errors=True)
  model = chain_model(blocks)
  refs = len(flat)
  saved_tokens = int(sum(filled[a:a + k].sum() for a, k in zip(starts[:-1], served)))
  model_saved = int(sum(filled[a:a + k].sum()
                        for a, k in zip(starts[:-1], model["served_blocks"])))
  measured = {k: st[f"{k}_hit_pages"] / refs for k in ("l1", "l2", "l3")}
  predicted = {k: v / refs for k, v in model["hits"].items()}
  return {"trace": source, "requests": r_max, "references": refs, "unique_blocks": unique,
          "pages": TIER_PAGES, "page_size_tokens": s, "dims": TIER_DIMS,
          "l2_preset": tc.l2_preset, "l3_preset": conf.preset, "write": conf.write.mode,
          "hit_ratio": {**measured, "total": sum(measured.values())},
          "predicted_hit_ratio": {**predicted, "total": sum(predicted.values())},
          "prefill_tokens_saved": saved_tokens,
          "predicted_prefill_tokens_saved": model_saved,
          "prompt_tokens": int(filled.sum()),
          "prefill_saved_fraction": saved_tokens / max(int(filled.sum()), 1),
          "counters": st, "store": {k: sst[k] for k in ("pages", "writes", "hits", "misses",
                                                        "checksum_failures")},
          "seconds": seconds, "seconds_per_request": seconds / max(r_max, 1)}


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
  ap.add_argument("--only-tiers", action="store_true",
                  help="run only the three-tier replay (with --tier-requests, --out)")
  ap.add_argument("--replay", choices=["first", "second", "both"], help=argparse.SUPPRESS)
  ap.add_argument("--blocks", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.replay:
    return replay_child(args)
  base = args.dir or tempfile.gettempdir()
  if args.only_tiers:   # the three-tier replay alone (e.g. the whole trace: slow)
    three = three_tier_replay(base, args.tier_requests or (300 if args.quick else 1000))
    common.write_json(args.out, {"benchmark": "store", "machine": common.machine(),
                                 "quick": args.quick, "tier_hit_ratio": three["hit_ratio"],
                                 "tier_predicted_hit_ratio": three["predicted_hit_ratio"],
                                 "tier_prefill_tokens_saved": three["prefill_tokens_saved"],
                                 "three_tier": three})
    print(json.dumps({k: three[k] for k in ("requests", "hit_ratio", "predicted_hit_ratio",
                                            "prefill_tokens_saved",
                                            "predicted_prefill_tokens_saved")}))
    return None
  n, reps = (512, 2) if args.quick else (2048, 3)
  requests = 1500 if args.quick else 1 << 30
  capacity = args.capacity or (2048 if args.quick else 8192)
  configs = [throughput(base, n, reps, c, s) for c, s in
             (("zstd", True), ("zstd", False), ("none", False))]
  restart = restart_retention(base, capacity, requests)
  pre = prefetch_effect(base, 300 if args.quick else 2000)
  three = three_tier_replay(base, args.tier_requests or (300 if args.quick else 1000))
  default = configs[0]
  result = {"benchmark": "store", "machine": common.machine(), "quick": args.quick,
            "dir": base, "l3_write_over_raw": default["l3_write_over_raw"],
            "l3_read_over_raw": default["l3_read_over_raw"],
            "latency_ms": default["latency_ms"], "configs": configs,
            "restart_hit_retention": restart["restart_hit_retention"], "restart": restart,
            "prefetch_hidden": pre["prefetch_hidden"],
            "prefetch_accuracy": pre["prefetch_accuracy"],
            "prefetch_wasted_bytes": pre["prefetch_wasted_bytes"], "prefetch": pre,
            "tier_hit_ratio": three["hit_ratio"],
            "tier_predicted_hit_ratio": three["predicted_hit_ratio"],
            "tier_prefill_tokens_saved": three["prefill_tokens_saved"], "three_tier": three}
  common.write_json(args.out, result)
  print(f"{'config':<16}{'l3 write':>10}{'raw write':>11}{'ratio':>7}{'l3 read':>10}"
        f"{'raw read':>10}{'ratio':>7}   MB/s")
  for c in configs:
    m = c["mb_per_s"]
    print(f"{c['compression'] + (' sync' if c['sync'] else ''):<16}{m['l3_write']:>10.0f}"
          f"{m['raw_write']:>11.0f}{c['l3_write_over_raw']:>7.2f}{m['l3_read']:>10.0f}"
          f"{m['raw_read']:>10.0f}{c['l3_read_over_raw']:>7.2f}")
  for k, v in default["latency_ms"].items():
    print(f"latency {k:<8} p50 {v['p50']:7.2f} ms  p99 {v['p99']:7.2f} ms")
  print(f"restart_hit_retention {restart['restart_hit_retention']:.3f} "
        f"({restart['restarted_second_half_hits']} / "
        f"{restart['uninterrupted_second_half_hits']} hits, capacity {capacity}, "
        f"{restart['requests']} requests, wrong pages served {restart['wrong_pages_served']})")
  print(f"prefetch: hidden {pre['prefetch_hidden']:.3f} of the L3 wait "
        f"({pre['l3_wait_s_off']:.2f} s -> {pre['l3_wait_s_on']:.2f} s), accuracy "
        f"{pre['prefetch_accuracy']:.3f}, wasted {pre['prefetch_wasted_bytes'] / 1e6:.1f} MB, "
        f"found {pre['found_off']} / {pre['found_on']} of {pre['references']} blocks (off / on), "
        f"{pre['requests']} requests")
  hr, pr = three["hit_ratio"], three["predicted_hit_ratio"]
  print(f"three tiers ({three['requests']} requests, {three['references']} blocks, L1/L2/L3 "
        f"{TIER_PAGES['l1']}/{TIER_PAGES['l2']}/{TIER_PAGES['l3']} pages): hit ratio "
        f"L1 {hr['l1']:.4f} L2 {hr['l2']:.4f} L3 {hr['l3']:.4f} total {hr['total']:.4f}; "
        f"model {pr['l1']:.4f} / {pr['l2']:.4f} / {pr['l3']:.4f} / {pr['total']:.4f}; "
        f"prefill tokens saved {three['prefill_tokens_saved']} (model "
        f"{three['predicted_prefill_tokens_saved']}) of {three['prompt_tokens']}")


if __name__ == "__main__":
  main()
