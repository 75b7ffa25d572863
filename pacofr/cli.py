"""`pacofr train ...` (also `python -m pacofr`, `python train.py ...`, `torchrun ... train.py`,
`deepspeed train.py`), `pacofr finetune-recognition ...` (pacofr/engine/finetune.py; the same
launchers with `-m pacofr finetune-recognition`), `pacofr eval-alignment|eval-parsing|eval-attributes
...` (probes of a pretrained encoder, pacofr/eval), `pacofr export ...` (a checkpoint's encoder with its config,
pacofr/export.py), `pacofr data prepare ...` (images to WebDataset shards, pacofr/data/prepare.py)."""

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


def _probe_parser(sub, name: str, help: str, targets: str, targets_help: str, batch_size: int):
    p = sub.add_parser(name, help=help)
    p.add_argument("--config", default=None, help="the encoder's config: a preset or a YAML file (default: the one "
                                                   "the encoder file or its run folder holds)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable")
    p.add_argument("--encoder", required=True, help="pacofr weights: an encoder.safetensors, a checkpoint (ckpt-*/ or its model.safetensors) or a run folder")
    for split, what in (("train", "to fit the probe on"), ("test", "to score it on")):
        p.add_argument(f"--{split}", required=True, help=f"image folder or .txt list {what}")
        p.add_argument(f"--{split}-{targets}", required=True, help=f"{targets_help} of --{split}")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-pixels", type=int, default=None, help="pixel budget of an image, from its header "
                   "(default: the config's data.max_pixels): larger JPEGs are decoded at reduced scale, others skipped")
    p.add_argument("--min-test", type=int, default=None, help="a score over fewer usable test images is refused "
                   "(default 20)")
    p.add_argument("--output", default=None, help="also write the result to this JSON file, and the files "
                   "skipped to FILE.skipped.csv beside it")
    return p


def _eval_parser(sub) -> None:
    p = _probe_parser(sub, "eval-alignment", "landmark probe of a pretrained encoder (NME)", "landmarks",
                      "CSV or JSON landmarks", 64)
    p.add_argument("--norm", default="inter_ocular", choices=["inter_ocular", "diag"])
    p.add_argument("--grid", type=int, default=7, help="patch tokens are pooled to grid x grid")


def _eval_alignment(args) -> None:
    from .eval.alignment import AlignmentImages, evaluate

    encoder, train, test = _probe_inputs(args, AlignmentImages, "landmarks", args.norm)
    result = evaluate(encoder, train, test, args.norm, args.grid, args.batch_size, args.workers,
                      min_test=_min_test(args))
    print(f"NME ({result['norm']}, {result['points']} points): {result['nme']:.2f}%   "
          f"mean shape: {result['mean_shape_nme']:.2f}%   FR@10%: {result['failure_rate_10']:.1f}%   "
          f"train {result['train_faces']} / test {result['test_faces']} faces")
    if result["test_faces_with_points_outside_the_crop"]:
        print(f"  test faces with points outside the crop: {result['test_faces_with_points_outside_the_crop']}")
    _report(args, result)


def _parsing_parser(sub) -> None:
    p = _probe_parser(sub, "eval-parsing", "face parsing probe of a pretrained encoder (F1)", "labels",
                      "folder of label PNGs (class ids)", 32)
    p.add_argument("--classes", type=int, required=True, help="number of classes, background (0) included")


def _eval_parsing(args) -> None:
    from .eval.parsing import ParsingImages, evaluate

    encoder, train, test = _probe_inputs(args, ParsingImages, "labels", args.classes)
    result = evaluate(encoder, train, test, args.batch_size, args.workers, min_test=_min_test(args))
    pct = lambda v: "-" if v is None else f"{v:.2f}%"  # noqa: E731 (None: no such class in the test labels)
    present = sum(v is not None for v in result["f1"][1:])
    print(f"mean F1 ({present} of classes 1-{result['classes'] - 1}: those in the test labels): "
          f"{pct(result['mean_f1'])}   mean IoU: {pct(result['mean_iou'])}   "
          f"pixel accuracy: {pct(result['pixel_accuracy'])}   position prior mean F1: {pct(result['prior_mean_f1'])}   "
          f"train {result['train_images']} / test {result['test_images']} images")
    print("  F1 per class: " + " ".join(pct(v) for v in result["f1"]))
    _report(args, result)


def _attributes_parser(sub) -> None:
    _probe_parser(sub, "eval-attributes", "binary attribute probe of a pretrained encoder (accuracy)", "labels",
                  "CSV of attributes (header: path,name,...)", 64)


def _eval_attributes(args) -> None:
    from .eval.attributes import AttributeImages, evaluate

    encoder, train, test = _probe_inputs(args, AttributeImages, "labels")
    result = evaluate(encoder, train, test, args.batch_size, args.workers, min_test=_min_test(args))
    print(f"mean accuracy ({result['attributes']} attributes): {result['mean_accuracy']:.2f}%   "
          f"majority: {result['majority_mean_accuracy']:.2f}%   "
          f"train {result['train_images']} / test {result['test_images']} images")
    print("  " + "  ".join(f"{k} {v:.1f}" for k, v in result["accuracy"].items()))
    _report(args, result)


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


def _data(args) -> None:
    from .data.prepare import prepare, summary_lines

    report = prepare(args.src, args.out, args.shard_size, args.landmarks, args.min_size, args.workers,
                     args.max_pixels)
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


def skipped_csv(output: str) -> Path:
    """Where the probe's skipped files go: beside --output, FILE.skipped.csv (FILE without .json)."""
    out = Path(output)
    return out.with_name((out.stem if out.suffix.lower() == ".json" else out.name) + ".skipped.csv")


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
    _export_parser(sub)
    _data_parser(sub)
    args = parser.parse_args(argv)

    from .config import ConfigError, check_output_path, load_config
    from .engine import NonFiniteLossError, pretrain

    user_errors = (ConfigError, ValueError, *PATH_ERRORS)

    if args.command not in ("train", "finetune-recognition"):
        run = {"eval-alignment": _eval_alignment, "eval-parsing": _eval_parsing,
               "eval-attributes": _eval_attributes, "export": _export, "data": _data}[args.command]
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
    try:
        if args.command == "train":
            pretrain(load_config(args.config, overrides), args.output, args.resume, overwrite=args.overwrite)
        else:
            _finetune(args, overrides)
    except (*user_errors, NonFiniteLossError) as err:
        print(f"pacofr {args.command}: error: {_message(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
