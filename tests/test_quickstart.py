"""`detdistill quickstart` end to end on the embedded sample, at a smoke-test length."""

from __future__ import annotations

from detdistill.quickstart import QUICKSTART_KD_LABEL, QUICKSTART_KD_TERMS, run_quickstart, sample_dir


def test_quickstart_trains_teacher_student_and_distilled_student(tmp_path, capsys, single_thread):
    assert (sample_dir() / "ATTRIBUTION.md").is_file()  # the licence travels with the data
    rows = run_quickstart(tmp_path, steps=2, progress=False)
    assert [r["name"].split(" ")[0] for r in rows] == ["teacher", "student", "student"]
    for row in rows:
        assert 0.0 <= row["AP"] <= 100.0 and row["s/step"] > 0
    out = capsys.readouterr().out
    assert QUICKSTART_KD_LABEL in out and "AP/car" in out
    assert "distillation vs the student alone: AP/car" in out  # the gain, printed
    assert (tmp_path / "comparison.png").stat().st_size > 0  # one figure of the three runs
    # Each KD term is scaled to the task loss at its first step (its weight x a factor fixed then, checkpointed)
    import math

    from detdistill.engine.checkpoint import load_checkpoint

    scales = load_checkpoint(tmp_path / "student_kd" / "checkpoints" / "last.pt")["distiller"]["kd_scales"]
    assert scales.shape == (len(QUICKSTART_KD_TERMS),)
    assert all(math.isfinite(float(x)) and float(x) > 0 for x in scales)
    # The distilled student really distilled, and its export holds no connector weights.
    metrics = (tmp_path / "student_kd" / "metrics.jsonl").read_text()
    assert all(f'"loss/kd/{t["method"]}' in metrics for t in QUICKSTART_KD_TERMS)
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "student_kd" / "export" / "model.safetensors"))
    plain = load_file(str(tmp_path / "student" / "export" / "model.safetensors"))
    assert set(exported) == set(plain)  # same architecture as the student alone: no connectors
