"""Eviction policies on the Mooncake conversation trace: hit ratios, gap to MIN, speed.

    python benchmarks/policies.py [--quick] [--out FILE] [--trace PATH] [--policies A,B]

* Parameters of each tunable policy are fitted on the first 70 % of the trace (by
  requests): one parameter set per policy for all capacities (a grid may name several
  parameters: every combination is tried), the one with the best mean share of the
  LRU-to-MIN gap closed among those never more than 2 points below LRU.
* Hit ratios are reported on the last 30 %: the whole trace is replayed (the cache warms
  on the first 70 %) and only references in the last 30 % are counted. Full-trace ratios
  are kept too (``hit_ratio_full_trace``; LRU/MIN there match the published table).
* ``gap_closed = (policy - LRU) / (MIN - LRU)`` per capacity.
* ``sim_over_python``: plain-Python LRU (``OrderedDict``) time over the jitted
  simulator's LRU time on the whole trace at 6,144 blocks (compiled; compile time apart;
  the simulator's default path for LRU, the exact O(1) one). ``timing`` adds the sweep of
  all four capacities and the scoring path (``scoring_over_python``).
* ``default_policy`` and whether it meets the targets (>= 25 % of the gap at 6,144; never
  more than 2 points below LRU), and the same policy on a generated trace it was not
  tuned on.

``--policies``: report only these (plus ``lru``, ``min`` and the default).
``--quick``: the first 2,000 requests (or a generated trace when the real one is absent),
capacities divided by 8, small grids. Writes JSON (default benchmarks/results/policies.json)
and prints the machine and a short table last.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import numpy as np

from kvjax.policies import make_params
from kvjax.sim import simulator, traces
import common  # benchmarks/common.py: machine description, results writer

CAPACITIES = (1024, 4096, 6144, 16384)
DEFAULT_POLICY = "autoclass"
REPORT = ("lru", "fifo", "lru2", "lfu", "s3fifo", "weighted", "greedydual", "lecar", "tinylfu",
          "tinylfu-s3fifo", "freqlru", "autofreq", "classfreq", "autoclass", "min",
          "min-bypass")
GRIDS = {
    "lfu": {"half_life": [2048.0, 8192.0, 32768.0]},
    "s3fifo": {"small_frac": [0.05, 0.1, 0.3]},
    "weighted": {"age_scale": [2048.0, 8192.0, 32768.0]},
    "greedydual": {"pos_weight": [0.0, 0.05, 0.5]},
    "lecar": {"learning_rate": [0.1, 0.45, 2.0]},
    "tinylfu": {"sample_factor": [2.0, 10.0, 50.0]},
    "freqlru": {"credit": [8192.0, 16384.0, 24576.0, 32768.0, 49152.0]},
    "autoclass": {"credit": [8192.0, 16384.0, 32768.0]},
}  # autofreq picks its credit online (miniature caches) and keeps its defaults; classfreq
# (the fixed-credit core of autoclass) keeps its defaults, to save time
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


def fit(trace, capacities, grids, log) -> tuple[dict, dict]:
  """Best parameters per policy on ``trace`` (the first 70 %)."""
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


def evaluate(trace, capacities, names, params, cut, log) -> tuple[dict, dict]:
  """Hit ratios on references ``cut:`` (warm) and on the whole trace."""
  last, full = {}, {}
  for name in names:
    last[name], full[name] = {}, {}
    prm = make_params(name, **params.get(name, {}))
    for c in capacities:
      t0 = time.perf_counter()
      h = simulator.simulate_hits(trace, c, name, prm)
      last[name][c], full[name][c] = float(h[cut:].mean()), float(h.mean())
      log(f"  {name:<14s} cap {c:>6d}: last30 {last[name][c]:.4f} full {full[name][c]:.4f} "
          f"({time.perf_counter() - t0:.1f} s)")
  return last, full


def _best_time(fn, repeat: int) -> tuple[float, object]:
  times, out = [], None
  for _ in range(repeat):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return min(times), out


def speed(trace, capacity, capacities, log) -> dict:
  """Simulator LRU against the plain-Python LRU, in the same process, on the whole trace.

  ``sim_over_python``: one capacity, the simulator's default path for LRU (the exact
  O(1) path); ``sweep_over_python``: every benchmark capacity, one Python run each against
  one simulator call; ``scoring_over_python``: the scoring path (``lru_score`` at every
  miss), the path every other policy takes. Compile time is reported apart.
  """
  refs = trace.block.tolist()
  py, py_hits = _best_time(lambda: py_lru_hits(refs, capacity), 3)
  t0 = time.perf_counter()
  simulator.simulate_hits(trace, capacity, "lru")
  first = time.perf_counter() - t0
  sim, h = _best_time(lambda: simulator.simulate_hits(trace, capacity, "lru"), 5)
  assert int(h.sum()) == py_hits, "simulator and Python LRU disagree"
  py_sweep = sum(_best_time(lambda: py_lru_hits(refs, c), 1)[0] for c in capacities)
  sim_sweep, hs = _best_time(lambda: simulator.simulate_hits(trace, capacities, "lru"), 3)
  assert [int(x) for x in hs.sum(axis=1)] == [py_lru_hits(refs, c) for c in capacities]
  simulator.simulate_hits(trace, capacity, "lru", path="scoring")
  scoring, hsc = _best_time(
      lambda: simulator.simulate_hits(trace, capacity, "lru", path="scoring"), 1)
  assert int(hsc.sum()) == py_hits, "scoring path and Python LRU disagree"
  out = {"capacity": capacity, "references": trace.num_refs, "python_lru_s": py,
         "sim_lru_s": sim, "sim_lru_first_call_s": first,
         "sim_ns_per_reference": sim / trace.num_refs * 1e9,
         "sim_over_python": py / sim,
         "sweep_capacities": list(capacities), "python_sweep_s": py_sweep,
         "sim_sweep_s": sim_sweep, "sweep_over_python": py_sweep / sim_sweep,
         "scoring_lru_s": scoring, "scoring_over_python": py / scoring}
  log(f"  speed: python {py:.3f} s, sim {sim:.4f} s (first call {first:.1f} s), sweep "
      f"{py_sweep:.3f} / {sim_sweep:.4f} s, scoring path {scoring:.2f} s")
  return out


def holdout(params, quick, log) -> dict:
  """The default policy on generated traffic it was not tuned on."""
  t = traces.generate(1500 if quick else 6000, seed=1234, num_prompts=40, turns=(1, 5),
                      user_tokens=(100, 6000), concurrent=256, name="generated-holdout")
  caps = [64, 256, 1024] if quick else [256, 1024, 4096]
  out = {"trace": t.name, "references": t.num_refs, "hit_ratio": {}}
  for name in ("lru", "freqlru", "autofreq", "classfreq", DEFAULT_POLICY, "min"):
    prm = make_params(name, **params.get(name, {}))
    out["hit_ratio"][name] = {c: float(simulator.simulate_hits(t, c, name, prm).mean())
                              for c in caps}
  out["gap_closed"] = {p: {c: gap(out["hit_ratio"][p][c], out["hit_ratio"]["lru"][c],
                                  out["hit_ratio"]["min"][c]) for c in caps}
                       for p in ("freqlru", "autofreq", "classfreq", DEFAULT_POLICY)}
  log(f"  holdout {t.name}: {out['hit_ratio']}")
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="small slice, small grids (~minutes)")
  ap.add_argument("--out", default=os.path.join("benchmarks", "results", "policies.json"))
  ap.add_argument("--trace", default=traces.default_trace_path())
  ap.add_argument("--policies", default=None,
                  help="comma-separated subset of the reported policies (lru, min and the "
                       "default are always included)")
  args = ap.parse_args(argv)
  report = REPORT
  if args.policies:
    wanted = set(args.policies.split(",")) | {"lru", "min", DEFAULT_POLICY}
    unknown = sorted(wanted - set(REPORT))
    if unknown:
      raise ValueError(f"--policies must name policies of {list(REPORT)}, got {unknown}")
    report = tuple(p for p in REPORT if p in wanted)
  log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
  t_start = time.perf_counter()

  if os.path.exists(args.trace):
    trace = traces.load_mooncake(args.trace, max_requests=2000 if args.quick else None)
  else:
    log(f"{args.trace} not found: using a generated trace")
    trace = traces.generate(2000 if args.quick else 12000, seed=0)
  caps = [c // 8 for c in CAPACITIES] if args.quick else list(CAPACITIES)
  grids = {k: ({kk: vv[::2] for kk, vv in g.items()} if args.quick else g)
           for k, g in GRIDS.items() if k in report}
  r_cut, cut = split_point(trace)
  log(f"{trace.name}: {trace.num_requests} requests, {trace.num_refs} references; "
      f"fit on requests [0, {r_cut}) = references [0, {cut}); report on [{cut}, {trace.num_refs})")

  log("fitting on the first 70 %")
  params, fit_report = fit(trace.slice_requests(0, r_cut), caps, grids, log)
  log("replaying the whole trace, counting the last 30 %")
  last, full = evaluate(trace, caps, report, params, cut, log)
  gaps = {p: {c: gap(last[p][c], last["lru"][c], last["min"][c]) for c in caps} for p in last}
  speed_cap = caps[2]
  timing = speed(trace, speed_cap, caps, log)
  d = DEFAULT_POLICY
  checks = {"gap_closed_at_%d" % speed_cap: gaps[d][speed_cap],
            "meets_gap_target": gaps[d][speed_cap] >= GAP_TARGET,
            "worst_points_vs_lru": min(last[d][c] - last["lru"][c] for c in caps),
            "never_2pts_below_lru": all(last[d][c] >= last["lru"][c] - LRU_SLACK for c in caps)}
  hold = holdout(params, args.quick, log)

  result = {
      "machine": common.machine(), "quick": args.quick,
      "trace": {"name": trace.name, "requests": trace.num_requests, "references": trace.num_refs,
                "blocks": trace.num_blocks, "split_request": r_cut, "split_reference": cut},
      "capacities": caps, "accounting": "block",
      "policies": list(report), "params": {p: params.get(p, {}) for p in report},
      "hit_ratio": {p: {str(c): r for c, r in row.items()} for p, row in last.items()},
      "gap_closed": {p: {str(c): g for c, g in row.items()} for p, row in gaps.items()},
      "hit_ratio_full_trace": {p: {str(c): r for c, r in row.items()} for p, row in full.items()},
      "sim_over_python": timing["sim_over_python"], "timing": timing,
      "default_policy": d, "default_params": params.get(d, {}), "default_checks": checks,
      "holdout": hold, "fit": fit_report, "wall_s": time.perf_counter() - t_start,
  }
  common.write_json(args.out, result, indent=1)

  m = result["machine"]
  print(f"machine: {m['platform']}, {m['cpu_count']} CPUs, jax {m['jax']}, {m['device']}")
  print(f"trace: {trace.name}, {trace.num_refs} refs; hit ratio on the last 30 % "
        f"(warm), params fitted on the first 70 %; gap = share of LRU->MIN gap closed")
  print(f"{'policy':<15s}" + "".join(f"{c:>16d}" for c in caps))
  for p in report:
    print(f"{p:<15s}" + "".join(f"{last[p][c]:>9.4f} ({gaps[p][c]:+.2f})" for c in caps))
  print(f"sim_over_python {timing['sim_over_python']:.2f} (LRU, {speed_cap} blocks: python "
        f"{timing['python_lru_s']:.3f} s, sim {timing['sim_lru_s']:.4f} s); sweep "
        f"{timing['sweep_over_python']:.2f}; scoring path {timing['scoring_over_python']:.3f}")
  print(f"default_policy {d} {params.get(d, {})}: gap at {speed_cap} "
        f"{checks['gap_closed_at_%d' % speed_cap]:.3f} (target {GAP_TARGET}), worst vs LRU "
        f"{checks['worst_points_vs_lru']:+.4f}; wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
