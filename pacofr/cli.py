"""`pacofr train ...` (also `python train.py ...`, `torchrun ... train.py`, `deepspeed train.py`)."""

import argparse
import sys


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="pretrain PaCo-FR")
    p.add_argument("--config", default="vit_base_patch16_224", help="a preset name or a YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable")
    p.add_argument("--output", default="runs/pacofr", help="run directory")
    p.add_argument("--resume", default=None, help="'auto' (newest checkpoint in --output) or a checkpoint directory")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--deepspeed_config", "--deepspeed-config", metavar="JSON",
                   help="DeepSpeed ZeRO (stage 1, 2 or 3) with this config; the same as --set train.deepspeed=JSON")
    p.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)  # DeepSpeed's usual switch
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pacofr", description=__doc__)
    _train_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)

    from .config import ConfigError, load_config
    from .engine import NonFiniteLossError, pretrain

    overrides = list(args.set)
    if args.deepspeed_config:
        overrides.append(f"train.deepspeed={args.deepspeed_config}")
    elif args.deepspeed:
        parser.error("--deepspeed needs --deepspeed_config JSON (e.g. configs/zero2.json)")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.seed is not None:
        overrides.append(f"train.seed={args.seed}")
    try:
        cfg = load_config(args.config, overrides)
        pretrain(cfg, args.output, args.resume)
    except (ConfigError, FileNotFoundError, ValueError, NonFiniteLossError) as err:
        print(f"pacofr {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
