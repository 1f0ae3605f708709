"""What attention-aware page dropping costs SmolLM2-135M: perplexity at a page budget.

Every window of ``pydoc_data.topics`` tokens (``benchmarks/quality.py``'s text
and tokens: no BOS, no state across windows) is fed THROUGH THE PAGED CACHE
(``kvjax.models.decode_step``) in chunks of ``--chunk`` tokens. In a drop mode
the cache is in drop mode (``kvjax.drop.enable``) and after every chunk each
sequence is cut back to its page budget with ``kvjax.drop.drop_pages``, so
every later token is predicted from the kept pages only (plus, within a
chunk, the chunk's earlier tokens: at most budget + chunk tokens are ever read).

Modes, at budgets of ``--fractions`` of the window (in pages of ``--page``):

* ``full``: the whole window cached (the default path, no drop mode): the baseline.
* ``streaming``: StreamingLLM: ``--sink`` sink pages + the most recent pages.
* ``h2o``: H2O: sink pages + ``(budget - sink) * --h2o-recent`` recent pages (H2O's
  half by default) + the rest as
  heavy hitters by attention mass accumulated over all layers, heads and queries.
* ``h2o_mean``: H2O scored by each page's share of the attention its sequence
  spread while the page was there (``mass / seen``), not the raw sum.
* ``window`` (optional): the recent window only (no sink), showing what sinks buy.

Figures: ``ppl`` over every next-token prediction of the windows;
``ppl_after`` over the predictions made after the sequence first exceeded
its budget (where the modes differ); ``rel_ppl_increase`` / ``rel_ppl_after``
against ``full`` measured in the same run.

Usage: python benchmarks/drop.py [--quick] [--out FILE] [--windows N] [--window W]
       [--fractions 0.25,0.5] [--modes streaming,h2o,h2o_mean,window] [--h2o-recent 0.5]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax import drop
from kvjax.models.gguf_loader import load_smollm2
from kvjax.models.llama import decode_step
from kvjax.models.perplexity import pydoc_windows
import common  # benchmarks/common.py: machine description, results writer


@jax.jit
def _nll(logits, targets, mask):
  """float32 [B, T]: -log p(target) where mask, else 0."""
  logz = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.where(mask, logz - tgt, 0.0)


_drop = jax.jit(drop.drop_pages, static_argnames=("budget", "sink_pages", "recent_pages", "mode",
                                                  "config"), donate_argnames="state")


H2O_RECENT = 0.5   # share of the non-sink budget h2o gives the recent window (H2O's half)


def split(mode: str, budget: int, sink: int) -> tuple[int, int]:
  """(sink_pages, recent_pages) given to ``drop_pages`` for a mode at a budget.

  ``drop_pages`` needs ``budget >= sink + recent + 1``; in "streaming" mode the
  one page beyond the window is the next most recent one anyway (the oldest
  candidates go first), so streaming keeps exactly ``budget - sink`` recent pages.
  """
  if mode == "streaming":
    return sink, budget - sink - 1
  if mode == "window":
    return 0, budget - 1
  if mode in ("h2o", "h2o_mean"):
    return sink, min(max(int((budget - sink) * H2O_RECENT), 1), budget - sink - 1)
  raise ValueError(f"unknown mode {mode!r}")


def effective_split(mode: str, budget: int, sink: int) -> tuple[int, int, int]:
  """(sink, recent, heavy) pages a mode keeps at a budget."""
  s, r = split(mode, budget, sink)
  if mode in ("h2o", "h2o_mean"):
    return s, r, budget - s - r
  return s, budget - s, 0


def run_mode(params, config, windows: np.ndarray, *, mode: str, budget: int, page: int,
             chunk: int, sink: int) -> np.ndarray:
  """float64 [W, window - 1] next-token NLLs of every window under one mode."""
  n, window = windows.shape
  b = n
  if mode == "full":
    m = -(-window // page)
  else:
    m = budget + -(-chunk // page) + 1
  cc = config.cache_config(page_size=page, num_pages=b * m, max_seqs=b, max_pages_per_seq=m,
                           dtype="bfloat16", prefix_caching=False)
  cache = kvjax.init(cc)
  if mode != "full":
    cache = drop.enable(cache)
    sink_pages, recent_pages = split(mode, budget, sink)
  ids = jnp.arange(b, dtype=jnp.int32)
  nll = np.zeros((b, window - 1))
  for s in range(0, window, chunk):
    c = min(chunk, window - s)
    toks = np.zeros((b, chunk), np.int32)
    toks[:, :c] = windows[:, s:s + c]
    logits, cache = decode_step(params, cache, jnp.asarray(toks), ids,
                                jnp.full((b,), c, jnp.int32), config=config, cache_config=cc)
    avail = min(c, window - 1 - s)
    tgt = np.zeros((b, chunk), np.int32)
    tgt[:, :avail] = windows[:, s + 1:s + 1 + avail]
    mask = np.zeros((b, chunk), bool)
    mask[:, :avail] = True
    part = np.asarray(_nll(logits, jnp.asarray(tgt), jnp.asarray(mask)))
    nll[:, s:s + avail] = part[:, :avail]
    if mode != "full":
      cache = _drop(cache, budget=budget, sink_pages=sink_pages, recent_pages=recent_pages,
                    mode="streaming" if mode == "window" else mode, config=cc)
  if int(cache.status):
    raise RuntimeError(f"cache status {kvjax.status_names(int(cache.status))}")
  return nll


def main(argv=None) -> dict:
  global H2O_RECENT   # noqa: PLW0603 (a script: the split of this run)
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="2 windows of 512 tokens (an estimate)")
  ap.add_argument("--out", default="benchmarks/results/drop.json")
  ap.add_argument("--windows", type=int, default=None, help="windows (default 8; quick 2)")
  ap.add_argument("--window", type=int, default=None, help="tokens per window (default 1024)")
  ap.add_argument("--page", type=int, default=16, help="page size (tokens)")
  ap.add_argument("--chunk", type=int, default=16, help="tokens per step between drops")
  ap.add_argument("--sink", type=int, default=1, help="sink pages of streaming and h2o")
  ap.add_argument("--fractions", default="0.25,0.5", help="budgets as fractions of the window")
  ap.add_argument("--modes", default="streaming,h2o,h2o_mean,window",
                  help="drop modes besides full")
  ap.add_argument("--h2o-recent", type=float, default=H2O_RECENT,
                  help="share of the non-sink budget the h2o modes give the recent window")
  args = ap.parse_args(argv)
  H2O_RECENT = args.h2o_recent
  num_windows = args.windows or (2 if args.quick else 8)
  window = args.window or (512 if args.quick else 1024)
  fractions = [float(f) for f in args.fractions.split(",") if f]
  modes = [m for m in args.modes.split(",") if m]
  for m in modes:
    split(m, 4, 1)   # unknown modes fail before the model loads
  info = common.machine()
  print("machine:", json.dumps(info), flush=True)

  t0 = time.perf_counter()
  config, params, tok = load_smollm2()
  windows = pydoc_windows(tok, window, num_windows)
  print(f"loaded in {time.perf_counter() - t0:.1f} s", flush=True)
  res = {"machine": info, "quick": args.quick, "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, "
         "float32 params)", "cache_dtype": "bfloat16", "page_size": args.page,
         "window": window, "num_windows": num_windows, "chunk": args.chunk,
         "sink_pages": args.sink, "h2o_recent": H2O_RECENT, "runs": {}}

  def record(name, nll, budget, mode, seconds):
    kept = (None,) * 3 if budget is None else effective_split(mode, budget, args.sink)
    row = {"mode": mode, "budget_pages": budget,
           "budget_fraction": None if budget is None else budget * args.page / window,
           "sink_pages": kept[0], "recent_pages": kept[1], "heavy_pages": kept[2],
           "ppl": float(math.exp(nll.mean())), "seconds": seconds}
    res["runs"][name] = row
    row["_nll"] = nll
    print(f"{name}: ppl {row['ppl']:.4f} ({seconds:.0f} s)", flush=True)

  t1 = time.perf_counter()
  nll = run_mode(params, config, windows, mode="full", budget=0, page=args.page,
                 chunk=args.chunk, sink=args.sink)
  record("full", nll, None, "full", time.perf_counter() - t1)
  for frac in fractions:
    budget = max(int(round(frac * window / args.page)), args.sink + 3)
    for mode in modes:
      t1 = time.perf_counter()
      nll = run_mode(params, config, windows, mode=mode, budget=budget, page=args.page,
                     chunk=args.chunk, sink=args.sink)
      record(f"{mode}@{frac:g}", nll, budget, mode, time.perf_counter() - t1)
  full = res["runs"]["full"]["_nll"]
  for name, row in res["runs"].items():
    nll = row.pop("_nll")
    row["rel_ppl_increase"] = row["ppl"] / res["runs"]["full"]["ppl"] - 1.0
    if row["budget_pages"] is not None:
      first = row["budget_pages"] * args.page
      row["ppl_after"] = float(math.exp(nll[:, first:].mean()))
      row["full_ppl_after"] = float(math.exp(full[:, first:].mean()))
      row["rel_ppl_after"] = row["ppl_after"] / row["full_ppl_after"] - 1.0
  res["total_seconds"] = time.perf_counter() - t0
  if args.out:
    common.write_json(args.out, res, indent=1)
  print_table(res)
  return res


def print_table(res: dict) -> None:
  print(f"\nSmolLM2-135M, {res['num_windows']} x {res['window']} tokens of pydoc_data.topics, "
        f"pages of {res['page_size']}, chunks of {res['chunk']}, bf16 cache")
  print(f"{'run':<16} {'budget':>10} {'sink/recent/heavy':>18} {'ppl':>8} {'rel':>8} "
        f"{'ppl_after':>9} {'full_after':>10} {'rel_after':>9}")
  for name, r in res["runs"].items():
    if r["budget_pages"] is None:
      print(f"{name:<16} {'-':>10} {'-':>18} {r['ppl']:>8.4f} {0:>7.2f}%")
      continue
    split_s = f"{r['sink_pages']}/{r['recent_pages']}/{r['heavy_pages']}"
    print(f"{name:<16} {r['budget_pages']:>4} pages {split_s:>18} {r['ppl']:>8.4f} "
          f"{r['rel_ppl_increase'] * 100:>7.2f}% {r['ppl_after']:>9.4f} "
          f"{r['full_ppl_after']:>10.4f} {r['rel_ppl_after'] * 100:>8.2f}%")


if __name__ == "__main__":
  sys.exit(main() and 0)
