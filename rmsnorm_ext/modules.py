"""nn.Modules: drop-ins for torch.nn.RMSNorm and torch.nn.LayerNorm.

They subclass the torch modules, so constructor parameters, parameter names, state_dicts,
``extra_repr`` and isinstance checks are the same; forward changes, and the repr names the
class with its package (``rmsnorm_ext.RMSNorm((64,), eps=None, elementwise_affine=True)``)
so a printed model shows which norms are ours.

TorchScript: ``torch.jit.script`` works on these modules (and models containing them) as on
torch's own norms. Scripted code calls the ops directly (``torch.ops.rmsnorm_ext.*``, the
same kernels and autograd as eager); a saved scripted module needs ``import rmsnorm_ext``
in the process that loads it, which registers the ops.
"""
from typing import Optional

import torch

from .functional import (_kernel_weight, gated_rms_norm, layer_norm, layer_norm_2d, rms_norm,
                         rms_norm_2d)

# Bound once, so the eager forwards pay one plain function call (~20 ns) for the scripting
# check. TorchScript resolves it to ``torch.jit.is_scripting`` and treats the ``if`` as
# static: the eager branch (Python-only code) is never compiled.
_is_scripting = torch.jit.is_scripting

# The package exports these (rmsnorm_ext/__init__.py imports *).
__all__ = ["RMSNorm", "LayerNorm", "GatedRMSNorm", "RMSNorm2d", "LayerNorm2d"]

_OUT_POLICIES = ("promote", "input", "weight")


def _policy_dtype(policy: str, x_dtype: torch.dtype, w_dtype: torch.dtype) -> torch.dtype:
    """The output dtype under a replaced HF module's rule: "input", "weight" or "promote"
    (``promote_types``); replace.py's probes match the rules against it. Scriptable."""
    if policy == "input":
        return x_dtype
    if policy == "weight":
        return w_dtype
    return torch.promote_types(x_dtype, w_dtype)


def _check_policy(out_dtype: str) -> str:
    if out_dtype not in _OUT_POLICIES:
        raise ValueError(f"rmsnorm_ext: out_dtype must be one of {_OUT_POLICIES}, "
                         f"got {out_dtype!r}")
    return out_dtype


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float,
                out_dtype: torch.dtype) -> torch.Tensor:
    """A Hugging Face-style RMSNorm forward (weight of any float dtype, output in
    ``out_dtype``) on the fused kernel; shared by :class:`HFRMSNorm` and the hub layers."""
    y = rms_norm(x, weight.shape, _kernel_weight(x, weight), eps, weight_offset=weight_offset)
    return y if y.dtype == out_dtype else y.to(out_dtype)


# ---------------------------------------------------------------------------------------
# TorchScript bodies (only compiled by torch.jit.script; eager code never calls them)

def _script_eps(x: torch.Tensor, eps: Optional[float]) -> float:
    """``eps=None`` -> torch's default, as functional._eps (torch.finfo is not scriptable)."""
    if eps is not None:
        return eps
    if x.dtype == torch.float32 or x.dtype == torch.bfloat16 or x.dtype == torch.float16:
        return 1.1920928955078125e-07
    if x.dtype == torch.float64:
        return 2.220446049250313e-16
    return 0.0  # any other dtype: the op raises its own TypeError naming it


def _script_hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                        weight_offset: float, out_dtype: torch.dtype) -> torch.Tensor:
    """:func:`hf_rms_norm` in TorchScript."""
    y = torch.ops.rmsnorm_ext.rms_norm_fwd(x, list(weight.shape), _kernel_weight(x, weight), eps,
                                           weight_offset)[0]
    return y if y.dtype == out_dtype else y.to(out_dtype)


def _hf_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float,
                policy: str) -> torch.Tensor:
    """HFRMSNorm's forward: the output dtype by the replaced module's rule, then
    :func:`hf_rms_norm`."""
    return hf_rms_norm(x, weight, eps, weight_offset, _policy_dtype(policy, x.dtype, weight.dtype))


def _hf_ln_forward(x: torch.Tensor, weight: torch.Tensor, normalized_shape, eps: float,
                   policy: str) -> torch.Tensor:
    """HFLayerNorm's forward (eager): the output dtype by the replaced module's rule, the
    weight in a dtype the kernel takes, no bias."""
    out = _policy_dtype(policy, x.dtype, weight.dtype)
    y = layer_norm(x, normalized_shape, _kernel_weight(x, weight), None, eps)
    return y if y.dtype == out else y.to(out)


# torch.fx.symbolic_trace records these as one call each (their dtype rules need real
# tensors), as it records torch's own norms: an HF model after replace_norms traces as before.
torch.fx.wrap("_hf_forward")
torch.fx.wrap("_hf_ln_forward")


def _repr_name(module: torch.nn.Module) -> str:
    """The name ``repr`` shows: our own classes with their package (``rmsnorm_ext.RMSNorm``),
    so a printed model shows which norms are ours; a user's subclass keeps its own name."""
    return type(module).__dict__.get("_repr_name") or type(module).__name__


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` computed by rmsnorm_ext's fused kernels.

    Extra keyword-only ``weight_offset`` (default 0.0): the output is scaled by
    ``weight_offset + weight`` computed in fp32 (Gemma: ``weight_offset=1.0``, weight
    stored around 0). With an offset, the weight initializes to ``1 - weight_offset`` so
    a fresh module still computes plain RMSNorm.
    """

    _repr_name = "rmsnorm_ext.RMSNorm"

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None,
                 dtype=None, *, weight_offset: float = 0.0):
        self.weight_offset = float(weight_offset)
        super().__init__(normalized_shape, eps, elementwise_affine, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            torch.nn.init.constant_(self.weight, 1.0 - self.weight_offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _is_scripting():
            return torch.ops.rmsnorm_ext.rms_norm_fwd(
                x, list(self.normalized_shape), _kernel_weight(x, self.weight),
                _script_eps(x, self.eps), self.weight_offset)[0]
        return rms_norm(x, self.normalized_shape, self.weight, self.eps,
                        weight_offset=self.weight_offset)

    def _get_name(self) -> str:
        return _repr_name(self)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + f", weight_offset={self.weight_offset}" if self.weight_offset else s


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` computed by rmsnorm_ext's fused kernels."""

    _repr_name = "rmsnorm_ext.LayerNorm"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _is_scripting():
            return torch.ops.rmsnorm_ext.layer_norm_fwd(
                x, list(self.normalized_shape), self.weight, self.bias, self.eps)[0]
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def _get_name(self) -> str:
        return _repr_name(self)


class HFRMSNorm(RMSNorm):
    """Replacement for Hugging Face-style RMSNorm modules, computed by rmsnorm_ext's kernels.

    A :class:`rmsnorm_ext.RMSNorm` that also keeps the HF attribute names (``weight``,
    ``eps`` and ``variance_epsilon``, the latter two aliases of each other) and the replaced
    module's output-dtype rule ``out_dtype``: ``"promote"`` (Llama: ``promote_types(x, w)``),
    ``"input"`` (Gemma) or ``"weight"`` (T5). ``weight_offset=1.0`` gives Gemma's ``1 + w``
    (added in fp32). See :mod:`rmsnorm_ext.replace` for the numeric differences from HF.
    """

    _repr_name = "rmsnorm_ext.modules.HFRMSNorm"
    # TorchScript compiles a module's properties (this setter would fail to); the alias
    # is for Python code only.
    __jit_unused_properties__ = ["variance_epsilon"]

    def __init__(self, normalized_shape, eps: float = 1e-6, device=None, dtype=None, *,
                 weight_offset: float = 0.0, out_dtype: str = "promote"):
        _check_policy(out_dtype)
        super().__init__(normalized_shape, float(eps), True, device=device, dtype=dtype,
                         weight_offset=weight_offset)
        self.out_dtype = out_dtype

    @property
    def variance_epsilon(self) -> float:
        return self.eps

    @variance_epsilon.setter
    def variance_epsilon(self, value: float) -> None:
        self.eps = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _is_scripting():
            return _script_hf_rms_norm(x, self.weight, _script_eps(x, self.eps),
                                       self.weight_offset,
                                       _policy_dtype(self.out_dtype, x.dtype, self.weight.dtype))
        return _hf_forward(x, self.weight, self.eps, self.weight_offset, self.out_dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", out_dtype={self.out_dtype!r}"


class HFLayerNorm(LayerNorm):
    """Replacement for Hugging Face-style LayerNorm modules with a weight and no bias that
    compute in fp32 (``CohereLayerNorm``: ``(w.float() * layer_norm(x.float())).to(x.dtype)``),
    computed by rmsnorm_ext's kernel: a :class:`rmsnorm_ext.LayerNorm` without bias that keeps
    HF's attribute name ``variance_epsilon`` (an alias of ``eps``), takes a weight of any
    floating dtype (converted for the kernel, as in :class:`HFRMSNorm`) and follows the
    replaced module's output-dtype rule ``out_dtype`` ("input", "promote" or "weight")."""

    _repr_name = "rmsnorm_ext.modules.HFLayerNorm"
    __jit_unused_properties__ = ["variance_epsilon"]

    def __init__(self, normalized_shape, eps: float = 1e-5, device=None, dtype=None, *,
                 out_dtype: str = "input"):
        _check_policy(out_dtype)
        super().__init__(normalized_shape, float(eps), True, bias=False, device=device,
                         dtype=dtype)
        self.out_dtype = out_dtype

    # HF's attribute name for eps (shared with HFRMSNorm).
    variance_epsilon = HFRMSNorm.variance_epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _is_scripting():
            out = _policy_dtype(self.out_dtype, x.dtype, self.weight.dtype)
            y = torch.ops.rmsnorm_ext.layer_norm_fwd(x, list(self.normalized_shape),
                                                     _kernel_weight(x, self.weight), None,
                                                     self.eps)[0]
            return y if y.dtype == out else y.to(out)
        return _hf_ln_forward(x, self.weight, self.normalized_shape, self.eps, self.out_dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", out_dtype={self.out_dtype!r}"


class GatedRMSNorm(torch.nn.Module):
    _repr_name = "rmsnorm_ext.GatedRMSNorm"

    """Gated RMSNorm (see :func:`rmsnorm_ext.gated_rms_norm`): ``forward(x, gate)``.

    ``hidden_size`` the normalized (last) dimension; ``group_size`` RMS groups (``None``:
    one); ``norm_before_gate`` True: ``rms(x) * w * act(gate)`` (Qwen3-Next), False:
    ``rms(x * act(gate)) * w`` (Mamba2); ``activation`` ``"silu"`` or ``"sigmoid"``. The
    weight starts at ones.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, group_size=None,
                 norm_before_gate: bool = True, activation: str = "silu", device=None,
                 dtype=None):
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = bool(norm_before_gate)
        self.activation = activation
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x, gate, (self.hidden_size,), self.weight, self.eps,
                              group_size=self.group_size,
                              norm_before_gate=self.norm_before_gate,
                              activation=self.activation)

    def _get_name(self) -> str:
        return _repr_name(self)

    def extra_repr(self) -> str:
        return (f"{self.hidden_size}, eps={self.eps}, group_size={self.group_size}, "
                f"norm_before_gate={self.norm_before_gate}, activation={self.activation!r}")


class HFGatedRMSNorm(GatedRMSNorm):
    """Replacement for Hugging Face's gated RMSNorms (``Mamba2RMSNormGated`` and its copies
    in NemotronH, Bamba, FalconH1, GraniteMoeHybrid: norm after the gate, groups, optional
    gate; ``Qwen3NextRMSNormGated``, ``KimiLinearRMSNormGated``: norm before the gate),
    keeping their attribute names (``variance_epsilon``) and output dtype rule: ``"promote"``
    (``weight * normed.to(input_dtype)``) or ``"input"``. Without a gate (the Mamba2 style
    allows it) it is the grouped RMSNorm times the weight, as there."""

    _repr_name = "rmsnorm_ext.modules.HFGatedRMSNorm"

    def __init__(self, hidden_size, eps=1e-6, *, out_dtype="input", gate_optional=False,
                 **kw):
        super().__init__(hidden_size, eps, **kw)
        self.out_dtype = out_dtype
        self.gate_optional = gate_optional

    # HF's attribute name for eps (shared with HFRMSNorm).
    variance_epsilon = HFRMSNorm.variance_epsilon

    def forward(self, hidden_states: torch.Tensor, gate=None) -> torch.Tensor:
        x, w = hidden_states, self.weight
        out = _policy_dtype(self.out_dtype, x.dtype, w.dtype)
        if gate is not None and gate.dtype != x.dtype:
            # HF computes in fp32 from both (Mamba2's torch path gives the norm an fp32 scan
            # output and a bf16 gate in a bf16 model); the kernel takes one dtype: the wider
            # of the two, an exact upcast of the other.
            common = torch.promote_types(x.dtype, gate.dtype)
            x, gate = x.to(common), gate.to(common)
        w = _kernel_weight(x, w)
        if gate is None:
            if not self.gate_optional:
                raise TypeError(f"{type(self).__name__}.forward() needs a gate")
            g = self.group_size or self.hidden_size
            xg = x.reshape(*x.shape[:-1], -1, g)
            y = rms_norm(xg, (g,), None, self.eps).reshape(x.shape)
            return (self.weight * y).to(out)
        y = gated_rms_norm(x, gate, (self.hidden_size,), w, self.eps,
                           group_size=self.group_size, norm_before_gate=self.norm_before_gate,
                           activation=self.activation)
        return y if y.dtype == out else y.to(out)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", out_dtype={self.out_dtype!r}"


class _ChannelsFirstNorm(torch.nn.Module):
    """Shared constructor of the channels-first norms: ``num_channels`` (dim 1 of
    ``[N, C, *spatial]``), ``eps``, ``affine`` (a ``[C]`` weight, ones) and, for
    LayerNorm2d, ``bias`` (zeros)."""

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True,
                 bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.num_channels = int(num_channels)
        self.eps = eps
        self.affine = bool(affine)
        kw = dict(device=device, dtype=dtype)
        self.weight = torch.nn.Parameter(torch.ones(num_channels, **kw)) if affine else None
        self.bias = (torch.nn.Parameter(torch.zeros(num_channels, **kw)) if affine and bias
                     else None)

    def _get_name(self) -> str:
        return _repr_name(self)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, affine={self.affine}"


class LayerNorm2d(_ChannelsFirstNorm):
    """LayerNorm over the channels of ``[N, C, *spatial]`` (ConvNeXt), in the input's memory
    format: :func:`rmsnorm_ext.layer_norm_2d`. ``bias=False`` drops the bias."""

    _repr_name = "rmsnorm_ext.LayerNorm2d"

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True,
                 bias: bool = True, device=None, dtype=None):
        super().__init__(num_channels, eps, affine, bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _is_scripting():
            return torch.ops.rmsnorm_ext.layer_norm_2d_fwd(x, self.weight, self.bias,
                                                           self.eps)[0]
        return layer_norm_2d(x, self.weight, self.bias, self.eps)


class RMSNorm2d(_ChannelsFirstNorm):
    """RMSNorm over the channels of ``[N, C, *spatial]``, in the input's memory format:
    :func:`rmsnorm_ext.rms_norm_2d`."""

    _repr_name = "rmsnorm_ext.RMSNorm2d"

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True, device=None,
                 dtype=None):
        super().__init__(num_channels, eps, affine, False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _is_scripting():
            return torch.ops.rmsnorm_ext.rms_norm_2d_fwd(x, self.weight,
                                                         _script_eps(x, self.eps))[0]
        return rms_norm_2d(x, self.weight, self.eps)
