"""Helpers for the multi-process tests: start N worker processes of a test file with the
torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK)."""
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dist_available(dtensor=False):
    """gloo and FSDP2 (and, with dtensor=True, DTensor's register_sharding and tensor
    parallelism) are available in this torch build."""
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        return False
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
        if dtensor:
            from torch.distributed.tensor.experimental import register_sharding  # noqa: F401
            from torch.distributed.tensor.parallel import parallelize_module  # noqa: F401
    except ImportError:
        return False
    return True


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend(world):
    """NCCL when there is a GPU per rank (set RMSNORM_EXT_DIST_CPU=1 to force gloo)."""
    import torch
    if (os.environ.get("RMSNORM_EXT_DIST_CPU") != "1" and torch.cuda.is_available() and
            torch.cuda.device_count() >= world):
        return "nccl"
    return "gloo"


def run_workers(script, world, *args, timeout=240):
    """Run `python script *args` as `world` ranks; fail with the failing rank's log.

    A run in which a rank aborted with libstdc++'s "terminate called without an active
    exception" (seen once in CI, in a gloo rank under load; never reproduced in 11 local
    runs) is repeated once, with a warning; the same abort twice fails."""
    for attempt in range(2):
        logs, procs = _run_once(script, world, args, timeout)
        aborted = [r for r, p in enumerate(procs)
                   if p.returncode == -6 and "terminate called without an active exception"
                   in logs[r]]
        if not aborted or attempt:
            break
        import warnings
        warnings.warn(f"ranks {aborted} aborted (terminate without an active exception); "
                      "running the workers once more")
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed (rc {p.returncode}):\n{log[-6000:]}"
    return logs


def _run_once(script, world, args, timeout):
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, os.path.abspath(script), *map(str, args)],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            logs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return logs, procs
