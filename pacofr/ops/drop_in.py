"""apply_to_timm: the attention of a timm VisionTransformer (and of pacofr's own blocks) swapped
in place for masked_attention, with the same parameters; ragged: per-sample lengths or a key
mask for the forwards inside it.

The swap changes each attention module's class to a subclass whose forward calls
`masked_attention_qkv` (`masked_attention` after timm's q/k norms) through the dispatch. No
parameter is copied or renamed: the state dict, the optimizer's parameters and a checkpoint
stay as they were. `restore_timm` swaps the classes back.
"""

import contextlib
import functools

import torch
from torch import Tensor, nn

from .masked_attention import masked_attention, masked_attention_qkv


class _Masked:
    """What every patched attention shares: its name in the model and the masks `ragged` gives
    it. The masks are an attribute of the module, not a context variable, which torch.compile
    could not trace without a graph break in every block."""

    _pacofr_name = "attention"
    _ragged_masks: tuple[Tensor | None, Tensor | None] = (None, None)

    def _refuse(self, what: str) -> None:
        raise ValueError(f"{self._pacofr_name}: {what}")


def _both(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return a if b is None else b if a is None else a & b


class _TimmForward(_Masked):
    """timm's Attention.forward on masked_attention: q/k norms, the output norm, the gate and the
    projection dropout as timm applies them. Its fused_attn flag chooses between two forms of
    the same attention, so it has nothing to honour here."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        seqlens, key_mask = self._ragged_masks
        b, n, _ = x.shape
        key_mask = _both(key_mask, self._key_mask_of(attn_mask, is_causal, b, n))
        if self.training and _attention_dropout(self):
            self._refuse(f"attn_drop p={_attention_dropout(self)} in training: masked_attention has no dropout "
                         "on attention weights; set it to 0")
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.qkv.out_features // (3 * self.num_heads))
        if _has_qk_norm(self):
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            x = masked_attention(self.q_norm(q), self.k_norm(k), v, seqlens, key_mask, self.scale).transpose(1, 2)
        else:
            x = masked_attention_qkv(qkv, seqlens, key_mask, self.scale)
        x = x.reshape(b, n, -1)
        if getattr(self, "norm", None) is not None:
            x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    def _key_mask_of(self, attn_mask: Tensor | None, is_causal: bool, b: int, n: int) -> Tensor | None:
        """timm's attn_mask as masked_attention's key_mask: only a boolean [B or 1, 1, 1, N]
        (SDPA's key padding form, True = attend) is one."""
        if is_causal:
            self._refuse("is_causal=True: masked_attention has no causal mask; call the unpatched model")
        if attn_mask is None:
            return None
        shape = tuple(attn_mask.shape)
        if attn_mask.dtype != torch.bool or len(shape) != 4 or shape[0] not in (1, b) or shape[1:] != (1, 1, n):
            self._refuse(f"attn_mask {attn_mask.dtype} {list(shape)}: only a boolean key mask [B, 1, 1, N] "
                         "(True = attend) runs on masked_attention; give that, or key_mask to pacofr.ops.ragged")
        return attn_mask[:, 0, 0].expand(b, n)


class _PacofrForward(_Masked):
    """pacofr's Attention (either attn_impl) on masked_attention_qkv, with the masks of `ragged`."""

    def attend(self, qkv: Tensor, seqlens: Tensor | None) -> Tensor:
        given, key_mask = self._ragged_masks
        if seqlens is not None and given is not None:
            self._refuse("seqlens given twice, by the model's forward and by pacofr.ops.ragged: give one")
        return masked_attention_qkv(qkv, seqlens if seqlens is not None else given, key_mask)


def _attention_dropout(module: nn.Module) -> float:
    drop = getattr(module, "attn_drop", None)
    return float(getattr(drop, "p", 0.0))


def _has_qk_norm(module: nn.Module) -> bool:
    return any(not isinstance(getattr(module, name, None), (nn.Identity, type(None))) for name in ("q_norm", "k_norm"))


def _known() -> dict[type, tuple[str, type]]:
    """{attention class apply_to_timm swaps: (its patched class's name, the forward it gets)}.
    Imported here: pacofr.model imports pacofr.ops, and timm is optional."""
    from ..model.vit import Attention

    known = {Attention: ("MaskedPacofrAttention", _PacofrForward)}
    try:
        from timm.models.vision_transformer import Attention as TimmAttention
    except ImportError:
        return known
    known[TimmAttention] = ("MaskedTimmAttention", _TimmForward)
    return known


@functools.cache
def _patched(name: str) -> type:
    base, forward = next((base, forward) for base, (n, forward) in _known().items() if n == name)
    doc = f"{base.__name__} running masked_attention (pacofr.ops.apply_to_timm)."
    return type(name, (forward, base), {"__module__": __name__, "__qualname__": name, "__doc__": doc})


def __getattr__(name: str) -> type:
    # (pickle finds the patched classes by name, so a pickled patched model loads)
    if name in ("MaskedPacofrAttention", "MaskedTimmAttention"):
        return _patched(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _looks_like_attention(module: nn.Module) -> bool:
    name = type(module).__name__
    return "Attention" in name or "Attn" in name


def _check(model: nn.Module, known: dict) -> list[tuple[str, nn.Module]]:
    """The attention modules to swap, or a ValueError naming the first module whose attention
    the swap would leave unpatched or could not honour."""
    names = ", ".join(f"{c.__module__}.{c.__qualname__}" for c in known)
    modules = [(name or type(model).__name__, module) for name, module in model.named_modules()]
    found = []
    for name, module in modules:
        cls = type(module)
        if cls in known:
            if _attention_dropout(module):
                raise ValueError(f"apply_to_timm: {name}.attn_drop has p={_attention_dropout(module)}: "
                                 "masked_attention has no dropout on attention weights; build the model with "
                                 "attn_drop_rate=0")
            found.append((name, module))
        elif _looks_like_attention(module) and not isinstance(module, _Masked):
            raise ValueError(f"apply_to_timm: {name} is {cls.__module__}.{cls.__qualname__}, an attention it does not "
                             f"know (it swaps {names}); nothing was changed")
    for name, module in modules:  # then attention that no class name gives away (in a block's own forward)
        if name.split(".")[-1] == "blocks" and isinstance(module, (nn.Sequential, nn.ModuleList)):
            for i, block in enumerate(module):
                if not any(type(m) in known or isinstance(m, _Masked) for m in block.modules()):
                    raise ValueError(f"apply_to_timm: {name}.{i} is a {type(block).__name__} without an attention it "
                                     f"knows ({names}); nothing was changed")
    if not found and not any(isinstance(m, _Masked) for m in model.modules()):
        raise ValueError(f"apply_to_timm: {type(model).__name__} holds no attention it knows ({names})")
    return found


def apply_to_timm(model: nn.Module) -> nn.Module:
    """Swaps, in place, every attention of `model` that is timm's ViT `Attention` or pacofr's
    (pacofr.model.vit) for one that runs `masked_attention` through the dispatch, reusing its
    parameters (state dict keys unchanged). Returns `model`. Applying it twice changes nothing.

    A patched timm attention honours qk_norm, the output norm (scale_attn_norm), the gate and
    proj_drop, and takes timm's `attn_mask` when it is a boolean key mask [B, 1, 1, N]; give
    per-sample lengths with `ragged`. Refused, in one line, before anything changes: an
    attention class it does not know (timm's RoPE, pooling or parallel-block attentions, a
    subclass), a block without a known attention, attention dropout (attn_drop_rate > 0);
    and at forward: is_causal, any other attn_mask. `restore_timm(model)` undoes it.
    """
    known = _known()
    for name, module in _check(model, known):
        module.__class__ = _patched(known[type(module)][0])
        module._pacofr_name = name
    return model


def restore_timm(model: nn.Module) -> nn.Module:
    """Undoes `apply_to_timm` in place: every patched attention gets its class back. Returns `model`."""
    for module in model.modules():
        if isinstance(module, _Masked):
            module.__class__ = type(module).__bases__[-1]
            for attribute in ("_pacofr_name", "_ragged_masks"):
                module.__dict__.pop(attribute, None)
    return model


@contextlib.contextmanager
def ragged(model: nn.Module, seqlens: Tensor | None = None, key_mask: Tensor | None = None):
    """Inside, every attention of `model` patched by `apply_to_timm` takes `seqlens[B]` (the first
    seqlens[b] tokens of sample b are real, the rest padding: zero attention output, zero
    gradient) and/or `key_mask[B, N]` (bool, True = the key takes part), as `masked_attention`
    does. N is the length of the token sequence the blocks see (class token included). Other
    models' attention is untouched; an inner context replaces an outer one for its model. Not
    for one model running in several threads at once with different masks.

        apply_to_timm(vit)
        with ragged(vit, seqlens=visible + 1):   # an MAE encoder: visible tokens padded to the longest
            x = vit.norm(vit.blocks(tokens))

    Refused under activation checkpointing (timm's set_grad_checkpointing) with gradients on:
    the blocks would be recomputed in the backward, outside this context.
    """
    patched = [m for m in model.modules() if isinstance(m, _Masked)]
    if not patched:
        raise ValueError(f"ragged: {type(model).__name__} has no attention patched by pacofr.ops.apply_to_timm: "
                         "apply it first")
    if torch.is_grad_enabled() and any(getattr(m, "grad_checkpointing", False) for m in model.modules()):
        raise ValueError(f"ragged: {type(model).__name__} has grad_checkpointing on: its blocks would be recomputed "
                         "outside this context; turn it off, or pass a key mask as attn_mask to forward_features")
    outer = [m.__dict__.get("_ragged_masks") for m in patched]
    for m in patched:
        m._ragged_masks = (seqlens, key_mask)
    try:
        yield model
    finally:
        for m, masks in zip(patched, outer):
            if masks is None:
                del m._ragged_masks
            else:
                m._ragged_masks = masks


__all__ = ["apply_to_timm", "restore_timm", "ragged"]
