"""``detdistill bench``: paired verdicts on synthetic numbers, report files, resumability."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from scipy import stats

from detdistill.bench import _check_unchanged, _run_config, config_drift, run_bench
from detdistill.bench_spec import load_spec
from detdistill.bench_spec import BenchMethod, BenchSpec
from detdistill.report.bench_report import (
    _balance_section,
    _lead_closed_text,
    lead_closed,
    paired_runs,
    teacher_check,
    verdicts,
)
from detdistill.config import ConfigError
from detdistill.distill.methods import METHODS
from detdistill.engine.environment import pairing_key, run_environment
from detdistill.engine.train import train
from detdistill.report.loss_balance import LossBalance
from detdistill.report.paired import paired_verdict
from detdistill.run_claim import claim_run


def test_paired_verdict_uses_per_seed_gains_and_a_one_sided_t_test():
    # seed spread 20 AP, but the method gains on every seed: a paired gain, unpaired "noise"
    base = {0: 20.0, 1: 40.0, 2: 30.0, 3: 45.0, 4: 25.0}
    method = {0: 22.0, 1: 41.5, 2: 32.5, 3: 46.0, 4: 27.0}
    r = paired_verdict(base, method)
    gains = [2.0, 1.5, 2.5, 1.0, 2.0]
    mean, sd = sum(gains) / 5, math.sqrt(sum((g - 1.8) ** 2 for g in gains) / 4)
    assert (r.n, r.wins, r.losses) == (5, 5, 0)
    assert r.mean_gain == pytest.approx(mean) and r.std_gain == pytest.approx(sd)
    assert r.t == pytest.approx(mean / (sd / math.sqrt(5)))
    assert r.p_greater == pytest.approx(stats.ttest_rel(list(method.values()), list(base.values()),
                                                        alternative="greater").pvalue)
    assert r.verdict == "beats" and "5 wins / 0 losses" in r.describe()
    # the same values shuffled between seeds: no pairing left, the verdict must not claim a gain
    shuffled = dict(zip(method, [46.0, 22.0, 27.0, 32.5, 41.5]))
    assert paired_verdict(base, shuffled).verdict == "within noise"
    # a consistent loss is "worse"
    assert paired_verdict(base, {s: v - 3.0 + 0.1 * s for s, v in base.items()}).verdict == "worse"


def test_paired_verdict_edge_cases():
    assert paired_verdict({0: 1.0, 1: 2.0}, {0: 3.0, 1: 4.0}).verdict == "no claim"  # < 3 seeds
    assert paired_verdict({0: 1.0}, {1: 2.0}).n == 0  # no common seed
    r = paired_verdict({0: 1.0, 1: 2.0, 2: 3.0, 3: math.nan}, {0: 2.0, 1: 3.0, 2: 4.0, 3: 9.0})
    assert r.n == 3 and r.std_gain == 0.0 and r.verdict == "beats"  # +1 on every seed; the nan seed is dropped
    assert paired_verdict({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.0, 1: 2.0, 2: 3.0}).verdict == "within noise"


def test_bench_verdicts_pair_by_seed():
    per_seed = {"alone": {0: {"AP": 10.0}, 1: {"AP": 30.0}, 2: {"AP": 20.0}},
                "kd": {0: {"AP": 11.0}, 1: {"AP": 31.5}, 2: {"AP": 21.2}}}
    v = verdicts(per_seed, "alone")
    assert list(v) == ["kd"] and v["kd"].verdict == "beats" and v["kd"].gains == pytest.approx({0: 1.0, 1: 1.5, 2: 1.2})


def test_bench_verdicts_pair_only_runs_of_one_environment():
    per_seed = {"alone": {0: {"AP": 10.0}, 1: {"AP": 30.0}, 2: {"AP": 20.0}},
                "kd": {0: {"AP": 11.0}, 1: {"AP": 31.5}, 2: {"AP": 21.2}}}
    same = {"alone": {0: "A", 1: "A", 2: "A"}, "kd": {0: "A", 1: "A", 2: "A"}}
    assert verdicts(per_seed, "alone", environments=same)["kd"].n == 3
    # seed 1's kd run trained on another machine: its difference from alone seed 1 is not a paired one
    moved = {"alone": {0: "A", 1: "A", 2: "A"}, "kd": {0: "A", 1: "B", 2: "A"}}
    v = verdicts(per_seed, "alone", environments=moved)["kd"]
    assert v.n == 2 and set(v.gains) == {0, 2} and v.verdict == "no claim"
    # the paired plot reads the same pairs: the moved run is not drawn as a line from alone seed 1
    assert paired_runs(per_seed, "alone", moved) == {"alone": per_seed["alone"], "kd": {0: {"AP": 11.0}, 2: {"AP": 21.2}}}


def test_run_environment_names_what_changes_the_numbers():
    env = run_environment(torch.device("cpu"))
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["threads"] == torch.get_num_threads()
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and env["processor"]
    json.dumps(env)  # plain JSON values: it goes into run_summary.json
    key = pairing_key(env)
    assert key == pairing_key(dict(env, python="0.0", detdistill="0.0"))  # recorded, but not part of the key
    assert key != pairing_key(dict(env, threads=env["threads"] + 1)) and key != pairing_key(dict(env, torch="x"))
    assert pairing_key(None) == pairing_key({}) == "unrecorded"


def test_the_teacher_must_lead_by_more_than_two_seed_stds():
    ok, text = teacher_check("AP/car", 45.5, 28.3, 2.0, 3)  # the FCOS pair
    assert ok and "lead +17.2 = 8.6 seed stds (over 2): the teacher is clearly better" in text
    ok, text = teacher_check("AP/car", 33.0, 28.3, 3.0, 3)  # ahead, but inside two stds
    assert not ok and "1.6 seed stds (not over 2). WARNING" in text and "train the teacher longer" in text
    ok, text = teacher_check("AP/car", 30.0, 28.3, 0.0, 1)
    assert ok and "unknown with one seed" in text
    ok, text = teacher_check("AP/car", 20.0, 28.3, 0.0, 1)
    assert not ok and "does NOT beat" in text


def test_the_share_of_the_teachers_lead_is_measured_on_the_paired_seeds():
    # seed 3 ran alone only: the lead must come from seeds 0-2, where the gains were measured
    base = {0: 30.0, 1: 32.0, 2: 28.0, 3: 50.0}
    r = paired_verdict(base, {0: 33.0, 1: 36.0, 2: 33.0})
    share, lead = lead_closed(60.0, base, r)
    assert lead == pytest.approx(60.0 - 30.0) and share == pytest.approx(4.0 / 30.0)
    assert _lead_closed_text(share, lead, r.mean_gain) == "; closes 13 % of the teacher's lead (+4.0 of 30.0)"
    worse = paired_verdict(base, {0: 29.0, 1: 31.0, 2: 27.0})
    assert _lead_closed_text(*lead_closed(60.0, base, worse), worse.mean_gain) == (
        "; widens the teacher's lead by 3 % (-1.0 on 30.0)")
    # a teacher that does not lead, or no paired seed: nothing to close, nothing said
    share, lead = lead_closed(25.0, base, r)
    assert math.isnan(share) and lead == pytest.approx(-5.0) and _lead_closed_text(share, lead, r.mean_gain) == ""
    assert all(math.isnan(x) for x in lead_closed(60.0, base, paired_verdict(base, {7: 1.0})))


def test_rows_without_kd_terms_are_reported_as_controls_not_diagnosed():
    # A longer schedule, a null lr change and weight inheritance log no KD term: "why it may not
    # help ... the run distilled nothing" would misread them, even when they are far ahead.
    spec = BenchSpec(name="b", student_config="s.yaml", baseline="alone", methods=[
        BenchMethod(name="alone"),
        BenchMethod(name="alone_1400", overrides=["train.steps=1400"]),
        BenchMethod(name="same"),
        BenchMethod(name="inherit", teacher_inherit=True),
        BenchMethod.model_validate({"name": "l2", "distill": [{"method": "l2", "weight": 1.0}]}),
    ])
    plain = {s: LossBalance(steps=400, task_start=2.0, task_end=1.0, kd_start={}, kd_end={}) for s in (0, 1)}
    balances = {"alone": plain, "alone_1400": plain, "same": plain, "inherit": plain, "l2": plain}
    base = {0: 30.0, 1: 31.0}
    paired = {"alone_1400": paired_verdict(base, {0: 58.0, 1: 57.0}), "same": paired_verdict(base, base),
              "inherit": paired_verdict(base, {0: 31.0, 1: 30.0}), "l2": paired_verdict(base, {0: 29.0, 1: 30.0})}
    lines: list[str] = []
    findings = _balance_section(spec, balances, paired, {}, lines)
    text = "\n".join(lines)
    assert ("`alone_1400` distils nothing (no `distill` terms in its row): a control, whose gain over `alone` is "
            "what its overrides (`train.steps=1400`) change.") in text
    assert "`same` distils nothing and changes nothing" in text
    assert "`inherit` has no KD term: it starts the student's neck and head from the teacher's" in text
    # a row that has terms but logged none is still flagged: that is the silent-zero-KD failure
    assert "Why `l2` may not help: no KD term was logged: the run distilled nothing." in text
    assert text.count("may not help") == 1 and set(findings) == {"l2"}


def test_bench_runs_reports_and_resumes(tiny_config, tiny_config_yaml, tmp_path, capsys):
    teacher = train(tiny_config(root=tmp_path / "teacher", train__steps=2), resume=False, progress=False)
    student_cfg = tiny_config_yaml("student.yaml", train__steps=2)
    spec = {
        "name": "tiny_bench",
        "student_config": str(student_cfg),
        "teacher_checkpoint": str(teacher.run_dir / "checkpoints" / "last.pt"),
        "seeds": [0, 1],
        "methods": [
            {"name": "alone"},
            {"name": "l2", "distill": [{"method": "l2", "weight": 1.0, "pairs": [["neck.p3", "neck.p3"]]}]},
        ],
    }
    spec_path = tmp_path / "bench.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "bench_out"

    rows = run_bench(spec_path, out_dir=out, progress=False)
    assert [r["name"] for r in rows] == ["alone", "l2"] and all(r["n"] == 2 for r in rows)
    for name in ("results.md", "results.json", "bars.png", "paired.png"):
        assert (out / name).stat().st_size > 0
    report = (out / "results.md").read_text()
    assert "Teacher AP" in report and "Paired verdict on AP" in report and "fewer than 3 paired seeds" in report
    assert "Per-seed AP gain over `alone`" in report
    assert "Paired gain over `alone` on each metric" in report and "| name | AP | AP75 | APs | APm |" in report
    # The loss-balance section reads every finished run's training log.
    assert "Loss balance" in report and "| l2 | 2 |" in report and "| alone | 2 |" in report
    saved = json.loads((out / "results.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["paired"]["l2"]["n"] == 2 and saved["paired"]["l2"]["verdict"] == "no claim"
    assert "lead_closed" in saved["paired"]["l2"]  # a share, or null where the 2-step teacher does not lead
    assert saved["paired_by_metric"]["APm"]["l2"]["n"] == 2 and list(saved["paired_by_metric"]) == ["AP", "AP75", "APs", "APm"]
    assert set(saved["findings"]) == {"l2"}  # diagnosed: it does not beat the baseline; the baseline is not
    # The distilled runs really distilled: their config carries the teacher and the term.
    run_cfg = yaml.safe_load((out / "l2" / "seed1" / "bench_config.yaml").read_text())
    assert run_cfg["teacher"]["checkpoint"].endswith("last.pt") and run_cfg["distill"][0]["method"] == "l2"
    # The teacher is recorded with the results; one that scores differently now (retrained or
    # replaced at the same path) is refused before anything trains, naming what changed.
    recorded = json.loads((out / "teacher_metrics.json").read_text())
    assert recorded == json.loads((teacher.run_dir / "final_metrics.json").read_text())
    changed = {**recorded, "AP": recorded["AP"] + 1.0}
    (teacher.run_dir / "final_metrics.json").write_text(json.dumps(changed))
    with pytest.raises(ConfigError, match=r"not the one this bench's runs distilled from.*AP: .* -> .*Restore that teacher"):
        run_bench(spec_path, out_dir=out, progress=False)
    (teacher.run_dir / "final_metrics.json").write_text(json.dumps(recorded))

    # A second call finds every run finished and trains nothing.
    stamp = (out / "alone" / "seed0" / "final_metrics.json").stat().st_mtime_ns
    capsys.readouterr()
    run_bench(spec_path, out_dir=out, progress=False)
    assert capsys.readouterr().out.count("done already, skipping") == 4
    assert (out / "alone" / "seed0" / "final_metrics.json").stat().st_mtime_ns == stamp

    # An interrupted run (no final metrics yet) is the only one trained again.
    (out / "l2" / "seed1" / "final_metrics.json").unlink()
    run_bench(spec_path, out_dir=out, methods=["l2"], progress=False)
    printed = capsys.readouterr().out
    assert "l2 seed 1: training" in printed and printed.count("done already, skipping") == 1
    assert (out / "l2" / "seed1" / "final_metrics.json").is_file()

    # Every run records its environment; the report names it, one for all these runs.
    summary = json.loads((out / "l2" / "seed1" / "run_summary.json").read_text())
    # The bench trains each run in a fresh process, whose thread count is torch's default for the
    # environment variables it inherits, not this process's (ultralytics' select_device, run by the
    # YOLO tests, sets this one's to 1): compare with what such a process reports.
    fresh = subprocess.run([sys.executable, "-c", "import json, torch; from detdistill.engine.environment import "
                            "run_environment; print(json.dumps(run_environment(torch.device('cpu'))))"],
                           capture_output=True, text=True, check=True)
    assert summary["environment"] == json.loads(fresh.stdout)
    assert f"Environment of every run: {pairing_key(summary['environment'])}." in (out / "results.md").read_text()
    # A run from another environment (here: a thread count changed by hand) is named and left out of the pairs.
    # The bench reads a run's environment history (one entry for a run that never moved).
    summary["environment"]["threads"] += 7
    summary["environment_history"] = [summary["environment"]]
    (out / "l2" / "seed1" / "run_summary.json").write_text(json.dumps(summary))
    run_bench(spec_path, out_dir=out, progress=False)
    printed = capsys.readouterr().out
    report = (out / "results.md").read_text()
    assert "WARNING: the runs come from 2 environments" in printed and "(l2 seed 1)" in report
    assert json.loads((out / "results.json").read_text())["paired"]["l2"]["n"] == 1


def test_a_runs_warnings_reach_the_bench_console_and_its_log(tmp_path, capsys):
    from detdistill.bench import _train_in_subprocess

    script = "import sys; print('step 10 loss 2.6'); print('warning: step 70: loss/kd/x is 8.9e+06'); sys.exit(3)"
    log = tmp_path / "train.log"
    log.write_text("earlier attempt\n")
    rc = _train_in_subprocess([sys.executable, "-c", script], log, "sdf seed 0")
    assert rc == 3
    assert log.read_text() == "earlier attempt\nstep 10 loss 2.6\nwarning: step 70: loss/kd/x is 8.9e+06\n"
    assert capsys.readouterr().out == "    sdf seed 0: warning: step 70: loss/kd/x is 8.9e+06\n"


def test_config_drift_names_each_changed_key():
    recorded = {"model": {"reg_bias_init": None, "arch": "fcos"}, "distill": [{"method": "l2", "weight": 1.0}], "old": 1}
    current = {"model": {"reg_bias_init": 1.0, "arch": "fcos"}, "distill": [{"method": "l2", "weight": 0.3}], "new": 2}
    assert config_drift(recorded, current) == ["model.reg_bias_init: None -> 1.0", "distill.0.weight: 1.0 -> 0.3",
                                               "old: 1 -> '<absent>'", "new: '<absent>' -> 2"]
    assert config_drift(recorded, recorded) == []
    assert config_drift({"pairs": [[1, 2]]}, {"pairs": [[1, 2], [3, 4]]}) == ["pairs: [[1, 2]] -> [[1, 2], [3, 4]]"]


def test_an_edited_spec_refuses_the_runs_of_the_old_one(tiny_config_yaml, tmp_path):
    """A spec changed after runs trained must not skip them as done, resume them, or pair them
    with runs of the new spec: the bench names the run and the keys that changed."""
    student_cfg = tiny_config_yaml("student.yaml", train__steps=2)
    spec = {"name": "edited", "student_config": str(student_cfg), "seeds": [0], "methods": [{"name": "alone"}]}
    spec_path = tmp_path / "bench.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "bench_out"
    loaded = load_spec(spec_path)
    assert load_spec(str(spec_path)) == loaded  # the public API takes a str path as load_config does
    _run_config(loaded, loaded.methods[0], 0, out / "alone" / "seed0")  # as the bench records a run before it trains
    lr = yaml.safe_load((out / "alone" / "seed0" / "bench_config.yaml").read_text())["train"]["lr"]

    spec["overrides"] = [f"train.lr={lr * 2}"]
    spec_path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=rf"alone seed 0 .*train\.lr: {lr} -> {lr * 2}.*Move that folder away"):
        run_bench(spec_path, out_dir=out, progress=False)
    assert not (out / "alone" / "seed0" / "train.log").exists()  # refused before anything trained
    # A finished stale run (as if trained under the old spec) is refused by the report too, when
    # only another method runs now: it is never skipped as done and paired.
    (out / "alone" / "seed0" / "final_metrics.json").write_text(json.dumps({"AP": 1.0}))
    spec["methods"].append({"name": "other"})
    spec_path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=r"alone seed 0 .*train\.lr"):
        run_bench(spec_path, out_dir=out, methods=["other"], progress=False)
    assert (out / "other" / "seed0" / "final_metrics.json").is_file()  # the selected method trained first
    spec["methods"].pop()

    # The unchanged spec accepts its runs wherever the bench folder now lives (name, output_dir are not settings).
    spec["overrides"] = []
    spec_path.write_text(yaml.safe_dump(spec))
    moved = tmp_path / "moved"
    out.rename(moved)
    _check_unchanged(load_spec(spec_path), loaded.methods[0], 0, moved / "alone" / "seed0")


def _recorded_kl_run(tiny_config_yaml, tmp_path, kl_term: dict) -> tuple[dict, Path, BenchSpec, BenchMethod, Path]:
    """A bench spec of `alone` and one KL row (``kl_term``), and that row's seed-0 record as the
    bench writes it before training: (spec dict, spec path, loaded spec, the KL row, record path)."""
    spec = {"name": "recorded", "student_config": str(tiny_config_yaml("student.yaml", train__steps=2)),
            "teacher_checkpoint": str(tmp_path / "teacher.pt"), "seeds": [0],
            "methods": [{"name": "alone"}, {"name": "kl", "distill": [kl_term]}]}
    spec_path = tmp_path / "bench.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    loaded = load_spec(spec_path)
    kl = loaded.methods[1]
    return spec, spec_path, loaded, kl, _run_config(loaded, kl, 0, tmp_path / "kl")


def test_an_option_added_since_a_run_does_not_unpair_it(tiny_config_yaml, tmp_path):
    """A run recorded before a config key existed (here `teacher.inherit`, whose default keeps the old
    behaviour) still pairs; a recorded key this version does not know still differs, by name."""
    _, _, loaded, kl, recorded_path = _recorded_kl_run(tiny_config_yaml, tmp_path, {"method": "kl"})
    recorded = yaml.safe_load(recorded_path.read_text())
    del recorded["teacher"]["inherit"]  # as written before the key existed
    recorded_path.write_text(yaml.safe_dump(recorded))
    _check_unchanged(loaded, kl, 0, tmp_path / "kl")
    recorded["teacher"]["from_the_future"] = 1
    recorded_path.write_text(yaml.safe_dump(recorded))
    with pytest.raises(ConfigError, match=r"teacher\.from_the_future: 1 -> '<absent>'"):
        _check_unchanged(loaded, kl, 0, tmp_path / "kl")


def test_a_changed_method_default_shows_as_drift_not_as_the_same_run(tiny_config_yaml, tmp_path, monkeypatch):
    """A bench record names every method param it trained with; a record from before that (params
    omitted) is read with the values they meant then (`legacy_param_defaults`), so a method whose
    default has changed since does not pair its old runs as if they used the new default."""
    spec, spec_path, loaded, kl, recorded_path = _recorded_kl_run(
        tiny_config_yaml, tmp_path, {"method": "kl", "params": {"mode": "sigmoid"}})
    recorded = yaml.safe_load(recorded_path.read_text())
    assert recorded["distill"][0]["params"] == {"mode": "sigmoid", "temperature": 1.0}  # the default, written out
    del recorded["distill"][0]["params"]["temperature"]  # as records were written before
    recorded_path.write_text(yaml.safe_dump(recorded))
    _check_unchanged(loaded, kl, 0, tmp_path / "kl")  # no default changed since: it pairs

    # the default changes from 2.0 (what the old record meant) to 1.0 (what the signature says now)
    monkeypatch.setattr(METHODS.get("kl"), "legacy_param_defaults", {"temperature": 2.0})
    with pytest.raises(ConfigError, match=r"distill\.0\.params\.temperature: 2\.0 -> 1\.0"):
        _check_unchanged(loaded, kl, 0, tmp_path / "kl")
    spec["methods"][1]["distill"][0]["params"]["temperature"] = 2.0  # the spec names the old value: it pairs again
    spec_path.write_text(yaml.safe_dump(spec))
    _check_unchanged(load_spec(spec_path), load_spec(spec_path).methods[1], 0, tmp_path / "kl")
    # a record written now carries the value, so the legacy table never applies to it
    fresh = _run_config(loaded, kl, 0, tmp_path / "kl_now")
    assert yaml.safe_load(fresh.read_text())["distill"][0]["params"]["temperature"] == 1.0
    _check_unchanged(loaded, kl, 0, tmp_path / "kl_now")


def test_the_report_pairs_every_reported_metric_primary_first():
    from detdistill.report.bench_report import _gain_cell, paired_metrics

    assert paired_metrics("AP/car") == ["AP/car", "AP", "AP75", "APs", "APm"]
    assert paired_metrics("AP") == ["AP", "AP75", "APs", "APm"]
    base = {100: 38.9, 101: 42.4, 102: 38.1}
    worse_small = paired_verdict(base, {100: 33.9, 101: 37.1, 102: 33.4})  # a loss on every seed
    assert _gain_cell(worse_small) == "-5.0 ± 0.3 (0 / 3, p < 0.01)" and worse_small.p_less < 0.01
    mixed = paired_verdict(base, {100: 44.1, 101: 38.2, 102: 41.0})
    assert _gain_cell(mixed) == f"+1.3 ± 4.9 (2 / 1, p {mixed.p_greater:.2f})" and 0.3 < mixed.p_greater < 0.4
    assert _gain_cell(paired_verdict(base, {100: 40.0})) == "+1.1 (1 seed)"
    assert _gain_cell(paired_verdict(base, {})) == "—"


def test_only_rows_that_need_the_teacher_get_it(tiny_config_yaml, tmp_path):
    """A bench with a teacher may hold self-distillation rows (MSSD on the YOLO pair): those runs
    must not load the teacher, while logit and feature rows distil from it."""
    spec = {"name": "mixed", "student_config": str(tiny_config_yaml("student.yaml", train__steps=2)),
            "teacher_checkpoint": str(tmp_path / "teacher.pt"), "seeds": [0],
            "methods": [{"name": "alone"},
                        {"name": "inherit", "teacher_inherit": True},  # no KD term, the teacher's neck and head
                        {"name": "kl", "distill": [{"method": "kl"}]},
                        {"name": "mssd", "distill": [{"method": "mssd", "pairs": [["fpn.p4", "pan.p4"]],
                                                      "params": {"scale_weights": [1.0], "size_thresholds": []}}]}]}
    spec_path = tmp_path / "bench.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    loaded = load_spec(spec_path)
    for method in loaded.methods:  # a valid spec: the rows' params are the methods' own
        for term in method.distill:
            METHODS.get(term.method).check_params(term)
    written = {m.name: yaml.safe_load(_run_config(loaded, m, 0, tmp_path / m.name).read_text()) for m in loaded.methods}
    assert written["kl"]["teacher"]["checkpoint"] == str(tmp_path / "teacher.pt")
    assert written["kl"]["teacher"]["inherit"] is False
    assert written["inherit"]["teacher"] == {"checkpoint": str(tmp_path / "teacher.pt"), "input_scale": 1.0, "inherit": True}
    assert written["alone"]["teacher"] is None and written["mssd"]["teacher"] is None
    assert written["mssd"]["distill"][0]["method"] == "mssd"


def test_a_bench_can_drop_finished_runs_checkpoints(tiny_config_yaml, tmp_path, capsys):
    """`keep_checkpoints: false` deletes a run's checkpoint folder once it has finished, keeps what
    the report and a user need (final metrics, the exported student), and the run stays done."""
    spec = {"name": "lean", "student_config": str(tiny_config_yaml("student.yaml", train__steps=2)),
            "seeds": [0], "methods": [{"name": "alone"}], "keep_checkpoints": False}
    spec_path = tmp_path / "bench.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "bench_out"
    run_bench(spec_path, out_dir=out, progress=False)
    run_dir = out / "alone" / "seed0"
    assert not (run_dir / "checkpoints").exists()
    assert (run_dir / "final_metrics.json").is_file() and any((run_dir / "export").iterdir())
    assert "removed" in capsys.readouterr().out
    run_bench(spec_path, out_dir=out, progress=False)
    assert "alone seed 0: done already, skipping" in capsys.readouterr().out

    spec["keep_checkpoints"] = True  # the default; not a run setting, so the finished run still pairs
    spec_path.write_text(yaml.safe_dump(spec))
    run_bench(spec_path, out_dir=out, progress=False)
    assert "done already, skipping" in capsys.readouterr().out


def test_benches_sharing_a_spec_train_each_run_once(tiny_config_yaml, tmp_path, capsys):
    """Two lanes given overlapping seeds: the run one bench holds is skipped by the other, which
    names the holder, trains the rest and says the report lacks the held run; once free, it trains."""
    spec = {"name": "shared", "student_config": str(tiny_config_yaml("student.yaml", train__steps=2)),
            "seeds": [0, 1], "methods": [{"name": "alone"}]}
    spec_path = tmp_path / "bench.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "bench_out"
    with claim_run(out / "alone" / "seed0") as lane_a:  # as the other bench does while it trains seed 0
        assert lane_a.held
        rows = run_bench(spec_path, out_dir=out, progress=False)
        printed = capsys.readouterr().out
    assert f"alone seed 0: being trained by pid {os.getpid()} on " in printed
    assert "alone seed 1: training in" in printed
    notice = [line for line in printed.splitlines() if "were being trained by another process" in line]
    assert len(notice) == 1 and notice[0].startswith("1 run(s)") and "(alone seed 0)" in notice[0]
    assert not (out / "alone" / "seed0" / "train.log").exists() and not (out / "alone" / "seed0" / "final_metrics.json").exists()
    assert [r["n"] for r in rows] == [1]
    rows = run_bench(spec_path, out_dir=out, progress=False)
    printed = capsys.readouterr().out
    assert "alone seed 0: training in" in printed and "alone seed 1: done already" in printed
    assert [r["n"] for r in rows] == [2]
