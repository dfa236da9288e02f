"""Loss balance read back from training logs: shares against a hand computation, the warm-up
window, and each diagnosis on synthetic logs."""

from __future__ import annotations

import math

import pytest

from detdistill.config import DistillTermConfig
from detdistill.report.loss_balance import LossBalance, detection_loss_change, diagnose, loss_balance
from detdistill.report.metrics_log import MetricsLogger, read_metrics


def _log(task: list[float], kd: list[float] | None = None, start: int = 0) -> list[dict]:
    """Train records every 10 steps: two task parts summing to ``task[i]``, one KD part from ``start`` on."""
    recs = []
    for i, t in enumerate(task):
        step = 10 * (i + 1)
        rec = {"step": step, "split": "train", "loss/classification": 0.25 * t, "loss/bbox_regression": 0.75 * t,
               "loss": t, "lr": 0.01, "grad_norm": 3.0}
        if kd is not None:
            rec["loss/kd/pkd"] = kd[i] if step > start else 0.0
            rec["loss"] = t + rec["loss/kd/pkd"]
        recs.append(rec)
    recs.append({"step": 10 * len(task), "split": "eval", "AP": 5.0})  # eval records are ignored
    return recs


def test_shares_match_a_hand_computation():
    task = [float(v) for v in range(20, 0, -1)]  # 20 records; window 0.1 -> 2 at each end
    kd = [0.5 * t for t in task]
    b = loss_balance(_log(task, kd))
    assert b is not None and b.steps == 200
    assert b.task_start == pytest.approx((20 + 19) / 2) and b.task_end == pytest.approx((2 + 1) / 2)
    assert b.kd_start == {"pkd": pytest.approx((10 + 9.5) / 2)}
    assert b.share_start == pytest.approx(1 / 3) and b.share_end == pytest.approx(1 / 3)  # kd / (task + kd)


def test_the_start_window_begins_when_a_term_becomes_active():
    task = [2.0] * 20
    b = loss_balance(_log(task, [1.0] * 20, start=100))  # zero for the first 10 records (a warm-up)
    assert b is not None and b.share_start == pytest.approx(1 / 3)


def test_assistant_parts_are_neither_distillation_nor_detection_loss():
    """ScaleKD-like log: a tiny feature part from step 0, and from step 100 the assistant's own
    ground-truth loss, as large as the task loss. Left out, the feature part's share is what
    reaches the student, and the start window stays where that part starts."""
    recs = _log([2.0] * 20, [0.002] * 20)
    for r in recs[:-1]:
        r["loss/kd/scalekd/csa"] = 2.0 if r["step"] > 100 else 0.0
    counted = loss_balance(recs)
    assert counted is not None and counted.share_end == pytest.approx(2.002 / 4.002)  # the CSA inflates it
    b = loss_balance(recs, assistant={"scalekd/csa"})
    assert b is not None and b.kd_end == {"pkd": pytest.approx(0.002)} and b.task_end == pytest.approx(2.0)
    assert b.share_start == pytest.approx(0.002 / 2.002) and b.share_end == pytest.approx(0.002 / 2.002)
    assert any("too weak" in f for f in diagnose({0: b}, {}))


def test_a_baseline_has_no_kd_and_a_log_without_train_records_has_no_balance():
    b = loss_balance(_log([2.0] * 10))
    assert b is not None and b.kd_start == {} and b.share_start == 0.0
    assert loss_balance([{"step": 10, "split": "eval", "AP": 1.0}]) is None
    with pytest.raises(ValueError, match="window"):
        loss_balance(_log([2.0] * 10), window=0.0)


def test_it_reads_a_real_metrics_log(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        for rec in _log([2.0, 1.0], [0.5, 0.5]):
            logger.log(rec["step"], rec["split"], {k: v for k, v in rec.items() if k not in ("step", "split")})
    b = loss_balance(read_metrics(tmp_path))
    assert b is not None and b.share_end == pytest.approx(0.5 / 1.5)


def _bal(task_end: float, share: float) -> LossBalance:
    def kd(task: float) -> dict[str, float]:
        return {"t": share * task / (1 - share)} if share else {}
    return LossBalance(steps=400, task_start=2 * task_end, task_end=task_end, kd_start=kd(2 * task_end), kd_end=kd(task_end))


def test_diagnose_names_each_failure_and_its_figure():
    base = {0: _bal(1.0, 0.0), 1: _bal(1.2, 0.0)}
    weak = diagnose({0: _bal(1.0, 0.0005), 1: _bal(1.2, 0.0005)}, base)
    assert len(weak) == 1 and "too weak" in weak[0] and "0.05 %" in weak[0]
    strong = diagnose({0: _bal(1.0, 0.9), 1: _bal(1.2, 0.9)}, base)
    assert len(strong) == 1 and "90 % of the loss" in strong[0] and "outweigh" in strong[0]
    pulls = diagnose({0: _bal(1.3, 0.2), 1: _bal(1.56, 0.2)}, base)
    assert len(pulls) == 1 and "+30 %" in pulls[0] and "2 paired seeds" in pulls[0]
    assert diagnose({0: _bal(0.95, 0.2), 1: _bal(1.1, 0.2)}, base) == []  # balanced, task loss lower: nothing to say
    assert diagnose({0: _bal(1.0, 0.0)}, base) == ["no KD term was logged: the run distilled nothing"]
    assert diagnose({}, base) == []


def test_the_subtler_signs_are_named_only_when_no_plain_failure_is():
    """A term in range (neither weak nor dominant) whose students end with a detection loss not 1 %
    below the student alone's, or whose share grows over the run, is named with its figures (the
    L2 / PKD / SSIM pattern on aerial-cars: +0 to +1.3 %, shares 29 -> 39 %); a term that lowers
    the detection loss with a falling share (KL's pattern: -3.7 %, 46 -> 17 %) gets nothing."""
    from detdistill.report.loss_balance import SHARE_GROWTH, TASK_GAIN

    def run(task_end: float, start: float, end: float) -> LossBalance:
        return LossBalance(steps=400, task_start=2.0, task_end=task_end, kd_start={"t": 2.0 * start / (1 - start)},
                           kd_end={"t": task_end * end / (1 - end)})

    base = {0: run(1.0, 0.0, 0.0), 1: run(1.0, 0.0, 0.0)}
    ssim_like = diagnose({0: run(1.013, 0.29, 0.39), 1: run(1.013, 0.29, 0.39)}, base)
    assert len(ssim_like) == 2
    assert "+1.3 % against the student alone's on the same crops (2 paired seeds), where KD that helps lowers it by 1 %" in ssim_like[0]
    assert "grows from 29 % to 39 % over the run" in ssim_like[1]
    assert diagnose({0: run(0.963, 0.46, 0.17), 1: run(0.963, 0.46, 0.17)}, base) == []
    # the thresholds, just inside and just outside
    assert diagnose({0: run(1 - 1.01 * TASK_GAIN, 0.3, 0.3)}, base) == []
    assert len(diagnose({0: run(1 - 0.99 * TASK_GAIN, 0.3, 0.3)}, base)) == 1
    assert diagnose({0: run(0.9, 0.3, 0.3 * SHARE_GROWTH * 0.99)}, base) == []
    assert "grows" in diagnose({0: run(0.9, 0.3, 0.3 * SHARE_GROWTH * 1.01)}, base)[0]
    # a plain failure explains the result alone: a dominant term is not also called "not lower"
    (dominant,) = diagnose({0: run(1.0, 0.7, 0.8)}, base)
    assert "outweigh" in dominant


def test_the_detection_loss_comparison_is_paired_by_seed():
    # Seed 2 only ran for the method: with a baseline that has it not, it must not count.
    base = {0: _bal(1.0, 0.0), 1: _bal(1.0, 0.0)}
    method = {0: _bal(1.0, 0.2), 1: _bal(1.0, 0.2), 2: _bal(5.0, 0.2)}
    (found,) = diagnose(method, base)  # with seed 2 it would read +130 %, "pull against the task"
    assert "+0.0 % against the student alone's" in found and "(2 paired seeds)" in found
    assert detection_loss_change(method, base) == (pytest.approx(0.0), 2)
    assert detection_loss_change(method, {3: _bal(1.0, 0.0)}) is None
    assert math.isnan(LossBalance(1, 0.0, 0.0, {}, {}).share_end)


def test_an_assistant_that_detects_no_better_than_the_student_is_named():
    """ScaleKD logs its assistant's raw detection loss as ``diag/<term>/assistant_det_loss`` from
    ``csa_start`` on; the last window's mean is read back, and ``diagnose`` says so when it is not
    at least ``ASSISTANT_EDGE`` below the student's own detection loss."""
    from detdistill.report.loss_balance import ASSISTANT_EDGE

    def run(ratio: float) -> LossBalance:
        recs = _log([2.0] * 20, [0.1] * 20)
        for r in recs[:-1]:
            if r["step"] > 100:  # not logged before the assistant starts
                r["diag/scalekd/assistant_det_loss"] = ratio * 2.0
        b = loss_balance(recs)
        assert b is not None
        return b

    same = run(1.0)
    assert same.assistant_end == {"scalekd": pytest.approx(2.0)} and same.task_end == pytest.approx(2.0)
    found = diagnose({0: same, 1: run(0.99)}, {})
    assert len(found) == 1 and "`scalekd`'s assistant" in found[0] and "-0.5 %" in found[0] and "2 runs" in found[0]
    assert diagnose({0: run(1 - 2 * ASSISTANT_EDGE)}, {}) == []  # clearly better: nothing to say
    assert loss_balance(_log([2.0] * 10, [0.1] * 10)).assistant_end == {}  # type: ignore[union-attr]


def test_the_assistant_finding_says_how_much_the_assistant_changes_the_maps():
    recs = _log([2.0] * 20, [0.1] * 20)
    for r in recs:
        r["diag/scalekd/assistant_det_loss"] = 2.0
        r["diag/scalekd/assistant_residual_ratio"] = 0.004
        r["diag/scalekd/assistant_residual_spatial"] = 0.25
    b = loss_balance(recs)
    assert b is not None and b.diag_end["scalekd/assistant_residual_ratio"] == pytest.approx(0.004)
    (found,) = diagnose({0: b}, {})
    assert found.endswith("differ from the student's by 0.4 % of their norm, 25 % of that change varying over positions")


def test_advice_leaves_out_what_the_terms_already_do():
    base = {0: _bal(1.0, 0.0)}
    plain = DistillTermConfig(method="pkd", pairs=[["neck.p3", "neck.p3"]])
    normalised = DistillTermConfig(method="pkd", normalize=True, pairs=[["neck.p3", "neck.p3"]])
    ramped = DistillTermConfig(method="pkd", normalize=True, warmup_steps=100, pairs=[["neck.p3", "neck.p3"]])
    strong = {0: _bal(1.0, 0.6)}
    (finding,) = diagnose(strong, base, [plain])
    assert finding.endswith("lower the weight, add a `warmup_steps` ramp or set `normalize: true`")
    (finding,) = diagnose(strong, base, [normalised])
    assert "set `normalize: true`" not in finding and "lower the weight or add a `warmup_steps` ramp" in finding
    assert "each starts at `weight` times the detection loss" in finding
    (finding,) = diagnose(strong, base, [ramped])
    assert "warmup_steps" not in finding and "lower the weight (the terms are normalised" in finding
    (finding,) = diagnose({0: _bal(1.0, 0.0005)}, base, [normalised])
    assert "raise the weight (the terms are normalised" in finding and "normalize: true" not in finding
    # a method with one normalised and one plain term still gets the normalize advice
    (finding,) = diagnose(strong, base, [normalised, plain])
    assert finding.endswith("set `normalize: true`")


def test_a_method_that_declares_normalising_unsuitable_gets_its_reason_not_the_advice():
    from detdistill.distill.methods import METHODS

    base = {0: _bal(1.0, 0.0)}
    sdf = DistillTermConfig(method="scalekd", params={"use_csa": False})
    (finding,) = diagnose({0: _bal(1.0, 0.0005)}, base, [sdf])
    assert "set `normalize: true`" not in finding
    assert finding.endswith(f"raise the weight ({METHODS.get('scalekd').normalize_caveat})")
    assert "diverged" in finding
    # every other shipped method may be normalised: none declares a caveat
    assert [n for n in METHODS.names() if METHODS.get(n).normalize_caveat] == ["scalekd"]
