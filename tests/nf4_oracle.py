"""The 4-bit dequantization oracle, written out here instead of taken from bitsandbytes.

bitsandbytes' `quantize_4bit` bytes are the same on every CPU, but its CPU `dequantize_4bit` and
`Linear4bit` forward are not: bitsandbytes 0.50.2 on AVX-512 CPUs decodes block sizes other than 64
(and some double-quantized states) wrongly, off by up to 0.8 for weights of std 0.05. So the tests take
bitsandbytes' *bytes* as the oracle and decode them with the format's definition:

    W[i]      = code[nibble_i] * absmax[i // blocksize]          in fp32, then cast to the stored dtype
    nibble_i  = byte[i // 2] >> 4 if i is even else byte[i // 2] & 0xF   (first element in the high nibble)
    absmax[j] = nested_code[qabsmax[j]] * nested_absmax[j // nested_blocksize] + offset   (double quant)

Each product is one fp32 multiply (and the nested one an fp32 multiply then an add), the same operations
in the same order as minicustom's reference, so the comparison is exact: no tolerance.
"""

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

STATE_KEY = ".quant_state.bitsandbytes__"


def decode_4bit(packed, absmax, code, blocksize, shape, dtype, offset=None, nested_absmax=None,
                nested_code=None, nested_blocksize=256) -> torch.Tensor:
    n = math.prod(shape)
    byte = packed.reshape(-1).to(torch.uint8)
    nibbles = torch.stack([byte >> 4, byte & 0xF], dim=1).reshape(-1)[:n].long()  # (n,)
    if nested_absmax is not None:
        scale = nested_absmax.repeat_interleave(nested_blocksize)[: absmax.numel()]
        block_absmax = nested_code[absmax.long()] * scale + offset
    else:
        block_absmax = absmax.float()
    weight = code[nibbles] * block_absmax.repeat_interleave(blocksize)[:n]
    return weight.to(dtype).reshape(shape)


def decode_bnb_state(packed, state) -> torch.Tensor:
    """The formula applied to what bitsandbytes.functional.quantize_4bit returned."""
    nested = state.state2 if state.nested else None
    return decode_4bit(packed, state.absmax, state.code, state.blocksize, tuple(state.shape), state.dtype,
                       offset=state.offset if nested else None,
                       nested_absmax=nested.absmax if nested else None,
                       nested_code=nested.code if nested else None,
                       nested_blocksize=nested.blocksize if nested else 256)


def decode_checkpoint(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a 4-bit checkpoint folder (transformers+bitsandbytes' serialization) as fp32: the
    quantized weights decoded by the formula, the rest cast."""
    folder = Path(folder)
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    out, consumed = {}, set()
    for key in [k for k in tensors if STATE_KEY in k]:
        prefix = key.split(".quant_state.")[0]
        meta = json.loads(bytes(tensors[key].tolist()).decode())
        out[prefix] = decode_4bit(
            tensors[prefix], tensors[f"{prefix}.absmax"], tensors[f"{prefix}.quant_map"], meta["blocksize"],
            tuple(meta["shape"]), torch.float32,
            offset=meta.get("nested_offset"), nested_absmax=tensors.get(f"{prefix}.nested_absmax"),
            nested_code=tensors.get(f"{prefix}.nested_quant_map"),
            nested_blocksize=meta.get("nested_blocksize", 256))
        consumed |= {key, prefix, *(f"{prefix}.{s}" for s in ("absmax", "quant_map", "nested_absmax",
                                                               "nested_quant_map"))}
    assert out, f"{folder} holds no 4-bit weights"
    out.update({k: t.float() for k, t in tensors.items() if k not in consumed})
    return out


def fp32_transformers_model(folder):
    """A plain fp32 transformers model holding the decoded weights of a 4-bit checkpoint folder: the oracle
    for minicustom's logits that does not run bitsandbytes' 4-bit forward."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(decode_checkpoint(folder), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    assert set(result.missing_keys) <= tied and not result.unexpected_keys, result
    model.tie_weights()
    return model.eval()
