"""Core correctness of every op against float64 references, on every device."""
import pathlib
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

import rmsnorm_ext
from reference import assert_accurate, default_eps, ln_ref, poison_allocator, reduction_scale, rms_ref

OPS = torch.ops.rmsnorm_ext
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (leading shape, normalized_shape): odd sizes, N=1, 3-D input, multi-dim normalized shape.
SHAPES = [((7,), (1,)), ((5,), (33,)), ((2, 3), (769,)), ((4,), (4096,)), ((3,), (5125,)),
          ((2, 2), (4, 16)), ((0,), (64,))]


def _param_dtypes(dtype):
    """None: no weight; then the input's dtype; float32 for reduced-precision inputs."""
    out = [None, dtype]
    if dtype in (torch.bfloat16, torch.float16):
        out.append(torch.float32)
    return out


def _make(lead, ns, dtype, device, scale=1.0, offset=0.5):
    x = (torch.randn(*lead, *ns, device=device) * scale + offset).to(dtype)
    return x


def _torch_rms(x, ns, w, eps=None):
    """torch's own result in the input dtype (the baseline error)."""
    if w is not None and w.dtype != x.dtype:
        w = w.to(x.dtype)
    return F.rms_norm(x, ns, w, eps)


def _torch_ln(x, ns, w, b, eps=1e-5):
    if w is not None and w.dtype != x.dtype:
        w = w.to(x.dtype)
    if b is not None and b.dtype != x.dtype:
        b = b.to(x.dtype)
    return F.layer_norm(x, ns, w, b, eps)


# ---------------------------------------------------------------------------- forward

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,ns", SHAPES)
def test_rms_norm_forward(device, dtype, lead, ns):
    for wdtype in _param_dtypes(dtype):
        x = _make(lead, ns, dtype, device)
        w = None if wdtype is None else torch.randn(ns, device=device).to(wdtype)
        poison_allocator(device, x.numel() * x.element_size())
        y = rmsnorm_ext.rms_norm(x, ns, w)
        assert y.dtype == dtype and y.shape == x.shape and y.device == x.device
        assert_accurate(y, rms_ref(x, ns, w), _torch_rms(x, ns, w), what=f"rms w={wdtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,ns", SHAPES)
def test_layer_norm_forward(device, dtype, lead, ns):
    for wdtype in _param_dtypes(dtype):
        for with_bias in (False, True):
            x = _make(lead, ns, dtype, device, offset=3.0)  # a mean to subtract
            w = None if wdtype is None else torch.randn(ns, device=device).to(wdtype)
            b = torch.randn(ns, device=device).to(wdtype or dtype) if with_bias else None
            poison_allocator(device, x.numel() * x.element_size())
            y = rmsnorm_ext.layer_norm(x, ns, w, b)
            assert y.dtype == dtype and y.shape == x.shape
            assert_accurate(y, ln_ref(x, ns, w, b), _torch_ln(x, ns, w, b),
                            what=f"ln w={wdtype} b={with_bias}")


def test_statistics_outputs(device):
    x = torch.randn(3, 5, 64, device=device)
    y, rstd = OPS.rms_norm_fwd(x, [64], None, 1e-6, 0.0)
    assert rstd.shape == (3, 5) and rstd.dtype == torch.float32
    ref = torch.rsqrt(x.double().pow(2).mean(-1) + 1e-6)
    torch.testing.assert_close(rstd.double(), ref, rtol=1e-6, atol=0)
    y, mean, rstd = OPS.layer_norm_fwd(x, [5, 64], None, None, 1e-5)
    assert mean.shape == (3,) and rstd.shape == (3,)
    torch.testing.assert_close(mean.double(), x.double().mean((-2, -1)), rtol=1e-5, atol=1e-6)
    y64, rstd64 = OPS.rms_norm_fwd(x.double(), [64], None, 1e-6, 0.0)
    assert rstd64.dtype == torch.float64


def test_default_eps_is_finfo_eps(device):
    x = torch.randn(4, 32, device=device, dtype=torch.float64) * 1e-7  # eps matters here
    torch.testing.assert_close(rmsnorm_ext.rms_norm(x, (32,)), F.rms_norm(x, (32,)))
    torch.testing.assert_close(rmsnorm_ext.rms_norm(x, 32, eps=0.5), F.rms_norm(x, (32,), eps=0.5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_default_eps_is_torchs(device, dtype):
    """eps=None is the epsilon torch's rms_norm uses: float32's for bfloat16 / float16 input
    too (its math type's), not the input dtype's (0.0078 for bfloat16, which moved 71% of a
    bfloat16 [64, 4096] norm's outputs). Small rows, where eps dominates, through every
    route that takes eps=None: the function (fast path and op), the module, its
    TorchScript form, the fused add, and compile."""
    x = torch.full((3, 8), 1e-2, device=device).to(dtype)
    x[1] = torch.linspace(-3e-3, 5e-3, 8)
    x[2] = torch.randn(8) * 1e-2
    want = F.rms_norm(x, (8,))
    assert want[0, 0].item() > 0.99  # with bfloat16's eps it would be 0.11
    mod = rmsnorm_ext.RMSNorm(8, device=device, dtype=dtype)
    routes = {
        "function": lambda: rmsnorm_ext.rms_norm(x, (8,)),
        "function, needs grad": lambda: rmsnorm_ext.rms_norm(x.clone().requires_grad_(), (8,)),
        "module": lambda: mod(x),
        "scripted module": lambda: torch.jit.script(mod)(x),
        "fused add": lambda: rmsnorm_ext.fused_add_rms_norm(x, torch.zeros_like(x), (8,))[0],
        "compiled": lambda: torch.compile(lambda t: rmsnorm_ext.rms_norm(t, (8,)),
                                          fullgraph=True)(x),
    }
    for name, f in routes.items():
        got = f()
        torch.testing.assert_close(got, want, atol=0, rtol=2 * torch.finfo(dtype).eps,
                                   msg=lambda m: f"{name}: {m}")


def test_weight_offset_in_fp32(device):
    # Gemma: y = x * rstd * (1 + w) with the addition in fp32 even for a bf16 weight.
    x = torch.randn(6, 256, device=device, dtype=torch.bfloat16)
    w = (torch.randn(256, device=device) * 1e-3).to(torch.bfloat16)  # near 0, as Gemma stores
    y = rmsnorm_ext.rms_norm(x, (256,), w, weight_offset=1.0)
    ref = rms_ref(x, (256,), w, weight_offset=1.0)
    bf16_add = F.rms_norm(x, (256,), (1 + w))  # the lossy way: 1 + w rounded in bf16
    assert_accurate(y, ref, bf16_add, what="gemma offset")


# ---------------------------------------------------------------------------- backward

def _grads(fn, inputs, grad_out):
    out = fn(*inputs)
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(out, wanted, grad_out)


def _leaf(t, requires_grad=True):
    return None if t is None else t.detach().clone().requires_grad_(requires_grad)


BWD_SHAPES = [((9,), (1,)), ((5, 3), (33,)), ((6,), (769,)), ((4,), (4096,)), ((3,), (5125,)),
              ((2, 2), (4, 16))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,ns", BWD_SHAPES)
def test_rms_norm_backward(device, dtype, lead, ns):
    for wdtype in _param_dtypes(dtype):
        x = _make(lead, ns, dtype, device)
        w = None if wdtype is None else (torch.randn(ns, device=device) + 1).to(wdtype)
        dy = torch.randn(x.shape, device=device).to(dtype)
        # eps=None (torch's default, 1.2e-7) except for one-element rows, whose dx is
        # g * eps / (x^2 + eps) * rstd: formed as g - xhat * (xhat * g), a difference of
        # nearly equal fp32 numbers, which leaves ours and torch's alike with no correct
        # bits for |x| >> sqrt(eps). A larger eps keeps that case's indexing tested.
        e = None if torch.Size(ns).numel() > 1 else 1e-2
        ours = _grads(lambda a, b: rmsnorm_ext.rms_norm(a, ns, b, e), (_leaf(x), _leaf(w)), dy)
        eps = default_eps(dtype) if e is None else e  # torch's default for the input dtype
        ref = _grads(lambda a, b: rms_ref(a, ns, b, eps), (_leaf(x.double()), _leaf(
            None if w is None else w.double())), dy.double())
        wt = None if w is None else w.to(dtype)
        base = _grads(lambda a, b: _torch_rms(a, ns, b, e), (_leaf(x), _leaf(wt)), dy)
        n = torch.Size(ns).numel()
        dw_scale = reduction_scale(dy, rms_ref(x, ns), n)
        for name, o, r, b in zip(("dx", "dw"), ours, ref, base):
            assert o.dtype == (dtype if name == "dx" else wdtype)
            assert_accurate(o, r, b, dtype=dtype, what=f"rms {name} w={wdtype}",
                            scale=None if name == "dx" else dw_scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,ns", BWD_SHAPES)
def test_layer_norm_backward(device, dtype, lead, ns):
    for wdtype in _param_dtypes(dtype):
        x = _make(lead, ns, dtype, device, offset=2.0)
        w = None if wdtype is None else (torch.randn(ns, device=device) + 1).to(wdtype)
        b = None if wdtype is None else torch.randn(ns, device=device).to(wdtype)
        dy = torch.randn(x.shape, device=device).to(dtype)
        ours = _grads(lambda a, c, d: rmsnorm_ext.layer_norm(a, ns, c, d),
                      (_leaf(x), _leaf(w), _leaf(b)), dy)
        ref = _grads(lambda a, c, d: ln_ref(a, ns, c, d),
                     tuple(_leaf(None if t is None else t.double()) for t in (x, w, b)),
                     dy.double())
        cast = [None if t is None else t.to(dtype) for t in (w, b)]
        base = _grads(lambda a, c, d: _torch_ln(a, ns, c, d), (_leaf(x), *map(_leaf, cast)), dy)
        n = torch.Size(ns).numel()
        scales = (None, reduction_scale(dy, ln_ref(x, ns), n),
                  reduction_scale(dy, torch.ones_like(dy), n))
        for name, o, r, bs, sc in zip(("dx", "dw", "db"), ours, ref, base, scales):
            assert_accurate(o, r, bs, dtype=dtype, what=f"ln {name} w={wdtype}", scale=sc)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_grad_large_m(device, dtype):
    # M >> N: the parameter-gradient reduction across rows dominates.
    x = torch.randn(4099, 96, device=device).to(dtype)
    w = torch.randn(96, device=device).to(dtype)
    dy = torch.randn(x.shape, device=device).to(dtype)
    _, dw = _grads(lambda a, b: rmsnorm_ext.rms_norm(a, (96,), b), (_leaf(x), _leaf(w)), dy)
    eps = default_eps(dtype)
    _, dw_ref = _grads(lambda a, b: rms_ref(a, (96,), b, eps), (_leaf(x.double()), _leaf(w.double())),
                       dy.double())
    _, dw_t = _grads(lambda a, b: F.rms_norm(a, (96,), b), (_leaf(x), _leaf(w)), dy)
    assert_accurate(dw, dw_ref, dw_t, dtype=dtype, what="dw large M",
                    scale=reduction_scale(dy, rms_ref(x, (96,)), 96))


def test_gradcheck_float64(device):
    x = torch.randn(3, 2, 17, dtype=torch.float64, device=device, requires_grad=True)
    r = torch.randn(3, 2, 17, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(17, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(17, dtype=torch.float64, device=device, requires_grad=True)
    w2 = torch.randn(2, 17, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: rmsnorm_ext.rms_norm(x, (17,), w), (x, w))
    assert torch.autograd.gradcheck(lambda x: rmsnorm_ext.rms_norm(x, (2, 17)), (x,))
    assert torch.autograd.gradcheck(
        lambda x, w: rmsnorm_ext.rms_norm(x, (2, 17), w, weight_offset=1.0), (x, w2))
    assert torch.autograd.gradcheck(lambda x, w, b: rmsnorm_ext.layer_norm(x, (17,), w, b),
                                    (x, w, b))
    assert torch.autograd.gradcheck(lambda x, b: rmsnorm_ext.layer_norm(x, (17,), None, b),
                                    (x, b))
    assert torch.autograd.gradcheck(
        lambda x, r, w: rmsnorm_ext.fused_add_rms_norm(x, r, (17,), w, weight_offset=0.5),
        (x, r, w))


def test_frozen_weight_gets_no_grad(device):
    x = torch.randn(8, 64, device=device, requires_grad=True)
    w = torch.randn(64, device=device)  # requires_grad=False
    rmsnorm_ext.rms_norm(x, (64,), w).sum().backward()
    assert w.grad is None and x.grad is not None
    # The backward op skips the weight reduction entirely when it is not wanted.
    y, rstd = OPS.rms_norm_fwd(x.detach(), [64], w, 1e-6, 0.0)
    dx, dw = OPS.rms_norm_bwd(torch.ones_like(y), x.detach(), rstd, w, [64], 0.0, None, False)
    assert dw.numel() == 0
    dx, dw, db = OPS.layer_norm_bwd(torch.ones_like(y), x.detach(), rstd, rstd, w, [64],
                                    False, False)
    assert dw.numel() == 0 and db.numel() == 0


def test_empty_rows(device):
    x = torch.randn(0, 3, 64, device=device, requires_grad=True)
    w = torch.randn(64, device=device, requires_grad=True)
    b = torch.randn(64, device=device, requires_grad=True)
    for fn in (lambda: rmsnorm_ext.rms_norm(x, (64,), w),
               lambda: rmsnorm_ext.layer_norm(x, (64,), w, b)):
        y = fn()
        assert y.shape == x.shape
        y.sum().backward()
        assert torch.equal(w.grad, torch.zeros_like(w))
        w.grad = None


def test_large_row(device):
    n = 262144
    x = torch.randn(3, n, device=device)
    w = torch.randn(n, device=device)
    b = torch.randn(n, device=device)
    assert_accurate(rmsnorm_ext.rms_norm(x, (n,), w), rms_ref(x, (n,), w), F.rms_norm(x, (n,), w))
    assert_accurate(rmsnorm_ext.layer_norm(x, (n,), w, b), ln_ref(x, (n,), w, b),
                    F.layer_norm(x, (n,), w, b))
    dy = torch.randn_like(x)
    ours = _grads(lambda a, c: rmsnorm_ext.rms_norm(a, (n,), c), (_leaf(x), _leaf(w)), dy)
    eps = torch.finfo(torch.float32).eps
    ref = _grads(lambda a, c: rms_ref(a, (n,), c, eps), (_leaf(x.double()), _leaf(w.double())),
                 dy.double())
    base = _grads(lambda a, c: F.rms_norm(a, (n,), c), (_leaf(x), _leaf(w)), dy)
    for o, r, bs in zip(ours, ref, base):
        assert_accurate(o, r, bs)


@pytest.mark.parametrize("dtype,lead", [(torch.float32, 2049), (torch.bfloat16, 4099)])
def test_large_fresh_outputs(device, dtype, lead):
    # Outputs of 8 MiB and more: the CPU kernels back their pages in chunks of rows ahead of
    # the stores (csrc/cpu/prefault.h). Rows of 1031 elements straddle pages and chunks.
    n = 1031
    x = _make((lead,), (n,), dtype, device, offset=1.0)
    w = (torch.randn(n, device=device) + 1).to(dtype)
    b = torch.randn(n, device=device).to(dtype)
    dy = torch.randn(x.shape, device=device).to(dtype)
    eps = default_eps(dtype)
    ours = _grads(lambda a, c: rmsnorm_ext.rms_norm(a, (n,), c), (_leaf(x), _leaf(w)), dy)
    ref = _grads(lambda a, c: rms_ref(a, (n,), c, eps), (_leaf(x.double()), _leaf(w.double())),
                 dy.double())
    base = _grads(lambda a, c: F.rms_norm(a, (n,), c, eps), (_leaf(x), _leaf(w)), dy)
    assert_accurate(rmsnorm_ext.rms_norm(x, (n,), w), rms_ref(x, (n,), w, eps),
                    F.rms_norm(x, (n,), w, eps), what="rms y")
    assert_accurate(ours[0], ref[0], base[0], what="rms dx")
    ours = _grads(lambda a, c, d: rmsnorm_ext.layer_norm(a, (n,), c, d),
                  (_leaf(x), _leaf(w), _leaf(b)), dy)
    ref = _grads(lambda a, c, d: ln_ref(a, (n,), c, d),
                 tuple(_leaf(t.double()) for t in (x, w, b)), dy.double())
    base = _grads(lambda a, c, d: F.layer_norm(a, (n,), c, d), (_leaf(x), _leaf(w), _leaf(b)), dy)
    assert_accurate(rmsnorm_ext.layer_norm(x, (n,), w, b), ln_ref(x, (n,), w, b),
                    F.layer_norm(x, (n,), w, b), what="ln y")
    assert_accurate(ours[0], ref[0], base[0], what="ln dx")
    # fused add: y and residual_out are both fresh outputs
    r = torch.randn(x.shape, device=device).to(dtype)
    y, h = rmsnorm_ext.fused_add_rms_norm(x, r, (n,), w, eps)
    h_ref = (x.double() + r.double()).to(dtype)
    assert torch.equal(h, h_ref)
    assert_accurate(y, rms_ref(h_ref, (n,), w, eps), F.rms_norm(h_ref, (n,), w, eps),
                    what="fused y")
    if torch.device(device).type == "cpu":  # exact agreement is a CPU-kernel property
        # fused add + quantize: residual_out fresh too; equals the unfused add-then-quantize
        q, s, h = rmsnorm_ext.fused_add_rms_norm_quant(x, r, (n,), w, eps)
        q_ref, s_ref = rmsnorm_ext.rms_norm_quant(h_ref, (n,), w, eps)
        assert torch.equal(h, h_ref) and torch.equal(s, s_ref)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


# ---------------------------------------------------------------------------- fused add

@pytest.mark.parametrize("dtype,rdtype", [(torch.float32, torch.float32),
                                          (torch.bfloat16, torch.bfloat16),
                                          (torch.float16, torch.float16),
                                          (torch.bfloat16, torch.float32),
                                          (torch.float64, torch.float64)])
@pytest.mark.parametrize("n", [1, 769, 4096])
def test_fused_add_matches_unfused(device, dtype, rdtype, n):
    x = torch.randn(5, n, device=device).to(dtype)
    r = torch.randn(5, n, device=device).to(rdtype)
    w = torch.randn(n, device=device).to(dtype)
    dy = torch.randn(5, n, device=device).to(dtype)
    dh = torch.randn(5, n, device=device).to(rdtype)

    def fused(a, b, c):
        return rmsnorm_ext.fused_add_rms_norm(a, b, (n,), c, weight_offset=0.25)

    def unfused(a, b, c):  # the sum rounds to the residual dtype first, as stored
        h = (a.to(rdtype) + b) if rdtype != dtype else a + b
        return rmsnorm_ext.rms_norm(h, (n,), c.to(h.dtype), weight_offset=0.25).to(dtype), h

    (yf, hf), (yu, hu) = fused(x, r, w), unfused(x, r, w)
    assert yf.dtype == dtype and hf.dtype == rdtype
    assert torch.equal(hf, hu)
    torch.testing.assert_close(yf, yu, atol=0, rtol=2 * torch.finfo(dtype).eps)
    leaves_f = [_leaf(t) for t in (x, r, w)]
    yf, hf = fused(*leaves_f)
    gf = torch.autograd.grad((yf, hf), leaves_f, (dy, dh))
    leaves_u = [_leaf(t) for t in (x, r, w)]
    yu, hu = unfused(*leaves_u)
    gu = torch.autograd.grad((yu, hu), leaves_u, (dy, dh))
    for name, a, b in zip(("dx", "dr", "dw"), gf, gu):
        assert a.dtype == b.dtype, name
        tol = 4 * torch.finfo(dtype).eps
        torch.testing.assert_close(a.double(), b.double(), rtol=tol,
                                   atol=tol * b.double().abs().max().item(), msg=name)


def test_bfloat16_store_rounding(device):
    """Every bfloat16 output is its fp32 value rounded once, to nearest-even: residual_out of
    the fused add is exactly fp32(x) + fp32(r) rounded, so it checks the store conversion
    itself -- ties, carries into the exponent, overflow to inf, NaN. The avx512bf16 CPU build
    rounds with the BF16 instruction, which reads a subnormal float as zero: there (and only
    there) a subnormal result is stored as zero, as README documents."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2**16, (4096, 64), generator=g, dtype=torch.int32).to(torch.int16)
    x = bits.view(torch.bfloat16)
    # partners that make exact ties and carries: x + r with r a half-ulp of x, and tiny r
    r = torch.where(torch.rand(x.shape, generator=g) < 0.5,
                    (x.float() * 2.0**-8).bfloat16(), torch.randn(x.shape, generator=g).bfloat16())
    x = torch.cat([x, torch.tensor([[3e38, -3e38, float("nan"), 1e-38, -1e-38, 2e-39,
                                     -2e-39, 6e-39] * 8], dtype=torch.bfloat16)])
    r = torch.cat([r, torch.tensor([[3e38, -3e38, 1.0, 1e-39, -1e-39, 2e-39, -2e-39,
                                     -5e-39] * 8], dtype=torch.bfloat16)])
    x, r = x.to(device), r.to(device)
    _, h = rmsnorm_ext.fused_add_rms_norm(x, r, (64,), None, 1e-6)
    want = (x.float() + r.float()).bfloat16()
    same = (h.float() == want.float()) | (h.isnan() & want.isnan())
    tiny = want.float().abs() < torch.finfo(torch.float32).tiny
    flushed = tiny & (h.float() == 0)
    if device == "cpu" and rmsnorm_ext.build_info()["cpu_isa"] == "avx512bf16":
        assert bool((same | flushed).all()), (h[~(same | flushed)], want[~(same | flushed)])
        assert bool(flushed[tiny & (want.float() != 0)].all())
    else:
        assert bool(same.all()), (h[~same], want[~same])
    assert int(tiny.sum()) > 0 and int(want.isinf().sum()) > 0 and int(want.isnan().sum()) > 0


def test_fused_add_inplace(device):
    x = torch.randn(6, 300, device=device, dtype=torch.bfloat16)
    r = torch.randn(6, 300, device=device, dtype=torch.float32)
    w = torch.randn(300, device=device, dtype=torch.bfloat16)
    y_ref, h_ref = rmsnorm_ext.fused_add_rms_norm(x, r, (300,), w)
    xi, ri = x.clone(), r.clone()
    with torch.no_grad():
        out = rmsnorm_ext.fused_add_rms_norm_(xi, ri, (300,), w)
    assert out[0] is xi and out[1] is ri
    assert torch.equal(xi, y_ref) and torch.equal(ri, h_ref)
    # Non-contiguous arguments are written back in place.
    xt = x.t().contiguous().t()
    rt = r.t().contiguous().t()
    with torch.no_grad():
        rmsnorm_ext.fused_add_rms_norm_(xt, rt, (300,), w)
    assert torch.equal(xt, y_ref) and torch.equal(rt, h_ref)
    with pytest.raises(RuntimeError, match="not differentiable"):
        rmsnorm_ext.fused_add_rms_norm_(x.clone().requires_grad_(), r.clone(), (300,), w)


# ---------------------------------------------------------------------------- layouts

def test_non_contiguous_expanded_offset_inputs(device):
    base = torch.randn(64, 40, device=device)
    w = torch.randn(64, device=device)
    b = torch.randn(64, device=device)
    cases = {
        "transposed": base.t(),                                   # [40, 64], strided
        "sliced": torch.randn(40, 130, device=device)[:, 3:67],   # row stride 130
        "offset": torch.randn(40 * 64 + 1, device=device)[1:].view(40, 64),  # misaligned
        "expanded": torch.randn(1, 64, device=device).expand(40, 64),     # stride 0
    }
    for name, x in cases.items():
        assert_accurate(rmsnorm_ext.rms_norm(x, (64,), w), rms_ref(x, (64,), w),
                        F.rms_norm(x, (64,), w), what=name)
        assert_accurate(rmsnorm_ext.layer_norm(x, (64,), w, b), ln_ref(x, (64,), w, b),
                        F.layer_norm(x, (64,), w, b), what=name)
        xl = _leaf(x.contiguous())
        dy = torch.randn(x.shape, device=device).t().contiguous().t()  # strided grad too
        ours = torch.autograd.grad(rmsnorm_ext.rms_norm(xl, (64,), w), xl, dy)[0]
        xr = _leaf(x.double())
        ref = torch.autograd.grad(rms_ref(xr, (64,), w, torch.finfo(torch.float32).eps), xr,
                                  dy.double())[0]
        assert_accurate(ours, ref, torch.autograd.grad(F.rms_norm(xl, (64,), w), xl, dy)[0],
                        what=name + " dx")
    # A weight that is itself a strided view.
    ws = torch.randn(128, device=device)[::2]
    x = torch.randn(5, 64, device=device)
    assert_accurate(rmsnorm_ext.rms_norm(x, (64,), ws), rms_ref(x, (64,), ws),
                    F.rms_norm(x, (64,), ws))


# ---------------------------------------------------------------------------- modules

def test_modules_are_drop_ins(device):
    for ours_cls, theirs_cls, kw in ((rmsnorm_ext.RMSNorm, torch.nn.RMSNorm, {}),
                                     (rmsnorm_ext.LayerNorm, torch.nn.LayerNorm, {}),
                                     (rmsnorm_ext.LayerNorm, torch.nn.LayerNorm, {"bias": False}),
                                     (rmsnorm_ext.RMSNorm, torch.nn.RMSNorm,
                                      {"elementwise_affine": False})):
        ours = ours_cls((4, 32), 1e-5, device=device, **kw)
        theirs = theirs_cls((4, 32), 1e-5, device=device, **kw)
        assert ours.extra_repr() == theirs.extra_repr()
        assert repr(ours) == "rmsnorm_ext." + repr(theirs)  # the repr names ours
        with torch.no_grad():
            for p in theirs.parameters():
                p.uniform_(-1, 1)
        ours.load_state_dict(theirs.state_dict())
        theirs.load_state_dict(ours.state_dict())
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        x = torch.randn(3, 4, 32, device=device)
        torch.testing.assert_close(ours(x), theirs(x))
        assert isinstance(ours, theirs_cls)
    m = rmsnorm_ext.RMSNorm(16, weight_offset=1.0)
    assert torch.equal(m.weight, torch.zeros(16)) and "weight_offset=1.0" in repr(m)
    x = torch.randn(2, 16)
    torch.testing.assert_close(m(x), F.rms_norm(x, (16,)))


def test_module_dtype_device_args():
    m = rmsnorm_ext.RMSNorm(8, dtype=torch.bfloat16)
    assert m.weight.dtype == torch.bfloat16
    m = rmsnorm_ext.LayerNorm([2, 8], eps=1e-3, dtype=torch.float64)
    assert m.bias.dtype == torch.float64 and m.eps == 1e-3


# ---------------------------------------------------------------------------- torch.compile

def test_compile_fullgraph_forward_backward(device):
    torch._dynamo.reset()

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.n1 = rmsnorm_ext.RMSNorm(64, device=device)
            self.n2 = rmsnorm_ext.LayerNorm(64, device=device)
            self.lin = torch.nn.Linear(64, 64, device=device)

        def forward(self, x, r):
            y, h = rmsnorm_ext.fused_add_rms_norm(x, r, (64,), self.n1.weight)
            return self.n2(self.lin(self.n1(y))) + h

    torch.manual_seed(1)
    eager = Block()
    twin = Block()
    twin.load_state_dict(eager.state_dict())
    compiled = torch.compile(twin, fullgraph=True)
    x = torch.randn(6, 64, device=device, requires_grad=True)
    r = torch.randn(6, 64, device=device, requires_grad=True)
    ye = eager(x, r)
    ge = torch.autograd.grad(ye.sum(), [x, r, *eager.parameters()])
    yc = compiled(x, r)
    gc = torch.autograd.grad(yc.sum(), [x, r, *compiled.parameters()])
    torch.testing.assert_close(yc, ye)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


def test_compile_inplace_fused(device):
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def step(x, r, w):
        rmsnorm_ext.fused_add_rms_norm_(x, r, (32,), w)
        return x * 2, r

    x = torch.randn(4, 32, device=device)
    r = torch.randn(4, 32, device=device)
    w = torch.randn(32, device=device)
    y_ref, h_ref = rmsnorm_ext.fused_add_rms_norm(x, r, (32,), w)
    with torch.no_grad():
        out, res = step(x, r, w)
    torch.testing.assert_close(out, 2 * y_ref)
    torch.testing.assert_close(x, y_ref)
    torch.testing.assert_close(r, h_ref)


# ---------------------------------------------------------------------------- registration

def _sample_args(device):
    x = torch.randn(3, 40, device=device, requires_grad=True)
    r = torch.randn(3, 40, device=device, requires_grad=True)
    w = torch.randn(40, device=device, requires_grad=True)
    b = torch.randn(40, device=device, requires_grad=True)
    y, rstd = OPS.rms_norm_fwd(x.detach(), [40], w.detach(), 1e-6, 0.5)
    _, mean, lrstd = OPS.layer_norm_fwd(x.detach(), [40], w.detach(), b.detach(), 1e-5)
    dy = torch.randn_like(y)
    return {
        OPS.rms_norm_fwd.default: [(x, [40], w, 1e-6, 0.5), (x, [40], None, 1e-6, 0.0)],
        OPS.rms_norm_bwd.default: [(dy, x.detach(), rstd, w.detach(), [40], 0.5, None, True),
                                   (dy, x.detach(), rstd, None, [40], 0.0, dy, False)],
        OPS.layer_norm_fwd.default: [(x, [40], w, b, 1e-5), (x, [40], None, None, 1e-5)],
        OPS.layer_norm_bwd.default: [(dy, x.detach(), mean, lrstd, w.detach(), [40], True, True)],
        OPS.fused_add_rms_norm_fwd.default: [(x, r, [40], w, 1e-6, 1.0)],
        OPS.fused_add_rms_norm_inplace.default: [
            (x.detach().clone(), r.detach().clone(), [40], w.detach(), 1e-6, 0.0)],
    }


def test_opcheck_every_op(device):
    for op, arglists in _sample_args(device).items():
        for args in arglists:
            torch.library.opcheck(op, args)


def _library_ops():
    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("rmsnorm_ext::"))


def test_every_op_has_a_kernel_for_each_built_backend():
    """Every op of the library (each host file defines and registers its own) has its host
    function for CPU, Meta and, in a CUDA build, CUDA."""
    names = _library_ops()
    assert {"rms_norm_fwd", "layer_norm_bwd", "gated_rms_norm_fwd", "qk_norm_rope_bwd",
            "norm_modulate_bwd", "layer_norm_2d_fwd", "rms_norm_quant"} <= set(names), names
    info = rmsnorm_ext.build_info()
    keys = ["CPU", "Meta"] + (["CUDA"] if info["cuda"] else [])
    for name in names:
        for key in keys:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rmsnorm_ext::{name}", key), \
                (name, key)
    if info["cuda"]:
        assert info["cuda_archs"], info


def test_every_kernel_tag_has_its_device_kernels():
    """Each kernel tag of csrc/kernel_params.h has its slot filled by a CPU kernel file (and
    by a CUDA one in a CUDA build): a kernel file that forgets its registration line is
    caught here, not by a user's first call."""
    import re
    src = (pathlib.Path(__file__).resolve().parents[1] / "csrc" / "kernel_params.h").read_text()
    tags = re.findall(r"^RMSNORM_EXT_KERNEL\((\w+),", src, re.M)
    assert len(tags) >= 12, tags
    info = rmsnorm_ext.build_info()
    want = ["cpu"] + (["cuda"] if info["cuda"] else [])
    if info["cuda_emulation"]:  # .ci/cuda_emulation.sh: the CUDA kernels only
        want = ["cuda"]
    assert sorted(info["kernels"]) == sorted(tags), (sorted(info["kernels"]), sorted(tags))
    for tag in tags:
        assert info["kernels"][tag] == want, (tag, info["kernels"][tag])


def test_build_info():
    info = rmsnorm_ext.build_info()
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert info["cpu_isa"] in ("avx512bf16", "avx512", "avx2", "default")
    for key in ("compiler", "openmp", "cuda", "cuda_archs", "num_threads"):
        assert key in info
    # The C++ runtime must be the shared libstdc++.so.6: a static copy beside the one torch
    # loads crashed the process on formatted error messages (setup.py _shared_cxx_runtime).
    assert info["libstdcxx"] == "shared", info


@pytest.mark.parametrize("built,cpu,lacks,takes", [
    ("avx512bf16", {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"},
     "avx512_bf16", "avx512"),
    ("avx512bf16", {"avx2", "fma", "f16c"}, "avx512f", "avx2"),
    ("avx512", {"avx2", "fma", "f16c"}, "avx512bw", "avx2"),
    ("avx2", {"sse4_2"}, "avx2", "default"),
])
def test_import_refuses_a_build_the_cpu_cannot_run(monkeypatch, built, cpu, lacks, takes):
    """Loading a build whose vector ISA the CPU lacks would die of SIGILL: the import check
    raises instead, naming what is missing and the level this CPU takes."""
    from rmsnorm_ext import _build_config, _loader
    monkeypatch.setattr(_build_config, "CPU_ISA", built)
    monkeypatch.setattr(_loader, "_cpu_flags", lambda: set(cpu))
    with pytest.raises(ImportError, match=lacks) as e:
        _loader._check_cpu_isa()
    assert f"RMSNORM_EXT_CPU_ISA={takes}" in str(e.value)
    monkeypatch.setattr(_loader, "_cpu_flags", lambda: set(cpu) | {
        "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx2", "fma", "f16c"})
    _loader._check_cpu_isa()


def _cxx_so(tmp_path, name, *flags):
    src = tmp_path / "f.cpp"
    src.write_text('#include <sstream>\n#include <string>\n'
                   'std::string f(long v) { std::ostringstream o; o << v; return o.str(); }\n')
    out = tmp_path / name
    subprocess.run([shutil.which("c++") or "g++", "-shared", "-fPIC", str(src), "-o", str(out),
                    *flags], check=True, capture_output=True, timeout=120)
    return str(out)


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="no C++ compiler")
def test_cxx_runtime_detection(tmp_path):
    """The import-time check tells a shared C++ runtime from a static copy."""
    from rmsnorm_ext import _elf, _loader
    shared = _cxx_so(tmp_path, "shared.so")
    static = _cxx_so(tmp_path, "static.so", "-static-libstdc++")
    assert "libstdc++.so.6" in _elf.needed_libraries(shared)
    assert _elf.cxx_runtime(shared) == "shared"
    assert _elf.cxx_runtime(static) == "static copy"
    assert _elf.cxx_runtime(str(tmp_path / "f.cpp")) == "unknown"
    with pytest.warns(RuntimeWarning, match="static copy of libstdc"):
        _loader._check_cxx_runtime(static)


# ---------------------------------------------------------------------------- errors

@pytest.mark.parametrize("call,exc,match", [
    (lambda x, w: rmsnorm_ext.rms_norm(x, (63,), w), ValueError, "normalized_shape"),
    (lambda x, w: rmsnorm_ext.rms_norm(x, (), w), ValueError, "at least one dimension"),
    (lambda x, w: rmsnorm_ext.rms_norm(x, (64,), w[:10]), ValueError, "weight must have shape"),
    (lambda x, w: rmsnorm_ext.layer_norm(x, (64,), w, w[:3]), ValueError, "bias must have shape"),
    (lambda x, w: rmsnorm_ext.rms_norm(x.int(), (64,), None), TypeError, "float"),
    (lambda x, w: rmsnorm_ext.layer_norm(x.bool(), (64,)), TypeError, "float"),
    (lambda x, w: rmsnorm_ext.rms_norm(x, (64,), w.int()), TypeError, "dtype"),
    (lambda x, w: rmsnorm_ext.rms_norm(x.half(), (64,), w.bool()), TypeError, "dtype"),
    (lambda x, w: rmsnorm_ext.rms_norm(x, (64,), w, eps=-1.0), ValueError, "eps"),
    (lambda x, w: rmsnorm_ext.layer_norm(x, (64,), w, eps=float("nan")), ValueError, "eps"),
    (lambda x, w: rmsnorm_ext.fused_add_rms_norm(x, x[:2], (64,), w), ValueError, "residual"),
    (lambda x, w: rmsnorm_ext.fused_add_rms_norm(x, x.half(), (64,), w), TypeError, "residual"),
])
def test_bad_input_raises(device, call, exc, match):
    x = torch.randn(4, 64, device=device)
    w = torch.randn(64, device=device)
    with pytest.raises(exc, match=match):
        call(x, w)


def test_device_mismatch_raises():
    x = torch.randn(4, 64)
    w = torch.randn(64, device="meta")
    with pytest.raises((RuntimeError, NotImplementedError), match="device|meta|Meta"):
        rmsnorm_ext.rms_norm(x, (64,), w)


def test_meta_tensors_propagate_shapes():
    x = torch.empty(2, 3, 64, device="meta", dtype=torch.bfloat16)
    w = torch.empty(64, device="meta", dtype=torch.float32)
    y = rmsnorm_ext.rms_norm(x, (64,), w)
    assert y.shape == x.shape and y.dtype == torch.bfloat16 and y.device.type == "meta"
    y = rmsnorm_ext.layer_norm(x, (3, 64))
    assert y.shape == x.shape
