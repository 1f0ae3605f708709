"""Swap instead of refusal: ``prefill`` / ``generate`` over a two-tier cache (``kvjax.tiers``).

``generate(..., tiers=TierConfig)`` with ``cache`` a ``kvjax.tiers.TieredState`` runs
this loop instead of the plain one. When the pool refuses a row's step with
``OUT_OF_PAGES``, the row does not end: a victim among the resident rows is swapped
out (``kvjax.tiers.swap_out``: its full pages get L2 copies, its slot is freed) and
the refused rows' step is retried. A swapped row waits; when pages are free again
(a row finished and was released), ``kvjax.tiers.swap_in`` re-attaches its cached
prefix from L1 / L2 and the loop recomputes the uncached tail through the model,
then the row continues where it stopped.

- **Priority and the victim** (vLLM's rule, its priority scheduler with equal
  priorities: ``max(running, key=arrival_time)``): a row's priority is its index in
  the batch, first come first served. The victim is the resident row of lowest
  priority (the highest index), the refused row itself included: a refused row
  that is itself the lowest waits, swapped out, while the earlier rows go on. A
  row that is refused while no other row is resident does not fit the pool alone:
  it ends with ``"out_of_pages"`` as in the plain loop. So the highest-priority
  unfinished row always progresses and nothing loops forever.
- **Resuming**: waiting rows resume in priority order (the first that does not
  fit blocks the later ones: first come first served), only after an iteration
  that swapped nothing out (vLLM admits no waiting request in a step that
  preempted), when the pool's unheld pages (free or cached) cover the row's
  sequence plus one page; if no row is resident the first waiting row resumes
  regardless.
- **Recomputing the tail**: the prompt part of the tail goes through prefill
  chunks on the row's own chunk grid (the offsets the first prefill used), the
  generated part through decode steps, one token a step alongside the other
  rows, as it was computed first. With an unquantized L2 over an unquantized L1
  the re-attached pages are bit-exact copies and the generated tokens' K/V are
  recomputed in the same step shape; only a prompt tail recomputed from another
  chunk offset differs (~1e-6 in float32 logits, measured).
- **A finished row is released** (its slot freed, its full pages cached in L1 and
  copied to L2 before they can be evicted): that is what frees pages for the
  waiting rows. So after a tiered ``generate`` every slot is empty, and a next
  turn passes the whole conversation as its prompt: the tiered attach finds it
  in L1 / L2 (the partial last page is recomputed). ``prefill`` keeps its rows
  resident (a later ``generate`` continues them); there a swap cannot make the
  batch fit (every row must hold its prompt at the end), it only picks which rows
  are refused: the latest in the batch.
- **L2 bookkeeping per step**: the model's ``decode_step`` plans inside its jit, so
  the loop does what ``kvjax.tiers.plan_step`` does around it, when it is needed:
  ``sync`` before a step that may evict (the pages it may take outnumber the free
  ones) while some cached page has no L2 copy, ``revalidate`` after a step whose
  plan evicted (``stats.evictions`` grew). The counters come in the step's one host
  read; a step that needs neither costs one small jitted read more than the plain
  loop's.
- **Checked mode** raises at the first flagged step as in the plain loop (no swap);
  ``err.state`` is the ``TieredState``.

>>> import jax, kvjax
>>> from kvjax import tiers
>>> from kvjax.models.llama import LlamaConfig, init_params
>>> cfg = LlamaConfig.small()
>>> cc = cfg.cache_config(page_size=4, num_pages=6, max_seqs=2, max_pages_per_seq=6)
>>> tc = tiers.TierConfig(l2_pages=32, l2_preset="bf16")
>>> out, ts = generate_tiered(init_params(cfg, jax.random.key(0)), tiers.init(cc, tc),
...     [[1, 2, 3, 4, 5], [6, 7, 8]], [0, 1], config=cfg, cache_config=cc, tiers=tc,
...     max_new_tokens=8, stop_ids=())  # doctest: +SKIP
>>> [r.finish_reason for r in out], int(ts.stats.swaps_out) > 0  # doctest: +SKIP
(['length', 'length'], True)
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.config import CacheConfig
from kvjax.cache.state import CacheState
from kvjax.cache.status import CacheStatusError
from kvjax.cache.status import OUT_OF_PAGES
from kvjax.models.llama import LlamaConfig
from kvjax.models.llama import LlamaParams
from kvjax.models.steps import check_batch
from kvjax.models.steps import end_if_done
from kvjax.models.steps import finish_reason
from kvjax.models.steps import last_argmax
from kvjax.models.steps import last_logits
from kvjax.models.steps import pad_to_rows
from kvjax.models.steps import refusal
from kvjax.models.steps import Reply
from kvjax.models.steps import run_step
from kvjax.tiers.config import TierConfig
from kvjax.tiers.move import pow2_at_least
from kvjax.tiers.ops import attach_prefix
from kvjax.tiers.ops import release
from kvjax.tiers.ops import revalidate
from kvjax.tiers.ops import swap_in
from kvjax.tiers.ops import swap_out
from kvjax.tiers.ops import sync
from kvjax.tiers.state import TieredState

RUNNING, WAITING, PARKED, ENDED = 0, 1, 2, 3   # a row: resident / swapped out / prompt fed
#                                                (prefill, resident) / finished or refused
ATTACH_MIN = 256  # the first attach pads prompts to a power of two >= this (few compiles; as
#                   the plain loop's _ATTACH_BUCKET: the demo's system prompt and turns share one)


@jax.jit
def _tier_rows(l1: CacheState, l1_copy: jax.Array) -> jax.Array:
  """int32 [2B + 4]: the step's host read, packed (one transfer): ``seq_lens``,
  ``seq_status``, then ``free``, ``undemoted``, ``evictions``, ``unheld``.

  ``free``: pages with no reference and no hash (a step takes these before evicting);
  ``undemoted``: cached full pages without an L2 copy (what an eviction would lose);
  ``evictions``: L1's counter; ``unheld``: pages no sequence holds (free or cached).
  """
  meta = l1.meta
  unheld = meta.ref_count == 0
  hashed = jnp.any(meta.block_hash != 0, axis=-1)
  full = hashed & (meta.filled == meta.tokens.shape[-1]) & (meta.parent != -2)
  counts = jnp.stack([jnp.sum(unheld & ~hashed), jnp.sum(unheld & full & (l1_copy < 0)),
                      l1.stats.evictions, jnp.sum(unheld)])
  return jnp.concatenate([l1.seq_lens, l1.seq_status, counts]).astype(jnp.int32)


def read_rows(l1: CacheState, l1_copy: jax.Array) -> tuple:
  """``(seq_lens [B], seq_status [B], free, undemoted, evictions, unheld)`` on the host."""
  v = np.asarray(_tier_rows(l1, l1_copy))
  b = (v.shape[0] - 4) // 2
  return (v[:b], v[b:2 * b]) + tuple(int(x) for x in v[2 * b:])


def tier_rows(ts: TieredState) -> tuple:
  """``read_rows`` of ``ts``'s L1."""
  return read_rows(ts.l1, ts.l1_copy)


def pages_needed(lens: np.ndarray, ids: np.ndarray, num_new: np.ndarray, page_size: int) -> int:
  """An upper bound of the pages a step takes: new pages, plus one per row whose partial last
  page may be copied on write.

  >>> pages_needed(np.array([3, 8]), np.array([0, 1, -1]), np.array([1, 1, 0]), 4)
  2
  """
  rows = ids >= 0
  old = lens[ids[rows]].astype(np.int64)
  new = old + num_new[rows]
  grow = -(-new // page_size) - (-(-old // page_size))
  return int(np.sum(grow) + np.sum((old % page_size != 0) & (num_new[rows] > 0)))


def slot_tokens(l1: CacheState, slot: int, n: int, page_size: int) -> list:
  """The first ``n`` tokens sequence ``slot`` holds, read from its pages' metadata."""
  if n == 0:
    return []
  pages = np.asarray(l1.page_table[slot])[:-(-n // page_size)]
  return np.asarray(l1.meta.tokens)[pages].reshape(-1)[:n].tolist()


class SwapLoop:
  """The rows of one tiered ``prefill`` / ``generate`` call and the cache they run in.

  Per row (index r = priority): ``streams[r]`` every token of its sequence (what the
  slot held before the call, the prompt, the generated tokens; the last generated one
  is not fed yet), ``pre[r]`` the tokens fed by prefill-shaped steps (the rest one a
  decode step), ``offset[r]`` the tokens in the cache (resident rows), ``grid[r]`` the
  origin of its prefill chunks, ``phase[r]`` (RUNNING / WAITING / PARKED / ENDED).
  """

  def __init__(self, params, ts, prompts, ids, *, config, cache_config, tiers, chunk_size,
               seeds, stats, generating: bool, max_new_tokens=0, stop=(), on_step=None,
               pad_rows=None):
    if not isinstance(chunk_size, int) or chunk_size < 1:
      raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not isinstance(ts, TieredState):
      raise ValueError(f"tiers= needs a kvjax.tiers.TieredState cache, got {type(ts).__name__}")
    self.params, self.config, self.cc, self.tiers = params, config, cache_config, tiers
    self.chunk, self.stats, self.generating = chunk_size, stats, generating
    self.max_new, self.stop, self.on_step = max_new_tokens, stop, on_step
    self.ids = ids
    b = self.b = len(prompts)
    self.rows = b if pad_rows is None else pad_rows   # step rows; those past b are padding
    self.seeds = None if seeds is None else np.broadcast_to(np.asarray(seeds, np.uint32), (b, 2))
    self.ts = ts
    self.host = tier_rows(ts)
    s = cache_config.page_size
    lens = self.host[0][ids].astype(np.int64)
    self.streams = [slot_tokens(ts.l1, int(ids[r]), int(lens[r]), s) + list(prompts[r])
                    for r in range(b)]
    self.pre = np.array([len(x) for x in self.streams], np.int64)
    self.offset = lens.copy()
    empty = lens == 0
    if np.any(empty) and cache_config.prefix_caching:
      width = pow2_at_least(max(len(p) for p in prompts), ATTACH_MIN)
      tokens = np.zeros((self.rows, width), np.int32)
      for r, p in enumerate(prompts):
        tokens[r, :len(p)] = p
      cached, self.ts = attach_prefix(
          self.ts, jax.device_put(self._pad(np.where(empty, ids, -1), -1).astype(np.int32)),
          jax.device_put(tokens), jax.device_put(self._pad(np.where(empty, self.pre, 0), 0)
                                           .astype(np.int32)),
          None if self.seeds is None else jax.device_put(self._pad(self.seeds, 0)),
          config=cache_config, tiers=tiers, donate=True)   # the loop owns its state
      self.offset = np.where(empty, np.asarray(cached)[:b], lens).astype(np.int64)
      self.host = tier_rows(self.ts)
    if stats is not None:
      stats["reused"] = stats.get("reused", 0) + int(np.sum(self.offset - lens))
      stats["computed"] = stats.get("computed", 0) + int(np.sum(self.pre - self.offset))
    self.grid = self.offset.copy()
    self.phase = np.full(b, RUNNING)
    self.handles = [None] * b
    self.flags = np.zeros(b, np.int64)          # prefill: why a row was refused
    self.last = np.full((b, config.vocab_size), np.nan, np.float32)
    self.out = [Reply() for _ in range(b)]
    self.to_release = []

  def _pad(self, x, fill) -> np.ndarray:
    """Per-row ``x`` ([B, ...]) padded to the step's ``rows`` (``steps.pad_to_rows``)."""
    return pad_to_rows(x, self.rows, fill)

  # --- one model step ------------------------------------------------------------------

  def step(self, mask: np.ndarray, num_new: np.ndarray, tokens: np.ndarray, prefill: bool):
    """One ``decode_step`` for the rows in ``mask``; L2 kept valid around it. A prefill step
    passes the rows' seeds (a sequence that starts takes its row's), a decode step none, as
    the plain loop does. Returns ``(logits [rows, ...]``, padding rows included, ``stopped
    int [B])``."""
    ids = self._pad(np.where(mask, self.ids, -1).astype(np.int32), -1)
    n = self._pad(np.where(mask, num_new, 0).astype(np.int32), 0)
    tokens = self._pad(tokens, 0)
    free, undemoted = self.host[2], self.host[3]
    if undemoted and pages_needed(self.host[0], ids, n, self.cc.page_size) > free:
      self.ts = sync(self.ts, config=self.cc, tiers=self.tiers,   # evictions become demotions
                     donate=True)
    l1_copy = self.ts.l1_copy
    try:
      logits, l1, stopped, after = run_step(
          self.params, self.ts.l1, tokens, ids, n, self.config, self.cc,
          self._pad(self.seeds, 0) if prefill and self.seeds is not None else None, self.host,
          read_rows=lambda c: read_rows(c, l1_copy))
    except CacheStatusError as e:   # checked mode: hand back the whole tiered state
      e.state = self.ts.replace(l1=e.state)
      raise
    self.ts = self.ts.replace(l1=l1)
    if after[4] != self.host[4]:   # the plan evicted: L1 pages reused, their copies stale
      self.ts = revalidate(self.ts, config=self.cc)
      after = tier_rows(self.ts)
    self.host = after
    return logits, stopped[:self.b]

  def advance(self, ok: np.ndarray, num_new: np.ndarray, logits) -> int:
    """Rows in ``ok`` fed ``num_new`` tokens; those that fed their last known token get their
    next one (or, prefilling, their last logits). Returns the tokens generated."""
    self.offset[ok] += num_new[ok]
    at_end = ok & (self.offset == np.array([len(x) for x in self.streams]))
    if not np.any(at_end):
      return 0
    # per step row (padding rows read token 0; their results are dropped on the host)
    n = self._pad(np.where(ok, num_new, 1).astype(np.int32), 1)
    if not self.generating:   # prefill: the prompts' last logits
      rows = np.asarray(last_logits(logits, n))[:self.b]
      self.last[at_end] = rows[at_end]
      self.phase[at_end] = PARKED
      return 0
    toks = np.asarray(last_argmax(logits, n))[:self.b]   # on the device: ids come back
    made = 0
    for r in np.flatnonzero(at_end):
      tok = int(toks[r])
      self.out[r].append(tok)
      self.streams[r].append(tok)
      made += 1
      end_if_done(self.out[r], self.stop, self.max_new)
      if self.out[r].finish_reason is not None:
        self.end(r)
    return made

  def end(self, r: int, flags: int = 0) -> None:
    """Row ``r`` ends (finished, or refused with ``flags``); generating, its slot is freed."""
    self.phase[r] = ENDED
    if flags:
      self.flags[r] = flags
      if self.out[r].finish_reason is None:
        self.out[r].finish_reason = finish_reason(flags)
    if self.generating:
      self.to_release.append(int(self.ids[r]))

  def flush(self) -> bool:
    """Release the slots of the rows that ended (one jitted call, padded to [B]); whether
    there were any."""
    if not self.to_release:
      return False
    ids = np.full(self.b, -1, np.int32)
    ids[:len(self.to_release)] = self.to_release
    self.ts = release(self.ts, jax.device_put(ids), config=self.cc)
    self.to_release = []
    self.host = tier_rows(self.ts)
    return True

  # --- swapping ------------------------------------------------------------------------

  def swap_out(self, r: int) -> None:
    """Row ``r`` leaves the pool: its full pages get L2 copies, its slot is freed."""
    self.flush()
    handle, self.ts = swap_out(self.ts, int(self.ids[r]), config=self.cc, tiers=self.tiers)
    assert handle[0].tolist() == self.streams[r][:self.offset[r]], "swap: cache != stream"
    self.handles[r] = handle
    self.phase[r] = WAITING
    self.host = tier_rows(self.ts)

  def resume(self, r: int) -> None:
    """Row ``r`` comes back: its cached prefix is attached from L1 / L2; the tail waits to
    be recomputed."""
    self.flush()
    cached, self.ts = swap_in(self.ts, int(self.ids[r]), self.handles[r], config=self.cc,
                              tiers=self.tiers)
    if self.stats is not None:
      self.stats["recomputed"] = self.stats.get("recomputed", 0) + int(self.offset[r]) - cached
    self.offset[r] = cached
    self.handles[r] = None
    self.phase[r] = RUNNING
    self.host = tier_rows(self.ts)

  def resume_fitting(self) -> None:
    """Resume waiting rows in priority order while each fits (its pages plus one unheld)."""
    s = self.cc.page_size
    for r in np.flatnonzero(self.phase == WAITING):
      if int(self.host[5]) < -(-len(self.streams[r]) // s) + 1:
        return
      self.resume(int(r))

  def preempt(self, refused: np.ndarray) -> bool:
    """Make room for the highest-priority refused row: swap out the lowest-priority resident
    row, or end the row. Returns whether a row was swapped out.

    Generating, a refused row that is itself the lowest waits (swapped out) while another
    row runs, and ends only alone: the others finish and free pages. Prefilling, rows that
    fed their prompt are candidates too (they keep their pages to the end, so nothing would
    free pages for a row that waits): the refused row ends when it is the lowest.
    """
    r = int(np.flatnonzero(refused)[0])
    running = np.flatnonzero(self.phase == RUNNING)
    victim = int(np.flatnonzero((self.phase == RUNNING) | (self.phase == PARKED))[-1])
    refused[victim] = False
    if victim == r and (running.size == 1 or not self.generating):
      self.end(r, OUT_OF_PAGES)
      self.flush()
      return False
    self.swap_out(victim)
    return True

  # --- the loop ------------------------------------------------------------------------

  def iterate(self) -> bool:
    """One step for the working rows (prefill chunks first, else one decode token each),
    with swaps until every refused row ran, waits or ended. Returns whether it swapped."""
    lens = np.array([len(x) for x in self.streams])
    work = (self.phase == RUNNING) & (self.offset < lens)
    prefill = work & (self.offset < self.pre)
    if np.any(prefill):
      mask, width = prefill, self.chunk
      into = (self.offset - self.grid) % self.chunk     # the row's place on its chunk grid
      n = np.minimum(self.chunk - into, self.pre - self.offset)
    else:
      mask, width = work, 1
      n = np.ones(self.b, np.int64)
    n = np.where(mask, n, 0).astype(np.int32)
    tokens = np.zeros((self.b, width), np.int32)
    for r in np.flatnonzero(mask):
      tokens[r, :n[r]] = self.streams[r][self.offset[r]:self.offset[r] + n[r]]
    swapped, made = False, 0
    while np.any(mask):
      logits, now = self.step(mask, n, tokens, bool(np.any(prefill)))
      made += self.advance(mask & (now == 0), n, logits)
      refused = mask & (now & OUT_OF_PAGES != 0) & (now & ~OUT_OF_PAGES == 0)
      for r in np.flatnonzero(mask & (now != 0) & ~refused):   # sequence full, non-finite
        self.end(int(r), int(now[r]))
      freed = self.flush()
      if np.any(refused) and not freed:   # one swap (or the row ends), then a retry
        swapped |= self.preempt(refused)
      mask = refused & (self.phase == RUNNING)   # (rows that ended this step freed pages:
      #                                            retry before preempting anyone)
    if made and self.on_step is not None:
      self.on_step(made)
    return swapped

  def run(self) -> None:
    budget = 8 * (int(np.sum(self.pre)) + self.b * (self.max_new + 2)) + 64
    swapped = False
    while True:
      budget -= 1
      if budget < 0:
        raise RuntimeError("kvjax.models.swap: the loop stopped making progress (a bug)")
      if not swapped:
        self.resume_fitting()
      lens = np.array([len(x) for x in self.streams])
      if not np.any((self.phase == RUNNING) & (self.offset < lens)):
        waiting = np.flatnonzero(self.phase == WAITING)
        if not waiting.size:
          break
        self.resume(int(waiting[0]))    # nothing resident works: the first waiting row goes
        swapped = False
        continue
      swapped = self.iterate()
    self.flush()


def prefill_tiered(params: LlamaParams, cache: TieredState, prompts: Sequence[Sequence[int]],
                   seq_ids: Sequence[int], *, config: LlamaConfig, cache_config: CacheConfig,
                   tiers: TierConfig, chunk_size: int = 64, seeds=None,
                   stats: Optional[dict] = None, pad_rows: Optional[int] = None):
  """``kvjax.models.prefill`` over a tiered cache (``prefill(..., tiers=...)`` calls it).

  As the plain ``prefill`` (rows stay resident; a refused row raises
  ``CacheStatusError`` at the end, ``err.state`` the ``TieredState``), with the
  prefixes attached across L1 and L2 and a refused row swapping out the latest row
  of the batch (see the module docstring): which rows are refused, not how many.

  Returns:
    (last_logits float32 numpy [B, V], TieredState).
  """
  ids = check_batch(prompts, seq_ids, cache_config)
  loop = SwapLoop(params, cache, prompts, ids, config=config, cache_config=cache_config,
                  tiers=tiers, chunk_size=chunk_size, seeds=seeds, stats=stats,
                  generating=False, pad_rows=pad_rows)
  loop.run()
  if np.any(loop.flags):
    err = refusal(loop.ts.l1, ids, loop.flags, "prefill")
    err.state = loop.ts
    err.logits = loop.last
    raise err
  return loop.last, loop.ts


def generate_tiered(params: LlamaParams, cache: TieredState, prompts: Sequence[Sequence[int]],
                    seq_ids: Sequence[int], *, config: LlamaConfig, cache_config: CacheConfig,
                    tiers: TierConfig, max_new_tokens: int, stop_ids: Sequence[int] = (),
                    chunk_size: int = 64, on_step: Optional[Callable[[int], None]] = None,
                    seeds=None, stats: Optional[dict] = None):
  """``kvjax.models.generate`` over a tiered cache, swapping instead of refusing.

  Args: as ``generate`` (``cache`` a ``kvjax.tiers.TieredState`` built for
  ``cache_config`` and ``tiers``). ``stats`` also gets ``"recomputed"``: tokens
  recomputed after a swap-in. Swaps are counted in ``TierStats.swaps_out`` /
  ``swaps_in``.

  Returns:
    (B ``Reply`` lists, each with its finish reason; the ``TieredState``, every slot
    released: the rows' full pages stay cached in L1 and L2).
  """
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
  ids = check_batch(prompts, seq_ids, cache_config)
  loop = SwapLoop(params, cache, prompts, ids, config=config, cache_config=cache_config,
                  tiers=tiers, chunk_size=chunk_size, seeds=seeds, stats=stats,
                  generating=True, max_new_tokens=max_new_tokens,
                  stop=set(int(s) for s in stop_ids), on_step=on_step)
  loop.run()
  return loop.out, loop.ts
