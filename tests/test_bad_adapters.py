"""Bad adapter folders, for every peft_type load_adapter reads: a wrong type or range in any field of
adapter_config.json, a config that is not a JSON object, partial adapters (a targeted module with no
tensors, a LoRA A without its B, a modules_to_save copy missing), NaN/Inf or integer tensors, a corrupt
side file. Each ends in one AdapterError (NotImplementedError for an unknown peft_type) naming the file
and the field or tensor, and the model is left exactly as it was: same state_dict keys and tensors, no
adapter config, no kv_prefix.
"""

import json
import math
import shutil

import pytest
import torch
from conftest import make_checkpoint
from safetensors.torch import load_file, save_file

import minicustom as mc
from minicustom.methods.bottleneck import apply_adapters
from minicustom.methods.ia3 import apply_ia3
from minicustom.methods.llama_adapter import apply_llama_adapter
from minicustom.methods.prefix import apply_prefix
from minicustom.methods.prompt_tuning import apply_p_tuning, apply_prompt_tuning

CONFIG, WEIGHTS, P = "adapter_config.json", "adapter_model.safetensors", "base_model.model."
METHODS = {
    "LORA": lambda m: mc.apply_lora(m, r=4, alpha=8, verbose=False),
    "LORA_SAVED": lambda m: mc.apply_lora(m, r=4, alpha=8, targets=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                                          verbose=False),
    "IA3": lambda m: apply_ia3(m, verbose=False),
    "PREFIX_TUNING": lambda m: apply_prefix(m, num_virtual_tokens=3, projection=True, verbose=False),
    "PROMPT_TUNING": lambda m: apply_prompt_tuning(m, num_virtual_tokens=3, verbose=False),
    "P_TUNING": lambda m: apply_p_tuning(m, num_virtual_tokens=3, verbose=False),
    "ADAPTION_PROMPT": lambda m: apply_llama_adapter(m, adapter_len=3, adapter_layers=2, verbose=False),
    "BOTTLENECK_ADAPTER": lambda m: apply_adapters(m, reduction_factor=8, verbose=False),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Llama checkpoint and one saved adapter folder per method (small random weights, not identity)."""
    root = tmp_path_factory.mktemp("bad_adapters")
    ckpt, _ = make_checkpoint(root / "base", "llama3")
    saved = {}
    for method, apply in METHODS.items():
        torch.manual_seed(0)
        model = apply(mc.load_model(ckpt))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.01 * torch.randn_like(p))
        saved[method] = mc.save_adapter(model, root / method)
    return ckpt, saved


def _copy(folders, method, tmp_path):
    return shutil.copytree(folders[1][method], tmp_path / method)


def _edit_config(folder, change):
    config = json.loads((folder / CONFIG).read_text())
    change(config)
    (folder / CONFIG).write_text(json.dumps(config))  # json writes NaN / Infinity literals, as Python reads them


def _edit_tensors(folder, change, file=WEIGHTS):
    state = load_file(folder / file)
    change(state)
    save_file(state, folder / file)


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def assert_refused(ckpt, folder, match, error=mc.AdapterError, file=CONFIG):
    """load_adapter raises `error`, whose one message starts with `file` of `folder` and matches `match`;
    the model and the folder are exactly as before."""
    model = mc.load_model(ckpt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    files = _snapshot(folder)
    with pytest.raises(error) as e:
        mc.load_adapter(model, folder)
    message = str(e.value)
    assert message.startswith(f"{folder / file}: ") and __import__("re").search(match, message), message
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert not getattr(model, "adapter_configs", {}) and model.kv_prefix is None
    assert _snapshot(folder) == files
    return message


def set_field(key, value):
    return lambda config: config.__setitem__(key, value)


NAN, INF = math.nan, math.inf
# (method, field, bad value, what the message must say about it)
BAD_FIELDS = [
    ("LORA", "r", 0, "must be a positive integer, found 0"),
    ("LORA", "r", 2.5, "must be a positive integer, found 2.5"),
    ("LORA", "r", "4", "must be a positive integer, found '4'"),
    ("LORA", "r", True, "must be a positive integer, found True"),
    ("LORA", "lora_alpha", "16", "must be a finite number, found '16'"),
    ("LORA", "lora_alpha", NAN, "must be a finite number, found nan"),
    ("LORA", "lora_alpha", INF, "must be a finite number, found inf"),
    ("LORA", "lora_dropout", 1.0, r"must be a number in \[0, 1\), found 1.0"),
    ("LORA", "lora_dropout", -0.1, r"must be a number in \[0, 1\)"),
    ("LORA", "lora_dropout", "0.1", r"must be a number in \[0, 1\)"),
    ("LORA", "use_dora", "false", "must be true or false, found 'false'"),
    ("LORA", "use_rslora", 1, "must be true or false, found 1"),
    ("LORA", "fan_in_fan_out", "false", "must be true or false"),
    ("LORA", "inference_mode", "false", "must be true or false"),
    ("LORA", "target_modules", 5, "must be a module name regex .* found 5"),
    ("LORA", "target_modules", ["q_proj", 3], "must be a module name regex"),
    ("LORA", "target_modules", "q_proj(", "must be a module name regex"),
    ("LORA", "layers_to_transform", "0", "must be a layer index or a list of layer indices"),
    ("LORA", "layers_to_transform", [-1], "must be a layer index or a list of layer indices"),
    ("LORA", "modules_to_save", "lm_head", "must be a list of module names, found 'lm_head'"),
    ("LORA", "rank_pattern", {"q_proj": "4"}, "must be an object mapping module name regexes to positive integers"),
    ("LORA", "rank_pattern", {"q_proj(": 4}, "must be an object mapping module name regexes"),
    ("LORA", "alpha_pattern", {"q_proj": NAN}, "must be an object mapping module name regexes to finite numbers"),
    ("LORA", "init_lora_weights", 5, "must be true, false or a string"),
    ("LORA", "init_lora_weights", "pissa", "init_lora_weights='pissa' is not supported: .*base rewritten"),
    ("LORA", "init_lora_weights", "loftq", "init_lora_weights='loftq' is not supported"),
    ("LORA", "bias", "all", "bias='all' is not supported"),
    ("LORA", "task_type", 5, "field 'task_type' must be a string"),
    ("LORA", "base_model_name_or_path", 3, "field 'base_model_name_or_path' must be a string"),
    ("LORA", "peft_version", [], "field 'peft_version' must be a string"),
    ("IA3", "target_modules", 5, "field 'target_modules' must be a module name regex"),
    ("IA3", "feedforward_modules", [1], "field 'feedforward_modules' must be a module name regex"),
    ("IA3", "init_ia3_weights", "yes", "field 'init_ia3_weights' must be true or false"),
    ("IA3", "fan_in_fan_out", "false", "field 'fan_in_fan_out' must be true or false"),
    ("PREFIX_TUNING", "num_virtual_tokens", True, "field 'num_virtual_tokens' must be a positive integer, found True"),
    ("PREFIX_TUNING", "num_virtual_tokens", 0, "field 'num_virtual_tokens' must be a positive integer"),
    ("PREFIX_TUNING", "num_virtual_tokens", "3", "field 'num_virtual_tokens' must be a positive integer"),
    ("PREFIX_TUNING", "prefix_projection", "no", "field 'prefix_projection' must be true or false"),
    ("PREFIX_TUNING", "encoder_hidden_size", -1, "field 'encoder_hidden_size' must be a positive integer"),
    ("PREFIX_TUNING", "token_dim", "32", "field 'token_dim' must be a positive integer"),
    ("PROMPT_TUNING", "num_virtual_tokens", 3.0, "field 'num_virtual_tokens' must be a positive integer, found 3.0"),
    ("PROMPT_TUNING", "prompt_tuning_init", 5, "field 'prompt_tuning_init' must be a string"),
    ("PROMPT_TUNING", "tokenizer_name_or_path", 5, "field 'tokenizer_name_or_path' must be a string"),
    ("PROMPT_TUNING", "num_transformer_submodules", True, "field 'num_transformer_submodules' must be a positive"),
    ("P_TUNING", "encoder_dropout", 1.5, r"field 'encoder_dropout' must be a number in \[0, 1\)"),
    ("P_TUNING", "encoder_dropout", NAN, r"field 'encoder_dropout' must be a number in \[0, 1\)"),
    ("P_TUNING", "encoder_hidden_size", 0, "field 'encoder_hidden_size' must be a positive integer"),
    ("P_TUNING", "encoder_reparameterization_type", ["MLP"], "field 'encoder_reparameterization_type' must be a"),
    ("P_TUNING", "encoder_num_layers", "2", "field 'encoder_num_layers' must be a positive integer"),
    ("ADAPTION_PROMPT", "adapter_len", True, "field 'adapter_len' must be a positive integer, found True"),
    ("ADAPTION_PROMPT", "adapter_layers", 0, "field 'adapter_layers' must be a positive integer"),
    ("ADAPTION_PROMPT", "target_modules", 5, "field 'target_modules' must be a string"),
    ("BOTTLENECK_ADAPTER", "scaling", NAN, "scaling must be a finite number, got nan"),
    ("BOTTLENECK_ADAPTER", "init_scale", INF, "init_scale must be a finite number >= 0, got inf"),
    ("BOTTLENECK_ADAPTER", "reduction_factor", "8", "reduction_factor must be a positive number"),
    ("BOTTLENECK_ADAPTER", "dropout", 1, r"dropout must be in \[0, 1\)"),
    ("BOTTLENECK_ADAPTER", "placement", 5, "placement 5 is not supported"),
    ("BOTTLENECK_ADAPTER", "layers", "0", "layers must be a list of layer indices"),
    ("BOTTLENECK_ADAPTER", "inference_mode", "true", "field 'inference_mode' must be true or false"),
]


@pytest.mark.parametrize("method, key, value, match", BAD_FIELDS,
                         ids=[f"{m}-{k}-{v!r}" for m, k, v, _ in BAD_FIELDS])
def test_bad_config_field_is_refused(folders, tmp_path, method, key, value, match):
    folder = _copy(folders, method, tmp_path)
    _edit_config(folder, set_field(key, value))
    message = assert_refused(folders[0], folder, match)
    assert key in message and "\n" not in message


@pytest.mark.parametrize("method, key", [("PREFIX_TUNING", "num_virtual_tokens"),
                                         ("PROMPT_TUNING", "num_virtual_tokens"),
                                         ("ADAPTION_PROMPT", "adapter_len"), ("LORA", "r")])
def test_missing_required_field_is_refused(folders, tmp_path, method, key):
    folder = _copy(folders, method, tmp_path)
    _edit_config(folder, lambda c: c.pop(key))
    assert_refused(folders[0], folder, f"'{key}'")


@pytest.mark.parametrize("text, match", [
    ("[1, 2]", "expected a JSON object, found list"),
    ('"LORA"', "expected a JSON object, found str"),
    ("null", "expected a JSON object, found NoneType"),
    ('{"peft_type": "LORA", "r": ' + "[" * 100_000, r"not valid JSON \(nested too deeply\)"),
])
def test_config_that_is_not_an_object(folders, tmp_path, text, match):
    folder = _copy(folders, "LORA", tmp_path)
    (folder / CONFIG).write_text(text)
    assert_refused(folders[0], folder, match)


def test_config_that_is_not_utf8(folders, tmp_path):
    folder = _copy(folders, "LORA", tmp_path)
    (folder / CONFIG).write_bytes(b'{"peft_type": "LORA", "r": 4, "task_type": "\xff\xfe"}')
    assert_refused(folders[0], folder, r"not UTF-8 text \(byte 44\)")


@pytest.mark.parametrize("value, match", [
    ("FOURIERFT", "peft_type 'FOURIERFT' is not supported; supported: .*IA3, .*LOHA, .*LORA, .*PREFIX_TUNING"),
    (5, "peft_type 5 is not supported"),
    (["LORA"], r"peft_type \['LORA'\] is not supported"),
    (None, "peft_type None is not supported"),
])
def test_unknown_peft_type_lists_the_supported_ones(folders, tmp_path, value, match):
    folder = _copy(folders, "LORA", tmp_path)
    _edit_config(folder, set_field("peft_type", value))
    assert_refused(folders[0], folder, match, error=NotImplementedError)


# -- partial adapters -----------------------------------------------------------------------------

Q0, V1 = f"{P}model.layers.0.self_attn.q_proj", f"{P}model.layers.1.self_attn.v_proj"


def _drop(*prefixes):
    def change(state):
        for k in [k for k in state if k.startswith(prefixes)]:
            del state[k]
    return change


def test_targeted_module_without_tensors_is_refused(folders, tmp_path):
    """target_modules selects layer 1's v_proj (all-linear, saved as leaf names), the file holds nothing
    for it: refused, where the loader used to adapt the other 13 modules and leave this one bare."""
    folder = _copy(folders, "LORA", tmp_path)
    _edit_tensors(folder, _drop(V1 + "."))
    assert_refused(folders[0], folder, r"model\.layers\.1\.self_attn\.v_proj: selected by target_modules .* has no "
                   "LoRA tensors for it", file="")


def test_lora_a_without_b_is_refused(folders, tmp_path):
    folder = _copy(folders, "LORA", tmp_path)
    _edit_tensors(folder, _drop(Q0 + ".lora_B"))
    assert_refused(folders[0], folder, r"q_proj\.lora_B\.weight is missing", file="")


def test_tensors_for_a_module_target_modules_does_not_select(folders, tmp_path):
    folder = _copy(folders, "LORA", tmp_path)
    _edit_config(folder, set_field("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]))
    assert_refused(folders[0], folder, r"mlp\.down_proj: adapter_model\.safetensors has LoRA tensors for it but "
                   "target_modules .* does not select it", file="")


def test_modules_to_save_copy_missing_is_refused(folders, tmp_path):
    folder = _copy(folders, "LORA_SAVED", tmp_path)
    _edit_tensors(folder, _drop(f"{P}lm_head."))
    assert_refused(folders[0], folder, r"lm_head \(modules_to_save\): adapter_model\.safetensors holds no tensors, "
                   r"expected \{'weight': \(131, 64\)\}", file="")


@pytest.mark.slow  # imports peft (about 3 s the first time)
def test_partial_peft_adapter_is_refused(folders, tmp_path):
    """The same check on PEFT's own file: its LoRA on q_proj/v_proj with layer 0's q_proj tensors removed."""
    from peft import LoraConfig, get_peft_model

    ckpt = folders[0]
    _, hf = make_checkpoint(tmp_path / "hf", "llama3")
    get_peft_model(hf, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "peft")
    folder = tmp_path / "peft"
    mc.load_adapter(mc.load_model(ckpt), folder)  # whole, it loads
    _edit_tensors(folder, _drop(Q0 + "."))
    assert_refused(ckpt, folder, r"model\.layers\.0\.self_attn\.q_proj: selected by target_modules", file="")


def test_missing_ia3_vector_is_refused(folders, tmp_path):
    folder = _copy(folders, "IA3", tmp_path)
    _edit_tensors(folder, _drop(f"{P}model.layers.1.mlp.down_proj."))
    assert_refused(folders[0], folder, r"model\.layers\.1\.mlp\.down_proj\.ia3_l is missing", file="")


def test_missing_llama_adapter_gate_is_refused(folders, tmp_path):
    folder = _copy(folders, "ADAPTION_PROMPT", tmp_path)
    _edit_tensors(folder, _drop(f"{P}model.layers.1.self_attn.adaption_gate"))
    assert_refused(folders[0], folder, r"layers\.1\.self_attn\.adaption_gate: missing", file=WEIGHTS)


def test_missing_bottleneck_tensor_is_refused(folders, tmp_path):
    folder = _copy(folders, "BOTTLENECK_ADAPTER", tmp_path)
    _edit_tensors(folder, _drop(f"{P}model.layers.0.mlp.down_proj.adapter_up.bias"))
    assert_refused(folders[0], folder, r"layers\.0\.mlp\.down_proj\.adapter_up\.bias is missing", file=WEIGHTS)


# -- bad tensors ----------------------------------------------------------------------------------

def _poison(key_part, value, file=WEIGHTS):
    """A change putting `value` into one element of the first tensor whose key contains key_part."""
    def change(state):
        key = next(k for k in sorted(state) if key_part in k)
        t = state[key].clone()
        t.view(-1)[0] = value
        state[key] = t
    return change


@pytest.mark.parametrize("method, key_part, value, file", [
    ("LORA", "q_proj.lora_A", math.nan, WEIGHTS),
    ("LORA", "v_proj.lora_B", math.inf, WEIGHTS),
    ("IA3", "ia3_l", -math.inf, WEIGHTS),
    ("PREFIX_TUNING", "prompt_embeddings", math.nan, WEIGHTS),
    ("PREFIX_TUNING", "transform.0.weight", math.nan, "prefix_encoder.safetensors"),
    ("PROMPT_TUNING", "prompt_embeddings", math.nan, WEIGHTS),
    ("P_TUNING", "mlp_head.0.bias", math.inf, "prompt_encoder.safetensors"),
    ("ADAPTION_PROMPT", "adaption_gate", math.nan, WEIGHTS),
    ("BOTTLENECK_ADAPTER", "adapter_down.weight", math.nan, WEIGHTS),
])
def test_nan_or_inf_tensor_is_refused(folders, tmp_path, method, key_part, value, file):
    folder = _copy(folders, method, tmp_path)
    _edit_tensors(folder, _poison(key_part, value), file=file)
    assert_refused(folders[0], folder, rf"tensor \S*{key_part}\S* holds 1 NaN or Inf values", file=file)


def test_integer_tensor_is_refused(folders, tmp_path):
    folder = _copy(folders, "LORA", tmp_path)
    _edit_tensors(folder, lambda s: s.__setitem__(Q0 + ".lora_A.weight", s[Q0 + ".lora_A.weight"].long()))
    assert_refused(folders[0], folder, r"tensor \S*q_proj\.lora_A\.weight has dtype int64", file=WEIGHTS)


def test_scalar_lora_a_is_refused(folders, tmp_path):
    folder = _copy(folders, "LORA", tmp_path)
    _edit_tensors(folder, lambda s: s.__setitem__(Q0 + ".lora_A.weight", torch.tensor(1.0)))
    assert_refused(folders[0], folder, r"q_proj\.lora_A\.weight: shape \(\), expected a matrix", file="")


@pytest.mark.parametrize("method, file", [("PREFIX_TUNING", "prefix_encoder.safetensors"),
                                          ("P_TUNING", "prompt_encoder.safetensors")])
def test_corrupt_encoder_file_is_refused(folders, tmp_path, method, file):
    folder = _copy(folders, method, tmp_path)
    (folder / file).write_bytes((folder / file).read_bytes()[:50])
    assert_refused(folders[0], folder, "cannot read safetensors file", file=file)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_saved_folder_loads(folders, method):
    """The folders the bad cases start from load (so each refusal above comes from its one change)."""
    model = mc.load_adapter(mc.load_model(folders[0]), folders[1][method])
    assert list(model.adapter_configs) == ["default"]


def test_save_adapter_is_all_or_nothing(folders, tmp_path, monkeypatch):
    """A disk that fills while the config is written (the weights already written to their temp file) leaves
    the folder's previous adapter exactly as it was, and no temp file."""
    import errno
    from pathlib import Path

    folder = _copy(folders, "PREFIX_TUNING", tmp_path)  # two files: the weights and the prefix encoder
    model = METHODS["PREFIX_TUNING"](mc.load_model(folders[0]))
    before = _snapshot(folder)
    write_text = Path.write_text

    def full(self, *args, **kwargs):
        if self.name.startswith(f".{CONFIG}"):
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / CONFIG))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError, match="No space left"):
        mc.save_adapter(model, folder)
    assert _snapshot(folder) == before
