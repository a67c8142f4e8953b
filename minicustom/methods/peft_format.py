"""Adapter folders in PEFT's format, what every method's file code shares: adapter_config.json +
adapter_model.safetensors.

File keys are "base_model.model." + module name + the layer's own key ("lora_A.weight",
"lora_B.weight", "ia3_l", ...); the adapter's name never appears in the file, as in PEFT. Each method
writes and reads its own keys (`to_peft`, `load_peft` in its file; registry.py dispatches on the
config's `peft_type`). Here: reading a folder with clear errors (a missing file, not JSON, a corrupt
safetensors file, NaN or Inf in a tensor), checking a config field's type and range (`check_fields`),
and the base model's fingerprint kept in the safetensors metadata (which PEFT ignores), so that an
adapter loaded onto another base is refused.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..files import read_json

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


class AdapterError(ValueError):
    """An adapter folder that does not fit the model it is loaded into."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_regex(v) -> bool:
    try:
        re.compile(v)
    except (re.error, TypeError):
        return False
    return True


def _is_names(v) -> bool:
    return _is_regex(v) if isinstance(v, str) else isinstance(v, list) and all(isinstance(x, str) for x in v)


# A field kind -> (test of a present, non-null value, what the message says it must be).
KINDS = {
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "positive int": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "number": (_is_number, "a finite number"),
    "dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "names": (_is_names, "a module name regex (string) or a list of module names"),
    "name list": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of module names"),
    "layers": (lambda v: (_is_int(v) and v >= 0) or (isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v)),
               "a layer index or a list of layer indices"),
    "ranks": (lambda v: isinstance(v, dict) and all(_is_regex(k) and _is_int(x) and x > 0 for k, x in v.items()),
              "an object mapping module name regexes to positive integers"),
    "numbers": (lambda v: isinstance(v, dict) and all(_is_regex(k) and _is_number(x) for k, x in v.items()),
                "an object mapping module name regexes to finite numbers"),
    "bool or str": (lambda v: isinstance(v, (bool, str)), "true, false or a string"),
    "object": (lambda v: isinstance(v, dict), "a JSON object"),
}
# Fields every PEFT adapter_config.json may carry, whatever its peft_type.
COMMON_FIELDS = {"peft_type": "str", "task_type": "str", "inference_mode": "bool", "base_model_name_or_path": "str",
                 "revision": "str", "peft_version": "str", "auto_mapping": "object"}


def check_fields(config: dict, file: Path, spec: dict[str, str]):
    """Each field of `spec` that `config` holds (null counts as absent: PEFT's default) is of its kind;
    an AdapterError naming the file and the field otherwise."""
    for key, kind in spec.items():
        value = config.get(key)
        ok, expected = KINDS[kind]
        if value is not None and not ok(value):
            found = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            raise AdapterError(f"{file}: field {key!r} must be {expected}, found {found}")


def check_finite(tensors: dict[str, torch.Tensor], file: Path):
    """An AdapterError naming the first tensor of `file` that is not floating point or holds NaN or Inf."""
    for key, t in sorted(tensors.items()):
        if not t.is_floating_point():
            raise AdapterError(f"{file}: tensor {key} has dtype {str(t.dtype).removeprefix('torch.')}; adapter "
                               "tensors are floating point")
        if not (finite := torch.isfinite(t.float())).all():
            raise AdapterError(f"{file}: tensor {key} holds {int((~finite).sum())} NaN or Inf values "
                               f"(of {t.numel()})")


def read_tensors(file: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a safetensors file, with an AdapterError for a corrupt file or a NaN/Inf."""
    try:
        with safe_open(file, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise AdapterError(f"{file}: cannot read safetensors file (truncated or corrupt?): {e}") from None
    check_finite(tensors, file)
    return tensors, meta


def match_keys(path: Path, tensors: dict[str, torch.Tensor], suffix: str, expected: dict[str, tuple],
               modules: dict, method: str, unit: str, targets, problems: list[str] | None = None,
               shape_note=lambda shape: "") -> dict[str, torch.Tensor]:
    """The tensors of a one-key-per-module folder (PREFIX + module name + suffix), by module name. Every
    key must belong to a module of `expected` (module name -> shape) and have its shape, and every module
    must have its key; otherwise AdapterError naming the keys, with `problems` found before. `method` and
    `unit` name them ("IA3", "module"); `shape_note(shape)` explains an expected shape. Changes nothing."""
    problems = list(problems or [])
    found, unknown = {}, []
    for key, t in tensors.items():
        name = key.removeprefix(PREFIX).removesuffix(suffix)
        if not key.startswith(PREFIX) or not key.endswith(suffix):
            unknown.append(f"{key} ({method}'s keys are {PREFIX}<module>{suffix})")
        elif name not in expected:
            unknown.append(f"{key} ({'no such module' if name not in modules else 'not selected by target_modules'})")
        else:
            if tuple(t.shape) != expected[name]:
                problems.append(f"{key}: shape {tuple(t.shape)}, expected {expected[name]}{shape_note(expected[name])}")
            found[name] = t
    if unknown:
        raise AdapterError(f"{path / WEIGHTS_FILE}: {len(unknown)} keys match no {method} {unit} of this model "
                           f"(target_modules {targets!r}): " + ", ".join(sorted(unknown)[:20]))
    problems += [f"{PREFIX}{name}{suffix} is missing (its {unit} is selected by target_modules {targets!r})"
                 for name in sorted(set(expected) - set(found))]
    if problems:
        raise AdapterError(f"{path}: the adapter does not fit this model:\n  " + "\n  ".join(problems))
    return found


def match_factors(path: Path, tensors: dict[str, torch.Tensor], expected: dict[str, dict[str, tuple]],
                  modules: dict, method: str, targets) -> dict[str, dict[str, torch.Tensor]]:
    """match_keys for linears holding several tensors each, one key suffix a factor (LoHa's hada_w1_a, ...):
    `expected` maps each factor to (module name -> shape) over the modules that hold it; returns factor ->
    (module name -> tensor). Each factor's keys are matched on their own; a key ending in no factor is
    reported with the first. Changes nothing."""
    suffixes = tuple("." + f for f in expected)
    others = {k: t for k, t in tensors.items() if not k.endswith(suffixes)}
    return {f: match_keys(path, {**{k: t for k, t in tensors.items() if k.endswith("." + f)}, **others}, "." + f,
                          shapes, modules, method, "linear", targets) for f, shapes in expected.items()}


def refuse_unsupported(config: dict, file: Path, unsupported: tuple[tuple[str, object], ...], method: str):
    """An AdapterError naming the first field of `unsupported` ((field, the value that means off), ...) that
    `config` sets to something else (null, false and empty count as off)."""
    for key, off in unsupported:
        if config.get(key, off) not in (off, None, False, [], {}):
            raise AdapterError(f"{file}: {key}={config[key]!r} is not supported (minicustom's {method} leaves it out)")


def fingerprint_meta(model) -> dict[str, str]:
    c = model.config
    return {"minicustom_base_fingerprint": c.fingerprint(),
            "minicustom_base": f"{c.model_type} hidden={c.hidden_size} layers={c.num_hidden_layers} "
                               f"heads={c.num_attention_heads}/{c.num_key_value_heads} vocab={c.vocab_size}"}


def read_adapter(path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(adapter_config.json, tensors, safetensors metadata) of an adapter folder, with clear errors."""
    path = Path(path)
    cfg_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE} (expected a PEFT adapter folder)")
    config = read_json(cfg_file, AdapterError)  # UTF-8, JSON, nesting and repeated keys, naming the file
    if not isinstance(config, dict):
        raise AdapterError(f"{cfg_file}: expected a JSON object, found {type(config).__name__}")
    if not weights.exists():
        raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE}" + (
            " (adapter_model.bin is pickle and is not read)" if (path / "adapter_model.bin").exists() else ""))
    tensors, meta = read_tensors(weights)
    return config, tensors, meta
