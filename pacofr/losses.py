"""The PaCo-FR objective: L = L_pix + w_sc * L_sc + w_b * L_belief + w_c * L_commit.

The model returns what the terms need (each patch's predicted pixels, the masks, the Belief
Predictor's cross-entropy per searched patch and the commitment error per replaced patch);
here the patches are weighed, each term is averaged, and each term says what it averages over
(its normalizer). The normalizers depend on the masks alone, so training knows them before any
forward and can make every term a mean over the global batch, over micro-batches and ranks
(`share`)."""

import torch
from torch import Tensor

from .config import Config
from .masking import Masks
from .ops import patch_pixel_loss_normalizers, patch_pixel_loss_terms

TERMS = ("l_pix", "l_sc", "l_belief", "l_commit")


class PaCoFRLoss:
    def __init__(self, cfg: Config):
        self.cfg = cfg.loss
        self.patch_size = cfg.model.patch_size
        self.grid = (cfg.model.img_size // self.patch_size,) * 2

    def weights(self, incubating: bool) -> dict[str, float]:
        """Each term's weight in L; the commitment term starts after incubation."""
        c = self.cfg
        return {"l_pix": 1.0, "l_sc": c.w_sc, "l_belief": c.w_belief_incubation if incubating else c.w_belief,
                "l_commit": 0.0 if incubating else c.w_commit}

    def patch_weights(self, masks: Masks) -> Tensor:
        """[B, L] weight of each patch in L_pix (and of its border pairs in L_sc)."""
        c = self.cfg
        visible = ~masks.mask & ~masks.replace
        return masks.mask * c.weight_masked + masks.replace * c.weight_replaced + visible * c.weight_visible

    def normalizers(self, masks: Masks, searched: Tensor) -> Tensor:
        """[4] what each term of TERMS averages over in a batch with these masks: the patch
        weights, the border-pair weights, the patches the Belief Predictor searched
        (`searched[B, L]`, the model's choice), and the replaced ones among them."""
        sum_w, sum_pairs = patch_pixel_loss_normalizers(self.patch_weights(masks), self.grid)
        counts = torch.stack([searched.sum(), (searched & masks.replace).sum()]).float()
        return torch.cat([torch.stack([sum_w, sum_pairs]).float(), counts])

    def __call__(self, out: dict, images: Tensor, share: Tensor | None = None) -> dict[str, Tensor]:
        """The terms of TERMS (means over this batch) and `loss`, their weighted sum; with
        `share` [4], each term's share of the global normalizer, `loss` is this batch's part of
        the global batch's L."""
        c = self.cfg
        l_pix, l_sc = patch_pixel_loss_terms(out["pred"], images, self.patch_weights(out["masks"]), self.patch_size,
                                             c.norm_pix, c.eps, sc_weight=c.w_sc)
        terms = {"l_pix": l_pix, "l_sc": l_sc, "l_belief": _mean(out["belief_ce"]), "l_commit": _mean(out["commit"])}
        weights = self.weights(out["incubating"])
        parts = [weights[n] * terms[n].float() * (1 if share is None else share[j]) for j, n in enumerate(TERMS)]
        return {**terms, "loss": sum(parts)}


def _mean(x: Tensor) -> Tensor:
    """Mean that is 0 (not NaN) over an empty set."""
    return x.sum() / max(x.numel(), 1)
