"""The ``detdistill`` command line, mostly in-process (``cli.main``) to stay fast."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from detdistill.adapters.base import get_adapter
from detdistill.cli import main
from detdistill.distill.methods import METHODS
from detdistill.engine.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")


def test_list_shows_frameworks_archs_and_methods(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "torchvision: " + ", ".join(get_adapter("torchvision").archs()) in out
    assert len(METHODS) > 0
    for name in METHODS:
        assert name in out


def test_list_model_shows_taps(capsys):
    assert main(["list", "--model", "fcos", "--fpn-channels", "32"]) == 0
    out = capsys.readouterr().out
    assert "tappable layers of torchvision/fcos" in out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("neck.p3 "))
    assert "channels=32" in line and "stride=8" in line


def test_bad_config_key_exits_2_with_the_key(tiny_config_yaml, capsys):
    path = tiny_config_yaml()
    assert main(["train", str(path), "train.stepz=3", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unknown key `train.stepz`" in err and "allowed keys here:" in err
    assert main(["train", str(path.with_name("missing.yaml"))]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_distill_without_terms_exits_2(tiny_config_yaml, capsys):
    assert main(["distill", str(tiny_config_yaml()), "--quiet"]) == 2
    assert "no `distill:` terms" in capsys.readouterr().err


def test_train_eval_predict_export(tmp_path, tiny_config_yaml, crop_dataset, capsys):
    cfg_path = tiny_config_yaml()
    assert main(["train", str(cfg_path), "train.steps=2", "--quiet"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "tiny"
    assert f"run directory: {run}" in out and "AP50" in out
    ckpt = run / "checkpoints" / "last.pt"
    assert load_checkpoint(ckpt)["step"] == 2
    assert json.loads((run / "final_metrics.json").read_text())["num_images"] == 1  # eval.max_images=1

    # a second `train` resumes (nothing left to do) unless --fresh
    assert main(["train", str(cfg_path), "train.steps=2", "--quiet"]) == 0
    assert "resumed from" in capsys.readouterr().out

    assert main(["eval", str(cfg_path), "--checkpoint", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "last.pt (ema)" in out and "AR100" in out and "per-class AP" in out and "car" in out
    for weights in ("ema", "raw"):
        out_json = tmp_path / f"eval_{weights}.json"
        assert main(["eval", str(cfg_path), "--checkpoint", str(ckpt), "--weights", weights,
                     "--json", str(out_json)]) == 0
        assert f"last.pt ({weights})" in capsys.readouterr().out
        written = json.loads(out_json.read_text())
        assert written["weights"] == weights and written["step"] == 2 and written["num_images"] == 1
        assert {"AP", "APs", "AP/car"} <= written.keys()

    image = crop_dataset(size=160)["root"] / "images" / "MOS74.png"
    pred_dir = tmp_path / "pred"
    assert main(["predict", str(image), "--checkpoint", str(ckpt), "--out", str(pred_dir), "--score", "0.0",
                 "--device", "cpu"]) == 0
    png = pred_dir / "MOS74.png"
    assert str(png) in capsys.readouterr().out
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (160, 160)
    assert main(["predict", str(tmp_path / "nope.jpg"), "--checkpoint", str(ckpt), "--out", str(pred_dir)]) == 2
    assert "image not found" in capsys.readouterr().err

    exp = tmp_path / "exp"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(exp)]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    assert (exp / "model.safetensors").is_file() and (exp / "load_model.py").is_file()
    spec = json.loads((exp / "model.json").read_text())
    assert spec["arch"] == "fcos" and spec["fpn_channels"] == 32 and spec["num_classes"] == 5
    # self-describing: label k is class_names[k] (the sample's classes.txt), category_ids[k] its original id
    assert spec["class_names"] == ["car", "truck", "bus", "minibus", "cyclist"] and spec["category_ids"] == [0, 1, 2, 3, 4]
    assert json.loads((run / "export" / "model.json").read_text())["class_names"][0] == "car"


def test_installed_entry_point_help():
    exe = Path(sys.executable).parent / "detdistill"
    if not exe.is_file():
        pytest.skip(f"no console script next to {sys.executable}")
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for cmd in ("train", "distill", "eval", "predict", "export", "list", "quickstart", "bench"):
        assert cmd in proc.stdout
    proc = subprocess.run([str(exe), "train"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "config" in proc.stderr  # argparse usage error
