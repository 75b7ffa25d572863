"""`pacofr train ...` (also `python -m pacofr`, `python train.py ...`, `torchrun ... train.py`,
`deepspeed train.py`), `pacofr finetune-recognition ...` (pacofr/engine/finetune.py; the same
launchers with `-m pacofr finetune-recognition`), `pacofr eval-alignment|eval-parsing|eval-attributes|eval-pose
...` (probes of a pretrained encoder, pacofr/eval), `pacofr eval-verification ...` (face verification,
pacofr/eval), `pacofr export ...` (a checkpoint's encoder with its config, pacofr/export.py), `pacofr data
prepare ...` (images to WebDataset shards, pacofr/data/prepare.py)."""

import argparse
import json
import math
import sys
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    """argparse with a wrong or missing argument said in one line (without the usage block),
    as every other user error is; the subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _run_flags(p, output: str) -> None:
    """The options of a training run (pretraining, fine-tuning)."""
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable")
    p.add_argument("--output", default=output, help="run directory")
    p.add_argument("--resume", default=None, help="'auto' (newest checkpoint in --output) or a checkpoint directory")
    p.add_argument("--overwrite", action="store_true", help="clear a run that --output holds (without it, such a "
                                                             "folder is refused unless --resume continues it)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--deepspeed_config", "--deepspeed-config", metavar="JSON",
                   help="DeepSpeed ZeRO with this config, a file or a preset (zero1, zero2, zero3); "
                        "the same as --set train.deepspeed=JSON")
    p.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)  # DeepSpeed's usual switch
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="pretrain PaCo-FR")
    p.add_argument("--config", default="vit_base_patch16_224",
                   help="a preset (vit_base_patch16_224, tiny, demo) or a YAML file")
    _run_flags(p, "runs/pacofr")


def _finetune_parser(sub) -> None:
    p = sub.add_parser("finetune-recognition", help="fine-tune an encoder for face recognition (margin softmax, "
                                                    "class centres sharded over the ranks)")
    p.add_argument("--encoder", required=True, help="pacofr weights: an encoder.safetensors, a checkpoint "
                                                    "(ckpt-*/ or its model.safetensors) or a run folder")
    p.add_argument("--config", default=None, help="a preset or YAML file for the rest of the config (default: the "
                                                   "model the encoder carries, the defaults otherwise)")
    p.add_argument("--eval-bin", action="append", default=[], metavar="BIN",
                   help="an insightface verification set (lfw.bin, ...), scored every finetune.eval_every steps; "
                        "repeatable")
    _run_flags(p, "runs/finetune")


def _encoder_args(p):
    """--config, --set and --encoder: the encoder an evaluation reads (its config from the file)."""
    p.add_argument("--config", default=None, help="the encoder's config: a preset or a YAML file (default: the one "
                                                   "the encoder file or its run folder holds)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable")
    p.add_argument("--encoder", required=True, help="pacofr weights: an encoder.safetensors, a checkpoint (ckpt-*/ or its model.safetensors) or a run folder")
    return p


def _probe_parser(sub, name: str, help: str, targets: str, targets_help: str, batch_size: int,
                  targets_required: bool = True):
    p = _encoder_args(sub.add_parser(name, help=help))
    for split, what in (("train", "to fit the probe on"), ("test", "to score it on")):
        p.add_argument(f"--{split}", required=True, help=f"image folder or .txt list {what}")
        p.add_argument(f"--{split}-{targets}", required=targets_required, help=f"{targets_help} of --{split}")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-pixels", type=int, default=None, help="pixel budget of an image, from its header "
                   "(default: the config's data.max_pixels): larger JPEGs are decoded at reduced scale, others skipped")
    p.add_argument("--min-test", type=int, default=None, help="a score over fewer usable test images is refused "
                   "(default 20)")
    p.add_argument("--output", default=None, help="also write the result to this JSON file, and the files "
                   "skipped to FILE.skipped.csv beside it")
    p.add_argument("--occlude", default=None, metavar="LEVELS",
                   help="also score the test set under seeded synthetic occluders covering these fractions of the "
                        "face crop (e.g. 0,0.1,0.2,0.3,0.4,0.5): the result's robustness table, and with --output "
                        "FILE.robustness.png (the curve) and FILE.occluded.png (occluded test faces) beside it")
    p.add_argument("--occluder", default=None, choices=["eyes", "mouth", "random"],
                   help="where --occlude draws: over the eyes, the mouth (from the landmarks, else the template's "
                        "positions) or anywhere (default random)")
    p.add_argument("--occlude-seed", type=int, default=0, help="the occluders' seed (the same for every encoder)")
    return p


def _occlusion(args):
    """The probe's occlusion sweep of --occlude and --occluder, or None."""
    if args.occlude is None:
        if args.occluder is not None:
            raise ValueError("--occluder goes with --occlude LEVELS (e.g. --occlude 0,0.1,0.2,0.3,0.4,0.5)")
        return None
    from .eval.occlusion import Occlusion, parse_levels

    return Occlusion(parse_levels(args.occlude), args.occluder or "random", args.occlude_seed)


def _robustness(args, test, result: dict, occlusion) -> None:
    """The metric at each occlusion level, printed; with --output, the curve and occluded faces as PNGs."""
    table = result.get("robustness")
    if table is None:
        return
    print(f"  {table['metric']} under {table['occluder']} occluders: " + "   ".join(
        f"{100 * float(k):g}% {'-' if v is None else format(v, '.2f')}" for k, v in table["levels"].items()))
    if args.output:
        from .eval.occlusion import write_plot, write_preview

        plot, faces = beside(args.output, ".robustness.png"), beside(args.output, ".occluded.png")
        plot.parent.mkdir(parents=True, exist_ok=True)
        write_plot(plot, table)
        write_preview(faces, test, occlusion)
        print(f"  robustness curve in {plot}, occluded test faces in {faces}")


def _eval_parser(sub) -> None:
    p = _probe_parser(sub, "eval-alignment", "landmark probe of a pretrained encoder (NME)", "landmarks",
                      "CSV or JSON landmarks", 64)
    p.add_argument("--norm", default=None, choices=["inter_ocular", "diag"],
                   help="the NME's scale with --format csv (default inter_ocular); the formats use their own")
    p.add_argument("--grid", type=int, default=7, help="patch tokens are pooled to grid x grid")
    p.add_argument("--format", default="csv", choices=["csv", "wflw", "300w", "cofw", "aflw19"],
                   help="the landmark files: pacofr's CSV/JSON (centre crops), or a benchmark's own, scored by "
                        "its protocol (docs/evaluation.md)")


def _benchmark_faces(fmt: str):
    """A `_probe_inputs` reader of the benchmark format `fmt`: BoxedFaces of the annotation file."""
    from .eval import formats

    def read(images, landmarks, size, what, budget):
        if fmt == "cofw":  # (images and landmarks are both in the release's .mat)
            faces, arrays = formats.read_cofw(landmarks, f"{what}-landmarks")
            return formats.BoxedFaces(landmarks, faces, size, what, budget, arrays=arrays)
        if fmt == "300w":
            from .data.sources import image_files

            faces = formats.read_300w(image_files(images, what)[1], landmarks, what)
        elif fmt == "wflw":
            faces = formats.read_wflw(landmarks, f"{what}-landmarks")
        else:
            faces = formats.read_aflw19(landmarks, what.lstrip("-"), f"{what}-landmarks")
        return formats.BoxedFaces(images, faces, size, what, budget)

    return read


def _eval_benchmark(args) -> None:
    from .eval.benchmarks import evaluate
    from .eval.overlay import draw_landmarks

    occlusion = _occlusion(args)
    encoder, train, test = _probe_inputs(args, _benchmark_faces(args.format), "landmarks")
    result = evaluate(encoder, args.format, train, test, args.grid, args.batch_size, args.workers,
                      min_test=_min_test(args), occlusion=occlusion)
    for norm, parts in result["nme"].items():
        print(f"{args.format} NME ({norm}): " + "   ".join(
            f"{name} {'-' if s['nme'] is None else format(s['nme'], '.2f')}% (FR {s['fr']:.1f}%, AUC {s['auc']:.1f}%, "
            f"{s['faces']})" for name, s in parts.items()))
    pct = lambda v: "-" if v is None else f"{v:.2f}%"  # noqa: E731
    if "occluded_points_nme" in result:
        print(f"  NME of the occluded points: {pct(result['occluded_points_nme'])}   "
              f"of the visible ones: {pct(result['visible_points_nme'])}")
    print("  mean shape NME: " + "   ".join(f"{n} {pct(v)}" for n, v in result["mean_shape_nme"].items())
          + f"   train {result['train_faces']} / test {result['test_faces']} faces")
    _preview(args, test, result, draw_landmarks)
    _robustness(args, test, result, occlusion)
    _report(args, result)


def _preview(args, test, result: dict, drawer) -> None:
    """The result's few predictions drawn over their faces, to FILE.preview.png beside --output."""
    items = result.pop("preview")
    if args.output:
        from .eval.overlay import write_preview

        path = beside(args.output, ".preview.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_preview(path, test, items, drawer)
        print(f"  predictions drawn in {path}")


def _pose_parser(sub) -> None:
    p = _probe_parser(sub, "eval-pose", "head pose probe of a pretrained encoder (MAE of yaw, pitch, roll)", "labels",
                      "folder of the pose .mat files (default: beside the images)", 64, targets_required=False)
    p.add_argument("--grid", type=int, default=2, help="patch tokens are pooled to grid x grid")
    p.add_argument("--format", default="auto", choices=["auto", "mat", "biwi"],
                   help="the test set's pose files: a .mat beside each image (AFLW2000-3D), BIWI's per-frame "
                        "_pose.txt with an rgb.cal a folder, or auto (BIWI when its folders hold rgb.cal); the "
                        "train set's are found the same way")


def _eval_pose(args) -> None:
    from .eval.overlay import draw_pose
    from .eval.pose import LIMIT, BiwiFaces, PoseFaces, evaluate, is_biwi

    def read(images, labels, size, what, budget):  # (the angle limit drops test faces only)
        limit = LIMIT if what == "--test" else None
        fmt = args.format if what == "--test" else "auto"
        if fmt == "biwi" or (fmt == "auto" and is_biwi(images)):
            if labels is not None:
                raise ValueError(f"{what}-labels is for .mat pose files: BIWI's _pose.txt files are read beside "
                                 "its frames")
            return BiwiFaces(images, size, what, budget, limit)
        return PoseFaces(images, labels, size, what, budget, limit)

    occlusion = _occlusion(args)
    encoder, train, test = _probe_inputs(args, read, "labels")
    result = evaluate(encoder, train, test, args.grid, args.batch_size, args.workers, min_test=_min_test(args),
                      occlusion=occlusion)
    m, floor = result["mae"], result["mean_pose_mae"]
    print(f"pose MAE (degrees): yaw {m['yaw']:.2f}   pitch {m['pitch']:.2f}   roll {m['roll']:.2f}   "
          f"mean {m['mean']:.2f}   (mean pose: {floor['mean']:.2f})   "
          f"train {result['train_images']} / test {result['test_images']} images")
    _preview(args, test, result, draw_pose)
    _robustness(args, test, result, occlusion)
    _report(args, result)


def _eval_alignment(args) -> None:
    from .eval.alignment import AlignmentImages, evaluate
    from .eval.overlay import draw_landmarks

    if args.format != "csv":
        if args.norm is not None:
            raise ValueError(f"--norm is for --format csv: --format {args.format} scores by its own normalizations")
        return _eval_benchmark(args)
    norm, occlusion = args.norm or "inter_ocular", _occlusion(args)
    encoder, train, test = _probe_inputs(args, AlignmentImages, "landmarks", norm)
    result = evaluate(encoder, train, test, norm, args.grid, args.batch_size, args.workers,
                      min_test=_min_test(args), occlusion=occlusion)
    print(f"NME ({result['norm']}, {result['points']} points): {result['nme']:.2f}%   "
          f"mean shape: {result['mean_shape_nme']:.2f}%   FR@10%: {result['failure_rate_10']:.1f}%   "
          f"train {result['train_faces']} / test {result['test_faces']} faces")
    if result["test_faces_with_points_outside_the_crop"]:
        print(f"  test faces with points outside the crop: {result['test_faces_with_points_outside_the_crop']}")
    _preview(args, test, result, draw_landmarks)
    _robustness(args, test, result, occlusion)
    _report(args, result)


def _parsing_parser(sub) -> None:
    p = _probe_parser(sub, "eval-parsing", "face parsing probe of a pretrained encoder (F1)", "labels",
                      "folder of label PNGs (class ids; --format pngs)", 32, targets_required=False)
    p.add_argument("--classes", type=int, default=None, help="number of classes, background (0) included "
                                                             "(--format pngs; the formats know theirs)")
    p.add_argument("--format", default="pngs", choices=["pngs", "lapa", "celebamask"],
                   help="label PNGs of class ids beside a folder of images (centre crops), or a benchmark's own "
                        "layout, scored by its protocol (docs/evaluation.md)")
    p.add_argument("--partition", default=None, help="CelebA's list_eval_partition.txt (--format celebamask; "
                                                     "default: in the CelebAMask-HQ folder)")


def _parsing_sets(args):
    """The eval-parsing reader of --format (with the options it does not take refused)."""
    from .eval.parsing import ParsingImages
    from .eval.parsing_formats import LAPA_CLASSES, CelebAMaskFaces, LapaFaces

    if args.format == "pngs":
        missing = next((f for f in ("--classes", "--train-labels", "--test-labels")
                        if getattr(args, f[2:].replace("-", "_")) is None), None)
        if missing:
            raise ValueError(f"--format pngs needs {missing}")
        return lambda images, labels, size, what, budget: ParsingImages(images, labels, size, args.classes, what,
                                                                        budget)
    given = next((f for f in ("--train-labels", "--test-labels") if getattr(args, f[2:].replace("-", "_"))), None)
    if given:
        raise ValueError(f"{given} is for --format pngs: --format {args.format} finds the labels in {given[:-7]}")
    if args.format == "lapa":
        if args.classes not in (None, len(LAPA_CLASSES)):
            raise ValueError(f"--classes {args.classes}: LaPa has {len(LAPA_CLASSES)} (leave --classes out)")
        return lambda images, labels, size, what, budget: LapaFaces(images, size, what, budget)
    if args.classes is not None:
        raise ValueError("--classes is for --format pngs: CelebAMask-HQ has its 19 (leave --classes out)")
    return lambda images, labels, size, what, budget: CelebAMaskFaces(images, args.partition, size, what, budget)


def _eval_parsing(args) -> None:
    from .eval.overlay import draw_parsing
    from .eval.parsing import evaluate

    if args.partition is not None and args.format != "celebamask":
        raise ValueError("--partition is for --format celebamask")
    occlusion = _occlusion(args)
    encoder, train, test = _probe_inputs(args, _parsing_sets(args), "labels")
    result = evaluate(encoder, train, test, args.batch_size, args.workers, min_test=_min_test(args),
                      occlusion=occlusion)
    pct = lambda v: "-" if v is None else f"{v:.2f}%"  # noqa: E731 (None: no such class in the test labels)
    present = sum(v is not None for v in result["f1"][1:])
    print(f"{result['protocol']} mean F1 ({present} of classes 1-{result['classes'] - 1}: those in the test labels): "
          f"{pct(result['mean_f1'])}   mean IoU: {pct(result['mean_iou'])}   "
          f"pixel accuracy: {pct(result['pixel_accuracy'])}   position prior mean F1: {pct(result['prior_mean_f1'])}   "
          f"train {result['train_images']} / test {result['test_images']} images")
    names = result.get("f1_by_class") or dict(enumerate(result["f1"]))
    print("  F1 per class: " + " ".join(f"{k} {pct(v)}" for k, v in names.items()))
    _preview(args, result.pop("preview_images"), result, draw_parsing)
    _robustness(args, test, result, occlusion)
    _report(args, result)


def _attributes_parser(sub) -> None:
    p = _probe_parser(sub, "eval-attributes", "binary attribute probe of a pretrained encoder (accuracy)", "labels",
                      "CSV of attributes (header: path,name,...), or CelebA's list_attr_celeba.txt", 64)
    p.add_argument("--format", default="csv", choices=["csv", "celeba"],
                   help="the labels: a CSV per split, or CelebA's list_attr_celeba.txt split by its partition file")
    p.add_argument("--partition", default=None, help="CelebA's list_eval_partition.txt (--format celeba; default: "
                                                     "beside --train-labels)")
    p.add_argument("--max-train", type=int, default=None, metavar="N",
                   help="--format celeba: fit on the first N images of the train partition only")


def _attribute_sets(args):
    """The eval-attributes reader of --format."""
    import os

    from .eval.attributes import AttributeImages
    from .eval.celeba import attribute_protocol, attribute_split

    if args.format == "csv":
        if args.partition is not None or args.max_train is not None:
            raise ValueError("--partition and --max-train are for --format celeba")
        return AttributeImages
    if args.max_train is not None and args.max_train < 1:
        raise ValueError(f"--max-train must be >= 1, got {args.max_train}")
    partition = args.partition or os.path.join(os.path.dirname(args.train_labels), "list_eval_partition.txt")

    def read(images, labels, size, what, budget):
        split = what.lstrip("-")
        table = attribute_split(labels, partition, split, what, args.max_train if split == "train" else None)
        dataset = AttributeImages(images, labels, size, what, budget, split=table)
        dataset.protocol = attribute_protocol(args.max_train)
        return dataset

    return read


def _eval_attributes(args) -> None:
    from .eval.attributes import evaluate
    from .eval.overlay import attribute_drawer

    occlusion = _occlusion(args)
    encoder, train, test = _probe_inputs(args, _attribute_sets(args), "labels")
    result = evaluate(encoder, train, test, args.batch_size, args.workers, min_test=_min_test(args),
                      occlusion=occlusion)
    print(f"{result['protocol']} mean accuracy ({result['attributes']} attributes): {result['mean_accuracy']:.2f}%   "
          f"majority: {result['majority_mean_accuracy']:.2f}%   "
          f"train {result['train_images']} / test {result['test_images']} images")
    print("  " + "  ".join(f"{k} {v:.1f}" for k, v in result["accuracy"].items()))
    _preview(args, result.pop("preview_images"), result, attribute_drawer(list(result["accuracy"])))
    _robustness(args, test, result, occlusion)
    _report(args, result)


def _verification_parser(sub) -> None:
    p = _encoder_args(sub.add_parser("eval-verification", help="face verification of an encoder's embeddings "
                                                               "(insightface's .bin sets, LFW pairs.txt, IJB-B/C 1:1)"))
    p.add_argument("--bin", action="append", default=[], metavar="FILE",
                   help="an insightface verification set (lfw.bin, cfp_fp.bin, agedb_30.bin, ...), repeatable")
    p.add_argument("--pairs", default=None, help="LFW's pairs.txt (the original protocol; with --images)")
    p.add_argument("--images", default=None, help="the image folder of --pairs (name/name_0001.jpg)")
    p.add_argument("--ijb", action="append", default=[], metavar="DIR",
                   help="an IJB-B or IJB-C folder (meta/, loose_crop/), repeatable")
    p.add_argument("--detector-score", action="store_true", help="IJB: weight each face by its detector score")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="IJB: processes that read and align the faces")
    p.add_argument("--max-pixels", type=int, default=None, help="pixel budget of an image (default: the config's "
                   "data.max_pixels): larger JPEGs are decoded at reduced scale; an image over it is an error")
    p.add_argument("--output", default=None, help="also write the results to this JSON file")


def _eval_verification(args) -> None:
    from .eval.attributes import features
    from .eval.common import load_encoder
    from .eval.ijb import evaluate_ijb
    from .eval.verification import evaluate_bin, evaluate_pairs

    if not (args.bin or args.pairs or args.ijb):
        raise ValueError("give a set to evaluate: --bin FILE, --pairs pairs.txt --images DIR, or --ijb DIR")
    if (args.pairs is None) != (args.images is None):
        raise ValueError("--pairs and --images go together (LFW's pairs.txt and its image folder)")
    if args.batch_size < 1 or args.workers < 0:
        raise ValueError(f"--batch-size must be >= 1 and --workers >= 0, got {args.batch_size} and {args.workers}")
    cfg = _encoder_config(args)
    size, budget = cfg.model.img_size, _budget(args, cfg)
    encoder = load_encoder(cfg, args.encoder)
    device = next(encoder.parameters()).device
    embed_fn = lambda x: features(encoder, x, device)  # noqa: E731 (the probes' features: class + mean patch token)
    results = []
    for path in args.bin:
        results.append(evaluate_bin(embed_fn, path, size, args.batch_size, budget))
        _verification_line(results[-1])
    if args.pairs:
        results.append(evaluate_pairs(embed_fn, args.pairs, args.images, size, args.batch_size, budget))
        _verification_line(results[-1])
    for root in args.ijb:
        results.append(evaluate_ijb(embed_fn, root, size, args.batch_size, args.workers, args.detector_score, budget))
        r = results[-1]
        skipped = f"   skipped: {r['skipped']}" if r["skipped"] else ""
        print(f"{r['set']}: TAR@FAR " + "  ".join(f"{far} {100 * tar:.2f}%" for far, tar in r["tar_at_far"].items())
              + f"   {r['pairs']} pairs, {r['templates']} templates, {r['faces']} faces{skipped}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(finite_floats({"encoder": str(args.encoder), "img_size": size, "sets": results}), f, indent=2,
                      allow_nan=False)


def _verification_line(r: dict) -> None:
    print(f"{r['set']}: accuracy {100 * r['accuracy']:.2f}% +- {100 * r['accuracy_std']:.2f}   "
          f"VAL@FAR=1e-3 {100 * r['val']:.2f}% +- {100 * r['val_std']:.2f} (FAR {r['far']:.5f})   {r['pairs']} pairs")


def _encoder_config(args):
    """--config and --set, or the config the --encoder weights carry (checked against each other)."""
    from .model import weights_config

    return weights_config(args.encoder, args.config, args.set)


def _probe_inputs(args, images, labels: str, *options):
    """A probe's encoder and its train and test sets: `images(folder, --<split>-<labels>, size,
    *options, '--<split>', pixel budget)` for each split (the sets first: their errors are cheap)."""
    from .eval.common import load_encoder

    cfg = _encoder_config(args)
    size, budget = cfg.model.img_size, _budget(args, cfg)
    train, test = (images(getattr(args, split), getattr(args, f"{split}_{labels}"), size, *options, f"--{split}",
                          budget) for split in ("train", "test"))
    return load_encoder(cfg, args.encoder), train, test


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint's encoder, its config in the metadata")
    p.add_argument("--checkpoint", required=True, metavar="RUN_OR_CKPT",
                   help="a run folder (its newest checkpoint) or a checkpoint folder (ckpt-*/)")
    p.add_argument("--out", required=True, help="the encoder file to write (.safetensors)")
    p.add_argument("--config", default=None, help="the run's config, for a checkpoint outside its run folder "
                                                   "(default: the run's config.yaml)")


def _export(args) -> None:
    from .export import export

    done = export(args.checkpoint, args.out, args.config)
    m = done["model"]
    step = "" if done["step"] is None else f" (step {done['step']})"
    print(f"wrote {done['out']}: the encoder of {done['checkpoint']}{step}, {done['tensors']} tensors, "
          f"{m.img_size} px, patch {m.patch_size}, width {m.encoder.embed_dim}, depth {m.encoder.depth}, "
          f"{m.encoder.num_heads} heads")


def _data_parser(sub) -> None:
    from .config import DataConfig

    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="images (a folder, a .txt list, an insightface RecordIO pair) to "
                                        "WebDataset shards, checked and repaired as the loader does")
    p.add_argument("src", metavar="SRC", help="an image folder, a .txt list of paths, a .rec file (its .idx "
                                              "beside it) or a folder holding train.rec and train.idx")
    p.add_argument("out", metavar="OUT", help="a new or empty folder for the shards and the report")
    p.add_argument("--shard-size", type=int, default=10000, help="samples per shard")
    p.add_argument("--landmarks", default=None, help="CSV or JSON landmarks of SRC's images (as data.landmarks)")
    p.add_argument("--min-size", type=int, default=DataConfig.min_size,
                   help="smaller images are skipped (as data.min_size)")
    p.add_argument("--workers", type=int, default=0, help="processes that check the images (0: this one)")
    p.add_argument("--max-pixels", type=int, default=DataConfig.max_pixels,
                   help="larger images are skipped, never decoded (as data.max_pixels)")
    p.add_argument("--align", type=int, nargs="?", const=112, default=0, metavar="SIZE",
                   help="store each face warped to the ArcFace 5-point template, SIZE x SIZE (112 if not "
                        "given); needs --landmarks")


def _data(args) -> None:
    from .data.prepare import prepare, summary_lines

    report = prepare(args.src, args.out, args.shard_size, args.landmarks, args.min_size, args.workers,
                     args.max_pixels, args.align)
    print("\n".join(summary_lines(report)))


def _budget(args, cfg) -> int:
    """--max-pixels, or the config's data.max_pixels; below 1 is refused."""
    if args.max_pixels is None:
        return cfg.data.max_pixels
    if args.max_pixels < 1:
        raise ValueError(f"--max-pixels must be >= 1, got {args.max_pixels}")
    return args.max_pixels


def _min_test(args) -> int:
    from .eval.common import MIN_TEST

    return MIN_TEST if args.min_test is None else args.min_test


def beside(output: str, suffix: str) -> Path:
    """FILE<suffix> beside --output FILE.json (FILE without .json)."""
    out = Path(output)
    return out.with_name((out.stem if out.suffix.lower() == ".json" else out.name) + suffix)


def skipped_csv(output: str) -> Path:
    """Where the probe's skipped files go: beside --output, FILE.skipped.csv."""
    return beside(output, ".skipped.csv")


def _report(args, result: dict) -> None:
    files = result.pop("skipped_files", [])
    listed = f" (listed in {skipped_csv(args.output)})" if args.output else " (--output lists them)"
    for split in ("train", "test"):
        if result[f"skipped_{split}"]:
            print(f"  skipped ({split}): " + ", ".join(f"{k}={v}" for k, v in result[f"skipped_{split}"].items())
                  + listed)
    if args.output:  # (strict JSON: a score that is not finite, from a failed prediction, is null)
        from .data.skips import write_csv

        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(finite_floats(result), f, indent=2, allow_nan=False)
        write_csv(skipped_csv(args.output), files, ("path", "reason", "split"))


def _finetune(args, overrides: list[str]) -> None:
    from .engine.finetune import finetune
    from .model import weights_config

    if args.eval_bin:
        overrides.append(f"finetune.eval_bins={json.dumps(','.join(args.eval_bin))}")
    cfg = weights_config(args.encoder, args.config, overrides)
    finetune(cfg, args.encoder, args.output, args.resume, overwrite=args.overwrite)


def finite_floats(value):
    """A JSON-able value with NaN and inf floats as None (null): strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_floats(v) for v in value]
    return value


# What the OS says of a path a user gave (a file where a folder goes, no permission, ...):
# user errors as the ConfigErrors are, said in one line naming the path.
PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def _message(err: Exception) -> str:
    """The error's message; of one raised in a DataLoader worker (which torch wraps with the
    worker's traceback), its last line; of the OS's about a path, the path and what is wrong."""
    if isinstance(err, OSError) and err.filename is not None:
        return f"'{err.filename}': {(err.strerror or str(err)).lower()}: check the path (and its permissions)"
    text = str(err)
    return text.strip().splitlines()[-1] if "Original Traceback" in text else text


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="pacofr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _finetune_parser(sub)
    _eval_parser(sub)
    _parsing_parser(sub)
    _attributes_parser(sub)
    _verification_parser(sub)
    _pose_parser(sub)
    _export_parser(sub)
    _data_parser(sub)
    args = parser.parse_args(argv)

    from .config import ConfigError, check_output_path, load_config
    from .engine import NonFiniteLossError, pretrain

    user_errors = (ConfigError, ValueError, *PATH_ERRORS)

    if args.command not in ("train", "finetune-recognition"):
        run = {"eval-alignment": _eval_alignment, "eval-parsing": _eval_parsing, "eval-attributes": _eval_attributes,
               "eval-verification": _eval_verification, "eval-pose": _eval_pose, "export": _export,
               "data": _data}[args.command]
        try:
            if getattr(args, "output", None):  # (an eval's: checked now, it is written after the whole evaluation)
                check_output_path(args.output, "--output", folder=False)
            run(args)
        except user_errors as err:
            print(f"pacofr {args.command}: error: {_message(err)}", file=sys.stderr)
            return 2
        return 0

    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    overrides = list(args.set)
    if args.deepspeed_config:
        overrides.append(f"train.deepspeed={args.deepspeed_config}")
    elif args.deepspeed:
        parser.error("--deepspeed needs --deepspeed_config JSON (a file, or a preset: zero1, zero2, zero3)")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.seed is not None:
        overrides.append(f"train.seed={args.seed}")
    code = 0
    try:
        if args.command == "train":
            pretrain(load_config(args.config, overrides), args.output, args.resume, overwrite=args.overwrite)
        else:
            _finetune(args, overrides)
    except (*user_errors, NonFiniteLossError) as err:
        print(f"pacofr {args.command}: error: {_message(err)}", file=sys.stderr)
        code = 2
    from .engine.distributed import end_rank

    end_rank(code)  # (a rank of a launched multi-process run ends here)
    return code


if __name__ == "__main__":
    sys.exit(main())
