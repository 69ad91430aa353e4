"""Norm + quantize ops (rms_norm_quant, fused_add_rms_norm_quant, layer_norm_quant) against
the float64 definition: every dequantized element within one quantization step of
quantize(y64 / s), dynamic scales equal to the float64 definition within fp32 rounding."""
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

import rmsnorm_ext as R
from reference import (QUANT_MAX, QUANT_MIN_SCALE, default_eps, ln_ref, quant_scales_ref,
                       quant_step, quantize_ref, rms_ref)

OPS = torch.ops.rmsnorm_ext
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CUDA = torch.cuda.is_available()
QDTYPES = [torch.float8_e4m3fn, torch.float8_e5m2, torch.int8]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NORMS = ["rms", "fused", "layer"]
MODES = ["static", "token", "group", "token_ub"]
# (leading shape, normalized_shape, group_size): odd N, N = 1, multi-dim normalized shape,
# a DeepSeek-style 128 group, a group that is not a multiple of the vector width.
SHAPES = [((5,), (33,), 11), ((7,), (1,), 1), ((2, 3), (256,), 128), ((3,), (4096,), 128),
          ((2, 2), (4, 16), 16), ((4,), (200,), 40)]


def _y64(norm, x, ns, w, b, eps, offset, h=None):
    """The norm's output in float64 (for the fused op, of h as returned)."""
    if norm == "layer":
        return ln_ref(x, ns, w, b, 1e-5 if eps is None else eps)
    src = h if norm == "fused" else x
    e = default_eps(src.dtype) if eps is None else eps
    return rms_ref(src, ns, w, e, offset)


def run(norm, x, ns, w=None, b=None, eps=None, offset=0.0, r=None, **q):
    """Calls the public function; returns (out, scales, h or None)."""
    if norm == "rms":
        return (*R.rms_norm_quant(x, ns, w, eps, weight_offset=offset, **q), None)
    if norm == "fused":
        return R.fused_add_rms_norm_quant(x, r, ns, w, eps, weight_offset=offset, **q)
    return (*R.layer_norm_quant(x, ns, w, b, 1e-5 if eps is None else eps, **q), None)


def check_quant(out, scales, y64, quant_dtype, *, scale=None, group=None, scale_ub=None,
                what=""):
    """out/scales from our op; y64 the float64 norm output of the same shape."""
    n = out.shape[-1] if y64.dim() else 1
    lead = tuple(scales.shape[:-1]) if scale is None else None
    m = y64.numel() // max(y64.shape[-1], 1) if y64.numel() else 0
    n = y64.shape[-1]
    y = y64.reshape(m, n)
    assert out.dtype == quant_dtype and out.shape == y64.shape and out.is_contiguous()
    g = n if group is None else group
    if scale is not None:
        assert scales.dtype == torch.float32 and scales.shape == scale.shape
        assert torch.equal(scales.cpu(), scale.cpu())
        assert scales.data_ptr() != scale.data_ptr(), "scales must be a copy of scale"
        s = torch.full((m, n // g), scale.item(), dtype=torch.float64)
    else:
        assert scales.dtype == torch.float32
        assert scales.shape == (*y64.shape[:-1], n // g), (scales.shape, y64.shape, g)
        assert lead == tuple(y64.shape[:-1])
        s = scales.reshape(m, n // g).double().cpu()
        s_ref = quant_scales_ref(y, quant_dtype, g, scale_ub)
        assert torch.equal(s.isnan(), s_ref.isnan()), f"{what}: NaN scales differ"
        ok = ~s_ref.isnan()
        # y is computed in fp32 (a few ulps from y64): the scale is within fp32 rounding of it
        torch.testing.assert_close(s[ok], s_ref[ok], rtol=2e-6 * 8, atol=0, msg=what)
    z = y.reshape(m, n // g, g) / s.unsqueeze(-1)
    q = out.reshape(m, n // g, g).cpu()
    qf = q.double() if quant_dtype == torch.int8 else q.float().double()
    nan = z.isnan()
    if quant_dtype == torch.int8:
        assert (qf[nan] == 0).all(), f"{what}: NaN must quantize to 0 in int8"
    else:
        assert torch.equal(qf.isnan(), nan), f"{what}: NaN positions differ"
    ref = quantize_ref(z[~nan], quant_dtype)
    got = qf[~nan]
    step = quant_step(torch.maximum(ref.abs(), got.abs()), quant_dtype)
    err = (got - ref).abs()
    assert (err <= step).all(), (f"{what}: {(err > step).sum().item()} elements more than one "
                                 f"step off; worst {err.max().item()}")
    return s


def _inputs(norm, lead, ns, dtype, wdtype, device, scale=1.0, offset=0.3):
    x = (torch.randn(*lead, *ns, device=device) * scale + offset).to(dtype)
    r = None
    if norm == "fused":
        rdtype = torch.float32 if wdtype == torch.float32 else dtype
        r = torch.randn(*lead, *ns, device=device).to(rdtype)
    w = None if wdtype is None else (torch.randn(ns, device=device) * 0.5 + 1).to(wdtype)
    b = None if (wdtype is None or norm != "layer") else torch.randn(ns, device=device).to(wdtype)
    return x, r, w, b


def _q_kwargs(mode, quant_dtype, group, device, y64=None):
    kw = {"quant_dtype": quant_dtype}
    if mode == "static":
        # Some elements saturate: the scale maps 0.7 * absmax to qmax.
        amax = 1.0 if y64 is None else max(y64[~y64.isnan()].abs().max().item(), 1e-3)
        kw["scale"] = torch.tensor([0.7 * amax / QUANT_MAX[quant_dtype]], device=device)
    elif mode == "group":
        kw["group_size"] = group
    elif mode == "token_ub":
        amax = 1.0 if y64 is None else max(y64[~y64.isnan()].abs().max().item(), 1e-3)
        kw["scale_ub"] = torch.tensor(0.5 * amax, device=device)  # bounds some rows
    return kw


def _check_call(norm, x, ns, w, b, r, mode, quant_dtype, group, device, eps=None, offset=0.0,
                what=""):
    if norm == "fused":
        h_ref = (x.double() + r.double()).to(r.dtype)
        y64 = _y64(norm, x, ns, w, b, eps, offset, h=h_ref)
    else:
        y64 = _y64(norm, x, ns, w, b, eps, offset)
    kw = _q_kwargs(mode, quant_dtype, group, device, y64)
    out, scales, h = run(norm, x, ns, w, b, eps, offset, r=r, **kw)
    if norm == "fused":
        assert h.dtype == r.dtype and h.shape == r.shape
        torch.testing.assert_close(h, h_ref, rtol=0, atol=0)
    lead_shape = y64.shape[:y64.dim() - len(ns)]
    y64 = y64.reshape(*lead_shape, -1) if len(ns) > 1 else y64
    out = out.reshape(*lead_shape, -1) if len(ns) > 1 else out
    if scales.dim() and kw.get("scale") is None:
        assert scales.shape[:-1] == lead_shape
    check_quant(out, scales, y64.cpu(), quant_dtype, scale=kw.get("scale"),
                group=kw.get("group_size"), scale_ub=kw.get("scale_ub"), what=what)


# ---------------------------------------------------------------------------------------
# numerics

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("quant_dtype", QDTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", NORMS)
def test_matches_float64_reference(device, norm, dtype, quant_dtype, mode):
    wdtypes = [None, dtype] + ([torch.float32] if dtype != torch.float32 else [])
    for lead, ns, group in SHAPES:
        for wdtype in wdtypes:
            x, r, w, b = _inputs(norm, lead, ns, dtype, wdtype, device)
            offset = 0.5 if (norm != "layer" and wdtype is not None) else 0.0
            _check_call(norm, x, ns, w, b, r, mode, quant_dtype, group, device, offset=offset,
                        what=f"{norm} {dtype} {quant_dtype} {mode} {ns} w={wdtype}")


@pytest.mark.parametrize("quant_dtype", QDTYPES)
def test_conversion_is_exact(device, quant_dtype):
    """With x all ones and eps = 0, y == weight exactly: the static-scale-1 output is the
    conversion of arbitrary fp32 values, compared bit for bit with torch's (after the clamp
    the issue specifies: saturation to +-qmax, NaN -> NaN for fp8 / 0 for int8)."""
    n = 1 << 16
    bits = torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32)
    w = bits.view(torch.float32)
    w = torch.where(w.abs() < 1e6, w, torch.randn(n) * 300)
    qmax = QUANT_MAX[quant_dtype]
    special = [0.0, -0.0, qmax, -qmax, qmax * 1.01, -qmax * 1e3, float("inf"), -float("inf"),
               float("nan"), 1e-30, 2.0 ** -10, 3 * 2.0 ** -11, 2.0 ** -17, 5 * 2.0 ** -17,
               0.5, 1.5, 2.5, -2.5, 3.5, 126.5, 127.5, -127.5, -128.5, 104.0, 432.0, 440.0,
               464.0, 61440.0, 49152.0 + 4096.0]
    # every fp8 value and every midpoint between neighbours (the ties)
    if quant_dtype != torch.int8:
        allv = torch.arange(256, dtype=torch.uint8).view(quant_dtype).float()
        allv = allv[allv.isfinite()].sort().values
        special += allv.tolist() + ((allv[1:] + allv[:-1]) / 2).tolist()
    else:
        special += [k + 0.5 for k in range(-130, 130)]
    special = torch.tensor(special, dtype=torch.float32)
    w[:special.numel()] = special
    x = torch.ones(3, n, device=device)
    out, _ = R.rms_norm_quant(x, (n,), w.to(device), 0.0, scale=torch.ones(1, device=device),
                              quant_dtype=quant_dtype)
    if quant_dtype == torch.int8:
        ref = torch.round(w.clamp(-128, 127)).nan_to_num(0.0).to(torch.int8)
    else:
        ref = w.clamp(-qmax, qmax).to(quant_dtype)
    got = out.cpu().view(torch.uint8)
    exp = ref.view(torch.uint8).expand_as(got)
    bad = got != exp
    assert not bad.any(), (w[bad[0]][:8], got[0][bad[0]][:8], exp[0][bad[0]][:8])


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_y_is_not_rounded_to_the_input_dtype(norm, dtype):
    """On CPU y is computed exactly as the unquantized op computes it for the same values in
    float32: the static-scale output equals quantize(norm(x.float())) bit for bit."""
    x = torch.randn(6, 300).to(dtype)
    w = torch.randn(300)
    b = torch.randn(300)
    s = torch.tensor([0.01])
    eps = torch.finfo(dtype).eps
    if norm == "rms":
        out, _ = R.rms_norm_quant(x, 300, w, eps, scale=s, weight_offset=0.25)
        y = R.rms_norm(x.float(), 300, w, eps, weight_offset=0.25)
    else:
        out, _ = R.layer_norm_quant(x, 300, w, b, 1e-5, scale=s)
        y = R.layer_norm(x.float(), 300, w, b, 1e-5)
    ref = (y * (1.0 / s)).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))


@pytest.mark.parametrize("quant_dtype", QDTYPES)
@pytest.mark.parametrize("norm", NORMS)
def test_zero_rows(device, norm, quant_dtype):
    """A zero row: the dynamic scale clamps to the minimum and the output is all zero."""
    x = torch.zeros(3, 64, device=device)
    r = torch.zeros_like(x) if norm == "fused" else None
    for kw in ({}, {"group_size": 16}):
        out, scales, _ = run(norm, x, (64,), r=r, quant_dtype=quant_dtype, **kw)
        assert (scales == QUANT_MIN_SCALE[quant_dtype]).all()
        assert (out.float() == 0).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("quant_dtype", QDTYPES)
@pytest.mark.parametrize("norm", NORMS)
def test_nan_and_inf_rows(device, norm, quant_dtype, mode):
    """As documented: a NaN in y (from a NaN or Inf input) makes its row's or group's dynamic
    scale NaN, and its elements NaN (fp8) or 0 (int8); other rows and groups are unaffected.
    No crash, nothing written out of bounds."""
    x = torch.randn(4, 64, device=device)
    x[0, 5] = float("nan")
    x[1, 40] = float("inf")
    x[2, 0] = -float("inf")
    r = torch.randn_like(x) if norm == "fused" else None
    h = None if r is None else x + r
    y64 = _y64(norm, x, (64,), None, None, None, 0.0, h=h)
    kw = _q_kwargs(mode, quant_dtype, 16, device, y64[3:])
    out, scales, _ = run(norm, x, (64,), r=r, **kw)
    check_quant(out, scales, y64.cpu(), quant_dtype, scale=kw.get("scale"),
                group=kw.get("group_size"), scale_ub=kw.get("scale_ub"), what="nan/inf")
    if mode != "static":
        assert scales[0].isnan().any() and not scales[3].isnan().any()


@pytest.mark.parametrize("norm", NORMS)
def test_strided_inputs(device, norm):
    """Non-contiguous, offset and expanded inputs give the contiguous result."""
    base = torch.randn(8, 2 * 96, device=device)
    x = base[1:, ::2]  # strided and offset
    r = torch.randn(96, device=device).expand(7, 96) if norm == "fused" else None
    wb = torch.randn(2 * 96, device=device)
    w = wb[::2]
    for kw in ({}, {"group_size": 32, "quant_dtype": torch.int8},
               {"scale": torch.tensor([0.01], device=device)}):
        got = run(norm, x, (96,), w, w if norm == "layer" else None, r=r, **kw)
        exp = run(norm, x.contiguous(), (96,), w.contiguous(),
                  w.contiguous() if norm == "layer" else None,
                  r=None if r is None else r.contiguous(), **kw)
        for a, e in zip(got, exp):
            if a is not None:
                assert torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a,
                                   e.view(torch.uint8) if e.element_size() == 1 else e)


@pytest.mark.parametrize("norm", NORMS)
def test_empty_sizes(device, norm):
    for lead, ns in (((0,), (64,)), ((0, 3), (8,)), ((3,), (0,))):
        x = torch.randn(*lead, *ns, device=device)
        r = torch.randn_like(x) if norm == "fused" else None
        out, scales, h = run(norm, x, ns, r=r)
        assert out.shape == x.shape and out.dtype == torch.float8_e4m3fn
        assert scales.shape == (*lead, 1)
        assert (scales == QUANT_MIN_SCALE[torch.float8_e4m3fn]).all()
        if ns == (0,):
            continue
        out, scales, h = run(norm, x, ns, r=r, group_size=4)
        assert scales.shape == (*lead, ns[0] // 4)
        out, scales, h = run(norm, x, ns, r=r, scale=torch.ones(1, device=device))
        assert scales.shape == (1,)


def test_fused_equals_add_then_quantize(device):
    """fused_add_rms_norm_quant == rms_norm_quant(input + residual) with the residual_out of
    fused_add_rms_norm, bf16 input with an fp32 residual stream."""
    x = torch.randn(5, 256, device=device).bfloat16()
    r = torch.randn(5, 256, device=device)
    w = torch.randn(256, device=device)
    for kw in ({}, {"group_size": 64}, {"scale": torch.tensor([0.02], device=device)}):
        out, scales, h = R.fused_add_rms_norm_quant(x, r, 256, w, **kw)
        _, h2 = R.fused_add_rms_norm(x, r, 256, w)
        assert torch.equal(h, h2) and h.dtype == torch.float32
        out2, scales2 = R.rms_norm_quant(h2, 256, w, torch.finfo(torch.float32).eps, **kw)
        assert torch.equal(out.view(torch.uint8), out2.view(torch.uint8))
        assert torch.equal(scales, scales2)


# ---------------------------------------------------------------------------------------
# errors: same type and message on CPU and on meta tensors (the fake kernels)

def _bad_cases():
    x = torch.randn(4, 64)
    s = torch.ones(1)
    return [
        ("rms", dict(x=x.double()), TypeError, "input must be float32, bfloat16 or float16"),
        ("layer", dict(x=x.int()), TypeError, "input must be float32, bfloat16 or float16"),
        ("rms", dict(quant_dtype=torch.uint8), TypeError, "quant_dtype must be"),
        ("layer", dict(quant_dtype=torch.float16), TypeError, "quant_dtype must be"),
        ("fused", dict(quant_dtype=torch.float8_e4m3fnuz), TypeError, "quant_dtype must be"),
        ("rms", dict(scale=s.double()), TypeError, "scale must be a float32 tensor"),
        ("rms", dict(scale=torch.ones(2)), ValueError, "scale must have exactly one element"),
        ("layer", dict(scale=torch.ones(1, 2)), ValueError, "exactly one element"),
        ("fused", dict(scale_ub=torch.ones(3)), ValueError, "scale_ub must have exactly one"),
        ("rms", dict(scale_ub=torch.ones(1, dtype=torch.bfloat16)), TypeError,
         "scale_ub must be a float32 tensor"),
        ("rms", dict(scale=s, group_size=16), ValueError, "static scale cannot be combined"),
        ("layer", dict(scale=s, scale_ub=s), ValueError, "scale_ub bounds dynamic scales"),
        ("rms", dict(group_size=7), ValueError, "group_size 7 does not divide the normalized "
                                                "size 64"),
        ("fused", dict(group_size=0), ValueError, "group_size must be positive"),
        ("layer", dict(group_size=-4), ValueError, "group_size must be positive"),
        ("rms", dict(ns=(63,)), ValueError, "normalized_shape"),
        ("rms", dict(w=torch.randn(64).double()), TypeError, "dtype"),
        ("layer", dict(b=torch.randn(32)), ValueError, "bias must have shape"),
        ("fused", dict(r=torch.randn(4, 32)), ValueError, "residual shape"),
        ("rms", dict(eps=-1.0), ValueError, "eps must be"),
        ("rms", dict(offset=float("inf")), ValueError, "weight_offset must be finite"),
    ]


def _call_bad(norm, device, case):
    x = case.get("x", torch.randn(4, 64)).to(device)
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()
          if k in ("scale", "scale_ub", "group_size", "quant_dtype")}
    r = case.get("r", torch.randn(4, 64) if norm == "fused" else None)
    r = None if r is None else r.to(device)
    w = case.get("w")
    b = case.get("b")
    ns = case.get("ns", (64,))
    return run(norm, x, ns, None if w is None else w.to(device),
               None if b is None else b.to(device), case.get("eps"), case.get("offset", 0.0),
               r=r, **kw)


@pytest.mark.parametrize("norm,case,exc,match", _bad_cases())
def test_bad_inputs_cpu_and_meta_agree(norm, case, exc, match):
    errors = {}
    for device in ["cpu", "meta"] + (["cuda"] if HAS_CUDA else []):
        with pytest.raises(exc, match=re.escape(match)) as ei:
            _call_bad(norm, device, case)
        errors[device] = str(ei.value).split("\n")[0]
    quant_specific = any(k in case for k in ("x", "scale", "scale_ub", "group_size",
                                             "quant_dtype"))
    if quant_specific:  # our own checks: the very same text everywhere
        msgs = set(errors.values())
        assert len(msgs) == 1, errors
        assert next(iter(msgs)).startswith("rmsnorm_ext: "), errors


def test_scale_on_another_device():
    x = torch.randn(4, 64)
    with pytest.raises(RuntimeError, match="scale is on meta but the input is on cpu"):
        R.rms_norm_quant(x, 64, scale=torch.ones(1, device="meta"))
    with pytest.raises(RuntimeError, match="scale_ub is on meta but the input is on cpu"):
        R.layer_norm_quant(x, 64, scale_ub=torch.ones(1, device="meta"))


def test_grad_mode_is_refused():
    x = torch.randn(4, 64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    r = torch.randn(4, 64)
    calls = [lambda: R.rms_norm_quant(x, 64), lambda: R.rms_norm_quant(x.detach(), 64, w),
             lambda: R.fused_add_rms_norm_quant(r, x, 64),
             lambda: R.layer_norm_quant(r, 64, None, w)]
    raw = [lambda: OPS.rms_norm_quant(x, [64], None, 1e-6, 0.0, None, torch.int8, None, None),
           lambda: OPS.layer_norm_quant(r, [64], w, None, 1e-5, None, torch.int8, None, None),
           lambda: OPS.fused_add_rms_norm_quant(x, r, [64], None, 1e-6, 0.0, None, torch.int8,
                                                None, None)]
    for c in calls + raw:
        with pytest.raises(RuntimeError, match="inference-only"):
            c()
        with torch.no_grad():
            outs = c()
        assert all(not o.requires_grad and o.grad_fn is None for o in outs)
        with torch.inference_mode():
            c()


def test_opcheck_every_op(device):
    x = torch.randn(3, 40, device=device)
    r = torch.randn(3, 40, device=device)
    w = torch.randn(40, device=device)
    s = torch.tensor([0.01], device=device)
    ub = torch.tensor(2.0, device=device)
    cases = []
    for q in QDTYPES:
        for sc, g, u in ((s, None, None), (None, None, None), (None, 8, None), (None, None, ub),
                         (None, 10, ub)):
            cases.append((OPS.rms_norm_quant.default, (x, [40], w, 1e-6, 0.5, sc, q, g, u)))
            cases.append((OPS.fused_add_rms_norm_quant.default,
                          (x.bfloat16(), r, [40], w, 1e-6, 0.0, sc, q, g, u)))
            cases.append((OPS.layer_norm_quant.default, (x, [40], w, w, 1e-5, sc, q, g, u)))
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_compile_fullgraph(device):
    torch._dynamo.reset()

    def step(x, r, w, b, s):
        q1, s1 = R.rms_norm_quant(x, (64,), w, scale=s)
        q2, s2, h = R.fused_add_rms_norm_quant(x, r, (64,), w, group_size=16,
                                               quant_dtype=torch.int8)
        q3, s3 = R.layer_norm_quant(h, (64,), w, b, quant_dtype=torch.float8_e5m2)
        return q1, s1, q2, s2, h, q3, s3

    x = torch.randn(2, 5, 64, device=device)
    r = torch.randn(2, 5, 64, device=device)
    w = torch.randn(64, device=device)
    b = torch.randn(64, device=device)
    s = torch.tensor([0.02], device=device)
    compiled = torch.compile(step, fullgraph=True)
    with torch.no_grad():
        got = compiled(x, r, w, b, s)
        exp = step(x, r, w, b, s)
    for a, e in zip(got, exp):
        if a.element_size() == 1:
            assert torch.equal(a.view(torch.uint8), e.view(torch.uint8))
        else:
            assert torch.equal(a, e)
    # dynamic row count: no recompile-per-shape failure, still exact
    x2, r2 = torch.randn(7, 64, device=device), torch.randn(7, 64, device=device)
    with torch.no_grad():
        got = compiled(x2, r2, w, b, s)
        exp = step(x2, r2, w, b, s)
    assert torch.equal(got[2], exp[2]) and torch.equal(got[3], exp[3])


def test_meta_shapes():
    x = torch.empty(2, 3, 128, device="meta", dtype=torch.bfloat16)
    w = torch.empty(128, device="meta")
    out, s = R.rms_norm_quant(x, 128, w, group_size=32, quant_dtype=torch.int8)
    assert out.shape == x.shape and out.dtype == torch.int8 and s.shape == (2, 3, 4)
    out, s, h = R.fused_add_rms_norm_quant(x, x.float(), 128, w)
    assert s.shape == (2, 3, 1) and h.dtype == torch.float32
    out, s = R.layer_norm_quant(x, (3, 128), scale=torch.empty(1, device="meta"))
    assert s.shape == (1,) and out.dtype == torch.float8_e4m3fn


def test_every_quant_op_has_a_kernel_for_each_built_backend():
    keys = ["CPU", "Autograd"] + (["CUDA"] if R.build_info()["cuda"] else [])
    for name in ("rms_norm_quant", "fused_add_rms_norm_quant", "layer_norm_quant"):
        for key in keys:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rmsnorm_ext::{name}", key)


# ---------------------------------------------------------------------------------------
# README example (the benchmark's smoke test is in tests/test_benchmarks.py)

def test_readme_python_blocks_run():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    quant = [b for b in blocks if "_quant" in b]
    assert quant, "README has no quantization example"
    for block in quant:
        exec(compile(block, "README.md", "exec"), {})


# ---------------------------------------------------------------------------------------
# CUDA only

cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")


@cuda_only
@pytest.mark.parametrize("norm", NORMS)
def test_cuda_graph_capture_static_scale(norm):
    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(8, 4096, device="cuda") if norm == "fused" else None
    w = torch.randn(4096, device="cuda")
    s = torch.tensor([0.01], device="cuda")
    run(norm, x, 4096, w, r=r, scale=s)  # warm up
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(g):
        out, scales, _ = run(norm, x, 4096, w, r=r, scale=s)
    x.copy_(torch.randn_like(x))
    s.fill_(0.02)  # the scale is read on the device at replay time
    g.replay()
    torch.cuda.synchronize()
    exp, escales, _ = run(norm, x, 4096, w, r=None if r is None else r, scale=s)
    assert torch.equal(out.view(torch.uint8), exp.view(torch.uint8))
    assert torch.equal(scales, escales)


@cuda_only
@pytest.mark.parametrize("quant_dtype", QDTYPES)
def test_cuda_matches_cpu(quant_dtype):
    """Shapes that hit each CUDA path: register kernel, long rows (re-reading), unaligned."""
    for n, group in ((4096, 128), (5120, 128), (65536, 128), (33, 11), (4100, 4)):
        base = torch.randn(5, n + 1, dtype=torch.bfloat16)
        x = base[:, 1:]  # misaligned rows
        for mode in ("token", "group", "static"):
            kw = _q_kwargs(mode, quant_dtype, group, "cpu")
            oc, sc, _ = run("rms", x, n, **kw)
            og, sg, _ = run("rms", x.cuda(), n,
                            **{k: (v.cuda() if isinstance(v, torch.Tensor) else v)
                               for k, v in kw.items()})
            y64 = _y64("rms", x, (n,), None, None, None, 0.0)
            check_quant(og.cpu(), sg.cpu(), y64, quant_dtype, scale=kw.get("scale"),
                        group=kw.get("group_size"), what=f"cuda {n} {mode}")
