"""The README's Python example runs as written (in a folder of its own), and does what its comments say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_example() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_example_is_the_four_workflows_in_five_lines():
    code = python_example()
    assert len(code.strip().splitlines()) == 5
    assert all(f"trp_edge.{verb}(" in code for verb in ("compress", "build", "deploy"))


@pytest.mark.slow
def test_the_readme_python_example_runs_as_written(tmp_path):
    check = ("\nimport trp_edge.workflows.build as b, trp_edge.workflows.deploy as d\n"
             "assert isinstance(res, trp_edge.CompressResult) and res.report.mac_speedup > 1\n"
             "assert isinstance(built, b.BuildResult) and 'ort' in built.manifests\n"
             "assert isinstance(dep, d.DeployResult) and dep.reports and all(p.is_file() for p in dep.reports)\n"
             "print('ok', len(dep.reports))\n")
    out = subprocess.run([sys.executable, "-c", python_example() + check], cwd=tmp_path, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "ok 1"  # fp32 only: what compress planned
    assert (tmp_path / "out" / "r20" / "report.json").is_file()
