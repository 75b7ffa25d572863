"""Downstream evaluation of a pretrained encoder: face alignment (alignment.py; in the
benchmarks' own files and protocols: formats.py, benchmarks.py), head pose (pose.py), face
parsing (parsing.py) and attribute (attributes.py) probes of its frozen features, face
verification (verification.py: insightface's .bin sets and LFW; ijb.py: IJB-B/C 1:1); overlay.py
draws a few predictions for a person to look at."""

from .alignment import AlignmentImages, fit_ridge, nme
from .attributes import AttributeImages
from .common import load_encoder
from .parsing import ParsingImages
from .verification import embed, evaluate_bin, load_bin, tar_at_far, verification_metrics

__all__ = ["AlignmentImages", "AttributeImages", "ParsingImages", "embed", "evaluate_bin", "fit_ridge", "load_bin",
           "load_encoder", "nme", "tar_at_far", "verification_metrics"]
