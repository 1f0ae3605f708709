"""Eviction policies as pure scoring functions over page metadata.

A policy is a ``Policy`` (keyword-built, frozen; optax-style: configuration in the
closure, arrays in the state) of pure functions that all take the policy's state first:

* ``init(num_pages) -> state``: the policy's own history (a small pytree; ``()`` if none).
* ``score(state, meta, clock, params) -> float32[P]``: higher = evict first; pages with
  ``ref_count > 0`` score ``-inf`` (never candidates), empty pages ``+inf``.
* ``update(state, meta, access, params) -> state``: after each reference (``Access``).
* ``admit(state, meta, access, victim, params) -> bool[]`` or None: may a missing block
  take the victim's page? (None = always.) A declined block bypasses the cache.

An ``Admission`` is an admission filter on its own (``init``, ``update``, ``admit``);
``with_admission(policy, admission)`` composes any policy with any filter (TinyLFU:
``with_tinylfu``). Parameters are declared as ``defaults`` and ``Bound``s.

The same functions run in the real cache and in ``kvjax.sim``. ``params`` is a dict of
float32 scalars (so ``vmap`` can sweep them, and the cache keeps them in its state);
``make_params`` validates it.

Modules: ``contract`` (``Policy``, ``Admission``, ``Bound``, the registry,
``make_params``, ``with_admission``, ``score_and_evict``), ``scoring`` (``Access`` and
shared helpers), ``classic`` (LRU, FIFO, LRU-2, LFU, S3-FIFO, weighted, GreedyDual,
LeCaR), ``frequency`` (TinyLFU, ``freqlru``, ``autofreq``, ``classfreq``,
``autoclass``), ``learned`` (a trained next-use predictor, ``kvjax.learned``), ``oracle``
(MIN). Each module registers its own policies; importing
them here, in this order, fixes the order of ``POLICIES``.

>>> get_policy("lru").oracle, get_policy("min").oracle   # the cache takes online policies only
(False, True)
>>> sorted(make_params(get_policy("lru")))               # lru has no parameters
[]
"""

from __future__ import annotations

from kvjax.policies.classic import FIFO
from kvjax.policies.classic import FifoState
from kvjax.policies.classic import GREEDYDUAL
from kvjax.policies.classic import greedydual_state
from kvjax.policies.classic import GreedyDualState
from kvjax.policies.classic import LECAR
from kvjax.policies.classic import LecarState
from kvjax.policies.classic import LFU
from kvjax.policies.classic import lfu_state
from kvjax.policies.classic import LfuState
from kvjax.policies.classic import LRU
from kvjax.policies.classic import LRU2
from kvjax.policies.classic import Lru2State
from kvjax.policies.classic import lru_score
from kvjax.policies.classic import recompute_cost
from kvjax.policies.classic import S3FIFO
from kvjax.policies.classic import s3fifo_state
from kvjax.policies.classic import S3FifoState
from kvjax.policies.classic import WEIGHTED
from kvjax.policies.classic import weighted_score
from kvjax.policies.contract import Admission
from kvjax.policies.contract import AdmittedState
from kvjax.policies.contract import Bound
from kvjax.policies.contract import FRACTION
from kvjax.policies.contract import get_policy
from kvjax.policies.contract import make_params
from kvjax.policies.contract import no_state
from kvjax.policies.contract import no_update
from kvjax.policies.contract import POLICIES
from kvjax.policies.contract import Policy
from kvjax.policies.contract import POSITIVE
from kvjax.policies.contract import register
from kvjax.policies.contract import score_and_evict
from kvjax.policies.contract import stateless
from kvjax.policies.contract import WEIGHT
from kvjax.policies.contract import with_admission
from kvjax.policies.frequency import auto_credit
from kvjax.policies.frequency import AUTOCLASS
from kvjax.policies.frequency import autoclass_credits
from kvjax.policies.frequency import AUTOCLASS_SCALES
from kvjax.policies.frequency import AUTOFREQ
from kvjax.policies.frequency import AutoFreqLruState
from kvjax.policies.frequency import class_bonus
from kvjax.policies.frequency import CLASS_PRIOR
from kvjax.policies.frequency import CLASSFREQ
from kvjax.policies.frequency import classfreq_state
from kvjax.policies.frequency import ClassFreqState
from kvjax.policies.frequency import first_seen_class
from kvjax.policies.frequency import FREQLRU
from kvjax.policies.frequency import freqlru_state
from kvjax.policies.frequency import FreqLruState
from kvjax.policies.frequency import GHOST_FACTOR
from kvjax.policies.frequency import MINI_CREDITS
from kvjax.policies.frequency import MINI_RATE
from kvjax.policies.frequency import REUSE_CLASSES
from kvjax.policies.frequency import TINYLFU
from kvjax.policies.frequency import TINYLFU_ADMISSION
from kvjax.policies.frequency import TINYLFU_S3FIFO
from kvjax.policies.frequency import TinyLfuState
from kvjax.policies.frequency import with_tinylfu
from kvjax.policies.learned import features_of
from kvjax.policies.learned import LEARNED
from kvjax.policies.learned import learned_policy
from kvjax.policies.learned import LearnedState
from kvjax.policies.learned import rank_blocks
from kvjax.policies.learned import with_model
from kvjax.policies.oracle import MIN
from kvjax.policies.oracle import MIN_BYPASS
from kvjax.policies.oracle import min_state
from kvjax.policies.oracle import MinState
from kvjax.policies.scoring import Access

__all__ = [
    "AUTOCLASS",
    "AUTOCLASS_SCALES",
    "AUTOFREQ",
    "Access",
    "Admission",
    "AdmittedState",
    "AutoFreqLruState",
    "Bound",
    "CLASSFREQ",
    "CLASS_PRIOR",
    "ClassFreqState",
    "FIFO",
    "FRACTION",
    "FREQLRU",
    "FifoState",
    "FreqLruState",
    "GHOST_FACTOR",
    "GREEDYDUAL",
    "GreedyDualState",
    "LEARNED",
    "LECAR",
    "LFU",
    "LRU",
    "LRU2",
    "LecarState",
    "LearnedState",
    "LfuState",
    "Lru2State",
    "MIN",
    "MINI_CREDITS",
    "MINI_RATE",
    "MIN_BYPASS",
    "MinState",
    "POLICIES",
    "POSITIVE",
    "Policy",
    "REUSE_CLASSES",
    "S3FIFO",
    "S3FifoState",
    "TINYLFU",
    "TINYLFU_ADMISSION",
    "TINYLFU_S3FIFO",
    "TinyLfuState",
    "WEIGHT",
    "WEIGHTED",
    "auto_credit",
    "autoclass_credits",
    "class_bonus",
    "classfreq_state",
    "first_seen_class",
    "features_of",
    "freqlru_state",
    "get_policy",
    "greedydual_state",
    "learned_policy",
    "lfu_state",
    "lru_score",
    "make_params",
    "min_state",
    "no_state",
    "no_update",
    "rank_blocks",
    "recompute_cost",
    "register",
    "s3fifo_state",
    "score_and_evict",
    "stateless",
    "weighted_score",
    "with_admission",
    "with_model",
    "with_tinylfu",
]
