"""``kvjax replay``: replay a request trace through the simulator and report hit ratios.

    kvjax replay TRACE --capacity N[,N...] --policy NAME[,NAME...]
                 [--param [POLICY.]NAME=VALUE ...] [--plot FILE] [--json]
                 [--accounting block|prefix]

``TRACE`` is a Mooncake-format JSONL file, or ``generated[:REQUESTS[:SEED]]`` for a
synthetic trace. ``min`` (and ``min-bypass``) name the Belady oracle; ``arc`` and
``arc-bypass`` the simulator's ARC. ``--param`` (repeatable) sets a policy parameter
(``make_params``' names and bounds) for every listed policy that has it, or only for
``POLICY`` when prefixed.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional, Sequence

from kvjax.cliutil import ArgumentParser
from kvjax.cliutil import check_memory
from kvjax.cliutil import UsageError
from kvjax.policies import get_policy
from kvjax.policies import make_params
from kvjax.policies import POLICIES
from kvjax.sim import simulator, traces
from kvjax.sim.arc import HOST_POLICIES
from kvjax.sim.traces import TraceError

MAX_CAPACITY = 2 ** 30 - 1  # block ids, page indices and clocks are int32 (NEVER = 2^30)

# Peak memory per simulated page (bytes), measured on XLA:CPU as the growth of peak RSS at
# 1M pages (8M for lru/fifo) on a small trace, rounded up. One (policy, capacity) pair runs
# at a time, so a replay needs about the largest of capacity * bytes for its pairs.
BYTES_PER_PAGE = {
    "lru": 24, "fifo": 16, "min": 128, "min-bypass": 128, "lru2": 128, "greedydual": 144,
    "lfu": 144, "weighted": 160, "s3fifo": 208, "lecar": 232, "tinylfu": 288,
    "tinylfu-s3fifo": 352, "freqlru": 368, "classfreq": 576, "autofreq": 640,
    "autoclass": 816, "arc": 256, "arc-bypass": 256,
    "learned": 1024,  # not measured yet: the default figure (4,096 pages: 0.6 GB peak RSS)
}
DEFAULT_BYTES_PER_PAGE = 1024  # a policy registered later and not measured


def parse_capacities(text: str) -> list[int]:
  """``"1024,4096"`` -> ``[1024, 4096]``; UsageError (a ValueError) naming a bad entry.

  >>> parse_capacities("8,16")
  [8, 16]
  """
  caps = []
  for part in str(text).split(","):
    part = part.strip()
    try:
      c = int(part)
    except ValueError:
      raise UsageError(f"must be positive integers, got {part[:40]!r}",
                       argument="--capacity") from None
    if c <= 0:
      raise UsageError(f"must be positive integers, got {c}", argument="--capacity")
    if c > MAX_CAPACITY:
      raise UsageError(f"{part[:40]} blocks is past the simulator's int32 range (at most "
                       f"{MAX_CAPACITY:,})", argument="--capacity")
    caps.append(c)
  return caps


def parse_policies(text: str) -> list[str]:
  """``"lru,min"`` -> ``["lru", "min"]``; UsageError naming an unknown policy."""
  names = [p.strip() for p in str(text).split(",") if p.strip()]
  if not names:
    raise UsageError("must name at least one policy", argument="--policy")
  known = sorted(set(POLICIES) | set(HOST_POLICIES))
  for n in names:
    if n not in known:
      raise UsageError(f"unknown policy {n[:40]!r}; one of {', '.join(known)}",
                       argument="--policy")
  return names


def _defaults(policy: str) -> dict:
  return {} if policy in HOST_POLICIES else dict(get_policy(policy).defaults)


def parse_params(items: Sequence[str], policies: Sequence[str]) -> dict:
  """``--param`` values -> ``{policy: {name: float}}`` (overrides per listed policy).

  ``NAME=VALUE`` applies to every policy in ``policies`` that has parameter ``NAME``;
  ``POLICY.NAME=VALUE`` to that policy only. Values are checked against the policy's
  bounds (``make_params``).

  Raises:
    UsageError (argument ``--param``): no ``=``, a value that is not a finite number, a
      name no listed policy has (the known ones are listed), a policy prefix not in
      ``--policy``, a name given twice, or a value outside the parameter's bound.

  >>> parse_params(["half_life=50"], ["lru", "lfu"])
  {'lru': {}, 'lfu': {'half_life': 50.0}}
  >>> parse_params(["lfu.half_life=8"], ["lfu", "lecar"])["lecar"]
  {}
  """
  out: dict = {p: {} for p in policies}
  seen: set = set()
  for item in items:
    name, eq, text = str(item).partition("=")
    name = name.strip()
    if not eq or not name:
      raise UsageError(f"expected NAME=VALUE or POLICY.NAME=VALUE, got {item[:60]!r}",
                       argument="--param")
    try:
      value = float(text)
    except ValueError:
      raise UsageError(f"{name}: expected a number, got {text[:40]!r}",
                       argument="--param") from None
    if value != value or value in (float("inf"), float("-inf")):
      raise UsageError(f"{name}: expected a finite number, got {text[:40]!r}",
                       argument="--param")
    target, _, pname = name.rpartition(".")
    if target and target not in out:
      raise UsageError(f"{name}: policy {target[:40]!r} is not in --policy "
                       f"({', '.join(policies)})", argument="--param")
    takers = [p for p in ([target] if target else policies) if pname in _defaults(p)]
    if not takers:
      known = {p: sorted(_defaults(p)) for p in ([target] if target else policies)}
      raise UsageError(f"unknown parameter {pname[:40]!r} for policy(ies) "
                       f"{', '.join(known)}; known: " +
                       "; ".join(f"{p}: {', '.join(k) or '(none)'}" for p, k in known.items()),
                       argument="--param")
    for p in takers:
      if (p, pname) in seen:
        raise UsageError(f"{pname} given twice for policy {p}", argument="--param")
      seen.add((p, pname))
      try:
        make_params(p, **{pname: value})
      except ValueError as e:
        raise UsageError(str(e), argument="--param") from None
      out[p][pname] = value
  return out


def memory_estimate(capacities: Sequence[int], policies: Sequence[str]) -> tuple[int, int, str]:
  """(bytes, capacity, policy) of the most memory-hungry run (``BYTES_PER_PAGE``).

  >>> memory_estimate([1024, 4096], ["lru", "min"])
  (524288, 4096, 'min')
  """
  runs = [(max(c, 1) * BYTES_PER_PAGE.get(p, DEFAULT_BYTES_PER_PAGE), c, p)
          for p in policies for c in capacities]
  return max(runs)


def check_capacities(capacities: Sequence[int], policies: Sequence[str]) -> None:
  """UsageError naming ``--capacity`` when the largest run's memory estimate is past the
  limit (``kvjax.cli.memory_limit``)."""
  need, c, p = memory_estimate(capacities, policies)
  per = BYTES_PER_PAGE.get(p, DEFAULT_BYTES_PER_PAGE)
  check_memory(need, f"{c:,} blocks with policy {p} (~{per} bytes per block)", "--capacity")


def check_plot_path(path: str) -> None:
  """UsageError naming ``--plot`` unless ``path`` can be written as an image (checked by
  opening it for appending, and removing it again when it did not exist)."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib.backend_bases import FigureCanvasBase

  ext = os.path.splitext(path)[1].lower().lstrip(".")
  formats = FigureCanvasBase.get_supported_filetypes()
  if ext and ext not in formats:
    raise UsageError(f"{path}: unsupported image format {ext!r}; one of "
                     f"{', '.join(sorted(formats))}", argument="--plot")
  if os.path.isdir(path):
    raise UsageError(f"{path} is a directory", argument="--plot")
  existed = os.path.exists(path)
  try:
    with open(path, "ab"):
      pass
  except OSError as e:
    raise UsageError(f"cannot write {path} ({e.strerror or e})", argument="--plot") from None
  if not existed:
    os.remove(path)


def load_trace(spec: str) -> traces.Trace:
  """A Mooncake JSONL path, or ``generated[:REQUESTS[:SEED]]``; a trace with no block
  references is refused (its hit ratios would be NaN).

  Raises:
    UsageError: a bad ``generated`` spec. TraceError: a bad file or an empty trace.
  """
  if spec.startswith("generated"):
    parts = spec.split(":")
    try:
      if parts[0] != "generated" or len(parts) > 3:
        raise ValueError
      n = int(parts[1]) if len(parts) > 1 and parts[1] else 2000
      seed = int(parts[2]) if len(parts) > 2 else 0
    except ValueError:
      raise UsageError(f"expected a file or generated[:REQUESTS[:SEED]], got {spec[:60]!r}",
                       argument="TRACE") from None
    if not 0 < n <= 10 ** 7 or seed < 0:
      raise UsageError(f"generated needs 1 to 10,000,000 requests and a seed >= 0, got "
                       f"{spec[:60]!r}", argument="TRACE")
    return traces.generate(n, seed=seed)
  trace = traces.load_mooncake(spec)
  if trace.num_refs == 0:
    what = ("no requests" if trace.num_requests == 0 else
            f"{trace.num_requests} request(s), all of input_length 0")
    raise TraceError(spec, None, f"nothing to replay: the trace has {what} (no block "
                     "references)")
  return trace


def replay(trace: traces.Trace, capacities: Sequence[int], policies: Sequence[str], *,
           accounting: str = "block", progress: bool = True,
           params: Optional[dict] = None) -> dict:
  """``{policy: {capacity: hit_ratio}}`` for every pair (one simulator run per pair);
  ``params`` maps a policy to its parameter overrides (``parse_params``)."""
  from tqdm import tqdm

  params = params or {}
  pairs = [(p, c) for p in policies for c in capacities]
  out: dict = {p: {} for p in policies}
  for p, c in tqdm(pairs, desc="replay", unit="run", disable=not progress, file=sys.stderr):
    prm = None if p in HOST_POLICIES else make_params(p, **params.get(p, {}))
    out[p][c] = simulator.simulate(trace, [c], p, prm, accounting=accounting)[c]
  return out


def table(ratios: dict, capacities: Sequence[int]) -> str:
  """A plain-text table: one row per policy, one column per capacity."""
  width = max([6] + [len(p) for p in ratios])
  lines = [f"{'policy':<{width}}" + "".join(f"{c:>10d}" for c in capacities)]
  for p, row in ratios.items():
    lines.append(f"{p:<{width}}" + "".join(f"{row[c]:>10.4f}" for c in capacities))
  return "\n".join(lines)


def plot(ratios: dict, capacities: Sequence[int], path: str, title: str = "") -> None:
  """A PNG of hit ratio against capacity (log scale), one line per policy."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for p, row in ratios.items():
    ax.plot(list(capacities), [row[c] for c in capacities], marker="o",
            linestyle="--" if p not in HOST_POLICIES and get_policy(p).oracle else "-",
            label=p)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("capacity (blocks)")
  ax.set_ylabel("hit ratio")
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def build_parser() -> ArgumentParser:
  """The argument parser of ``kvjax replay`` (errors raise ``UsageError``)."""
  ap = ArgumentParser(prog="kvjax replay", description=__doc__.split("\n")[0])
  ap.add_argument("trace", help="Mooncake JSONL file, or generated[:REQUESTS[:SEED]]")
  ap.add_argument("--capacity", required=True, help="blocks, comma-separated (e.g. 1024,6144)")
  ap.add_argument("--policy", default="lru,min",
                  help=f"comma-separated; one of {sorted(set(POLICIES) | set(HOST_POLICIES))}")
  ap.add_argument("--param", action="append", default=[], metavar="[POLICY.]NAME=VALUE",
                  help="a policy parameter (repeatable); applies to every listed policy "
                       "that has it, or to POLICY only")
  ap.add_argument("--plot", default=None, help="write a PNG of hit ratio against capacity")
  ap.add_argument("--json", action="store_true",
                  help='print only {"hit_ratio": {policy: {capacity: ratio}}}')
  ap.add_argument("--accounting", choices=simulator.ACCOUNTING, default="block",
                  help="block: every cached block counts; prefix: only a request's leading run")
  return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
  """``kvjax replay`` as a function (``argv`` without the program name).

  Every argument, the memory the capacities need and the plot path are checked before
  the trace is loaded; the trace before any simulation. ``kvjax.cli.main`` turns the
  errors below into one line on stderr and exit status 2.

  Raises:
    UsageError: a bad argument (capacity, policy, parameter, plot path; a capacity whose
      memory estimate is past the limit). TraceError: a trace that cannot be replayed (both are
      ValueErrors).
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["replay"]:
    argv = argv[1:]
  args = build_parser().parse_args(argv)
  capacities = parse_capacities(args.capacity)
  policies = parse_policies(args.policy)
  params = parse_params(args.param, policies)
  check_capacities(capacities, policies)
  if args.plot:
    check_plot_path(args.plot)
  trace = load_trace(args.trace)
  ratios = replay(trace, capacities, policies, accounting=args.accounting,
                  progress=not args.json, params=params)
  if args.plot:
    plot(ratios, capacities, args.plot, title=f"{trace.name} ({args.accounting} accounting)")
  if args.json:
    out = {"hit_ratio": {p: {str(c): r for c, r in row.items()} for p, row in ratios.items()}}
    if args.param:
      out["params"] = {p: v for p, v in params.items() if v}
    print(json.dumps(out))
  else:
    print(f"{trace.name}: {trace.num_requests} requests, {trace.num_refs} block references, "
          f"{trace.num_blocks} distinct blocks; {args.accounting} accounting")
    for p, v in params.items():
      if v:
        print(f"{p}: " + ", ".join(f"{k}={x:g}" for k, x in v.items()))
    print(table(ratios, capacities))
    if args.plot:
      print(f"plot: {args.plot}")
  return 0
