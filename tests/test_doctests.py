"""The docstring examples of the public modules run and give what they show."""

import doctest
import importlib
import pkgutil

import pytest

import kvjax
import kvjax.kernels
import kvjax.models

MODULES = sorted({m.name for pkg in (kvjax, kvjax.kernels, kvjax.models)
                  for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")}
                 - {"kvjax.cli", "kvjax.sim.cli", "kvjax.__main__"})


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0, f"{name} has no docstring example (every public module shows one)"
  assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
