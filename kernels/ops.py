"""Entry points that pick the Pallas kernels or the jnp references.

Pallas on GPU/TPU, jnp on CPU (where Pallas only interprets, ~300x slower).
Force either with ``KVJAX_PALLAS=1`` / ``KVJAX_PALLAS=0`` (``auto`` or unset:
by backend), with ``set_use_pallas(True/False/None)``, or per call with
``pallas=True/False``. Forcing Pallas on CPU runs the interpreter. The choice
is made on the host when a function is traced: it is static under jit.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import jax

from kvjax.kernels import paged_attention as pa
from kvjax.kernels import quantize as kq
from kvjax.layout.pages import Pages
from kvjax.layout.spec import QuantSpec
from kvjax.quant import pages as quant_pages

ENV_VAR = "KVJAX_PALLAS"
_ON, _OFF, _AUTO = ("1", "true", "on", "pallas"), ("0", "false", "off", "jnp"), ("", "auto")
_override: Optional[bool] = None


def set_use_pallas(value: Optional[bool]) -> None:
  """Force Pallas (True) or jnp (False) process-wide; None restores the default."""
  global _override
  if value is not None and not isinstance(value, bool):
    raise ValueError(f"set_use_pallas: value must be True, False or None, got {value!r}")
  _override = value


@contextlib.contextmanager
def pallas_forced(value: Optional[bool]):
  """Context manager form of ``set_use_pallas``.

  >>> with pallas_forced(False):
  ...   use_pallas()
  False
  """
  global _override
  old = _override
  set_use_pallas(value)
  try:
    yield
  finally:
    _override = old


def use_pallas(backend: Optional[str] = None) -> bool:
  """Whether the quantization ops run as Pallas kernels.

  Order: ``set_use_pallas`` override, then ``$KVJAX_PALLAS``, then the backend
  (``gpu``/``tpu`` -> True, ``cpu`` -> False).

  >>> isinstance(use_pallas(), bool)
  True
  """
  if _override is not None:
    return _override
  env = os.environ.get(ENV_VAR, "").strip().lower()
  if env in _ON:
    return True
  if env in _OFF:
    return False
  if env not in _AUTO:
    raise ValueError(f"${ENV_VAR} must be one of {_ON + _OFF + _AUTO}, got {env!r}")
  return (backend or jax.default_backend()) in ("gpu", "tpu", "cuda", "rocm")


def _interpret() -> bool:
  return jax.default_backend() == "cpu"


def _choose(pallas: Optional[bool]) -> bool:
  return use_pallas() if pallas is None else pallas


def quantize_pages(x: jax.Array, spec: QuantSpec, *, pallas: Optional[bool] = None) -> Pages:
  """``quantize_pages`` on the selected path (same result, bit for bit).

  >>> quantize_pages(jax.numpy.ones((4, 1, 8)), QuantSpec(bits=4), pallas=False).data.shape
  (4, 1, 4)
  """
  if _choose(pallas):
    return kq.quantize_pages(x, spec, interpret=_interpret())
  return _jnp_quantize(x, spec)


def dequantize_pages(pages: Pages, spec: QuantSpec, *, pallas: Optional[bool] = None):
  """``dequantize_pages`` on the selected path: float32 ``[..., S, H, D]``."""
  if _choose(pallas):
    return kq.dequantize_pages(pages, spec, interpret=_interpret())
  return _jnp_dequantize(pages, spec)


def paged_attention(q, k_pages: Pages, v_pages: Pages, page_table, kv_lens, k_spec: QuantSpec,
                    v_spec: QuantSpec, *, k_stage=None, v_stage=None, k_sink=None,
                    v_sink=None, k_rope: float = 0.0, pallas: Optional[bool] = None):
  """Paged decode attention over quantized pages on the selected path.

  Arguments as ``kvjax.kernels.paged_attention.paged_attention_reference``;
  returns float32 ``[B, Hq, D]``.
  """
  if _choose(pallas):
    return pa.paged_attention(q, k_pages, v_pages, page_table, kv_lens, k_spec, v_spec,
                              k_stage=k_stage, v_stage=v_stage, k_sink=k_sink, v_sink=v_sink,
                              k_rope=k_rope, interpret=_interpret())
  return _jnp_attention(q, k_pages, v_pages, page_table, kv_lens, k_spec, v_spec,
                        k_stage=k_stage, v_stage=v_stage, k_sink=k_sink, v_sink=v_sink,
                        k_rope=k_rope)


_jnp_quantize = jax.jit(quant_pages.quantize_pages, static_argnames="spec")
_jnp_dequantize = jax.jit(quant_pages.dequantize_pages, static_argnames="spec")
_jnp_attention = jax.jit(pa.paged_attention_reference,
                         static_argnames=("k_spec", "v_spec", "k_rope"))
