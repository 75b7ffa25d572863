"""apply_to_timm against the unpatched models, at odd shapes (48 px, patch 16, 3 heads of 16,
class token): a timm ViT's outputs and every gradient (parameters and images) on full batches;
ragged batches against timm run on each sample's own tokens (lengths) and against SDPA with the
same boolean mask (key masks); pacofr's own encoder; fp32 and bf16 autocast, on each backend
(Triton runs in the interpreter without a GPU: the shapes are tiny); torch.compile. Then what
the swap keeps (parameters, state dict, pickling), its undo, and every refusal in one line."""

import copy
import pickle

import pytest
import torch
from torch import nn

from pacofr.model import ViTEncoder, visible_index
from pacofr.ops import apply_to_timm, ragged, restore_timm

from .utils import BF16, F32, assert_close_scaled, backends_of

timm_vit = pytest.importorskip("timm.models.vision_transformer")

BACKENDS = backends_of("masked_attention")
TOL = {F32: 1e-4, BF16: 3e-2}  # max|err| / max|ref|: bf16 rounds every activation of two blocks
SIZES = dict(img_size=48, patch_size=16, embed_dim=48, depth=2, num_heads=3)
B, TOKENS = 3, 1 + 9


def _vit(**kwargs):
    torch.manual_seed(0)
    return timm_vit.VisionTransformer(**{**SIZES, "num_classes": 5, **kwargs}).eval()


def _pair(**kwargs):
    """(timm's model, a patched deep copy of it)."""
    ref = _vit(**kwargs)
    return ref, apply_to_timm(copy.deepcopy(ref))


CASES = [pytest.param(b, d, id=f"{b}-{'fp32' if d == F32 else 'bf16'}") for b in BACKENDS for d in (F32, BF16)]


def _images(seed=1):
    return torch.randn(B, 3, 48, 48, generator=torch.Generator().manual_seed(seed))


def _cotangent(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _backward(model, images, dtype, forward):
    """(output, images' gradient, {parameter: gradient}) of sum(output * a fixed cotangent),
    output = forward(model, images) in fp32 (under bf16 autocast for bf16)."""
    model.zero_grad(set_to_none=True)
    images = images.clone().requires_grad_()
    with torch.autocast("cpu", dtype=BF16, enabled=dtype == BF16):
        out = forward(model, images).float()
    (out * _cotangent(out.shape, seed=7)).sum().backward()
    return out.detach(), images.grad, {n: p.grad for n, p in model.named_parameters()}


def _assert_same(got, want, tol):
    (out, dimages, grads), (ref_out, ref_dimages, ref_grads) = got, want
    assert_close_scaled(out, ref_out, tol, "output")
    assert_close_scaled(dimages, ref_dimages, tol, "images' gradient")
    assert grads.keys() == ref_grads.keys()
    # a gradient that is zero in exact arithmetic (k_norm's bias: softmax ignores a shift of
    # all scores) is rounding noise: it is compared at a hundredth of the largest one's scale
    floor = max(g.abs().max().item() for g in ref_grads.values() if g is not None) / 100
    for name, ref in ref_grads.items():
        if ref is None:
            assert grads[name] is None, name
        else:
            assert_close_scaled(grads[name], ref, tol, name, floor=floor)


def _masked_attention_calls(run) -> list[str]:
    """The pacofr ops a patched model's attention calls while run() runs: proof that the
    patched forward ran through them (whichever backend the dispatch then picks)."""
    from pacofr.ops import drop_in

    calls, originals = [], {name: getattr(drop_in, name) for name in ("masked_attention", "masked_attention_qkv")}

    def counting(name):
        def call(*args, **kwargs):
            calls.append(name)
            return originals[name](*args, **kwargs)
        return call

    try:
        for name in originals:
            setattr(drop_in, name, counting(name))
        run()
    finally:
        for name, fn in originals.items():
            setattr(drop_in, name, fn)
    return calls


def _features_and_logits(model, images, **kwargs):
    tokens = model.forward_features(images, **kwargs)
    return torch.cat([tokens.flatten(1), model.forward_head(tokens)], dim=1)


@pytest.mark.parametrize("backend, dtype", CASES)
def test_patched_vit_matches_timm(use_backend, backend, dtype):
    use_backend(backend)
    ref, model = _pair()
    images = _images()
    _assert_same(_backward(model, images, dtype, _features_and_logits),
                 _backward(ref, images, dtype, _features_and_logits), TOL[dtype])
    assert _masked_attention_calls(lambda: model.forward_features(images)) == ["masked_attention_qkv"] * 2


def test_qk_norm_output_norm_and_dropouts_match_timm_in_training(use_backend):
    """qk_norm (masked_attention after timm's norms), scale_attn_norm, and proj_drop / drop_path
    drawing the same random masks as timm's from the same seed."""
    use_backend("reference")
    ref, model = _pair(qk_norm=True, scale_attn_norm=True, proj_drop_rate=0.25, drop_path_rate=0.3)
    ref.train(), model.train()

    def seeded(m, images, seed=5):
        torch.manual_seed(seed)
        return _features_and_logits(m, images)

    images = _images()
    got, want = _backward(model, images, F32, seeded), _backward(ref, images, F32, seeded)
    _assert_same(got, want, TOL[F32])
    other = seeded(model, images, seed=6)
    assert not torch.allclose(other, got[0], atol=1e-2)  # (the dropouts did drop)
    assert _masked_attention_calls(lambda: seeded(model, images, seed=6)) == ["masked_attention"] * 2


def test_gated_attention_matches_timm():
    """timm's attention options beyond what VisionTransformer exposes, on the module itself."""
    kwargs = dict(dim=48, num_heads=3, qkv_bias=True, qk_norm=True, scale_norm=True, norm_layer=nn.LayerNorm)
    try:
        torch.manual_seed(0)
        ref = timm_vit.Attention(**kwargs, gated=True)
    except TypeError:
        pytest.skip("this timm's Attention has no gate")
    model = apply_to_timm(copy.deepcopy(ref))
    x = torch.randn(B, TOKENS, 48, generator=torch.Generator().manual_seed(2))
    _assert_same(_backward(model, x, F32, lambda m, x: m(x)), _backward(ref, x, F32, lambda m, x: m(x)), TOL[F32])


def _visible(seed):
    """keep [B, TOKENS]: the class token (0) then the patch tokens in a random order, and
    seqlens [B]: how many of them are visible (the rest: real tokens standing in as padding)."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(9, generator=gen)])
                        for _ in range(B)])
    return keep, torch.tensor([TOKENS, 4, 7], dtype=torch.int32)


def _encode(model, images, keep):
    """An MAE-style encoder over the kept tokens (padded batch or one sample)."""
    x = model._pos_embed(model.patch_embed(images))
    x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
    return model.norm(model.blocks(x))


@pytest.mark.parametrize("backend, dtype", CASES)
def test_ragged_lengths_match_timm_on_each_samples_own_tokens(use_backend, backend, dtype):
    use_backend(backend)
    ref, model = _pair()
    images = _images()
    keep, seqlens = _visible(seed=3)
    valid = (torch.arange(TOKENS)[None] < seqlens[:, None])[..., None]

    def padded(m, images):
        with ragged(m, seqlens=seqlens):
            return _encode(m, images, keep) * valid  # (the loss sees real tokens only)

    def one_by_one(m, images):
        rows = [_encode(m, images[b : b + 1], keep[b : b + 1, : seqlens[b]])[0] for b in range(B)]
        return torch.stack([torch.cat([r, r.new_zeros(TOKENS - len(r), r.shape[1])]) for r in rows])

    _assert_same(_backward(model, images, dtype, padded), _backward(ref, images, dtype, one_by_one), TOL[dtype])
    # the context is gone after the block: the padding counts again
    assert not torch.allclose(_encode(model, images, keep)[1, :4], padded(model, images)[1, :4], atol=1e-3)


def test_torch_compile_traces_the_patched_model_whole_and_follows_ragged(use_backend):
    """fullgraph=True: no graph break (the masks are module attributes, not a context
    variable); each ragged batch then gives the eager result, without a recompile per batch."""
    use_backend("reference")
    _, model = _pair()
    compiled = torch.compile(model.forward_features, backend="aot_eager", fullgraph=True)
    images = _images()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for lengths in ([TOKENS, 4, 7], [2, TOKENS, 5], None):
            seqlens = None if lengths is None else torch.tensor(lengths, dtype=torch.int32)
            with ragged(model, seqlens=seqlens):
                got, want = compiled(images), model.forward_features(images)
            assert_close_scaled(got, want, TOL[F32], f"tokens {lengths}")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs <= 2  # (with and without lengths)


def _key_mask(seed):
    mask = torch.rand(B, TOKENS, generator=torch.Generator().manual_seed(seed)) < 0.6
    mask[:, 0] = True  # (every query keeps a key: SDPA gives NaN otherwise)
    return mask


@pytest.mark.parametrize("backend, dtype", CASES)
def test_key_masks_match_sdpa_with_the_boolean_mask(use_backend, backend, dtype):
    """A key mask given by `ragged` or as timm's attn_mask [B, 1, 1, N], against timm with that
    attn_mask (SDPA's boolean mask)."""
    use_backend(backend)
    ref, model = _pair()
    images, mask = _images(), _key_mask(seed=4)
    attn_mask = mask[:, None, None, :]

    def in_context(m, images):
        with ragged(m, key_mask=mask):
            return _features_and_logits(m, images)

    want = _backward(ref, images, dtype, lambda m, x: _features_and_logits(m, x, attn_mask=attn_mask))
    _assert_same(_backward(model, images, dtype, in_context), want, TOL[dtype])
    _assert_same(_backward(model, images, dtype, lambda m, x: _features_and_logits(m, x, attn_mask=attn_mask)), want,
                 TOL[dtype])


def test_pacofr_encoder_patched_matches_its_sdpa_form_and_timm(use_backend):
    """pacofr's ViTEncoder (attn_impl=sdpa) patched: its own ragged forward against the SDPA
    form, outputs and every gradient; a key mask from `ragged` against timm with attn_mask."""
    use_backend("reference")
    torch.manual_seed(0)
    ref = ViTEncoder(**SIZES, attn_impl="sdpa").eval()
    model = apply_to_timm(copy.deepcopy(ref))
    images = _images()
    visible = torch.rand(B, 9, generator=torch.Generator().manual_seed(5)) < torch.tensor([[0.9], [0.3], [0.6]])
    keep, seqlens = visible_index(~visible)
    assert len(set(seqlens.tolist())) == B

    def forward(m, images):
        return m.forward_features(images, keep, seqlens)

    _assert_same(_backward(model, images, F32, forward), _backward(ref, images, F32, forward), TOL[F32])
    assert _masked_attention_calls(lambda: forward(model, images)) == ["masked_attention_qkv"] * 2

    timm_model = timm_vit.VisionTransformer(**SIZES, num_classes=0, global_pool="token").eval()
    timm_model.load_state_dict(model.state_dict(), strict=True)
    mask = _key_mask(seed=6)
    with torch.no_grad(), ragged(model, key_mask=mask):
        got = model.forward_features(images)
    with torch.no_grad(), ragged(model, seqlens=seqlens + 1):
        with pytest.raises(ValueError, match=r"^blocks\.0\.attn: seqlens given twice, by the model's forward and by"):
            forward(model, images)
    want = timm_model.forward_features(images, attn_mask=mask[:, None, None, :])
    assert_close_scaled(got, want, TOL[F32], "tokens")


def test_the_swap_keeps_the_parameters_and_undoes():
    ref, model = _pair()
    before = copy.deepcopy(model)
    params = dict(model.named_parameters())
    assert apply_to_timm(model) is model  # (twice: nothing changes)
    assert type(model.blocks[0].attn).__name__ == "MaskedTimmAttention"
    assert isinstance(model.blocks[0].attn, timm_vit.Attention)
    assert list(model.state_dict()) == list(ref.state_dict())
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(torch.equal(p, ref.state_dict()[n]) for n, p in model.state_dict().items())
    images = _images()
    with torch.no_grad():
        out = model(images)
        loaded = pickle.loads(pickle.dumps(model))  # (torch.save of the whole model)
        assert type(loaded.blocks[1].attn) is type(model.blocks[1].attn)
        assert torch.equal(loaded(images), out)
        assert torch.equal(before(images), out)
        assert restore_timm(model) is model
        assert type(model.blocks[0].attn) is timm_vit.Attention and "_pacofr_name" not in vars(model.blocks[0].attn)
        assert torch.equal(model(images), ref(images))


class LocalAttention(timm_vit.Attention):
    pass


def _inside(model, call, **masks):
    with ragged(model, **masks):
        return call()


def _refusals():
    """(what to do, the start of its one-line error)."""
    ref, model = _pair()
    x = _images()
    unknown = _vit()
    unknown.blocks[1].attn = LocalAttention(48, num_heads=3, qkv_bias=True)
    dropping = _pair()[1].train()
    dropping.blocks[0].attn.attn_drop.p = 0.1
    checkpointed = _pair()[1]
    checkpointed.set_grad_checkpointing(True)
    return [
        (lambda: apply_to_timm(unknown), f"apply_to_timm: blocks.1.attn is {__name__}.LocalAttention, an attention "
         "it does not know (it swaps pacofr.model.vit.Attention, timm.layers.attention.Attention); nothing was changed"),
        (lambda: apply_to_timm(_vit(block_fn=timm_vit.ParallelScalingBlock)),
         "apply_to_timm: blocks.0 is a ParallelScalingBlock without an attention it knows"),
        (lambda: apply_to_timm(_vit(global_pool="map")), "apply_to_timm: attn_pool is timm.layers.attention_pool."),
        (lambda: apply_to_timm(_vit(attn_drop_rate=0.1)), "apply_to_timm: blocks.0.attn.attn_drop has p=0.1: "),
        (lambda: apply_to_timm(nn.Linear(2, 2)), "apply_to_timm: Linear holds no attention it knows"),
        (lambda: model.forward_features(x, is_causal=True), "blocks.0.attn: is_causal=True: "),
        (lambda: model.forward_features(x, attn_mask=torch.zeros(B, 1, TOKENS, TOKENS)),
         "blocks.0.attn: attn_mask torch.float32 [3, 1, 10, 10]: only a boolean key mask [B, 1, 1, N]"),
        (lambda: model.forward_features(x, attn_mask=torch.ones(B, 1, TOKENS, TOKENS, dtype=torch.bool)),
         "blocks.0.attn: attn_mask torch.bool [3, 1, 10, 10]: "),
        (lambda: dropping(x), "blocks.0.attn: attn_drop p=0.1 in training: "),
        (lambda: _inside(ref, lambda: ref(x)), "ragged: VisionTransformer has no attention patched by pacofr.ops."),
        (lambda: _inside(checkpointed, lambda: checkpointed(x)),
         "ragged: VisionTransformer has grad_checkpointing on: "),
        (lambda: _inside(model, lambda: model(x), seqlens=torch.tensor([1, 2])),
         "masked_attention_qkv: seqlens must be [B]=3, got (2,)"),
    ]


def test_what_it_cannot_honour_is_refused_in_one_line():
    for call, message in _refusals():
        with pytest.raises(ValueError) as caught:
            call()
        text = str(caught.value)
        assert text.startswith(message) and "\n" not in text, (text, message)
    unknown = _vit()
    unknown.blocks[1].attn = LocalAttention(48, num_heads=3)
    with pytest.raises(ValueError):
        apply_to_timm(unknown)
    assert type(unknown.blocks[0].attn) is timm_vit.Attention  # (refused before anything changed)
