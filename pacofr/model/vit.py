"""ViT building blocks with timm's module and parameter names, attention through pacofr.ops.

`ViTEncoder`'s state dict loads with strict=True into timm's VisionTransformer of the same size
(`VisionTransformer(**timm_kwargs(cfg.model))`: class token, no classifier head): patch_embed.proj,
cls_token, pos_embed, blocks.{i}.norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2, norm.
It follows timm's conventions too: forward_features (tokens after the final norm), forward_head
(the pooled class token), forward (the two in turn), no_weight_decay (the names an optimizer
leaves undecayed).
"""


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import masked_attention_qkv

LAYER_NORM_EPS = 1e-6  # timm's ViT default


def sincos_pos_embed(dim: int, grid: tuple[int, int], cls_token: bool = True) -> Tensor:
    """2D sine-cosine position embedding [1, (1 +) L, dim], MAE's formula: the first half of
    the channels encodes the row, the second the column (MAE's own code puts the column
    first: the same table with its halves swapped); the class token position is zeros."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    gh, gw = grid
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def encode(pos):
        angles = pos.reshape(-1, 1) * freqs
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    emb = torch.cat([encode(ys), encode(xs)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()[None]


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)  # [B, L, D]


ATTN_IMPLS = ("pacofr", "sdpa")


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, seqlens: Tensor | None) -> Tensor:
    """PyTorch SDPA with the boolean mask equivalent to `seqlens` (for comparison), padded
    query rows zeroed as `masked_attention` does."""
    if seqlens is None:
        return F.scaled_dot_product_attention(q, k, v)
    valid = torch.arange(q.shape[2], device=q.device)[None, :] < seqlens[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
    return out * valid[:, None, :, None]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_impl: str = "pacofr"):
        super().__init__()
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        self.num_heads = num_heads
        self.attn_impl = attn_impl
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, seqlens: Tensor | None = None) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        return self.proj(self.attend(qkv, seqlens).reshape(b, n, c))

    def attend(self, qkv: Tensor, seqlens: Tensor | None) -> Tensor:
        """qkv [B, N, 3, H, d] -> [B, N, H, d] (pacofr.ops.apply_to_timm replaces this part)."""
        if self.attn_impl == "sdpa":
            return sdpa_attention(*qkv.permute(2, 0, 3, 1, 4), seqlens).transpose(1, 2)
        return masked_attention_qkv(qkv, seqlens=seqlens)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, attn_impl: str = "pacofr"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, attn_impl=attn_impl)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, seqlens: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), seqlens)
        return x + self.mlp(self.norm2(x))


def init_weights(module: nn.Module) -> None:
    """timm/MAE initialization: truncated normal linears, zero biases, unit LayerNorms; the
    patch projection like a linear layer (xavier over its flattened weight)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            nn.init.zeros_(m.bias)


class ViTEncoder(nn.Module):
    """ViT over a subset of patch tokens: `keep[B, N]` lists each image's visible patches
    packed to the front, `seqlens[B]` how many of them are real (the rest is padding).
    As timm's VisionTransformer with num_classes=0 and global_pool='token', `forward` gives the
    class token; `forward_features` all tokens."""

    num_classes = 0  # (no classifier head: timm's pooled features are the output)
    global_pool = "token"

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 attn_impl: str = "pacofr"):
        super().__init__()
        self.patch_size = patch_size
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.embed_dim = self.num_features = embed_dim  # (timm's name for the pooled width)
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed sin-cos positions (MAE); a parameter so the name matches timm's.
        self.pos_embed = nn.Parameter(sincos_pos_embed(embed_dim, self.grid), requires_grad=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, attn_impl) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        init_weights(self)
        nn.init.normal_(self.cls_token, std=0.02)

    @classmethod
    def from_config(cls, m) -> "ViTEncoder":
        """The encoder of `m`, a pacofr.config ModelConfig (`cfg.model`)."""
        e = m.encoder
        return cls(m.img_size, m.patch_size, m.in_chans, e.embed_dim, e.depth, e.num_heads, e.mlp_ratio, m.attn_impl)

    def no_weight_decay(self) -> set[str]:
        """Parameter names that take no weight decay (timm's convention; 1-d parameters neither)."""
        return {"pos_embed", "cls_token"}

    def forward_features(self, images: Tensor, keep: Tensor | None = None, seqlens: Tensor | None = None) -> Tensor:
        """[B, C, H, W] -> [B, 1 + N, D] after the final norm (class token first); all L patches
        when keep is None."""
        x = self.patch_embed(images) + self.pos_embed[:, 1:]
        if keep is not None:
            x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        lengths = None if seqlens is None else seqlens + 1
        for block in self.blocks:
            x = block(x, lengths)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens [B, 1 + N, D] -> the class token [B, D]. There is no classifier, so
        `pre_logits` gives the same (it is timm's signature)."""
        return x[:, 0]

    def forward(self, images: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, D], the pooled (class token) features of all patches."""
        return self.forward_head(self.forward_features(images))


class Decoder(nn.Module):
    """MAE-style decoder: encoder tokens scattered back to all L positions, a mask token at
    the others, position embeddings, blocks, and a linear head to each patch's pixels."""

    def __init__(self, grid: tuple[int, int], encoder_dim: int, embed_dim: int = 512, depth: int = 8,
                 num_heads: int = 16, mlp_ratio: float = 4.0, patch_dim: int = 768, attn_impl: str = "pacofr"):
        super().__init__()
        self.num_patches = grid[0] * grid[1]
        self.embed = nn.Linear(encoder_dim, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed(embed_dim, grid), requires_grad=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, attn_impl) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.pred = nn.Linear(embed_dim, patch_dim)
        init_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    @classmethod
    def from_config(cls, m) -> "Decoder":
        """The decoder of `m`, a pacofr.config ModelConfig (`cfg.model`), after its encoder."""
        d, grid = m.decoder, (m.img_size // m.patch_size, m.img_size // m.patch_size)
        return cls(grid, m.encoder.embed_dim, d.embed_dim, d.depth, d.num_heads, d.mlp_ratio,
                   m.patch_size**2 * m.in_chans, m.attn_impl)

    def no_weight_decay(self) -> set[str]:
        """Parameter names that take no weight decay (timm's convention; 1-d parameters neither)."""
        return {"pos_embed", "mask_token"}

    def forward(self, latent: Tensor, keep: Tensor, seqlens: Tensor) -> Tensor:
        """latent [B, 1 + N, De] from the encoder -> pixels [B, L, patch_dim]."""
        x = self.embed(latent)
        b, n, d = x.shape[0], keep.shape[1], x.shape[-1]
        real = torch.arange(n, device=keep.device)[None] < seqlens[:, None]
        # Padding goes to a spare slot L that is dropped: real tokens land on their patches.
        slot = torch.where(real, keep, self.num_patches)
        full = x.new_zeros(b, self.num_patches + 1, d).scatter(1, slot[..., None].expand(-1, -1, d), x[:, 1:])
        filled = torch.zeros(b, self.num_patches + 1, dtype=torch.bool, device=x.device).scatter(1, slot, True)
        tokens = torch.where(filled[:, :-1, None], full[:, :-1], self.mask_token.to(x.dtype))
        x = torch.cat([x[:, :1], tokens], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:]


def timm_kwargs(m) -> dict:
    """The keyword arguments of timm's VisionTransformer that match `ViTEncoder.from_config(m)`
    (its state dict loads strict): `VisionTransformer(**timm_kwargs(cfg.model))`, or
    `timm.create_model('vit_base_patch16_224', pretrained=False, **timm_kwargs(cfg.model))`
    (the arguments override the named architecture's sizes)."""
    e = m.encoder
    return dict(img_size=m.img_size, patch_size=m.patch_size, in_chans=m.in_chans, embed_dim=e.embed_dim,
                depth=e.depth, num_heads=e.num_heads, mlp_ratio=e.mlp_ratio, num_classes=0, global_pool="token")


def visible_index(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(keep[B, N], seqlens[B] int32): visible patch indices packed to the front in ascending
    order, N the largest visible count of the batch. int32 is what the attention kernel takes,
    so its lengths need no conversion in every block."""
    seqlens = (~mask).sum(1, dtype=torch.int32)
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
    return order[:, : int(seqlens.max()) if seqlens.numel() else 0], seqlens


__all__ = ["ViTEncoder", "Decoder", "Block", "Attention", "Mlp", "PatchEmbed", "sincos_pos_embed", "timm_kwargs",
           "visible_index"]
