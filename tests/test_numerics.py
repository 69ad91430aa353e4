"""Numerics: NaN/Inf propagation as torch, all-zero rows with eps=0, large fp16/bf16
magnitudes, bitwise-reproducible parameter gradients, concurrent calls from Python
threads, and a > 2^31-element tensor (64-bit indexing, forward and backward).
"""
import os
import threading
import time

import pytest
import torch
import torch.nn.functional as F

import rmsnorm_ext as R

NAN, INF = float("nan"), float("inf")
F64 = torch.float64


def _masks(t):
    return torch.stack([t.isnan(), t.isposinf(), t.isneginf()])


def assert_same_special_values(ours, theirs, what, atol=1e-5):
    """NaN at the same places, +inf and -inf at the same places, and close elsewhere."""
    assert ours.shape == theirs.shape, what
    bad = (_masks(ours) != _masks(theirs)).any(0)
    assert not bad.any(), (f"{what}: NaN/Inf pattern differs from torch at "
                           f"{bad.nonzero()[:8].tolist()}: ours {ours[bad][:8].tolist()}, "
                           f"torch {theirs[bad][:8].tolist()}")
    fin = torch.isfinite(ours)
    torch.testing.assert_close(ours[fin], theirs[fin], atol=atol, rtol=1e-4, msg=what)


# ---------------------------------------------------------------------------------------
# NaN / Inf propagation


def _special_rows(n, dtype):
    """One kind of special value per row (rows 1..8), finite rows around them."""
    x = torch.randn(10, n, dtype=dtype)
    x[1, n // 2] = NAN
    x[2, n - 1] = INF
    x[3, 0] = -INF
    x[4, 0], x[4, n - 1] = INF, -INF
    x[5] = INF
    x[6, 0], x[6, n - 1] = NAN, INF
    x[7] = NAN
    x[8, n // 3] = -INF
    return x


NS = [1, 2, 8, 37, 64, 1000]


@pytest.mark.parametrize("op", ["rms", "ln", "fused"])
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_nan_inf_propagate_like_torch(op, n, affine, dtype, eps):
    torch.manual_seed(n)
    x = _special_rows(n, dtype)
    w = torch.randn(n, dtype=dtype) if affine else None
    b = torch.randn(n, dtype=dtype) if affine and op == "ln" else None
    r = torch.randn(10, n, dtype=dtype)
    if op == "fused":
        r[9, 0] = INF  # a special value that arrives through the residual
        r[0, n - 1] = NAN
    dy = torch.randn(10, n, dtype=dtype)

    def run(impl):
        xl = x.clone().requires_grad_()
        wl = None if w is None else w.clone().requires_grad_()
        bl = None if b is None else b.clone().requires_grad_()
        rl = r.clone().requires_grad_()
        if op == "rms":
            y = (R.rms_norm if impl == "ours" else F.rms_norm)(xl, (n,), wl, eps)
        elif op == "ln":
            y = (R.layer_norm if impl == "ours" else F.layer_norm)(xl, (n,), wl, bl, eps)
        elif impl == "ours":
            y, h = R.fused_add_rms_norm(xl, rl, (n,), wl, eps)
        else:
            y = F.rms_norm(xl + rl, (n,), wl, eps)
        y.backward(dy)
        return [y.detach(), xl.grad] + [t.grad for t in (wl, bl) if t is not None] + (
            [rl.grad] if op == "fused" else [])

    names = ["y", "dx"] + (["dweight"] if affine else []) + (["dbias"] if b is not None else []) \
        + (["dresidual"] if op == "fused" else [])
    # LayerNorm over one element: xhat == 0, so dx is rounding noise times rstd = 1/sqrt(eps)
    # (torch's own dx there is off by ~1e-4 on some builds).
    atol = 1e-3 if op == "ln" and n == 1 else 1e-5
    for name, o, t in zip(names, run("ours"), run("torch")):
        assert_same_special_values(o, t, f"{op} {name}", atol=atol)


@pytest.mark.parametrize("op", ["rms", "ln", "fused"])
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nan_inf_rows_do_not_leak(op, n, dtype):
    """A NaN/Inf in one row leaves every other row finite and unchanged, in every dtype."""
    torch.manual_seed(1)
    x = torch.randn(10, n).to(dtype)
    clean = x.clone()
    x[3, n // 2] = NAN
    x[6, 0] = INF
    f = {"rms": lambda t: R.rms_norm(t, (n,)), "ln": lambda t: R.layer_norm(t, (n,)),
         "fused": lambda t: R.fused_add_rms_norm(t, torch.ones_like(t), (n,))[0]}[op]
    y, y_clean = f(x), f(clean)
    other = [i for i in range(10) if i not in (3, 6)]
    assert torch.equal(y[other], y_clean[other])
    assert torch.isfinite(y[other]).all()
    assert y[3].isnan().all() if n > 1 or op != "rms" else y[3].isnan().any()


# ---------------------------------------------------------------------------------------
# all-zero rows with eps = 0 (0 / sqrt(0)): whatever torch gives, we give


@pytest.mark.parametrize("op", ["rms", "ln", "fused"])
@pytest.mark.parametrize("n", [1, 8, 37, 1000])
@pytest.mark.parametrize("affine", [False, True])
def test_zero_rows_eps0_like_torch(op, n, affine):
    torch.manual_seed(2)
    x = torch.randn(4, n)
    x[1] = 0
    x[3] = 0
    if op == "ln":
        x[2] = 1.5  # a constant row: zero variance too
    w = torch.randn(n) if affine else None
    b = torch.randn(n) if affine and op == "ln" else None
    dy = torch.randn(4, n)

    def run(impl):
        xl = x.clone().requires_grad_()
        wl = None if w is None else w.clone().requires_grad_()
        if op == "rms":
            y = (R.rms_norm if impl == "ours" else F.rms_norm)(xl, (n,), wl, 0.0)
        elif op == "ln":
            y = (R.layer_norm if impl == "ours" else F.layer_norm)(xl, (n,), wl, b, 0.0)
        elif impl == "ours":
            y = R.fused_add_rms_norm(xl, torch.zeros_like(x), (n,), wl, 0.0)[0]
        else:
            y = F.rms_norm(xl + torch.zeros_like(x), (n,), wl, 0.0)
        y.backward(dy)
        return [y.detach(), xl.grad] + ([wl.grad] if wl is not None else [])

    ours, theirs = run("ours"), run("torch")
    for name, o, t in zip(["y", "dx", "dweight"], ours, theirs):
        assert_same_special_values(o, t, f"{op} eps=0 {name}")
    # And what that is, for the record: 0 * (1 / sqrt(0)) = 0 * inf = NaN.
    assert ours[0][1].isnan().all()


# ---------------------------------------------------------------------------------------
# large magnitudes in reduced precision: statistics in fp32 never overflow


def _big(shape, dtype, mag, gen):
    x = (torch.rand(shape, generator=gen, dtype=F64) * 2 - 1) * mag
    x[..., 0] = mag  # the extreme value itself, in every row
    x[..., -1] = -mag
    return x.to(dtype)


@pytest.mark.parametrize("op", ["rms", "ln", "fused"])
@pytest.mark.parametrize("dtype,mag", [(torch.float16, 6e4), (torch.float16, 65504.0),
                                       (torch.bfloat16, 6e4), (torch.bfloat16, 3e9)])
@pytest.mark.parametrize("n", [8, 37, 4096])
def test_large_magnitude_reduced_precision(op, dtype, mag, n):
    """Beyond |x| ~ 1e13, rstd^3 (in fp32) underflows and the RMSNorm input gradient loses
    accuracy -- in torch exactly as here; so bf16 stops at 3e9."""
    gen = torch.Generator().manual_seed(3)
    x = _big((6, n), dtype, mag, gen)
    w = (torch.rand(n, generator=gen, dtype=F64) + 0.5).to(dtype)
    b = torch.randn(n, generator=gen, dtype=F64).to(dtype)
    dy = torch.randn(6, n, generator=gen, dtype=F64).to(dtype)
    r = (torch.rand(6, n, generator=gen, dtype=F64) - 0.5).to(dtype)  # |x + r| stays finite
    eps = 1e-5

    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    if op == "rms":
        y = R.rms_norm(xl, (n,), wl, eps)
        h64 = x.double()
    elif op == "ln":
        y = R.layer_norm(xl, (n,), wl, b, eps)
        h64 = x.double()
    else:
        y, h = R.fused_add_rms_norm(xl, r, (n,), wl, eps)
        h64 = h.detach().double()
        assert torch.isfinite(h).all()
    y.backward(dy)

    x64 = h64.clone().requires_grad_()
    w64 = w.double().requires_grad_()
    if op == "ln":
        y64 = F.layer_norm(x64, (n,), w64, b.double(), eps)
    else:
        y64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w64
    y64.backward(dy.double())

    feps = torch.finfo(dtype).eps
    for name, o, ref, scale in [
            ("y", y.detach(), y64.detach(), y64.abs().max().item()),
            ("dx", xl.grad, x64.grad, x64.grad.abs().max().item()),
            ("dweight", wl.grad, w64.grad, w64.grad.abs().max().item() + 1.0)]:
        assert torch.isfinite(o).all(), f"{op} {name}: overflow at |x| = {mag} in {dtype}"
        err = (o.double() - ref).abs().max().item()
        assert err <= 4 * feps * scale, f"{op} {name}: error {err:.3e}, scale {scale:.3e}"


# ---------------------------------------------------------------------------------------
# determinism


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("op", ["rms", "ln", "fused"])
@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32),
                                          (torch.bfloat16, torch.bfloat16),
                                          (torch.bfloat16, torch.float32),
                                          (torch.float16, torch.float16),
                                          (torch.float64, torch.float64)])
@pytest.mark.parametrize("shape", [(4099, 257), (33, 4096), (2, 3, 1000)])
def test_param_grads_bitwise_reproducible(two_threads, op, dtype, wdtype, shape):
    n = shape[-1]
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=gen).to(dtype)
    r = torch.randn(shape, generator=gen).to(dtype)
    dy = torch.randn(shape, generator=gen).to(dtype)
    w = torch.randn(n, generator=gen).to(wdtype)
    b = torch.randn(n, generator=gen).to(wdtype)

    def run():
        xl, wl, bl = x.clone().requires_grad_(), w.clone().requires_grad_(), \
            b.clone().requires_grad_()
        if op == "rms":
            y = R.rms_norm(xl, (n,), wl)
        elif op == "ln":
            y = R.layer_norm(xl, (n,), wl, bl)
        else:
            y = R.fused_add_rms_norm(xl, r, (n,), wl)[0]
        y.backward(dy)
        return [y.detach(), xl.grad, wl.grad] + ([bl.grad] if op == "ln" else [])

    first = run()
    for _ in range(4):
        for name, a, b_ in zip(["y", "dx", "dweight", "dbias"], first, run()):
            assert torch.equal(a, b_), f"{op} {name} differs between identical runs"


# ---------------------------------------------------------------------------------------
# concurrency: several Python threads calling the ops at once


def test_concurrent_calls_from_python_threads():
    n_threads, iters = 8, 15
    jobs = []
    for t in range(n_threads):
        gen = torch.Generator().manual_seed(100 + t)
        dtype = [torch.float32, torch.bfloat16, torch.float64, torch.float16][t % 4]
        op = ["rms", "ln", "fused", "inplace"][(t // 2) % 4]
        n = [64, 1000, 4096, 37][t % 4]
        m = [300, 40, 17, 1001][t % 4]
        x = torch.randn(m, n, generator=gen).to(dtype)
        r = torch.randn(m, n, generator=gen).to(dtype)
        w = torch.randn(n, generator=gen).to(dtype)
        dy = torch.randn(m, n, generator=gen).to(dtype)
        jobs.append((op, x, r, w, dy))

    def compute(op, x, r, w, dy):
        n = x.shape[-1]
        if op == "inplace":
            xi, ri = x.clone(), r.clone()
            with torch.no_grad():
                R.fused_add_rms_norm_(xi, ri, (n,), w)
            return [xi, ri]
        xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
        if op == "rms":
            y = R.rms_norm(xl, (n,), wl)
        elif op == "ln":
            y = R.layer_norm(xl, (n,), wl, w)
        else:
            y = R.fused_add_rms_norm(xl, r, (n,), wl)[0]
        y.backward(dy)
        return [y.detach(), xl.grad, wl.grad]

    expected = [compute(*j) for j in jobs]
    errors = []
    barrier = threading.Barrier(n_threads)

    def worker(i):
        try:
            barrier.wait()
            for _ in range(iters):
                got = compute(*jobs[i])
                for k, (a, e) in enumerate(zip(got, expected[i])):
                    if k == 2:  # dweight: a sum over rows, chunked by the worker's threads
                        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-3)
                    elif not torch.equal(a, e):
                        raise AssertionError(f"thread {i} ({jobs[i][0]}, {a.dtype}): output {k} "
                                             f"differs from the single-threaded result")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "threads hung"
    assert not errors, errors[0]


# ---------------------------------------------------------------------------------------
# huge tensors: > 2^31 elements, 64-bit indexing end to end


HUGE_N = 4096
HUGE_M = 2**31 // HUGE_N + 1  # 524289 rows: numel = 2^31 + 4096; last row starts at 2^31
HUGE_BYTES = HUGE_M * HUGE_N * 2


def _mem_available():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _huge_skip_reason():
    env = os.environ.get("RMSNORM_EXT_HUGE", "")
    if env == "0":
        return "RMSNORM_EXT_HUGE=0"
    if env == "1":
        return None
    need = 4 * HUGE_BYTES
    have = _mem_available()
    if have < need:
        return (f"needs ~{need / 2**30:.0f} GiB free memory, {have / 2**30:.1f} GiB available "
                f"(RMSNORM_EXT_HUGE=1 forces it)")
    return None


def _fill_tiled(dst, tile):
    """dst[i] = tile[i % len(tile)], by block copies (cheap; no 4 GiB temporaries)."""
    k = tile.shape[0]
    for i in range(0, dst.shape[0], k):
        dst[i:i + k].copy_(tile[:min(k, dst.shape[0] - i)])


@pytest.mark.slow
@pytest.mark.skipif(_huge_skip_reason() is not None, reason=str(_huge_skip_reason()))
def test_huge_tensor_64bit_indexing():
    """bf16 [524289, 4096]: 2^31 + 4096 elements (4 GiB); the last row lies entirely past
    element 2^31 (and byte 2^32).

    x and the output gradient repeat a 1021-row random tile (a prime period, so no row
    lines up with a power of two), except for "probe" rows at both ends and around element
    2^30 that get their own values. That makes exact float64 references cheap:
    - forward: every row's mean square of y / w is ~1 (every row written, and normalized
      by its own statistics); probe rows match float64;
    - backward: dx on the probe rows matches float64; dweight, a sum over all rows,
      matches sum over tile rows (count * term) + probe-row terms, and the last row's
      output gradient is 1e5x larger, so dropping or misplacing it would fail the check.
    Peak memory ~13 GiB (x, y reused as dy, dx); ~40 s on 2 cores."""
    t0 = time.time()
    M, N, P = HUGE_M, HUGE_N, 1021
    eps = 1e-6
    gen = torch.Generator().manual_seed(5)
    probe = sorted({0, 1, 2, 2**30 // N - 1, 2**30 // N, M // 2, M - 3, M - 2, M - 1})
    tile_x = torch.randn(P, N, generator=gen).bfloat16()
    tile_dy = torch.randn(P, N, generator=gen).bfloat16()
    probe_x = (torch.randn(len(probe), N, generator=gen) * 3).bfloat16()
    probe_dy = torch.randn(len(probe), N, generator=gen)
    probe_dy[-1] *= 1e5
    probe_dy = probe_dy.bfloat16()
    w = (torch.rand(N, generator=gen) + 0.5).bfloat16()

    x = torch.empty(M, N, dtype=torch.bfloat16)
    _fill_tiled(x, tile_x)
    x[probe] = probe_x
    xl = x.requires_grad_()
    wl = w.clone().requires_grad_()
    t_fill = time.time()
    y = R.rms_norm(xl, (N,), wl, eps)
    t_fwd = time.time()
    assert y.shape == (M, N) and y.dtype == torch.bfloat16

    # Forward, every row: mean(y^2 / w^2) ~ 1 (bf16 products, fp32-accumulated mv).
    yd = y.detach()
    inv_w2 = (1.0 / w.double().pow(2) / N).bfloat16()
    for i in range(0, M, 65536):
        c = yd[i:i + 65536]
        ms = torch.mv(c * c, inv_w2).float()
        bad = (ms - 1).abs() > 0.03
        assert not bad.any(), (f"rows {(i + bad.nonzero()[:5].flatten()).tolist()}: mean "
                               f"square {ms[bad][:5].tolist()} (expected ~1)")
        del c, ms

    def rms64(rows_x):
        xr = rows_x.double()
        return xr, torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + eps)

    px, prstd = rms64(probe_x)
    y_ref = px * prstd * w.double()
    err = (yd[probe].double() - y_ref).abs().max().item()
    assert err <= 2 * 2**-8 * y_ref.abs().max().item(), f"forward error {err} on the probe rows"
    t_check = time.time()

    # Backward; dy reuses y's memory (rms_norm's backward does not need y).
    dy = yd
    _fill_tiled(dy, tile_dy)
    dy[probe] = probe_dy
    y.backward(dy)
    t_bwd = time.time()
    dx, dw = xl.grad, wl.grad
    assert dx.shape == (M, N) and dw.shape == (N,) and dw.dtype == torch.bfloat16

    g = probe_dy.double() * w.double()
    dx_ref = prstd * (g - px * prstd.pow(2) * (g * px).mean(-1, keepdim=True))
    for k, row in enumerate(probe):
        err = (dx[row].double() - dx_ref[k]).abs().max().item()
        scale = (g[k] * prstd[k]).abs().max().item()
        assert err <= 4 * 2**-8 * scale, f"dx row {row}: error {err:.3e} (scale {scale:.3e})"

    # dweight = sum_i rstd_i * dy_i * x_i: tile rows times their counts, plus probe rows.
    counts = torch.bincount(torch.arange(M) % P, minlength=P).double()
    for row in probe:
        counts[row % P] -= 1
    tx, trstd = rms64(tile_x)
    tile_terms = trstd * tx * tile_dy.double()
    probe_terms = prstd * px * probe_dy.double()
    dw_ref = (counts[:, None] * tile_terms).sum(0) + probe_terms.sum(0)
    dw_abs = (counts[:, None] * tile_terms.abs()).sum(0) + probe_terms.abs().sum(0)
    err = (dw.double() - dw_ref).abs().max().item()
    bound = 2 * 2**-8 * dw_abs.max().item()
    assert err <= bound, f"dweight error {err:.3e} > {bound:.3e}"
    assert probe_terms[-1].abs().max().item() > 4 * bound  # the check sees the last row
    t_end = time.time()
    print(f"\nhuge bf16 [{M}, {N}]: fill {t_fill - t0:.1f}s, forward {t_fwd - t_fill:.1f}s, "
          f"forward check {t_check - t_fwd:.1f}s, backward {t_bwd - t_check:.1f}s, "
          f"total {t_end - t0:.1f}s")
