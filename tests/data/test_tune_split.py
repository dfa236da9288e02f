"""The carved `tune` split: tuning runs train on train-minus-tune and evaluate on tune, never on val."""

from __future__ import annotations

import dataclasses

import pytest

from detdistill.config import ConfigError
from detdistill.data.sample import DetectionSet
from detdistill.data.splits import carve_tune_split, load_split
from detdistill.quickstart import sample_dir


def _paths(dset: DetectionSet) -> set[str]:
    return {str(s.path) for s in dset.samples}


def _sample_set(tiny_config) -> DetectionSet:
    return load_split(tiny_config(data__train__path=str(sample_dir() / "train.txt")), "train")


def test_carve_is_a_fixed_disjoint_partition_independent_of_file_order(tiny_config) -> None:
    full = _sample_set(tiny_config)
    n = len(full)
    assert n >= 5
    rest, tune = carve_tune_split(full, 0.3, seed=0)
    assert len(tune) == round(0.3 * n) and len(rest) == n - len(tune)
    assert _paths(rest) | _paths(tune) == _paths(full) and not _paths(rest) & _paths(tune)
    assert tune.report.images == len(tune) and tune.report.boxes == sum(s.num_boxes for s in tune.samples)
    assert sum(tune.report.per_class.values()) + sum(rest.report.per_class.values()) == sum(full.report.per_class.values())
    # the same images whatever the order the list file gives them in
    reversed_set = dataclasses.replace(full, samples=list(reversed(full.samples)))
    assert _paths(carve_tune_split(reversed_set, 0.3, seed=0)[1]) == _paths(tune)
    assert _paths(carve_tune_split(full, 0.3, seed=0)[1]) == _paths(tune)
    assert any(_paths(carve_tune_split(full, 0.3, seed=s)[1]) != _paths(tune) for s in (1, 2, 3))
    assert "tune split carved from train" in tune.source


def test_runs_with_a_tune_fraction_never_read_val(tiny_config, tmp_path) -> None:
    cfg = tiny_config(data__train__path=str(sample_dir() / "train.txt"), data__tune_fraction=0.25,
                      data__val__path=str(tmp_path / "no_such_val.txt"))  # val is not even there
    train, tune = load_split(cfg, "train"), load_split(cfg, "val")
    full = _sample_set(tiny_config)
    assert _paths(train) | _paths(tune) == _paths(full) and not _paths(train) & _paths(tune)
    assert len(tune) == round(0.25 * len(full))


def test_bad_fractions_are_errors(tiny_config) -> None:
    full = _sample_set(tiny_config)
    with pytest.raises(ValueError, match="must be in \\(0, 1\\)"):
        carve_tune_split(full, 0.0)
    with pytest.raises(ValueError, match="leaves none to train on"):
        carve_tune_split(full, 0.99)
    with pytest.raises(ConfigError, match="tune_fraction"):
        tiny_config(data__tune_fraction=1.0)
