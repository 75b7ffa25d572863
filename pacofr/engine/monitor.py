"""What a run shows: metrics.csv, TensorBoard scalars, and PNG grids of
original | masked-and-replaced input | reconstruction."""

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data import denormalize
from ..model import patchify, unpatchify

FIELDS = ["step", "epoch", "loss", "l_pix", "l_sc", "l_belief", "l_commit", "lr", "grad_norm",
          "images_per_s", "perplexity", "incubating", "skipped_steps"]


class Monitor:
    def __init__(self, output: Path, resume_step: int | None, fields: list[str] = FIELDS):
        self.output, self.fields = output, fields
        self.csv_path = output / "metrics.csv"
        self.image_dir = output / "images"
        self.image_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        if resume_step is not None and self.csv_path.exists():
            # Rows written after the checkpoint we resume from are written again: drop them.
            with open(self.csv_path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self._file = open(self.csv_path, "w", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=fields)
        self._csv.writeheader()
        self._csv.writerows(rows)
        self._file.flush()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(output / "tensorboard"), purge_step=resume_step)
        except ImportError:  # tensorboard is an optional extra
            self.tensorboard = None

    def log(self, row: dict) -> None:
        self._csv.writerow({k: row.get(k, "") for k in self.fields})
        self._file.flush()
        if self.tensorboard is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self.tensorboard.add_scalar(f"train/{k}", v, row["step"])

    def reconstruction_grid(self, step: int, images: torch.Tensor, out: dict, patch_size: int,
                            norm_pix: bool, eps: float, rows: int = 8) -> Path:
        grid = reconstruction_grid(images[:rows], out["input"][:rows], out["pred"][:rows], out["mask"][:rows],
                                   out["replace"][:rows], patch_size, norm_pix, eps)
        path = self.image_dir / f"recon_{step:08d}.png"
        Image.fromarray(grid).save(path)
        if self.tensorboard is not None:
            self.tensorboard.add_image("reconstruction", grid, step, dataformats="HWC")
        return path

    def flush(self) -> None:
        """What is written so far, on disk (a rank of a multi-process run ends without the
        interpreter's teardown: distributed.end_rank)."""
        self._file.flush()
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        self._file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


@torch.no_grad()
def reconstruction_grid(images, model_input, pred, mask, replace, patch_size, norm_pix, eps) -> np.ndarray:
    """uint8 [rows * H, 3 * W, 3]: each row original | input (masked patches grey) | the
    reconstruction of the masked and replaced patches pasted over the visible ones."""
    p = patch_size
    h, w = images.shape[2:]
    target = patchify(images.float(), p)
    pred = pred.float()
    if norm_pix:  # predictions are in per-patch normalized units: undo with the target stats
        mean = target.mean(-1, keepdim=True)
        std = (target.var(-1, keepdim=True, correction=1) + eps).sqrt()
        pred = pred * std + mean
    seen = patchify(model_input.float(), p)
    shown_input = seen.masked_fill(mask[..., None], float("nan"))
    recon = torch.where((mask | replace)[..., None], pred, seen)
    columns = [denormalize(images.float().cpu())]
    for patches in (shown_input, recon):
        columns.append(denormalize(unpatchify(patches, p, h, w).cpu()))
    columns[1] = torch.nan_to_num(columns[1], nan=0.5)
    rows = torch.cat(columns, dim=3)  # [B, 3, H, 3W]
    grid = rows.permute(0, 2, 3, 1).reshape(-1, 3 * w, 3).clamp(0, 1)
    return (grid.numpy() * 255).round().astype(np.uint8)
