"""One registry: a method defined outside the package, in a module of its own, joins through the registry
alone and is then a method like the others: `train sft --method` trains it, `--help` lists it and its
option, its adapter folder saves and loads through the registry's dispatch, and `compare` runs it in a
worker process of its own. Nothing in minicustom/ is edited for it."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from test_compare import record

import minicustom as mc
from minicustom.cli import main
from minicustom.compare import CompareConfig, compare, default_methods
from minicustom.methods import (
    REGISTRY,
    Method,
    Option,
    adapter_configs,
    adapter_layers,
    apply_method,
    register,
)
from minicustom.methods.registry import check_options

# "Scale every linear by a learned scalar": y = g (W x + b), g starting at `init`. Its own file, and one
# registry line: the `register(...)` at the end.
TOY = textwrap.dedent('''
    """A toy method: every linear but lm_head is scaled by one learned scalar g, y = g (W x + b)."""
    from dataclasses import dataclass
    from typing import ClassVar

    import torch
    from torch import nn

    from minicustom.argtypes import POSITIVE
    from minicustom.methods import Method, Option, register
    from minicustom.methods.base import LinearAdapterLayer, adapter_configs, find_targets, register_config, set_adapter
    from minicustom.methods.peft_format import PREFIX


    @dataclass
    class ScaleConfig:
        peft_type: ClassVar[str] = "SCALE"
        init: float = 1.0


    class ScaledLinear(LinearAdapterLayer):
        def __init__(self, base):
            super().__init__()
            self.hold(base)
            self.scale = nn.ParameterDict()
            self.active, self.merged = [], {}

        def forward(self, x):
            y = self.base_forward(x)
            for name in self.active:
                y = y * self.scale[name]
            return y

        @property
        def adapters(self):
            return list(self.scale)

        def adapter_state(self, name):
            return {"scale": self.scale[name]}

        def delete(self, name):
            del self.scale[name]
            self.active = [a for a in self.active if a != name]


    def apply_scale(model, init=1.0, adapter_name="default"):
        config = ScaleConfig(init)
        for name in find_targets(model, "all-linear"):
            module = ScaledLinear(model.get_submodule(name))
            module.scale[adapter_name] = nn.Parameter(torch.tensor(float(init)))
            model.set_submodule(name, module)
        register_config(model, adapter_name, config)
        set_adapter(model, adapter_name)
        return model


    def to_peft(model, name):
        tensors = {f"{PREFIX}{n}.scale": m.scale[name] for n, m in model.named_modules()
                   if isinstance(m, ScaledLinear) and name in m.scale}
        return {"peft_type": "SCALE", "init": adapter_configs(model)[name].init}, tensors, {}


    def load_peft(model, path, config, tensors, name):
        apply_scale(model, config["init"], name)
        with torch.no_grad():
            for key, t in tensors.items():
                model.get_submodule(key.removeprefix(PREFIX).removesuffix(".scale")).scale[name].copy_(t)


    register(Method("scale", apply_scale, "every linear scaled by one learned scalar", lr=1e-2, mergeable=False,
                    peft_type="SCALE", options=(Option("init", 1.0, "the scalars' start", type=POSITIVE),),
                    to_peft=to_peft, load_peft=load_peft))
''')


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy method's module on sys.path (and PYTHONPATH, for worker processes); unregistered after."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "toy_scale.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", str(folder))
    yield "toy_scale"
    REGISTRY.pop("scale", None)
    sys.modules.pop("toy_scale", None)


def test_a_method_joins_through_the_registry_and_trains(setup, toy, tmp_path, capsys):
    root, path = setup
    assert "scale" not in REGISTRY
    with pytest.raises(SystemExit):
        main(["--import", toy, "train", "sft", "--help"])
    help_text = capsys.readouterr().out
    assert "  scale" in help_text and "every linear scaled by one learned scalar" in help_text
    assert "--init INIT" in help_text and "the scalars' start (default 1.0; methods: scale)" in help_text

    out = tmp_path / "run"
    main(["--import", toy, "train", "sft", "--model", path, "--data", root / "train.jsonl", "--out", out,
          "--method", "scale", "--init", "0.5", "--max-steps", "3", "--batch-size", "2", "--max-length", "64",
          "--exact-match", "0"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert json.loads((out / "adapter_config.json").read_text()) == {"peft_type": "SCALE", "init": 0.5,
                                                                      "base_model_name_or_path": str(path)}
    # No --lr: the method's own (1e-2, from its entry) at the first step of a cosine schedule without warmup.
    recorded = json.loads((out / "train_config.json").read_text())
    assert recorded["lr"] == 1e-2 and recorded["init"] == 0.5 and recorded["method"] == "scale"
    assert next(r for r in rows if "loss" in r)["lr"] == pytest.approx(1e-2)
    model = mc.load_model(path)
    mc.load_adapter(model, out)  # the registry's dispatch finds the toy's load_peft by peft_type
    scales = [m.scale["default"].item() for m in model.modules() if hasattr(m, "scale")]
    assert len(scales) == 7 * model.config.num_hidden_layers and all(s != 0.5 for s in scales)

    fresh = apply_method(mc.load_model(path), "scale", init=0.5)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), mc.disable_adapters(fresh):
        base = fresh(ids)
    with torch.no_grad():  # y = 0.5 (W x + b) in every linear but lm_head: not the base
        assert not torch.allclose(fresh(ids), base)


@pytest.mark.slow  # a worker process
def test_compare_runs_a_registered_method_in_its_worker(setup, toy, tmp_path):
    _, path = setup
    __import__(toy)
    assert "scale" in default_methods()  # not a variant of another method: compare runs it unless told
    folder = tmp_path / "task"
    folder.mkdir()
    cities = ["Paris", "Lima", "Oslo", "Rome"]
    for name, rows in (("train", [record(i, c) for i, c in enumerate(cities)]),
                       ("test", [record(10 + i, c) for i, c in enumerate(cities[:2])])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "task.json").write_text(json.dumps({"name": "toy", "scorer": "exact", "max_new_tokens": 2}))
    rows = compare(path, folder, tmp_path / "out", ["scale"], CompareConfig(examples=4, epochs=1, batch_size=2),
                   report=lambda s: None)
    assert [r["method"] for r in rows] == ["scale"]
    assert rows[0]["trainable_params"] == 7 * 2 and rows[0]["train_tokens"] > 0 and rows[0]["n_test"] == 2
    assert "| scale |" in (tmp_path / "out" / "comparison.md").read_text()


def test_an_import_that_fails_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--import", "no_such_module_here", "train", "sft", "--help"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == ("minicustom: --import no_such_module_here: No module named "
                                              "'no_such_module_here'")


def test_the_command_line_imports_the_module_in_a_fresh_process(setup, toy):
    out = subprocess.run([sys.executable, "-m", "minicustom", "--import", toy, "train", "sft", "--help"],
                         capture_output=True, text=True, check=True)
    assert "every linear scaled by one learned scalar" in out.stdout


BUILT_IN = list(REGISTRY)


@pytest.mark.parametrize("name", BUILT_IN)
def test_each_entry_says_what_its_method_does(setup, tmp_path, name):
    """An entry's PEFT type and mergeable flag are those of what its apply attaches, and the registry's
    dispatch writes the adapter and reads it back onto a fresh base: the same logits."""
    _, path = setup
    entry = REGISTRY[name]
    base = dict(quantize="nf4") if name == "qlora" else {}
    model = mc.load_model(path, **base)
    torch.manual_seed(0)
    apply_method(model, name)
    with torch.no_grad():  # move every trainable tensor off its (often identity) start
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    if entry.peft_type is None:
        assert adapter_configs(model) == {} and all(p.requires_grad for p in model.parameters())
        return
    assert [c.peft_type for c in adapter_configs(model).values()] == [entry.peft_type]
    assert entry.mergeable == all(layer.mergeable for _, layer in adapter_layers(model))
    if name == "qlora-loftq":
        return  # its adapter fits LoftQ's own 4-bit base, which is saved with the model, not the adapter
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        expected = model(ids)
    mc.save_adapter(model, tmp_path / name)
    fresh = mc.load_adapter(mc.load_model(path, **base), tmp_path / name)
    # PiSSA and OLoRA are saved as PEFT's conversion, rank 2r on the original base: W0 - s B0 A0 + s B0 A0 is W0
    # only up to the fp32 rounding of the subtraction at init (a few ulps of W0, summed over the layers).
    tol = 1e-4 if name in ("pissa", "olora") else 1e-5
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), expected, atol=tol, rtol=tol)


def test_a_shared_option_means_one_thing():
    for m in REGISTRY.values():
        check_options(m, [x for x in REGISTRY.values() if x is not m])
    odd = Method("odd-dropout", lambda model, dropout="x": model, "a clash", lr=1e-3, mergeable=False,
                 options=(Option("dropout", "x", "not a number", choices=("x", "y")),))
    with pytest.raises(ValueError, match="option 'dropout' differs from method adapter's"):
        register(odd)
    assert "odd-dropout" not in REGISTRY


def test_an_option_that_takes_a_trainer_flag_is_named(monkeypatch, capsys):
    monkeypatch.setitem(REGISTRY, "seedy", Method("seedy", lambda model, seed=1: model, "a clash", lr=1e-3,
                                                 mergeable=False, options=(Option("seed", 1, "its seed", type=int),)))
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == ("minicustom: method seedy: option --seed is already a flag of the "
                                              "train command; rename the option")


def test_merge_refuses_a_method_the_registry_calls_unmergeable(setup, tmp_path, capsys):
    _, path = setup
    model = apply_method(mc.load_model(path), "prefix")
    mc.save_adapter(model, tmp_path / "prefix")
    with pytest.raises(SystemExit):
        main(["merge", "--model", path, "--adapter", tmp_path / "prefix", "--out", tmp_path / "merged"])
    assert "a prefix adapter has nothing to fold into the base weights" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("value", ["abc", "0", "q_proj,nope"])
def test_targets_that_name_no_layer_are_refused_by_name(setup, tmp_path, capsys, value):
    root, path = setup
    with pytest.raises(SystemExit):
        main(["train", "sft", "--model", path, "--data", root / "train.jsonl", "--out", tmp_path / "run",
              "--targets", value, "--max-steps", "1"])
    err = capsys.readouterr().err
    assert f"--targets {value}: no linear or embedding layer of the model is named" in err
    assert "(its layers: " in err and "q_proj" in err and not (tmp_path / "run").exists()


def test_targets_by_name_select_every_layer_s_module(setup, tmp_path):
    """--targets q_proj,v_proj: the names match the end of module names (a lone name is not a regex)."""
    root, path = setup
    main(["train", "sft", "--model", path, "--data", root / "train.jsonl", "--out", tmp_path / "run",
          "--targets", "q_proj", "--max-steps", "1", "--batch-size", "2", "--max-length", "64", "--exact-match", "0"])
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj"]
