"""A jitted cache simulator: ``lax.scan`` over block references, metadata only.

Each reference looks its block up (a block-to-page map), and on a miss asks the policy
for a victim with the **same** ``score`` function the real cache uses, then (if the
policy's admission filter agrees) fills the victim's page. Belady's MIN and MIN with
bypass are the registered oracle policies ``"min"`` and ``"min-bypass"``; they read the
next-use times the trace carries. Capacities and parameter sets are swept with ``vmap``
(pages beyond a run's capacity are pinned, so they are never candidates).

LRU and FIFO also have an O(1)-per-reference exact path (``kvjax.sim.exact``), taken by
default (``path="scoring"`` forces the scoring functions; both give the same hit flags).

Names in shapes: N = references, P = pages (the largest capacity), V = runs.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.layout.meta import PageMeta
from kvjax.policies.contract import get_policy
from kvjax.policies.contract import make_params
from kvjax.policies.contract import POLICIES
from kvjax.policies.scoring import Access
from kvjax.policies.scoring import argmax
from kvjax.policies.scoring import Deferred
from kvjax.policies.scoring import POOL_PAGES
from kvjax.prefix.hashing import fmix32
from kvjax.sim.arc import arc_hits
from kvjax.sim.arc import arc_scan_hits
from kvjax.sim.arc import HOST_POLICIES
from kvjax.sim.exact import exact_hits
from kvjax.sim.exact import EXACT_POLICIES
from kvjax.sim import traces
from kvjax.sim.traces import Trace
from kvjax.xla_cpu import loop_kernels_on

ACCOUNTING = ("block", "prefix")
PATHS = ("auto", "scoring", "exact", "sampled")


def _check_capacities(capacities) -> list[int]:
  caps = [capacities] if isinstance(capacities, (int, np.integer)) else list(capacities)
  if not caps:
    raise ValueError("capacities must name at least one capacity, got []")
  for c in caps:
    if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c <= 0:
      raise ValueError(f"capacity must be a positive integer number of blocks, got {c!r}")
  return [int(c) for c in caps]


def _empty_meta(num_pages: int, capacity) -> dict:
  z = jnp.zeros((num_pages,), jnp.int32)
  return dict(
      ref_count=jnp.where(jnp.arange(num_pages) < capacity, 0, 1).astype(jnp.int32),
      last_access=z, access_count=z, block_hash=jnp.zeros((num_pages, 2), jnp.uint32),
      parent=z - 1, position=z, filled=z)


def _as_meta(fields: dict, page_size: int) -> PageMeta:
  # Token ids are not simulated: a broadcast placeholder gives policies the page size
  # (``meta.tokens.shape[-1]``) without materializing [P, page_size] in the scan carry.
  p = fields["filled"].shape[0]
  return PageMeta(tokens=jnp.broadcast_to(jnp.int32(-1), (p, page_size)),
                  namespace=jnp.broadcast_to(jnp.uint32(0), (p, 2)), **fields)


def _decide(policy, pstate, meta, fields, params, x, key, clock, hit, s, victim):
  """One reference's outcome: the ``Access`` event (admission asked on a miss) and the
  block's new access count; shared by the full and the sampled scoring paths."""
  cand = Access(slot=victim, key=key, hit=hit, inserted=jnp.bool_(False),
                evicted=jnp.bool_(False), evicted_key=meta.block_hash[victim], clock=clock,
                next_use=x["next_use"], filled=x["filled"], position=x["position"])
  admit = ~hit
  if policy.admit is not None:
    admit = admit & policy.admit(pstate, meta, cand, victim, params)
  evicted = admit & (fields["filled"][victim] > 0)
  count = jnp.where(hit, fields["access_count"][s] + 1, 1)
  access = cand._replace(
      slot=jnp.where(hit | admit, jnp.where(hit, s, victim), -1), inserted=admit,
      evicted=evicted,
      evicted_key=jnp.where(evicted, meta.block_hash[victim], jnp.zeros((2,), jnp.uint32)))
  return access, count


def _simulate(refs: dict, capacity, params, *, policy_name: str, num_pages: int,
              num_blocks: int, page_size: int):
  """bool [N] hit flags of one run (capacity int32 [], params dict of float32 [])."""
  policy = get_policy(policy_name)

  def apply(fields, pstate, page_block, pending):
    """Writes of the previous reference (all writes of a step come before its reads)."""
    access, count, b = pending
    t = jnp.where(access.slot >= 0, access.slot, num_pages)
    page_block = page_block.at[jnp.where(access.inserted, t, num_pages)].set(b, mode="drop")
    f = dict(fields)
    f["last_access"] = f["last_access"].at[t].set(access.clock, mode="drop")
    f["access_count"] = f["access_count"].at[t].set(count, mode="drop")
    f["block_hash"] = f["block_hash"].at[t].set(access.key, mode="drop")
    f["filled"] = f["filled"].at[t].set(access.filled, mode="drop")
    f["position"] = f["position"].at[t].set(access.position, mode="drop")
    pstate = policy.update(pstate, _as_meta(f, page_size), access, params)
    return f, pstate, page_block

  def step(carry, x):
    # XLA on CPU copies a whole carried array every step when a value read from it is
    # used after the array is written in the same step (docs/ARCHITECTURE.md). So a
    # step first applies the previous reference's writes, then only reads; its own
    # writes travel to the next step as scalars (``pending``).
    fields, pstate, page_block = apply(*carry)
    meta = _as_meta(fields, page_size)
    b, clock = x["block"], x["clock"]
    key = jnp.stack([(b + 1).astype(jnp.uint32), jnp.uint32(0)])
    s = argmax(jnp.where(page_block == b, 1.0, 0.0))  # lookup by comparison, see above
    hit = page_block[s] == b
    victim = argmax(policy.score(pstate, meta, clock, params))
    access, count = _decide(policy, pstate, meta, fields, params, x, key, clock, hit, s, victim)
    return (fields, pstate, page_block, (access, count, b)), hit

  z = jnp.int32(0)
  nothing = Access(slot=z - 1, key=jnp.zeros((2,), jnp.uint32), hit=jnp.bool_(False),
                   inserted=jnp.bool_(False), evicted=jnp.bool_(False),
                   evicted_key=jnp.zeros((2,), jnp.uint32), clock=z, next_use=z - 1, filled=z,
                   position=z)
  carry = (_empty_meta(num_pages, capacity), policy.init(num_pages),
           jnp.full((num_pages,), -1, jnp.int32), (nothing, z, z))
  _, hits = jax.lax.scan(step, carry, refs)
  return hits


def _gather_rows(tree, idx: jax.Array, num_pages: int):
  """``tree`` with every per-page leaf (leading dim ``num_pages``) gathered at int32 [K]
  ``idx``; a ``Deferred`` is gathered as of its pending writes (and has none after)."""
  k = idx.shape[0]

  def one(x):
    if isinstance(x, Deferred):
      if x.array.shape[0] != num_pages:
        return x
      out = x.array[idx]
      shape = (k,) + (1,) * (out.ndim - 1)
      for j in range(x.index.shape[0]):
        out = jnp.where((x.index[j] == idx).reshape(shape), x.value[j], out)
      return Deferred(out, jnp.full_like(x.index, k), x.value)
    if getattr(x, "ndim", 0) >= 1 and x.shape[0] == num_pages:
      return x[idx]
    return x

  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, Deferred))


def _simulate_sampled(refs: dict, capacity, params, key, *, policy_name: str,
                      num_pages: int, num_blocks: int, page_size: int, sample: int):
  """bool [N] hit flags of one run whose victims are chosen among ``sample`` pages.

  Blocks are looked up in an int32 [num_blocks] table (one gather, not a comparison over
  the pool); on a miss the policy scores only the candidates: the pool's per-page
  metadata and per-page state leaves are gathered at int32 [K] page indices, uniform
  over ``[0, capacity)`` (with replacement) from a counter-based keyed hash of
  (``key``, clock, candidate) -- murmur3's finalizer twice, ~10x cheaper than threefry
  here, the next free
  page first while the pool is filling. With ``sample >= num_pages`` the candidates are
  every page in order, which gives exactly the scoring path's victims.
  """
  policy = get_policy(policy_name)
  nowhere = num_blocks
  full = sample >= num_pages

  def apply(fields, pstate, page_block, block_page, pending):
    access, count, b, old = pending
    t = jnp.where(access.slot >= 0, access.slot, num_pages)
    page_block = page_block.at[jnp.where(access.inserted, t, num_pages)].set(b, mode="drop")
    block_page = block_page.at[old].set(-1, mode="drop")
    block_page = block_page.at[jnp.where(access.inserted, b, nowhere)].set(t, mode="drop")
    f = dict(fields)
    f["last_access"] = f["last_access"].at[t].set(access.clock, mode="drop")
    f["access_count"] = f["access_count"].at[t].set(count, mode="drop")
    f["block_hash"] = f["block_hash"].at[t].set(access.key, mode="drop")
    f["filled"] = f["filled"].at[t].set(access.filled, mode="drop")
    f["position"] = f["position"].at[t].set(access.position, mode="drop")
    pstate = policy.update(pstate, _as_meta(f, page_size), access, params)
    return f, pstate, page_block, block_page

  def candidates(clock, used):
    if full:
      return jnp.arange(num_pages, dtype=jnp.int32)
    ctr = clock.astype(jnp.uint32) * jnp.uint32(sample) + jnp.arange(sample, dtype=jnp.uint32)
    idx = (fmix32(fmix32(ctr ^ key) + key) % capacity.astype(jnp.uint32)).astype(jnp.int32)
    return idx.at[0].set(jnp.where(used < capacity, used, idx[0]))

  def step(carry, x):
    fields, pstate, page_block, block_page = apply(*carry[:5])
    used = carry[5]
    meta = _as_meta(fields, page_size)
    b, clock = x["block"], x["clock"]
    key_b = jnp.stack([(b + 1).astype(jnp.uint32), jnp.uint32(0)])
    p = block_page[b]
    hit = p >= 0
    s = jnp.maximum(p, 0)
    idx = candidates(clock, used)
    sub = {k: v[idx] for k, v in fields.items()}
    # a score's pool-wide size is the run's (every page beyond it is pinned), not the sample's
    scores = policy.score(_gather_rows(pstate, idx, num_pages), _as_meta(sub, page_size),
                          clock, {**params, POOL_PAGES: capacity})
    victim = idx[argmax(scores)]
    access, count = _decide(policy, pstate, meta, fields, params, x, key_b, clock, hit, s,
                            victim)
    admit, evicted = access.inserted, access.evicted
    old = jnp.where(evicted, page_block[victim], nowhere)
    used = used + (admit & ~evicted).astype(jnp.int32)
    return (fields, pstate, page_block, block_page, (access, count, b, old), used), hit

  z = jnp.int32(0)
  nothing = Access(slot=z - 1, key=jnp.zeros((2,), jnp.uint32), hit=jnp.bool_(False),
                   inserted=jnp.bool_(False), evicted=jnp.bool_(False),
                   evicted_key=jnp.zeros((2,), jnp.uint32), clock=z, next_use=z - 1, filled=z,
                   position=z)
  carry = (_empty_meta(num_pages, capacity), policy.init(num_pages),
           jnp.full((num_pages,), -1, jnp.int32), jnp.full((num_blocks,), -1, jnp.int32),
           (nothing, z, z, z + nowhere), z)
  _, hits = jax.lax.scan(step, carry, refs)
  return hits


@functools.partial(jax.jit, static_argnames=("policy_name", "num_pages", "num_blocks",
                                              "page_size", "sample", "in_turn"))
def _simulate_batch(refs: dict, capacities, params, seed, *, sample=None, in_turn=False,
                    **static):
  """bool [V, N] hit flags of V runs (capacities int32 [V], params dict of float32 [V]);
  ``sample`` (static) picks the sampled path, keyed by int32 [] ``seed``. ``in_turn``
  (static) runs the V scans one after another (``lax.map``) instead of one vmapped scan:
  under vmap a write at a per-run index is a scatter, which keeps the scan out of an
  XLA:CPU loop kernel (``kvjax.xla_cpu``): sampled LRU at 6,144 pages took 0.21 us a
  reference alone and 2.0 us vmapped with a second run (1,000 conversation requests).
  Only for the sampled path: the scoring path's O(P) score per miss batches well, and
  its 16-run autoclass sweep took 20.9 s in turn against 11.2 s vmapped."""
  if sample is None:
    run = functools.partial(_simulate, **static)
    one = lambda cp: run(refs, *cp)  # noqa: E731
  else:
    key = fmix32(jnp.asarray(seed).astype(jnp.uint32) + jnp.uint32(0x9E3779B9))
    run = functools.partial(_simulate_sampled, sample=sample, **static)
    one = lambda cp: run(refs, *cp, key)  # noqa: E731
  if in_turn:
    return jax.lax.map(one, (capacities, params))
  return jax.vmap(one)((capacities, params))


def _refs(trace: Trace) -> dict:
  n = trace.num_refs
  return dict(block=jnp.asarray(trace.block), clock=jnp.arange(n, dtype=jnp.int32),
              next_use=jnp.asarray(trace.next_use), filled=jnp.asarray(trace.filled),
              position=jnp.asarray(trace.position))


def simulate_hits(trace: Trace, capacities, policy="lru", params=None, *,
                  path: str = "auto", sample: Optional[int] = None,
                  seed: int = 0) -> np.ndarray:
  """Per-reference hit flags of ``policy`` on ``trace`` at each capacity (vmapped).

  Args:
    trace: the references to replay.
    capacities: an int or a sequence of V positive ints (blocks the cache holds).
    policy: a registered name or ``Policy``, or ``"arc"`` / ``"arc-bypass"``
      (``kvjax.sim.arc``, no parameters: ``path="auto"`` runs the host lists,
      ``path="exact"`` the jitted vmapped scan; the same hit flags).
    params: one params dict (``make_params``), or a sequence of V of them (one per
      capacity), or None for the defaults.
    path: ``"scoring"`` runs the policy's ``score`` at every miss (every policy);
      ``"exact"`` runs the O(1)-per-reference simulator of ``kvjax.sim.exact`` (LRU and
      FIFO only; the same hit flags, tested); ``"auto"`` takes ``"exact"`` where it
      exists (and ``"sampled"`` when ``sample`` is given); ``"sampled"`` scores only
      ``sample`` candidate pages per miss (any policy).
    sample: K, the candidates scored per miss on the sampled path (a static int >= 1: one
      compilation per K). ``K >= max(capacities)`` scores every page in order and gives
      the scoring path's hit flags exactly; smaller K samples pages uniformly (with
      replacement) from the run's capacity, as LRB and Redis do. A score is told the
      run's pool size (``params[POOL_PAGES]``, read by ``pool_pages``: the interval scale
      of ``classfreq``/``autoclass``); other pool-wide totals (``s3fifo``'s probation
      share, ``weighted``'s child counts) are seen over the sample.
    seed: the sampled path's PRNG key (a keyed counter hash of the clock and candidate:
      the same seed gives the same hit flags; every run of a sweep sees the same samples).

  Returns:
    bool numpy [V, N] (``[N]`` when ``capacities`` is an int).

  >>> from kvjax.sim.traces import from_requests
  >>> t = from_requests([[1, 2], [1, 3], [1, 2]], [1024, 1024, 1024])
  >>> simulate_hits(t, 2, "lru").astype(int).tolist()
  [0, 0, 1, 0, 1, 0]
  """
  single = isinstance(capacities, (int, np.integer))
  caps = _check_capacities(capacities)
  if isinstance(policy, str) and policy in HOST_POLICIES:
    if params or sample is not None or path not in ("auto", "exact"):
      raise ValueError(f"policy {policy!r} runs on its exact paths only (no params, "
                       f"sample or path={path!r})")
    partial = trace.filled < trace.block_size
    bypass = policy == "arc-bypass"
    if path == "exact":  # the jitted, vmapped scan (kvjax.sim.arc)
      hits = arc_scan_hits(trace.block, caps, bypass, partial)
    else:  # the host lists: faster on CPU
      hits = np.stack([arc_hits(trace.block, c, partial if bypass else None) for c in caps])
    return hits[0] if single else hits
  policy = get_policy(policy) if isinstance(policy, str) else policy
  if path not in PATHS:
    raise ValueError(f"path must be one of {PATHS}, got {path!r}")
  if path == "exact" and policy.name not in EXACT_POLICIES:
    raise ValueError(f"path='exact' exists for {EXACT_POLICIES}, not policy {policy.name!r}")
  if sample is not None:
    if isinstance(sample, bool) or not isinstance(sample, (int, np.integer)) or sample < 1:
      raise ValueError(f"sample must be a positive int (candidates per miss), got {sample!r}")
    if path not in ("auto", "sampled"):
      raise ValueError(f"sample={sample} takes path='sampled' (or 'auto'), got path={path!r}")
    path, sample = "sampled", int(sample)
  elif path == "sampled":
    raise ValueError("path='sampled' needs sample=K (candidates scored per miss)")
  if path == "auto" and policy.name in EXACT_POLICIES and policy is POLICIES[policy.name]:
    path = "exact"
  if path == "exact":
    hits = exact_hits(trace.block, caps, policy.name, trace.num_blocks)
    return hits[0] if single else hits
  if isinstance(params, (list, tuple)):
    if len(params) != len(caps):
      raise ValueError(f"params must be one dict or {len(caps)} (one per capacity), "
                       f"got {len(params)}")
    plist = list(params)
  else:
    plist = [make_params(policy) if params is None else params] * len(caps)
  stacked = jax.tree.map(lambda *v: jnp.stack(v), *plist)
  num_pages = max(caps)
  hits = _simulate_batch(_refs(trace), jnp.asarray(caps, jnp.int32), stacked,
                         jnp.int32(seed), policy_name=policy.name, num_pages=num_pages,
                         num_blocks=max(trace.num_blocks, 1), page_size=trace.block_size,
                         sample=None if path != "sampled" else min(sample, num_pages),
                         in_turn=path == "sampled" and len(caps) > 1 and loop_kernels_on())
  hits = np.asarray(hits)
  return hits[0] if single else hits


def sweep(trace: Trace, capacities, policy, grid, *, sample: Optional[int] = None,
          seed: int = 0) -> np.ndarray:
  """Hit flags of every (parameter set, capacity) pair, in one compiled, vmapped program.

  Args:
    trace: the references to replay.
    capacities: C positive ints (runs are padded to the largest; pages beyond a run's
      capacity are pinned, so they are never candidates).
    policy: a registered name or ``Policy``.
    grid: G dicts of parameter overrides (``make_params`` validates each).
    sample, seed: as in ``simulate_hits`` (the sampled path when ``sample`` is given).

  Returns:
    bool numpy [G, C, N]. One compilation per (policy, largest capacity, trace length,
    G * C, sample).

  >>> t = traces.generate(20, seed=0)
  >>> sweep(t, [4, 8], "lfu", [{"half_life": 10.0}, {}], sample=4).shape[:2]
  (2, 2)
  """
  caps = _check_capacities(capacities)
  policy = get_policy(policy) if isinstance(policy, str) else policy
  grid = list(grid)
  if not grid:
    raise ValueError("grid must name at least one parameter set, got []")
  plist = [make_params(policy, **g) for g in grid for _ in caps]
  hits = simulate_hits(trace, caps * len(grid), policy, plist,
                       path="scoring" if sample is None else "sampled", sample=sample,
                       seed=seed)
  return hits.reshape(len(grid), len(caps), -1)


def prefix_hits(trace: Trace, hits: np.ndarray) -> np.ndarray:
  """bool [..., N]: hits that lie in the leading run of cached blocks of their request.

  >>> from kvjax.sim.traces import from_requests
  >>> t = from_requests([[1, 2, 3]], [1536])
  >>> prefix_hits(t, np.array([True, False, True])).tolist()
  [True, False, False]
  """
  miss = (~hits).astype(np.int64)
  c = np.cumsum(miss, axis=-1)
  starts = np.flatnonzero(trace.position == 0)
  base = (c - miss)[..., starts]
  counts = np.diff(np.append(starts, trace.num_refs))
  before = np.repeat(base, counts, axis=-1)
  return hits & (c - before == 0)


def hit_ratio(trace: Trace, hits: np.ndarray, accounting: str = "block") -> np.ndarray:
  """float [...]: share of references that hit (``block``) or hit in their request's
  leading run (``prefix``)."""
  if accounting not in ACCOUNTING:
    raise ValueError(f"accounting must be one of {ACCOUNTING}, got {accounting!r}")
  if accounting == "prefix":
    hits = prefix_hits(trace, hits)
  return hits.mean(axis=-1)


def simulate(trace: Trace, capacities, policy="lru", params=None, *,
             accounting: str = "block") -> dict:
  """Hit ratio of ``policy`` on ``trace`` at each capacity: ``{capacity: ratio}``.

  >>> from kvjax.sim.traces import generate
  >>> r = simulate(generate(100, seed=0), [8, 64], "lru")
  >>> sorted(r) == [8, 64] and r[8] <= r[64]
  True
  """
  caps = _check_capacities(capacities)
  if accounting not in ACCOUNTING:
    raise ValueError(f"accounting must be one of {ACCOUNTING}, got {accounting!r}")
  hits = simulate_hits(trace, caps, policy, params)
  ratios = hit_ratio(trace, hits, accounting)
  return {c: float(r) for c, r in zip(caps, ratios)}
