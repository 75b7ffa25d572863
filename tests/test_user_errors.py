"""A user's mistake, through the real command line: one line on stderr naming the file or key
and what to do, exit status 2, no traceback, and no run folder left behind (a folder that did
not exist stays absent; one that existed keeps exactly what it held).

Every case runs `python -m pacofr ...` in a subprocess on inputs built here; the subprocesses of
a module run side by side (each spends its time starting the interpreter). A missing package
is made unimportable for its subprocess alone (a sitecustomize that refuses the import), not
uninstalled. Unreadable files need a user that permissions apply to: as root the command runs
as `nobody` (setpriv)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from pacofr.config import load_config, to_dict
from pacofr.engine import checkpoint, health
from pacofr.model import PaCoFR, ViTEncoder

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["train", "--config", "tiny", "--max-steps", "1"]
BLOCK = """import sys


class _Refuse:  # {name} is not installed, as far as this process can tell
    def find_spec(self, name, path=None, target=None):
        if name == "{name}" or name.startswith("{name}."):
            raise ImportError("no module named " + name)


sys.meta_path.insert(0, _Refuse())
"""


def _refusing(folder: Path, module: str) -> Path:
    """A folder whose sitecustomize makes `module` unimportable (put first on PYTHONPATH)."""
    folder.mkdir(parents=True)
    (folder / "sitecustomize.py").write_text(BLOCK.format(name=module))
    return folder


def _snapshot(path: Path) -> dict | bytes | None:
    """What `path` holds: its files' bytes by relative path, a file's bytes, None if absent."""
    if path.is_file():
        return path.read_bytes()
    if not path.exists():
        return None
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


def _faces(folder: Path) -> dict:
    """4 PNGs and their 5 landmarks each (the JSON layout of pacofr.data.landmarks)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    points = {}
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)).save(folder / f"f{i}.png")
        points[f"f{i}.png"] = [[20, 30], [60, 30], [40, 45], [25, 60], [55, 60]]
    return points


def _run_folder(folder: Path, cfg, with_config: bool = True) -> Path:
    """A run of `cfg` as pretraining leaves it: config.yaml, metrics.csv and one good checkpoint
    (its manifest holding the run's config unless `with_config` is False)."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (folder / "metrics.csv").write_text("step,loss\n1,0.5\n")
    torch.manual_seed(0)
    good = health.verdict(health.new_record(), 1, 1, params_finite=True)  # (as a healthy step leaves it)
    config = to_dict(cfg) if with_config else None
    return checkpoint.save(folder / "checkpoints", 1, PaCoFR(cfg), {"state": {"step": 1}}, 3, good, config)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The inputs every case reads (built here) and a place for what they write."""
    d = tmp_path_factory.mktemp("user_errors")
    cfg = load_config("tiny")
    (d / "landmarks.json").write_text(json.dumps(_faces(d / "faces")))
    encoder = d / "encoder.safetensors"
    save_file(ViTEncoder.from_config(cfg.model).state_dict(), str(encoder))
    torch.save(ViTEncoder.from_config(cfg.model).state_dict(), d / "encoder.pth")  # a pickle
    (d / "truncated.safetensors").write_bytes(encoder.read_bytes()[: encoder.stat().st_size // 2])
    (d / "notes.txt").write_text("not weights\n")
    (d / "a_file").write_text("keep me\n")
    (d / "bad.yaml").write_text("preset: tiny\nmodel:\n  encoder: [1, 2\n")
    (d / "binary.yaml").write_bytes(b"\xff\xfe\x00preset: tiny\n")
    (d / "listed_preset.yaml").write_text("preset: [tiny]\n")
    (d / "bad.json").write_text('{"f0.png": [[20, 30], [60, 30], [40, 45], [25, 60], [55, 60]],\n "f1.png": [20, 30,\n')
    (d / "bad.csv").write_text("f0.png,20,30,60,30,40,45,25,60,55,60\n\"f1.png,20,30\n")
    (d / "binary.txt").write_bytes(b"\xff\xfe\xfaf0.png\n")
    (d / "attributes_binary.csv").write_bytes(b"\xff\xfepath,smiling\n")
    (d / "attributes.csv").write_text("path,smiling\n" + "".join(f"f{i}.png,{i % 2}\n" for i in range(4)))
    deep = cfg.model.encoder.depth
    run = d / "run"  # a run of the tiny model; resumed below with another depth
    _run_folder(run, cfg)
    loose = d / "loose"  # a checkpoint on its own, without its run's config.yaml
    shutil.copytree(_run_folder(d / "run_b", cfg, with_config=False), loose)
    return {"d": d, "depth": deep, "run": run, "loose": loose, "encoder": encoder}


def _eval(command: str, w: dict, encoder, targets: tuple[str, str], *extra) -> list[str]:
    d = w["d"]
    flag = {"eval-alignment": "landmarks"}.get(command, "labels")
    return [command, "--config", "tiny", "--encoder", str(encoder), "--train", str(d / "faces"), "--test",
            str(d / "faces"), f"--train-{flag}", targets[0], f"--test-{flag}", targets[1], "--workers", "0", *extra]


def _align(w: dict, encoder=None, train_landmarks=None, *extra) -> list[str]:
    good = str(w["d"] / "landmarks.json")
    return _eval("eval-alignment", w, encoder or w["encoder"], (train_landmarks or good, good), *extra)


# name: (argv from the inputs, the output path it must leave as it found, fragments of the line,
# the package made unimportable). Each fragment is what a user needs from the line: the file or
# key, and what is wrong or what to do.
CASES = {
    "yaml syntax in --config": (lambda w: [*TRAIN, "--config", str(w["d"] / "bad.yaml"), "--output",
                                           str(w["d"] / "o1")],
                                "o1", ["bad.yaml", "not valid YAML", "line 4", "from line 3"], None),
    "yaml syntax in --set": (lambda w: [*TRAIN, "--set", "train.blr=[1", "--output", str(w["d"] / "o2")],
                             "o2", ["train.blr", "not valid YAML", "quote it"], None),
    "--config not UTF-8": (lambda w: [*TRAIN, "--config", str(w["d"] / "binary.yaml"), "--output", str(w["d"] / "o3")],
                           "o3", ["binary.yaml", "not UTF-8"], None),
    "--config a folder": (lambda w: [*TRAIN, "--config", str(w["d"] / "faces"), "--output", str(w["d"] / "o4")],
                          "o4", ["faces' is a folder", "give a YAML file or a preset"], None),
    "preset not a name": (lambda w: [*TRAIN, "--config", str(w["d"] / "listed_preset.yaml"), "--output",
                                     str(w["d"] / "o5")], "o5", ["listed_preset.yaml", "unknown preset"], None),
    "--output is a file": (lambda w: [*TRAIN, "--output", str(w["d"] / "a_file")],
                           "a_file", ["--output", "a_file is a file, not a folder", "give a folder"], None),
    "--output under a file": (lambda w: [*TRAIN, "--output", str(w["d"] / "a_file" / "run")],
                              "a_file", ["a_file is a file", "give another path"], None),
    "--resume auto, another depth": (
        lambda w: [*TRAIN, "--max-steps", "2", "--resume", "auto", "--set", f"model.encoder.depth={w['depth'] - 2}",
                   "--output", str(w["run"])],
        "run", ["ckpt-00000001", "model.encoder.depth is 4 there, 2 now", "another --output"], None),
    "--resume PATH, another width, no config.yaml": (
        lambda w: [*TRAIN, "--resume", str(w["loose"]), "--set", "model.encoder.embed_dim=48", "--output",
                   str(w["d"] / "o6")],
        "o6", ["model.safetensors", "encoder.cls_token is [1, 1, 96] in the file, [1, 1, 48] in the config"], None),
    "--encoder a pickle": (lambda w: _align(w, w["d"] / "encoder.pth"), None,
                           ["encoder.pth' is not a safetensors file", "pickled ones are not read"], None),
    "--encoder a text file": (lambda w: _align(w, w["d"] / "notes.txt"), None,
                              ["notes.txt' is not a safetensors file"], None),
    "--encoder missing": (lambda w: _align(w, w["d"] / "missing.safetensors"), None,
                          ["missing.safetensors': no such file"], None),
    "--encoder truncated": (lambda w: _align(w, w["d"] / "truncated.safetensors"), None,
                            ["truncated.safetensors' is not a safetensors file"], None),
    "--encoder of another config": (lambda w: _align(w, None, None, "--set", "model.encoder.depth=2"), None,
                                    ["encoder.safetensors' does not fit the encoder of this config"], None),
    "landmarks JSON syntax": (
        lambda w: [*TRAIN, "--set", f"data.source={w['d'] / 'faces'}", "--set", f"data.landmarks={w['d'] / 'bad.json'}",
                   "--output", str(w["d"] / "o7")],
        "o7", ["data.landmarks", "bad.json' is not valid JSON (line 3"], None),
    "landmarks CSV quote": (lambda w: _align(w, None, str(w["d"] / "bad.csv")), None,
                            ["--train-landmarks", "bad.csv' line 2", "quotes come in pairs"], None),
    "landmarks a folder": (
        lambda w: [*TRAIN, "--set", f"data.source={w['d'] / 'faces'}", "--set", f"data.landmarks={w['d'] / 'faces'}",
                   "--output", str(w["d"] / "o8")],
        "o8", ["data.landmarks", "faces' is a folder"], None),
    "DALI not installed": (lambda w: [*TRAIN, "--set", "data.decoder=dali", "--output", str(w["d"] / "o9")],
                           "o9", ["data.decoder='dali' needs NVIDIA DALI: pip install"], "nvidia.dali"),
    "DeepSpeed not installed": (lambda w: [*TRAIN, "--deepspeed_config", "zero2", "--output", str(w["d"] / "o10")],
                                "o10", ["train.deepspeed needs DeepSpeed: pip install"], "deepspeed"),
    "--max-steps not a number": (lambda w: [*TRAIN, "--max-steps", "ten", "--output", str(w["d"] / "o11")],
                                 "o11", ["--max-steps", "invalid int value: 'ten'", "--help"], None),
    "eval without a required flag": (lambda w: ["eval-alignment", "--encoder", str(w["encoder"])], None,
                                     ["--train", "--test-landmarks", "required"], None),
    "data.source missing": (lambda w: [*TRAIN, "--set", f"data.source={w['d'] / 'nowhere'}", "--output",
                                       str(w["d"] / "o12")], "o12", ["data.source", "nowhere': no such file"], None),
    "file list not UTF-8": (lambda w: [*TRAIN, "--set", f"data.source={w['d'] / 'binary.txt'}", "--output",
                                       str(w["d"] / "o13")], "o13", ["data.source", "binary.txt' is not UTF-8"], None),
    "attribute labels not UTF-8": (
        lambda w: _eval("eval-attributes", w, w["encoder"],
                        (str(w["d"] / "attributes_binary.csv"), str(w["d"] / "attributes.csv"))),
        None, ["--train-labels", "attributes_binary.csv' is not UTF-8"], None),
    "eval --output a folder": (lambda w: _align(w, None, None, "--output", str(w["d"] / "faces")), "faces",
                               ["--output", "is a folder", "give a file name"], None),
    "eval --output under a file": (lambda w: _align(w, None, None, "--output", str(w["d"] / "a_file" / "r.json")),
                                   "a_file", ["a_file is a file"], None),
}
if not torch.cuda.is_available():
    CASES["DALI on the GPU without one"] = (
        lambda w: [*TRAIN, "--set", "data.decoder=dali", "--set", "data.dali_device=mixed", "--output",
                   str(w["d"] / "o14")], "o14", ["data.dali_device='mixed'", "use data.dali_device=cpu"], None)


def _run(argv: list[str], cwd: Path, env: dict, user: list[str] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*user, sys.executable, "-m", "pacofr", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _launch(cases: dict, w: dict, d: Path, user: list[str] = (), home: Path | None = None) -> dict:
    """Runs every case (side by side); name -> (result, output path, what it held before)."""
    def one(name):
        argv_of, out, _, blocked = cases[name]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if blocked:
            env["PYTHONPATH"] = f"{_refusing(d / 'refuse' / name.replace(' ', '_'), blocked)}{os.pathsep}{ROOT}"
        if home is not None:
            env["HOME"] = str(home)
        path = None if out is None else d / out
        before = None if path is None else _snapshot(path)
        return name, (_run(argv_of(w), d, env, user), path, before)

    with ThreadPoolExecutor(4) as pool:
        return dict(pool.map(one, cases))


@pytest.fixture(scope="module")
def results(world):
    return _launch(CASES, world, world["d"])


def _check(name: str, result, path: Path | None, before, fragments: list[str]) -> None:
    assert result.returncode == 2, (name, result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pacofr"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    if path is not None:
        after = _snapshot(path)
        assert after == before or (before is None and after == {}), f"{path} changed"


@pytest.mark.parametrize("name", list(CASES))
def test_a_user_error_is_one_line_and_exit_2(results, name):
    result, path, before = results[name]
    _check(name, result, path, before, CASES[name][2])


# Unreadable inputs, and outputs where writing is not permitted.
LOCKED = {
    "unreadable --config": (lambda w: [*TRAIN, "--config", str(w["d"] / "locked.yaml"), "--output", str(w["d"] / "p1")],
                            "p1", ["locked.yaml': permission denied"], None),
    "unreadable data.landmarks": (
        lambda w: [*TRAIN, "--set", f"data.source={w['d'] / 'faces'}", "--set",
                   f"data.landmarks={w['d'] / 'locked.json'}", "--output", str(w["d"] / "p2")],
        "p2", ["locked.json': permission denied"], None),
    "unreadable image folder": (lambda w: [*TRAIN, "--set", f"data.source={w['d'] / 'locked_faces'}", "--output",
                                           str(w["d"] / "p3")], "p3", ["locked_faces': permission denied"], None),
    "unreadable --encoder": (lambda w: _align(w, w["d"] / "locked.safetensors"), None,
                             ["locked.safetensors': permission denied"], None),
    "--output in a read-only folder": (lambda w: [*TRAIN, "--output", str(w["d"] / "read_only" / "run")],
                                       "read_only", ["no permission to write in", "read_only"], None),
    "eval --output in a read-only folder": (lambda w: _align(w, None, None, "--output",
                                                             str(w["d"] / "read_only" / "r.json")),
                                            "read_only", ["--output", "no permission to write in"], None),
}


@pytest.fixture(scope="module")
def locked_results(world):
    """The LOCKED cases run by a user that permissions apply to, on inputs it may not read."""
    user = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root, which reads any file, and setpriv (to run as nobody) is missing")
        user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    d = Path(tempfile.mkdtemp(prefix="pacofr_locked_"))  # (not under pytest's tmp: that is private to root)
    try:
        d.chmod(0o777)
        shutil.copytree(world["d"] / "faces", d / "faces")
        shutil.copytree(world["d"] / "faces", d / "locked_faces")
        shutil.copy(world["d"] / "landmarks.json", d / "landmarks.json")
        shutil.copy(world["encoder"], d / "encoder.safetensors")
        for name, src in (("locked.yaml", None), ("locked.json", d / "landmarks.json"),
                          ("locked.safetensors", world["encoder"])):
            shutil.copy(src, d / name) if src else (d / name).write_text("preset: tiny\n")
            (d / name).chmod(0)
        (d / "locked_faces").chmod(0)
        (d / "read_only").mkdir()
        (d / "read_only").chmod(0o555)
        yield _launch(LOCKED, {"d": d, "encoder": d / "encoder.safetensors"}, d, user, home=d)
    finally:
        for p in (d / "locked_faces", d / "read_only"):
            p.chmod(0o755)
        shutil.rmtree(d)


@pytest.mark.parametrize("name", list(LOCKED))
def test_an_unreadable_input_or_unwritable_output_is_one_line_and_exit_2(locked_results, name):
    result, path, before = locked_results[name]
    _check(name, result, path, before, LOCKED[name][2])
