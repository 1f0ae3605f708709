"""Attention-aware page dropping inside one long sequence (H2O / StreamingLLM), opt-in.

A cache in drop mode (``enable``) carries a ``DropState``: the attention
probability mass each page-table column received (``decode_step`` adds it
every step, summed over layers, query heads and queries) and, per sequence,
the number of tokens dropped so far. ``drop_pages`` then shrinks every
sequence that holds more than ``budget`` pages:

- ``mode="streaming"`` (StreamingLLM): keep the first ``sink_pages`` pages
  (attention sinks) and the last ``recent_pages`` pages; drop the oldest of
  the pages in between.
- ``mode="h2o"`` (H2O): keep sinks and the recent window, and of the pages in
  between keep the ``budget - sink_pages - recent_pages`` with the most
  accumulated mass (heavy hitters); ties go to the older page being dropped.
- ``mode="h2o_mean"``: H2O with the accumulated mass divided by the mass the
  sequence's queries spread while the page was there (its share of attention),
  which removes the cumulative score's bias toward old pages.

Representation. Dropping releases whole pages and compacts the sequence's
page table, so ``CacheState.seq_lens`` keeps meaning "tokens in the page
table" and ``plan_step`` / ``write`` / ``attend`` work unchanged in these
compacted coordinates (a dropped page is simply not there; a non-final page
is always full, so the compacted table stays page aligned). A token's
*logical* position, the one RoPE rotates K and q by, is ``seq_lens +
dropped`` at the time it is written; ``decode_step`` adds the offset. RoPE is
applied to K at write time, so kept K keep their original positions and the
holes stay holes: H2O's and StreamingLLM-with-original-positions' choice (no
re-rotation to close the gaps).

Pages and the prefix cache. A dropped page loses the sequence's reference:
shared pages (``ref_count > 1``) stay with their other holders; a page held by
nobody goes back to the pool: freed when it has no content hash, kept as a
cached (evictable, ``ref_count == 0``) page when it has one, exactly as
``kvjax.release`` does; its index entry stays valid, since its hash names its
true prefix. Tokens written after a drop are computed from a partial context,
so they must never be served as someone else's prefix: when a sequence drops,
the last full page of its compacted table leaves the index (its cached
children are orphaned, as ``plan_step`` does for reused pages) and is
unhashed; ``plan_step`` then never hashes the sequence's later pages (a page
whose parent has no hash is not hashed). Other holders of that page lose
prefix caching of their later pages too (a cost, never a wrong hit).

Contract. Staging rings (quant specs with a residual window or a channel axis)
are not supported (``enable`` raises). End and fork sequences with the
ordinary ``kvjax.release`` and ``kvjax.fork``: on a drop-mode cache they clear
the released rows' drop fields and copy the source's to a fork (a sequence
slot that is empty when ``decode_step`` starts it is reset anyway). Shapes:
B = max_seqs, M = max_pages_per_seq, P = num_pages, S = page_size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.cache.checks import check_state
from kvjax.cache.config import CacheConfig
from kvjax.cache.plan import StepPlan
from kvjax.cache.pool import forget_pages
from kvjax.cache.pool import unref_pages
from kvjax.cache.state import CacheState
from kvjax.cache.state import DropState
from kvjax.cache.status import enforce_checked
from kvjax.cache.status import jit_when_eager


MODES = ("h2o", "h2o_mean", "streaming")


def _require(state: CacheState, fn: str) -> DropState:
  if not isinstance(state, CacheState):
    raise ValueError(f"{fn}: state must be a kvjax.CacheState, got {type(state).__name__}")
  if state.drop is None:
    raise ValueError(f"{fn}: state is not in drop mode (call kvjax.drop.enable first)")
  return state.drop


def enable(state: CacheState) -> CacheState:
  """The cache in drop mode: a zero ``DropState`` attached (idempotent).

  Args:
    state: a cache without a staging ring (``state.fold_floor is None``).

  Returns:
    The state with ``state.drop`` set: mass/owner ``[B, M]``, dropped ``[B]``.

  >>> import kvjax
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                         num_pages=4, max_seqs=2, max_pages_per_seq=3)
  >>> enable(kvjax.init(cfg)).drop.mass.shape
  (2, 3)
  """
  if not isinstance(state, CacheState):
    raise ValueError(f"enable: state must be a kvjax.CacheState, got {type(state).__name__}")
  if state.fold_floor is not None or state.k.stage is not None:
    raise ValueError("enable: page dropping does not support quantized caches with a staging "
                     "ring (residual window or channel-axis specs)")
  if state.k.rope_base:
    raise ValueError("enable: page dropping re-positions tokens; it does not support keys "
                     "stored before RoPE (CacheConfig.key_rope)")
  if state.k.sink is not None:
    raise ValueError("enable: page dropping does not support a QuantSpec sink (a dropped "
                     "first page would move other tokens into the sink's positions)")
  if state.drop is not None:
    return state
  b, m_ = state.page_table.shape
  return state.replace(drop=DropState(
      mass=jnp.zeros((b, m_), jnp.float32),
      seen=jnp.zeros((b, m_), jnp.float32),
      owner=jnp.full((b, m_), -1, jnp.int32),
      dropped=jnp.zeros((b,), jnp.int32),
      pages_dropped=jnp.zeros((), jnp.int32),
  ))


def begin_step(state: CacheState, seq_ids: jax.Array) -> tuple[CacheState, jax.Array]:
  """Before ``plan_step``: the rows' RoPE offsets; empty sequence slots are reset.

  Args:
    state: a drop-mode cache.
    seq_ids: int32 [B'] the step's rows (-1 = padding).

  Returns:
    ``(state, offset)``: offset int32 [B'] is the tokens dropped from each
    row's sequence (0 for padding and empty slots), to add to the plan's
    positions for RoPE.

  >>> import kvjax
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                         num_pages=4, max_seqs=2, max_pages_per_seq=3)
  >>> begin_step(enable(kvjax.init(cfg)), jnp.array([1, -1]))[1].tolist()
  [0, 0]
  """
  d = _require(state, "begin_step")
  ms = state.page_table.shape[0]
  seq_ids = jnp.asarray(seq_ids, jnp.int32)
  empty = state.seq_lens == 0                                              # [B]
  d = d.replace(dropped=jnp.where(empty, 0, d.dropped),
                mass=jnp.where(empty[:, None], 0.0, d.mass),
                seen=jnp.where(empty[:, None], 0.0, d.seen),
                owner=jnp.where(empty[:, None], -1, d.owner))
  ok = (seq_ids >= 0) & (seq_ids < ms)
  offset = jnp.where(ok, d.dropped[jnp.clip(seq_ids, 0, ms - 1)], 0)
  return state.replace(drop=d), offset.astype(jnp.int32)


def accumulate(state: CacheState, plan: StepPlan, mass: jax.Array) -> CacheState:
  """Add a step's per-row page mass to the rows' sequences (after ``plan_step``).

  A column whose page changed since its mass was recorded (released and
  reused slots) restarts from zero.

  Args:
    state: a drop-mode cache, after the step's ``plan_step``.
    plan: the step's plan.
    mass: float32 [B', M] per-page mass of each plan row (``attend(..., with_mass=True).mass``,
      summed over layers).

  Returns:
    The state with ``drop.mass`` / ``seen`` / ``owner`` updated for the granted rows.

  >>> import kvjax
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                         num_pages=4, max_seqs=1, max_pages_per_seq=2)
  >>> plan, st = kvjax.plan_step(enable(kvjax.init(cfg)), jnp.array([0]), jnp.array([[1]]),
  ...                            jnp.array([1]), config=cfg)
  >>> d = accumulate(st, plan, jnp.array([[2.0, 0.0]])).drop
  >>> d.mass.tolist(), d.seen.tolist()
  ([[2.0, 0.0]], [[2.0, 0.0]])
  """
  d = _require(state, "accumulate")
  ms = state.page_table.shape[0]
  granted = (plan.seq_ids >= 0) & (plan.seq_ids < ms) & ~plan.refused
  rows = jnp.where(granted, plan.seq_ids, ms)
  sid = jnp.clip(plan.seq_ids, 0, ms - 1)
  table = state.page_table[sid]                                            # [B', M]
  same = d.owner[sid] == table
  mass = mass.astype(jnp.float32)
  new = jnp.where(table >= 0, jnp.where(same, d.mass[sid], 0.0) + mass, 0.0)
  seen = jnp.where(table >= 0, jnp.where(same, d.seen[sid], 0.0)
                   + jnp.sum(mass, axis=1, keepdims=True), 0.0)
  return state.replace(drop=d.replace(
      mass=d.mass.at[rows].set(new, mode="drop"),
      seen=d.seen.at[rows].set(seen, mode="drop"),
      owner=d.owner.at[rows].set(table, mode="drop")))


def _check_budget(budget, sink_pages, recent_pages, mode) -> None:
  for name, value in (("budget", budget), ("sink_pages", sink_pages),
                      ("recent_pages", recent_pages)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
      raise ValueError(f"drop_pages: {name} must be a non-negative int, got {value!r}")
  if recent_pages < 1:
    raise ValueError(f"drop_pages: recent_pages must be >= 1 (the partial last page is never "
                     f"dropped), got {recent_pages}")
  if budget < sink_pages + recent_pages + 1:
    raise ValueError(f"drop_pages: budget must be >= sink_pages + recent_pages + 1 = "
                     f"{sink_pages + recent_pages + 1}, got {budget}")
  if mode not in MODES:
    raise ValueError(f"drop_pages: mode must be one of {MODES}, got {mode!r}")


def select_drops(mass: jax.Array, num_pages: jax.Array, *, budget: int, sink_pages: int,
                 recent_pages: int, mode: str = "h2o") -> jax.Array:
  """Which page-table columns each sequence drops to get down to ``budget`` pages.

  Args:
    mass: float32 [B, M] score per column, higher = keep: the accumulated mass
      for "h2o", the share for "h2o_mean" (``drop_pages`` computes it); ignored
      by "streaming".
    num_pages: int32 [B] pages each sequence holds (columns ``0 .. num_pages-1``).
    budget, sink_pages, recent_pages, mode: see ``drop_pages``.

  Returns:
    bool [B, M]: ``max(num_pages - budget, 0)`` columns per row, none among the
    first ``sink_pages`` or the last ``recent_pages``; "h2o" takes the lowest
    mass (older first on ties), "streaming" the oldest.

  >>> select_drops(jnp.array([[9., 1., 5., 0., 7., 1.]]), jnp.array([6]), budget=4,
  ...              sink_pages=1, recent_pages=2).tolist()
  [[False, True, False, True, False, False]]
  """
  _check_budget(budget, sink_pages, recent_pages, mode)
  b, m_ = mass.shape
  col = jnp.arange(m_, dtype=jnp.int32)[None, :]
  num_pages = num_pages.astype(jnp.int32)[:, None]
  cand = (col >= sink_pages) & (col < num_pages - recent_pages)
  score = (jnp.broadcast_to(col, (b, m_)).astype(jnp.float32) if mode == "streaming"
           else mass.astype(jnp.float32))
  key = jnp.where(cand, score, jnp.inf)
  order = jnp.argsort(key, axis=1, stable=True)                    # lowest first, older on ties
  rank = jnp.zeros((b, m_), jnp.int32).at[jnp.arange(b)[:, None], order].set(
      jnp.broadcast_to(col, (b, m_)))
  n_drop = jnp.maximum(num_pages - budget, 0)
  return cand & (rank < n_drop)


@jit_when_eager("budget", "sink_pages", "recent_pages", "mode", "config")
def drop_pages(state: CacheState, *, budget: int, sink_pages: int, recent_pages: int,
               mode: str = "h2o", config: CacheConfig) -> CacheState:
  """Release each over-budget sequence's least useful pages and compact its page table.

  Every sequence holding more than ``budget`` pages (its partial last page
  included) drops pages chosen by ``select_drops`` until it holds ``budget``;
  the kept pages keep their order. See the module docstring for positions,
  reference counts and the prefix index.

  Args:
    state: a drop-mode cache (``enable``).
    budget: static int, pages a sequence may keep; >= sink_pages + recent_pages + 1.
    sink_pages: static int >= 0, leading pages never dropped (attention sinks).
    recent_pages: static int >= 1, trailing pages never dropped (the recent window).
    mode: static, "h2o" (heavy hitters by accumulated mass), "h2o_mean" (by
      share of attention, ``mass / seen``) or "streaming" (sinks + window).
    config: the cache's config; the state is checked against it, and
      ``config.checked`` raises on an eager call if a status flag is set.

  Returns:
    The state: page tables compacted, ``seq_lens`` down by S per dropped page,
    ``drop.dropped`` up by the same, ref counts released, ``drop.pages_dropped``
    counted.

  >>> import kvjax
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                         num_pages=8, max_seqs=1, max_pages_per_seq=6)
  >>> _, st = kvjax.plan_step(enable(kvjax.init(cfg)), jnp.array([0]),
  ...                         jnp.arange(9)[None], jnp.array([9]), config=cfg)
  >>> st = drop_pages(st, budget=3, sink_pages=1, recent_pages=1, mode="streaming", config=cfg)
  >>> st.page_table.tolist(), st.seq_lens.tolist(), st.drop.dropped.tolist()
  ([[0, 3, 4, -1, -1, -1]], [5], [4])
  """
  d = _require(state, "drop_pages")
  _check_budget(budget, sink_pages, recent_pages, mode)
  check_state(state, config)
  b, m_ = state.page_table.shape
  p_ = state.meta.ref_count.shape[0]
  s_ = state.k.data.shape[2]
  table = state.page_table
  num_pages = (state.seq_lens + s_ - 1) // s_
  mass = jnp.where(d.owner == table, d.mass, 0.0)
  seen = jnp.where(d.owner == table, d.seen, 0.0)
  score = mass / jnp.maximum(seen, 1e-30) if mode == "h2o_mean" else mass
  drop = select_drops(score, num_pages, budget=budget, sink_pages=sink_pages,
                      recent_pages=recent_pages, mode=mode) & (table >= 0)
  n_drop = jnp.sum(drop, axis=1).astype(jnp.int32)                           # [B]

  # Compact the kept columns (order preserved) of the table, mass and owner.
  keep = (table >= 0) & ~drop
  rows = jnp.arange(b)[:, None]
  dst = jnp.where(keep, jnp.cumsum(keep, axis=1) - 1, m_)
  new_table = jnp.full((b, m_), -1, jnp.int32).at[rows, dst].set(table, mode="drop")
  new_mass = jnp.zeros((b, m_), jnp.float32).at[rows, dst].set(mass, mode="drop")
  new_seen = jnp.zeros((b, m_), jnp.float32).at[rows, dst].set(seen, mode="drop")
  new_owner = jnp.full((b, m_), -1, jnp.int32).at[rows, dst].set(table, mode="drop")
  new_len = state.seq_lens - n_drop * s_

  # Release the dropped pages' references (as kvjax.release does).
  meta = unref_pages(state.meta, jnp.where(drop, table, p_))
  hashed = jnp.any(meta.block_hash != 0, axis=-1)

  # Break the hash chain of sequences that dropped: their last full page leaves the index.
  last_full = new_len // s_ - 1                                              # [B]
  frontier = jnp.take_along_axis(new_table, jnp.clip(last_full, 0, m_ - 1)[:, None], 1)[:, 0]
  cut = (n_drop > 0) & (last_full >= 0) & (frontier >= 0)
  cut = cut & hashed[jnp.clip(frontier, 0, p_ - 1)]
  cut_pages = jnp.where(cut, frontier, p_)
  index = state.index

  def unhash(args):
    meta, index = args
    meta, index = forget_pages(meta, index, cut_pages)
    return meta.replace(block_hash=meta.block_hash.at[cut_pages].set(0, mode="drop")), index

  meta, index = jax.lax.cond(jnp.any(cut), unhash, lambda a: a, (meta, index))
  return enforce_checked(state.replace(
      meta=meta, index=index, page_table=new_table, seq_lens=new_len,
      drop=d.replace(mass=new_mass, seen=new_seen, owner=new_owner, dropped=d.dropped + n_drop * s_,
                     pages_dropped=d.pages_dropped + jnp.sum(n_drop))), config)
