"""Block-causal self-attention (Triton, fwd + bwd) against a float64 dense-mask reference.

On CPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1) with
16-wide tiles, so frames of 5 or 7 tokens put block edges inside tiles. GPU cases (bf16, head
dim 128, Wan-like frames) skip without CUDA.
"""
import pytest
import torch
import torch.nn.functional as F

from kernels.block_causal_attention import block_causal_attention, self_attention, tile_visits
from kernels.block_causal_layout import BlockCausalLayout, block_causal_attention_ref, block_causal_mask
from tests.kernels.tolerance import FP32_REL, assert_fp32_close, assert_ratio_rule, max_error

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

L_ = BlockCausalLayout
LAYOUTS = [
    pytest.param(L_(7, 5, 2), 16, id="plain-ft7-f5-blk2-d16"),
    pytest.param(L_(5, 7, 3, independent_first_frame=True), 32, id="i2v-ft5-f7-blk3-d32"),
    pytest.param(L_(5, 7, 2, local_frames=3, sink_frames=1), 16, id="local3-sink1-ft5-f7"),
    pytest.param(L_(7, 4, 2, teacher_forcing=True), 16, id="teacher-forcing-ft7-f4"),
    pytest.param(L_(5, 6, 2, independent_first_frame=True, local_frames=2, sink_frames=2, teacher_forcing=True),
                 24, id="tf-i2v-local2-sink2-d24"),
]
B, N = 2, 2


def _inputs(layout, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, layout.seq_len, N, d, generator=g, dtype=torch.float64) for _ in range(4)]  # q k v dO


def _run(fn, q, k, v, do, layout, dtype, device=DEVICE):
    leaves = [t.detach().to(device, dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, layout)
    return [out, *torch.autograd.grad(out, leaves, do.to(device, out.dtype))]


def _compare(layout, d, dtype, device=DEVICE):
    q, k, v, do = _inputs(layout, d)
    ref = _run(block_causal_attention_ref, q, k, v, do, layout, torch.float64, "cpu")
    ours = _run(block_causal_attention, q, k, v, do, layout, dtype, device)
    assert ours[0].dtype == dtype
    names = ("out", "dq", "dk", "dv")
    if dtype == torch.float32:
        for o, r, name in zip(ours, ref, names):
            assert_fp32_close(o, r, name)
        return
    low = _run(block_causal_attention_ref, q, k, v, do, layout, dtype, device)
    for i, (o, lo, r, name) in enumerate(zip(ours, low, ref, names)):
        assert_ratio_rule(o, lo, r, i > 0, name)


# ---- the mask rule -----------------------------------------------------------------------
def _rows(mask):
    return ["".join("x" if m else "." for m in row) for row in mask.tolist()]


def test_mask_hand_checked_small_cases():
    # one token a frame, 5 frames, blocks of 2: [0,1] [2,3] [4]
    assert _rows(block_causal_mask(L_(1, 5, 2))) == ["xx...", "xx...", "xxxx.", "xxxx.", "xxxxx"]
    # I2V: frame 0 alone, then blocks of 2: [0] [1,2] [3,4]
    assert _rows(block_causal_mask(L_(1, 5, 2, independent_first_frame=True))) == \
        ["x....", "xxx..", "xxx..", "xxxxx", "xxxxx"]
    # window of 2 frames + sink of 1 frame, blocks of 1
    assert _rows(block_causal_mask(L_(1, 5, 1, local_frames=2, sink_frames=1))) == \
        ["x....", "xx...", "xxx..", "x.xx.", "x..xx"]
    # teacher forcing [clean c0 c1 c2 c3 | noisy n0 n1 n2 n3], blocks of 2
    assert _rows(block_causal_mask(L_(1, 4, 2, teacher_forcing=True))) == [
        "xx......", "xx......", "xxxx....", "xxxx....",   # clean: block-causal among clean
        "....xx..", "....xx..",                           # noisy block 0: itself only
        "xx....xx", "xx....xx"]                           # noisy block 1: clean block 0 + itself


def _self_forcing_mask(layout):
    """Self-Forcing's rule written as in its mask_mod: kv < ends[q] (& kv >= ends[q] - window)."""
    ft, l0 = layout.frame_tokens, layout.context_len
    ends = torch.tensor([e for s, e in layout.blocks() for _ in range(s, e)])
    qi, kv = torch.arange(l0)[:, None], torch.arange(l0)[None, :]
    mask = kv < ends[qi]
    if layout.local_frames != -1:
        mask &= kv >= ends[qi] - layout.local_frames * ft
    return mask | (qi == kv)


@pytest.mark.parametrize("layout", [L_(7, 21 // 3, 3), L_(3, 7, 2, local_frames=4), L_(4, 7, 3, True),
                                    L_(4, 8, 3, True, local_frames=3)])
def test_mask_equals_self_forcing_rule(layout):
    assert torch.equal(block_causal_mask(layout), _self_forcing_mask(layout))


def test_sink_and_window_match_longlive_slicing():
    """LongLive attends cat(k[:sink], k[max(sink, end - (local - sink) FT):end]) per block."""
    ft, sink, local = 3, 1, 4
    layout = L_(ft, 9, 1, local_frames=local - sink, sink_frames=sink)
    mask = block_causal_mask(layout)
    for s, e in layout.blocks():
        expect = torch.zeros(layout.seq_len, dtype=torch.bool)
        expect[:sink * ft] = True
        expect[max(sink * ft, e - (local - sink) * ft):e] = True
        assert torch.equal(mask[s], expect) and torch.equal(mask[e - 1], expect)


def test_teacher_forcing_mask_rows_hold_clean_prefix_and_own_noisy_block():
    layout = L_(5, 6, 2, teacher_forcing=True)
    mask, l0 = block_causal_mask(layout), layout.context_len
    assert torch.equal(mask[:l0, :l0], block_causal_mask(L_(5, 6, 2)))   # clean half: plain rule
    assert not mask[:l0, l0:].any()                                       # clean never sees noisy
    for s, e in layout.blocks():
        row = mask[l0 + s]
        assert row[:s].all() and not row[s:l0].any() and row[l0 + s:l0 + e].all()
        assert not row[l0:l0 + s].any() and not row[l0 + e:].any()
    assert layout.visible_pairs() == int(mask.sum())


def test_flex_mask_mod_gives_the_same_mask():
    from torch.nn.attention.flex_attention import create_mask

    from kernels.block_causal_layout import flex_mask_mod

    for layout in (L_(5, 6, 2, True, local_frames=2, sink_frames=2, teacher_forcing=True), L_(7, 5, 2)):
        mask = create_mask(flex_mask_mod(layout), None, None, layout.seq_len, layout.seq_len, device="cpu")
        assert torch.equal(mask[0, 0], block_causal_mask(layout))


# ---- numerics ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout,d", LAYOUTS)
def test_forward_and_gradients_match_float64(layout, d, dtype):
    _compare(layout, d, dtype)


def test_bfloat16_matches_float64():
    """bf16 takes the upcast-before-tl.dot route in the interpreter."""
    _compare(L_(5, 7, 2, local_frames=3, sink_frames=1, teacher_forcing=True), 16, torch.bfloat16)


def test_full_attention_entry_point_and_sdpa_with_the_mask():
    layout = L_(7, 5, 2, local_frames=2, sink_frames=1)
    q, k, v, _ = _inputs(layout, 16)
    qf, kf, vf = (t.float().to(DEVICE) for t in (q, k, v))
    with torch.no_grad():
        full = self_attention(qf, kf, vf)  # no layout: one block over all tokens
        assert max_error(full, block_causal_attention_ref(q, k, v)) <= FP32_REL
        sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=block_causal_mask(layout)).transpose(1, 2)
        assert max_error(self_attention(qf, kf, vf, layout), sdpa) <= FP32_REL


# ---- tile skipping -----------------------------------------------------------------------
def _tile_classes(layout, bm, bn, outer="q"):
    """[q tiles, k tiles]: 0 no visible pair, 1 some, 2 every (valid) pair visible and the inner
    tile whole (rows past L of the program's own `outer` tile act as the last valid one)."""
    mask = block_causal_mask(layout)
    length = layout.seq_len
    tq, tk = -(-length // bm), -(-length // bn)
    cls = torch.zeros(tq, tk, dtype=torch.long)
    for i in range(tq):
        for j in range(tk):
            tile = mask[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
            full_width = tile.shape[1] == bn if outer == "q" else tile.shape[0] == bm
            cls[i, j] = 2 if tile.all() and full_width else int(tile.any())
    return cls


@pytest.mark.parametrize("layout", [L_(7, 6, 2), L_(5, 7, 2, local_frames=2, sink_frames=1),
                                    L_(5, 6, 2, True, teacher_forcing=True)], ids=["plain", "local-sink", "tf-i2v"])
def test_masked_tiles_are_skipped_and_full_tiles_take_the_fast_path(layout):
    q, k, v, _ = (t[:1, :, :1].float() for t in _inputs(layout, 16))
    bm = bn = 8  # the debug launch picks its tiles: more tiles than the default 16 at these lengths
    visits = tile_visits(q, k, v, layout, bm, bn)
    cls = _tile_classes(layout, bm, bn)
    for name, expect in (("fwd", cls), ("dq", cls), ("dkdv", _tile_classes(layout, bm, bn, outer="k").T)):
        got = visits[name]
        assert torch.equal((got > 0).long(), (expect > 0).long()), f"{name}: visited tiles != tiles with a visible pair"
        fast = got // 256
        assert not fast[expect != 2].any(), f"{name}: unmasked fast path on a tile with a masked pair"
        assert (got[expect == 1] % 256 >= 1).all()
        assert (got <= 256 + 2).all(), f"{name}: a tile visited more than twice"
    # the plain rule has no range pieces that could share a tile: every full tile is a fast one
    if layout == L_(7, 6, 2):
        assert torch.equal(visits["fwd"] // 256, (cls == 2).long())
    assert (visits["fwd"] == 0).sum() > 0  # the layouts do have skippable tiles


def test_masked_keys_get_no_gradient_and_do_not_change_the_output():
    layout = L_(7, 5, 2)
    q, k, v, _ = (t.float().to(DEVICE) for t in _inputs(layout, 16))
    out = block_causal_attention(q, k, v, layout)
    k2, v2 = k.clone(), v.clone()
    k2[:, 28:] += 50.0  # keys of the last block are invisible to every earlier query
    v2[:, 28:] -= 9.0
    assert torch.equal(block_causal_attention(q, k2, v2, layout)[:, :28], out[:, :28])


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="local_frames"):
        L_(5, 7, 3, local_frames=2)
    with pytest.raises(ValueError, match="sink_frames"):
        L_(5, 7, 3, sink_frames=8)
    q = torch.randn(1, 34, 2, 16)
    with pytest.raises(ValueError, match="seq_len"):
        block_causal_attention(q, q, q, L_(7, 5, 2))
    with pytest.raises(TypeError, match="float64"):
        block_causal_attention(q.double(), q.double(), q.double(), L_(17, 2, 1))


# ---- GPU: bf16 at Wan's head dim, frames not aligned with the tiles ------------------------
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (bf16 Triton kernels at Wan-like sizes)")
@pytest.mark.parametrize("layout", [L_(390, 7, 3), L_(390, 7, 3, True, local_frames=3, sink_frames=1),
                                    L_(195, 7, 3, teacher_forcing=True)], ids=["plain", "i2v-local-sink", "tf"])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_bfloat16_at_wan_head_dims(layout, d):  # pragma: no cover - GPU only
    _compare(layout, d, torch.bfloat16, device="cuda")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_float32_uses_exact_dots():  # pragma: no cover - GPU only
    _compare(L_(130, 5, 2, local_frames=2, sink_frames=1), 128, torch.float32, device="cuda")
