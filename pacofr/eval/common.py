"""What the probes share: the encoder from a pretraining run, batching of skippable items, autocast."""

import torch
from safetensors.torch import load_file

from ..model import ViTEncoder


def load_encoder(cfg, path: str, device) -> ViTEncoder:
    """The encoder of config `cfg` with the weights of an encoder.safetensors (strict)."""
    m = cfg.model
    encoder = ViTEncoder(m.img_size, m.patch_size, m.in_chans, m.encoder.embed_dim, m.encoder.depth,
                         m.encoder.num_heads, m.encoder.mlp_ratio, m.attn_impl)
    try:
        encoder.load_state_dict(load_file(path), strict=True)
    except RuntimeError as e:  # (sizes or names that differ: another config)
        raise ValueError(f"encoder '{path}' does not fit the encoder of this config (--config): "
                         + str(e).splitlines()[0]) from e
    return encoder.to(device).eval()


def collate_pairs(items):
    """[((a, b) or None, skip reason or None)] -> (stacked a or None, stacked b or None, reasons)."""
    kept = [it for it, _ in items if it is not None]
    reasons = [r for it, r in items if it is None]
    if not kept:
        return None, None, reasons
    return torch.stack([a for a, _ in kept]), torch.stack([b for _, b in kept]), reasons


def autocast(device: torch.device):
    """bf16 autocast on CUDA (as in training), none on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
