"""PaCo-FR: replace some visible patches with codebook mixtures, encode the visible tokens, and
decode every patch's pixels; pacofr.losses scores them."""

import torch
from torch import Tensor, nn

from ..config import Config
from ..masking import Masks, structured_masks
from ..ops import codebook_topk
from .codebook import BeliefPredictor, PixelCodebook, belief_loss, mix_candidates, nearest_codes
from .patches import patchify, unpatchify
from .vit import Decoder, ViTEncoder, visible_index


class PaCoFR(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        m = cfg.model
        self.patch_size = m.patch_size
        patch_dim = m.patch_size**2 * m.in_chans
        self.encoder = ViTEncoder.from_config(m)
        self.decoder = Decoder.from_config(m)
        cb = m.codebook
        self.codebook = PixelCodebook(cb.num_codes, patch_dim, cb.belief_dim, cb.ema_decay, cb.dead_code_threshold)
        self.belief = BeliefPredictor(patch_dim, cb.belief_hidden, cb.belief_dim)
        self.incubating = True

    def set_incubation(self, on: bool) -> None:
        """Incubation (the first epoch by default): the Belief Predictor learns to point at each
        patch's nearest code, codes follow an EMA of their patches, and replacements are fixed
        inputs. After it, codes and predictor learn end to end through the reconstruction."""
        self.incubating = bool(on)

    def replace_patches(self, patches: Tensor, masks: Masks, generator=None) -> tuple[Tensor, Tensor, Tensor]:
        """(patches with the replace set swapped for codebook mixtures, the Belief Predictor's
        cross-entropy per searched patch, the commitment error per replaced one).

        During incubation the predictor is trained on every visible patch; after it, on the
        replaced ones only."""
        cb = self.cfg.model.codebook
        rows = self.search_rows(masks)
        src = patches[rows]  # [M, P]
        if self.incubating and self.training:
            self.codebook.init_from(src.detach(), generator)
        codes, keys = self.codebook.codes, self.codebook.keys
        belief = self.belief(src)
        scores, idx = codebook_topk(belief, keys, cb.topk, "ip")
        with torch.no_grad():
            target = nearest_codes(src.float(), codes.float())
        l_belief = belief_loss(belief, scores, idx, keys, target, cb.temperature)
        if self.incubating:
            # Fixed corruption: no reconstruction gradient reaches codes or predictor yet.
            mixed = mix_candidates(scores.detach(), idx, codes.detach(), cb.temperature, cb.mixing, generator)
            if self.training:
                self.codebook.ema_update(src.detach().float(), target, generator)
        else:
            mixed = mix_candidates(scores, idx, codes, cb.temperature, cb.mixing, generator)

        is_replaced = masks.replace[rows]
        l_commit = ((mixed - src.detach().float()) ** 2).mean(-1)[is_replaced]
        full = patches.float().masked_scatter(rows[..., None].expand_as(patches), mixed)
        out = torch.where(masks.replace[..., None], full, patches.float()).to(patches.dtype)
        return out, l_belief, l_commit

    @torch.no_grad()
    def start_step(self, images: list[Tensor], masks: list[Masks], generator=None) -> None:
        """Before the forwards of a step's micro-batches (training, incubation): the code table
        is initialized from all their patches, and the EMA steps of their forwards wait for
        `finish_step`, which makes one over all of them; so the step makes the updates of one
        forward over their union (each forward still searches the table as the step found it).
        Until then the codebook keeps each forward's visible patches (restarts draw from them)."""
        if not (self.incubating and self.training):
            return
        if not bool(self.codebook.initialized):
            p, device = self.patch_size, self.codebook.ema_sum.device
            chunks = [patchify(im.to(device), p)[self.search_rows(m.to(device))] for im, m in zip(images, masks)]
            self.codebook.init_from(chunks, generator)
        self.codebook.defer_ema()

    def finish_step(self, generator=None) -> None:
        """The EMA step of the micro-batches since `start_step` (every rank calls it)."""
        self.codebook.flush_ema(generator)

    def search_rows(self, masks: Masks) -> Tensor:
        """The patches the Belief Predictor sees: every visible one during incubation, the
        replaced ones after it."""
        return ~masks.mask if self.incubating else masks.replace

    def forward(self, images: Tensor, landmarks: Tensor | None = None, masks: Masks | None = None,
                generator: torch.Generator | None = None) -> dict:
        """images [B, C, H, W] normalized; landmarks [B, 5|68, 2] in pixels or None; masks from
        the data pipeline or drawn here. Returns the masks, `pred` [B, L, p*p*C],
        `input`, the image the encoder saw (masked patches still in it, replaced ones swapped), and
        what pacofr.losses.PaCoFRLoss scores."""
        b, _, h, w = images.shape
        p = self.patch_size
        if masks is None:
            masks = structured_masks(b, (h, w), p, self.cfg.masking, landmarks, generator, images.device)
        patches = patchify(images, p)
        replaced, l_belief, l_commit = self.replace_patches(patches, masks, generator)
        encoder_input = unpatchify(replaced, p, h, w)

        keep, seqlens = visible_index(masks.mask)
        latent = self.encoder.forward_features(encoder_input, keep, seqlens)
        pred = self.decoder(latent, keep, seqlens)

        return {"pred": pred, "input": encoder_input, "masks": masks, "mask": masks.mask, "replace": masks.replace,
                "belief_ce": l_belief, "commit": l_commit, "incubating": self.incubating}

    def no_weight_decay(self) -> set[str]:
        """Parameter names kept out of weight decay (timm's convention; 1-d parameters are out
        too): tokens, position tables and the code tables."""
        return {f"{part}.{n}" for part in ("encoder", "decoder") for n in getattr(self, part).no_weight_decay()} | {
            f"codebook.{n}" for n, _ in self.codebook.named_parameters()}
