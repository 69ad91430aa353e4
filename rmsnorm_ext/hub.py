"""Hugging Face ``kernels`` layers: rmsnorm_ext kernels for transformers models, no download.

transformers marks its RMSNorm classes (``LlamaRMSNorm``, ``Qwen2RMSNorm``, ``MistralRMSNorm``,
... 140+ models) with ``@use_kernel_forward_from_hub("RMSNorm")`` and the zero-centered
``1 + w`` ones (Qwen3.5) with ``"RMSNormZeroCentered"``; the ``kernels`` package's
``kernelize`` then swaps their ``forward`` for a layer class found through a kernel mapping.
This module provides such layer classes and an in-package mapping, so::

    import rmsnorm_ext.hub
    rmsnorm_ext.hub.kernelize(model, mode="training")   # or "inference", "compile", ...

routes every such norm of ``model`` through rmsnorm_ext's fused CPU/CUDA kernels. Nothing is
fetched from the Hub: the mapping's repositories are plain objects whose ``load()`` returns
the classes below. The same mapping works with the ``kernels`` API directly::

    from kernels import Mode, kernelize, use_kernel_mapping
    with use_kernel_mapping(rmsnorm_ext.hub.kernel_mapping()):
        kernelize(model, mode=Mode.TRAINING | Mode.TORCH_COMPILE, device="cuda")

Both layers have a backward (``has_backward = True``) and compile without graph breaks
(``can_torch_compile = True``: the ops have fake kernels), so one mapping serves training,
inference and ``torch.compile``; ``kernels`` 0.17 supports ``"cpu"`` as a device type, so the
mapping covers ``"cpu"`` and ``"cuda"``.

Numerics, as :class:`rmsnorm_ext.modules.HFRMSNorm` (the ``replace_norms`` route; both give
identical results): statistics in fp32, ``x * rstd * w`` rounded once. The output dtype is
Llama's, ``promote_types(input, weight)``; models whose norm returns the input dtype
(Olmo2, GPT-OSS, ...) only differ when the weight is wider than the activations (an fp32
weight with bf16 activations: Llama-style gives fp32 there).
"""
from typing import Dict, Iterable, Optional, Union

import torch
from torch import nn

from .modules import hf_rms_norm as _hf_rms_norm

__all__ = ["RMSNorm", "RMSNormZeroCentered", "kernel_mapping", "kernelize", "LAYERS"]

# The ``kernels`` layer contract: no __init__ and no members besides forward,
# has_backward and can_torch_compile (kernels validates this); forward has the replaced
# forward's signature and reads the host module's attributes.

class RMSNorm(nn.Module):
    """``kernels`` layer for ``"RMSNorm"`` (Llama style): reads the host module's ``weight``
    and ``variance_epsilon``; ``y = x * rstd * weight`` in ``promote_types(x, weight)``."""

    has_backward = True
    can_torch_compile = True

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return _hf_rms_norm(hidden_states, w, self.variance_epsilon, 0.0,
                            torch.promote_types(hidden_states.dtype, w.dtype))


class RMSNormZeroCentered(nn.Module):
    """``kernels`` layer for ``"RMSNormZeroCentered"`` (Qwen3.5, Gemma-like): reads ``weight``
    and ``eps``; ``y = x * rstd * (1 + weight)``, ``1 + w`` in fp32, output in x's dtype."""

    has_backward = True
    can_torch_compile = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _hf_rms_norm(x, self.weight, self.eps, 1.0, x.dtype)


LAYERS = {"RMSNorm": RMSNorm, "RMSNormZeroCentered": RMSNormZeroCentered}


class _InPackageRepository:
    """A ``kernels`` repository (``RepositoryProtocol``: ``load()`` returns the layer class)
    that serves a class of this module: no Hub, no download, no files."""

    def __init__(self, layer: type):
        self.layer = layer

    def load(self) -> type:
        return self.layer

    def __repr__(self) -> str:
        return f"rmsnorm_ext.hub.{self.layer.__name__}"


_REPOS = {name: _InPackageRepository(cls) for name, cls in LAYERS.items()}


def kernel_mapping(devices: Iterable[str] = ("cpu", "cuda"),
                   layers: Optional[Iterable[str]] = None) -> Dict[str, dict]:
    """The ``kernels`` mapping ``{layer name: {device: repository}}`` for our layers, for
    ``kernels.use_kernel_mapping`` / ``register_kernel_mapping``. Registered as the
    fallback for every mode: the layers support training, inference and torch.compile."""
    names = list(LAYERS) if layers is None else list(layers)
    unknown = [n for n in names if n not in LAYERS]
    if unknown:
        raise ValueError(f"rmsnorm_ext.hub: no layer named {unknown}; have {list(LAYERS)}")
    return {n: {d: _REPOS[n] for d in devices} for n in names}


_MODES = {"training": ("TRAINING",), "inference": ("INFERENCE",),
          "training+compile": ("TRAINING", "TORCH_COMPILE"),
          "inference+compile": ("INFERENCE", "TORCH_COMPILE"),
          "compile": ("TRAINING", "TORCH_COMPILE")}


def _mark_unmarked(model: nn.Module, kernels) -> None:
    """Make HF-style RMSNorm classes that carry no kernel layer name extensible.

    transformers only applies ``use_kernel_forward_from_hub`` when it accepts the installed
    ``kernels`` version (transformers 5.24 wants kernels >= 0.18.2; PyPI's newest is 0.17.2),
    and models outside transformers may not use it at all. Such classes are recognized the
    way :func:`rmsnorm_ext.replace_norms` recognizes them -- by structure and by probing what
    their forward computes, never by name -- and marked with kernels' own
    ``replace_kernel_forward_from_hub``: Llama style (``weight``, ``variance_epsilon``,
    ``x * rstd * w`` in ``promote_types``) as ``"RMSNorm"``; zero-centered (``weight``,
    ``eps``, ``x * rstd * (1 + w)`` in x's dtype) as ``"RMSNormZeroCentered"``.
    """
    from .replace import _hf_candidate, _probe

    seen = set()
    for m in model.modules():
        cls = type(m)
        if cls in seen or hasattr(cls, "kernel_layer_name"):
            continue
        eps = _hf_candidate(m)
        if eps is None:
            continue
        seen.add(cls)
        kind = _probe(m, eps)
        if kind == (0.0, "promote") and isinstance(getattr(m, "variance_epsilon", None), float):
            name = "RMSNorm"
        elif kind == (1.0, "input") and "variance_epsilon" not in dir(m) and \
                isinstance(getattr(m, "eps", None), float):
            name = "RMSNormZeroCentered"
        else:
            continue
        # per instance, the structural check (cheap); the class was probed above
        kernels.replace_kernel_forward_from_hub(cls, name,
                                                condition=lambda mod: _hf_candidate(mod)
                                                is not None)


def kernelize(model: nn.Module, mode: Union[str, "object"] = "training",
              device: Optional[Union[str, torch.device]] = None, *,
              mark_unmarked: bool = True) -> nn.Module:
    """Route the ``"RMSNorm"``/``"RMSNormZeroCentered"`` layers of ``model`` (a transformers
    model, or anything using ``kernels.use_kernel_forward_from_hub``) through rmsnorm_ext.

    ``mode``: a ``kernels.Mode`` or one of ``"training"``, ``"inference"``,
    ``"training+compile"``, ``"inference+compile"`` (``"compile"`` = training+compile).
    ``device``: ``"cpu"``/``"cuda"``, inferred from the parameters when omitted (parameters
    on the meta device, a model built under ``torch.device("meta")`` or
    ``torch.set_default_device("meta")``: ``"cuda"`` when available, else ``"cpu"``; the
    layers themselves run on whatever device the tensors are on once materialized). Modifies
    ``model`` in place (its norms' ``forward``) and returns it. Raises if a layer cannot be
    mapped (rather than silently keeping the original forward).

    ``mark_unmarked``: also route HF-style RMSNorm classes that carry no kernel layer name
    (see :func:`_mark_unmarked`; needed with transformers 5.24 + kernels 0.17, where
    transformers leaves its classes unmarked).
    """
    try:
        import kernels
    except ImportError as e:
        raise ImportError("rmsnorm_ext.hub.kernelize needs the `kernels` package: "
                          "pip install kernels") from e
    if isinstance(mode, str):
        if mode not in _MODES:
            raise ValueError(f"rmsnorm_ext.hub: mode must be a kernels.Mode or one of "
                             f"{list(_MODES)}, got {mode!r}")
        flags = [getattr(kernels.Mode, m) for m in _MODES[mode]]
        mode = flags[0]
        for f in flags[1:]:
            mode = mode | f
    if device is None:
        p = next(model.parameters(), None)
        if p is None:
            raise ValueError("rmsnorm_ext.hub.kernelize: model has no parameters; pass device=")
        device = p.device.type
        if device == "meta":
            # Built under torch.device("meta") (e.g. inside from_pretrained/post_init): the
            # layers read the host's tensors wherever they end up, so take the device this
            # process would run them on.
            device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device).type
    if device not in ("cpu", "cuda"):
        raise ValueError(f"rmsnorm_ext.hub.kernelize: rmsnorm_ext has kernels for cpu and cuda, "
                         f"not {device!r}")
    if mark_unmarked:
        _mark_unmarked(model, kernels)
    # Other mapped layers keep kernels' default fallbacks; ours are checked afterwards, so
    # a norm that could not be routed through rmsnorm_ext raises instead of silently keeping
    # its original forward.
    with kernels.use_kernel_mapping(kernel_mapping(devices=(device,))):
        kernels.kernelize(model, mode=mode, device=device)
    missed = [name for name, m in model.named_modules()
              if getattr(type(m), "kernel_layer_name", None) in LAYERS
              and getattr(getattr(m, "forward", None), "__func__", None)
              is not LAYERS[type(m).kernel_layer_name].forward
              and (getattr(type(m), "kernel_condition", None) is None
                   or type(m).kernel_condition(m))]
    if missed:
        raise RuntimeError(f"rmsnorm_ext.hub.kernelize: kernels did not route {missed} through "
                           "rmsnorm_ext (a conflicting kernel mapping?)")
    return model
