"""The README's front door works as written.

Every ```python block of README.md runs verbatim, each in a fresh interpreter on the CPU (no
GPU, no optional packages except those in OPTIONAL: the README's test command installs them,
and the text around a block that imports one says so; without it installed the block is
skipped). Blocks that need a GPU, several processes or other packages must use another fence
(e.g. ```python-gpu) and say so in the text around them. The README's test command must be
the one CI runs (.ci/run keeps a copy).
"""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.M | re.S)


def _blocks(lang):
    return [(README[:m.start()].count("\n") + 1, m.group(2))
            for m in FENCE.finditer(README) if m.group(1).strip() == lang]


PYTHON_BLOCKS = _blocks("python")
OPTIONAL = ("timm", "transformers", "kernels")  # vision models; the HF `kernels` hub section


def _test_command():
    commands = [code.strip() for _, code in _blocks("bash") if "pytest" in code]
    assert len(commands) == 1, commands
    return commands[0]


def test_readme_has_python_blocks():
    assert PYTHON_BLOCKS, "README.md has no ```python block (the usage snippet)"


@pytest.mark.parametrize("line,code", PYTHON_BLOCKS,
                         ids=[f"README.md:{line}" for line, _ in PYTHON_BLOCKS])
def test_readme_python_block_runs(line, code, tmp_path):
    for pkg in OPTIONAL:
        if re.search(rf"^(import|from) {pkg}\b", code, re.M) and not importlib.util.find_spec(pkg):
            pytest.skip(f"{pkg} is not installed (the README's test command installs it)")
    # A fresh interpreter: the block must not lean on anything this test process imported.
    # CUDA_VISIBLE_DEVICES="" makes it the CPU-only run a GPU-less user gets, on any machine.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    root = str(ROOT)  # import the checkout's rmsnorm_ext (an editable install is the same)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"README.md block at line {line} failed:\n{proc.stdout}\n{proc.stderr}")


def test_readme_test_command_is_what_ci_runs():
    command = _test_command()
    ci = (ROOT / ".ci" / "run").read_text()
    assert command in ci, f"README's test command is not in .ci/run:\n{command}"


def test_readme_test_command_installs_the_optional_packages():
    command = _test_command()
    for pkg in OPTIONAL:
        assert re.search(rf"\b{pkg}\b", command.split("&&")[0]), (pkg, command)


def test_readme_main_command_installs_what_the_main_job_needs():
    main = [code for _, code in _blocks("bash")
            if "pip install" in code and "benchmarks/bench.py --quick" in code]
    assert main, "no main command"
    for code in main:
        for pkg in ("torch", "matplotlib", "numpy", "--no-build-isolation"):
            assert pkg in code, (pkg, code)
    cpu_only = [code for code in main if "download.pytorch.org/whl/cpu" in code]
    assert cpu_only and all("RMSNORM_EXT_CUDA=0" in code for code in cpu_only)
