"""``replace_norms(model)``: swap a model's norm layers for rmsnorm_ext modules, in place.

What is replaced
----------------
* ``torch.nn.RMSNorm`` (exact class) -> :class:`rmsnorm_ext.RMSNorm`.
* ``torch.nn.LayerNorm`` (exact class; any ``elementwise_affine``/``bias``) ->
  :class:`rmsnorm_ext.LayerNorm`.
* Hugging Face-style RMSNorm modules (``LlamaRMSNorm``, ``Qwen2RMSNorm``, ``MistralRMSNorm``,
  ``T5LayerNorm``, ``GemmaRMSNorm``'s ``1 + w`` variant, or your own) -> :class:`HFRMSNorm`.
  They are recognized by what they are and do, never by class name: a module with exactly one
  parameter, ``weight`` (a plain ``nn.Parameter``), no buffers, no children, a number in
  ``variance_epsilon`` or ``eps``, whose forward -- run on a small random probe input (and a
  random probe weight, substituted with ``torch.func.functional_call``; the module's own
  weight is never touched) under ``torch.no_grad()`` in float32, in the weight's dtype, in
  bfloat16 and in float16 -- computes ``x * rstd * w`` (Llama style) or ``x * rstd * (1 + w)``
  (Gemma style, replaced with ``weight_offset=1.0``) within that dtype's rounding, including on
  a row whose mean square is near eps (so ``x / (rms + eps)`` is told apart).
* Hugging Face-style LayerNorms with a weight and no bias (``CohereLayerNorm`` and its
  copies; fp32 math) -> :class:`~rmsnorm_ext.modules.HFLayerNorm`, recognized the same way:
  the same structure, a 1-D weight, and ``layer_norm(x) * w`` over the last dim on the probes
  (its ``[heads, head_dim]`` QK-norm form is left alone).
* diffusers' ``AdaLayerNormZero``, ``AdaLayerNormZeroSingle`` and ``AdaLayerNormContinuous``
  (with a plain LayerNorm) -> fused subclasses that compute ``norm(x) * (1 + scale) +
  shift`` with :func:`rmsnorm_ext.layer_norm_modulate` (rmsnorm_ext/_diffusers.py).
* Hugging Face's gated RMSNorms (``Mamba2RMSNormGated`` and its copies in NemotronH, Bamba,
  FalconH1, GraniteMoeHybrid; ``Qwen3NextRMSNormGated``, ``KimiLinearRMSNormGated``) ->
  :class:`~rmsnorm_ext.modules.HFGatedRMSNorm`, recognized the same way: the same structure,
  and ``forward(x, gate)`` computing a gated RMSNorm (norm before or after the gate, silu or
  sigmoid, over ``module.group_size`` groups -- or ``n_groups`` of them, FalconH1 -- when it
  has that attribute) on random probes.

* Vision norms (rmsnorm_ext/_vision.py): timm's ``LayerNorm``, ``LayerNorm2d``, ``RmsNorm``,
  ``RmsNorm2d`` and their ``Fp32`` variants by class, and any other subclass of
  ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` whose forward computes torch's norm over the
  trailing dims or over the channels (dim 1) of ``[N, C, *spatial]``, in the input dtype or
  in fp32, recognized by probing it (torchvision's and Hugging Face's ConvNeXt/SAM
  channels-first norms) -> a fused subclass *of the module's own class* (``isinstance`` and
  attributes kept) whose forward is one rmsnorm_ext op: ``layer_norm``, ``rms_norm``,
  ``layer_norm_2d`` or ``rms_norm_2d``.

Anything else is left alone.

The replacement reuses the very same ``Parameter`` objects (``new.weight is old.weight``): no
copies, same device and dtype, so tied weights, optimizers that already hold the parameters,
and state_dict keys keep working. ``training`` mode and registered hooks carry over. A module
registered in several places is replaced by one new module everywhere. Modules that are
already rmsnorm_ext modules are skipped, so a second call returns 0.

Models on the meta device work, during construction and after: ``with torch.device("meta"):``
(or ``torch.set_default_device("meta")``) build the model, call ``replace_norms`` (inside the
context, e.g. from a transformers ``post_init`` run by ``from_pretrained``, or after it), then
``model.to_empty(device=...)`` and load a state_dict. HF-style modules with meta weights are
probed on the CPU with CPU probe tensors (the probe weight replaces the missing data), with
the CPU as the default device while the probe runs.

Call it on the plain model: before ``torch.compile``, DDP, ``fully_shard`` or accelerate
hooks. Subclasses of ``torch.nn.RMSNorm``/``LayerNorm`` are only replaced if they pass the
vision probe or the HF-style probe above; FSDP's wrapped classes (DTensor parameters),
parametrized modules and modules with an instance-level ``forward`` (accelerate's hooks)
fail the structural checks before any probe and are left alone. The root module
itself is never replaced (there is no parent to re-point); only its descendants are.

Numeric and dtype semantics (documented differences)
-----------------------------------------------------
* ``torch.nn.RMSNorm``/``LayerNorm``: same results within the dtype's rounding. An
  ``RMSNorm`` weight of another floating dtype than the input's (a ``.half()``'d norm fed
  fp32) works as with torch (converted for the kernel; output in the input's dtype);
  ``LayerNorm`` refuses such mixes with ``TypeError``, as ``F.layer_norm`` does on CPU.
* HF Llama/Qwen2/Mistral style computes ``(x * rstd).to(input_dtype) * w``: for bf16/fp16 it
  rounds ``x * rstd`` to the input dtype and then rounds the product again; rmsnorm_ext
  computes ``x * rstd * w`` in fp32 and rounds once, so results differ by at most about one
  ulp of the output dtype (ours is the more accurate one). For fp64 input HF computes in
  fp32; we compute in fp64.
* Output dtype is preserved: the probe observes the original's output dtype for each probed
  input dtype and the replacement follows the same rule -- Llama style promotes
  (``promote_types(input, weight)``, e.g. bf16 activations with an fp32 weight give fp32),
  Gemma style returns the input dtype, T5 style returns the weight's dtype. When the output
  dtype is wider than the input's (bf16 input, fp32 weight, Llama style) the kernel's
  bf16 result is upcast, i.e. rounded to bf16 once where HF rounds ``x * rstd`` to bf16 --
  the same precision, different rounding point.
* Gemma style: ``1 + w`` is added in fp32 and everything is computed in fp32, exactly like
  HF's Gemma; results differ only by fp32 summation order and the final rounding.
* A weight whose dtype the kernels do not accept with the input (e.g. bf16 weight with fp32
  input) is upcast to the compute dtype for the call (exact; autograd flows back to the
  original parameter in its own dtype).
"""
import copy
import math
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from . import _diffusers, _vision
from ._table import gated_rms_composite
from .modules import (GatedRMSNorm, HFGatedRMSNorm, HFLayerNorm, HFRMSNorm, LayerNorm,
                      LayerNorm2d, RMSNorm, RMSNorm2d, _policy_dtype)

__all__ = ["replace_norms", "HFRMSNorm"]

# Our own modules: never replaced (a second replace_norms call returns 0).
_OURS = (RMSNorm, LayerNorm, GatedRMSNorm, LayerNorm2d, RMSNorm2d)

_HOOK_DICTS = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
    "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
    "_backward_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


# ---------------------------------------------------------------------------------------
# Recognition
# ---------------------------------------------------------------------------------------

def _plain_param(p) -> bool:
    return p is not None and type(p) is nn.Parameter and p.is_floating_point()


def _hf_eps(module: nn.Module) -> Optional[float]:
    for name in ("variance_epsilon", "eps"):
        v = getattr(module, name, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
                and v >= 0:
            return float(v)
    return None


def _tol(*dtypes) -> float:
    if any(d == torch.bfloat16 for d in dtypes):
        return 3e-2
    if any(d == torch.float16 for d in dtypes):
        return 5e-3
    return 1e-4  # fp32 (HF computes fp64 inputs in fp32 too)


def _probe_copy(module: nn.Module) -> Optional[nn.Module]:
    """A shallow copy with its own parameter dict and no hooks, to probe: the module itself,
    its weight and its hooks are never touched or fired."""
    try:
        probe_mod = copy.copy(module)
        probe_mod.__dict__["_parameters"] = OrderedDict(module._parameters)
        for k in _HOOK_DICTS:
            if k in probe_mod.__dict__:
                probe_mod.__dict__[k] = OrderedDict()
    except Exception:
        return None
    return probe_mod


def _probe(module: nn.Module, eps: float) -> Optional[Tuple[float, str]]:
    """Run ``module`` on random probes; return ``(weight_offset, out_dtype)`` if it behaves
    as RMSNorm (plain or 1 + w) for every probe, else None.

    The probes live on the weight's device, or on the CPU when the weight is on the meta
    device (a model built under ``torch.device("meta")``: its data does not exist yet, and the
    probe weight replaces it anyway). Every probe tensor is created with an explicit device,
    and the forward runs with that device as the default device, so this works while a
    ``torch.device("meta")`` context or ``torch.set_default_device("meta")`` is active (as in
    transformers' ``from_pretrained``/``post_init``); the caller's default device is restored
    afterwards.
    """
    w = module.weight
    dev = torch.device("cpu") if w.device.type == "meta" else w.device
    with torch.device(dev):
        return _probe_on(module, eps, dev)


def _probe_on(module: nn.Module, eps: float, dev: torch.device) -> Optional[Tuple[float, str]]:
    w = module.weight
    shape = tuple(w.shape)
    cpu = torch.device("cpu")
    gen = torch.Generator(device=cpu).manual_seed(0x5EED)
    lead = (2, 3)
    # Rows with different scales and a non-zero mean, so mean subtraction (LayerNorm), a
    # missing normalization, or an elementwise op all show up as large differences; the
    # first row is scaled to a mean square near eps (_near_eps_scale).
    f64 = dict(dtype=torch.float64, device=cpu)
    x64 = torch.randn(*lead, *shape, generator=gen, **f64)
    x64 = x64 * torch.tensor([0.5, 1.0, 3.0], **f64).view(1, 3, *[1] * len(shape))
    x64 = x64 + torch.randn(*lead, *[1] * len(shape), generator=gen, **f64)
    x64 = x64 * torch.tensor([_near_eps_scale(eps), 1.0, 1.0], **f64).view(1, 3, *[1] * len(shape))
    w64 = torch.randn(shape, generator=gen, **f64)
    dims = tuple(range(len(lead), len(lead) + len(shape)))

    probe_mod = _probe_copy(module)
    if probe_mod is None:
        return None
    wp = w64.to(device=dev, dtype=w.dtype)
    runs = _probe_outputs(probe_mod, wp, (x64,), dev)
    if not runs:
        return None
    wq = wp.double().cpu()  # the probe weight as the module sees it (rounded to its dtype)
    offsets = [0.0, 1.0]
    for _, (xq,), got, _, tol in runs:
        xhat_q = xq * torch.rsqrt(xq.pow(2).mean(dim=dims, keepdim=True) + eps)
        atol = tol * max(float(got.abs().max()), 1.0)
        offsets = [off for off in offsets
                   if torch.allclose(got, xhat_q * (off + wq), rtol=tol, atol=atol)]
        if not offsets:
            return None
    offset = offsets[0]
    prefs = ("promote", "input", "weight") if offset == 0.0 else ("input", "promote", "weight")
    policy = _output_rule(runs, w.dtype, prefs)
    return None if policy is None else (offset, policy)


def _near_eps_scale(eps: float) -> float:
    """A probe row's scale that puts its mean square near eps, where eps placed elsewhere
    than under the square root (x / (rms + eps)) changes the result: such a norm passed the
    probes and was swapped, 0.9 off on rows like that."""
    return min(max(math.sqrt(eps), 1e-4), 0.5) if eps > 0 else 1e-3


def _output_rule(runs, wdt: torch.dtype, prefs) -> Optional[str]:
    """The first output-dtype rule in ``prefs`` (modules._policy_dtype) that gives every
    probe run's output dtype, else None."""
    for policy in prefs:
        if all(_policy_dtype(policy, d, wdt) == od for d, _, _, od, _ in runs):
            return policy
    return None


def _probe_outputs(probe_mod: nn.Module, wp: torch.Tensor, inputs64, dev: torch.device):
    """Runs a probe copy with the probe weight ``wp`` on ``inputs64`` (float64 CPU tensors)
    in each probe dtype: ``[(dtype, inputs as run, in float64 on the CPU, output likewise,
    output dtype, tolerance)]`` for every dtype that ran; None if float32 or the weight's
    dtype failed, or an output is no floating tensor shaped like the first input and on its
    device."""
    wdt = wp.dtype
    runs = []
    for d in dict.fromkeys(_probe_dtypes(wdt)):
        args = tuple(t.to(device=dev, dtype=d) for t in inputs64)
        try:
            with torch.no_grad():
                out = torch.func.functional_call(probe_mod, {"weight": wp}, args)
        except Exception:
            if d in (torch.float32, wdt):
                return None
            continue  # the extra probes are only informative (dtype rule); not required
        if not isinstance(out, torch.Tensor) or out.shape != args[0].shape \
                or not out.is_floating_point() or out.device != args[0].device:
            return None
        runs.append((d, [a.double().cpu() for a in args], out.detach().double().cpu(),
                     out.dtype, _tol(d, wdt, out.dtype)))
    return runs


def _probe_layer_norm(module: nn.Module, eps: float) -> Optional[str]:
    """Run ``module`` on random probes; return its output-dtype rule if it computes a
    LayerNorm over the last dim times its weight, without a bias (Cohere's LayerNorm),
    for every probe, else None. Only a 1-D weight: a [heads, head_dim] weight over the last
    dim (Cohere's QK-norm form) is no LayerNorm of normalized_shape = weight.shape."""
    w = module.weight
    if w.dim() != 1:
        return None
    n = w.numel()
    dev = torch.device("cpu") if w.device.type == "meta" else w.device
    cpu = torch.device("cpu")
    gen = torch.Generator(device=cpu).manual_seed(0x1A7E)
    f64 = dict(dtype=torch.float64, device=cpu)
    # Rows of different scales and means: an RMSNorm, a missing centring or a bias show; the
    # first row's variance is near eps (_near_eps_scale), so x / (std + eps) shows too.
    scales = torch.tensor([_near_eps_scale(eps), 1.0, 3.0], **f64)[:, None]
    x64 = (torch.randn(2, 3, n, generator=gen, **f64) + torch.randn(2, 3, 1, generator=gen,
                                                                    **f64)) * scales
    w64 = torch.randn(n, generator=gen, **f64)
    probe_mod = _probe_copy(module)
    if probe_mod is None:
        return None
    wdt = w.dtype
    with torch.device(dev):
        wp = w64.to(device=dev, dtype=wdt)
        runs = _probe_outputs(probe_mod, wp, (x64,), dev)
    if not runs:
        return None
    wq = wp.double().cpu()
    for _, (xq,), got, _, tol in runs:
        mu = xq.mean(-1, keepdim=True)
        want = (xq - mu) * torch.rsqrt((xq - mu).pow(2).mean(-1, keepdim=True) + eps) * wq
        if not torch.allclose(got, want, rtol=tol, atol=tol * max(float(got.abs().max()), 1.0)):
            return None
    return _output_rule(runs, wdt, ("input", "promote", "weight"))


def _probe_gated(module: nn.Module, eps: float) -> Optional[dict]:
    """Run ``module(x, gate)`` on random probes; return the HFGatedRMSNorm settings if it
    computes a gated RMSNorm (norm before or after the gate, silu or sigmoid, over
    ``module.group_size`` groups if it has one) for every probe, else None."""
    w = module.weight
    if w.dim() != 1:
        return None
    n = w.numel()
    g = getattr(module, "group_size", None)
    ng = getattr(module, "n_groups", None)  # FalconH1RMSNormGated keeps the group count
    if g is None and isinstance(ng, int) and not isinstance(ng, bool) and ng > 0 and n % ng == 0:
        g = n // ng
    g = g if isinstance(g, int) and not isinstance(g, bool) and g > 0 and n % g == 0 else n
    dev = torch.device("cpu") if w.device.type == "meta" else w.device
    cpu = torch.device("cpu")
    gen = torch.Generator(device=cpu).manual_seed(0x6A7E)
    f64 = dict(dtype=torch.float64, device=cpu)
    x64 = torch.randn(2, 3, n, generator=gen, **f64) * 2 + 0.5
    x64 = x64 * torch.tensor([_near_eps_scale(eps), 1.0, 1.0], **f64)[:, None]
    g64 = torch.randn(2, 3, n, generator=gen, **f64) * 3
    w64 = torch.randn(n, generator=gen, **f64)
    probe_mod = _probe_copy(module)
    if probe_mod is None:
        return None
    wdt = w.dtype
    candidates = [(nbg, act) for nbg in (True, False) for act in ("silu", "sigmoid")]
    with torch.device(dev):
        wp = w64.to(device=dev, dtype=wdt)
        wq = wp.double().cpu()
        runs = _probe_outputs(probe_mod, wp, (x64, g64), dev)
        if not runs:
            return None
        for _, (xq, gq), got, _, tol in runs:
            atol = tol * max(float(got.abs().max()), 1.0)
            candidates = [c for c in candidates if torch.allclose(
                got, gated_rms_composite(xq, gq, (n,), wq, eps, g, c[0], c[1])[0],
                rtol=tol, atol=atol)]
            if not candidates:
                return None
        try:  # the Mamba2 style accepts no gate (a grouped RMSNorm then)
            with torch.no_grad():
                torch.func.functional_call(probe_mod, {"weight": wp},
                                           (x64.to(device=dev, dtype=wdt),))
            gate_optional = True
        except Exception:
            gate_optional = False
    nbg, act = candidates[0]
    policy = _output_rule(runs, wdt, ("input", "promote"))
    if policy is None:
        return None
    return dict(group_size=None if g == n else g, norm_before_gate=nbg, activation=act,
                out_dtype=policy, gate_optional=gate_optional)


def _probe_dtypes(wdt: torch.dtype) -> Tuple[torch.dtype, ...]:
    """Probe input dtypes: float32 and the weight's (required to work), then bfloat16 and
    float16 (informative: they tell the output-dtype rules apart -- with a bfloat16 weight a
    float32 or bfloat16 input gives the same dtype under "promote" and "input", a float16
    one does not: promote(float16, bfloat16) is float32)."""
    return (torch.float32, wdt, torch.bfloat16, torch.float16)


def _hf_candidate(module: nn.Module) -> Optional[float]:
    """Structural check for an HF-style RMSNorm; returns its eps or None."""
    if isinstance(module, _OURS) or "forward" in module.__dict__:
        return None
    if module._modules or any(b is not None for b in module._buffers.values()):
        return None
    params = {k: v for k, v in module._parameters.items() if v is not None}
    if set(params) != {"weight"} or not _plain_param(params["weight"]):
        return None
    if params["weight"].dim() < 1 or params["weight"].numel() == 0:
        return None
    return _hf_eps(module)


def _torch_plain(module: nn.Module, allowed) -> bool:
    if "forward" in module.__dict__ or module._modules:
        return False
    if any(b is not None for b in module._buffers.values()):
        return False
    for k, v in module._parameters.items():
        if v is None:
            continue
        if k not in allowed or not _plain_param(v):
            return False
    return True


# ---------------------------------------------------------------------------------------
# Building replacements
# ---------------------------------------------------------------------------------------

def _carry_state(old: nn.Module, new: nn.Module) -> None:
    new.train(old.training)
    for k in _HOOK_DICTS:  # share the dicts so existing RemovableHandles keep working
        if k in old.__dict__ and old.__dict__[k]:
            new.__dict__[k] = old.__dict__[k]


def _replacement(module: nn.Module) -> Optional[nn.Module]:
    if _vision.is_fused(module):
        return None
    fused = _diffusers.replacement(module)
    if fused is not None:
        return fused
    t = type(module)
    if t is nn.RMSNorm:
        if not _torch_plain(module, ("weight",)):
            return None
        new = RMSNorm(module.normalized_shape, module.eps, module.elementwise_affine,
                      device="meta")
        if module.weight is not None:
            new.weight = module.weight
        else:
            new.register_parameter("weight", None)
    elif t is nn.LayerNorm:
        if not _torch_plain(module, ("weight", "bias")):
            return None
        new = LayerNorm(module.normalized_shape, module.eps, module.elementwise_affine,
                        bias=module.bias is not None, device="meta")
        for name in ("weight", "bias"):
            p = getattr(module, name)
            if p is not None:
                setattr(new, name, p)
            else:
                new.register_parameter(name, None)
    else:
        # timm's norms and other subclasses of torch's norms first: a subclass of nn.RMSNorm
        # that keeps torch's semantics keeps its class too (the HF probe below would make it
        # an HFRMSNorm).
        fused = _vision.replacement(module, _OURS)
        if fused is not None:
            return fused  # hooks, flags and training mode came with its __dict__
        eps = _hf_candidate(module)
        if eps is None:
            return None
        weight = module.weight
        # Gated first: a Mamba2-style gated norm without a gate is also a (grouped) RMSNorm.
        gated = _probe_gated(module, eps)
        if gated is not None:
            new = HFGatedRMSNorm(weight.numel(), eps, device="meta", **gated)
        else:
            found = _probe(module, eps)
            if found is not None:
                offset, policy = found
                new = HFRMSNorm(tuple(weight.shape), eps, device="meta", weight_offset=offset,
                                out_dtype=policy)
            else:
                policy = _probe_layer_norm(module, eps)
                if policy is None:
                    return None
                new = HFLayerNorm(tuple(weight.shape), eps, device="meta", out_dtype=policy)
        new.weight = weight
        # Keep other plain attributes users may read (e.g. hidden_size, dim).
        for k, v in module.__dict__.items():
            if k.startswith("_") or k in new.__dict__ or hasattr(type(new), k):
                continue
            if v is None or isinstance(v, (bool, int, float, str)):
                new.__dict__[k] = v
    _carry_state(module, new)
    return new


def replace_norms(model: nn.Module) -> int:
    """Replace, in place, every ``torch.nn.RMSNorm``, ``torch.nn.LayerNorm`` and Hugging
    Face-style RMSNorm module under ``model`` with rmsnorm_ext modules that reuse the same
    Parameter objects. Returns how many modules were replaced (0 on a second call).

    See the :mod:`rmsnorm_ext.replace` module docstring for how modules are recognized
    and for the (rounding-level) numeric differences from the replaced modules.
    """
    memo: Dict[int, nn.Module] = {}     # id(old) -> new (shared modules replaced once)
    keep: Dict[int, nn.Module] = {}     # keep olds alive so ids stay unique while we walk
    visited = set()
    count = 0

    def visit(parent: nn.Module) -> None:
        nonlocal count
        if id(parent) in visited:
            return
        visited.add(id(parent))
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            key = id(child)
            if key in memo:
                new = memo[key]
            else:
                new = _replacement(child)
                keep[key] = child
                memo[key] = new
                if new is not None:
                    count += 1
            if new is not None:
                parent._modules[name] = new
            else:
                visit(child)

    visit(model)
    return count
