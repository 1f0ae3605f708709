"""Pressure levels and evict-ahead counts against a plain-Python reading of the rules."""

import math

import jax
import jax.numpy as jnp
import pytest

from kvjax import pressure


def py_level(occ, total, thresholds):
  return sum(occ * 100 >= round(t * 100) * total for t in thresholds)


def py_evict(occ, total, cfg):
  lv = py_level(occ, total, cfg.thresholds)
  if lv == 0:
    return 0
  keep = math.floor(cfg.targets[lv - 1] * total + 1e-4)
  need = max(occ - keep, 0)
  return min(-(-need // cfg.batch) * cfg.batch, occ)


@pytest.mark.parametrize("cfg", [pressure.DEVICE, pressure.HOST,
                                 pressure.PressureConfig((0.5, 0.6, 0.99), (0.4, 0.5, 0.9), 3)])
def test_levels_and_evict_ahead_match_python(cfg):
  lv = jax.jit(pressure.level, static_argnums=2)
  ev = jax.jit(pressure.evict_ahead, static_argnums=2)
  for total in (100, 640):
    for occ in range(total + 1):
      assert int(lv(occ, total, cfg)) == py_level(occ, total, cfg.thresholds), (occ, total)
      assert int(ev(occ, total, cfg)) == py_evict(occ, total, cfg), (occ, total)


def test_device_defaults_are_70_85_95():
  assert [pressure.level_name(pressure.level(n, 1000)) for n in (699, 700, 850, 950)] == [
      "low", "medium", "high", "critical"]


def test_vmaps_over_pools():
  occ = jnp.array([10, 72, 90, 99])
  assert pressure.level(occ, 100).tolist() == [0, 1, 2, 3]
  assert jax.vmap(lambda o: pressure.evict_ahead(o, 100))(occ).tolist() == [
      py_evict(int(o), 100, pressure.DEVICE) for o in occ]


def test_requantize_from_high_by_default():
  assert [bool(pressure.wants_requantize(lv)) for lv in range(4)] == [False, False, True, True]


@pytest.mark.parametrize("kw,match", [
    (dict(thresholds=(0.9, 0.8, 0.95)), "thresholds"),
    (dict(thresholds=(0.7, 0.85, 1.2)), "thresholds"),
    (dict(targets=(0.75, 0.75, 0.85)), "targets"),
    (dict(batch=0), "batch"),
    (dict(requantize_from=7), "requantize_from"),
])
def test_bad_config_raises(kw, match):
  with pytest.raises(ValueError, match=match):
    pressure.PressureConfig(**kw)
