"""rmsnorm_ext under tensor / sequence parallelism (DTensor), like torch's native norms.

Worker processes (gloo on CPU; NCCL when enough GPUs) are started as subprocesses of this
file (tests/_dist_utils.py). They

* call the functional ops (forward and backward, through autograd) on DTensors placed
  Shard(0), Shard(1), Replicate() -- same output/gradient placements as torch's native
  norms, values of the unsharded computation -- and Shard(-1) (right values; DTensor
  redistributes), plus the in-place fused add on local shards and its clear error;
* train a tiny Llama-style model (rmsnorm_ext.RMSNorm everywhere) with the torchtitan TP
  plan, SequenceParallel on the norms, on 2 ranks, and with FSDP2 x TP on a 2x2 mesh on 4
  ranks; loss, gradients and parameters after two steps must equal a single-process run;
* compile the TP model (torch.compile, aot_eager backend) and check its first step.
"""
import os
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rmsnorm_ext

from _dist_utils import REPO, backend, dist_available, run_workers  # tests/ is on sys.path

VOCAB, DIM, HEADS, HIDDEN, LAYERS, BATCH, SEQ, STEPS, LR = 32, 16, 4, 32, 2, 4, 8, 2, 0.05


pytestmark = pytest.mark.skipif(not dist_available(dtensor=True),
                                reason="torch.distributed with gloo, DTensor and FSDP2 unavailable")


# --- a tiny Llama ------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(DIM, DIM, bias=False) for _ in range(4))

    def forward(self, x):
        b, s, _ = x.shape
        hd = DIM // HEADS  # under TP each rank has HEADS / tp heads: view with -1

        def heads(t):
            return t.view(b, s, -1, hd).transpose(1, 2)

        o = F.scaled_dot_product_attention(heads(self.wq(x)), heads(self.wk(x)),
                                           heads(self.wv(x)), is_causal=True)
        return self.wo(o.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Linear(DIM, HIDDEN, bias=False)
        self.w2 = nn.Linear(HIDDEN, DIM, bias=False)
        self.w3 = nn.Linear(DIM, HIDDEN, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, i):
        super().__init__()
        off = float(i % 2)  # Gemma-style 1 + w in odd blocks
        self.attention_norm = rmsnorm_ext.RMSNorm(DIM, eps=1e-6, weight_offset=off)
        self.attention = Attention()
        self.ffn_norm = rmsnorm_ext.RMSNorm(DIM, eps=1e-6, weight_offset=off)
        self.feed_forward = FeedForward()

    def forward(self, x):
        h = x + self.attention(self.attention_norm(x))
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block(i) for i in range(LAYERS))
        self.norm = rmsnorm_ext.RMSNorm(DIM, eps=1e-6)
        self.output = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens):
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))


def _model():
    torch.manual_seed(0)
    m = Llama()
    with torch.no_grad():  # norm weights off their init so they matter
        for mod in m.modules():
            if isinstance(mod, rmsnorm_ext.RMSNorm):
                mod.weight.add_(0.2 * torch.randn_like(mod.weight))
    return m


def _data():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _train(model, tokens, targets, full=lambda t: t):
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    losses, grads = [], None
    for _ in range(STEPS):
        opt.zero_grad()
        logits = model(tokens)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
        loss.backward()
        if grads is None:
            grads = {k: full(p.grad).detach().clone() for k, p in model.named_parameters()}
        opt.step()
        losses.append(loss.detach().clone())
    params = {k: full(p.detach()).clone() for k, p in model.named_parameters()}
    return losses, grads, params


def _tp_plan(model, tp_mesh):
    """torchtitan's Llama plan: SequenceParallel on the norms, attention on local tensors."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                                   RowwiseParallel, SequenceParallel,
                                                   parallelize_module)
    parallelize_module(model, tp_mesh, {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    })
    for block in model.layers:
        parallelize_module(block, tp_mesh, {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(input_layouts=(Shard(1),),
                                            desired_input_layouts=(Replicate(),)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),),
                                               desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            "feed_forward.w3": ColwiseParallel(),
        })
    return model


def _full(t):
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


# --- functional ops on DTensors ------------------------------------------------------------

def _functional_cases(device):
    """(name, fn(x, r, w, b) -> outputs, uses residual, uses bias, native fn or None)."""
    ns = (8,)
    return [
        ("rms_norm", lambda x, r, w, b: (rmsnorm_ext.rms_norm(x, ns, w, 1e-6),), False, False,
         lambda x, r, w, b: (F.rms_norm(x, ns, w, 1e-6),)),
        ("rms_norm_gemma", lambda x, r, w, b: (rmsnorm_ext.rms_norm(x, ns, w, 1e-6,
                                                                    weight_offset=1.0),),
         False, False, None),
        ("rms_norm_no_weight", lambda x, r, w, b: (rmsnorm_ext.rms_norm(x, ns, None, 1e-6),),
         False, False, lambda x, r, w, b: (F.rms_norm(x, ns, None, 1e-6),)),
        ("layer_norm", lambda x, r, w, b: (rmsnorm_ext.layer_norm(x, ns, w, b),), False, True,
         lambda x, r, w, b: (F.layer_norm(x, ns, w, b),)),
        ("layer_norm_no_bias", lambda x, r, w, b: (rmsnorm_ext.layer_norm(x, ns, w, None),),
         False, False, lambda x, r, w, b: (F.layer_norm(x, ns, w, None),)),
        ("fused_add_rms_norm", lambda x, r, w, b: rmsnorm_ext.fused_add_rms_norm(x, r, ns, w,
                                                                                 1e-6),
         True, False, lambda x, r, w, b: (F.rms_norm(x + r, ns, w, 1e-6), x + r)),
        # r as the gate
        ("gated_rms_norm", lambda x, r, w, b: (rmsnorm_ext.gated_rms_norm(
            x, r, ns, w, 1e-6, group_size=4, norm_before_gate=False),), True, False, None),
        # channels-first: x [4, 6, 8] transposed is [B=4, C=8, S=6] (channels_last-dense: the
        # row kernels); .contiguous() makes it NCHW (the strided kernels). x's Shard(1) is a
        # spatial shard there, Shard(-1) a channel shard (redistributed).
        ("layer_norm_2d", lambda x, r, w, b: (rmsnorm_ext.layer_norm_2d(
            x.transpose(1, 2), w, b, 1e-6).transpose(1, 2),), False, True,
         lambda x, r, w, b: (F.layer_norm(x, ns, w, b, 1e-6),)),
        ("rms_norm_2d_nchw", lambda x, r, w, b: (rmsnorm_ext.rms_norm_2d(
            x.transpose(1, 2).contiguous(), w, 1e-6).transpose(1, 2),), False, False,
         lambda x, r, w, b: (F.rms_norm(x, ns, w, 1e-6),)),
        # adaLN: per-sample scale / shift [B=4, 8] from r (sharded with x's batch shard).
        ("layer_norm_modulate", lambda x, r, w, b: (rmsnorm_ext.layer_norm_modulate(
            x, ns, r[:, 0], r[:, 1], w, b),), True, True, None),
        ("rms_norm_modulate_broadcast_scale", lambda x, r, w, b: (rmsnorm_ext.rms_norm_modulate(
            x, ns, w.unsqueeze(0), None, None),), False, False, None),
        # q [B=4, S=6, H=2, D=4] from x, k from r; rotary tables [S, D] from b (no gradient).
        ("qk_norm_rope", lambda x, r, w, b: tuple(o.flatten(-2) for o in rmsnorm_ext.qk_norm_rope(
            x.unflatten(-1, (2, 4)), r.unflatten(-1, (2, 4)), w[:4], w[4:],
            b[:4].cos().unsqueeze(0).expand(6, 4), b[4:].sin().unsqueeze(0).expand(6, 4))),
         True, False, None),
        # ... with [1, S, D] tables (Hugging Face's default position ids): shared by the batch
        ("qk_norm_rope_1sd_tables", lambda x, r, w, b: tuple(
            o.flatten(-2) for o in rmsnorm_ext.qk_norm_rope(
                x.unflatten(-1, (2, 4)), r.unflatten(-1, (2, 4)), w[:4], w[4:],
                b[:4].cos().expand(1, 6, 4), b[4:].sin().expand(1, 6, 4))),
         True, False, None),
    ]


def _check_functional(mesh, device, errors):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    def close(a, b, what):
        try:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        except AssertionError as e:
            errors.append(f"{what}: {e}")

    g = torch.Generator().manual_seed(2)
    x0, r0, go0 = (torch.randn(4, 6, 8, generator=g).to(device) for _ in range(3))
    w0, b0 = (torch.randn(8, generator=g).to(device) for _ in range(2))
    for name, fn, use_r, use_b, native in _functional_cases(device):
        # unsharded reference, through the same autograd
        ref_in = [t.clone().requires_grad_() for t in (x0, r0, w0, b0)]
        ref_out = fn(*ref_in)
        sum(((o * go0).sum() for o in ref_out)).backward()
        for pl in (Shard(0), Shard(1), Replicate(), Shard(-1)):
            what = f"{name} {pl}"
            if name.endswith(("_2d", "_2d_nchw")) and pl == Shard(-1) and device == "cpu":
                # A channel shard is redistributed Shard(1) -> Shard(0 or 2), which torch
                # 2.14's gloo fallback for all-to-all (all-gather + chunk) gets wrong for a
                # [4, 8, 6] tensor even without our ops (x.redistribute(...).full_tensor()
                # != x); NCCL has a real all-to-all. Sharded spatial/batch dims are covered.
                continue

            def dinputs():
                leaves = [t.clone().requires_grad_() for t in (x0, r0, w0, b0)]
                places = [[pl], [pl], [Replicate()], [Replicate()]]
                return [distribute_tensor(t, mesh, p) for t, p in zip(leaves, places)]

            ins = dinputs()
            try:
                outs = fn(*ins)
                dgo = distribute_tensor(go0, mesh, [pl])
                sum(((o * dgo).sum() for o in outs)).backward()
            except Exception as e:  # noqa: BLE001
                errors.append(f"{what}: raised {type(e).__name__}: {e}")
                continue
            for i, (o, ro) in enumerate(zip(outs, ref_out)):
                close(o.full_tensor(), ro.detach(), f"{what} output {i}")
            used = [True, use_r, True, use_b]
            if name == "rms_norm_no_weight":
                used[2] = False
            for i, (t, rt) in enumerate(zip(ins, ref_in)):
                if used[i]:
                    close(t.grad.full_tensor(), rt.grad, f"{what} grad of input {i}")
            if native is None or pl == Shard(-1):
                continue  # torch's native CPU rms_norm fails on a sharded normalized dim
            nins = dinputs()
            nouts = native(*nins)
            sum(((o * dgo).sum() for o in nouts)).backward()
            got = [tuple(o.placements) for o in outs]
            want = [tuple(o.placements) for o in nouts]
            if got != want:
                errors.append(f"{what}: output placements {got}, native {want}")
            got = [tuple(t.grad.placements) for t, u in zip(ins, used) if u]
            want = [tuple(t.grad.placements) for t, u in zip(nins, used) if u]
            if got != want:
                errors.append(f"{what}: gradient placements {got}, native {want}")

    # normalized over two dims with the second sharded: redistributed, right values
    dx = distribute_tensor(x0, mesh, [Shard(1)])
    close(rmsnorm_ext.rms_norm(dx, (6, 8)).full_tensor(), rmsnorm_ext.rms_norm(x0, (6, 8)),
          "rms_norm over (6, 8) of Shard(1)")

    # the bwd ops' bool flags change output shapes: they must be part of DTensor's cache key
    ops = torch.ops.rmsnorm_ext
    dw = distribute_tensor(w0, mesh, [Replicate()])
    _, rstd = ops.rms_norm_fwd(dx, [8], dw, 1e-6, 0.0)
    dgo = distribute_tensor(go0, mesh, [Shard(1)])
    for want_w in (True, False, True):
        gx, gw = ops.rms_norm_bwd(dgo, dx, rstd, dw, [8], 0.0, None, want_w)
        if tuple(gw.shape) != ((8,) if want_w else (0,)) or gw.to_local().shape != gw.shape:
            errors.append(f"rms_norm_bwd compute_weight_grad={want_w}: dweight shape "
                          f"{tuple(gw.shape)}, local {tuple(gw.to_local().shape)}")

    # in place, on the local shards
    for pl in (Shard(0), Shard(1), Replicate()):
        # (distribute_tensor may alias its argument: give it copies)
        dx, dr = (distribute_tensor(t.clone(), mesh, [pl]) for t in (x0, r0))
        with torch.no_grad():
            out, res = rmsnorm_ext.fused_add_rms_norm_(dx, dr, (8,), dw, 1e-6)
        if out is not dx or res is not dr or tuple(dx.placements) != (pl,):
            errors.append(f"fused_add_rms_norm_ {pl}: did not work in place")
        close(dr.full_tensor(), x0 + r0, f"fused_add_rms_norm_ {pl} residual")
        close(dx.full_tensor(), rmsnorm_ext.rms_norm(x0 + r0, (8,), w0, 1e-6),
              f"fused_add_rms_norm_ {pl} output")
    dx, dr = distribute_tensor(x0, mesh, [Shard(-1)]), distribute_tensor(r0, mesh, [Shard(-1)])
    try:
        with torch.no_grad():
            rmsnorm_ext.fused_add_rms_norm_(dx, dr, (8,), dw, 1e-6)
        errors.append("fused_add_rms_norm_ on Shard(-1) did not raise")
    except RuntimeError as e:
        if "leading (non-normalized) dim" not in str(e):
            errors.append(f"fused_add_rms_norm_ on Shard(-1): unclear error {e}")


def _check_missing_api(mesh, device, errors):
    """On a torch without register_sharding, a DTensor reaching our ops gets a clear error.
    Runs before anything registered the rules (they register on first DTensor use)."""
    import torch.distributed.tensor.experimental as exp
    from torch.distributed.tensor import Shard, distribute_tensor
    if rmsnorm_ext.distributed._registered:
        errors.append("sharding rules were registered before the first DTensor use")
        return
    saved = exp.register_sharding
    del exp.register_sharding
    try:
        rmsnorm_ext.rms_norm(distribute_tensor(torch.ones(4, 8, device=device), mesh,
                                               [Shard(0)]), (8,))
        errors.append("no error without register_sharding")
    except RuntimeError as e:
        if "register_sharding" not in str(e) or "torch" not in str(e):
            errors.append(f"unclear error without register_sharding: {e}")
    finally:
        exp.register_sharding = saved


# --- workers ------------------------------------------------------------------------------

def _worker(mode, out_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])
    be = backend(world)
    dist.init_process_group(be)
    rank = dist.get_rank()
    device = "cpu"
    if be == "nccl":
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dev_type = "cuda" if be == "nccl" else "cpu"
    tokens, targets = (t.to(device) for t in _data())
    results = {"backend": be}

    if mode == "tp":
        mesh = init_device_mesh(dev_type, (world,))
        errors = []
        _check_missing_api(mesh, device, errors)
        _check_functional(mesh, device, errors)
        results["functional_errors"] = errors
        model = _tp_plan(_model().to(device), mesh)
        results["train"] = _train(model, tokens, targets, full=_full)
        # torch.compile of the TP model (aot_eager: dynamo + AOTAutograd through DTensor, our
        # sharding rules and fake kernels, without inductor's slow codegen): first step
        compiled = torch.compile(_tp_plan(_model().to(device), mesh), backend="aot_eager",
                                 fullgraph=False)
        logits = compiled(tokens)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
        loss.backward()
        results["compiled"] = (loss.detach(), {k: _full(p.grad) for k, p in
                                               compiled.named_parameters()})
    elif mode == "2d":
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(dev_type, (2, world // 2), mesh_dim_names=("dp", "tp"))
        model = _tp_plan(_model().to(device), mesh["tp"])
        for block in model.layers:
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        dp, per = mesh["dp"].get_local_rank(), BATCH // 2
        losses, grads, params = _train(model, tokens[dp * per:(dp + 1) * per],
                                       targets[dp * per:(dp + 1) * per], full=_full)
        glob = []
        for v in losses:  # every dp rank has the same number of tokens: mean of means
            v = v.clone()
            dist.all_reduce(v, group=mesh["dp"].get_group())
            glob.append(v / 2)
        results["train"] = (glob, grads, params)
    else:
        raise ValueError(mode)
    if rank == 0:
        torch.save(_plain(results), out_path)
    dist.barrier()
    dist.destroy_process_group()


def _plain(obj):
    """Plain CPU tensors (no DTensor, no CUDA) for torch.save/torch.load across processes."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def _run(mode, world):
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "results.pt")
        run_workers(__file__, world, mode, out_path, timeout=240)
        return torch.load(out_path)


def _compare_training(got):
    ref_losses, ref_grads, ref_params = _train(_model(), *_data())
    losses, grads, params = got
    torch.testing.assert_close(torch.stack(list(losses)), torch.stack(ref_losses), rtol=1e-5,
                               atol=0)
    assert grads.keys() == ref_grads.keys()
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"grad {k}: {m}")
    for k in ref_params:
        torch.testing.assert_close(params[k], ref_params[k], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"param {k} after {STEPS} steps: {m}")
    assert ref_losses[-1] < ref_losses[0]  # it does train


def test_tp_sequence_parallel_and_functional_ops_on_dtensors():
    res = _run("tp", 2)
    assert not res["functional_errors"], "\n".join(res["functional_errors"])
    _compare_training(res["train"])
    ref_losses, ref_grads, _ = _train(_model(), *_data())
    loss, grads = res["compiled"]
    torch.testing.assert_close(loss, ref_losses[0], rtol=1e-5, atol=0)
    grads = {k.removeprefix("_orig_mod."): v for k, v in grads.items()}
    assert grads.keys() == ref_grads.keys()
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"compiled grad {k}: {m}")


def test_fsdp2_x_tp_2d_mesh():
    res = _run("2d", 4)
    _compare_training(res["train"])


def test_import_stays_light_and_hook_survives_import_orders():
    """`import rmsnorm_ext` does not import torch.distributed.tensor (~0.5 s); importing it
    (or torch._dynamo, which imports it) afterwards, or before, works and installs the
    DTensor rules; rules are registered on the first DTensor use."""
    code = r"""
import os, sys, torch
import torch.distributed as dist
order = sys.argv[1]
if order == "dtensor_first":
    import torch.distributed.tensor
import rmsnorm_ext
if order == "rmsnorm_first":
    assert "torch.distributed.tensor" not in sys.modules, "import rmsnorm_ext loaded DTensor"
    import torch._dynamo  # imports torch.distributed.tensor: the hook fires inside it
assert rmsnorm_ext.distributed._dispatch_rules_installed
assert not rmsnorm_ext.distributed._registered
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
dist.init_process_group("gloo", rank=0, world_size=1,
                        init_method="tcp://127.0.0.1:" + sys.argv[2])
from torch.distributed.device_mesh import init_device_mesh
mesh = init_device_mesh("cpu", (1,))
x = torch.randn(3, 8)
y = rmsnorm_ext.rms_norm(distribute_tensor(x, mesh, [Replicate()]), (8,))
assert isinstance(y, DTensor) and rmsnorm_ext.distributed._registered
torch.testing.assert_close(y.to_local(), rmsnorm_ext.rms_norm(x, (8,)))
dist.destroy_process_group()
print("ok")
"""
    from _dist_utils import free_port
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    for order in ("rmsnorm_first", "dtensor_first"):
        r = subprocess.run([sys.executable, "-c", code, order, str(free_port())], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "ok" in r.stdout, f"{order}:\n{r.stdout}\n{r.stderr[-4000:]}"


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
