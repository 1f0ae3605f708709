"""Quantized pages: quantize/dequantize throughput, decode attention, compression.

All timings run the CPU path (jnp references under jit) unless ``--pallas`` is
given, and every ratio is against a baseline measured in the same run:

* ``quantize_over_copy`` / ``dequantize_over_copy``: time to quantize (or
  dequantize) a batch of bf16 pages over the time of a plain copy of the same
  bf16 bytes (1.0 = as fast as a copy).
* ``attend_ratio``: decode attention over int8 / int4 pages over the same
  attention over bf16 pages (same page table, same lengths).
* ``compression``: bf16 bytes per cached token (K+V, all layers) over the
  preset's, scales included (``kvjax.layout.compression``).

``--device-check`` (GPU/TPU only): compiles the Pallas kernels for real,
checks them against the jnp references on random data, and reports their
bandwidth against a device-to-device copy of the same bytes (JSON
``device_check``); a kernel that fails to lower is reported, not fatal.

Usage: python benchmarks/quant.py [--quick] [--out FILE] [--pallas] [--device-check]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.kernels import ops
from kvjax.kernels import paged_attention as pa
from kvjax.kernels import quantize as kq
import common  # benchmarks/common.py: machine description, results writer
from kvjax import layout
from kvjax import quant
from kvjax.layout.pages import Pages

SMOL = dict(num_layers=30, num_kv_heads=3, head_dim=64)   # SmolLM2-135M's KV shapes
PAGE = 16
THROUGHPUT_PRESETS = ("int8", "fp8", "int4", "int2-r64")
ATTEND_PRESETS = ("int8", "int4")


def timeit(fn, *args, reps: int) -> float:
  """Best seconds of ``reps`` calls of ``fn(*args)`` after a warm-up (compile) call.

  The best, not the median: the CPU machine is shared, and other jobs only add time.
  """
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return min(times)


def bench_throughput(num_pages: int, reps: int, pallas: bool) -> dict:
  h, d = SMOL["num_kv_heads"], SMOL["head_dim"]
  x = jnp.asarray(np.random.default_rng(0).standard_normal((num_pages, PAGE, h, d)),
                  jnp.bfloat16)
  nbytes = x.size * x.dtype.itemsize
  copy = jax.jit(lambda a: a.copy())
  t_copy = timeit(copy, x, reps=reps)
  out = {"input_bytes": nbytes, "copy_s": t_copy, "copy_gbps": nbytes / t_copy / 1e9}
  for name in THROUGHPUT_PRESETS:
    for role, spec in zip(("k", "v"), layout.PRESETS[name]):
      q = jax.jit(lambda a, spec=spec: ops.quantize_pages(a, spec, pallas=pallas))
      pages = q(x)
      dq = jax.jit(lambda p, spec=spec: ops.dequantize_pages(p, spec, pallas=pallas))
      t_q, t_d = timeit(q, x, reps=reps), timeit(dq, pages, reps=reps)
      out[f"{name}/{role}"] = {
          "spec": str(spec), "quantize_s": t_q, "dequantize_s": t_d,
          "quantize_gbps": nbytes / t_q / 1e9, "dequantize_gbps": nbytes / t_d / 1e9,
          "quantize_over_copy": t_q / t_copy, "dequantize_over_copy": t_d / t_copy}
  return out


def bench_attend(batch: int, seq_len: int, reps: int, pallas: bool) -> dict:
  h, d, g = SMOL["num_kv_heads"], SMOL["head_dim"], 3
  m = seq_len // PAGE
  num_pages = batch * m
  rng = np.random.default_rng(1)
  kf = jnp.asarray(rng.standard_normal((num_pages, PAGE, h, d)), jnp.float32)
  vf = jnp.asarray(rng.standard_normal((num_pages, PAGE, h, d)), jnp.float32)
  q = jnp.asarray(rng.standard_normal((batch, h * g, d)), jnp.float32)
  table = jnp.asarray(rng.permutation(num_pages).reshape(batch, m), jnp.int32)
  lens = jnp.full((batch,), seq_len - PAGE // 2, jnp.int32)   # a partial last page

  def run(k_spec, v_spec, kp, vp):
    f = jax.jit(lambda q, kp, vp: ops.paged_attention(q, kp, vp, table, lens, k_spec, v_spec,
                                                      pallas=pallas))
    return timeit(f, q, kp, vp, reps=reps)

  bf16 = layout.QuantSpec()
  t_base = run(bf16, bf16, Pages(data=kf.astype(jnp.bfloat16)),
               Pages(data=vf.astype(jnp.bfloat16)))
  out = {"batch": batch, "seq_len": seq_len, "q_heads": h * g, "kv_heads": h, "head_dim": d,
         "bf16_s": t_base}
  for name in ATTEND_PRESETS:
    k_spec, v_spec = layout.PRESETS[name]
    # no staging ring here: every page is read from the quantized pool (worst case)
    k_spec, v_spec = (s if s.residual == 0 else s.__class__(**{**s.__dict__, "residual": 0})
                      for s in (k_spec, v_spec))
    t = run(k_spec, v_spec, quant.quantize_pages(kf, k_spec), quant.quantize_pages(vf, v_spec))
    out[name] = {"seconds": t, "attend_ratio": t / t_base}
  return out


def bench_compression() -> dict:
  out = {}
  for name, (k, v) in layout.PRESETS.items():
    dims = dict(**SMOL, page_size=PAGE)
    out[name] = {
        "key_spec": str(k), "value_spec": str(v),
        "bytes_per_token": layout.bytes_per_token(k, **dims) + layout.bytes_per_token(v, **dims),
        "compression": layout.compression(k, v, **dims),
        "staging_bytes_per_seq": layout.staging_bytes_per_seq(k, v, **dims)}
  return out


def device_check(quick: bool, reps: int, sizes=None) -> dict:
  """Pallas kernels compiled for the accelerator vs the references, and their GB/s."""
  if jax.default_backend() == "cpu":
    return {"skipped": "no accelerator (Pallas only interprets on CPU)"}
  h, d = SMOL["num_kv_heads"], SMOL["head_dim"]
  # full size: 400 MB of bf16 pages (several times a GPU's L2), 8192 K+V pages to attend
  n, batch, seq_len = sizes or ((256, 4, 256) if quick else (65536, 32, 4096))
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((n, PAGE, h, d)), jnp.bfloat16)
  nbytes = x.size * 2
  t_copy = timeit(jax.jit(lambda a: a.copy()), x, reps=reps)
  out = {"pages": n, "copy_gbps": nbytes / t_copy / 1e9}
  for name in THROUGHPUT_PRESETS:
    for role, spec in zip(("k", "v"), layout.PRESETS[name]):
      row = out[f"{name}/{role}"] = {"spec": str(spec)}
      try:
        want = jax.jit(lambda a, spec=spec: quant.quantize_pages(a, spec))(x)
        kern_q = jax.jit(lambda a, spec=spec: kq.quantize_pages(a, spec))
        got = kern_q(x)
        differ = lambda a, b: float(np.mean(np.asarray(a.astype(jnp.float32))  # noqa: E731
                                            != np.asarray(b.astype(jnp.float32))))
        row["code_mismatch_frac"] = differ(got.data, want.data)
        row["scale_mismatch_frac"] = differ(got.scale, want.scale)
        kern_d = jax.jit(lambda p, spec=spec: kq.dequantize_pages(p, spec))
        ref_d = quant.dequantize_pages(want, spec)
        row["dequant_max_abs_diff"] = float(jnp.max(jnp.abs(kern_d(want) - ref_d)))
        t_q, t_d = timeit(kern_q, x, reps=reps), timeit(kern_d, want, reps=reps)
        ref_q = jax.jit(lambda a, spec=spec: quant.quantize_pages(a, spec))
        ref_dq = jax.jit(lambda p, spec=spec: quant.dequantize_pages(p, spec))
        t_rq, t_rd = timeit(ref_q, x, reps=reps), timeit(ref_dq, want, reps=reps)
        row.update(quantize_gbps=nbytes / t_q / 1e9, dequantize_gbps=nbytes / t_d / 1e9,
                   quantize_over_copy=t_q / t_copy, dequantize_over_copy=t_d / t_copy,
                   quantize_over_reference=t_q / t_rq, dequantize_over_reference=t_d / t_rd)
      except Exception as e:  # noqa: BLE001  a lowering failure is a result here
        row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
  m = seq_len // PAGE
  kf = jnp.asarray(rng.standard_normal((batch * m, PAGE, h, d)), jnp.float32)
  vf = jnp.asarray(rng.standard_normal((batch * m, PAGE, h, d)), jnp.float32)
  q = jnp.asarray(rng.standard_normal((batch, 3 * h, d)), jnp.float32)
  table = jnp.asarray(rng.permutation(batch * m).reshape(batch, m), jnp.int32)
  lens = jnp.full((batch,), seq_len - PAGE // 2, jnp.int32)
  sink = jnp.asarray(rng.standard_normal((batch, 1, h, d)), jnp.bfloat16)
  # the int2 rows read every page from the pool (no ring); "+sr": with a sink token and
  # keys stored before RoPE (rotated in the kernel), the 2-bit recipe's extra work
  for name in ("bf16",) + ATTEND_PRESETS + ("int2-kbf-r128-s1", "int2-kbf-r128-s1+sr"):
    k_spec, v_spec = layout.PRESETS[name.removesuffix("+sr")]
    extra = dict(k_sink=sink, v_sink=sink, k_rope=10000.0) if name.endswith("+sr") else {}
    row = out[f"attend/{name}"] = {}
    try:
      kp = quant.quantize_pages(kf.astype(jnp.bfloat16), k_spec)
      vp = quant.quantize_pages(vf.astype(jnp.bfloat16), v_spec)
      kern = jax.jit(lambda q, kp, vp, k_spec=k_spec, v_spec=v_spec, extra=extra:
                     pa.paged_attention(q, kp, vp, table, lens, k_spec, v_spec, **extra))
      ref = jax.jit(lambda q, kp, vp, k_spec=k_spec, v_spec=v_spec, extra=extra:
                    pa.paged_attention_reference(q, kp, vp, table, lens, k_spec, v_spec,
                                                 **extra))
      want = ref(q, kp, vp)
      row["max_abs_diff"] = float(jnp.max(jnp.abs(kern(q, kp, vp) - want)))
      t_k, t_r = timeit(kern, q, kp, vp, reps=reps), timeit(ref, q, kp, vp, reps=reps)
      kv_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves((kp, vp)))
      row.update(kernel_s=t_k, reference_s=t_r, kernel_over_reference=t_k / t_r,
                 kv_gbps=kv_bytes / t_k / 1e9)
      if name == "bf16":   # the split size: one program per 8 pages ... per whole sequence
        for pps in (8, 128, m):
          f = jax.jit(lambda q, kp, vp, pps=pps: pa.paged_attention(
              q, kp, vp, table, lens, k_spec, v_spec, pages_per_split=pps))
          row[f"pages_per_split_{pps}_over_reference"] = timeit(f, q, kp, vp, reps=reps) / t_r
    except Exception as e:  # noqa: BLE001
      row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
  return out


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
  ap.add_argument("--out", default=None, help="write the JSON results here")
  ap.add_argument("--pallas", action="store_true",
                  help="time the Pallas kernels (interpreted on CPU: not a speed figure)")
  ap.add_argument("--device-check", action="store_true",
                  help="GPU/TPU: compile the kernels, check them, bandwidth vs copy")
  args = ap.parse_args(argv)
  reps = 3 if args.quick else 20
  info = common.machine()
  print("machine:", json.dumps(info))
  res = {"machine": info, "quick": args.quick, "path": "pallas" if args.pallas else "jnp",
         "page_size": PAGE, "model_shapes": SMOL}
  res["compression"] = bench_compression()
  res["throughput"] = bench_throughput(64 if args.quick else 1024, reps, args.pallas)
  res["attend"] = (bench_attend(2, 256, reps, args.pallas) if args.quick
                   else bench_attend(8, 1024, reps, args.pallas))
  if args.device_check:
    res["device_check"] = device_check(args.quick, reps)
    print("device_check:", json.dumps(res["device_check"], indent=1))
  if args.out:
    common.write_json(args.out, res, indent=1)

  print(f"\n{'preset':<10} {'compression':>11}  {'quant/copy K':>12} {'V':>6}  "
        f"{'dequant/copy K':>14} {'V':>6}  {'attend_ratio':>12}")
  tp, at = res["throughput"], res["attend"]
  for name, c in res["compression"].items():
    row = f"{name:<10} {c['compression']:>10.2f}x"
    if f"{name}/k" in tp:
      k, v = tp[f"{name}/k"], tp[f"{name}/v"]
      row += (f"  {k['quantize_over_copy']:>12.1f} {v['quantize_over_copy']:>6.1f}"
              f"  {k['dequantize_over_copy']:>14.1f} {v['dequantize_over_copy']:>6.1f}")
    else:
      row += " " * 44
    if name in at:
      row += f"  {at[name]['attend_ratio']:>12.2f}"
    print(row)
  print(f"copy: {tp['copy_gbps']:.2f} GB/s of {tp['input_bytes'] / 1e6:.1f} MB bf16; "
        f"bf16 attention {at['bf16_s'] * 1e3:.2f} ms (B={at['batch']}, len={at['seq_len']})")
  return res


if __name__ == "__main__":
  sys.exit(main() and 0)
