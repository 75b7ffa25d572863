from .codebook import BeliefPredictor, PixelCodebook, belief_loss, mix_candidates, nearest_codes
from .pacofr import PaCoFR
from .patches import patchify, unpatchify
from .vit import Decoder, ViTEncoder, sincos_pos_embed, timm_kwargs, visible_index
from .weights import (
    checkpoint_filter_fn, create_timm_model, load_encoder_weights, read_metadata, save_encoder, weights_config)

__all__ = [
    "PaCoFR", "ViTEncoder", "Decoder", "PixelCodebook", "BeliefPredictor", "mix_candidates", "belief_loss",
    "nearest_codes", "patchify", "unpatchify", "sincos_pos_embed", "visible_index", "timm_kwargs",
    "checkpoint_filter_fn", "load_encoder_weights", "save_encoder", "read_metadata", "weights_config",
    "create_timm_model",
]
