"""Downstream evaluation of a pretrained encoder: face alignment (alignment.py) and face parsing
(parsing.py) probes of its frozen features."""

from .alignment import AlignmentImages, fit_ridge, nme
from .common import load_encoder
from .parsing import ParsingImages

__all__ = ["AlignmentImages", "ParsingImages", "fit_ridge", "load_encoder", "nme"]
