"""Downstream evaluation of a pretrained encoder: face alignment (alignment.py), face parsing
(parsing.py) and attribute (attributes.py) probes of its frozen features."""

from .alignment import AlignmentImages, fit_ridge, nme
from .attributes import AttributeImages
from .common import load_encoder
from .parsing import ParsingImages

__all__ = ["AlignmentImages", "AttributeImages", "ParsingImages", "fit_ridge", "load_encoder", "nme"]
