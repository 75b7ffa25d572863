"""Downstream evaluation of a pretrained encoder: the face alignment probe (alignment.py)."""

from .alignment import AlignmentImages, evaluate, fit_ridge, load_encoder, nme

__all__ = ["AlignmentImages", "evaluate", "fit_ridge", "load_encoder", "nme"]
