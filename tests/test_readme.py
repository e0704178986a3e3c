"""README promises: the Python API snippet runs, and CI runs README's install and test commands."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_python_api_snippet_runs(capsys, tmp_path):
  section = README.split("## Python API", 1)[1].split("\n## ", 1)[0]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  # the snippet's folders, in this test's own folder (no shared /tmp path between runs)
  assert code.count("/tmp/mre_api_demo/") == 5, "update the folders this test moves"
  code = code.replace("/tmp/mre_api_demo/", f"{tmp_path}/")
  exec(compile(code, "README.md", "exec"), {})
  assert capsys.readouterr().out.startswith("(1, 8, 8, 4)\n")
  assert (tmp_path / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_ci_runs_the_readme_commands():
  quick = re.search(r"## Quick start.*?```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
  install = quick[0].split("pip install ", 1)[1].split(" && ")[0]
  ci = (ROOT / ".ci" / "run").read_text()
  assert f"pip install --quiet {install}" in ci
  assert quick[1] in ci


def test_a_skip_fails_the_run_under_ci(tmp_path):
  """With CI=true, a module skipped at import (torch missing) or a test skipped while running (no
  compiler) fails the run; an expected failure (xfail) does not. Without CI, they skip."""
  shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
  (tmp_path / "test_import.py").write_text('import pytest\npytest.importorskip("no_such_module")\n')
  (tmp_path / "test_run.py").write_text(
      "import pytest\n\ndef test_skip():\n  pytest.skip('no compiler')\n\n"
      "@pytest.mark.xfail(strict=True)\ndef test_xfail():\n  assert False\n\ndef test_pass():\n  pass\n")

  def run(ci):
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": ci} if ci else {})
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           "--continue-on-collection-errors", "-rfEs", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  local = run(None)
  assert local.returncode == 0 and "1 passed, 2 skipped, 1 xfailed" in local.stdout, local.stdout[-3000:]
  ci = run("true")
  assert ci.returncode == 1 and "1 failed, 1 passed, 1 xfailed, 1 error" in ci.stdout, ci.stdout[-3000:]
  assert "test_import.py skipped under CI=true" in ci.stdout and "no_such_module" in ci.stdout
  assert "test_run.py::test_skip skipped under CI=true" in ci.stdout and "no compiler" in ci.stdout


def test_layout_section_names_every_package_and_module():
  """README's layout reads as the tree: each sub-package of mre_jax is listed as a folder, and each
  of its modules by file name."""
  section = README.split("## Layout", 1)[1].split("\n## ", 1)[0]
  block = re.search(r"```\n(.*?)```", section, re.S).group(1)
  rows = {}  # folder -> its text (the row and its continuation lines)
  for line in block.splitlines():
    if line and not line.startswith(" "):
      folder = line.split()[0]
      rows[folder] = line
    elif line:
      rows[folder] += line
  packages = sorted(p.parent for p in (ROOT / "mre_jax").glob("*/__init__.py"))
  assert packages
  for package in packages:
    folder = f"mre_jax/{package.name}/"
    assert folder in rows, f"README layout lacks {folder}"
    for module in sorted(package.glob("*.py")):
      if module.name != "__init__.py":
        assert module.name in rows[folder], f"README layout: {folder} row does not name {module.name}"
  for module in sorted((ROOT / "mre_jax").glob("*.py")):
    if module.name not in ("__init__.py", "errors.py"):
      assert f"mre_jax/{module.name}" in rows, f"README layout lacks mre_jax/{module.name}"
