"""The docstring examples of the public modules run and give what they show."""

import doctest
import importlib
import pkgutil

import pytest

import kvjax

MODULES = sorted(m.name for m in pkgutil.walk_packages(kvjax.__path__, "kvjax.")
                 if m.name not in ("kvjax.cli",))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
