"""Host loops around ``decode_step``: chunked prefill of a ragged batch, greedy generation.

Every step has one of two shapes, ``[B, chunk]`` (prefill) or ``[B, 1]``
(decode), so ``decode_step`` compiles twice per batch size and never again.
Rows with nothing to do in a step are padding (seq id -1, no new tokens).
After every step the host checks that each working row's cached length grew as
asked. A refusal never loses the cache (the step's new state is always kept):
a refused row (cache out of pages, sequence full) stops there while the other
rows go on; ``prefill`` then raises ``kvjax.CacheStatusError`` naming it, with
the usable cache in ``err.state``, and ``generate`` ends that request with a
finish reason (``Reply.finish_reason``). With ``cache_config.checked`` both
raise at the first flagged step, again with ``err.state``.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import numpy as np

from kvjax.cache.attach import attach_prefix
from kvjax.cache.config import CacheConfig
from kvjax.cache.state import CacheState
from kvjax.models.llama import LlamaConfig
from kvjax.models.llama import LlamaParams
from kvjax.models.steps import check_batch
from kvjax.models.steps import context_bucket  # noqa: F401  (models.generate.context_bucket)
from kvjax.models.steps import end_if_done
from kvjax.models.steps import finish_reason
from kvjax.models.steps import greedy_next
from kvjax.models.steps import host_rows
from kvjax.models.steps import last_logits
from kvjax.models.steps import pad_to_rows
from kvjax.models.steps import refusal
from kvjax.models.steps import Reply
from kvjax.models.steps import run_step
from kvjax.models.swap import generate_tiered
from kvjax.models.swap import prefill_tiered
from kvjax.models.tokenizer import IM_END_ID
from kvjax.tiers.config import TierConfig
from kvjax.tiers.state import TieredState


def _tiered(cache, tiers) -> bool:
  """Whether a loop runs tiered (``ValueError`` when the cache and ``tiers`` disagree)."""
  if tiers is None:
    if isinstance(cache, TieredState):
      raise ValueError("a kvjax.tiers.TieredState cache needs tiers=TierConfig(...)")
    return False
  if not isinstance(tiers, TierConfig) or not isinstance(cache, TieredState):
    raise ValueError(f"tiers= needs a TierConfig and a kvjax.tiers.TieredState cache, got "
                     f"{type(tiers).__name__} and {type(cache).__name__}")
  return True


_attach = jax.jit(attach_prefix, static_argnames="config", donate_argnames="state")

_ATTACH_BUCKET = 256  # prompts are padded to a multiple of this for attach (few compiles)


def attach_cached_prefixes(cache: CacheState, prompts: Sequence[Sequence[int]],
                           ids: np.ndarray, cache_config: CacheConfig,
                           seeds=None) -> tuple[np.ndarray, CacheState]:
  """Attach cached prefixes to the empty sequences among ``ids``; int [B] tokens reused."""
  lens = np.asarray(cache.seq_lens)[ids]
  empty = lens == 0
  if not cache_config.prefix_caching or not np.any(empty):
    return np.zeros(len(prompts), np.int64), cache
  width = -(-max(len(p) for p in prompts) // _ATTACH_BUCKET) * _ATTACH_BUCKET
  tokens = np.zeros((len(prompts), width), np.int32)
  for r, p in enumerate(prompts):
    tokens[r, :len(p)] = p
  rows = np.where(empty, ids, -1).astype(np.int32)
  n = np.where(empty, [len(p) for p in prompts], 0).astype(np.int32)
  cached, cache = _attach(cache, jax.device_put(rows), jax.device_put(tokens),
                          jax.device_put(n), None if seeds is None else jax.device_put(seeds),
                          config=cache_config)
  return np.asarray(cached).astype(np.int64), cache


def prefill(params: LlamaParams, cache: CacheState, prompts: Sequence[Sequence[int]],
            seq_ids: Sequence[int], *, config: LlamaConfig, cache_config: CacheConfig,
            chunk_size: int = 64, seeds=None, stats: Optional[dict] = None,
            tiers: Optional[TierConfig] = None, pad_rows: Optional[int] = None):
  """Feed prompts of different lengths into the cache, ``chunk_size`` tokens per step.

  Each prompt is appended to whatever its sequence already holds (a new turn of
  a conversation continues the same sequence). An empty sequence first reuses
  the longest verified cached prefix of its prompt (``kvjax.attach_prefix``)
  when ``cache_config.prefix_caching`` is on; only the rest is computed.

  Args:
    params, config: the model.
    cache, cache_config: the cache (donated to each step: use the returned one).
    prompts: B lists of token ids (any lengths >= 1).
    seq_ids: B distinct sequence slots.
    chunk_size: tokens per row per step (the T of the prefill shape).
    seeds: optional uint32 [B, 2] hash-chain seeds (``kvjax.tenant_seed``).
    stats: optional dict; ``"computed"`` and ``"reused"`` prompt tokens are added to it.
    tiers: with ``cache`` a ``kvjax.tiers.TieredState``, its ``TierConfig``: prefixes
      are attached across L1 and L2, and a refused row swaps out the latest row of the
      batch (``kvjax.models.swap``; every row must hold its prompt at the end, so a swap
      picks which rows are refused, not how many). None (default): the plain loop.
    pad_rows: optional int >= B: steps of ``[pad_rows, chunk_size]``, the rows past B
      padding (seq id -1: nothing written, nothing kept), so a small prefill runs the
      compiled step of a larger batch instead of compiling its own (the demo's one-row
      system prompt takes its four-row turns' shape); with ``tiers`` its prefix attach too.

  Returns:
    (last_logits float32 numpy [B, V], the logits after each prompt's last token; cache).

  Raises:
    kvjax.CacheStatusError: a row was refused (out of pages, sequence full) or
      its K/V were non-finite. The other rows were prefilled to the end first
      (checked mode: raised at the first flagged step). ``err.state`` is the
      cache (usable), ``err.rows`` the refused sequences, ``err.logits`` the
      last logits (NaN rows for the refused ones).

  >>> import kvjax

  >>> cfg = LlamaConfig.small()
  >>> cc = cfg.cache_config(page_size=4, num_pages=16, max_seqs=2, max_pages_per_seq=8)
  >>> p = init_params(cfg, jax.random.key(0))  # doctest: +SKIP
  >>> logits, cache = prefill(p, kvjax.init(cc), [[1, 2, 3], [4]], [0, 1], config=cfg,
  ...                         cache_config=cc, chunk_size=2)  # doctest: +SKIP
  >>> logits.shape  # doctest: +SKIP
  (2, 256)
  """
  tiered = _tiered(cache, tiers)
  if pad_rows is not None and (not isinstance(pad_rows, int) or isinstance(pad_rows, bool)
                               or pad_rows < len(prompts)):
    raise ValueError(f"pad_rows must be an int >= the {len(prompts)} prompts, got {pad_rows!r}")
  if tiered:
    return prefill_tiered(params, cache, prompts, seq_ids, config=config,
                          cache_config=cache_config, tiers=tiers, chunk_size=chunk_size,
                          seeds=seeds, stats=stats, pad_rows=pad_rows)
  last, cache, stopped, _ = _prefill(params, cache, prompts, seq_ids, config=config,
                                  cache_config=cache_config, chunk_size=chunk_size, seeds=seeds,
                                  stats=stats, pad_rows=pad_rows)
  if np.any(stopped):
    err = refusal(cache, np.asarray(seq_ids), stopped, "prefill")
    err.logits = last
    raise err
  return last, cache


def _prefill(params, cache, prompts, seq_ids, *, config, cache_config, chunk_size, seeds,
             stats, pad_rows=None):
  """``prefill`` without raising on a refusal: ``(last_logits, cache, stopped int [B],
  host rows)``; a refused row stops (its logits NaN) and the others go on."""
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  ids = check_batch(prompts, seq_ids, cache_config)
  b = len(prompts)
  seeds = None if seeds is None else np.broadcast_to(np.asarray(seeds, np.uint32), (b, 2))
  lengths = np.array([len(p) for p in prompts])
  done, cache = attach_cached_prefixes(cache, prompts, ids, cache_config, seeds)
  if stats is not None:
    stats["reused"] = stats.get("reused", 0) + int(done.sum())
    stats["computed"] = stats.get("computed", 0) + int((lengths - done).sum())
  last = np.full((b, config.vocab_size), np.nan, np.float32)
  stopped = np.zeros(b, np.int64)
  host = host_rows(cache)
  rows = b if pad_rows is None else pad_rows   # step rows; those past b are padding
  step_seeds = None if seeds is None else pad_to_rows(seeds, rows, 0)
  while np.any((done < lengths) & (stopped == 0)):
    n = np.where(stopped == 0, np.minimum(lengths - done, chunk_size), 0).astype(np.int32)
    tokens = np.zeros((rows, chunk_size), np.int32)
    for r in range(b):
      tokens[r, : n[r]] = prompts[r][done[r]: done[r] + n[r]]
    step_ids = pad_to_rows(np.where(n > 0, ids, -1).astype(np.int32), rows, -1)
    step_n = pad_to_rows(n, rows, 0)
    logits, cache, now, host = run_step(params, cache, tokens, step_ids, step_n, config,
                                        cache_config, step_seeds, host)
    now = now[:b]
    stopped = np.where(now != 0, now, stopped)
    finishing = (n > 0) & (done + n == lengths) & (now == 0)
    if np.any(finishing):
      out = np.asarray(last_logits(logits, jax.device_put(step_n)))[:b]
      last[finishing] = out[finishing]
    done += np.where(now == 0, n, 0)
  return last, cache, stopped, host


def generate(params: LlamaParams, cache: CacheState, prompts: Sequence[Sequence[int]],
             seq_ids: Sequence[int], *, config: LlamaConfig, cache_config: CacheConfig,
             max_new_tokens: int, stop_ids: Sequence[int] = (IM_END_ID,), chunk_size: int = 64,
             on_step: Optional[Callable[[int], None]] = None, seeds=None,
             stats: Optional[dict] = None, tiers: Optional[TierConfig] = None):
  """Greedy generation for a batch of prompts through the paged cache.

  Prefills the prompts (chunked), then decodes one token per live row per step
  until a row emits a stop id or reaches ``max_new_tokens``. Finished rows
  become padding. The cache ends up holding each prompt and its generated
  tokens except the last one returned (not yet fed back), so a next turn
  continues the sequence by prefilling ``[last_token] + next_turn``.

  A row the cache refuses (no page left, ``max_seq_len`` reached) or whose
  K/V turn non-finite ends there with its finish reason; the other rows go
  on, and the cache stays usable (the refused row keeps what it had cached:
  release it, or continue it once pages are free). A row refused during
  prefill returns no tokens. With ``cache_config.checked`` the first flagged
  step raises ``kvjax.CacheStatusError`` instead (``err.state`` holds the cache).

  Args:
    params, config: the model.
    cache, cache_config: the cache (use the returned one).
    prompts: B lists of token ids.
    seq_ids: B distinct sequence slots.
    max_new_tokens: most tokens generated per row (>= 1).
    stop_ids: token ids that end a row (returned as its last token).
    chunk_size: prefill tokens per row per step.
    on_step: called with the number of tokens generated in each step (progress).
    seeds, stats: passed to ``prefill``.
    tiers: with ``cache`` a ``kvjax.tiers.TieredState``, its ``TierConfig``: swap
      instead of refusal (``kvjax.models.swap``). A row refused for want of pages swaps
      out the latest row of the batch (its full pages to L2) and retries; the swapped
      row resumes when pages are free, its cached prefix re-attached from L1 / L2 and
      its tail recomputed. Only a row that does not fit the pool alone ends with
      ``"out_of_pages"``. Every row is released when it ends (that is what frees pages):
      a next turn passes the whole conversation as its prompt. None (default): the
      plain loop, unchanged.

  Returns:
    (B ``Reply`` lists of generated ids, each with its ``finish_reason``; cache).

  >>> out, cache = generate(params, cache, [ids], [0], config=cfg, cache_config=cc,
  ...                       max_new_tokens=32)  # doctest: +SKIP
  """
  if _tiered(cache, tiers):
    return generate_tiered(params, cache, prompts, seq_ids, config=config,
                           cache_config=cache_config, tiers=tiers,
                           max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                           chunk_size=chunk_size, on_step=on_step, seeds=seeds, stats=stats)
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
  ids = check_batch(prompts, seq_ids, cache_config)
  stop = set(int(s) for s in stop_ids)
  logits, cache, stopped, host = _prefill(params, cache, prompts, ids, config=config,
                                    cache_config=cache_config, chunk_size=chunk_size,
                                    seeds=seeds, stats=stats)
  out = [Reply() for _ in prompts]
  for r in np.flatnonzero(stopped):
    out[r].finish_reason = finish_reason(int(stopped[r]))
  nxt = np.argmax(np.nan_to_num(logits), axis=-1).astype(np.int32)
  live = stopped == 0
  for r in np.flatnonzero(live):
    out[r].append(int(nxt[r]))
    end_if_done(out[r], stop, max_new_tokens)
    live[r] = out[r].finish_reason is None
  if on_step is not None:
    on_step(int(np.sum(stopped == 0)))
  while np.any(live):
    step_ids = np.where(live, ids, -1).astype(np.int32)
    n = live.astype(np.int32)
    tokens = np.where(live, nxt, 0).astype(np.int32)[:, None]
    logits, cache, now, host = run_step(params, cache, tokens, step_ids, n, config,
                                        cache_config, None, host)
    nxt = np.asarray(greedy_next(logits))
    for r in np.flatnonzero(live):
      if now[r]:   # refused or flagged: this step's token was not computed from a clean cache
        out[r].finish_reason = finish_reason(int(now[r]))
      else:
        out[r].append(int(nxt[r]))
        end_if_done(out[r], stop, max_new_tokens)
      live[r] = out[r].finish_reason is None
    if on_step is not None:
      on_step(int(np.sum(n.astype(bool) & (now == 0))))
  return out, cache
