"""``kvjax replay``: replay a request trace through the simulator and report hit ratios.

    kvjax replay TRACE --capacity N[,N...] --policy NAME[,NAME...]
                 [--plot FILE] [--json] [--accounting block|prefix]

``TRACE`` is a Mooncake-format JSONL file, or ``generated[:REQUESTS[:SEED]]`` for a
synthetic trace. ``min`` (and ``min-bypass``) name the Belady oracle.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from kvjax.policies import POLICIES, get_policy
from kvjax.sim import simulator, traces


def parse_capacities(text: str) -> list[int]:
  """``"1024,4096"`` -> ``[1024, 4096]``; ValueError naming a bad entry.

  >>> parse_capacities("8,16")
  [8, 16]
  """
  caps = []
  for part in str(text).split(","):
    part = part.strip()
    try:
      c = int(part)
    except ValueError:
      raise ValueError(f"--capacity must be positive integers, got {part!r}") from None
    if c <= 0:
      raise ValueError(f"--capacity must be positive integers, got {c}")
    caps.append(c)
  return caps


def parse_policies(text: str) -> list[str]:
  """``"lru,min"`` -> ``["lru", "min"]``; ValueError naming an unknown policy."""
  names = [p.strip() for p in str(text).split(",") if p.strip()]
  if not names:
    raise ValueError("--policy must name at least one policy")
  for n in names:
    get_policy(n)
  return names


def load_trace(spec: str) -> traces.Trace:
  """A Mooncake JSONL path, or ``generated[:REQUESTS[:SEED]]``."""
  if spec.startswith("generated"):
    parts = spec.split(":")
    n = int(parts[1]) if len(parts) > 1 and parts[1] else 2000
    seed = int(parts[2]) if len(parts) > 2 else 0
    return traces.generate(n, seed=seed)
  return traces.load_mooncake(spec)


def replay(trace: traces.Trace, capacities: Sequence[int], policies: Sequence[str], *,
           accounting: str = "block", progress: bool = True) -> dict:
  """``{policy: {capacity: hit_ratio}}`` for every pair (one simulator run per pair)."""
  from tqdm import tqdm

  pairs = [(p, c) for p in policies for c in capacities]
  out: dict = {p: {} for p in policies}
  for p, c in tqdm(pairs, desc="replay", unit="run", disable=not progress, file=sys.stderr):
    out[p][c] = simulator.simulate(trace, [c], p, accounting=accounting)[c]
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
            linestyle="--" if get_policy(p).oracle else "-", label=p)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("capacity (blocks)")
  ax.set_ylabel("hit ratio")
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="kvjax replay", description=__doc__.split("\n")[0])
  ap.add_argument("trace", help="Mooncake JSONL file, or generated[:REQUESTS[:SEED]]")
  ap.add_argument("--capacity", required=True, help="blocks, comma-separated (e.g. 1024,6144)")
  ap.add_argument("--policy", default="lru,min",
                  help=f"comma-separated; one of {sorted(POLICIES)}")
  ap.add_argument("--plot", default=None, help="write a PNG of hit ratio against capacity")
  ap.add_argument("--json", action="store_true",
                  help='print only {"hit_ratio": {policy: {capacity: ratio}}}')
  ap.add_argument("--accounting", choices=simulator.ACCOUNTING, default="block",
                  help="block: every cached block counts; prefix: only a request's leading run")
  return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point for ``kvjax replay`` (``argv`` without the program name).

  Raises:
    ValueError: a capacity of zero or less, an unknown policy, a malformed trace line.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["replay"]:
    argv = argv[1:]
  args = build_parser().parse_args(argv)
  capacities = parse_capacities(args.capacity)
  policies = parse_policies(args.policy)
  trace = load_trace(args.trace)
  ratios = replay(trace, capacities, policies, accounting=args.accounting,
                  progress=not args.json)
  if args.plot:
    plot(ratios, capacities, args.plot, title=f"{trace.name} ({args.accounting} accounting)")
  if args.json:
    print(json.dumps({"hit_ratio": {p: {str(c): r for c, r in row.items()}
                                    for p, row in ratios.items()}}))
  else:
    print(f"{trace.name}: {trace.num_requests} requests, {trace.num_refs} block references, "
          f"{trace.num_blocks} distinct blocks; {args.accounting} accounting")
    print(table(ratios, capacities))
    if args.plot:
      print(f"plot: {args.plot}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
