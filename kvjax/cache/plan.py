"""Paging: plan a step's pages and slots, write K/V, release and fork sequences.

Block management (``plan_step``) runs once per step on small integer arrays;
the data path (``write``, ``attend``) runs per layer on the page arrays. All
functions are pure and jit; value-dependent failures (out of pages, sequence
full, bad ids) refuse the affected row, leave everything else untouched and
set status flags. Shapes: B = batch rows, T = new tokens per row, S =
page_size, P = num_pages, M = max_pages_per_seq, H = kv heads, D = head_dim.
"""

from __future__ import annotations

from typing import Optional

from flax import struct
import jax
import jax.numpy as jnp

from kvjax.cache.attach import register_full_pages
from kvjax.cache.checks import as_int32
from kvjax.cache.checks import bad_rows
from kvjax.cache.checks import check_plan_inputs
from kvjax.cache.checks import check_state
from kvjax.cache.config import CacheConfig
from kvjax.cache.pool import grant
from kvjax.cache.pool import reclaim
from kvjax.cache.pool import victims
from kvjax.cache.state import CacheState
from kvjax.cache.state import default_seed
from kvjax.cache.state import row_seeds
from kvjax.cache.status import BAD_INPUT
from kvjax.cache.status import enforce_checked
from kvjax.cache.status import INDEX_OVERFLOW
from kvjax.cache.status import jit_when_eager
from kvjax.cache.status import NON_FINITE
from kvjax.cache.status import OUT_OF_PAGES
from kvjax.cache.status import OUT_OF_RANGE
from kvjax.cache.status import SEQ_FULL
from kvjax.layout.pages import Pages
from kvjax.policies import adapter
from kvjax.policies.adapter import filled_events
from kvjax.policies.adapter import report
from kvjax.quant.codecs import non_finite
from kvjax.quant.codecs import out_of_range



@struct.dataclass
class StepPlan:
  """Where this step's tokens go and what attention reads; made by ``plan_step``.

  A step is one ``plan_step`` for the whole batch, then, for every layer, the
  layer's K/V written into the slots and the queries attending over the pages;
  the same plan serves every layer (it holds no K/V). A user loop::

    plan, cache = kvjax.plan_step(cache, seq_ids, tokens, num_new, config=cfg)
    flags = 0
    for i in range(cfg.num_layers):
      q, k, v = ...             # layer i's [B, T, Hq | H, D], RoPE at plan.positions
      k_l, v_l = kvjax.layer_pages(cache, i)
      flags |= kvjax.write_flags(plan, k, v, k_l, v_l)
      res = kvjax.write_attend(q, k, v, k_l, v_l, plan)
      cache = kvjax.with_layer_pages(cache, i, res.k_pages, res.v_pages)
      ...                       # res.out: [B, T, Hq, D]
    cache = kvjax.flag_sequences(cache, plan.seq_ids, flags)

  (``kvjax.write`` of K and of V, then ``kvjax.attend``, is the same path.)
  ``models/llama.py`` scans the layers instead, with the pools in the scan's
  carry, each layer writing through ``kvjax.layout.flat_layer`` and
  ``layer_plan`` (in place: ``layer_pages`` and ``with_layer_pages`` copy a
  layer each). The fields, B = the batch's rows (``seq_ids``), T = its
  tokens per row, M = ``max_pages_per_seq``, P = ``num_pages``, S = ``page_size``:

  - ``positions`` are what RoPE rotates q and k by (in a drop-mode cache add
    ``kvjax.drop.begin_step``'s offset) and the causal mask's query positions.
  - ``valid`` marks the tokens that are written and whose outputs mean
    something; padding tokens, padding rows and ``refused`` rows are False
    (their outputs are meaningless; ``seq_status`` says why a row was refused).
  - ``slots``, ``cow_src`` / ``cow_dst`` and ``fold_floor`` are for ``write``;
    ``page_table`` and ``kv_lens`` for ``attend`` (``kv_lens`` counts this
    step's tokens too). Nothing here is meant to be edited by hand.

  >>> import kvjax
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                         num_pages=4, max_seqs=2, max_pages_per_seq=2)
  >>> plan, _ = plan_step(kvjax.init(cfg), jnp.array([1, -1]), jnp.array([[7, 8, 9]] * 2),
  ...                     jnp.array([3, 0]), config=cfg)
  >>> plan.positions.tolist(), plan.valid.tolist(), plan.kv_lens.tolist()
  ([[0, 1, 2], [0, 1, 2]], [[True, True, True], [False, False, False]], [3, 0])
  """

  seq_ids: jax.Array     # int32 [B]  sequence of each row (-1 = padding)
  positions: jax.Array   # int32 [B, T]  absolute position of each new token (clamped for padding)
  valid: jax.Array       # bool [B, T]  token is real and its row was granted
  slots: jax.Array       # int32 [B, T]  page * S + offset; P * S for "do not write"
  page_table: jax.Array  # int32 [B, M]  the rows' page tables after this step (-1 = none)
  kv_lens: jax.Array     # int32 [B]  tokens attention may read per row after this step
  cow_src: jax.Array     # int32 [B]  shared partial page to copy before writing (P = none)
  cow_dst: jax.Array     # int32 [B]  its private copy (P = none)
  refused: jax.Array     # bool [B]  row had work and was refused; nothing of it was written
  seq_status: jax.Array  # int32 [B]  status flags of each row this step
  fold_floor: Optional[jax.Array] = None  # int32 [B]  leading pages already folded (attached
  #                                         prefix), never folded again; None without staging


@jit_when_eager("config")
def plan_step(state: CacheState, seq_ids: jax.Array, tokens: jax.Array, num_new: jax.Array,
              seeds: jax.Array | None = None, *,
              config: CacheConfig) -> tuple[StepPlan, CacheState]:
  """Give a batch of new tokens their pages and slots (prefill chunks or decode).

  Allocation takes free pages first, then evicts least-recently-used cached
  pages that no live sequence holds. A row that cannot get its pages (pool
  exhausted, or past ``max_pages_per_seq``) is refused: nothing of it is
  written, its length is unchanged, and a flag is set in ``state.status`` and
  ``plan.seq_status``. A row whose last page is partial and shared (after
  ``fork``) gets a private copy, made by ``write``.

  A row that starts an empty sequence sets its namespace (hash-chain seed) to
  its ``seeds`` row, once: the sequence's pages carry it. A row that continues
  a sequence keeps the namespace it started with; one whose ``seeds`` row names
  another namespace is refused with ``BAD_INPUT`` (a slot reused for another
  tenant without ``release`` cannot index its pages under the first tenant's
  namespace). Refusals are also ORed into ``state.seq_status`` of the row's
  slot; with ``config.checked`` an eager call raises ``CacheStatusError``.

  Args:
    state: the cache.
    seq_ids: int [B], sequence slot of each row; -1 marks a padding row (any
      integer dtype; cast to int32, saturating).
    tokens: int [B, T], new token ids (row b's first ``num_new[b]`` are real).
    num_new: int [B] in [0, T].
    seeds: optional uint32 [B, 2] or [2] namespace seeds (``kvjax.tenant_seed``);
      ``None`` or a (0, 0) row: the config's default namespace for a sequence
      that starts, no check for one that continues.
    config: the cache's static config.

  Returns:
    ``(plan, state)``: the step's ``StepPlan`` and the updated state.

  >>> import kvjax
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, page_size=2,
  ...                         num_pages=4, max_seqs=2, max_pages_per_seq=2)
  >>> plan, st = plan_step(kvjax.init(cfg), jnp.array([0]), jnp.array([[5, 6, 7]]), jnp.array([3]),
  ...                      config=cfg)
  >>> st.seq_lens.tolist(), plan.slots.tolist()
  ([3, 0], [[0, 1, 2]])
  """
  check_state(state, config)
  seq_ids = as_int32("seq_ids", seq_ids, 1)
  tokens = as_int32("tokens", tokens, 2)
  num_new = as_int32("num_new", num_new, 1)
  b, t = check_plan_inputs(seq_ids, tokens, num_new)
  given_seed = row_seeds(seeds, b)
  s_, m_, p_ = config.page_size, config.max_pages_per_seq, config.num_pages
  meta = state.meta
  clock = state.clock + 1

  bad = bad_rows(seq_ids, num_new, t, config.max_seqs)
  live = (seq_ids >= 0) & ~bad
  sid = jnp.where(live, seq_ids, 0)
  # Namespace: set once by the row that starts the sequence; a continuing row keeps it, and
  # one that names another namespace is refused.
  stored = state.seq_seed[sid]
  stored_set = jnp.any(stored != 0, axis=-1)
  given_set = jnp.any(given_seed != 0, axis=-1)
  default = default_seed(config)
  starting = live & (state.seq_lens[sid] == 0) & ~stored_set
  mismatch = live & ~starting & given_set & jnp.any(
      jnp.where(stored_set[:, None], stored, default) != given_seed, axis=-1)
  bad = bad | mismatch
  live = live & ~mismatch
  seeds = jnp.where(stored_set[:, None], stored, jnp.where(given_set[:, None], given_seed,
                                                          default))
  n = jnp.where(live, num_new, 0)
  old_len = jnp.where(live, state.seq_lens[sid], 0)
  new_len = old_len + n
  old_pages = (old_len + s_ - 1) // s_
  new_pages = (new_len + s_ - 1) // s_
  table = state.page_table[sid]                                       # [B, M]
  last_page = jnp.take_along_axis(table, jnp.clip(old_pages - 1, 0, m_ - 1)[:, None], 1)[:, 0]
  partial = (old_len % s_ != 0) & (n > 0)
  seq_full = live & (new_pages > m_)

  per_row = -(-t // s_) + 1
  k = min(b * per_row, p_)
  cand, cand_ok = victims(state, k, clock=clock, config=config)      # [k] best first
  available = jnp.sum(cand_ok).astype(jnp.int32)
  granted, cow = grant(new_pages - old_pages, partial, last_page, live & ~seq_full & (n > 0),
                        available, meta.ref_count)
  need = new_pages - old_pages + cow.astype(jnp.int32)
  out_of_pages = live & ~seq_full & (n > 0) & ~granted

  row_status = (jnp.where(bad, BAD_INPUT, 0) | jnp.where(seq_full, SEQ_FULL, 0)
                | jnp.where(out_of_pages, OUT_OF_PAGES, 0)).astype(jnp.int32)
  refused = row_status != 0

  # Pages for the granted rows: row b takes cand[offset[b] : offset[b] + need[b]].
  need_g = jnp.where(granted, need, 0)
  offset = jnp.cumsum(need_g) - need_g
  j = jnp.arange(per_row)[None, :]                                    # [1, R]
  take = j < need_g[:, None]                                          # [B, R]
  new_page = jnp.where(take, cand[jnp.clip(offset[:, None] + j, 0, k - 1)], p_)
  first_col = old_pages - cow.astype(jnp.int32)
  col = jnp.where(take, first_col[:, None] + j, m_)
  table = table.at[jnp.arange(b)[:, None], col].set(new_page, mode="drop")
  cow_src = jnp.where(cow, last_page, p_)
  cow_dst = jnp.where(cow, new_page[:, 0], p_)

  # Allocated pages are emptied by the pool (a cached page's eviction, its index entry and
  # its cached children's orphaning), then get their new owner's record; COW copies inherit
  # the source's tokens.
  flat_new = new_page.reshape(-1)
  taken = reclaim(state, flat_new, clock=clock, config=config)
  meta, index, policy_state = taken.state.meta, taken.state.index, taken.state.policy
  block_idx = jnp.where(take, first_col[:, None] + j, 0).reshape(-1)
  prev_col = jnp.clip(first_col[:, None] + j - 1, 0, m_ - 1)
  parent = jnp.where(first_col[:, None] + j > 0, jnp.take_along_axis(table, prev_col, 1), -1)
  meta = meta.replace(
      ref_count=meta.ref_count.at[flat_new].set(1, mode="drop").at[cow_src].add(-1, mode="drop"),
      parent=meta.parent.at[flat_new].set(parent.reshape(-1), mode="drop"),
      namespace=meta.namespace.at[flat_new].set(
          jnp.repeat(seeds, per_row, axis=0), mode="drop"),
      position=meta.position.at[flat_new].set(block_idx, mode="drop"),
      access_count=meta.access_count.at[flat_new].set(1, mode="drop"),
  )
  src_safe = jnp.clip(cow_src, 0, p_ - 1)
  meta = meta.replace(
      tokens=meta.tokens.at[cow_dst].set(meta.tokens[src_safe], mode="drop"),
      filled=meta.filled.at[cow_dst].set(meta.filled[src_safe], mode="drop"),
      parent=meta.parent.at[cow_dst].set(meta.parent[src_safe], mode="drop"),
  )

  # Slots of the new tokens.
  tt = jnp.arange(t)[None, :]
  pos = old_len[:, None] + tt                                         # [B, T]
  valid = granted[:, None] & (tt < n[:, None])
  blk = jnp.clip(pos // s_, 0, m_ - 1)
  page = jnp.take_along_axis(table, blk, 1)
  slots = jnp.where(valid, page * s_ + pos % s_, p_ * s_)
  positions = jnp.clip(pos, 0, config.max_seq_len - 1)

  # Written tokens, fill levels, and access times of every page the rows hold.
  meta = meta.replace(
      tokens=meta.tokens.reshape(-1).at[slots].set(tokens.astype(jnp.int32), mode="drop")
      .reshape(p_, s_),
      filled=meta.filled.at[jnp.where(valid, page, p_)].max(pos % s_ + 1, mode="drop"),
  )
  held = jnp.where(granted[:, None] & (table >= 0), table, p_)
  meta = meta.replace(last_access=meta.last_access.at[held].set(clock, mode="drop"))
  overflow = jnp.array(False)
  fold_floor = None
  if state.fold_floor is not None:
    fold_floor = jnp.where(live, state.fold_floor[sid], 0)
  if config.prefix_caching:
    def admit(hashes, pages, ok):  # against the pages' content before this step took them
      pos = meta.position[jnp.clip(pages, 0, p_ - 1)]
      return ok & adapter.admit(state.policy, state.meta, clock, hashes, pages, pos,
                                state.policy_params, config)

    meta, index, overflow, registered, declined, hashes = register_full_pages(
        meta, index, table, old_len, new_len, granted, seeds, config=config, per_row=per_row,
        fold_floor=fold_floor, admit=admit)
    policy_state = report(
        policy_state, meta, filled_events(registered, declined, hashes, meta, clock),
        state.policy_params, config)

  rows = jnp.where(granted, sid, config.max_seqs)
  page_table = state.page_table.at[rows].set(table, mode="drop")
  seq_lens = state.seq_lens.at[rows].set(new_len, mode="drop")
  seq_seed = state.seq_seed.at[jnp.where(granted & starting, sid, config.max_seqs)].set(
      seeds, mode="drop")
  plan_table = jnp.where(live[:, None], table, -1)
  kv_lens = jnp.where(granted, new_len, old_len)

  stats = taken.state.stats
  stats = stats.replace(
      steps=stats.steps + 1,
      tokens_planned=stats.tokens_planned + jnp.sum(jnp.where(granted, n, 0)),
      pages_allocated=stats.pages_allocated + jnp.sum(need_g),
      cow_copies=stats.cow_copies + jnp.sum(cow),
      refused=stats.refused + jnp.sum(refused & (seq_ids != -1)),
  )
  status = (state.status | jnp.bitwise_or.reduce(row_status)
            | jnp.where(overflow, INDEX_OVERFLOW, 0)).astype(jnp.int32)
  new_state = state.replace(meta=meta, index=index, page_table=page_table, seq_lens=seq_lens,
                            seq_seed=seq_seed, clock=clock, stats=stats, status=status,
                            policy=policy_state)
  new_state = enforce_checked(flag_sequences(new_state, seq_ids, row_status), config)
  plan = StepPlan(seq_ids=seq_ids, positions=positions, valid=valid,
                  slots=slots, page_table=plan_table, kv_lens=kv_lens, cow_src=cow_src,
                  cow_dst=cow_dst, refused=refused & (seq_ids != -1), seq_status=row_status,
                  fold_floor=fold_floor)
  return plan, new_state


def layer_plan(plan: StepPlan, i, pages: Pages) -> StepPlan:
  """``plan`` with its page ids and slots offset to layer ``i`` of a ``flat_layer`` view.

  In the view, page ``p`` of layer ``i`` is flat page ``i * P + p``: the
  plan's page table, slots and copy-on-write pages move by ``i * P`` (slots by
  ``i * P * S``); "none" entries stay out of range of the whole view (-1 in the
  page table, ``L * P`` / ``L * P * S`` elsewhere), so nothing is written to
  another layer. Everything else (positions, lengths, flags) is the same.

  Args:
    plan: the step's plan (``plan_step``).
    i: int or int32 scalar (may be traced), ``0 <= i < L``.
    pages: the cache's all-layer ``k`` (or ``v``) pages, data ``[L, P, S, H, *]``:
      where L, P and S are read from.

  >>> import kvjax
  >>> cfg = kvjax.CacheConfig(num_layers=2, num_kv_heads=1, head_dim=2, page_size=2,
  ...                         num_pages=4, max_seqs=1, max_pages_per_seq=2)
  >>> plan, st = plan_step(kvjax.init(cfg), jnp.array([0]), jnp.array([[1]]), jnp.array([1]),
  ...                      config=cfg)
  >>> lp = layer_plan(plan, 1, st.k)
  >>> plan.page_table.tolist(), lp.page_table.tolist(), lp.slots.tolist()
  ([[0, -1]], [[4, -1]], [[8]])
  """
  if pages.data.ndim != 5:
    raise ValueError(f"layer_plan: pages must hold all layers [L, P, S, H, D], got data shape "
                     f"{tuple(pages.data.shape)}")
  num_layers, p_, s_ = pages.data.shape[:3]

  def shift(x, n, none):    # ids in [0, n) move to layer i's range; others become `none`
    return jnp.where((x >= 0) & (x < n), x + i * n, none).astype(jnp.int32)

  return plan.replace(page_table=shift(plan.page_table, p_, -1),
                      slots=shift(plan.slots, p_ * s_, num_layers * p_ * s_),
                      cow_src=shift(plan.cow_src, p_, num_layers * p_),
                      cow_dst=shift(plan.cow_dst, p_, num_layers * p_))


def context_plan(plan: StepPlan, context_pages: int, page_size: int) -> tuple[StepPlan, jax.Array]:
  """``plan`` with attention reading only the first ``context_pages`` columns of the page table.

  A decode row attends over its own pages, not the table's full width M: a
  host loop that knows its rows' lengths passes the smallest bucket that
  holds them (``models/generate.py``), and the gather, the mask and the
  softmax shrink with it (the new K/V are written through ``slots``,
  unchanged). A row whose ``kv_lens`` does not fit the narrowed table would
  attend to a truncated context: it is returned in ``over`` (the model's step
  flags it ``BAD_INPUT``; its K/V are written all the same).

  Args:
    plan: the step's plan (``plan_step``), page table int32 [B, M].
    context_pages: static int in [1, M].
    page_size: S.

  Returns:
    ``(plan with page_table [B, context_pages], over bool [B])``.

  >>> import kvjax
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                         num_pages=8, max_seqs=2, max_pages_per_seq=4)
  >>> plan, _ = plan_step(kvjax.init(cfg), jnp.array([0, 1]), jnp.array([[1, 2, 3]] * 2),
  ...                     jnp.array([3, 1]), config=cfg)
  >>> narrow, over = context_plan(plan, 1, cfg.page_size)
  >>> narrow.page_table.shape, over.tolist()
  ((2, 1), [True, False])
  """
  m_ = plan.page_table.shape[1]
  if not isinstance(context_pages, int) or not 1 <= context_pages <= m_:
    raise ValueError(f"context_pages must be an int in [1, {m_}] (the page table's width), got "
                     f"{context_pages!r}")
  over = plan.kv_lens > context_pages * page_size
  return plan.replace(page_table=plan.page_table[:, :context_pages]), over


def flag_sequences(state: CacheState, seq_ids: jax.Array, flags: jax.Array) -> CacheState:
  """OR per-row status ``flags`` into the rows' sequences (``seq_status``) and ``status``.

  What the step's data path found (``kvjax.write_flags``: non-finite or
  clipped K/V) is recorded for the sequence it was written to; the model's
  step calls it once per step. Padding rows (-1) and out-of-range ids record
  nothing in ``seq_status``.

  Args:
    state: the cache.
    seq_ids: int32 [B] the rows' sequence slots (``plan.seq_ids``).
    flags: int32 [B] status bits per row (0 = none).

  >>> import kvjax
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                         num_pages=2, max_seqs=2, max_pages_per_seq=2)
  >>> st = flag_sequences(kvjax.init(cfg), jnp.array([1, -1]), jnp.array([kvjax.NON_FINITE, 0]))
  >>> st.seq_status.tolist(), kvjax.status_names(st.status)
  ([0, 16], ['NON_FINITE'])
  """
  ms = state.seq_status.shape[0]
  seq_ids = as_int32("seq_ids", seq_ids, 1)
  flags = as_int32("flags", flags, 1)
  rows = jnp.where((seq_ids >= 0) & (seq_ids < ms), seq_ids, ms)
  return state.replace(
      seq_status=state.seq_status.at[rows].set(
          state.seq_status[jnp.clip(rows, 0, ms - 1)] | flags, mode="drop"),
      status=(state.status | jnp.bitwise_or.reduce(jnp.where(rows < ms, flags, 0))).astype(
          jnp.int32))


def write_flags(plan: StepPlan, k: jax.Array, v: jax.Array, k_pages: Optional[Pages] = None,
                v_pages: Optional[Pages] = None) -> jax.Array:
  """int32 [B]: per row, the flags what ``write`` stores of its new (valid) tokens deserves.

  ``NON_FINITE`` when the row's K or V holds a NaN or inf; ``OUT_OF_RANGE`` when a
  finite value lies beyond what the pages' spec stores (``out_of_range``:
  quantizing clips it to the spec's range, or an unquantized page's dtype
  overflows). Pass the result to ``flag_sequences``. Without pages only
  ``NON_FINITE`` is checked.

  Args:
    plan: the step's plan.
    k, v: ``[B, T, H, D]`` the step's new keys and values (one layer, or stacked
      layers ``[L, B, T, H, D]``).
    k_pages, v_pages: optional; the layer's ``Pages`` they are written into.

  >>> import kvjax
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                         num_pages=2, max_seqs=2, max_pages_per_seq=2)
  >>> plan, _ = plan_step(kvjax.init(cfg), jnp.array([0, 1]), jnp.array([[1], [2]]),
  ...                     jnp.array([1, 1]), config=cfg)
  >>> x = jnp.zeros((2, 1, 1, 2)).at[1, 0, 0, 0].set(jnp.nan)
  >>> write_flags(plan, x, x).tolist()
  [0, 16]
  """
  def rows(per_token):                          # [..., B, T] -> bool [B] over valid tokens
    per_token = per_token.reshape((-1,) + plan.valid.shape)
    return jnp.any(jnp.any(per_token, axis=0) & plan.valid, axis=1)

  def flags(x, pages):
    x = jnp.asarray(x)
    bad = non_finite(x)
    out = jnp.zeros_like(bad)
    if pages is not None:
      dtype = pages.data.dtype if not pages.spec.is_quantized else jnp.float32
      out = out_of_range(x, pages.spec, dtype=dtype) & ~bad
    return (jnp.where(rows(bad), NON_FINITE, 0)
            | jnp.where(rows(out), OUT_OF_RANGE, 0))

  return (flags(k, k_pages) | flags(v, v_pages)).astype(jnp.int32)


