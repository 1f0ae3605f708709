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

import jax
import jax.numpy as jnp
from flax import struct

from kvjax import cache_policy
from kvjax import prefix as prefix_lib
from kvjax import quant
from kvjax import state as state_lib
from kvjax.config import CacheConfig
from kvjax.state import CacheState
from kvjax.state import Pages


@struct.dataclass
class StepPlan:
  """Where this step's tokens go and what attention reads; made by ``plan_step``."""

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


def _check_int(name: str, x, ndim: int) -> None:
  if x.ndim != ndim:
    raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
  if not jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_:
    raise ValueError(f"{name} must be an integer array, got dtype {x.dtype}")


_INT32_MAX = 2 ** 31 - 1


def as_int32(name: str, x, ndim: int) -> jax.Array:
  """``x`` checked (integer dtype, ``ndim`` dims; ``ValueError`` naming ``name`` otherwise)
  and cast to int32.

  Any integer dtype is accepted: values outside int32 saturate (so an unsigned
  or 64-bit id too large for the cache stays out of range and is refused, never
  wrapped onto another slot or onto -1).

  >>> as_int32("seq_ids", jnp.array([0, 4294967295], jnp.uint32), 1).tolist()
  [0, 2147483647]
  """
  x = jnp.asarray(x)
  _check_int(name, x, ndim)
  if x.dtype == jnp.int32:
    return x
  info = jnp.iinfo(x.dtype)
  lo = max(int(info.min), -_INT32_MAX - 1)
  hi = min(int(info.max), _INT32_MAX)
  if lo > info.min or hi < info.max:
    x = jnp.clip(x, jnp.asarray(lo, x.dtype), jnp.asarray(hi, x.dtype))
  return x.astype(jnp.int32)


def _check_plan_inputs(seq_ids, tokens, num_new) -> tuple[int, int]:
  b = seq_ids.shape[0]
  if tokens.shape[0] != b or num_new.shape[0] != b:
    raise ValueError(
        f"seq_ids, tokens and num_new must share the batch size; got seq_ids {tuple(seq_ids.shape)}, "
        f"tokens {tuple(tokens.shape)}, num_new {tuple(num_new.shape)}")
  if tokens.shape[1] == 0:
    raise ValueError(f"tokens must have at least one column, got shape {tuple(tokens.shape)}")
  return b, tokens.shape[1]


def _check_state(state: CacheState, config: CacheConfig) -> None:
  if not isinstance(config, CacheConfig):
    raise ValueError(f"config must be a CacheConfig, got {type(config).__name__}")
  want = (config.max_seqs, config.max_pages_per_seq)
  if tuple(state.page_table.shape) != want:
    raise ValueError(f"state.page_table has shape {tuple(state.page_table.shape)} but config "
                     f"gives (max_seqs, max_pages_per_seq) = {want}")
  if state.meta.ref_count.shape != (config.num_pages,):
    raise ValueError(f"state has {state.meta.ref_count.shape[0]} pages but config.num_pages = "
                     f"{config.num_pages}")


def _bad_rows(seq_ids: jax.Array, num_new: jax.Array, t: int, max_seqs: int) -> jax.Array:
  """Rows with an out-of-range id, an id repeated in the batch, or num_new outside [0, T]."""
  in_range = (seq_ids >= 0) & (seq_ids < max_seqs)
  out_of_range = (seq_ids < -1) | (seq_ids >= max_seqs)
  same = (seq_ids[:, None] == seq_ids[None, :]) & in_range[:, None] & in_range[None, :]
  dup = jnp.sum(same, axis=1) > 1
  bad_len = in_range & ((num_new < 0) | (num_new > t))
  return out_of_range | dup | bad_len


def _eviction_scores(state: CacheState, clock: jax.Array, config: CacheConfig) -> jax.Array:
  """float32 [P] eviction scores of the pool (``kvjax.cache_policy.scores``)."""
  return cache_policy.scores(state.meta, state.policy, clock, config)


def _grant(base_need: jax.Array, partial: jax.Array, last_page: jax.Array,
           eligible: jax.Array, available: jax.Array,
           ref_count: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Greedy admission in batch order, with copy-on-write decided on the way.

  A row appending into a partial last page copies it when, at its turn, some
  other sequence still holds the page; the last holder writes in place. A row
  is granted when its pages (plus the copy) still fit.

  Returns:
    ``(granted, cow)``, bool [B] each.
  """
  p_ = ref_count.shape[0]

  def body(carry, x):
    remaining, holders = carry
    n, part, last, ok = x
    page = jnp.clip(last, 0, p_ - 1)
    cow = part & (holders[page] > 1)
    need = n + cow.astype(jnp.int32)
    take = ok & (need <= remaining)
    holders = holders.at[page].add(jnp.where(take & cow, -1, 0))
    return (remaining - jnp.where(take, need, 0), holders), (take, cow & take)

  _, (granted, cow) = jax.lax.scan(body, (available, ref_count),
                                   (base_need, partial, last_page, eligible))
  return granted, cow


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
  _check_state(state, config)
  seq_ids = as_int32("seq_ids", seq_ids, 1)
  tokens = as_int32("tokens", tokens, 2)
  num_new = as_int32("num_new", num_new, 1)
  b, t = _check_plan_inputs(seq_ids, tokens, num_new)
  given_seed = state_lib.row_seeds(seeds, b)
  s_, m_, p_ = config.page_size, config.max_pages_per_seq, config.num_pages
  meta = state.meta
  clock = state.clock + 1

  bad = _bad_rows(seq_ids, num_new, t, config.max_seqs)
  live = (seq_ids >= 0) & ~bad
  sid = jnp.where(live, seq_ids, 0)
  # Namespace: set once by the row that starts the sequence; a continuing row keeps it, and
  # one that names another namespace is refused.
  stored = state.seq_seed[sid]
  stored_set = jnp.any(stored != 0, axis=-1)
  given_set = jnp.any(given_seed != 0, axis=-1)
  default = state_lib.default_seed(config)
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

  scores = _eviction_scores(state, clock, config)
  per_row = -(-t // s_) + 1
  k = min(b * per_row, p_)
  _, cand = jax.lax.top_k(scores, k)                                  # [k] best victims first
  available = jnp.minimum(jnp.sum(meta.ref_count == 0), k).astype(jnp.int32)
  granted, cow = _grant(new_pages - old_pages, partial, last_page, live & ~seq_full & (n > 0),
                        available, meta.ref_count)
  need = new_pages - old_pages + cow.astype(jnp.int32)
  out_of_pages = live & ~seq_full & (n > 0) & ~granted

  row_status = (jnp.where(bad, state_lib.BAD_INPUT, 0) | jnp.where(seq_full, state_lib.SEQ_FULL, 0)
                | jnp.where(out_of_pages, state_lib.OUT_OF_PAGES, 0)).astype(jnp.int32)
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

  # Metadata of allocated pages: reset (an evicted page's old content is gone,
  # and so is the index entry of it and of its cached children), then COW
  # copies inherit the source's tokens.
  flat_new = new_page.reshape(-1)
  was_cached = jnp.any(meta.block_hash != 0, axis=-1) & (meta.ref_count == 0)
  new_safe = jnp.clip(flat_new, 0, p_ - 1)
  evicted_mask = (flat_new < p_) & was_cached[new_safe]
  evicted = jnp.sum(evicted_mask)
  policy_state = cache_policy.report(
      state.policy, meta, cache_policy.events(
          jnp.where(evicted_mask, flat_new, -1), None, clock, kind="evict",
          position=meta.position[new_safe], evicted_keys=meta.block_hash[new_safe]), config)
  index = state.index
  if config.prefix_caching:
    meta, index = prefix_lib.forget_pages(meta, index, flat_new)
  block_idx = jnp.where(take, first_col[:, None] + j, 0).reshape(-1)
  prev_col = jnp.clip(first_col[:, None] + j - 1, 0, m_ - 1)
  parent = jnp.where(first_col[:, None] + j > 0, jnp.take_along_axis(table, prev_col, 1), -1)
  meta = meta.replace(
      ref_count=meta.ref_count.at[flat_new].set(1, mode="drop").at[cow_src].add(-1, mode="drop"),
      block_hash=meta.block_hash.at[flat_new].set(0, mode="drop"),
      parent=meta.parent.at[flat_new].set(parent.reshape(-1), mode="drop"),
      namespace=meta.namespace.at[flat_new].set(
          jnp.repeat(seeds, per_row, axis=0), mode="drop"),
      tokens=meta.tokens.at[flat_new].set(-1, mode="drop"),
      position=meta.position.at[flat_new].set(block_idx, mode="drop"),
      filled=meta.filled.at[flat_new].set(0, mode="drop"),
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
      return ok & cache_policy.admit(state.policy, state.meta, clock, hashes, pages, pos,
                                     config)

    meta, index, overflow, registered, declined, hashes = prefix_lib.register_full_pages(
        meta, index, table, old_len, new_len, granted, seeds, config=config, per_row=per_row,
        fold_floor=fold_floor, admit=admit)
    policy_state = cache_policy.report(
        policy_state, meta, cache_policy.filled_events(registered, declined, hashes, meta, clock),
        config)

  rows = jnp.where(granted, sid, config.max_seqs)
  page_table = state.page_table.at[rows].set(table, mode="drop")
  seq_lens = state.seq_lens.at[rows].set(new_len, mode="drop")
  seq_seed = state.seq_seed.at[jnp.where(granted & starting, sid, config.max_seqs)].set(
      seeds, mode="drop")
  plan_table = jnp.where(live[:, None], table, -1)
  kv_lens = jnp.where(granted, new_len, old_len)

  stats = state.stats
  stats = stats.replace(
      steps=stats.steps + 1,
      tokens_planned=stats.tokens_planned + jnp.sum(jnp.where(granted, n, 0)),
      pages_allocated=stats.pages_allocated + jnp.sum(need_g),
      evictions=stats.evictions + evicted,
      cow_copies=stats.cow_copies + jnp.sum(cow),
      refused=stats.refused + jnp.sum(refused & (seq_ids != -1)),
  )
  status = (state.status | jnp.bitwise_or.reduce(row_status)
            | jnp.where(overflow, state_lib.INDEX_OVERFLOW, 0)).astype(jnp.int32)
  new_state = state.replace(meta=meta, index=index, page_table=page_table, seq_lens=seq_lens,
                            seq_seed=seq_seed, clock=clock, stats=stats, status=status,
                            policy=policy_state)
  new_state = state_lib.enforce_checked(flag_sequences(new_state, seq_ids, row_status), config)
  plan = StepPlan(seq_ids=seq_ids, positions=positions, valid=valid,
                  slots=slots, page_table=plan_table, kv_lens=kv_lens, cow_src=cow_src,
                  cow_dst=cow_dst, refused=refused & (seq_ids != -1), seq_status=row_status,
                  fold_floor=fold_floor)
  return plan, new_state


def _check_pages_layer(name: str, pages: Pages) -> None:
  if not isinstance(pages, Pages):
    raise ValueError(f"{name} must be a kvjax.Pages of one layer, got {type(pages).__name__}")
  if pages.data.ndim != 4:
    raise ValueError(f"{name}.data must be one layer's pages [P, S, H, D], got shape "
                     f"{tuple(pages.data.shape)}")
  if pages.stage is not None and pages.stage.ndim != 5:
    raise ValueError(f"{name}.stage must be one layer's ring [B, NS, S, H, D], got shape "
                     f"{tuple(pages.stage.shape)}")
  if pages.sink is not None and pages.sink.ndim != 4:
    raise ValueError(f"{name}.sink must be one layer's sink rows [B, N, H, D], got shape "
                     f"{tuple(pages.sink.shape)}")


def head_dim_of(pages: Pages) -> int:
  """D of one layer's pages (the data's last axis is D / codes per byte when packed)."""
  spec = pages.spec
  if spec.is_quantized and spec.kind == "int":
    return pages.data.shape[-1] * spec.codes_per_byte
  return pages.data.shape[-1]


def pool_only(pages: Pages) -> Pages:
  """The pages without their staging ring and sink rows (what the quant/kernel functions take)."""
  if pages.stage is None and pages.sink is None:
    return pages
  return pages.replace(stage=None, sink=None)


def sink_rows(pages: Pages, plan: StepPlan) -> Optional[jax.Array]:
  """The sink rows of the plan's batch rows: ``[B, N, H, D]`` (None without a sink)."""
  if pages.sink is None:
    return None
  return pages.sink[jnp.clip(plan.seq_ids, 0, pages.sink.shape[0] - 1)]


def _write_sink(new: Pages, old: Pages, plan: StepPlan, x: jax.Array) -> Pages:
  """``new`` with the step's tokens at positions ``< N`` also stored in ``old``'s sink rows."""
  if old.sink is None:
    return new
  b_, n = old.sink.shape[:2]
  take = plan.valid & (plan.positions < n) & (plan.seq_ids[:, None] >= 0)     # [B, T]
  row = jnp.where(take, plan.seq_ids[:, None], b_)                            # b_ = dropped
  sink = old.sink.at[row, jnp.clip(plan.positions, 0, n - 1)].set(
      x.astype(old.sink.dtype), mode="drop")
  return new.replace(sink=sink)


def stage_rows(pages: Pages, plan: StepPlan) -> Optional[jax.Array]:
  """The staging ring rows of the plan's batch rows: ``[B, NS, S, H, D]`` (None without)."""
  if pages.stage is None:
    return None
  return pages.stage[jnp.clip(plan.seq_ids, 0, pages.stage.shape[0] - 1)]


def lens_before(plan: StepPlan) -> tuple[jax.Array, jax.Array]:
  """``(kv_lens before this step, new tokens written)``, int32 [B] each."""
  num_new = jnp.sum(plan.valid, axis=1).astype(jnp.int32)
  return plan.kv_lens - num_new, num_new


def write(pages: Pages, plan: StepPlan, x: jax.Array) -> Pages:
  """Write one layer's new K (or V) into the slots of ``plan``.

  Shared partial pages marked by the plan are copied first (copy on write).

  Args:
    pages: one layer's ``Pages`` (data ``[P, S, H, D]``).
    plan: the step's plan.
    x: ``[B, T, H, D]`` new keys or values.

  Returns:
    The layer's updated ``Pages``.

  >>> import kvjax
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                         num_pages=2, max_seqs=1, max_pages_per_seq=2)
  >>> plan, st = plan_step(kvjax.init(cfg), jnp.array([0]), jnp.array([[1]]), jnp.array([1]), config=cfg)
  >>> layer = jax.tree.map(lambda a: a[0], st.k)
  >>> write(layer, plan, jnp.ones((1, 1, 1, 2))).data[0, 0].tolist()
  [[1.0, 1.0]]
  """
  _check_pages_layer("pages", pages)
  p_, s_, h_, _ = pages.data.shape
  d_ = head_dim_of(pages)
  b, t = plan.slots.shape
  if x.shape != (b, t, h_, d_):
    raise ValueError(f"x must have shape (B, T, H, D) = {(b, t, h_, d_)} from plan and pages, "
                     f"got {tuple(x.shape)}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x must be floating point, got dtype {x.dtype}")
  if pages.stage is not None:
    return _write_sink(_write_staged(pages, plan, x), pages, plan, x)
  if pages.spec.is_quantized:   # token-axis spec, no window: quantize each token into its slot
    pool = quant.copy_pages(pages, plan.cow_src, jnp.where(plan.cow_dst < p_, plan.cow_dst, -1))
    pool = quant.write_tokens(pool, plan.slots.reshape(-1), x.reshape(b * t, h_, d_), pages.spec)
    return _write_sink(pool, pages, plan, x)
  data = pages.data
  data = data.at[plan.cow_dst].set(data[jnp.clip(plan.cow_src, 0, p_ - 1)], mode="drop")
  flat = data.reshape(p_ * s_, h_, d_)
  flat = flat.at[plan.slots.reshape(-1)].set(x.reshape(b * t, h_, d_).astype(data.dtype),
                                             mode="drop")
  return _write_sink(pages.replace(data=flat.reshape(p_, s_, h_, d_)), pages, plan, x)


def _write_staged(pages: Pages, plan: StepPlan, x: jax.Array) -> Pages:
  """``write`` through the staging ring: fold the pages that become due, stage the rest.

  The partial page of a sequence is always staged, so copy on write needs no
  pool copy: the ring row is the sequence's own (``fork`` copied it). New
  tokens are rounded to the ring's dtype first, so a page's folded codes do
  not depend on how the tokens were chunked.
  """
  n0, num_new = lens_before(plan)
  rows = stage_rows(pages, plan)
  x = x.astype(pages.stage.dtype)
  pool, rows = quant.stage_and_fold(pool_only(pages), rows, plan.page_table, n0, x, num_new,
                                    pages.spec, residual=pages.residual, floor=plan.fold_floor)
  b_ = pages.stage.shape[0]
  dst = jnp.where(num_new > 0, plan.seq_ids, b_)     # rows with no new token keep their ring
  return pool.replace(stage=pages.stage.at[dst].set(rows, mode="drop"))


def _dedupe(ids: jax.Array, bound: int) -> jax.Array:
  """bool [N]: ids in [0, bound) that are the first occurrence in the batch."""
  ok = (ids >= 0) & (ids < bound)
  earlier = (ids[:, None] == ids[None, :]) & jnp.tril(jnp.ones((ids.size, ids.size), bool), -1)
  return ok & ~jnp.any(earlier, axis=1)


def unref_pages(meta: state_lib.PageMeta, pages: jax.Array) -> state_lib.PageMeta:
  """Metadata after each entry of ``pages`` gives up one reference.

  A page left with no reference and no content hash becomes free (its fill, tokens and
  parent are reset); a hashed page stays cached at reference 0 until evicted.

  Args:
    meta: page metadata.
    pages: int32 [...] page ids, one reference each (out of range, e.g. P, = none).

  >>> from kvjax.state import init_meta
  >>> m = init_meta(2, 2).replace(ref_count=jnp.array([1, 2]), filled=jnp.array([2, 2]))
  >>> out = unref_pages(m, jnp.array([0, 1, 2]))
  >>> out.ref_count.tolist(), out.filled.tolist()
  ([0, 1], [0, 2])
  """
  ref = meta.ref_count.at[pages.reshape(-1)].add(-1, mode="drop")
  hashed = jnp.any(meta.block_hash != 0, axis=-1)
  freed = (ref == 0) & (meta.ref_count > 0) & ~hashed
  return meta.replace(
      ref_count=ref,
      filled=jnp.where(freed, 0, meta.filled),
      tokens=jnp.where(freed[:, None], -1, meta.tokens),
      parent=jnp.where(freed, -1, meta.parent),
  )


def release(state: CacheState, seq_ids: jax.Array, *, config: CacheConfig) -> CacheState:
  """End sequences: their pages lose a reference; the slots become empty.

  Pages left with no reference and no content hash become free; hashed pages
  stay cached (reference 0) until evicted. The slots' namespaces and flags
  (``seq_status``) are reset. Ids of -1 (padding), repeats and empty slots are
  no-ops; an id out of range flags ``BAD_INPUT`` (``config.checked`` raises
  on an eager call).

  Args:
    state: the cache.
    seq_ids: int [N] sequence slots to release.
    config: the cache's config; the state is checked against it.

  Returns:
    The updated state.

  >>> import kvjax
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                         num_pages=2, max_seqs=1, max_pages_per_seq=2)
  >>> _, st = plan_step(kvjax.init(cfg), jnp.array([0]), jnp.array([[1]]), jnp.array([1]), config=cfg)
  >>> int(release(st, jnp.array([0]), config=cfg).meta.ref_count.sum())
  0
  """
  _check_state(state, config)
  seq_ids = as_int32("seq_ids", seq_ids, 1)
  max_seqs, p_ = state.page_table.shape[0], state.meta.ref_count.shape[0]
  ok = _dedupe(seq_ids, max_seqs)
  out_of_range = (seq_ids != -1) & ((seq_ids < 0) | (seq_ids >= max_seqs))
  rows = jnp.where(ok, seq_ids, max_seqs)
  table = state.page_table[jnp.clip(rows, 0, max_seqs - 1)]
  held = jnp.where(ok[:, None] & (table >= 0), table, p_)
  meta = unref_pages(state.meta, held)
  fold_floor = state.fold_floor
  if fold_floor is not None:
    fold_floor = fold_floor.at[rows].set(0, mode="drop")
  new_state = state.replace(
      meta=meta,
      page_table=state.page_table.at[rows].set(-1, mode="drop"),
      seq_lens=state.seq_lens.at[rows].set(0, mode="drop"),
      seq_seed=state.seq_seed.at[rows].set(0, mode="drop"),
      seq_status=state.seq_status.at[rows].set(0, mode="drop"),
      status=state.status | jnp.where(jnp.any(out_of_range), state_lib.BAD_INPUT,
                                      0).astype(jnp.int32),
      fold_floor=fold_floor,
  )
  return state_lib.enforce_checked(new_state, config)


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
  finite value lies beyond what the pages' spec stores (``quant.out_of_range``:
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
    bad = quant.non_finite(x)
    out = jnp.zeros_like(bad)
    if pages is not None:
      dtype = pages.data.dtype if not pages.spec.is_quantized else jnp.float32
      out = quant.out_of_range(x, pages.spec, dtype=dtype) & ~bad
    return (jnp.where(rows(bad), state_lib.NON_FINITE, 0)
            | jnp.where(rows(out), state_lib.OUT_OF_RANGE, 0))

  return (flags(k, k_pages) | flags(v, v_pages)).astype(jnp.int32)


def fork(state: CacheState, src_ids: jax.Array, dst_ids: jax.Array, *,
         config: CacheConfig) -> CacheState:
  """Start sequences ``dst_ids`` as copies of ``src_ids`` that share their pages.

  Nothing is copied now: every page gains a reference, and the first write
  into a shared partial last page copies it (``plan_step`` plans the copy,
  ``write`` makes it). With staging (quantized pages folded from a ring), the
  source's ring row, which holds its unfolded pages, is copied to the
  destination's now. A pair is skipped and ``BAD_INPUT`` is flagged when the
  destination is not empty, ids are out of range, the source is empty, or an
  id repeats. The copy inherits the source's namespace and its data flags
  (``NON_FINITE``, ``OUT_OF_RANGE``: it shares those K/V).

  Args:
    state: the cache.
    src_ids: int [N] sequences to copy.
    dst_ids: int [N] empty sequence slots to fill.
    config: the cache's config; the state is checked against it and
      ``config.checked`` raises on a skipped pair (eager calls).

  Returns:
    The updated state.

  >>> import kvjax
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                         num_pages=2, max_seqs=2, max_pages_per_seq=2)
  >>> _, st = plan_step(kvjax.init(cfg), jnp.array([0]), jnp.array([[1]]), jnp.array([1]), config=cfg)
  >>> fork(st, jnp.array([0]), jnp.array([1]), config=cfg).meta.ref_count.tolist()
  [2, 0]
  """
  _check_state(state, config)
  src_ids, dst_ids = as_int32("src_ids", src_ids, 1), as_int32("dst_ids", dst_ids, 1)
  if src_ids.shape != dst_ids.shape:
    raise ValueError(f"src_ids and dst_ids must have the same shape, got {tuple(src_ids.shape)} "
                     f"and {tuple(dst_ids.shape)}")
  ms, p_ = state.page_table.shape[0], state.meta.ref_count.shape[0]
  in_range = (src_ids >= 0) & (src_ids < ms) & (dst_ids >= 0) & (dst_ids < ms)
  # Destinations must be distinct and not be a source of this batch.
  dst_repeats = ~_dedupe(dst_ids, ms) | jnp.any(dst_ids[:, None] == src_ids[None, :], axis=1)
  src_safe, dst_safe = jnp.clip(src_ids, 0, ms - 1), jnp.clip(dst_ids, 0, ms - 1)
  dst_empty = (state.seq_lens[dst_safe] == 0) & jnp.all(state.page_table[dst_safe] < 0, axis=1)
  src_live = state.seq_lens[src_safe] > 0
  ok = in_range & ~dst_repeats & dst_empty & src_live
  padding = (src_ids == -1) & (dst_ids == -1)
  bad = ~ok & ~padding
  table = state.page_table[src_safe]
  held = jnp.where(ok[:, None] & (table >= 0), table, p_)
  meta = state.meta
  meta = meta.replace(
      ref_count=meta.ref_count.at[held.reshape(-1)].add(1, mode="drop"),
      access_count=meta.access_count.at[held.reshape(-1)].add(1, mode="drop"),
  )
  rows = jnp.where(ok, dst_ids, ms)
  status = state.status | jnp.where(jnp.any(bad), state_lib.BAD_INPUT, 0)
  if state.fold_floor is not None:   # staging: the destination gets a copy of the source's ring
    copy_ring = lambda p: p.replace(  # noqa: E731
        stage=p.stage.at[:, rows].set(p.stage[:, src_safe], mode="drop"))
    state = state.replace(k=copy_ring(state.k), v=copy_ring(state.v),
                          fold_floor=state.fold_floor.at[rows].set(
                              state.fold_floor[src_safe], mode="drop"))
  if state.k.sink is not None:   # and of its sink rows
    copy_sink = lambda p: p.replace(  # noqa: E731
        sink=p.sink.at[:, rows].set(p.sink[:, src_safe], mode="drop"))
    state = state.replace(k=copy_sink(state.k), v=copy_sink(state.v))
  new_state = state.replace(
      meta=meta,
      page_table=state.page_table.at[rows].set(table, mode="drop"),
      seq_lens=state.seq_lens.at[rows].set(state.seq_lens[src_safe], mode="drop"),
      seq_seed=state.seq_seed.at[rows].set(state.seq_seed[src_safe], mode="drop"),
      seq_status=state.seq_status.at[rows].set(
          state.seq_status[src_safe] & (state_lib.NON_FINITE | state_lib.OUT_OF_RANGE),
          mode="drop"),
      status=status.astype(jnp.int32),
  )
  return state_lib.enforce_checked(new_state, config)
