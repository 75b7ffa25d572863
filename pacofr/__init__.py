"""PaCo-FR: patch-pixel aligned end-to-end codebook learning for facial representation pretraining."""

__version__ = "0.1.0"
