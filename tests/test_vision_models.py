"""replace_norms on vision models: timm, torchvision, Hugging Face (random weights, tiny sizes).

* every timm norm class replace_norms swaps (rmsnorm_ext/_vision.py), alone: same outputs,
  input and parameter gradients, output dtype, in float32 / float64 / bfloat16 (with fp32 or
  bf16 parameters), NCHW and channels_last; timm's fast norm under autocast;
* what is left alone (timm's SimpleNorm/GroupNorm, subclasses of torch's norms that compute
  something else, apex-backed fast norms);
* whole models -- timm ``convnext_atto`` (17 ``LayerNorm2d``) and ``vit_tiny_patch16_224``
  (25 ``LayerNorm``), a torchvision ConvNeXt, Hugging Face ConvNext / ConvNextV2 / SAM vision
  encoder -- give the same outputs and parameter gradients after the swap, in train and eval
  mode; channels_last models, torch.compile, pickle/deepcopy and meta-device construction.

Nothing is downloaded: timm models are built with ``pretrained=False``, HF ones from configs.
"""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rmsnorm_ext
from rmsnorm_ext._vision import FusedNorm

timm = pytest.importorskip("timm")
from timm.layers import fast_norm, norm as timm_norm  # noqa: E402

C = 8
TIMM_NORMS = ["LayerNorm", "LayerNormFp32", "LayerNorm2d", "LayerNorm2dFp32", "RmsNorm",
              "RmsNormFp32", "RmsNorm2d", "RmsNorm2dFp32"]
CHANNELS_FIRST = {n for n in TIMM_NORMS if "2d" in n}
# input dtype, parameter dtype
DTYPES = {"fp32": (torch.float32, torch.float32), "fp64": (torch.float64, torch.float64),
          "bf16": (torch.bfloat16, torch.bfloat16), "bf16_fp32w": (torch.bfloat16, torch.float32)}


def _tols(dtype, fp32_math=False):
    if dtype == torch.bfloat16:
        return dict(rtol=2e-2, atol=2e-2)  # one or two bf16 ulps (timm rounds more often)
    if dtype == torch.float64 and not fp32_math:
        return dict(rtol=1e-12, atol=1e-12)
    return dict(rtol=1e-5, atol=1e-5)


def _perturbed(module, seed=1):
    """The norms' parameters off their init (ones / zeros), so a swapped weight or bias
    shows up; the rest of a model keeps its init (a well-conditioned float32 model)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if "Norm" in type(m).__name__:
                for p in m.parameters(recurse=False):
                    p.add_(0.3 * torch.randn(p.shape, generator=g).to(p.dtype))
    return module


def _swap(module):
    """Swap a lone module (replace_norms replaces children) and return the new one."""
    holder = nn.Sequential(module)
    assert rmsnorm_ext.replace_norms(holder) == 1, type(module)
    return holder[0]


def _fwd_bwd(module, x):
    x = x.detach().requires_grad_()
    for p in module.parameters():
        p.grad = None
    y = module(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y.dtype)
    (y * dy).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}


# ------------------------------------------------------------------------------------------
# timm's norm classes, one at a time
# ------------------------------------------------------------------------------------------

def _timm_input(name, dtype, channels_last=False):
    g = torch.Generator().manual_seed(3)
    if name in CHANNELS_FIRST:
        x = torch.randn(2, C, 5, 6, generator=g) * 2 + 0.5
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = torch.randn(2, 7, C, generator=g) * 2 + 0.5
    return x.to(dtype)


@pytest.mark.parametrize("name,dt,channels_last", [
    pytest.param(n, dt, cl, id=f"{n}-{dt}" + ("-channels_last" if cl else ""))
    for n in TIMM_NORMS for dt in DTYPES for cl in (False, True)
    if not cl or n in CHANNELS_FIRST])
def test_timm_norm_swapped_with_same_values_and_grads(name, dt, channels_last):
    xdt, pdt = DTYPES[dt]
    cls = getattr(timm_norm, name)
    ref = _perturbed(cls(C, eps=1e-5)).to(pdt)
    ours = _swap(copy.deepcopy(ref))
    assert isinstance(ours, cls) and isinstance(ours, FusedNorm)
    assert type(ours).__name__ == f"Fused{name}" and f"rmsnorm_ext.Fused{name}(" in repr(ours)
    assert ours.eps == 1e-5 and ours.state_dict().keys() == ref.state_dict().keys()

    x = _timm_input(name, xdt, channels_last)
    want, want_dx, want_dp = _fwd_bwd(ref, x)
    got, got_dx, got_dp = _fwd_bwd(ours, x)
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = _tols(xdt, fp32_math=name.endswith("Fp32"))
    torch.testing.assert_close(got, want, **tol)
    if xdt == torch.bfloat16:
        return  # timm's backward rounds each step to bf16: only the forward is compared
    torch.testing.assert_close(got_dx, want_dx, **tol)
    assert got_dp.keys() == want_dp.keys()
    for k in want_dp:
        torch.testing.assert_close(got_dp[k], want_dp[k], **tol, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("name", ["LayerNorm", "LayerNorm2d", "RmsNorm", "RmsNorm2d"])
def test_timm_fast_norm_runs_in_the_autocast_dtype(name, monkeypatch):
    monkeypatch.setattr(fast_norm, "_USE_FAST_NORM", True)
    monkeypatch.setattr(fast_norm, "has_apex", False)
    monkeypatch.setattr(fast_norm, "has_apex_rmsnorm", False)
    ref = _perturbed(getattr(timm_norm, name)(C))
    assert ref._fast_norm
    ours = _swap(copy.deepcopy(ref))
    x = _timm_input(name, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = ref(x), ours(x)
    assert want.dtype == got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, **_tols(torch.bfloat16))
    torch.testing.assert_close(ours(x), ref(x), **_tols(torch.float32))  # no autocast: fp32


def test_timm_fast_norm_with_apex_is_left_alone(monkeypatch):
    monkeypatch.setattr(fast_norm, "_USE_FAST_NORM", True)
    monkeypatch.setattr(fast_norm, "has_apex", True)  # timm would call apex's kernels
    model = nn.Sequential(timm_norm.LayerNorm2d(C), timm_norm.LayerNorm(C))
    assert rmsnorm_ext.replace_norms(model) == 0


# ------------------------------------------------------------------------------------------
# Subclasses of torch's norms: swapped when they compute torch's norm, else left alone
# ------------------------------------------------------------------------------------------

class Fp32LayerNorm(nn.LayerNorm):
    """diffusers' FP32LayerNorm: fp32 math, input dtype out."""

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape,
                            None if self.weight is None else self.weight.float(),
                            None if self.bias is None else self.bias.float(),
                            self.eps).to(x.dtype)


class PlainRMSNormSubclass(nn.RMSNorm):
    def extra_repr(self):
        return "mine"


class OnePlusLayerNorm(nn.LayerNorm):
    """NeMo / Nemotron ``LayerNorm1P``: scales by 1 + w."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, 1 + self.weight, self.bias, self.eps)


class FixedEpsLayerNorm2d(nn.LayerNorm):
    """Channels-first, but with its own eps (not self.eps)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, 1.0).permute(
            0, 3, 1, 2)


class HalfRMSNorm(nn.RMSNorm):
    def forward(self, x):
        return 0.5 * super().forward(x)


@pytest.mark.parametrize("dt", ["fp32", "fp64", "bf16_fp32w"])
@pytest.mark.parametrize("kind", ["torchvision", "hf_first", "hf_last", "fp32_ln", "rms_sub"])
def test_probed_subclasses_swapped(kind, dt):
    if kind == "torchvision":
        from torchvision.models.convnext import LayerNorm2d
        ref, x = LayerNorm2d(C, eps=1e-6), torch.randn(2, C, 5, 6)
    elif kind.startswith("hf_"):
        hf = pytest.importorskip("transformers.models.convnext.modeling_convnext")
        first = kind == "hf_first"
        ref = hf.ConvNextLayerNorm(C, data_format="channels_first" if first else "channels_last")
        x = torch.randn(2, C, 5, 6) if first else torch.randn(2, 5, 6, C)
    elif kind == "fp32_ln":
        ref, x = Fp32LayerNorm(C), torch.randn(2, 5, C)
    else:
        ref, x = PlainRMSNormSubclass(C, eps=1e-5), torch.randn(2, 5, C)
    xdt, pdt = DTYPES[dt]
    ref = _perturbed(ref).to(pdt)
    x = (x * 2 + 0.5).to(xdt)
    ours = _swap(copy.deepcopy(ref))
    assert isinstance(ours, type(ref)) and ours.weight is not ref.weight  # (a deep copy)
    want, want_dx, want_dp = _fwd_bwd(ref, x)
    got, got_dx, got_dp = _fwd_bwd(ours, x)
    assert got.dtype == want.dtype
    tol = _tols(xdt, fp32_math=kind == "fp32_ln")
    torch.testing.assert_close(got, want, **tol)
    if xdt != torch.bfloat16:
        torch.testing.assert_close(got_dx, want_dx, **tol)
        for k in want_dp:
            torch.testing.assert_close(got_dp[k], want_dp[k], **tol)
    expected = "fp32" if kind == "fp32_ln" else "native"
    assert ours._rmsnorm_ext_spec.precision == expected


def test_left_alone():
    modules = {
        "simple": timm_norm.SimpleNorm(C), "simple2d": timm_norm.SimpleNorm2d(C),
        "simple_fp32": timm_norm.SimpleNormFp32(C), "group1": timm_norm.GroupNorm1(C),
        "group": timm_norm.GroupNorm(C, num_groups=2), "one_plus": OnePlusLayerNorm(C),
        "fixed_eps": FixedEpsLayerNorm2d(C), "half_rms": HalfRMSNorm(C),
        "ln_act": timm.layers.LayerNormAct2d(C), "exp2d": timm_norm.LayerNormExp2d(C),
    }
    model = nn.ModuleDict(modules)
    _perturbed(model)
    assert rmsnorm_ext.replace_norms(model) == 0
    assert all(model[k] is v for k, v in modules.items())


def test_swap_keeps_parameters_hooks_and_mode():
    ref = _perturbed(timm_norm.LayerNorm2d(C)).eval()
    calls = []
    handle = ref.register_forward_hook(lambda *a: calls.append(1))
    model = nn.Sequential(ref)
    assert rmsnorm_ext.replace_norms(model) == 1
    new = model[0]
    assert new.weight is ref.weight and new.bias is ref.bias and not new.training
    new(torch.randn(1, C, 2, 2))
    assert calls == [1]
    handle.remove()
    new(torch.randn(1, C, 2, 2))
    assert calls == [1]
    assert type(ref) is timm_norm.LayerNorm2d  # the original is untouched
    assert rmsnorm_ext.replace_norms(model) == 0


# ------------------------------------------------------------------------------------------
# Whole models
# ------------------------------------------------------------------------------------------

_TIMM_MODELS = {  # name -> (create_model kwargs, input shape, norms)
    "convnext_atto": (dict(), (2, 3, 32, 32), 17),
    "vit_tiny_patch16_224": (dict(img_size=32), (2, 3, 32, 32), 25),
}
_BUILT = {}


def _timm_model(name):
    """A fresh copy of the (once built) random-weight model, norm parameters perturbed."""
    if name not in _BUILT:
        kwargs = _TIMM_MODELS[name][0]
        torch.manual_seed(0)
        _BUILT[name] = _perturbed(timm.create_model(name, pretrained=False, num_classes=10,
                                                    **kwargs))
    return copy.deepcopy(_BUILT[name])


def _model_run(model, x):
    """Output and parameter gradients in training mode; the output alone in eval mode."""
    if not model.training:
        with torch.no_grad():
            return model(x), {}
    model.zero_grad(set_to_none=True)
    y = model(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(y.dtype)
    (y * dy).sum().backward()
    return y.detach(), {n: p.grad for n, p in model.named_parameters()}


def _assert_same_model_run(model, ref, x, **tol):
    y, grads = _model_run(model, x)
    want, want_grads = _model_run(ref, x)
    torch.testing.assert_close(y, want, **tol)
    assert grads.keys() == want_grads.keys()
    for k in want_grads:
        torch.testing.assert_close(grads[k], want_grads[k], **tol, msg=lambda m: f"{k}: {m}")


def _x(shape, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(dtype)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(_TIMM_MODELS))
def test_timm_models(name, dtype, train):
    _, shape, n_norms = _TIMM_MODELS[name]
    ref = _timm_model(name).to(dtype).train(train)
    model = copy.deepcopy(ref)
    params = dict(model.named_parameters())
    assert rmsnorm_ext.replace_norms(model) == n_norms
    assert rmsnorm_ext.replace_norms(model) == 0
    assert sum(isinstance(m, FusedNorm) for m in model.modules()) == n_norms
    assert all(p is params[k] for k, p in model.named_parameters())
    assert model.state_dict().keys() == ref.state_dict().keys()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    _assert_same_model_run(model, ref, _x(shape, dtype), **tol)


def test_timm_convnext_channels_last():
    ref = _timm_model("convnext_atto")
    model = copy.deepcopy(ref).to(memory_format=torch.channels_last)
    assert rmsnorm_ext.replace_norms(model) == 17
    x = _x((2, 3, 32, 32))
    _assert_same_model_run(model, ref, x.contiguous(memory_format=torch.channels_last),
                           rtol=1e-4, atol=1e-5)


def _tiny_convnext():
    """A timm ConvNeXt with one block per stage and few channels: 9 LayerNorm2d (stem, 4
    blocks, 3 downsamples, head), cheap to compile and to build twice."""
    from timm.models.convnext import ConvNeXt
    return ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=10)


def test_timm_convnext_compiled():
    torch.manual_seed(0)
    ref = _perturbed(_tiny_convnext()).eval()
    model = copy.deepcopy(ref)
    assert rmsnorm_ext.replace_norms(model) == 9
    x = _x((2, 3, 32, 32))
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), ref(x), rtol=1e-4, atol=1e-5)


def test_timm_convnext_gradient_checkpointing():
    """A swapped ConvNeXt (conv_mlp: its blocks' norms are LayerNorm2d, i.e. layer_norm_2d)
    trains under timm's gradient checkpointing (checkpoint_seq, non-reentrant) with the
    original's gradients: the table ops' backward used to unpack their saved tensors twice,
    which a non-reentrant checkpoint refuses (convnext_atto's backward raised)."""
    from timm.models.convnext import ConvNeXt
    torch.manual_seed(0)
    ref = _perturbed(ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=10,
                              conv_mlp=True))
    model = copy.deepcopy(ref)
    assert rmsnorm_ext.replace_norms(model) == 9
    model.set_grad_checkpointing(True)
    ref.set_grad_checkpointing(True)
    _assert_same_model_run(model, ref, _x((2, 3, 32, 32)), rtol=1e-4, atol=1e-5)


def test_swapped_model_pickles_and_deepcopies():
    torch.manual_seed(0)
    ref = _perturbed(_tiny_convnext()).eval()
    model = copy.deepcopy(ref)
    assert rmsnorm_ext.replace_norms(model) == 9
    x = _x((1, 3, 32, 32))
    with torch.no_grad():
        want = ref(x)
        for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            assert sum(isinstance(m, FusedNorm) for m in clone.modules()) == 9
            assert isinstance(clone.stem[1], timm_norm.LayerNorm2d)
            torch.testing.assert_close(clone(x), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("when", ["inside", "after"])
def test_timm_model_built_on_meta(when):
    torch.manual_seed(0)
    ref = _perturbed(_tiny_convnext())
    with torch.device("meta"):
        model = _tiny_convnext()
        if when == "inside":
            assert rmsnorm_ext.replace_norms(model) == 9
    if when == "after":
        assert rmsnorm_ext.replace_norms(model) == 9
    assert all(p.device.type == "meta" for p in model.parameters())
    model.to_empty(device="cpu")
    model.load_state_dict(ref.state_dict())
    _assert_same_model_run(model, ref, _x((2, 3, 32, 32)), rtol=1e-4, atol=1e-5)


def test_torchvision_convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    torch.manual_seed(0)
    ref = _perturbed(ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)],
                              num_classes=10))
    model = copy.deepcopy(ref)
    # stem, downsample and head LayerNorm2d (probed subclass), the blocks' nn.LayerNorm
    assert rmsnorm_ext.replace_norms(model) == 5
    for dtype, tol in ((torch.float32, dict(rtol=1e-4, atol=1e-5)),
                       (torch.float64, dict(rtol=1e-10, atol=1e-10))):
        _assert_same_model_run(model.to(dtype), ref.to(dtype), _x((2, 3, 32, 32), dtype), **tol)


# ------------------------------------------------------------------------------------------
# Hugging Face
# ------------------------------------------------------------------------------------------

def _hf_convnext(v2=False):
    tf = pytest.importorskip("transformers")
    tf.logging.set_verbosity_error()
    cfg_cls = tf.ConvNextV2Config if v2 else tf.ConvNextConfig
    cls = tf.ConvNextV2ForImageClassification if v2 else tf.ConvNextForImageClassification
    cfg = cfg_cls(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=5)
    return cls, cfg


@pytest.mark.parametrize("v2", [False, True], ids=["convnext", "convnextv2"])
def test_hf_convnext(v2):
    cls, cfg = _hf_convnext(v2)
    torch.manual_seed(0)
    ref = _perturbed(cls(cfg))
    model = copy.deepcopy(ref)
    # embeddings (channels_first), 2 blocks (channels_last), downsample (channels_first),
    # the pooler's nn.LayerNorm
    assert rmsnorm_ext.replace_norms(model) == 5
    assert rmsnorm_ext.replace_norms(model) == 0
    _assert_same_model_run(_Logits(model), _Logits(ref), _x((2, 3, 32, 32)),
                           rtol=1e-4, atol=1e-5)


class _Logits(nn.Module):
    """The HF model returning a tensor (its logits or last hidden state)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(pixel_values=x)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_hf_sam_vision_encoder():
    tf = pytest.importorskip("transformers")
    tf.logging.set_verbosity_error()
    cfg = tf.SamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=2,
                             num_attention_heads=2, image_size=64, patch_size=8, mlp_dim=64,
                             global_attn_indexes=[1], window_size=4)
    torch.manual_seed(0)
    ref = _Logits(_perturbed(tf.SamVisionModel(cfg)))
    model = copy.deepcopy(ref)
    # 2 blocks x 2 nn.LayerNorm, 2 SamLayerNorm (channels_first) in the neck
    assert rmsnorm_ext.replace_norms(model) == 6
    _assert_same_model_run(model, ref, _x((1, 3, 64, 64)), rtol=1e-4, atol=1e-5)


def test_hf_convnext_built_on_meta():
    cls, cfg = _hf_convnext()
    torch.manual_seed(0)
    ref = _perturbed(cls(cfg))
    with torch.device("meta"):
        model = cls(cfg)
        assert rmsnorm_ext.replace_norms(model) == 5  # probed on the CPU
    model.to_empty(device="cpu")
    model.load_state_dict(ref.state_dict())
    x = _x((2, 3, 32, 32))
    torch.testing.assert_close(model(pixel_values=x).logits, ref(pixel_values=x).logits,
                               rtol=1e-4, atol=1e-5)


def _channels_first_modules():
    import torchvision.models.convnext as tv
    from transformers.models.convnext.modeling_convnext import ConvNextLayerNorm
    return {"timm LayerNorm2d": lambda: timm_norm.LayerNorm2d(8),
            "timm LayerNorm2dFp32": lambda: timm_norm.LayerNorm2dFp32(8),
            "timm RmsNorm2d": lambda: timm_norm.RmsNorm2d(8),
            "torchvision LayerNorm2d": lambda: tv.LayerNorm2d(8),
            "hf ConvNextLayerNorm": lambda: ConvNextLayerNorm(8, data_format="channels_first")}


@pytest.mark.parametrize("name", sorted(_channels_first_modules()))
def test_swapped_channels_first_norm_returns_the_originals_strides(name):
    # timm's / torchvision's LayerNorm2d and HF ConvNeXt permute an NCHW input to NHWC and
    # back, so their output is channels_last-strided; the convs after them run at the speed
    # of that layout, so the swapped module must return the same strides (values alone are
    # not enough for a drop-in: a model got 1.3x slower when they differed).
    orig = _channels_first_modules()[name]()
    fused = _swap(copy.deepcopy(orig))
    assert isinstance(fused, FusedNorm)
    x = torch.randn(2, 8, 3, 5)
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        want, got = orig(inp), fused(inp)
        assert got.stride() == want.stride(), (got.stride(), want.stride())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
