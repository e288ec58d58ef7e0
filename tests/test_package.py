"""The library installs with pip and imports from any folder, torch being its only dependency."""
import os
import shutil
import subprocess
import sys

from conftest import ROOT


def test_pip_install_makes_twa_importable_from_any_folder(tmp_path):
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "soup.py"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    shutil.copytree(os.path.join(ROOT, "twa"), source / "twa", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(target), str(source)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", "import sys, twa, soup; print(twa.__file__); "
                          "print(sorted(set(twa.__dict__) & {'Subspace', 'TWA', 'SubspaceRecorder'})); "
                          "print(sorted({'lightning', 'transformers', 'safetensors'} & set(sys.modules)))"],
                         cwd=elsewhere, env={**env, "PYTHONPATH": str(target)}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    path, names, integrations = out.stdout.splitlines()
    assert path.startswith(str(target))
    assert names == "['Subspace', 'SubspaceRecorder', 'TWA']"
    assert integrations == "[]"  # twa.lightning and twa.hf are imported by name only
