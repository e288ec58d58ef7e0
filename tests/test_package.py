"""The library installs with pip and imports from any folder, torch being its only dependency, and
installs no top-level module but twa."""
import os
import shutil
import subprocess
import sys

from conftest import ROOT


def test_pip_install_makes_twa_importable_from_any_folder(tmp_path):
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "soup.py"):  # soup.py: not installed
        shutil.copy(os.path.join(ROOT, name), source / name)
    shutil.copytree(os.path.join(ROOT, "twa"), source / "twa", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(target), str(source)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", "import sys, twa; print(twa.__file__); "
                          "print(sorted(set(twa.__dict__) & {'Subspace', 'TWA', 'SubspaceRecorder'})); "
                          "print(sorted({'lightning', 'transformers', 'safetensors'} & set(sys.modules)))"],
                         cwd=elsewhere, env={**env, "PYTHONPATH": str(target)}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    path, names, integrations = out.stdout.splitlines()
    assert path.startswith(str(target))
    assert names == "['Subspace', 'SubspaceRecorder', 'TWA']"
    assert integrations == "[]"  # twa.lightning and twa.hf are imported by name only
    installed = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info")}
    assert installed == {"twa"}  # the scripts' modules (soup.py among them) stay in the checkout


def test_the_public_face_is_seven_names_and_real_constructors():
    import twa
    from twa.subspace import Subspace
    assert sorted(twa.__all__) == ["CheckpointError", "Subspace", "SubspaceOptimizer",
                                   "SubspaceRecorder", "TWA", "combination_residual",
                                   "trainable_parameters"]
    assert all(hasattr(twa, name) for name in twa.__all__)
    # defined in the class itself, not attached when the package is imported
    assert {"from_checkpoints", "reference_from_checkpoints"} <= set(vars(Subspace))
