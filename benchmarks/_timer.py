"""The project's one benchmark timer: interleaved rounds, medians and spreads.

Every benchmark under ``benchmarks/`` times through :func:`interleaved`:

* All implementations of one case are timed *together*: after a warm-up, each of ``rounds``
  rounds takes one sample of every implementation, in an order that rotates from round to
  round (round r starts at implementation r mod k). A burst of load from another process then
  slows every implementation alike, and no implementation always runs right after the same
  neighbour. Ratios taken within a round (:func:`per_round_ratio`) cancel such bursts.
* A sample is ``inner`` back-to-back calls, calibrated in warm-up to last about
  ``target_sample_s``. CPU: ``timeit.Timer(fn).timeit(inner)`` (perf_counter, garbage
  collector paused -- what torch.utils.benchmark.Timer runs underneath; its own ``timeit``
  adds max(inner // 100, 2) warm-up calls to every sample -- it would triple
  model_bench's one-step samples -- and runs on ``num_threads=1`` unless told). CUDA: CUDA
  events around every call, after zeroing a buffer larger than L2 (untimed).
* Each implementation's result is a :class:`Stats`, a torch.utils.benchmark ``Measurement``
  (median, IQR, ``times``) with min, max, quartiles and ``spread`` = IQR / median; above
  ``SPREAD_LIMIT`` (10%) it is ``noisy``, and more rounds are taken, up to ``max_rounds``.

    stats = _timer.interleaved({"ours": lambda: f(x), "native": lambda: g(x)}, rounds=7)
    stats["ours"].median, stats["ours"].spread, stats["native"].samples[r]  # s, IQR/median
"""
from __future__ import annotations

import math
import statistics
import time
import timeit
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch.utils.benchmark import Measurement, TaskSpec

SPREAD_LIMIT = 0.10


class Stats(Measurement):
    """Seconds per call of one implementation over the rounds of one case: ``raw_times[r]``
    is round r's sample of ``number_per_run`` calls; ``samples`` (= ``times``) per call."""

    samples = property(lambda self: self.times)
    inner = property(lambda self: self.number_per_run)
    rounds = property(lambda self: len(self.raw_times))
    min = property(lambda self: min(self.times))
    max = property(lambda self: max(self.times))
    # Linear interpolation, as Measurement's median (q1 of [1, 2, 3, 4] is 1.75).
    q1 = property(lambda self: torch.tensor(self.times, dtype=torch.float64).quantile(.25).item())
    q3 = property(lambda self: torch.tensor(self.times, dtype=torch.float64).quantile(.75).item())

    @property
    def spread(self) -> float:
        """IQR relative to the median (0.05: the middle half of the rounds lies within 5%)."""
        return self.iqr / self.median if self.median > 0 else math.inf

    @property
    def noisy(self) -> bool:
        return self.spread > SPREAD_LIMIT

    def to_dict(self, scale: float = 1.0, samples: bool = False) -> dict:
        """median, min, max, q1, q3, iqr (scaled, e.g. 1e6 for µs), rounds, inner, spread,
        noisy [, samples]."""
        d = {k: getattr(self, k) * scale for k in ("median", "min", "max", "q1", "q3")}
        d.update(rounds=self.rounds, inner=self.inner)
        if samples:
            d["samples"] = [s * scale for s in self.samples]
        d.update(iqr=self.iqr * scale, spread=self.spread, noisy=self.noisy)
        return d


def summarize(samples: Sequence[float], inner: int = 1, name: str = "") -> Stats:
    """Stats of per-call ``samples`` (seconds), each the mean of ``inner`` calls."""
    if not samples:
        raise ValueError("no samples")
    return Stats(number_per_run=inner, raw_times=[s * inner for s in samples],
                 task_spec=TaskSpec(stmt=name, setup="", num_threads=torch.get_num_threads()))


def per_round_ratio(num: Stats, *dens: Stats) -> float:
    """Median over rounds of num / (sum of dens), each taken within one round."""
    return statistics.median(n / sum(d) for n, *d in zip(num.samples, *(x.samples for x in dens)))


def rotation(names: Sequence[str], round_index: int) -> List[str]:
    """The call order of round ``round_index``: the names rotated left by round_index."""
    k = round_index % len(names)
    return list(names[k:]) + list(names[:k])


# ----------------------------------------------------------------------- sample clocks
class _CpuClock:
    def sample(self, fn: Callable[[], object], inner: int) -> float:
        return timeit.Timer(fn).timeit(inner) / inner


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
    """Time every no-argument callable of ``fns`` (one call each) in interleaved rounds;
    returns name -> :class:`Stats` (seconds per call).

    ``rounds`` are always taken; while some spread exceeds SPREAD_LIMIT, more up to
    ``max_rounds`` (default ``rounds``). ``warmup_s``: each implementation is called a few
    times and for at least this long before timing (lazy init, torch.compile's compile).
    ``inner``: fix the calls per sample instead of calibrating (tests use 1). ``on_call``:
    called with the name before each sample (tests record the order).
    """
    names = list(fns)
    if not names:
        return {}
    device = torch.device(device)
    clock = _clock(device, flush_l2)
    max_rounds = max(rounds, max_rounds or rounds)

    inners: Dict[str, int] = {}
    for name in names:  # warm-up: every impl before timing any
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
        # inner may have been halved mid-run: each sample is already per call
        stats = {n: summarize(samples[n], inners[n], n) for n in names}
        if r >= max_rounds or not any(s.noisy for s in stats.values()):
            return stats
