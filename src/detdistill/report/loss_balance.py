"""Loss balance: how much of a run's training loss the distillation terms were, and what they did
to the detection loss, read back from ``metrics.jsonl``.

A KD method that does not beat the student alone usually fails in one of three visible ways:

- its terms are a negligible part of the loss (the weight is far too small for these features);
- its terms swamp the detection loss from the moment they start (the weight is far too large);
- the student ends with a clearly higher detection loss than the student alone on the same
  crops (the terms pull against the task);
- a method that distils toward its own assistant (ScaleKD's CSA) has an assistant that detects
  no better than the student (its ``diag/<term>/assistant_det_loss`` is not below the student's
  detection loss), so there is nothing to distil.

When none of these shows, two subtler signs are named (measured on aerial-cars, where KL that
helps lowered the detection loss by 3-4 % and its share of the loss fell from 46 % to 17 %, while
L2, PKD and SSIM that did not help left the detection loss within 1 % and grew their share):

- the detection loss ends no lower than the student alone's (the terms do not make the task
  easier to learn);
- the terms' share of the loss grows over the run (they fall more slowly than the detection
  loss: the student takes in the KD targets, a teacher's or its own, less readily than it learns
  the task).

:func:`loss_balance` measures one run; :func:`diagnose` compares a method's runs with the
baseline's and says which of these it sees. The figures are the *weighted* terms, as added
to the loss (``loss/kd/...`` in the log), so a term's share is what the optimiser saw.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from statistics import fmean
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import DistillTermConfig

__all__ = ["LossBalance", "loss_balance", "detection_loss_change", "diagnose", "WEAK_SHARE", "DOMINANT_SHARE", "TASK_RISE",
           "TASK_GAIN", "SHARE_GROWTH", "ASSISTANT_EDGE"]

_KD_PREFIX = "loss/kd/"
WEAK_SHARE = 0.01  # KD terms below 1 % of the loss cannot move the student much
DOMINANT_SHARE = 0.5  # KD terms above half of the loss when they start outweigh the task
TASK_RISE = 0.10  # a final detection loss 10 % above the student alone's
TASK_GAIN = 0.01  # KD that helps the task ends with a detection loss at least 1 % below the student alone's
SHARE_GROWTH = 1.1  # a share that ends over 1.1x its start: the terms fall more slowly than the task loss
ASSISTANT_EDGE = 0.02  # an assistant must end at least 2 % below the student's detection loss to teach it
_ASSISTANT_SUFFIX = "/assistant_det_loss"


@dataclass(frozen=True)
class LossBalance:
    """One run's loss make-up over its first and last windows of *active* KD steps.

    ``task_*`` are the detection loss (every ``loss/<part>`` that is not ``loss/kd/...``);
    ``kd_*`` map each weighted KD part to its mean over the window. The start window begins at
    the first logged step where any KD part is non-zero, so a warm-up does not read as "weak".
    A run without KD terms (the baseline) has empty ``kd_*``. ``assistant_end`` maps each term
    that logs ``diag/<term>/assistant_det_loss`` to its mean over the last window (raw, unweighted);
    ``diag_end`` maps every logged ``diag/<term>/<name>`` (as ``<term>/<name>``) to the same mean.
    """

    steps: int
    task_start: float
    task_end: float
    kd_start: dict[str, float]
    kd_end: dict[str, float]
    assistant_end: dict[str, float] = field(default_factory=dict)
    diag_end: dict[str, float] = field(default_factory=dict)

    @property
    def share_start(self) -> float:
        """Fraction of the total loss that was KD when the terms started."""
        return _share(self.task_start, self.kd_start)

    @property
    def share_end(self) -> float:
        """Fraction of the total loss that was KD over the last window."""
        return _share(self.task_end, self.kd_end)


def _share(task: float, kd: Mapping[str, float]) -> float:
    total = task + sum(kd.values())
    return sum(kd.values()) / total if total > 0 else math.nan


def _task(rec: Mapping[str, object]) -> float:
    return sum(float(v) for k, v in rec.items()  # type: ignore[arg-type]
               if k.startswith("loss/") and not k.startswith(_KD_PREFIX) and isinstance(v, (int, float)))


def _kd(rec: Mapping[str, object], assistant: Collection[str] = ()) -> dict[str, float]:
    return {k[len(_KD_PREFIX):]: float(v) for k, v in rec.items()  # type: ignore[arg-type]
            if k.startswith(_KD_PREFIX) and isinstance(v, (int, float)) and k[len(_KD_PREFIX):] not in assistant}


def _window_means(records: Sequence[Mapping[str, object]], assistant: Collection[str]) -> tuple[float, dict[str, float]]:
    kd_keys = sorted({k for r in records for k in _kd(r, assistant)})
    return (fmean(_task(r) for r in records),
            {k: fmean(_kd(r, assistant).get(k, 0.0) for r in records) for k in kd_keys})


def loss_balance(records: Sequence[Mapping[str, object]], window: float = 0.1,
                 assistant: Collection[str] = ()) -> LossBalance | None:
    """The loss make-up of one run from its ``read_metrics`` records (``None`` without train records).

    ``window`` is the fraction of the logged train records (at least one) averaged at each end.
    ``assistant`` names KD parts as logged under ``loss/kd/`` (``"scalekd/csa"``) that train only
    a method's own modules (:meth:`~detdistill.distill.method.DistillMethod.assistant_parts`):
    they are neither distillation acting on the student nor its detection loss, so they are left out.
    """
    if not 0 < window <= 0.5:
        raise ValueError(f"window is a fraction in (0, 0.5], got {window}")
    train = sorted((r for r in records if r.get("split") == "train"), key=lambda r: int(r["step"]))  # type: ignore[arg-type]
    if not train:
        return None
    active = [r for r in train if any(v != 0 for v in _kd(r, assistant).values())]
    first = active or train  # the baseline (or a run whose terms never started): its own start
    k_first = max(1, round(len(first) * window))
    k_last = max(1, round(len(train) * window))
    task_start, kd_start = _window_means(first[:k_first], assistant)
    task_end, kd_end = _window_means(train[-k_last:], assistant)
    last = train[-k_last:]
    diags = sorted({k for r in last for k in r if k.startswith("diag/")})
    diag_end = {k[len("diag/"):]: fmean(float(r[k]) for r in last if k in r) for k in diags}  # type: ignore[arg-type]
    assistant_end = {k[:-len(_ASSISTANT_SUFFIX)]: v for k, v in diag_end.items() if k.endswith(_ASSISTANT_SUFFIX)}
    return LossBalance(steps=int(train[-1]["step"]), task_start=task_start, task_end=task_end,  # type: ignore[arg-type]
                       kd_start=kd_start, kd_end=kd_end, assistant_end=assistant_end, diag_end=diag_end)


def detection_loss_change(method: Mapping[int, LossBalance], baseline: Mapping[int, LossBalance]) -> tuple[float, int] | None:
    """The method's final detection loss relative to the baseline's on the seeds both ran (the same
    crops): ``(mean_method / mean_baseline - 1, number of seeds)``, or ``None`` without a common seed."""
    common = sorted(set(method) & set(baseline))
    if not common:
        return None
    return fmean(method[s].task_end for s in common) / fmean(baseline[s].task_end for s in common) - 1, len(common)


def diagnose(method: Mapping[int, LossBalance], baseline: Mapping[int, LossBalance],
             terms: Sequence[DistillTermConfig] = ()) -> list[str]:
    """What the loss balance of a method's runs says, against the baseline's (``{seed: balance}``).

    Shares are means over the method's seeds; the detection-loss comparison uses the seeds both
    ran (the same crops). Returns plain sentences (empty when nothing stands out); every finding
    names its figure and the threshold it crossed: :data:`WEAK_SHARE`, :data:`DOMINANT_SHARE`,
    :data:`TASK_RISE`, :data:`ASSISTANT_EDGE`, and, when none of those is crossed,
    :data:`TASK_GAIN` and :data:`SHARE_GROWTH`. With the method's ``terms``, the advice leaves out
    what they already do (no "set `normalize: true`" to a normalised term).
    """
    if not method:
        return []
    runs = list(method.values())
    if not any(b.kd_end or b.kd_start for b in runs):
        return ["no KD term was logged: the run distilled nothing"]
    found = []
    start = fmean(b.share_start for b in runs)
    end = fmean(b.share_end for b in runs)
    if max(start, end) < WEAK_SHARE:
        found.append(f"the KD terms are {100 * max(start, end):.2g} % of the loss (under {100 * WEAK_SHARE:.0f} %): "
                     "too weak to change the student; " + _advice(terms, weaker=False))
    if start > DOMINANT_SHARE:
        found.append(f"the KD terms are {100 * start:.0f} % of the loss when they start (over "
                     f"{100 * DOMINANT_SHARE:.0f} %): they outweigh the detection loss; " + _advice(terms, weaker=True))
    change = detection_loss_change(method, baseline)
    if change is not None and change[0] > TASK_RISE:
        found.append(f"the student's final detection loss is {100 * change[0]:+.0f} % against the student alone's "
                     f"on the same crops ({change[1]} paired seeds): the KD terms pull against the task")
    if not found:  # the subtler signs, only when no plain failure explains the result
        if change is not None and change[0] > -TASK_GAIN:
            found.append(f"the student's final detection loss is {100 * change[0]:+.1f} % against the student alone's "
                         f"on the same crops ({change[1]} paired seeds), where KD that helps lowers it by "
                         f"{100 * TASK_GAIN:.0f} % or more: the KD terms do not make the detection task easier to learn")
        if start >= WEAK_SHARE and end > SHARE_GROWTH * start:
            found.append(f"the KD terms' share of the loss grows from {100 * start:.2g} % to {100 * end:.2g} % over the "
                         "run: they fall more slowly than the detection loss, so the student takes in the KD "
                         "targets less readily than it learns the task")
    for term in sorted({t for b in runs for t in b.assistant_end}):
        with_it = [b for b in runs if term in b.assistant_end]
        ratio = fmean(b.assistant_end[term] / b.task_end for b in with_it)
        if ratio > 1 - ASSISTANT_EDGE:
            found.append(f"`{term}`'s assistant ends with a detection loss {100 * (ratio - 1):+.1f} % against the "
                         f"student's own (mean of {len(with_it)} runs; it must be {100 * ASSISTANT_EDGE:.0f} % "
                         "lower to teach): it detects no better than the student, so there is little to distil"
                         + _residual_note(term, with_it))
    return found


def _advice(terms: Sequence[DistillTermConfig], weaker: bool) -> str:
    """What to change, leaving out what every term already does."""
    normalised = bool(terms) and all(t.normalize for t in terms)
    ramped = bool(terms) and all(t.warmup_steps > 0 for t in terms)
    caveats: list[str] = []
    if terms:
        from ..distill.methods import METHODS  # torch-heavy: only when the advice concerns KD terms

        caveats = list(dict.fromkeys(c for t in terms if (c := METHODS.get(t.method).normalize_caveat)))
    options = ["lower the weight" if weaker else "raise the weight"]
    if weaker and not ramped:
        options.append("add a `warmup_steps` ramp")
    if not normalised and not caveats:
        options.append("set `normalize: true`")
    text = options[0] if len(options) == 1 else ", ".join(options[:-1]) + " or " + options[-1]
    if normalised:
        text += " (the terms are normalised: each starts at `weight` times the detection loss)"
    return text + "".join(f" ({c})" for c in caveats)


def _residual_note(term: str, runs: Sequence[LossBalance]) -> str:
    """Why an assistant may match the student: how much it changes the student's maps, if logged
    (``diag/<term>/assistant_residual_ratio`` and ``..._spatial``)."""
    ratio = [b.diag_end[f"{term}/assistant_residual_ratio"] for b in runs if f"{term}/assistant_residual_ratio" in b.diag_end]
    spatial = [b.diag_end[f"{term}/assistant_residual_spatial"] for b in runs if f"{term}/assistant_residual_spatial" in b.diag_end]
    if not ratio:
        return ""
    note = f"; its maps differ from the student's by {100 * fmean(ratio):.2g} % of their norm"
    if spatial:
        note += f", {100 * fmean(spatial):.2g} % of that change varying over positions"
    return note
