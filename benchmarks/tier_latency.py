"""Access latency per tier: a prefix of 1 or 64 pages attached from L1, L2 or L3.

Reported (JSON, benchmarks/results/tier_latency.json):
  latency_ms[tier][n]: p50 / p99 (and min, samples) of the wall time of one tiered
    ``attach_prefix`` (``kvjax.tiers``, blocked until its result is on the host) that
    serves a prefix of n pages (n = 1, 64) wholly from that tier: L1 (an index hit,
    nothing moves), L2 (int8 pages promoted and dequantized into L1), L3 (a
    ``BlockStore`` on a local directory: int4 pages read, verified, promoted into L2
    and L1). SmolLM2-shaped pages (30 layers, 3 KV heads, head_dim 64, 16 tokens;
    bf16 L1). Each sample is a fresh prompt pushed down to its tier by filler prompts
    first (untimed); the served tier is checked from the hit counters.
  over_l1[tier][n]: p50 over L1's p50 at the same n (the same call with nothing to
    move: the baseline).
  l3_gb_per_s[n]: L3-format bytes served over L3's p50 (what the promotion moves).

  python benchmarks/tier_latency.py [--quick] [--out FILE] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax import tiers as kt
from kvjax.store import BlockStore
from kvjax.store import StoreConfig
from kvjax.store import WritePolicy
from kvjax.tiers import l3 as l3mod

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SMOLLM2 = dict(num_layers=30, page_size=16, num_kv_heads=3, head_dim=64)
SIZES = (1, 64)
FILL = 72             # pages of a filler prompt
L1_PAGES, L2_PAGES, L3_PAGES = 96, 320, 4096
COLS = 80             # page-table columns (a filler and the largest prefix fit)


class Bench:
  """One tiered cache (L1 / L2 int8 / L3 int4 on disk) and fresh prompts to push down."""

  def __init__(self, path: str):
    self.cfg = kvjax.CacheConfig(**SMOLLM2, num_pages=L1_PAGES, max_seqs=1,
                                 max_pages_per_seq=COLS, dtype="bfloat16")
    self.tc = kt.TierConfig(l2_pages=L2_PAGES, l2_preset="int8")
    conf = l3mod.L3Config(preset="int4", write=WritePolicy("write_back"))
    store = BlockStore(StoreConfig(path=path, capacity=L3_PAGES, sync=False),
                       l3mod.l3_format(self.cfg, conf.preset))
    self.tier = l3mod.L3Tier(store, config=self.cfg, tiers=self.tc, l3=conf)
    self.ts = l3mod.with_l3(kt.init(self.cfg, self.tc), self.tier)
    self.rng = np.random.default_rng(0)
    self.one = jnp.array([0])

  def prompt(self, pages: int) -> np.ndarray:
    return self.rng.integers(1, 50000, pages * SMOLLM2["page_size"]).astype(np.int32)

  def padded(self, toks: np.ndarray) -> jnp.ndarray:
    row = np.zeros((1, COLS * SMOLLM2["page_size"]), np.int32)
    row[0, :len(toks)] = toks
    return jnp.asarray(row)

  def attach(self, toks: np.ndarray) -> tuple:
    """One tiered attach of ``toks`` (+1 token so every page can be a hit); seconds and
    the pages each tier served."""
    before = [int(getattr(self.ts.stats, f"l{i}_hit_pages")) for i in (1, 2, 3)]
    t0 = time.perf_counter()
    cached, self.ts = kt.attach_prefix(self.ts, self.one, self.padded(toks),
                                       jnp.array([len(toks) + 1]), config=self.cfg,
                                       tiers=self.tc)
    c = int(cached[0])   # on the host: the attach is done
    dt = time.perf_counter() - t0
    got = [int(getattr(self.ts.stats, f"l{i}_hit_pages")) - before[i - 1] for i in (1, 2, 3)]
    return dt, c, got

  def write(self, toks: np.ndarray) -> None:
    """Compute ``toks`` (attach, plan the rest), then release: its full pages are cached."""
    _, c, _ = self.attach(toks)
    rest = np.zeros(len(toks) + 1, np.int32)
    rest[:len(toks) - c] = toks[c:]
    self.ts = kt.plan_step(self.ts, self.one, self.padded(rest[:len(toks) - c]),
                           jnp.array([len(toks) - c + 1]), config=self.cfg, tiers=self.tc)
    self.ts = kt.release(self.ts, self.one, config=self.cfg)

  def push(self, fillers: int) -> None:
    for _ in range(fillers):
      self.write(self.prompt(FILL))
    self.ts = kt.sync(self.ts, config=self.cfg, tiers=self.tc)

  def sample(self, tier: str, n: int) -> float:
    toks = self.prompt(n)
    self.write(toks)
    self.ts = kt.sync(self.ts, config=self.cfg, tiers=self.tc)
    if tier != "l1":   # out of L1 (into L2), and for L3 out of L2 as well
      self.push(-(-L1_PAGES // FILL) + 1 if tier == "l2" else -(-L2_PAGES // FILL) + 2)
    dt, c, got = self.attach(toks)
    want = {"l1": [n, 0, 0], "l2": [0, n, 0], "l3": [0, 0, n]}[tier]
    if got != want or c != n * SMOLLM2["page_size"]:
      raise RuntimeError(f"a {tier} sample of {n} pages was served {got} (cached {c})")
    self.ts = kt.release(self.ts, self.one, config=self.cfg)
    return dt


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                "tier_latency.json"))
  ap.add_argument("--dir", default=None, help="where the L3 store lives (default: a temp dir)")
  args = ap.parse_args()
  samples = {1: 8, 64: 4} if args.quick else {1: 30, 64: 12}
  d = tempfile.mkdtemp(dir=args.dir, prefix="kvjax-latency-")
  try:
    b = Bench(d)
    for tier in ("l1", "l2", "l3"):   # compile every shape once (untimed)
      for n in SIZES:
        b.sample(tier, n)
    lat = {t: {} for t in ("l1", "l2", "l3")}
    for n in SIZES:
      for tier in lat:
        ms = np.array([b.sample(tier, n) for _ in range(samples[n])]) * 1e3
        lat[tier][n] = {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
                        "min": float(ms.min()), "samples": len(ms)}
    page_bytes = b.tier.store.format.page_bytes
    b.tier.close()
  finally:
    shutil.rmtree(d, ignore_errors=True)
  over = {t: {n: lat[t][n]["p50"] / lat["l1"][n]["p50"] for n in SIZES} for t in lat}
  result = {"benchmark": "tier_latency", "machine": common.machine(), "quick": args.quick,
            "config": {**SMOLLM2, "l1_pages": L1_PAGES, "l2_pages": L2_PAGES,
                       "l3_pages": L3_PAGES, "l2_preset": "int8", "l3_preset": "int4",
                       "l1_dtype": "bfloat16", "l3_page_bytes": page_bytes},
            "latency_ms": lat, "over_l1": over,
            "l3_gb_per_s": {n: n * page_bytes / (lat["l3"][n]["p50"] / 1e3) / 1e9
                            for n in SIZES}}
  common.write_json(args.out, result)
  print(f"{'tier':<6}" + "".join(f"{f'{n} page(s) p50 / p99 ms':>28}" for n in SIZES)
        + "   p50 over L1")
  for t in lat:
    print(f"{t:<6}" + "".join(f"{lat[t][n]['p50']:>16.2f} / {lat[t][n]['p99']:>9.2f}"
                              for n in SIZES)
          + "   " + " / ".join(f"{over[t][n]:.2f}" for n in SIZES))


if __name__ == "__main__":
  main()
