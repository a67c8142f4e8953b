"""Hugging Face checkpoint folders: config.json + model.safetensors, or shards with an index.

Loading builds the model on the meta device (no memory), then reads the tensors one at a time from
the memory-mapped safetensors files, casts them and assigns them in place of the meta parameters, so
the weights exist once in memory. Every key is accounted for: missing, unexpected and mis-shaped
tensors are all listed in one error instead of leaving random weights behind. Pickle checkpoints
(`pytorch_model.bin`) can run code when loaded, so they are refused unless the caller opts in, and
are then read with `torch.load(weights_only=True)`. A sharded folder's index is trusted only as far as
it is consistent: each shard a .safetensors file inside the folder, each tensor read from the one shard
the index names for it and from no other. Weights holding NaN or Inf are refused by name.

Saving writes the same format back (sharded above `max_shard_size`): every file to a temporary name
beside it first, and only when all of them are complete are they renamed into place, config.json last;
a failure (a full disk, say) leaves the folder as it was. Temp files are created under the umask, like
any other file, and a later write into the folder removes those an interrupted run left behind.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import ModelConfig
from .files import atomic_write_all, read_json
from .model import Transformer
from .quant import nf4
from .quant.linear4bit import Linear4bit, is_quant_key, quantization_config, quantize_model
from .rope import RoPE


class CheckpointError(ValueError):
    """A checkpoint folder that does not match the model it claims to hold."""


# Keys that old HF checkpoints carry but that hold nothing the model needs (recomputed buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# What sets the rows of a fused tensor, for a shape the config does not give (Phi-3; fused MoE experts).
_FUSED_HINTS = {
    "qkv_proj": "; qkv_proj holds [q; k; v]: (num_attention_heads + 2 * num_key_value_heads) * head_dim rows",
    "gate_up_proj": "; gate_up_proj holds [gate; up]: 2 * intermediate_size rows (moe_intermediate_size for experts)",
}


INDEX = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")  # the names save_model gives shards


def _shard_file(index: Path, folder: Path, shard: str) -> Path:
    """The file an index entry names: a .safetensors file inside the folder, so an index cannot make us
    read (or unpickle) a file elsewhere. A symlink may point outside only in the Hugging Face hub cache
    layout, where snapshots/<revision>/<file> links to ../../blobs/<hash>."""
    if not shard.endswith(".safetensors"):
        raise CheckpointError(f"{index}: shard {shard!r} is not a .safetensors file")
    if Path(shard).is_absolute() or ".." in Path(shard).parts:
        raise CheckpointError(f"{index}: shard {shard!r} must be a file name inside {folder}")
    file = folder / shard
    root = folder.resolve()
    allowed = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    if file.exists() and not any(file.resolve().is_relative_to(a) for a in allowed):
        raise CheckpointError(f"{index}: shard {shard!r} is a link to {file.resolve()}, outside {folder}")
    return file


def _read_index(index: Path, folder: Path) -> dict[str, Path]:
    """tensor name -> the shard file the index names for it, every shard checked to exist."""
    data = read_json(index, CheckpointError)
    if not isinstance(data, dict):
        raise CheckpointError(f"{index}: not a safetensors index: expected a JSON object, found "
                              f"{type(data).__name__}")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        found = "an empty one" if weight_map == {} else type(weight_map).__name__
        raise CheckpointError(f"{index}: not a safetensors index: 'weight_map' must be an object mapping tensor "
                              f"names to shard files, found {found}")
    files = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(f"{index}: weight_map[{name!r}] must be a shard file name, found {shard!r}")
        if shard not in files:
            files[shard] = _shard_file(index, folder, shard)
    missing = sorted(s for s, f in files.items() if not f.is_file())
    if missing:
        raise CheckpointError(f"{index} lists shards that are not in {folder}: {', '.join(missing)}")
    return {name: files[shard] for name, shard in weight_map.items()}


def _weight_files(path: Path, allow_pickle: bool) -> tuple[list[Path], dict[str, Path] | None]:
    """The weight files of a checkpoint folder, and the index's tensor -> shard map when it has one."""
    index = path / INDEX
    if index.exists():
        weight_map = _read_index(index, path)
        return sorted(set(weight_map.values())), weight_map
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"], None
    pickles = sorted(path.glob("pytorch_model*.bin"))
    if pickles:
        if not allow_pickle:
            raise CheckpointError(
                f"{path} holds only pickle weights ({pickles[0].name}); pickle can run arbitrary code. "
                "Convert them to safetensors, or pass allow_pickle=True to read them with weights_only=True."
            )
        return pickles, None
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


def _read_all(files: list[Path], weight_map: dict[str, Path] | None, index: Path):
    """Every tensor of the folder and the file it came from: each stored once, and, with an index, in the
    shard the index names for it (a later copy used to win silently)."""
    tensors, where = {}, {}
    for file in files:
        for name, tensor in _read_tensors(file):
            if name in where:
                raise CheckpointError(f"{file}: tensor {name} is also in {where[name]}; each tensor must be "
                                      "stored once")
            if weight_map is not None and not name.endswith(_IGNORED_SUFFIXES):
                named = weight_map.get(name)
                if named is None:
                    raise CheckpointError(f"{file}: holds tensor {name}, which {index.name} does not list")
                if named != file:
                    raise CheckpointError(f"{file}: holds tensor {name}, which {index.name} places in {named.name}")
            tensors[name] = tensor
            where[name] = str(file)
    absent = [f"{n} (in {f.name})" for n, f in (weight_map or {}).items() if n not in tensors]
    if absent:
        shown = absent[:5] + ([f"... and {len(absent) - 5} more"] if len(absent) > 5 else [])
        raise CheckpointError(f"{index}: lists {len(absent)} tensor(s) that no shard holds: {'; '.join(shown)}")
    return tensors, where


def _load_4bit(model: Transformer, tensors: dict, where: dict, dtype, device) -> set[str]:
    """Swap in a Linear4bit for every weight stored in bitsandbytes' 4-bit serialization (a checkpoint that
    transformers+bitsandbytes saved, or `minicustom quantize` wrote); returns the keys it consumed."""
    used = set()
    for key in [k for k in tensors if ".quant_state.bitsandbytes__" in k]:
        prefix = key.split(".quant_state.")[0]  # "model.layers.0.self_attn.q_proj.weight"
        module_name = prefix.removesuffix(".weight")
        try:
            linear = model.get_submodule(module_name)
        except AttributeError:
            raise CheckpointError(f"{where[key]}: {key} names no module of this model") from None
        if not prefix.endswith(".weight") or not isinstance(linear, nn.Linear):
            raise CheckpointError(f"{where[key]}: {key}: {module_name} is not a linear layer of this model; only "
                                  "linear weights can be stored 4-bit")
        state = nf4.from_state_dict(tensors, prefix, where=where[key])
        if tuple(state.shape) != (linear.out_features, linear.in_features):
            raise CheckpointError(f"{where[key]}: {prefix} has shape {list(state.shape)}, the model expects "
                                  f"{[linear.out_features, linear.in_features]}")
        bias_key = module_name + ".bias"
        bias = tensors.get(bias_key)
        if bias is not None:  # a missing bias is listed with the other missing tensors
            if linear.bias is None:
                raise CheckpointError(f"{where[bias_key]}: {bias_key} is stored, but the {model.config.model_type} "
                                      f"config gives {module_name} no bias")
            _check_weight(bias_key, bias, bias.to(dtype), (linear.out_features,), where[bias_key])
        model.set_submodule(module_name,
                            Linear4bit(state.to(device), None if bias is None else bias.to(device), compute_dtype=dtype))
        used |= {prefix, key, bias_key, *(f"{prefix}.{s}" for s in nf4.STATE_SUFFIXES)} & tensors.keys()
    return used


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in t. A sum is NaN or Inf when any term is, and reads t once without allocating (5-10x
    faster than isfinite(t).all() here); only a sum that overflowed needs the exact check."""
    try:
        total = t.sum(dtype=torch.float32 if t.element_size() < 4 else None)
    except RuntimeError:  # a dtype without sum (float8)
        total = torch.tensor(float("nan"))
    return bool(torch.isfinite(total)) or bool(torch.isfinite(t.float() if t.element_size() < 2 else t).all())


def _check_weight(name: str, stored: torch.Tensor, converted: torch.Tensor, shape, file):
    """A floating-point tensor of `shape`, finite as stored and after the cast (fp32 -> fp16 can overflow)."""
    if tuple(stored.shape) != tuple(shape):
        raise CheckpointError(f"{file}: tensor {name} has shape {tuple(stored.shape)}, the model expects "
                              f"{tuple(shape)}")
    if not stored.is_floating_point():
        raise CheckpointError(f"{file}: tensor {name} is {stored.dtype}; the model expects floating-point weights")
    if not _all_finite(converted):
        why = ("holds NaN or Inf" if not _all_finite(stored) else
               f"has values beyond the range of {converted.dtype} (Inf once cast)")
        raise CheckpointError(f"{file}: tensor {name} {why}")


def _check_layer_count(config: ModelConfig, tensors: dict, path: Path):
    """The config's layer count against the layers the weights hold, before a model of that many layers is
    built (a corrupted count would otherwise build it, then list every one of its tensors as missing)."""
    held = {int(m.group(1)) for name in tensors if (m := re.match(r"model\.layers\.(\d+)\.", name))}
    if held and config.num_hidden_layers > max(held) + 1:  # fewer layers held: the usual listing says which
        raise CheckpointError(f"{path / 'config.json'}: field 'num_hidden_layers' is {config.num_hidden_layers}, "
                              f"but the weights hold layers up to {max(held)} only")


def _check_head(model_class: type[Transformer], tensors: dict, file: Path):
    """A model class with its own head (a reward model's score) against weights that lack it: one line
    naming the file and the tensor, and what the folder holds instead (a causal LM's lm_head)."""
    head = getattr(model_class, "head_key", None)
    if head and head not in tensors:
        instead = "; it holds lm_head.weight, a language-model head" if "lm_head.weight" in tensors else ""
        raise CheckpointError(f"{file}: no tensor {head}, the head a {model_class.__name__} reads{instead}")


def load_model(path, dtype: torch.dtype = torch.float32, device="cpu", allow_pickle: bool = False,
               quantize: str | None = None, model_class: type[Transformer] = Transformer) -> Transformer:
    """Load a Hugging Face checkpoint folder into a `Transformer`, weights cast to `dtype` on `device`.

    Weights saved 4-bit by bitsandbytes load as Linear4bit (no bitsandbytes needed), computing in `dtype`;
    `quantize="nf4"` (or "fp4") quantizes every other linear but lm_head after loading. `model_class` is the
    Transformer subclass to build (reward_model.RewardModel: the decoder and a score head); one that names
    a `head_key` refuses, naming it, a folder whose weights do not hold that tensor."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a checkpoint folder")
    config = ModelConfig.from_file(path)
    files, weight_map = _weight_files(path, allow_pickle)
    tensors, where = _read_all(files, weight_map, path / INDEX)
    if config.num_experts and any(name.endswith(".experts.gate_up_proj") for name in tensors):
        config = dataclasses.replace(config, fused_experts=True)  # 3-D experts, as transformers >= 5 holds them
    _check_layer_count(config, tensors, path)
    _check_head(model_class, tensors, path / INDEX if weight_map else files[0])
    with torch.device("meta"):
        model = model_class(config)
    used = _load_4bit(model, tensors, where, dtype, device)
    expected = {k: v for k, v in model.state_dict().items() if k not in used}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)  # a head other than lm_head has none to tie
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
                               f" (in {file.name}){next((h for k, h in _FUSED_HINTS.items() if f'.{k}' in name), '')}")
        else:
            state[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
            _check_weight(name, tensor, state[name], expected[name].shape, file)
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
    model.rope = RoPE(config).to(device)  # buffers are not in the checkpoint
    if quantize and used:  # already 4-bit: nothing to do, unless the format asked for is another
        stored = {m.state.quant_type for m in model.modules() if isinstance(m, Linear4bit)}
        if stored != {quantize}:
            raise CheckpointError(f"{path}: the checkpoint is already 4-bit ({', '.join(sorted(stored))}); "
                                  f"cannot quantize it to {quantize}")
    elif quantize:
        quantize_model(model, quant_type=quantize, compute_dtype=dtype)
    return model.eval()


def save_model(model: Transformer, path, max_shard_size: int = 4 << 30, dtype: torch.dtype | None = None,
               state: dict[str, torch.Tensor] | None = None, config_fields: dict | None = None):
    """Write `model` as a Hugging Face checkpoint folder (safetensors, sharded above max_shard_size bytes);
    `state` replaces model.state_dict() (a full state gathered from sharded processes, say); config_fields
    are written into config.json over the model's own (a reward model's architectures and label)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
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
    config = {**model.config.to_dict(), **(config_fields or {})}
    first = next(v for k, v in state.items() if v.is_floating_point() and not is_quant_key(k))
    config["torch_dtype"] = str(first.dtype).removeprefix("torch.")
    if quant := quantization_config(model):
        config["quantization_config"] = quant
    if len(shards) == 1:
        writes = [(path / "model.safetensors", lambda tmp: save_file(shards[0], tmp, metadata=meta))]
        names = {"model.safetensors"}
    else:
        writes, weight_map = [], {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            writes.append((path / name, lambda tmp, shard=shard: save_file(shard, tmp, metadata=meta)))
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        writes.append((path / INDEX, lambda tmp: tmp.write_text(json.dumps(index, indent=2) + "\n")))
        names = set(weight_map.values()) | {INDEX}
    writes.append((path / "config.json",
                   lambda tmp: tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")))
    # config.json last: a folder with a new config.json holds its weights. The weights of the checkpoint this
    # one replaces (the other layout, or shards of another count) go once every new file is written and
    # before any is renamed in, so an old index never stands beside the new config.
    atomic_write_all(writes, before_rename=lambda: remove_stale_weights(path, names))
    return path


def remove_stale_weights(folder: Path, keep: set[str]):
    """Remove the weight files (model.safetensors, the index, shards) of `folder` whose names are not in
    `keep`: what a checkpoint written over another leaves of the old one's layout."""
    for f in Path(folder).iterdir():
        if f.name not in keep and (f.name in ("model.safetensors", INDEX) or _SHARD_NAME.fullmatch(f.name)):
            f.unlink(missing_ok=True)


def copy_tokenizer_files(src: Path, out: Path):
    """The tokenizer and generation files of a checkpoint folder, copied beside a model written from it."""
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                 "special_tokens_map.json"):
        if (Path(src) / name).exists() and Path(src).resolve() != Path(out).resolve():
            shutil.copy2(Path(src) / name, Path(out) / name)
