"""The package as installed: a built wheel carries the configs and kernels, names resolve from
any working directory, the version has one source, and `python -m pacofr` runs."""

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import pacofr

ROOT = Path(__file__).resolve().parents[1]


def _env(pythonpath: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(pythonpath)}


def _python(code: str, cwd: Path, pythonpath: Path) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=_env(pythonpath),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools", reason="building a wheel needs setuptools (the test extra)")
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "--disable-pip-version-check", str(ROOT), "-w", str(out)],
                          cwd=out, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PACOFR_NATIVE": "0"})  # pure Python: the C++ build is tested apart
    assert done.returncode == 0, done.stderr
    (path,) = out.glob("pacofr-*.whl")
    return path


def test_wheel_carries_configs_kernels_version_license_and_metadata(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.name for p in (ROOT / "configs").iterdir() if p.suffix in (".yaml", ".json")}
    assert {"demo.yaml", "tiny.yaml", "vit_base_patch16_224.yaml", "zero1.json", "zero2.json", "zero3.json"} <= shipped
    assert {f"pacofr/configs/{name}" for name in shipped} <= names
    kernels = {p.name for p in (ROOT / "kernels").glob("*.py")}
    assert {"__init__.py", "codebook_topk.py", "masked_attention.py", "patch_pixel_loss.py"} <= kernels
    assert {f"pacofr/kernels/{name}" for name in kernels} <= names
    assert "pacofr/__main__.py" in names
    assert "pacofr/ops/dispatch_table.json" in names  # the dispatch reads it at import
    assert wheel.name == f"pacofr-{pacofr.__version__}-py3-none-any.whl"
    info = f"pacofr-{pacofr.__version__}.dist-info"
    meta = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert f"\nVersion: {pacofr.__version__}\n" in meta
    assert "\nLicense: Apache-2.0\n" in meta and f"{info}/licenses/LICENSE" in names
    assert "Project-URL: Paper, https://arxiv.org/abs/2508.09691" in meta
    assert "Project-URL: Source, https://github.com/pacofr/pacofr" in meta
    assert 'Requires-Dist: deepspeed<0.20,>=0.19.8; extra == "deepspeed"' in meta
    test_extra = [line for line in meta.splitlines() if line.endswith('extra == "test"')]
    assert test_extra and not any("dali" in line or "deepspeed" in line for line in test_extra)
    assert "pacofr = pacofr.cli:main" in zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()


def test_version_has_one_source():
    init = (ROOT / "pacofr" / "__init__.py").read_text()
    assert re.findall(r'^__version__ = "([^"]+)"', init, re.M) == [pacofr.__version__]
    setup = (ROOT / "setup.py").read_text()
    assert pacofr.__version__ not in setup and "version=VERSION" in setup
    assert "import torch" not in setup and "import pacofr" not in setup


# Resolves a config by name, a DeepSpeed preset by name, and says where pacofr came from.
RESOLVE = """
import pacofr
from pacofr.config import load_config
cfg = load_config("tiny", ["train.deepspeed=zero2"])
demo = load_config("demo")
print(pacofr.__file__, cfg.model.img_size, cfg.train.deepspeed, demo.train.epochs, sep="\\n")
"""


def test_installed_wheel_finds_its_configs_from_another_directory(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    run = tmp_path / "elsewhere"
    run.mkdir()
    where, size, zero2, epochs = _python(RESOLVE, run, site).split()
    assert Path(where).is_relative_to(site) and (size, epochs) == ("64", "50")
    assert Path(zero2) == site / "pacofr" / "configs" / "zero2.json"
    assert Path(zero2).read_bytes() == (ROOT / "configs" / "zero2.json").read_bytes()


def test_source_tree_finds_its_configs_from_another_directory(tmp_path):
    where, size, zero2, epochs = _python(RESOLVE, tmp_path, ROOT).split()
    assert Path(where).is_relative_to(ROOT) and (size, epochs) == ("64", "50")
    assert Path(zero2).resolve() == ROOT / "configs" / "zero2.json"


def test_python_m_pacofr_is_the_command(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pacofr", "--help"], cwd=tmp_path, env=_env(ROOT),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: pacofr ") and "eval-alignment" in done.stdout
    done = subprocess.run([sys.executable, "-m", "pacofr", "train", "--help"], cwd=tmp_path, env=_env(ROOT),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--deepspeed_config" in done.stdout


def test_an_unknown_config_name_fails_in_one_line_naming_the_presets(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pacofr", "train", "--config", "tiyn", "--output", "run"],
                          cwd=tmp_path, env=_env(ROOT), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr == ("pacofr train: error: config 'tiyn' is neither a preset "
                           "(demo, tiny, vit_base_patch16_224) nor a file\n")
    assert not (tmp_path / "run").exists()
