"""A run records every environment it trained in, so a resume on another machine cannot pass for
one environment's run (the bench pairs a seed only within one environment)."""

from __future__ import annotations

import json

import torch

from detdistill.bench import _environment
from detdistill.engine.environment import extend_history, history_key, pairing_key
from detdistill.engine.train import train

A = {"torch": "2.14.1", "torchvision": "0.29.1", "device": "cpu", "processor": "X", "cpu_capability": "AVX2",
     "threads": 1}
B = dict(A, cpu_capability="AVX512")


def test_history_grows_only_when_the_environment_changes():
    assert extend_history([], A) == [A]
    assert extend_history([A], dict(A, python="3.12")) == [A]  # recorded, not part of the key
    assert extend_history([A], B) == [A, B]
    assert history_key([A]) == pairing_key(A)
    assert history_key([A, B]) == f"mixed: {pairing_key(A)}, then {pairing_key(B)}"
    assert history_key([{}, A]).startswith("mixed: unrecorded, then ")  # resumed from a checkpoint of old code
    assert history_key(None, A) == pairing_key(A) and history_key(None, None) == "unrecorded"  # old run summaries


def test_a_resume_in_another_environment_is_flagged_and_pairs_with_nothing(tiny_config):
    threads = torch.get_num_threads()
    said: list[str] = []
    try:
        torch.set_num_threads(1)
        cfg = tiny_config(train__steps=3, train__ckpt_every=1)
        train(cfg, resume=False, progress=False, stop_after=1, log=said.append)
        train(cfg, resume=True, progress=False, stop_after=2, log=said.append)  # same environment: no warning
        assert not any("WARNING" in s for s in said)
        torch.set_num_threads(2)  # as on a machine with another thread count
        result = train(cfg, resume=True, progress=False, log=said.append)
    finally:
        torch.set_num_threads(threads)
    warning = [s for s in said if "resumes in another environment" in s]
    assert len(warning) == 1 and "threads 1" in warning[0] and "now" in warning[0] and "threads 2" in warning[0]
    summary = json.loads((result.run_dir / "run_summary.json").read_text())
    assert [env["threads"] for env in summary["environment_history"]] == [1, 2]
    assert summary["environment"]["threads"] == 2
    assert _environment(result.run_dir).startswith("mixed: ")
