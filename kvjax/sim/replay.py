"""A trace's requests through the REAL tiered cache (``kvjax.tiers``, optionally with an L3
``BlockStore`` under it): what ``kvjax.sim.tiers``'s model is checked against.

Each request is one sequence: its prompt is one page of ``block_tokens`` per block and
one more token (so every block is looked up); it is attached across tiers, its uncached
tokens are planned (the model is not run: pages keep zeros) and it is released. A tiny
layer/head configuration: the replay measures the cache, not a model.
``tests/test_sim_tiers3.py`` runs it (a doctest here would compile the cache).
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.attach import attach_prefix as attach_l1
from kvjax.cache.config import CacheConfig
from kvjax.cache.lifecycle import release as release_l1
from kvjax.cache.plan import plan_step as plan_l1
from kvjax.cache.state import init as init_l1
from kvjax.sim.tiers import hit_summary
from kvjax.sim.traces import Trace
from kvjax.store import BlockStore
from kvjax.store import StoreConfig
from kvjax.store import WritePolicy
from kvjax.tiers import ops as tier_ops
from kvjax.tiers.config import TierConfig
from kvjax.tiers.l3 import l3_format
from kvjax.tiers.l3 import L3Config
from kvjax.tiers.l3 import L3Tier
from kvjax.tiers.l3 import with_l3
from kvjax.tiers.state import init as init_tiers


def block_tokens(blocks: np.ndarray, page_size: int) -> np.ndarray:
  """int32 [n * page_size]: synthetic tokens of a request's blocks, one page per block,
  derived from the block ids (distinct blocks never share a page of tokens).

  >>> block_tokens(np.array([0, 2]), 2).tolist()
  [1, 2, 5, 6]
  """
  b = np.asarray(blocks, np.int64)
  return ((b[:, None] * page_size + np.arange(page_size)) + 1).reshape(-1).astype(np.int32)


def replay_cache(trace: Trace, *, l1_pages: int, l2_pages: Optional[int],
                 l3_pages: Optional[int] = None, write: str = "write_back",
                 l3_hits: int = 1, l3_preset: str = "bf16", l3_path: Optional[str] = None,
                 procs: Optional[Sequence[int]] = None, shared_l2: bool = True,
                 requests: Optional[int] = None, page_size: int = 4,
                 l2_preset: str = "bf16", min_pages_per_seq: int = 256,
                 prepare: Optional[Callable] = None,
                 progress: Optional[Callable] = None) -> dict:
  """Replay ``trace`` through the REAL tiered cache; as ``kvjax.sim.tiers.three_tier``.

  Args:
    trace: block references (one page per block).
    l1_pages, l2_pages: as ``three_tier`` (``l2_pages`` ``None``/0: L1 alone, the
      ``kvjax`` ops).
    l3_pages: the capacity of an L3 ``BlockStore`` under L2 (one process); ``None``/0:
      none. write / l3_hits: its ``WritePolicy``; l3_preset: its pages' preset.
    l3_path: the store's directory (default a temporary one, removed after; a
      ``"memory"`` kvstore if ``"memory"``).
    procs, shared_l2, requests: as ``three_tier``.
    page_size: tokens per page; l2_preset: L2's preset.
    min_pages_per_seq: page-table columns are ``max(this, longest request + 1)`` (one
      compiled shape for all replays).
    prepare: ``prepare(state, config, tiers)`` maps each process's initial state (to fill
      pages, or place it on a mesh).
    progress: called with (request index, state) after each request.

  Returns:
    ``three_tier``'s counts and ratios, ``"per_request"`` int [R, 3] (hits per tier; [R, 2]
    without L3, as ``two_tier``),
    ``"states"`` (each process's final state), ``"stats"`` (the first state's
    ``TierStats`` as ints) and ``"store"`` (the store's ``stats()``; {} without L3).

  Processes (``procs``) each have their own L1 and, with ``shared_l2``, hand one L2
  (``L2State``) to each other; one logical clock is shared (each process's L1 clock is
  set to it before a request).
  """
  r_ = trace.num_requests if requests is None else min(int(requests), trace.num_requests)
  procs = np.zeros(r_, np.int64) if procs is None else np.asarray(procs)[:r_]
  n_proc = int(procs.max()) + 1 if r_ else 1
  use_l3 = bool(l3_pages)
  if use_l3 and (not l2_pages or n_proc > 1):
    raise ValueError(f"l3_pages needs an L2 and one process, got l2_pages={l2_pages!r} and "
                     f"{n_proc} processes")
  bounds = np.searchsorted(trace.request, np.arange(r_ + 1))
  longest = int(np.max(np.diff(bounds))) if r_ else 1
  cfg = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=8, page_size=page_size,
                    num_pages=int(l1_pages), max_seqs=1,
                    max_pages_per_seq=max(min_pages_per_seq, longest + 1))
  width = max(min_pages_per_seq, longest + 1) * page_size
  use_l2 = bool(l2_pages)
  tc = TierConfig(l2_pages=int(l2_pages), l2_preset=l2_preset) if use_l2 else None
  tmp = None
  tier = None
  if use_l2:
    states = [init_tiers(cfg, tc) for _ in range(n_proc)]
    if prepare is not None:
      states = [prepare(st, cfg, tc) for st in states]
    if use_l3:
      conf = L3Config(preset=l3_preset, write=WritePolicy(write, hits=int(l3_hits)))
      if l3_path == "memory":
        sc = StoreConfig(kvstore={"driver": "memory"}, capacity=int(l3_pages), sync=False)
      else:
        if l3_path is None:
          l3_path = tmp = tempfile.mkdtemp(prefix="kvjax-l3-")
        sc = StoreConfig(path=l3_path, capacity=int(l3_pages), sync=False)
      store = BlockStore(sc, l3_format(cfg, conf.preset))
      tier = L3Tier(store, config=cfg, tiers=tc, l3=conf)
      states = [with_l3(states[0], tier)]
    shared = [states[0].l2] if shared_l2 else None
  else:
    attach = jax.jit(attach_l1, static_argnames="config")
    plan = jax.jit(plan_l1, static_argnames="config")
    release = jax.jit(release_l1, static_argnames="config")
    states = [init_l1(cfg) for _ in range(n_proc)]
  per = np.zeros((r_, 3), np.int64)
  clock = 0
  one = jnp.array([0])
  try:
    for r in range(r_):
      p = int(procs[r])
      blocks = trace.block[bounds[r]:bounds[r + 1]]
      n = len(blocks)
      toks = block_tokens(blocks, page_size)
      prompt = np.zeros((1, width), np.int32)
      prompt[0, :n * page_size] = toks
      num = jnp.array([n * page_size + 1])
      st = states[p]
      if use_l2:
        st = st.replace(l1=st.l1.replace(clock=jnp.int32(clock)))
        if shared_l2:
          st = st.replace(l2=shared[0])
        before = [int(getattr(st.stats, f"l{i}_hit_pages")) for i in (1, 2, 3)]
        cached, st = tier_ops.attach_prefix(st, one, jnp.asarray(prompt), num, config=cfg,
                                            tiers=tc)
        per[r] = [int(getattr(st.stats, f"l{i}_hit_pages")) - before[i - 1] for i in (1, 2, 3)]
      else:
        st = st.replace(clock=jnp.int32(clock))
        cached, st = attach(st, one, jnp.asarray(prompt), num, config=cfg)
        per[r, 0] = int(cached[0]) // page_size
      c = int(cached[0])
      rest = np.zeros((1, width), np.int32)
      rest[0, :n * page_size - c] = toks[c:]
      if use_l2:
        st = tier_ops.plan_step(st, one, jnp.asarray(rest), num - c, config=cfg, tiers=tc)
        st = tier_ops.release(st, one, config=cfg)
        clock = int(st.l1.clock)
        if shared_l2:
          shared[0] = st.l2
      else:
        _, st = plan(st, one, jnp.asarray(rest), num - c, config=cfg)
        st = release(st, one, config=cfg)
        clock = int(st.clock)
      states[p] = st
      if progress is not None:
        progress(r, st)
    store_stats = tier.store.stats() if tier is not None else {}
  finally:
    if tier is not None:
      tier.close()
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
  if use_l2 and shared_l2:
    states = [st.replace(l2=shared[0]) for st in states]
  stats = ({n: int(getattr(states[0].stats, n)) for n in states[0].stats.__dataclass_fields__}
           if use_l2 else {})
  return {**hit_summary(per, int(bounds[r_] - bounds[0])),
          "per_request": per if use_l3 else per[:, :2], "states": states, "stats": stats,
          "store": store_stats}
