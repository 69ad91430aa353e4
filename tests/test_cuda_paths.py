"""Every kernel path of tests/cuda_paths.py against float64: on cuda when a GPU is present;
always on cpu, which proves the harness itself (its references, tolerances and calls) and
checks the CPU kernels on the same cases, so a broken harness shows without a GPU."""
import pytest
import torch

import cuda_paths

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_every_kernel_path(device):
    failures = cuda_paths.run_all(device, quick=device == "cpu")
    assert cuda_paths.checks > 100
    assert not failures, "\n".join(failures)


def test_script_entry_flags():
    # The entry benchmarks/gpu_check.sh runs under compute-sanitizer: its flags must parse.
    with pytest.raises(SystemExit) as e:
        cuda_paths.main(["--quick", "--help"])
    assert e.value.code == 0
