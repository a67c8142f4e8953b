"""Loading and saving Hugging Face checkpoint folders, and every way a folder can be wrong."""

import json

import pytest
import torch
from conftest import make_checkpoint
from safetensors.torch import load_file, save_file

import minicustom as mc
from minicustom import CheckpointError, ConfigError


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_save_load_round_trip_is_exact(tmp_path):
    path, _ = make_checkpoint(tmp_path / "src", "qwen3")
    model = mc.load_model(path)
    mc.save_model(model, tmp_path / "out")
    _same_state(model, mc.load_model(tmp_path / "out"))
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_sharded_save_and_load(tmp_path):
    path, hf = make_checkpoint(tmp_path / "src", "smollm")
    model = mc.load_model(path)
    mc.save_model(model, tmp_path / "out", max_shard_size=20_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert "lm_head.weight" not in index["weight_map"]  # tied: stored once, as HF does
    _same_state(model, mc.load_model(tmp_path / "out"))


def test_transformers_loads_what_we_save(tmp_path):
    import transformers

    path, hf = make_checkpoint(tmp_path / "src", "llama-bias")
    mc.save_model(mc.load_model(path), tmp_path / "out", max_shard_size=30_000)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(3, 131, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, hf(ids).logits, atol=0, rtol=0)


def test_dtype_and_bf16_checkpoints(tmp_path):
    path, _ = make_checkpoint(tmp_path / "src", "qwen2")
    model = mc.load_model(path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    mc.save_model(model, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = mc.load_model(tmp_path / "bf16", dtype=torch.float32)
    for (n, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(p.float(), q), n


def test_old_style_inv_freq_keys_are_ignored(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama3")
    state = load_file(path / "model.safetensors")
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(state, path / "model.safetensors")
    mc.load_model(path)


# -- bad input: each a clear error naming what is wrong and where ----------------------------------

def test_missing_shard(tmp_path):
    path, _ = make_checkpoint(tmp_path / "src", "llama3")
    mc.save_model(mc.load_model(path), tmp_path / "out", max_shard_size=20_000)
    shard = sorted((tmp_path / "out").glob("model-00002-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"lists shards that are not in .*: {shard.name}"):
        mc.load_model(tmp_path / "out")


def test_truncated_safetensors(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama3")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        mc.load_model(path)


def test_corrupt_safetensors_header(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama3")
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"#" * 32  # garbage inside the JSON header
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        mc.load_model(path)


def test_unknown_model_type(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama3")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: model_type 'gpt_neox' is not supported; supported: llama"):
        mc.load_model(path)


@pytest.mark.parametrize("field, value, message", [
    ("hidden_act", "gelu", "hidden_act 'gelu'"),
    ("rope_parameters", {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e4}, "rope type 'dynamic'"),
    ("num_key_value_heads", 3, "not a multiple"),
    ("hidden_size", 0, "'hidden_size' must be a positive integer"),
])
def test_config_fields_that_change_the_math(tmp_path, field, value, message):
    path, _ = make_checkpoint(tmp_path, "llama3")
    cfg = json.loads((path / "config.json").read_text())
    cfg[field] = value
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=message):
        mc.load_model(path)


def test_invalid_config_json(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama3")
    (path / "config.json").write_text('{"model_type": "llama",\n  "hidden_size": }')
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON \(line 2"):
        mc.load_model(path)


def test_shape_mismatch(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama3")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"wrong shape \(6\).*mlp\.down_proj\.weight: checkpoint \(64, 88\), model \(64, 96\)"):
        mc.load_model(path)


def test_missing_and_unexpected_tensors(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama3")
    state = load_file(path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(state, path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        mc.load_model(path)
    assert "missing (1): model.layers.1.mlp.up_proj.weight" in str(e.value)
    assert "unexpected (1): model.layers.1.mlp.extra.weight (in model.safetensors)" in str(e.value)


def test_pickle_refused_unless_opted_in(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama3")
    state = load_file(path / "model.safetensors")
    torch.save(state, path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="pickle"):
        mc.load_model(path)
    model = mc.load_model(path, allow_pickle=True)
    assert torch.equal(model.lm_head.weight, state["lm_head.weight"])


def test_no_weights_and_no_folder(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama3")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        mc.load_model(path)
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        mc.load_model(tmp_path / "nowhere")
