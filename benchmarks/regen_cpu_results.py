#!/usr/bin/env python
"""Regenerate every committed CPU result, and the benchmarks/README.md section that quotes them.

    python benchmarks/regen_cpu_results.py            # on a quiet machine; ~15-25 min on 2 cores
    python benchmarks/regen_cpu_results.py --quick    # trial run into a git-ignored folder
    python benchmarks/regen_cpu_results.py --check    # the committed summary, rebuilt from its files

Runs, each in its own process (a fresh torch.compile state; a failure stops the run):
  1. bench.py --device cpu             the default CPU sweep: table, CSV, JSON, plots
  2. bench.py --device cpu --op <the three norm + quantize ops> --dtype bfloat16
     --shape 256x4096,32x4096 --name quant      fp8 per-token: quant.csv, quant.json, quant.md
  3. model_bench.py --device cpu       the Llama-style decoder stack, native vs ours
  4. cpu_floor.py                      [4096, 4096] against the memory-bound floor
  5. overhead.py                       small-shape call cost ([1|16, 4096]) vs native
into benchmarks/results/cpu/ (emptied first, so nothing stale survives), writes
benchmarks/results/cpu/README.md (machine, date, commit, the commands, summary tables) and
replaces the benchmarks/README.md block between the `<!-- cpu-results:begin -->` and
`<!-- cpu-results:end -->` markers with the same summary. Every number in that block comes
from the files of this run. With --quick (or --out) nothing committed is touched.

Run it with nothing else on the machine: the tables flag rows whose interleaved rounds
spread by more than 10%, and a busy machine flags many.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import _common
import _machine

HERE = Path(__file__).resolve().parent
README = _common.REPO_ROOT / "benchmarks" / "README.md"  # the results page (top README links it)
BEGIN, END = "<!-- cpu-results:begin -->", "<!-- cpu-results:end -->"
SHORT = _common.DTYPE_SHORT
# The README's headline rows: (op, dtype, tokens, hidden, pass).
HEADLINE = [(op, dt, t, h, p) for op in ("rms_norm", "layer_norm", "fused_add_rms_norm")
            for dt in ("float32", "bfloat16") for (t, h) in ((4096, 4096),)
            for p in ("fwd", "fwdbwd")] + [
    (op, "float32", 1, 4096, "fwd") for op in ("rms_norm", "layer_norm")]


def run(cmd, log):
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        # No progress bars in the committed log (they are carriage-return redraws).
        env = dict(os.environ, TQDM_DISABLE="1")
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=_common.REPO_ROOT,
                              env=env)
    print(f"  ({time.perf_counter() - t0:.0f} s, log {log})", flush=True)
    if proc.returncode:
        sys.exit(f"failed (exit {proc.returncode}): see {log}")


def _impl_cells(rows: dict, case: tuple) -> list:
    """The time cells of ours / eager / compile for one case (rows keyed by case + impl),
    then ours' floor ratio and speedups."""
    cells = [_common.time_cell(r["time_us"], r["spread"], r["noisy"]) if r else "-"
             for r in (rows.get((*case, i)) for i in ("ours", "eager", "compile"))]
    ours = rows[(*case, "ours")]

    def x(v):
        return "-" if v is None else f"{v:.2f}x"
    return cells + [f"{ours['floor_ratio']:.2f}", x(ours["speedup_vs_eager"]),
                    x(ours["speedup_vs_compile"])]


IMPL_HEADER = ["regime", "ours µs", "eager µs", "compile µs", "ours floor×", "vs eager",
               "vs compile"]


def headline_table(bench: dict) -> str:
    rows = {(r["op"], r["dtype"], r["tokens"], r["hidden"], r["pass"], r["impl"]): r
            for r in bench["results"]}
    out = []
    picked = [k for k in HEADLINE if (*k, "ours") in rows]
    if not picked:  # another sweep (--quick): each op's largest shape instead
        largest = {}
        for op, dt, t, h, p, _ in rows:
            if t * h >= largest.get((op, dt), (0, 0, 0))[0]:
                largest[(op, dt)] = (t * h, t, h)
        picked = [(op, dt, t, h, p) for (op, dt), (_, t, h) in largest.items()
                  for p in ("fwd", "fwdbwd")]
    for op, dt, t, h, p in picked:
        ours = rows.get((op, dt, t, h, p, "ours"))
        if ours is None:
            continue
        out.append([op, SHORT[dt], f"{t}×{h}", p, ours["regime"],
                    *_impl_cells(rows, (op, dt, t, h, p))])
    return _common.table(["op", "dtype", "shape", "pass"] + IMPL_HEADER, out, "l" * 5 + "r" * 6,
                         markdown=True)


QUANT_RUN = ["--op", "rms_norm_quant,fused_add_rms_norm_quant,layer_norm_quant",
             "--dtype", "bfloat16", "--shape", "256x4096,32x4096", "--quant", "fp8-token",
             "--name", "quant", "--no-plots"]


def quant_table(bench: dict) -> str:
    """The norm + quantize rows of bench.py's quant run (forward only)."""
    rows = {(r["op"], r["quant"], r["dtype"], r["tokens"], r["hidden"], r["impl"]): r
            for r in bench["results"]}
    out = [[op, quant, SHORT[dt], f"{t}×{h}", ours["regime"],
            *_impl_cells(rows, (op, quant, dt, t, h))]
           for (op, quant, dt, t, h, impl), ours in rows.items() if impl == "ours"]
    return _common.table(["op", "quant", "dtype", "shape"] + IMPL_HEADER, out,
                         "l" * 5 + "r" * 6, markdown=True)


def floor_table(floor: dict) -> str:
    m, n = floor["shape"]
    out = []
    for dt, ratios in floor["ratios"].items():
        spreads = floor["ratio_spread"][dt]
        for pass_ in ("fwd", "fwdbwd"):
            keys = [f"ours rms {pass_}", f"eager rms {pass_}", f"compile rms {pass_}",
                    f"ours ln {pass_}", f"native ln {pass_}"]
            cells = [f"{ratios[k]:.2f}x" + ("!" if spreads[k] > 0.10 else "") for k in keys]
            label = "forward" if pass_ == "fwd" else "forward+backward"
            out.append([f"{SHORT[dt]} {label}", *cells])
    return _common.table([f"[{m}, {n}]", "ours RMSNorm", "eager F.rms_norm",
                          "compiled F.rms_norm", "ours LayerNorm", "native F.layer_norm"],
                         out, "lrrrrr", markdown=True)


def summary(out: Path, wall_s: float) -> str:
    bench = json.loads((out / "results.json").read_text())
    model_md = (out / "model_bench.md").read_text().split("\n\n", 1)[1]
    floor = json.loads((out / "cpu_floor.json").read_text())
    quant = json.loads((out / "quant.json").read_text())
    overhead_md = (out / "overhead.md").read_text().split("\n\n", 1)[1]
    machine = bench["machine"]
    try:
        rel = out.resolve().relative_to(_common.REPO_ROOT)
    except ValueError:  # --out outside the checkout
        rel = out
    noisy = sum(r["noisy"] for r in bench["results"])
    return "\n".join([
        f"### CPU: {machine['device_name']}, {machine['cpu_threads']} threads, "
        f"{str(machine['date'])[:10]}, commit {machine['git_commit']}",
        "",
        f"Regenerated by `python benchmarks/regen_cpu_results.py` ({wall_s / 60:.0f} min), "
        f"torch {machine['torch_version']}, build {machine['rmsnorm_ext_build']['cpu_isa']}; "
        f"load average {machine.get('loadavg_1m_start')} at the start. Every file is in "
        f"`{rel}/` (`results.md`: every row of the sweep; `plots/`: GB/s against hidden "
        "size, e.g. `plots/rms_vs_layer_float32.png`; traces are not committed).",
        "",
        "Kernel rows (median of interleaved rounds ± spread = IQR / median; `!` = spread "
        "above 10%; floor× = ours / a copy of the same bytes timed in the same rounds; "
        f"{noisy} of {len(bench['results'])} timings of the sweep are flagged):",
        "",
        headline_table(bench),
        "",
        "**Norm + quantize** (`bench.py --op rms_norm_quant,fused_add_rms_norm_quant,"
        "layer_norm_quant`, forward only, fp8 e4m3 with per-token scales, `quant.md`; eager "
        "and compile: the fp32 norm then absmax scale, divide, clamp, convert; floor× against "
        "a copy of the bytes a perfect kernel moves: input read, 1 byte per output element "
        "written, scales, and for the fused op the residual read and residual_out written):",
        "",
        quant_table(quant),
        "",
        "**End to end** (`model_bench.py`): " + model_md.strip(),
        "",
        f"**Against the memory-bound floor** (`cpu_floor.py`: time / (x.clone()) forward, "
        f"time / (x.clone() + x + dy) forward+backward (forward + `torch.autograd.grad` for x "
        f"and the parameters, no `.grad` accumulation), median over {floor['rounds']} "
        "interleaved rounds of the per-round ratio; `!` = the time's spread is above 10%):",
        "",
        floor_table(floor),
        "",
        "**Small shapes** (`overhead.py`: what a call costs where host work outweighs the "
        "arithmetic; training calls timed as `torch.autograd.grad(f(x, w), (x, w), dy)`, fp32; "
        "median of interleaved rounds, min–max; targets from the host-layer issue):",
        "",
        overhead_md.strip(),
    ])


def update_readme(text: str) -> None:
    readme = README.read_text()
    if BEGIN not in readme or END not in readme:
        sys.exit(f"README.md lacks the {BEGIN} ... {END} markers: not updated")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    README.write_text(head + BEGIN + "\n" + text + "\n" + END + tail)


def check() -> int:
    """Rebuild the summary from the committed files (no benchmark runs): it must equal
    benchmarks/results/cpu/README.md, and its table rows must be in the README block."""
    out = _common.committed_dir(torch.device("cpu"))
    committed = (out / "README.md").read_text()
    # the run's wall time is not in the data files: the committed text's own minutes
    minutes = re.search(r"regen_cpu_results.py` \((\d+) min\)", committed)
    text = summary(out, 60 * int(minutes.group(1)) if minutes else 0) + "\n"
    diff = "".join(difflib.unified_diff(committed.splitlines(True), text.splitlines(True),
                                        str(out / "README.md"), "rebuilt from the files"))
    block = README.read_text().split(BEGIN, 1)[-1].split(END, 1)[0]
    missing = [row for row in text.splitlines() if row.startswith("|") and row not in block]
    print(diff or f"{out / 'README.md'}: reproduced from the committed files")
    print(f"{README}: " + (f"{len(missing)} table rows differ, e.g.\n{missing[0]}" if missing
                           else "every table row of the summary is in the block"))
    return 1 if diff or missing else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="each benchmark's --quick, into a git-ignored folder (a trial run)")
    p.add_argument("--out", type=Path, help="write here instead of benchmarks/results/cpu/ "
                   "(README.md is then left alone)")
    p.add_argument("--check", action="store_true",
                   help="run nothing: rebuild the summary from the committed results and "
                        "compare it with their README.md and the benchmarks/README.md block "
                        "(exit 1 on a difference)")
    a = p.parse_args(argv)
    if a.check:
        return check()
    committed = not a.quick and a.out is None
    cpu = torch.device("cpu")
    if committed:
        out = _common.committed_dir(cpu)
    else:
        out = a.out or _common.out_dir(argparse.Namespace(out=None, save_results=False), cpu,
                                       quick=a.quick, what="regen")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    log = out / "regen.log"
    _machine.warn_if_busy(cpu)
    quick = ["--quick"] if a.quick else []
    py = sys.executable
    t0 = time.perf_counter()
    run([py, str(HERE / "bench.py"), "--device", "cpu", "--out", str(out), *quick], log)
    run([py, str(HERE / "bench.py"), "--device", "cpu", "--out", str(out), *QUANT_RUN, *quick],
        log)
    run([py, str(HERE / "model_bench.py"), "--device", "cpu", "--out", str(out), *quick], log)
    floor = ["--shape", "1024x1024", "--rounds", "3", "--sample-ms", "20"] if a.quick else []
    run([py, str(HERE / "cpu_floor.py"), "--out", str(out / "cpu_floor.json"), *floor], log)
    run([py, str(HERE / "overhead.py"), "--out", str(out), *quick], log)
    text = summary(out, time.perf_counter() - t0)
    (out / "README.md").write_text(text + "\n")
    if committed:
        update_readme(text)
        print(f"updated README.md between {BEGIN} and {END}")
    print(f"wrote {out}/ in {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
