"""One set of rules on every device: each bad call raises the same exception type with the
same message (device names aside) on cpu, meta (the fake kernels torch.compile traces with)
and cuda when present. One C++ host function per op (csrc/host/, checks in csrc/host/checks.h
and the op's own file) serves all three: meta is registered to it too, so there is no
Python twin to drift; this matrix checks that it stays so."""
import re

import pytest
import torch

import rmsnorm_ext as R

ops = torch.ops.rmsnorm_ext
DEVICES = ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])


def _other(dev):
    return "cpu" if dev != "cpu" else "meta"


def _t(dev, *shape, dtype=torch.float32):
    return torch.ones(*shape, dtype=dtype, device=dev)


F32, F64, BF16, I32 = torch.float32, torch.float64, torch.bfloat16, torch.int32


def _rms_bwd(d, g=None, x=None, rstd=None, w=None, ns=(8,), off=0.0, gres=None):
    x = _t(d, 4, 8) if x is None else x
    g = _t(d, 4, 8) if g is None else g
    rstd = _t(d, 4) if rstd is None else rstd
    return ops.rms_norm_bwd(g, x, rstd, w, list(ns), off, gres, True)


def _ln_bwd(d, g=None, x=None, mean=None, rstd=None, w=None, ns=(8,)):
    x = _t(d, 4, 8) if x is None else x
    g = _t(d, 4, 8) if g is None else g
    mean = _t(d, 4) if mean is None else mean
    rstd = _t(d, 4) if rstd is None else rstd
    return ops.layer_norm_bwd(g, x, mean, rstd, w, list(ns), True, True)


def _inplace(d, x, r, **kw):
    with torch.no_grad():
        return R.fused_add_rms_norm_(x, r, (x.shape[-1],), **kw)


CASES = {
    # every forward entry: input, normalized_shape, parameters, eps, offset
    "rms int input": lambda d: R.rms_norm(_t(d, 4, 8, dtype=I32), (8,), eps=1e-6),
    "rms shape mismatch": lambda d: R.rms_norm(_t(d, 4, 8), (4,)),
    "rms shape too long": lambda d: R.rms_norm(_t(d, 4, 8), (2, 4, 8)),
    "rms shape empty": lambda d: R.rms_norm(_t(d, 4, 8), ()),
    "rms weight shape": lambda d: R.rms_norm(_t(d, 4, 8), (8,), _t(d, 7)),
    # (a weight of another floating dtype is converted, as F.rms_norm takes it)
    "rms weight dtype": lambda d: R.rms_norm(_t(d, 4, 8), (8,), _t(d, 8, dtype=I32)),
    "rms int weight, bf16 input": lambda d: R.rms_norm(_t(d, 4, 8, dtype=BF16), (8,),
                                                       _t(d, 8, dtype=I32)),
    "rms weight device": lambda d: R.rms_norm(_t(d, 4, 8), (8,), _t(_other(d), 8)),
    "rms eps negative": lambda d: R.rms_norm(_t(d, 4, 8), (8,), None, -1.0),
    "rms eps nan": lambda d: R.rms_norm(_t(d, 4, 8), (8,), None, float("nan")),
    "rms offset inf": lambda d: R.rms_norm(_t(d, 4, 8), (8,), _t(d, 8), weight_offset=float("inf")),
    "rms offset on empty input": lambda d: R.rms_norm(_t(d, 0, 8), (8,), _t(d, 8),
                                                      weight_offset=float("nan")),
    "ln weight/bias dtypes": lambda d: R.layer_norm(_t(d, 4, 8, dtype=BF16), (8,), _t(d, 8),
                                                    _t(d, 8, dtype=BF16)),
    "ln weight/bias dtypes, no rows": lambda d: R.layer_norm(_t(d, 0, 8, dtype=BF16), (8,),
                                                             _t(d, 8), _t(d, 8, dtype=BF16)),
    "ln bias shape": lambda d: R.layer_norm(_t(d, 4, 8), (8,), _t(d, 8), _t(d, 4)),
    "ln bias device": lambda d: R.layer_norm(_t(d, 4, 8), (8,), None, _t(_other(d), 8)),
    "ln eps negative": lambda d: R.layer_norm(_t(d, 4, 8), (8,), None, None, -1e-5),
    "fused residual shape": lambda d: R.fused_add_rms_norm(_t(d, 4, 8), _t(d, 3, 8), (8,)),
    "fused residual dtype": lambda d: R.fused_add_rms_norm(_t(d, 4, 8), _t(d, 4, 8, dtype=F64),
                                                           (8,), eps=1e-6),
    "fused residual device": lambda d: R.fused_add_rms_norm(_t(d, 4, 8), _t(_other(d), 4, 8),
                                                            (8,), eps=1e-6),
    "fused offset nan": lambda d: R.fused_add_rms_norm(_t(d, 4, 8), _t(d, 4, 8), (8,),
                                                       weight_offset=float("nan")),
    "fused weight shape": lambda d: R.fused_add_rms_norm(_t(d, 4, 8), _t(d, 4, 8), (8,), _t(d, 9)),
    # the in-place op: what it refuses to write
    "inplace same tensor": lambda d: (lambda b: _inplace(d, b, b))(_t(d, 4, 8)),
    "inplace overlapping views": lambda d: (lambda b: _inplace(d, b[:3], b[1:]))(_t(d, 4, 8)),
    "inplace transposed self": lambda d: (lambda b: _inplace(d, b, b.t()))(_t(d, 8, 8)),
    "inplace expanded input": lambda d: _inplace(d, _t(d, 1, 8).expand(4, 8), _t(d, 4, 8)),
    "inplace expanded residual": lambda d: _inplace(d, _t(d, 4, 8), _t(d, 8).expand(4, 8)),
    "inplace residual dtype": lambda d: _inplace(d, _t(d, 4, 8), _t(d, 4, 8, dtype=F64), eps=1e-6),
    # backward ops, called directly
    "rms_bwd grad shape": lambda d: _rms_bwd(d, g=_t(d, 3, 8)),
    "rms_bwd grad dtype": lambda d: _rms_bwd(d, g=_t(d, 4, 8, dtype=F64)),
    "rms_bwd grad device": lambda d: _rms_bwd(d, g=_t(_other(d), 4, 8)),
    "rms_bwd rstd count": lambda d: _rms_bwd(d, rstd=_t(d, 3)),
    "rms_bwd rstd dtype": lambda d: _rms_bwd(d, rstd=_t(d, 4, dtype=F64)),
    "rms_bwd rstd device": lambda d: _rms_bwd(d, rstd=_t(_other(d), 4)),
    "rms_bwd weight dtype": lambda d: _rms_bwd(d, w=_t(d, 8, dtype=BF16)),
    "rms_bwd offset": lambda d: _rms_bwd(d, off=float("-inf")),
    "rms_bwd grad_residual shape": lambda d: _rms_bwd(d, gres=_t(d, 3, 8)),
    "rms_bwd grad_residual dtype": lambda d: _rms_bwd(d, gres=_t(d, 4, 8, dtype=F64)),
    "rms_bwd grad_residual device": lambda d: _rms_bwd(d, gres=_t(_other(d), 4, 8)),
    "ln_bwd grad dtype": lambda d: _ln_bwd(d, x=_t(d, 4, 8), g=_t(d, 4, 8, dtype=BF16)),
    "ln_bwd mean dtype": lambda d: _ln_bwd(d, mean=_t(d, 4, dtype=F64)),
    "ln_bwd rstd count": lambda d: _ln_bwd(d, rstd=_t(d, 5)),
    "ln_bwd weight shape": lambda d: _ln_bwd(d, w=_t(d, 4)),
}


def _outcome(case, dev):
    try:
        CASES[case](dev)
    except Exception as e:  # noqa: BLE001 -- the type is what is compared
        msg = str(e).split("\n")[0]
        # Device names differ by construction; everything else must not.
        msg = re.sub(r"\b(cuda(:\d+)?|cpu|meta)\b", "<dev>", msg)
        return type(e), msg
    return None, "no error"


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_error_on_every_device(case):
    outcomes = {dev: _outcome(case, dev) for dev in DEVICES}
    first = outcomes[DEVICES[0]]
    assert first[0] is not None, f"{case}: accepted on {DEVICES[0]}"
    assert "rmsnorm_ext" in first[1], f"{case}: the message does not say who raised it: {first}"
    for dev, got in outcomes.items():
        assert got == first, f"{case}: {DEVICES[0]} raised {first}, {dev} raised {got}"
