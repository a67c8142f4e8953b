"""What the Triton kernel tests share: they run on the interpreter (never skipped on CPU), the unit roundoffs
of the float dtypes, and an elementwise bound check that names the worst element.

On a GPU with TRITON_INTERPRET=0 (scripts/gpu_check.sh) the training kernels' tests run compiled instead:
`compiled_on_cuda` swaps each kernel entry point for one that runs it on CUDA copies of its CPU inputs and
hands its outputs back to the CPU, differentiably, so the same inputs, twins (on the CPU) and bounds check
the compiled kernels. The NF4 kernel tests have CUDA tests of their own and skip the interpreted ones there."""

import contextlib
import functools
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
    """The kernels (and triton.language itself) are the interpreter's, so that a test cannot pass vacuously;
    under COMPILED, the kernels are compiled ones."""
    if COMPILED:
        assert all(type(f).__name__ == "JITFunction" for f in kernels), [type(f).__name__ for f in kernels]
    else:
        assert all(type(f).__name__ == "InterpretedFunction" for f in (tl.zeros, *kernels)), \
            "triton was imported before TRITON_INTERPRET=1 was set (see tests/conftest.py)"


def to_device(t, device):
    """t on `device` with t's own strides (a column slice keeps its row padding), differentiable back to t;
    anything but a tensor as it is."""
    if not isinstance(t, torch.Tensor):
        return t
    if t.numel() == 0 or t.is_contiguous() or 0 in t.stride():  # (an expanded tensor: made dense)
        return t.to(device)
    span = t.storage_offset() + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) + 1
    buffer = torch.zeros(span, dtype=t.dtype, device=device)
    return buffer.as_strided(t.shape, t.stride(), t.storage_offset()).copy_(t)


def on_cuda(fn):
    """fn run on CUDA copies of its tensor arguments (CPU autocast carried over as CUDA autocast), its tensor
    results back on the CPU."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        args = [to_device(a, "cuda") for a in args]
        kwargs = {k: to_device(v, "cuda") for k, v in kwargs.items()}
        amp = (torch.autocast("cuda", dtype=torch.get_autocast_dtype("cpu")) if torch.is_autocast_enabled("cpu")
               else contextlib.nullcontext())
        with amp:
            out = fn(*args, **kwargs)
        return tuple(to_device(o, "cpu") for o in out) if isinstance(out, tuple) else to_device(out, "cpu")
    return run


def compiled_on_cuda(*entries):
    """An autouse fixture for a kernel test module: under COMPILED, each (module, name) entry point runs on
    CUDA (`on_cuda`) for the test; on the interpreter, nothing changes."""
    @pytest.fixture(autouse=True)
    def fixture(monkeypatch):
        if COMPILED:
            for module, name in entries:
                monkeypatch.setattr(module, name, on_cuda(getattr(module, name)))
        yield
    return fixture


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
