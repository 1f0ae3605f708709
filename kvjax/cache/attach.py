"""Prefix caching inside jit: full pages enter the index, new sequences attach cached prefixes.

A page enters the prefix index when it fills (with quantized pages and a
residual window: when it is folded into its pool page, ``residual`` tokens
later, so the index only ever hands out folded pages); its key is the chained hash of
its tokens onto its parent page's hash (the sequence's namespace seed for the
first block). ``attach_prefix`` gives a new sequence the longest run of
cached pages that match its prompt, each **verified** against the page's
stored tokens, its parent page and (for the first block) its namespace, so a
hash collision can shorten a match but never hand out another sequence's K/V.

Invariant kept by ``plan_step``: a page's ``parent`` always names a page whose
content is that block's true predecessor. When a page is reused for new
content, pages naming it as parent are orphaned (``parent = -2``) and leave the
index.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.cache.checks import as_int32
from kvjax.cache.checks import check_state
from kvjax.cache.config import CacheConfig
from kvjax.cache.state import CacheState
from kvjax.cache.state import default_seed
from kvjax.cache.state import row_seeds
from kvjax.cache.status import BAD_INPUT
from kvjax.cache.status import enforce_checked
from kvjax.cache.status import jit_when_eager
from kvjax.layout.meta import PageMeta
from kvjax.layout.pages import Pages
from kvjax.layout.shapes import first_staged_page
from kvjax.layout.shapes import residual_tokens
from kvjax.policies.adapter import events
from kvjax.policies.adapter import report
from kvjax.prefix.hashing import namespace_seed
from kvjax.prefix.hashing import remap_no_hash
from kvjax.prefix.index import index_delete
from kvjax.prefix.index import index_insert
from kvjax.prefix.index import index_lookup
from kvjax.prefix.index import match_prefix
from kvjax.prefix.index import placement_mix
from kvjax.prefix.index import PrefixIndex
from kvjax.quant.pages import dequantize_pages


def tenant_seed(config: CacheConfig, adapter_id=None, tenant_salt=None) -> jax.Array:
  """uint32 [2]: the hash-chain seed for ``config.namespace``, an adapter and a tenant.

  Sequences attached with different seeds never share a page.

  >>> cfg = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                   num_pages=4, max_seqs=1, max_pages_per_seq=2)
  >>> bool(jnp.any(tenant_seed(cfg, tenant_salt="a") != tenant_seed(cfg, tenant_salt="b")))
  True
  """
  return jnp.asarray(namespace_seed(config.namespace, adapter_id, tenant_salt), jnp.uint32)


def register_full_pages(meta: PageMeta, index: PrefixIndex, table: jax.Array,
                        old_len: jax.Array, new_len: jax.Array, granted: jax.Array,
                        seeds: jax.Array, *, config: CacheConfig, per_row: int,
                        fold_floor: jax.Array | None = None, admit=None
                        ) -> tuple[PageMeta, PrefixIndex, jax.Array, jax.Array, jax.Array,
                                   jax.Array]:
  """Hash the pages that filled (or, with a residual window, folded) this step; index them.

  A block's hash chains onto its parent page's hash; a page whose parent has no
  hash (it lost an insert race, or the index overflowed, in this step or an
  earlier one) is not hashed. A hash
  already in the index keeps its page: the new page stays private.

  Args:
    meta: metadata after this step's tokens were written.
    index: the prefix index.
    table: int32 [B, M] the rows' page tables after this step.
    old_len, new_len: int32 [B] lengths before and after the step.
    granted: bool [B] rows that were written.
    seeds: uint32 [B, 2] the rows' chain seeds.
    per_row: static bound on blocks a row can fill in one step.
    fold_floor: int32 [B] pages of each row already folded (attached), or None.
      With a residual window R (``residual_tokens`` of the config's
      specs), page ``j`` is registered in the step it folds, when
      ``(j + 1) * S + R <= len`` first holds; below the floor it is indexed already.
    admit: optional ``admit(hashes uint32 [K, 2], pages int32 [K], ok bool [K]) -> bool
      [K]``, the eviction policy's admission filter (K = B * per_row): a page it
      declines is not indexed (it stays private and is freed when its sequence ends).

  Returns:
    ``(meta, index, overflow, registered, declined, hashes)``: ``overflow`` is True when
    an insert did not fit; ``registered`` int32 [K] the pages indexed this step and
    ``declined`` those ``admit`` turned away (P = none); ``hashes`` uint32 [K, 2] theirs.
  """
  s_, p_ = config.page_size, config.num_pages
  m_ = table.shape[1]
  hash_fn = config.block_hash_fn
  residual = residual_tokens(config.key_quant, config.value_quant)
  if residual:   # a page is indexed once folded: its pool page holds its final codes
    first = first_staged_page(old_len, residual, s_)
    end = first_staged_page(new_len, residual, s_)
    if fold_floor is not None:
      first, end = jnp.maximum(first, fold_floor), jnp.maximum(end, fold_floor)
    end = jnp.where(granted, end, first)
  else:
    first = old_len // s_
    end = jnp.where(granted, new_len // s_, first)
  prev = jnp.take_along_axis(table, jnp.clip(first - 1, 0, m_ - 1)[:, None], 1)[:, 0]
  prev_hash = meta.block_hash[jnp.clip(prev, 0, p_ - 1)]
  parent_hash = jnp.where((first == 0)[:, None], seeds, prev_hash)
  parent_ok = (first == 0) | jnp.any(prev_hash != 0, axis=-1)

  def body(carry, j):
    ph, ok = carry
    blk = first + j
    filling = blk < end
    page = jnp.take_along_axis(table, jnp.clip(blk, 0, m_ - 1)[:, None], 1)[:, 0]
    h = remap_no_hash(hash_fn(ph, meta.tokens[jnp.clip(page, 0, p_ - 1)]))
    item_ok = filling & ok & (page >= 0)
    carry = (jnp.where(filling[:, None], h, ph), jnp.where(filling, item_ok, ok))
    return carry, (h, jnp.where(item_ok, page, p_), item_ok)

  _, (hashes, pages, ok) = jax.lax.scan(body, (parent_hash, parent_ok), jnp.arange(per_row))
  hashes, pages, ok = hashes.reshape(-1, 2), pages.reshape(-1), ok.reshape(-1)
  if residual:   # forked sequences share full unfolded pages: both fold (and register) them
    earlier = (pages[:, None] == pages[None, :]) & jnp.tril(jnp.ones((pages.size,) * 2, bool), -1)
    ok = ok & ~jnp.any(earlier & ok[None, :], axis=1)
  declined = jnp.full(pages.shape, p_, pages.dtype)
  if admit is not None:
    allowed = admit(hashes, pages, ok)
    declined = jnp.where(ok & ~allowed, pages, p_)
    ok = ok & allowed

  def insert(args):
    meta, index = args
    mixed = placement_mix(index, hashes)   # computed once for the four calls below
    present = index_lookup(index, hashes, ok, mixed=mixed) >= 0
    index, overflow = index_insert(index, hashes, pages, ok & ~present, mixed=mixed)
    winner = ok & (index_lookup(index, hashes, ok, mixed=mixed) == pages)
    # A page registers only if every page before it in its row's run did: one that chains
    # onto a page that lost (its block was indexed already, or another row won it) could
    # never be matched (verification wants the indexed parent), so it leaves the index.
    won = winner.reshape(per_row, -1)
    chained = jnp.cumprod(jnp.where(ok.reshape(per_row, -1), won, True), axis=0).astype(bool)
    stray = (won & ~chained).reshape(-1)
    index = index_delete(index, hashes, stray, expected=pages, mixed=mixed)
    registered = jnp.where(winner & ~stray, pages, p_)
    meta = meta.replace(block_hash=meta.block_hash.at[registered].set(hashes, mode="drop"))
    return meta, index, jnp.any(overflow), registered

  none = lambda a: (*a, jnp.array(False), jnp.full(pages.shape, p_, pages.dtype))  # noqa: E731
  out = jax.lax.cond(jnp.any(ok), insert, none, (meta, index))
  return (*out, declined, hashes)


@jit_when_eager("config")
def attach_prefix(state: CacheState, seq_ids: jax.Array, tokens: jax.Array,
                  num_tokens: jax.Array, seeds: jax.Array | None = None, *,
                  config: CacheConfig) -> tuple[jax.Array, CacheState]:
  """Start empty sequences on the longest verified cached prefix of their prompts.

  Only whole pages are reused, and at least one prompt token is left to
  compute (its logits are needed). Matched pages gain a reference; the
  sequence's length becomes the number of cached tokens, so the caller
  prefills ``prompt[cached:]`` with ``plan_step`` (passing the same ``seeds``).
  A row whose sequence is not empty, or whose id repeats, is skipped and
  flagged ``BAD_INPUT``.

  A row that attaches at least one page starts its sequence, in the namespace
  of its seed (set once, here). A row that matched nothing leaves its slot
  exactly as it was, empty and without a namespace: the ``plan_step`` that
  starts it sets one from its own ``seeds``, so a seed given here never
  outlives the call (another tenant's prompt planned into the slot cannot be
  indexed under it).

  Args:
    state: the cache.
    seq_ids: int [B] empty sequence slots (-1 = padding row).
    tokens: int [B, T] prompts (padded).
    num_tokens: int [B] prompt lengths (<= T).
    seeds: uint32 [B, 2] or [2] chain seeds (``tenant_seed``); default the
      config's namespace seed.
    config: the cache's static config.

  Returns:
    ``(cached, state)``: int32 [B] prompt tokens served from the cache, and the
    updated state.

  >>> import kvjax
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                         num_pages=8, max_seqs=2, max_pages_per_seq=4)
  >>> prompt = jnp.array([[1, 2, 3, 4, 5]])
  >>> _, st = kvjax.plan_step(kvjax.init(cfg), jnp.array([0]), prompt, jnp.array([5]), config=cfg)
  >>> cached, st = attach_prefix(st, jnp.array([1]), prompt, jnp.array([5]), config=cfg)
  >>> cached.tolist(), st.page_table[1].tolist()
  ([4], [0, 1, -1, -1])
  """
  check_state(state, config)
  seq_ids = as_int32("seq_ids", seq_ids, 1)
  tokens = as_int32("tokens", tokens, 2)
  num_tokens = as_int32("num_tokens", num_tokens, 1)
  b, t = tokens.shape
  if seq_ids.shape != (b,) or num_tokens.shape != (b,):
    raise ValueError(f"seq_ids, tokens and num_tokens must share the batch size; got seq_ids "
                     f"{tuple(seq_ids.shape)}, tokens {tuple(tokens.shape)}, num_tokens "
                     f"{tuple(num_tokens.shape)}")
  seeds = row_seeds(seeds, b)
  seeds = jnp.where(jnp.any(seeds != 0, axis=-1, keepdims=True), seeds,
                    default_seed(config))
  s_, m_, p_, ms = config.page_size, config.max_pages_per_seq, config.num_pages, config.max_seqs
  in_range = (seq_ids >= 0) & (seq_ids < ms)
  sid = jnp.clip(seq_ids, 0, ms - 1)
  dup = jnp.sum((seq_ids[:, None] == seq_ids[None, :]) & in_range[None, :], axis=1) > 1
  empty = (state.seq_lens[sid] == 0) & jnp.all(state.page_table[sid] < 0, axis=1)
  bad_len = (num_tokens < 0) | (num_tokens > t)
  ok = in_range & ~dup & empty & ~bad_len
  bad = (seq_ids != -1) & ~ok
  k = min(t // s_, m_)
  want = jnp.where(ok, jnp.clip((num_tokens - 1) // s_, 0, k), 0)
  meta = state.meta
  clock = state.clock + 1
  if config.prefix_caching and k > 0:
    match = match_prefix(state.index, meta.tokens, meta.parent, seeds, tokens[:, :k * s_], want,
                         config.block_hash_fn, meta_namespace=meta.namespace)
    matched = jnp.where(ok, match.num_matched, 0)
    pages = jnp.where(jnp.arange(k)[None, :] < matched[:, None], match.pages, -1)
  else:
    matched = jnp.zeros((b,), jnp.int32)
    pages = jnp.full((b, max(k, 1)), -1, jnp.int32)
  held = jnp.where(pages >= 0, pages, p_).reshape(-1)
  held_safe = jnp.clip(held, 0, p_ - 1)
  policy_state = report(
      state.policy, meta, events(
          jnp.where(held < p_, held, -1), meta.block_hash[held_safe], clock, kind="hit",
          position=meta.position[held_safe], filled=meta.filled[held_safe]),
      state.policy_params, config)
  meta = meta.replace(
      ref_count=meta.ref_count.at[held].add(1, mode="drop"),
      access_count=meta.access_count.at[held].add(1, mode="drop"),
      last_access=meta.last_access.at[held].set(clock, mode="drop"),
  )
  rows = jnp.where(ok, seq_ids, ms)
  row_table = jnp.full((b, m_), -1, jnp.int32).at[:, :pages.shape[1]].set(pages[:, :m_])
  extra = {}
  if state.fold_floor is not None:
    extra = _attach_staged(state, rows, row_table, matched, config)
  if state.k.sink is not None:
    extra.update(_attach_sink(state, extra.get("k", state.k), extra.get("v", state.v), rows,
                              row_table, matched))
  stats = state.stats
  asked = jnp.where(ok, num_tokens, 0)
  stats = stats.replace(
      prefix_query_tokens=stats.prefix_query_tokens + jnp.sum(asked),
      prefix_hit_tokens=stats.prefix_hit_tokens + jnp.sum(matched * s_),
      prefix_query_pages=stats.prefix_query_pages + jnp.sum(want),
      prefix_hit_pages=stats.prefix_hit_pages + jnp.sum(matched),
  )
  new_state = state.replace(
      meta=meta,
      page_table=state.page_table.at[rows].set(row_table, mode="drop"),
      seq_lens=state.seq_lens.at[rows].set(matched * s_, mode="drop"),
      seq_seed=state.seq_seed.at[jnp.where(matched > 0, rows, ms)].set(seeds, mode="drop"),
      clock=clock,
      stats=stats,
      status=state.status | jnp.where(jnp.any(bad), BAD_INPUT, 0).astype(jnp.int32),
      policy=policy_state,
      **extra,
  )
  return matched * s_, enforce_checked(new_state, config)


def _pool_values(p: Pages, page: jax.Array) -> jax.Array:
  """float32 ``[L, K, S, H, D]``: pool pages ``page`` (int32 [K]) of all layers, dequantized."""
  pool = jax.tree.map(lambda a: a[:, page], p.replace(stage=None, sink=None))
  return dequantize_pages(pool, p.spec)


def _attach_sink(state: CacheState, k: Pages, v: Pages, rows: jax.Array, row_table: jax.Array,
                 matched: jax.Array) -> dict:
  """Sink rows of sequences that start on an attached first page.

  The pool holds the sink tokens only quantized, so they are copied from a
  live sequence that holds the same first page (its rows are those tokens in
  full precision); with no such sequence, from the pool, dequantized (then
  this sequence sees its sink quantized, as a cache without a sink would).

  Returns:
    ``dict(k=..., v=...)`` for ``state.replace``.
  """
  ms, p_ = state.page_table.shape[0], state.meta.ref_count.shape[0]
  n = k.sink.shape[2]
  first = row_table[:, 0]                                                   # [B]
  same = ((state.page_table[None, :, 0] == first[:, None]) & (first[:, None] >= 0)
          & (state.seq_lens[None, :] >= n) & (jnp.arange(ms)[None, :] != rows[:, None]))
  has_owner, owner = jnp.any(same, axis=1), jnp.argmax(same, axis=1)        # [B]
  dst = jnp.where((matched > 0) & (rows < ms), rows, ms)
  page = jnp.clip(first, 0, p_ - 1)

  def fill(p: Pages) -> Pages:
    deq = _pool_values(p, page)[:, :, :n].astype(p.sink.dtype)             # [L, B, N, H, D]
    vals = jnp.where(has_owner[None, :, None, None, None], p.sink[:, owner], deq)
    return p.replace(sink=p.sink.at[:, dst].set(vals, mode="drop"))

  return dict(k=fill(k), v=fill(v))


def _attach_staged(state: CacheState, rows: jax.Array, row_table: jax.Array,
                   matched: jax.Array, config: CacheConfig) -> dict:
  """Staging fields of sequences that start on ``matched`` attached (folded) pages.

  The attached pages are folded, so their floor is ``matched``. With a residual
  window the staging rule puts the last ``R / S`` of them in the ring; the ring
  gets their dequantized codes, so attention reads the same values whichever
  copy it reads. (The sequence that computed them had them in full precision
  there: reused pages are seen quantized ``R`` tokens early.)

  Returns:
    ``dict(k=..., v=..., fold_floor=...)`` for ``state.replace``.
  """
  ms, s_ = config.max_seqs, config.page_size
  floor = state.fold_floor.at[rows].set(matched, mode="drop")
  residual = state.k.residual
  if not residual:
    return dict(fold_floor=floor)
  ns = state.k.stage.shape[2]
  nw = min(residual // s_, row_table.shape[1])
  first = first_staged_page(matched * s_, residual, s_)              # [B]
  col = first[:, None] + jnp.arange(nw)[None, :]                            # [B, nw]
  live = (col < matched[:, None]) & (rows < ms)[:, None]
  page = jnp.take_along_axis(row_table, jnp.clip(col, 0, row_table.shape[1] - 1), 1)
  page = jnp.clip(page, 0, config.num_pages - 1).reshape(-1)
  row_idx = jnp.where(live, rows[:, None], ms).reshape(-1)
  slot = (col % ns).reshape(-1)

  def fill(p):
    vals = _pool_values(p, page).astype(p.stage.dtype)                     # [L, B*nw, S, H, D]
    return p.replace(stage=p.stage.at[:, row_idx, slot].set(vals, mode="drop"))

  return dict(k=fill(state.k), v=fill(state.v), fold_floor=floor)
