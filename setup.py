"""Package discovery (the rest of the metadata is in pyproject.toml).

kvjax ships three source trees under one import name: ``kvjax/`` itself,
``kernels/`` as ``kvjax.kernels`` and ``models/`` as ``kvjax.models``. Every
package below them is found by ``find_packages``, so a new subpackage cannot
be left out of the wheel (``tests/test_wheel.py`` builds and imports it).
"""

from setuptools import find_packages
from setuptools import setup

_MAPPED = {"kvjax.kernels": "kernels", "kvjax.models": "models"}

packages = find_packages(include=["kvjax", "kvjax.*"])
for name, folder in _MAPPED.items():
  packages += [name] + [f"{name}.{sub}" for sub in find_packages(where=folder)]

setup(packages=packages, package_dir=_MAPPED)
