"""The foundation issue's CPU yardstick: time against the memory-bound floor.

    python benchmarks/cpu_floor.py [--shape 4096x4096] [--repeats 3] [--out FILE.json]

Floors, as the issue defines them and measured in the same run: forward = an out-of-place
copy of the input (`x.clone()`, allocation included, as every norm allocates its output);
forward+backward = that copy plus an out-of-place add of two such tensors. Each ratio is the
median over --repeats rounds, each round timing every candidate back to back, so a noisy
machine moves numerator and denominator together. Also times the [1, N] forward against
native F.rms_norm / F.layer_norm (host overhead decides decode-loop performance).
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

# This folder holds profile.py, which shadows the stdlib module that torch.compile imports:
# keep the folder at the end of sys.path (as bench.py does).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]
import _common  # noqa: E402

import rmsnorm_ext as R  # noqa: E402


def t_us(fn, min_run_time):
    return Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e6


def candidates(x, w, b, dy):
    n = (x.shape[-1],)
    xg, wg, bg = (t.detach().clone().requires_grad_() for t in (x, w, b))
    rms_c = torch.compile(lambda a, c: F.rms_norm(a, n, c), dynamic=False)

    def fb(f):
        def run():
            f().backward(dy)
        return run

    return {
        "floor fwd (clone)": lambda: x.clone(),
        "floor add": lambda: x + dy,
        "ours rms fwd": lambda: R.rms_norm(x, n, w),
        "ours ln fwd": lambda: R.layer_norm(x, n, w, b),
        "eager rms fwd": lambda: F.rms_norm(x, n, w),
        "compile rms fwd": lambda: rms_c(x, w),
        "native ln fwd": lambda: F.layer_norm(x, n, w, b),
        "ours rms fwdbwd": fb(lambda: R.rms_norm(xg, n, wg)),
        "ours ln fwdbwd": fb(lambda: R.layer_norm(xg, n, wg, bg)),
        "eager rms fwdbwd": fb(lambda: F.rms_norm(xg, n, wg)),
        "compile rms fwdbwd": fb(lambda: rms_c(xg, wg)),
        "native ln fwdbwd": fb(lambda: F.layer_norm(xg, n, wg, bg)),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="4096x4096")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--min-run-time", type=float, default=1.0)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    m, n = (int(v) for v in a.shape.split("x"))
    report = {"machine": _common.machine_info(torch.device("cpu")), "shape": [m, n],
              "ratios": {}, "latency_us": {}}
    for dname in a.dtypes.split(","):
        dtype = getattr(torch, dname)
        x, dy = torch.randn(m, n).to(dtype), torch.randn(m, n).to(dtype)
        w, b = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
        cands = candidates(x, w, b, dy)
        for f in cands.values():  # warm-up (and compile)
            f()
        rounds = []
        for _ in range(a.repeats):
            rounds.append({k: t_us(f, a.min_run_time) for k, f in cands.items()})
        ratios = {}
        for k in cands:
            if k.startswith("floor"):
                continue
            fwdbwd = k.endswith("fwdbwd")
            ratios[k] = statistics.median(
                r[k] / (r["floor fwd (clone)"] + (r["floor add"] if fwdbwd else 0.0))
                for r in rounds)
        report["ratios"][dname] = ratios
        print(f"\n{dname} [{m}, {n}]: time / floor (median of {a.repeats} rounds)")
        for k, v in ratios.items():
            print(f"  {k:22s} {v:6.2f}x")
    x1, w1, b1 = torch.randn(1, n), torch.randn(n), torch.randn(n)
    lat = {
        "ours rms_norm": lambda: R.rms_norm(x1, (n,), w1),
        "native F.rms_norm": lambda: F.rms_norm(x1, (n,), w1),
        "ours layer_norm": lambda: R.layer_norm(x1, (n,), w1, b1),
        "native F.layer_norm": lambda: F.layer_norm(x1, (n,), w1, b1),
    }
    report["latency_us"] = {k: statistics.median(t_us(f, 0.3) for _ in range(a.repeats))
                            for k, f in lat.items()}
    print(f"\n[1, {n}] float32 forward latency (µs, median of {a.repeats})")
    for k, v in report["latency_us"].items():
        print(f"  {k:22s} {v:8.2f}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
