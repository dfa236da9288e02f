"""The bench report: paired verdicts against the baseline, the teacher's lead, the loss balance,
the environments, as ``results.md`` / ``results.json`` and two plots (:mod:`detdistill.bench` runs)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import fmean
from typing import Any

from ..bench_spec import BenchMethod, BenchSpec
from .loss_balance import LossBalance, detection_loss_change, diagnose
from .paired import PairedResult, paired_verdict
from .plots import plot_bars, plot_paired
from .tables import format_metrics_table, markdown_table

__all__ = ["METRICS", "lead_closed", "paired_metrics", "paired_runs", "teacher_check", "verdicts", "write_report"]

METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


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
    same seeds. The share is nan when the teacher does not lead; both are nan when no seed paired.
    """
    seeds = [s for s in result.gains if s in baseline and math.isfinite(baseline[s])]
    if not seeds:
        return math.nan, math.nan
    lead = teacher - sum(baseline[s] for s in seeds) / len(seeds)
    return (result.mean_gain / lead if lead > 0 else math.nan), lead


def _lead_closed_text(share: float, lead: float, gain: float) -> str:
    if not math.isfinite(share):
        return ""
    if share < 0:
        return f"; widens the teacher's lead by {-100 * share:.0f} % ({gain:+.1f} on {lead:.1f})"
    return f"; closes {100 * share:.0f} % of the teacher's lead ({gain:+.1f} of {lead:.1f})"


def write_report(spec: BenchSpec, out: Path, rows: list[dict[str, Any]], teacher: dict[str, float] | None,
                 seeds: list[int], per_seed: dict[str, dict[int, dict[str, float]]] | None = None,
                 balances: dict[str, dict[int, LossBalance]] | None = None,
                 environments: dict[str, dict[int, str]] | None = None,
                 assistant: dict[str, set[str]] | None = None) -> list[dict[str, Any]]:
    """Write ``results.md``, ``results.json``, ``bars.png`` and ``paired.png`` under ``out`` and print
    the summary; returns ``rows``.

    ``rows``: one aggregate per method (:func:`~detdistill.report.tables.aggregate_seeds`);
    ``per_seed``: method -> seed -> metrics; ``balances``: method -> seed -> loss balance;
    ``environments``: method -> seed -> pairing key; ``assistant``: method -> the logged KD parts
    that train only the method's own modules (left out of the KD share).
    """
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
    closed: dict[str, tuple[float, float]] = {}  # method -> (share of the teacher's lead closed, that lead)
    by_metric: dict[str, dict[str, PairedResult]] = {}
    if base is not None and per_seed:
        pm = spec.primary_metric
        paired = verdicts(per_seed, spec.baseline, pm, environments)
        lines += ["", f"Paired verdict on {pm} against `{spec.baseline}` (per-seed gains; a method beats the "
                  "baseline only when a one-sided paired t-test gives p < 0.05, and 3+ paired seeds are needed):", ""]
        t_pm = teacher.get(pm) if teacher is not None else None
        base_pm = {s: m.get(pm, math.nan) for s, m in per_seed.get(spec.baseline, {}).items()}
        closed = {name: lead_closed(t_pm, base_pm, v) if t_pm is not None else (math.nan, math.nan)
                  for name, v in paired.items()}
        lines += [f"- {name}: {v.describe()}{_lead_closed_text(*closed[name], v.mean_gain)}" for name, v in paired.items()]
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
    findings = _balance_section(spec, balances or {}, paired, assistant or {}, lines)
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(
        {"rows": rows, "teacher": teacher, "seeds": seeds,
         "findings": findings, "environments": env_groups,
         "paired": {n: {**{k: getattr(v, k) for k in ("n", "mean_gain", "std_gain", "wins", "losses", "t", "p_greater",
                                                       "p_less", "verdict")}, "gains": v.gains,
                     "lead_closed": closed[n][0] if math.isfinite(closed[n][0]) else None} for n, v in paired.items()},
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
                     assistant: dict[str, set[str]], lines: list[str]) -> dict[str, list[str]]:
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
    helpers = sorted({p for name in balances for p in assistant.get(name, set())})
    lines += ["", "Loss balance (training logs; weighted KD terms as the optimiser saw them, start = the first "
              "10 % of logged steps once a term is non-zero, end = the last 10 %"
              + (f"; {', '.join(f'`{p}`' for p in helpers)} trains only the method's own modules, not the "
                 "student, and is left out" if helpers else "") + "):", "",
              markdown_table(rows, ["name", "n", "KD share at start %", "KD share at end %", "final detection loss",
                                    "detection loss vs baseline %"])]
    findings: dict[str, list[str]] = {}
    rows_by_name = {m.name: m for m in spec.methods}
    for name, by_seed in balances.items():
        verdict = paired.get(name)
        if name == spec.baseline:
            continue
        row = rows_by_name.get(name)
        if row is not None and not row.distill:
            # A row without KD terms is a control (a longer schedule, a null lr change) or weight
            # inheritance: "why it may not help" from a loss balance would misread it.
            lines.append(_termless_row_text(row, spec.baseline))
            continue
        if verdict is not None and verdict.verdict == "beats":
            continue
        terms = row.distill if row is not None else []
        found = diagnose(by_seed, base, terms)
        findings[name] = found
        if found:
            lines.append(f"Why `{name}` may not help: " + "; ".join(found) + ".")
    return findings


def _termless_row_text(row: BenchMethod, baseline: str) -> str:
    """What a bench row without ``distill`` terms measures, for the report's loss-balance section."""
    changes = ", ".join(f"`{o}`" for o in row.overrides)
    if row.teacher_inherit:
        return (f"`{row.name}` has no KD term: it starts the student's neck and head from the teacher's "
                f"(`teacher_inherit`){f' with {changes}' if changes else ''}, so its gain over `{baseline}` is what "
                "the inherited weights do; the loss balance does not apply.")
    if not changes:
        return (f"`{row.name}` distils nothing and changes nothing: the same runs as `{baseline}`, so any gain "
                "is the machine's nondeterminism.")
    return (f"`{row.name}` distils nothing (no `distill` terms in its row): a control, whose gain over "
            f"`{baseline}` is what its overrides ({changes}) change.")


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
