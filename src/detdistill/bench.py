"""``detdistill bench``: the student alone vs the student with each KD method, over seeds.

A benchmark spec is a flat YAML file::

    name: aerial_kd
    student_config: aerial_student_fcos_r18.yaml     # the student run, as for `detdistill train`
    teacher_checkpoint: ../bench_runs/teacher/checkpoints/last.pt
    seeds: [0, 1, 2]
    overrides: ["train.steps=400"]                   # applied to every run
    methods:
      - name: alone                                  # no distill terms: the baseline
      - name: pkd
        distill: [{method: pkd, weight: 10, pairs: [[neck.p3, neck.p3], ...]}]

Every (method, seed) run trains in its own subprocess (so peak memory is per run) under
``<out>/<method>/seed<k>``; a finished run is skipped and an interrupted one resumes from
its last checkpoint, so an interrupted bench continues where it stopped. A run whose recorded
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
import subprocess
import sys
from pathlib import Path
from statistics import fmean
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import ConfigError, DistillTermConfig, TeacherConfig, config_from_dict, load_config
from .engine.environment import history_key
from .report.loss_balance import LossBalance, detection_loss_change, diagnose, loss_balance
from .report.metrics_log import read_metrics
from .report.paired import PairedResult, paired_verdict
from .report.plots import plot_bars, plot_paired
from .report.tables import aggregate_seeds, format_metrics_table, markdown_table

METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


class BenchMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    distill: list[DistillTermConfig] = Field(default_factory=list)
    overrides: list[str] = Field(default_factory=list)
    teacher_input_scale: float | None = None  # this method's teacher resolution; default: the spec's
    # start the student's neck and head from the teacher's (`teacher.inherit`, distill/inherit.py)
    teacher_inherit: bool = False


class BenchSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    student_config: str
    teacher_checkpoint: str | None = None
    teacher_input_scale: float = 1.0
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4])
    overrides: list[str] = Field(default_factory=list)
    methods: list[BenchMethod]
    baseline: str = "alone"
    primary_metric: str = "AP"  # the metric verdicts use, e.g. "AP/car" when rare classes make the class mean noisy
    output_dir: str = "bench_runs/{name}"


def load_spec(path: str | Path) -> BenchSpec:
    """Read a bench spec with ``safe_load`` and validate it (unknown keys are errors)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
        spec = BenchSpec.model_validate(data)
    except FileNotFoundError:
        raise ConfigError(f"bench spec not found: {path}") from None
    except ValidationError as err:
        raise ConfigError(f"invalid bench spec {path}:\n{err}") from None
    base = path.resolve().parent
    spec.student_config = str((base / spec.student_config).resolve())
    if spec.teacher_checkpoint:
        spec.teacher_checkpoint = str((base / spec.teacher_checkpoint).resolve())
    if spec.baseline not in [m.name for m in spec.methods]:
        raise ConfigError(f"bench spec {path}: baseline {spec.baseline!r} is not among the methods")
    return spec


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
    return resolved


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
    A config this version cannot read stays as recorded (and so differs, by name)."""
    try:
        filled: dict[str, Any] = json.loads(config_from_dict(dict(recorded)).model_dump_json())
    except ConfigError:
        return recorded
    return filled


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
    for k, (method, seed) in enumerate(((m, s) for m in todo for s in run_seeds), start=1):
        run_dir = out / method.name / f"seed{seed}"
        _check_unchanged(spec, method, seed, run_dir)
        if _collect(run_dir) is not None:
            print(f"[{k}/{total}] {method.name} seed {seed}: done already, skipping", flush=True)
            continue
        cfg_path = _run_config(spec, method, seed, run_dir)
        print(f"[{k}/{total}] {method.name} seed {seed}: training in {run_dir}", flush=True)
        cmd = [sys.executable, "-m", "detdistill.cli", "train", str(cfg_path)] + ([] if progress else ["--quiet"])
        rc = _train_in_subprocess(cmd, run_dir / "train.log", f"{method.name} seed {seed}")
        if rc != 0 or _collect(run_dir) is None:
            raise RuntimeError(f"run {method.name} seed {seed} failed (exit {rc}); see {run_dir / 'train.log'}")
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
                        balances, environments)


def _assistant_parts(method: BenchMethod) -> set[str]:
    """The method's KD parts that train only its own modules (as logged: ``<term>/<part>``)."""
    if not method.distill:
        return set()
    from .distill.methods import METHODS  # torch-heavy: only when a spec has KD terms

    return {f"{t.label}/{p}" for t in method.distill for p in METHODS.get(t.method).assistant_parts(t)}


def _balance(run_dir: Path, assistant: set[str]) -> LossBalance | None:
    log = run_dir / "metrics.jsonl"
    return loss_balance(read_metrics(log), assistant=assistant) if log.is_file() else None


def verdicts(per_seed: dict[str, dict[int, dict[str, float]]], baseline: str, metric: str = "AP",
             environments: dict[str, dict[int, str]] | None = None) -> dict[str, PairedResult]:
    """The paired verdict of every method against ``baseline`` on ``metric`` (see
    :func:`detdistill.report.paired.paired_verdict`); ``per_seed`` is method -> seed -> metrics.

    With ``environments`` (method -> seed -> pairing key), a seed is paired only when the method's
    run and the baseline's come from the same environment: across torch builds, processors or
    thread counts one seed no longer gives the same training, so the difference is not a paired one.
    """
    pairable = paired_runs(per_seed, baseline, environments)
    base = {s: m.get(metric, math.nan) for s, m in pairable.get(baseline, {}).items()}
    return {name: paired_verdict(base, {s: m.get(metric, math.nan) for s, m in runs.items()})
            for name, runs in pairable.items() if name != baseline}


def paired_runs(per_seed: dict[str, dict[int, dict[str, float]]], baseline: str,
                environments: dict[str, dict[int, str]] | None = None) -> dict[str, dict[int, dict[str, float]]]:
    """``per_seed`` without the runs that cannot pair with the baseline's run of their seed: those
    from another environment (``environments``: method -> seed -> pairing key). The baseline's own
    runs are all kept. The verdicts and the paired plot both read this, so they show the same pairs."""
    envs = environments or {}
    base_env = envs.get(baseline, {})
    return {name: runs if name == baseline else
            {s: m for s, m in runs.items() if envs.get(name, {}).get(s) == base_env.get(s)}
            for name, runs in per_seed.items()}


PAIRED_METRICS = ["AP", "AP75", "APs", "APm"]  # besides the primary metric: overall, strict, by size


def paired_metrics(primary: str) -> list[str]:
    """The metrics the report gives paired gains on: the primary one first."""
    return [primary] + [m for m in PAIRED_METRICS if m != primary]


def _gain_cell(v: PairedResult) -> str:
    if v.n == 0:
        return "—"
    if v.n == 1:
        return f"{v.mean_gain:+.1f} (1 seed)"
    p = v.p_greater if v.mean_gain >= 0 else v.p_less
    shown = "p < 0.01" if p < 0.01 else f"p {p:.2f}"
    return f"{v.mean_gain:+.1f} ± {v.std_gain:.1f} ({v.wins} / {v.losses}, {shown})"


TEACHER_MARGIN_STDS = 2.0  # the teacher must lead the student alone by this many seed stds


def teacher_check(metric: str, teacher: float, mean: float, std: float, n: int) -> tuple[bool, str]:
    """Whether the teacher clearly beats the student alone, and the sentence the report prints.

    "Clearly" is a lead of more than :data:`TEACHER_MARGIN_STDS` standard deviations of the
    student alone over its seeds: a teacher inside the students' own seed spread has nothing
    reliable to teach. With one seed the spread is unknown, which the sentence says.
    """
    lead = teacher - mean
    head = f"Teacher {metric} {teacher:.1f} vs student alone {mean:.1f} ± {std:.1f} ({n} seeds): lead {lead:+.1f}"
    if n < 2 or not std > 0:
        ok = lead > 0
        return ok, head + (", the seed spread is unknown with one seed; run more seeds to check the margin."
                           if ok else ". WARNING: the teacher does NOT beat the student alone; KD results below are "
                           "not meaningful.")
    ok = lead > TEACHER_MARGIN_STDS * std
    return ok, head + f" = {lead / std:.1f} seed stds" + (
        f" (over {TEACHER_MARGIN_STDS:g}): the teacher is clearly better, KD comparisons are meaningful." if ok else
        f" (not over {TEACHER_MARGIN_STDS:g}). WARNING: the teacher does not clearly beat the student alone; KD "
        "results below are not meaningful: train the teacher longer or pick a larger one.")


def lead_closed(teacher: float, baseline: dict[int, float], result: PairedResult) -> tuple[float, float]:
    """The share of the teacher's lead over the baseline that a method's mean paired gain closes,
    and that lead, both over the seeds the method paired on (``result.gains``).

    The lead is ``teacher - mean(baseline on those seeds)``, so gain and lead are measured on the
    same seeds. Returns ``(nan, lead)`` when no seed paired or the teacher does not lead.
    """
    seeds = [s for s in result.gains if s in baseline and math.isfinite(baseline[s])]
    if not seeds:
        return math.nan, math.nan
    lead = teacher - sum(baseline[s] for s in seeds) / len(seeds)
    return (result.mean_gain / lead if lead > 0 else math.nan), lead


def _lead_closed_text(teacher: float | None, baseline: dict[int, float], result: PairedResult) -> str:
    if teacher is None or result.n == 0:
        return ""
    share, lead = lead_closed(teacher, baseline, result)
    if not math.isfinite(share):
        return ""
    if share < 0:
        return f"; widens the teacher's lead by {-100 * share:.0f} % ({result.mean_gain:+.1f} on {lead:.1f})"
    return f"; closes {100 * share:.0f} % of the teacher's lead ({result.mean_gain:+.1f} of {lead:.1f})"


def _lead_closed_json(teacher: dict[str, float] | None, spec: BenchSpec,
                      per_seed: dict[str, dict[int, dict[str, float]]], result: PairedResult) -> float | None:
    if teacher is None or teacher.get(spec.primary_metric) is None:
        return None
    base = {s: m.get(spec.primary_metric, math.nan) for s, m in per_seed.get(spec.baseline, {}).items()}
    share = lead_closed(teacher[spec.primary_metric], base, result)[0]
    return share if math.isfinite(share) else None


def write_report(spec: BenchSpec, out: Path, rows: list[dict[str, Any]], teacher: dict[str, float] | None,
                 seeds: list[int], per_seed: dict[str, dict[int, dict[str, float]]] | None = None,
                 balances: dict[str, dict[int, LossBalance]] | None = None,
                 environments: dict[str, dict[int, str]] | None = None) -> list[dict[str, Any]]:
    extra = [spec.primary_metric] if spec.primary_metric not in METRICS else []
    cols = ["name", "n"] + METRICS + extra + ["s_per_step", "peak_mem_mb"]
    lines = [f"# Benchmark {spec.name}", "", f"Student config: `{spec.student_config}`; seeds {seeds}; "
             f"overrides {spec.overrides or 'none'}.", ""]
    base = next((r for r in rows if r["name"] == spec.baseline), None)
    if teacher is not None:
        pm = spec.primary_metric
        lines.append("Teacher: " + ", ".join(f"{m} {teacher[m]:.1f}" for m in METRICS + extra if teacher.get(m) is not None))
        if base is not None:
            lines.append(teacher_check(pm, teacher[pm], base[f"{pm}_mean"], base[f"{pm}_std"], int(base["n"]))[1])
        lines.append("")
    lines.append(markdown_table(rows, cols))
    env_groups = _environment_section(environments or {}, spec.baseline, lines)
    paired: dict[str, PairedResult] = {}
    by_metric: dict[str, dict[str, PairedResult]] = {}
    if base is not None and per_seed:
        pm = spec.primary_metric
        paired = verdicts(per_seed, spec.baseline, pm, environments)
        lines += ["", f"Paired verdict on {pm} against `{spec.baseline}` (per-seed gains; a method beats the "
                  "baseline only when a one-sided paired t-test gives p < 0.05, and 3+ paired seeds are needed):", ""]
        t_pm = teacher.get(pm) if teacher is not None else None
        base_pm = {s: m.get(pm, math.nan) for s, m in per_seed.get(spec.baseline, {}).items()}
        lines += [f"- {name}: {v.describe()}{_lead_closed_text(t_pm, base_pm, v)}" for name, v in paired.items()]
        gain_rows = [{"name": name, **{f"seed {s}": g for s, g in v.gains.items()}} for name, v in paired.items()]
        gain_cols = ["name"] + [f"seed {s}" for s in seeds if any(f"seed {s}" in r for r in gain_rows)]
        lines += ["", f"Per-seed {pm} gain over `{spec.baseline}`:", "", markdown_table(gain_rows, gain_cols)]
        by_metric = {m: verdicts(per_seed, spec.baseline, m, environments) for m in paired_metrics(pm)}
        lines += ["", f"Paired gain over `{spec.baseline}` on each metric: mean ± std of the per-seed gains "
                  "(wins / losses, one-sided p toward the sign of the mean):", "",
                  markdown_table([{"name": name, **{m: _gain_cell(by_metric[m][name]) for m in by_metric}}
                                  for name in paired], ["name", *by_metric])]
        pairable = paired_runs(per_seed, spec.baseline, environments)
        plot_paired({n: {s: m.get(pm, math.nan) for s, m in runs.items()} for n, runs in pairable.items()},
                    spec.baseline, pm, out / "paired.png", f"{spec.name}: {pm} per seed, {spec.baseline} -> method")
    findings = _balance_section(spec, balances or {}, paired, lines)
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(
        {"rows": rows, "teacher": teacher, "seeds": seeds,
         "findings": findings, "environments": env_groups,
         "paired": {n: {**{k: getattr(v, k) for k in ("n", "mean_gain", "std_gain", "wins", "losses", "t", "p_greater",
                                                       "p_less", "verdict")}, "gains": v.gains,
                     "lead_closed": _lead_closed_json(teacher, spec, per_seed or {}, v)} for n, v in paired.items()},
         "paired_by_metric": {m: {n: {k: getattr(v, k) for k in ("n", "mean_gain", "std_gain", "wins", "losses", "p_greater",
                                                                  "p_less")} for n, v in res.items()}
                              for m, res in by_metric.items()}},
        indent=2, default=str))
    plot_bars(rows, ["AP", "AP50", "AP75", "APs", "APm"] + extra, out / "bars.png", f"{spec.name}: mean ± std over {len(seeds)} seeds")
    print(format_metrics_table(rows, cols, title=f"{spec.name} (mean ± std over seeds {seeds})"))
    print("\n".join(ln for ln in lines if ln.startswith(("Teacher", "WARNING", "Environment", "Paired verdict", "- ", "Why "))))
    print(f"report: {out / 'results.md'}, plots: {out / 'bars.png'}" + (f", {out / 'paired.png'}" if paired else ""))
    return rows


def _balance_section(spec: BenchSpec, balances: dict[str, dict[int, LossBalance]], paired: dict[str, PairedResult],
                     lines: list[str]) -> dict[str, list[str]]:
    """Append the loss-balance table and, for every method that does not beat the baseline, what
    its loss balance shows (:mod:`detdistill.report.loss_balance`); returns those findings."""
    if not balances:
        return {}
    base = balances.get(spec.baseline, {})
    rows = []
    for name, by_seed in balances.items():
        if not by_seed:
            continue
        runs = list(by_seed.values())
        change = detection_loss_change(by_seed, base) if name != spec.baseline else None
        rows.append({"name": name, "n": len(runs),
                     "KD share at start %": f"{100 * fmean(b.share_start for b in runs):.2g}",
                     "KD share at end %": f"{100 * fmean(b.share_end for b in runs):.2g}",
                     "final detection loss": f"{fmean(b.task_end for b in runs):.3f}",
                     "detection loss vs baseline %": "—" if change is None else f"{100 * change[0]:+.1f}"})
    helpers = sorted({p for m in spec.methods if m.name in balances for p in _assistant_parts(m)})
    lines += ["", "Loss balance (training logs; weighted KD terms as the optimiser saw them, start = the first "
              "10 % of logged steps once a term is non-zero, end = the last 10 %"
              + (f"; {', '.join(f'`{p}`' for p in helpers)} trains only the method's own modules, not the "
                 "student, and is left out" if helpers else "") + "):", "",
              markdown_table(rows, ["name", "n", "KD share at start %", "KD share at end %", "final detection loss",
                                    "detection loss vs baseline %"])]
    findings: dict[str, list[str]] = {}
    for name, by_seed in balances.items():
        verdict = paired.get(name)
        if name == spec.baseline or (verdict is not None and verdict.verdict == "beats"):
            continue
        terms = next((m.distill for m in spec.methods if m.name == name), [])
        found = diagnose(by_seed, base, terms)
        findings[name] = found
        if found:
            lines.append(f"Why `{name}` may not help: " + "; ".join(found) + ".")
    return findings


def _environment_section(environments: dict[str, dict[int, str]], baseline: str,
                         lines: list[str]) -> dict[str, list[str]]:
    """Say which environment the runs trained in; when they differ, warn and list them, since a
    seed's baseline and method runs pair only within one (:mod:`detdistill.engine.environment`).
    Returns pairing key -> the runs (``"<method> seed <k>"``) trained in it."""
    groups: dict[str, list[str]] = {}
    for name, by_seed in environments.items():
        for s, key in sorted(by_seed.items()):
            groups.setdefault(key, []).append(f"{name} seed {s}")
    if len(groups) == 1:
        lines += ["", f"Environment of every run: {next(iter(groups))}."]
    elif groups:
        base = environments.get(baseline, {})
        split = sorted(f"{name} seed {s}" for name, by_seed in environments.items() if name != baseline
                       for s, key in by_seed.items() if s in base and key != base[s])
        lines += ["", f"WARNING: the runs come from {len(groups)} environments, and one seed gives the same training "
                  "only within one: the verdicts below leave out "
                  + (f"{len(split)} run(s) whose `{baseline}` run of the same seed trained elsewhere ({', '.join(split)})"
                     if split else "no run (every method's seeds match their baseline's environment)")
                  + ". Rerun them in one environment to pair them. Runs per environment:"]
        lines += [f"- {key}: {', '.join(runs)}" for key, runs in groups.items()]
    return groups
