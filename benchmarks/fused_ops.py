"""The fused ops against what a user writes without them, at the shapes that motivate them.

    python benchmarks/fused_ops.py [--set fused|vision|all] [--rounds 7] [--out FILE.json]
                                   [--allow-busy]

--set fused (CPU, bfloat16): gated_rms_norm [4096, 4096] (Mamba2 / Qwen3-Next),
layer_norm_modulate on a DiT-like [4, 1024, 4096] with [4, 4096] scale/shift, qk_norm_rope on
a Qwen3-like q [1, 1024, 32, 128] / k [1, 1024, 8, 128]; "eager" is the op's composite (its
math in ATen, fp32 compute as the Hugging Face / diffusers modules do).
--set vision (CPU, float32 and bfloat16): layer_norm_2d at ConvNeXt shapes [32, 96, 56, 56],
[32, 192, 28, 28], [32, 768, 7, 7], contiguous and channels_last; "eager" is timm's
LayerNorm2d (permute to NHWC, F.layer_norm on the view, permute back).
Per case, forward and forward+backward (torch.autograd.grad, as bench.py), in the same
interleaved rounds: ours, eager, eager under torch.compile, and the floor: a fresh-memory
pass over the same bytes (the inputs read once, the outputs written once into fresh
huge-page-advised memory in the input's layout, see cpu_floor.py). Ratios are per-round
time / floor, medians over rounds. A reference row, "torch x*1.5": torch's own multiply of
the same inputs by a constant into the same kind of fresh memory -- one pass that converts
each element in and out and does one multiply, the least any op with a compute step does
(gated's floor, torch.add, is such a pass already). Where it is well above the floor (bf16
maps that fit in cache, on AVX2) the floor is a copy no computing op reaches, not a target.
"""
import argparse
from pathlib import Path

import torch

import _common
import _machine
import _timer
from _common import fresh_huge

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
    return "gated_rms_norm [4096, 4096]", (x, g, w), ours, comp, floor, ()


def _case_modulate():
    x = torch.randn(4, 1024, 4096, dtype=BF16)
    sc, sh = torch.randn(4, 4096, dtype=BF16) * 0.1, torch.randn(4, 4096, dtype=BF16)
    ours = lambda x, sc, sh: R.layer_norm_modulate(x, (4096,), sc, sh)  # noqa: E731
    comp = lambda x, sc, sh: T.ln_modulate_composite(x, [4096], sc, sh, None, None,  # noqa: E731
                                                     1e-6)[0]
    floor = lambda: fresh_huge(x).copy_(x)  # noqa: E731
    return "layer_norm_modulate [4, 1024, 4096]", (x, sc, sh), ours, comp, floor, (x,)


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
    name = "qk_norm_rope q[1,1024,32,128] k[1,1024,8,128]"
    return name, (q, k, qw, kw), ours, comp, floor, (q, k)


def _timm_ln2d(x, w, b):  # timm.layers.LayerNorm2d.forward
    return torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), w, b,
                                          1e-6).permute(0, 3, 1, 2)


def _vision_cases():
    for shape in ((32, 96, 56, 56), (32, 192, 28, 28), (32, 768, 7, 7)):
        for dtype in (torch.float32, BF16):
            for fmt in (torch.contiguous_format, torch.channels_last):
                def make(shape=shape, dtype=dtype, fmt=fmt):
                    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt)
                    w, b = torch.randn(shape[1], dtype=dtype), torch.randn(shape[1], dtype=dtype)
                    ours = lambda x, w, b: R.layer_norm_2d(x, w, b, 1e-6)  # noqa: E731
                    floor = lambda: fresh_huge(x).copy_(x)  # noqa: E731
                    name = (f"layer_norm_2d {list(shape)} {str(dtype)[6:]} "
                            f"{'channels_last' if fmt is torch.channels_last else 'contiguous'}")
                    return name, (x, w, b), ours, _timm_ln2d, floor, (x,)
                yield make


def _fwdbwd(f, args):
    leaves = [a.detach().clone().requires_grad_() for a in args]

    def run():
        out = f(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        return torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", choices=("fused", "vision", "all"), default="all")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", type=Path)
    _common.add_busy_arg(p)
    a = p.parse_args(argv)
    guard, report = _common.cpu_report(a.allow_busy, cases={})
    makers = []
    if a.set in ("fused", "all"):
        makers += [_case_gated, _case_modulate, _case_qk]
    if a.set in ("vision", "all"):
        makers += list(_vision_cases())
    for make in makers:
        name, args, ours, comp, floor, one_pass = make()
        # A fresh compile cache per case: cases share `comp`'s code object, and past dynamo's
        # recompile limit (8) a call would silently run eagerly.
        torch._dynamo.reset()
        compiled = torch.compile(comp, dynamic=False)
        fns = {"floor": floor,
               "ours fwd": lambda: ours(*args), "eager fwd": lambda: comp(*args),
               "compile fwd": lambda: compiled(*args),
               "ours fwdbwd": _fwdbwd(ours, args), "eager fwdbwd": _fwdbwd(comp, args),
               "compile fwdbwd": _fwdbwd(compiled, args)}
        if one_pass:
            fns["torch x*1.5"] = lambda: [torch.mul(t, 1.5, out=fresh_huge(t)) for t in one_pass]
        st, busy = guard.interleaved(name, fns, rounds=a.rounds, target_sample_s=0.1)
        ratio = {k: _timer.per_round_ratio(v, st["floor"]) for k, v in st.items() if k != "floor"}
        report["cases"][name] = {"ms": {k: v.median * 1e3 for k, v in st.items()},
                                 "spread": {k: v.spread for k, v in st.items()},
                                 "x_floor": ratio, "busy": busy}
        print(("" if not busy else f"{_machine.BANNER}: {busy}\n") + f"{name}:")
        for k, r in ratio.items():
            print(f"  {k:16s} {st[k].median * 1e3:8.2f} ms  {r:5.2f}x floor  "
                  f"±{100 * st[k].spread:.0f}%")
        print(f"  floor            {st['floor'].median * 1e3:8.2f} ms")
    if a.out:
        _common.write_json(a.out, report)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
