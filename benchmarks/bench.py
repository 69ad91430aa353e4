#!/usr/bin/env python
"""Benchmark rmsnorm_ext against native torch (eager and torch.compile), Liger and Apex.

    python benchmarks/bench.py                 # default sweep for the device (cuda if available)
    python benchmarks/bench.py --quick         # a few shapes, fp32: about two minutes on 2 cores
    python benchmarks/bench.py --op rms_norm --dtype bfloat16 --shape 4096x4096 --pass fwd
    python benchmarks/bench.py --op rms_norm_quant,fused_add_rms_norm_quant,layer_norm_quant \
        --quant fp8-token,int8-static --dtype bfloat16 --shape 256x4096

Norm + quantize ops (opt-in with --op; forward only, they are inference ops) are compared with
the composite a user writes today -- the norm in fp32 (F.rms_norm / F.layer_norm, after
h = x + r for the fused op), a per-token / per-group absmax scale (or the static one), divide,
clamp, .to(quant_dtype) -- eager and under torch.compile. --quant picks the output dtype and
scale mode(s): fp8 (float8_e4m3fn) or int8, static, per token or per group of 128.

Timing: every implementation of one (op, dtype, shape, pass) -- and a copy of the same number
of bytes -- is timed in interleaved rounds by benchmarks/_timer.py; each row is the median of
the rounds with its spread (IQR / median; rows above 10% are flagged). From the copy measured
on buffers of the case's own size, each row has `%BW` (copy time / our time: the share of the
bandwidth a copy reaches *for that working set*) and `floor×` (our time / copy time), and
says whether that working set fits the caches or streams from DRAM.

A busy machine (CPU runs): benchmarks/_machine.py checks before the run (other processes' CPU
use, a warm copy's speed and scheduler-slice quantization) and after every case; a busy
machine stops the run with the reason, unless --allow-busy, which marks every row, table,
CSV/JSON record (`busy`, `busy_reason`) and plot "BUSY MACHINE — NOT A MEASUREMENT".

Output goes to a fresh, git-ignored benchmarks/out/bench-<machine>-<date>-<time>[-quick]/
unless --out or --save-results (the committed benchmarks/results/cpu/ or cuda-<gpu>/) is
given: results.csv, results.json, results.md and plots/*.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

import _common
import _machine
import _timer

import rmsnorm_ext

OPS = ("rms_norm", "layer_norm", "fused_add_rms_norm")  # the default --op
QUANT_OPS = ("rms_norm_quant", "fused_add_rms_norm_quant", "layer_norm_quant")  # fwd only
ALL_OPS = OPS + QUANT_OPS
PASSES = ("fwd", "bwd", "fwdbwd")
IMPLS = ("ours", "eager", "compile", "liger", "apex")
DTYPES, DTYPE_SHORT = _common.DTYPES, _common.DTYPE_SHORT
HIDDEN = (768, 1024, 2048, 4096, 5120, 8192, 16384, 5125)  # 5125: odd, no vector alignment
RMS_EPS = 1e-6
LN_EPS = 1e-5
# --quant: "<output dtype>-<scale mode>". static: one given scale (STATIC_SCALE); token: one
# dynamic scale per row; group128: one per 128 consecutive elements of a row.
QUANT_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
QUANT_SCALES = ("static", "token", "group128")
QUANT_MODES = tuple(f"{q}-{m}" for q in QUANT_DTYPES for m in QUANT_SCALES)
DEFAULT_QUANT = ("fp8-token",)
QMAX = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}
QMIN = {torch.float8_e4m3fn: -448.0, torch.int8: -128.0}
MIN_SCALE = {torch.float8_e4m3fn: 1.0 / (448.0 * 512.0), torch.int8: torch.finfo(torch.float32).eps}
STATIC_SCALE = 0.02

Shape = Tuple[int, int]  # (tokens, hidden)


# ----------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class Sweep:
    """A block of the benchmark grid: every dtype x every shape (x every op/pass/impl)."""
    dtypes: Tuple[str, ...]
    shapes: Tuple[Shape, ...]


def _grid(tokens: Iterable[int], hidden: Iterable[int]) -> Tuple[Shape, ...]:
    return tuple((t, h) for t in tokens for h in hidden)


ALL_DTYPES = tuple(DTYPES)
# GPU: the full grid. CPU (a 2-core machine must finish in minutes, and every (op, dtype,
# shape) costs torch.compile a fresh Inductor build): a float32 hidden-size sweep at 1024
# tokens (from cache-resident to DRAM-sized working sets) in float32 and bfloat16 (so both
# dtypes' plots are lines), the 4096x4096 headline shape and the [1, 4096] latency row.
# float16 and other shapes are one --dtype/--shape away.
DEFAULT_SWEEPS = {
    "cuda": (Sweep(ALL_DTYPES, _grid((4096, 16384), HIDDEN) + ((1, 4096),)),),
    "cpu": (Sweep(("float32", "bfloat16"), _grid((1024,), (768, 2048, 4096, 5125, 8192))),
            Sweep(("float32", "bfloat16"), ((4096, 4096), (1, 4096)))),
}
# --quick: three hidden sizes of one token count, so the plots are lines, not points.
QUICK_SWEEPS = {
    "cuda": (Sweep(("bfloat16",), _grid((4096,), (1024, 4096, 8192)) + ((1, 4096),)),),
    "cpu": (Sweep(("float32",), _grid((512,), (1024, 2048, 4096))),),
}
DEFAULT_DTYPES = {"cuda": ALL_DTYPES, "cpu": ("float32", "bfloat16")}
# Timer settings (rounds, most rounds when noisy, seconds per sample).
TIMING = {"default": (9, 15, 0.03), "quick": (7, 9, 0.01)}


@dataclass(frozen=True)
class Case:
    """One (op, dtype, shape[, quant mode]): inputs are built once and shared by every impl
    and pass."""
    op: str
    dtype: str
    tokens: int
    hidden: int
    quant: str = ""  # a QUANT_MODES entry for the quant ops, else ""

    def passes(self, passes: Sequence[str]) -> Tuple[str, ...]:
        """The passes of ``passes`` this case has: the quant ops are forward only."""
        return tuple(p for p in passes if p == "fwd" or self.op not in QUANT_OPS)

    @property
    def label(self) -> str:
        return self.op + (f" {self.quant}" if self.quant else "")


# CPU cases whose output part (bytes / 2) is at least this big also time the fresh-memory
# floor and a clone: smaller outputs come from the heap (no page faults), where both equal
# the warm copy. The size our kernels start asking for huge pages at (csrc/cpu/prefault.h).
FRESH_MIN_BYTES = 8 << 20

# --quick also times one norm + quantize case (one shape: a torch.compile build per case).
QUICK_QUANT = {"cuda": Case("rms_norm_quant", "bfloat16", 4096, 4096, "fp8-token"),
               "cpu": Case("rms_norm_quant", "float32", 512, 4096, "fp8-token")}


@dataclass
class Result:
    """One (case, pass, impl). Times in µs: the median of the interleaved rounds, their
    min/max and quartiles; spread = (q3 - q1) / median, noisy = spread > 10%. copy_us: the copy of
    the same number of bytes into warm memory (the bandwidth floor), timed in the same rounds
    (its own spread in copy_spread); bw_fraction = copy / time, floor_ratio = time / copy.
    Large CPU cases (outputs >= FRESH_MIN_BYTES) also time, in the same rounds, the
    fresh-memory floor (fresh_us: a new buffer advised huge pages, then the copy; fresh_ratio
    = time / fresh) and a clone (clone_us, clone_ratio): NaN elsewhere."""
    device: str
    op: str
    impl: str
    dtype: str
    quant: str  # the quant ops' --quant mode, "" for the others
    pass_: str
    tokens: int
    hidden: int
    time_us: float
    min_us: float
    max_us: float
    q1_us: float
    q3_us: float
    spread: float
    noisy: bool
    rounds: int
    bytes: int
    regime: str
    gbps: float
    copy_us: float
    copy_spread: float
    copy_gbps: float
    bw_fraction: float
    floor_ratio: float
    fresh_us: float = math.nan
    fresh_ratio: float = math.nan
    clone_us: float = math.nan
    clone_ratio: float = math.nan
    speedup_vs_eager: float = math.nan
    speedup_vs_compile: float = math.nan
    busy: bool = False  # timed on a busy machine (--allow-busy): not a measurement
    busy_reason: str = ""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["pass"] = d.pop("pass_")
        return {k: d[k] for k in COLUMNS}


COLUMNS = [("pass" if f.name == "pass_" else f.name) for f in dataclasses.fields(Result)]


# ------------------------------------------------------------------- implementations
def _eager_rms(x, w):
    return F.rms_norm(x, (x.shape[-1],), w, RMS_EPS)


def _eager_ln(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, LN_EPS)


def _eager_fused(x, r, w):
    h = x + r
    return F.rms_norm(h, (h.shape[-1],), w, RMS_EPS), h


def _ours_rms(x, w):
    return rmsnorm_ext.rms_norm(x, (x.shape[-1],), w, RMS_EPS)


def _ours_ln(x, w, b):
    return rmsnorm_ext.layer_norm(x, (x.shape[-1],), w, b, LN_EPS)


def _ours_fused(x, r, w):
    return rmsnorm_ext.fused_add_rms_norm(x, r, (x.shape[-1],), w, RMS_EPS)


EAGER = {"rms_norm": _eager_rms, "layer_norm": _eager_ln, "fused_add_rms_norm": _eager_fused}
OURS = {"rms_norm": _ours_rms, "layer_norm": _ours_ln, "fused_add_rms_norm": _ours_fused}


def parse_quant(mode: str) -> Tuple[torch.dtype, Optional[int], bool]:
    """"fp8-group128" -> (quant_dtype, group_size, static)."""
    qname, scale = mode.split("-", 1)
    group = int(scale[len("group"):]) if scale.startswith("group") else None
    return QUANT_DTYPES[qname], group, scale == "static"


def _quantize_composite(y: torch.Tensor, mode: str, scale: torch.Tensor):
    """What a user writes today after the norm: the scale(s) (static, or per row / group from
    the fp32 output's absmax, with the ops' min_scale), then divide, clamp and convert."""
    qd, group, static = parse_quant(mode)
    yg = y if group is None else y.unflatten(-1, (-1, group))
    if static:
        s = scale
    else:
        s = (yg.abs().amax(-1, keepdim=True) / QMAX[qd]).clamp(min=MIN_SCALE[qd])
    z = (yg / s).clamp(QMIN[qd], QMAX[qd])
    if qd == torch.int8:
        z = z.round()  # half to even, as the kernel
    q = z.to(qd)
    if group is not None:
        q, s = q.flatten(-2), s.squeeze(-1)
    return q, s


def quant_fns(op: str, mode: str, device: torch.device) -> Tuple[Callable, Callable]:
    """(ours, eager composite) of a norm + quantize op in one --quant mode, with the argument
    order of the unquantized op (x, w / x, w, b / x, r, w); a static scale is built here."""
    qd, group, static = parse_quant(mode)
    scale = torch.tensor([STATIC_SCALE], dtype=torch.float32, device=device)
    kw = dict(scale=scale if static else None, quant_dtype=qd, group_size=group)
    if op == "rms_norm_quant":
        def ours(x, w):
            return rmsnorm_ext.rms_norm_quant(x, (x.shape[-1],), w, RMS_EPS, **kw)

        def eager(x, w):
            y = F.rms_norm(x.float(), (x.shape[-1],), w.float(), RMS_EPS)
            return _quantize_composite(y, mode, scale)
    elif op == "fused_add_rms_norm_quant":
        def ours(x, r, w):
            return rmsnorm_ext.fused_add_rms_norm_quant(x, r, (x.shape[-1],), w, RMS_EPS, **kw)

        def eager(x, r, w):
            h = x + r
            y = F.rms_norm(h.float(), (h.shape[-1],), w.float(), RMS_EPS)
            return (*_quantize_composite(y, mode, scale), h)
    else:
        def ours(x, w, b):
            return rmsnorm_ext.layer_norm_quant(x, (x.shape[-1],), w, b, LN_EPS, **kw)

        def eager(x, w, b):
            y = F.layer_norm(x.float(), (x.shape[-1],), w.float(), b.float(), LN_EPS)
            return _quantize_composite(y, mode, scale)
    return ours, eager


def _compiled(fn: Callable) -> Callable:
    # A fresh Dynamo state per case: no recompile-limit fallbacks, no guard chains from
    # earlier shapes. Shapes are static (dynamic=False), as a deployed model would be.
    torch.compiler.reset()
    return torch.compile(fn, dynamic=False)


def _liger(op: str) -> Optional[Callable]:
    if op == "rms_norm":
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction as Fn

        def rms(x, w):
            try:  # in_place=False: keep our reused grad_out intact
                return Fn.apply(x, w, RMS_EPS, 0.0, "llama", False)
            except TypeError:
                return Fn.apply(x, w, RMS_EPS)
        return rms
    if op == "layer_norm":
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction as Fn
        return lambda x, w, b: Fn.apply(x, w, b, LN_EPS)
    from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction as Fn

    def fused(x, r, w):
        try:
            return tuple(Fn.apply(x, r, w, RMS_EPS, 0.0, "llama", False))
        except TypeError:
            return tuple(Fn.apply(x, r, w, RMS_EPS))
    return fused


def _apex(op: str) -> Optional[Callable]:
    from apex.normalization.fused_layer_norm import (fused_layer_norm_affine,
                                                     fused_rms_norm_affine)
    if op == "rms_norm":
        return lambda x, w: fused_rms_norm_affine(x, w, (x.shape[-1],), RMS_EPS)
    if op == "layer_norm":
        return lambda x, w, b: fused_layer_norm_affine(x, w, b, (x.shape[-1],), LN_EPS)
    return None  # no fused add+norm in Apex


def build_impl(impl: str, op: str, device: torch.device, quant: str = "") -> Optional[Callable]:
    """The function computing ``op`` (in ``quant`` mode for the quant ops) with ``impl``, or
    None when it does not apply here. Raises ImportError when a third-party package is
    missing."""
    if op in QUANT_OPS:
        if impl not in ("ours", "eager", "compile"):
            return None  # no Liger / Apex norm + quantize
        ours, eager = quant_fns(op, quant, device)
        return {"ours": ours, "eager": eager}.get(impl) or _compiled(eager)
    if impl == "ours":
        return OURS[op]
    if impl == "eager":
        return EAGER[op]
    if impl == "compile":
        return _compiled(EAGER[op])
    if device.type != "cuda":
        return None  # Liger (Triton) and Apex are GPU-only
    return _liger(op) if impl == "liger" else _apex(op)


def impl_available(impl: str, device: torch.device) -> bool:
    if impl in ("ours", "eager", "compile"):
        return True
    if device.type != "cuda":
        return False
    import importlib.util
    return importlib.util.find_spec("liger_kernel" if impl == "liger" else "apex") is not None


# -------------------------------------------------------------------- inputs & bytes
def make_inputs(case: Case, device: torch.device) -> List[torch.Tensor]:
    """Activations first, then parameters, in the argument order of EAGER[case.op]."""
    dtype = DTYPES[case.dtype]
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen) * scale + shift).to(device, dtype)

    act = (case.tokens, case.hidden)
    x = rand(*act)
    w = rand(case.hidden, scale=0.1, shift=1.0)
    if case.op in ("rms_norm", "rms_norm_quant"):
        return [x, w]
    if case.op in ("layer_norm", "layer_norm_quant"):
        return [x, w, rand(case.hidden, scale=0.1)]
    return [x, rand(*act), w]


def quant_bytes(op: str, tokens: int, hidden: int, elem: int, quant: str) -> int:
    """Bytes a perfect norm + quantize kernel moves: the input read, 1 byte per output
    element written, the parameters read, the fp32 scales (dynamic: written, one per row or
    group; static: the scale read and its copy written); for the fused op also the residual
    read and residual_out written (in the input dtype here)."""
    _, group, static = parse_quant(quant)
    act, par = tokens * hidden * elem, hidden * elem
    n_scales = 2 if static else tokens * (1 if group is None else hidden // group)
    total = act + tokens * hidden + 4 * n_scales
    if op == "fused_add_rms_norm_quant":
        return total + 2 * act + par
    return total + (2 * par if op == "layer_norm_quant" else par)


def bytes_moved(op: str, pass_: str, tokens: int, hidden: int, elem: int,
                quant: str = "") -> int:
    """Bytes a perfect kernel must move (per-row statistics are ignored: O(tokens)).

    fwd:  rms x->y (+w); layer x->y (+w, b); fused x, r -> y, h (+w)
    bwd:  rms/layer x, dy -> dx (+ read w, write dw [, db]); fused h, dy, dh -> dx (+w, dw)
    quant ops (fwd only): see quant_bytes
    """
    if op in QUANT_OPS:
        if pass_ != "fwd":
            raise ValueError(f"{op} is inference only: no {pass_} pass")
        return quant_bytes(op, tokens, hidden, elem, quant)
    act, par = tokens * hidden * elem, hidden * elem
    fwd = {"rms_norm": 2 * act + par, "layer_norm": 2 * act + 2 * par,
           "fused_add_rms_norm": 4 * act + par}[op]
    bwd = {"rms_norm": 3 * act + 2 * par, "layer_norm": 3 * act + 3 * par,
           "fused_add_rms_norm": 4 * act + 2 * par}[op]
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[pass_]


# --------------------------------------------------------------------------- runners
def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def make_runner(fn: Callable, inputs: Sequence[torch.Tensor], pass_: str) -> Callable[[], object]:
    """A no-argument callable doing one ``pass_``. fwd runs without autograd (inference);
    bwd runs the forward once here and times only ``autograd.grad(..., retain_graph=True)``;
    fwdbwd times forward + ``autograd.grad``. Gradients flow into every input."""
    if pass_ == "fwd":
        plain = [t.detach() for t in inputs]
        return lambda: fn(*plain)
    leaves = [t.detach().requires_grad_() for t in inputs]
    probe = _as_tuple(fn(*leaves))
    grads = [torch.randn_like(o) for o in probe]
    if pass_ == "bwd":
        return lambda: torch.autograd.grad(probe, leaves, grads, retain_graph=True)
    del probe

    def fwdbwd():
        return torch.autograd.grad(_as_tuple(fn(*leaves)), leaves, grads)
    return fwdbwd


# ------------------------------------------------------------------------- the sweep
@dataclass
class Config:
    device: torch.device
    ops: Tuple[str, ...]
    passes: Tuple[str, ...]
    impls: Tuple[str, ...]
    sweeps: Tuple[Sweep, ...]
    rounds: int
    max_rounds: int
    sample_s: float
    out: Path
    llc_bytes: int = 0
    quant: Tuple[str, ...] = DEFAULT_QUANT
    extra_cases: Tuple[Case, ...] = ()  # appended to the sweep (--quick's quant case)
    name: str = "results"  # output files: <name>.csv, <name>.json, <name>.md
    allow_busy: bool = False  # run on a busy machine, every row marked, instead of stopping

    def cases(self) -> List[Case]:
        seen, cases = set(), []
        for sweep in self.sweeps:
            for dtype in sweep.dtypes:
                for op in self.ops:
                    for quant in (self.quant if op in QUANT_OPS else ("",)):
                        for tokens, hidden in sweep.shapes:
                            case = Case(op, dtype, tokens, hidden, quant)
                            if case not in seen:
                                seen.add(case)
                                cases.append(case)
        cases += [c for c in self.extra_cases if c not in seen]
        # the quant ops have no backward: without "fwd" in --pass they have nothing to run
        return [c for c in cases if c.passes(self.passes)]


def regime(nbytes: int, device: torch.device, llc: int) -> str:
    """Where a working set of ``nbytes`` lives: "cache" when it fits the last-level cache
    (CPU) or L2 (GPU), "DRAM" otherwise ("?" when the cache size is unknown)."""
    if device.type == "cuda":
        llc = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0
    if not llc:
        return "?"
    return "cache" if nbytes <= llc else "DRAM"


def run_case(case: Case, cfg: Config, progress: tqdm, skipped: List[dict],
             guard: _machine.Guard) -> List[Result]:
    inputs = make_inputs(case, cfg.device)
    elem = DTYPES[case.dtype].itemsize
    label = f"{case.label} {DTYPE_SHORT[case.dtype]} {case.tokens}x{case.hidden}"
    passes = case.passes(cfg.passes)
    fns: Dict[str, Optional[Callable]] = {}
    for impl in cfg.impls:
        try:
            fns[impl] = build_impl(impl, case.op, cfg.device, case.quant)
            why = "not applicable"
        except Exception as e:  # noqa: BLE001 - a missing/broken third-party impl is a skip
            fns[impl], why = None, f"{type(e).__name__}: {e}"
        if fns[impl] is None:
            skipped += [dict(dataclasses.asdict(case), impl=impl, pass_=p, why=why)
                        for p in passes]
    results = []
    for pass_ in passes:
        progress.set_postfix_str(f"{label} {pass_}", refresh=False)
        nbytes = bytes_moved(case.op, pass_, case.tokens, case.hidden, elem, case.quant)
        runners = {"copy": _common.warm_copy_floor(nbytes, cfg.device)}
        if cfg.device.type == "cpu" and nbytes // 2 >= FRESH_MIN_BYTES:
            runners["fresh"] = _common.fresh_copy_floor(nbytes)
            runners["clone"] = _common.clone_reference(nbytes, cfg.device)
        for impl, fn in fns.items():
            if fn is None:
                continue
            try:
                runner = make_runner(fn, inputs, pass_)
                runner()  # fails here (e.g. an unsupported dtype) rather than mid-rounds
            except Exception as e:  # noqa: BLE001
                skipped.append(dict(dataclasses.asdict(case), impl=impl, pass_=pass_,
                                    why=f"{type(e).__name__}: {str(e).splitlines()[0]}"))
                continue
            runners[impl] = runner
        # other processes' CPU use over these rounds, the copy's slice quantization: a
        # busy case stops the run (MachineBusy) or, with --allow-busy, marks its rows
        stats, busy = guard.interleaved(f"{label} {pass_}", runners, "copy", nbytes,
                                        device=cfg.device, rounds=cfg.rounds,
                                        max_rounds=cfg.max_rounds, target_sample_s=cfg.sample_s)
        copy = stats.pop("copy")
        fresh, clone = stats.pop("fresh", None), stats.pop("clone", None)
        progress.update(1)
        where = regime(nbytes, cfg.device, cfg.llc_bytes)
        for impl, s in stats.items():
            results.append(Result(
                str(cfg.device), case.op, impl, case.dtype, case.quant, pass_, case.tokens,
                case.hidden,
                time_us=s.median * 1e6, min_us=s.min * 1e6, max_us=s.max * 1e6,
                q1_us=s.q1 * 1e6, q3_us=s.q3 * 1e6, spread=s.spread, noisy=s.noisy, rounds=s.rounds,
                bytes=nbytes, regime=where, gbps=nbytes / s.median / 1e9,
                copy_us=copy.median * 1e6, copy_spread=copy.spread,
                copy_gbps=nbytes / copy.median / 1e9, bw_fraction=copy.median / s.median,
                floor_ratio=s.median / copy.median,
                fresh_us=fresh.median * 1e6 if fresh else math.nan,
                fresh_ratio=s.median / fresh.median if fresh else math.nan,
                clone_us=clone.median * 1e6 if clone else math.nan,
                clone_ratio=s.median / clone.median if clone else math.nan,
                busy=bool(busy), busy_reason=busy))
        del runners
    add_speedups(results)
    return results


def add_speedups(results: List[Result]) -> None:
    """Fill speedup_vs_eager/compile (baseline median / this median) within one case."""
    base = {(r.impl, r.pass_): r.time_us for r in results}
    for r in results:
        for ref in ("eager", "compile"):
            t = base.get((ref, r.pass_))
            if t is not None:
                setattr(r, f"speedup_vs_{ref}", t / r.time_us)


def run_benchmark(cfg: Config) -> Tuple[List[Result], dict]:
    # bwd timing re-runs one backward (retain_graph=True); AOTAutograd's donated buffers
    # forbid that, so they are off (the compiled kernels are the same).
    import torch._functorch.config as functorch_config
    functorch_config.donated_buffer = False
    torch.manual_seed(0)

    impls = tuple(i for i in cfg.impls if impl_available(i, cfg.device))
    missing = sorted(set(cfg.impls) - set(impls))
    if missing:
        print(f"skipping implementations not available on {cfg.device}: {', '.join(missing)}",
              file=sys.stderr)
    cfg = dataclasses.replace(cfg, impls=impls)
    if cfg.device.type == "cpu" and not cfg.llc_bytes:
        cfg = dataclasses.replace(cfg, llc_bytes=_common.llc_bytes())
    cases = cfg.cases()
    if not cases:
        raise SystemExit("nothing to run: the filters exclude every case")

    # a busy machine stops here with the reason, unless --allow-busy (then rows are marked)
    guard = _machine.Guard(cfg.device, cfg.allow_busy)
    load_before = _machine.load_average()
    progress = tqdm(total=sum(len(c.passes(cfg.passes)) for c in cases), unit="case",
                    file=sys.stderr, dynamic_ncols=True)
    results: List[Result] = []
    skipped: List[dict] = []
    t0 = time.perf_counter()
    # A run cut short (Ctrl-C, or SIGTERM from `timeout` in a time-boxed GPU lease) keeps the
    # rows it finished: they are written, with the cut recorded in the metadata.
    stopped = None
    i = 0

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        for i, case in enumerate(cases):
            results += run_case(case, cfg, progress, skipped, guard)
            if cfg.device.type == "cuda":
                torch.cuda.empty_cache()
    except KeyboardInterrupt as e:
        stopped = f"{e or 'interrupted'} during case {i + 1} of {len(cases)}; rows of finished cases kept"
    except _machine.MachineBusy as e:
        stopped = f"{e} (case {i + 1} of {len(cases)}; rows of the finished cases kept)"
    finally:
        signal.signal(signal.SIGTERM, previous)
        progress.close()
    machine = _common.machine_info(cfg.device)
    machine["loadavg_1m_start"] = load_before
    meta = {
        "machine": machine,  # loadavg_1m: at the end of the run
        "wall_time_s": time.perf_counter() - t0,
        "config": {"device": str(cfg.device), "ops": cfg.ops,
                   "passes": cfg.passes, "impls": cfg.impls,
                   "quant": {"modes": cfg.quant, "static_scale": STATIC_SCALE,
                             "note": "quant ops: forward only; bytes = input read + 1 byte "
                                     "per output element + params + fp32 scales (+ residual "
                                     "read and residual_out written for the fused op)"},
                   "cases": [dataclasses.asdict(c) for c in cases],
                   "timer": {"method": "benchmarks/_timer.py: interleaved rounds, median; "
                                       + ("CUDA events, L2 flushed before each call"
                                          if cfg.device.type == "cuda" else
                                          "time.perf_counter, gc paused"),
                             "rounds": cfg.rounds, "max_rounds": cfg.max_rounds,
                             "sample_s": cfg.sample_s,
                             "spread": "IQR / median", "noisy_above": _timer.SPREAD_LIMIT},
                   "floor": "bandwidth: a copy of bytes/2 into warm memory (reads + writes "
                            "the row's bytes), timed in the same rounds; CPU outputs >= "
                            f"{FRESH_MIN_BYTES >> 20} MiB also: fresh memory (a new buffer "
                            "advised huge pages, then the copy) and a clone",
                   "llc_bytes": cfg.llc_bytes,
                   "eps": {"rms": RMS_EPS, "layer": LN_EPS}},
        "skipped": skipped,
        "stopped": stopped,
        "busy": bool(guard.reason) or any(r.busy for r in results),
        "busy_reason": guard.reason or next((r.busy_reason for r in results if r.busy), ""),
        "machine_check": guard.check,
    }
    return results, meta


# --------------------------------------------------------------------------- outputs
def _fmt(v: float, spec: str, suffix: str = "") -> str:
    return "" if v is None or math.isnan(v) else format(v, spec) + suffix


def pivot_table(results: List[Result], markdown: bool = False) -> str:
    """One line per (op, dtype, pass, shape): each impl's median ±spread, the warm copy of the
    same bytes, then ours' GB/s, %BW (DRAM rows), floor ratios (warm copy, fresh memory,
    clone) and speedups; a '!' marks rows whose spread exceeds 10%."""
    impls = [i for i in IMPLS if any(r.impl == i for r in results)]
    by_key: Dict[tuple, Dict[str, Result]] = {}
    for r in results:
        by_key.setdefault((r.op, r.quant, r.dtype, r.pass_, r.tokens, r.hidden), {})[r.impl] = r
    header = (["op", "dtype", "pass", "shape", "regime"] + [f"{i} µs" for i in impls]
              + ["copy µs", "ours GB/s", "ours %BW", "floor×", "fresh×", "clone×", "vs eager",
                 "vs compile"])
    rows = []
    for (op, quant, dtype, pass_, tokens, hidden), impl_rows in by_key.items():
        any_row = next(iter(impl_rows.values()))
        ours = impl_rows.get("ours")
        row = [("⚠BUSY " if any_row.busy else "") + op + (f" {quant}" if quant else ""),
               DTYPE_SHORT[dtype], pass_,
               f"{tokens}x{hidden}", any_row.regime]
        row += [_common.time_cell(impl_rows[i].time_us, impl_rows[i].spread, impl_rows[i].noisy)
                if i in impl_rows else "-" for i in impls]
        row.append(_common.time_cell(any_row.copy_us, any_row.copy_spread,
                                     any_row.copy_spread > _timer.SPREAD_LIMIT))
        if ours is None:
            row += [""] * 7
        else:
            # A share of memory bandwidth only where the bytes stream from DRAM: a
            # cache-resident copy measures its call overhead, not the memory.
            bw = (_fmt(100 * ours.bw_fraction, ".0f", "%") if ours.regime == "DRAM" else "")
            row += [_fmt(ours.gbps, ".1f"), bw, _fmt(ours.floor_ratio, ".2f"),
                    _fmt(ours.fresh_ratio, ".2f"), _fmt(ours.clone_ratio, ".2f"),
                    _fmt(ours.speedup_vs_eager, ".2f", "x"),
                    _fmt(ours.speedup_vs_compile, ".2f", "x")]
        rows.append(row)
    return _common.table(header, rows, "l" * 5 + "r" * (len(header) - 5), markdown)


LEGEND = ("Times: median of interleaved rounds ± spread (IQR / median); `!` = spread above "
          "10%, the median is uncertain by about that much. `copy µs`: a copy moving the same "
          "bytes into warm (already backed) memory, timed in the same rounds: the bandwidth "
          "floor; `%BW` = copy time / ours, the share of memory bandwidth (DRAM rows only), "
          "`floor×` = ours / copy time. CPU rows with outputs of 8 MiB or more also have "
          "`fresh×` = ours / a copy into a fresh buffer advised huge pages (what an op "
          "returning a new tensor can reach) and `clone×` = ours / `x.clone()` (torch's "
          "default allocation, page faults included: a reference, not a floor), timed in "
          "the same rounds. `regime`: whether the row's working set fits the "
          "last-level cache (`cache`) or not (`DRAM`). Norm + quantize rows (`<op> <quant>`) "
          "count the input read, 1 byte per output element, the fp32 scales (and for the "
          "fused op the residual read and residual_out written).")


def busy_banner(results: List[Result]) -> str:
    """'' unless some row was timed on a busy machine (--allow-busy)."""
    busy = [r for r in results if r.busy]
    if not busy:
        return ""
    return (f"{_machine.BANNER}: {len(busy)} of {len(results)} timings (marked ⚠BUSY) were "
            f"taken on a busy machine -- {busy[0].busy_reason}. Rerun on an idle machine.")


def noisy_summary(results: List[Result]) -> str:
    noisy = [r for r in results if r.noisy]
    if not noisy:
        text = "no row's spread exceeds 10%"
    else:
        text = (f"{len(noisy)} of {len(results)} timings have a spread above 10% (marked '!'): "
                "the machine was busy; rerun on a quiet machine before drawing conclusions")
    return "\n".join(filter(None, [busy_banner(results), text]))


def write_markdown(results: List[Result], meta: dict, path: Path) -> None:
    banner = busy_banner(results)
    path.write_text(_common.header_line(meta["machine"]) + "\n\n"
                    + (f"**{banner}**\n\n" if banner else "") + LEGEND + "\n\n"
                    + pivot_table(results, markdown=True) + "\n\n" + noisy_summary(results)
                    + "\n")


def write_outputs(results: List[Result], meta: dict, out: Path, plots: bool = True,
                  name: str = "results") -> List[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.csv", out / f"{name}.json", out / f"{name}.md"]
    records = [r.to_dict() for r in results]
    _common.write_csv(paths[0], COLUMNS, records)
    _common.write_json(paths[1], dict(meta, columns=COLUMNS, results=records))
    write_markdown(results, meta, paths[2])
    if plots:
        try:
            paths += make_plots(results, meta, out / "plots")
        except ImportError as e:  # matplotlib is optional
            print(f"skipping plots ({e}): pip install matplotlib", file=sys.stderr)
    return paths


# ----------------------------------------------------------------------------- plots
IMPL_STYLE = {"ours": "tab:red", "eager": "tab:blue", "compile": "tab:green",
              "liger": "tab:purple", "apex": "tab:orange", "copy": "gray"}
TOKEN_STYLES = ("-", "--", ":", "-.")


def _plot_gbps(ax, results: List[Result], op: str, dtype: str, pass_: str,
               quant: str = "") -> None:
    """GB/s vs hidden size: one line per (impl, token count), error bars from the rounds'
    IQR, and the copy of the same bytes per point; latency rows left out."""
    rows = [r for r in results if r.op == op and r.quant == quant and r.dtype == dtype
            and r.pass_ == pass_ and r.tokens > 1]
    token_counts = sorted({r.tokens for r in rows})
    top = 0.0
    for k, tokens in enumerate(token_counts):
        style = TOKEN_STYLES[k % len(TOKEN_STYLES)]
        suffix = "" if len(token_counts) == 1 else f" ({tokens} tok)"
        for impl in IMPLS:
            pts = sorted((r.hidden, r) for r in rows if r.impl == impl and r.tokens == tokens)
            if not pts:
                continue
            xs = [h for h, _ in pts]
            gbps = [r.gbps for _, r in pts]
            top = max([top] + gbps)
            # The bar spans the GB/s at the quartile times (the slower q3 is the lower end).
            lo = [g - r.bytes / (r.q3_us * 1e3) for g, (_, r) in zip(gbps, pts)]
            hi = [r.bytes / (r.q1_us * 1e3) - g for g, (_, r) in zip(gbps, pts)]
            ax.errorbar(xs, gbps, yerr=[lo, hi], fmt=style, marker="o", markersize=4,
                        capsize=2, color=IMPL_STYLE[impl], label=impl + suffix)
        copy = sorted({(r.hidden, r.copy_gbps) for r in rows if r.tokens == tokens})
        if copy:
            ax.plot(*zip(*copy), style, color=IMPL_STYLE["copy"], linewidth=1,
                    label="copy into warm memory, same bytes" + suffix)
            top = max([top] + [g for _, g in copy])
    ax.set_xscale("log", base=2)
    hidden = sorted({r.hidden for r in rows})
    if hidden:
        ax.set_xticks(hidden, [str(h) for h in hidden], rotation=45, fontsize=7)
        ax.minorticks_off()
    ax.set_xlabel("hidden size")
    ax.set_ylabel("effective GB/s")
    # Scaled to the medians: one wild quartile on a busy machine must not flatten the rest
    # (its bar is clipped; the table has the numbers).
    ax.set_ylim(0, 1.15 * top if top > 0 else None)
    ax.set_title(f"{op}{' ' + quant if quant else ''} {DTYPE_SHORT[dtype]} {pass_}", fontsize=9)
    ax.grid(alpha=0.3)


def _save(fig, path: Path, meta: dict) -> Path:
    import matplotlib.pyplot as plt

    title = _common.header_line(meta["machine"], markdown=False)
    if meta.get("busy"):
        title = f"{_machine.BANNER}\n{title}"
        fig.text(0.5, 0.5, _machine.BANNER, ha="center", va="center", rotation=25,
                 fontsize=22, color="red", alpha=0.35, weight="bold")
    fig.suptitle(title, fontsize=8, color="red" if meta.get("busy") else "black")
    handles = {}  # one entry per label, from every axes
    for ax in fig.axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    # Outside the axes, to their right (constrained layout makes room): it can cover
    # neither data nor the axis labels.
    fig.legend(handles.values(), handles.keys(), loc="outside right center", fontsize=8,
               frameon=False)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def make_plots(results: List[Result], meta: dict, out: Path) -> List[Path]:
    """gbps_<op>[_<quant>]_<dtype>.png (one panel per pass; for a quant op only with two
    hidden sizes or more) and rms_vs_layer_<dtype>.png (RMSNorm and LayerNorm side by side,
    one row per pass)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    plotted = [r for r in results if r.tokens > 1]
    paths = []
    for op in ALL_OPS:
        for quant in sorted({r.quant for r in plotted if r.op == op}):
            for dtype in DTYPES:
                mine = [r for r in plotted if r.op == op and r.quant == quant and r.dtype == dtype]
                if not mine or (quant and len({r.hidden for r in mine}) < 2):
                    continue  # a quant op at one hidden size (--quick's row): the table says it
                passes = [p for p in PASSES if any(r.pass_ == p for r in mine)]
                fig, axes = plt.subplots(1, len(passes), figsize=(4.2 * len(passes), 4),
                                         squeeze=False, layout="constrained")
                for ax, pass_ in zip(axes[0], passes):
                    _plot_gbps(ax, plotted, op, dtype, pass_, quant)
                stem = f"gbps_{op}_{quant.replace('-', '_')}" if quant else f"gbps_{op}"
                paths.append(_save(fig, out / f"{stem}_{dtype}.png", meta))
    passes = [p for p in PASSES if any(r.pass_ == p and r.op in OPS for r in plotted)]
    for dtype in DTYPES:
        pair = ("rms_norm", "layer_norm")
        if not all(any(r.op == op and r.dtype == dtype for r in plotted) for op in pair):
            continue
        fig, axes = plt.subplots(len(passes), 2, figsize=(9, 3.6 * len(passes)),
                                 squeeze=False, sharey="row", layout="constrained")
        for row, pass_ in zip(axes, passes):
            for ax, op in zip(row, pair):
                _plot_gbps(ax, plotted, op, dtype, pass_)
        paths.append(_save(fig, out / f"rms_vs_layer_{dtype}.png", meta))
    return paths


# ------------------------------------------------------------------------------- cli
def _shapes(text: str) -> Tuple[Shape, ...]:
    try:
        return tuple(tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"shapes are TOKENSxHIDDEN[,...], got {text!r}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_device_arg(p)
    p.add_argument("--quick", action="store_true",
                   help="three shapes, one dtype, fewer rounds, plus one rms_norm_quant row "
                        "(about 2 minutes on 2 cores)")
    p.add_argument("--op", type=_common.csv_list(ALL_OPS),
                   help=f"comma list of {ALL_OPS} (default: the first three; the quant ops "
                        "are forward only, in the --quant modes)")
    p.add_argument("--quant", type=_common.csv_list(QUANT_MODES), default=DEFAULT_QUANT,
                   help="the quant ops' output dtype and scale mode, a comma list of "
                        f"{QUANT_MODES}: fp8 = float8_e4m3fn; static = a given scale "
                        f"({STATIC_SCALE}), token = one dynamic scale per row, group128 = one "
                        "per 128 elements (default fp8-token)")
    p.add_argument("--dtype", type=_common.csv_list(tuple(DTYPES)),
                   help="comma list of float32,bfloat16,float16 (default: the sweep's; "
                        "given, it replaces the sweep's dtypes)")
    p.add_argument("--shape", type=_shapes,
                   help="comma list of TOKENSxHIDDEN, e.g. 4096x4096,1x4096 (replaces the sweep)")
    p.add_argument("--pass", dest="passes", type=_common.csv_list(PASSES), default=PASSES,
                   help=f"comma list of {PASSES}")
    p.add_argument("--impl", type=_common.csv_list(IMPLS), default=IMPLS,
                   help=f"comma list of {IMPLS} (liger/apex: GPU only, when importable)")
    p.add_argument("--rounds", type=int, help="interleaved rounds per row (default 9; 7 "
                   "with --quick); noisy rows get more, up to --max-rounds")
    p.add_argument("--max-rounds", type=int, help="default 15; 9 with --quick")
    p.add_argument("--sample-ms", type=float,
                   help="milliseconds per timed sample (default 30; 10 with --quick)")
    p.add_argument("--llc-mib", type=float, help="last-level cache size for the regime "
                   "column (default: from /sys/devices/system/cpu/cpu0/cache)")
    _common.add_out_args(p, "bench")
    p.add_argument("--name", default="results",
                   help="output file names NAME.csv, NAME.json, NAME.md (default results)")
    p.add_argument("--no-plots", action="store_true")
    _common.add_busy_arg(p, "every row, table, CSV/JSON record and plot is then marked")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> Config:
    device = _common.pick_device(args.device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    if args.shape:
        sweeps = (Sweep(args.dtype or DEFAULT_DTYPES[kind], args.shape),)
    else:
        sweeps = (QUICK_SWEEPS if args.quick else DEFAULT_SWEEPS)[kind]
        if args.dtype:  # the sweep's shapes in the dtypes asked for
            sweeps = tuple(Sweep(args.dtype, s.shapes) for s in sweeps)
    rounds, max_rounds, sample_s = TIMING["quick" if args.quick else "default"]
    rounds = args.rounds or rounds
    # --quick without --op/--shape also times one norm + quantize case
    extra = ()
    if args.quick and not args.op and not args.shape:  # in the sweep's (first) dtype
        extra = (dataclasses.replace(QUICK_QUANT[kind], dtype=sweeps[0].dtypes[0]),)
    return Config(device=device, ops=args.op or OPS, passes=args.passes,
                  impls=args.impl, sweeps=sweeps, rounds=rounds, quant=args.quant,
                  extra_cases=extra, name=args.name, allow_busy=args.allow_busy,
                  max_rounds=max(rounds, args.max_rounds or max_rounds),
                  sample_s=args.sample_ms / 1e3 if args.sample_ms else sample_s,
                  out=_common.out_dir(args, device, quick=args.quick),
                  llc_bytes=int(args.llc_mib * 2**20) if args.llc_mib else 0)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        results, meta = run_benchmark(cfg)
    print()
    if busy_banner(results):
        print(busy_banner(results) + "\n")
    print(pivot_table(results))
    print("\n" + noisy_summary(results))
    if meta["skipped"]:
        reasons = sorted({s["why"] for s in meta["skipped"]})
        print(f"{len(meta['skipped'])} rows skipped: " + "; ".join(reasons))
    paths = write_outputs(results, meta, cfg.out, plots=not args.no_plots, name=cfg.name)
    print(f"\n{len(results)} rows in {time.perf_counter() - t0:.0f} s; wrote:")
    for path in paths:
        print(f"  {path}")
    if meta["stopped"]:
        print(f"STOPPED: {meta['stopped']}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
