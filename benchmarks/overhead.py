"""Small-shape cost of a call, as a user pays it: forward+backward through the public
functions and modules, and inference forwards, against native torch, in one interleaved run.

Training calls are timed as ``torch.autograd.grad(f(x, w), (x, w), dy)`` with ``dy``
precomputed, on [1, 4096] and [16, 4096] fp32 by default: at these sizes the host work
(Python, the dispatcher, autograd bookkeeping) outweighs the arithmetic, so this is what
decides decode-time and small-batch speed. The targets (the host-layer issue):

* ours (rms_norm, layer_norm and the modules) fwd+bwd <= 1.4x ``F.layer_norm`` at [1, 4096]
  and <= 1.2x at [16, 4096], and no slower than ``F.rms_norm``;
* ``fused_add_rms_norm`` fwd+bwd no slower than ``F.rms_norm(x + r)``;
* inference forwards (no grad) no slower than native.

    python benchmarks/overhead.py                 # prints the table; files in benchmarks/out/
    python benchmarks/overhead.py --save-results  # into benchmarks/results/cpu/overhead.*

A busy machine stops the run with the reason (benchmarks/_machine.py), unless --allow-busy:
then the rows timed while busy are marked ⚠BUSY under "BUSY MACHINE — NOT A MEASUREMENT",
their targets read BUSY instead of yes/NO, and the JSON has busy: true and busy_reason.
"""
import argparse
import sys

import torch
import torch.nn.functional as F

import _common
import _machine

import rmsnorm_ext as R


def _grad(f, inputs, dy):
    return lambda: torch.autograd.grad(f(), inputs, dy)


def cases(M, N, device, dtype):
    """name -> (group, callable). A group's members are compared with each other."""
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).to(device)  # noqa: E731
    x, r, dy = mk(M, N).requires_grad_(), mk(M, N).requires_grad_(), mk(M, N)
    w, b = mk(N).requires_grad_(), mk(N).requires_grad_()
    rms_mod = R.RMSNorm(N, eps=1e-6, device=device, dtype=dtype)
    ln_mod = R.LayerNorm(N, device=device, dtype=dtype)
    t_rms_mod = torch.nn.RMSNorm(N, eps=1e-6, device=device, dtype=dtype)
    t_ln_mod = torch.nn.LayerNorm(N, device=device, dtype=dtype)
    xd, rd, wd, bd = x.detach(), r.detach(), w.detach(), b.detach()
    return {
        "ours rms_norm": ("train", _grad(lambda: R.rms_norm(x, (N,), w, 1e-6), (x, w), dy)),
        "ours RMSNorm module": ("train", _grad(lambda: rms_mod(x), (x, rms_mod.weight), dy)),
        "ours layer_norm": ("train", _grad(lambda: R.layer_norm(x, (N,), w, b), (x, w, b), dy)),
        "ours LayerNorm module": ("train", _grad(lambda: ln_mod(x), (x, ln_mod.weight,
                                                                      ln_mod.bias), dy)),
        "F.rms_norm": ("train", _grad(lambda: F.rms_norm(x, (N,), w, 1e-6), (x, w), dy)),
        "F.layer_norm": ("train", _grad(lambda: F.layer_norm(x, (N,), w, b), (x, w, b), dy)),
        "torch.nn.RMSNorm module": ("train", _grad(lambda: t_rms_mod(x), (x, t_rms_mod.weight),
                                                   dy)),
        "torch.nn.LayerNorm module": ("train", _grad(lambda: t_ln_mod(x), (
            x, t_ln_mod.weight, t_ln_mod.bias), dy)),
        "ours fused_add_rms_norm": ("fused", lambda: torch.autograd.grad(
            R.fused_add_rms_norm(x, r, (N,), w, 1e-6)[0], (x, r, w), dy)),
        "F.rms_norm(x + r)": ("fused", lambda: torch.autograd.grad(
            F.rms_norm(x + r, (N,), w, 1e-6), (x, r, w), dy)),
        "ours rms_norm (no grad)": ("infer", lambda: R.rms_norm(xd, (N,), wd, 1e-6)),
        "ours layer_norm (no grad)": ("infer", lambda: R.layer_norm(xd, (N,), wd, bd)),
        "ours fused_add_rms_norm (no grad)": ("infer", lambda: R.fused_add_rms_norm(
            xd, rd, (N,), wd, 1e-6)),
        "F.rms_norm (no grad)": ("infer", lambda: F.rms_norm(xd, (N,), wd, 1e-6)),
        "F.layer_norm (no grad)": ("infer", lambda: F.layer_norm(xd, (N,), wd, bd)),
    }


# (ours, baseline, limit): ours.median / baseline.median must be <= limit. Functions are
# held to torch's functions, modules to torch's modules (a module call adds the same
# nn.Module.__call__ cost on both sides).
def targets(M):
    ln_limit = 1.4 if M == 1 else 1.2
    t = []
    for ours in ("ours rms_norm", "ours layer_norm"):
        t.append((ours, "F.layer_norm", ln_limit))
        t.append((ours, "F.rms_norm", 1.0))
    for ours in ("ours RMSNorm module", "ours LayerNorm module"):
        t.append((ours, "torch.nn.LayerNorm module", ln_limit))
        t.append((ours, "torch.nn.RMSNorm module", 1.0))
    t.append(("ours fused_add_rms_norm", "F.rms_norm(x + r)", 1.0))
    t.append(("ours rms_norm (no grad)", "F.rms_norm (no grad)", 1.0))
    t.append(("ours layer_norm (no grad)", "F.layer_norm (no grad)", 1.0))
    return t


def _shape(r):
    return f"{r['shape'][0]}×{r['shape'][1]}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    _common.add_device_arg(p, "default: cuda if available")
    p.add_argument("--rows", default="1,16", help="comma-separated M values (N = --cols)")
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny rows, 3 rounds")
    _common.add_busy_arg(p)
    _common.add_out_args(p, "overhead")
    args = p.parse_args(argv)
    device = _common.pick_device(args.device)
    rounds, target_s = (3, 0.002) if args.quick else (args.rounds, 0.02)
    cols = 256 if args.quick else args.cols
    guard = _machine.Guard(device, args.allow_busy)  # stops here when busy, unless allowed
    machine = _common.machine_info(device)

    rows, checks = [], []
    for M in (int(m) for m in args.rows.split(",")):
        fns = cases(M, cols, device, torch.float32)
        # One interleaved run per group: members alternate within each round.
        stats, busy = {}, {}
        for group in ("train", "fused", "infer"):
            members = {n: f for n, (gname, f) in fns.items() if gname == group}
            st, reason = guard.interleaved(f"the {group} rows at [{M}, {cols}]", members,
                                           device=device, rounds=rounds,
                                           max_rounds=2 * rounds, target_sample_s=target_s)
            stats.update(st)
            busy.update(dict.fromkeys(members, reason))
        for name, s in stats.items():
            rows.append({"shape": [M, cols], "impl": name, "median_us": s.median * 1e6,
                         "min_us": s.min * 1e6, "max_us": s.max * 1e6,
                         "spread": s.spread, "noisy": s.noisy, "busy": bool(busy[name]),
                         "busy_reason": busy[name]})
        for ours, base, limit in targets(M):
            ratio = stats[ours].median / stats[base].median
            checks.append({"shape": [M, cols], "ours": ours, "baseline": base,
                           "ratio": ratio, "limit": limit, "met": ratio <= limit,
                           "busy": bool(busy[ours] or busy[base])})

    busy = [r for r in rows if r["busy"]]
    busy_reason = "; ".join(dict.fromkeys(p for r in busy for p in r["busy_reason"].split("; ")))
    lines = [f"Small-shape call cost, fp32, forward+backward via torch.autograd.grad "
             f"(and no-grad forwards) — {_common.header_line(machine)}", ""]
    if busy:
        lines += [f"**{_machine.BANNER}**: {len(busy)} of {len(rows)} rows (marked ⚠BUSY) were "
                  f"timed on a busy machine -- {busy_reason}. Rerun on an idle machine.", ""]
    lines.append(_common.table(
        ["shape", "impl", "median µs", "min–max µs", "spread"],
        [[_shape(r), ("⚠BUSY " if r["busy"] else "") + r["impl"], f"{r['median_us']:.1f}",
          f"{r['min_us']:.1f}–{r['max_us']:.1f}",
          f"{100 * r['spread']:.0f}%" + (" ⚠" if r["noisy"] else "")] for r in rows],
        "llrrr", markdown=True))
    lines += ["", _common.table(
        ["shape", "ours / baseline", "ratio", "target", "met"],
        [[_shape(c), f"{c['ours']} / {c['baseline']}", f"{c['ratio']:.2f}", f"≤ {c['limit']}",
          "BUSY" if c["busy"] else "yes" if c["met"] else "NO"] for c in checks],
        "llrrc", markdown=True)]
    table = "\n".join(lines)
    print(table)
    out = _common.out_dir(args, device, quick=args.quick, what="overhead")
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.md").write_text(table + "\n")
    _common.write_json(out / "overhead.json", {
        "machine": machine, "busy": bool(busy), "busy_reason": busy_reason,
        "machine_check": guard.check, "rows": rows, "targets": checks})
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
