"""NF4 on the GPU: minicustom's Triton kernels vs bitsandbytes' CUDA kernels and 16-bit F.linear.

(a) Dequantization throughput on Llama-3-8B weight shapes (out x in: q/o 4096x4096, down 4096x14336,
    gate/up 14336x4096, k/v 1024x4096), NF4, blocksize 64, double quantization, to fp16 and bf16.
    GB/s counts the bytes the kernel must move: read packed codes (n/2) + 8-bit absmax codes (n/64) +
    fp32 nested absmax (4 n/16384), write n * 2; the 16-entry code tables and the offset are left out.
    % of peak is against --peak-gbps (default 3350, H100 SXM HBM3; H100 PCIe 2000, H200 4800, A100 80GB 2039).
(b) y = x @ W.T for M = 1 and 16 tokens: the fused dequant+matmul kernel, our dequant then F.linear,
    bitsandbytes.matmul_4bit (its gemv_4bit kernel at M = 1), and F.linear on the 16-bit weight.

Times are CUDA-event times of single launches with the L2 cache flushed before each (a 256 MiB write, as
triton.testing.do_bench does), after a warm-up; the implementations are interleaved run by run and the
median of --repeats runs is reported. Before timing, the kernels are checked on the GPU against the
PyTorch reference: dequantization bit-exact (torch.equal; max ulp printed for fp16/bf16), linear within
the bound derived in tests/test_kernels.py.

    python benchmarks/bench_nf4.py [--peak-gbps 3350] [--repeats 25] [--sweep] [--check-only]

Exit codes: 0 done, 1 a check failed, 2 no CUDA GPU.
"""

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from minicustom.kernels import nf4_dequant, nf4_matmul

from minicustom import nf4

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (1024, 4096)]  # (N out, K in)
NAMES = {(4096, 4096): "q/o 4096x4096", (4096, 14336): "down 4096x14336", (14336, 4096): "gate/up 14336x4096",
         (1024, 4096): "k/v 1024x4096"}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
U = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
DEVICE = "cuda"


class Timer:
    """Median CUDA-event time (seconds) of fn(), each run after an L2 flush; call .run(fns) to interleave."""

    def __init__(self, repeats: int):
        self.repeats = repeats
        self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device=DEVICE)

    def once(self, fn) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.flush.zero_()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3

    def run(self, fns: dict) -> dict:
        for fn in fns.values():  # warm-up: compile, autotune caches, cuBLAS heuristics
            for _ in range(3):
                fn()
        times = {name: [] for name in fns}
        for _ in range(self.repeats):
            for name, fn in fns.items():
                times[name].append(self.once(fn))
        return {name: statistics.median(t) for name, t in times.items()}


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between same-dtype float tensors (0 and -0 are equal)."""
    ints = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]

    def key(t):
        i = t.view(ints).long()
        return torch.where(i < 0, -(i & (2 ** (8 * t.element_size() - 1) - 1)), i)

    return int((key(a) - key(b)).abs().max().item()) if a.numel() else 0


def randn(shape, seed=0, scale=1.0, dtype=torch.float32):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return (torch.randn(shape, generator=g, device=DEVICE) * scale).to(dtype)


def check() -> bool:
    """The compiled kernels against the reference, on the GPU; prints one line per kind of check."""
    ok, worst = True, {dtype: 0 for dtype in U}
    cases = 0
    for i, shape in enumerate([(33, 70), (5, 7, 9), (1, 4097), (128, 96), (1024, 4096)]):
        for quant_type in nf4.QUANT_TYPES:
            for double_quant in (True, False):
                for blocksize in (32, 64, 256, 4096):
                    w = randn(shape, i) * torch.exp(2 * randn(shape, i + 99))  # blocks of very different scales
                    state = nf4.quantize(w, blocksize, double_quant, quant_type)
                    for dtype in U:
                        ours, ref = nf4_dequant.dequantize(state, dtype), nf4.dequantize(state, dtype)
                        worst[dtype] = max(worst[dtype], ulps(ours, ref))
                        cases += 1
    exact = all(v == 0 for v in worst.values())
    ok &= exact
    print(f"check dequant vs minicustom.nf4.dequantize, {cases} cases: "
          + ("bit-exact (torch.equal) in fp32, fp16, bf16" if exact else
             "NOT EXACT, max ulp " + ", ".join(f"{str(k)[6:]} {v}" for k, v in worst.items())))
    ratio = 0.0
    for (N, K) in [(33, 70), (100, 257), (4096, 4096), (1024, 4096)]:
        state = nf4.quantize(randn((N, K), N, 0.02), 64)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for M in (1, 3, 16, 64, 100):
                x, bias = randn((M, K), M, dtype=dtype), randn((N,), 7, dtype=dtype)
                y = nf4_matmul.linear(x, state, bias).double()
                wq = nf4.dequantize(state, dtype).double()
                ref = x.double() @ wq.T + bias.double()
                S = x.double().abs() @ wq.abs().T + bias.double().abs()
                tol = U[dtype] * ref.abs() + 2 * (K + 1) * 2.0**-24 * S + torch.finfo(dtype).tiny
                ratio = max(ratio, ((y - ref).abs() / tol).max().item())
    ok &= ratio <= 1
    print(f"check linear vs x.double() @ dequantize(state, x.dtype).T: max err / bound {ratio:.3f} "
          + ("(within)" if ratio <= 1 else "EXCEEDS THE BOUND"))
    bnb = try_bitsandbytes()
    if bnb is not None:
        state = nf4.quantize(randn((1024, 4096), 0, 0.02, torch.float16), 64)
        same = torch.equal(nf4_dequant.dequantize(state), bnb.functional.dequantize_4bit(state.packed, bnb_state(bnb, state)))
        print(f"check dequant vs bitsandbytes.functional.dequantize_4bit (CUDA) on the same state: "
              f"{'identical' if same else 'DIFFERENT'}")
    return ok


def try_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as e:
        print(f"# bitsandbytes not importable ({e}); measuring minicustom only")
        return None
    return bitsandbytes


def works(fn, name) -> bool:
    """Call fn once; an API change in bitsandbytes must not sink the rest of the benchmark."""
    try:
        fn()
        return True
    except Exception as e:
        print(f"# {name} failed ({type(e).__name__}: {str(e)[:200]}); skipped")
        return False


def bnb_state(bnb, s: nf4.QuantState):
    """bitsandbytes' QuantState for the same bytes (minicustom's layout is bitsandbytes')."""
    state2 = None
    if s.double_quant:
        state2 = bnb.functional.QuantState(absmax=s.nested_absmax, code=s.nested_code, blocksize=s.nested_blocksize,
                                           dtype=torch.float32)
    return bnb.functional.QuantState(absmax=s.absmax, shape=s.shape, code=s.code, blocksize=s.blocksize,
                                     quant_type=s.quant_type, dtype=s.dtype, offset=s.offset, state2=state2)


def dequant_row(timer, bnb, shape, dname, dtype, peak):
    state = nf4.quantize(randn(shape, 0, 0.02, dtype), 64)
    moved = state.packed.numel() + state.absmax.numel() + 4 * state.nested_absmax.numel() + 2 * state.numel
    out = torch.empty(shape, dtype=dtype, device=DEVICE)
    fns = {"ours": lambda: nf4_dequant.dequantize(state, dtype, out=out)}
    if bnb is not None:
        qs, out_b = bnb_state(bnb, state), torch.empty(shape, dtype=dtype, device=DEVICE)
        fns["bnb"] = lambda: bnb.functional.dequantize_4bit(state.packed, qs, out=out_b)
        if not works(fns["bnb"], "dequantize_4bit(out=...)"):  # allocating is cheap next to the kernel
            fns["bnb"] = lambda: bnb.functional.dequantize_4bit(state.packed, qs)
    t = timer.run(fns)
    cells = [NAMES[shape], dname]
    for name in ("ours", "bnb"):
        gbps = moved / t[name] / 1e9 if name in t else None
        cells += [f"{t[name] * 1e6:.1f}", f"{gbps:,.0f}", f"{100 * gbps / peak:.0f}%"] if gbps else ["-"] * 3
    cells.append(f"{t['bnb'] / t['ours']:.2f}x" if "bnb" in t else "-")
    print("| " + " | ".join(cells) + " |", flush=True)


def bench_dequant(timer, bnb, peak):
    print("\n## (a) dequantize, NF4 blocksize 64 + double quant\n")
    print("| weight | dtype | minicustom µs | GB/s | % peak | bitsandbytes µs | GB/s | % peak | speedup vs bnb |")
    print("|---" * 9 + "|")
    for shape in SHAPES:
        for dname, dtype in DTYPES.items():
            dequant_row(timer, bnb, shape, dname, dtype, peak)


def linear_row(timer, bnb, shape, dname, dtype, M, peak, sweep):
    """One table row; returns the sweep's best 3 (time, config) or None."""
    w16 = randn(shape, 0, 0.02, dtype)
    state = nf4.quantize(w16, 64)
    x = randn((M, shape[1]), 1, dtype=dtype)
    fns = {"fused": lambda: nf4_matmul.linear(x, state),
           "dequant+F.linear": lambda: F.linear(x, nf4_dequant.dequantize(state, dtype)),
           "F.linear 16-bit": lambda: F.linear(x, w16)}
    if bnb is not None:
        qs = bnb_state(bnb, state)
        fns["bnb.matmul_4bit"] = lambda: bnb.matmul_4bit(x, state.packed.t(), quant_state=qs)
        if not works(fns["bnb.matmul_4bit"], "bnb.matmul_4bit"):
            del fns["bnb.matmul_4bit"]
    t = timer.run(fns)
    gbps = state.nbytes() / t["fused"] / 1e9
    cols = ["fused", "dequant+F.linear", "F.linear 16-bit"] + (["bnb.matmul_4bit"] if bnb is not None else [])
    print(f"| {NAMES[shape]} | {dname} | {M} | " + " | ".join(f"{t[c] * 1e6:.1f}" if c in t else "-" for c in cols)
          + f" | {gbps:,.0f} ({100 * gbps / peak:.0f}%) | {t['F.linear 16-bit'] / t['fused']:.2f}x |", flush=True)
    if not sweep:
        return None
    configs = {(bn, bk, nw, sk): (lambda bn=bn, bk=bk, nw=nw, sk=sk: nf4_matmul.linear(
        x, state, block_n=bn, block_k=bk, num_warps=nw, split_k=sk))
        for bn in (16, 32, 64) for bk in (128, 256) for nw in (4, 8) for sk in (None, 1, 2, 4, 8)}
    return sorted(((v, k) for k, v in timer.run(configs).items()), key=lambda vk: vk[0])[:3]


def bench_linear(timer, bnb, peak, sweep):
    print("\n## (b) y = x @ W.T, W in NF4 (blocksize 64, double quant): µs; GB/s of 4-bit weight read by the "
          "fused kernel\n")
    cols = ["fused", "dequant+F.linear", "F.linear 16-bit"] + (["bnb.matmul_4bit"] if bnb is not None else [])
    print("| weight | dtype | M | " + " | ".join(f"{c} µs" for c in cols) + " | fused GB/s (% peak) | "
          "fused vs 16-bit |")
    print("|---" * (len(cols) + 5) + "|")
    best = {}
    for shape in SHAPES:
        for dname, dtype in DTYPES.items():
            for M in (1, 16):
                top = linear_row(timer, bnb, shape, dname, dtype, M, peak, sweep and dname == "bf16")
                if top:
                    best[(shape, M)] = top
    if sweep:
        print("\n## fused kernel sweep (bf16): best 3 (block_n, block_k, num_warps, split_k), µs; default "
              "(32, 128, 4, None = from the SM count)\n")
        for (shape, M), top in best.items():
            print(f"- {NAMES[shape]}, M={M}: " + ", ".join(f"{k} {v * 1e6:.1f}" for v, k in top))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak-gbps", type=float, default=3350.0,
                        help="the GPU's peak memory bandwidth in GB/s (default 3350, H100 SXM)")
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--sweep", action="store_true", help="also time tile configurations of the fused kernel")
    parser.add_argument("--check-only", action="store_true", help="only check the kernels against the reference")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_nf4: needs a CUDA GPU (torch.cuda.is_available() is False)")
        sys.exit(2)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("bench_nf4: TRITON_INTERPRET=1 is set; unset it to run the compiled kernels")
        sys.exit(2)
    import triton

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"peak {args.peak_gbps:,.0f} GB/s, median of {args.repeats}")
    ok = check()
    if args.check_only or not ok:
        sys.exit(0 if ok else 1)
    bnb = try_bitsandbytes()
    if bnb is not None:
        print(f"# bitsandbytes {bnb.__version__}")
    timer = Timer(args.repeats)
    with torch.inference_mode():
        bench_dequant(timer, bnb, args.peak_gbps)
        bench_linear(timer, bnb, args.peak_gbps, args.sweep)


if __name__ == "__main__":
    main()
