"""What a user hits on unseen data and interrupted runs: one clear line (exit 2) or a loud
warning instead of a traceback or a silent wrong result, and nothing stale left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from detdistill.cli import main
from detdistill.engine.checkpoint import load_checkpoint, save_checkpoint
from detdistill.report.metrics_log import read_metrics

pytestmark = pytest.mark.usefixtures("single_thread")


def _run(tmp_path: Path) -> Path:
    return tmp_path / "runs" / "tiny"


def test_resume_into_a_changed_model_names_the_keys_and_suggests_fresh(tiny_config_yaml, tmp_path, capsys):
    cfg = tiny_config_yaml()
    assert main(["train", str(cfg), "train.steps=1", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["train", str(cfg), "train.steps=1", "model.fpn_channels=64", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line, no traceback
    assert "does not match this config" in err and "model.fpn_channels: 32 in the checkpoint, 64 now" in err
    assert "--fresh" in err and "size mismatch" not in err
    # --fresh starts over; extending the schedule of the same model is a resume, not an error
    assert main(["train", str(cfg), "train.steps=1", "model.fpn_channels=64", "--quiet", "--fresh"]) == 0
    assert main(["train", str(cfg), "train.steps=2", "model.fpn_channels=64", "--quiet"]) == 0
    assert "resumed from" in capsys.readouterr().out


def test_bad_devices_are_one_line_naming_the_option(tiny_config_yaml, tmp_path, capsys):
    cfg = tiny_config_yaml()
    assert main(["train", str(cfg), "train.device=gpu0", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "train.device" in err and "'gpu0' is not a device" in err
    if not torch.cuda.is_available():
        assert main(["train", str(cfg), "train.device=cuda", "--quiet"]) == 2
        assert "train.device='cuda' but CUDA is not available" in capsys.readouterr().err
        ckpt = tmp_path / "dummy.pt"
        save_checkpoint(ckpt, {"step": 0})
        assert main(["predict", str(ckpt), "--checkpoint", str(ckpt), "--out", str(tmp_path / "p"), "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert "--device='cuda' but CUDA is not available" in err and "train.device" not in err
    assert not (_run(tmp_path) / "checkpoints").exists()  # nothing was written


def test_a_training_split_without_boxes_is_an_error(tiny_config_yaml, tmp_path, capsys, write_no_labels):
    listing = write_no_labels(tmp_path / "nolabels", n_labelled=0)
    cfg = tiny_config_yaml(data__train__path=str(listing))
    assert main(["train", str(cfg), "train.steps=1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "has no boxes in its 3 images (3 without a label file" in err and "`labels`" in err


def test_mostly_missing_label_files_warn(tiny_config_yaml, tmp_path, capsys, write_no_labels):
    listing = write_no_labels(tmp_path / "fewlabels", n_labelled=1)
    cfg = tiny_config_yaml(data__train__path=str(listing))
    assert main(["train", str(cfg), "train.steps=1", "--quiet"]) == 0
    assert "warning: 2 of the 3 training images have no label file" in capsys.readouterr().out


@pytest.fixture
def write_no_labels():
    """``write_no_labels(folder, n_labelled)``: 3 sample images under ``folder/images``, only the
    first ``n_labelled`` with their label file; returns the list file."""
    import shutil

    from detdistill.quickstart import sample_dir

    def make(folder: Path, n_labelled: int) -> Path:
        src = sample_dir()
        (folder / "images").mkdir(parents=True)
        (folder / "labels").mkdir()
        names = ["MOS74.jpg", "MOS78.jpg", "MOS82.jpg"]
        for i, n in enumerate(names):
            shutil.copy(src / "images" / n, folder / "images" / n)
            if i < n_labelled:
                shutil.copy(src / "labels" / (Path(n).stem + ".txt"), folder / "labels" / (Path(n).stem + ".txt"))
        (folder / "list.txt").write_text("".join(f"images/{n}\n" for n in names))
        return folder / "list.txt"

    return make


def test_eval_refuses_a_checkpoint_of_other_classes(tiny_config_yaml, tmp_path, capsys):
    cfg = tiny_config_yaml()
    assert main(["train", str(cfg), "train.steps=1", "--quiet"]) == 0
    ckpt = _run(tmp_path) / "checkpoints" / "last.pt"
    other = tmp_path / "classes_other.txt"
    other.write_text("auto\nlkw\nbus\nkleinbus\nrad\n")
    overrides = [f"data.val.classes={other}"]
    capsys.readouterr()
    assert main(["eval", str(cfg), *overrides, "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint classes ['car'" in err and "--allow-class-mismatch" in err
    assert main(["eval", str(cfg), *overrides, "--checkpoint", str(ckpt), "--allow-class-mismatch"]) == 0
    assert "AP50" in capsys.readouterr().out


def test_stale_checkpoint_temporaries_are_removed_and_reported(tiny_config_yaml, tmp_path, capsys):
    cfg = tiny_config_yaml()
    ckpts = _run(tmp_path) / "checkpoints"
    ckpts.mkdir(parents=True)
    stale = ckpts / ".last.pt.abc123.tmp"
    stale.write_bytes(b"PK\x03\x04 half a checkpoint")
    keep = ckpts / "notes.txt"
    keep.write_text("mine")
    assert main(["train", str(cfg), "train.steps=1", "--quiet"]) == 0
    assert "removed 1 temporary checkpoint file(s) left by an interrupted write: .last.pt.abc123.tmp" in capsys.readouterr().out
    assert not stale.exists() and keep.exists()


def test_metrics_log_has_each_step_once_after_resume_and_rerun(tiny_config, tmp_path):
    from detdistill.engine.train import train

    cfg = tiny_config(train__steps=4, train__ckpt_every=2, train__eval_every=0)
    quiet = dict(progress=False, log=lambda _m: None)
    train(cfg, resume=False, stop_after=3, **quiet)  # logs steps 1-3, checkpoint at 2... and 3 (stop)
    state = load_checkpoint(cfg.run_dir / "checkpoints" / "last.pt")
    assert state["step"] == 3
    # simulate a kill after step 3's log line but before its checkpoint: rewind the checkpoint to step 2
    log_lines = (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in log_lines] == [1, 2, 3]
    state["step"] = 2
    save_checkpoint(cfg.run_dir / "checkpoints" / "last.pt", state)
    train(cfg, resume=True, **quiet)
    train(cfg, resume=True, **quiet)  # a finished run re-run: evaluates again, logs its final record once
    records = read_metrics(cfg.run_dir)
    steps = [(r["split"], r["step"]) for r in records]
    assert steps == [("train", 1), ("train", 2), ("train", 3), ("train", 4), ("eval", 4)], steps


def test_an_empty_checkpoint_says_why(tmp_path):
    empty = tmp_path / "last.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"the file is empty \(0 bytes\)"):
        load_checkpoint(empty)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match=r"junk.pt \(not a detdistill checkpoint, or corrupt\): \S+"):
        load_checkpoint(junk)


def test_kd_term_errors_come_before_data_loads_and_leave_no_run_dir(tiny_config_yaml, tmp_path, capsys):
    cfg = tiny_config_yaml(teacher={"checkpoint": str(tmp_path / "nowhere.pt")},
                           distill=[{"method": "pkdd", "pairs": [["neck.p3", "neck.p3"]]}])
    assert main(["distill", str(cfg), "--quiet"]) == 2
    captured = capsys.readouterr()
    assert "unknown distillation method 'pkdd'" in captured.err and "pkd" in captured.err
    assert "DetectionSet" not in captured.out  # the data was never read
    cfg = tiny_config_yaml(name="t2.yaml", distill=[{"method": "kl", "params": {"temprature": 2}}],
                           teacher={"checkpoint": str(tmp_path / "nowhere.pt")})
    assert main(["distill", str(cfg), "--quiet"]) == 2
    assert "unknown params ['temprature']" in capsys.readouterr().err
    assert not _run(tmp_path).exists()


def test_a_bad_method_argument_names_its_term(tiny_config_yaml, tmp_path, capsys):
    """A value the method itself rejects (not an unknown key) still says which term it is in."""
    term = {"method": "mssd", "name": "neck_self", "pairs": [["fpn.p3", "pan.p3"], ["fpn.p4", "pan.p4"], ["fpn.p5", "pan.p5"]],
            "params": {"adapter": "mlp"}}
    cfg = tiny_config_yaml(model={"arch": "yolo_pafpn"}, distill=[term])
    assert main(["train", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "distill term 'neck_self' (mssd): MSSD adapter must be 'conv1x1' or 'conv3x3', got 'mlp'" in err
    assert not (_run(tmp_path) / "checkpoints").exists()


def test_logit_kd_with_a_teacher_of_other_classes_is_refused_at_build(tiny_config_yaml, tmp_path, capsys):
    teacher_cfg = tiny_config_yaml(name="teacher.yaml")
    # a 3-class teacher: the same images with a 3-name classes file
    three = tmp_path / "three.txt"
    three.write_text("car\ntruck\nbus\n")
    assert main(["train", str(teacher_cfg), "train.steps=1", "output_dir=" + str(tmp_path / "T"),
                 f"data.train.classes={three}", f"data.val.classes={three}", "--quiet"]) == 0
    capsys.readouterr()
    cfg = tiny_config_yaml(name="kl.yaml", distill=[{"method": "kl"}],
                           teacher={"checkpoint": str(tmp_path / "T" / "checkpoints" / "last.pt")})
    assert main(["distill", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the teacher has 3 classes" in err and "the data 5" in err
    assert not (_run(tmp_path) / "checkpoints").exists()


def test_predict_takes_folders_writes_coco_json_and_legible_labels(tiny_config_yaml, tmp_path, crop_dataset, capsys):
    from PIL import Image

    cfg = tiny_config_yaml()
    assert main(["train", str(cfg), "train.steps=1", "model.score_thresh=0.0", "--quiet"]) == 0
    ckpt = _run(tmp_path) / "checkpoints" / "last.pt"
    folder = crop_dataset(size=160)["root"] / "images"
    out, js = tmp_path / "pred", tmp_path / "dets.json"
    capsys.readouterr()
    assert main(["predict", str(folder), "--checkpoint", str(ckpt), "--out", str(out), "--json", str(js),
                 "--score", "0.0", "--device", "cpu", "--quiet"]) == 0
    pngs = sorted(out.glob("*.png"))
    assert [p.stem for p in pngs] == ["MOS74", "MOS78"]
    results = json.loads(js.read_text())
    assert results and {"image_id", "category_id", "bbox", "score", "file_name"} <= set(results[0])
    assert {r["file_name"] for r in results} <= {"MOS74.png", "MOS78.png"} and all(len(r["bbox"]) == 4 for r in results)
    assert all(r["bbox"][2] >= 0 and r["bbox"][3] >= 0 and r["category_id"] in range(5) for r in results)
    # labels sit on filled class-coloured boxes: the drawn image holds the palette colour in solid runs
    import numpy as np

    with Image.open(pngs[0]) as im:
        colours = set(map(tuple, np.asarray(im.convert("RGB")).reshape(-1, 3).tolist()))
    assert (31, 119, 180) in colours or (255, 127, 14) in colours  # tab10 blue / orange
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", str(empty), "--checkpoint", str(ckpt), "--out", str(out)]) == 2
    assert "no images" in capsys.readouterr().err


def test_same_train_and_val_set_is_summarised_once(tiny_config):
    from detdistill.engine.train import train

    lines: list[str] = []
    train(tiny_config(train__steps=1), resume=False, progress=False, log=lines.append)  # val = train in tiny_config
    text = "\n".join(lines)
    assert text.count("boxes per class:") == 1 and "val: the same set as train" in text
