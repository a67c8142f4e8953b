"""What the Triton kernel tests share: they run on the interpreter (never skipped on CPU), the unit roundoffs
of the float dtypes, and an elementwise bound check that names the worst element."""

import os

import pytest
import torch
import triton.language as tl

# scripts/gpu_check.sh sets TRITON_INTERPRET=0 on a GPU: then the compiled kernels are checked instead
COMPILED = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "0"

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
U = {F32: 2.0**-24, F16: 2.0**-11, BF16: 2.0**-8}  # unit roundoff, eps / 2
U32 = U[F32]
ETA = {dt: torch.finfo(dt).tiny * torch.finfo(dt).eps / 2 for dt in U}  # half the smallest subnormal


def interpreted(test):
    """The kernel tests run on the interpreter (CPU); without it they fail, never skip."""
    if COMPILED:
        return pytest.mark.skip(reason="TRITON_INTERPRET=0: these tests run the interpreter")(test)
    return test


def assert_interpreted(*kernels) -> None:
    """The kernels (and triton.language itself) are the interpreter's, so that a test cannot pass vacuously."""
    if not COMPILED:
        assert all(type(f).__name__ == "InterpretedFunction" for f in (tl.zeros, *kernels)), \
            "triton was imported before TRITON_INTERPRET=1 was set (see tests/conftest.py)"


def within(out, ref, bound, what: str) -> None:
    """|out - ref| <= bound elementwise (bound a float64 tensor of out's shape, or a float), in float64."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (what, out.shape, ref.shape, out.dtype, ref.dtype)
    err = (out.double() - ref.double()).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(err)
    if not (err <= bound).all():
        i = tuple(int(k) for k in torch.unravel_index((err / bound).argmax(), err.shape))
        raise AssertionError(f"{what}: err {err[i]:.3g} > bound {bound[i]:.3g} at {i} ({out[i]} vs {ref[i]}); "
                             f"{int((err > bound).sum())} of {err.numel()} out of bounds, max err / bound "
                             f"{(err / bound).max():.3g}")
