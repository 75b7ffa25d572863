"""PaCo-FR: replace some visible patches with codebook mixtures, encode the visible tokens,
decode every patch's pixels, and score them with the patch-pixel alignment losses."""

import torch
from torch import Tensor, nn

from ..config import Config
from ..masking import Masks, structured_masks
from ..ops import codebook_topk, patch_pixel_loss_normalizers, patch_pixel_loss_terms
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
        self.encoder = ViTEncoder(m.img_size, m.patch_size, m.in_chans, m.encoder.embed_dim, m.encoder.depth,
                                  m.encoder.num_heads, m.encoder.mlp_ratio, m.attn_impl)
        self.decoder = Decoder(self.encoder.grid, m.encoder.embed_dim, m.decoder.embed_dim, m.decoder.depth,
                               m.decoder.num_heads, m.decoder.mlp_ratio, patch_dim, m.attn_impl)
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
        """(patches with the replace set swapped for codebook mixtures, l_belief, l_commit; the
        rows each loss averages over are in `loss_norms`).

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
        return out, _mean(l_belief), _mean(l_commit)

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

    def updated_in_place(self) -> list[tuple[nn.Parameter, Tensor]]:
        """(parameter, value) for what the last training forward wrote in place, outside the
        optimizer: the code table during incubation (initialization, EMA steps, restarts). An
        optimizer that keeps its own copy of the parameters (ZeRO) must take these values over."""
        written = self.codebook.take_written()
        return [] if written is None else [(self.codebook.codes, written)]

    def direct_parameters(self) -> list[nn.Parameter]:
        """Parameters that the forward reads outside their own module's forward: the code
        tables, which the fused ops take as tensors (ZeRO-3 gathers these with this module's)."""
        return [self.codebook.codes, self.codebook.keys]

    def search_rows(self, masks: Masks) -> Tensor:
        """The patches the Belief Predictor sees: every visible one during incubation, the
        replaced ones after it."""
        return ~masks.mask if self.incubating else masks.replace

    def patch_weights(self, masks: Masks) -> Tensor:
        lc = self.cfg.loss
        visible = ~masks.mask & ~masks.replace
        return masks.mask * lc.weight_masked + masks.replace * lc.weight_replaced + visible * lc.weight_visible

    def forward(self, images: Tensor, landmarks: Tensor | None = None, masks: Masks | None = None,
                generator: torch.Generator | None = None) -> dict:
        """images [B, C, H, W] normalized; landmarks [B, 5|68, 2] in pixels or None; masks from
        the data pipeline or drawn here. Returns the losses, the masks, `pred` [B, L, p*p*C]
        and `input`, the image the encoder saw (masked patches still in it, replaced ones swapped)."""
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

        lc = self.cfg.loss
        weight = self.patch_weights(masks)
        l_pix, l_sc = patch_pixel_loss_terms(pred, images, weight, p, lc.norm_pix, lc.eps, sc_weight=lc.w_sc)
        terms = {"l_pix": l_pix, "l_sc": l_sc, "l_belief": l_belief, "l_commit": l_commit}
        loss = sum(w * terms[name] for name, w in self.loss_weights().items())
        return {
            "loss": loss, "l_pix": l_pix, "l_sc": l_sc, "l_belief": l_belief, "l_commit": l_commit,
            "mask": masks.mask, "replace": masks.replace, "pred": pred, "input": encoder_input,
            "weights": self.loss_weights(),
        }

    def loss_weights(self) -> dict[str, float]:
        lc = self.cfg.loss
        return {"l_pix": 1.0, "l_sc": lc.w_sc, "l_belief": lc.w_belief_incubation if self.incubating else lc.w_belief,
                "l_commit": 0.0 if self.incubating else lc.w_commit}  # (commitment: after incubation)

    def loss_norms(self, masks: Masks) -> dict[str, Tensor]:
        """What each loss term is averaged over in a batch with these masks (they alone decide
        it, so it is known before the forward): training sums these over micro-batches and
        ranks so that every term is a mean over the global batch."""
        sum_w, sum_pairs = patch_pixel_loss_normalizers(self.patch_weights(masks), self.encoder.grid)
        rows = self.search_rows(masks)
        counts = torch.stack([rows.sum(), (rows & masks.replace).sum()]).float()
        return {"l_pix": sum_w, "l_sc": sum_pairs, "l_belief": counts[0], "l_commit": counts[1]}


def _mean(x: Tensor) -> Tensor:
    """Mean that is 0 (not NaN) over an empty set."""
    return x.sum() / max(x.numel(), 1)
