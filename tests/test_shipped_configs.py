"""Every YAML under ``configs/`` validates, names registered methods, and taps layers the
student really has: a typo in a shipped example must fail here, not 20 minutes into a run."""

from __future__ import annotations

from pathlib import Path

import pytest

from detdistill.adapters.base import get_adapter
from detdistill.bench_spec import load_spec
from detdistill.config import load_config
from detdistill.distill.methods import METHODS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
RUN_CONFIGS = [p for p in CONFIGS if not p.name.startswith("bench_")]
BENCH_SPECS = [p for p in CONFIGS if p.name.startswith("bench_")]


def test_the_examples_exist():
    assert len(RUN_CONFIGS) >= 10 and BENCH_SPECS


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.stem)
def test_run_config_validates_and_its_student_taps_exist(path: Path, single_thread):
    cfg = load_config(path)
    assert cfg.name == path.stem  # run folders are named after the file
    if cfg.model.framework in ("ultralytics", "transformers"):
        pytest.importorskip(cfg.model.framework)  # the [yolo] / [detr] extras; CI installs them
    model = get_adapter(cfg.model.framework).build(cfg.model, 4)
    taps = get_adapter(cfg.model.framework).taps(model)
    for term in cfg.distill:
        needs = METHODS.get(term.method).needs(term)  # raises on a term without the pairs it needs
        missing = [name for name in needs.student_taps if name not in taps]
        assert not missing, f"{path.name}: {missing} are not taps of {cfg.model.arch} ({sorted(taps)})"
        if needs.teacher:
            assert cfg.teacher is not None, f"{path.name}: {term.method} needs a teacher checkpoint"


@pytest.mark.parametrize("path", BENCH_SPECS, ids=lambda p: p.stem)
def test_bench_spec_validates(path: Path):
    spec = load_spec(path)
    assert Path(spec.student_config).is_file()
    assert len(spec.seeds) >= 3  # the brief: no claim below 3 seeds
    for method in spec.methods:
        for term in method.distill:
            METHODS.get(term.method).check_params(term)  # a typo in a method or its params names the term


def test_the_scalekd_bench_leaves_the_assistants_own_loss_out_of_the_kd_share():
    from detdistill.bench import _assistant_parts

    spec = load_spec(Path(__file__).resolve().parents[1] / "configs" / "bench_aerial_scalekd.yaml")
    parts = {m.name: _assistant_parts(m) for m in spec.methods}
    assert parts["sdf_csa"] == parts["sdf_csa_2x"] == parts["sdf_csa_tkv"] == {"scalekd/csa"}
    assert parts["alone"] == parts["sdf"] == parts["pkd"] == set()
