"""Float64 references and the accuracy bar shared by the tests.

The bar: our max error against the float64 reference is at most a small multiple of
torch's own error in the same dtype, plus a couple of rounding steps of the output
(torch's error can be ~0 where it happens to compute exactly what the reference does).
"""
import math

import torch
import torch.nn.functional as F

import rmsnorm_ext

# True in the test build whose CPU tensors run the CUDA kernels on the emulator
# (.ci/cuda_emulation.sh). Two different CPU kernels share their row reductions, so some tests
# compare them bit for bit; two different CUDA kernels lay a row out over threads differently
# and sum in another order: there the same comparison allows a few rounding steps.
CUDA_KERNELS_ON_CPU = rmsnorm_ext.build_info()["cuda_emulation"]


def assert_same_kernel_result(a, b, ulps=4):
    """Bitwise for the CPU kernels; within `ulps` of the dtype's epsilon for the CUDA kernels."""
    if not CUDA_KERNELS_ON_CPU:
        assert torch.equal(a, b)
        return
    eps = torch.finfo(a.dtype).eps
    torch.testing.assert_close(a, b, rtol=ulps * eps, atol=ulps * eps)


def default_eps(dtype):
    """RMSNorm's eps=None, as torch computes it: the epsilon of its math type for `dtype`
    (float32 for float32 / bfloat16 / float16, float64 for float64), not `dtype`'s own."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def rms_ref(x, normalized_shape, weight=None, eps=None, weight_offset=0.0):
    eps = default_eps(x.dtype) if eps is None else eps
    x64 = x.double()
    dims = tuple(range(-len(normalized_shape), 0))
    y = x64 * torch.rsqrt(x64.pow(2).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * (weight.double() + weight_offset)
    return y


def ln_ref(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    w = None if weight is None else weight.double()
    b = None if bias is None else bias.double()
    return F.layer_norm(x.double(), normalized_shape, w, b, eps)


# Row-wise references with their statistics (last dim normalized), for the kernel-path
# checks of tests/cuda_paths.py: forward (y, stats) and backward (dx, dweight[, dbias]).

def rms_rows_ref(x, w, eps, off):
    xd = x.double()
    rstd = 1.0 / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
    y = xd * rstd
    if w is not None:
        y = y * (off + w.double())
    return y, rstd.squeeze(-1)


def rms_rows_bwd_ref(dy, x, rstd, w, off, gres):
    xd, dyd, r = x.double(), dy.double(), rstd.double().unsqueeze(-1)
    g = dyd * (off + w.double()) if w is not None else dyd
    dx = r * (g - xd * r * r * (g * xd).mean(-1, keepdim=True))
    if gres is not None:
        dx = dx + gres.double()
    dw = (dyd * xd * r).reshape(-1, x.shape[-1]).sum(0) if w is not None else None
    return dx, dw


def ln_rows_ref(x, w, b, eps):
    xd = x.double()
    mean = xd.mean(-1, keepdim=True)
    var = (xd - mean).pow(2).mean(-1, keepdim=True)
    rstd = 1.0 / torch.sqrt(var + eps)
    y = (xd - mean) * rstd
    if w is not None:
        y = y * w.double()
    if b is not None:
        y = y + b.double()
    return y, mean.squeeze(-1), rstd.squeeze(-1)


def ln_rows_bwd_ref(dy, x, mean, rstd, w):
    xd, dyd = x.double(), dy.double()
    m, r = mean.double().unsqueeze(-1), rstd.double().unsqueeze(-1)
    xh = (xd - m) * r
    g = dyd * w.double() if w is not None else dyd
    dx = r * (g - g.mean(-1, keepdim=True) - xh * (g * xh).mean(-1, keepdim=True))
    dw = (dyd * xh).reshape(-1, x.shape[-1]).sum(0)
    db = dyd.reshape(-1, x.shape[-1]).sum(0)
    return dx, dw, db


def gated_rms_norm_reference(x, g, normalized_shape, w, eps, group_size, norm_before_gate,
                             activation):
    """Gated RMSNorm as a plain torch composite, computed in the dtype of its arguments
    (float64 arguments: the reference; the input's dtype: torch's own error there).
    a = act(g); norm_before_gate: y = x * rstd(x) * w * a; otherwise z = x * a and
    y = z * rstd(z) * w. The RMS is over each contiguous group of group_size elements of
    the normalized (flattened) dims."""
    ns = tuple(normalized_shape)
    n = math.prod(ns)
    lead = x.shape[:x.dim() - len(ns)]
    a = F.silu(g) if activation == "silu" else torch.sigmoid(g)
    z = x if norm_before_gate else x * a
    zg = z.reshape(*lead, n // group_size, group_size)
    y = (zg * torch.rsqrt(zg.pow(2).mean(-1, keepdim=True) + eps)).reshape(x.shape)
    if w is not None:
        y = y * w
    if norm_before_gate:
        y = y * a
    return y


def modulation_view(s, x):
    """scale / shift of an adaLN modulation ([B, D], [B, 1, ..., D], [1, D] or [D]) as a tensor
    that broadcasts against x [B, ..., D]: one vector per sample, or one for all rows."""
    bs = s.shape[0] if s.dim() >= 2 else 1
    return s.reshape((bs,) + (1,) * (x.dim() - 2) + (x.shape[-1],))


def modulate_reference(x, scale, shift, w, b, eps, kind, dtype=torch.float64):
    """adaLN modulation as a composite: norm(x) * (1 + scale) + shift, every operand cast to
    `dtype`. kind: "rms" (weight) or "layer" (weight and bias). float64: the reference, with
    the norm written out (two-pass variance: x - mean is exactly 0 for a row of one element,
    where F.layer_norm's float64 kernel leaves a rounding error that rstd = 1/sqrt(eps)
    magnifies); any other dtype: torch's own result, F.rms_norm / F.layer_norm.
    Differentiable: the backward reference is torch.autograd on it."""
    def cast(t):
        return None if t is None else t.to(dtype)

    xd = x.to(dtype)
    d = x.shape[-1]
    assert kind == "layer" or b is None, "RMSNorm has no bias"
    if dtype == torch.float64:
        if kind == "layer":
            xd = xd - xd.mean(-1, keepdim=True)
        yn = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
        if w is not None:
            yn = yn * cast(w)
        if b is not None:
            yn = yn + cast(b)
    elif kind == "rms":
        yn = F.rms_norm(xd, (d,), cast(w), eps)
    else:
        yn = F.layer_norm(xd, (d,), cast(w), cast(b), eps)
    y = yn * (1 + modulation_view(cast(scale), x))
    if shift is not None:
        y = y + modulation_view(cast(shift), x)
    return y


def max_err(a, ref):
    if a.numel() == 0:
        return 0.0
    return (a.double() - ref).abs().max().item()


def assert_accurate(ours, ref, torch_same_dtype=None, dtype=None, factor=2.0, ulps=2.0,
                    what="", scale=None):
    """ours: our result; ref: float64 reference; torch_same_dtype: torch's result in the
    same dtype (None where torch has no such computation). scale: the magnitude one
    rounding step is taken of; max|ref| by default, the sum of the magnitudes of the
    terms for a sum over rows (a reduction's error grows with its terms, not its result)."""
    dtype = dtype or ours.dtype
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    assert not ours.isnan().any() or ref.isnan().any(), f"{what}: NaN in output"
    if scale is None:
        scale = ref.abs().max().item() if ref.numel() else 0.0
    eps = torch.finfo(dtype).eps
    if dtype == torch.float64:
        # The float64 reference rounds like we do: allow a few hundred ulps (~6e-14).
        bound = 256 * eps * max(scale, 1.0)
    else:
        bound = ulps * eps * scale
        if torch_same_dtype is not None:
            bound += factor * max_err(torch_same_dtype, ref)
    err = max_err(ours, ref)
    assert err <= bound, f"{what}: max error {err:.3e} > bound {bound:.3e} ({dtype})"


def poison_allocator(device, nbytes):
    """Hand memory full of NaN back to the allocator, so an output allocated next from
    that memory shows any element the kernel failed to write."""
    t = torch.full((max(nbytes // 4, 1),), float("nan"), dtype=torch.float32, device=device)
    del t


def reduction_scale(dy, xhat, n):
    """max over columns of sum over rows |dy * xhat|: the scale of a weight gradient."""
    return (dy.double().abs() * xhat.double().abs()).reshape(-1, n).sum(0).max().item()


# ---------------------------------------------------------------------------------------
# Norm + quantize: the float64 definition of the scales and of the quantized values.

QUANT_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0, torch.int8: 127.0}
QUANT_MIN_SCALE = {torch.float8_e4m3fn: 1.0 / (448.0 * 512.0),
                   torch.float8_e5m2: 1.0 / (57344.0 * 512.0),
                   torch.int8: torch.finfo(torch.float32).eps}
# (mantissa bits, exponent of the smallest normal) of the fp8 formats
_FP8 = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}


def quant_scales_ref(y64, quant_dtype, group, scale_ub=None):
    """Dynamic scales of y64 [M, N] per group of `group` elements: [M, N // group], float64.
    NaN in a group gives a NaN scale."""
    m, n = y64.shape
    amax = y64.reshape(m, n // group, group).abs().amax(-1)
    if scale_ub is not None:
        amax = torch.minimum(amax, scale_ub.double().reshape(()))
    return torch.clamp(amax / QUANT_MAX[quant_dtype], min=QUANT_MIN_SCALE[quant_dtype])


def quantize_ref(z, quant_dtype):
    """quantize(z) of float64 values already divided by the scale, as float64 values."""
    if quant_dtype == torch.int8:
        return torch.round(z.clamp(-128.0, 127.0))
    qmax = QUANT_MAX[quant_dtype]
    return z.clamp(-qmax, qmax).float().to(quant_dtype).double()


def quant_step(v, quant_dtype):
    """The spacing of quant_dtype's values at magnitude |v| (elementwise)."""
    if quant_dtype == torch.int8:
        return torch.ones_like(v)
    mb, emin = _FP8[quant_dtype]
    e = torch.floor(torch.log2(v.abs().clamp(min=2.0 ** emin)))
    return torch.exp2(e - mb)


# ---------------------------------------------------------------------------------------
# Fused QK-norm + RoPE

def rope_reference(u, cos, sin, interleaved):
    """The rotary embedding of u [..., S, H, D] with cos/sin [S, D] or [B, S, D] (B the
    product of u's leading dims), each output element using the cos/sin entries of its own
    index: rotate-half out = u * cos + cat(-u[D/2:], u[:D/2]) * sin; interleaved (GPT-J)
    out = u * cos + rot * sin with rot[2i] = -u[2i+1], rot[2i+1] = u[2i]."""
    s_len, d = u.shape[-3], u.shape[-1]
    lead = u.shape[:-3]
    if cos.dim() == 3 and cos.shape[0] == 1:  # [1, S, D]: shared by the batch
        cos, sin = cos[0], sin[0]
    if cos.dim() == 2:
        c, s = cos[:, None, :], sin[:, None, :]
    else:
        c = cos.reshape(*lead, s_len, 1, d)
        s = sin.reshape(*lead, s_len, 1, d)
    if interleaved:
        rot = torch.stack((-u[..., 1::2], u[..., 0::2]), -1).flatten(-2)
    else:
        rot = torch.cat((-u[..., d // 2:], u[..., :d // 2]), -1)
    return u * c + rot * s


def qk_norm_rope_reference(q, k, qw, kw, cos, sin, eps, interleaved):
    """Fused QK-norm + RoPE as a plain torch composite, computed in the dtype of its
    arguments (float64 arguments: the reference; the input's dtype: torch's own error
    there): each head vector v of q [..., S, Hq, D] and k [..., S, Hk, D] is normalized,
    u = v * rsqrt(mean(v^2) + eps) * w (w = ones when None), then rotated
    (rope_reference). Returns (q_out, k_out)."""
    def one(x, w):
        u = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        if w is not None:
            u = u * w
        return rope_reference(u, cos, sin, interleaved)

    return one(q, qw), one(k, kw)
