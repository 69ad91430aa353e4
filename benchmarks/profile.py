#!/usr/bin/env python
"""Profile a Llama-style decoder block with native norms and with rmsnorm_ext.

    python benchmarks/profile.py                       # cuda if available, else cpu
    python benchmarks/profile.py --device cpu --seq 256 --out /tmp/prof

Builds one block (RMSNorm -> causal SDPA attention -> residual, RMSNorm -> SwiGLU MLP ->
residual; random weights, nothing downloaded), runs forward + backward under
torch.profiler once with torch.nn.RMSNorm and once with rmsnorm_ext.RMSNorm swapped in,
prints the profiler table for the norm ops and the block time of both runs, and writes
Chrome traces (open in chrome://tracing or https://ui.perfetto.dev) and a JSON summary.
"""
from __future__ import annotations

import sys
from pathlib import Path

# This file is named like the stdlib `profile` module (imported by cProfile, which torch
# imports): keep our folder off the front of sys.path so the stdlib one wins.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

import argparse  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.autograd.profiler_util import EventList  # noqa: E402

import _common  # noqa: E402
import rmsnorm_ext  # noqa: E402

BLOCK_LABEL = "decoder_block"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


class DecoderBlock(nn.Module):
    """Pre-norm Llama block: h = x + attn(norm(x)); out = h + mlp(norm(h))."""

    def __init__(self, dim: int, heads: int, ffn: int, eps: float = 1e-6):
        super().__init__()
        self.attn_norm = nn.RMSNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.mlp_norm = nn.RMSNorm(dim, eps=eps)
        self.mlp = SwiGLU(dim, ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attn(self.attn_norm(x))
        return h + self.mlp(self.mlp_norm(h))


def swap_rmsnorm(model: nn.Module) -> int:
    """Replace every plain torch.nn.RMSNorm in ``model`` by rmsnorm_ext.RMSNorm with the
    same configuration and weights. Returns how many were replaced."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.RMSNorm:
                w = child.weight
                new = rmsnorm_ext.RMSNorm(child.normalized_shape, eps=child.eps,
                                          elementwise_affine=child.elementwise_affine,
                                          device=None if w is None else w.device,
                                          dtype=None if w is None else w.dtype)
                new.load_state_dict(child.state_dict())
                setattr(parent, name, new)
                count += 1
    return count


def build_block(args, device: torch.device, use_ext: bool) -> nn.Module:
    torch.manual_seed(0)  # the same weights for both runs
    block = DecoderBlock(args.hidden, args.heads, args.ffn).to(device, DTYPES[args.dtype])
    if use_ext:
        assert swap_rmsnorm(block) == 2
    return block


# --------------------------------------------------------------------------- profiling
def _sort_key(device: torch.device) -> str:
    return "device_time_total" if device.type == "cuda" else "cpu_time_total"


def norm_events(prof) -> EventList:
    averages = prof.key_averages()
    keep = [e for e in averages
            if "norm" in e.key.lower() and not e.key.startswith(BLOCK_LABEL)]
    return EventList(keep, use_device=getattr(averages, "_use_device", None))


def _event_summary(e, iters: int) -> dict:
    device_total = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0))
    return {"count": e.count, "calls_per_iter": e.count / iters,
            "cpu_time_total_us": e.cpu_time_total, "self_cpu_time_total_us": e.self_cpu_time_total,
            "device_time_total_us": device_total}


def profile_block(label: str, block: nn.Module, args, device: torch.device, out: Path) -> dict:
    x = torch.randn(args.batch, args.seq, args.hidden, device=device,
                    dtype=DTYPES[args.dtype], requires_grad=True)
    grad = torch.randn_like(x)

    def step():
        block.zero_grad(set_to_none=True)
        x.grad = None
        block(x).backward(grad)

    block_s = _common.measure(step, device, args.min_run_time)  # also warms up
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.iters):
            with torch.profiler.record_function(f"{BLOCK_LABEL}[{label}]"):
                step()
            _common.synchronize(device)
    trace = out / f"trace_{label}.json"
    prof.export_chrome_trace(str(trace))

    events = norm_events(prof)
    print(f"\n=== {label}: norm ops over {args.iters} fwd+bwd iterations ===")
    print(events.table(sort_by=_sort_key(device), row_limit=-1, max_name_column_width=70))
    block_event = next(e for e in prof.key_averages() if e.key == f"{BLOCK_LABEL}[{label}]")
    return {"label": label, "block_time_us": block_s * 1e6,
            "profiled_block_cpu_time_us": block_event.cpu_time_total / args.iters,
            "trace": str(trace),
            "norm_ops": {e.key: _event_summary(e, args.iters) for e in events}}


# ---------------------------------------------------------------------------------- cli
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", choices=tuple(DTYPES),
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, help="tokens per sequence (default 2048 cuda, 256 cpu)")
    p.add_argument("--hidden", type=int, help="model dim (default 4096 cuda, 1024 cpu)")
    p.add_argument("--heads", type=int, help="attention heads (default hidden // 128)")
    p.add_argument("--ffn", type=int, help="MLP inner size (default 8/3 * hidden, rounded)")
    p.add_argument("--iters", type=int, default=3, help="profiled iterations")
    p.add_argument("--min-run-time", type=float, default=0.5,
                   help="seconds spent timing the block outside the profiler")
    p.add_argument("--out", type=Path, help="trace folder (default: "
                   "benchmarks/results/<machine>-<date>/profile/)")
    args = p.parse_args(argv)
    device = _common.pick_device(args.device)
    gpu = device.type == "cuda"
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.seq = args.seq or (2048 if gpu else 256)
    args.hidden = args.hidden or (4096 if gpu else 1024)
    args.heads = args.heads or max(1, args.hidden // 128)
    args.ffn = args.ffn or 256 * ((8 * args.hidden // 3 + 255) // 256)
    if args.hidden % args.heads:
        p.error("--hidden must be divisible by --heads")
    args.out = args.out or (_HERE / "results"
                            / f"{_common.machine_slug(device)}-{_common.today()}" / "profile")
    return args, device


def main(argv=None) -> int:
    args, device = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    _common.warn_if_busy(device)
    print(f"decoder block on {_common.device_name(device)}: batch {args.batch} x seq "
          f"{args.seq}, hidden {args.hidden}, heads {args.heads}, ffn {args.ffn}, {args.dtype}")
    runs = [profile_block(label, build_block(args, device, use_ext), args, device, args.out)
            for label, use_ext in (("native", False), ("rmsnorm_ext", True))]
    native, ours = runs
    print("\n=== decoder block forward + backward (median, outside the profiler) ===")
    for run in runs:
        print(f"  {run['label']:<12} {run['block_time_us'] / 1e3:9.3f} ms/iter")
    print(f"  speedup      {native['block_time_us'] / ours['block_time_us']:9.3f}x")
    print("(where torch runs RMSNorm as a composite, its backward shows as generic "
          "elementwise ops, not under a 'norm' name: compare the block totals)")
    summary = {"machine": _common.machine_info(device),
               "config": {k: (str(v) if isinstance(v, Path) else v)
                          for k, v in vars(args).items()},
               "runs": runs}
    path = args.out / "profile_summary.json"
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"\nwrote {runs[0]['trace']}, {runs[1]['trace']}, {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
