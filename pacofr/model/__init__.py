from .codebook import BeliefPredictor, PixelCodebook, belief_loss, mix_candidates, nearest_codes
from .pacofr import PaCoFR
from .patches import patchify, unpatchify
from .vit import Decoder, ViTEncoder, sincos_pos_embed, visible_index

__all__ = [
    "PaCoFR", "ViTEncoder", "Decoder", "PixelCodebook", "BeliefPredictor", "mix_candidates", "belief_loss",
    "nearest_codes", "patchify", "unpatchify", "sincos_pos_embed", "visible_index",
]
