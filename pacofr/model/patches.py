"""Patchify in the MAE/timm order: patches row-major over the grid, pixels inside a patch in
(row, column, channel) order. This is the order of `pacofr.ops.patch_pixel_loss`."""

from torch import Tensor


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """[B, C, H, W] -> [B, L, p*p*C]."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, patch_size: int, height: int, width: int) -> Tensor:
    """[B, L, p*p*C] -> [B, C, H, W]."""
    b, _, dim = patches.shape
    p = patch_size
    c = dim // (p * p)
    x = patches.reshape(b, height // p, width // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, height, width)
