"""Short rows (vision widths) on CPU: rms_norm / layer_norm forward on [B, N] against native
F.rms_norm / F.layer_norm and the same-run fresh-memory floor (cpu_floor.py).

    python benchmarks/short_rows.py [--elements 9633792] [--ns 40,96,192,384,768,1024]
                                    [--dtypes float32,bfloat16] [--rounds 7] [--out FILE.json]

Each row length N gets B = elements // N rows (the default: the element count of a
ConvNeXt [32, 96, 56, 56] activation). Ratios are medians over rounds of the per-round
time / floor (benchmarks/_timer.py); the machine check is benchmarks/_machine.py's.
"""
import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import _common
import _timer
from _common import fresh_huge

import rmsnorm_ext as R


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--elements", type=int, default=32 * 96 * 56 * 56)
    p.add_argument("--ns", default="40,96,192,384,768,1024")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--sample-ms", type=float, default=60.0)
    p.add_argument("--fwdbwd", action="store_true", help="also forward+backward")
    p.add_argument("--out", type=Path)
    _common.add_busy_arg(p)
    a = p.parse_args(argv)
    guard, report = _common.cpu_report(a.allow_busy, cases={})
    for dname in a.dtypes.split(","):
        dtype = getattr(torch, dname)
        for n in (int(v) for v in a.ns.split(",")):
            m = a.elements // n
            x = torch.randn(m, n).to(dtype)
            w, b = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
            s = (n,)
            fns = {
                "floor": lambda: fresh_huge(x).copy_(x),
                "ours rms": lambda: R.rms_norm(x, s, w),
                "native rms": lambda: F.rms_norm(x, s, w),
                "ours ln": lambda: R.layer_norm(x, s, w, b),
                "native ln": lambda: F.layer_norm(x, s, w, b),
            }
            if a.fwdbwd:
                xg, wg, bg = (t.detach().clone().requires_grad_() for t in (x, w, b))
                dy = torch.randn_like(x)
                fb = lambda f, leaves: (lambda: torch.autograd.grad(f(), leaves, dy))  # noqa
                fns["ours rms fb"] = fb(lambda: R.rms_norm(xg, s, wg), (xg, wg))
                fns["native rms fb"] = fb(lambda: F.rms_norm(xg, s, wg), (xg, wg))
                fns["ours ln fb"] = fb(lambda: R.layer_norm(xg, s, wg, bg), (xg, wg, bg))
                fns["native ln fb"] = fb(lambda: F.layer_norm(xg, s, wg, bg), (xg, wg, bg))
            name = f"{dname} [{m}, {n}]"
            st, busy = guard.interleaved(name, fns, rounds=a.rounds,
                                         target_sample_s=a.sample_ms / 1e3)
            fl = st["floor"]
            row = {k: {"ms": v.median * 1e3, "spread": v.spread,
                       "x_floor": _timer.per_round_ratio(v, fl)}
                   for k, v in st.items() if k != "floor"}
            report["cases"][name] = {"floor_ms": fl.median * 1e3, "busy": busy, **row}
            cols = "  ".join(f"{k} {v['ms']:.2f}ms {v['x_floor']:.2f}x (±{v['spread']:.0%})"
                             for k, v in row.items())
            print(f"{name:26s} floor {fl.median * 1e3:.2f}ms  {cols}" + (" BUSY" if busy else ""),
                  flush=True)
    if a.out:
        _common.write_json(a.out, report)


if __name__ == "__main__":
    main()
