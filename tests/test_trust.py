"""Tests for bug classes the rest of the suite once missed (each was injected into a copy of
the code and went unnoticed): the quant kernel's large-group path, the create_graph
backward's precision and completeness on both autograd paths, training only a LayerNorm
bias through the fast path, the C++ device checks reached through the CPU kernel itself,
and the output prefault staying inside the output."""
import ctypes
import mmap

import pytest
import torch
import torch.nn.functional as F

import rmsnorm_ext as R
from test_quant import check_quant

ops = torch.ops.rmsnorm_ext


# --- quant: groups of 65536 elements and more (the kernel recomputes y instead of buffering)

@pytest.mark.parametrize("group", [65536 - 64, 65536, 65536 + 64, 2 * 65536, None])
@pytest.mark.parametrize("quant_dtype", [torch.float8_e4m3fn, torch.int8])
def test_quant_dynamic_scales_large_groups(group, quant_dtype):
    n = 2 * 65536 + 128 if group in (None, 65536 + 64) else 4 * 65536
    if group == 65536 - 64:
        n = 2 * (65536 - 64)
    if group == 65536 + 64:
        n = 2 * (65536 + 64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, n, generator=g).to(torch.bfloat16)
    w = torch.rand(n, generator=g) + 0.5
    out, scales = R.rms_norm_quant(x, (n,), w, 1e-6, quant_dtype=quant_dtype, group_size=group)
    x64, w64 = x.double(), w.double()
    y64 = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-6) * w64
    check_quant(out, scales, y64, quant_dtype, group=group, what=f"group {group}")


# --- create_graph backward: precision (bf16 with Gemma's 1 + w) and completeness (fused h)

def _grad_paths():
    # the public function (eager fast path, C++ node) and the dispatcher (Python node)
    return {
        "fast": lambda x, w, off: R.rms_norm(x, (x.shape[-1],), w, 1e-6, weight_offset=off),
        "dispatcher": lambda x, w, off: ops.rms_norm_fwd(x, [x.shape[-1]], w, 1e-6, off)[0],
    }


@pytest.mark.parametrize("path", ["fast", "dispatcher"])
def test_create_graph_gradients_bf16_gemma_offset(path):
    """Gemma weights sit near 0 and 1 + w must be formed in fp32: in bf16, 1 + 0.003 rounds
    to 1 and every gradient element comes out 0.3% low -- a bias no single element shows
    (bf16 rounds each by up to 0.4%), but their mean does."""
    f = _grad_paths()[path]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 256, generator=g).to(torch.bfloat16).requires_grad_()
    w = torch.full((256,), 0.003).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(64, 256, generator=g).to(torch.bfloat16)
    graph = torch.autograd.grad(f(x, w, 1.0), (x, w), dy, create_graph=True)
    first = torch.autograd.grad(f(x, w, 1.0), (x, w), dy)
    x64, w64 = x.double().detach().requires_grad_(), w.double().detach().requires_grad_()
    y64 = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-6) * (1 + w64)
    ref = torch.autograd.grad(y64, (x64, w64), dy.double())
    for got in (graph, first):
        dx, r = got[0].double(), ref[0]
        bias = ((dx - r) * r.sign()).sum() / r.abs().sum()
        assert abs(bias.item()) < 5e-4, (path, bias.item())
        torch.testing.assert_close(got[1].double(), ref[1], rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("path", ["fast", "dispatcher"])
def test_create_graph_fused_includes_the_direct_h_gradient(path):
    g = torch.Generator().manual_seed(2)
    x, r = (torch.randn(4, 32, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    w = torch.randn(32, generator=g, dtype=torch.float64).requires_grad_()

    def f(x, r, w):
        if path == "fast":
            return R.fused_add_rms_norm(x, r, (32,), w, 1e-6)
        y, h, _ = ops.fused_add_rms_norm_fwd(x, r, [32], w, 1e-6, 0.0)
        return y, h

    def loss(create_graph):
        y, h = f(x, r, w)
        return torch.autograd.grad((y * y).sum() + (h * h * h).sum(), (x, r, w),
                                   create_graph=create_graph)

    for a, b in zip(loss(True), loss(False)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# --- BitFit: only the LayerNorm bias trains (input and weight frozen)

def test_layer_norm_bias_only_training_through_the_fast_path():
    x = torch.randn(8, 64)
    w = torch.randn(64)                       # frozen
    b = torch.zeros(64, requires_grad=True)   # trained
    y = R.layer_norm(x, (64,), w, b)
    assert y.grad_fn is not None and y.requires_grad
    (db,) = torch.autograd.grad((y * 2).sum(), b)
    torch.testing.assert_close(db, torch.full((64,), 16.0))
    yr = F.layer_norm(x, (64,), w, b)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)


# --- the C++ device checks, reached through the CPU kernel itself (on a machine without a
# GPU, a meta companion otherwise selects the Meta kernel first)

def _cpu_only(op, *args):
    return op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args)


@pytest.mark.parametrize("case", ["weight", "residual", "rstd", "grad_out", "gate"])
def test_cpu_kernel_refuses_a_tensor_on_another_device(case):
    x = torch.ones(4, 8)
    other = lambda *s: torch.ones(*s, device="meta")  # noqa: E731
    with pytest.raises(RuntimeError, match=r"rmsnorm_ext: .* is on meta but .* on cpu"):
        if case == "weight":
            _cpu_only(ops.rms_norm_fwd.default, x, [8], other(8), 1e-6, 0.0)
        elif case == "residual":
            _cpu_only(ops.fused_add_rms_norm_fwd.default, x, other(4, 8), [8], None, 1e-6, 0.0)
        elif case == "rstd":
            _cpu_only(ops.rms_norm_bwd.default, x, x, other(4), None, [8], 0.0, None, False)
        elif case == "grad_out":
            _cpu_only(ops.layer_norm_bwd.default, other(4, 8), x, torch.ones(4), torch.ones(4),
                      None, [8], False, False)
        else:
            _cpu_only(ops.gated_rms_norm_fwd.default, x, other(4, 8), [8], None, 1e-6, 8, True,
                      "silu")


# --- prefault: the pages backed ahead of the stores are the output's own

_libc = ctypes.CDLL(None, use_errno=True)
_PAGE = mmap.PAGESIZE


def _backed_pages(addr, npages):
    vec = (ctypes.c_ubyte * npages)()
    base = addr & ~(_PAGE - 1)
    if _libc.mincore(ctypes.c_void_p(base), ctypes.c_size_t(npages * _PAGE), vec) != 0:
        return None
    return [v & 1 for v in vec]


def _smaps_near(addr, span=80 << 20):
    """The process's mappings within `span` of addr, with their THP flags (for a failure)."""
    out, keep = [], False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(maxsplit=1)[0]
                if "-" in head and all(c in "0123456789abcdef-" for c in head):
                    a, b = (int(t, 16) for t in head.split("-"))
                    keep = a - span <= addr < b + span
                    if keep:
                        out.append(line.rstrip())
                elif keep and head in ("Rss:", "AnonHugePages:", "VmFlags:"):
                    out.append("    " + line.strip())
    except OSError:
        return "(no /proc/self/smaps)"
    return "\n".join(out)


def test_prefault_stays_inside_the_output():
    """A fresh mapping placed right after the output must not get pages backed by the
    output's prefault (a range clamp that reaches past the output would back them).

    glibc maps each allocation above 32 MiB by itself, top-down, so an output allocated right
    after a same-size "victim" usually lands just below it. In a long-lived process the
    address space has holes that split the two; a failed placement is kept allocated (it
    fills the hole) and the next try goes lower, where free space is contiguous. The
    victim's pages are probed before the call too: a neighbour already backed (memory the
    kernel backs for its own reasons, e.g. THP "always" on glibc's header write) says
    nothing about our clamp, so that placement is passed over instead of blamed on us."""
    torch.set_num_threads(1)
    kept = []
    try:
        n = 4096
        rows = 2112 + 3   # 33 MiB of fp32 rows: above glibc's largest mmap threshold
        x = torch.randn(rows, n)
        for _ in range(16):
            victim = torch.empty(rows * n * 4, dtype=torch.uint8)
            # the victim's first page holds glibc's chunk header (written): skip it
            first = (victim.data_ptr() & ~(_PAGE - 1)) + _PAGE
            before = _backed_pages(first, 64)
            if before is None:
                pytest.skip("mincore unavailable")
            y = R.rms_norm(x, (n,), None, 1e-6)
            y_end = y.data_ptr() + y.numel() * y.element_size()
            gap = victim.data_ptr() - y_end
            if 0 <= gap < 2 * _PAGE + 64 and sum(before) == 0:
                after = _backed_pages(first, 64)
                assert sum(after) == 0, (
                    f"{sum(after)} of 64 pages after the output were backed by the call "
                    f"(none before it); output ends at {y_end:#x}, next mapping's data at "
                    f"{victim.data_ptr():#x}; mappings nearby:\n{_smaps_near(y_end)}")
                return
            kept.append((victim, y))
        pytest.skip("the allocator did not place a fresh mapping right after the output")
    finally:
        kept.clear()
        torch.set_num_threads(2)
