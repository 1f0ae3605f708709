"""Host loops around ``decode_step``: chunked prefill of a ragged batch, greedy generation.

Every step has one of two shapes, ``[B, chunk]`` (prefill) or ``[B, 1]``
(decode), so ``decode_step`` compiles twice per batch size and never again.
Rows with nothing to do in a step are padding (seq id -1, no new tokens).
After every step the host checks that each working row's cached length grew as
asked; a refused row (cache out of pages, sequence full) raises
``kvjax.CacheStatusError`` naming it.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax.models.llama import LlamaConfig
from kvjax.models.llama import LlamaParams
from kvjax.models.llama import decode_step
from kvjax.models.tokenizer import IM_END_ID


@jax.jit
def _last_logits(logits: jax.Array, num_new: jax.Array) -> jax.Array:
  """float32 [B, V]: the logits of each row's last real token (index num_new - 1)."""
  idx = jnp.clip(num_new - 1, 0, logits.shape[1] - 1)
  return jnp.take_along_axis(logits, idx[:, None, None], axis=1)[:, 0]


def _check_batch(prompts: Sequence[Sequence[int]], seq_ids: Sequence[int],
                 cache_config: kvjax.CacheConfig) -> np.ndarray:
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


def _step(params, cache, tokens, ids, num_new, config, cache_config):
  """One decode_step; raises if a working row was refused."""
  before = np.asarray(cache.seq_lens)[np.maximum(ids, 0)]
  logits, cache = decode_step(params, cache, jnp.asarray(tokens), jnp.asarray(ids),
                              jnp.asarray(num_new), config=config, cache_config=cache_config)
  after = np.asarray(cache.seq_lens)[np.maximum(ids, 0)]
  short = (ids >= 0) & (after != before + num_new)
  if np.any(short):
    status = int(cache.status)
    raise kvjax.CacheStatusError(
        f"cache refused sequences {ids[short].tolist()} (lengths {before[short].tolist()}, "
        f"asked {num_new[short].tolist()} more): {kvjax.status_names(status)}")
  return logits, cache


_attach = jax.jit(kvjax.attach_prefix, static_argnames="config", donate_argnames="state")

_ATTACH_BUCKET = 256  # prompts are padded to a multiple of this for attach (few compiles)


def attach_cached_prefixes(cache: kvjax.CacheState, prompts: Sequence[Sequence[int]],
                           ids: np.ndarray, cache_config: kvjax.CacheConfig,
                           seeds=None) -> tuple[np.ndarray, kvjax.CacheState]:
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
  cached, cache = _attach(cache, jnp.asarray(rows), jnp.asarray(tokens), jnp.asarray(n),
                          None if seeds is None else jnp.asarray(seeds), config=cache_config)
  return np.asarray(cached).astype(np.int64), cache


def prefill(params: LlamaParams, cache: kvjax.CacheState, prompts: Sequence[Sequence[int]],
            seq_ids: Sequence[int], *, config: LlamaConfig, cache_config: kvjax.CacheConfig,
            chunk_size: int = 64, seeds=None, stats: Optional[dict] = None):
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

  Returns:
    (last_logits float32 numpy [B, V], the logits after each prompt's last token; cache).

  >>> cfg = LlamaConfig.small()
  >>> cc = cfg.cache_config(page_size=4, num_pages=16, max_seqs=2, max_pages_per_seq=8)
  >>> p = init_params(cfg, jax.random.key(0))  # doctest: +SKIP
  >>> logits, cache = prefill(p, kvjax.init(cc), [[1, 2, 3], [4]], [0, 1], config=cfg,
  ...                         cache_config=cc, chunk_size=2)  # doctest: +SKIP
  >>> logits.shape  # doctest: +SKIP
  (2, 256)
  """
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  ids = _check_batch(prompts, seq_ids, cache_config)
  b = len(prompts)
  lengths = np.array([len(p) for p in prompts])
  done, cache = attach_cached_prefixes(cache, prompts, ids, cache_config, seeds)
  if stats is not None:
    stats["reused"] = stats.get("reused", 0) + int(done.sum())
    stats["computed"] = stats.get("computed", 0) + int((lengths - done).sum())
  last = [None] * b
  while np.any(done < lengths):
    n = np.minimum(lengths - done, chunk_size).astype(np.int32)
    tokens = np.zeros((b, chunk_size), np.int32)
    for r in range(b):
      tokens[r, : n[r]] = prompts[r][done[r]: done[r] + n[r]]
    step_ids = np.where(n > 0, ids, -1).astype(np.int32)
    logits, cache = _step(params, cache, tokens, step_ids, n, config, cache_config)
    finishing = (n > 0) & (done + n == lengths)
    if np.any(finishing):
      rows = np.asarray(_last_logits(logits, jnp.asarray(n)))
      for r in np.flatnonzero(finishing):
        last[r] = rows[r]
    done += n
  return np.stack(last), cache


def generate(params: LlamaParams, cache: kvjax.CacheState, prompts: Sequence[Sequence[int]],
             seq_ids: Sequence[int], *, config: LlamaConfig, cache_config: kvjax.CacheConfig,
             max_new_tokens: int, stop_ids: Sequence[int] = (IM_END_ID,), chunk_size: int = 64,
             on_step: Optional[Callable[[int], None]] = None, seeds=None,
             stats: Optional[dict] = None):
  """Greedy generation for a batch of prompts through the paged cache.

  Prefills the prompts (chunked), then decodes one token per live row per step
  until a row emits a stop id or reaches ``max_new_tokens``. Finished rows
  become padding. The cache ends up holding each prompt and its generated
  tokens except the last one returned (not yet fed back), so a next turn
  continues the sequence by prefilling ``[last_token] + next_turn``.

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

  Returns:
    (B lists of generated ids, cache).

  >>> out, cache = generate(params, cache, [ids], [0], config=cfg, cache_config=cc,
  ...                       max_new_tokens=32)  # doctest: +SKIP
  """
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
  ids = _check_batch(prompts, seq_ids, cache_config)
  stop = set(int(s) for s in stop_ids)
  logits, cache = prefill(params, cache, prompts, ids, config=config, cache_config=cache_config,
                          chunk_size=chunk_size, seeds=seeds, stats=stats)
  nxt = np.argmax(logits, axis=-1).astype(np.int32)
  out = [[int(t)] for t in nxt]
  live = np.array([int(t) not in stop and max_new_tokens > 1 for t in nxt])
  if on_step is not None:
    on_step(len(out))
  while np.any(live):
    step_ids = np.where(live, ids, -1).astype(np.int32)
    n = live.astype(np.int32)
    tokens = np.where(live, nxt, 0).astype(np.int32)[:, None]
    logits, cache = _step(params, cache, tokens, step_ids, n, config, cache_config)
    nxt = np.asarray(_greedy_next(logits))
    for r in np.flatnonzero(live):
      out[r].append(int(nxt[r]))
      if int(nxt[r]) in stop or len(out[r]) >= max_new_tokens:
        live[r] = False
    if on_step is not None:
      on_step(int(n.sum()))
  return out, cache


@jax.jit
def _greedy_next(logits: jax.Array) -> jax.Array:
  """int32 [B]: argmax of a decode step's logits [B, 1, V]."""
  return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
