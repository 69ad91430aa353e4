"""The fused ops against what a user writes without them, at the shapes that motivate them.

    python benchmarks/fused_ops.py [--rounds 7] [--out FILE.json] [--allow-busy]

Cases (CPU, bfloat16): gated_rms_norm [4096, 4096] (Mamba2 / Qwen3-Next), layer_norm_modulate
on a DiT-like [4, 1024, 4096] with [4, 4096] scale/shift, qk_norm_rope on a Qwen3-like
q [1, 1024, 32, 128] / k [1, 1024, 8, 128]. Per case, forward and forward+backward
(torch.autograd.grad, as bench.py), in the same interleaved rounds: ours, the composite in
eager (the op's math in ATen, fp32 compute as the Hugging Face / diffusers modules do), the
composite under torch.compile, and the floor: a fresh-memory pass over the same bytes (the
inputs read once, the outputs written once into fresh huge-page-advised memory, see
cpu_floor.py). Ratios are per-round time / floor, medians over rounds.
"""
import argparse
import json
import statistics
from pathlib import Path

import torch

import _common
import _machine
import _timer
from cpu_floor import fresh_huge

import rmsnorm_ext as R
from rmsnorm_ext import _table as T

BF16 = torch.bfloat16


def _case_gated():
    x, g = torch.randn(4096, 4096, dtype=BF16), torch.randn(4096, 4096, dtype=BF16)
    w = torch.ones(4096, dtype=BF16)
    ours = lambda x, g, w: R.gated_rms_norm(x, g, (4096,), w, 1e-6)  # noqa: E731
    comp = lambda x, g, w: T.gated_rms_composite(x, g, [4096], w, 1e-6, 4096, True,  # noqa: E731
                                                 "silu")[0]
    floor = lambda: torch.add(x, g, out=fresh_huge(x))  # noqa: E731  reads 2, writes 1
    return "gated_rms_norm [4096, 4096]", (x, g, w), ours, comp, floor


def _case_modulate():
    x = torch.randn(4, 1024, 4096, dtype=BF16)
    sc, sh = torch.randn(4, 4096, dtype=BF16) * 0.1, torch.randn(4, 4096, dtype=BF16)
    ours = lambda x, sc, sh: R.layer_norm_modulate(x, (4096,), sc, sh)  # noqa: E731
    comp = lambda x, sc, sh: T.ln_modulate_composite(x, [4096], sc, sh, None, None,  # noqa: E731
                                                     1e-6)[0]
    floor = lambda: fresh_huge(x).copy_(x)  # noqa: E731
    return "layer_norm_modulate [4, 1024, 4096]", (x, sc, sh), ours, comp, floor


def _case_qk():
    q, k = torch.randn(1, 1024, 32, 128, dtype=BF16), torch.randn(1, 1024, 8, 128, dtype=BF16)
    qw, kw = torch.ones(128, dtype=BF16), torch.ones(128, dtype=BF16)
    ang = torch.outer(torch.arange(1024.0), 1.0 / 10000 ** (torch.arange(0, 128, 2) / 128))
    cos, sin = (f(torch.cat((ang, ang), -1)).to(BF16) for f in (torch.cos, torch.sin))
    ours = lambda q, k, qw, kw: R.qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6)  # noqa: E731
    comp = lambda q, k, qw, kw: T.qk_norm_rope_composite(q, k, qw, kw, cos, sin, 1e-6,  # noqa: E731
                                                         False)

    def floor():
        return fresh_huge(q).copy_(q), fresh_huge(k).copy_(k)
    return "qk_norm_rope q[1,1024,32,128] k[1,1024,8,128]", (q, k, qw, kw), ours, comp, floor


def _fwdbwd(f, args):
    leaves = [a.detach().clone().requires_grad_() for a in args]

    def run():
        out = f(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        return torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", type=Path)
    p.add_argument("--allow-busy", action="store_true")
    a = p.parse_args(argv)
    guard = _machine.Guard("cpu", a.allow_busy)
    report = {"machine": _common.machine_info(torch.device("cpu")), "cases": {},
              "machine_check": guard.check}
    for make in (_case_gated, _case_modulate, _case_qk):
        name, args, ours, comp, floor = make()
        compiled = torch.compile(comp, dynamic=False)
        fns = {"floor": floor,
               "ours fwd": lambda: ours(*args), "eager fwd": lambda: comp(*args),
               "compile fwd": lambda: compiled(*args),
               "ours fwdbwd": _fwdbwd(ours, args), "eager fwdbwd": _fwdbwd(comp, args),
               "compile fwdbwd": _fwdbwd(compiled, args)}
        before = guard.begin()
        st = _timer.interleaved(fns, rounds=a.rounds, target_sample_s=0.1)
        busy = guard.end(before, name)
        ratio = {k: statistics.median(s / f for s, f in zip(v.samples, st["floor"].samples))
                 for k, v in st.items() if k != "floor"}
        report["cases"][name] = {"ms": {k: v.median * 1e3 for k, v in st.items()},
                                 "spread": {k: v.spread for k, v in st.items()},
                                 "x_floor": ratio, "busy": busy}
        print(("" if not busy else f"{_machine.BANNER}: {busy}\n") + f"{name} (bf16):")
        for k, r in ratio.items():
            print(f"  {k:16s} {st[k].median * 1e3:8.2f} ms  {r:5.2f}x floor  "
                  f"±{100 * st[k].spread:.0f}%")
        print(f"  floor            {st['floor'].median * 1e3:8.2f} ms")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
