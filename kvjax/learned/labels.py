"""Labels from the future: log next-use distance classes and reuse within a horizon.

Computed offline from a trace's block ids. A window ``[start, stop)`` of references sees
only next uses inside it: a reference whose block is not referenced again before ``stop``
is **censored** (its distance is known only to be at least ``stop - i``), never labelled
from references past the window, so labels of a training window cannot leak what the
evaluation part holds (``tests/test_learned.py`` changes everything after the cut and
checks the training labels do not move).

Distance classes: ``EDGES = 2^9 .. 2^16`` references; class ``c`` holds distances in
``[EDGES[c-1], EDGES[c])`` (class 0 below 512), the last class ``>= 2^16`` or never.
Names in shapes: N = references in the window, B = ``NUM_CLASSES``.

>>> k, cens = distance_classes(np.array([5, 5, 7, 5]))
>>> k.tolist(), cens.tolist()
([0, 0, 0, 0], [False, False, True, True])
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

EDGES = tuple(2 ** e for e in range(9, 17))
NUM_CLASSES = len(EDGES) + 1


def next_use_in_window(block: np.ndarray, start: int = 0, stop: int | None = None) -> np.ndarray:
  """int64 [stop - start]: distance (references) to each reference's next use inside the
  window, -1 where there is none before ``stop``.

  >>> next_use_in_window(np.array([1, 2, 1, 1]), 0, 3).tolist()
  [2, -1, -1]
  """
  block = np.asarray(block)
  stop = block.shape[0] if stop is None else stop
  if not 0 <= start <= stop <= block.shape[0]:
    raise ValueError(f"window must satisfy 0 <= start <= stop <= {block.shape[0]}, got "
                     f"start={start}, stop={stop}")
  b = block[start:stop]
  n = b.shape[0]
  out = np.full(n, -1, np.int64)
  order = np.argsort(b, kind="stable")
  same = b[order[1:]] == b[order[:-1]]
  out[order[:-1][same]] = order[1:][same] - order[:-1][same]
  return out


def distance_classes(block: np.ndarray, start: int = 0,
                     stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(int32 [N] class, bool [N] censored) of the references in ``[start, stop)``.

  An uncensored reference's class is that of its next-use distance; a censored one's is
  the class of ``stop - i`` (its distance is at least that: the loss counts every class
  from there up), or the last class when ``stop - i >= EDGES[-1]`` (then it is certain,
  and not flagged censored).
  """
  d = next_use_in_window(block, start, stop)
  n = d.shape[0]
  stop = start + n
  bound = stop - (start + np.arange(n))
  cens = d < 0
  dist = np.where(cens, bound, d)
  klass = np.searchsorted(np.asarray(EDGES), dist, side="right").astype(np.int32)
  cens = cens & (bound < EDGES[-1])
  klass = np.where((d < 0) & ~cens, NUM_CLASSES - 1, klass)
  return klass, cens


def reuse_within(block: np.ndarray, horizon: int, start: int = 0,
                 stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(bool [N] reused within ``horizon`` references, bool [N] known) in ``[start, stop)``.

  ``known`` is False where the window ends before the horizon and no next use was seen.

  >>> r, k = reuse_within(np.array([1, 2, 1, 3]), 2)
  >>> r.tolist(), k.tolist()
  ([True, False, False, False], [True, True, False, False])
  """
  if horizon <= 0:
    raise ValueError(f"horizon must be positive, got {horizon}")
  d = next_use_in_window(block, start, stop)
  n = d.shape[0]
  left = n - 1 - np.arange(n)  # references after each one inside the window
  reused = (d > 0) & (d <= horizon)
  return reused, reused | (left >= horizon)


@functools.cache
def log_edges() -> tuple:
  """log2 of the class edges as XLA's float32 log2 computes them (12.999999 for 2^13).

  Computed at the first call, not at import: importing kvjax must not start a JAX
  backend (``jax.distributed.initialize`` has to come first in a multi-process job).
  """
  with jax.ensure_compile_time_eval():   # concrete even when first called under a trace
    return tuple(float(jnp.log2(e)) for e in EDGES)


def class_cdf(probs: jax.Array, x: jax.Array) -> jax.Array:
  """float32 [...]: P(next-use distance <= x) under class probabilities float32 [..., B].

  Within a class the mass is spread uniformly in log2 distance (class 0 over [1, 512));
  the last class (``>= 2^16`` or never) is never reached.

  >>> p = jnp.full(NUM_CLASSES, 1.0 / NUM_CLASSES)
  >>> round(float(class_cdf(p, 512.0)), 4), float(class_cdf(p, 1e9)) < 1.0
  (0.1111, True)
  """
  lx = jnp.log2(jnp.maximum(jnp.asarray(x, jnp.float32), 1.0))[..., None]
  lo = jnp.asarray((0.0,) + log_edges()[:-1])
  hi = jnp.asarray(log_edges())
  frac = jnp.clip((lx - lo) / (hi - lo), 0.0, 1.0)
  return jnp.sum(probs[..., :-1] * frac, axis=-1)
