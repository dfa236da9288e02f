"""The method protocol is open: a method defined in this file plugs in without touching the package.

``BoxMaskedL2`` below is a complete new method (the worked example of
``docs/architecture.md``): it declares what it needs, builds its own connector from the
measured taps, reads ground truth from the step context and returns its loss. Registering
it is all it takes for the Distiller, configs and ``detdistill list`` to use it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from detdistill.cli import main
from detdistill.config import DistillTermConfig, config_from_dict
from detdistill.distill.connectors import Connector
from detdistill.distill.distiller import Distiller, Teacher
from detdistill.distill.method import BuildContext, DistillMethod, Needs, StepContext, register_method
from detdistill.distill.methods import METHODS
from detdistill.engine.train import train_one_step


class BoxMaskedL2(DistillMethod):
    """L2 between student and teacher P3 maps inside the ground-truth boxes only."""

    name = "box_masked_l2"
    family = "feature"
    default_weight = 2.5
    paper = "worked example of docs/architecture.md"

    @classmethod
    def needs(cls, term: DistillTermConfig) -> Needs:
        if len(term.pairs) != 1:
            raise ValueError(f"distill term {term.label!r}: give exactly one [student tap, teacher tap] pair")
        (s, t), = term.pairs
        return Needs(student_taps=(s,), teacher_taps=(t,))

    def __init__(self, ctx: BuildContext, margin: float = 0.0) -> None:
        super().__init__()
        (self.s, self.t), = ctx.term.pairs
        self.margin = margin
        self.connector = Connector(ctx.student_taps[self.s].channels, ctx.teacher_taps[self.t].channels)
        self.stride = ctx.teacher_taps[self.t].stride

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:  # type: ignore[override]
        target = ctx.teacher_taps.get(self.t).detach()
        pred = self.connector(ctx.student_taps.get(self.s), target.shape[-2:])
        mask = torch.zeros_like(target[:, :1])
        for i, t in enumerate(ctx.batch.targets):
            for x0, y0, x1, y1 in (t.boxes / self.stride).tolist():
                mask[i, :, int(y0):int(y1) + 1, int(x0):int(x1) + 1] = 1.0
        return {"": (((pred - target) ** 2) * mask).sum() / (mask.sum() * target.shape[1]).clamp(min=1)}


class OrderProbe(DistillMethod):
    """Teacher first, then the student; records the order and what it was handed."""

    name = "order_probe"
    family = "test"
    part_names = ("a", "b")
    calls: list[str] = []

    @classmethod
    def needs(cls, term: DistillTermConfig) -> Needs:
        return Needs(teacher_head=True, student_head=True, teacher_first=True)

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def student_inputs(self, ctx: StepContext) -> dict[str, object]:
        assert ctx.teacher_raw is not None and ctx.teacher_raw.cls_logits is not None and ctx.student_raw is None
        self.calls.append("student_inputs")
        return {}  # torchvision students take no extra inputs; a DETR's query group would go here

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:  # type: ignore[override]
        assert ctx.student_raw is not None and ctx.student_raw.cls_logits is not None
        self.calls.append("forward")
        return {"a": self.anchor * 0 + 1.0, "b": self.anchor * 0 + 2.0}


@pytest.fixture
def registered() -> Iterator[None]:
    register_method(BoxMaskedL2)
    register_method(OrderProbe)
    try:
        yield
    finally:
        METHODS.remove(BoxMaskedL2.name)
        METHODS.remove(OrderProbe.name)


def test_a_method_defined_in_a_test_runs_a_kd_step(registered, adapter, build, batch, sgd):
    student, teacher = build("fcos"), build("fcos", fpn=64, seed=1)
    term = DistillTermConfig(method="box_masked_l2", pairs=[("neck.p3", "neck.p3")], params={"margin": 0.5})
    distiller = Distiller(student, adapter, [term], Teacher(teacher, adapter))
    method = distiller.method("box_masked_l2")
    assert isinstance(method, BoxMaskedL2) and method.margin == 0.5 and method.stride == 8
    assert (method.connector.proj.in_channels, method.connector.proj.out_channels) == (32, 64)
    opt, sched = sgd(list(student.parameters()) + list(distiller.parameters()))
    values = train_one_step(student, adapter, batch, 0, optimizer=opt, scheduler=sched, distiller=distiller)
    assert values["loss/kd/box_masked_l2"] > 0
    # the weight was omitted: the method's default applies
    assert distiller.weight(term, 0) == 2.5
    assert method.connector.proj.weight.grad is not None
    distiller.remove_hooks()
    # its params are checked like any built-in's
    with pytest.raises(ValueError, match=r"unknown params \['nope'\]; allowed: margin"):
        Distiller(student, adapter, [DistillTermConfig(method="box_masked_l2", pairs=[("neck.p3", "neck.p3")],
                                                       params={"nope": 1})], Teacher(teacher, adapter))


def test_teacher_first_methods_see_the_teacher_before_the_student(registered, adapter, build, batch):
    student, teacher = build("fcos"), build("fcos", seed=1)
    OrderProbe.calls.clear()
    distiller = Distiller(student, adapter, [DistillTermConfig(method="order_probe", weight=3.0)], Teacher(teacher, adapter))
    student.train()
    losses = distiller(student, batch, 0)
    assert OrderProbe.calls == ["student_inputs", "forward"]
    assert float(losses["kd/order_probe/a"].detach()) == 3.0 and float(losses["kd/order_probe/b"].detach()) == 6.0  # parts, weighted
    distiller.remove_hooks()


def test_registered_method_is_listed_and_usable_from_a_config(registered, capsys, tmp_path):
    assert main(["list"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "box_masked_l2" in ln)
    assert "w=2.5" in line and "worked example" in line
    cfg = config_from_dict({"data": {"train": {"format": "coco", "path": "a.json"}, "val": {"format": "coco", "path": "a.json"}},
                            "teacher": {"checkpoint": str(tmp_path / "t.pt")},
                            "distill": [{"method": "box_masked_l2", "pairs": [["neck.p3", "neck.p3"]]}]})
    assert cfg.distill[0].weight is None  # filled from the method when the Distiller is built


@pytest.mark.parametrize("method", ["l2", "l1", "pkd", "ssim", "kl"])
def test_default_weight_is_applied_when_weight_is_omitted(method, adapter, build, batch, sgd):
    """A term without ``weight`` is weighted by the method's ``default_weight`` (what `list` prints)."""
    student, teacher = build("fcos"), build("fcos", fpn=64, seed=1)
    pairs = [] if method == "kl" else [("neck.p3", "neck.p3")]
    plain = DistillTermConfig(method=method, pairs=pairs, name="plain", weight=1.0)
    default = DistillTermConfig(method=method, pairs=pairs, name="default")
    torch.manual_seed(5)
    distiller = Distiller(student, adapter, [plain, default], Teacher(teacher, adapter))
    # both terms start from the same connector, so their raw values agree
    if method != "kl":
        distiller.method("default").load_state_dict(distiller.method("plain").state_dict())
    student.train()
    with torch.no_grad():
        losses = distiller(student, batch, 0)
    w = METHODS.get(method).default_weight
    assert float(losses["kd/default"]) == pytest.approx(w * float(losses["kd/plain"]), rel=1e-6)
    assert float(losses["kd/plain"]) > 0
    distiller.remove_hooks()


def test_terms_need_distinct_names(adapter, build):
    student, teacher = build("fcos"), build("fcos", fpn=64, seed=1)
    terms = [DistillTermConfig(method="l2", pairs=[("neck.p3", "neck.p3")]),
             DistillTermConfig(method="l2", pairs=[("neck.p4", "neck.p4")])]
    with pytest.raises(ValueError, match="distinct names"):
        Distiller(student, adapter, terms, Teacher(teacher, adapter))
