"""XLA:CPU's loop kernels: one compiled kernel per ``lax.scan`` instead of one task per op.

XLA:CPU runs a compiled program as a graph of tasks ("thunks"), one per fused op; a
``while`` loop (``lax.scan``, ``fori_loop``) runs its body's graph once per iteration.
A scan whose body holds a few hundred small ops, as the cache simulator's does (one
reference per step: lookups, a policy's score of a few candidates, its bookkeeping),
then spends its time dispatching tasks, not computing: about 20 us per step for
``classfreq`` at 6,144 pages on this project's 2-core machine.

XLA has a pass that compiles such a loop, body and all, into a single kernel
(``SmallWhileLoopHoistingPass``), applied to loops whose ops touch fewer bytes than
its threshold, 1 kB by default, which keeps it off for any loop carrying a block
table. ``enable_loop_kernels`` raises the threshold through ``$XLA_FLAGS``; it takes
effect only when set before JAX's CPU backend starts (the first array or compile of
the process), so the ``kvjax`` commands and the benchmarks set it at start-up (the
tests do not yet: one int2 write/attend bit-equality test differs under it), and a
program of yours can do the same. Measured on the 2-core machine (20,066 references,
6,144 pages, ``sample=16``, min of 3): the sampled simulator's step 1.8 -> 0.3 us for
``lru`` and 22.8 -> 3.2 us for ``classfreq``, the same hit flags; a SmolLM2 decode step
was no slower (``benchmarks/policies.py`` reports the sampled path beside the exact one).

Ops the pass cannot put in a kernel (scatter, sort, custom calls) keep the whole loop
in the task graph, so the simulator's hot loops avoid them when the kernels are on
(``loop_kernels_on``; e.g. ``kvjax.policies.scoring.settle``). ``vmap`` turns a write at
a per-run index into a scatter, so with the kernels on the sampled simulator runs
several capacities or parameter sets one scan after another (``lax.map``) instead of one
vmapped scan: a 16-configuration ``autoclass`` sweep (20,000 references, 6,144 pages,
``sample=64``) 7.1 -> 4.3 s, the same hit flags (the scoring path stays vmapped: its
O(P) score per miss batches well).
"""

from __future__ import annotations

import os
import re
from typing import MutableMapping, Optional

LOOP_KERNEL_OPTION = "xla_cpu_small_while_loop_byte_threshold"
LOOP_KERNEL_BYTES = 1 << 30  # any loop of ops the pass can compile
_EXTRA = "--xla_backend_extra_options"


def loop_kernel_flag(threshold: int = LOOP_KERNEL_BYTES) -> str:
  """The ``$XLA_FLAGS`` entry that turns loop kernels on for loops touching fewer than
  ``threshold`` bytes.

  >>> loop_kernel_flag(4096)
  '--xla_backend_extra_options=xla_cpu_small_while_loop_byte_threshold=4096'
  """
  if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
    raise ValueError(f"threshold must be a non-negative int of bytes, got {threshold!r}")
  return f"{_EXTRA}={LOOP_KERNEL_OPTION}={threshold}"


def loop_kernel_threshold(environ: Optional[MutableMapping[str, str]] = None) -> Optional[int]:
  """The loop-kernel threshold ``$XLA_FLAGS`` sets, or None when it sets none.

  >>> loop_kernel_threshold({"XLA_FLAGS": loop_kernel_flag(64)})
  64
  >>> loop_kernel_threshold({}) is None
  True
  """
  flags = (os.environ if environ is None else environ).get("XLA_FLAGS", "")
  found = re.findall(LOOP_KERNEL_OPTION + r"=(\d+)", flags)
  return int(found[-1]) if found else None


def loop_kernels_on(environ: Optional[MutableMapping[str, str]] = None) -> bool:
  """Whether ``$XLA_FLAGS`` asks for loop kernels of loops carrying real tables (a
  threshold of at least 1 MB); code that builds hot loops picks its ops by it.

  >>> loop_kernels_on({"XLA_FLAGS": loop_kernel_flag()}), loop_kernels_on({})
  (True, False)
  """
  threshold = loop_kernel_threshold(environ)
  return threshold is not None and threshold >= 1 << 20


def enable_loop_kernels(environ: Optional[MutableMapping[str, str]] = None) -> bool:
  """Add ``loop_kernel_flag()`` to ``$XLA_FLAGS`` unless it already names
  ``--xla_backend_extra_options`` (yours are kept as they are). Call it before JAX's
  backend starts (before the process's first array or compile): XLA reads the flags
  once. Returns ``loop_kernels_on()`` afterwards.

  >>> env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  >>> enable_loop_kernels(env), env["XLA_FLAGS"].split()[0]
  (True, '--xla_force_host_platform_device_count=8')
  >>> enable_loop_kernels({"XLA_FLAGS": _EXTRA + "=other=1"})
  False
  """
  env = os.environ if environ is None else environ
  flags = env.get("XLA_FLAGS", "")
  if _EXTRA not in flags:
    env["XLA_FLAGS"] = (flags + " " + loop_kernel_flag()).strip()
  return loop_kernels_on(env)
