"""``detdistill bench``: verdicts only beyond the seed spread, report files, resumability."""

from __future__ import annotations

import json

import yaml

from detdistill.bench import run_bench, verdicts
from detdistill.engine.train import train


def _row(name: str, mean: float, std: float, n: int = 3) -> dict:
    return {"name": name, "n": n, "AP_mean": mean, "AP_std": std}


def test_verdicts_claim_a_gain_only_beyond_the_summed_spread():
    rows = [_row("alone", 40.0, 1.0), _row("big", 43.0, 1.0), _row("noise", 41.5, 1.0), _row("bad", 37.0, 0.5)]
    v = verdicts(rows, "alone")
    assert v["big"].startswith("beats")       # +3.0 > 1.0 + 1.0
    assert v["noise"].startswith("within noise")  # +1.5 <= 2.0
    assert v["bad"].startswith("worse")       # -3.0, |gain| > 1.5


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
    for name in ("results.md", "results.json", "bars.png"):
        assert (out / name).stat().st_size > 0
    report = (out / "results.md").read_text()
    assert "Teacher AP" in report and "Verdict on AP" in report and "fewer than 3 seeds: no claim" in report
    assert json.loads((out / "results.json").read_text())["seeds"] == [0, 1]
    # The distilled runs really distilled: their config carries the teacher and the term.
    run_cfg = yaml.safe_load((out / "l2" / "seed1" / "bench_config.yaml").read_text())
    assert run_cfg["teacher"]["checkpoint"].endswith("last.pt") and run_cfg["distill"][0]["method"] == "l2"

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
