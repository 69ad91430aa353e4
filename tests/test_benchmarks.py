"""Tests of the benchmark harness: the interleaved timer's order and statistics (exactly, with
a scripted clock), and smoke runs of bench.py (norm + quantize ops included), model_bench.py
and cpu_floor.py on tiny CPU configurations that check every output is produced and well
formed -- never timings (the smoke runs pass --allow-busy: CI machines are shared). The
busy-machine check (benchmarks/_machine.py) is tested beside busy-looping processes.
"""
import copy
import csv
import importlib.util
import json
import math
import os
import random
import re
import subprocess
import sys
import time
import types
from argparse import Namespace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
OPS = ("rms_norm", "layer_norm", "fused_add_rms_norm")
QUANT_OPS = ("rms_norm_quant", "fused_add_rms_norm_quant", "layer_norm_quant")
IMPLS = ("ours", "eager", "compile")
PASSES = ("fwd", "bwd", "fwdbwd")
COLUMNS = ["device", "op", "impl", "dtype", "quant", "pass", "tokens", "hidden", "time_us", "min_us",
           "max_us", "q1_us", "q3_us", "spread", "noisy", "rounds", "bytes", "regime", "gbps",
           "copy_us", "copy_spread", "copy_gbps", "bw_fraction", "floor_ratio",
           "fresh_us", "fresh_ratio", "clone_us", "clone_ratio", "speedup_vs_eager", "speedup_vs_compile", "busy", "busy_reason"]
POSITIVE = ["time_us", "min_us", "max_us", "q1_us", "q3_us", "bytes", "gbps", "copy_us",
            "copy_gbps", "bw_fraction", "floor_ratio", "speedup_vs_eager"]


def _load(name: str):
    """Import a benchmarks/ module by file (the folder is not a package)."""
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))  # for their `import _common, _timer`
    spec = importlib.util.spec_from_file_location(f"bench_under_test_{name}",
                                                  BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run([sys.executable, str(BENCH_DIR / script), *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


# ------------------------------------------------------------------------------ timer
@pytest.fixture(scope="module")
def timer():
    return _load("_timer")


def test_rotation(timer):
    names = ["a", "b", "c"]
    assert [timer.rotation(names, r) for r in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_interleaved_order(timer):
    """Warm-up calls every impl before any sample; then each round samples every impl
    once, in the rotated order."""
    calls, sampled = [], []
    fns = {n: (lambda n=n: calls.append(n)) for n in ("x", "y", "z")}
    stats = timer.interleaved(fns, rounds=4, inner=1, warmup_s=0.0, on_call=sampled.append)
    assert sampled == ["x", "y", "z", "y", "z", "x", "z", "x", "y", "x", "y", "z"]
    assert {n: s.rounds for n, s in stats.items()} == {"x": 4, "y": 4, "z": 4}
    assert all(s.inner == 1 for s in stats.values())
    # the sampled calls are the last 12; before them, warm-up of x, then y, then z
    warmup = calls[:-12]
    assert warmup == sorted(warmup) and set(warmup) == {"x", "y", "z"}


def test_summarize_math(timer):
    s = timer.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median, s.min, s.max, s.q1, s.q3) == (3.0, 1.0, 5.0, 2.0, 4.0)
    assert s.iqr == 2.0 and s.spread == pytest.approx(2 / 3) and s.noisy
    s = timer.summarize([1.0, 2.0, 3.0, 4.0])
    assert (s.q1, s.median, s.q3) == (1.75, 2.5, 3.25)
    quiet = timer.summarize([10.0, 10.2, 9.9, 10.1, 10.0])
    assert quiet.median == 10.0 and quiet.spread == pytest.approx(0.1 / 10.0)  # q1 10.0, q3 10.1
    assert not quiet.noisy
    d = quiet.to_dict(scale=1e6)
    assert d["median"] == pytest.approx(1e7) and d["noisy"] is False and "samples" not in d
    one = timer.summarize([7.0])
    assert (one.q1, one.median, one.q3, one.spread) == (7.0, 7.0, 7.0, 0.0)


def test_stats_is_a_torch_measurement(timer):
    """Stats are torch.utils.benchmark Measurements: their median and IQR are torch's."""
    from torch.utils.benchmark import Measurement

    s = timer.summarize([4.0, 1.0, 3.0, 2.0], inner=2, name="x")
    assert isinstance(s, Measurement) and s.number_per_run == 2 and s.raw_times[0] == 8.0
    assert s.samples == [4.0, 1.0, 3.0, 2.0] and s.iqr == s.q3 - s.q1 == 1.5
    assert timer.per_round_ratio(timer.summarize([2.0, 6.0, 3.0]),
                                 timer.summarize([1.0, 2.0, 3.0])) == 2.0  # median of 2, 3, 1


def test_common_table():
    common = _load("_common")
    md = common.table(["a", "bb", "c"], [[1, "x", "y"]], "lrc", markdown=True)
    assert md == "| a | bb | c |\n|---|---:|:-:|\n| 1 | x | y |"
    text = common.table(["a", "bb"], [["long", "1"]], "lr")
    assert text.splitlines() == ["a     bb", "--------", "long   1"]


class _ScriptedClock:
    """Returns scripted per-implementation sample times instead of measuring."""

    WARMUP_SAMPLES = 3  # interleaved() takes 3 single-call samples per impl with warmup_s=0

    def __init__(self, script):
        self.fn_names = {}
        self.queues = {n: [1.0] * self.WARMUP_SAMPLES + list(v) for n, v in script.items()}

    def sample(self, fn, inner):
        return self.queues[self.fn_names[fn]].pop(0)


def _scripted_run(timer, monkeypatch, script, **kw):
    clock = _ScriptedClock(script)
    monkeypatch.setattr(timer, "_clock", lambda device, flush: clock)
    fns = {}
    for name in script:
        fns[name] = lambda: None  # a distinct function object per name
        clock.fn_names[fns[name]] = name
    return timer.interleaved(fns, inner=1, warmup_s=0.0, **kw)


def test_interleaved_statistics_and_extra_rounds(timer, monkeypatch):
    # b is noisy after 3 rounds ([1, 3, 5]: IQR/median 2/3) and 4 ([1, 3, 3, 5]: 1/3); after
    # 5 ([1, 3, 3, 3, 5]: q1 = q3 = 3) it is quiet, so the 6th scripted round is never taken.
    stats = _scripted_run(timer, monkeypatch,
                          {"a": [2.0] * 6, "b": [1.0, 3.0, 5.0, 3.0, 3.0, 3.0]},
                          rounds=3, max_rounds=6)
    assert stats["a"].samples == [2.0] * 5 and stats["a"].spread == 0.0
    assert stats["b"].samples == [1.0, 3.0, 5.0, 3.0, 3.0]
    assert stats["b"].median == 3.0 and stats["b"].min == 1.0 and stats["b"].max == 5.0
    assert not stats["b"].noisy
    # a noisy impl that stays noisy stops at max_rounds
    capped = _scripted_run(timer, monkeypatch, {"a": [1.0, 2.0] * 3, "b": [2.0] * 6},
                           rounds=3, max_rounds=4)
    assert capped["a"].rounds == 4 and capped["a"].noisy
    quiet = _scripted_run(timer, monkeypatch, {"a": [2.0] * 6, "b": [3.0] * 6},
                          rounds=3, max_rounds=6)
    assert quiet["a"].rounds == 3 and quiet["b"].rounds == 3


def test_calibrated_inner_targets_sample_time(timer):
    stats = timer.interleaved({"noop": lambda: None}, rounds=2, target_sample_s=0.002,
                              warmup_s=0.0)
    assert stats["noop"].inner > 1  # a no-op is far faster than 2 ms: batched


# ------------------------------------------------------------------------------ bench.py
def _bench(out: Path, ops, impls, *extra: str) -> str:
    return _run("bench.py", "--device", "cpu", "--shape", "8x256,16x512", "--dtype", "float32",
                "--op", ",".join(ops), "--impl", ",".join(impls), "--rounds", "3",
                "--max-rounds", "3", "--sample-ms", "1", "--out", str(out), "--allow-busy",
                *extra).stdout


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
    shapes = {("8", "256"), ("16", "512")}
    assert {(r["op"], r["impl"], r["pass"], r["tokens"], r["hidden"]) for r in rows} == {
        (o, i, p, *s) for o in ops for i in impls for p in PASSES for s in shapes}
    for row in rows:
        assert row["device"] == "cpu" and row["dtype"] == "float32" and row["quant"] == ""
        assert row["regime"] in ("cache", "DRAM", "?")
        assert row["noisy"] in ("True", "False") and row["busy"] in ("True", "False")
        assert (row["busy"] == "True") == bool(row["busy_reason"])
        assert row["rounds"] == "3"
        for col in POSITIVE + (["speedup_vs_compile"] if with_compile else []):
            value = float(row[col])
            assert math.isfinite(value) and value > 0, (col, row)
        assert float(row["min_us"]) <= float(row["q1_us"]) <= float(row["time_us"]) \
            <= float(row["q3_us"]) <= float(row["max_us"])
        assert float(row["spread"]) == pytest.approx(
            (float(row["q3_us"]) - float(row["q1_us"])) / float(row["time_us"]), rel=1e-6)
        assert (row["noisy"] == "True") == (float(row["spread"]) > 0.10)
        # %BW and floor× both come from the copy timed in the same rounds
        assert float(row["floor_ratio"]) == pytest.approx(
            float(row["time_us"]) / float(row["copy_us"]), rel=1e-6)
        assert float(row["bw_fraction"]) * float(row["floor_ratio"]) == pytest.approx(1.0)
        if not with_compile:
            assert row["speedup_vs_compile"] == ""  # no baseline: left empty, not NaN
    # the copy floor has the bytes of its own row: same op/pass/shape -> same copy
    by_case = {}
    for row in rows:
        by_case.setdefault((row["op"], row["pass"], row["tokens"]), set()).add(row["copy_us"])
    assert all(len(v) == 1 for v in by_case.values())


def test_bench_csv(bench_out):
    out, stdout = bench_out
    _check_rows(_read_csv(out / "results.csv"), OPS, ("ours", "eager"), with_compile=False)
    assert "ours µs" in stdout and "copy µs" in stdout and "regime" in stdout
    assert "fused_add_rms_norm" in stdout
    assert re.search(r"\d ±\d+%", stdout)  # medians are shown with their spread


def test_bench_with_compile(tmp_path):
    # torch.compile costs seconds per (op, shape) on a cold Inductor cache: one op here.
    _bench(tmp_path, ["rms_norm"], IMPLS, "--no-plots")
    _check_rows(_read_csv(tmp_path / "results.csv"), ["rms_norm"], IMPLS, with_compile=True)
    assert not (tmp_path / "plots").exists()


def test_bench_json_and_markdown(bench_out):
    out, _ = bench_out
    data = json.loads((out / "results.json").read_text())
    machine = data["machine"]
    for key in ("cpu_model", "cpu_threads", "torch_version", "rmsnorm_ext_build",
                "git_commit", "date", "llc_bytes", "cpu_caches"):
        assert key in machine
    assert data["config"]["timer"]["rounds"] == 3
    assert isinstance(data["busy"], bool) and "others_share" in data["machine_check"]
    assert data["columns"] == COLUMNS
    assert len(data["results"]) == len(OPS) * 2 * len(PASSES) * 2
    for row in data["results"]:
        assert set(row) == set(COLUMNS)
        assert row["speedup_vs_compile"] is None
        assert isinstance(row["noisy"], bool)
        assert all(isinstance(row[c], (int, float)) and math.isfinite(row[c]) for c in POSITIVE)
    md = (out / "results.md").read_text()
    assert "| op |" in md and "commit" in md and "spread" in md
    # the README block regen_cpu_results.py writes from these results: this sweep lacks
    # 4096x4096, so each op's largest shape stands in
    table = _load("regen_cpu_results").headline_table(data)
    assert len(table.splitlines()) == 2 + 2 * len(OPS) and "16×512" in table


def test_regen_check_reproduces_the_committed_summary(tmp_path, monkeypatch, capsys):
    """--check rebuilds the committed CPU summary from its files without running anything;
    a changed number in the committed text (or in the README block) is reported."""
    regen = _load("regen_cpu_results")
    assert regen.main(["--check"]) == 0, capsys.readouterr().out
    committed = regen._common.committed_dir(torch.device("cpu"))
    copy_dir = tmp_path / "cpu"
    copy_dir.mkdir()
    for name in ("README.md", "results.json", "model_bench.md", "cpu_floor.json",
                 "quant.json", "overhead.md"):
        (copy_dir / name).write_text((committed / name).read_text())
    text = (copy_dir / "README.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| rms_norm |"))
    (copy_dir / "README.md").write_text(text.replace(row, row.replace("|", "| 1", 1)))
    monkeypatch.setattr(regen._common, "committed_dir", lambda device: copy_dir)
    assert regen.main(["--check"]) == 1
    assert "rebuilt from the files" in capsys.readouterr().out


def test_regen_replaces_only_the_marked_readme_block(tmp_path, monkeypatch):
    regen = _load("regen_cpu_results")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{regen.BEGIN}\nold numbers\n{regen.END}\noutro\n")
    monkeypatch.setattr(regen, "README", readme)
    regen.update_readme("new numbers")
    assert readme.read_text() == f"intro\n{regen.BEGIN}\nnew numbers\n{regen.END}\noutro\n"
    assert regen.BEGIN in regen.README.read_text()  # the real results page has the markers


def test_bench_plots(bench_out):
    import matplotlib.image

    out, _ = bench_out
    expected = [f"gbps_{op}_float32.png" for op in OPS] + ["rms_vs_layer_float32.png"]
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(expected)
    for name in expected:
        image = matplotlib.image.imread(out / "plots" / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_bench_keeps_finished_rows_when_cut(tmp_path, monkeypatch):
    """A run stopped by SIGTERM (timeout in a time-boxed GPU lease) or Ctrl-C still writes the
    rows of the cases it finished, records the cut, and exits non-zero."""
    bench = _load("bench")
    real = bench.run_case
    calls = []

    def run_case(case, *a, **k):
        calls.append(case)
        if len(calls) == 2:
            raise KeyboardInterrupt("SIGTERM")
        return real(case, *a, **k)

    monkeypatch.setattr(bench, "run_case", run_case)
    rc = bench.main(["--device", "cpu", "--shape", "8x256,16x256,32x256", "--dtype", "float32",
                     "--op", "rms_norm", "--pass", "fwd", "--rounds", "2", "--max-rounds", "2",
                     "--sample-ms", "1", "--no-plots", "--out", str(tmp_path), "--name", "cut",
                     "--allow-busy"])
    assert rc == 3
    data = json.loads((tmp_path / "cut.json").read_text())
    assert "case 2 of 3" in data["stopped"]
    assert {r["tokens"] for r in data["results"]} == {8}


def test_bench_configs():
    """The default sweeps, --quick and the filters select the cases documented."""
    bench = _load("bench")

    def cfg(*argv):
        return bench.config_from_args(bench.parse_args(["--device", "cpu", *argv]))

    quick = cfg("--quick").cases()
    for op in OPS:  # several hidden sizes per op, so the quick plots are lines
        hidden = {c.hidden for c in quick if c.op == op and c.tokens > 1}
        assert len(hidden) >= 3, (op, hidden)
    default = cfg().cases()
    assert {(c.tokens, c.hidden) for c in default} >= {(4096, 4096), (1, 4096)}
    assert {c.dtype for c in default} == {"float32", "bfloat16"}
    picked = cfg("--op", "layer_norm", "--dtype", "bfloat16", "--shape", "2x64,1x128").cases()
    assert [(c.op, c.dtype, c.tokens, c.hidden) for c in picked] == [
        ("layer_norm", "bfloat16", 2, 64), ("layer_norm", "bfloat16", 1, 128)]
    assert bench.bytes_moved("rms_norm", "fwdbwd", 2, 8, 4) == (2 * 64 + 32) + (3 * 64 + 64)
    assert cfg("--quick").rounds < cfg().rounds
    # the quant ops: opt-in (none in the default sweep), forward only, one row in --quick
    assert not any(c.op in QUANT_OPS for c in default)
    assert [(c.op, c.quant) for c in quick if c.op in QUANT_OPS] == [("rms_norm_quant",
                                                                      "fp8-token")]
    assert not any(c.op in QUANT_OPS for c in cfg("--quick", "--op", "rms_norm").cases())
    q = cfg("--op", "rms_norm_quant,layer_norm", "--quant", "fp8-static,int8-group128",
            "--shape", "2x256", "--dtype", "float32").cases()
    assert [(c.op, c.quant) for c in q] == [("rms_norm_quant", "fp8-static"),
                                            ("rms_norm_quant", "int8-group128"),
                                            ("layer_norm", "")]
    assert q[0].passes(bench.PASSES) == ("fwd",) and q[2].passes(bench.PASSES) == bench.PASSES
    assert cfg("--op", "rms_norm_quant", "--pass", "bwd").cases() == []
    # bytes a perfect kernel moves: input read, 1 byte an output element, params, fp32 scales
    # (+ residual read and residual_out written for the fused op)
    act = 2 * 256 * 2  # bf16 [2, 256]
    assert bench.bytes_moved("rms_norm_quant", "fwd", 2, 256, 2, "fp8-token") == \
        act + 512 + 512 + 4 * 2
    assert bench.bytes_moved("rms_norm_quant", "fwd", 2, 256, 2, "int8-group128") == \
        act + 512 + 512 + 4 * 4
    assert bench.bytes_moved("rms_norm_quant", "fwd", 2, 256, 2, "fp8-static") == \
        act + 512 + 512 + 4 * 2
    assert bench.bytes_moved("layer_norm_quant", "fwd", 2, 256, 2, "fp8-token") == \
        act + 512 + 2 * 512 + 4 * 2
    assert bench.bytes_moved("fused_add_rms_norm_quant", "fwd", 2, 256, 2, "fp8-token") == \
        3 * act + 512 + 512 + 4 * 2
    with pytest.raises(ValueError, match="inference only"):
        bench.bytes_moved("rms_norm_quant", "fwdbwd", 2, 256, 2, "fp8-token")


@pytest.mark.parametrize("op", QUANT_OPS)
def test_bench_quant_composite_matches_ours(op):
    """The eager composite bench.py times for the quant ops computes what ours does."""
    bench = _load("bench")
    cpu = torch.device("cpu")
    for mode in bench.QUANT_MODES:
        inputs = bench.make_inputs(bench.Case(op, "bfloat16", 3, 256, mode), cpu)
        ours, eager = bench.quant_fns(op, mode, cpu)
        got, want = ours(*inputs), eager(*inputs)
        assert len(got) == len(want) == (3 if op.startswith("fused") else 2)
        assert got[0].dtype == want[0].dtype == bench.parse_quant(mode)[0]
        assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)), mode
        torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=0)
        if len(got) == 3:
            torch.testing.assert_close(got[2], want[2])


def test_bench_quant(tmp_path):
    """bench.py's norm + quantize rows: forward only, ours and eager next to the copy floor,
    under their own file names (as regen_cpu_results.py writes them)."""
    _run("bench.py", "--device", "cpu", "--shape", "4x256", "--dtype", "float32",
         "--op", ",".join(QUANT_OPS), "--quant", "fp8-token,int8-group128",
         "--impl", "ours,eager", "--rounds", "3", "--max-rounds", "3", "--sample-ms", "1",
         "--out", str(tmp_path), "--name", "quant", "--no-plots", "--allow-busy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quant.csv", "quant.json",
                                                          "quant.md"]
    rows = _read_csv(tmp_path / "quant.csv")
    assert {(r["op"], r["quant"], r["impl"], r["pass"]) for r in rows} == {
        (o, q, i, "fwd") for o in QUANT_OPS for q in ("fp8-token", "int8-group128")
        for i in ("ours", "eager")}
    bench = _load("bench")
    for row in rows:
        assert int(row["bytes"]) == bench.bytes_moved(row["op"], "fwd", 4, 256, 4, row["quant"])
        for col in POSITIVE:
            value = float(row[col])
            assert math.isfinite(value) and value > 0, (col, row)
        assert float(row["floor_ratio"]) == pytest.approx(
            float(row["time_us"]) / float(row["copy_us"]), rel=1e-6)
    data = json.loads((tmp_path / "quant.json").read_text())
    assert data["config"]["quant"]["modes"] == ["fp8-token", "int8-group128"]
    md = (tmp_path / "quant.md").read_text()
    assert "rms_norm_quant fp8-token" in md and "copy µs" in md
    # the README block regen_cpu_results.py writes from such a run
    table = _load("regen_cpu_results").quant_table(data)
    assert len(table.splitlines()) == 2 + len(QUANT_OPS) * 2
    assert "| fused_add_rms_norm_quant | int8-group128 | fp32 | 4×256 |" in table


def test_regime():
    bench = _load("bench")
    cpu = torch.device("cpu")
    assert bench.regime(2**20, cpu, 32 * 2**20) == "cache"
    assert bench.regime(64 * 2**20, cpu, 32 * 2**20) == "DRAM"
    assert bench.regime(2**20, cpu, 0) == "?"


def test_default_output_is_fresh_and_ignored():
    """Without --out/--save-results, every run gets a new folder that git ignores; only
    --save-results writes into the committed benchmarks/results/."""
    common = _load("_common")
    cpu = torch.device("cpu")
    args = Namespace(out=None, save_results=False)
    path = common.out_dir(args, cpu, what="bench")
    assert path.parent == common.OUT_ROOT and not path.exists()
    path.mkdir(parents=True)
    try:
        again = common.out_dir(args, cpu, what="bench")
        assert again != path and not again.exists()
    finally:
        path.rmdir()
    assert common.out_dir(Namespace(out=None, save_results=True), cpu) == \
        common.RESULTS_ROOT / "cpu"
    if (ROOT / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", "-q", str(path / "results.csv")],
                                 cwd=ROOT)
        assert ignored.returncode == 0, "benchmarks/out/ must be git-ignored"


def test_cpu_floor(tmp_path):
    out = tmp_path / "floor.json"
    _run("cpu_floor.py", "--shape", "16x256", "--dtypes", "float32", "--rounds", "3",
         "--sample-ms", "1", "--out", str(out), "--allow-busy")
    report = json.loads(out.read_text())
    ratios = report["ratios"]["float32"]
    assert {"ours rms fwd", "ours rms fwdbwd", "native ln fwd"} <= set(ratios)
    assert all(math.isfinite(v) and v > 0 for v in ratios.values())
    assert set(report["latency_us"]) == {"ours rms_norm", "native F.rms_norm",
                                        "ours layer_norm", "native F.layer_norm"}
    table = _load("regen_cpu_results").floor_table(report)
    assert "| fp32 forward |" in table and "| fp32 forward+backward |" in table


# ------------------------------------------------------------------- busy-machine check
BANNER = "BUSY MACHINE — NOT A MEASUREMENT"


def test_slice_quantization_detector():
    """Times at whole scheduler slices (threads waiting for a core) are told from an op's
    own jitter, and from an op that genuinely takes milliseconds."""
    m = _load("_machine")
    rng = random.Random(0)
    # a 50 µs op on a busy machine: every call waits out 4-6 slices of 4 ms
    busy = [k * 4e-3 + rng.uniform(-40e-6, 40e-6) for k in (4, 4, 5, 4, 6, 4, 5, 4, 4)]
    assert m.quantized(busy, expected_s=50e-6) == 4e-3
    assert m.quantized([t / 3 for t in busy], inner=3, expected_s=50e-6) == 4e-3  # 3 calls/sample
    assert m.quantized([k * 1e-3 + rng.uniform(-20e-6, 20e-6) for k in (1, 2, 1, 1, 3, 1, 2)],
                       expected_s=20e-6) == 1e-3
    # ordinary jitter: a microsecond op, and a slow op whose times are at no slice multiple
    assert m.quantized([50e-6 * rng.uniform(0.9, 1.1) for _ in range(9)], expected_s=50e-6) is None
    assert m.quantized([2.5e-3 * rng.uniform(0.95, 1.05) for _ in range(9)],
                       expected_s=50e-6) is None
    # a copy that should take 15 ms and does: 16 ms is 4 slices, but no sign of a busy machine
    assert m.quantized([16e-3 * rng.uniform(0.998, 1.002) for _ in range(9)],
                       expected_s=15e-3) is None
    assert m.quantized([], expected_s=1e-6) is None
    # /proc/stat arithmetic: 200 busy ticks of 250, 20 of them ours -> others used 180 / 250,
    # less one tick per CPU of sampling slack
    n = len(m._cpus())
    assert m.others_share((100, 1000, 5), (300, 1250, 25)) == pytest.approx((180 - n) / 250)
    # a 20 ms case on an idle machine: 2 ticks per CPU, one stray tick that is not ours
    assert m.others_share((0, 0, 0), (1 + n, 2 * n, n)) == 0.0
    assert m.others_share(None, (1, 2, 3)) is None


@pytest.fixture
def hogs():
    """One busy-looping process per core this process may use (at least 2): the machine is
    unmistakably busy while the test runs; they are always killed."""
    n = max(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2)
    procs = []
    try:
        procs += [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                  for _ in range(n)]
        time.sleep(0.5)
        yield n
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs /proc/stat")
def test_busy_machine_refused(hogs, tmp_path):
    """Beside a CPU hog each benchmark stops before timing, saying why and what to do."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, str(BENCH_DIR / "bench.py"), "--device", "cpu",
                           "--shape", "8x256", "--op", "rms_norm", "--impl", "ours", "--pass",
                           "fwd", "--rounds", "3", "--sample-ms", "1", "--no-plots",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0
    assert f"{BANNER}: not benchmarking" in proc.stderr, proc.stderr
    assert re.search(r"other processes used [\d.]+ of the \d+ cores", proc.stderr), proc.stderr
    assert "idle machine" in proc.stderr and "--allow-busy" in proc.stderr
    assert not (tmp_path / "results.csv").exists()
    for name, argv in (("cpu_floor", ["--shape", "8x64", "--rounds", "2"]),
                       ("overhead", ["--quick", "--out", str(tmp_path)])):
        with pytest.raises(SystemExit, match=f"{BANNER}: not benchmarking"):
            _load(name).main(argv)
    assert not (tmp_path / "overhead.json").exists()


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs /proc/stat")
def test_busy_machine_marked_with_allow_busy(hogs, tmp_path, monkeypatch):
    """--allow-busy runs, and marks every row, table, CSV/JSON record and plot."""
    bench = _load("bench")
    figures, real_save = [], bench._save

    def save(fig, path, meta):  # records each figure's texts (watermark, title)
        path = real_save(fig, path, meta)
        figures.append((fig.get_suptitle(), [t.get_text() for t in fig.texts]))
        return path

    monkeypatch.setattr(bench, "_save", save)
    rc = bench.main(["--device", "cpu", "--shape", "8x256,16x256", "--dtype", "float32",
                     "--op", "rms_norm", "--impl", "ours", "--pass", "fwd", "--rounds", "2",
                     "--max-rounds", "2", "--sample-ms", "1", "--out", str(tmp_path),
                     "--allow-busy"])
    assert rc == 0
    rows = _read_csv(tmp_path / "results.csv")
    assert rows and all(r["busy"] == "True" and "other processes used" in r["busy_reason"]
                        for r in rows)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["busy"] is True and data["machine_check"]["busy"] is True
    assert all(r["busy"] is True for r in data["results"])
    md = (tmp_path / "results.md").read_text()
    assert BANNER in md and md.count("⚠BUSY rms_norm") == 2
    assert figures and all(BANNER in title and BANNER in texts for title, texts in figures)

    _load("overhead").main(["--quick", "--rows", "1", "--out", str(tmp_path), "--allow-busy"])
    report = json.loads((tmp_path / "overhead.json").read_text())
    assert report["busy"] and all(r["busy"] for r in report["rows"] + report["targets"])
    assert BANNER in (tmp_path / "overhead.md").read_text()

    floor = _load("cpu_floor")  # the floors and one candidate: no torch.compile build here
    monkeypatch.setattr(floor, "candidates", lambda x, w, b, dy: {
        "floor fwd (fresh)": x.clone, "floor add (fresh)": lambda: x + dy,
        "floor bandwidth (warm copy)": x.clone, "floor clone": x.clone,
        "ours rms fwd": x.clone, "ours rms fwdbwd": x.clone})
    floor.main(["--shape", "8x64", "--dtypes", "float32", "--rounds", "2", "--sample-ms", "1",
                "--out", str(tmp_path / "floor.json"), "--allow-busy"])
    report = json.loads((tmp_path / "floor.json").read_text())
    assert report["busy"] and report["busy_blocks"] == ["float32", "latency"]
    assert "other processes used" in report["busy_reason"]


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs /proc/stat")
def test_busy_during_run(hogs, tmp_path, monkeypatch):
    """A machine that was quiet at the start (faked here) and got busy: the case is caught
    by the between-case check -- the run stops, or with --allow-busy its rows are marked."""
    bench = _load("bench")
    monkeypatch.setattr(bench._machine.Guard, "_calibrate", lambda self, seconds: {
        "busy": False, "reasons": [], "copy_best_gbps": 10.0})
    argv = ["--device", "cpu", "--shape", "8x256", "--dtype", "float32", "--op", "rms_norm",
            "--impl", "ours", "--pass", "fwd", "--rounds", "2", "--max-rounds", "2",
            "--sample-ms", "1", "--no-plots", "--out", str(tmp_path)]
    assert bench.main(argv) == 3
    data = json.loads((tmp_path / "results.json").read_text())
    assert f"{BANNER}: stopped -- other processes used" in data["stopped"]
    assert data["results"] == []
    assert bench.main(argv + ["--allow-busy"]) == 0
    (row,) = _read_csv(tmp_path / "results.csv")
    assert row["busy"] == "True" and row["busy_reason"].startswith("other processes used")


def test_quiet_machine_passes():
    """On an idle machine the check lets the run through. Other jobs sharing this machine
    make that untestable at times: then it is skipped, saying so."""
    m = _load("_machine")

    def others(seconds):
        before = m.snapshot()
        time.sleep(seconds)
        return m.others_share(before, m.snapshot())

    share = others(1.0)
    if share is None:
        pytest.skip("no /proc/stat")
    if share > m.OTHERS_LIMIT / 2:
        pytest.skip(f"the machine is busy: other processes used {share:.0%} of its cores")
    guard = None
    # A refusal must repeat after pauses to count (a passing job, the kernel writing back a
    # build's files). Other processes' share is taken over the check's own window: sampled
    # after it, a burst that made it refuse is already over.
    for attempt in range(3):
        before = m.snapshot()
        try:
            guard = m.Guard("cpu")
            break
        except SystemExit as e:
            during = m.others_share(before, m.snapshot())
            if during is not None and during > m.OTHERS_LIMIT / 2:
                pytest.skip(f"the machine got busy during the check: {e}")
            if attempt == 2:
                raise
            time.sleep(2.0)
    assert guard.reason == "" and not guard.check["busy"], guard.check
    t = guard.begin()
    sum(range(10 ** 6))  # a case of our own: our CPU use is not the others'
    assert guard.end(t, "a case") == ""


def test_gpu_check_entry_points_exist():
    """gpu_check.sh must not call a script that was renamed or removed."""
    text = (BENCH_DIR / "gpu_check.sh").read_text()
    scripts = set(re.findall(r"(benchmarks/[\w/]+\.py|tests/[\w/]+\.py)", text))
    assert scripts
    for script in scripts:
        assert (ROOT / script).exists(), script


# ------------------------------------------------------------------------ model_bench.py
MODEL_ARGS = ("--device", "cpu", "--hidden", "64", "--heads", "2", "--layers", "2", "--seq", "16",
              "--dtype", "float32", "--rounds", "2", "--max-rounds", "2")


class _Ev:
    """A stand-in for torch.profiler's FunctionEvent: host and device times, a tree, the
    kernels an op launched itself."""
    def __init__(self, name, cpu, dev, children=(), seq=-1, device_type=None):
        self.name, self.sequence_nr, self.cpu_parent = name, seq, None
        self.device_type = device_type or torch.autograd.DeviceType.CPU
        self.cpu_children = list(children)
        for c in self.cpu_children:
            c.cpu_parent = self
        self.kernels = [types.SimpleNamespace(duration=dev)] if dev else []
        self.cpu_time_total = cpu + sum(c.cpu_time_total for c in self.cpu_children)
        self.device_time_total = dev + sum(c.device_time_total for c in self.cpu_children)
        self.self_cpu_time_total, self.self_device_time_total = cpu, dev


def test_norm_times_host_or_device_time():
    """On CUDA the norm share is GPU time (the host only launches kernels): norm_times takes
    the events' device times there, host times on CPU. The step's GPU time counts kernels
    launched outside the step range's tree (autograd's device thread runs the backward) and
    not the device-side copy of the step annotation."""
    mb = _load("model_bench")
    fwd = _Ev("rmsnorm_ext::rms_norm_fwd", cpu=30, dev=100, seq=7)
    mm = _Ev("aten::mm", cpu=20, dev=700, seq=8)
    step = _Ev(mb.STEP_LABEL, cpu=10, dev=0, children=[fwd, mm])
    # the backward, on another thread: a root of its own
    node = _Ev("RmsNormBackward", cpu=25, dev=200)
    bwd = _Ev(mb.BACKWARD_PREFIX + "RmsNormBackward", cpu=5, dev=0, children=[node], seq=7)
    gpu_step = _Ev(mb.STEP_LABEL, cpu=0, dev=5000, device_type=torch.autograd.DeviceType.CUDA)
    events = [step, fwd, mm, bwd, node, gpu_step]
    host = mb.norm_times(events, steps=1)
    assert (host.fwd_us, host.bwd_us, host.step_us) == (30, 25, 60)
    gpu = mb.norm_times(events, steps=1, device_time=True)
    assert (gpu.fwd_us, gpu.bwd_us, gpu.step_us) == (100, 200, 1000)
    assert gpu.share == 0.3


def test_norm_attribution_counts_only_norms():
    """The profiler attribution finds every norm on both sides, forward and backward, and
    nothing else (no matmul, attention or residual add leaks in)."""
    mb = _load("model_bench")
    args, device = mb.parse_args([*MODEL_ARGS, "--out", "/dev/null/unused"])
    models = mb.build_models(args, torch.float32, device)
    n_norms = 2 * args.layers + 1
    for side in mb.SIDES:
        fn = mb.make_step(models[side], "train", "eager", args, torch.float32, device)
        fn()
        t = mb.profile_side(fn, 2, device, None)
        assert t.calls_fwd == n_norms, side
        assert t.calls_bwd >= n_norms, side  # native: several autograd nodes per norm
        assert 0 < t.fwd_us and 0 < t.bwd_us and 0 < t.share < 1, side
        leaked = [k for k in t.by_op
                  if re.search(r"mm|linear|scaled_dot|attention|silu|Addmm|MmBackward", k)]
        assert not leaked, (side, leaked)
        if side == "ours":
            assert any("rmsnorm_ext::rms_norm_bwd" in k for k in t.by_op)
            # the engine's summing of the residual stream's gradient is not norm work
            assert not any(k.startswith("bwd: aten::add") for k in t.by_op), t.by_op
        else:
            assert any("aten::rms_norm" in k for k in t.by_op)
            assert not any("rmsnorm_ext" in k for k in t.by_op)


def test_model_bench(tmp_path):
    proc = _run("model_bench.py", *MODEL_ARGS, "--mode", "eager", "--out", str(tmp_path))
    data = json.loads((tmp_path / "model_bench.json").read_text())
    rows = data["results"]
    assert [(r["mode"], r["step"]) for r in rows] == [("eager", "train"), ("eager", "infer")]
    for r in rows:
        assert r["native_ms"] > 0 and r["ours_ms"] > 0
        assert r["speedup"] == pytest.approx(r["native_ms"] / r["ours_ms"])
        for side in ("native", "ours"):
            assert 0 < r[f"{side}_norm_share"] < 1
            assert r[f"{side}_norm_ms"] == pytest.approx(
                r[f"{side}_norm_fwd_ms"] + r[f"{side}_norm_bwd_ms"])
        if r["step"] == "train":
            assert r["native_norm_bwd_ms"] > 0 and r["ours_norm_bwd_ms"] > 0
        else:
            assert r["native_norm_bwd_ms"] == 0 and r["ours_norm_bwd_ms"] == 0
    assert "commit" in (tmp_path / "model_bench.md").read_text()
    assert (tmp_path / "model_bench.csv").read_text().startswith("dtype,mode,step,")
    trace = tmp_path / "traces" / "fp32_eager_train_ours.json"
    assert "rmsnorm_ext::rms_norm_fwd" in trace.read_text()
    assert json.loads((tmp_path / "traces" / "fp32_eager_train_native.json").read_text())
    assert "aten::rms_norm" in proc.stdout  # the side-by-side profiler table


VISION_ARGS = ("--device", "cpu", "--image-size", "32", "--batch", "1", "--dtype", "float32",
               "--rounds", "2", "--max-rounds", "2")


def test_model_bench_timm_convnext(tmp_path):
    """--model convnext: timm's LayerNorm2d (permute + aten::layer_norm) against our
    layer_norm_2d, in files of their own (the decoder's results are not replaced)."""
    pytest.importorskip("timm")
    _run("model_bench.py", *VISION_ARGS, "--model", "convnext", "--mode", "eager",
         "--no-traces", "--out", str(tmp_path))
    assert not (tmp_path / "model_bench.json").exists()
    data = json.loads((tmp_path / "model_bench_convnext.json").read_text())
    assert "convnext_atto" in data["model"]
    assert [r["step"] for r in data["results"]] == ["train", "infer"]
    for r in data["results"]:
        assert r["native_norm_fwd_ms"] > 0 and r["ours_norm_fwd_ms"] > 0
    ops = data["norm_ops"]["fp32 eager train"]
    assert any("aten::layer_norm" in k for k in ops["native"]["norm_ops_us_per_step"])
    assert "bwd: rmsnorm_ext::layer_norm_2d_bwd" in ops["ours"]["norm_ops_us_per_step"]
    assert ops["native"]["norm_calls_per_step"]["fwd"] == 17
    assert ops["ours"]["norm_calls_per_step"]["fwd"] == 17


def test_model_bench_timm_vit_norms_attributed():
    """--model vit: all 25 norms swapped, each forward call found by the profiler."""
    pytest.importorskip("timm")
    mb = _load("model_bench")
    args, device = mb.parse_args([*VISION_ARGS, "--model", "vit", "--out", "/dev/null/unused"])
    assert args.timm_model == "vit_tiny_patch16_224"
    models = mb.build_models(args, torch.float32, device)  # raises unless 25 are swapped
    for side in mb.SIDES:
        fn = mb.make_step(models[side], "infer", "eager", args, torch.float32, device)
        fn()
        assert mb.profile_side(fn, 1, device, None).calls_fwd == 25, side


def test_model_bench_compile(tmp_path):
    """Under torch.compile our norms stay attributable; torch's are fused ("fused")."""
    _run("model_bench.py", *MODEL_ARGS, "--mode", "compile", "--step", "train", "--no-traces",
         "--out", str(tmp_path))
    (row,) = json.loads((tmp_path / "model_bench.json").read_text())["results"]
    assert row["ours_norm_fwd_ms"] > 0 and row["ours_norm_bwd_ms"] > 0
    assert row["native_norm_ms"] is None
    assert "fused" in (tmp_path / "model_bench.md").read_text()
    assert not (tmp_path / "traces").exists()


def test_model_bench_dit_fused_block_matches_native():
    """model_bench --model dit compares a diffusers-style DiT block with the same block on
    layer_norm_modulate + qk_norm_rope: the two must compute the same thing (float64)."""
    mb = _load("model_bench")
    torch.manual_seed(0)
    native = mb.DiT(64, 2, 4, 128, 16).double()
    ours = copy.deepcopy(native)
    ours.fuse()
    x = torch.randn(2, 16, 64, dtype=torch.float64)
    a, b = native(x), ours(x)
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    ga = torch.autograd.grad(a.square().sum(), list(native.parameters()))
    gb = torch.autograd.grad(b.square().sum(), list(ours.parameters()))
    for p, q in zip(gb, ga):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_bench_large_cpu_rows_have_all_three_floors(tmp_path):
    """A CPU row whose output is 8 MiB or more is timed, in the same rounds, against the
    warm copy (bandwidth), the fresh-memory floor and a clone; smaller rows against the warm
    copy alone (their outputs come from the heap)."""
    _run("bench.py", "--device", "cpu", "--shape", "2048x1024,8x256", "--dtype", "float32",
         "--op", "rms_norm", "--impl", "ours", "--pass", "fwd", "--rounds", "3",
         "--max-rounds", "3", "--sample-ms", "1", "--out", str(tmp_path), "--allow-busy")
    rows = {r["tokens"]: r for r in _read_csv(tmp_path / "results.csv")}
    big, small = rows["2048"], rows["8"]
    for col in ("fresh_us", "clone_us", "fresh_ratio", "clone_ratio"):
        assert math.isfinite(float(big[col])) and float(big[col]) > 0, (col, big)
        assert small[col] == "", (col, small)
    assert float(big["fresh_ratio"]) == pytest.approx(
        float(big["time_us"]) / float(big["fresh_us"]), rel=1e-6)
    assert float(big["clone_ratio"]) == pytest.approx(
        float(big["time_us"]) / float(big["clone_us"]), rel=1e-6)
    md = (tmp_path / "results.md").read_text()
    assert "fresh×" in md and "clone×" in md and "warm" in md


def test_short_rows_runs(tmp_path):
    """benchmarks/short_rows.py runs and writes one case per (dtype, N) with each
    candidate's time and ratio to the same-run floor."""
    out = tmp_path / "short.json"
    _run("short_rows.py", "--elements", "20000", "--ns", "96,1024", "--dtypes", "float32",
         "--rounds", "3", "--sample-ms", "2", "--allow-busy", "--out", str(out))
    cases = json.loads(out.read_text())["cases"]
    assert set(cases) == {"float32 [208, 96]", "float32 [19, 1024]"}, set(cases)
    for case in cases.values():
        assert case["floor_ms"] > 0
        for name in ("ours rms", "native rms", "ours ln", "native ln"):
            assert case[name]["ms"] > 0 and case[name]["x_floor"] > 0, (name, case)
