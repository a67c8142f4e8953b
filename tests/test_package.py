"""Packaging: every module imports, kernels/ ships as minicustom.kernels (never as a top-level
`kernels`), and the runtime never imports a test-only oracle."""

import importlib
import pkgutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORACLES = ("transformers", "peft", "trl", "bitsandbytes", "accelerate")


def all_modules() -> list[str]:
    """minicustom's modules, and those of minicustom.kernels (mapped from kernels/, so walked apart)."""
    import minicustom.kernels

    return (["minicustom.kernels"]
            + [m.name for m in pkgutil.walk_packages(minicustom.__path__, "minicustom.")]
            + [m.name for m in pkgutil.walk_packages(minicustom.kernels.__path__, "minicustom.kernels.")])


def test_every_module_imports():
    names = all_modules()
    assert {"minicustom.model", "minicustom.checkpoint", "minicustom.gguf", "minicustom.cli"} <= set(names)
    for name in names:
        importlib.import_module(name)


def test_installed_kernels_package_is_the_repository_folder():
    import minicustom.kernels

    assert Path(minicustom.kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"


def test_runtime_imports_no_oracle():
    """A fresh interpreter that imports all of minicustom has loaded none of the oracles."""
    code = (f"import sys, importlib\nfor m in {all_modules()!r}: importlib.import_module(m)\n"
            f"print(sorted(set(sys.modules) & set({ORACLES!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow  # builds a wheel
def test_wheel_ships_kernels_inside_minicustom(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("minicustom-*.whl")
    files = zipfile.ZipFile(wheel).namelist()
    assert "minicustom/kernels/__init__.py" in files
    assert "minicustom/model.py" in files
    assert {"minicustom/methods/registry.py", "minicustom/quant/nf4.py", "minicustom/train/loop.py"} <= set(files)
    assert not any(f.startswith("kernels/") for f in files)
    # A normal (non-editable) install of that wheel imports minicustom.kernels from site-packages.
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = "import minicustom.kernels as k; print(k.__file__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == str(target / "minicustom" / "kernels" / "__init__.py")
