"""Pallas kernels against their jnp references (references are checked in test_quant.py).

``_KernelChecks`` holds the checks; ``TestKernelsInterpret`` runs them in the
Pallas interpreter on CPU (tiny grids: ~6 ms a grid step plus a compile each),
``TestKernelsCompiled`` on a GPU/TPU when one is present.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.kernels import ops
from kvjax.kernels import paged_attention as pa
from kvjax.kernels import quantize as kq
from kvjax import layout
from kvjax import quant
from kvjax.layout.pages import Pages
from kvjax.layout.spec import QuantSpec

QUANT_SPECS = [
    QuantSpec(bits=8, kind="fp8"),
    QuantSpec(bits=4, symmetric=False, group_size=8),                 # g < packed width 16
    QuantSpec(bits=2, axis="channel", symmetric=False, group_size=4,  # 2 token groups / page
              scale_dtype="log8"),
    QuantSpec(bits=4, axis="channel", symmetric=False, scale_dtype="log8"),  # 1 group / page
    QuantSpec(bits=2, axis="channel", symmetric=False, scale_dtype="log8",  # non-uniform levels
              zero_dtype="bfloat16", levels=layout.NUQ2_LEVELS),
    QuantSpec(bits=2, symmetric=False, group_size=16, scale_dtype="log8",  # bf16 minimum
              zero_dtype="bfloat16"),
    QuantSpec(bits=2, axis="channel", symmetric=False, scale_dtype="float16",  # f16 minimum
              zero_dtype="float16"),                                         # and f16 scale
]

ATTN_SPECS = [
    (QuantSpec(bits=4, axis="channel", scale_dtype="log8"),
     QuantSpec(bits=8, group_size=16, scale_dtype="float16")),
    (QuantSpec(bits=2, axis="channel", symmetric=False, residual=8),
     QuantSpec(bits=2, symmetric=False, residual=8)),
    (QuantSpec(bits=2, axis="channel", symmetric=False, scale_dtype="log8",
               zero_dtype="bfloat16", residual=8),
     QuantSpec(bits=2, symmetric=False, scale_dtype="log8", zero_dtype="bfloat16", residual=8)),
    (QuantSpec(bits=2, axis="channel", symmetric=False, scale_dtype="float16",
               zero_dtype="float16", residual=8),
     QuantSpec(bits=2, symmetric=False, group_size=16, scale_dtype="log8", zero_dtype="float16",
               residual=8)),
]


def _x(seed, shape):
  x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  x[..., 3] += 6.0   # an offset outlier channel
  return jnp.asarray(x)


class _KernelChecks:
  INTERPRET = False

  @pytest.mark.parametrize("spec", QUANT_SPECS, ids=str)
  def test_quantize_dequantize_match_reference(self, spec):
    x = _x(0, (1, 8, 2, 32))             # grid (1 page, 2 heads)
    got = kq.quantize_pages(x, spec, interpret=self.INTERPRET)
    want = quant.quantize_pages(x, spec)
    # same formulas, same float32 ops: bit-exact codes, scales and zeros
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(
        np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32))), got, want)
    got_x = kq.dequantize_pages(want, spec, interpret=self.INTERPRET)
    if spec.zero_is_min:
      # scale * code + min: the compiler may fuse the multiply-add into one FMA in
      # one program and not the other: one rounding of scale * code apart at most
      ref = np.asarray(quant.dequantize_pages(want, spec))
      np.testing.assert_allclose(got_x, ref, rtol=0, atol=2 ** -23 * float(np.abs(ref).max()))
    else:
      np.testing.assert_array_equal(got_x, quant.dequantize_pages(want, spec))

  @pytest.mark.parametrize("k_spec, v_spec, pages_per_split, sink, k_rope",
                           [(k, v, None, 0, 0.0) for k, v in ATTN_SPECS]
                           + [(*ATTN_SPECS[1], 1, 0, 0.0), (*ATTN_SPECS[2], 2, 0, 0.0),
                              (*ATTN_SPECS[3], 2, 0, 0.0),
                              (*ATTN_SPECS[0], 1, 3, 0.0), (*ATTN_SPECS[0], None, 0, 100.0),
                              (*ATTN_SPECS[2], 1, 1, 100.0),
                              (QuantSpec(**{**ATTN_SPECS[2][0].__dict__,   # the 2-bit recipe
                                            "levels": layout.NUQ2_LEVELS}),
                               ATTN_SPECS[2][1], 2, 1, 100.0),
                              (QuantSpec(bits=8), QuantSpec(bits=8), None, 0, 100.0)],
                           ids=lambda s: f"{s.bits}b{s.axis}-{s.zero_dtype}"
                           if isinstance(s, QuantSpec) else f"{s}")
  def test_paged_attention_matches_reference(self, k_spec, v_spec, pages_per_split, sink,
                                             k_rope):
    """Whole sequences in one program, and split over programs (1 or 2 pages
    each, so splits end mid-window and the merge sees empty splits); with
    ``sink`` the first tokens come from full-precision rows; with ``k_rope``
    keys are rotated after dequantization (packed halves, and an unpacked
    spec whose segments are cut at D/2)."""
    b, hq, h, d, s, p = 3, 4, 2, 32, 8, 5
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((b, hq, d)), jnp.float32)
    kp = quant.quantize_pages(_x(2, (p, s, h, d)), k_spec)
    vp = quant.quantize_pages(_x(3, (p, s, h, d)), v_spec)
    table = jnp.array([[4, 0, 2], [1, 3, -1], [-1, -1, -1]], jnp.int32)
    lens = jnp.array([21, 9, 0], jnp.int32)   # partial last pages; an unused -1; an empty one
    kw = {}
    if k_spec.residual:
      ns = layout.staging_pages(k_spec, v_spec, s)
      kw = dict(k_stage=_x(4, (b, ns, s, h, d)), v_stage=_x(5, (b, ns, s, h, d)))
    if sink:
      kw.update(k_sink=_x(6, (b, sink, h, d)), v_sink=_x(7, (b, sink, h, d)))
    got = pa.paged_attention(q, kp, vp, table, lens, k_spec, v_spec, interpret=self.INTERPRET,
                             pages_per_split=pages_per_split, k_rope=k_rope, **kw)
    want = pa.paged_attention_reference(q, kp, vp, table, lens, k_spec, v_spec, k_rope=k_rope,
                                        **kw)
    # float32 online softmax vs one-shot softmax: summation order only
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[2], 0.0)


class TestKernelsInterpret(_KernelChecks):
  INTERPRET = True


@pytest.mark.skipif(jax.default_backend() == "cpu", reason="Pallas compiles on GPU/TPU only")
class TestKernelsCompiled(_KernelChecks):
  INTERPRET = False


def test_reference_reads_sink_rows_for_the_first_tokens():
  """The reference with a sink equals the reference on pages whose first rows
  hold the sink values unquantized (a bf16 pool with them written in)."""
  spec = QuantSpec()
  b, h, d, s, p = 2, 1, 8, 4, 3
  k, v = _x(8, (p, s, h, d)), _x(9, (p, s, h, d))
  ks, vs = _x(10, (b, 2, h, d)), _x(11, (b, 2, h, d))
  table = jnp.array([[2, 0], [1, -1]], jnp.int32)
  lens = jnp.array([7, 3], jnp.int32)
  q = _x(12, (b, 2, d))
  got = pa.paged_attention_reference(q, Pages(data=k), Pages(data=v), table, lens, spec, spec,
                                     k_sink=ks, v_sink=vs)
  want = []
  for i in range(b):   # each sequence alone, its first page's first two rows replaced
    first = int(table[i, 0])
    ki, vi = k.at[first, :2].set(ks[i]), v.at[first, :2].set(vs[i])
    want.append(pa.paged_attention_reference(q[i:i + 1], Pages(data=ki), Pages(data=vi),
                                             table[i:i + 1], lens[i:i + 1], spec, spec))
  np.testing.assert_allclose(got, jnp.concatenate(want), rtol=1e-6, atol=1e-6)


def test_reference_rotates_keys_stored_before_rope():
  """With ``k_rope`` the reference equals the plain reference on keys rotated
  by hand (each page's rows at their sequence positions, kvjax.rope.rope)."""
  from kvjax.rope import rope
  spec = QuantSpec()
  h, d, s, p = 1, 8, 4, 3
  k, v = _x(13, (p, s, h, d)), _x(14, (p, s, h, d))
  table = jnp.array([[2, 0]], jnp.int32)
  lens = jnp.array([7], jnp.int32)
  q = _x(15, (1, 2, d))
  got = pa.paged_attention_reference(q, Pages(data=k), Pages(data=v), table, lens, spec, spec,
                                     k_rope=100.0)
  kr = k
  for j, page in enumerate(table[0].tolist()):   # page j holds positions j*S .. j*S + S - 1
    pos = jnp.arange(j * s, (j + 1) * s)[None]
    kr = kr.at[page].set(rope(k[page][None], pos, 100.0)[0])
  want = pa.paged_attention_reference(q, Pages(data=kr), Pages(data=v), table, lens, spec, spec)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- GPU lowering


def _lower_for_cuda(fn, *args):
  """StableHLO text of ``fn`` lowered for CUDA from this (CPU) machine."""
  from jax import export
  triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
  return export.export(jax.jit(fn), platforms=("cuda",), disabled_checks=[triton])(
      *args).mlir_module()


@pytest.fixture
def lowering_for_gpu(monkeypatch):
  """Kernels pick their GPU compiler params as on a GPU machine."""
  pytest.importorskip("jax._src.pallas.triton.pallas_call_registration")
  real = kq.compiler_params
  monkeypatch.setattr(kq, "compiler_params", lambda interpret=False: real(interpret, "gpu"))


GPU_PRESETS = ("int8", "fp8", "int4", "int2-r64", "int2-kmin-r128", "int2-nuq-r128-s1")
# not presets: the float16 minimum and float16 scales (Triton has no float16 nextafter)
GPU_SPECS = {
    "int2-kmin-f16-r128": (
        QuantSpec(bits=2, axis="channel", symmetric=False, scale_dtype="float16",
                  zero_dtype="float16", residual=128),
        QuantSpec(bits=2, symmetric=False, scale_dtype="float16", zero_dtype="float16",
                  residual=128)),
}


@pytest.mark.parametrize("name", GPU_PRESETS + tuple(GPU_SPECS))
def test_kernels_lower_to_triton(name, lowering_for_gpu):
  """Every kernel lowers through Pallas's Triton path (which lacks some primitives:
  ``round``, in-register ``slice``, float16 ``nextafter``) with odd pool sizes and
  SmolLM2's head shape. Compiling and running needs the GPU
  (``benchmarks/quant.py --device-check``)."""
  k_spec, v_spec = GPU_SPECS[name] if name in GPU_SPECS else layout.PRESETS[name]
  x = jax.ShapeDtypeStruct((37, 16, 3, 64), jnp.bfloat16)
  for spec in (k_spec, v_spec):
    pages = jax.eval_shape(lambda a, spec=spec: quant.quantize_pages(a, spec), x)
    for fn, arg in ((lambda a, spec=spec: kq.quantize_pages(a, spec), x),
                    (lambda p, spec=spec: kq.dequantize_pages(p, spec), pages)):
      assert "__gpu$xla.gpu.triton" in _lower_for_cuda(fn, arg)
  b, m = 3, 5
  kp, vp = (jax.eval_shape(lambda a, s=s: quant.quantize_pages(a, s), x) for s in (k_spec, v_spec))
  args = [jax.ShapeDtypeStruct((b, 9, 64), jnp.float32), kp, vp,
          jax.ShapeDtypeStruct((b, m), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32)]
  names = []
  if layout.needs_staging(k_spec, v_spec):
    ns = layout.staging_pages(k_spec, v_spec, 16)
    args += [jax.ShapeDtypeStruct((b, ns, 16, 3, 64), jnp.float32)] * 2
    names += ["k_stage", "v_stage"]
  if name.startswith("int2"):   # with a sink too
    args += [jax.ShapeDtypeStruct((b, 1, 3, 64), jnp.bfloat16)] * 2
    names += ["k_sink", "v_sink"]
  text = _lower_for_cuda(   # int2 presets: keys stored before RoPE as well
      lambda q, k, v, t, n, *more: pa.paged_attention(
          q, k, v, t, n, k_spec, v_spec, k_rope=10000.0 if name.startswith("int2") else 0.0,
          **dict(zip(names, more))), *args)
  assert "__gpu$xla.gpu.triton" in text and "paged_attention" in text


# ----------------------------------------------------------------------------- host checks


def test_kernel_rejects_groups_that_do_not_nest():
  spec = QuantSpec(bits=4, group_size=16)    # packed width 48 // 2 = 24; 16 and 24 do not nest
  with pytest.raises(ValueError, match="must divide one another"):
    kq.quantize_pages(jnp.ones((1, 4, 1, 48)), spec, interpret=True)


def test_attention_rejects_bad_shapes():
  spec = QuantSpec(bits=4)
  kp = quant.quantize_pages(jnp.ones((2, 4, 1, 8)), spec)
  with pytest.raises(ValueError, match="page_table must be"):
    pa.paged_attention(jnp.ones((2, 1, 8)), kp, kp, jnp.zeros((1, 2), jnp.int32),
                       jnp.array([1, 1]), spec, spec, interpret=True)
  with pytest.raises(ValueError, match="k_pages.data last axis must be 4"):
    pa.paged_attention(jnp.ones((1, 1, 8)), Pages(data=jnp.ones((2, 4, 1, 8))), kp,
                       jnp.zeros((1, 1), jnp.int32), jnp.array([1]), spec, spec, interpret=True)


# ----------------------------------------------------------------------------- selector


def test_use_pallas_selection(monkeypatch):
  monkeypatch.delenv(ops.ENV_VAR, raising=False)
  assert ops.use_pallas("gpu") and ops.use_pallas("tpu") and not ops.use_pallas("cpu")
  monkeypatch.setenv(ops.ENV_VAR, "1")
  assert ops.use_pallas("cpu")
  monkeypatch.setenv(ops.ENV_VAR, "jnp")
  assert not ops.use_pallas("gpu")
  with ops.pallas_forced(True):
    assert ops.use_pallas("cpu")
  assert not ops.use_pallas("gpu")
  monkeypatch.setenv(ops.ENV_VAR, "maybe")
  with pytest.raises(ValueError, match="KVJAX_PALLAS must be one of"):
    ops.use_pallas()


def test_dispatch_paths_agree_and_compile_once(monkeypatch):
  monkeypatch.delenv(ops.ENV_VAR, raising=False)
  spec = QuantSpec(bits=4, symmetric=False)
  x = _x(7, (1, 4, 1, 8))
  a = ops.quantize_pages(x, spec, pallas=False)
  b = ops.quantize_pages(x, spec, pallas=True)   # interpreter on CPU
  jax.tree.map(np.testing.assert_array_equal, a, b)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def attend(q, k, v, lens):
    return ops.paged_attention(q, k, v, jnp.zeros((1, 1), jnp.int32), lens, spec, spec)

  attend(jnp.ones((1, 1, 8)), a, a, jnp.array([3]))
  attend(jnp.zeros((1, 1, 8)), a, a, jnp.array([4]))   # new values: no retrace
