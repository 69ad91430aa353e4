"""The same bad call on cpu, meta (and cuda when there is one) must raise the same exception
type with the same message (device names aside): the host functions are one check for every
device (csrc/host/checks.h), and meta is what torch.compile's fake tensors run."""
import re

import pytest
import torch


def devices():
    return ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])


def assert_same_errors(call):
    """call(device) must raise on every device; returns the cpu (type, first line)."""
    got = {}
    for d in devices():
        with pytest.raises(Exception) as ei:
            call(d)
        first = str(ei.value).split("\n")[0]
        got[d] = (ei.type, re.sub(r"\b(cuda(:\d+)?|cpu|meta)\b", "<dev>", first))
    cpu = got["cpu"]
    assert "rmsnorm_ext" in cpu[1], cpu
    assert all(v == cpu for v in got.values()), got
    return cpu
