"""Belady's MIN and MIN with bypass (oracles: they read ``Access.next_use``), registered as
``min`` and ``min-bypass``.

>>> from kvjax.policies.scoring import view
>>> view(min_state(jnp.array([5, 2, 9])).next_use).tolist()   # next use per cached page
[5, 2, 9]
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kvjax.policies.contract import Policy
from kvjax.policies.contract import register
from kvjax.policies.scoring import Access
from kvjax.policies.scoring import Deferred
from kvjax.policies.scoring import deferred
from kvjax.policies.scoring import finalize
from kvjax.policies.scoring import get
from kvjax.policies.scoring import NEVER
from kvjax.policies.scoring import put
from kvjax.policies.scoring import view




# ---------------------------------------------------------------------------- oracle (MIN)


class MinState(NamedTuple):
  next_use: Deferred  # int32 [P]  clock of the cached block's next reference (NEVER = none)


def min_state(next_use: jax.Array) -> MinState:
  """A ``MinState`` from int32 [P] next-use times."""
  return MinState(deferred(jnp.asarray(next_use, jnp.int32), 1))


def _min_init(num_pages: int) -> MinState:
  return min_state(jnp.full((num_pages,), NEVER, jnp.int32))


def _min_score(state: MinState, meta, clock, params):
  """Belady's MIN: the block referenced farthest in the future goes first (oracle)."""
  del clock, params
  return finalize(view(state.next_use).astype(jnp.float32), meta)


def _min_update(state: MinState, meta, access: Access, params):
  del meta, params
  return MinState(put(state.next_use, access.slot, access.next_use,
                      access.hit | access.inserted))


def _min_admit(state: MinState, meta, access: Access, victim, params):
  """MIN with bypass: a block whose next use is no earlier than the victim's is not cached."""
  del params
  return (meta.filled[victim] == 0) | (access.next_use < get(state.next_use, victim))


MIN = register(Policy(name="min", init=_min_init, score=_min_score, update=_min_update,
                      oracle=True))
MIN_BYPASS = register(Policy(name="min-bypass", init=_min_init, score=_min_score,
                             update=_min_update, admit=_min_admit, oracle=True))
