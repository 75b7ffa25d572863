#!/usr/bin/env python
"""Pretraining entry: `python train.py ...`, `torchrun --nproc_per_node N train.py ...` or
`deepspeed train.py ...`; the same as `pacofr train ...`. See `python train.py --help`."""

import sys

from pacofr.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
