"""Hugging Face checkpoint folders: config.json + model.safetensors, or shards with an index.

Loading builds the model on the meta device (no memory), then reads the tensors one at a time from
the memory-mapped safetensors files, casts them and assigns them in place of the meta parameters, so
the weights exist once in memory. Every key is accounted for: missing, unexpected and mis-shaped
tensors are all listed in one error instead of leaving random weights behind. Pickle checkpoints
(`pytorch_model.bin`) can run code when loaded, so they are refused unless the caller opts in, and
are then read with `torch.load(weights_only=True)`.

Saving writes the same format back (sharded above `max_shard_size`), each file to a temporary name
first and renamed when complete, with config.json written last.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .model import Transformer


class CheckpointError(ValueError):
    """A checkpoint folder that does not match the model it claims to hold."""


# Keys that old HF checkpoints carry but that hold nothing the model needs (recomputed buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _weight_files(path: Path, allow_pickle: bool) -> list[Path]:
    """The weight files of a checkpoint folder, checking that every listed shard exists."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are not in {path}: {', '.join(missing)}")
        return [path / s for s in shards]
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    pickles = sorted(path.glob("pytorch_model*.bin"))
    if pickles:
        if not allow_pickle:
            raise CheckpointError(
                f"{path} holds only pickle weights ({pickles[0].name}); pickle can run arbitrary code. "
                "Convert them to safetensors, or pass allow_pickle=True to read them with weights_only=True."
            )
        return pickles
    raise CheckpointError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _read_tensors(file: Path):
    """Yield (name, tensor) from one weight file, naming the file in any read error."""
    if file.suffix == ".bin":
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        yield from state.items()
        return
    try:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors file (truncated or corrupt?): {e}") from None


def _load_4bit(model: Transformer, tensors: dict, where: dict, dtype, device) -> set[str]:
    """Swap in a Linear4bit for every weight stored in bitsandbytes' 4-bit serialization (a checkpoint that
    transformers+bitsandbytes saved, or `minicustom quantize` wrote); returns the keys it consumed."""
    from . import nf4
    from .lora import _replace
    from .qlora import Linear4bit

    used = set()
    for key in [k for k in tensors if ".quant_state.bitsandbytes__" in k]:
        prefix = key.split(".quant_state.")[0]  # "model.layers.0.self_attn.q_proj.weight"
        module_name = prefix.removesuffix(".weight")
        try:
            linear = model.get_submodule(module_name)
        except AttributeError:
            raise CheckpointError(f"{where[key]}: {key} names no module of this model") from None
        state = nf4.from_state_dict(tensors, prefix, where=where[key])
        if tuple(state.shape) != (linear.out_features, linear.in_features):
            raise CheckpointError(f"{where[key]}: {prefix} has shape {list(state.shape)}, the model expects "
                                  f"{[linear.out_features, linear.in_features]}")
        bias = tensors.get(module_name + ".bias")
        _replace(model, module_name,
                 Linear4bit(state.to(device), None if bias is None else bias.to(device), compute_dtype=dtype))
        used |= {prefix, key, module_name + ".bias", *(f"{prefix}.{s}" for s in nf4.STATE_SUFFIXES)} & tensors.keys()
    return used


def load_model(path, dtype: torch.dtype = torch.float32, device="cpu", allow_pickle: bool = False,
               quantize: str | None = None) -> Transformer:
    """Load a Hugging Face checkpoint folder into a `Transformer`, weights cast to `dtype` on `device`.

    Weights saved 4-bit by bitsandbytes load as Linear4bit (no bitsandbytes needed), computing in `dtype`;
    `quantize="nf4"` (or "fp4") quantizes every other linear but lm_head after loading."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a checkpoint folder")
    config = ModelConfig.from_file(path)
    files = _weight_files(path, allow_pickle)
    with torch.device("meta"):
        model = Transformer(config)
    tensors, where = {}, {}
    for file in files:
        for name, tensor in _read_tensors(file):
            tensors[name] = tensor
            where[name] = str(file)
    used = _load_4bit(model, tensors, where, dtype, device)
    expected = {k: v for k, v in model.state_dict().items() if k not in used}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    state, unexpected, wrong_shape = {}, [], []
    for name in list(tensors):  # popped as converted: one copy of each weight in memory at a time
        tensor = tensors.pop(name)
        if name in used:
            continue
        file = Path(where[name])
        if name.endswith(_IGNORED_SUFFIXES) or (config.tie_word_embeddings and name == "lm_head.weight"):
            continue  # tied checkpoints sometimes store the shared matrix twice
        if name not in expected:
            unexpected.append(f"{name} (in {file.name})")
        elif tuple(tensor.shape) != tuple(expected[name].shape):
            wrong_shape.append(f"{name}: checkpoint {tuple(tensor.shape)}, model {tuple(expected[name].shape)}"
                               f" (in {file.name})")
        else:
            state[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
    missing = sorted(set(expected) - set(state))
    if missing or unexpected or wrong_shape:
        lines = [f"{path}: the checkpoint does not match the {config.model_type} config"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}): " + "; ".join(shown))
        raise CheckpointError("\n".join(lines))
    missing_ok = used | ({"lm_head.weight"} if config.tie_word_embeddings else set())
    result = model.load_state_dict(state, strict=False, assign=True)
    assert not result.unexpected_keys and set(result.missing_keys) <= missing_ok, result
    model.tie_weights()
    model.inv_freq = config.inv_freq().to(device)  # buffers are not in the checkpoint
    if quantize and used:  # already 4-bit: nothing to do, unless the format asked for is another
        from .qlora import Linear4bit

        stored = {m.state.quant_type for m in model.modules() if isinstance(m, Linear4bit)}
        if stored != {quantize}:
            raise CheckpointError(f"{path}: the checkpoint is already 4-bit ({', '.join(sorted(stored))}); "
                                  f"cannot quantize it to {quantize}")
    elif quantize:
        from .qlora import quantize_model

        quantize_model(model, quant_type=quantize, compute_dtype=dtype)
    return model.eval()


def atomic_write(path: Path, write):
    """Run write(tmp_path) on a temporary file beside path, fsync it, and rename it to path: path is
    never seen half-written, and a crash leaves at most a stray .tmp file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj):
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n"))


def save_model(model: Transformer, path, max_shard_size: int = 4 << 30, dtype: torch.dtype | None = None,
               state: dict[str, torch.Tensor] | None = None):
    """Write `model` as a Hugging Face checkpoint folder (safetensors, sharded above max_shard_size bytes);
    `state` replaces model.state_dict() (a full state gathered from sharded processes, say)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    from .qlora import is_quant_key, quantization_config

    state = {k: v.detach().to(dtype=dtype if dtype and v.is_floating_point() and not is_quant_key(k) else v.dtype)
             .contiguous().cpu() for k, v in (model.state_dict() if state is None else state).items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    shards, size = [{}], 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        atomic_write(path / "model.safetensors", lambda tmp: save_file(shards[0], tmp, metadata=meta))
        (path / "model.safetensors.index.json").unlink(missing_ok=True)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            atomic_write(path / name, lambda tmp, shard=shard: save_file(shard, tmp, metadata=meta))
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_json(path / "model.safetensors.index.json", index)
        (path / "model.safetensors").unlink(missing_ok=True)
    config = model.config.to_dict()
    first = next(v for k, v in state.items() if v.is_floating_point() and not is_quant_key(k))
    config["torch_dtype"] = str(first.dtype).removeprefix("torch.")
    if quant := quantization_config(model):
        config["quantization_config"] = quant
    write_json(path / "config.json", config)
    return path
