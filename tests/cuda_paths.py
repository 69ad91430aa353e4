"""Hit every CUDA kernel path of rmsnorm_ext once and check it against a float64 reference.

Runs in seconds, also under compute-sanitizer memcheck / racecheck / initcheck
(benchmarks/gpu_check.sh runs it as a script). tests/test_cuda_paths.py runs it under
pytest: on cuda when a GPU is present, and always on cpu, which checks this harness itself
(and the CPU kernels on the same cases). Exits non-zero on any mismatch.

    python tests/cuda_paths.py [-v] [--quick] [--device cuda|cpu]

Path selection (csrc/cuda/cuda_utils.cuh pick_row_config): a row of N elements is
P = N / VEC packs (VEC = 16 bytes / element size of the narrowest streamed dtype) when
N % VEC == 0 and every tensor is 16-byte aligned, else P = N scalar elements and the
re-reading kernel. Register kernels: threads per row = ceil(P / 4) (ITEMS=4, <= 512
threads), or ceil(P / 8) (ITEMS=8, forward only); P <= 32 packs -> several rows per warp,
<= 128 -> warp per row, more -> block per row; longer rows -> re-reading kernel.
"""
import argparse
import math
import sys

import torch

import rmsnorm_ext  # noqa: F401  (loads the ops)
from reference import ln_rows_bwd_ref as ln_bwd_ref
from reference import ln_rows_ref as ln_ref
from reference import rms_rows_bwd_ref as rms_bwd_ref
from reference import rms_rows_ref as rms_ref

ops = torch.ops.rmsnorm_ext
DEV = "cuda"
TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
failures = []
checks = 0
verbose = False


def check(name, out, ref, dtype, exact=False, tol_scale=1.0, scale=None):
    """Relative error against ref, measured against `scale` (default: max |ref|)."""
    global checks
    checks += 1
    out = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    if out.shape != ref.shape:
        failures.append(f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}")
        return
    if out.numel() == 0:
        return
    if exact:
        bad = not torch.equal(out, ref)
        err = (out - ref).abs().max().item()
    else:
        tol = TOL[dtype] * tol_scale
        scale = max(ref.abs().max().item() if scale is None else float(scale), 1e-30)
        err = ((out - ref).abs() / (ref.abs() + scale)).max().item()
        bad = not (err <= tol) or not torch.isfinite(out).all()
    if bad:
        failures.append(f"{name}: max err {err:.3g}")
    if verbose or bad:
        print(("FAIL " if bad else "ok   ") + f"{name} err={err:.3g}")


def make(M, N, dtype, aligned=True, scale=1.0):
    """An [M, N] contiguous tensor; aligned=False puts it 1 element past an aligned address
    (so the kernels must take the scalar path)."""
    v = (torch.randn(M, N, device=DEV, dtype=torch.float64) * scale).clamp(-6e4, 6e4)
    if aligned:
        return v.to(dtype)
    buf = torch.empty(M * N + 1, device=DEV, dtype=dtype)
    t = buf[1:].view(M, N)
    t.copy_(v)
    return t


def param(N, dtype, base=0.0):
    return (torch.randn(N, device=DEV, dtype=torch.float64) * 0.5 + base).to(dtype)


def stats_dtype(dt):
    return torch.float64 if dt == torch.float64 else torch.float32


def tag(dt):
    return str(dt).replace("torch.", "")


# ------------------------------------------------------------------------------ RMSNorm

def check_rms(M, N, dt, wdt, aligned=True, off=0.0, eps=1e-6, bwd=True, gres=False,
             want_dw=True, scale=1.0):
    name = f"rms M={M} N={N} {tag(dt)} w={tag(wdt) if wdt else None} al={aligned} off={off}"
    x = make(M, N, dt, aligned, scale)
    w = param(N, wdt, 1.0 - off) if wdt else None
    y, rstd = ops.rms_norm_fwd(x, [N], w, eps, off)
    y_ref, rstd_ref = rms_ref(x, w, eps, off)
    check(name + " y", y, y_ref, dt)
    check(name + " rstd", rstd, rstd_ref, stats_dtype(dt))
    if rstd.dtype != stats_dtype(dt) or y.dtype != dt:
        failures.append(name + ": wrong output dtype")
    if not bwd:
        return
    dy = make(M, N, dt, aligned)
    gr = make(M, N, dt, aligned) if gres else None
    dx, dw = ops.rms_norm_bwd(dy, x, rstd, w, [N], off, gr, want_dw)
    dx_ref, dw_ref = rms_bwd_ref(dy, x, rstd, w, off, gr)
    check(name + " dx", dx, dx_ref, dt, tol_scale=4)
    if w is not None and want_dw:
        check(name + " dw", dw, dw_ref, wdt, tol_scale=4)
        if dw.dtype != wdt:
            failures.append(name + ": dw dtype")
        # Deterministic: bitwise identical on a second run.
        _, dw2 = ops.rms_norm_bwd(dy, x, rstd, w, [N], off, gr, want_dw)
        check(name + " dw deterministic", dw2, dw, wdt, exact=True)
    elif dw.numel() != 0:
        failures.append(name + ": dw should be empty")


def check_rms_mixed(M, N, gdt, wdt, gres=True):
    """rms_norm_bwd with fp32 x (fp32 residual stream) and bf16/fp16 grad_out."""
    name = f"rms-mixed-bwd M={M} N={N} g={tag(gdt)} w={tag(wdt)}"
    x = make(M, N, torch.float32)
    w = param(N, wdt, 1.0)
    _, rstd = ops.rms_norm_fwd(x, [N], None, 1e-6, 0.0)
    dy = make(M, N, gdt)
    gr = make(M, N, torch.float32) if gres else None
    dx, dw = ops.rms_norm_bwd(dy, x, rstd, w, [N], 0.0, gr, True)
    dx_ref, dw_ref = rms_bwd_ref(dy, x, rstd, w, 0.0, gr)
    check(name + " dx", dx, dx_ref, torch.float32, tol_scale=4)
    check(name + " dw", dw, dw_ref, wdt, tol_scale=4)
    if dx.dtype != torch.float32 or dw.dtype != wdt:
        failures.append(name + ": dtypes")


def check_fused(M, N, dt, rdt, wdt, aligned=True, off=0.0, inplace=False, noncontig=False):
    name = (f"fused M={M} N={N} {tag(dt)} r={tag(rdt)} w={tag(wdt) if wdt else None} "
            f"al={aligned} inplace={inplace} nc={noncontig}")
    eps = 1e-5
    x = make(M, N, dt, aligned)
    r = make(M, N, rdt, aligned)
    w = param(N, wdt, 1.0 - off) if wdt else None
    h_ref = (x.float() + r.float()).to(rdt) if dt != torch.float64 else x + r
    y_ref, rstd_ref = rms_ref(h_ref, w, eps, off)
    if inplace:
        if noncontig:
            # Non-contiguous views of the same values: [N, M] transposed.
            xt = x.t().contiguous().t()
            rt = r.t().contiguous().t()
            assert not xt.is_contiguous()
            x, r = xt, rt
        ops.fused_add_rms_norm_inplace(x, r, [N], w, eps, off)
        check(name + " h", r, h_ref, rdt, exact=True)
        check(name + " y", x, y_ref, dt)
    else:
        y, h, rstd = ops.fused_add_rms_norm_fwd(x, r, [N], w, eps, off)
        check(name + " h", h, h_ref, rdt, exact=True)
        check(name + " y", y, y_ref, dt)
        check(name + " rstd", rstd, rstd_ref, stats_dtype(dt))


# ---------------------------------------------------------------------------- LayerNorm

def check_ln(M, N, dt, wdt, aligned=True, has_w=True, has_b=True, shift=0.0):
    name = f"ln M={M} N={N} {tag(dt)} w={tag(wdt)} al={aligned} w?={has_w} b?={has_b}"
    eps = 1e-5
    x = make(M, N, dt, aligned)
    if shift:
        x = (x.double() + shift).to(dt)  # large mean: a naive E[x^2]-E[x]^2 would fail
    w = param(N, wdt, 1.0) if has_w else None
    b = param(N, wdt) if has_b else None
    y, mean, rstd = ops.layer_norm_fwd(x, [N], w, b, eps)
    y_ref, mean_ref, rstd_ref = ln_ref(x, w, b, eps)
    check(name + " y", y, y_ref, dt, tol_scale=2)
    # The mean's error scale is the data's, not the mean's own (near 0 for centred rows):
    # d = x - mean0 rounds at ulp(|x|), with a bias shared by the elements of one binade, so
    # a correct fp32 mean is off by up to ~eps32 * max|x| / 4 (2 in 200 random bf16 rows of
    # 40968 exceeded the old bar of 2e-5 * 2|mean|, under compute-sanitizer synccheck once).
    check(name + " mean", mean, mean_ref, stats_dtype(dt), tol_scale=0.05,
          scale=x.double().abs().max().item())
    check(name + " rstd", rstd, rstd_ref, stats_dtype(dt), tol_scale=10 if shift else 1)
    dy = make(M, N, dt, aligned)
    want_b = has_b
    dx, dw, db = ops.layer_norm_bwd(dy, x, mean, rstd, w, [N], has_w, want_b)
    dx_ref, dw_ref, db_ref = ln_bwd_ref(dy, x, mean, rstd, w)
    # Parameter gradients in the weight's dtype; without a weight, dbias in the statistics
    # dtype (float32, float64 for float64 data): autograd casts it to the bias's own dtype.
    pdt = wdt if has_w else (torch.float64 if dt == torch.float64 else torch.float32)
    check(name + " dx", dx, dx_ref, dt, tol_scale=4)
    if has_w:
        check(name + " dw", dw, dw_ref, pdt, tol_scale=4)
    elif dw.numel() != 0:
        failures.append(name + ": dw should be empty")
    if want_b:
        check(name + " db", db, db_ref, pdt, tol_scale=4)
        if db.dtype != pdt:
            failures.append(name + ": db dtype")
    elif db.numel() != 0:
        failures.append(name + ": db should be empty")
    if has_w or want_b:
        _, dw2, db2 = ops.layer_norm_bwd(dy, x, mean, rstd, w, [N], has_w, want_b)
        check(name + " dw/db deterministic", torch.cat([dw2.double().flatten(), db2.double().flatten()]),
              torch.cat([dw.double().flatten(), db.double().flatten()]), pdt, exact=True)


def check_quant(M, N, dt, kind, qdt, mode, aligned=True):
    """The norm + quantize kernels against the CPU kernels (which tests/test_quant.py holds
    to float64): scales within fp32 rounding, dequantized outputs within one quantization
    step. On --device cpu this compares the CPU kernels with themselves."""
    name = f"quant {kind} M={M} N={N} {tag(dt)} {tag(qdt)} {mode} al={aligned}"
    x, r = make(M, N, dt, aligned), make(M, N, dt, aligned)
    w = param(N, torch.float32, 1.0)
    b = param(N, torch.float32)
    scale = torch.tensor([0.02], device=DEV) if mode == "static" else None
    group = 64 if mode == "group" else None

    def run(dev):
        to = (lambda t: None if t is None else t.to(dev))  # noqa: E731
        kw = dict(scale=to(scale), quant_dtype=qdt, group_size=group)
        with torch.no_grad():
            if kind == "rms":
                return rmsnorm_ext.rms_norm_quant(to(x), (N,), to(w), 1e-6, **kw)
            if kind == "fused":
                return rmsnorm_ext.fused_add_rms_norm_quant(to(x), to(r), (N,), to(w), 1e-6,
                                                            **kw)[:2]
            return rmsnorm_ext.layer_norm_quant(to(x), (N,), to(w), to(b), 1e-5, **kw)

    (q, s), (q_ref, s_ref) = run(DEV), run("cpu")
    check(name + " scales", s, s_ref, torch.float32)
    # One quantization step of the output format at each reference value: 1 for int8; for
    # fp8 the spacing of the binade (2^-mantissa of the value), at least the subnormal one.
    dq, qr = q.cpu().double(), q_ref.double()
    if qdt == torch.int8:
        step = torch.ones_like(qr)
    else:
        mant, sub = (3, 2.0 ** -9) if qdt == torch.float8_e4m3fn else (2, 2.0 ** -16)
        step = (qr.abs() * 2.0 ** -mant).clamp_min(sub)
    global checks
    checks += 1
    err = ((dq - qr).abs() / step).max().item() if qr.numel() else 0.0
    if not err <= 1.0:
        failures.append(f"{name}: outputs {err:.3g} quantization steps apart")


# ------------------------------------------- gated RMSNorm, adaLN modulation (row kernels)

def _grads_vs_ref(name, fn, ref_fn, inputs, dt, tol_scale=4):
    """Forward and input / parameter gradients of fn against ref_fn run on float64 copies."""
    ins = [t.detach().requires_grad_(True) if t is not None else None for t in inputs]
    y = fn(*ins)
    ref_ins = [t.detach().double().requires_grad_(True) if t is not None else None for t in inputs]
    y_ref = ref_fn(*ref_ins)
    check(name + " y", y, y_ref, dt)
    dy = make(*y.shape, dt) if y.dim() == 2 else make(y.numel(), 1, dt).reshape(y.shape)
    live = [i for i, t in enumerate(ins) if t is not None]
    grads = torch.autograd.grad(y, [ins[i] for i in live], dy)
    grads_ref = torch.autograd.grad(y_ref, [ref_ins[i] for i in live], dy.double())
    for i, g, gr in zip(live, grads, grads_ref):
        check(f"{name} d{i}", g, gr, inputs[i].dtype, tol_scale=tol_scale)


def check_gated(M, N, dt, wdt, group, nbg, act, aligned=True):
    """gated_rms_norm: the row kernels over segments of `group` (register bucket, re-reading,
    scalar), gate first or norm first."""
    from reference import gated_rms_norm_reference
    name = f"gated M={M} N={N} G={group} {tag(dt)} w={tag(wdt) if wdt else None} nbg={nbg} {act} al={aligned}"
    x, g = make(M, N, dt, aligned), make(M, N, dt, aligned, scale=2.0)
    w = param(N, wdt, 1.0) if wdt else None
    _grads_vs_ref(name,
                  lambda x, g, w: rmsnorm_ext.gated_rms_norm(x, g, N, w, 1e-6, group_size=group,
                                                             norm_before_gate=nbg, activation=act),
                  lambda x, g, w: gated_rms_norm_reference(x, g, (N,), w, 1e-6, group, nbg, act),
                  [x, g, w], dt)


def check_modulate(B, S, N, dt, sdt, kind, aligned=True, shift=True):
    """rms_norm_modulate / layer_norm_modulate: per-sample scale and shift as the row kernels'
    operands (register bucket, re-reading, scalar)."""
    from reference import modulate_reference
    name = f"modulate-{kind} B={B} S={S} N={N} {tag(dt)} s={tag(sdt)} al={aligned}"
    x = make(B * S, N, dt, aligned).reshape(B, S, N)
    sc, sh = param(B * N, sdt).reshape(B, N), (param(B * N, sdt).reshape(B, N) if shift else None)
    w = param(N, dt, 1.0)
    b = param(N, dt) if kind == "layer" else None
    if kind == "layer":
        fn = lambda x, sc, sh, w, b: rmsnorm_ext.layer_norm_modulate(x, N, sc, sh, w, b, 1e-6)  # noqa: E731
    else:
        fn = lambda x, sc, sh, w, b: rmsnorm_ext.rms_norm_modulate(x, N, sc, sh, w, 1e-6)  # noqa: E731
    _grads_vs_ref(name, fn,
                  lambda x, sc, sh, w, b: modulate_reference(x, sc, sh, w, b, 1e-6, kind),
                  [x, sc, sh, w, b], dt, tol_scale=8)


# ------------------------------------------------- channels-first norms (rms/layer_norm_2d)

def check_norm2d(kind, shape, dt, wdt, aligned=True, channels_last=False, has_w=True,
                 has_b=True):
    """rms_norm_2d / layer_norm_2d fwd + bwd on [B, C, *S] against the row references of
    the same data moved to [B, *S, C]. Contiguous inputs take the channels-first kernels
    (csrc/cuda/channels_first_kernels.cu: S % VEC and alignment pick the packed or scalar
    loads, C the cached or streamed channels), channels_last ones the row kernels."""
    name = (f"{kind}2d {list(shape)} {tag(dt)} w={tag(wdt) if has_w else None} "
            f"b={has_b if kind == 'ln' else None} al={aligned} cl={channels_last}")
    B, C = shape[0], shape[1]
    x = make(B, math.prod(shape[1:]), dt, aligned).view(shape)
    dy = make(B, math.prod(shape[1:]), dt, aligned).view(shape)
    if channels_last:
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    w = param(C, wdt, 1.0) if has_w else None
    rows = lambda t: t.movedim(1, -1)  # noqa: E731  [B, *S, C], the row references' layout
    if kind == "rms":
        eps = 1e-6
        y, rstd = ops.rms_norm_2d_fwd(x, w, eps)
        y_ref, rstd_ref = rms_ref(rows(x), w, eps, 0.0)
        check(name + " y", rows(y), y_ref, dt)
        check(name + " rstd", rstd, rstd_ref, stats_dtype(dt))
        dx, dw = ops.rms_norm_2d_bwd(dy, x, rstd, w, True)
        dx_ref, dw_ref = rms_bwd_ref(rows(dy), rows(x), rstd, w, 0.0, None)
        grads, grads_ref = [dw], [dw_ref]
        again = lambda: ops.rms_norm_2d_bwd(dy, x, rstd, w, True)[1:]  # noqa: E731
    else:
        eps = 1e-5
        b = param(C, wdt) if has_b else None
        y, mean, rstd = ops.layer_norm_2d_fwd(x, w, b, eps)
        y_ref, mean_ref, rstd_ref = ln_ref(rows(x), w, b, eps)
        check(name + " y", rows(y), y_ref, dt, tol_scale=2)
        check(name + " mean", mean, mean_ref, stats_dtype(dt), tol_scale=0.05,
              scale=x.double().abs().max().item())
        check(name + " rstd", rstd, rstd_ref, stats_dtype(dt))
        dx, dw, db = ops.layer_norm_2d_bwd(dy, x, mean, rstd, w, True, True)
        dx_ref, dw_ref, db_ref = ln_bwd_ref(rows(dy), rows(x), mean, rstd, w)
        grads, grads_ref = [dw, db], [dw_ref, db_ref]
        again = lambda: ops.layer_norm_2d_bwd(dy, x, mean, rstd, w, True, True)[1:]  # noqa: E731
    if y.stride() != x.stride() or dx.stride() != x.stride():
        failures.append(name + ": outputs not in the input's layout")
    check(name + " dx", rows(dx), dx_ref, dt, tol_scale=4)
    # Parameter gradients in the weight's dtype; without a weight, dbias in the statistics
    # dtype (dweight empty).
    pdt = wdt if has_w else stats_dtype(dt)
    for g, g_ref, what in zip(grads, grads_ref, ("dw", "db")):
        if what == "dw" and not has_w:
            if g.numel() != 0:
                failures.append(name + ": dw should be empty")
            continue
        check(f"{name} {what}", g, g_ref, pdt, tol_scale=4)
        if g.dtype != pdt:
            failures.append(f"{name}: {what} dtype {g.dtype}")
    # Deterministic: bitwise identical on a second run.
    for g, g2, what in zip(grads, again(), ("dw", "db")):
        check(f"{name} {what} deterministic", g2, g, pdt, exact=True)


def check_empty():
    for dt in (torch.float32, torch.bfloat16):
        x = torch.empty(0, 3, 64, device=DEV, dtype=dt)
        w = param(64, dt, 1.0)
        b = param(64, dt)
        y, rstd = ops.rms_norm_fwd(x, [64], w, 1e-6, 0.0)
        assert y.shape == x.shape and rstd.shape == (0, 3)
        dx, dw = ops.rms_norm_bwd(x, x, rstd, w, [64], 0.0, None, True)
        check(f"empty rms dw {tag(dt)}", dw, torch.zeros(64), dt, exact=True)
        y, mean, rstd = ops.layer_norm_fwd(x, [64], w, b, 1e-5)
        assert y.shape == x.shape and mean.shape == (0, 3)
        dx, dw, db = ops.layer_norm_bwd(x, x, mean, rstd, w, [64], True, True)
        check(f"empty ln dw {tag(dt)}", dw, torch.zeros(64), dt, exact=True)
        check(f"empty ln db {tag(dt)}", db, torch.zeros(64), dt, exact=True)
        y, h, rstd = ops.fused_add_rms_norm_fwd(x, x.clone(), [64], w, 1e-6, 0.0)
        assert y.shape == x.shape and h.shape == x.shape
        ops.fused_add_rms_norm_inplace(x, x.clone(), [64], w, 1e-6, 0.0)


FAMILIES = ("rms", "fused", "ln", "quant", "norm2d", "gated", "modulate")
# The channels-first kernels of rms_norm_2d / layer_norm_2d exist on CUDA so far; the CPU
# ones read a contiguous [B, C, *S] input as rows (wrong) until they land.
CPU_FAMILIES = ("rms", "fused", "ln", "quant", "gated", "modulate")


def run_all(device="cuda", quick=False, verbose_=False, families=None):
    """Runs every check on `device`; returns the list of failures (empty: all passed).
    quick: one shape per path family (the compute-sanitizer runs, ~10x slower).
    families: which op families to check (racecheck/initcheck take a subset to fit a lease);
    default: all there are kernels for on `device`."""
    global DEV, verbose, checks
    if families is None:
        families = FAMILIES if device == "cuda" else CPU_FAMILIES
    DEV, verbose, checks = device, verbose_, 0
    failures.clear()
    torch.manual_seed(0)
    bf, hf, f32, f64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
    # Quick: every size bucket and path, in fewer dtype combinations.
    pairs = ((bf, f32), (f32, f32)) if quick else ((bf, bf), (bf, f32), (hf, hf), (hf, f32),
                                                   (f32, f32), (f64, f64))
    singles = (bf, f32) if quick else (bf, hf, f32, f64)

    rms, fused, ln, quant, norm2d, gated, modulate = (f in families for f in FAMILIES)
    # RMSNorm fwd + bwd: every dtype (+ fp32 weights for bf16/fp16), every size bucket.
    # bf16 (8 per pack): N=8 (1 pack, 256 rows/block), 64 (sub-warp rows), 1024 (warp per
    # row), 4096 (block per row, ITEMS=4), 24576 (fwd ITEMS=8; bwd re-reading),
    # 40968 (re-reading vectorized), 1003 (odd N: scalar), unaligned pointer (scalar).
    if rms:
        for dt, wdt in pairs:
            for M, N in ((300, 8), (300, 64), (257, 1024), (33, 4096)):
                check_rms(M, N, dt, wdt, off=1.0 if N == 1024 else 0.0)
            check_rms(7, 1003, dt, wdt)
            check_rms(9, 1024, dt, wdt, aligned=False, gres=True)
        for dt in singles:
            check_rms(5, 24576, dt, dt)
            check_rms(3, 40968, dt, dt, gres=True)
            check_rms(5, 16384, dt, None)                 # no weight (bwd: ones fallback)
            check_rms(64, 512, dt, dt, want_dw=False)     # no weight grad
            check_rms(4096, 256, dt, dt, bwd=True)        # M >> N: many rows per block
        check_rms(64, 1024, hf, hf, scale=2e4)            # fp16 near 6e4: squares in fp32
        check_rms(4, 20000, bf, f32, aligned=False)       # long unaligned row
        # Mixed backward: fp32 x (residual stream) with bf16/fp16 grad_out.
        for gdt in (bf, hf):
            for wdt in (gdt, f32):
                check_rms_mixed(129, 2048, gdt, wdt)
                check_rms_mixed(3, 40960, gdt, wdt, gres=False)
                check_rms_mixed(5, 1001, gdt, wdt)

    # Fused add + RMSNorm: residual in the input dtype or fp32, in place or not.
    if fused:
        for dt, rdt in pairs:
            wd = f32 if rdt == f32 and dt != f32 else dt
            for M, N in ((300, 64), (257, 1024), (9, 8192), (5, 24576), (3, 40968)):
                check_fused(M, N, dt, rdt, wd, off=1.0 if N == 1024 else 0.0)
            check_fused(7, 1003, dt, rdt, dt)
            check_fused(9, 2048, dt, rdt, None, aligned=False)
            check_fused(65, 1024, dt, rdt, wd, inplace=True)
            check_fused(33, 768, dt, rdt, wd, inplace=True, noncontig=True)

    # LayerNorm fwd + bwd.
    if ln:
        for dt, wdt in pairs:
            for M, N in ((300, 64), (257, 1024), (17, 8192)):
                check_ln(M, N, dt, wdt)
            check_ln(7, 1003, dt, wdt)
            check_ln(9, 1024, dt, wdt, aligned=False)
        for dt in singles:
            check_ln(5, 24576, dt, dt)                    # fwd ITEMS=8; bwd re-reading
            check_ln(3, 40968, dt, dt)                    # re-reading
            check_ln(33, 2048, dt, dt, has_w=False, has_b=True)
            check_ln(33, 2048, dt, dt, has_w=True, has_b=False)
            check_ln(33, 2048, dt, dt, has_w=False, has_b=False)
            check_ln(4096, 256, dt, dt)
        check_ln(64, 4096, f32, f32, shift=1e3)           # stable variance with a large mean
        check_ln(3, 16384, bf, bf)                        # bwd: shared accumulators too big -> re-read

    # Norm + quantize: each norm kind, register and re-reading rows, aligned or not, every
    # quant dtype and scale mode.
    if quant:
        qdts = (torch.float8_e4m3fn, torch.int8) if quick else (
            torch.float8_e4m3fn, torch.float8_e5m2, torch.int8)
        for kind in ("rms", "fused", "ln"):
            for qdt in qdts:
                for mode in ("static", "token", "group"):
                    check_quant(33, 1024, bf, kind, qdt, mode)
                check_quant(3, 24576, bf, kind, qdt, "token")
            check_quant(7, 1088, f32, kind, torch.float8_e4m3fn, "group", aligned=False)
            check_quant(5, 4096, hf, kind, torch.int8, "token", aligned=False)

    # Channels-first norms. Kernel paths (csrc/cuda/channels_first_kernels.cu): packed rows
    # (S % 4 == 0, 2 for fp64, and aligned) or scalar (odd S, misaligned pointer); channels
    # cached in registers or streamed (fwd: C > 2048, scalar bf16/fp16 C > 1024; bwd:
    # C > 768, scalar bf16/fp16 and fp32 C > 384 / 768); one tile or several per backward block
    # (many rows); C = 1. channels_last inputs take the row kernels.
    if norm2d:
        for kind in ("rms", "ln"):
            for dt, wdt in pairs:
                check_norm2d(kind, (3, 96, 8, 8), dt, wdt)            # packed, cached
                check_norm2d(kind, (2, 40, 7, 7), dt, wdt)            # scalar (S = 49)
                check_norm2d(kind, (2, 3000, 2, 2), dt, wdt)          # packed, streamed
                check_norm2d(kind, (2, 1500, 3), dt, wdt)             # scalar, streamed
                check_norm2d(kind, (2, 64, 8, 8), dt, wdt, aligned=False)
            for dt in singles:
                check_norm2d(kind, (2, 1, 5, 5), dt, dt)              # C = 1
                check_norm2d(kind, (2, 96, 7, 7, 3), dt, dt)          # 3 spatial dims
                check_norm2d(kind, (2, 96, 8, 8), dt, dt, channels_last=True)
                check_norm2d(kind, (2, 96, 8, 8), dt, dt, has_w=False, has_b=False)
                check_norm2d(kind, (2, 96, 8, 8), dt, dt, has_w=False)
            # Many rows: several tiles per backward block (streamed too for C = 1024).
            check_norm2d(kind, (4, 16, 128, 128) if quick else (16, 32, 128, 128), bf, f32)
            check_norm2d(kind, (4, 1024, 24, 24) if quick else (8, 1024, 32, 32), bf, bf)
            if not quick:
                check_norm2d(kind, (32, 96, 56, 56), bf, bf)          # ConvNeXt stage 1

    # Gated RMSNorm (csrc/cuda/norm_fwd_rows.cuh over segments of G): bf16 G = 1024 (register,
    # ITEMS=4), G = 64 of N = 1024 (sub-warp segments), G = 40960 (re-reading), odd G and a
    # misaligned pointer (scalar); gate first keeps z in fp32.
    if gated:
        for nbg in (True, False):
            for act in (("silu",) if quick else ("silu", "sigmoid")):
                check_gated(9, 1024, bf, f32, 1024, nbg, act)
                check_gated(9, 1024, bf, bf, 64, nbg, act)
                check_gated(2, 40960, bf, None, 40960, nbg, act)
                check_gated(5, 1003, f32, f32, 1003, nbg, act)
                check_gated(5, 1024, hf, hf, 256, nbg, act, aligned=False)
                if not quick:
                    check_gated(5, 512, f64, f64, 128, nbg, act)

    # adaLN modulation (the row kernels with scale / shift of each sample as operands):
    # register rows, re-reading rows (bf16 N > 8192 with operands), scalar (odd N,
    # misaligned), fp32 scale next to bf16 data, no shift.
    if modulate:
        for kind in ("rms", "layer"):
            check_modulate(2, 7, 1024, bf, f32, kind)
            check_modulate(2, 3, 1024, f32, f32, kind, shift=False)
            check_modulate(2, 2, 12288, bf, bf, kind)
            check_modulate(3, 5, 1003, f32, f32, kind)
            check_modulate(2, 4, 512, hf, f32, kind, aligned=False)
            if not quick:
                check_modulate(2, 3, 256, f64, f64, kind)

    check_empty()
    if DEV == "cuda":
        torch.cuda.synchronize()
    return list(failures)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Check every CUDA kernel path against float64.")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="every path, fewer dtype combinations (for compute-sanitizer)")
    ap.add_argument("--device", default="cuda",
                    help="cuda (default); cpu checks this harness on the CPU kernels")
    ap.add_argument("--family", default=None,
                    help="comma list of op families to check, of " + ", ".join(FAMILIES) +
                    " (default: all there are kernels for on the device)")
    args = ap.parse_args(argv)
    families = None
    if args.family is not None:
        families = tuple(f for f in args.family.split(",") if f)
        if not families or any(f not in FAMILIES for f in families):
            ap.error(f"--family takes a comma list of {', '.join(FAMILIES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (use --device cpu to check the harness)")
        return 2
    bad = run_all(args.device, args.quick, args.verbose, families)
    print(f"{checks} checks, {len(bad)} failures")
    for f in bad:
        print("  " + f)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
