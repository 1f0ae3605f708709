"""The learned eviction policy on the Mooncake conversation trace: train, tune, evaluate.

    python benchmarks/learned.py [--quick] [--out FILE] [--trace PATH] [--no-ship]

* **Features** (``kvjax.learned.features``) are extracted once for the whole trace (they
  only look back); **labels** (``kvjax.learned.labels``) come from inside the training
  window only (censored at its end).
* **Models**: an MLP, an LSTM and a Transformer (Flax NNX, Optax) are trained on the
  first 85 % of the training window (the first 70 % of the trace, by requests); the one
  with the lowest loss on the rest of the window is kept. Policy parameters (horizon,
  admission) are then tuned on the training window by simulation. Nothing is chosen on
  the last 30 %.
* **Evaluation**: the whole trace is replayed (the cache warms on the first 70 %) and only
  references in the last 30 % are counted, at 1,024 / 4,096 / 6,144 / 16,384 blocks, for
  LRU (exact), ARC (exact, host), the best heuristic (``autoclass`` with the credit the
  policies benchmark fits), the learned policy with and without online fine-tuning, and
  MIN. The learned policy and autoclass run the simulator's sampled path (``sample=K``
  candidates per miss); ``gap_closed = (policy - LRU) / (MIN - LRU)``.
* ``capacity_for_lru_hit``: the smallest capacity (a share of 6,144, interpolated on a
  grid) at which the learned policy reaches LRU's hit ratio at 6,144.
* **Held out** (never tuned on): the shipped parameters, unchanged, on generated traces
  with other reuse patterns, and the first 70 % split by conversation (see
  ``conversation_split``).
* ``learned_step_share``: scoring every page with the learned model (the policy's
  ``score`` over the pool plus one ``update``), jitted, over a decode step of a
  stand-in: SmolLM2-135M's architecture with random weights, one token for a batch of 8
  through ``llama.forward`` (no KV cache: a lower bound of the real step, which makes the
  share an upper bound). Loading SmolLM2 is not needed for a cost ratio.
* ``default_policy``: ``learned`` when it generalizes at least as well as ``autoclass`` on
  the held-out traces (mean gap closed, never more than 2 points below LRU), else
  ``autoclass``.

A full run writes the selected predictor and its tuned parameters to
``kvjax/learned/pretrained/`` (the package data the registered ``learned`` policy loads),
unless ``--no-ship``. ``--quick``: the first 2,000 requests (a generated trace when the
real one is absent), capacities divided by 8, short training; never ships.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.learned import features as lfeatures
from kvjax.learned import labels as llabels
from kvjax.learned import train as ltrain
from kvjax.layout.meta import init_meta
from kvjax.models import llama
from kvjax.policies import adapter
from kvjax.policies import get_policy
from kvjax.policies import learned as plearned
from kvjax.policies import learned_policy
from kvjax.policies import make_params
from kvjax.policies import register
from kvjax.sim import simulator, traces
import common  # benchmarks/common.py: machine description, results writer

CAPACITIES = (1024, 4096, 6144, 16384)
KINDS = ("mlp", "lstm", "transformer")
GAP_TARGET = 0.35
LRU_SLACK = 0.02
AUTOCLASS_PARAMS = {"credit": 16384.0}   # the policies benchmark's fit on the first 70 %
TUNE_GRID = [{"horizon": h, "admit": a, "online_lr": 0.0}
             for h in (0.5, 1.0, 2.0) for a in (0.0, 1.0)]
ONLINE_LR = (0.003, 0.01)
CAPACITY_GRID = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
SAMPLE = 64


def split_point(trace, frac: float = 0.7) -> tuple[int, int]:
  """(request, reference) where the last ``1 - frac`` of references begins."""
  starts = np.flatnonzero(trace.position == 0)
  r = int(np.searchsorted(starts, frac * trace.num_refs))
  return r, int(starts[r]) if r < len(starts) else trace.num_refs


def gap(h, lru, mn) -> float:
  return float((h - lru) / (mn - lru)) if mn > lru else 0.0


def conversations(trace) -> np.ndarray:
  """int [R]: a conversation id per request: a request continues the conversation of the
  request that first wrote the deepest of its leading blocks seen before, when those
  cover at least half of its blocks; otherwise it starts a new one (shared system
  prompts alone do not join conversations)."""
  first = {}
  conv = np.zeros(trace.num_requests, np.int64)
  starts = np.append(np.flatnonzero(trace.position == 0), trace.num_refs)
  nxt = 0
  for r in range(trace.num_requests):
    blocks = trace.block[starts[r]:starts[r + 1]].tolist()
    depth = 0
    while depth < len(blocks) and blocks[depth] in first:
      depth += 1
    if depth and 2 * depth >= len(blocks):
      conv[r] = conv[first[blocks[depth - 1]]]
    else:
      conv[r], nxt = nxt, nxt + 1
    for b in blocks:
      first.setdefault(b, r)
  return conv


def subtrace(trace, requests: np.ndarray, name: str):
  """The trace of the given requests (in order)."""
  starts = np.append(np.flatnonzero(trace.position == 0), trace.num_refs)
  hashes = [trace.block[starts[r]:starts[r + 1]].tolist() for r in requests]
  return traces.from_requests(hashes, trace.input_length[requests],
                              trace.output_length[requests], trace.timestamp[requests],
                              block_size=trace.block_size, name=name)


def train_models(trace, feats, cut, steps, log) -> dict:
  """Each kind trained on the first 85 % of ``[0, cut)``, validated on the rest."""
  val = int(0.85 * cut)
  x, k, c = ltrain.training_set(trace.block, trace.position, trace.filled, trace.block_size,
                                0, val, features=feats)
  kv, cv = llabels.distance_classes(trace.block, val, cut)
  out = {}
  for kind in KINDS:
    t0 = time.perf_counter()
    n = steps if kind != "transformer" else steps // 3
    pred, params, hist = ltrain.fit(x, k, c, kind=kind, steps=n, seed=0)
    vloss = float(ltrain.loss(pred.predict(params, jnp.asarray(feats[val:cut])),
                              jnp.asarray(kv), jnp.asarray(cv)))
    out[kind] = {"pred": pred, "params": params, "train_loss": float(np.mean(hist[-50:])),
                 "val_loss": vloss, "steps": n, "fit_s": time.perf_counter() - t0}
    log(f"  {kind:<12s} train {out[kind]['train_loss']:.4f} val {vloss:.4f} "
        f"({out[kind]['fit_s']:.1f} s)")
  return out


def hits_last(trace, caps, policy, params, cut, sample=None) -> dict:
  """{capacity: hit ratio on references ``cut:``}; MIN runs one capacity at a time (its
  scoring path costs O(capacity) per miss: a vmapped sweep pads every run to the largest)."""
  if policy == "min":
    return {c: float(simulator.simulate_hits(trace, c, "min")[cut:].mean()) for c in caps}
  h = simulator.simulate_hits(trace, list(caps), policy, params, sample=sample)
  return {c: float(h[i][cut:].mean()) for i, c in enumerate(caps)}


def tune(name, train_trace, caps, log) -> tuple[dict, list, dict, dict]:
  """Horizon and admission, fitted on the training window (best mean gap, never 2 points
  below LRU), then the online rate."""
  lru = hits_last(train_trace, caps, "lru", None, 0)
  mn = hits_last(train_trace, caps, "min", None, 0)
  rows = []
  best, best_score = None, -np.inf
  for g in TUNE_GRID:
    r = hits_last(train_trace, caps, name, make_params(name, **g), 0, SAMPLE)
    gaps = [gap(r[c], lru[c], mn[c]) for c in caps]
    safe = all(r[c] >= lru[c] - LRU_SLACK for c in caps)
    score = float(np.mean(gaps)) - 10.0 * (not safe)
    rows.append({"params": g, "hit_ratio": r, "mean_gap": float(np.mean(gaps)), "safe": safe})
    log(f"  tune {g}: mean gap {np.mean(gaps):.4f} safe {safe}")
    if score > best_score:
      best, best_score = g, score
  return best, rows, lru, mn


def step_share(name, params, log, quick) -> dict:
  """Scoring every page with the learned model, over a stand-in decode step (see the
  module docstring); also one ``update`` per sequence of the batch, an upper bound on
  the events a decode step reports."""
  config = llama.LlamaConfig(vocab_size=49152, d_model=576, num_layers=4 if quick else 30,
                             num_heads=9, num_kv_heads=3, head_dim=64, ffn_dim=1536,
                             rope_base=100000.0)
  mparams = llama.init_params(config, jax.random.key(0))
  batch, num_pages, page_size = 8, 4096, 16
  tokens = jnp.zeros((batch, 1), jnp.int32)
  policy = get_policy(name)
  prm = make_params(name, **params)
  rng = np.random.default_rng(0)
  meta = init_meta(num_pages, page_size).replace(
      filled=jnp.full((num_pages,), page_size, jnp.int32),
      last_access=jnp.asarray(rng.integers(0, 10_000, num_pages), jnp.int32),
      access_count=jnp.asarray(rng.integers(1, 5, num_pages), jnp.int32))
  state = policy.init(num_pages)
  keys = jnp.asarray(rng.integers(1, 2**31, (batch, 2)), jnp.uint32)
  ev = adapter.events(jnp.arange(batch, dtype=jnp.int32), keys, jnp.int32(10_000),
                      kind="hit", position=jnp.arange(batch), filled=jnp.full(batch, 16))

  @jax.jit
  def policy_step(st, clock):
    scores = policy.score(st, meta, clock, prm)
    st = jax.lax.scan(lambda s_, a: (policy.update(s_, meta, a, prm), None), st, ev)[0]
    return scores, st

  def timed(fn, reps):
    jax.block_until_ready(fn())
    best = np.inf
    for _ in range(reps):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      best = min(best, time.perf_counter() - t0)
    return best

  t_policy = timed(lambda: policy_step(state, jnp.int32(10_001)), 20)
  t_decode = timed(lambda: llama.forward(mparams, tokens, config), 5)
  out = {"pages": num_pages, "batch": batch, "policy_s": t_policy, "decode_standin_s": t_decode,
         "decode_standin": f"llama.forward, SmolLM2-135M shapes ({config.num_layers} layers), "
                           "random weights, batch 8 x 1 token, no KV cache",
         "learned_step_share": t_policy / t_decode}
  log(f"  step share: policy {t_policy * 1e3:.3f} ms / decode {t_decode * 1e3:.2f} ms = "
      f"{out['learned_step_share']:.4f}")
  return out


def capacity_for(trace, name, params, target, cap, cut, sample) -> dict:
  """Smallest share of ``cap`` (interpolated on ``CAPACITY_GRID``) at which ``name``
  reaches hit ratio ``target`` on references ``cut:``."""
  caps = sorted({max(1, int(round(f * cap))) for f in CAPACITY_GRID})
  r = hits_last(trace, caps, name, params, cut, sample)
  share = None
  for a, b in zip([None] + caps[:-1], caps):
    if r[b] >= target:
      if a is None:
        share = b / cap
      else:
        w = (target - r[a]) / max(r[b] - r[a], 1e-12)
        share = (a + w * (b - a)) / cap
      break
  return {"share": share, "target": target, "grid": {str(c): r[c] for c in caps}}


def evaluate(trace, caps, cut, policies: dict, log) -> tuple[dict, dict]:
  """Last-30 % hit ratios of ``policies`` ({label: (name, params, sample)}) and gaps."""
  last = {}
  for label, (name, params, sample) in policies.items():
    t0 = time.perf_counter()
    last[label] = hits_last(trace, caps, name, params, cut, sample)
    log(f"  {label:<16s} {np.round([last[label][c] for c in caps], 4).tolist()} "
        f"({time.perf_counter() - t0:.1f} s)")
  gaps = {p: {c: gap(last[p][c], last["lru"][c], last["min"][c]) for c in caps} for p in last}
  return last, gaps


def heldout_generated(name, params, online, quick, log) -> dict:
  """The learned policy as shipped (no retraining) on generated traces."""
  n = 1500 if quick else 6000
  specs = {
      "many-long-prompts": dict(seed=1234, num_prompts=40, turns=(1, 5), user_tokens=(100, 6000),
                                concurrent=256),
      "long-chats-few-prompts": dict(seed=77, num_prompts=5, turns=(2, 16), concurrent=32,
                                     zipf=0.8),
  }
  caps = [64, 256, 1024] if quick else [256, 1024, 4096]
  out = {}
  for label, kw in specs.items():
    t = traces.generate(n, name=label, **kw)
    pols = {"lru": ("lru", None, None), "arc": ("arc", None, None),
            "autoclass": ("autoclass", make_params("autoclass", **AUTOCLASS_PARAMS), SAMPLE),
            "learned": (name, make_params(name, **params), SAMPLE),
            "learned_online": (name, make_params(name, **online), SAMPLE),
            "min": ("min", None, None)}
    log(f"  held out: {label} ({t.num_refs} references)")
    last, gaps = evaluate(t, caps, 0, pols, log)
    out[label] = {"references": t.num_refs, "capacities": caps, "generator": {
        k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()},
        "hit_ratio": _strkeys(last), "gap_closed": _strkeys(gaps)}
  return out


def heldout_conversations(trace, r_cut, kind, steps, params, quick, log) -> dict:
  """The first 70 % split by conversation (``conversations``): a predictor trained on the
  even conversations, evaluated on the odd ones (a trace of their requests only)."""
  conv = conversations(trace.slice_requests(0, r_cut))
  reqs = np.arange(r_cut)
  train_t = subtrace(trace, reqs[conv % 2 == 0], "conversations-even")
  eval_t = subtrace(trace, reqs[conv % 2 == 1], "conversations-odd")
  f = lfeatures.extract(train_t.block, train_t.position, train_t.filled, train_t.block_size)
  x, k, c = ltrain.training_set(train_t.block, train_t.position, train_t.filled,
                                train_t.block_size, 0, train_t.num_refs, features=f)
  pred, prm, _ = ltrain.fit(x, k, c, kind=kind, steps=steps, seed=0)
  name = register(learned_policy(pred, prm, name=f"learned-conv-{kind}{'-q' if quick else ''}")).name
  caps = [c_ // 2 for c_ in (CAPACITIES if not quick else [c // 8 for c in CAPACITIES])]
  pols = {"lru": ("lru", None, None), "arc": ("arc", None, None),
          "autoclass": ("autoclass", make_params("autoclass", **AUTOCLASS_PARAMS), SAMPLE),
          "learned": (name, make_params(name, **params), SAMPLE),
          "min": ("min", None, None)}
  log(f"  held out by conversation: {int(conv.max()) + 1} conversations, train "
      f"{train_t.num_refs} / eval {eval_t.num_refs} references")
  last, gaps = evaluate(eval_t, caps, 0, pols, log)
  return {"conversations": int(conv.max()) + 1, "train_references": train_t.num_refs,
          "eval_references": eval_t.num_refs, "capacities": caps,
          "hit_ratio": _strkeys(last), "gap_closed": _strkeys(gaps)}


def _strkeys(d: dict) -> dict:
  return {p: {str(c): v for c, v in row.items()} for p, row in d.items()}


def _generalizes(gaps_by_trace: list, last_by_trace: list, label: str) -> tuple[float, bool]:
  means = [np.mean(list(g[label].values())) for g in gaps_by_trace]
  safe = all(last[label][c] >= last["lru"][c] - LRU_SLACK
             for last in last_by_trace for c in last["lru"])
  return float(np.mean(means)), safe


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="small slice, short training (~minutes)")
  ap.add_argument("--out", default=None)
  ap.add_argument("--trace", default=traces.default_trace_path())
  ap.add_argument("--no-ship", action="store_true",
                  help="do not write the predictor to kvjax/learned/pretrained/")
  args = ap.parse_args(argv)
  out_path = args.out or os.path.join("benchmarks", "results",
                                      "learned_quick.json" if args.quick else "learned.json")
  log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
  t_start = time.perf_counter()
  if os.path.exists(args.trace):
    trace = traces.load_mooncake(args.trace, max_requests=2000 if args.quick else None)
  else:
    log(f"{args.trace} not found: using a generated trace")
    trace = traces.generate(2000 if args.quick else 12000, seed=0)
  caps = [c // 8 for c in CAPACITIES] if args.quick else list(CAPACITIES)
  mid = caps[2]
  steps = 300 if args.quick else 3000
  suffix = "-q" if args.quick else ""
  r_cut, cut = split_point(trace)
  log(f"{trace.name}: {trace.num_refs} references; train on requests [0, {r_cut}) = "
      f"references [0, {cut}); report on [{cut}, {trace.num_refs})")

  t0 = time.perf_counter()
  feats = lfeatures.extract(trace.block, trace.position, trace.filled, trace.block_size)
  extract_s = time.perf_counter() - t0
  log(f"features: {feats.shape} in {extract_s:.1f} s")
  models = train_models(trace, feats, cut, steps, log)
  kind = min(models, key=lambda k_: models[k_]["val_loss"])
  names = {k_: register(learned_policy(m["pred"], m["params"],
                                       name=f"learned-{k_}{suffix}")).name
           for k_, m in models.items()}
  name = names[kind]
  log(f"selected {kind} (lowest validation loss); tuning on the training window")
  train_trace = trace.slice_requests(0, r_cut)
  best, tune_rows, lru_t, min_t = tune(name, train_trace, caps, log)
  online_rows = []
  best_online, best_online_gap = None, -np.inf
  for lr in ONLINE_LR:
    g = {**best, "online_lr": lr}
    r = hits_last(train_trace, caps, name, make_params(name, **g), 0, SAMPLE)
    mg = float(np.mean([gap(r[c], lru_t[c], min_t[c]) for c in caps]))
    online_rows.append({"params": g, "hit_ratio": r, "mean_gap": mg})
    log(f"  online {g}: mean gap {mg:.4f}")
    if mg > best_online_gap:
      best_online, best_online_gap = g, mg

  log("replaying the whole trace, counting the last 30 %")
  pols = {"lru": ("lru", None, None), "arc": ("arc", None, None),
          "autoclass": ("autoclass", make_params("autoclass", **AUTOCLASS_PARAMS), SAMPLE),
          "learned": (name, make_params(name, **best), SAMPLE),
          "learned_online": (name, make_params(name, **best_online), SAMPLE)}
  for k_, n_ in names.items():
    if k_ != kind:
      pols[f"learned_{k_}"] = (n_, make_params(n_, **best), SAMPLE)
  pols["min"] = ("min", None, None)
  last, gaps = evaluate(trace, caps, cut, pols, log)
  cap_lru = capacity_for(trace, name, make_params(name, **best), last["lru"][mid], mid, cut,
                         SAMPLE)
  log(f"  capacity for LRU's hit ratio at {mid}: {cap_lru['share']}")

  if not args.quick and not args.no_ship:
    ship = plearned.PRETRAINED
    if os.path.exists(ship):
      shutil.rmtree(ship)
    ltrain.save(ship, models[kind]["pred"], models[kind]["params"])
    with open(os.path.join(ship, "policy.json"), "w") as f:
      json.dump({"defaults": best, "online": best_online, "kind": kind,
                 "trained_on": f"{trace.name} references [0, {int(0.85 * cut)})"}, f, indent=1)
    log(f"shipped {kind} to {ship}")

  log("held-out evaluation (never tuned on)")
  held_gen = heldout_generated(name, best, best_online, args.quick, log)
  held_conv = heldout_conversations(trace, r_cut, kind, steps, best, args.quick, log)
  share = step_share(name, best, log, args.quick)

  held_gaps = [{p: {int(c): v for c, v in row.items()} for p, row in h["gap_closed"].items()}
               for h in list(held_gen.values()) + [held_conv]]
  held_last = [{p: {int(c): v for c, v in row.items()} for p, row in h["hit_ratio"].items()}
               for h in list(held_gen.values()) + [held_conv]]
  gen_learned = _generalizes(held_gaps, held_last, "learned")
  gen_auto = _generalizes(held_gaps, held_last, "autoclass")
  default = "learned" if (gen_learned[1] and gen_learned[0] >= gen_auto[0]) else "autoclass"
  worst = min(last["learned"][c] - last["lru"][c] for c in caps)
  result = {
      "machine": common.machine(), "quick": args.quick,
      "trace": {"name": trace.name, "requests": trace.num_requests,
                "references": trace.num_refs, "split_request": r_cut, "split_reference": cut},
      "capacities": caps, "accounting": "block", "sample": SAMPLE,
      "features": {"names": list(lfeatures.NAMES), "extract_s": extract_s},
      "models": {k_: {kk: v for kk, v in m.items() if kk not in ("pred", "params")}
                 for k_, m in models.items()},
      "selected_model": kind, "policy_params": best, "online_params": best_online,
      "tuning": {"grid": tune_rows, "online": online_rows},
      "hit_ratio": _strkeys(last), "gap_closed": gaps["learned"],
      "gap_closed_all": _strkeys(gaps),
      "gap_closed_at_%d" % mid: gaps["learned"][mid],
      "meets_gap_target": gaps["learned"][mid] >= GAP_TARGET,
      "worst_points_vs_lru": worst, "never_2pts_below_lru": worst >= -LRU_SLACK,
      "capacity_for_lru_hit": cap_lru["share"], "capacity_for_lru_hit_detail": cap_lru,
      "default_policy": default,
      "default_choice": {"learned_heldout_mean_gap": gen_learned[0],
                         "learned_heldout_never_2pts_below_lru": gen_learned[1],
                         "autoclass_heldout_mean_gap": gen_auto[0],
                         "autoclass_heldout_never_2pts_below_lru": gen_auto[1]},
      "heldout": {"generated": held_gen, "by_conversation": held_conv},
      "learned_step_share": share["learned_step_share"], "step_share": share,
      "wall_s": time.perf_counter() - t_start,
  }
  result["gap_closed"] = {str(c): v for c, v in gaps["learned"].items()}
  common.write_json(out_path, result, indent=1)
  m = result["machine"]
  print(f"machine: {m['platform']}, {m['cpu_count']} CPUs, jax {m['jax']}, {m['device']}")
  print(f"trace {trace.name}: trained on the first 70 %, hit ratio on the last 30 % "
        f"(sampled path, K={SAMPLE}, for learned and autoclass); model {kind}, params {best}")
  print(f"{'policy':<18s}" + "".join(f"{c:>16d}" for c in caps))
  for p in last:
    print(f"{p:<18s}" + "".join(f"{last[p][c]:>9.4f} ({gaps[p][c]:+.2f})" for c in caps))
  print(f"gap_closed at {mid}: {gaps['learned'][mid]:.3f} (target {GAP_TARGET}); worst vs LRU "
        f"{worst:+.4f}; capacity_for_lru_hit {cap_lru['share']}; learned_step_share "
        f"{share['learned_step_share']:.4f}; default_policy {default}; wrote {out_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
