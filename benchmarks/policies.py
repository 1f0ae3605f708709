"""Eviction policies: hit ratios, gap to MIN, libCacheSim side by side, speed, held-out default.

    python benchmarks/policies.py [--quick] [--out FILE] [--trace PATH] [--policies A,B]
                                  [--refit]

* **Conversation trace.** Parameters of the tunable policies were fitted on the first 70 %
  of the trace (by requests; ``--refit`` fits them again, ~25 min: one parameter set per
  policy for all capacities, the best mean share of the LRU-to-MIN gap among those never
  more than 2 points below LRU; otherwise ``FITTED``, the result of the last refit).
  Hit ratios are reported on the last 30 % (``hit_ratio``: the whole trace is replayed,
  the cache warms on the first 70 %) and on the whole trace (``hit_ratio_full_trace``).
  ``gap_closed = (policy - LRU) / (MIN - LRU)`` per capacity.
* **libCacheSim** (optional: ``pip install kvjax[bench]``; skipped with a note when
  absent), in the same run and on the same per-block accounting (every block reference
  is a request for an object of size 1, the cache holds ``capacity`` objects): hit
  ratios of its LRU, FIFO, LRU-K(2), ARC, S3-FIFO, MQ, W-TinyLFU, LeCaR and Belady
  (``libcachesim.hit_ratio``), and ``sim_over_libcachesim`` per kvjax policy: libCacheSim's
  C loop (``process_trace``, trace already in its binary format, hash table sized to the
  trace) for the same policy over kvjax's simulator time for that policy (compiled, the
  policy's default path), whole trace at 6,144 blocks; > 1 means kvjax is faster. For
  the default policy, 16 configurations in one kvjax call against 16 libCacheSim runs
  (``speed_libcachesim``). kvjax policies without a libCacheSim twin are compared with
  libCacheSim's policy of the closest design (``LIBCACHESIM_TWIN``).
* **The sampled path** (``sampled_at_6144``, ``sampled_over_libcachesim``): every scoring
  policy again with ``sample=64`` candidates scored per miss (whole trace, 6,144
  blocks), its time and warm hit ratio beside the exact path's, and the default's
  16-configuration sweep on it. Both paths run with XLA:CPU's loop kernels on
  (``kvjax.xla_cpu``; ``machine.xla_loop_kernels``), as the ``kvjax`` commands do.
* **Held-out choice of the default** (``heldout``): traces no parameter was tuned on,
  with other reuse patterns than the conversation trace (generated: shared documents,
  agent loops, scans through one-off documents, many tenants; and the conversation
  trace split into time thirds, each replayed cold), at 3 capacities each (1 %, 4 % and
  12 % of the trace's distinct blocks). Every candidate runs with its shipped parameters.
  The rule: a candidate qualifies when it is never more than 2 points below LRU, warm
  (last 30 % of each trace, cache warmed on the rest) or cold (whole trace); among those,
  ``default_policy`` is the one with the best mean warm ``gap_closed`` over the generated
  traces and the thirds (the conversation trace's own figure, where ``autoclass`` was
  designed, is reported and not used).

``--policies``: report only these (plus ``lru`` and ``min``; ``OPTIONAL`` ones too).
``--quick``: the first 2,000 requests (or a generated trace when the real one is absent),
capacities divided by 8, small held-out traces. Writes JSON (default
benchmarks/results/policies.json) and prints the machine and a short table last.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import sys
import tempfile
import time

import numpy as np

from kvjax.policies import make_params
from kvjax.policies.scoring import NEVER
from kvjax.sim import simulator, traces
from kvjax.sim.arc import HOST_POLICIES
from kvjax.sim.exact import EXACT_POLICIES
import common  # benchmarks/common.py: machine description, results writer

CAPACITIES = (1024, 4096, 6144, 16384)
REPORT = ("lru", "fifo", "lru2", "s3fifo", "tinylfu", "autofreq", "autoclass", "arc",
          "arc-bypass", "min")  # --policies may add OPTIONAL ones
OPTIONAL = ("lfu", "greedydual", "freqlru")
# Fitted on the first 70 % of the conversation trace by ``--refit`` (the run of commit
# c2dcdf7, benchmarks/results/policies.json of then); policies not named keep defaults.
FITTED = {"lfu": {"half_life": 32768.0}, "s3fifo": {"small_frac": 0.3},
          "weighted": {"age_scale": 32768.0}, "greedydual": {"pos_weight": 0.0},
          "lecar": {"learning_rate": 0.1}, "tinylfu": {"sample_factor": 2.0},
          "freqlru": {"credit": 16384.0}, "autoclass": {"credit": 16384.0}}
GRIDS = {
    "lfu": {"half_life": [2048.0, 8192.0, 32768.0]},
    "s3fifo": {"small_frac": [0.05, 0.1, 0.3]},
    "weighted": {"age_scale": [2048.0, 8192.0, 32768.0]},
    "greedydual": {"pos_weight": [0.0, 0.05, 0.5]},
    "lecar": {"learning_rate": [0.1, 0.45, 2.0]},
    "tinylfu": {"sample_factor": [2.0, 10.0, 50.0]},
    "freqlru": {"credit": [8192.0, 16384.0, 24576.0, 32768.0, 49152.0]},
    "autoclass": {"credit": [8192.0, 16384.0, 32768.0]},
}
# Held-out candidates for the default: (label, policy, parameter overrides)
CANDIDATES = (
    ("lru", "lru", {}),
    ("arc", "arc", {}),
    ("arc-bypass", "arc-bypass", {}),
    ("autoclass", "autoclass", {}),
    ("autoclass-no-bypass", "autoclass", {"admit_partial": 1.0}),
    ("autofreq", "autofreq", {}),
    ("s3fifo", "s3fifo", {}),
    ("lru2", "lru2", {}),
)
LIBCACHESIM = ("LRU", "FIFO", "LRUK", "ARC", "S3FIFO", "MQ", "WTinyLFU", "LeCaR", "Belady")
LIBCACHESIM_TWIN = {"lru": "LRU", "fifo": "FIFO", "lru2": "LRUK", "lfu": "LFU",
                    "s3fifo": "S3FIFO", "tinylfu": "WTinyLFU", "arc": "ARC",
                    "arc-bypass": "ARC", "min": "Belady", "greedydual": "GDSF",
                    "freqlru": "MQ", "autofreq": "MQ", "autoclass": "MQ"}
SWEEP_CONFIGS = 16
SAMPLE = 64  # candidates per miss of the sampled path reported beside the exact one
SWEEP_REFS = 20_000  # references of a scoring policy's sweep (see speed_libcachesim)
GAP_TARGET = 0.25
LRU_SLACK = 0.02


def py_lru_hits(refs, capacity) -> int:
  """Plain-Python LRU (the baseline for ``sim_over_python``)."""
  cache, hits = collections.OrderedDict(), 0
  for b in refs:
    if b in cache:
      cache.move_to_end(b)
      hits += 1
    else:
      if len(cache) >= capacity:
        cache.popitem(last=False)
      cache[b] = None
  return hits


def split_point(trace: traces.Trace, frac: float = 0.7) -> tuple[int, int]:
  """(request, reference) index where the last ``1 - frac`` of references begins."""
  starts = np.flatnonzero(trace.position == 0)
  r = int(np.searchsorted(starts, frac * trace.num_refs))
  return r, int(starts[r]) if r < len(starts) else trace.num_refs


def gap(h, lru, mn):
  return float((h - lru) / (mn - lru)) if mn > lru else 0.0


def grid_params(name: str, grid: dict) -> list[dict]:
  """Every combination of the grid's values (``{param: [values]}``), in order.

  >>> grid_params("x", {"a": [1, 2], "b": [0]})
  [{'a': 1, 'b': 0}, {'a': 2, 'b': 0}]
  """
  del name
  out = [{}]
  for key, values in grid.items():
    out = [{**d, key: v} for d in out for v in values]
  return out


def _params(name, overrides):
  return None if name in HOST_POLICIES else make_params(name, **overrides)


def run_hits(trace, capacities, name, overrides=None) -> np.ndarray:
  """bool [V, N] hit flags (one vmapped call for all capacities; ARC on the host)."""
  return simulator.simulate_hits(trace, list(capacities), name,
                                 _params(name, overrides or {}))


def fit(trace, capacities, grids, log) -> tuple[dict, dict]:
  """Best parameters per policy on ``trace`` (the first 70 %): ``--refit``."""
  base = {p: {c: float(simulator.simulate_hits(trace, c, p).mean()) for c in capacities}
          for p in ("lru", "min")}
  chosen, report = {}, {}
  for name, grid in grids.items():
    cands = grid_params(name, grid)
    ratios = np.zeros((len(cands), len(capacities)))
    for j, c in enumerate(capacities):
      t0 = time.perf_counter()
      hits = simulator.simulate_hits(trace, [c] * len(cands), name,
                                     [make_params(name, **k) for k in cands])
      ratios[:, j] = hits.mean(axis=1)
      log(f"  fit {name:<14s} cap {c:>6d}: {np.round(ratios[:, j], 4).tolist()} "
          f"({time.perf_counter() - t0:.1f} s)")
    gaps = np.array([[gap(ratios[i, j], base["lru"][c], base["min"][c])
                      for j, c in enumerate(capacities)] for i in range(len(cands))])
    safe = np.array([all(ratios[i, j] >= base["lru"][c] - LRU_SLACK
                         for j, c in enumerate(capacities)) for i in range(len(cands))])
    score = gaps.mean(axis=1) - 10.0 * (~safe)
    best = int(np.argmax(score))
    chosen[name] = cands[best]
    report[name] = {"candidates": cands, "hit_ratio": ratios.round(5).tolist(),
                    "mean_gap_closed": gaps.mean(axis=1).round(4).tolist(),
                    "never_2pts_below_lru": safe.tolist(), "chosen": cands[best]}
  return chosen, {"lru_min": base, "policies": report}


def evaluate(trace, capacities, names, params, cut, speed_cap, log):
  """Hit ratios on references ``cut:`` (warm) and on the whole trace; the compiled time
  of one run at ``speed_cap`` (a second call)."""
  last, full, seconds = {}, {}, {}
  for name in names:
    last[name], full[name] = {}, {}
    for c in capacities:
      t0 = time.perf_counter()
      h = run_hits(trace, [c], name, params.get(name))[0]
      dt = time.perf_counter() - t0
      last[name][c], full[name][c] = float(h[cut:].mean()), float(h.mean())
      if c == speed_cap:
        t1 = time.perf_counter()
        again = run_hits(trace, [c], name, params.get(name))[0]
        seconds[name] = time.perf_counter() - t1
        assert (again == h).all()
      log(f"  {name:<14s} cap {c:>6d}: last30 {last[name][c]:.4f} full {full[name][c]:.4f} "
          f"({dt:.1f} s)")
  return last, full, seconds


def sampled_speed(trace, names, params, capacity, cut, exact_last, log,
                  sample: int = SAMPLE) -> dict:
  """The sampled path (``sample`` candidates scored per miss) of every scoring policy at
  ``capacity``: its compiled time (a second call) and warm hit ratio next to the exact
  scoring path's (``exact_last``)."""
  out = {}
  for name in names:
    if name in HOST_POLICIES or name in EXACT_POLICIES:
      continue
    run = lambda: simulator.simulate_hits(trace, [capacity], name,  # noqa: E731
                                          _params(name, params.get(name) or {}),
                                          sample=sample)[0]
    run()
    t, h = _best_time(run, 1)
    r = float(h[cut:].mean())
    out[name] = {"sample": sample, "seconds": t, "hit_ratio": r,
                 "exact_hit_ratio": exact_last[name][capacity],
                 "points_vs_exact": r - exact_last[name][capacity]}
    log(f"  sampled {name:<12s} K={sample}: {t:.2f} s, last30 {r:.4f} "
        f"(exact {exact_last[name][capacity]:.4f})")
  return out


def _best_time(fn, repeat: int) -> tuple[float, object]:
  times, out = [], None
  for _ in range(repeat):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return min(times), out


def speed_python(trace, capacity, log) -> dict:
  """Simulator LRU (its exact O(1) path) against plain-Python LRU, same process."""
  refs = trace.block.tolist()
  py, py_hits = _best_time(lambda: py_lru_hits(refs, capacity), 3)
  simulator.simulate_hits(trace, capacity, "lru")
  sim, h = _best_time(lambda: simulator.simulate_hits(trace, capacity, "lru"), 5)
  assert int(h.sum()) == py_hits, "simulator and Python LRU disagree"
  log(f"  speed vs python: python {py:.3f} s, sim {sim:.4f} s")
  return {"capacity": capacity, "python_lru_s": py, "sim_lru_s": sim,
          "sim_over_python": py / sim}


# ---------------------------------------------------------------- libCacheSim


def load_libcachesim(log):
  try:
    import libcachesim  # optional benchmark dependency: pip install kvjax[bench]
  except ImportError:
    log("libcachesim not installed (pip install 'kvjax[bench]'): its comparison is skipped")
    return None
  return libcachesim


class LibCacheSim:
  """One trace in libCacheSim's binary ``oracleGeneral`` format (per-block accounting)."""

  def __init__(self, lcs, trace: traces.Trace, folder: str):
    self.lcs, self.n = lcs, trace.num_refs
    rec = np.zeros(self.n, np.dtype([("t", "<u4"), ("id", "<u8"), ("size", "<u4"),
                                     ("next", "<i8")]))
    rec["t"] = np.arange(self.n)
    rec["id"] = trace.block.astype(np.uint64) + 1
    rec["size"] = 1
    nxt = trace.next_use.astype(np.int64)
    rec["next"] = np.where(nxt >= NEVER, -1, nxt)  # -1: never again
    self.path = os.path.join(folder, f"{trace.name.replace('/', '_')}.oracleGeneral.bin")
    rec.tofile(self.path)
    self.reader = lcs.TraceReader(self.path, lcs.TraceType.ORACLE_GENERAL_TRACE)
    # the hash table sized to the distinct blocks (its default 2^24 buckets makes LRU
    # ~10x slower here: the fair, faster setting)
    self.hashpower = max(12, math.ceil(math.log2(max(trace.num_blocks, 2))))

  def cache(self, name: str, capacity: int):
    lcs, kw = self.lcs, {"hashpower": self.hashpower}
    if name == "LRUK":
      return lcs.LRUK(capacity, k=2, **kw)
    return getattr(lcs, name)(capacity, **kw)

  def hits(self, name: str, capacity: int, max_req: int = -1) -> int:
    miss = self.cache(name, capacity).process_trace(self.reader, 0, max_req)[0]
    n = self.n if max_req < 0 else max_req
    return int(round((1.0 - miss) * n))

  def ratios(self, name: str, capacity: int, cut: int) -> tuple[float, float]:
    """(last ``N - cut`` references warm, whole trace): online policies only see the
    past, so the first ``cut`` references hit the same in both runs."""
    full = self.hits(name, capacity)
    first = self.hits(name, capacity, cut) if cut > 0 else 0
    return (full - first) / max(self.n - cut, 1), full / self.n

  def seconds(self, name: str, capacity: int, repeat: int = 3) -> float:
    return _best_time(lambda: self.cache(name, capacity).process_trace(self.reader), repeat)[0]


def libcachesim_table(lc: LibCacheSim, capacities, cut, log) -> tuple[dict, dict]:
  last, full = {}, {}
  for name in LIBCACHESIM:
    last[name], full[name] = {}, {}
    for c in capacities:
      last[name][c], full[name][c] = lc.ratios(name, c, cut)
    log(f"  libCacheSim {name:<9s} last30 " +
        " ".join(f"{last[name][c]:.4f}" for c in capacities))
  return last, full


def sweep_capacities(low: int, high: int, k: int = SWEEP_CONFIGS) -> list[int]:
  """k capacities log-spaced over [low, high] (the 16 configurations of the sweep).

  >>> sweep_capacities(1024, 16384, 5)
  [1024, 2048, 4096, 8192, 16384]
  """
  return [int(round(low * (high / low) ** (i / (k - 1)))) for i in range(k)]


def sweep_grid(name: str, k: int = SWEEP_CONFIGS) -> list[dict]:
  """k parameter sets of ``name``: its first tunable parameter from 1/4x to 4x its
  default (log-spaced; ``admit_partial`` is a switch and stays).

  >>> [round(g["half_life"]) for g in sweep_grid("lfu", 3)]
  [1024, 4096, 16384]
  """
  from kvjax.policies import get_policy
  pol = get_policy(name)
  key = next(p for p in pol.defaults if p != "admit_partial")
  v = float(pol.defaults[key])
  return [{key: v * 2.0 ** (-2 + 4 * i / (k - 1))} for i in range(k)]


def speed_libcachesim(lc_factory, trace, seconds, capacity, default, params, log,
                      sampled=None) -> dict:
  """``sim_over_libcachesim`` per policy, and the 16-configuration sweep of the default.

  The sweep: for ARC (no parameters), 16 capacities log-spaced over the benchmark's range,
  whole trace, against libCacheSim's ARC at the same 16 capacities. For a scoring policy,
  16 parameter sets (``sweep_grid``) at ``capacity`` in one vmapped ``sweep`` call, on
  the first ``SWEEP_REFS`` references (a whole-trace sweep takes minutes), against 16
  runs of its libCacheSim twin on the same references.
  """
  lc = lc_factory(trace)
  out = {}
  for name, t in seconds.items():
    twin = LIBCACHESIM_TWIN.get(name)
    if twin is None:
      continue
    lt = lc.seconds(twin, capacity)
    out[name] = {"libcachesim_policy": twin, "kvjax_s": t, "libcachesim_s": lt,
                 "sim_over_libcachesim": lt / t}
    if sampled and name in sampled:
      ts = sampled[name]["seconds"]
      out[name].update(sampled_s=ts, sampled_over_libcachesim=lt / ts)
    log(f"  speed {name:<12s} kvjax {t:.3f} s, libCacheSim {twin} {lt:.3f} s: "
        f"{lt / t:.3f}")
  twin = LIBCACHESIM_TWIN.get(default, "LRU")
  if default in HOST_POLICIES:
    sub = trace
    caps = sweep_capacities(*((CAPACITIES[0], CAPACITIES[-1]) if trace.num_refs > 100_000
                              else (max(capacity // 6, 8), capacity * 3)))
    fn = lambda: simulator.simulate_hits(sub, caps, default)  # noqa: E731  (host lists)
    configs = caps
    lsub = lc
    lc_time = lambda: sum(lsub.seconds(twin, c, 1) for c in caps)  # noqa: E731
  else:
    r = int(np.searchsorted(np.flatnonzero(trace.position == 0), SWEEP_REFS))
    sub = trace.slice_requests(0, max(r, 1), name=f"{trace.name}-first{SWEEP_REFS}")
    configs = [{**params, **g} for g in sweep_grid(default)]
    fn = lambda: simulator.sweep(sub, [capacity], default, configs)  # noqa: E731
    lsub = lc_factory(sub)
    lc_time = lambda: SWEEP_CONFIGS * lsub.seconds(twin, capacity, 3)  # noqa: E731
  fn()
  t_kv, hits = _best_time(fn, 1)
  t_lc = lc_time()
  sweep = {"policy": default, "configurations": configs, "references": sub.num_refs,
           "kvjax_s": t_kv, "libcachesim_policy": twin, "libcachesim_s": t_lc,
           "sim_over_libcachesim": t_lc / t_kv}
  if default not in HOST_POLICIES:  # the same sweep on the sampled path
    fs = lambda: simulator.sweep(sub, [capacity], default, configs, sample=SAMPLE)  # noqa: E731
    fs()
    t_s, _ = _best_time(fs, 1)
    sweep.update(sample=SAMPLE, sampled_s=t_s, sampled_over_libcachesim=t_lc / t_s)
  else:  # the jitted, vmapped scan too (same hit flags)
    scan_fn = lambda: simulator.simulate_hits(sub, caps, default, path="exact")  # noqa: E731
    scan_fn()
    t_scan, scan = _best_time(scan_fn, 1)
    assert (scan == hits).all()
    sweep.update(scan_s=t_scan, scan_over_libcachesim=t_lc / t_scan)
  log(f"  sweep of {SWEEP_CONFIGS} configurations, {default}: kvjax {t_kv:.2f} s, "
      f"libCacheSim {twin} {t_lc:.2f} s: {t_lc / t_kv:.3f}")
  return {"per_policy": out, "default_sweep": sweep}


# ---------------------------------------------------------------- held-out traces


def _combine(parts: list, name: str, seed=None) -> traces.Trace:
  """The requests of ``parts`` (block ids kept apart) one part after another, or in a
  seeded random interleaving when ``seed`` is given."""
  reqs, offset = [], 0
  for t in parts:
    bounds = np.searchsorted(t.request, np.arange(t.num_requests + 1))
    reqs.append([((t.block[bounds[i]:bounds[i + 1]] + offset).tolist(),
                  int(t.input_length[i]), int(t.output_length[i]))
                 for i in range(t.num_requests)])
    offset += t.num_blocks
  order = np.concatenate([np.full(len(r), k) for k, r in enumerate(reqs)])
  if seed is not None:
    order = np.random.default_rng(seed).permutation(order)
  its = [iter(r) for r in reqs]
  out = [next(its[k]) for k in order]
  return traces.from_requests([r[0] for r in out], [r[1] for r in out],
                              [r[2] for r in out], np.arange(len(out)) * 100, name=name)


def heldout_traces(conv: traces.Trace | None, quick: bool) -> list[traces.Trace]:
  """Traces no parameter was tuned on, with reuse patterns unlike the conversation
  trace's (all seeded, generated here)."""
  n = 1000 if quick else 3000
  g = traces.generate
  out = [
      # RAG-like: many long shared documents, short chats
      g(n, seed=101, num_prompts=300, prompt_blocks=(4, 24), turns=(1, 2),
        user_tokens=(50, 600), zipf=0.9, concurrent=64, name="shared-documents"),
      # agent loops: long sessions, few at a time, reuse comes back quickly
      g(n, seed=102, num_prompts=8, prompt_blocks=(2, 6), turns=(10, 30),
        user_tokens=(100, 1500), output_tokens=(50, 400), concurrent=12, name="agent-loops"),
      # many tenants: a lot of conversations open at once, reuse far apart
      g(n, seed=103, num_prompts=60, turns=(2, 8), user_tokens=(200, 4000),
        concurrent=512, name="many-tenants"),
      # hot prompts and scans: chat traffic interleaved with one-off long documents
      _combine([g(n // 2, seed=104, num_prompts=10, zipf=1.5, concurrent=48),
                g(n // 2, seed=105, num_prompts=n, prompt_blocks=(8, 40), turns=(0, 1),
                  zipf=0.0, concurrent=8)], "chat-plus-scans", seed=106),
      # drifting popularity: four phases, each with its own hot prompts; blocks that were
      # hot (high counts) in one phase are dead in the next
      _combine([g(n // 4, seed=107 + k, num_prompts=6, prompt_blocks=(4, 12), zipf=1.4,
                  turns=(1, 4), concurrent=32) for k in range(4)], "drifting-popularity"),
  ]
  if conv is not None:  # the conversation trace in time thirds, each replayed cold
    k = conv.num_requests // 3
    out += [conv.slice_requests(i * k, (i + 1) * k, name=f"{conv.name}-third{i + 1}")
            for i in range(3)]
  return out


def heldout_capacities(t: traces.Trace) -> list[int]:
  return sorted({max(16, int(f * t.num_blocks)) for f in (0.01, 0.04, 0.12)})


def heldout(conv, quick, log) -> dict:
  """Every candidate on every held-out trace (warm last 30 % and cold whole trace)."""
  result = {"traces": {}, "candidates": [c[0] for c in CANDIDATES]}
  for t in heldout_traces(conv, quick):
    caps = heldout_capacities(t)
    _, cut = split_point(t)
    row = {"references": t.num_refs, "blocks": t.num_blocks, "capacities": caps,
           "warm": {}, "cold": {}}
    for label, name, over in CANDIDATES + (("min", "min", {}),):
      t0 = time.perf_counter()
      h = run_hits(t, caps, name, over)
      row["warm"][label] = {c: float(h[j, cut:].mean()) for j, c in enumerate(caps)}
      row["cold"][label] = {c: float(h[j].mean()) for j, c in enumerate(caps)}
      log(f"  {t.name:<28s} {label:<20s} warm " +
          " ".join(f"{row['warm'][label][c]:.4f}" for c in caps) +
          f" ({time.perf_counter() - t0:.1f} s)")
    for mode in ("warm", "cold"):
      lru, mn = row[mode]["lru"], row[mode]["min"]
      row[f"gap_closed_{mode}"] = {lab: {c: gap(row[mode][lab][c], lru[c], mn[c])
                                         for c in caps} for lab in row[mode]}
    result["traces"][t.name] = row
  return result


def choose_default(hold: dict, conv_row: dict | None) -> dict:
  """The rule: never more than 2 points below LRU warm or cold anywhere; then the best
  mean warm gap_closed over the held-out traces."""
  table = {}
  for label in hold["candidates"]:
    worst, gaps = 1.0, []
    for row in hold["traces"].values():
      for mode in ("warm", "cold"):
        for c in row["capacities"]:
          worst = min(worst, row[mode][label][c] - row[mode]["lru"][c])
      gaps += [row["gap_closed_warm"][label][c] for c in row["capacities"]]
    table[label] = {"worst_points_vs_lru": worst, "qualifies": worst >= -LRU_SLACK,
                    "mean_gap_closed_warm": float(np.mean(gaps)),
                    "min_gap_closed_warm": float(np.min(gaps))}
    if conv_row is not None and label in conv_row:
      table[label]["conversation_gap_closed_last30"] = conv_row[label]
  ok = [lab for lab in table if table[lab]["qualifies"]]
  best = max(ok, key=lambda lab: table[lab]["mean_gap_closed_warm"])
  return {"default_policy": best, "rule": "never more than 2 points below LRU (warm or "
          "cold) on any held-out trace and capacity; then the best mean warm gap_closed",
          "candidates": table}


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="small slice, small held-out traces")
  ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/"
                  "policies.json, policies_quick.json with --quick)")
  ap.add_argument("--trace", default=traces.default_trace_path())
  ap.add_argument("--policies", default=None,
                  help="comma-separated subset of the reported policies (lru, min and the "
                       "default candidates are always included)")
  ap.add_argument("--refit", action="store_true",
                  help="fit the parameters again on the first 70 %% (slow)")
  args = ap.parse_args(argv)
  out_path = args.out or os.path.join("benchmarks", "results",
                                      "policies_quick.json" if args.quick else "policies.json")
  report = REPORT
  if args.policies:
    known = REPORT + OPTIONAL
    wanted = set(args.policies.split(",")) | {"lru", "min"}
    unknown = sorted(wanted - set(known))
    if unknown:
      raise ValueError(f"--policies must name policies of {list(known)}, got {unknown}")
    report = tuple(p for p in known if p in wanted)
  log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
  t_start = time.perf_counter()

  real = os.path.exists(args.trace)
  if real:
    trace = traces.load_mooncake(args.trace, max_requests=2000 if args.quick else None)
  else:
    log(f"{args.trace} not found: using a generated trace")
    trace = traces.generate(2000 if args.quick else 12000, seed=0)
  caps = [c // 8 for c in CAPACITIES] if args.quick else list(CAPACITIES)
  r_cut, cut = split_point(trace)
  log(f"{trace.name}: {trace.num_requests} requests, {trace.num_refs} references; "
      f"report on [{cut}, {trace.num_refs})")

  fit_report = None
  params = {p: dict(v) for p, v in FITTED.items()}
  if args.refit:
    grids = {k: ({kk: vv[::2] for kk, vv in g.items()} if args.quick else g)
             for k, g in GRIDS.items() if k in report}
    log("fitting on the first 70 %")
    params, fit_report = fit(trace.slice_requests(0, r_cut), caps, grids, log)
  speed_cap = caps[2]
  log("replaying the whole trace, counting the last 30 %")
  last, full, seconds = evaluate(trace, caps, report, params, cut, speed_cap, log)
  sampled = sampled_speed(trace, report, params, speed_cap, cut, last, log)
  gaps = {p: {c: gap(last[p][c], last["lru"][c], last["min"][c]) for c in caps} for p in last}

  log("held-out traces")
  hold = heldout(trace if real else None, args.quick, log)
  choice = choose_default(hold, {p: gaps[p] for p in gaps})
  d = choice["default_policy"]
  d_name, d_over = next((n, o) for lab, n, o in CANDIDATES if lab == d)
  log(f"default_policy: {d}")

  lcs = load_libcachesim(log)
  lib = None
  if lcs is not None:
    with tempfile.TemporaryDirectory() as tmp:
      lc = LibCacheSim(lcs, trace, tmp)
      factory = lambda t: lc if t is trace else LibCacheSim(lcs, t, tmp)  # noqa: E731
      lib_last, lib_full = libcachesim_table(lc, caps, cut, log)
      lib = {"version": getattr(lcs, "__version__", "0.3.5"), "hashpower": lc.hashpower,
             "hit_ratio": {p: {str(c): r for c, r in row.items()} for p, row in lib_last.items()},
             "hit_ratio_full_trace": {p: {str(c): r for c, r in row.items()}
                                      for p, row in lib_full.items()},
             "gap_closed": {p: {str(c): gap(row[c], last["lru"][c], last["min"][c])
                                for c in caps} for p, row in lib_last.items()}}
      lib["speed"] = speed_libcachesim(factory, trace, seconds, speed_cap, d_name, d_over, log,
                                       sampled)
      held_lib = {}
      for name, row in hold["traces"].items():
        t = next(x for x in heldout_traces(trace if real else None, args.quick)
                 if x.name == name)
        lt = LibCacheSim(lcs, t, tmp)
        held_lib[name] = {p: {str(c): lt.ratios(p, c, split_point(t)[1])[0]
                              for c in row["capacities"]} for p in ("ARC", "S3FIFO", "MQ",
                                                                     "WTinyLFU")}
      lib["heldout_warm"] = held_lib
  timing = speed_python(trace, speed_cap, log)

  d_gap = {name: {str(c): g for c, g in row["gap_closed_warm"][d].items()}
           for name, row in hold["traces"].items()}
  result = {
      "machine": common.machine(), "quick": args.quick,
      "trace": {"name": trace.name, "requests": trace.num_requests, "references": trace.num_refs,
                "blocks": trace.num_blocks, "split_request": r_cut, "split_reference": cut},
      "capacities": caps, "accounting": "block",
      "policies": list(report), "params": {p: params.get(p, {}) for p in report},
      "hit_ratio": {p: {str(c): r for c, r in row.items()} for p, row in last.items()},
      "gap_closed": {p: {str(c): g for c, g in row.items()} for p, row in gaps.items()},
      "hit_ratio_full_trace": {p: {str(c): r for c, r in row.items()} for p, row in full.items()},
      "seconds_at_%d" % speed_cap: seconds,
      "sampled_at_%d" % speed_cap: sampled,
      "default_policy": d, "default_params": d_over, "default_choice": choice,
      "gap_closed_heldout": d_gap,
      "sim_over_libcachesim": None if lib is None else
      {**{p: v["sim_over_libcachesim"] for p, v in lib["speed"]["per_policy"].items()},
       "default_sweep_%d" % SWEEP_CONFIGS: lib["speed"]["default_sweep"]["sim_over_libcachesim"]},
      "sampled_over_libcachesim": None if lib is None else
      {**{p: v["sampled_over_libcachesim"] for p, v in lib["speed"]["per_policy"].items()
          if "sampled_over_libcachesim" in v},
       "default_sweep_%d" % SWEEP_CONFIGS:
       lib["speed"]["default_sweep"].get("sampled_over_libcachesim")},
      "libcachesim": lib if lib is not None else "skipped: libcachesim not installed",
      "heldout": hold, "sim_over_python": timing["sim_over_python"], "timing": timing,
      "fit": fit_report, "wall_s": time.perf_counter() - t_start,
  }
  common.write_json(out_path, result, indent=1)

  m = result["machine"]
  print(f"machine: {m['platform']}, {m['cpu_count']} CPUs, jax {m['jax']}, {m['device']}, "
        f"load {m['load_average_1m']:.1f}")
  print(f"trace: {trace.name}, {trace.num_refs} refs; hit ratio on the last 30 % (warm); "
        f"gap = share of the LRU->MIN gap closed")
  print(f"{'policy':<22s}" + "".join(f"{c:>16d}" for c in caps))
  for p in report:
    print(f"{p:<22s}" + "".join(f"{last[p][c]:>9.4f} ({gaps[p][c]:+.2f})" for c in caps))
  if lib is not None:
    for p in LIBCACHESIM:
      print(f"{'libCacheSim ' + p:<22s}" + "".join(
          f"{lib['hit_ratio'][p][str(c)]:>9.4f} ({lib['gap_closed'][p][str(c)]:+.2f})"
          for c in caps))
    print("sim_over_libcachesim: " + ", ".join(
        f"{p} {v:.3g}" for p, v in result["sim_over_libcachesim"].items()))
  print("held-out (warm gap_closed, mean / worst points vs LRU warm or cold):")
  for lab, v in choice["candidates"].items():
    print(f"  {lab:<22s} {v['mean_gap_closed_warm']:+.3f} / {v['worst_points_vs_lru']:+.4f}"
          f"{'' if v['qualifies'] else '  (more than 2 points below LRU somewhere)'}")
  print(f"default_policy {d}; wrote {out_path} ({result['wall_s']:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
