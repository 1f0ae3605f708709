"""One step of the host loops (``kvjax.models.generate``, ``kvjax.models.swap``) and its parts.

What both loops share: the ``Reply`` type and its finish reasons, the context
bucket of a step, ``run_step`` (one ``decode_step`` plus the host checks of what
the cache did with each row) and the argmax of a step's logits.

>>> finish_reason(OUT_OF_PAGES), finish_reason(SEQ_FULL)
('out_of_pages', 'length')
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.config import CacheConfig
from kvjax.cache.status import BAD_INPUT
from kvjax.cache.status import CacheStatusError
from kvjax.cache.status import NON_FINITE
from kvjax.cache.status import OUT_OF_PAGES
from kvjax.cache.status import SEQ_FULL
from kvjax.cache.status import status_error
from kvjax.cache.status import status_names
from kvjax.models.llama import decode_step


@jax.jit
def last_logits(logits: jax.Array, num_new: jax.Array) -> jax.Array:
  """float32 [B, V]: the logits of each row's last real token (index num_new - 1)."""
  idx = jnp.clip(num_new - 1, 0, logits.shape[1] - 1)
  return jnp.take_along_axis(logits, idx[:, None, None], axis=1)[:, 0]


@jax.jit
def last_argmax(logits: jax.Array, num_new: jax.Array) -> jax.Array:
  """int32 [B]: the greedy next token of each row (argmax after its last real token)."""
  return jnp.argmax(last_logits(logits, num_new), axis=-1).astype(jnp.int32)


@jax.jit
def greedy_next(logits: jax.Array) -> jax.Array:
  """int32 [B]: argmax of a decode step's logits [B, 1, V]."""
  return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)


def check_batch(prompts: Sequence[Sequence[int]], seq_ids: Sequence[int],
                cache_config: CacheConfig) -> np.ndarray:
  """int32 [B] ``seq_ids``, after ``ValueError`` checks of the batch (ids distinct, in range)."""
  ids = np.asarray(seq_ids, np.int32)
  if ids.ndim != 1 or len(ids) != len(prompts):
    raise ValueError(f"seq_ids must be one id per prompt ({len(prompts)}), got {list(seq_ids)}")
  if len(ids) == 0:
    raise ValueError("prompts must not be empty")
  if np.any(ids < 0) or np.any(ids >= cache_config.max_seqs) or len(set(ids.tolist())) != len(ids):
    raise ValueError(f"seq_ids must be distinct slots in [0, {cache_config.max_seqs}), "
                     f"got {ids.tolist()}")
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise ValueError(f"prompts[{i}] is empty")
  return ids


class Reply(list):
  """A generated reply: the token ids (a ``list``) and why generation stopped.

  ``finish_reason`` is ``"stop"`` (a stop id, returned as the last token),
  ``"length"`` (``max_new_tokens`` reached, or the sequence reached the cache's
  ``max_seq_len``), ``"out_of_pages"`` (the pool had no page for it) or
  ``"non_finite"`` (its K/V held a NaN or inf: the model diverged).

  >>> r = Reply([5, 6], "length")
  >>> list(r), r.finish_reason
  ([5, 6], 'length')
  """

  def __init__(self, tokens=(), finish_reason: Optional[str] = None):
    super().__init__(tokens)
    self.finish_reason = finish_reason


def finish_reason(flags: int) -> str:
  """The finish reason of a row whose step set sequence ``flags``."""
  if flags & OUT_OF_PAGES:
    return "out_of_pages"
  if flags & SEQ_FULL:
    return "length"
  if flags & NON_FINITE:
    return "non_finite"
  return "error"


ROW_STOPS = OUT_OF_PAGES | SEQ_FULL | NON_FINITE | BAD_INPUT   # flags that stop a row


def end_if_done(reply: Reply, stop: set, max_new_tokens: int) -> None:
  """Set ``reply.finish_reason`` when its last token is a stop id or it reached the budget."""
  if reply[-1] in stop:
    reply.finish_reason = "stop"
  elif len(reply) >= max_new_tokens:
    reply.finish_reason = "length"


def pad_to_rows(x, rows: int, fill) -> np.ndarray:
  """Per-row ``x`` (``[B, ...]``) with rows of ``fill`` appended up to ``rows`` (a padded
  step's seq ids -1, counts 0, seeds 0); ``x`` itself when it has ``rows`` already.

  >>> pad_to_rows(np.array([3, 4], np.int32), 4, -1).tolist()
  [3, 4, -1, -1]
  """
  x = np.asarray(x)
  if x.shape[0] == rows:
    return x
  return np.concatenate([x, np.full((rows - x.shape[0],) + x.shape[1:], fill, x.dtype)])


def host_rows(cache) -> tuple[np.ndarray, np.ndarray]:
  """``(seq_lens, seq_status)`` of every slot, on the host, in one transfer."""
  return jax.device_get((cache.seq_lens, cache.seq_status))


CONTEXT_BUCKET_PAGES = 16   # the narrowest attention width the loops compile; then x2 up to M


def context_bucket(lengths: np.ndarray, page_size: int, max_pages_per_seq: int) -> int:
  """Attention width in pages for a step whose longest row holds ``max(lengths)`` tokens after it.

  The loops pass it as ``decode_step(..., context_pages=...)``: 16 pages, then
  doubling (32, 64, ...), capped at ``max_pages_per_seq``, so a batch of short
  rows does not attend over the page table's full width (at most 2x what
  its longest row needs) while the number of compiled step shapes stays
  small (1 + log2 of the table's width over 16).

  >>> context_bucket(np.array([5, 300]), 16, 128), context_bucket(np.array([3000]), 16, 128)
  (32, 128)
  """
  need = -(-int(np.max(lengths, initial=1)) // page_size)
  width = CONTEXT_BUCKET_PAGES
  while width < need:
    width *= 2
  return min(width, max_pages_per_seq)


def run_step(params, cache, tokens, ids, num_new, config, cache_config, seeds, before, *,
             read_rows: Callable = host_rows):
  """One decode_step. Returns ``(logits, cache, stopped, after)``: ``stopped`` int [B] holds
  the flags of each working row that was refused or flagged this step (0 = fine);
  ``before`` / ``after`` are ``read_rows`` of the cache before and after the step (the
  loops pass one step's ``after`` as the next ``before``: one host read per step). Its
  first two items are ``host_rows``'s; the tiered loop reads a few counters with them.

  The new cache is kept whatever happened; only checked mode raises (with it).
  """
  rows = np.maximum(ids, 0)
  width = context_bucket(np.where(ids >= 0, before[0][rows] + num_new, 0),
                         cache_config.page_size, cache_config.max_pages_per_seq)
  # numpy rows go to the device as they are (jnp.asarray would compile a copy per shape)
  logits, cache = decode_step(params, cache, jax.device_put(tokens), jax.device_put(ids),
                              jax.device_put(num_new),
                              None if seeds is None else jax.device_put(seeds),
                              config=config, cache_config=cache_config, context_pages=width)
  after = read_rows(cache)
  new_flags = after[1][rows] & ~before[1][rows]
  short = (ids >= 0) & (after[0][rows] != before[0][rows] + num_new)
  stopped = np.where((ids >= 0) & (short | (new_flags & ROW_STOPS != 0)),
                     np.where(new_flags != 0, new_flags, OUT_OF_PAGES), 0)
  return logits, cache, stopped.astype(np.int64), after


def refusal(cache, ids, stopped, what: str) -> CacheStatusError:
  """The ``CacheStatusError`` naming the rows of ``ids`` that ``stopped`` flags."""
  rows = {int(ids[r]): status_names(int(stopped[r])) for r in np.flatnonzero(stopped)}
  return status_error(cache, f"{what}: cache refused sequences {list(rows)}", rows)
