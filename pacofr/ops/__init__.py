"""The fused ops of pacofr, the one door to the kernels.

Each op is a `torch.library.custom_op` (so it works under `torch.compile`; eager calls take a
plain autograd.Function with the same forward and backward) with a torch reference in
`reference.py`; `dispatch` picks the backend per call.
"""

from .codebook_topk import codebook_topk
from .dispatch import backends, explain
from .masked_attention import masked_attention, masked_attention_qkv
from .patch_pixel_loss import patch_pixel_loss, patch_pixel_loss_normalizers, patch_pixel_loss_terms

__all__ = ["codebook_topk", "masked_attention", "masked_attention_qkv", "patch_pixel_loss", "patch_pixel_loss_terms", "patch_pixel_loss_normalizers", "backends", "explain"]
