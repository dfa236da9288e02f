"""``detdistill bench``: the student alone vs the student with each KD method, over seeds.

A benchmark spec is a flat YAML file::

    name: aerial_kd
    student_config: aerial_student_fcos_r18.yaml     # the student run, as for `detdistill train`
    teacher_checkpoint: ../bench_runs/teacher/checkpoints/last.pt
    seeds: [0, 1, 2]
    overrides: ["train.steps=400"]                   # applied to every run
    keep_checkpoints: false                          # drop a finished run's checkpoint (~100 MB)
    methods:
      - name: alone                                  # no distill terms: the baseline
      - name: pkd
        distill: [{method: pkd, weight: 10, pairs: [[neck.p3, neck.p3], ...]}]

Every (method, seed) run trains in its own subprocess (so peak memory is per run) under
``<out>/<method>/seed<k>``; a finished run is skipped and an interrupted one resumes from
its last checkpoint, so an interrupted bench continues where it stopped. Several benches may
share a spec's runs (two lanes, overlapping seeds): each claims a run before training it
(:mod:`detdistill.run_claim`) and skips runs another one holds. A run whose recorded
config (``bench_config.yaml``) differs from what the spec gives now is refused, with the keys
that differ: an edited spec never pairs old runs with new ones. The report holds
AP, AP50, AP75, APs, APm, APl as mean ± std over seeds, seconds per training step and
peak memory, a bar plot with error bars, a paired plot (a line per seed from the baseline
to the method), and a **paired verdict** per method on ``primary_metric``: the per-seed gains
over the baseline (same seed = same student initialisation and same crops), their mean, std,
wins and losses, and a one-sided paired t-test; a method *beats* the baseline only when
p < 0.05 (:mod:`detdistill.report.paired`). The default is 5 seeds; fewer than 3 make no claim.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from .bench_spec import BenchMethod, BenchSpec, load_spec
from .config import ConfigError, TeacherConfig, config_from_dict, load_config
from .engine.environment import history_key
from .report.bench_report import write_report
from .report.loss_balance import LossBalance, loss_balance
from .report.metrics_log import read_metrics
from .report.tables import aggregate_seeds
from .run_claim import claim_run

__all__ = ["BenchMethod", "BenchSpec", "config_drift", "load_spec", "run_bench"]


def _resolved_run_config(spec: BenchSpec, method: BenchMethod, seed: int, run_dir: Path) -> dict[str, Any]:
    """The fully resolved config of one run, as the spec gives it now (a plain dict, as saved)."""
    cfg = load_config(spec.student_config, [*spec.overrides, *method.overrides, f"seed={seed}"])
    cfg = cfg.model_copy(update={"name": f"{method.name}_seed{seed}", "output_dir": str(run_dir),
                                 "distill": method.distill})
    needs_teacher = method.teacher_inherit
    if method.distill:
        from .distill.methods import METHODS  # torch-heavy: only when a spec has KD terms

        needs_teacher = needs_teacher or any(METHODS.get(t.method).needs(t).teacher for t in method.distill)
    if needs_teacher and not spec.teacher_checkpoint:
        raise ConfigError(f"method {method.name!r} needs `teacher_checkpoint` in the bench spec")
    if needs_teacher:  # a self-distillation row (MSSD) of a bench with a teacher must not load it
        scale = method.teacher_input_scale if method.teacher_input_scale is not None else spec.teacher_input_scale
        cfg = cfg.model_copy(update={"teacher": TeacherConfig(checkpoint=spec.teacher_checkpoint, input_scale=scale,
                                                              inherit=method.teacher_inherit)})
    resolved: dict[str, Any] = json.loads(cfg.model_dump_json())
    return _with_method_params(resolved, recorded=False)


def _with_method_params(config: dict[str, Any], *, recorded: bool) -> dict[str, Any]:
    """``config`` with each distill term's omitted params filled in
    (:meth:`~detdistill.distill.method.DistillMethod.resolved_params`), so a run's record names
    every value it trained with and a later change of a method's default cannot re-label it.
    A term of a method this version does not know stays as it is (and differs, by name)."""
    terms = config.get("distill")
    if not terms:
        return config
    from .distill.methods import METHODS  # torch-heavy: only when a config has KD terms

    filled = []
    for term in terms:
        if not (isinstance(term, dict) and term.get("method") in METHODS):
            filled.append(term)
            continue
        method = METHODS.get(term["method"])
        filled.append({**term, "params": method.resolved_params(term.get("params") or {}, recorded=recorded)})
    return {**config, "distill": filled}


def _run_config(spec: BenchSpec, method: BenchMethod, seed: int, run_dir: Path) -> Path:
    """Write the fully resolved config of one run and return its path."""
    resolved = _resolved_run_config(spec, method, seed, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "bench_config.yaml"
    path.write_text(yaml.safe_dump(resolved, sort_keys=False))
    return path


def config_drift(recorded: Any, current: Any, key: str = "") -> list[str]:
    """Every dotted key whose value differs between a run's recorded config and the current one,
    as ``key: recorded -> current`` (``<absent>`` for a key one side lacks)."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        return [line for k in [*recorded, *(k for k in current if k not in recorded)]
                for line in config_drift(recorded.get(k, "<absent>"), current.get(k, "<absent>"),
                                         f"{key}.{k}" if key else str(k))]
    if isinstance(recorded, list) and isinstance(current, list) and len(recorded) == len(current):
        return [line for i, (r, c) in enumerate(zip(recorded, current)) for line in config_drift(r, c, f"{key}.{i}")]
    return [] if recorded == current else [f"{key}: {recorded!r} -> {current!r}"]


def _with_defaults(recorded: dict[str, Any]) -> dict[str, Any]:
    """A recorded run config with the keys added to detdistill since it ran filled with their
    defaults, which keep the behaviour the run trained with: a new option does not unpair old runs.
    A method param it omits takes the value it meant when the run was recorded (a changed default's
    old value, :attr:`~detdistill.distill.method.DistillMethod.legacy_param_defaults`).
    A config this version cannot read stays as recorded (and so differs, by name)."""
    try:
        filled: dict[str, Any] = json.loads(config_from_dict(dict(recorded)).model_dump_json())
    except ConfigError:
        return recorded
    return _with_method_params(filled, recorded=True)


def _check_unchanged(spec: BenchSpec, method: BenchMethod, seed: int, run_dir: Path) -> None:
    """Refuse a run folder whose recorded config is not what the spec gives now.

    Without this, a spec edited after some runs finished (a new student config, a changed
    override) would skip those runs as done, or resume them from a checkpoint of the old
    config, and pair them with runs of the new one: a verdict between two different setups.
    """
    recorded_path = run_dir / "bench_config.yaml"
    if not recorded_path.is_file():
        return
    recorded, current = _with_defaults(yaml.safe_load(recorded_path.read_text())), _resolved_run_config(spec, method, seed, run_dir)
    for identity in ("name", "output_dir"):  # where the run lives, not how it trains: a moved bench folder still pairs
        recorded.pop(identity, None)
        current.pop(identity, None)
    drift = config_drift(recorded, current)
    if drift:
        shown = "; ".join(drift[:6]) + (f"; and {len(drift) - 6} more" if len(drift) > 6 else "")
        raise ConfigError(
            f"bench run {method.name} seed {seed} ({run_dir}) was trained with another config than the spec gives "
            f"now ({shown}). Move that folder away (or give the bench a new `name`) to train it afresh, or restore "
            "the spec it ran with.")


def _teacher_metrics(spec: BenchSpec, out: Path) -> dict[str, float] | None:
    """The teacher's val metrics as the bench first saw them (``teacher_metrics.json`` in the
    bench folder, kept with the results), or its run's ``final_metrics.json`` the first time.

    A run's recorded config names the teacher by its path only. A teacher retrained at that path
    (its checkpoints are too large to keep, so a later session retrains it) or replaced there is
    another teacher unless it scores the same: its KD runs would not pair with the ones distilled
    from the first. So a teacher whose metrics differ from the recorded ones is refused, by name.
    """
    if not spec.teacher_checkpoint:
        return None
    cached = out / "teacher_metrics.json"
    final = Path(spec.teacher_checkpoint).parent.parent / "final_metrics.json"
    recorded = json.loads(cached.read_text()) if cached.is_file() else None
    current = json.loads(final.read_text()) if final.is_file() else None
    if recorded is not None and current is not None and recorded != current:
        drift = config_drift(recorded, current)
        shown = "; ".join(drift[:4]) + (f"; and {len(drift) - 4} more" if len(drift) > 4 else "")
        raise ConfigError(
            f"the teacher at {spec.teacher_checkpoint} is not the one this bench's runs distilled from: its run's "
            f"final_metrics.json differs from {cached} ({shown}). It was retrained or replaced; KD runs from two "
            "teachers do not pair. Restore that teacher, or give the bench a new `name` (or move its folder away).")
    if recorded is None and current is not None:
        cached.write_text(final.read_text())
    return recorded if recorded is not None else current


def _collect(run_dir: Path) -> dict[str, float] | None:
    final = run_dir / "final_metrics.json"
    if not final.is_file():
        return None
    metrics = {m: (v if v is not None else math.nan) for m, v in json.loads(final.read_text()).items()}
    summary_path = run_dir / "run_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    metrics["s_per_step"] = summary.get("sec_per_step", math.nan)
    metrics["peak_mem_mb"] = summary.get("peak_mem_mb", math.nan)
    return metrics


def _environment(run_dir: Path) -> str:
    """The run's :func:`~detdistill.engine.environment.history_key` (from its ``run_summary.json``):
    one environment's key, or a ``mixed`` key for a run resumed in another environment."""
    summary_path = run_dir / "run_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return history_key(summary.get("environment_history"), summary.get("environment"))


def _remove_checkpoints(run_dir: Path) -> int:
    """Delete a finished run's ``checkpoints/`` folder; returns the bytes freed. Only called once
    ``final_metrics.json`` exists, which is what marks the run done (it is never resumed again)."""
    ckpt_dir = run_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        return 0
    size = sum(f.stat().st_size for f in ckpt_dir.rglob("*") if f.is_file())
    shutil.rmtree(ckpt_dir)
    return size


def _train_in_subprocess(cmd: list[str], log_path: Path, label: str) -> int:
    """Run one training command with its output appended to ``log_path``, echoing its warning
    lines (a dead or runaway loss term, a resume in another environment) to this console: a
    bench runs for hours, and a diverging run should not wait for the report to be noticed.
    Returns the exit code."""
    with open(log_path, "a") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if line.lstrip().lower().startswith("warning"):
                log.flush()
                print(f"    {label}: {line.strip()}", flush=True)
        return proc.wait()


def run_bench(spec_path: Path, *, out_dir: Path | None = None, seeds: list[int] | None = None,
              methods: list[str] | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Run (or continue) the selected methods x seeds, then report on every finished run.

    ``methods``/``seeds`` select a subset to run now (several benches can share the work
    this way); the report always aggregates all runs of the spec that have finished, and
    its ``n`` column says over how many seeds each row is.
    """
    spec = load_spec(spec_path)
    run_seeds = seeds or spec.seeds
    known = [m.name for m in spec.methods]
    unknown = sorted(set(methods or []) - set(known))
    if unknown:
        raise ConfigError(f"unknown bench methods {unknown}; the spec has: {', '.join(known)}")
    todo = [m for m in spec.methods if not methods or m.name in methods]
    out = out_dir or Path(spec.output_dir.format(name=spec.name))
    out.mkdir(parents=True, exist_ok=True)
    _teacher_metrics(spec, out)  # record the teacher before any run distils from it, or refuse a changed one
    total = len(todo) * len(run_seeds)
    elsewhere: list[str] = []  # runs another bench holds (detdistill.run_claim)
    for k, (method, seed) in enumerate(((m, s) for m in todo for s in run_seeds), start=1):
        run_dir = out / method.name / f"seed{seed}"
        _check_unchanged(spec, method, seed, run_dir)
        if _collect(run_dir) is not None:
            print(f"[{k}/{total}] {method.name} seed {seed}: done already, skipping", flush=True)
            continue
        with claim_run(run_dir) as claim:
            if not claim.held:
                print(f"[{k}/{total}] {method.name} seed {seed}: being trained by {claim.holder}, skipping", flush=True)
                elsewhere.append(f"{method.name} seed {seed}")
                continue
            if _collect(run_dir) is not None:  # another bench finished it while this one was busy
                print(f"[{k}/{total}] {method.name} seed {seed}: done already, skipping", flush=True)
                continue
            cfg_path = _run_config(spec, method, seed, run_dir)
            print(f"[{k}/{total}] {method.name} seed {seed}: training in {run_dir}", flush=True)
            cmd = [sys.executable, "-m", "detdistill.cli", "train", str(cfg_path)] + ([] if progress else ["--quiet"])
            rc = _train_in_subprocess(cmd, run_dir / "train.log", f"{method.name} seed {seed}")
            if rc != 0 or _collect(run_dir) is None:
                raise RuntimeError(f"run {method.name} seed {seed} failed (exit {rc}); see {run_dir / 'train.log'}")
            if not spec.keep_checkpoints:
                freed = _remove_checkpoints(run_dir)
                print(f"    removed {run_dir / 'checkpoints'} ({freed / 2**20:.0f} MB; keep_checkpoints: false)",
                      flush=True)
    if elsewhere:
        print(f"{len(elsewhere)} run(s) were being trained by another process and are not in this report "
              f"({', '.join(elsewhere)}); run `detdistill bench {spec_path}` again once they finish", flush=True)
    rows = []
    per_seed: dict[str, dict[int, dict[str, float]]] = {}
    balances: dict[str, dict[int, LossBalance]] = {}
    environments: dict[str, dict[int, str]] = {}
    for method in spec.methods:
        found = {s: m for s in sorted(set(spec.seeds) | set(run_seeds)) if (m := _collect(out / method.name / f"seed{s}"))}
        for s in found:  # the report pairs only runs of the spec as it stands
            _check_unchanged(spec, method, s, out / method.name / f"seed{s}")
        if found:
            per_seed[method.name] = found
            environments[method.name] = {s: _environment(out / method.name / f"seed{s}") for s in found}
            rows.append({"name": method.name, "n": len(found), **aggregate_seeds(list(found.values()))})
            helpers = _assistant_parts(method)
            balances[method.name] = {s: b for s in found
                                     if (b := _balance(out / method.name / f"seed{s}", helpers)) is not None}
    return write_report(spec, out, rows, _teacher_metrics(spec, out), sorted(set(spec.seeds) | set(run_seeds)), per_seed,
                        balances, environments, {m.name: _assistant_parts(m) for m in spec.methods})


def _assistant_parts(method: BenchMethod) -> set[str]:
    """The method's KD parts that train only its own modules (as logged: ``<term>/<part>``)."""
    if not method.distill:
        return set()
    from .distill.methods import METHODS  # torch-heavy: only when a spec has KD terms

    return {f"{t.label}/{p}" for t in method.distill for p in METHODS.get(t.method).assistant_parts(t)}


def _balance(run_dir: Path, assistant: set[str]) -> LossBalance | None:
    log = run_dir / "metrics.jsonl"
    return loss_balance(read_metrics(log), assistant=assistant) if log.is_file() else None


