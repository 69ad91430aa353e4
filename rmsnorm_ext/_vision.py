"""Vision norms for ``replace_norms``: timm's norm layers and subclasses of torch's norms.

Vision code rarely uses ``torch.nn.LayerNorm`` as is: timm, torchvision and Hugging Face
subclass it (or write their own module) to normalize tokens ``[..., C]`` or channels-first
maps ``[N, C, H, W]`` (permute to NHWC, ``F.layer_norm``, permute back), some in fp32. These
modules are swapped for *fused subclasses of their own class* (``FusedLayerNorm2d`` derives
from timm's ``LayerNorm2d``): the same Parameters, attributes, hooks and state_dict, and
``isinstance`` checks in model code (timm's ``isinstance(self.norm, RmsNormFp32)``) still
hold; only ``forward`` changes, to one rmsnorm_ext op that reads the input in its own memory
format (no permute copy). The output of a channels-first norm is in the input's memory
format, where ``permute -> F.layer_norm -> permute`` returns a channels_last-strided tensor
for a contiguous NCHW input: the same values, other strides.

Which modules, and with which semantics (a ``Spec``):

* timm (``timm.layers.norm``, the exact classes): ``LayerNorm``, ``RmsNorm`` (tokens, torch's
  semantics), ``LayerNorm2d`` (channels-first LayerNorm), ``RmsNorm2d``
  (channels-first; timm computes in the input dtype and returns ``promote_types(x, w)``:
  ours computes in fp32 with one rounding to the input dtype, then casts to that dtype, so
  bf16/fp16 results differ by rounding), and the ``Fp32`` variants ``LayerNormFp32``,
  ``LayerNorm2dFp32``, ``RmsNormFp32``, ``RmsNorm2dFp32`` (math in fp32, output in the input
  dtype: the kernel's fp32 math and one rounding is that; float64 input is computed in fp32
  like timm does). timm's *fast norm* (``set_fast_norm()``, off by default) runs the norm in
  the autocast dtype under autocast; the fused forward does the same. With apex installed
  timm's fast norm calls apex instead, whose dtype rules we do not mirror: such modules
  (``_fast_norm`` true) are left alone.
* Any other subclass of ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` (torchvision's
  ConvNeXt ``LayerNorm2d``; transformers' ``ConvNextLayerNorm``, ``ConvNextV2LayerNorm``,
  ``SamLayerNorm``, ``Sam2LayerNorm``, ``DINOv3ConvNextLayerNorm``, ``EomtLayerNorm2d`` and
  their copies, with ``data_format`` "channels_first" or "channels_last"; diffusers'
  ``FP32LayerNorm``; a user's own) is recognized by what its forward computes on random
  probes, as replace.py does for Hugging Face RMSNorms: torch's norm over the trailing
  ``normalized_shape`` dims or over dim 1 of ``[N, C, *spatial]``, in the input's dtype or in
  fp32 (told apart by a float64 probe). A subclass that computes anything else (NeMo-style
  ``1 + w``, a scaled output, another eps) fails the probe and is left alone. The layout is
  decided once, when swapped: an HF module whose ``data_format`` is changed afterwards keeps
  the old layout.

Left alone: timm's ``SimpleNorm*`` (``x * rsqrt(unbiased var + eps)``, no centering: no
kernel of ours computes it), ``GroupNorm``/``GroupNorm1`` and the ``*Act`` norm+activation
layers (other ops), ``LayerNormExp2d`` (experimental, in no timm model: on a non-contiguous
input its manual path returns ``promote_types(x, w)``, e.g. fp32 for bf16 activations with
fp32 parameters, where the contiguous path returns the input dtype; the probe's
channels_last input shows it), modules that are not subclasses of torch's norms and not
timm's (their structure says nothing about the math, e.g. HF's ``VitDetLayerNorm``;
HF-style RMSNorms are probed by replace.py).
Channels-first swaps accept any ``[N, C, *spatial]`` input; timm's and HF's accept 4-D only.
The fused classes pickle and deepcopy (rebuilt from the original class), but are not
TorchScript-able (the originals are).
"""
import copy
import sys
from typing import NamedTuple, Optional

import torch
from torch import nn

from .functional import layer_norm, layer_norm_2d, rms_norm, rms_norm_2d

_REDUCED = (torch.bfloat16, torch.float16)


class Spec(NamedTuple):
    norm: str       # "layer" | "rms"
    layout: str     # "last": over the trailing normalized_shape dims | "channels": over dim 1
    precision: str  # "native" (torch's rules) | "fp32" (fp32 math, input dtype out)
    #                 | "promote" (timm RmsNorm2d: output promote_types(x, w))
    fast: bool = False  # timm fast norm: follows the instance's ``_fast_norm`` flag
    # channels layout: the original returns a channels_last-strided output for a contiguous
    # NCHW input (it permutes to NHWC and back: timm's / torchvision's LayerNorm2d, HF
    # ConvNeXt). The fused module returns the same strides: the layers after it (convs)
    # run at the speed of the layout they get, so a different one can slow a model down.
    cl_out: bool = False


# timm 1.0.x, timm/layers/norm.py
_TIMM = {
    "LayerNorm": Spec("layer", "last", "native", fast=True),
    "LayerNormFp32": Spec("layer", "last", "fp32"),
    "LayerNorm2d": Spec("layer", "channels", "native", fast=True, cl_out=True),
    "LayerNorm2dFp32": Spec("layer", "channels", "fp32", cl_out=True),
    "RmsNorm": Spec("rms", "last", "native", fast=True),
    "RmsNormFp32": Spec("rms", "last", "fp32"),
    "RmsNorm2d": Spec("rms", "channels", "promote", fast=True),
    "RmsNorm2dFp32": Spec("rms", "channels", "fp32"),
}


# ---------------------------------------------------------------------------------------
# The computation (shared by the fused forward and the probe)

def _param_for(p, x):
    """p in a dtype the kernel takes beside x: x's own, or float32 beside bf16/fp16 (torch
    casts or promotes a mismatched weight where our kernels refuse it; F.rms_norm returns
    the input's dtype for a float64 weight with float32 input, and so do we)."""
    if p is None or p.dtype == x.dtype or (p.dtype == torch.float32 and x.dtype in _REDUCED):
        return p
    return p.to(torch.float32 if x.dtype in _REDUCED else x.dtype)


def _norm(spec: Spec, x, shape, w, b, eps):
    w, b = _param_for(w, x), _param_for(b, x)
    if spec.norm == "layer":
        if spec.layout == "last":
            return layer_norm(x, shape, w, b, eps)
        return layer_norm_2d(x, w, b, eps)
    if spec.layout == "last":
        return rms_norm(x, shape, w, eps)
    return rms_norm_2d(x, w, eps)


def compute(spec: Spec, x, shape, w, b, eps, fast: bool = False):
    """What the fused module computes for input x with parameters w, b, in the layout the
    original returns (Spec.cl_out)."""
    if spec.cl_out and x.dim() == 4 and not x.is_contiguous(memory_format=torch.channels_last):
        # The original's own copy (F.layer_norm of the permuted view): then the row kernels
        # read NHWC in place and write the channels_last output (cheaper than the strided
        # kernel plus a copy of the output).
        x = x.contiguous(memory_format=torch.channels_last)
    return _compute_values(spec, x, shape, w, b, eps, fast)


def _compute_values(spec: Spec, x, shape, w, b, eps, fast: bool = False):
    if fast and torch.is_autocast_enabled(x.device.type):
        # timm's fast norm: the norm in the (lower) autocast dtype, autocast off.
        dt = torch.get_autocast_dtype(x.device.type)
        x, w, b = (t if t is None else t.to(dt) for t in (x, w, b))
        with torch.autocast(x.device.type, enabled=False):
            return _norm(spec, x, shape, w, b, eps)
    if spec.precision == "fp32":
        # fp32 math with one rounding to the input dtype is what the kernel does for
        # fp32/bf16/fp16 input (an fp32 weight is accepted beside bf16/fp16); float64 goes
        # through fp32 like the original's x.float().
        xin = x if x.dtype in _REDUCED or x.dtype == torch.float32 else x.float()
        w, b = (t if t is None else t.float() for t in (w, b))
        y = _norm(spec, xin, shape, w, b, eps)
        return y if y.dtype == x.dtype else y.to(x.dtype)
    y = _norm(spec, x, shape, w, b, eps)
    if spec.precision == "promote":
        out = x.dtype if w is None else torch.promote_types(x.dtype, w.dtype)
        return y if y.dtype == out else y.to(out)
    return y


# ---------------------------------------------------------------------------------------
# The fused classes: one per original class, created on first use

class FusedNorm:
    """Mixin of the fused classes (first base, so its ``forward`` wins): ``forward`` runs
    :func:`compute` with the instance's ``_rmsnorm_ext_spec``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self._rmsnorm_ext_spec
        return compute(spec, x, self.normalized_shape, self.weight,
                       getattr(self, "bias", None) if spec.norm == "layer" else None,
                       self.eps, spec.fast and self._fast_norm)

    def _get_name(self) -> str:
        return f"rmsnorm_ext.{type(self).__name__}"

    def __reduce_ex__(self, protocol):
        # The class is made at run time, so pickle cannot find it by name: rebuild it from
        # the original class (which pickle can find) when loading.
        return _rebuild, (type(self).__bases__[1],), self.__getstate__()


_CLASSES = {}


def fused_class(base: type) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type(f"Fused{base.__name__}", (FusedNorm, base),
                              {"__module__": __name__})
    return _CLASSES[base]


def _rebuild(base: type):
    cls = fused_class(base)
    return cls.__new__(cls)


def _fused(module: nn.Module, spec: Spec) -> nn.Module:
    cls = fused_class(type(module))
    new = cls.__new__(cls)
    # The same attributes, Parameters, flags and hook dicts (shared, so existing handles
    # keep working); the containers are copies, so the old module is not changed.
    new.__dict__.update(module.__dict__)
    for k in ("_parameters", "_buffers", "_modules"):
        new.__dict__[k] = copy.copy(module.__dict__[k])
    new.__dict__["_rmsnorm_ext_spec"] = spec
    return new


# ---------------------------------------------------------------------------------------
# Recognition

def _plain(module: nn.Module, allowed) -> bool:
    """Only the expected Parameters (plain, floating), no buffers, no children, no
    instance-level forward (accelerate hooks), not parametrized."""
    if "forward" in module.__dict__ or module._modules:
        return False
    if any(b is not None for b in module._buffers.values()):
        return False
    for k, v in module._parameters.items():
        if v is not None and (k not in allowed or type(v) is not nn.Parameter
                              or not v.is_floating_point()):
            return False
    return True


def _timm_spec(module: nn.Module) -> Optional[Spec]:
    norm_mod = sys.modules.get("timm.layers.norm")
    t = type(module)
    if norm_mod is None or t.__name__ not in _TIMM or getattr(norm_mod, t.__name__) is not t:
        return None
    spec = _TIMM[t.__name__]
    if not _plain(module, ("weight", "bias") if spec.norm == "layer" else ("weight",)):
        return None
    if spec.fast and getattr(module, "_fast_norm", False):
        fast_mod = sys.modules.get("timm.layers.fast_norm")
        if fast_mod is None or getattr(fast_mod, "has_apex", True) \
                or getattr(fast_mod, "has_apex_rmsnorm", True):
            return None  # timm would call apex
    return spec


def _tol(dtype: torch.dtype, precision: str) -> float:
    if dtype == torch.bfloat16:
        return 3e-2
    if dtype == torch.float16:
        return 5e-3
    if dtype == torch.float64 and precision == "native":
        return 1e-10
    return 1e-4  # fp32 math


def _probe_spec(module: nn.Module) -> Optional[Spec]:
    """For a subclass of torch's LayerNorm/RMSNorm: the Spec whose computation its forward
    matches on random probes (tokens and channels-first, float32 / its parameter dtype /
    bfloat16 / float64), or None."""
    norm = "layer" if isinstance(module, nn.LayerNorm) else "rms"
    shape = tuple(module.normalized_shape)
    if not shape or 0 in shape:
        return None
    params = {k: p for k, p in module._parameters.items() if p is not None}
    ref = next(iter(params.values()), None)
    pdt = ref.dtype if ref is not None else torch.float32
    dev = torch.device("cpu") if ref is None or ref.device.type == "meta" else ref.device
    probe_mod = _probe_copy(module)
    if probe_mod is None:
        return None
    layouts = ("last", "channels") if len(shape) == 1 else ("last",)
    cands = [Spec(norm, lay, prec) for lay in layouts for prec in ("native", "fp32")]
    cpu = torch.device("cpu")
    gen = torch.Generator(device=cpu).manual_seed(0x2D2D)
    f64 = dict(dtype=torch.float64, device=cpu)
    p64 = {k: torch.randn(p.shape, generator=gen, **f64) for k, p in params.items()}
    # Channels at dim -1 of a [2, 3, *shape] token probe; at dim 1 of a [2, C, 3, 5] map.
    # Rows with different scales and a non-zero mean, so a missing centering or
    # normalization shows up as a large difference.
    xt = torch.randn(2, 3, *shape, generator=gen, **f64) * torch.tensor(
        [0.5, 1.0, 3.0], **f64).view(1, 3, *[1] * len(shape)) + 0.7
    xc = torch.randn(2, shape[0], 3, 5, generator=gen, **f64) * 2.0 - 0.4
    # A channels-first module may branch on the memory format: probe channels_last too.
    probes = {"last": [xt], "channels": [xc, xc.contiguous(memory_format=torch.channels_last)]}
    # (input dtype, parameter dtype): the parameter dtype's own first (must work), float64
    # with float64 parameters (model.double(); tells fp32 math from native).
    runs = list(dict.fromkeys([(pdt, pdt), (torch.float32, pdt), (torch.bfloat16, pdt),
                               (torch.float64, torch.float64)]))
    cl_out = False
    with torch.device(dev), torch.no_grad():
        for xd, pd in runs:
            ps = {k: v.to(device=dev, dtype=pd) for k, v in p64.items()}
            for lay in layouts:
                if not any(c.layout == lay for c in cands):
                    continue
                for x in probes[lay]:
                    x = x.to(device=dev, dtype=xd)
                    try:
                        want = torch.func.functional_call(probe_mod, ps, (x,))
                        if lay == "channels" and x.is_contiguous() and \
                                isinstance(want, torch.Tensor) and want.dim() == 4:
                            cl_out = cl_out or (not want.is_contiguous() and want.is_contiguous(
                                memory_format=torch.channels_last))
                    except Exception:
                        if (xd, pd) == runs[0]:
                            cands = [c for c in cands if c.layout != lay]
                        continue  # another dtype the original does not take: no evidence
                    # float64: fp32 math is only what the original does if torch's own
                    # (float64) math does not match it.
                    fp64_exact = xd == torch.float64 and _matches(
                        Spec(norm, lay, "native"), want, x, shape, ps, module.eps)
                    cands = [c for c in cands if c.layout != lay
                             or (_matches(c, want, x, shape, ps, module.eps)
                                 and not (c.precision == "fp32" and fp64_exact))]
            if not cands:
                return None
    return cands[0]._replace(cl_out=cl_out and cands[0].layout == "channels")


def _matches(spec: Spec, want, x, shape, ps, eps) -> bool:
    if not isinstance(want, torch.Tensor) or want.shape != x.shape \
            or want.device != x.device:
        return False
    try:
        got = compute(spec, x, shape, ps.get("weight"), ps.get("bias"), eps)
    except Exception:
        return False
    if got.dtype != want.dtype:
        return False
    tol = _tol(x.dtype, spec.precision)
    return torch.allclose(got.double().cpu(), want.double().cpu(), rtol=tol, atol=tol)


def _probe_copy(module: nn.Module) -> Optional[nn.Module]:
    from .replace import _probe_copy as probe_copy  # replace.py imports this module
    return probe_copy(module)


# ---------------------------------------------------------------------------------------

def is_fused(module: nn.Module) -> bool:
    return isinstance(module, FusedNorm)


def replacement(module: nn.Module, ours: tuple) -> Optional[nn.Module]:
    """The fused replacement of a timm norm or of a subclass of torch's LayerNorm/RMSNorm
    (not one of ``ours``), or None."""
    if isinstance(module, FusedNorm) or isinstance(module, ours):
        return None
    spec = _timm_spec(module)
    if spec is None:
        t = type(module)
        if not issubclass(t, (nn.LayerNorm, nn.RMSNorm)) or t in (nn.LayerNorm, nn.RMSNorm):
            return None
        if not _plain(module, ("weight", "bias")):
            return None
        spec = _probe_spec(module)
        if spec is None:
            return None
    return _fused(module, spec)
