"""The ``detdistill`` command line: train, distill, eval, predict, export, list, bench, quickstart."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import __version__


def _cmd_train(args: argparse.Namespace, *, need_distill: bool = False) -> int:
    from .config import load_config
    from .engine.train import train
    from .report.tables import format_metrics_table

    cfg = load_config(args.config, args.overrides)
    if need_distill and not cfg.distill:
        print(f"error: {args.config} has no `distill:` terms; use `detdistill train` for plain training", file=sys.stderr)
        return 2
    resume: bool | str = args.resume if args.resume else not args.fresh
    result = train(cfg, resume=resume, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 alone reports
        return 0
    if result.final is not None:
        row = {"name": cfg.name, **result.final.as_dict()}
        print(format_metrics_table([row], ["name", "AP", "AP50", "AP75", "APs", "APm", "APl"]))
    print(f"run directory: {result.run_dir}  (metrics.jsonl, plots *.png, checkpoints/last.pt, export/)")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .data.dataset import EvalDataset
    from .data.transforms import EvalTransform
    from .engine.evaluate import evaluate
    from .engine.restore import restore_model
    from .data.splits import load_split
    from .engine.device import resolve_device
    from .config import load_config
    from .report.tables import format_metrics_table

    cfg = load_config(args.config, args.overrides)
    device = resolve_device(cfg.train.device)
    restored = restore_model(args.checkpoint, device, weights=args.weights)
    if args.weights == "ema" and restored.weights == "raw":
        print("note: the checkpoint kept no EMA; evaluating its weights", file=sys.stderr)
    val = load_split(cfg, "val")
    print(val.summary())
    if val.class_names != restored.class_names:
        msg = (f"checkpoint classes {restored.class_names} differ from the data's {val.class_names}: label k of the "
               "model would be scored as class k of the data")
        if not args.allow_class_mismatch:
            raise ValueError(f"{msg}. Evaluate on data with the checkpoint's classes, or pass --allow-class-mismatch "
                             "if the classes are the same in another spelling")
        print(f"warning: {msg} (--allow-class-mismatch)", file=sys.stderr)
    with torch.no_grad():
        result = evaluate(restored.model, restored.adapter, EvalDataset(val, EvalTransform()), cfg.eval, device,
                          nms_thresh=restored.config.model.nms_thresh)
    row = {"name": f"{Path(args.checkpoint).name} ({restored.weights})", **result.as_dict()}
    print(format_metrics_table([row], ["name", "AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"]))
    if args.json:
        out = {"checkpoint": str(args.checkpoint), "step": restored.step, "weights": restored.weights,
               **result.as_dict()}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"metrics: {args.json}")
    per_class = [{"class": k, "AP": v} for k, v in result.per_class_AP.items()]
    print(format_metrics_table(per_class, ["class", "AP"], title="per-class AP"))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from .predict import predict_images

    paths = predict_images(args.checkpoint, args.images, out_dir=Path(args.out), score_thresh=args.score,
                           tile_size=args.tile, device=args.device, json_path=Path(args.json) if args.json else None,
                           progress=not args.quiet)
    for p in paths:
        print(p)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .engine.restore import restore_model

    r = restore_model(args.checkpoint)
    out = Path(args.out)
    path = r.adapter.export(r.model, r.config.model, len(r.class_names), out, class_names=r.class_names,
                            category_ids=r.category_ids)
    print(f"student-only weights: {path} (see {out / 'model.json'})")
    if args.format == "onnx":
        onnx_path = r.adapter.export_onnx(r.model, out / "model.onnx")
        print(f"ONNX graph: {onnx_path} (inputs and outputs: docs/export.md; classes: {out / 'model.json'})")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from .adapters.base import ADAPTERS, get_adapter
    from .config import ModelConfig
    from .distill.methods import METHODS

    get_adapter("torchvision")
    for optional in ("ultralytics", "transformers"):  # optional extras: listed when installed
        try:
            get_adapter(optional)
        except (ImportError, KeyError):
            pass
    if args.model:
        given = {"fpn_channels": args.fpn_channels} if args.fpn_channels is not None else {}
        cfg = ModelConfig(framework=args.framework, arch=args.model, backbone=args.backbone, **given)
        adapter = get_adapter(args.framework)
        model = adapter.build(cfg, args.num_classes)
        width = f", FPN {args.fpn_channels}" if args.fpn_channels is not None else ""
        print(f"tappable layers of {args.framework}/{args.model} ({args.backbone}{width}):")
        for info in adapter.taps(model).values():
            print(f"  {info.name:<20} module={info.module:<34} key={info.key!s:<5} channels={info.channels:<5} "
                  f"stride={info.stride:<4} {info.kind}")
        print("any module path of the model is tappable too, e.g.:")
        for name, _ in list(model.named_modules())[1:12]:
            print(f"  {name}")
        return 0
    print("detector frameworks and architectures:")
    for name in ADAPTERS:
        print(f"  {name}: {', '.join(ADAPTERS.get(name).archs())}")
    print("distillation methods (method: family, default weight, paper):")
    for name in METHODS:
        method = METHODS.get(name)
        sides = ", ".join(f"{side} must be a {need}" for side, need in (("student", method.student_requires),
                                                                          ("teacher", method.teacher_requires)) if need)
        print(f"  {name:<12} {method.family:<8} w={method.default_weight:<5} {method.paper}" + (f" [{sides}]" if sides else ""))
    print("use `detdistill list --model fcos --backbone resnet18` for a model's tappable layers")
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import run_quickstart

    run_quickstart(Path(args.out), steps=args.steps, progress=not args.quiet)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    run_bench(Path(args.spec), out_dir=Path(args.out) if args.out else None, seeds=args.seeds, methods=args.methods,
              progress=not args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="detdistill", description="Knowledge distillation for object detectors.")
    p.add_argument("--version", action="version", version=f"detdistill {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    for name, help_ in (("train", "train a detector from a YAML config"),
                        ("distill", "train a student with the config's distill terms and teacher")):
        t = sub.add_parser(name, help=help_)
        t.add_argument("config")
        t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=200 model.backbone=resnet34")
        t.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in the run directory")
        t.add_argument("--resume", metavar="CKPT", help="resume from this checkpoint")
        t.add_argument("--quiet", action="store_true", help="no progress bars")

    e = sub.add_parser("eval", help="COCO-evaluate a checkpoint on the config's val split")
    e.add_argument("config")
    e.add_argument("overrides", nargs="*")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--weights", choices=("ema", "raw"), default="ema",
                   help="ema (default): the EMA weights when the run kept them, as training's own evaluation and "
                        "export use; raw: the optimizer's weights, e.g. to see what the EMA adds")
    e.add_argument("--json", metavar="PATH", help="also write the metrics (and per-class AP) to this JSON file")
    e.add_argument("--allow-class-mismatch", action="store_true",
                   help="evaluate although the checkpoint's class names differ from the data's (same ids, other names)")

    pr = sub.add_parser("predict", help="draw a checkpoint's detections on images")
    pr.add_argument("images", nargs="+", help="image files and/or folders of images")
    pr.add_argument("--checkpoint", required=True)
    pr.add_argument("--out", default="predictions")
    pr.add_argument("--score", type=float, default=0.3, help="minimum score drawn")
    pr.add_argument("--tile", type=int, default=0, help="tile size for large images (0: whole image)")
    pr.add_argument("--device", default="auto")
    pr.add_argument("--json", help="also write every detection here, in the COCO results format")
    pr.add_argument("--quiet", action="store_true")

    ex = sub.add_parser("export", help="write a student-only checkpoint loadable without detdistill")
    ex.add_argument("--checkpoint", required=True)
    ex.add_argument("--out", required=True)
    ex.add_argument("--format", choices=["safetensors", "onnx"], default="safetensors",
                    help="onnx: also write model.onnx (needs the onnx extra)")

    ls = sub.add_parser("list", help="list detectors and methods, or a model's tappable layers")
    ls.add_argument("--model", help="architecture, e.g. fcos, retinanet, fasterrcnn, yolo_pafpn")
    ls.add_argument("--framework", default="torchvision")
    ls.add_argument("--backbone", default="resnet18")
    ls.add_argument("--fpn-channels", type=int, default=None, help="CNN neck width (default: the config default, 64)")
    ls.add_argument("--num-classes", type=int, default=2)

    q = sub.add_parser("quickstart", help="teacher, student and distilled student on the embedded sample, in minutes")
    q.add_argument("--out", default="runs/quickstart")
    q.add_argument("--steps", type=int, default=None, help="override the student schedule (for smoke tests)")
    q.add_argument("--quiet", action="store_true")

    b = sub.add_parser("bench", help="student alone vs each KD method over seeds; table + bar plot")
    b.add_argument("spec", help="benchmark YAML (see configs/bench_aerial_kd.yaml)")
    b.add_argument("--out")
    b.add_argument("--seeds", type=int, nargs="+", help="run only these seeds now (default: the spec's)")
    b.add_argument("--methods", nargs="+", help="run only these methods now (the report covers all finished runs)")
    b.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point. User errors (config, data, layer names, missing files) print one clear
    message and exit 2; set ``DETDISTILL_DEBUG=1`` to see the traceback instead."""
    args = build_parser().parse_args(argv)
    from .config import ConfigError

    handlers = {"train": _cmd_train, "distill": lambda a: _cmd_train(a, need_distill=True), "eval": _cmd_eval,
                "predict": _cmd_predict, "export": _cmd_export, "list": _cmd_list, "quickstart": _cmd_quickstart,
                "bench": _cmd_bench}
    try:
        return handlers[args.command](args)
    except Exception as err:  # noqa: BLE001 - re-raised unless it is a user error
        from .engine.train import NonFiniteLossError

        # NotImplementedError: a combination an adapter does not support, said in its message
        user_errors = (ConfigError, FileNotFoundError, ValueError, KeyError, ImportError, NotImplementedError,
                       NonFiniteLossError)
        if os.environ.get("DETDISTILL_DEBUG") or not isinstance(err, user_errors):
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
