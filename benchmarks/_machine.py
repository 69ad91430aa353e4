"""Is the machine quiet enough to time on? Checked before a CPU run and after every case.

A CPU benchmark run beside other busy processes measures the scheduler, not the code: OpenMP
threads wait out whole scheduler time slices for a core, so calls that take microseconds
report multiples of 1-4 ms -- with a tight spread that looks confident. So:

* Before the run, :class:`Guard` takes ~0.5 s: the other processes' CPU use over that time
  (from /proc/stat, less this process's own from /proc/self/stat), and a warm 4 MiB copy timed
  call by call (a median far slower than its fastest call, or times at multiples of a
  scheduler slice, mean calls are being preempted). A busy machine stops the run with a
  message saying why -- unless ``--allow-busy``, and then every result is marked BANNER.
* During the run, :meth:`Guard.end` re-checks each case: the other processes' share over the
  case's timed rounds and, where the case has one, its reference copy's quantization.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Optional, Sequence, Tuple

import torch

import _timer

BANNER = "BUSY MACHINE — NOT A MEASUREMENT"
OTHERS_LIMIT = 0.25  # other processes may use at most this share of our cores
SLICES_S = (4e-3, 10e-3, 10e-3 / 3, 1e-3)  # scheduler ticks at HZ = 250, 100, 300, 1000
COPY_BYTES = 4 * 2**20
MIN_COPY_GBPS = 1.0  # a warm copy slower than this (or than 1/4 of its own fastest call): busy


class MachineBusy(SystemExit):
    """The machine became busy mid-run (exits with the message unless caught)."""


# ------------------------------------------------------------------------- measurements
def _cpus() -> Sequence[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return range(os.cpu_count() or 1)


def snapshot() -> Optional[Tuple[int, int, int]]:
    """(busy ticks, all ticks) of the CPUs this process may run on, and this process's own
    ticks (all its threads); None where /proc is missing."""
    cpus = {f"cpu{i}" for i in _cpus()}
    busy = total = 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                name, *v = line.split()
                if name in cpus:
                    v = [int(x) for x in v[:8]]  # user nice system idle iowait irq softirq steal
                    busy += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
                    total += sum(v)
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return busy, total, int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, ValueError, IndexError):
        return None


def others_share(before, after) -> Optional[float]:
    """The share of our CPUs' time that other processes (and hypervisor steal) used between
    two snapshots: 0.5 = half of the cores. The CPUs' counters and this process's own times
    are ticks (1/100 s) sampled apart, so over a short window they can disagree by a tick per
    CPU: that much is not counted as another process's (a 20 ms case on 2 cores spans ~4
    ticks, and one stray tick read as 25% busy on an idle machine)."""
    if before is None or after is None or after[1] - before[1] <= 0:
        return None
    busy, total, own = (a - b for a, b in zip(after, before))
    return min(1.0, max(0.0, (busy - own - len(_cpus())) / total))


def quantized(samples: Sequence[float], inner: int = 1, expected_s: float = 0.0,
              tol: float = 0.05) -> Optional[float]:
    """The scheduler slice (s) that set these times, or None.

    ``samples``: seconds per call, each the mean of a sample of ``inner`` calls;
    ``expected_s``: what a call should take. Quantized = the median call takes >= ~1 ms and
    >= 20x what it should (20x: a DRAM-sized copy against a cache-warm one's speed is far
    from it), and at least 2/3 of the samples (``inner`` calls each) last a whole number of
    slices, within ``tol`` of a slice."""
    if not samples or statistics.median(samples) < max(0.9e-3, 20 * expected_s):
        return None
    for q in SLICES_S:
        k = [s * inner / q for s in samples]
        if sum(x >= 1 - tol and abs(x - round(x)) <= tol for x in k) >= 2 / 3 * len(k):
            return q
    return None


def load_average() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def warn_if_busy(device) -> None:
    """A warning only (model_bench.py, regen_cpu_results.py): the load average is high."""
    load, cores = load_average(), os.cpu_count() or 1
    if torch.device(device).type == "cpu" and load is not None and load > 0.5 * cores:
        print(f"warning: load average {load:.1f} on {cores} cores: other processes are "
              "running, CPU timings will be noisy", file=sys.stderr)


# ------------------------------------------------------------------------------ guard
class Guard:
    """``Guard(device, allow_busy)`` checks the machine (CPU devices only) and stops the
    program with a message when it is busy, unless ``allow_busy``; then ``reason`` says why
    and every result must carry it. Per case: ``t = guard.begin()``, time, then
    ``guard.end(t, ...)``: the case's busy reason ('' when quiet), or :class:`MachineBusy`."""

    def __init__(self, device, allow_busy: bool = False, seconds: float = 0.5):
        self.allow_busy = allow_busy
        self.enabled = torch.device(device).type == "cpu"
        self.cores = len(_cpus())
        self.check = self._calibrate(seconds) if self.enabled else {"busy": False}
        self.reason = "; ".join(self.check.get("reasons", []))
        if self.reason and not allow_busy:
            raise SystemExit(
                f"{BANNER}: not benchmarking -- {self.reason}.\nTimings taken now would "
                "measure the scheduler, not the code. Wait for an idle machine or stop the "
                "other processes (see `top`), then rerun; or pass --allow-busy to run anyway "
                f"with every result marked \"{BANNER}\".")
        if self.reason:
            print(f"warning: {BANNER}: {self.reason}. Running anyway (--allow-busy): every "
                  "result is marked.", file=sys.stderr)

    def _calibrate(self, seconds: float) -> dict:
        load, t0, before = load_average(), time.perf_counter(), snapshot()
        src = torch.ones(COPY_BYTES, dtype=torch.uint8)
        for _ in range(3):
            src.clone()
        times = []
        for _ in range(21):
            t = time.perf_counter()
            src.clone()
            times.append(time.perf_counter() - t)
        time.sleep(max(0.0, seconds - (time.perf_counter() - t0)))
        others = others_share(before, snapshot())
        med, best = statistics.median(times), min(times)
        gbps, best_gbps = 2 * COPY_BYTES / med / 1e9, 2 * COPY_BYTES / best / 1e9
        q = quantized(times, 1, best)
        reasons = []
        if others is not None and others > OTHERS_LIMIT:
            reasons.append(f"other processes used {others * self.cores:.1f} of the "
                           f"{self.cores} cores ({100 * others:.0f}%) over "
                           f"{time.perf_counter() - t0:.1f} s")
        if gbps < MIN_COPY_GBPS or med > 4 * best or q:
            slices = f", at multiples of {q * 1e3:.1f} ms (a scheduler time slice)" if q else ""
            reasons.append(f"a warm {COPY_BYTES >> 20} MiB copy ran at {gbps:.1f} GB/s (median "
                           f"of {len(times)} calls{slices}; its fastest {best_gbps:.1f} GB/s; "
                           f"busy below {MIN_COPY_GBPS:g} GB/s or 1/4 of the fastest)")
        if reasons and load is not None:
            reasons.insert(0, f"load average {load:.1f} on {self.cores} cores")
        return {"busy": bool(reasons), "reasons": reasons, "loadavg_1m": load,
                "others_share": others, "cores": self.cores, "copy_gbps": gbps,
                "copy_best_gbps": best_gbps, "slice_ms": q and q * 1e3}

    def begin(self):
        return snapshot() if self.enabled else None

    def interleaved(self, what: str, fns, ref: Optional[str] = None, ref_bytes: int = 0,
                    **timer_kw):
        """_timer.interleaved(fns, **timer_kw) checked as one case: (stats, busy reason).
        ``ref``: the name of the copy of ``ref_bytes`` among ``fns`` (see :meth:`end`)."""
        before = self.begin()
        stats = _timer.interleaved(fns, **timer_kw)
        return stats, self.end(before, what, stats[ref] if ref else None, ref_bytes)

    def end(self, before, what: str = "", ref: Optional[object] = None,
            ref_bytes: int = 0) -> str:
        """The busy reason of a case timed since ``before`` (the run's own reason too), ''
        when quiet. ``ref``: a _timer.Stats of a copy moving ``ref_bytes`` in the same
        rounds, checked for slice quantization against the calibration copy's best speed.
        Raises MachineBusy (a SystemExit) when busy and not allow_busy."""
        if not self.enabled:
            return ""
        reasons = []
        others = others_share(before, snapshot())
        if others is not None and others > OTHERS_LIMIT:
            reasons.append(f"other processes used {others * self.cores:.1f} of the "
                           f"{self.cores} cores ({100 * others:.0f}%) during {what}")
        if ref is not None:
            expected = ref_bytes / (self.check["copy_best_gbps"] * 1e9)
            q = quantized(ref.samples, ref.inner, expected)
            if q:
                reasons.append(f"the copy of {what} took {ref.median * 1e3:.1f} ms a call, at "
                               f"multiples of {q * 1e3:.1f} ms (a scheduler time slice), "
                               f"where {expected * 1e6:.0f} µs is expected")
        if reasons and not self.allow_busy:
            raise MachineBusy(f"{BANNER}: stopped -- {'; '.join(reasons)}. Rerun on an idle "
                              "machine, or pass --allow-busy to mark such results instead.")
        return "; ".join(r for r in [self.reason] + reasons if r)
