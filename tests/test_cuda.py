"""CUDA-only behaviour: graphs, streams, reduce-overhead compile, alignment, large rows,
M >> N weight gradients, fp16 near its range limit, determinism. Skipped without a GPU."""
import pytest
import torch
import torch.nn.functional as F

import rmsnorm_ext
from reference import assert_accurate, default_eps, ln_ref, reduction_scale, rms_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEV = "cuda"


def _grads(fn, leaves, dy):
    return torch.autograd.grad(fn(*leaves), leaves, dy)


def test_cuda_graph_capture_and_replay():
    x = torch.randn(64, 1024, device=DEV, dtype=torch.bfloat16)
    r = torch.randn_like(x)
    w = torch.randn(1024, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(1024, device=DEV, dtype=torch.bfloat16)
    outs = {}

    def step():
        outs["rms"] = rmsnorm_ext.rms_norm(x, (1024,), w)
        outs["ln"] = rmsnorm_ext.layer_norm(x, (1024,), w, b)
        outs["fused"] = rmsnorm_ext.fused_add_rms_norm(x, r, (1024,), w)[0]

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up off the capture
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(g):
        step()
    x.copy_(torch.randn_like(x))  # new inputs, same buffers
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(outs["rms"], rmsnorm_ext.rms_norm(x, (1024,), w))
    torch.testing.assert_close(outs["ln"], rmsnorm_ext.layer_norm(x, (1024,), w, b))
    torch.testing.assert_close(outs["fused"], rmsnorm_ext.fused_add_rms_norm(x, r, (1024,), w)[0])


def test_cuda_graph_backward():
    x = torch.randn(32, 512, device=DEV, requires_grad=True)
    w = torch.randn(512, device=DEV, requires_grad=True)
    dy = torch.randn(32, 512, device=DEV)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            torch.autograd.grad(rmsnorm_ext.rms_norm(x, (512,), w), (x, w), dy)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        gx, gw = torch.autograd.grad(rmsnorm_ext.rms_norm(x, (512,), w), (x, w), dy)
    g.replay()
    torch.cuda.synchronize()
    ex, ew = torch.autograd.grad(rmsnorm_ext.rms_norm(x, (512,), w), (x, w), dy)
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gw, ew)


def test_compile_reduce_overhead():
    torch._dynamo.reset()
    norm = rmsnorm_ext.RMSNorm(256, device=DEV)
    f = torch.compile(lambda t: norm(t) * 2, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        x = torch.randn(8, 256, device=DEV)
        with torch.no_grad():
            y = f(x).clone()
        torch.testing.assert_close(y, 2 * F.rms_norm(x, (256,), norm.weight.detach()))


def test_non_default_stream():
    s = torch.cuda.Stream()
    x = torch.randn(128, 2048, device=DEV)
    w = torch.randn(2048, device=DEV)
    with torch.cuda.stream(s):
        y = rmsnorm_ext.rms_norm(x, (2048,), w)
        yl = rmsnorm_ext.layer_norm(x, (2048,), w)
    s.synchronize()
    assert_accurate(y, rms_ref(x, (2048,), w), F.rms_norm(x, (2048,), w))
    assert_accurate(yl, ln_ref(x, (2048,), w), F.layer_norm(x, (2048,), w))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("offset", [1, 3, 7])
def test_misaligned_storage_offsets(dtype, offset):
    n = 4096  # a vectorizable width: only the pointer offset forces the unaligned path
    base = torch.randn(5 * n + offset, device=DEV).to(dtype)
    x = base[offset:].view(5, n)
    w = torch.randn(n + offset, device=DEV).to(dtype)[offset:]
    assert_accurate(rmsnorm_ext.rms_norm(x, (n,), w), rms_ref(x, (n,), w), F.rms_norm(x, (n,), w))
    dy = torch.randn(5, n, device=DEV).to(dtype)
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    ours = _grads(lambda a, c: rmsnorm_ext.rms_norm(a, (n,), c), (xl, wl), dy)
    eps = default_eps(dtype)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    ref = _grads(lambda a, c: rms_ref(a, (n,), c, eps), (x64, w64), dy.double())
    base_t = _grads(lambda a, c: F.rms_norm(a, (n,), c), (x.clone().requires_grad_(),
                                                          w.clone().requires_grad_()), dy)
    assert_accurate(ours[0], ref[0], base_t[0], dtype=dtype)
    assert_accurate(ours[1], ref[1], base_t[1], dtype=dtype,
                    scale=reduction_scale(dy, rms_ref(x, (n,)), n))


def test_large_row_262144():
    n = 262144
    x = torch.randn(4, n, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    assert_accurate(rmsnorm_ext.rms_norm(x, (n,), w), rms_ref(x, (n,), w), F.rms_norm(x, (n,), w))
    assert_accurate(rmsnorm_ext.layer_norm(x, (n,), w, b), ln_ref(x, (n,), w, b),
                    F.layer_norm(x, (n,), w, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weight_grad_large_m_small_n(dtype):
    m, n = 65536, 128
    x = torch.randn(m, n, device=DEV).to(dtype)
    w = torch.randn(n, device=DEV).to(dtype)
    dy = torch.randn(m, n, device=DEV).to(dtype)
    _, dw = _grads(lambda a, c: rmsnorm_ext.rms_norm(a, (n,), c),
                   (x.clone().requires_grad_(), w.clone().requires_grad_()), dy)
    eps = default_eps(dtype)
    _, dw_ref = _grads(lambda a, c: rms_ref(a, (n,), c, eps),
                       (x.double().requires_grad_(), w.double().requires_grad_()), dy.double())
    _, dw_t = _grads(lambda a, c: F.rms_norm(a, (n,), c),
                     (x.clone().requires_grad_(), w.clone().requires_grad_()), dy)
    assert_accurate(dw, dw_ref, dw_t, dtype=dtype, scale=reduction_scale(dy, rms_ref(x, (n,)), n))


def test_fp16_near_range_limit():
    x = (torch.rand(16, 1024, device=DEV) * 2 - 1).mul(6e4).half()
    w = torch.rand(1024, device=DEV).half()
    y = rmsnorm_ext.rms_norm(x, (1024,), w)
    yl = rmsnorm_ext.layer_norm(x, (1024,), w)
    assert torch.isfinite(y).all() and torch.isfinite(yl).all()
    assert_accurate(y, rms_ref(x, (1024,), w))
    assert_accurate(yl, ln_ref(x, (1024,), w))


def test_weight_grad_bitwise_deterministic():
    x = torch.randn(8192, 1024, device=DEV, dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    w = torch.randn(1024, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(1024, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    first = None
    for _ in range(4):
        gr = torch.autograd.grad(rmsnorm_ext.rms_norm(x, (1024,), w), w, dy)[0]
        gl = torch.autograd.grad(rmsnorm_ext.layer_norm(x, (1024,), w, b), (w, b), dy)
        cur = (gr, *gl)
        if first is None:
            first = cur
        for a, c in zip(first, cur):
            assert torch.equal(a, c)
