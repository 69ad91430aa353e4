"""benchmarks/gpu_check.sh is the one prepared run on a lent GPU machine, where a broken
entry point costs scarce device minutes: every Python script it calls must exist and accept
the flags it passes, which this checks without a GPU (bash syntax, then each script's
--help with those flags)."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _calls():
    """(script, flags) for each `python3 <script>.py ...` line of gpu_check.sh; flags are the
    literal --options on that line (values from shell variables are left out)."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    calls = []
    for m in re.finditer(r"python3 (\S+\.py)([^\n>|]*)", text):
        words = shlex.split(m.group(2).replace("$", " "), posix=True)
        flags = [w for w in words if w.startswith("--") and "=" not in w]
        calls.append((m.group(1), flags))
    return calls


def test_bash_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_finds_the_entry_points():
    scripts = {s for s, _ in _calls()}
    assert {"tests/cuda_paths.py", "benchmarks/bench.py"} <= scripts, scripts


@pytest.mark.parametrize("script,flags", _calls(), ids=lambda v: str(v))
def test_entry_point_accepts_its_flags(script, flags):
    path = ROOT / script
    assert path.exists(), f"gpu_check.sh calls {script}, which does not exist"
    # argparse prints help before validating other flags, so ask for --help alone and check
    # that the usage text lists every flag gpu_check.sh passes.
    proc = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for f in flags:
        assert f in proc.stdout, f"{script} does not accept {f} (gpu_check.sh passes it)"


def test_sanitizer_families_exist():
    # `run_san <tool> <families>`: a family cuda_paths.py does not know would stop that
    # sanitizer run on the GPU machine with a usage error.
    import cuda_paths
    runs = re.findall(r"^\s*run_san (\w+) (\S+)(?: \w+)? &", SCRIPT.read_text(), re.M)
    assert len(runs) == SCRIPT.read_text().count("\n  run_san "), runs  # every call parsed
    for tool, fams in runs:
        unknown = set(fams.split(",")) - set(cuda_paths.FAMILIES)
        assert not unknown, f"gpu_check.sh runs {tool} on unknown families {unknown}"
