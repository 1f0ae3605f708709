"""The L2 tier: page-move throughput against a plain copy, and the trace replayed through it.

Reported (JSON, benchmarks/results/tiers.json; ``--quick``: tiers_quick.json):
  demote_over_copy / promote_over_copy: throughput of ``kvjax.tiers.move.move_pages``
    moving ``--pages`` pages L1 -> L2 (demote) and L2 -> L1 (promote) between pools of
    a SmolLM2-shaped page (30 layers, 3 KV heads, head_dim 64, page 16; bf16 L1; L2
    int8 and bf16), over a jitted plain device-to-device copy of the same bytes (the
    moved L1-format bytes, one contiguous array) in the same run; best of ``reps``
    interleaved runs. With the destination pool donated (``move_into(donate=True)``, what
    the host loops run) and without (``*_functional``: the functional update writes a new
    destination pool).
  hit_ratio_l1 / hit_ratio_l1_l2: the Mooncake conversation trace replayed through the
    REAL cache (``kvjax.sim.replay.replay_cache``: one page of synthetic tokens per
    512-token block, 1 layer x 1 head x 8, page 4), L1 = 1,024 pages alone and with
    L2 = 4,096 pages; page hits over pages looked up.
  sim_*: the same configurations in the simulator's two-tier model
    (``kvjax.sim.tiers.two_tier``); ``sim_vs_cache_max_diff`` is the largest absolute
    difference of a hit ratio between model and cache over every replayed configuration.
  global_over_private: the trace split by conversation (the block after the shared
    first one names it; conversations alternate between 2 processes by first
    appearance), each process with its own L1 of 1,024 pages: L1 + L2 hit ratio with
    one L2 of 4,096 pages both use, over two private L2s of 2,048 each (cache and model).
  The real-cache replays cover the first ``--requests`` requests (quick: 1,500; the
  default: all 12,031); the model also reports the whole trace (``sim_full``).

  python benchmarks/tiers.py [--quick] [--out FILE] [--requests N] [--pages N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax import tiers as kt
from kvjax.sim import traces
from kvjax.sim.replay import replay_cache
from kvjax.sim.tiers import two_tier
from kvjax.tiers import move

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SMOLLM2 = dict(num_layers=30, page_size=16, num_kv_heads=3, head_dim=64)
L1_PAGES, L2_PAGES = 1024, 4096


# ----------------------------------------------------------------------------- throughput


def timed(fn, *args, reps: int) -> float:
  """Best wall time of ``fn(*args)`` (blocked until ready) over ``reps`` runs."""
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def throughput(layers: int, pages: int, reps: int) -> dict:
  """demote / promote over a plain copy of the same bytes, per L2 preset."""
  shape = dict(SMOLLM2, num_layers=layers)
  p1, p2 = 2 * pages, 4 * pages
  cfg = kvjax.CacheConfig(**shape, num_pages=p1, max_seqs=1, max_pages_per_seq=1,
                          dtype="bfloat16")
  rng = np.random.default_rng(0)
  src_ids = move.pad_ids(rng.permutation(p1)[:pages], 0, minimum=pages)
  dst_ids = move.pad_ids(rng.permutation(p2)[:pages], p2, minimum=pages)
  copy = jax.jit(lambda a: a + jnp.zeros((), a.dtype))
  out = {}
  for preset in ("int8", "bf16"):
    tc = kt.TierConfig(l2_pages=p2, l2_preset=preset)
    ts = kt.init(cfg, tc)
    k1 = ts.l1.k.replace(data=jnp.asarray(rng.standard_normal(ts.l1.k.data.shape),
                                          ts.l1.k.data.dtype))
    v1 = ts.l1.v.replace(data=k1.data * 0.5)
    k2, v2 = move.move_pages(k1, v1, ts.l2.k, ts.l2.v, src_ids[:pages] * 0 + src_ids,
                             jnp.arange(pages, dtype=jnp.int32))
    moved = pages * (move.page_bytes(k1) + move.page_bytes(v1))
    flat = jnp.zeros((moved // 2,), jnp.bfloat16)
    t = {"copy": [], "demote": [], "promote": [], "demote_functional": [],
         "promote_functional": []}
    for _ in range(reps):
      t["copy"].append(timed(copy, flat, reps=3))
      t["demote_functional"].append(timed(move.move_pages, k1, v1, k2, v2, src_ids, dst_ids,
                                          reps=3))
      t["promote_functional"].append(timed(move.move_pages, k2, v2, k1, v1, dst_ids, src_ids,
                                           reps=3))
      for _ in range(3):
        t0 = time.perf_counter()
        k2, v2 = jax.block_until_ready(move.move_into(k1, v1, k2, v2, src_ids, dst_ids,
                                                      donate=True))
        t["demote"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        k1, v1 = jax.block_until_ready(move.move_into(k2, v2, k1, v1, dst_ids, src_ids,
                                                      donate=True))
        t["promote"].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in t.items()}
    gbs = {k: moved / v / 1e9 for k, v in best.items()}
    out[preset] = {
        "moved_bytes_l1_format": moved, "gb_per_s": gbs,
        "demote_over_copy": best["copy"] / best["demote"],
        "promote_over_copy": best["copy"] / best["promote"],
        "demote_over_copy_functional": best["copy"] / best["demote_functional"],
        "promote_over_copy_functional": best["copy"] / best["promote_functional"]}
  return {"layers": layers, "pages": pages, "l1_pool_pages": p1, "l2_pool_pages": p2,
          "page_shape": shape, "l1_dtype": "bfloat16", "presets": out,
          "demote_over_copy": out["int8"]["demote_over_copy"],
          "promote_over_copy": out["int8"]["promote_over_copy"]}


# ----------------------------------------------------------------------------- replay


def conversations(trace) -> np.ndarray:
  """int [R]: process (0 / 1) of each request, conversations alternating by first
  appearance; a conversation is named by the request's second block (its first if it
  has one)."""
  starts = np.searchsorted(trace.request, np.arange(trace.num_requests))
  lens = np.diff(np.append(starts, trace.num_refs))
  key = np.where(lens > 1, trace.block[np.minimum(starts + 1, trace.num_refs - 1)],
                 -1 - trace.block[starts])
  order = {}
  return np.array([order.setdefault(int(k), len(order)) % 2 for k in key], np.int64)


def ratios(m: dict) -> dict:
  return {k: m[k] for k in ("lookups", "l1_hits", "l2_hits", "hit_ratio_l1",
                            "hit_ratio_l1_l2")}


def replay(trace, requests: int) -> dict:
  """The replays (real cache and model) and their comparison."""
  procs = conversations(trace)
  runs = {
      "l1_alone": dict(l1_pages=L1_PAGES, l2_pages=0),
      "l1_l2": dict(l1_pages=L1_PAGES, l2_pages=L2_PAGES),
      "global_2proc": dict(l1_pages=L1_PAGES, l2_pages=L2_PAGES, procs=procs, shared_l2=True),
      "private_2proc": dict(l1_pages=L1_PAGES, l2_pages=L2_PAGES // 2, procs=procs,
                            shared_l2=False),
  }
  cache, sim, secs = {}, {}, {}
  for name, kw in runs.items():
    t0 = time.perf_counter()
    got = replay_cache(trace, requests=requests, **kw)
    secs[name] = time.perf_counter() - t0
    want = two_tier(trace, requests=requests, **kw)
    cache[name], sim[name] = ratios(got), ratios(want)
    cache[name]["requests_differing_from_sim"] = int(np.sum(np.any(
        got["per_request"] != want["per_request"], axis=1)))
    print(name, f"{secs[name]:.0f}s", cache[name], sim[name], flush=True)
  diffs = [abs(cache[n][k] - sim[n][k]) for n in runs for k in ("hit_ratio_l1",
                                                                 "hit_ratio_l1_l2")]
  full = {name: ratios(two_tier(trace, **kw)) for name, kw in runs.items()}
  return {
      "requests": requests, "lookups": cache["l1_l2"]["lookups"],
      "l1_pages": L1_PAGES, "l2_pages": L2_PAGES, "page_size": 4,
      "hit_ratio_l1": cache["l1_alone"]["hit_ratio_l1"],
      "hit_ratio_l1_l2": cache["l1_l2"]["hit_ratio_l1_l2"],
      "sim_hit_ratio_l1": sim["l1_alone"]["hit_ratio_l1"],
      "sim_hit_ratio_l1_l2": sim["l1_l2"]["hit_ratio_l1_l2"],
      "sim_vs_cache_max_diff": max(diffs),
      "global_over_private": (cache["global_2proc"]["hit_ratio_l1_l2"]
                              / max(cache["private_2proc"]["hit_ratio_l1_l2"], 1e-12)),
      "sim_global_over_private": (sim["global_2proc"]["hit_ratio_l1_l2"]
                                  / max(sim["private_2proc"]["hit_ratio_l1_l2"], 1e-12)),
      "cache": cache, "sim": sim, "replay_seconds": secs,
      "sim_full": full,
      "sim_full_global_over_private": (full["global_2proc"]["hit_ratio_l1_l2"]
                                       / max(full["private_2proc"]["hit_ratio_l1_l2"], 1e-12)),
      "processes_requests": np.bincount(conversations(trace)[:requests]).tolist(),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="fewer layers, a trace prefix")
  parser.add_argument("--out", default=None)
  parser.add_argument("--requests", type=int, default=None,
                      help="real-cache replay prefix (default: quick 1500, else all)")
  parser.add_argument("--pages", type=int, default=64, help="pages per move")
  parser.add_argument("--trace", default=None, help="Mooncake JSONL (default: shared data)")
  args = parser.parse_args()
  out = args.out or ("benchmarks/results/tiers_quick.json" if args.quick
                     else "benchmarks/results/tiers.json")
  res = {"benchmark": "tiers", "quick": args.quick, "machine": common.machine()}
  res["throughput"] = throughput(8 if args.quick else 30, args.pages, 2 if args.quick else 5)
  for k in ("demote_over_copy", "promote_over_copy"):
    res[k] = res["throughput"][k]
  print({k: res[k] for k in ("demote_over_copy", "promote_over_copy")}, flush=True)
  path = args.trace or traces.default_trace_path("conversation_trace.jsonl")
  if os.path.exists(path):
    trace = traces.load_mooncake(path)
    res["trace"] = os.path.basename(path)
  else:
    trace = traces.generate(600, seed=0)
    res["trace"] = "generated (600 requests, seed 0): the shared trace file is absent"
  requests = args.requests or (1500 if args.quick else trace.num_requests)
  res["replay"] = replay(trace, min(requests, trace.num_requests))
  for k in ("hit_ratio_l1", "hit_ratio_l1_l2", "sim_vs_cache_max_diff", "global_over_private"):
    res[k] = res["replay"][k]
  common.write_json(out, res)
  print({k: res[k] for k in ("demote_over_copy", "promote_over_copy", "hit_ratio_l1",
                             "hit_ratio_l1_l2", "sim_vs_cache_max_diff",
                             "global_over_private")})
  print("wrote", out)


if __name__ == "__main__":
  main()
