"""A face recognition model: a pacofr encoder and insightface's embedding head.

    FaceRecognizer(encoder, EmbeddingHead(encoder.embed_dim, 512))(images) -> embeddings [B, 512]

The head is BatchNorm over the pooled (class token) feature, optional dropout, a linear map to
the embedding size and a last BatchNorm whose scale is fixed at 1 (insightface's `features`
layer: only its shift learns). The embeddings are not normalized: the margin softmax and the
verification metrics normalize them.

A fine-tuned model is saved (`save_recognizer`) as safetensors with the encoder under
`encoder.` and the head under `head.`, the encoder's config in the metadata as an exported
encoder's and the head's under `pacofr.head`: the file loads whole with `load_recognizer`, and
its encoder alone wherever pacofr takes encoder weights (load_encoder_weights keeps `encoder.`).
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from .vit import ViTEncoder
from .weights import check_fits, read_metadata, save_encoder, weights_config

HEAD_KEY = "pacofr.head"  # the metadata entry holding the head's sizes
BN_EPS = 1e-5


class EmbeddingHead(nn.Module):
    def __init__(self, in_dim: int, embedding_size: int = 512, dropout: float = 0.0):
        super().__init__()
        self.embedding_size, self.dropout_p = embedding_size, dropout
        self.bn = nn.BatchNorm1d(in_dim, eps=BN_EPS)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=BN_EPS)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.features(self.fc(self.dropout(self.bn(pooled))))


class FaceRecognizer(nn.Module):
    def __init__(self, encoder: ViTEncoder, head: EmbeddingHead):
        super().__init__()
        self.encoder, self.head = encoder, head

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()}

    def forward(self, images: Tensor) -> Tensor:
        """[B, 3, S, S] -> embeddings [B, E] (not normalized)."""
        return self.head(self.encoder(images))


def build_recognizer(cfg, embedding_size: int, dropout: float = 0.0) -> FaceRecognizer:
    """A recognizer over the encoder of `cfg.model` (randomly initialized)."""
    encoder = ViTEncoder.from_config(cfg.model)
    return FaceRecognizer(encoder, EmbeddingHead(encoder.embed_dim, embedding_size, dropout))


def save_recognizer(model: FaceRecognizer, path: str | Path, m, source=None, step: int | None = None) -> Path:
    """Writes the whole model (encoder and head, buffers included) with its config in the metadata."""
    head = {"embedding_size": model.head.embedding_size, "dropout": model.head.dropout_p}
    return save_encoder(model.state_dict(), path, m, source, step, metadata={HEAD_KEY: json.dumps(head)})


def load_recognizer(path: str | Path, device: torch.device | str = "cpu") -> FaceRecognizer:
    """The model `save_recognizer` wrote at `path`, built from the config in its metadata."""
    text = read_metadata(path).get(HEAD_KEY)
    if text is None:
        raise ValueError(f"'{path}' holds no recognition model (no {HEAD_KEY} in its metadata): an encoder alone "
                         f"loads with load_encoder_weights")
    head = json.loads(text)
    model = build_recognizer(weights_config(path), head["embedding_size"], head["dropout"])
    weights = load_file(str(path))
    check_fits(weights, model, Path(path), "the recognition model")
    model.load_state_dict(weights, strict=True)
    return model.to(device).eval()


__all__ = ["EmbeddingHead", "FaceRecognizer", "build_recognizer", "save_recognizer", "load_recognizer"]
