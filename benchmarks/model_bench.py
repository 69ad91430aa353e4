#!/usr/bin/env python
"""End to end: a Llama-style decoder stack (or a timm ConvNeXt / ViT) with native torch
norms vs rmsnorm_ext.

    python benchmarks/model_bench.py                  # CPU: fp32 + bf16, a few minutes on 2 cores
    python benchmarks/model_bench.py --quick          # tiny model, for smoke tests
    python benchmarks/model_bench.py --device cuda    # GPU: bf16, hidden 4096, 8K tokens
    python benchmarks/model_bench.py --model convnext [--channels-last]   # timm convnext_atto
    python benchmarks/model_bench.py --model vit      # timm vit_tiny_patch16_224
    python benchmarks/model_bench.py --model dit      # DiT blocks: adaLN + QK-norm/RoPE fused

The decoder (random weights, nothing downloaded): optional token embedding, N layers of
[RMSNorm -> causal SDPA attention -> residual add, RMSNorm -> SwiGLU MLP -> residual add],
a final RMSNorm (and an LM head when there is an embedding). ``--model convnext`` / ``vit``
build a timm model from its config with random weights (``pretrained=False``; timm must be
installed; ``--timm-model`` picks another one, ``--image-size`` / ``--batch`` the input):
convnext_atto on CPU, convnext_tiny on CUDA (channels-first ``LayerNorm2d`` after every
depthwise conv: our ``layer_norm_2d`` reads the NCHW or channels_last map in place, timm
permutes to NHWC and back); vit_tiny_patch16_224 on CPU, vit_base_patch16_224 on CUDA
(token ``LayerNorm``). The native side uses the model's own norms (torch.nn.RMSNorm, timm's
LayerNorm2d / LayerNorm); the other side is a copy of the same model (same weights) after
rmsnorm_ext.replace_norms. For each dtype, mode (eager, torch.compile) and step (train =
forward + backward, infer = forward under no_grad):

* step time: both sides timed in interleaved rounds by benchmarks/_timer.py (median, spread
  = IQR / median, flagged above 10%), and the end-to-end speedup native / ours;
* the share of the step spent in norms, from torch.profiler, computed the same way on both
  sides: the inclusive time of each top-level norm op (native `aten::rms_norm`, with its
  composite pieces; ours `rmsnorm_ext::*`) is forward time, and the autograd nodes those ops
  created (matched by sequence number) are backward time -- host time on CPU, the GPU time
  of the kernels launched inside them on CUDA (the host only launches there). Under
  torch.compile, Inductor fuses
  native RMSNorm into neighbouring kernels, so its share cannot be attributed ("fused");
  ours stays a custom op and is still measured.
* a Chrome trace per side (chrome://tracing or https://ui.perfetto.dev) in the output folder.

Output (default a fresh, git-ignored benchmarks/out/model-<machine>-<date>-<time>/;
--save-results: the committed benchmarks/results/cpu/): model_bench.md, .csv, .json, traces/
(model_bench_convnext.* / model_bench_vit.* for the vision models).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import _common
import _machine
import _timer

import rmsnorm_ext

DTYPES, DTYPE_SHORT = _common.DTYPES, _common.DTYPE_SHORT
MODES = ("eager", "compile")
STEPS = ("train", "infer")
SIDES = ("native", "ours")
STEP_LABEL = "model_step"
# Top-level profiler events that are a norm: torch's (with their composite children) and ours.
NATIVE_NORM_OPS = ("aten::rms_norm", "aten::layer_norm", "aten::_fused_rms_norm",
                   "aten::native_layer_norm")
OURS_PREFIX = "rmsnorm_ext::"
BACKWARD_PREFIX = "autograd::engine::evaluate_function: "

MODELS = ("decoder", "convnext", "vit", "dit")
# timm models per device kind (random weights from their configs).
TIMM_MODELS = {
    "convnext": {"cpu": "convnext_atto", "cuda": "convnext_tiny", "quick": "convnext_atto"},
    "vit": {"cpu": "vit_tiny_patch16_224", "cuda": "vit_base_patch16_224",
            "quick": "vit_tiny_patch16_224"},
}
# Vision input sizes; they take precedence over DEFAULTS' batch.
VISION_DEFAULTS = {"cpu": dict(image_size=224, batch=8), "cuda": dict(image_size=224, batch=64),
                   "quick": dict(image_size=64, batch=2)}
# Sizes per device: CPU finishes in minutes on 2 cores; GPU is the bf16 4096 / 8K.
DEFAULTS = {
    "cpu": dict(dtype=("float32", "bfloat16"), hidden=1024, layers=2, seq=512, batch=1,
                rounds=5, profile_steps=1),
    "cuda": dict(dtype=("bfloat16",), hidden=4096, layers=4, seq=8192, batch=1, rounds=7,
                 profile_steps=3),
    "quick": dict(dtype=("float32",), hidden=256, layers=2, seq=64, batch=1, rounds=3,
                  profile_steps=1),
}


# ------------------------------------------------------------------------------ model
class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, s, d))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, ffn: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm Llama layer: h = x + attn(norm(x)); out = h + mlp(norm(h))."""

    def __init__(self, dim: int, heads: int, ffn: int, eps: float):
        super().__init__()
        self.attn_norm = nn.RMSNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.mlp_norm = nn.RMSNorm(dim, eps=eps)
        self.mlp = SwiGLU(dim, ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attn(self.attn_norm(x))
        return h + self.mlp(self.mlp_norm(h))


class Decoder(nn.Module):
    """Optional embedding, ``layers`` decoder layers, a final norm (and an LM head when
    there is an embedding: then the input is token ids, else hidden states)."""

    def __init__(self, dim: int, layers: int, heads: int, ffn: int, vocab: int = 0,
                 eps: float = 1e-6):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim) if vocab else None
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, ffn, eps) for _ in range(layers))
        self.norm = nn.RMSNorm(dim, eps=eps)
        self.head = nn.Linear(dim, vocab, bias=False) if vocab else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) if self.embed is not None else x
        for layer in self.layers:
            h = layer(h)
        h = self.norm(h)
        return self.head(h) if self.head is not None else h


class DiTBlock(nn.Module):
    """A DiT / Flux-style transformer block: adaLN-Zero modulation from a per-sample
    conditioning vector, attention with per-head RMSNorm on q and k and rotary embedding,
    GELU MLP. ``fused`` False computes it as diffusers does (LayerNorm without affine, then
    ``* (1 + scale) + shift``; ``nn.RMSNorm`` q/k norms, then rotate-half RoPE); True with
    rmsnorm_ext.layer_norm_modulate and qk_norm_rope, on the same Parameters."""

    def __init__(self, dim: int, heads: int, ffn: int, eps: float = 1e-6):
        super().__init__()
        self.heads, self.eps, self.fused = heads, eps, False
        self.ada = nn.Linear(dim, 6 * dim)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim // heads, eps=eps)
        self.k_norm = nn.RMSNorm(dim // heads, eps=eps)
        self.o = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(approximate="tanh"),
                                 nn.Linear(ffn, dim))

    def _modulated(self, norm, x, shift, scale):
        if self.fused:
            return rmsnorm_ext.layer_norm_modulate(x, (x.shape[-1],), scale, shift, eps=self.eps)
        return norm(x) * (1 + scale[:, None]) + shift[:, None]

    def _qk(self, q, k, cos, sin):  # q, k: [B, S, H, Dh]
        if self.fused:
            return rmsnorm_ext.qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, cos,
                                            sin, eps=self.eps)

        def rope(t):
            h = t.shape[-1] // 2
            rot = torch.cat((-t[..., h:], t[..., :h]), -1)
            return t * cos[:, None] + rot * sin[:, None]
        return rope(self.q_norm(q)), rope(self.k_norm(k))

    def forward(self, x, c, cos, sin):
        b, s, d = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(c)).chunk(6, dim=-1)
        q, k, v = self.qkv(self._modulated(self.norm1, x, sh1, sc1)).view(
            b, s, 3, self.heads, d // self.heads).unbind(2)
        q, k = self._qk(q, k, cos, sin)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2))
        x = x + g1[:, None] * self.o(y.transpose(1, 2).reshape(b, s, d))
        return x + g2[:, None] * self.mlp(self._modulated(self.norm2, x, sh2, sc2))


class DiT(nn.Module):
    """``layers`` DiT blocks on [B, S, D] tokens with a [B, D] conditioning vector (its own
    Parameter: the benchmark's input is the tokens) and fixed rotary tables."""

    def __init__(self, dim: int, layers: int, heads: int, ffn: int, seq: int):
        super().__init__()
        self.blocks = nn.ModuleList(DiTBlock(dim, heads, ffn) for _ in range(layers))
        self.cond = nn.Parameter(torch.randn(1, dim))
        dh = dim // heads
        ang = torch.outer(torch.arange(seq, dtype=torch.float32),
                          1.0 / 10000 ** (torch.arange(0, dh, 2, dtype=torch.float32) / dh))
        self.register_buffer("cos", torch.cat((ang, ang), -1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat((ang, ang), -1).sin(), persistent=False)

    def fuse(self) -> None:
        for blk in self.blocks:
            blk.fused = True

    def forward(self, x):
        c = self.cond.expand(x.shape[0], -1)
        for blk in self.blocks:
            x = blk(x, c, self.cos.to(x.dtype), self.sin.to(x.dtype))
        return x


def _timm_model(cfg) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise SystemExit(f"--model {cfg.model} needs timm: pip install timm") from None
    # ViTs take the image size at construction (position embeddings); ConvNeXts any size.
    kwargs = {"img_size": cfg.image_size} if cfg.model == "vit" else {}
    return timm.create_model(cfg.timm_model, pretrained=False, **kwargs)


def build_models(cfg, dtype: torch.dtype, device: torch.device) -> Dict[str, nn.Module]:
    """The native model and a copy with the same weights whose norms are rmsnorm_ext's."""
    torch.manual_seed(0)
    if cfg.model == "decoder":
        native = Decoder(cfg.hidden, cfg.layers, cfg.heads, cfg.ffn, cfg.vocab)
        expected = 2 * cfg.layers + 1
    elif cfg.model == "dit":
        # Not a replace_norms swap: the block's fused forward calls the fused ops itself.
        native = DiT(cfg.hidden, cfg.layers, cfg.heads, cfg.ffn, cfg.seq).to(device, dtype)
        ours = copy.deepcopy(native)
        ours.fuse()
        return {"native": native, "ours": ours}
    else:
        native = _timm_model(cfg)
        # Every norm of these models is a (timm) subclass of nn.LayerNorm, and all are swapped.
        expected = sum(isinstance(m, nn.LayerNorm) for m in native.modules())
    native = native.to(device, dtype)
    if cfg.channels_last:
        native = native.to(memory_format=torch.channels_last)
    ours = copy.deepcopy(native)
    replaced = rmsnorm_ext.replace_norms(ours)
    if replaced != expected:
        raise RuntimeError(f"replace_norms replaced {replaced} norms, expected {expected}")
    return {"native": native, "ours": ours}


def make_step(model: nn.Module, step: str, mode: str, cfg, dtype, device):
    """A no-argument callable running one training step (forward + backward into the
    parameters' .grad, reset to None first, as an optimizer loop with zero_grad does) or one
    inference forward (no_grad)."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    if cfg.model in ("convnext", "vit"):
        x = torch.randn(cfg.batch, 3, cfg.image_size, cfg.image_size, generator=gen)
        x = x.to(device, dtype)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out_shape = (cfg.batch, model.num_classes)
    elif cfg.vocab and cfg.model == "decoder":
        x = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=gen).to(device)
        out_shape = (cfg.batch, cfg.seq, cfg.vocab)
    else:
        x = torch.randn(cfg.batch, cfg.seq, cfg.hidden, generator=gen).to(device, dtype)
        out_shape = (cfg.batch, cfg.seq, cfg.hidden)
    fwd = torch.compile(model, dynamic=False) if mode == "compile" else model
    if step == "infer":
        model.eval()

        def infer():
            with torch.no_grad():
                return fwd(x)
        return infer
    model.train()
    dy = torch.randn(out_shape, generator=gen).to(device, dtype)

    def train():
        for p in model.parameters():
            p.grad = None
        fwd(x).backward(dy)
    return train


# --------------------------------------------------------------------- norm attribution
@dataclass
class NormTimes:
    """Per-step profiler times (µs) of the norms of one side; None where not attributable."""
    step_us: float
    fwd_us: Optional[float]
    bwd_us: Optional[float]
    calls_fwd: float
    calls_bwd: float
    by_op: Dict[str, float]  # event name -> self time per step, inside the norm subtrees

    @property
    def total_us(self) -> Optional[float]:
        return None if self.fwd_us is None else self.fwd_us + (self.bwd_us or 0.0)

    @property
    def share(self) -> Optional[float]:
        return None if self.total_us is None else self.total_us / self.step_us


def _is_norm_root(name: str) -> bool:
    return name in NATIVE_NORM_OPS or name.startswith(OURS_PREFIX)


def _subtree(e):
    yield e
    for c in e.cpu_children:
        yield from _subtree(c)


def norm_times(events, steps: int, device_time: bool = False) -> NormTimes:
    """device_time: time GPU kernels (the events' device times, launched inside each op or
    node) rather than host time -- on CUDA the host only launches, so host time would measure
    launch overhead, and the step's host time excludes the kernels still running.

    Forward: top-level norm ops (inclusive time = the self times of their subtree).
    Backward: the autograd nodes created inside those ops (their own time, without the
    engine's gradient accumulation around them), found by sequence number -- a
    sequence number counts only if every forward event carrying it is inside a norm, since an
    op that creates no node carries the next op's number -- plus norm ops called directly
    from a compiled backward graph (torch.compile calls our bwd op without an autograd node
    of its own)."""
    # Host-side events only: with CUDA activity Kineto also lists device-side copies of
    # record_function ranges ("gpu_user_annotation"), which would count the step twice.
    cpu = torch.autograd.DeviceType.CPU
    events = [e for e in events if getattr(e, "device_type", cpu) == cpu]
    if device_time:
        def tot(e): return e.device_time_total
        def own(e): return e.self_device_time_total
    else:
        def tot(e): return e.cpu_time_total
        def own(e): return e.self_cpu_time_total
    roots = [e for e in events if e.cpu_parent is None]
    fwd_roots, inside = [], set()

    def find(e, in_backward):
        if _is_norm_root(e.name):
            fwd_roots.append((e, in_backward))
            return
        in_backward = in_backward or e.name.startswith(BACKWARD_PREFIX)
        for c in e.cpu_children:
            find(c, in_backward)

    for r in roots:
        find(r, False)
    for e, in_backward in fwd_roots:
        if not in_backward:
            inside.update(id(x) for x in _subtree(e))
    backward = {id(x) for e in events if e.name.startswith(BACKWARD_PREFIX)
                for x in _subtree(e)}
    seq_in, seq_out = set(), set()
    for e in events:
        if e.sequence_nr >= 0 and id(e) not in backward:
            (seq_in if id(e) in inside else seq_out).add(e.sequence_nr)
    norm_seq = seq_in - seq_out

    fwd = bwd = 0.0
    calls_fwd = calls_bwd = 0
    by_op: Dict[str, float] = defaultdict(float)

    def account(e, direction):
        for x in _subtree(e):
            by_op[f"{direction}: {x.name}"] += own(x)

    def walk(e):
        nonlocal bwd, calls_bwd
        if e.name.startswith(BACKWARD_PREFIX) and e.sequence_nr in norm_seq:
            # The node itself, not the engine's wrapper around it: the wrapper also sums the
            # node's output into the gradient of a tensor used twice -- in a pre-norm block,
            # the residual stream's, which is not norm work -- on either side.
            node = e.name[len(BACKWARD_PREFIX):]
            for c in [c for c in e.cpu_children if c.name == node] or [e]:
                bwd += tot(c)
                account(c, "bwd")
            calls_bwd += 1
            return
        if _is_norm_root(e.name):
            return  # accounted below, with its direction
        for c in e.cpu_children:
            walk(c)

    for r in roots:
        walk(r)
    for e, in_backward in fwd_roots:
        if in_backward:
            # A norm op under a backward node: a compiled backward graph calling our bwd op
            # (eager backward nodes of norms were counted whole above, never descended into).
            if not _under_linked_node(e, norm_seq):
                bwd += tot(e)
                calls_bwd += 1
                account(e, "bwd")
        else:
            fwd += tot(e)
            calls_fwd += 1
            account(e, "fwd")
    if device_time:
        # Every kernel the profiled steps launched, from any thread: the backward's kernels
        # are launched by autograd's device thread, outside the step range's event tree.
        step = sum(k.duration for e in events for k in e.kernels)
    else:
        step = sum(tot(e) for e in events if e.name == STEP_LABEL)
    return NormTimes(step_us=step / steps, fwd_us=fwd / steps, bwd_us=bwd / steps,
                     calls_fwd=calls_fwd / steps, calls_bwd=calls_bwd / steps,
                     by_op={k: v / steps for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])})


def _under_linked_node(e, norm_seq) -> bool:
    p = e.cpu_parent
    while p is not None:
        if p.name.startswith(BACKWARD_PREFIX) and p.sequence_nr in norm_seq:
            return True
        p = p.cpu_parent
    return False


def profile_side(fn, steps: int, device: torch.device, trace: Optional[Path]) -> NormTimes:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            with torch.profiler.record_function(STEP_LABEL):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    return norm_times(prof.events(), steps, device_time=device.type == "cuda")


# ------------------------------------------------------------------------------ the run
@dataclass
class Row:
    dtype: str
    mode: str
    step: str
    native_ms: float
    native_spread: float
    ours_ms: float
    ours_spread: float
    noisy: bool
    speedup: float
    native_norm_ms: Optional[float]
    native_norm_fwd_ms: Optional[float]
    native_norm_bwd_ms: Optional[float]
    native_norm_share: Optional[float]
    ours_norm_ms: Optional[float]
    ours_norm_fwd_ms: Optional[float]
    ours_norm_bwd_ms: Optional[float]
    ours_norm_share: Optional[float]
    native_profiled_step_ms: float
    ours_profiled_step_ms: float
    rounds: int


COLUMNS = [f.name for f in dataclasses.fields(Row)]


def _ms(v: Optional[float]) -> Optional[float]:
    return None if v is None else v / 1e3


def run_config(cfg, dtype_name: str, mode: str, step: str, device: torch.device,
               out: Path, details: dict) -> Row:
    dtype = DTYPES[dtype_name]
    if mode == "compile":
        torch.compiler.reset()  # a fresh Dynamo cache: no guards or recompiles carried over
    models = build_models(cfg, dtype, device)
    fns = {side: make_step(models[side], step, mode, cfg, dtype, device) for side in SIDES}
    stats = _timer.interleaved(fns, device=device, rounds=cfg.rounds, max_rounds=cfg.max_rounds,
                               target_sample_s=0.0, warmup_s=0.0)
    norms = {}
    for side in SIDES:
        trace = None if cfg.no_traces else (
            out / "traces" / f"{DTYPE_SHORT[dtype_name]}_{mode}_{step}_{side}.json")
        norms[side] = profile_side(fns[side], cfg.profile_steps, device, trace)
        if norms[side].calls_fwd == 0:
            # Nothing attributable: native norms fused into Inductor kernels.
            norms[side] = dataclasses.replace(norms[side], fwd_us=None, bwd_us=None)
    n, o = stats["native"], stats["ours"]
    key = f"{DTYPE_SHORT[dtype_name]} {mode} {step}"
    details[key] = {side: {"norm_ops_us_per_step": norms[side].by_op,
                           "norm_calls_per_step": {"fwd": norms[side].calls_fwd,
                                                   "bwd": norms[side].calls_bwd},
                           "timer": stats[side].to_dict(scale=1e3, samples=True)}
                    for side in SIDES}
    return Row(dtype=dtype_name, mode=mode, step=step,
               native_ms=n.median * 1e3, native_spread=n.spread,
               ours_ms=o.median * 1e3, ours_spread=o.spread, noisy=n.noisy or o.noisy,
               speedup=n.median / o.median,
               native_norm_ms=_ms(norms["native"].total_us),
               native_norm_fwd_ms=_ms(norms["native"].fwd_us),
               native_norm_bwd_ms=_ms(norms["native"].bwd_us),
               native_norm_share=norms["native"].share,
               ours_norm_ms=_ms(norms["ours"].total_us),
               ours_norm_fwd_ms=_ms(norms["ours"].fwd_us),
               ours_norm_bwd_ms=_ms(norms["ours"].bwd_us),
               ours_norm_share=norms["ours"].share,
               native_profiled_step_ms=norms["native"].step_us / 1e3,
               ours_profiled_step_ms=norms["ours"].step_us / 1e3,
               rounds=n.rounds)


# ----------------------------------------------------------------------------- output
def _norm_ms(ms: Optional[float], fwd: Optional[float], bwd: Optional[float]) -> str:
    return "fused" if ms is None else f"{ms:.2f} ({fwd:.2f}+{bwd:.2f})"


def _share(v: Optional[float]) -> str:
    return "fused" if v is None else f"{100 * v:.1f}%"


def table(rows: List[Row], markdown: bool = False) -> str:
    header = ["dtype", "mode", "step", "native ms", "ours ms", "speedup",
              "native norm ms (fwd+bwd)", "native norm share", "ours norm ms (fwd+bwd)",
              "ours norm share"]
    body = []
    for r in rows:
        body.append([
            DTYPE_SHORT[r.dtype], r.mode, r.step,
            _common.time_cell(r.native_ms, r.native_spread, False),
            _common.time_cell(r.ours_ms, r.ours_spread, False),
            f"{r.speedup:.3f}x" + ("!" if r.noisy else ""),
            _norm_ms(r.native_norm_ms, r.native_norm_fwd_ms, r.native_norm_bwd_ms),
            _share(r.native_norm_share),
            _norm_ms(r.ours_norm_ms, r.ours_norm_fwd_ms, r.ours_norm_bwd_ms),
            _share(r.ours_norm_share),
        ])
    return _common.table(header, body, "lll" + "r" * (len(header) - 3), markdown)


def op_table(details: dict, key: str) -> str:
    """The profiler view of one configuration: every event inside either side's norms
    (forward subtrees and their backward nodes), self time per step, side by side."""
    ops = [details[key][side]["norm_ops_us_per_step"] for side in SIDES]
    names = list(dict.fromkeys(k for o in ops for k in o))
    rows = [[n] + [f"{o[n]:.1f}" if n in o else "" for o in ops] for n in names]
    rows.append(["total"] + [f"{sum(o.values()):.1f}" for o in ops])
    return _common.table(["event (inside norms)", "native µs/step", "ours µs/step"], rows, "lrr")


LEGEND = ("Step times: median of interleaved rounds (native and ours alternating) ± spread "
          "(IQR / median); `!` = a spread above 10%. speedup = native / ours. Norm ms: "
          "profiler time per step inside the norm ops (CPU: host time; CUDA: the GPU time of "
          "the kernels they launched), forward + backward (fwd: the norm "
          "ops with their composite pieces; bwd: the autograd nodes they created, or our bwd "
          "op called from a compiled backward; the autograd engine's summing of gradients "
          "into the residual stream is left out on both sides); share = norm ms / profiled "
          "step time, measured the same way (CUDA: all kernel time of the step). "
          "`fused`: Inductor fused torch's norm into neighbouring kernels, so its time "
          "cannot be attributed.")


def describe(cfg) -> str:
    if cfg.model == "dit":
        return (f"DiT-style stack: {cfg.layers} blocks (adaLN-Zero modulation, attention with "
                f"QK RMSNorm + RoPE, GELU MLP), hidden {cfg.hidden}, {cfg.heads} heads, ffn "
                f"{cfg.ffn}, batch {cfg.batch} x {cfg.seq} tokens; ours: layer_norm_modulate "
                f"+ qk_norm_rope in the same blocks")
    if cfg.model in ("convnext", "vit"):
        layout = ", channels_last" if cfg.channels_last else ""
        return (f"timm {cfg.timm_model} (random weights), batch {cfg.batch} x "
                f"{cfg.image_size}x{cfg.image_size} images{layout}")
    emb = f", vocab {cfg.vocab}" if cfg.vocab else ", no embedding"
    return (f"{cfg.layers} layers, hidden {cfg.hidden}, {cfg.heads} heads, ffn {cfg.ffn}, "
            f"batch {cfg.batch} x {cfg.seq} tokens{emb}")


def write_outputs(rows: List[Row], meta: dict, details: dict, out: Path,
                  stem: str = "model_bench") -> List[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.md", out / f"{stem}.csv", out / f"{stem}.json"]
    paths[0].write_text(
        _common.header_line(meta["machine"]) + "\n\n" + meta["model"] + "\n\n" + LEGEND
        + "\n\n" + table(rows, markdown=True) + "\n")
    records = [dataclasses.asdict(r) for r in rows]
    _common.write_csv(paths[1], COLUMNS, records)
    _common.write_json(paths[2], dict(meta, columns=COLUMNS, results=records, norm_ops=details))
    return paths


# -------------------------------------------------------------------------------- cli
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_device_arg(p)
    p.add_argument("--quick", action="store_true", help="a tiny model, fp32 (smoke test)")
    p.add_argument("--model", choices=MODELS, default="decoder",
                   help="decoder (default), or a timm convnext / vit with random weights")
    p.add_argument("--timm-model", help="the timm model name for --model convnext/vit "
                   "(default: convnext_atto / vit_tiny_patch16_224 on cpu, convnext_tiny / "
                   "vit_base_patch16_224 on cuda)")
    p.add_argument("--image-size", type=int, help="vision input height = width (default 224; "
                   "--quick 64)")
    p.add_argument("--channels-last", action="store_true",
                   help="vision: model and input in channels_last memory format")
    p.add_argument("--dtype", type=_common.csv_list(tuple(DTYPES)),
                   help="comma list (default: float32,bfloat16 on cpu, bfloat16 on cuda)")
    p.add_argument("--mode", type=_common.csv_list(MODES), default=MODES, help="eager,compile")
    p.add_argument("--step", type=_common.csv_list(STEPS), default=STEPS, help="train,infer")
    p.add_argument("--hidden", type=int, help="model dim (default 1024 cpu, 4096 cuda)")
    p.add_argument("--layers", type=int, help="decoder layers (default 2 cpu, 4 cuda)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default 512 cpu, 8192 cuda)")
    p.add_argument("--batch", type=int, help="default 1 (decoder); vision 8 cpu, 64 cuda")
    p.add_argument("--heads", type=int, help="attention heads (default hidden // 128)")
    p.add_argument("--ffn", type=int, help="MLP inner size (default 8/3 hidden, rounded up "
                   "to a multiple of 256)")
    p.add_argument("--vocab", type=int, default=0,
                   help="embedding + LM head of this vocabulary (default 0: none)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 5 cpu, 7 cuda)")
    p.add_argument("--max-rounds", type=int, help="most rounds when noisy (default 2x rounds)")
    p.add_argument("--profile-steps", type=int, help="steps under the profiler per side")
    p.add_argument("--no-traces", action="store_true", help="do not write Chrome traces")
    _common.add_out_args(p, "model")
    args = p.parse_args(argv)
    device = _common.pick_device(args.device)
    kind = "quick" if args.quick else ("cuda" if device.type == "cuda" else "cpu")
    if args.model in ("decoder", "dit"):
        if args.timm_model or args.image_size or args.channels_last:
            p.error("--timm-model, --image-size and --channels-last need --model convnext/vit")
    else:
        args.timm_model = args.timm_model or TIMM_MODELS[args.model][kind]
        for k, v in VISION_DEFAULTS[kind].items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    d = DEFAULTS[kind]
    for k, v in d.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.heads = args.heads or max(1, args.hidden // 128)
    args.ffn = args.ffn or 256 * ((8 * args.hidden // 3 + 255) // 256)
    args.max_rounds = max(args.rounds, args.max_rounds or 2 * args.rounds)
    if args.hidden % args.heads:
        p.error("--hidden must be divisible by --heads")
    args.out = _common.out_dir(args, device, quick=args.quick, what="model")
    return args, device


def main(argv=None) -> int:
    args, device = parse_args(argv)
    t0 = time.perf_counter()
    _machine.warn_if_busy(device)
    load_before = _machine.load_average()
    print(f"{describe(args)} on {_common.device_name(device)}", file=sys.stderr)
    rows: List[Row] = []
    details: dict = {}
    configs = [(d, m, s) for d in args.dtype for m in args.mode for s in args.step]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for i, (dtype, mode, step) in enumerate(configs, 1):
            t1 = time.perf_counter()
            rows.append(run_config(args, dtype, mode, step, device, args.out, details))
            r = rows[-1]
            print(f"[{i}/{len(configs)}] {DTYPE_SHORT[dtype]} {mode} {step}: native "
                  f"{r.native_ms:.1f} ms, ours {r.ours_ms:.1f} ms, speedup {r.speedup:.3f}x "
                  f"({time.perf_counter() - t1:.0f} s)", file=sys.stderr)
    machine = _common.machine_info(device)
    machine["loadavg_1m_start"] = load_before
    meta = {"machine": machine, "model": describe(args), "wall_time_s": time.perf_counter() - t0,
            "config": vars(args),
            "timer": {"method": "benchmarks/_timer.py: interleaved rounds, one step per sample",
                      "spread": "IQR / median", "noisy_above": _timer.SPREAD_LIMIT}}
    print("\n" + describe(args))
    print(table(rows))
    for key in details:
        print(f"\n=== norm ops, {key}: profiler self time per step inside the norms "
              "(forward + backward), both sides ===")
        print(op_table(details, key))
    # A vision run gets its own files (model_bench_convnext.*), so --save-results does not
    # replace the decoder's committed results.
    stem = "model_bench" if args.model == "decoder" else f"model_bench_{args.model}"
    paths = write_outputs(rows, meta, details, args.out, stem)
    print(f"\n{len(rows)} configurations in {time.perf_counter() - t0:.0f} s; wrote:")
    for path in paths:
        print(f"  {path}")
    if not args.no_traces:
        print(f"  {args.out / 'traces'}/*.json (Chrome traces)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
