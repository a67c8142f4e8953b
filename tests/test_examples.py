"""The per-method examples (examples/*.py that import examples/common.py) run end to end in smoke mode: each in
a subprocess with MINICUSTOM_SMOKE=1, on a tiny random model that examples/common.py builds in a temporary
folder, writing under a temporary MINICUSTOM_EXAMPLES_OUT (the other METHOD choices of lora.py, adapters.py and
prompt_tuning.py one after another in one more). Each must exit 0, print before -> after, its trainable
parameters and where it saved its result, and have saved it there. And each stays short: at most 80 lines,
with a docstring that says how to run it and names the minicustom/ files that implement it (files that exist).
About 4 s of CPU an example, nearly all of it importing torch."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.py") if "from common import" in p.read_text())
# The method choices beside the scripts' defaults: run one after another in a single process (runpy), so that
# the ~3 s of importing torch is paid once for them.
OTHER_METHODS = [("lora.py", "dora"), ("adapters.py", "parallel"), ("adapters.py", "llama-adapter"),
                 ("prompt_tuning.py", "ptuning"), ("prompt_tuning.py", "prefix")]


def smoke(tmp_path, argv: list[str]) -> str:
    """Run `python ARGV` in smoke mode with outputs under tmp_path; returns stdout (exit code 0 asserted)."""
    env = {**os.environ, "MINICUSTOM_SMOKE": "1", "MINICUSTOM_EXAMPLES_OUT": str(tmp_path), "OMP_NUM_THREADS": "1",
           "MINICUSTOM_CACHE": str(tmp_path / "cache")}  # an empty cache: reaching for the demo model fails
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc.stdout


def check_report(out: str, tmp_path: Path):
    """The lines of common.report: before -> after, the trainable parameters, and a saved path that exists."""
    assert re.search(r"^\w.*: \d\.\d{3} .* -> \d\.\d{3} ", out, re.MULTILINE), out
    assert re.search(r"^trainable parameters: [\d,]+", out, re.MULTILINE), out
    saved = re.search(r"^saved: (.+)$", out, re.MULTILINE)
    assert saved, out
    path = Path(saved[1])
    assert path.is_relative_to(tmp_path) and path.exists(), f"saved {path}: outside {tmp_path}, or missing"


def test_the_examples_are_found():
    assert {"prompting.py", "prompt_tuning.py", "lora.py", "ia3.py", "adapters.py", "qlora.py", "full_sft.py",
            "dpo.py", "reward_model.py", "grpo.py", "kto.py", "export_gguf.py", "serve.py"} <= {p.name for p in EXAMPLES}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_an_example_is_short_and_names_its_implementation(path):
    lines = path.read_text().splitlines()
    assert len(lines) <= 80, f"{path.name}: {len(lines)} lines, the budget is 80"
    docstring = path.read_text().split('"""')[1]
    named = re.findall(r"minicustom/[\w/]+\.py", docstring)
    assert "Implementation: minicustom/" in docstring, f"{path.name}: no 'Implementation: minicustom/...' line"
    assert "python examples/" + path.name in docstring, f"{path.name}: the docstring does not say how to run it"
    for name in named:
        assert (ROOT / name).is_file(), f"{path.name} names {name}, which does not exist"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_an_example_runs_in_smoke_mode(tmp_path, path):
    check_report(smoke(tmp_path, [str(path)]), tmp_path)


def test_the_other_methods_run_in_smoke_mode(tmp_path):
    driver = ("import runpy, sys\n"
              f"sys.path.insert(0, {str(ROOT / 'examples')!r})\n"
              f"for script, method in {OTHER_METHODS!r}:\n"
              "    print('=== ' + script + ' ' + method, flush=True)\n"
              f"    sys.argv = [script, method]\n"
              f"    runpy.run_path({str(ROOT / 'examples')!r} + '/' + script, run_name='__main__')\n")
    runs = smoke(tmp_path, ["-c", driver]).split("=== ")[1:]
    assert [r.split("\n")[0] for r in runs] == [f"{s} {m}" for s, m in OTHER_METHODS]
    for run in runs:
        check_report(run, tmp_path)


def test_an_example_refuses_an_output_that_holds_files(tmp_path, monkeypatch):
    """common.out_dir, which every example calls before any work: a folder with files in it ends the run."""
    spec = importlib.util.spec_from_file_location("examples_common", ROOT / "examples" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    monkeypatch.setenv("MINICUSTOM_EXAMPLES_OUT", str(tmp_path))
    (tmp_path / "empty").mkdir()
    assert common.out_dir("empty") == tmp_path / "empty" and common.out_dir("new") == tmp_path / "new"
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text("{}")
    with pytest.raises(SystemExit, match="already holds files; nothing was written"):
        common.out_dir("ia3")
