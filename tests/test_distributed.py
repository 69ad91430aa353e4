"""rmsnorm_ext models train under DDP and FSDP2 (fully_shard) like on a single process.

Two worker processes (gloo, CPU) are started as subprocesses of this very file with the
usual torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); each trains the
same tiny model -- torch.nn/HF-style norms swapped by replace_norms, fused residual-add
RMSNorm with an fp32 residual stream, Gemma-style weight_offset, LayerNorm -- on its half of
every batch, first under DDP, then under FSDP2, and saves losses, gradients and final
parameters. The test trains the same model on whole batches in one process and compares.
"""
import os
import sys
import tempfile

import pytest
import torch
from torch import nn

import rmsnorm_ext
from rmsnorm_ext.replace import replace_norms

from _dist_utils import dist_available, run_workers  # tests/ is on sys.path (pytest rootdir, or as a script)

WORLD, DIM, SEQ, BATCH, STEPS, LR = 2, 16, 6, 4, 3, 0.05


pytestmark = pytest.mark.skipif(not dist_available(),
                                reason="torch.distributed with gloo and FSDP2 unavailable")


class HFStyleRMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class Block(nn.Module):
    def __init__(self, i):
        super().__init__()
        # Gemma-style in odd blocks, plain in even ones
        self.norm = rmsnorm_ext.RMSNorm(DIM, eps=1e-6, weight_offset=float(i % 2))
        self.proj = nn.Linear(DIM, DIM)
        self.post = HFStyleRMSNorm(DIM) if i % 2 == 0 else nn.LayerNorm(DIM)

    def forward(self, delta, residual):
        y, residual = rmsnorm_ext.fused_add_rms_norm(
            delta, residual, (DIM,), self.norm.weight, self.norm.eps,
            weight_offset=self.norm.weight_offset)
        return self.post(self.proj(y)), residual


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(DIM, DIM)
        self.blocks = nn.ModuleList(Block(i) for i in range(2))
        self.final = nn.RMSNorm(DIM, eps=1e-6)
        self.out = nn.Linear(DIM, DIM)

    def forward(self, x):
        residual = x.float()  # fp32 residual stream
        delta = self.inp(x)
        for b in self.blocks:
            delta, residual = b(delta, residual)
        return self.out(self.final((residual + delta).to(x.dtype)))


def _model():
    torch.manual_seed(0)
    m = Tiny()
    with torch.no_grad():  # norm weights off their init so they matter
        for mod in m.modules():
            if "norm" in type(mod).__name__.lower() and getattr(mod, "weight", None) is not None:
                mod.weight.add_(0.2 * torch.randn_like(mod.weight))
    n = replace_norms(m)
    assert n == 3, n  # two HF-style/LayerNorm post-norms and the final nn.RMSNorm
    return m


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, SEQ, DIM, generator=g)
    return [(x, torch.tanh(x.flip(-1)))] * STEPS  # one batch, fit for a few steps


def _loss(model, x, t):
    return (model(x) - t).square().mean()


def _train(model, batches, grad_of=lambda p: p.grad):
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    losses, first_grads = [], None
    for x, t in batches:
        opt.zero_grad()
        loss = _loss(model, x, t)
        loss.backward()
        if first_grads is None:
            first_grads = {k: grad_of(p).detach().clone() for k, p in model.named_parameters()}
        opt.step()
        losses.append(loss.detach())
    return losses, first_grads


def _reference():
    model = _model()
    losses, grads = _train(model, _data())
    return ([float(v) for v in losses], grads,
            {k: v.detach().clone() for k, v in model.state_dict().items()})


def _worker(out_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    per = BATCH // world
    local = [(x[rank * per:(rank + 1) * per], t[rank * per:(rank + 1) * per])
             for x, t in _data()]

    def global_losses(losses):
        out = []
        for v in losses:
            v = v.clone()
            dist.all_reduce(v)
            out.append(float(v) / world)
        return out

    results = {}
    # --- DDP ---
    model = _model()
    ddp = DDP(model)
    losses, grads = _train(ddp, local)
    grads = {k.removeprefix("module."): v for k, v in grads.items()}
    results["ddp"] = (global_losses(losses), grads,
                      {k: v.clone() for k, v in model.state_dict().items()})

    # --- FSDP2 ---
    model = _model()
    mesh = init_device_mesh("cpu", (world,))
    for b in model.blocks:
        fully_shard(b, mesh=mesh)
    fully_shard(model, mesh=mesh)

    def full(t):
        return t.full_tensor() if isinstance(t, DTensor) else t

    losses, grads = _train(model, local, grad_of=lambda p: full(p.grad))
    state = {k: full(v).clone() for k, v in model.state_dict().items()}
    results["fsdp2"] = (global_losses(losses), grads, state)
    if rank == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_and_fsdp2_match_single_process():
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "results.pt")
        run_workers(__file__, WORLD, out_path, timeout=120)
        results = torch.load(out_path)

    ref_losses, ref_grads, ref_state = _reference()
    for name in ("ddp", "fsdp2"):
        losses, grads, state = results[name]
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses),
                                   rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} losses: {m}")
        assert grads.keys() == ref_grads.keys(), name
        for k in ref_grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{name} grad {k}: {m}")
        assert state.keys() == ref_state.keys(), name
        for k in ref_state:
            torch.testing.assert_close(state[k], ref_state[k], rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{name} param {k} after {STEPS} steps: {m}")
    assert ref_losses[-1] < ref_losses[0]  # it does train


if __name__ == "__main__":
    _worker(sys.argv[1])
