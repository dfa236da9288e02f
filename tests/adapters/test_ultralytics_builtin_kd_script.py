"""``scripts/ultralytics_builtin_kd.py``: ultralytics' own distillation fed without pickles.

The script used to write the teacher as a pickled ``.pt`` for ``distill_model=`` and to read the
student back from the trainer's pickled ``last.pt``. It now hands ultralytics' ``DistillationModel``
the in-memory teacher and takes the student from the trainer's in-memory EMA. A two-step run of
each kind checks: the teacher ultralytics distils from is bit-identical to ours (and ours is left as
it was), the student written is exactly the trainer's EMA student, it loads into detdistill's
adapter, and the script wrote no model file of its own besides the safetensors.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("ultralytics") is None:  # the core suite runs without the [yolo] extra
    pytest.importorskip("ultralytics")

from safetensors.torch import load_file  # noqa: E402

from detdistill.adapters.base import get_adapter  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("single_thread")


def _script():
    spec = importlib.util.spec_from_file_location("ultralytics_builtin_kd", REPO / "scripts" / "ultralytics_builtin_kd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    from detdistill.config import config_from_dict

    # the suite conftest's plain helper, by path: `import conftest` finds whichever conftest
    # module pytest registered under that name last
    spec = importlib.util.spec_from_file_location("suite_conftest", REPO / "tests" / "conftest.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    tmp = tmp_path_factory.mktemp("builtin_kd")
    data = suite.tiny_config_dict(tmp)
    data["model"] = {"framework": "ultralytics", "arch": "yolov8n"}
    data["data"]["crop_size"] = 64
    data["train"].update(steps=2, batch_size=2, warmup_steps=1)
    cfg = config_from_dict(data)
    script = _script()
    out = tmp / "out"
    data_yaml = script.write_dataset(cfg, out / "data")
    adapter = get_adapter("ultralytics")
    torch.manual_seed(0)
    teacher = adapter.build(cfg.model.model_copy(update={"arch": "yolov8s"}), 5).float().eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    flags = {k: p.requires_grad for k, p in teacher.named_parameters()}
    kd = script.train_ultralytics("yolov8n", data_yaml, cfg, out, "builtin_kd", teacher, 6.0, cfg.train.steps)
    alone = script.train_ultralytics("yolov8n", data_yaml, cfg, out, "alone", None, 6.0, cfg.train.steps)
    return cfg, out, teacher, before, flags, kd, alone


def test_ultralytics_distils_from_our_teacher_bit_identically_and_leaves_it_alone(runs) -> None:
    from ultralytics.nn.distill_model import DistillationModel
    from ultralytics.utils.torch_utils import unwrap_model

    _, _, teacher, before, flags, kd, alone = runs
    wrapped = unwrap_model(kd.trainer.model)
    assert isinstance(wrapped, DistillationModel)
    assert wrapped.dis == 6.0
    used = wrapped.teacher_model.state_dict()
    assert used.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(used[k].float(), v), k  # frozen through training, equal to ours
        assert torch.equal(teacher.state_dict()[k], v), k  # our module untouched
    assert {k: p.requires_grad for k, p in teacher.named_parameters()} == flags
    assert not isinstance(unwrap_model(alone.trainer.model), DistillationModel)


@pytest.mark.parametrize("which", ["kd", "alone"])
def test_student_written_is_the_trainers_float32_ema_and_loads_in_detdistill(runs, which: str) -> None:
    cfg, _, _, _, _, kd, alone = runs
    run = kd if which == "kd" else alone
    ema = run.trainer.ema.ema
    ema = getattr(ema, "student_model", ema)
    saved = load_file(str(run.weights))
    expected = ema.state_dict()
    assert saved.keys() == expected.keys()
    for k, v in expected.items():
        assert saved[k].dtype == torch.float32
        assert torch.equal(saved[k], v.float()), k
    model = get_adapter("ultralytics").build(cfg.model.model_copy(update={"weights": str(run.weights)}), 5)
    for k, v in model.state_dict().items():
        assert torch.equal(v.float(), saved[k]), k


def test_the_script_writes_no_pickled_model_of_its_own(runs) -> None:
    _, out, *_ = runs
    pickles = [p.relative_to(out) for p in out.rglob("*.pt") if p.parent.name != "weights"]
    assert pickles == []  # the old teacher_ultralytics.pt is gone; weights/ is ultralytics' own trainer output
    source = (REPO / "scripts" / "ultralytics_builtin_kd.py").read_text()
    assert "torch.save(" not in source and "torch_safe_load" not in source and "torch.load(" not in source
