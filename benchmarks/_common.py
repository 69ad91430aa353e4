"""Shared helpers of the benchmarks: dtypes, devices, machine info, command-line options,
output folders and files (tables, CSV, JSON), the fresh-memory floor.

Timing lives in _timer.py (interleaved rounds, medians, spreads), the busy-machine check in
_machine.py.
"""
from __future__ import annotations

import argparse
import ctypes
import csv
import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Tuple

import torch

import _machine

REPO_ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


# ----------------------------------------------------------------------------- devices
def pick_device(requested: Optional[str]) -> torch.device:
    if requested:
        dev = torch.device(requested)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def cache_sizes() -> dict:
    """{"L1d": bytes, "L2": bytes, "L3": bytes, ...} of cpu0, from sysfs (empty if unknown).
    On a VM these are what the hypervisor reports, which may not be the host's."""
    sizes = {}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in sorted(base.glob("index*")):
        try:
            level = (idx / "level").read_text().strip()
            kind = (idx / "type").read_text().strip()
            text = (idx / "size").read_text().strip().upper()
        except OSError:
            continue
        m = re.match(r"(\d+)([KMG]?)", text)
        if m and kind != "Instruction":
            name = f"L{level}" + ("d" if kind == "Data" else "")
            sizes[name] = int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)]
    return sizes


def llc_bytes() -> int:
    """Size of the largest CPU cache level (0 if unknown)."""
    return max(cache_sizes().values(), default=0)


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
    # Results being (re)written by this very run are not a change to the code measured.
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                            ":(exclude)benchmarks/results", ":(exclude)benchmarks/out"],
                           cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    return commit + ("-dirty" if dirty else "")


def machine_info(device: torch.device) -> dict:
    import rmsnorm_ext

    info = {
        "device": str(device),
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "llc_bytes": llc_bytes(),
        "cpu_caches": cache_sizes(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "rmsnorm_ext_build": rmsnorm_ext.build_info(),
        "git_commit": git_commit(),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "loadavg_1m": _machine.load_average(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_name=props.name, gpu_memory_bytes=props.total_memory,
                    gpu_l2_bytes=getattr(props, "L2_cache_size", None),
                    cuda_version=torch.version.cuda)
    return info


# ----------------------------------------------------------------------------- outputs
OUT_ROOT = REPO_ROOT / "benchmarks" / "out"          # git-ignored scratch results
RESULTS_ROOT = REPO_ROOT / "benchmarks" / "results"  # committed results


def committed_dir(device: torch.device) -> Path:
    """Where --save-results writes: one stable folder per device kind (the machine, date
    and commit are recorded inside), so regenerating replaces the old results instead of
    adding a folder next to them."""
    if device.type == "cuda":
        return RESULTS_ROOT / ("cuda-" + machine_slug(device))
    return RESULTS_ROOT / "cpu"


def add_out_args(parser, what: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--out", type=Path, help="output folder (default: a fresh, git-ignored "
                       f"benchmarks/out/{what}-<machine>-<date>-<time>/)")
    group.add_argument("--save-results", action="store_true",
                       help="write into the committed results folder (benchmarks/results/cpu/ "
                            "or benchmarks/results/cuda-<gpu>/), replacing its files")


def out_dir(args, device: torch.device, quick: bool = False, what: str = "bench") -> Path:
    """--out, else the committed folder with --save-results, else a new folder under the
    git-ignored benchmarks/out/ (a fresh one per run: a default run never overwrites
    anything, least of all committed results)."""
    if getattr(args, "out", None):
        return args.out
    if getattr(args, "save_results", False):
        return committed_dir(device)
    stamp = _dt.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    name = f"{what}-{machine_slug(device)}-{stamp}" + ("-quick" if quick else "")
    path, n = OUT_ROOT / name, 1
    while path.exists():
        n += 1
        path = OUT_ROOT / f"{name}-{n}"
    return path


def header_line(machine: dict, markdown: bool = True) -> str:
    """machine, threads, torch, commit and date of a run, for tables and plot titles."""
    name = machine["device_name"] + ("" if machine["device"].startswith("cuda")
                                     else f" ({machine['cpu_threads']} threads)")
    if markdown:
        name = f"**{name}**"
    parts = [name, f"torch {machine['torch_version']}", f"commit {machine['git_commit']}",
             str(machine["date"])]
    return (" · " if markdown else " | ").join(parts)


def csv_list(choices: Sequence[str]) -> Callable[[str], Tuple[str, ...]]:
    """An argparse type: a comma list, each item one of `choices`."""
    def parse(text: str) -> Tuple[str, ...]:
        items = tuple(s.strip() for s in text.split(",") if s.strip())
        bad = [s for s in items if s not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(choices)}")
        return items
    return parse


def add_device_arg(parser, default_help: str = "default: cuda if available") -> None:
    parser.add_argument("--device", help=f"cpu, cuda or cuda:N ({default_help})")


def add_busy_arg(parser, marks: str = "every result is then marked") -> None:
    parser.add_argument("--allow-busy", action="store_true",
                        help="run even when other processes load the CPU (the run otherwise "
                             f"stops with the reason); {marks} {_machine.BANNER!r}")


def cpu_report(allow_busy: bool, **fields):
    """A CPU benchmark's busy-machine guard and the head of its JSON report: the machine,
    `fields` in order, and the guard's machine check."""
    guard = _machine.Guard("cpu", allow_busy)
    report = {"machine": machine_info(torch.device("cpu")), **fields,
              "machine_check": guard.check}
    return guard, report


# ------------------------------------------------------------------ tables and files
def table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str,
          markdown: bool = False) -> str:
    """A markdown or fixed-width text table; ``align`` has one of l, r, c per column."""
    rows = [[str(c) for c in r] for r in rows]
    if markdown:
        rule = {"l": "---", "r": "---:", "c": ":-:"}
        return "\n".join(["| " + " | ".join(header) + " |",
                          "|" + "|".join(rule[a] for a in align) + "|"]
                         + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    just = {"l": str.ljust, "r": str.rjust, "c": str.center}

    def line(r):
        return "  ".join(just[a](c, w) for c, w, a in zip(r, widths, align))
    return "\n".join([line(header), "-" * (sum(widths) + 2 * (len(widths) - 1))]
                     + [line(r) for r in rows])


def time_cell(value: float, spread: float, noisy: bool, digits: int = 1) -> str:
    """A median with its spread, '!' when noisy: '14.5 ±3%!'."""
    return f"{value:.{digits}f} ±{100 * spread:.0f}%" + ("!" if noisy else "")


def _blank(v):
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else v


def write_csv(path: Path, columns: Sequence[str], records: Iterable[dict]) -> None:
    """One row per record; None and NaN are left empty."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows({k: _blank(r[k]) for k in columns} for r in records)


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_json(path: Path, payload: dict) -> None:
    """NaN and inf become null (strict JSON); paths, dtypes and devices become strings."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(payload), indent=1, default=str) + "\n")


# ------------------------------------------------------------------------------ floors
_libc = ctypes.CDLL(None, use_errno=True)
_MADV_HUGEPAGE = 14
_HUGE = 2 << 20


def fresh_huge(like: torch.Tensor) -> torch.Tensor:
    """A fresh tensor like ``like`` whose 2 MiB-aligned interior is advised MADV_HUGEPAGE
    before its first write (a no-op where THP is off): the memory an op returning a new
    tensor can reach, as our kernels advise their large outputs."""
    t = torch.empty_like(like)
    b = (t.data_ptr() + _HUGE - 1) & ~(_HUGE - 1)
    e = (t.data_ptr() + t.numel() * t.element_size()) & ~(_HUGE - 1)
    if e > b:
        _libc.madvise(ctypes.c_void_p(b), ctypes.c_size_t(e - b), _MADV_HUGEPAGE)
    return t


def clone_reference(nbytes: int, device: torch.device) -> Callable[[], object]:
    """A clone moving ``nbytes`` (reads nbytes/2, writes nbytes/2 into a new tensor): what
    torch's default allocation path costs an out-of-place op. Above glibc's mmap threshold
    its new pages fault on first write, so it is a reference, not a floor."""
    src = torch.ones(max(1, nbytes // 2), dtype=torch.uint8, device=device)
    return src.clone


def warm_copy_floor(nbytes: int, device: torch.device) -> Callable[[], object]:
    """The memory-bandwidth floor of a pass that must move ``nbytes``: a copy of nbytes/2
    into warm, already-backed memory -- the same working set as the pass, so a cache-resident
    case is compared with a cache-resident copy. No pass moving those bytes beats it when
    they stream from DRAM."""
    src = torch.ones(max(1, nbytes // 2), dtype=torch.uint8, device=device)
    dst = torch.zeros_like(src)
    return lambda: dst.copy_(src)


def fresh_copy_floor(nbytes: int) -> Callable[[], object]:
    """The fresh-memory floor (CPU): a copy of nbytes/2 into a new buffer whose interior is
    advised huge pages before its first write (fresh_huge): what an op returning a new
    tensor can reach, as our kernels do with their large outputs."""
    src = torch.ones(max(1, nbytes // 2), dtype=torch.uint8)
    return lambda: fresh_huge(src).copy_(src)
