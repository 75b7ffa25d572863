"""Downstream evaluation of a pretrained encoder: face alignment (alignment.py; in the
benchmarks' own files and protocols: formats.py, benchmarks.py), head pose (pose.py), face
parsing (parsing.py) and attribute (attributes.py) probes of its frozen features; overlay.py
draws a few predictions for a person to look at."""

from .alignment import AlignmentImages, fit_ridge, nme
from .attributes import AttributeImages
from .common import load_encoder
from .parsing import ParsingImages

__all__ = ["AlignmentImages", "AttributeImages", "ParsingImages", "fit_ridge", "load_encoder", "nme"]
