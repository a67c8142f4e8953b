"""The scripts a session runs by hand: the GPU check skips, with a message and exit code 0, where there is
no CUDA GPU (it is run on one when a GPU is lent; see the README's Speed section)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check itself runs here")
def test_gpu_check_skips_without_a_gpu():
    out = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("gpu_check: skipped: no CUDA GPU here"), out.stdout


def test_gpu_check_refuses_an_unknown_check_name():
    out = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "bench-nf4", "step-lroa"], capture_output=True,
                         text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}, timeout=120)
    assert out.returncode == 2 and out.stdout == "", out.stdout + out.stderr
    assert out.stderr.strip().splitlines() == ["gpu_check: no check named 'step-lroa'; the checks: cuda-tests train-kernels "
                                               "bench-nf4 step-lora step-qlora step-lora-bf16 step-qlora-bf16"]
