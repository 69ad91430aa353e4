"""Benchmark of the norm + quantize ops against what a user writes today.

    python benchmarks/quant_bench.py                 # default shapes, eager + compiled
    python benchmarks/quant_bench.py --quick         # tiny smoke run
    python benchmarks/quant_bench.py --device cuda --dtype bfloat16 --quant int8

For each op / scale mode / shape it times, in interleaved rounds (every round runs every
contender once, so drift of a noisy machine hits all of them alike):

* ``ours``: rmsnorm_ext.rms_norm_quant / fused_add_rms_norm_quant / layer_norm_quant;
* ``eager``: the composite (``F.rms_norm`` / ``F.layer_norm``, then divide by the scale,
  clamp and ``.to(quant_dtype)``; dynamic scales from ``amax``);
* ``compiled``: the same composite under ``torch.compile``;
* ``floor``: a same-run copy of the input (read + write of its bytes), scaled to the bytes a
  perfect kernel moves (input(s) read, 1 byte an output element written, plus the residual
  output and scales where there are any).

Reports per contender the median over rounds with the min-max spread, and
``ours / floor``. Writes quant_bench.json and quant_bench.md to --out (default
benchmarks/out/, git-ignored) with the machine, date, torch version and commit.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# benchmarks/profile.py would shadow the standard library's `profile` (torch.compile imports
# cProfile): drop this script's folder from the module path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import rmsnorm_ext as R  # noqa: E402

QMAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0, torch.int8: 127.0}
MIN_SCALE = {torch.float8_e4m3fn: 1.0 / (448.0 * 512.0), torch.float8_e5m2: 1.0 / (57344.0 * 512.0),
             torch.int8: torch.finfo(torch.float32).eps}
QDTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2, "int8": torch.int8}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# (op, mode): mode static / token / group128
CASES = [("rms_norm_quant", "static"), ("rms_norm_quant", "token"), ("rms_norm_quant", "group128"),
         ("fused_add_rms_norm_quant", "token"), ("layer_norm_quant", "token")]
SHAPES = [(1, 4096), (32, 4096), (256, 4096), (1024, 4096), (256, 8192), (64, 16384)]
CUDA_SHAPES = [(1, 4096), (256, 4096), (4096, 4096), (16384, 4096), (4096, 8192), (2048, 16384)]
QUICK_SHAPES = [(4, 256), (16, 1024)]


# ------------------------------------------------------------------------- composites
def _quantize(y, s, qd):
    qmax = QMAX[qd]
    z = (y / s).clamp(-qmax if qd != torch.int8 else -128.0, qmax)
    return z.round().to(qd) if qd == torch.int8 else z.to(qd)


def _scales(y, qd, group):
    yg = y if group is None else y.unflatten(-1, (-1, group))
    s = (yg.abs().amax(-1, keepdim=True).float() / QMAX[qd]).clamp(min=MIN_SCALE[qd])
    return s


def composite(op, mode, qd):
    group = 128 if mode == "group128" else None

    def quant(y, scale):
        if mode == "static":
            return _quantize(y, scale, qd), scale
        s = _scales(y, qd, group)
        if group is None:
            return _quantize(y, s, qd), s
        q = _quantize(y.unflatten(-1, (-1, group)), s, qd).flatten(-2)
        return q, s.squeeze(-1)

    if op == "rms_norm_quant":
        def f(x, r, w, b, scale):
            return quant(F.rms_norm(x, (x.shape[-1],), w), scale)
    elif op == "fused_add_rms_norm_quant":
        def f(x, r, w, b, scale):
            h = x + r
            q, s = quant(F.rms_norm(h, (x.shape[-1],), w), scale)
            return q, s, h
    else:
        def f(x, r, w, b, scale):
            return quant(F.layer_norm(x, (x.shape[-1],), w, b), scale)
    return f


def ours(op, mode, qd):
    kw = {"quant_dtype": qd}
    if mode == "group128":
        kw["group_size"] = 128
    if op == "rms_norm_quant":
        return lambda x, r, w, b, scale: R.rms_norm_quant(
            x, (x.shape[-1],), w, scale=scale if mode == "static" else None, **kw)
    if op == "fused_add_rms_norm_quant":
        return lambda x, r, w, b, scale: R.fused_add_rms_norm_quant(
            x, r, (x.shape[-1],), w, scale=scale if mode == "static" else None, **kw)
    return lambda x, r, w, b, scale: R.layer_norm_quant(
        x, (x.shape[-1],), w, b, scale=scale if mode == "static" else None, **kw)


# ------------------------------------------------------------------------- timing
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn, device, target_s):
    """Seconds per call: a loop of calls long enough to be measurable (one sample)."""
    _sync(device)
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        _sync(device)
        el = time.perf_counter() - t0
        if el >= target_s or n >= 1 << 16:
            return el / n
        n = max(n * 2, int(n * target_s / max(el, 1e-7)) + 1)


def bench_case(op, mode, qd, dtype, m, n, device, rounds, target_s, do_compile):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(m, n, generator=g).to(device=device, dtype=dtype)
    r = torch.randn(m, n, generator=g).to(device=device, dtype=dtype)
    w = torch.randn(n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, generator=g).to(device=device, dtype=dtype)
    scale = torch.tensor([0.02], device=device)
    args = (x, r, w, b, scale)
    fns = {"ours": ours(op, mode, qd), "eager": composite(op, mode, qd)}
    if do_compile:
        # every case compiles the same code objects: start from a clean cache, or dynamo's
        # recompile limit (8) silently turns later cases back into eager calls
        torch._dynamo.reset()
        fns["compiled"] = torch.compile(composite(op, mode, qd), dynamic=False)
    dst = torch.empty_like(x)
    fns["copy"] = lambda *a: dst.copy_(x)
    for f in fns.values():  # warm up (and compile)
        with torch.inference_mode():
            f(*args)
            f(*args)
    samples = {k: [] for k in fns}
    with torch.inference_mode():
        for _ in range(rounds):
            for k, f in fns.items():
                samples[k].append(time_once(lambda: f(*args), device, target_s))
    in_bytes = x.numel() * x.element_size() * (2 if op == "fused_add_rms_norm_quant" else 1)
    out_bytes = m * n  # one byte an element
    if op == "fused_add_rms_norm_quant":
        out_bytes += x.numel() * x.element_size()  # residual_out
    groups = 1 if mode != "group128" else n // 128
    if mode != "static":
        out_bytes += m * groups * 4
    copy_bytes = 2 * x.numel() * x.element_size()
    floor = [t * (in_bytes + out_bytes) / copy_bytes for t in samples["copy"]]
    res = {"op": op, "mode": mode, "quant_dtype": str(qd).replace("torch.", ""),
           "dtype": str(dtype).replace("torch.", ""), "M": m, "N": n,
           "bytes_moved": in_bytes + out_bytes}
    for k, v in list(samples.items()) + [("floor", floor)]:
        if k == "copy":
            continue
        res[k] = {"median_us": statistics.median(v) * 1e6, "min_us": min(v) * 1e6,
                  "max_us": max(v) * 1e6}
    res["ours_over_floor"] = res["ours"]["median_us"] / res["floor"]["median_us"]
    res["ours_GBps"] = (in_bytes + out_bytes) / (res["ours"]["median_us"] * 1e-6) / 1e9
    return res


# ------------------------------------------------------------------------- reporting
def machine(device):
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "threads": torch.get_num_threads(),
            "build": R.build_info()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(l.split(":", 1)[1].strip() for l in f
                               if l.lower().startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def git_commit():
    try:
        c = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                           text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return c + ("-dirty" if dirty else "") if c else None
    except (OSError, subprocess.SubprocessError):
        return None


def to_markdown(meta, rows, contenders):
    lines = [f"# Norm + quantize benchmark ({meta['device']})", "",
             f"{meta['date']}, commit {meta['commit']}, torch {meta['machine']['torch']}, "
             f"{meta['machine'].get('gpu') or meta['machine'].get('cpu')}, "
             f"{meta['machine']['threads']} threads, CPU ISA {meta['machine']['build']['cpu_isa']}. "
             f"Median of {meta['rounds']} interleaved rounds, [min-max] in brackets, microseconds. "
             "floor: same-run copy of the input scaled to the bytes a perfect kernel moves.", "",
             "| op | mode | dtype -> q | M x N | " + " | ".join(contenders) +
             " | ours/floor | ours GB/s |",
             "|" + "---|" * (5 + len(contenders) + 1)]
    for r in rows:
        cells = [f"{r[c]['median_us']:.1f} [{r[c]['min_us']:.1f}-{r[c]['max_us']:.1f}]"
                 for c in contenders]
        lines.append(f"| {r['op']} | {r['mode']} | {r['dtype']} -> {r['quant_dtype']} | "
                     f"{r['M']} x {r['N']} | " + " | ".join(cells) +
                     f" | {r['ours_over_floor']:.2f} | {r['ours_GBps']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--quant", default="fp8", choices=list(QDTYPES))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--target-ms", type=float, default=20.0, help="time per sample")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 3 rounds (smoke test)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    ap.add_argument("--shapes", default=None, help="e.g. 32x4096,256x4096 (default: a set per device)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype, qd = DTYPES[a.dtype], QDTYPES[a.quant]
    shapes = QUICK_SHAPES if a.quick else (CUDA_SHAPES if device.type == "cuda" else SHAPES)
    if a.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    rounds = 3 if a.quick else a.rounds
    target_s = (1.0 if a.quick else a.target_ms) * 1e-3
    cases = CASES[:2] + CASES[3:] if a.quick else CASES
    rows = []
    for op, mode in cases:
        for m, n in shapes:
            r = bench_case(op, mode, qd, dtype, m, n, device, rounds, target_s, not a.no_compile)
            rows.append(r)
            print(f"{op:26s} {mode:8s} {m:6d} x {n:6d}: ours {r['ours']['median_us']:9.1f} us  "
                  f"eager {r['eager']['median_us']:9.1f}" +
                  (f"  compiled {r['compiled']['median_us']:9.1f}" if "compiled" in r else "") +
                  f"  floor {r['floor']['median_us']:9.1f}  ours/floor {r['ours_over_floor']:.2f}",
                  flush=True)
    contenders = ["ours", "eager"] + ([] if a.no_compile else ["compiled"]) + ["floor"]
    meta = {"date": dt.datetime.now().isoformat(timespec="seconds"), "commit": git_commit(),
            "device": str(device), "machine": machine(device), "rounds": rounds,
            "dtype": a.dtype, "quant": a.quant, "quick": a.quick}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_bench.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    (out / "quant_bench.md").write_text(to_markdown(meta, rows, contenders))
    print(f"wrote {out / 'quant_bench.json'} and {out / 'quant_bench.md'}")


if __name__ == "__main__":
    main()
