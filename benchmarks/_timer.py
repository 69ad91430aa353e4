"""The project's one benchmark timer: interleaved rounds, medians and spreads.

Every benchmark under ``benchmarks/`` times through :func:`interleaved`, so the methodology
lives in one place:

* All implementations of one case are timed *together*: after a warm-up, each of ``rounds``
  rounds takes one sample of every implementation, in an order that rotates from round to
  round (round r starts at implementation r mod k). A burst of load from another process then
  slows every implementation alike instead of whichever one happened to be running, and no
  implementation always runs right after the same neighbour (whose cache footprint or
  thermal/turbo state it would inherit).
* A sample is ``inner`` back-to-back calls, timed as a whole and divided by ``inner``;
  ``inner`` is calibrated per implementation during warm-up so that a sample lasts about
  ``target_sample_s`` (a single call of a fast op is too short for ``perf_counter`` and the
  Python call overhead to be negligible).
* CPU samples use ``time.perf_counter`` with the garbage collector paused. CUDA samples use
  CUDA events around every call, optionally after zeroing a buffer larger than L2 (so
  every call starts with a cold L2, as ``triton.testing.do_bench`` does); the flush is
  outside the events.
* Each implementation's result is a :class:`Stats`: median, min, max, quartiles over the
  rounds, and ``spread`` = IQR / median. A row whose spread exceeds ``SPREAD_LIMIT`` (10%) is
  ``noisy``: its median is not to be trusted to better than that. When some implementation is
  still noisy after ``rounds`` rounds, up to ``max_rounds`` rounds are taken in total.

Use (from a script in benchmarks/, which has this folder on sys.path)::

    import _timer
    stats = _timer.interleaved({"ours": lambda: f(x), "native": lambda: g(x)}, rounds=7)
    stats["ours"].median, stats["ours"].spread, stats["ours"].noisy   # seconds, IQR/median
    stats["native"].median / stats["ours"].median                     # speedup
    # stats[name].samples[r] is round r's sample: ratios within a round are also meaningful.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch

SPREAD_LIMIT = 0.10


@dataclass
class Stats:
    """Seconds per call of one implementation over the rounds of one case."""
    median: float
    min: float
    max: float
    q1: float
    q3: float
    rounds: int
    inner: int
    samples: List[float] = field(default_factory=list, repr=False)

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median (0.05 = the middle half of the
        rounds lies within 5% of the median's size)."""
        return self.iqr / self.median if self.median > 0 else math.inf

    @property
    def noisy(self) -> bool:
        return self.spread > SPREAD_LIMIT

    def to_dict(self, scale: float = 1.0, samples: bool = False) -> dict:
        """Fields scaled (e.g. 1e6 for microseconds), plus iqr, spread and noisy."""
        d = asdict(self)
        if not samples:
            d.pop("samples")
        else:
            d["samples"] = [s * scale for s in self.samples]
        for k in ("median", "min", "max", "q1", "q3"):
            d[k] *= scale
        d.update(iqr=self.iqr * scale, spread=self.spread, noisy=self.noisy)
        return d


def quartiles(values: Sequence[float]) -> tuple:
    """(q1, median, q3) with linear interpolation between order statistics (the usual
    "inclusive" definition: q1 of [1, 2, 3, 4, 5] is 2, of [1, 2, 3, 4] is 1.75)."""
    if not values:
        raise ValueError("no samples")
    if len(values) == 1:
        v = values[0]
        return v, v, v
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[1], q[2]


def summarize(samples: Sequence[float], inner: int = 1) -> Stats:
    q1, med, q3 = quartiles(list(samples))
    return Stats(median=med, min=min(samples), max=max(samples), q1=q1, q3=q3,
                 rounds=len(samples), inner=inner, samples=list(samples))


def rotation(names: Sequence[str], round_index: int) -> List[str]:
    """The call order of round ``round_index``: the names rotated left by round_index."""
    k = round_index % len(names)
    return list(names[k:]) + list(names[:k])


# ----------------------------------------------------------------------- sample clocks
class _CpuClock:
    def sample(self, fn: Callable[[], object], inner: int) -> float:
        gc_was_enabled = gc.isenabled()
        gc.disable()  # a collection inside a sample would be charged to whoever runs then
        try:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            return (time.perf_counter() - t0) / inner
        finally:
            if gc_was_enabled:
                gc.enable()


class _CudaClock:
    """CUDA events around each call; the optional L2 flush runs between calls, untimed."""

    def __init__(self, device: torch.device, flush_l2: bool):
        self.device = device
        self.flush = None
        if flush_l2:
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0
            self.flush = torch.empty(max(256 * 2**20, 2 * l2), dtype=torch.int8, device=device)

    def sample(self, fn: Callable[[], object], inner: int) -> float:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(inner)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(inner)]
        for s, e in zip(starts, ends):
            if self.flush is not None:
                self.flush.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(self.device)
        return sum(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e-3 / inner


def _clock(device: torch.device, flush_l2: Optional[bool]):
    if device.type == "cuda":
        return _CudaClock(device, flush_l2 if flush_l2 is not None else True)
    return _CpuClock()


# --------------------------------------------------------------------------- the timer
def interleaved(fns: Mapping[str, Callable[[], object]], *, device="cpu",
                rounds: int = 7, max_rounds: Optional[int] = None,
                target_sample_s: float = 0.02, warmup_s: float = 0.05,
                inner: Optional[int] = None, flush_l2: Optional[bool] = None,
                on_call: Optional[Callable[[str], None]] = None) -> Dict[str, Stats]:
    """Time every callable of ``fns`` in interleaved rounds; returns name -> :class:`Stats`
    (seconds per call).

    ``fns``: the implementations of one case, each a no-argument callable doing one call.
    ``rounds``: rounds always taken; ``max_rounds`` (default ``rounds``): while some
    implementation's spread exceeds SPREAD_LIMIT, more rounds are taken up to this total.
    ``target_sample_s``: calibrated duration of one sample (``inner`` calls).
    ``warmup_s``: each implementation is called a few times and for at least this long
    before timing (first-call allocations, lazy init, torch.compile's compile).
    ``inner``: fix the calls per sample instead of calibrating (tests use 1).
    ``on_call``: called with the name before each sample (tests record the order).
    """
    names = list(fns)
    if not names:
        return {}
    device = torch.device(device)
    clock = _clock(device, flush_l2)
    max_rounds = max(rounds, max_rounds or rounds)

    inners: Dict[str, int] = {}
    for name in names:  # warm-up, in the same rotating spirit: every impl before timing any
        fn = fns[name]
        fn()  # the first call may compile or allocate: never timed, never calibrates
        t0, calls = time.perf_counter(), []
        while len(calls) < 3 or time.perf_counter() - t0 < warmup_s:
            calls.append(clock.sample(fn, 1))
        # The median call, not the fastest: calibrating on a lucky call would make every
        # sample far longer than meant whenever the machine is busy.
        per_call = statistics.median(calls)
        inners[name] = inner or max(1, min(10_000, round(target_sample_s / max(per_call, 1e-9))))

    samples: Dict[str, List[float]] = {n: [] for n in names}
    r = 0
    while True:
        for name in rotation(names, r):
            if on_call is not None:
                on_call(name)
            seconds = clock.sample(fns[name], inners[name])
            samples[name].append(seconds)
            if inner is None and seconds * inners[name] > 4 * target_sample_s:
                # Calls got much slower than in warm-up (a busy machine): shorter samples
                # keep the run's duration bounded; the per-call time is unaffected.
                inners[name] = max(1, inners[name] // 2)
        r += 1
        if r < rounds:
            continue
        stats = {n: summarize(samples[n], inners[n]) for n in names}
        if r >= max_rounds or not any(s.noisy for s in stats.values()):
            return stats
