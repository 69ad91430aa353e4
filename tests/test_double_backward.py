"""Second derivatives: torch.autograd.gradgradcheck in float64 for every differentiable op,
w.r.t. every tensor argument, with and without the Gemma offset; and the first-order path
stays on the fused backward kernels (the composite is only for create_graph=True)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rmsnorm_ext as R

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _inputs(device, *shapes, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(device).requires_grad_()
            for s in shapes]


def _flat(*ts):
    return torch.cat([t.reshape(-1) for t in ts])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_gradgradcheck(device, offset, with_weight):
    x, w = _inputs(device, (3, 2, 5), (2, 5))
    if with_weight:
        f, args = (lambda x, w: R.rms_norm(x, (2, 5), w, 1e-5, weight_offset=offset)), (x, w)
    else:
        f, args = (lambda x: R.rms_norm(x, (2, 5), None, 1e-5)), (x,)
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params", ["weight_and_bias", "weight", "bias", "none"])
def test_layer_norm_gradgradcheck(device, params):
    x, w, b = _inputs(device, (4, 6), (6,), (6,))
    w = w if "weight" in params else None
    b = b if "bias" in params else None
    extra = tuple(t for t in (w, b) if t is not None)

    def f(x, *p):
        it = iter(p)
        return R.layer_norm(x, (6,), next(it) if w is not None else None,
                            next(it) if b is not None else None, 1e-5)
    assert torch.autograd.gradcheck(f, (x,) + extra)
    assert torch.autograd.gradgradcheck(f, (x,) + extra)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_fused_add_rms_norm_gradgradcheck(device, offset):
    x, r, w = _inputs(device, (3, 7), (3, 7), (7,))

    def f(x, r, w):  # both outputs, so second derivatives through h are checked too
        y, h = R.fused_add_rms_norm(x, r, (7,), w, 1e-5, weight_offset=offset)
        return _flat(y, h * h)
    assert torch.autograd.gradcheck(f, (x, r, w))
    assert torch.autograd.gradgradcheck(f, (x, r, w))


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_matches_torch(device):
    # A gradient penalty, as users write it, against torch's own rms_norm/layer_norm.
    x, w, b = _inputs(device, (5, 16), (16,), (16,), seed=1)
    for ours, theirs in [(lambda x: R.rms_norm(x, (16,), w, 1e-6),
                          lambda x: torch.nn.functional.rms_norm(x, (16,), w, 1e-6)),
                         (lambda x: R.layer_norm(x, (16,), w, b),
                          lambda x: torch.nn.functional.layer_norm(x, (16,), w, b))]:
        res = []
        for fn in (ours, theirs):
            y = fn(x)
            g, = torch.autograd.grad((y * y.detach().cos()).sum(), x, create_graph=True)
            res.append(torch.autograd.grad(g.square().sum(), (x, w)))
        for a, e in zip(*res):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("create_graph", [False, True])
def test_first_order_backward_uses_the_fused_kernel(create_graph):
    x, w = _inputs("cpu", (4, 8), (8,))
    y = R.rms_norm(x, (8,), w)
    with _OpLog() as log:
        torch.autograd.grad(y.sum(), (x, w), create_graph=create_graph)
    fused = "rmsnorm_ext.rms_norm_bwd" in log.ops
    assert fused != create_graph, log.ops


def test_compiled_backward_uses_the_fused_kernel():
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_function
    graphs = []

    def compiler(gm, _):
        graphs.append(str(gm.code))
        return make_boxed_func(gm.forward)
    f = aot_function(lambda x, w: R.rms_norm(x, (8,), w), fw_compiler=compiler,
                     bw_compiler=compiler)
    x, w = _inputs("cpu", (4, 8), (8,))
    f(x, w).sum().backward()
    assert len(graphs) == 2 and "rms_norm_bwd" in graphs[1], graphs


_COS = torch.full((3, 4), 0.6, dtype=torch.float64)  # a rotation by the same angle everywhere
_SIN = torch.full((3, 4), 0.8, dtype=torch.float64)
_BATCHED_AD_CASES = {
    "rms_norm": ((3, 5), (5,), lambda x, w: R.rms_norm(x, (5,), w)),
    "layer_norm": ((3, 5), (5,), (5,), lambda x, w, b: R.layer_norm(x, (5,), w, b)),
    "fused_add_rms_norm": ((3, 5), (3, 5), (5,),
                           lambda x, r, w: R.fused_add_rms_norm(x, r, (5,), w)),
    "gated_rms_norm": ((3, 6), (3, 6), (6,), lambda x, g, w: R.gated_rms_norm(x, g, (6,), w)),
    "layer_norm_modulate": ((2, 3, 4), (2, 4), (2, 4),
                            lambda x, s, t: R.layer_norm_modulate(x, (4,), s, t)),
    "rms_norm_2d": ((2, 3, 2, 2), (3,), lambda x, w: R.rms_norm_2d(x, w)),
    "qk_norm_rope": ((1, 3, 2, 4), (1, 3, 1, 4), (4,), (4,),
                     lambda q, k, qw, kw: R.qk_norm_rope(q, k, qw, kw, _COS, _SIN)),
}


@pytest.mark.parametrize("name", list(_BATCHED_AD_CASES))
def test_gradcheck_forward_ad_and_batched(name):
    """torch.autograd.gradcheck with forward AD and its batched checks (legacy vmap over the
    tangents / cotangents), as users run it on their own layers: F.rms_norm / F.layer_norm
    pass it. Our jvp's result was detached, which a legacy BatchedTensor cannot be."""
    *shapes, f = _BATCHED_AD_CASES[name]
    args = _inputs("cpu", *shapes)
    assert torch.autograd.gradcheck(f, tuple(args), check_forward_ad=True,
                                    check_batched_grad=True, check_batched_forward_grad=True)
