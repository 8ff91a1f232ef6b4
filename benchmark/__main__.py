"""``nucleus-bench``: list datasets, evaluate a model, (re)build a report, time a model.

Subcommands::

    nucleus-bench datasets
    nucleus-bench eval --dataset NAME --root DIR --model MODEL --out OUT [--split S] [--limit N]
    nucleus-bench report OUT
    nucleus-bench speed ...        (see benchmark/speed.py)
    nucleus-bench train --config CONFIG [--fold K | --cv_only | --skip_cv] [--resume] [--export]
    nucleus-bench oracle --config CONFIG --run RUN

Input problems (unknown dataset or model, missing root, wrong layout) print one
``error: ...`` line on stderr and exit with status 2; Ctrl-C prints
``error: interrupted`` and exits with status 130.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .datasets.base import DatasetError

__all__ = ["build_parser", "main"]

logger = logging.getLogger("benchmark")


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one ``error: ...`` line and exit status 2 (argparse
    prints its usage first: five lines for ``eval``), as the CLIs do."""

    def error(self, message: str) -> NoReturn:  # noqa: D102
        print(f"error: {self.prog}: {' '.join(message.split())}", file=sys.stderr)
        raise SystemExit(2)


def _model_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, float(value)
    except ValueError:
        return key, value


def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="run a model on a dataset, score it and write a report")
    p.add_argument("--dataset", required=True, help="dataset name (see `nucleus-bench datasets`)")
    p.add_argument("--root", required=True, help="dataset folder laid out as `datasets` shows")
    p.add_argument("--model", required=True, help="registered model name")
    p.add_argument(
        "--out",
        required=True,
        help="output folder; a finished run replaces the metrics.json and predictions/ of an "
        "earlier one there (predictions of samples not in this run go); a failed or "
        "interrupted run leaves them as they were",
    )
    p.add_argument("--split", default=None, help="evaluate only this split")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    p.add_argument(
        "--radius_um",
        type=float,
        default=None,
        help="point-matching radius in microns (point datasets; default 6)",
    )
    p.add_argument(
        "--mpp",
        type=float,
        default=None,
        help="microns per pixel for samples without one (default: the model's)",
    )
    p.add_argument(
        "--model_option",
        type=_model_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model builder option, e.g. foreground_threshold=80 or fg_threshold=0.6 "
        "(repeatable; options the model lacks and values of the wrong type are refused)",
    )
    p.add_argument("--no_report", action="store_true", help="write metrics and predictions only")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--export",
        nargs="?",
        const="nucleus_models/weights",
        default=None,
        help="write weights + card to this folder (default nucleus_models/weights)",
    )


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """Build the argument parser.

    The ``speed`` subcommand's options come from :mod:`benchmark.speed`, which is
    imported only when ``argv`` selects that subcommand.
    """
    parser = _OneLineParser(
        prog="nucleus-bench", description="Benchmark nucleus models on public datasets."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("datasets", help="list the supported datasets and their folder layouts")
    m = sub.add_parser(
        "models",
        help="list the registered models: resolution, cross-validation, weights' sha256, license",
    )
    m.add_argument("--json", action="store_true", help="everything, as JSON")
    _add_eval(sub)
    p = sub.add_parser("report", help="(re)build report.md/html and figures from OUT/metrics.json")
    p.add_argument("out", help="folder written by `nucleus-bench eval`")
    p.add_argument("--overlays", type=int, default=3, help="number of overlay figures")
    from benchmark import speed as speed_mod

    speed = sub.add_parser(
        "speed", help="time NucleusDetection against HistomicsTK NucleiDetection on a slide"
    )
    speed_mod.add_arguments(speed)
    t = sub.add_parser(
        "train", help="cross-validate and train a model from a config (configs/*.toml)"
    )
    t.add_argument(
        "--config", required=True, help="TOML or YAML config, e.g. configs/unet-monuseg.toml"
    )
    t.add_argument("--out", default="", help="run folder (default runs/<name>)")
    t.add_argument(
        "--resume", action="store_true", help="continue from the run folder's checkpoints"
    )
    mode = t.add_mutually_exclusive_group()
    mode.add_argument("--skip_cv", action="store_true", help="train only the final model")
    mode.add_argument(
        "--cv_only",
        action="store_true",
        help="only cross-validate (run it beside a --skip_cv run of the same folder to use "
        "two processes; a later --resume --export combines them)",
    )
    t.add_argument(
        "--fold",
        type=int,
        default=None,
        help="train only this cross-validation fold (0-based; folds can run in parallel "
        "processes, then --resume evaluates them)",
    )
    t.add_argument(
        "--steps",
        type=int,
        default=None,
        help="the final model's training steps (train.steps); the CV folds train "
        "cv.steps (default: train.steps as the config gives it), so a quick look needs "
        "--skip_cv too",
    )
    t.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default=None,
        help="where the networks train (default: the config's train.device, else cpu); "
        "not part of the config's fingerprint",
    )
    t.add_argument(
        "--cv_from",
        default=None,
        metavar="RECORD",
        help="take the cross-validation from an earlier run of this config (an exported "
        "<name>.json or a run's cv/cv.json) instead of training the fold models again; "
        "refused unless only the final model's steps or inference settings differ",
    )
    t.add_argument(
        "--cv_config",
        default=None,
        metavar="CONFIG",
        help="for a --cv_from record that predates config fingerprints: the config it was made with",
    )
    _add_export(t)
    o = sub.add_parser(
        "oracle",
        help="how much better a U-Net's held-out instances could be with the annotation's "
        "seeds or foreground (needs a finished cross-validation)",
    )
    o.add_argument("--config", required=True, help="the config the run was trained with")
    o.add_argument("--run", required=True, help="run folder with cv/cv.json and cv/fold*/")
    c = sub.add_parser(
        "calibrate",
        help="add the int8 calibration (--precision int8) to a shipped U-Net, made on its "
        "config's training images",
    )
    c.add_argument("--config", required=True, help="the config the model was trained with")
    c.add_argument(
        "--weights_dir",
        default="nucleus_models/weights",
        help="folder with <name>.json/.pt/.md (default nucleus_models/weights)",
    )
    ft = sub.add_parser(
        "finetune",
        help="fine-tune a shipped U-Net on your labelled images (writes the config, then trains)",
        description="Writes OUT/config.yaml (the starting model's own training config with "
        "your data, train.init_from pinned to its sha256, a small learning rate and as many "
        "CV folds as the images allow), then cross-validates and trains it as `train` does.",
    )
    ft.add_argument("--from", dest="start", required=True, help="shipped U-Net, e.g. unet-monuseg")
    ft.add_argument("--dataset", default="folder", help="dataset name (default folder)")
    ft.add_argument("--root", required=True, help="your labelled images (folder: images/ + masks/)")
    ft.add_argument("--name", required=True, help="the new model's name, e.g. unet-monuseg-mysite")
    ft.add_argument(
        "--mpp", type=float, default=None, help="microns per pixel of images without one"
    )
    ft.add_argument("--steps", type=int, default=None, help="training steps (default 1000)")
    ft.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-4)")
    ft.add_argument(
        "--folds", type=int, default=3, help="CV folds, 2 or more (at most one per image)"
    )
    ft.add_argument("--license", default="", help="the terms of your images, for the card")
    ft.add_argument("--data_description", default="", help="what the images are, for the card")
    ft.add_argument("--description", default="", help="what the model is for, for the card")
    ft.add_argument("--out", default="", help="run folder (default runs/<name>)")
    ft.add_argument("--resume", action="store_true", help="continue from the run's checkpoints")
    ft.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    _add_export(ft)
    ft.add_argument(
        "--config_only", action="store_true", help="write the config and stop (to edit it first)"
    )
    f = sub.add_parser(
        "fields",
        help="cut labelled training fields out of a slide and its (corrected) DSA annotation "
        "into the folder dataset's layout",
        description="From files: --slide and --annotation. Straight from a DSA server: "
        "--api-url and --annotation_id (token in the GIRDER_TOKEN environment variable); "
        "only the fields' pixels are read, through large_image's tiles API.",
    )
    f.add_argument("--slide", default=None, help="the slide file the annotation was drawn on")
    f.add_argument(
        "--annotation",
        nargs="+",
        default=[],
        help="annotation JSON file(s): a document, Girder's GET annotation/{id} record, or a list",
    )
    f.add_argument("--api-url", dest="api_url", default=None, help="Girder API root URL")
    f.add_argument(
        "--annotation_id",
        action="append",
        default=[],
        help="a DSA annotation's id (repeatable; all on one slide)",
    )
    f.add_argument("--out", required=True, help="folder to add images/, masks/ and mpp.txt to")
    f.add_argument(
        "--region",
        action="append",
        default=[],
        metavar="X,Y,W,H",
        help="a field in base pixels (repeatable; default: the annotation's rectangles)",
    )
    f.add_argument(
        "--field_group",
        default=None,
        help="take only the rectangles of this group as fields (when others are drawn too)",
    )
    f.add_argument(
        "--input_mpp",
        type=float,
        default=None,
        help="microns per base pixel, for a slide whose metadata has none",
    )
    return parser


def _cmd_fields(args: argparse.Namespace) -> int:
    from .fields import FieldError, export_fields, export_girder_fields, parse_region

    # exactly one pair, whole: files or a server
    from_files = bool(args.slide and args.annotation)
    given = [args.slide, args.annotation, args.api_url, args.annotation_id]
    if sum(map(bool, given)) != 2 or from_files == bool(args.api_url and args.annotation_id):
        raise DatasetError(
            "give either --slide and --annotation (files) or --api-url and --annotation_id "
            "(a DSA server)"
        )
    try:
        regions = [parse_region(r) for r in args.region]
        options = {"regions": regions, "field_group": args.field_group, "input_mpp": args.input_mpp}
        if from_files:
            records = export_fields(args.slide, args.annotation, args.out, **options)
        else:
            from nucleus_models.dsa import connect

            client = connect(args.api_url)
            records = export_girder_fields(client, args.annotation_id, args.out, **options)
    except FieldError as exc:
        raise DatasetError(str(exc)) from None
    for rec in records:
        x, y, w, h = rec["region"]
        print(f"{rec['id']}: {rec['nuclei']} nuclei in {w}x{h} px at {x},{y}")
    print(f"wrote {len(records)} field(s) to {args.out}")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from .training.run import calibrate_shipped

    try:
        path = calibrate_shipped(args.config, args.weights_dir)
    except ValueError as exc:  # a config or card that cannot work: one line, exit 2
        raise DatasetError(str(exc)) from None
    print(f"int8 calibration written to {path}")
    return 0


def _cmd_oracle(args: argparse.Namespace, command: str) -> int:
    from .evaluate import error_sentences
    from .training.oracle import VARIANTS, oracle_cv
    from .training.run import load_config

    try:
        result = oracle_cv(load_config(args.config), args.run, command=command)
    except ValueError as exc:
        raise DatasetError(str(exc)) from None
    keys = ("f1_iou50", "aji", "dice", "det_f1", "sq")
    print(f"{result['n_images']} held-out images, setting {result['setting']}")
    print(f"{'instances from':<22}" + "".join(f"{k:>10}" for k in keys))
    for v in VARIANTS:
        m = result["mean"][v]
        print(f"{v:<22}" + "".join(f"{m[k]:>10.3f}" for k in keys))
    for line in error_sentences(result["errors"]):
        print(f"model's {line}")
    print(f"wrote {Path(args.run) / 'cv' / 'oracle.json'}")
    return 0


def _cmd_datasets() -> int:
    from .datasets import base, list_datasets

    for name in list_datasets():
        cls = base._REGISTRY[name]
        print(f"{name}  [{cls.kind}]  {cls.description}")
        print(f"    layout: {cls.layout}")
    return 0


def model_records() -> list[dict[str, Any]]:
    """One record per registered model: its spec, card files and cross-validation.

    ``cv`` holds the card's cross-validated metrics at the chosen setting,
    those of the held-out images of the model's own modality where the card
    reports them by modality (``cv_images`` says which), else of all of them.
    """
    from dataclasses import asdict

    from nucleus_models.models import get_spec, list_models
    from nucleus_models.models.weights import WEIGHTS_DIR

    from .speed import cli_default_model

    default = cli_default_model()
    out = []
    for name in list_models():
        spec = get_spec(name)
        rec: dict[str, Any] = {
            "name": name,
            "cli_default": name == default,
            "spec": asdict(spec),
            "card": None,
            "cv": None,
            # (a card whose weights were deleted is still registered; using it is an error)
            "weights_present": not spec.weights or (WEIGHTS_DIR / spec.weights).is_file(),
        }
        card_json = WEIGHTS_DIR / f"{name}.json"
        if spec.weights and card_json.is_file():
            card = json.loads(card_json.read_text())
            md = WEIGHTS_DIR / f"{name}.md"
            rec["card"] = str(md) if md.is_file() else str(card_json)
            cv = card.get("cv") or {}
            group = (cv.get("by_group") or {}).get(f"modality={spec.modality}")
            if group:
                rec["cv"] = {k: v for k, v in group.items() if k != "n"}
                rec["cv_images"] = f"{group['n']} held-out {spec.modality} images"
            elif cv.get("metrics_at_best"):
                rec["cv"] = cv["metrics_at_best"]
                rec["cv_images"] = f"{cv.get('n_images', '?')} held-out images"
            rec["cv_folds"] = len(cv.get("folds") or [])
        out.append(rec)
    return out


def short_license(text: str) -> str:
    """A card's license for the models table: each license's name without its
    explanation, the starting weights' of a fine-tuned model included.

    >>> short_license("CC0")
    'CC0'
    >>> short_license("CC BY-NC-SA 4.0 (inherited from the MoNuSeg training data): non-commercial")
    'CC BY-NC-SA 4.0'
    >>> short_license("CC BY 4.0; from the starting weights (unet-monuseg): CC BY-NC-SA 4.0 (x): y")
    'CC BY 4.0 + CC BY-NC-SA 4.0'
    """
    parts = re.split(r";\s*from the starting weights \([^)]*\):\s*", text or "")
    return " + ".join(p.split(" (")[0].strip() or "-" for p in parts)


def _cmd_models(args: argparse.Namespace) -> int:
    records = model_records()
    if args.json:
        print(json.dumps(records, indent=2, default=str))
        return 0
    head = f"{'model':<24}{'modality':<14}{'um/px':>6}  {'F1@0.5':>6} {'AJI':>6} {'Dice':>6} {'detF1':>6}  {'sha256':<12}  license"
    print(head)
    for r in records:
        spec = r["spec"]
        cv = r["cv"]
        scores = (
            " ".join(f"{cv[k]:>6.3f}" for k in ("f1_iou50", "aji", "dice", "det_f1"))
            if cv
            else f"{'(no training, no CV)':>27}"
        )
        sha = spec["sha256"][:12] if spec["weights"] else "-"
        if not r["weights_present"]:
            sha = "no weights!"
        license_ = short_license(spec["license"])
        name = f"{r['name']}*" if r["cli_default"] else r["name"]
        print(
            f"{name:<24}{spec['modality']:<14}{spec['mpp']:>6.2f}  {scores}  {sha:<12}  {license_}"
        )
    print("\n* NucleusDetection's default (what a HistomicsUI user gets without choosing)")
    for r in records:
        if not r["weights_present"]:
            print(f"{r['name']}: its weights file {r['spec']['weights']} is missing: it cannot run")
    for r in records:
        if r["cv"]:
            card = Path(r["card"])
            with contextlib.suppress(ValueError):
                card = card.relative_to(Path.cwd())
            print(f"{r['name']}: {r['cv_folds']}-fold CV on {r['cv_images']}; card {card}")
    return 0


def _print_summary(result: dict[str, Any], out: str) -> None:
    mean, pooled = result["mean"], result["pooled"]
    keys = [*result["metric_keys"], "ap", "n_true", "n_pred", "seconds"]
    print(f"{'metric':<16}{'mean':>10}{'pooled':>10}")
    for k in keys:
        cells = [mean.get(k), pooled.get(k)]
        text = ["" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v) for v in cells]
        print(f"{k:<16}{text[0]:>10}{text[1]:>10}")
    if "errors" in pooled:
        from .evaluate import error_sentences

        for line in error_sentences(pooled["errors"]):
            print(line)
    print(f"wrote {out}/metrics.json ({len(result['rows'])} samples)")


def _cmd_eval(args: argparse.Namespace, command: str) -> int:
    from nucleus_models.models import get_spec

    from .datasets import get_dataset
    from .evaluate import evaluate

    get_spec(args.model)  # unknown model: fail before reading the dataset
    try:
        dataset = get_dataset(args.dataset, args.root)
    except KeyError as exc:
        raise DatasetError(str(exc.args[0])) from None
    params = {k: v for k, v in vars(args).items() if k not in ("command", "verbose")}
    params["model_option"] = dict(args.model_option)
    result = evaluate(
        dataset,
        model=args.model,
        out_dir=args.out,
        split=args.split,
        limit=args.limit,
        model_options=dict(args.model_option) or None,
        radius_um=args.radius_um,
        mpp=args.mpp,
        progress=not args.quiet,
        report=not args.no_report,
        params=params,
        command=command,
    )
    _print_summary(result, args.out)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .training.run import train_from_config

    try:
        result = train_from_config(
            args.config,
            out_dir=args.out or None,
            resume=args.resume,
            skip_cv=args.skip_cv,
            cv_only=args.cv_only,
            steps=args.steps,
            export_to=args.export,
            fold=args.fold,
            cv_from=args.cv_from,
            cv_config=args.cv_config,
            device=args.device,
        )
    except ValueError as exc:  # a config or option that cannot work: one line, exit 2
        raise DatasetError(str(exc)) from None
    _print_training(result)
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from .training.finetune import (
        DEFAULT_LR,
        DEFAULT_STEPS,
        check_resume,
        finetune_config,
        write_config,
    )
    from .training.run import train_from_config

    # as `train`'s default: runs/<name> under the current folder, so that the
    # README's follow-up `train --config runs/<name>/config.yaml` finds it
    out = Path(args.out) if args.out else Path("runs") / args.name
    try:
        cfg = finetune_config(
            args.start,
            dataset=args.dataset,
            root=args.root,
            name=args.name,
            mpp=args.mpp,
            steps=args.steps if args.steps is not None else DEFAULT_STEPS,
            lr=args.lr if args.lr is not None else DEFAULT_LR,
            folds=args.folds,
            license=args.license,
            data_description=args.data_description,
            description=args.description,
        )
        if args.resume:
            check_resume(cfg, out)
        path = write_config(cfg, out)
        print(f"config: {path}")
        if args.config_only:
            return 0
        result = train_from_config(
            path, out_dir=out, resume=args.resume, export_to=args.export, device=args.device
        )
    except ValueError as exc:
        raise DatasetError(str(exc)) from None
    _print_training(result)
    return 0


def _print_training(result: dict) -> None:
    cv = result.get("cv")
    if cv:
        m = cv["metrics_at_best"]
        print(f"cross-validation ({len(cv['folds'])} folds), thresholds {cv['best']}:")
        print("  " + "  ".join(f"{k}={v:.3f}" for k, v in m.items()))
    if result.get("checkpoint"):
        print(f"checkpoint: {result['checkpoint']}")
    if result.get("weights"):
        print(f"exported: {result['weights']}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``nucleus-bench``; return the exit status (0 ok, 2 bad input, 130 interrupted).

    Output into a pipe whose reader has gone (``nucleus-bench models --json
    | head``) ends quietly with status 141, as ``cat``'s does.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name (default ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status.
    """
    try:
        return _main(argv)
    except BrokenPipeError:
        from nucleus_models.cli_support import stdout_closed

        stdout_closed()


def _main(argv: Sequence[str] | None) -> int:
    from nucleus_models.errors import NucleusModelsError

    args_list = list(sys.argv[1:] if argv is None else argv)
    # as the user can type it again: `python -m benchmark` and the console
    # script are the same command (sys.argv[0] is then a path to __main__.py)
    command = shlex.join(["nucleus-bench", *args_list])
    parser = build_parser(args_list)
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "datasets":
            return _cmd_datasets()
        if args.command == "models":
            return _cmd_models(args)
        if args.command == "eval":
            return _cmd_eval(args, command)
        if args.command == "report":
            from .report import write_report

            path = write_report(args.out, n_overlays=args.overlays)
            print(f"wrote {path}")
            return 0
        if args.command == "train":
            return _cmd_train(args)
        if args.command == "oracle":
            return _cmd_oracle(args, command)
        if args.command == "calibrate":
            return _cmd_calibrate(args)
        if args.command == "fields":
            return _cmd_fields(args)
        if args.command == "finetune":
            return _cmd_finetune(args)
        from benchmark import speed

        return int(speed.run(args, command))
    except (DatasetError, NucleusModelsError) as exc:
        msg = " ".join(str(exc).split())
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
