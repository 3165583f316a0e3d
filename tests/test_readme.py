"""The README's set-up commands are what CI runs, and its optimize command works as written."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_commands() -> list[str]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("## Set-up: two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def test_two_setup_commands_and_ci_runs_them():
    install, tests = _setup_commands()
    assert "pip install" in install and "onnx-lowrank optimize" in install
    assert "pytest tests" in tests
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert "readme_command 0" in ci and "readme_command 1" in ci


def test_readme_optimize_command_runs(tmp_path):
    install = _setup_commands()[0]
    optimize = install.split("&&")[-1].strip()
    args = shlex.split(optimize)
    assert args[0].endswith("onnx-lowrank") and args[1] == "optimize"
    args[3] = str(tmp_path / os.path.basename(args[3]))  # write the output outside the repo
    run = subprocess.run(
        [sys.executable, "-m", "onnx_lowrank.cli", *args[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "rewritten" in run.stdout and os.path.exists(args[3])
