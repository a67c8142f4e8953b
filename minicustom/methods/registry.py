"""The method registry: every method the trainer, the command line and `compare` know, and the dispatch of
adapter folders to the method that reads and writes them.

Each method's file declares its entry (a `Method`: name, apply, options with defaults and help, default
lr, mergeable, PEFT type, file code); the list below is the only place that names them. Adding a method
is its file and two lines here (its import, and its place in the ladder). A method defined outside the
package (a research idea, a test's toy method) joins with `register(entry)`; `minicustom --import MODULE`
imports such a module first.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from ..files import atomic_write_all
from .adalora import ADALORA
from .base import Method, adapter_configs, set_adapter
from .boft import BOFT
from .bottleneck import BOTTLENECK
from .full import FULL
from .hra import HRA
from .ia3 import IA3
from .llama_adapter import LLAMA_ADAPTER
from .ln_tuning import LN_TUNING
from .loha import LOHA
from .lokr import LOKR
from .lora import DORA, LORA, OLORA, PISSA, RSLORA
from .oft import OFT
from .peft_format import (
    COMMON_FIELDS,
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterError,
    check_fields,
    fingerprint_meta,
    read_adapter,
)
from .prefix import PREFIX_TUNING
from .prompt_tuning import P_TUNING, PROMPT_TUNING
from .qlora import QLORA, QLORA_LOFTQ
from .trainable_tokens import TRAINABLE_TOKENS
from .vera import VERA

# The ladder's trained rungs, cheapest first: one line a method.
REGISTRY: dict[str, Method] = {m.name: m for m in (
    PROMPT_TUNING,
    P_TUNING,
    PREFIX_TUNING,
    IA3,
    LN_TUNING,
    TRAINABLE_TOKENS,
    BOTTLENECK,
    LLAMA_ADAPTER,
    VERA,
    LORA,
    RSLORA,
    DORA,
    PISSA,
    OLORA,
    ADALORA,
    LOHA,
    LOKR,
    HRA,
    OFT,
    BOFT,
    QLORA,
    QLORA_LOFTQ,
    FULL,
)}


# name -> the module that registered a method from outside the package (compare's workers import it).
ORIGINS: dict[str, str] = {}


def check_options(method: Method, others) -> None:
    """An option that several methods take is one command-line flag: its type, choices and kind must agree."""
    for o in method.options:
        for m in others:
            for q in m.options:
                if q.name == o.name and (q.type, q.choices, q.flag) != (o.type, o.choices, o.flag):
                    raise ValueError(f"method {method.name}: option {o.name!r} differs from method {m.name}'s "
                                     "(type, choices or switch); give it another name")


def register(method: Method) -> Method:
    """Add a method defined outside the package; its name must be new, and an option it shares with another
    method must parse the same way. The calling module is recorded, so that compare's workers import it."""
    if method.name in REGISTRY and REGISTRY[method.name] is not method:
        raise ValueError(f"a method named {method.name!r} is already registered")
    check_options(method, [m for m in REGISTRY.values() if m is not method])
    REGISTRY[method.name] = method
    ORIGINS[method.name] = sys._getframe(1).f_globals.get("__name__", "__main__")
    return method


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def apply_method(model: nn.Module, method: str, tokenizer=None, **options) -> nn.Module:
    """Attach `method` with those of `options` it takes (the rest of its options keep their defaults; the
    others are for other methods, so that one set of hyperparameters can be tried on several methods)."""
    entry = get_method(method)
    options = {o.name: options[o.name] for o in entry.options if o.name in options}
    if entry.uses_tokenizer:
        options["tokenizer"] = tokenizer
    return entry.apply(model, **options)


def method_for(peft_type) -> Method | None:
    """The registered method that reads and writes adapter folders of `peft_type` (None: unsupported)."""
    return next((m for m in REGISTRY.values() if m.peft_type == peft_type and m.load_peft), None)


def save_adapter(model: nn.Module, path, adapter_name: str = "default", base_model_name_or_path: str | None = None):
    """Write one adapter as a PEFT folder, all or nothing: every file goes to a temp file first and they are
    renamed into place only when all are written, adapter_config.json last."""
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ValueError(f"no adapter named {adapter_name!r}; adapters: {sorted(configs)}")
    peft, state, extra = method_for(configs[adapter_name].peft_type).to_peft(model, adapter_name)
    peft["base_model_name_or_path"] = base_model_name_or_path
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", **fingerprint_meta(model)}
    writes = []
    for file, tensors in {**extra, WEIGHTS_FILE: state}.items():
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        writes.append((path / file, lambda tmp, t=tensors: save_file(t, tmp, metadata=meta)))
    text = json.dumps(peft, indent=2, ensure_ascii=False) + "\n"
    atomic_write_all([*writes, (path / CONFIG_FILE, lambda tmp: tmp.write_text(text))])
    return path


def load_adapter(model: nn.Module, path, adapter_name: str = "default", is_trainable: bool = False) -> nn.Module:
    """Attach the adapter saved at `path` (PEFT format) under `adapter_name` and activate it."""
    config, tensors, meta = read_adapter(path)
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or (code := method_for(peft_type)) is None:
        supported = sorted({m.peft_type for m in REGISTRY.values() if m.peft_type and m.load_peft})
        raise NotImplementedError(f"{Path(path) / CONFIG_FILE}: peft_type {peft_type!r} is not supported; "
                                  f"supported: {', '.join(supported)}")
    check_fields(config, Path(path) / CONFIG_FILE, COMMON_FIELDS)
    if adapter_configs(model).get(adapter_name) is not None:
        raise ValueError(f"an adapter named {adapter_name!r} already exists; load under another adapter_name")
    base = meta.get("minicustom_base_fingerprint")
    if base is not None and base != model.config.fingerprint():
        raise AdapterError(f"{path}: this adapter was trained on another base ({meta.get('minicustom_base')}); "
                           f"this model is {fingerprint_meta(model)['minicustom_base']}")
    code.load_peft(model, Path(path), config, tensors, adapter_name)
    set_adapter(model, adapter_name)
    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return model
