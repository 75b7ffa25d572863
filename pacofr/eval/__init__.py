"""Downstream evaluation of a pretrained encoder: face alignment (alignment.py) and face parsing
(parsing.py) probes of its frozen features."""

from .alignment import AlignmentImages, evaluate, fit_ridge, load_encoder, nme

__all__ = ["AlignmentImages", "evaluate", "fit_ridge", "load_encoder", "nme"]
