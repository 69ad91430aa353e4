"""CPU timings of rmsnorm_ext against torch, interleaved: each round times every
implementation once (in a rotating order), and the report gives the median over rounds
with its spread (min and max of the rounds), so load on a shared machine shows as spread
instead of biasing one side.

    PYTHONPATH=. python benchmarks/cpu_speed.py --shapes 4096x4096 --dtypes float32,bfloat16

Cases: {rms,ln}_fwd, {rms,ln}_bwd (backward only, weight grad included, graph kept) and
{rms,ln}_fwdbwd. Implementations: ours, torch (F.rms_norm / F.layer_norm) and, for
rms_fwd, torch.compile(F.rms_norm).
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import rmsnorm_ext

EPS = 1e-6


def _impls(op, N):
    if op == "rms":
        out = {"ours": lambda x, w, b: rmsnorm_ext.rms_norm(x, (N,), w, EPS),
               "torch": lambda x, w, b: F.rms_norm(x, (N,), w, EPS)}
    else:
        out = {"ours": lambda x, w, b: rmsnorm_ext.layer_norm(x, (N,), w, b, EPS),
               "torch": lambda x, w, b: F.layer_norm(x, (N,), w, b, EPS)}
    return out


def _runner(fn, kind, x, w, b, dy):
    params = [w] if b is None else [w, b]
    if kind == "fwd":
        def run():
            with torch.no_grad():
                fn(x, w, b)
        return run
    xs = x.detach().requires_grad_()
    ps = [p.detach().requires_grad_() for p in params]
    if kind == "bwd":
        y = fn(xs, *ps, *([None] if b is None else []))

        def run():
            torch.autograd.grad(y, [xs, *ps], dy, retain_graph=True)
        return run

    def run():
        y = fn(xs, *ps, *([None] if b is None else []))
        torch.autograd.grad(y, [xs, *ps], dy)
    return run


def _time(run, reps):
    run()
    t0 = time.perf_counter()
    for _ in range(reps):
        run()
    return (time.perf_counter() - t0) / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="rms_fwd,rms_bwd,rms_fwdbwd,ln_fwd,ln_bwd,ln_fwdbwd")
    ap.add_argument("--shapes", default="4096x4096")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--impls", default="ours,torch,compile")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"rmsnorm_ext {rmsnorm_ext.build_info()}")
    for shape in a.shapes.split(","):
        M, N = map(int, shape.split("x"))
        for dname in a.dtypes.split(","):
            dt = getattr(torch, dname)
            x = torch.randn(M, N).to(dt)
            dy = torch.randn(M, N).to(dt)
            w = torch.randn(N).to(dt)
            b = torch.randn(N).to(dt)
            for case in a.cases.split(","):
                op, kind = case.split("_")
                impls = _impls(op, N)
                if op == "rms" and kind == "fwd" and "compile" in a.impls:
                    c = torch.compile(lambda x, w, b: F.rms_norm(x, (N,), w, EPS), dynamic=False)
                    impls["compile"] = c
                impls = {k: v for k, v in impls.items() if k in a.impls.split(",")}
                runs = {k: _runner(f, kind, x, w, b if op == "ln" else None, dy)
                        for k, f in impls.items()}
                times = {k: [] for k in runs}
                keys = list(runs)
                for r in range(a.rounds):
                    for k in keys[r % len(keys):] + keys[:r % len(keys)]:
                        times[k].append(_time(runs[k], a.reps))
                line = f"{case:10s} {shape:>11s} {dname:8s}"
                for k, ts in times.items():
                    med = statistics.median(ts)
                    line += f" | {k} {med * 1e3:7.3f} ms [{min(ts) * 1e3:.3f}, {max(ts) * 1e3:.3f}]"
                print(line, flush=True)


if __name__ == "__main__":
    main()
