"""replace_norms on real-shaped models, and fused vs unfused residual-add RMSNorm.

A small Llama-style decoder (embeddings, SDPA attention, SwiGLU MLP, pre-norms, final norm,
lm head) is written here with random init; its norms are torch.nn.RMSNorm/LayerNorm or
HF-style modules written here (``LlamaRMSNorm`` with ``variance_epsilon``, Gemma's
``(1 + w)`` with ``eps``). Tiny random-init Hugging Face models are checked too when
``transformers`` is installed (the optional ``hf`` extra); those tests skip otherwise.
"""
import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rmsnorm_ext
from rmsnorm_ext.replace import HFRMSNorm, replace_norms

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_hf = pytest.mark.skipif(not HAS_TRANSFORMERS,
                              reason="transformers not installed (optional extra: hf)")

VOCAB, DIM, HEADS, FFN, LAYERS, SEQ, BATCH = 61, 32, 4, 48, 2, 9, 2


# ------------------------------------------------------------------------------------------
# HF-style norms (as in transformers) and look-alikes that must NOT be replaced
# ------------------------------------------------------------------------------------------

class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class GemmaRMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float())
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


class ScaledTanh(nn.Module):
    """weight + eps, but not a norm."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return torch.tanh(x) * self.weight + self.eps


class MeanCenteredNorm(nn.Module):
    """Cohere-style LayerNorm without bias: weight + variance_epsilon, subtracts the mean (an
    HFLayerNorm replaces it, test_cohere_layer_norm_swapped)."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x):
        xf = x.float()
        xf = xf - xf.mean(-1, keepdim=True)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight.float() * xf).to(x.dtype)


class EpsOutsideSqrtNorm(nn.Module):
    """A LayerNorm-like (center) or RMSNorm-like module dividing by std + eps / rms + eps, not
    sqrt(var + eps): eps outside the square root, not ours to swap (the RMS one was: 0.9 off
    on rows whose mean square is near eps)."""

    def __init__(self, n, eps=1e-5, center=True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.variance_epsilon = eps
        self.center = center

    def forward(self, x):
        xf = x.float()
        if self.center:
            xf = xf - xf.mean(-1, keepdim=True)
        scale = xf.pow(2).mean(-1, keepdim=True).sqrt()
        return (self.weight.float() * xf / (scale + self.variance_epsilon)).to(x.dtype)


class RMSNormWithBias(LlamaRMSNorm):
    def __init__(self, dim):
        super().__init__(dim)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return super().forward(x) + self.bias


class RMSNormNoEps(nn.Module):
    """Behaves as RMSNorm but has no eps attribute to read: not recognized."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, 1e-6)


class DoublingRMSNorm(nn.RMSNorm):
    """A torch.nn.RMSNorm subclass that does something else."""

    def forward(self, x):
        return 2 * super().forward(x)


NORMS = {
    "torch_rms": lambda d: nn.RMSNorm(d, eps=1e-6),
    "torch_rms_default_eps": lambda d: nn.RMSNorm(d),
    "layernorm": lambda d: nn.LayerNorm(d),
    "layernorm_nobias": lambda d: nn.LayerNorm(d, bias=False),
    "layernorm_noaffine": lambda d: nn.LayerNorm(d, elementwise_affine=False),
    "llama": lambda d: LlamaRMSNorm(d, eps=1e-6),
    "gemma": lambda d: GemmaRMSNorm(d, eps=1e-6),
}


# ------------------------------------------------------------------------------------------
# A small Llama-style decoder
# ------------------------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(DIM, DIM, bias=False)
        self.k_proj = nn.Linear(DIM, DIM, bias=False)
        self.v_proj = nn.Linear(DIM, DIM, bias=False)
        self.o_proj = nn.Linear(DIM, DIM, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, HEADS, DIM // HEADS).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, s, DIM))


class SwiGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(DIM, FFN, bias=False)
        self.up_proj = nn.Linear(DIM, FFN, bias=False)
        self.down_proj = nn.Linear(FFN, DIM, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, make_norm):
        super().__init__()
        self.input_layernorm = make_norm(DIM)
        self.self_attn = Attention()
        self.post_attention_layernorm = make_norm(DIM)
        self.mlp = SwiGLU()

    def forward(self, h):
        h = h + self.self_attn(self.input_layernorm(h))
        return h + self.mlp(self.post_attention_layernorm(h))


class TinyDecoder(nn.Module):
    def __init__(self, make_norm, tie=False, extra=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block(make_norm) for _ in range(LAYERS))
        self.norm = make_norm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        if tie:
            self.lm_head.weight = self.embed_tokens.weight
        self.extra = extra  # an unrelated module applied before the final norm

    def forward(self, ids):
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = layer(h)
        if self.extra is not None:
            h = self.extra(h)
        return self.lm_head(self.norm(h))


def _randomize_norms(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            for name in ("weight", "bias"):
                p = getattr(m, name, None)
                if isinstance(p, nn.Parameter) and p.dim() == 1 and p.shape[0] == DIM \
                        and not isinstance(m, nn.Linear):
                    base = 0.0 if (name == "bias" or isinstance(m, GemmaRMSNorm)) else 1.0
                    p.copy_(base + 0.3 * torch.randn(p.shape, generator=g).to(p))


def _build(kind, device, dtype=torch.float32, **kw):
    model = TinyDecoder(NORMS[kind], **kw)
    _randomize_norms(model)
    return model.to(device=device, dtype=dtype)


def _n_norms(model):
    return sum(isinstance(m, (nn.RMSNorm, nn.LayerNorm, LlamaRMSNorm, GemmaRMSNorm))
               for m in model.modules())


def _run(model, ids):
    for p in model.parameters():
        p.grad = None
    logits = model(ids)
    torch.manual_seed(3)
    (logits.float() * torch.randn(logits.shape, device=logits.device)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _tol(dtype):
    return {torch.float32: dict(rtol=1e-4, atol=1e-5),
            torch.float64: dict(rtol=1e-9, atol=1e-10)}.get(dtype)


def _assert_close(a, b, dtype, what=""):
    tol = _tol(dtype)
    if tol is not None:
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what}: {m}")
    else:  # reduced precision: relative error of the whole tensor, a few roundings deep
        err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
        assert err < 3e-2, f"{what}: relative error {err:.3e}"


def _ids(device):
    return torch.randint(0, VOCAB, (BATCH, SEQ), device=device,
                         generator=torch.Generator(device=device).manual_seed(2))


# ------------------------------------------------------------------------------------------
# replace_norms on the tiny decoder
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", list(NORMS))
def test_same_logits_and_grads(device, kind, dtype):
    model = _build(kind, device, dtype)
    ids = _ids(device)
    ref_logits, ref_grads = _run(model, ids)
    params = dict(model.named_parameters())
    n_norms = _n_norms(model)

    assert replace_norms(model) == n_norms == 2 * LAYERS + 1
    assert all(isinstance(m, (rmsnorm_ext.RMSNorm, rmsnorm_ext.LayerNorm))
               for m in model.modules() if "norm" in type(m).__name__.lower())
    after = dict(model.named_parameters())
    assert after.keys() == params.keys()
    assert all(after[k] is params[k] for k in params)  # the very same Parameter objects
    assert all(p.device.type == device and p.dtype == dtype for p in after.values())

    logits, grads = _run(model, ids)
    assert logits.dtype == ref_logits.dtype
    _assert_close(logits, ref_logits, dtype, "logits")
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        _assert_close(grads[k], ref_grads[k], dtype, k)
    assert replace_norms(model) == 0  # second call: nothing left to replace


@pytest.mark.parametrize("kind", ["layernorm_nobias", "gemma"])
def test_compiled_fullgraph(device, kind):
    model = _build(kind, device)
    ids = _ids(device)
    ref_logits, ref_grads = _run(model, ids)
    assert replace_norms(model) == 2 * LAYERS + 1
    compiled = torch.compile(model, fullgraph=True)
    logits, grads = _run(compiled, ids)
    _assert_close(logits, ref_logits, torch.float32, "logits")
    grads = {k.removeprefix("_orig_mod."): v for k, v in grads.items()}
    assert grads.keys() == ref_grads.keys()
    for k in ref_grads:
        _assert_close(grads[k], ref_grads[k], torch.float32, k)


def test_replacement_types_and_attributes():
    model = nn.ModuleDict({
        "rms": nn.RMSNorm(DIM, eps=1e-5),
        "rms_none": nn.RMSNorm(DIM),
        "rms_noaffine": nn.RMSNorm(DIM, elementwise_affine=False),
        "ln": nn.LayerNorm(DIM, eps=1e-4),
        "ln_nobias": nn.LayerNorm(DIM, bias=False),
        "ln_noaffine": nn.LayerNorm(DIM, elementwise_affine=False),
        "ln_2d": nn.LayerNorm((3, DIM)),
        "llama": LlamaRMSNorm(DIM, eps=1e-5),
        "gemma": GemmaRMSNorm(DIM, eps=1e-6),
    })
    model.eval()
    old = dict(model.items())
    sd_keys = list(model.state_dict().keys())
    assert replace_norms(model) == len(old)
    m = model
    assert type(m["rms"]) is rmsnorm_ext.RMSNorm and m["rms"].eps == 1e-5
    assert m["rms_none"].eps is None and m["rms_noaffine"].weight is None
    assert type(m["ln"]) is rmsnorm_ext.LayerNorm and m["ln"].eps == 1e-4
    assert m["ln_nobias"].bias is None and m["ln_nobias"].weight is old["ln_nobias"].weight
    assert m["ln_noaffine"].weight is None and m["ln_noaffine"].bias is None
    assert m["ln_2d"].normalized_shape == (3, DIM)
    assert isinstance(m["llama"], HFRMSNorm) and isinstance(m["llama"], rmsnorm_ext.RMSNorm)
    assert m["llama"].variance_epsilon == 1e-5 and m["llama"].eps == 1e-5
    assert m["llama"].weight_offset == 0.0 and m["llama"].normalized_shape == (DIM,)
    assert m["gemma"].eps == 1e-6 and m["gemma"].weight_offset == 1.0
    assert all(not mod.training for mod in m.values())
    assert list(model.state_dict().keys()) == sd_keys
    for k in old:
        x = torch.randn(2, 3, DIM)
        torch.testing.assert_close(m[k](x), old[k](x), rtol=1e-5, atol=1e-6)
    m["llama"].variance_epsilon = 1e-3  # the alias writes through
    assert m["llama"].eps == 1e-3


def test_unrelated_modules_left_alone():
    lookalikes = {
        "tanh": ScaledTanh(DIM), "std_plus_eps": EpsOutsideSqrtNorm(DIM),
        "bias": RMSNormWithBias(DIM), "noeps": RMSNormNoEps(DIM),
        "doubling": DoublingRMSNorm(DIM, eps=1e-6), "linear": nn.Linear(DIM, DIM),
        "bn": nn.BatchNorm1d(DIM), "gn": nn.GroupNorm(4, DIM),
    }
    model = nn.ModuleDict(lookalikes)
    with torch.no_grad():
        for mod in model.values():
            if getattr(mod, "weight", None) is not None:
                mod.weight.copy_(1 + 0.3 * torch.randn_like(mod.weight))
    before = {k: copy.deepcopy(v.state_dict()) for k, v in model.items()}
    assert replace_norms(model) == 0
    assert all(model[k] is v for k, v in lookalikes.items())
    for k, v in model.items():  # probing did not touch any weight
        for name, t in v.state_dict().items():
            assert torch.equal(t, before[k][name]), (k, name)

    # ... also inside a model whose real norms are replaced
    model = _build("llama", "cpu", extra=ScaledTanh(DIM))
    assert replace_norms(model) == 2 * LAYERS + 1
    assert type(model.extra) is ScaledTanh


def test_tied_weights_and_shared_modules():
    shared = LlamaRMSNorm(DIM)
    a, b = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
    b.weight = a.weight  # tied parameter across two modules
    model = nn.Sequential(shared, a, nn.Sequential(shared, b))
    assert replace_norms(model) == 3  # the shared module is replaced once
    assert model[0] is model[2][0] and isinstance(model[0], HFRMSNorm)
    assert model[1].weight is model[2][1].weight is a.weight
    assert model[0].weight is shared.weight
    assert len(list(model.parameters())) == 4  # shared.weight, a.weight, a.bias, b.bias

    # a tied-embedding decoder keeps its tie
    dec = _build("gemma", "cpu", tie=True)
    assert replace_norms(dec) == 2 * LAYERS + 1
    assert dec.lm_head.weight is dec.embed_tokens.weight


@pytest.mark.parametrize("kind", ["llama", "torch_rms", "layernorm"])
def test_optimizer_created_before_replacement_updates_weights(device, kind):
    model = _build(kind, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    assert replace_norms(model) == 2 * LAYERS + 1
    w = model.norm.weight
    before = w.detach().clone()
    opt.zero_grad()
    model(_ids(device)).square().mean().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    opt.step()
    assert model.norm.weight is w and not torch.equal(w.detach(), before)
    assert any(p is w for g in opt.param_groups for p in g["params"])


def test_training_mode_and_hooks_carry_over():
    norm = LlamaRMSNorm(DIM)
    seen = []
    handle = norm.register_forward_hook(lambda mod, inp, out: seen.append(type(mod)))
    model = nn.Sequential(norm)
    model.train()
    assert replace_norms(model) == 1
    model(torch.randn(2, DIM))
    assert seen == [HFRMSNorm] and model[0].training
    handle.remove()
    model(torch.randn(2, DIM))
    assert len(seen) == 1


def test_dtype_semantics_mixed_precision():
    """fp32 weights with bf16 activations (and the reverse) keep the original's dtypes."""
    x = torch.randn(4, 5, DIM, dtype=torch.bfloat16)
    for make, out_dtype in ((LlamaRMSNorm, torch.float32), (GemmaRMSNorm, torch.bfloat16)):
        norm = make(DIM)
        with torch.no_grad():
            norm.weight.normal_()
        ref = norm(x)
        model = nn.Sequential(norm)
        assert replace_norms(model) == 1
        out = model[0](x)
        assert ref.dtype == out.dtype == out_dtype
        _assert_close(out, ref, torch.bfloat16, make.__name__)
        # bf16 weight with fp32 input
        model_b = nn.Sequential(make(DIM)).to(torch.bfloat16)
        with torch.no_grad():
            model_b[0].weight.normal_()
        x32 = torch.randn(3, DIM)
        ref = model_b[0](x32)
        assert replace_norms(model_b) == 1
        out = model_b[0](x32)
        assert out.dtype == ref.dtype
        _assert_close(out, ref, torch.bfloat16, make.__name__ + " bf16 weight")


@pytest.mark.parametrize("kind", ["llama", "gemma", "torch_rms", "layernorm"])
@pytest.mark.parametrize("when", ["after", "inside", "default_device"])
def test_meta_device_model(kind, when):
    """Built on meta; replaced after the ``torch.device("meta")`` context, inside it, or
    under ``torch.set_default_device("meta")``; then to_empty + the normal model's
    state_dict gives the normal model's results with the same swap."""
    ref = _build(kind, "cpu")
    assert replace_norms(ref) == 2 * LAYERS + 1
    if when == "default_device":
        torch.set_default_device("meta")
        try:
            model = TinyDecoder(NORMS[kind])
            w = model.norm.weight
            assert replace_norms(model) == 2 * LAYERS + 1
        finally:
            torch.set_default_device(None)
    else:
        with torch.device("meta"):
            model = TinyDecoder(NORMS[kind])
            w = model.norm.weight
            if when == "inside":
                assert replace_norms(model) == 2 * LAYERS + 1
        if when == "after":
            assert replace_norms(model) == 2 * LAYERS + 1
    assert model.norm.weight is w and w.device.type == "meta"
    assert [type(m) for m in model.modules()] == [type(m) for m in ref.modules()]
    model.to_empty(device="cpu")
    model.load_state_dict(ref.state_dict())
    ids = _ids("cpu")
    logits, grads = _run(model, ids)
    ref_logits, ref_grads = _run(ref, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# Fused residual add vs unfused
# ------------------------------------------------------------------------------------------

def _unfused(x, r, w, eps, offset):
    """x + r in the residual's dtype, then RMSNorm in fp32 with (offset + w), cast to x's."""
    h = x.to(r.dtype) + r
    y = F.rms_norm(h.float(), (h.shape[-1],), None if w is None else offset + w.float(), eps)
    return y.to(x.dtype), h


@pytest.mark.parametrize("dtype,rdtype", [(torch.float32, torch.float32),
                                          (torch.bfloat16, torch.bfloat16),
                                          (torch.bfloat16, torch.float32),
                                          (torch.float16, torch.float32)], ids=str)
@pytest.mark.parametrize("with_weight,offset", [(True, 0.0), (True, 1.0), (False, 0.0)])
def test_fused_add_matches_unfused(device, dtype, rdtype, offset, with_weight):
    n = 96
    x0 = torch.randn(3, 7, n, device=device).to(dtype)
    r0 = (torch.randn(3, 7, n, device=device) * 2 + 0.5).to(rdtype)
    w0 = (0.3 * torch.randn(n, device=device) + (1 - offset)).to(dtype) if with_weight else None
    gy = torch.randn(3, 7, n, device=device).to(dtype)
    gh = torch.randn(3, 7, n, device=device).to(rdtype)

    def grads(fn):
        x, r = x0.clone().requires_grad_(), r0.clone().requires_grad_()
        w = None if w0 is None else w0.clone().requires_grad_()
        y, h = fn(x, r, w)
        torch.autograd.backward((y, h), (gy, gh))
        return y, h, x.grad, r.grad, None if w is None else w.grad

    ours = grads(lambda x, r, w: rmsnorm_ext.fused_add_rms_norm(x, r, (n,), w, 1e-6,
                                                                weight_offset=offset))
    ref = grads(lambda x, r, w: _unfused(x, r, w, 1e-6, offset))
    names = ("output", "residual_out", "grad_input", "grad_residual", "grad_weight")
    for name, a, b in zip(names, ours, ref):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
        _assert_close(a, b, a.dtype, name)
    assert ours[0].dtype == dtype and ours[1].dtype == rdtype
    torch.testing.assert_close(ours[1], (x0.to(rdtype) + r0))  # the sum itself is exact-ish


def test_fused_add_in_a_decoder_matches_unfused(device):
    """A pre-norm stack written with fused_add_rms_norm gives the same loss and grads as
    the classic h = h + f(norm(h)) form (fp32 residual stream, bf16 activations)."""
    layers = [nn.Linear(DIM, DIM).to(device) for _ in range(3)]
    norms = [rmsnorm_ext.RMSNorm(DIM, eps=1e-6, device=device) for _ in range(3)]
    x0 = torch.randn(2, 5, DIM, device=device)

    def unfused():
        h = x0
        for lin, nm in zip(layers, norms):
            h = h + lin(nm(h))
        return h.square().mean()

    def fused():
        residual = x0
        delta = torch.zeros_like(x0)
        for lin, nm in zip(layers, norms):
            y, residual = rmsnorm_ext.fused_add_rms_norm(delta, residual, (DIM,), nm.weight,
                                                         nm.eps)
            delta = lin(y)
        return (residual + delta).square().mean()

    params = [p for m in layers + norms for p in m.parameters()]
    la = unfused()
    ga = torch.autograd.grad(la, params)
    lb = fused()
    gb = torch.autograd.grad(lb, params)
    torch.testing.assert_close(lb, la)
    for a, b in zip(gb, ga):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype,rdtype", [(torch.float32, torch.float32),
                                          (torch.bfloat16, torch.float32)], ids=str)
def test_fused_add_inplace(device, compiled, dtype, rdtype):
    n = 64
    x0 = torch.randn(4, 5, n, device=device).to(dtype)
    r0 = torch.randn(4, 5, n, device=device).to(rdtype)
    w = (0.2 * torch.randn(n, device=device)).to(dtype)

    def step(x, r, w):
        out, res = rmsnorm_ext.fused_add_rms_norm_(x, r, (n,), w, 1e-6, weight_offset=1.0)
        return out, res

    fn = torch.compile(step, fullgraph=True) if compiled else step
    ref_y, ref_h = rmsnorm_ext.fused_add_rms_norm(x0, r0, (n,), w, 1e-6, weight_offset=1.0)
    x, r = x0.clone(), r0.clone()
    xp, rp = x.data_ptr(), r.data_ptr()
    with torch.no_grad():
        out, res = fn(x, r, w)
    assert x.data_ptr() == xp and r.data_ptr() == rp  # written in place
    assert torch.equal(x, ref_y) and torch.equal(r, ref_h)
    torch.testing.assert_close(out, x, rtol=0, atol=0)
    torch.testing.assert_close(res, r, rtol=0, atol=0)
    uy, uh = _unfused(x0, r0, w, 1e-6, 1.0)
    _assert_close(x, uy, dtype, "output vs unfused")
    _assert_close(r, uh, rdtype, "residual vs unfused")

    # in-place in a loop (decode-style) under inference_mode, compiled or not
    with torch.inference_mode():
        x, r = x0.clone(), r0.clone()
        for _ in range(3):
            fn(x, r, w)
    y, h = x0, r0
    for _ in range(3):
        y, h = rmsnorm_ext.fused_add_rms_norm(y, h, (n,), w, 1e-6, weight_offset=1.0)
    assert torch.equal(x, y) and torch.equal(r, h)


def test_fused_add_inplace_refuses_autograd():
    x = torch.randn(2, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        rmsnorm_ext.fused_add_rms_norm_(x, torch.randn(2, 8), (8,))


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "rmsnorm_ext":
            self.calls.append((func.__name__, args))
        return func(*args, **(kwargs or {}))


def test_frozen_weights_get_no_grad_and_no_dweight_work(device):
    n = 32
    w = torch.randn(n, device=device, requires_grad=False)
    x = torch.randn(4, n, device=device, requires_grad=True)
    r = torch.randn(4, n, device=device, requires_grad=True)
    norm = rmsnorm_ext.RMSNorm(n, device=device)
    norm.weight.requires_grad_(False)
    with _OpLog() as log:
        y, h = rmsnorm_ext.fused_add_rms_norm(x, r, (n,), w, weight_offset=1.0)
        (y.sum() + h.sum() + norm(x).sum()).backward()
    assert w.grad is None and norm.weight.grad is None
    assert x.grad is not None and r.grad is not None
    bwd = [args for name, args in log.calls if name.startswith("rms_norm_bwd")]
    assert len(bwd) == 2 and all(args[-1] is False for args in bwd)  # compute_weight_grad

    # trainable weight: the same calls do compute it
    w.requires_grad_(True)
    with _OpLog() as log:
        y, h = rmsnorm_ext.fused_add_rms_norm(x, r, (n,), w)
        y.sum().backward()
    assert w.grad is not None
    assert [args[-1] for name, args in log.calls if name.startswith("rms_norm_bwd")] == [True]


# ------------------------------------------------------------------------------------------
# Tiny random-init Hugging Face models (optional)
# ------------------------------------------------------------------------------------------

def _hf_model(name):
    import transformers as tf
    tf.logging.set_verbosity_error()
    common = dict(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FFN,
                  num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=2,
                  max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if name == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    if name == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    if name == "gemma":
        return tf.GemmaForCausalLM(tf.GemmaConfig(head_dim=DIM // HEADS, **common))
    if name == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=DIM, n_layer=2,
                                                n_head=HEADS, n_positions=64, bos_token_id=0,
                                                eos_token_id=1))
    raise ValueError(name)


@needs_hf
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma", "gpt2"])
def test_hf_models(device, name, dtype):
    torch.manual_seed(0)
    model = _hf_model(name)
    with torch.no_grad():  # norms off their init values, so a wrong formula would show
        for mod in model.modules():
            if "Norm" in type(mod).__name__:
                for p in mod.parameters():
                    p.add_(0.3 * torch.randn_like(p))
    model = model.to(device=device, dtype=dtype).train()
    for mod in model.modules():  # deterministic: no dropout
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    ids = _ids(device)
    ref_logits, ref_grads = _run_hf(model, ids)
    params = dict(model.named_parameters())
    n = replace_norms(model)
    assert n == 2 * 2 + 1  # two pre-norms per layer and the final norm
    assert all(a is b for a, b in zip(dict(model.named_parameters()).values(), params.values()))
    logits, grads = _run_hf(model, ids)
    _assert_close(logits, ref_logits, dtype, "logits")
    for k in ref_grads:
        _assert_close(grads[k], ref_grads[k], dtype, k)
    assert replace_norms(model) == 0


def _run_hf(model, ids):
    class Wrap(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, i):
            return self.m(i).logits

    logits, grads = _run(Wrap(model), ids)
    return logits, {k[2:]: v for k, v in grads.items()}


@needs_hf
def test_hf_llama_compiled():
    torch.manual_seed(0)
    model = _hf_model("llama").eval()
    ids = _ids("cpu")
    with torch.no_grad():
        ref = model(ids).logits
        assert replace_norms(model) == 5
        out = torch.compile(model, fullgraph=True)(ids).logits
    _assert_close(out, ref, torch.float32, "logits")


def swap_stages(*modules):
    """For the dtype-rule tests of swapped norms: yields "as swapped", then "upcast" after
    .float() of every module (an original and its swapped copy): the rule the probe learned
    must hold for weights of another dtype than at the swap."""
    yield "as swapped"
    for m in modules:
        m.float()
    yield "upcast"


@pytest.mark.parametrize("swap_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_output_dtype_rule_learned_from_bf16_weights(swap_dtype):
    """A norm whose output keeps the input's dtype (OLMo2: (w * x_fp32).to(input_dtype)) and
    one that promotes (Llama: w * x.to(input_dtype)), swapped while their weights are bf16:
    float32 / bf16 probes cannot tell the two rules apart there (both give the same dtype),
    so an upcast model or fp16 activations got the other rule's dtype. Same dtypes as the
    originals after .float(), and with fp16 / bf16 / fp32 inputs."""
    olmo2 = pytest.importorskip("transformers.models.olmo2.modeling_olmo2")
    for make in (lambda: olmo2.Olmo2RMSNorm(32), lambda: LlamaRMSNorm(32)):
        native = nn.Sequential(make()).to(swap_dtype)
        ours = copy.deepcopy(native)
        assert rmsnorm_ext.replace_norms(ours) == 1
        for stage in swap_stages(native, ours):
            for dt in (torch.float16, torch.bfloat16, torch.float32):
                x = torch.randn(3, 32).to(dt)
                assert ours(x).dtype == native(x).dtype, (type(native[0]).__name__, stage, dt)


@pytest.mark.parametrize("swap_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cohere_layer_norm_swapped(swap_dtype):
    """Cohere's weight-only LayerNorm (fp32 math, output in the input dtype) becomes an
    HFLayerNorm: its values, gradients and output dtypes for fp32 / bf16 / fp16 inputs, also
    after an upcast of the weights; its [heads, head_dim] QK-norm form, and a LayerNorm with
    eps added to the std instead, are left alone."""
    cohere = pytest.importorskip("transformers.models.cohere.modeling_cohere")
    torch.manual_seed(0)
    native = nn.Sequential(cohere.CohereLayerNorm(64)).to(swap_dtype)
    with torch.no_grad():
        native[0].weight.normal_()
    ours = copy.deepcopy(native)
    w = ours[0].weight
    assert rmsnorm_ext.replace_norms(ours) == 1
    assert type(ours[0]).__name__ == "HFLayerNorm" and ours[0].weight is w
    assert ours[0].variance_epsilon == native[0].variance_epsilon
    assert rmsnorm_ext.replace_norms(ours) == 0
    for stage in swap_stages(native, ours):
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            x = ((torch.randn(3, 5, 64) + 2) * 3).to(dt).requires_grad_()
            yn, yo = native(x), ours(x)
            assert yo.dtype == yn.dtype == dt, (stage, dt)
            tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dt]
            torch.testing.assert_close(yo.float(), yn.float(), rtol=tol, atol=tol)
            gn = torch.autograd.grad(yn.float().square().sum(), (x, native[0].weight))
            go = torch.autograd.grad(yo.float().square().sum(), (x, ours[0].weight))
            for a, b in zip(go, gn):
                err = (a.float() - b.float()).abs().max() / b.float().abs().max()
                assert err < 4 * tol, (stage, dt, err)
    x = torch.randn(2, 64)
    for traced in (torch.fx.symbolic_trace(ours), torch.jit.script(ours)):  # like the original
        torch.testing.assert_close(traced(x), ours(x), rtol=0, atol=0)
    assert rmsnorm_ext.replace_norms(nn.Sequential(cohere.CohereLayerNorm((4, 16)))) == 0
    assert rmsnorm_ext.replace_norms(nn.Sequential(EpsOutsideSqrtNorm(64))) == 0
    centered = nn.Sequential(MeanCenteredNorm(64))
    x = torch.randn(3, 64) * 2 + 1
    want = centered(x)
    assert rmsnorm_ext.replace_norms(centered) == 1
    torch.testing.assert_close(centered(x), want, rtol=1e-5, atol=1e-5)


def test_eps_outside_the_square_root_left_alone():
    for eps in (1e-6, 1e-5):
        norm = EpsOutsideSqrtNorm(64, eps=eps, center=False)
        assert rmsnorm_ext.replace_norms(nn.Sequential(norm)) == 0
    assert rmsnorm_ext.replace_norms(nn.Sequential(LlamaRMSNorm(64))) == 1  # eps under it
