"""What every benchmark shares: the machine description and the results writer.

Scripts run as ``python benchmarks/NAME.py``, so this directory is on ``sys.path`` and
they ``import common``.
"""

from __future__ import annotations

import json
import os
import platform

import jax

from kvjax.xla_cpu import enable_loop_kernels
from kvjax.xla_cpu import loop_kernels_on

# As the kvjax commands do: XLA:CPU compiles scans into one kernel (kvjax.xla_cpu). This
# must run before JAX's backend starts, so benchmarks import this module before their
# first array; machine() records whether $XLA_FLAGS asks for it.
enable_loop_kernels()


def machine() -> dict:
  """The machine a result was measured on (one dict for every benchmark's JSON).

  >>> sorted(machine())[:3]
  ['backend', 'cpu_count', 'device']
  """
  return {
      "python": platform.python_version(),
      "platform": platform.platform(),
      "processor": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(),
      "load_average_1m": os.getloadavg()[0],  # a shared machine makes timings noisy
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "device": str(jax.devices()[0]),
      "devices": [str(d) for d in jax.devices()][:2],
      "xla_loop_kernels": loop_kernels_on(),
  }


def write_json(path: str, result: dict, indent: int = 1) -> None:
  """Write ``result`` to ``path`` (creating its folder); numpy scalars become floats."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=indent, default=float)
