"""Fuzz minicustom's bad-input handling end to end, as a new user meets it (issue #14).

Builds a tiny random Llama checkpoint with minicustom itself (vocab 49152 for the demo model's tokenizer,
hidden 64, 2 layers), sharded and 4-bit copies, LoRA adapters, JSONL data, a task and a tiny GGUF, then
tries a few hundred bad inputs: library calls in this process, each on an edited copy of a fixture; every
numeric option of the subcommands (walking the parser) with negative, zero, NaN, inf, huge and non-numeric
values, run as `python -m minicustom` when the parser takes one; and command lines in subprocesses (stdin
closed, 60 s timeout, 2 at a time). Outcomes: clear (one line naming the file and field / line / tensor /
option; exit 2, 130 after Ctrl-C; from the library a ValueError, OSError or NotImplementedError), traceback,
unclear, accepted-ok / silently-wrong (cases named "(ok)" should be accepted), hang, skipped; flags:
modified-input, wrote-on-failure, changed-model. Memory is capped at 6 GiB (RLIMIT_AS, inherited).

    python scripts/fuzz_bad_inputs.py --out-json /tmp/fuzz/results.json    # a few minutes on 2 cores
    python scripts/fuzz_bad_inputs.py --quick                              # a subset, under a minute
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import resource
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file, save_file

import minicustom as mc
from minicustom import cli, data
from minicustom.cli_common import device_option
from minicustom.gguf import convert_gguf, fetch_demo_model

TIMEOUT, HUGE = 60, str(10**30)
LIB_TYPES = (ValueError, OSError, NotImplementedError)  # ValueError covers ConfigError, CheckpointError, ...
CONFIG = dict(model_type="llama", vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
              tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
ST, AC, AW, TC, TJ, IDX = ("model.safetensors", "adapter_config.json", "adapter_model.safetensors",
                           "tokenizer_config.json", "tokenizer.json", "model.safetensors.index.json")


class Hang(BaseException):
    """A library call that ran past TIMEOUT (raised by SIGALRM)."""

    @staticmethod
    def on_alarm(*_):
        raise Hang()


def build_fixtures(fx: Path) -> dict[str, Path]:
    def tiny(**overrides):
        torch.manual_seed(0)
        return mc.Transformer(mc.ModelConfig.from_dict({**CONFIG, **overrides}))

    demo, model = fetch_demo_model(), tiny()
    f = {k: fx / k for k in ("base", "sharded", "q4", "adapter", "other_adapter", "task")}
    f.update(sft=fx / "data/sft.jsonl", dpo=fx / "data/dpo.jsonl", gguf=fx / "tiny.gguf")
    for name, kwargs in (("base", {}), ("sharded", {"max_shard_size": 1 << 20})):
        mc.save_model(model, f[name], **kwargs)
        for file in (TJ, TC):
            shutil.copy(demo / file, f[name] / file)
    mc.save_model(mc.quantize_model(tiny()), f["q4"])
    mc.save_adapter(mc.apply_lora(model, r=2, targets=["q_proj", "v_proj"], verbose=False), f["adapter"])
    other = tiny(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1)
    mc.save_adapter(mc.apply_lora(other, r=2, targets=["q_proj"], verbose=False), f["other_adapter"])
    f["sft"].parent.mkdir()
    ws = ("yes", "no", "ok")
    f["sft"].write_text("".join(f'{{"prompt": "Say {w}.", "completion": " {w}"}}\n' for w in ws))
    f["dpo"].write_text("".join(f'{{"prompt": "Say {w}.", "chosen": " {w}", "rejected": "."}}\n' for w in ws))
    shutil.copytree(Path(__file__).resolve().parents[1] / "examples/data/tasks/sentiment", f["task"])
    write_gguf(f["gguf"])
    return f


def write_gguf(path: Path, arch="llama"):
    """A tiny valid llama GGUF (one layer, six tokens), written with the gguf package's own writer."""
    rng, C, F, w = np.random.default_rng(0), 32, 40, gguf.GGUFWriter(str(path), arch)
    for add, value in ((w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, C),
                       (w.add_feed_forward_length, F), (w.add_head_count, 2), (w.add_head_count_kv, 1),
                       (w.add_layer_norm_rms_eps, 1e-6), (w.add_tokenizer_model, "gpt2"),
                       (w.add_token_list, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "ab"]),
                       (w.add_tokenizer_pre, "smollm"), (w.add_token_types, [3, 3, 3, 1, 1, 1]),
                       (w.add_token_merges, ["a b"]), (w.add_bos_token_id, 1), (w.add_eos_token_id, 2)):
        add(value)
    for name, shape in {"token_embd": (6, C), "output": (6, C), "output_norm": (C,), "blk.0.attn_norm": (C,),
                        "blk.0.ffn_norm": (C,), "blk.0.attn_q": (C, C), "blk.0.attn_k": (16, C),
                        "blk.0.attn_v": (16, C), "blk.0.attn_output": (C, C), "blk.0.ffn_gate": (F, C),
                        "blk.0.ffn_up": (F, C), "blk.0.ffn_down": (C, F)}.items():
        w.add_tensor(name + ".weight", rng.standard_normal(shape, dtype=np.float32))
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()


def snapshot(*paths) -> dict:
    """path -> (size, mtime, hash of files under 4 MiB) for every file under paths."""
    out = {}
    for p in map(Path, paths):
        for x in sorted(p.rglob("*")) if p.is_dir() else [p] if os.path.lexists(p) else []:
            st = x.lstat()
            small = x.is_file() and not x.is_symlink() and st.st_size < (4 << 20)
            out[str(x)] = (st.st_size, st.st_mtime_ns, small and hashlib.sha1(x.read_bytes()).hexdigest())
    return out


def put(path: Path, content):
    """Replace (or with None remove) a file: unlink first, so a hard link to a fixture is never written."""
    path.unlink(missing_ok=True)
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())


def edit_json(path: Path, key: str, raw: str):
    """Set a top-level field to `raw` JSON text, written as is (NaN, 1e999), or remove it ("missing")."""
    d = json.loads(path.read_text())
    if raw == "missing":
        d.pop(key, None)
    else:
        d[key] = "\0raw"
    put(path, json.dumps(d).replace('"\\u0000raw"', raw))


def edit_tensors(file: Path, change):
    t = load_file(file)
    change(t)
    file.unlink()  # a hard link: unlinking leaves the fixture alone
    save_file(t, file)  # no metadata: an adapter loses its base's fingerprint, shapes alone must tell


def table(text: str) -> list[list[str]]:
    return [[c.strip() for c in (row + " ").split(" | ")] for row in text.strip().splitlines()]


def mutations(text: str):
    """'field: value | value (ok) | ...; field: ...' -> (field, raw JSON value, accepting it is right)."""
    for row in text.strip().replace("; ", "\n").splitlines():
        field, _, values = row.partition(": ")
        yield from ((field, v.removesuffix(" (ok)"), v.endswith(" (ok)")) for v in values.split(" | "))


def classify(ok, kind, lines, names) -> str:
    """kind: None (no error), "expected" (the right kind of error), "other" (a traceback)."""
    if kind is None or kind == "other":
        return "traceback" if kind else "accepted-ok" if ok else "silently-wrong"
    listing = all(line.startswith("  ") for line in lines[1:])  # extra lines: only an indented listing
    named = all(any(a in "\n".join(lines) for a in ((n,) if isinstance(n, str) else n)) for n in names)
    return "clear" if listing and named else "unclear"


class Fuzz:
    def __init__(self, root: Path, quick: bool):
        self.root, self.quick, self.results, self.n, self.model = root, quick, [], 0, None
        (root / "cases").mkdir(parents=True)

    def pick(self, items, every: int = 4) -> list:
        return list(items)[::every] if self.quick else list(items)

    def slot(self, tag: str, make=False) -> Path:
        self.n += 1
        path = self.root / "cases" / f"{self.n:03d}-{tag}"
        return path.mkdir() or path if make else path

    def mutant(self, src: Path, tag: str) -> Path:
        """A copy of a flat fixture folder made of hard links (cheap; `put` breaks the link to edit)."""
        for x in (dst := self.slot(tag, make=True)) and src.iterdir():
            os.link(x, dst / x.name)
        return dst

    def record(self, area, name, call, outcome, message, flags=(), seconds=0.0, **extra):
        call, message = (s.replace(str(self.root), "$ROOT") for s in (call, message))
        self.results.append(dict(area=area, name=name, call=call, outcome=outcome, message=message[:800],
                                 flags=list(flags), seconds=round(seconds, 2), **extra))

    def lib(self, area, name, call, fn, inputs, names=(), out=None, changed=None):
        """One library call in this process: the exception it raises (or not), and what it touched."""
        before, t0, error = snapshot(*inputs), time.time(), None
        listing = sorted(os.listdir(out.parent)) if out is not None else None
        signal.alarm(TIMEOUT)
        try:
            fn()
        except (Hang, Exception) as e:  # the point: which exception escapes, and what it says
            error = e
        finally:
            signal.alarm(0)
        flags = ["modified-input"] * (snapshot(*inputs) != before)
        flags += ["wrote-on-failure"] * (error is not None and out is not None and
                                         sorted(os.listdir(out.parent)) != listing)
        flags += ["changed-model"] * (error is not None and changed is not None and changed())
        kind = None if error is None else "expected" if isinstance(error, LIB_TYPES) else "other"
        outcome = classify("(ok" in name, kind, str(error).splitlines(), names)
        message = "(no error)" if error is None else f"{type(error).__name__}: {error}"
        self.record(area, name, call, "hang" if isinstance(error, Hang) else outcome, message, flags,
                    time.time() - t0)

    def on_copy(self, area, src, name, edit, call, fn, names=(), **kw):
        """fn on an edited copy of fixture `src`; a clear error names the copy (folder, or a file in it)."""
        edit(p := self.mutant(src, area))
        self.lib(area, name, f"{call}({p}) # {name}", lambda: fn(p), [p], (p.name, *names), **kw)

    def job(self, area, name, argv, names=(), ok=False, sigint_after=None):
        """A command line to run later; its inputs are the existing paths it names, its out --out's value."""
        argv = [str(a) for a in argv]
        outs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--out"]
        out = (outs or argv[2:3] * (argv[:1] == ["convert-gguf"]) or [None])[-1]
        return dict(area=area, name=name, argv=argv, names=names, ok=ok, sigint_after=sigint_after,
                    inputs=[a for a in argv if a.startswith("/") and os.path.lexists(a)],
                    out=None if out is None else Path(out))

    def run_job(self, job):
        before, t0, out = snapshot(*job["inputs"]), time.time(), job["out"]
        existed = out is not None and os.path.lexists(out)
        listing = sorted(os.listdir(out.parent)) if out is not None and out.parent.is_dir() else None
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
        proc = subprocess.Popen([sys.executable, "-m", "minicustom", *job["argv"]], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=self.root, env=env,
                                text=True, errors="replace")
        try:
            if job["sigint_after"]:
                time.sleep(job["sigint_after"])
                proc.send_signal(signal.SIGINT)
            (stdout, stderr), rc = proc.communicate(timeout=TIMEOUT), proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            (stdout, stderr), rc = proc.communicate(), None
        # progress goes to stderr by design (training steps; after Ctrl-C a notice): the error comes last
        lines = [ln for ln in stderr.splitlines() if ln.strip() and not re.match(r"step \d+/\d+ ", ln)]
        lines = lines[-1:] if job["sigint_after"] else lines
        failed = rc not in (0, None) and not job["sigint_after"] and out is not None
        flags = ["modified-input"] * (snapshot(*job["inputs"]) != before)
        flags += ["wrote-on-failure"] * (failed and ((not existed and os.path.lexists(out)) or (
            listing is not None and sorted(os.listdir(out.parent)) != listing)))
        kind = None if rc == 0 else "expected" if rc == (130 if job["sigint_after"] else 2) else "exit"
        kind = "other" if "Traceback (most recent call last)" in stderr else kind
        outcome = "hang" if rc is None else classify(job["ok"], kind, lines, job["names"])
        if rc is not None and (kind == "exit" or outcome == "clear" and lines[0][:10] != "minicustom"):
            outcome = "unclear"
        message = "\n".join(lines[-3:]) or (stdout.strip().splitlines() or [""])[-1][:200]
        self.record(job["area"], job["name"], "python -m minicustom " + shlex.join(job["argv"]), outcome,
                    f"(exit {rc}) {message}", flags, time.time() - t0, rc=rc)


def W(file, content):  # edits of a copied folder p: a file written (None: deleted), a JSON field, tensors
    return lambda p: put(p / file, content)


def J(file, key, raw):
    return lambda p: edit_json(p / file, key, raw)


def T(file, change):
    return lambda p: edit_tensors(p / file, change)


CONFIG_MUTATIONS = """
rms_norm_eps: 0 | -1 | NaN | Infinity | "1e-5" | 1e999 | null (ok); rope_theta: 0 | NaN | "10000" | null (ok)
tie_word_embeddings: "true" | 1; model_type: "gpt2" | null | 5; hidden_act: "gelu" | null (ok)
rope_scaling: {"rope_type": "llama3", "factor": 8} | {"rope_type": "yarn", "factor": 2} | "linear"
layer_types: ["full_attention"] | ["x", "y"]; sliding_window: 0 | "4"; num_attention_heads: 3
eos_token_id: -1 | 1000000000; pad_token_id: [1, 2]; max_position_embeddings: 1000000000000000000000000 (ok)
"""


def config_cases(fz: Fuzz, fx):
    CJ, ints = "config.json", ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "num_key_value_heads", "head_dim",
                               "max_position_embeddings")
    values = ("0", "-1", '"64"', "NaN", "true", "missing")
    muts = [(f, v, f in ints[-2:] and v == "missing") for f in ints for v in values]
    muts += [(f, HUGE, False) for f in ints[:3]] + list(mutations(CONFIG_MUTATIONS))
    cases = [(f"{f}={v}" + " (ok)" * ok, J(CJ, f, v), (CJ, f)) for f, v, ok in muts]
    cases += [(f"{CJ} missing", W(CJ, None), (CJ,)), (f"{CJ} an array", W(CJ, "[]"), (CJ,)),
              (f"{CJ} not UTF-8", W(CJ, b'{"model_type": "ll\xff"}'), (CJ,)),
              (f"{CJ} 100000 deep", W(CJ, "[" * 100000 + "]" * 100000), (CJ,)),
              (f"{CJ} duplicate key", lambda p: put(p / CJ, '{"hidden_size": 8, ' + (p / CJ).read_text()[1:]),
               (CJ, "hidden_size"))]
    for name, edit, names in fz.pick(cases):
        names = ("k_proj",) if name == "num_key_value_heads=missing" else names  # the default, then a listing
        fz.on_copy("config", fx["base"], name, edit, "load_model", mc.load_model, names)


def weights_cases(fz: Fuzz, fx):
    raw, norm, embed = (fx["base"] / ST).read_bytes(), "model.norm.weight", "model.embed_tokens.weight"
    header = json.dumps({norm: {"dtype": "F32", "shape": [64], "data_offsets": [0, 10**9]}}).encode()
    for name, edit, names in fz.pick([
            ("truncated to half", W(ST, raw[: len(raw) // 2]), ()), ("zero bytes", W(ST, b""), ()),
            ("data offsets past the end", W(ST, struct.pack("<Q", len(header)) + header), ()),
            ("int32 embedding", T(ST, lambda t: t.update({embed: t[embed].int()})), (embed,)),
            ("NaN in a weight", T(ST, lambda t: t.update({norm: t[norm] * float("nan")})), (norm,)),
            ("extra tensor", T(ST, lambda t: t.update({"model.layers.5.x": t[norm] + 1})), ("layers.5.x",)),
            ("wrong shape, one missing", T(ST, lambda t: t.update({norm: t.pop(embed)})), (norm, embed)),
            ("a directory", lambda p: (p / ST).unlink() or (p / ST).mkdir(), (ST,)),
            ("only pytorch_model.bin", lambda p: torch.save(load_file(p / ST), p / "pytorch_model.bin") or
             (p / ST).unlink(), ("pytorch_model.bin",))]):
        fz.on_copy("weights", fx["base"], name, edit, "load_model", mc.load_model, names)
    fz.on_copy("weights", fx["base"], "1e38 as float16", T(ST, lambda t: t.update({norm: t[norm] + 1e38})),
               "load_model(dtype=float16)", lambda p: mc.load_model(p, dtype=torch.float16), (ST, norm))
    index = json.loads((fx["sharded"] / IDX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    first = next(n for n, s in index["weight_map"].items() if s == shards[0])

    def M(change):  # an edit of the index's weight_map
        return W(IDX, json.dumps({**index, "weight_map": change(dict(index["weight_map"]))}))

    def outside(p):
        shutil.copy(p / shards[1], elsewhere := fz.slot("elsewhere.safetensors"))
        (p / shards[1]).unlink()
        (p / shards[1]).symlink_to(elsewhere)

    for name, edit, named in fz.pick([
            ("shard path with ..", M(lambda m: {**m, first: "../" + shards[0]}), ".."),
            ("absolute shard path", M(lambda m: {**m, first: str(fx["sharded"] / shards[0])}), shards[0]),
            ("missing shard file", W(shards[1], None), shards[1]), ("index not JSON", W(IDX, "{"), IDX),
            ("tensor stored in two shards", lambda p: T(shards[1], lambda t: t.update(
                {first: load_file(p / shards[0])[first]}))(p), first),
            ("index lists a tensor none has", M(lambda m: {**m, "model.x.weight": shards[0]}), "x.weight"),
            ("index omits a stored tensor", M(lambda m: m.pop(first) and m), first),
            ("empty weight_map", M(lambda m: {}), IDX), ("shard a link out", outside, shards[1])]):
        fz.on_copy("shards", fx["sharded"], name, edit, "load_model", mc.load_model, (named,))


TOKENIZERS = """
chat_template: "{% for m in messages %}" | "{{ raise_exception('no users') }}" | 5 | ["x"]
chat_template: "{{ messages[5].content.upper() }}" | [{"name": "tool_use", "template": "x"}]
eos_token: "<nope>" (ok) | 5; bos_token: {"content": 5}
"""


def tokenizer_cases(fz: Fuzz, fx):
    def use(p):
        tok = mc.load_tokenizer(p)
        tok.batch_encode(["hi", tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)])

    raw, jinja = (fx["base"] / TJ).read_bytes(), "chat_template.jinja"
    cases = [(f"{TC} {f}={v}" + " (ok)" * ok, J(TC, f, v), (TC, f)) for f, v, ok in mutations(TOKENIZERS)]
    cases += [(f"{TJ} missing", W(TJ, None), (TJ,)), (f"{TJ} truncated", W(TJ, raw[: len(raw) // 2]), (TJ,)),
              (f"{TC} an array", W(TC, "[]"), (TC,)), (f"{TC} not UTF-8", W(TC, b'{"a": "\xff"}'), (TC,)),
              (f"{jinja} syntax error", W(jinja, "{% if %}"), (jinja,))]
    for name, edit, names in fz.pick(cases):
        fz.on_copy("tokenizer", fx["base"], name, edit, "load_tokenizer+apply_chat_template", use, names)


ADAPTER_MUTATIONS = """
r: 0 | "2" | 2.5 | null | 4 | true; lora_alpha: "4" | NaN | 1e999 | null (ok) | -4 (ok)
lora_dropout: 1.0 | -0.1 | "0.1"; target_modules: 5 | ["nonexistent"] | "(" | "q_proj" | [] (ok)
peft_type: "FOO" | null | "lora"; use_dora: "false" | true; layers_to_transform: -1 | [99] | "0"
rank_pattern: {"q_proj": 0} | {"(": 2}; modules_to_save: ["nonexistent"] | "lm_head"
init_lora_weights: "pissa" | 5
"""


def adapter_cases(fz: Fuzz, fx):
    kb = next(k for k in sorted(load_file(fx["adapter"] / AW)) if k.endswith("lora_B.weight"))
    ka, mod = kb.replace("lora_B", "lora_A"), kb.removeprefix("base_model.model.").rsplit(".", 2)[0]

    def other(p):
        return [put(p / n, (fx["other_adapter"] / n).read_bytes()) for n in (AC, AW)]

    cases = [(f"{f}={v}" + " (ok)" * ok, J(AC, f, v), (f,)) for f, v, ok in mutations(ADAPTER_MUTATIONS)]
    cases += [
        (f"{AC} an array", W(AC, "[]"), (AC,)), (f"{AW} missing", W(AW, None), (AW,)),
        (f"{AW} truncated", W(AW, (fx["adapter"] / AW).read_bytes()[:300]), (AW,)),
        ("NaN in lora_B", T(AW, lambda t: t.update({kb: t[kb] * float("nan")})), (AW, kb)),
        ("one lora_B missing", T(AW, lambda t: t.pop(kb)), (mod,)),
        ("lora_A with rank 3", T(AW, lambda t: t.update({ka: torch.zeros(3, 64)})), (mod,)),
        ("adapter of another base", other, ("another base",)),
        ("another base, no fingerprint", lambda p: other(p) and T(AW, lambda t: None)(p), ("shape",))]

    def attach(p):
        fz.model = mc.load_model(fx["base"])
        fz.types = [type(m) for m in fz.model.modules()]
        mc.load_adapter(fz.model, p)

    def changed():
        m, fz.model = fz.model, None
        return m is not None and ("adapter_configs" in vars(m) or [type(x) for x in m.modules()] != fz.types)

    for name, edit, names in fz.pick(cases, 5):
        fz.on_copy("adapter", fx["adapter"], name, edit, "load_adapter", attach, names, changed=changed)


DATA_LINES = r"""
invalid JSON | {not json
lone surrogate | {"text": "a\ud800b"}
prompt a number | {"prompt": 5, "completion": "x"}
role bot | {"messages": [{"role": "bot", "content": "hi"}]}
NaN literal prompt | {"prompt": NaN, "completion": "x"}
NUL character (ok) | {"text": "a\u0000b"}
preferences: chosen a number | {"prompt": "p", "chosen": 5, "rejected": "b"}
preferences: no prompt, chosen == rejected | {"chosen": "same", "rejected": "same"}
"""  # line 2 of a file whose line 1 is good


def data_cases(fz: Fuzz, fx):
    tok, label = mc.load_tokenizer(fx["base"]), b'{"t": 1}'
    good, pair = fx["sft"].read_bytes().splitlines()[0], fx["dpo"].read_bytes().splitlines()[0]
    rows = [(n, line.encode()) for n, line in table(DATA_LINES)] + [
        ("Latin-1 byte", b'{"text": "caf\xe9"}'), ("CRLF ending (ok)", b'{"text": "a"}\r'),
        ("100000 deep", b"[" * 10**5 + b"]" * 10**5)]
    cases = [(n, (pair if n[:4] == "pref" else good) + b"\n" + line + b"\n", (":2",), {}) for n, line in rows]
    cases += [("empty file", b"", (), {}), ("UTF-16 with BOM", good.decode().encode("utf-16"), (":1",), {}),
              ("a 1 MB line, max_length 64 (ok)", b'{"text": "%s"}' % (b"x " * 5**8), (), {"max_length": 64}),
              ("all dropped", good, ("max_length",), {"truncation": "drop", "max_length": 2}),
              ("vocab_size 10", good, (":1", "vocabulary"), {"vocab_size": 10}),
              ("template {missing}", label, (":1",), {"template": data.LabelTemplate("{missing}", "x")}),
              ("template '{text'", label, (":1",), {"template": data.LabelTemplate("{text", "x")})]
    for name, content, names, kw in fz.pick(cases):
        put(p := fz.slot("data").with_suffix(".jsonl"), content)
        load = data.load_preferences if name[:4] == "pref" else data.load_examples
        fz.lib("data", name, f"{load.__name__}({p}, tok, **{kw})", lambda f=load, k=kw, p=p: f(
            p, tok, report=print, **k), [p], (p.name, *names))


def gguf_cases(fz: Fuzz, fx):
    raw, gpt2 = fx["gguf"].read_bytes(), fz.slot("gpt2.gguf")
    write_gguf(gpt2, arch="gpt2")
    runs = [("file missing", fz.slot("none.gguf"), fz.slot("gguf-out"), ("none.gguf",)),
            ("out an existing file", fx["gguf"], fx["sft"], ("sft.jsonl",)),
            ("out holds a model (ok: the library's choice)", fx["gguf"], fz.mutant(fx["base"], "model"), ())]
    for name, content in [("random bytes", np.random.default_rng(1).bytes(1024)), ("empty", b""),
                          ("truncated at 10%", raw[: len(raw) // 10]), ("truncated at 99%", raw[:-30]),
                          ("version 99", raw[:4] + struct.pack("<I", 99) + raw[8:]),
                          ("arch gpt2", gpt2.read_bytes()), ("a valid file (ok)", raw)]:
        runs.append((name, put(src := fz.slot("in.gguf"), content) or src, fz.slot("gguf-out"), (src.name,)))
    for name, src, out, names in fz.pick(runs, 3):
        fz.lib("gguf", name, f"convert_gguf({src}, {out})", lambda s=src, o=out: convert_gguf(
            s, o, progress=False), [src, *[out] * out.exists()], names, out=out)


MACROS = {"GEN": "generate --prompt hi --max-new-tokens 2 --model {B}",
          "SFT": "train sft --model {B} --data {SFT} --max-steps 1 --max-length 64 --batch-size 2 --out {O}",
          "DPO": "train dpo --model {B} --data {DPO} --max-steps 1 --max-length 64 --batch-size 2 --out {O}",
          "CMP": "compare --model {B} --task {TASK} --out {O} --methods zero-shot --test-limit 2",
          "INS": "inspect-data --model {B} --data {SFT} -n 1", "QNT": "quantize --model {B} --out {O}"}
GRID = dict(zip(("generate", "train sft", "train dpo", "compare", "inspect-data", "quantize"), MACROS))
LONG_RUNS = {("--max-steps", HUGE), ("--grad-accum", HUGE)}  # taken, and a long run is what they ask for


def option_grid(fz: Fuzz, P: dict) -> list:
    """Every numeric option (once per name and type) x bad values: a refusal by the parser is recorded
    here; a value it takes becomes a subprocess job."""
    jobs, seen, top = [], set(), cli.build_parser()._actions[-1].choices  # the subcommands' parsers
    subs = {**top, **{f"train {k}": v for k, v in top["train"]._actions[-1].choices.items()}}
    for cmd, a in ((c, a) for c, s in subs.items() if c in GRID for a in s._actions):
        opt = a.option_strings[-1] if a.option_strings else None
        if opt is None or a.type in (None, str, device_option) or a.choices or (opt, a.type) in seen:
            continue
        seen.add((opt, a.type))
        try:
            values = a.type("1e-300") and ["-1", "0", "nan", "inf", "abc", "1e30"]
        except (argparse.ArgumentTypeError, ValueError):
            values = ["-1", "0", "1.5", "abc", HUGE]
        for v in fz.pick(["1,nan", "a,b", "-1", ""] if opt == "--loss-weights" else values, 3):
            argv = shlex.split(MACROS[GRID[cmd]].format(**P, O=fz.slot("run", make=True) / "out")) + [opt, v]
            name, call, err = f"{cmd} {opt} {v}", "python -m minicustom " + shlex.join(argv), io.StringIO()
            try:
                with contextlib.redirect_stderr(err):
                    value = getattr(cli.build_parser().parse_args(argv), a.dest)
            except SystemExit as e:
                lines = [ln for ln in err.getvalue().splitlines() if ln.strip()] or [""]
                ours = e.code == 2 and lines[0][:10] == "minicustom"
                outcome = classify(0, "expected", lines, (opt,)) if ours else "unclear"
                fz.record("cli-options", name, call, outcome, "\n".join(lines), rc=e.code)
                continue
            if (opt, v) in LONG_RUNS:
                fz.record("cli-options", name, call, "skipped", "the parser takes it: a long run, as asked")
            elif value != a.default:  # the default teaches nothing
                jobs.append(fz.job("cli-options", name, argv, (opt,), ok=True))
    return jobs


CLI = """
generate --model missing | GEN --model {N} | {N}
generate --model a file | GEN --model {SFT} | sft.jsonl
generate --adapter of another base | GEN --adapter {A2} | other_adapter;another base
generate --adapter with a rank-3 lora_A | GEN --adapter {BADA} | bad-adapter;rank
generate, stdin closed, no --prompt | generate --model {B} | --prompt
generate --device cuda (none here) | GEN --device cuda | --device
generate, config rms_norm_eps NaN | GEN --model {NANCFG} | config.json;rms_norm_eps
generate, config num_hidden_layers 1e9 | GEN --model {LAYERS} | config.json;num_hidden_layers
generate, chat template syntax error | GEN --model {TPL} | tokenizer_config.json;chat
generate, a missing tensor (a listing) | GEN --model {MISS} | model.norm.weight
chat, stdin closed (ok) | chat --model {B} --max-new-tokens 2 |
sft --eval-data bad line 4 | SFT --eval-data {BADJ} | bad.jsonl:4
sft --data a folder | SFT --data {TASK} | task
sft --out is --model | SFT --out {B} | --out
sft --out inside --model | SFT --out {B}/run | --out
sft --out a file | SFT --out {SFT} | sft.jsonl
sft --resume with nothing | SFT --resume | --resume
sft over an old run, no --resume | SFT --out {RUN} | old-run;--resume
sft --method prompt --prompt-init text, no text | SFT --method prompt --prompt-init text | --prompt-init-text||init_text
sft --method adapter --reduction-factor 1000 | SFT --method adapter --reduction-factor 1000 | --reduction||reduction_factor
sft --method llama-adapter --adapter-layers 99 | SFT --method llama-adapter --adapter-layers 99 | --adapter-l||adapter_layers
sft --method prompt --num-virtual-tokens 5000 | SFT --method prompt --num-virtual-tokens 5000 | --num-virtual||num_virtual_tokens
dpo --adapter without --reference | DPO --adapter {A} | --reference
dpo 2 losses, 1 weight | DPO --loss sigmoid,ipo --loss-weights 1 | --loss-weights||loss_weights
dpo --data is SFT data | DPO --data {SFT} | sft.jsonl:1;chosen
compare task.json invalid | CMP --task {BADTASK} | task.json
merge --out holds a model | merge --model {B} --adapter {A} --out {HOLD1} | --overwrite
quantize an already 4-bit model | QNT --model {Q4} | q4;4-bit||4 bits
convert-gguf into a model folder | convert-gguf {GG} {HOLD2} | {HOLD2};already holds a model
fetch-demo-model --cache-dir a file | fetch-demo-model --cache-dir {SFT} | sft.jsonl
Ctrl-C during training | SFT --max-steps 100000 | interrupted;--resume
"""  # name | command line | what a clear message names (;-separated); {O}: a fresh --out, {N}: a missing path


def cli_jobs(fz: Fuzz, fx) -> tuple[list, dict]:
    """The broken inputs the command lines name (each its own copy), then a job per row of CLI."""
    B, P = fx["base"], dict(B=fx["base"], A=fx["adapter"], A2=fx["other_adapter"], SFT=fx["sft"],
                            DPO=fx["dpo"], TASK=fx["task"], GG=fx["gguf"], Q4=fx["q4"])
    P.update({k: fz.mutant(B, k.lower()) for k in ("NANCFG", "LAYERS", "TPL", "MISS", "HOLD1", "HOLD2")})
    edit_json(P["NANCFG"] / "config.json", "rms_norm_eps", "NaN")
    edit_json(P["LAYERS"] / "config.json", "num_hidden_layers", "1000000000")
    edit_json(P["LAYERS"] / "config.json", "layer_types", "missing")
    edit_json(P["TPL"] / TC, "chat_template", '"{% for m in messages %}"')
    edit_tensors(P["MISS"] / ST, lambda t: t.pop("model.norm.weight"))
    P.update(BADA=fz.mutant(fx["adapter"], "bad-adapter"), BADJ=fz.slot("bad.jsonl"), RUN=fz.slot("old-run"),
             BADTASK=fz.mutant(fx["task"], "bad-task"))
    edit_tensors(P["BADA"] / AW, lambda t: [t.update({k: torch.zeros(3, 64)}) for k in sorted(t)[:1]])
    put(P["BADJ"], fx["sft"].read_text() + "{oops\n")
    put(P["BADTASK"] / "task.json", "{not json")
    (P["RUN"] / "checkpoints").mkdir(parents=True)
    (P["RUN"] / "checkpoints/latest").write_text("step-00000001\n")
    jobs = []
    for name, line, names in fz.pick(table(CLI), 6):
        p = dict(P, O=fz.slot("run", make=True) / "out", N=fz.slot("nowhere"))
        line = re.sub(r"^[A-Z]{3}\b", lambda m: MACROS[m[0]], line).format(**p)
        names, ok = tuple(tuple(n.format(**p).split("||")) for n in names.split(";") if n), name.endswith("(ok)")
        jobs.append(fz.job("cli", name, shlex.split(line), names, ok, 15 * name.startswith("Ctrl-C")))
    (locked := fz.slot("read-only")).mkdir(mode=0o500)
    line, name = MACROS["SFT"].format(**P, O=locked / "run"), "sft --out in a chmod 0500 folder"
    if os.geteuid() == 0:  # root writes into a 0500 folder: the case could not fail
        fz.record("cli", name, line, "skipped", "running as root: a 0500 folder does not stop root")
    return jobs + [fz.job("cli", name, shlex.split(line), ("read-only",))] * (os.geteuid() != 0), P


def report(results, seconds):
    outcomes = "clear traceback unclear accepted-ok silently-wrong hang skipped flagged".split()
    count = Counter((a, r["outcome"]) for r in results for a in (r["area"], "ALL"))
    count.update((a, "flagged") for r in results if r["flags"] for a in (r["area"], "ALL"))
    print(f"\n{'area':<12}" + "".join(f"{o:>15}" for o in outcomes) + f"{'total':>7}")
    for a in [*sorted({r["area"] for r in results}), "ALL"]:
        print(f"{a:<12}" + "".join(f"{count[(a, o)]:>15}" for o in outcomes) +
              f"{sum(count[(a, o)] for o in outcomes[:-1]):>7}")
    print(f"\n{len(results)} cases in {seconds:.0f} s\n")
    for r in (r for r in results if r["outcome"] not in ("clear", "accepted-ok") or r["flags"]):
        lines = r["message"].strip().splitlines() or [""]
        shown = lines[-1] if r["call"].startswith("python -m") else lines[0]  # stderr's last line
        print(f"[{r['area']}] {r['name']}: {r['outcome']} {' '.join(r['flags'])}\n    {r['call'][:300]}\n"
              f"    -> {shown[:300]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-json", help="write every case's result here")
    ap.add_argument("--quick", action="store_true", help="a subset of the cases (under a minute)")
    ap.add_argument("--workdir", help="build fixtures and cases here and keep them (default: a temp folder)")
    args, start = ap.parse_args(), time.time()
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))
    signal.signal(signal.SIGALRM, Hang.on_alarm)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="minicustom-fuzz-")).resolve()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the library's progress lines
            fx, fz = build_fixtures(root / "fx"), Fuzz(root, args.quick)
            fixtures = snapshot(root / "fx")
            for area in (config_cases, weights_cases, tokenizer_cases, adapter_cases, data_cases, gguf_cases):
                area(fz, fx)
            print(f"{len(fz.results)} library cases in {time.time() - start:.0f} s", file=sys.stderr)
            jobs, P = cli_jobs(fz, fx)
            jobs += option_grid(fz, P)
        with ThreadPoolExecutor(2) as pool:  # the slow Ctrl-C case first
            list(pool.map(fz.run_job, sorted(jobs, key=lambda j: -(j["sigint_after"] or 0))))
        if snapshot(root / "fx") != fixtures:
            fz.record("all", "a fixture changed", "(all)", "silently-wrong", "", ["modified-input"])
        results = sorted(fz.results, key=lambda r: (r["area"], r["name"]))
        report(results, time.time() - start)
        if args.out_json:
            Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out_json).write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
