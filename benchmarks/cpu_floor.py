"""The foundation issue's CPU yardstick: time against the memory-bound floor.

    python benchmarks/cpu_floor.py [--shape 4096x4096] [--rounds 7] [--out FILE.json]

Floors, measured in the same run. Forward, three of them:
- bandwidth: a copy of the input into warm, already-backed memory (`out.copy_(x)`): the
  memory traffic of a norm with none of the allocation; nothing out of place reaches it;
- fresh memory: a fresh buffer, its 2 MiB-aligned interior advised MADV_HUGEPAGE (where the
  THP mode allows), then the copy: what any op that returns a new tensor can reach;
- clone: `x.clone()`, torch's default allocation path (4 KiB page faults on a fresh mapping):
  a reference, not a limit (a kernel that asks for huge pages beats it).
The ratios printed are against the fresh-memory floor, with the other two beside them.
Forward+backward = the fresh-memory floor plus an out-of-place add of two such tensors. A forward+backward
candidate is the forward plus `torch.autograd.grad(out, leaves, dy)` for x, weight (and bias),
as benchmarks/bench.py times it: the gradients are returned, not accumulated into `.grad`
(`.backward()` would add AccumulateGrad's `x.grad += dx`, a pass that is no part of the norm
and not in the floor, to every call after the first). Each ratio is the
median over the rounds of (candidate / floor) within a round, so a noisy machine moves
numerator and denominator together. Also times the [1, N] forward against
native F.rms_norm / F.layer_norm (host overhead decides decode-loop performance).

Timing: benchmarks/_timer.py (every candidate and both floors in the same interleaved rounds;
each ratio is the median over rounds of that round's time / that round's floor). A busy
machine stops the run with the reason (benchmarks/_machine.py), unless --allow-busy: then
each block timed while busy is printed under "BUSY MACHINE — NOT A MEASUREMENT" and the JSON
has busy: true and busy_reason.
"""
import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import _common
import _machine
import _timer

import rmsnorm_ext as R


def candidates(x, w, b, dy):
    n = (x.shape[-1],)
    warm = torch.empty_like(x).fill_(0)
    xg, wg, bg = (t.detach().clone().requires_grad_() for t in (x, w, b))
    rms_c = torch.compile(lambda a, c: F.rms_norm(a, n, c), dynamic=False)

    def fb(f, leaves):
        # torch.autograd.grad, as bench.py times fwdbwd: the gradients are returned, not
        # accumulated into .grad (with .backward() every call after the first would also pay
        # AccumulateGrad's x.grad += dx, a read-read-write pass that is no part of the norm).
        def run():
            return torch.autograd.grad(f(), leaves, dy)
        return run

    return {
        "floor fwd (fresh)": lambda: _common.fresh_huge(x).copy_(x),
        "floor add (fresh)": lambda: torch.add(x, dy, out=_common.fresh_huge(x)),
        "floor bandwidth (warm copy)": lambda: warm.copy_(x),
        "floor clone": lambda: x.clone(),
        "ours rms fwd": lambda: R.rms_norm(x, n, w),
        "ours ln fwd": lambda: R.layer_norm(x, n, w, b),
        "eager rms fwd": lambda: F.rms_norm(x, n, w),
        "compile rms fwd": lambda: rms_c(x, w),
        "native ln fwd": lambda: F.layer_norm(x, n, w, b),
        "ours rms fwdbwd": fb(lambda: R.rms_norm(xg, n, wg), (xg, wg)),
        "ours ln fwdbwd": fb(lambda: R.layer_norm(xg, n, wg, bg), (xg, wg, bg)),
        "eager rms fwdbwd": fb(lambda: F.rms_norm(xg, n, wg), (xg, wg)),
        "compile rms fwdbwd": fb(lambda: rms_c(xg, wg), (xg, wg)),
        "native ln fwdbwd": fb(lambda: F.layer_norm(xg, n, wg, bg), (xg, wg, bg)),
    }


def _banner(reason: str) -> str:
    return f"\n{_machine.BANNER}: {reason}" if reason else ""


def _mark(reason: str) -> str:
    return "  ⚠BUSY" if reason else ""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="4096x4096")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--sample-ms", type=float, default=100.0, help="milliseconds per sample")
    p.add_argument("--out", type=Path, help="write the report as JSON here")
    _common.add_busy_arg(p)
    a = p.parse_args(argv)
    m, n = (int(v) for v in a.shape.split("x"))
    guard, report = _common.cpu_report(a.allow_busy, shape=[m, n], rounds=a.rounds, ratios={},
                                       ratio_spread={}, latency_us={})
    busy = {}  # block -> why it was busy
    for dname in a.dtypes.split(","):
        dtype = getattr(torch, dname)
        x, dy = torch.randn(m, n).to(dtype), torch.randn(m, n).to(dtype)
        w, b = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
        stats, busy[dname] = guard.interleaved(
            f"{dname} [{m}, {n}]", candidates(x, w, b, dy), "floor bandwidth (warm copy)",
            2 * x.numel() * x.element_size(), rounds=a.rounds, target_sample_s=a.sample_ms / 1e3)
        fresh, add = stats["floor fwd (fresh)"], stats["floor add (fresh)"]
        warm, clone = stats["floor bandwidth (warm copy)"], stats["floor clone"]
        nbytes = 2 * x.numel() * x.element_size()
        ratios, spreads, vs_warm, vs_clone = {}, {}, {}, {}
        for k, s in stats.items():
            if k.startswith("floor"):
                continue
            fb = k.endswith("fwdbwd")
            ratios[k] = _timer.per_round_ratio(s, *((fresh, add) if fb else (fresh,)))
            if not fb:
                vs_warm[k] = _timer.per_round_ratio(s, warm)
                vs_clone[k] = _timer.per_round_ratio(s, clone)
            spreads[k] = s.spread
        report["ratios"][dname] = ratios
        report["ratio_spread"][dname] = spreads
        report.setdefault("ratios_vs_bandwidth", {})[dname] = vs_warm
        report.setdefault("ratios_vs_clone", {})[dname] = vs_clone
        report.setdefault("floors_gbps", {})[dname] = {
            k: nbytes / stats[k].median / 1e9 for k in ("floor bandwidth (warm copy)",
                                                         "floor fwd (fresh)", "floor clone")}
        print(_banner(busy[dname]) + f"\n{dname} [{m}, {n}]: time / fresh-memory floor (median "
              f"of {a.rounds} interleaved rounds; spread of the time); forward rows also "
              "against the bandwidth floor (warm copy) and a clone")
        print("  floors: " + ", ".join(f"{k} {v:.1f} GB/s"
                                        for k, v in report["floors_gbps"][dname].items()))
        for k, v in ratios.items():
            flag = "!" if spreads[k] > _timer.SPREAD_LIMIT else ""
            extra = (f"   vs bandwidth {vs_warm[k]:5.2f}x   vs clone {vs_clone[k]:5.2f}x"
                     if k in vs_warm else "")
            print(f"  {k:22s} {v:6.2f}x  ±{100 * spreads[k]:.0f}%{flag}{extra}"
                  + _mark(busy[dname]))
    x1, w1, b1 = torch.randn(1, n), torch.randn(n), torch.randn(n)
    lat = {
        "ours rms_norm": lambda: R.rms_norm(x1, (n,), w1),
        "native F.rms_norm": lambda: F.rms_norm(x1, (n,), w1),
        "ours layer_norm": lambda: R.layer_norm(x1, (n,), w1, b1),
        "native F.layer_norm": lambda: F.layer_norm(x1, (n,), w1, b1),
    }
    lat_stats, busy["latency"] = guard.interleaved(f"the [1, {n}] latency rows", lat,
                                                   rounds=a.rounds, target_sample_s=0.02)
    report["latency_us"] = {k: s.median * 1e6 for k, s in lat_stats.items()}
    report["latency_spread"] = {k: s.spread for k, s in lat_stats.items()}
    reasons = [r for r in busy.values() if r]
    parts = dict.fromkeys(p for r in reasons for p in r.split("; "))  # the run's reason once
    report.update(busy=bool(reasons), busy_reason="; ".join(parts),
                  busy_blocks=[k for k, r in busy.items() if r])
    print(_banner(busy["latency"]) + f"\n[1, {n}] float32 forward latency (µs, median of "
          f"{a.rounds} interleaved rounds)")
    for k, s in lat_stats.items():
        print(f"  {k:22s} {s.median * 1e6:8.2f}  ±{100 * s.spread:.0f}%" + _mark(busy["latency"]))
    if a.out:
        _common.write_json(a.out, report)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
