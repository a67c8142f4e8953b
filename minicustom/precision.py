"""Mixed precision for training: matmuls in bf16 (or fp16 on CUDA), everything that accumulates in fp32.

    forward/backward under torch.autocast(device, bf16):  every matmul (linear, attention, the logits of the
        chunked loss) takes bf16 operands and accumulates in fp32; its output is bf16
    kept in fp32: the trainable weights and AdamW's moments (master weights), the residual stream, the
        norms, the softmax of the loss, the loss itself and its sum over micro-batches
    the frozen base: its matrices are stored in bf16 for the run, so each is cast once rather than at every
        matmul: where that loses nothing (a checkpoint saved in bf16, loaded as fp32, holds only bf16
        numbers), and for the weights only matmuls read, which autocast would round the same way at each
        use (their fp32 originals are kept aside). `run()` puts them back.
    fp16 (CUDA only): the same, plus a gradient scaler (torch.amp.GradScaler) against underflow; bf16 has
        fp32's exponent range and needs none.

`--precision auto` picks, on CUDA, bf16 where the GPU has it, else fp16; on CPU, bf16 only where the CPU
runs bf16 matmuls fast (AVX512-BF16 or AMX, seen in the CPU flags and confirmed by a short matmul probe):
elsewhere bf16 is emulated and about 100x slower than fp32, so auto stays in fp32. The choice comes with
its reason, which the trainer prints.
"""

from __future__ import annotations

import contextlib
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    @property
    def mixed(self) -> bool:
        return self.name != "fp32"


def _cpuinfo(field: str) -> list[str]:
    """The values of `field` in /proc/cpuinfo, one per core; empty where that file is absent."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return [x.partition(":")[2].strip() for x in text.splitlines() if x.startswith(field)]


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo), empty where that file is absent."""
    return set(next(iter(_cpuinfo("flags")), "").split())


def describe_cpu(threads: int | None = None) -> str:
    """The CPU as benchmarks and examples print it: "AMD EPYC, 2 cores (ATen AVX512; bf16 matmul units:
    avx512_bf16), 2 threads, torch 2.13.0+cpu"."""
    names = _cpuinfo("model name")
    units = " ".join(sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"})) or "none"
    return (f"{names[0] if names else platform.processor() or platform.machine()}, {len(names) or '?'} cores (ATen "
            f"{torch.backends.cpu.get_cpu_capability()}; bf16 matmul units: {units}), "
            f"{threads or torch.get_num_threads()} threads, torch {torch.__version__}")


def bf16_matmul_speedup(n: int = 512, repeats: int = 3) -> float:
    """fp32 time / bf16 time of an n x n matmul on this CPU (best of `repeats`): about 2 with AVX512-BF16,
    about 0.01 where bf16 is emulated."""
    a = torch.randn(n, n)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = a.to(dtype)
        x @ x  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            x @ x
            best = min(best, time.perf_counter() - t0)
        times[dtype] = best
    return times[torch.float32] / times[torch.bfloat16]


def resolve(precision: str, device: torch.device | str) -> Precision:
    """The precision to train in, with the reason; refuses fp16 on CPU and bf16 on a GPU without it."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    if precision == "fp32":
        return Precision("fp32", "asked for")
    if cuda:
        has_bf16 = torch.cuda.is_bf16_supported()
        if precision == "bf16" and not has_bf16:
            raise ValueError(f"precision bf16: {torch.cuda.get_device_name(device)} has no bf16; use fp16")
        if precision == "auto":
            return (Precision("bf16", "the GPU supports bf16") if has_bf16 else
                    Precision("fp16", "the GPU has no bf16; fp16 with a gradient scaler"))
        return Precision(precision, "asked for")
    if device.type != "cpu":
        raise ValueError(f"mixed precision is implemented for cpu and cuda, not {device.type}")
    if precision == "fp16":
        raise ValueError("precision fp16 needs CUDA (on CPU use bf16, which needs no gradient scaler)")
    if precision == "bf16":
        return Precision("bf16", "asked for")
    native = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    if not native:
        return Precision("fp32", "the CPU has neither AVX512-BF16 nor AMX, where bf16 matmuls are emulated and "
                                 "far slower than fp32")
    speedup = bf16_matmul_speedup()
    if speedup < 1.2:
        return Precision("fp32", f"the CPU has {' and '.join(native)}, but a bf16 matmul ran only "
                                 f"{speedup:.2f}x as fast as fp32 here")
    return Precision("bf16", f"the CPU has {' and '.join(native)}; a bf16 matmul ran {speedup:.1f}x as fast "
                             "as fp32")


def autocast(precision: Precision, device: torch.device | str):
    """The autocast context of `precision` on `device` (nothing for fp32)."""
    if not precision.mixed:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=precision.dtype)


def compute_dtype(t: torch.Tensor, default: torch.dtype | None = None) -> torch.dtype:
    """The dtype a matmul on `t` runs in: autocast's where it is on for t's device, else `default` or t's
    own. The custom autograd functions (LoRA's product, the 4-bit linear, the chunked loss) cast their operands to
    it themselves, as autocast does for the built-in matmuls."""
    kind = t.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return default or t.dtype


@torch.no_grad()
def store_frozen(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.dtype | torch.Tensor]:
    """Store frozen floating matrices (2-D or more) of `model` in `dtype` for a mixed-precision run: each where
    that is exact (a checkpoint saved in bf16 and loaded as fp32 holds only bf16 numbers), and also, rounded,
    each weight that only matmuls read (a linear's, adapted or not), since autocast rounds it the same way at
    every use: cast once instead of at every forward. The tied embedding (also looked up, in fp32) and a DoRA
    layer's weight (its norm reads W in fp32) stay. Returns what `restore_frozen` needs: {name: the original
    dtype} for an exact move, {name: the original tensor} for a rounded one. Vectors (norms, biases) stay."""
    holders: dict[int, list[nn.Module]] = {}  # a weight -> the modules holding it (two for a tied one)
    for m in model.modules():
        if isinstance(w := getattr(m, "weight", None), nn.Parameter):
            holders.setdefault(id(w), []).append(m)
    matmul_only = {i for i, ms in holders.items()
                   if all((isinstance(m, nn.Linear) or hasattr(m, "base_forward"))
                          and not len(getattr(m, "lora_magnitude_vector", ())) for m in ms)}
    moved = {}
    for name, p in model.named_parameters():
        if p.requires_grad or p.ndim < 2 or not p.is_floating_point() or p.dtype == dtype:
            continue
        low = p.data.to(dtype)
        if torch.equal(low.to(p.dtype), p.data):
            moved[name] = p.dtype
        elif id(p) in matmul_only:
            moved[name] = p.data
        else:
            continue
        p.data = low
    return moved


@torch.no_grad()
def restore_frozen(model: nn.Module, moved: dict[str, torch.dtype | torch.Tensor]) -> None:
    """Undo store_frozen, exactly: an exact move is cast back, a rounded weight gets its original back."""
    for name, p in model.named_parameters():
        if name in moved:
            p.data = moved[name] if torch.is_tensor(moved[name]) else p.data.to(moved[name])
