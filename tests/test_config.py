"""Config loading: strict keys with helpful errors, overrides, path resolution, safe YAML; registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from detdistill.config import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    load_config,
    parse_override,
)
from detdistill.registry import Registry


def _minimal() -> dict:
    return {"data": {"train": {"format": "yolo", "path": "data/train.txt", "classes": "data/classes.txt"},
                     "val": {"format": "yolo", "path": "/abs/val.txt", "classes": ["car", "bus"]}}}


def _write(tmp_path: Path, data: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_defaults_and_yaml_round_trip(tmp_path):
    cfg = config_from_dict(_minimal())
    assert cfg.model.arch == "fcos" and cfg.train.steps > 0 and cfg.distill == []
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert config_from_dict({**_minimal(), "name": "x", "output_dir": str(tmp_path / "{name}")}).run_dir == tmp_path / "x"


def test_unknown_top_level_key_is_named_with_allowed_keys():
    with pytest.raises(ConfigError) as err:
        config_from_dict({**_minimal(), "trian": {"steps": 3}})
    msg = str(err.value)
    assert "unknown key `trian`" in msg
    for key in Config.model_fields:  # name, seed, output_dir, model, data, train, eval, teacher, distill
        assert key in msg.split("allowed keys here:")[1]


def test_unknown_nested_key_is_named_with_its_sections_keys():
    with pytest.raises(ConfigError) as err:
        config_from_dict({**_minimal(), "train": {"stepz": 3}})
    msg = str(err.value)
    assert "`train.stepz`" in msg
    allowed = msg.split("allowed keys here:")[1]
    assert "steps" in allowed and "batch_size" in allowed and "lr" in allowed
    assert "crop_size" not in allowed  # the keys of *that* section, not of another

    with pytest.raises(ConfigError, match=r"`data\.train\.fromat`.*allowed keys here: format, path"):
        bad = _minimal()
        bad["data"]["train"]["fromat"] = "yolo"
        config_from_dict(bad)
    with pytest.raises(ConfigError, match=r"`distill\.0\.wieght`.*allowed keys here: method"):
        config_from_dict({**_minimal(), "distill": [{"method": "pkd", "wieght": 1.0}]})


def test_wrong_type_and_out_of_range_values_name_the_key():
    with pytest.raises(ConfigError, match=r"`train\.steps`.*'many'"):
        config_from_dict({**_minimal(), "train": {"steps": "many"}})
    with pytest.raises(ConfigError, match=r"`model\.fpn_channels`"):
        config_from_dict({**_minimal(), "model": {"fpn_channels": -8}})
    with pytest.raises(ConfigError, match=r"`model\.norm`"):
        config_from_dict({**_minimal(), "model": {"norm": "layernorm"}})
    with pytest.raises(ConfigError, match=r"missing required key `data`"):
        config_from_dict({"name": "x"})
    with pytest.raises(ConfigError, match="mapping"):
        config_from_dict(["not", "a", "mapping"])  # type: ignore[arg-type]


def test_overrides_apply_and_unknown_override_keys_fail(tmp_path):
    path = _write(tmp_path, _minimal())
    cfg = load_config(path, ["train.steps=5", "model.backbone=resnet34", "train.lr=0.5", "data.hflip=0"])
    assert cfg.train.steps == 5 and cfg.model.backbone == "resnet34" and cfg.train.lr == 0.5 and cfg.data.hflip == 0.0
    assert isinstance(cfg.train.steps, int)
    with pytest.raises(ConfigError, match=r"`train\.stepz`"):
        load_config(path, ["train.stepz=5"])
    with pytest.raises(ConfigError, match="key.subkey=value"):
        load_config(path, ["train.steps"])
    with pytest.raises(ConfigError, match=r"`train\.steps`"):
        load_config(path, ["train.steps=-1"])
    assert parse_override("model.anchor_sizes=[8, 16]") == (["model", "anchor_sizes"], [8, 16])
    data = apply_overrides({"distill": [{"method": "pkd"}]}, ["distill.0.weight=3"])
    assert data["distill"][0]["weight"] == 3


def test_relative_input_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "configs" / "sub"
    folder.mkdir(parents=True)
    data = _minimal()
    data["model"] = {"weights": "../w.safetensors"}
    data["teacher"] = {"checkpoint": "teacher/last.pt"}
    data["output_dir"] = "runs/{name}"
    path = _write(folder, data)
    monkeypatch.chdir(tmp_path)  # the working directory must not matter for inputs
    cfg = load_config(Path("configs/sub/cfg.yaml"))
    assert cfg.data.train.path == str(folder / "data" / "train.txt")
    assert cfg.data.train.classes == str(folder / "data" / "classes.txt")
    assert cfg.data.val.path == "/abs/val.txt"  # absolute stays
    assert cfg.data.val.classes == ["car", "bus"]  # a list of names is not a path
    assert cfg.model.weights == str(tmp_path / "configs" / "w.safetensors")
    assert cfg.teacher is not None and cfg.teacher.checkpoint == str(folder / "teacher" / "last.pt")
    assert cfg.output_dir == "runs/{name}"  # outputs are relative to the working directory
    assert path.is_file()


def test_yaml_tags_are_rejected(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n"
                    "data: {train: {format: yolo, path: a}, val: {format: yolo, path: b}}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)
    assert not marker.exists()
    obj = tmp_path / "obj.yaml"
    obj.write_text("model: !!python/object:detdistill.config.ModelConfig {arch: fcos}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(obj)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_model_validators():
    with pytest.raises(ConfigError, match="milestones"):
        config_from_dict({**_minimal(), "train": {"milestones": [0.9, 0.5]}})
    with pytest.raises(ConfigError, match="tile_overlap"):
        config_from_dict({**_minimal(), "eval": {"tile_size": 64, "tile_overlap": 64}})
    with pytest.raises(ConfigError, match="unique names"):
        config_from_dict({**_minimal(), "distill": [{"method": "pkd"}, {"method": "pkd"}]})
    # validate_assignment: a config object cannot be mutated into an invalid state
    cfg = config_from_dict(_minimal())
    with pytest.raises(ValueError):
        cfg.train.steps = 0
    assert isinstance(cfg.data, DataConfig) and isinstance(cfg.model, ModelConfig) and isinstance(cfg.train, TrainConfig)


def test_registry_duplicates_and_misses():
    reg: Registry[int] = Registry("widget")
    reg.add("a", 1)
    reg.add("b", 2)
    with pytest.raises(KeyError, match="widget 'a' is already registered"):
        reg.add("a", 2)
    assert reg.get("a") == 1
    with pytest.raises(KeyError) as err:
        reg.get("c")
    assert "unknown widget 'c'" in str(err.value) and "valid names: a, b" in str(err.value)
    assert list(reg) == reg.names() == ["a", "b"] and len(reg) == 2 and "a" in reg
    with pytest.raises(KeyError, match=r"\(none registered\)"):
        Registry("gadget").get("x")
    assert reg.remove("b") == 2 and reg.names() == ["a"]
    with pytest.raises(KeyError, match="unknown widget 'b'"):
        reg.remove("b")
