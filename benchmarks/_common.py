"""Shared helpers for bench.py and profile.py: device choice, machine info, timing.

All timing goes through :func:`measure`, so the CPU and GPU methodology lives in one place:

* CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` (median of blocks), run with
  torch's current thread count (Timer defaults to one thread otherwise).
* CUDA: ``triton.testing.do_bench`` when triton is importable (it zeroes a 256 MiB buffer
  before every repetition, flushing L2, and times each call with CUDA events); otherwise an
  equivalent CUDA-events loop with our own L2 flush. Median in both cases.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- devices
def pick_device(requested: Optional[str]) -> torch.device:
    if requested:
        dev = torch.device(requested)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------- machine info
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def llc_bytes() -> int:
    """Size of the largest CPU cache level (0 if unknown)."""
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in base.glob("index*"):
        try:
            text = (idx / "size").read_text().strip().upper()
        except OSError:
            continue
        m = re.match(r"(\d+)([KMG]?)", text)
        if m:
            mult = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)]
            best = max(best, int(m.group(1)) * mult)
    return best


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def machine_slug(device: torch.device) -> str:
    name = device_name(device)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"
    if device.type == "cpu":
        slug += f"-{torch.get_num_threads()}t"
    return slug


def git_commit() -> Optional[str]:
    # The GPU machine gets the working tree without .git: the caller names the commit.
    if os.environ.get("RMSNORM_EXT_COMMIT"):
        return os.environ["RMSNORM_EXT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    commit = out.stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    return commit + ("-dirty" if dirty else "")


def today() -> str:
    return _dt.date.today().isoformat()


def machine_info(device: torch.device) -> dict:
    import rmsnorm_ext

    info = {
        "device": str(device),
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "llc_bytes": llc_bytes(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "rmsnorm_ext_build": rmsnorm_ext.build_info(),
        "git_commit": git_commit(),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "loadavg_1m": load_average(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_name=props.name, gpu_memory_bytes=props.total_memory,
                    gpu_l2_bytes=getattr(props, "L2_cache_size", None),
                    cuda_version=torch.version.cuda)
    return info


def load_average() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def warn_if_busy(device: torch.device) -> None:
    """CPU timings are meaningless while other processes compete for the cores."""
    load, cores = load_average(), os.cpu_count() or 1
    if device.type == "cpu" and load is not None and load > 0.5 * cores:
        print(f"warning: load average {load:.1f} on {cores} cores: other processes are "
              "running, CPU timings will be noisy", file=sys.stderr)


# ----------------------------------------------------------------------------- timing
def measure(fn: Callable[[], object], device: torch.device, min_run_time: float = 0.2) -> float:
    """Median seconds per call of ``fn`` (warmed up, excluding any first-call cost)."""
    fn()  # warm-up: first-call allocations, lazy init, compile
    if device.type == "cuda":
        return _measure_cuda(fn, device, min_run_time)
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def _measure_cuda(fn, device, min_run_time):
    rep_ms = max(min_run_time * 1e3, 20.0)
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        with torch.cuda.device(device):
            return do_bench(fn, warmup=max(rep_ms / 4, 5.0), rep=rep_ms,
                            return_mode="median") * 1e-3
    return _cuda_events_median(fn, device, rep_ms)


def _cuda_events_median(fn, device, rep_ms):
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    synchronize(device)
    n = int(max(10, min(1000, rep_ms / max(start.elapsed_time(end) / 5, 1e-3))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        flush.zero_()  # evict the inputs from L2
        s.record()
        fn()
        e.record()
    synchronize(device)
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return times[len(times) // 2] * 1e-3


def copy_bandwidth(device: torch.device, nbytes: Optional[int] = None,
                   min_run_time: float = 0.3) -> float:
    """Device memory bandwidth in GB/s (read + write) from a ``dst.copy_(src)`` much larger
    than the last-level cache (8x the LLC/L2, at least 256 MiB)."""
    if nbytes is None:
        if device.type == "cuda":
            cache = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        else:
            cache = llc_bytes()
        nbytes = max(256 * 2**20, 8 * cache)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the destination pages
    seconds = measure(lambda: dst.copy_(src), device, min_run_time)
    moved = 2 * src.numel() * src.element_size()
    del src, dst
    return moved / seconds / 1e9
