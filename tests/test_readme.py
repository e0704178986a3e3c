"""README promises: the Python API snippet runs, and CI runs README's install and test commands."""

import re
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
