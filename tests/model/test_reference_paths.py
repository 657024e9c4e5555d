"""Subject-reference adapters: no-op at init, each path its own softmax, grads only where new."""
import pytest
import torch

from model.conditioning import Conditioning
from model.config import ConfigError, ReferencePathsConfig, WAN_TINY, WAN_TINY_I2V
from model.wan import WanModel

REFS_ALL = ReferencePathsConfig(clip=True, vae=True, fused=True)


def _inputs(b=2, k_clip=257, refs=2, cfg=WAN_TINY):
    """x, t and the conditioning with `refs` references per sample (CLIP and VAE)."""
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(b, 16, 2, 4, 6, generator=g), torch.tensor([100.0, 700.0][:b])
    cond = Conditioning(torch.randn(b, 9, cfg.text_dim, generator=g),
                        ref_clip=torch.randn(b, refs, k_clip, cfg.clip_dim, generator=g),
                        ref_vae=torch.randn(b, refs, 16, 4, 6, generator=g))
    return x, t, cond


def _base_and_adapter(refs):
    torch.manual_seed(0)
    base = WanModel(WAN_TINY)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.05)
    adapted = WanModel(WAN_TINY.replace(reference_paths=refs))
    missing, unexpected = adapted.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected
    return base, adapted, missing


@pytest.mark.parametrize("refs", [ReferencePathsConfig(vae=True), ReferencePathsConfig(clip=True), REFS_ALL],
                         ids=["vae", "clip", "clip+vae+fused"])
def test_untrained_adapter_leaves_the_base_output_unchanged(refs):
    base, adapted, missing = _base_and_adapter(refs)
    assert missing and all(("proj" in k) or ("_img" in k) or ("_vae" in k) or ("_fused" in k) for k in missing)
    x, t, cond = _inputs()
    expected = base(x, t, Conditioning(cond.context))
    out = adapted(x, t, cond)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_each_path_has_its_own_softmax():
    """Changing the VAE reference moves the output once the value side is trained, and the
    text path's contribution does not depend on how many reference tokens there are."""
    _, adapted, _ = _base_and_adapter(ReferencePathsConfig(vae=True))
    with torch.no_grad():
        for blk in adapted.blocks:
            blk.cross_attn.v_vae.weight.normal_(0, 0.05)
    x, t, cond = _inputs()
    out = adapted(x, t, cond)
    assert (adapted(x, t, cond.replace(ref_vae=cond.ref_vae * 2)) - out).abs().max() > 1e-4
    # one block, one query: cross-attention output == text term + vae term, computed separately
    ca = adapted.blocks[0].cross_attn
    ctx = adapted.embed_context(Conditioning(cond.context, ref_vae=cond.ref_vae))
    xq = torch.randn(2, 5, WAN_TINY.dim)
    from kernels.attention import KVPath, multi_path_attention_ref
    q = ca.norm_q(ca.q(xq)).unflatten(-1, (2, -1))
    terms = [multi_path_attention_ref(q.double(), [KVPath(p.k.double(), p.v.double(), p.lens)])
             for p in ca.kv_paths(ctx)]
    expected = ca.o(sum(terms).flatten(2).float())
    torch.testing.assert_close(ca(xq, ctx), expected, rtol=1e-5, atol=1e-6)


def test_per_sample_reference_lengths_mask_the_padding():
    _, adapted, _ = _base_and_adapter(REFS_ALL)
    with torch.no_grad():
        for blk in adapted.blocks:
            blk.cross_attn.v_vae.weight.normal_(0, 0.05)
            blk.cross_attn.v_fused.weight.normal_(0, 0.05)
    x, t, cond = _inputs(refs=2)
    lens = torch.tensor([24, 48])  # one token per latent position: 4 * 6 per reference image
    out = adapted(x, t, cond.replace(ref_vae_lens=lens))
    # sample 0 with only its first reference must equal the padded run for sample 0
    single = adapted(x[:1], t[:1], Conditioning(cond.context[:1], ref_clip=cond.ref_clip[:1],
                                                ref_vae=cond.ref_vae[:1, :1]))
    torch.testing.assert_close(out[:1], single, rtol=1e-5, atol=1e-6)


def test_zero_length_reference_path_adds_nothing():
    base, adapted, _ = _base_and_adapter(ReferencePathsConfig(vae=True))
    with torch.no_grad():
        for blk in adapted.blocks:
            blk.cross_attn.v_vae.weight.normal_(0, 0.05)
            blk.cross_attn.v_vae.bias.normal_(0, 0.05)
    x, t, cond = _inputs()
    out = adapted(x, t, cond.replace(ref_vae_lens=torch.tensor([0, 0])))
    torch.testing.assert_close(out, base(x, t, Conditioning(cond.context)), rtol=0, atol=1e-6)


def test_gradients_reach_only_the_new_layers_when_the_base_is_frozen():
    _, adapted, missing = _base_and_adapter(REFS_ALL)
    new = set(missing)
    for name, p in adapted.named_parameters():
        p.requires_grad_(name in new)
    opt = torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=0.5)
    before = {k: v.clone() for k, v in adapted.state_dict().items()}
    for _ in range(2):  # step 1 trains the zero value side; step 2 then reaches every new layer
        opt.zero_grad()
        adapted(*_inputs()).square().mean().backward()
        opt.step()
    for name, p in adapted.named_parameters():
        if name in new:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
            assert torch.equal(p, before[name]), f"frozen {name} changed"


def test_reference_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="reference_paths.fused"):
        ReferencePathsConfig(fused=True, vae=True)
    with pytest.raises(ConfigError, match="reference_paths.clip"):
        WAN_TINY_I2V.replace(reference_paths=ReferencePathsConfig(clip=True))
    model = WanModel(WAN_TINY.replace(reference_paths=ReferencePathsConfig(vae=True)))
    x, t, cond = _inputs()
    with pytest.raises(ValueError, match="ref_vae"):
        model(x, t, Conditioning(cond.context))
    with pytest.raises(ValueError, match=r"ref_vae.*\[B, R, 16, h, w\]"):  # the old [B, 16, R, h, w] is refused
        Conditioning(cond.context, ref_vae=cond.ref_vae[:, 0])


def test_i2v_model_gets_the_vae_reference_path_on_top():
    cfg = WAN_TINY_I2V.replace(reference_paths=ReferencePathsConfig(vae=True))
    model = WanModel(cfg)
    assert torch.count_nonzero(model.blocks[0].cross_attn.v_img.weight) > 0  # official I2V path, not zeroed
    assert torch.count_nonzero(model.blocks[0].cross_attn.v_vae.weight) == 0
    b = 1
    out = model(torch.randn(b, 16, 2, 4, 6), torch.tensor([5.0]),
                Conditioning(torch.randn(b, 3, cfg.text_dim), clip_fea=torch.randn(b, 257, cfg.clip_dim),
                             y=torch.randn(b, 20, 2, 4, 6), ref_vae=torch.randn(b, 1, 16, 4, 6)))
    assert out.shape == (b, 16, 2, 4, 6)


def test_fewer_subjects_in_one_sample_equals_running_it_alone():
    """CLIP, VAE and fused paths with per-sample lengths: padding never leaks into a sample."""
    _, adapted, _ = _base_and_adapter(REFS_ALL)
    with torch.no_grad():
        for blk in adapted.blocks:
            for name in ("v_img", "v_vae", "v_fused"):
                getattr(blk.cross_attn, name).weight.normal_(0, 0.05)
    k = 5
    x, t, cond = _inputs(k_clip=k, refs=2)  # two subjects: 2 x 5 CLIP tokens, 2 x 24 VAE tokens
    out = adapted(x, t, cond.replace(ref_clip_lens=torch.tensor([k, 2 * k]), ref_vae_lens=torch.tensor([24, 48])))
    alone = adapted(x[:1], t[:1], Conditioning(cond.context[:1], ref_clip=cond.ref_clip[:1, :1],
                                               ref_vae=cond.ref_vae[:1, :1]))
    torch.testing.assert_close(out[:1], alone, rtol=1e-5, atol=1e-6)
    both = adapted(x[1:], t[1:], cond.select(slice(1, None)))
    torch.testing.assert_close(out[1:], both, rtol=1e-5, atol=1e-6)
