from .pretrain import NonFiniteLossError, pretrain

__all__ = ["pretrain", "NonFiniteLossError"]
