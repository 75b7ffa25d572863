"""The fused ops of pacofr, the one door to the kernels.

One module per op (`codebook_topk.py`, `masked_attention.py`, `patch_pixel_loss.py`): its
backends, registered with `dispatch`, and the op defined by `autograd.define_op` (a
`torch.library.custom_op` under torch.compile, a plain autograd.Function otherwise). Beside
them: `reference.py` (the torch references, the ground truth), `checks.py` (input checks and
autocast), `dispatch.py` (which backend runs a call; `explain()` says why), `drop_in.py`
(`apply_to_timm`: the attention of a timm ViT swapped for masked_attention).
"""

from .codebook_topk import codebook_topk
from .dispatch import backends, explain
from .drop_in import apply_to_timm, ragged, restore_timm
from .masked_attention import masked_attention, masked_attention_qkv
from .patch_pixel_loss import patch_pixel_loss, patch_pixel_loss_normalizers, patch_pixel_loss_terms

__all__ = ["codebook_topk", "masked_attention", "masked_attention_qkv", "patch_pixel_loss", "patch_pixel_loss_terms", "patch_pixel_loss_normalizers", "backends", "explain",
           "apply_to_timm", "restore_timm", "ragged"]
