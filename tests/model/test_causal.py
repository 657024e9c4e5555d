"""Causal Wan: masks follow the Self-Forcing / LongLive rules, cached block-by-block inference
equals the full block-causal forward, one block covering everything equals WanModel."""
import pytest
import torch

from kernels.block_causal_layout import block_causal_mask
from model.causal import CausalConfig, CausalWanModel, frame_blocks, recache
from model.config import ReferencePathsConfig, WAN_TINY, WAN_TINY_I2V
from kernels.attention_types import visible_slots
from model.kv_cache import KVCache
from model.conditioning import Conditioning
from model.wan import WanModel
from tests.model.test_wan import randomize

H, W = 4, 6  # latent grid -> 2 x 3 = 6 tokens per frame


def test_frame_count_must_split_into_blocks_with_a_helpful_error():
    assert frame_blocks(21, CausalConfig(4, independent_first_frame=True))[:3] == [(0, 1), (1, 5), (5, 9)]
    with pytest.raises(ValueError, match=r"num_frames - 1 = 20 is not a multiple of num_frame_per_block = 3.*\[1, 2, 4, 5, 10, 20\]"):
        frame_blocks(21, CausalConfig(3, independent_first_frame=True))
    assert len(frame_blocks(21, CausalConfig(3))) == 7


def _frame_mask(causal, frames, teacher_forcing=False):
    model = CausalWanModel.__new__(CausalWanModel)
    model.causal = causal
    return block_causal_mask(CausalWanModel.layout(model, frames, 1, teacher_forcing))


def test_masks_follow_the_block_window_and_sink_rules():
    m = _frame_mask(CausalConfig(2), 6)
    expected = torch.tensor([[1, 1, 0, 0, 0, 0]] * 2 + [[1, 1, 1, 1, 0, 0]] * 2 + [[1] * 6] * 2, dtype=torch.bool)
    assert torch.equal(m, expected)
    local = _frame_mask(CausalConfig(2, local_attn_size=5, sink_size=1), 8)
    # LongLive: the 5-frame budget counts the sink: frame 7 (block end 8) sees the last 4 frames + frame 0
    assert local[7].nonzero().flatten().tolist() == [0, 4, 5, 6, 7]
    tf = _frame_mask(CausalConfig(2), 4, teacher_forcing=True)
    # noisy frame 2 (block 1) sees clean frames 0, 1 and noisy frames 2, 3 only
    assert tf[4 + 2].nonzero().flatten().tolist() == [0, 1, 6, 7]
    assert tf[4 + 0].nonzero().flatten().tolist() == [4, 5]


def _visible_keys(cache):
    view = cache.view()
    return cache.k[:, visible_slots(cache.capacity, view.sink_len, view.window_start, view.window_len)]


def test_kv_cache_ring_buffer_wraps_in_place_and_keeps_the_sink():
    cache = KVCache(batch=1, sink_tokens=2, ring_tokens=3, heads=1, head_dim=1)
    buffer_id = cache.k.data_ptr()
    for start in range(0, 9, 3):  # write tokens 0..8 in blocks of 3 (token value = position)
        vals = torch.arange(start, start + 3, dtype=torch.float32).view(1, 3, 1, 1)
        cache.write(vals, vals)
    assert _visible_keys(cache).flatten().tolist() == [0, 1, 6, 7, 8]  # sink 0, 1 + the 3 most recent
    assert cache.k.data_ptr() == buffer_id and cache.capacity == 5  # no reallocation
    cache.reset(keep_sink=True)
    cache.write(torch.full((1, 2, 1, 1), 9.0), torch.full((1, 2, 1, 1), 9.0))
    assert _visible_keys(cache).flatten().tolist() == [0, 1, 9, 9]


def _inputs(cfg, f, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 16, f, H, W, generator=g)
    t = torch.rand(b, f, generator=g) * 1000
    ctx = torch.randn(b, 7, cfg.text_dim, generator=g)
    cond = Conditioning(ctx)
    if cfg.model_type == "i2v":
        cond = cond.replace(clip_fea=torch.randn(b, 257, cfg.clip_dim, generator=g),
                            y=torch.randn(b, 20, f, H, W, generator=g))
    if cfg.reference_paths.vae:
        cond = cond.replace(ref_vae=torch.randn(b, 1, 16, H, W, generator=g))
    if cfg.reference_paths.clip:
        cond = cond.replace(ref_clip=torch.randn(b, 1, 5, cfg.clip_dim, generator=g))
    return x, t, cond


CASES = {
    "t2v": (WAN_TINY, CausalConfig(2), 6),
    "i2v-first-frame": (WAN_TINY_I2V, CausalConfig(2, independent_first_frame=True), 5),
    "t2v-window-sink": (WAN_TINY, CausalConfig(1, local_attn_size=3, sink_size=1), 6),
    "i2v-window": (WAN_TINY_I2V, CausalConfig(2, local_attn_size=4), 6),
    "t2v-references": (WAN_TINY.replace(reference_paths=ReferencePathsConfig(clip=True, vae=True, fused=True)),
                       CausalConfig(3), 6),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_block_by_block_equals_the_full_block_causal_forward(case):
    cfg, causal, f = CASES[case]
    torch.manual_seed(0)
    model = randomize(CausalWanModel(cfg, causal))
    x, t, cond = _inputs(cfg, f)
    full = model(x, t, cond)
    y = cond.y
    cross = model.cross_attention_cache(cond)
    caches = model.new_kv_caches(x.shape[0], frame_tokens=6, max_frames=f)
    outs = []
    for a, b in frame_blocks(f, causal):
        ys = y[:, :, a:b] if y is not None else None
        outs.append(model.forward_block(x[:, :, a:b], t[:, a:b], a, caches, cross, y=ys))
    torch.testing.assert_close(torch.cat(outs, dim=2), full, rtol=1e-5, atol=1e-5)


def test_one_block_covering_all_frames_equals_wan_model():
    cfg = WAN_TINY_I2V
    model = randomize(CausalWanModel(cfg, CausalConfig(num_frame_per_block=4)))
    wan = WanModel(cfg)
    wan.load_state_dict(model.state_dict())  # same keys, same shapes
    x, t, cond = _inputs(cfg, 4)
    torch.testing.assert_close(model(x, t, cond), wan(x, t, cond), rtol=1e-5, atol=1e-5)


def test_teacher_forcing_noisy_half_sees_clean_history_only():
    cfg, causal, f = WAN_TINY, CausalConfig(2), 4
    model = randomize(CausalWanModel(cfg, causal))
    x, t, cond = _inputs(cfg, f)
    clean = torch.randn_like(x)
    out = model(x, t, cond, clean_x=clean)
    assert out.shape == x.shape
    # changing the clean frames of the LAST block cannot affect any noisy output
    clean2 = clean.clone()
    clean2[:, :, 2:] += 5
    torch.testing.assert_close(model(x, t, cond, clean_x=clean2), out, rtol=0, atol=1e-6)
    # changing clean block 0 changes noisy block 1 but not noisy block 0
    clean3 = clean.clone()
    clean3[:, :, :2] += 5
    moved = model(x, t, cond, clean_x=clean3)
    torch.testing.assert_close(moved[:, :, :2], out[:, :, :2], rtol=0, atol=1e-6)
    assert (moved[:, :, 2:] - out[:, :, 2:]).abs().max() > 1e-3


def test_recache_after_a_prompt_switch_matches_a_fresh_run_with_the_new_prompt():
    cfg, causal, f = WAN_TINY, CausalConfig(2, local_attn_size=4), 6
    model = randomize(CausalWanModel(cfg, causal))
    x, t, cond = _inputs(cfg, f)
    new_cond = Conditioning(torch.randn_like(cond.context))
    caches = model.new_kv_caches(2, 6, f)
    old = model.cross_attention_cache(cond)
    for a, b in frame_blocks(4, causal):
        model.forward_block(x[:, :, a:b], torch.zeros(2), a, caches, old)
    new = model.cross_attention_cache(new_cond)
    recache(model, caches, new, x[:, :, 0:4], None, frame_blocks(4, causal), causal, 0.0, keep_sink=False)
    after = model.forward_block(x[:, :, 4:6], t[:, 4:6], 4, caches, new)
    fresh = model.new_kv_caches(2, 6, f)
    for a, b in frame_blocks(4, causal):
        model.forward_block(x[:, :, a:b], torch.zeros(2), a, fresh, new)
    torch.testing.assert_close(after, model.forward_block(x[:, :, 4:6], t[:, 4:6], 4, fresh, new), rtol=1e-5, atol=1e-6)


def test_checkpoint_keys_are_wan_keys():
    assert set(CausalWanModel(WAN_TINY).state_dict()) == set(WanModel(WAN_TINY).state_dict())


@pytest.mark.parametrize("case", ["t2v-window-sink", "i2v-first-frame"])
def test_triton_backend_runs_the_causal_model_like_sdpa(case):
    """Training forward through the block-causal kernel and cached inference through the in-place
    KV-cache kernel (interpreter on CPU) equal the SDPA paths."""
    cfg, causal, f = CASES[case]
    model = randomize(CausalWanModel(cfg, causal))
    x, t, cond = _inputs(cfg, f, b=1)
    ref = model(x, t, cond)
    model.set_attn_backend("triton")
    torch.testing.assert_close(model(x, t, cond), ref, rtol=1e-4, atol=1e-5)
    y = cond.y
    cross = model.cross_attention_cache(cond)
    caches = model.new_kv_caches(1, frame_tokens=6, max_frames=f)
    blocks = frame_blocks(f, causal)
    with torch.no_grad():  # inference: the in-place forward-only kernel
        outs = [model.forward_block(x[:, :, a:b], t[:, a:b], a, caches, cross, y=y[:, :, a:b] if y is not None else None)
                for a, b in blocks]
    torch.testing.assert_close(torch.cat(outs, dim=2), ref, rtol=1e-4, atol=1e-5)
    # with gradients (a Self-Forcing exit step) the triton backend still works through the cache
    caches = model.new_kv_caches(1, frame_tokens=6, max_frames=f)
    cross = model.cross_attention_cache(cond)
    outs = [model.forward_block(x[:, :, a:b], t[:, a:b], a, caches, cross, y=y[:, :, a:b] if y is not None else None)
            for a, b in blocks]
    torch.cat(outs, dim=2).square().mean().backward()
    assert model.blocks[0].self_attn.q.weight.grad is not None


def test_activation_checkpointing_gives_the_same_gradients_under_the_causal_layout():
    cfg, causal, f = CASES["i2v-window"]
    model = randomize(CausalWanModel(cfg, causal)).train()
    x, t, cond = _inputs(cfg, f, b=1)
    model(x, t, cond).square().mean().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing = True
    model(x, t, cond).square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], rtol=1e-5, atol=1e-7, msg=n)


def test_i2v_causal_model_names_a_missing_y():
    cfg, causal, f = CASES["i2v-first-frame"]
    model = CausalWanModel(cfg, causal)
    x, t, cond = _inputs(cfg, f, b=1)
    with pytest.raises(ValueError, match="`y` is required by an i2v model"):
        model(x, t, cond.replace(y=None))
    with pytest.raises(ValueError, match="`y` is required by an i2v model"):
        model.forward_block(x[:, :, :1], t[:, :1], 0, model.new_kv_caches(1, 6, f), model.cross_attention_cache(cond))


@pytest.mark.parametrize("sink, ring", [(0, 40), (4, 12), (2, 8)])
def test_lookahead_sees_what_a_write_would_show_and_leaves_the_cache_alone(sink, ring):
    """A denoising step reads the cache plus its own block without writing (so it can be redone
    and carry gradients); the clean pass then commits the block."""
    from model.kv_cache import lookahead
    cache = KVCache(batch=1, sink_tokens=sink, ring_tokens=ring, heads=2, head_dim=3)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        k, v = torch.randn(1, 4, 2, 3, generator=g), torch.randn(1, 4, 2, 3, generator=g)
        before = (cache.k.clone(), cache.total)
        with lookahead([cache]):
            peek = cache.attend(k, v)
        assert torch.equal(cache.k, before[0]) and cache.total == before[1]  # untouched
        committed = cache.attend(k, v)
        visible = _visible_keys(cache)[0].flatten(1)
        assert committed.k is cache.k
        assert sorted(map(tuple, peek.k[0].flatten(1).tolist())) == sorted(map(tuple, visible.tolist()))
