"""Every plausible way a checkpoint folder can be wrong ends in one error naming the file and the field or
tensor, and loading or saving changes no file: config.json fields, the shard index, the bitsandbytes 4-bit
state, non-finite weights, and the temp files and permissions of atomic writes."""

import errno
import json
import os
import shutil
import time

import pytest
import torch
from conftest import make_checkpoint
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import minicustom as mc
from minicustom import CheckpointError, ConfigError, files, nf4
from minicustom import checkpoint as ckpt
from minicustom.config import ModelConfig

DELETE = object()


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    """Tiny checkpoints written once per module; each test copies the one it needs."""
    root = tmp_path_factory.mktemp("templates")
    for family in ("llama3", "mistral", "qwen2", "smollm", "gemma3", "phi4mini", "qwen3-yarn", "qwen3moe", "mixtral"):
        make_checkpoint(root / family, family)
    mc.save_model(mc.load_model(root / "llama3"), root / "sharded", max_shard_size=20_000)
    mc.save_model(mc.load_model(root / "smollm", quantize="nf4"), root / "nf4")
    return root


def _copy(templates, name, tmp_path):
    return shutil.copytree(templates / name, tmp_path / name, symlinks=True)


def _snapshot(folder):
    """Every file under folder (links not followed) with its bytes and mode: what "nothing changed" means."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None,
                                         p.lstat().st_mode)
            for p in sorted(folder.rglob("*"))}


def _edit_config(path, edits):
    cfg = json.loads((path / "config.json").read_text())
    for key, value in edits.items():
        if value is DELETE:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))  # NaN / Infinity written as JSON's NaN literals


def _refused(path, error, *names, **load_kw):
    """load_model(path) raises `error` naming the file(s) and every one of `names`, and changes nothing."""
    before = _snapshot(path)
    with pytest.raises(error) as e:
        mc.load_model(path, **load_kw)
    message = str(e.value)
    for name in names:
        assert str(name) in message, (name, message)
    assert "\n" not in message, message
    assert _snapshot(path) == before
    return message


# -- config.json ------------------------------------------------------------------------------------------

LLAMA3_ROPE = {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0, "rope_type": "llama3"}


def _rope(**changes):
    out = {**LLAMA3_ROPE, **changes}
    return {k: v for k, v in out.items() if v is not DELETE}


nan, inf = float("nan"), float("inf")

GEMMA3_ROPE = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
PHI4_ROPE = {"rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.75,
             "short_factor": [1.0] * 6, "long_factor": [2.0] * 6, "original_max_position_embeddings": 8}
YARN_ROPE = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 1e4}

BAD_CONFIGS = [
    # -- the families beyond Llama's: layer patterns, rope types and scalings, what a family cannot do
    ("gemma3", {"layer_types": ["sliding_attention", "chunked_attention", "full_attention"]},
     ["'layer_types'", "chunked_attention"]),
    ("gemma3", {"layer_types": ["sliding_attention", "full_attention"]}, ["layer_types has 2 entries", "3 layers"]),
    ("gemma3", {"layer_types": DELETE, "sliding_window_pattern": 0}, ["'sliding_window_pattern'"]),
    ("gemma3", {"layer_types": "alternating"}, ["'layer_types'", "list"]),
    ("gemma3", {"hidden_activation": "relu"}, ["hidden_activation 'relu'", "gelu_pytorch_tanh"]),
    ("gemma3", {"use_bidirectional_attention": True}, ["'use_bidirectional_attention'"]),
    ("gemma3", {"query_pre_attn_scalar": 0}, ["'query_pre_attn_scalar'"]),
    ("gemma3", {"final_logit_softcapping": -30.0}, ["'final_logit_softcapping'"]),
    ("gemma3", {"rope_parameters": {**GEMMA3_ROPE, "sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     ["'rope_parameters.sliding_attention.rope_type'", "'linear'"]),
    ("gemma3", {"rope_parameters": {**GEMMA3_ROPE, "full_attention": {"rope_type": "dynamic", "factor": 2.0}}},
     ["'rope_parameters.full_attention.rope_type'", "'dynamic'"]),
    ("gemma3", {"rope_parameters": {**GEMMA3_ROPE, "sliding_attention": "default"}},
     ["'rope_parameters.sliding_attention'", "object"]),
    ("qwen3-yarn", {"rope_parameters": {**YARN_ROPE, "rope_type": "dynamic"}}, ["rope type 'dynamic'", "yarn"]),
    ("qwen3-yarn", {"rope_parameters": {k: v for k, v in YARN_ROPE.items() if k != "factor"}},
     ["'rope_parameters.factor'", "missing"]),
    ("qwen3-yarn", {"rope_parameters": {**YARN_ROPE, "beta_fast": "32"}}, ["'rope_parameters.beta_fast'"]),
    ("qwen3-yarn", {"rope_parameters": {**YARN_ROPE, "truncate": "no"}}, ["'rope_parameters.truncate'"]),
    ("qwen3-yarn", {"rope_parameters": {**YARN_ROPE, "partial_rotary_factor": 0.5}}, ["'partial_rotary_factor'",
                                                                                       "phi3"]),
    ("phi4mini", {"rope_parameters": {**PHI4_ROPE, "short_factor": [1.0] * 5}},
     ["'rope_parameters.short_factor'", "6 positive numbers", "5 entries"]),
    ("phi4mini", {"rope_parameters": {k: v for k, v in PHI4_ROPE.items() if k != "long_factor"}},
     ["'rope_parameters.long_factor'"]),
    ("phi4mini", {"rope_parameters": {**PHI4_ROPE, "long_factor": [1.0, 2.0, 3.0, 4.0, 5.0, -6.0]}},
     ["'rope_parameters.long_factor'"]),
    ("phi4mini", {"rope_parameters": {**PHI4_ROPE, "partial_rotary_factor": 1.5}}, ["'partial_rotary_factor'"]),
    ("phi4mini", {"rope_parameters": {**PHI4_ROPE, "partial_rotary_factor": 0.7}}, ["partial_rotary_factor",
                                                                                     "even"]),
    ("phi4mini", {"original_max_position_embeddings": "8"}, ["'original_max_position_embeddings'"]),
    ("qwen3moe", {"num_experts_per_tok": 5}, ["'num_experts_per_tok' (5)", "'num_local_experts' (4)"]),
    ("qwen3moe", {"num_local_experts": DELETE, "num_experts": 4, "num_experts_per_tok": 6},
     ["'num_experts_per_tok' (6)", "'num_experts' (4)"]),
    ("qwen3moe", {"num_local_experts": 0}, ["'num_local_experts'", "positive"]),
    ("qwen3moe", {"mlp_only_layers": [2]}, ["'mlp_only_layers'", "[0, 2)"]),
    ("qwen3moe", {"decoder_sparse_step": 0}, ["'decoder_sparse_step'"]),
    ("qwen3moe", {"norm_topk_prob": "yes"}, ["'norm_topk_prob'", "boolean"]),
    ("mixtral", {"num_experts_per_tok": 9}, ["'num_experts_per_tok' (9)", "'num_local_experts' (4)"]),
    ("mixtral", {"router_jitter_noise": 0.1}, ["'router_jitter_noise'"]),
    ("mixtral", {"router_aux_loss_coef": -1}, ["'router_aux_loss_coef'"]),
    # (template, edits, words the message must hold besides the file)
    ("smollm", {"tie_word_embeddings": "false"}, ["'tie_word_embeddings'", "boolean", "'false'"]),
    ("smollm", {"tie_word_embeddings": 0}, ["'tie_word_embeddings'", "boolean"]),
    ("llama3", {"attention_bias": "true"}, ["'attention_bias'", "boolean"]),
    ("llama3", {"mlp_bias": 1}, ["'mlp_bias'", "boolean"]),
    ("qwen2", {"use_sliding_window": "false"}, ["'use_sliding_window'", "boolean"]),
    ("llama3", {"rms_norm_eps": 0}, ["'rms_norm_eps'", "positive"]),
    ("llama3", {"rms_norm_eps": -1e-6}, ["'rms_norm_eps'"]),
    ("llama3", {"rms_norm_eps": "1e-6"}, ["'rms_norm_eps'", "'1e-6'"]),
    ("llama3", {"rms_norm_eps": nan}, ["'rms_norm_eps'", "nan"]),
    ("llama3", {"rms_norm_eps": inf}, ["'rms_norm_eps'", "inf"]),
    ("mistral", {"rope_parameters": DELETE, "rope_theta": 0}, ["'rope_theta'"]),
    ("mistral", {"rope_parameters": DELETE, "rope_theta": "10000"}, ["'rope_theta'", "'10000'"]),
    ("mistral", {"rope_parameters": DELETE, "rope_theta": nan}, ["'rope_theta'"]),
    ("llama3", {"rope_parameters": _rope(rope_theta=-1.0)}, ["'rope_parameters.rope_theta'"]),
    ("mistral", {"sliding_window": -1}, ["'sliding_window'", "positive integer"]),
    ("mistral", {"sliding_window": 0}, ["'sliding_window'"]),
    ("mistral", {"sliding_window": 4.5}, ["'sliding_window'"]),
    ("mistral", {"sliding_window": "7"}, ["'sliding_window'", "'7'"]),
    ("mistral", {"sliding_window": True}, ["'sliding_window'"]),
    ("llama3", {"rope_parameters": _rope(factor=DELETE)}, ["'rope_parameters.factor'", "missing"]),
    ("llama3", {"rope_parameters": _rope(low_freq_factor=DELETE)}, ["'rope_parameters.low_freq_factor'"]),
    ("llama3", {"rope_parameters": _rope(high_freq_factor=DELETE)}, ["'rope_parameters.high_freq_factor'"]),
    ("llama3", {"rope_parameters": _rope(original_max_position_embeddings=DELETE)},
     ["'rope_parameters.original_max_position_embeddings'"]),
    ("llama3", {"rope_parameters": _rope(factor=0)}, ["'rope_parameters.factor'", "positive"]),
    ("llama3", {"rope_parameters": _rope(factor=-2.0)}, ["'rope_parameters.factor'"]),
    ("llama3", {"rope_parameters": _rope(factor=nan)}, ["'rope_parameters.factor'"]),
    ("llama3", {"rope_parameters": _rope(factor="8")}, ["'rope_parameters.factor'", "'8'"]),
    ("llama3", {"rope_parameters": _rope(high_freq_factor=1.0)}, ["'rope_parameters.high_freq_factor'",
                                                                  "low_freq_factor"]),
    ("llama3", {"rope_parameters": _rope(low_freq_factor=inf)}, ["'rope_parameters.low_freq_factor'"]),
    ("llama3", {"rope_parameters": _rope(original_max_position_embeddings=0)},
     ["'rope_parameters.original_max_position_embeddings'"]),
    ("llama3", {"rope_parameters": _rope(original_max_position_embeddings="64")},
     ["'rope_parameters.original_max_position_embeddings'"]),
    ("llama3", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, ["'rope_parameters.factor'"]),
    ("llama3", {"rope_parameters": DELETE, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                             "original_max_position_embeddings": 64}},
     ["'rope_scaling.low_freq_factor'"]),
    ("llama3", {"rope_parameters": DELETE, "rope_scaling": {"type": "linear", "factor": "2"}},
     ["'rope_scaling.factor'"]),
    ("llama3", {"rope_parameters": DELETE, "rope_scaling": "linear"}, ["'rope_scaling'", "object"]),
    ("llama3", {"rope_parameters": "default"}, ["'rope_parameters'", "object"]),
    ("llama3", {"rope_parameters": _rope(rope_type=3)}, ["'rope_parameters.rope_type'"]),
    ("llama3", {"num_key_value_heads": 0}, ["'num_key_value_heads'", "positive integer"]),
    ("llama3", {"num_key_value_heads": -2}, ["'num_key_value_heads'"]),
    ("llama3", {"num_key_value_heads": 2.0}, ["'num_key_value_heads'"]),
    ("llama3", {"num_key_value_heads": "2"}, ["'num_key_value_heads'", "'2'"]),
    ("llama3", {"num_key_value_heads": 3}, ["num_key_value_heads", "not a multiple"]),
    ("llama3", {"head_dim": 0}, ["'head_dim'"]),
    ("llama3", {"head_dim": "16"}, ["'head_dim'"]),
    ("llama3", {"head_dim": 15}, ["'head_dim'", "even"]),
    ("llama3", {"max_position_embeddings": 0}, ["'max_position_embeddings'"]),
    ("llama3", {"max_position_embeddings": 256.0}, ["'max_position_embeddings'"]),
    ("llama3", {"vocab_size": True}, ["'vocab_size'"]),
    ("llama3", {"hidden_size": "64"}, ["'hidden_size'", "'64'"]),
    ("llama3", {"num_hidden_layers": 2.0}, ["'num_hidden_layers'"]),
    ("llama3", {"bos_token_id": "1"}, ["'bos_token_id'", "integer"]),
    ("llama3", {"eos_token_id": [2, "3"]}, ["'eos_token_id'"]),
    ("llama3", {"eos_token_id": 2.0}, ["'eos_token_id'"]),
    ("llama3", {"pad_token_id": True}, ["'pad_token_id'"]),
    ("llama3", {"bos_token_id": {"id": 1}}, ["'bos_token_id'"]),
    ("qwen2", {"layer_types": "full_attention"}, ["'layer_types'", "list"]),
    ("qwen2", {"layer_types": [1, 2]}, ["'layer_types'"]),
    ("qwen2", {"layer_types": ["full_attention"]}, ["layer_types", "1 entries for 2 layers"]),
    ("qwen2", {"layer_types": DELETE, "max_window_layers": "1"}, ["'max_window_layers'"]),
    ("qwen2", {"layer_types": DELETE, "max_window_layers": -1}, ["'max_window_layers'"]),
    ("llama3", {"model_type": ["llama"]}, ["model_type"]),
    ("llama3", {"hidden_act": None}, ["hidden_act"]),
    # sizes no model has: a corrupted number would overflow or build a 10^9-entry layer list
    ("llama3", {"vocab_size": 10**30}, ["'vocab_size'", "up to 2,147,483,647"]),
    ("llama3", {"hidden_size": 10**30}, ["'hidden_size'"]),
    ("llama3", {"intermediate_size": 2**31}, ["'intermediate_size'"]),
    ("llama3", {"num_hidden_layers": 10**9}, ["'num_hidden_layers'", "up to 65,536"]),
    # token ids the model cannot produce or embed
    ("llama3", {"eos_token_id": -1}, ["'eos_token_id'", "[0, 131)"]),
    ("llama3", {"eos_token_id": 10**9}, ["'eos_token_id'", "[0, 131)"]),
    ("llama3", {"eos_token_id": [2, 131]}, ["'eos_token_id'"]),
    ("llama3", {"bos_token_id": 131}, ["'bos_token_id'"]),
    ("llama3", {"pad_token_id": [1, 2]}, ["'pad_token_id'", "[-1, 131)"]),
    ("llama3", {"pad_token_id": -2}, ["'pad_token_id'"]),
    ("llama3", {"rope_parameters": _rope(rope_type="dynamic")}, ["'rope_parameters.rope_type'", "'dynamic'"]),
]


@pytest.mark.parametrize("template, edits, words", BAD_CONFIGS,
                         ids=[f"{t}-{'-'.join(e)}-{i}" for i, (t, e, _) in enumerate(BAD_CONFIGS)])
def test_bad_config_fields_are_refused_naming_file_and_field(templates, tmp_path, template, edits, words):
    path = _copy(templates, template, tmp_path)
    _edit_config(path, edits)
    message = _refused(path, ConfigError, path / "config.json", *words)
    assert message.startswith(f"{path / 'config.json'}: ") and message.count(str(path)) == 1, message


@pytest.mark.parametrize("text, words", [
    ("[1, 2]", ["a JSON object", "array"]),
    ('"llama"', ["a JSON object", "string"]),
    ('{"model_type": "llama", "model_type": "mistral"}', ["'model_type'", "twice"]),
    (b'{"model_type": "llama\xff"}', ["UTF-8"]),
    ("", ["not valid JSON"]),
    ("[" * 100000 + "]" * 100000, ["not valid JSON", "nested too deeply"]),
])
def test_config_json_that_is_not_an_object(templates, tmp_path, text, words):
    path = _copy(templates, "llama3", tmp_path)
    target = path / "config.json"
    target.write_bytes(text if isinstance(text, bytes) else text.encode())
    _refused(path, ConfigError, target, *words)


def test_legitimate_values_transformers_and_hub_configs_use_are_accepted(templates, tmp_path):
    path = _copy(templates, "llama3", tmp_path)
    _edit_config(path, {"rope_parameters": DELETE, "rope_theta": 500000, "head_dim": None, "eos_token_id": [2, 3], "pad_token_id": -1, "bos_token_id": None,
                        "sliding_window": None, "max_position_embeddings": None, "tie_word_embeddings": None,
                        "rope_scaling": {"type": "llama3", "factor": 8, "low_freq_factor": 1,
                                         "high_freq_factor": 4, "original_max_position_embeddings": 64}})
    config = ModelConfig.from_file(path)
    assert (config.rope_theta, config.num_key_value_heads, config.head_dim) == (500000.0, 2, 16)
    assert config.eos_token_id == [2, 3] and config.pad_token_id == -1 and config.sliding_window is None
    assert config.rope_scaling["rope_type"] == "llama3" and config.max_position_embeddings == 2048
    assert not config.tie_word_embeddings
    mc.load_model(path)  # the hub's config spelling loads the same weights
    qwen = _copy(templates, "qwen2", tmp_path)
    _edit_config(qwen, {"sliding_window": 131072, "use_sliding_window": False, "rope_scaling": None,
                        "layer_types": DELETE, "max_window_layers": 21, "num_key_value_heads": None})
    config = ModelConfig.from_file(qwen)
    assert config.sliding_window is None and config.num_key_value_heads == config.num_attention_heads


def test_string_false_no_longer_drops_lm_head(templates, tmp_path):
    """The real case: "tie_word_embeddings": "false" read as True silently replaced lm_head by the embeddings."""
    path = _copy(templates, "llama3", tmp_path)
    _edit_config(path, {"tie_word_embeddings": "false"})
    _refused(path, ConfigError, "tie_word_embeddings")


# -- the shard index --------------------------------------------------------------------------------------

def _index(path):
    return json.loads((path / "model.safetensors.index.json").read_text())


def _write_index(path, index):
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def _shards(path):
    return sorted(path.glob("model-*-of-*.safetensors"))


@pytest.mark.parametrize("index, words", [
    ([1, 2], ["a JSON object"]),
    ({"metadata": {}}, ["'weight_map'"]),
    ({"weight_map": ["model-00001-of-00002.safetensors"]}, ["'weight_map'", "object"]),
    ({"weight_map": {"lm_head.weight": 3}}, ["lm_head.weight", "3"]),
    ({"weight_map": {"lm_head.weight": ""}}, ["lm_head.weight"]),
    ({"weight_map": {}}, ["'weight_map'", "empty"]),
])
def test_malformed_index(templates, tmp_path, index, words):
    path = _copy(templates, "sharded", tmp_path)
    _write_index(path, index)
    _refused(path, CheckpointError, path / "model.safetensors.index.json", *words)


@pytest.mark.parametrize("layers", [3, 65536])
def test_layer_count_that_the_weights_do_not_hold(templates, tmp_path, layers):
    """Checked against the tensor names before a model of that many layers is built."""
    path = _copy(templates, "llama3", tmp_path)
    _edit_config(path, {"num_hidden_layers": layers})
    _refused(path, CheckpointError, path / "config.json", f"'num_hidden_layers' is {layers}", "up to 1 only")


def test_duplicate_key_in_index(templates, tmp_path):
    path = _copy(templates, "sharded", tmp_path)
    text = (path / "model.safetensors.index.json").read_text()
    text = text.replace('"weight_map": {', '"weight_map": {\n    "lm_head.weight": "model-00001-of-00009.safetensors",')
    (path / "model.safetensors.index.json").write_text(text)
    _refused(path, CheckpointError, path / "model.safetensors.index.json", "'lm_head.weight'", "twice")


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink", "pickle"])
def test_index_may_only_name_safetensors_files_inside_the_folder(templates, tmp_path, where):
    path = _copy(templates, "sharded", tmp_path)
    index = _index(path)
    first = _shards(path)[0]
    outside = tmp_path / "outside.safetensors"
    shutil.copy(first, outside)
    name = {"parent": "../outside.safetensors", "absolute": str(outside), "symlink": "link.safetensors",
            "pickle": "pytorch_model.bin"}[where]
    if where == "symlink":
        (path / name).symlink_to(outside)
    if where == "pickle":
        torch.save(load_file(first), path / name)
    index["weight_map"] = {k: name if v == first.name else v for k, v in index["weight_map"].items()}
    _write_index(path, index)
    _refused(path, CheckpointError, path / "model.safetensors.index.json", name)


def test_hub_cache_layout_links_into_blobs_load(templates, tmp_path):
    """The Hugging Face hub cache keeps files in <repo>/blobs and links snapshots/<revision>/<file> to them:
    links that leave the folder, but into the one place that layout allows."""
    repo = tmp_path / "models--tiny"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in (templates / "sharded").iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    mc.load_model(snapshot)


def test_tensor_in_a_shard_the_index_does_not_name(templates, tmp_path):
    path = _copy(templates, "sharded", tmp_path)
    index = _index(path)
    names = list(index["weight_map"].values())
    first = next(p for p in _shards(path) if names.count(p.name) > 1)  # still read once the entry moves
    second = next(p for p in _shards(path) if p != first)
    name = next(k for k, v in index["weight_map"].items() if v == first.name)
    index["weight_map"][name] = second.name  # the index says one shard, the tensor lives in another
    _write_index(path, index)
    _refused(path, CheckpointError, name, first, second.name)


def test_tensor_in_two_shards(templates, tmp_path):
    """The later copy used to win silently; now both files are named."""
    path = _copy(templates, "sharded", tmp_path)
    index = _index(path)
    first, second = _shards(path)[:2]
    name = next(k for k, v in index["weight_map"].items() if v == first.name)
    extra = load_file(second)
    extra[name] = torch.zeros_like(load_file(first)[name])
    save_file(extra, second, metadata={"format": "pt"})
    _refused(path, CheckpointError, name, first.name, second.name)


def test_tensor_the_index_lists_but_no_shard_holds(templates, tmp_path):
    path = _copy(templates, "sharded", tmp_path)
    index = _index(path)
    index["weight_map"]["model.layers.7.mlp.up_proj.weight"] = _shards(path)[0].name
    _write_index(path, index)
    _refused(path, CheckpointError, path / "model.safetensors.index.json", "model.layers.7.mlp.up_proj.weight",
             _shards(path)[0].name)


def test_tensor_a_shard_holds_but_the_index_does_not_list(templates, tmp_path):
    path = _copy(templates, "sharded", tmp_path)
    index = _index(path)
    names = list(index["weight_map"].values())
    name, shard = next((k, v) for k, v in index["weight_map"].items() if names.count(v) > 1)
    del index["weight_map"][name]
    _write_index(path, index)
    _refused(path, CheckpointError, path / shard, name, "model.safetensors.index.json")


def test_duplicate_tensor_across_pickle_files(templates, tmp_path):
    path = _copy(templates, "llama3", tmp_path)
    state = load_file(path / "model.safetensors")
    keys = sorted(state)
    torch.save({k: state[k] for k in keys[:5]}, path / "pytorch_model-00001-of-00002.bin")
    torch.save({k: state[k] for k in keys[4:]}, path / "pytorch_model-00002-of-00002.bin")
    (path / "model.safetensors").unlink()
    _refused(path, CheckpointError, keys[4], "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
             allow_pickle=True)


# -- non-finite and non-float weights ---------------------------------------------------------------------

@pytest.mark.parametrize("value, dtype, words", [
    (nan, torch.float32, ["NaN or Inf"]),
    (-inf, torch.float32, ["NaN or Inf"]),
    (1e6, torch.float16, ["float16"]),  # finite in the file, infinite once cast
])
def test_non_finite_weights(templates, tmp_path, value, dtype, words):
    path = _copy(templates, "llama3", tmp_path)
    state = load_file(path / "model.safetensors")
    state["model.layers.1.mlp.down_proj.weight"][3, 5] = value
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    _refused(path, CheckpointError, path / "model.safetensors", "model.layers.1.mlp.down_proj.weight", *words,
             dtype=dtype)


def test_integer_weight(templates, tmp_path):
    path = _copy(templates, "llama3", tmp_path)
    state = load_file(path / "model.safetensors")
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.int64)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    _refused(path, CheckpointError, path / "model.safetensors", "model.norm.weight", "int64")


# -- the bitsandbytes 4-bit state -------------------------------------------------------------------------

PREFIX = "model.layers.0.mlp.up_proj.weight"
QS = f"{PREFIX}.quant_state.bitsandbytes__nf4"


def _meta(tensors):
    return json.loads(bytes(tensors[QS].numpy()).decode())


def _blob(obj):
    data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return torch.tensor(list(data), dtype=torch.uint8)


def _meta_edit(**changes):
    def edit(tensors):
        meta = {**_meta(tensors), **changes}
        tensors[QS] = _blob({k: v for k, v in meta.items() if v is not DELETE})
    return edit


def _set(suffix, fn):
    def edit(tensors):
        key = f"{PREFIX}.{suffix}" if suffix else PREFIX
        tensors[key] = fn(tensors[key].clone())
    return edit


def _poke(value, i=0):
    def fn(t):
        t.view(-1)[i] = value
        return t
    return fn


BAD_4BIT = [
    # (edit, the key the message names, words)
    (lambda t: t.__setitem__(QS, _blob(b'{"quant_type": "nf4\xff"}')), QS, ["UTF-8"]),
    (lambda t: t.__setitem__(QS, _blob([1, 2])), QS, ["JSON object"]),
    (lambda t: t.__setitem__(QS, _blob(_meta(t)).float()), QS, ["uint8"]),
    (_meta_edit(blocksize=64.0), QS, ["blocksize"]),
    (_meta_edit(blocksize=65), QS, ["blocksize"]),
    (_meta_edit(blocksize=True), QS, ["blocksize"]),
    (_meta_edit(shape=[88, -64]), QS, ["shape"]),
    (_meta_edit(shape="88x64"), QS, ["shape"]),
    (_meta_edit(shape=[]), QS, ["shape"]),
    (_meta_edit(shape=[88.0, 64]), QS, ["shape"]),
    (_meta_edit(dtype="float64"), QS, ["dtype"]),
    (_meta_edit(dtype=5), QS, ["dtype"]),
    (_meta_edit(quant_type="fp4"), QS, ["quant_type"]),
    (_meta_edit(nested_offset=nan), QS, ["nested_offset"]),
    (_meta_edit(nested_offset="0.1"), QS, ["nested_offset"]),
    (_meta_edit(nested_blocksize=0), QS, ["nested_blocksize"]),
    (_meta_edit(nested_blocksize=DELETE), QS, ["nested_blocksize"]),
    (_meta_edit(nested_dtype="int8"), QS, ["nested_dtype"]),
    (_set("quant_map", _poke(nan, 3)), f"{PREFIX}.quant_map", ["NaN or Inf"]),
    (_set("quant_map", _poke(0.5, 3)), f"{PREFIX}.quant_map", ["nf4"]),
    (_set("quant_map", lambda t: t.to(torch.int32)), f"{PREFIX}.quant_map", ["int32"]),
    (_set("nested_absmax", _poke(inf)), f"{PREFIX}.nested_absmax", ["NaN or Inf"]),
    (_set("nested_absmax", lambda t: t.half()), f"{PREFIX}.nested_absmax", ["float16"]),
    (_set("nested_quant_map", _poke(nan, 7)), f"{PREFIX}.nested_quant_map", ["NaN or Inf"]),
    (_set("absmax", lambda t: t[:-1]), f"{PREFIX}.absmax", ["blocks"]),
    (_set("absmax", lambda t: t.float()), f"{PREFIX}.absmax", ["uint8"]),
    (_set("", lambda t: t[:-1]), PREFIX, ["uint8"]),
    (lambda t: t.pop(f"{PREFIX}.nested_quant_map"), f"{PREFIX}.nested_quant_map", ["missing"]),
    (lambda t: t.pop(f"{PREFIX}.nested_absmax"), f"{PREFIX}", ["nested"]),
]


@pytest.mark.parametrize("edit, key, words", BAD_4BIT, ids=[f"{k.rsplit('.', 1)[-1]}-{i}"
                                                             for i, (_, k, _) in enumerate(BAD_4BIT)])
def test_bad_4bit_state_names_file_and_tensor(templates, tmp_path, edit, key, words):
    path = _copy(templates, "nf4", tmp_path)
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    message = _refused(path, ValueError, path / "model.safetensors", key, *words)
    assert message.startswith(f"{path / 'model.safetensors'}: "), message


def test_nan_absmax_without_double_quantization():
    state = nf4.quantize(torch.randn(40, 70), 64, double_quant=False)
    tensors = nf4.to_state_dict(state, "w")
    tensors["w.absmax"][5] = nan
    with pytest.raises(nf4.QuantError, match=r"^f\.safetensors: w\.absmax .*NaN or Inf"):
        nf4.from_state_dict(tensors, "w", where="f.safetensors")
    tensors["w.absmax"][5] = 1.0
    nf4.from_state_dict(tensors, "w", where="f.safetensors")  # and the repaired state loads


@pytest.mark.parametrize("case", ["nan-bias", "bias-model-lacks", "not-a-linear"])
def test_4bit_layers_the_model_cannot_take(templates, tmp_path, case):
    path = _copy(templates, "nf4", tmp_path)
    tensors = load_file(path / "model.safetensors")
    module = PREFIX.removesuffix(".weight")
    if case == "nan-bias":  # a bias where the config has none is the second case; give one, NaN
        tensors[f"{module}.bias"] = torch.full((88,), nan)
        words = [f"{module}.bias"]
    elif case == "bias-model-lacks":
        tensors[f"{module}.bias"] = torch.zeros(88)
        words = [f"{module}.bias", "no bias"]
    else:
        for k in [k for k in tensors if k.startswith(PREFIX)]:
            tensors[k.replace(PREFIX, "model.norm.weight")] = tensors.pop(k)
        words = ["model.norm", "not a linear"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    _refused(path, CheckpointError, path / "model.safetensors", *words)


# -- writing: permissions, leftovers, a full disk ---------------------------------------------------------

@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_files_follow_the_umask(templates, tmp_path, umask, mask, mode):
    model = mc.load_model(templates / "llama3")
    umask(mask)
    out = mc.save_model(model, tmp_path / "out")
    for name in ("config.json", "model.safetensors"):
        assert (out / name).stat().st_mode & 0o777 == mode, name


def _leftover(folder, target, writer=None):
    """A temp file as atomic_write names it; writer=None is the name older versions used."""
    random = "k3x_9q2z" if writer is None else f"mc-{writer[0]}-{writer[1]}.0badcafe"
    p = folder / f".{target}.{random}.tmp"
    p.write_bytes(b"half a file")
    return p


def _dead_pid():
    pid = 2 ** 22 - 3
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_stale_temp_files_are_removed_on_the_next_write(templates, tmp_path):
    model = mc.load_model(templates / "llama3")
    out = tmp_path / "out"
    out.mkdir()
    host = files.host_tag()
    dead = _leftover(out, "model-00002-of-00003.safetensors", (host, _dead_pid()))
    os.utime(dead, (time.time() - 120, time.time() - 120))  # its writer gone, untouched for two minutes
    stale = [_leftover(out, "model.safetensors"), _leftover(out, "config.json"), dead]
    old = _leftover(out, "config.json", ("otherhost", 123))
    os.utime(old, (0, 0))  # another machine's, days old
    stale.append(old)
    kept = [_leftover(out, "config.json", (host, os.getppid())),  # a live writer on this machine
            _leftover(out, "config.json", ("otherhost", 124)),  # another machine's, recent
            _leftover(out, "config.json", (host, _dead_pid())),  # a pid gone here, but just written: another
                                                                  # container's (same hostname, own pids)?
            _leftover(out, "notes.txt"),  # a name this save does not write (an older format's leftover)
            out / ".config.json.k3x_9q2z.tmp.bak", out / "config.json.k3x_9q2z.tmp"]
    for p in kept[-2:]:
        p.write_text("mine")
    mc.save_model(model, out)
    assert not [p.name for p in stale if p.exists()]
    assert all(p.exists() for p in kept)


def test_temp_names_are_recognised(tmp_path):
    """The name a write in flight has is one the cleanup recognises as its own, and the writer is this process."""
    seen = []
    files.atomic_write(tmp_path / "x.json", lambda tmp: seen.append(tmp.name) or tmp.write_text("{}"))
    assert seen[0].startswith(f".x.json.mc-{files.host_tag()}-{os.getpid()}.") and seen[0].endswith(".tmp")
    assert (tmp_path / "x.json").read_text() == "{}"


def _no_space(fail_at=1):
    calls = []

    def save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) >= fail_at:
            with open(filename, "wb") as f:
                f.write(b"partial")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        save_file(tensors, filename, metadata=metadata)
    return save


@pytest.mark.parametrize("template, shard_size, fail_at", [("llama3", 4 << 30, 1), ("sharded", 20_000, 2)])
def test_disk_full_leaves_the_old_checkpoint_and_no_temp_file(templates, tmp_path, monkeypatch, template,
                                                              shard_size, fail_at):
    path = _copy(templates, template, tmp_path)
    model = mc.load_model(path)
    before = _snapshot(path)
    monkeypatch.setattr(ckpt, "save_file", _no_space(fail_at))
    with pytest.raises(OSError) as e:
        mc.save_model(model, path, max_shard_size=shard_size)
    assert e.value.errno == errno.ENOSPC
    assert str(path) in str(e.value) and ".safetensors" in str(e.value) and "\n" not in str(e.value)
    assert ".tmp" not in str(e.value)
    assert _snapshot(path) == before  # no temp file, every old file as it was


def test_disk_full_as_oserror_from_a_json_write(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    before = _snapshot(tmp_path)

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))
    monkeypatch.setattr(type(tmp_path), "write_text", full)
    with pytest.raises(OSError, match=r"No space left on device: '.*config\.json'") as e:
        files.write_json(tmp_path / "config.json", {"a": 1})
    assert e.value.errno == errno.ENOSPC and ".tmp" not in str(e.value)
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before


def test_resharding_removes_shards_the_new_index_does_not_name(templates, tmp_path):
    path = _copy(templates, "sharded", tmp_path)
    assert len(_shards(path)) > 3
    model = mc.load_model(path)
    mc.save_model(model, path, max_shard_size=60_000)
    names = set(_index(path)["weight_map"].values())
    assert {p.name for p in _shards(path)} == names
    mc.save_model(model, path)
    assert not _shards(path) and not (path / "model.safetensors.index.json").exists()
    mc.load_model(path)

