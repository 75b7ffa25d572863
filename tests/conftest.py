import os
import sys
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

# Without a GPU the Triton kernels run in the interpreter (set before triton is first imported).
# Model and training tests use the fast torch references unless a test forces a backend; the
# op tests run every backend.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("PACOFR_OPS", "reference")


def _stub_torchvision_for_timm() -> None:
    """timm imports torchvision at import time (data transforms, FrozenBatchNorm2d), but PyPI's
    torchvision wheels are CUDA builds that cannot load beside CPU torch. The ViT parity test
    uses only timm's model code, which never calls torchvision: placeholders let timm import.
    A working torchvision, where installed, is used as is."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional",
                     "torchvision.ops", "torchvision.ops.misc", "torchvision.datasets",
                     "torchvision.models", "torchvision.models.feature_extraction"):
            sys.modules[name] = mock.MagicMock(name=name)


_stub_torchvision_for_timm()


@pytest.fixture(scope="session")
def faces64():
    """8 real faces (scikit-image's LFW subset, 25 x 25 gray), resized to 64 px, RGB,
    normalized to zero mean / unit spread."""
    data = pytest.importorskip("skimage.data", reason="scikit-image is not installed (the GPU machines lack it)")

    faces = torch.from_numpy(data.lfw_subset()[:8]).float()
    x = F.interpolate(faces[:, None], size=64, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    return ((x - 0.45) / 0.25).contiguous()


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A tiny pacofr encoder file (seed 0), its config in the metadata as a run writes it."""
    from pacofr.config import load_config
    from pacofr.model import PaCoFR, save_encoder

    torch.manual_seed(0)
    cfg = load_config("tiny")
    return save_encoder(PaCoFR(cfg).encoder.state_dict(), tmp_path_factory.mktemp("enc") / "encoder.safetensors",
                        cfg.model)
