"""NF4 / FP4 blockwise 4-bit quantization, bit-exact with bitsandbytes, in plain PyTorch.

This module is the reference: the default path off-GPU and the oracle the Triton kernels in
``minicustom.kernels`` are tested against.

A weight W is flattened and cut into blocks of ``blocksize`` values (the last block may be partial and
gets its own scale). Per block b:

    absmax_b = max_i |W_i|                               the block's scale
    x_i      = clamp(W_i * (1 / absmax_b), -1, 1)         (the partial block divides: W_i / absmax_b)
    q_i      = index of the code value nearest to x_i     (a tie goes to the lower code)

and two 4-bit indices share a byte, the first element in the high nibble. Dequantization is
``code[q_i] * absmax_b`` in fp32, then cast.

**NF4** (QLoRA, Dettmers et al. 2023, §3) is "normal float": the 16 values are quantiles of N(0, 1),
normalised to [-1, 1], with an exact zero. Eight positive levels are the quantiles at 8 probabilities
evenly spaced from ``offset = 0.9677083`` down to 0.5 (0.5 itself gives the zero); seven negative levels
are the negated quantiles of 7 probabilities from ``offset`` down to 0.5. Dividing by the largest gives
[-1, ..., 0, ..., 1]. :func:`derive_nf4` recomputes them; :data:`NF4` holds the fp32 values bitsandbytes
uses (the derivation agrees to fp32 rounding). The offset 0.9677083 = ((1 - 1/32) + (1 - 1/30)) / 2, the mean
of the outermost probabilities of a 16- and a 15-level grid, keeps the extreme quantile finite.

**FP4** is a 1-sign, 2-exponent, 1-mantissa float (bias 2, no inf/nan); its codes are listed in bit
order and normalised by 12, the largest magnitude.

**Double quantization** (QLoRA §3) stores the fp32 absmax per block as 8 bits: subtract their mean
(``offset``), then quantize blockwise (blocks of 256) against the signed 8-bit "dynamic" map of
bitsandbytes (:func:`dynamic_map`). 64 weights then cost 4*64 + 8 bits plus 32/256 bits for the nested
scale: 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter at blocksize 64.

The 8-bit search copies bitsandbytes' CPU kernel, which does not search the 256 codes directly: it first
maps x in [-1, 1] to one of 65536 grid points, ``trunc(((x + 1) / 2) * 65535 + 0.5)``, and returns the code
nearest to that grid point. A value within half a grid step of a midpoint between two codes can thus get
the farther code; we do the same, so the bytes are identical.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace

import torch

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The fp32 values bitsandbytes uses; derive_nf4() shows where they come from.
NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)

# sign | 2 exponent bits | 1 mantissa bit, in bit order: 0b000 = 0, 0b001 = subnormal 0.0625, then 8, 12, 4, 6, 2, 3
FP4 = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3],
                   dtype=torch.float32) / 12


class QuantError(ValueError):
    """Bad input to quantization or a malformed quantized tensor; the message names what is wrong."""


def derive_nf4(offset: float = 0.9677083) -> torch.Tensor:
    """The NF4 levels from first principles (fp64): normal quantiles at evenly spaced probabilities."""
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return values / values.max()


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (Dettmers 2016): for exponent e = 0..6, 2^e linearly spaced
    fractions in (0.1, 1) scaled by 10^(e-6), both signs, plus 0 and 1; 256 sorted fp32 values."""
    data = []
    for e in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** e + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (e - 6)) * means).tolist() + (-(10 ** (e - 6)) * means).tolist()
    data += [0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


def code_for(quant_type: str) -> torch.Tensor:
    if quant_type not in QUANT_TYPES:
        raise QuantError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    return NF4 if quant_type == "nf4" else FP4


@dataclass
class QuantState:
    """A 4-bit weight: everything needed to rebuild it, in bitsandbytes' layout.

    packed: uint8 (ceil(n/2), 1), two codes per byte, the first in the high nibble.
    absmax: fp32 per block, or uint8 codes into nested_code when double-quantized.
    offset, nested_absmax, nested_code: the double quantization (None without it).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    quant_type: str
    shape: torch.Size
    dtype: torch.dtype
    offset: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE
    _absmax_cache: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    def to(self, device) -> QuantState:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, packed=move(self.packed), absmax=move(self.absmax), code=move(self.code),
                       offset=move(self.offset), nested_absmax=move(self.nested_absmax),
                       nested_code=move(self.nested_code), _absmax_cache=None)

    def tensors(self) -> list[torch.Tensor]:
        """What is stored per weight: packed codes and scales (the code tables are shared)."""
        return [t for t in (self.packed, self.absmax, self.offset, self.nested_absmax) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def bits_per_param(self) -> float:
        """Storage per weight, counting packed codes, scales, offset and nested scales (not the code tables,
        which are shared)."""
        return 8 * self.nbytes() / self.numel

    def block_absmax(self) -> torch.Tensor:
        """The fp32 scale of every block (undoing the double quantization)."""
        if not self.double_quant:
            return self.absmax
        if self._absmax_cache is None or self._absmax_cache.device != self.absmax.device:
            self._absmax_cache = dequantize_blockwise(self.absmax, self.nested_absmax, self.nested_code,
                                                      self.nested_blocksize) + self.offset
        return self._absmax_cache


def _validate_weight(weight: torch.Tensor, blocksize: int, quant_type: str):
    if blocksize not in BLOCKSIZES:
        raise QuantError(f"blocksize {blocksize} is not supported; use one of {BLOCKSIZES}")
    code_for(quant_type)
    if not isinstance(weight, torch.Tensor) or weight.dtype not in FLOAT_DTYPES:
        raise QuantError(f"can only quantize float32/float16/bfloat16 tensors, got "
                         f"{getattr(weight, 'dtype', type(weight).__name__)}")
    if weight.dim() == 0 or weight.numel() == 0:
        raise QuantError(f"cannot pack a tensor of shape {tuple(weight.shape)}: it needs at least one element "
                         "and one dimension")
    if not torch.isfinite(weight).all():
        raise QuantError(f"the weight of shape {tuple(weight.shape)} holds NaN or inf; its block scale would "
                         "poison the whole block")


def _blockwise_scaled(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in [-1, 1], absmax per block) exactly as bitsandbytes' 4-bit quantizer computes them."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)[:, None]), -1, 1).reshape(-1)
    if full < n:  # the partial last block has its own scale, and divides
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    return scaled, absmax


def quantize_4bit_codes(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Nearest code index for each x in [-1, 1]; a value on a midpoint takes the lower code."""
    values, order = torch.sort(code, stable=True)
    midpoints = (values[:-1] + values[1:]) / 2
    return order[torch.bucketize(x, midpoints)].to(torch.uint8)


def pack(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, first in the high nibble; an odd count is padded with code 0's partner."""
    return ((q[0::2] << 4) | q[1::2]).unsqueeze(1)


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of pack: n int64 code indices."""
    packed = packed.reshape(-1)
    return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n].long()


_GRID_LUT: dict[int, torch.Tensor] = {}


def _grid_lut(code: torch.Tensor) -> torch.Tensor:
    """For each of 65536 grid points on [-1, 1], the index of the nearest code (first on ties)."""
    code = code.detach().cpu()  # built once on the CPU, whatever device the tensors live on
    key = hash(code.numpy().tobytes())
    if key not in _GRID_LUT:
        grid = torch.arange(65536, dtype=torch.float64) / 65535 * 2 - 1
        lut = torch.empty(65536, dtype=torch.uint8)
        for i in range(0, 65536, 4096):  # 4096 x 256 distances at a time
            lut[i:i + 4096] = (grid[i:i + 4096, None] - code.double()[None]).abs().argmin(dim=1)
        _GRID_LUT[key] = lut
    return _GRID_LUT[key]


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of a 1-D fp32 tensor as bitsandbytes' CPU kernel does it:
    scale by 1/absmax, snap to the 65536-point grid, look the grid point's nearest code up."""
    n = x.numel()
    pad = -n % blocksize
    blocks = torch.nn.functional.pad(x.float(), (0, pad)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)  # zero padding does not change a block's absmax
    scaled = torch.clamp(blocks * (1.0 / absmax[:, None]), -1, 1)
    grid = (((scaled + 1) * 0.5) * 65535 + 0.5).to(torch.int64)
    # an all-zero block gives 0 * inf = NaN, which the C kernel's float->int conversion turns into grid point 0
    grid = torch.where(absmax[:, None] > 0, grid, 0).reshape(-1)[:n]
    return _grid_lut(code).to(x.device)[grid], absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = q.numel()
    values = torch.nn.functional.pad(code[q.long()], (0, -n % blocksize)).view(-1, blocksize)
    return (values * absmax[:, None]).reshape(-1)[:n]


def quantize(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
             quant_type: str = "nf4") -> QuantState:
    """Quantize a float tensor to 4 bits; identical bytes to bitsandbytes.functional.quantize_4bit
    (compress_statistics=double_quant)."""
    _validate_weight(weight, blocksize, quant_type)
    code = code_for(quant_type).to(weight.device)
    flat = weight.detach().reshape(-1).float()
    scaled, absmax = _blockwise_scaled(flat, blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    packed = pack(quantize_4bit_codes(scaled, code))
    state = QuantState(packed=packed, absmax=absmax, code=code.clone(), blocksize=blocksize, quant_type=quant_type,
                       shape=weight.shape, dtype=weight.dtype)
    if double_quant:
        offset = absmax.mean()
        nested_code = dynamic_map().to(weight.device)
        codes, nested_absmax = quantize_blockwise(absmax - offset, nested_code, NESTED_BLOCKSIZE)
        state = replace(state, absmax=codes, offset=offset, nested_absmax=nested_absmax, nested_code=nested_code)
    return state


def dequantize(state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """code[q] * absmax in fp32, cast to ``dtype`` (default: the original dtype), in the original shape."""
    n = state.numel
    values = state.code[unpack(state.packed, n)]
    scaled = torch.nn.functional.pad(values, (0, -n % state.blocksize)).view(-1, state.blocksize)
    out = (scaled * state.block_absmax()[:, None]).reshape(-1)[:n]
    return out.to(dtype or state.dtype).view(state.shape)


# --- the bitsandbytes serialization that transformers writes ------------------------------------------------

STATE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def to_state_dict(state: QuantState, prefix: str) -> dict[str, torch.Tensor]:
    """``prefix`` is the parameter's name (``...q_proj.weight``); keys as transformers+bitsandbytes save them."""
    meta = {"quant_type": state.quant_type, "blocksize": state.blocksize,
            "dtype": str(state.dtype).removeprefix("torch."), "shape": list(state.shape)}
    out = {prefix: state.packed, f"{prefix}.absmax": state.absmax, f"{prefix}.quant_map": state.code}
    if state.double_quant:
        out[f"{prefix}.nested_absmax"] = state.nested_absmax
        out[f"{prefix}.nested_quant_map"] = state.nested_code.clone()
        meta.update(nested_blocksize=state.nested_blocksize, nested_dtype="float32",
                    nested_offset=state.offset.item())
    out[f"{prefix}.quant_state.bitsandbytes__{state.quant_type}"] = torch.tensor(
        list(json.dumps(meta).encode()), dtype=torch.uint8)
    return out


def quant_state_key(tensors, prefix: str) -> str | None:
    found = [k for k in tensors if k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
    return found[0] if found else None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is no number


def _is_finite_number(v) -> bool:
    try:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:  # an integer beyond any float
        return False


def _read_meta(blob: torch.Tensor, bad) -> dict:
    """The JSON object bitsandbytes stores, as uint8 bytes, in the quant_state tensor."""
    if blob.dtype != torch.uint8 or blob.dim() != 1:
        raise bad(f"must be a 1-D uint8 tensor of JSON bytes, found {blob.dtype} of shape {tuple(blob.shape)}")
    try:
        meta = json.loads(bytes(blob.cpu().numpy()).decode("utf-8"))
    except UnicodeDecodeError as e:
        raise bad(f"is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise bad(f"is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise bad("is not a JSON object")
    missing = [k for k in ("quant_type", "blocksize", "dtype", "shape") if k not in meta]
    if missing:
        raise bad(f"lacks {', '.join(missing)}")
    if not _is_int(meta["blocksize"]) or meta["blocksize"] not in BLOCKSIZES:
        raise bad(f"blocksize {meta['blocksize']!r} is not one of {BLOCKSIZES}")
    if not isinstance(meta["dtype"], str) or getattr(torch, meta["dtype"], None) not in FLOAT_DTYPES:
        raise bad(f"dtype {meta['dtype']!r} is not float32/float16/bfloat16")
    shape = meta["shape"]
    if not isinstance(shape, list) or not shape or not all(_is_int(d) and d > 0 for d in shape):
        raise bad(f"shape {shape!r} is not a non-empty list of positive integers")
    return meta


def from_state_dict(tensors, prefix: str, where: str = "checkpoint") -> QuantState:
    """Rebuild a QuantState from the bitsandbytes keys under ``prefix``; every inconsistency is an error
    naming ``where`` (the file) and the tensor: the JSON's fields, each tensor's dtype and length against
    the shape and block sizes, the code tables, and NaN or Inf in any scale, table or offset (a NaN in an
    unused code gives finite but wrong weights, so finiteness is checked, not inferred from the output)."""
    key = quant_state_key(tensors, prefix)
    if key is None:
        raise QuantError(f"{where}: {prefix} has no quant_state.bitsandbytes__nf4/fp4 entry")

    def bad(msg):
        return QuantError(f"{where}: {key}: {msg}")

    def bad_tensor(suffix, msg):
        return QuantError(f"{where}: {prefix}{suffix and '.' + suffix} {msg}")

    others = [k for k in tensors if k.startswith(f"{prefix}.quant_state.") and k != key]
    if others:
        raise bad(f"{prefix} has a second quant_state entry, {others[0]}")
    meta = _read_meta(tensors[key], bad)
    quant_type = meta["quant_type"]
    if quant_type not in QUANT_TYPES or key.rsplit("__", 1)[1] != quant_type:
        raise bad(f"quant_type {quant_type!r} (expected nf4 or fp4, matching the key)")
    shape, blocksize, dtype = torch.Size(meta["shape"]), meta["blocksize"], getattr(torch, meta["dtype"])
    n = shape.numel()
    blocks = -(-n // blocksize)
    for suffix in ("absmax", "quant_map"):
        if f"{prefix}.{suffix}" not in tensors:
            raise bad_tensor(suffix, "is missing")
    packed, absmax, code = tensors[prefix], tensors[f"{prefix}.absmax"], tensors[f"{prefix}.quant_map"]
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise bad_tensor("", f"holds {packed.numel()} {packed.dtype} values; shape {list(shape)} packs into "
                             f"{(n + 1) // 2} uint8 bytes")
    if code.shape != (16,) or not code.is_floating_point():
        raise bad_tensor("quant_map", f"is {code.dtype} of shape {tuple(code.shape)}; expected 16 floating-point "
                                      "values")
    if not bool(torch.isfinite(code).all()):
        raise bad_tensor("quant_map", "holds NaN or Inf")
    if not torch.equal(code.cpu(), code_for(quant_type).to(code.dtype)):
        # bitsandbytes' GPU kernels use the fixed table of quant_type whatever is stored: another map would
        # give other weights there than here
        raise bad_tensor("quant_map", f"does not hold the {quant_type} code values")
    nested_key = f"{prefix}.nested_absmax"
    double = nested_key in tensors
    if absmax.numel() != blocks or absmax.dtype != (torch.uint8 if double else torch.float32):
        raise bad_tensor("absmax", f"has {absmax.numel()} values ({absmax.dtype}); {n} weights in blocks of "
                                   f"{blocksize} need {blocks} "
                                   + ("uint8 codes (double-quantized, with nested_absmax)" if double else
                                      "float32 scales (without nested_absmax)"))
    if not double:
        if not bool(torch.isfinite(absmax).all()):
            raise bad_tensor("absmax", "holds NaN or Inf")
        return QuantState(packed=packed.reshape(-1, 1), absmax=absmax, code=code.float(), blocksize=blocksize,
                          quant_type=quant_type, shape=shape, dtype=dtype)

    nested, nested_code = tensors[nested_key], tensors.get(f"{prefix}.nested_quant_map")
    nested_bs, offset = meta.get("nested_blocksize"), meta.get("nested_offset")
    if not _is_int(nested_bs) or nested_bs <= 0:
        raise bad(f"nested_blocksize {nested_bs!r} must be a positive integer (a double-quantized state)")
    if not _is_finite_number(offset):
        raise bad(f"nested_offset {offset!r} must be a finite number (a double-quantized state)")
    if meta.get("nested_dtype", "float32") != "float32":
        raise bad(f"nested_dtype {meta['nested_dtype']!r} is not float32, the only one bitsandbytes writes")
    if nested_code is None or nested_code.shape != (256,) or not nested_code.is_floating_point():
        raise bad_tensor("nested_quant_map", "is missing or not 256 floating-point values")
    if not bool(torch.isfinite(nested_code).all()):
        raise bad_tensor("nested_quant_map", "holds NaN or Inf")
    if nested.dtype != torch.float32 or nested.numel() != -(-blocks // nested_bs):
        raise bad_tensor("nested_absmax", f"is {nested.numel()} {nested.dtype} values; {blocks} block scales in "
                                          f"nested blocks of {nested_bs} need {-(-blocks // nested_bs)} float32")
    if not bool(torch.isfinite(nested).all()):
        raise bad_tensor("nested_absmax", "holds NaN or Inf")
    return QuantState(packed=packed.reshape(-1, 1), absmax=absmax, code=code.float(), blocksize=blocksize,
                      quant_type=quant_type, shape=shape, dtype=dtype,
                      offset=torch.tensor(float(offset), dtype=torch.float32), nested_absmax=nested.float(),
                      nested_code=nested_code.float(), nested_blocksize=nested_bs)
