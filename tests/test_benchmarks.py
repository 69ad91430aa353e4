"""Smoke tests for benchmarks/bench.py and benchmarks/profile.py on a tiny CPU config.

They check that every output is produced and well formed; never timings.
"""
import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
OPS = ("rms_norm", "layer_norm", "fused_add_rms_norm")
IMPLS = ("ours", "eager", "compile")
PASSES = ("fwd", "bwd", "fwdbwd")
COLUMNS = ["device", "op", "impl", "dtype", "pass", "tokens", "hidden", "time_us", "bytes",
           "gbps", "bw_fraction", "floor_ratio", "speedup_vs_eager", "speedup_vs_compile"]
NUMERIC = COLUMNS[5:]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run([sys.executable, str(BENCH_DIR / script), *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_under_test", BENCH_DIR / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def _bench(out: Path, ops, impls, *extra: str) -> str:
    return _run("bench.py", "--device", "cpu", "--shape", "8x256", "--dtype", "float32",
                "--op", ",".join(ops), "--impl", ",".join(impls), "--min-run-time", "0.01",
                "--copy-mib", "32", "--out", str(out), *extra).stdout


def _read_csv(path: Path):
    with path.open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        return list(reader)


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    """Every op with ours and eager: all outputs, plots included."""
    out = tmp_path_factory.mktemp("bench")
    return out, _bench(out, OPS, ("ours", "eager"))


def _check_rows(rows, ops, impls, with_compile):
    assert {(r["op"], r["impl"], r["pass"]) for r in rows} == {
        (o, i, p) for o in ops for i in impls for p in PASSES}
    for row in rows:
        assert row["device"] == "cpu" and row["dtype"] == "float32"
        assert (row["tokens"], row["hidden"]) == ("8", "256")
        for col in NUMERIC if with_compile else NUMERIC[:-1]:
            value = float(row[col])
            assert math.isfinite(value) and value > 0, (col, row)
        if not with_compile:
            assert row["speedup_vs_compile"] == ""  # no baseline: left empty, not NaN


def test_bench_csv(bench_out):
    out, stdout = bench_out
    _check_rows(_read_csv(out / "results.csv"), OPS, ("ours", "eager"), with_compile=False)
    assert "ours µs" in stdout and "fused_add_rms_norm" in stdout  # the terminal table


def test_bench_with_compile(tmp_path):
    # torch.compile costs seconds per (op, shape) on a cold Inductor cache: one op here.
    _bench(tmp_path, ["rms_norm"], IMPLS, "--no-plots")
    _check_rows(_read_csv(tmp_path / "results.csv"), ["rms_norm"], IMPLS, with_compile=True)
    assert not (tmp_path / "plots").exists()


def test_bench_json(bench_out):
    out, _ = bench_out
    data = json.loads((out / "results.json").read_text())
    machine = data["machine"]
    for key in ("cpu_model", "cpu_threads", "torch_version", "rmsnorm_ext_build",
                "git_commit", "date"):
        assert key in machine
    assert data["copy_bandwidth_gbps"] > 0
    assert data["columns"] == COLUMNS
    assert len(data["results"]) == len(OPS) * 2 * len(PASSES)
    for row in data["results"]:
        assert set(row) == set(COLUMNS)
        assert row["speedup_vs_compile"] is None
        assert all(isinstance(row[c], (int, float)) and math.isfinite(row[c])
                   for c in NUMERIC[:-1])
    assert "| op |" in (out / "results.md").read_text()


def test_bench_plots(bench_out):
    import matplotlib.image

    out, _ = bench_out
    expected = [f"gbps_{op}_float32.png" for op in OPS] + ["rms_vs_layer_float32.png"]
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(expected)
    for name in expected:
        image = matplotlib.image.imread(out / "plots" / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_bench_configs():
    """The default sweeps, --quick and the filters select the cases documented."""
    bench = _load_bench()

    def cases(*argv):
        return bench.config_from_args(bench.parse_args(["--device", "cpu", *argv])).cases()

    quick = cases("--quick")
    assert len(quick) == len(OPS) and all(c.tokens * c.hidden == 1024 * 4096 for c in quick)
    default = cases()
    assert {(c.tokens, c.hidden) for c in default} >= {(4096, 4096), (1, 4096)}
    assert {c.dtype for c in default} == {"float32", "bfloat16"}
    picked = cases("--op", "layer_norm", "--dtype", "bfloat16", "--shape", "2x64,1x128")
    assert [(c.op, c.dtype, c.tokens, c.hidden) for c in picked] == [
        ("layer_norm", "bfloat16", 2, 64), ("layer_norm", "bfloat16", 1, 128)]
    assert bench.bytes_moved("rms_norm", "fwdbwd", 2, 8, 4) == (2 * 64 + 32) + (3 * 64 + 64)


def test_profile(tmp_path):
    proc = _run("profile.py", "--device", "cpu", "--seq", "16", "--hidden", "128",
                "--heads", "2", "--iters", "1", "--min-run-time", "0.01", "--out", str(tmp_path))
    summary = json.loads((tmp_path / "profile_summary.json").read_text())
    native, ours = summary["runs"]
    assert (native["label"], ours["label"]) == ("native", "rmsnorm_ext")
    for run in (native, ours):
        assert math.isfinite(run["block_time_us"]) and run["block_time_us"] > 0
        trace = json.loads(Path(run["trace"]).read_text())
        assert trace["traceEvents"]
    assert {"rmsnorm_ext::rms_norm_fwd", "rmsnorm_ext::rms_norm_bwd"} <= set(ours["norm_ops"])
    assert ours["norm_ops"]["rmsnorm_ext::rms_norm_fwd"]["calls_per_iter"] == 2
    assert not any(k.startswith("rmsnorm_ext::") for k in native["norm_ops"])
    assert "rmsnorm_ext::rms_norm_fwd" in (tmp_path / "trace_rmsnorm_ext.json").read_text()
    assert "rmsnorm_ext::rms_norm_fwd" in proc.stdout  # the printed profiler table
