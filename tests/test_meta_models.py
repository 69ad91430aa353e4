"""Models built on the meta device, TorchScript, and the modules' repr.

* ``replace_norms`` / ``rmsnorm_ext.hub.kernelize`` on tiny Hugging Face models (Llama, Qwen3,
  Gemma's ``1 + w``) built under ``torch.device("meta")`` or
  ``torch.set_default_device("meta")``, called inside the context (as transformers'
  ``post_init`` under ``from_pretrained`` does) and after it; then ``to_empty`` + a state_dict
  from a normally built model of the same config must give that model's logits and
  gradients (with the same swap).
* ``torch.jit.script`` of models using rmsnorm_ext.RMSNorm / LayerNorm / HFRMSNorm: same
  outputs and gradients as eager, and through ``torch.jit.save``/``load``.
* ``repr`` names our modules (``rmsnorm_ext.RMSNorm(...)``) and keeps torch's extra_repr.

No downloads: configs are built in code, ``from_pretrained`` reads a local ``save_pretrained``.
"""
import copy
import io
import logging
import warnings

import pytest
import torch
from torch import nn

import rmsnorm_ext
from rmsnorm_ext.modules import HFRMSNorm

tf = pytest.importorskip("transformers")

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              bos_token_id=0, eos_token_id=1, pad_token_id=2)
# name -> (model class, config, norms replaced: 2 per layer + the final norm, and Qwen3's
# per-head q_norm/k_norm)
MODELS = {
    "llama": (lambda: tf.LlamaForCausalLM, lambda: tf.LlamaConfig(**COMMON), 5),
    "qwen3": (lambda: tf.Qwen3ForCausalLM, lambda: tf.Qwen3Config(head_dim=16, **COMMON), 9),
    "gemma": (lambda: tf.GemmaForCausalLM, lambda: tf.GemmaConfig(head_dim=16, **COMMON), 5),
}
# What the HF norm of each model is replaced with: (weight_offset, out_dtype policy).
KIND = {"llama": (0.0, "promote"), "qwen3": (0.0, "promote"), "gemma": (1.0, "input")}


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tf.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    logging.getLogger("kernels").setLevel(logging.ERROR)  # "no mapping for SiLU" etc.
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.* deprecation


class _MetaDefault:
    """``torch.set_default_device("meta")``, always reset (even if the body raises)."""

    def __enter__(self):
        torch.set_default_device("meta")

    def __exit__(self, *exc):
        torch.set_default_device(None)
        assert torch.empty(1).device.type == "cpu"


def _meta(how):
    return torch.device("meta") if how == "context" else _MetaDefault()


def _normal(name, seed=0):
    """The model built normally, with its norm weights off their init so they matter."""
    cls, cfg, _ = MODELS[name]
    torch.manual_seed(seed)
    model = cls()(cfg())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _materialize(model, ref):
    """to_empty on the CPU, then ref's state_dict. As for any meta-built model: to_empty
    unties tied weights (Gemma's lm_head/embeddings), retied by ``tie_weights``; and
    non-persistent buffers (the rotary ``inv_freq``) are in no state_dict, here copied from
    ref. (Our norms have no buffers and no tied weights.)"""
    model.to_empty(device="cpu")
    model.tie_weights()
    model.load_state_dict(ref.state_dict(), strict=True)
    with torch.no_grad():
        for n, b in ref.named_buffers():
            model.get_buffer(n).copy_(b)
    return model


def _ids():
    return torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(5))


def _logits_and_grads(model):
    model.zero_grad(set_to_none=True)
    logits = model(_ids()).logits
    dy = torch.randn(logits.shape, generator=torch.Generator().manual_seed(6))
    (logits * dy).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same_run(model, ref):
    got, got_g = _logits_and_grads(model)
    want, want_g = _logits_and_grads(ref)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got_g.keys() == want_g.keys()
    for k in want_g:
        torch.testing.assert_close(got_g[k], want_g[k], rtol=0, atol=0,
                                   msg=lambda m: f"grad {k}: {m}")


def _our_norms(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, rmsnorm_ext.RMSNorm)}


# ------------------------------------------------------------------------------------------
# replace_norms on meta-built models
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("when", ["inside", "after"])
@pytest.mark.parametrize("how", ["context", "set_default_device"])
@pytest.mark.parametrize("name", list(MODELS))
def test_replace_norms_on_meta_model(name, how, when):
    cls, cfg, n_norms = MODELS[name]
    ref = _normal(name)
    assert rmsnorm_ext.replace_norms(ref) == n_norms  # the normally built model's swap

    with _meta(how):
        model = cls()(cfg())
        before = dict(model.named_parameters())
        if when == "inside":
            n = rmsnorm_ext.replace_norms(model)
            assert torch.empty(1).device.type == "meta"  # the caller's default is kept
    if when == "after":
        n = rmsnorm_ext.replace_norms(model)
    assert n == n_norms
    assert rmsnorm_ext.replace_norms(model) == 0

    # Same Parameter objects, still on meta; the same replacements as the normal model's.
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert all(p.device.type == "meta" for p in after.values())
    norms, ref_norms = _our_norms(model), _our_norms(ref)
    assert norms.keys() == ref_norms.keys() and len(norms) == n_norms
    for k, m in norms.items():
        r = ref_norms[k]
        assert type(m) is type(r) is HFRMSNorm, k
        assert (m.weight_offset, m.out_dtype) == (r.weight_offset, r.out_dtype) == KIND[name]
        assert m.eps == r.eps and m.normalized_shape == r.normalized_shape
        assert m.weight is after[k + ".weight"]
    assert model.state_dict().keys() == ref.state_dict().keys()

    _materialize(model, ref)
    assert all(isinstance(m, HFRMSNorm) for m in _our_norms(model).values())
    _assert_same_run(model.train(), ref.train())


def test_meta_probe_keeps_skip_rules():
    """Look-alikes built on meta are still left alone, in and out of the meta context."""
    from test_replace_norms import EpsOutsideSqrtNorm, RMSNormWithBias, ScaledTanh

    for inside in (True, False):
        with torch.device("meta"):
            model = nn.ModuleDict({"tanh": ScaledTanh(8), "std_eps": EpsOutsideSqrtNorm(8),
                                   "bias": RMSNormWithBias(8), "lin": nn.Linear(8, 8)})
            mods = dict(model.items())
            if inside:
                assert rmsnorm_ext.replace_norms(model) == 0
        if not inside:
            assert rmsnorm_ext.replace_norms(model) == 0
        assert all(model[k] is v for k, v in mods.items())


class _PostInitLlama(tf.LlamaForCausalLM):
    """A user's model that swaps its norms in ``post_init`` (run by ``__init__``, under
    ``from_pretrained``'s meta-device construction)."""

    def post_init(self):
        super().post_init()
        self.swap_device = self.model.norm.weight.device.type
        self.swapped = rmsnorm_ext.replace_norms(self)


def test_replace_norms_in_post_init_under_from_pretrained(tmp_path):
    ref = _normal("llama")
    ref.save_pretrained(tmp_path)
    model = _PostInitLlama.from_pretrained(tmp_path)
    assert model.swap_device == "meta"  # from_pretrained did build it on meta
    assert model.swapped == 5 and isinstance(model.model.norm, HFRMSNorm)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert rmsnorm_ext.replace_norms(ref) == 5
    _assert_same_run(model.train(), ref.train())

    # and built directly (post_init on real weights), same again
    torch.manual_seed(0)
    direct = _PostInitLlama(ref.config)
    assert direct.swap_device == "cpu" and direct.swapped == 5
    direct.load_state_dict(ref.state_dict())
    _assert_same_run(direct.train(), ref.train())


# ------------------------------------------------------------------------------------------
# rmsnorm_ext.hub.kernelize on meta-built models
# ------------------------------------------------------------------------------------------

def _fresh_norm_classes():
    """New HF-style classes on each call, so kernelize's probe runs for them (it marks a
    class the first time it sees it)."""

    class LlamaStyle(nn.Module):
        def __init__(self, dim, eps=1e-6):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))
            self.variance_epsilon = eps

        def forward(self, h):
            dt = h.dtype
            h = h.to(torch.float32)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return self.weight * h.to(dt)

    class ZeroCentered(nn.Module):
        def __init__(self, dim, eps=1e-6):
            super().__init__()
            self.eps = eps
            self.weight = nn.Parameter(torch.zeros(dim))

        def forward(self, x):
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            return (h * (1.0 + self.weight.float())).type_as(x)

    return LlamaStyle, ZeroCentered


def _hub_net(classes, seed=None):
    llama_style, zero_centered = classes
    if seed is not None:
        torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(16, 16), llama_style(16), nn.Linear(16, 16),
                        zero_centered(16))
    if seed is not None:
        with torch.no_grad():
            net[1].weight.add_(0.3 * torch.randn(16))
            net[3].weight.add_(0.3 * torch.randn(16))
    return net


@pytest.mark.parametrize("when", ["inside", "after"])
@pytest.mark.parametrize("how", ["context", "set_default_device"])
def test_hub_kernelize_on_meta_model(how, when):
    pytest.importorskip("kernels")
    import rmsnorm_ext.hub as hub

    classes = _fresh_norm_classes()
    ref = _hub_net(classes, seed=0)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    want = ref(x)
    with _meta(how):
        net = _hub_net(classes)
        if when == "inside":
            hub.kernelize(net, mode="training")  # device inferred: meta -> where it will run
    if when == "after":
        hub.kernelize(net, mode="training")
    assert net[1].forward.__func__ is hub.RMSNorm.forward
    assert net[3].forward.__func__ is hub.RMSNormZeroCentered.forward
    net.to_empty(device="cpu")
    net.load_state_dict(ref.state_dict())
    got = net(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.sum().backward()
    assert net[1].weight.grad is not None and net[3].weight.grad is not None


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_hub_kernelize_hf_model_built_on_meta(name):
    pytest.importorskip("kernels")
    import rmsnorm_ext.hub as hub

    cls, cfg, _ = MODELS[name]
    ref = _normal(name)
    with torch.device("meta"):
        model = cls()(cfg())
        hub.kernelize(model, mode="training")
    _materialize(model, ref)
    hub.kernelize(ref, mode="training", device="cpu")
    layer = hub.RMSNorm if name == "llama" else hub.RMSNormZeroCentered
    assert model.model.norm.forward.__func__ is layer.forward
    _assert_same_run(model.train(), ref.train())


# ------------------------------------------------------------------------------------------
# TorchScript
# ------------------------------------------------------------------------------------------

class _ScriptNet(nn.Module):
    """Every module variant, chained: RMSNorm (default eps, eps, no affine, 1 + w),
    LayerNorm (bias, no bias, no affine, 2-D shape), HFRMSNorm (each out_dtype policy, a
    bf16 weight)."""

    def __init__(self, dim=16):
        super().__init__()
        self.lin = nn.Linear(dim, 2 * dim)
        self.norms = nn.ModuleList([
            rmsnorm_ext.RMSNorm(2 * dim),
            rmsnorm_ext.RMSNorm(2 * dim, eps=1e-3),
            rmsnorm_ext.RMSNorm(2 * dim, elementwise_affine=False),
            rmsnorm_ext.RMSNorm(2 * dim, eps=1e-5, weight_offset=1.0),
            rmsnorm_ext.LayerNorm(2 * dim),
            rmsnorm_ext.LayerNorm(2 * dim, bias=False),
            rmsnorm_ext.LayerNorm(2 * dim, elementwise_affine=False),
            rmsnorm_ext.LayerNorm((2, dim), eps=1e-4),
            HFRMSNorm(2 * dim, 1e-6),
            HFRMSNorm(2 * dim, 1e-5, weight_offset=1.0, out_dtype="input"),
            HFRMSNorm(2 * dim, 1e-6, out_dtype="weight"),
            HFRMSNorm(2 * dim, 1e-6, dtype=torch.bfloat16),
        ])
        self.out = nn.Linear(2 * dim, dim)
        with torch.no_grad():
            for p in self.norms.parameters():
                p.add_(0.3 * torch.randn_like(p))

    def forward(self, x):
        h = self.lin(x)
        for norm in self.norms:
            if norm.normalized_shape == (2, 16):
                h = norm(h.view(h.shape[0], 2, 16)).view(h.shape[0], 32)
            else:
                h = norm(h).to(x.dtype) + h
        return self.out(h)


def _fwd_bwd(model, x):
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = model(x)
    torch.manual_seed(9)
    (y.float() * torch.randn(y.shape)).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


def _assert_same_fwd_bwd(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
    assert a[2].keys() == b[2].keys()
    for k in a[2]:
        torch.testing.assert_close(a[2][k], b[2][k], rtol=0, atol=0, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_script_matches_eager_and_survives_save_load(dtype):
    torch.manual_seed(0)
    model = _ScriptNet().to(dtype)
    model.norms[-1].to(torch.bfloat16)  # keep one bf16 weight with fp32/fp64 activations
    x = torch.randn(5, 16, dtype=dtype)
    eager = _fwd_bwd(model, x)
    scripted = torch.jit.script(model)
    _assert_same_fwd_bwd(_fwd_bwd(scripted, x), eager)

    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    _assert_same_fwd_bwd(_fwd_bwd(loaded, x), eager)
    # the loaded module calls our ops (it is not a Python fallback)
    assert "rmsnorm_ext.rms_norm_fwd" in getattr(loaded.norms, "0").code
    assert "rmsnorm_ext.layer_norm_fwd" in getattr(loaded.norms, "4").code


def test_script_like_torch_norms_after_replace_norms():
    """A model scripted with torch's norms, and the same model scripted after replace_norms
    (torch norms and an HF-style norm swapped): same outputs and gradients."""
    from test_replace_norms import GemmaRMSNorm, LlamaRMSNorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.RMSNorm(16), nn.Linear(16, 16),
                          nn.LayerNorm(16), LlamaRMSNorm(16), GemmaRMSNorm(16, eps=1e-5))
    with torch.no_grad():
        for i in (1, 3, 4, 5):
            for p in model[i].parameters():
                p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(4, 16)
    y_torch, dx_torch, g_torch = _fwd_bwd(torch.jit.script(model), x)
    ours = copy.deepcopy(model)
    assert rmsnorm_ext.replace_norms(ours) == 4
    scripted = torch.jit.script(ours)
    y, dx, g = _fwd_bwd(scripted, x)
    torch.testing.assert_close(y, y_torch, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, dx_torch, rtol=1e-5, atol=1e-6)
    for k in g_torch:
        torch.testing.assert_close(g[k], g_torch[k], rtol=1e-5, atol=1e-5)
    _assert_same_fwd_bwd((y, dx, g), _fwd_bwd(ours, x))  # and exactly eager's


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fx_symbolic_trace_like_torch_norms_after_replace_norms(dtype):
    """torch.fx.symbolic_trace traces a model with torch's norms; after replace_norms (eps=None
    norms and an HF-style norm, whose defaults and dtype rules need real tensors) it traces
    too, and the traced graph gives eager's outputs and gradients exactly. Also a module
    calling the functions with eps=None."""
    from test_replace_norms import GemmaRMSNorm, LlamaRMSNorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.RMSNorm(16), nn.Linear(16, 16),
                          nn.LayerNorm(16), LlamaRMSNorm(16), GemmaRMSNorm(16, eps=1e-5)).to(dtype)
    torch.fx.symbolic_trace(model)
    ours = copy.deepcopy(model)
    assert rmsnorm_ext.replace_norms(ours) == 4
    traced = torch.fx.symbolic_trace(ours)
    x = torch.randn(4, 16, dtype=dtype)
    _assert_same_fwd_bwd(_fwd_bwd(traced, x), _fwd_bwd(ours, x))

    class Calls(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(16, dtype=dtype))

        def forward(self, x, r, g):
            y, h = rmsnorm_ext.fused_add_rms_norm(x, r, (16,), self.w)
            return (rmsnorm_ext.rms_norm(x, (16,), self.w) + y + h
                    + rmsnorm_ext.gated_rms_norm(x, g, (16,), self.w))

    calls = Calls()
    traced = torch.fx.symbolic_trace(calls)
    args = [torch.randn(4, 16, dtype=dtype) * 1e-2 for _ in range(3)]  # eps matters
    assert torch.equal(traced(*args), calls(*args))


def test_scripted_bad_input_names_the_dtype():
    scripted = torch.jit.script(nn.Sequential(rmsnorm_ext.RMSNorm(8)))
    with pytest.raises(Exception, match="float32, float64, bfloat16 or float16, got torch.int32"):
        scripted(torch.ones(2, 8, dtype=torch.int32))


# ------------------------------------------------------------------------------------------
# repr
# ------------------------------------------------------------------------------------------

def test_repr_names_our_modules():
    assert repr(rmsnorm_ext.RMSNorm(64)) == \
        "rmsnorm_ext.RMSNorm((64,), eps=None, elementwise_affine=True)"
    assert repr(rmsnorm_ext.RMSNorm(8, eps=1e-5, weight_offset=1.0)) == \
        "rmsnorm_ext.RMSNorm((8,), eps=1e-05, elementwise_affine=True, weight_offset=1.0)"
    assert repr(rmsnorm_ext.LayerNorm(8, bias=False)) == \
        "rmsnorm_ext.LayerNorm((8,), eps=1e-05, elementwise_affine=True, bias=False)"
    assert repr(HFRMSNorm(8, 1e-6, weight_offset=1.0, out_dtype="input")) == (
        "rmsnorm_ext.modules.HFRMSNorm((8,), eps=1e-06, elementwise_affine=True, "
        "weight_offset=1.0, out_dtype='input')")
    for ours, theirs in ((rmsnorm_ext.RMSNorm((4, 8), 1e-5), nn.RMSNorm((4, 8), 1e-5)),
                         (rmsnorm_ext.LayerNorm(8), nn.LayerNorm(8))):
        assert ours.extra_repr() == theirs.extra_repr()
        assert repr(ours) == "rmsnorm_ext." + repr(theirs)
        assert isinstance(ours, type(theirs))
        assert ours.state_dict().keys() == theirs.state_dict().keys()

    class MyNorm(rmsnorm_ext.RMSNorm):  # a user's subclass keeps its own name
        pass

    assert repr(MyNorm(4)) == "MyNorm((4,), eps=None, elementwise_affine=True)"


def test_swapped_model_repr_shows_our_modules():
    ref = _normal("gemma")
    native = repr(ref)
    assert "rmsnorm_ext" not in native
    assert rmsnorm_ext.replace_norms(ref) == 5
    assert native.count("GemmaRMSNorm((64,), eps=1e-06)") == 3  # layers print as "2 x"
    assert repr(ref) == native.replace(
        "GemmaRMSNorm((64,), eps=1e-06)",
        "rmsnorm_ext.modules.HFRMSNorm((64,), eps=1e-06, elementwise_affine=True, "
        "weight_offset=1.0, out_dtype='input')")
    model = nn.Sequential(nn.Linear(4, 4), nn.RMSNorm(4), nn.LayerNorm(4))
    rmsnorm_ext.replace_norms(model)
    assert repr(model) == (
        "Sequential(\n"
        "  (0): Linear(in_features=4, out_features=4, bias=True)\n"
        "  (1): rmsnorm_ext.RMSNorm((4,), eps=None, elementwise_affine=True)\n"
        "  (2): rmsnorm_ext.LayerNorm((4,), eps=1e-05, elementwise_affine=True, bias=True)\n"
        ")")


class _FactoryInForwardNorm(nn.Module):
    """An HF-style RMSNorm whose forward creates a tensor without a device (it follows the
    default device)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, h):
        h32 = h.float()
        var = h32.pow(2).mean(-1, keepdim=True) + torch.full((), self.variance_epsilon)
        return self.weight * (h32 * torch.rsqrt(var)).to(h.dtype)


@pytest.mark.parametrize("how", ["context", "set_default_device"])
def test_probe_runs_forward_with_the_probe_device_as_default(how):
    """Probing under a meta default device: the module's own factory calls get the probe's
    device, not meta (else the probe fails and the norm is silently left alone)."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(8, 8), _FactoryInForwardNorm(8))
    with torch.no_grad():
        ref[1].weight.add_(0.3 * torch.randn(8))
    x = torch.randn(3, 8)
    want = ref(x)
    with _meta(how):
        model = nn.Sequential(nn.Linear(8, 8), _FactoryInForwardNorm(8))
        assert rmsnorm_ext.replace_norms(model) == 1
        assert torch.empty(()).device.type == "meta"
    assert isinstance(model[1], HFRMSNorm)
    model.to_empty(device="cpu")
    model.load_state_dict(ref.state_dict())
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)
