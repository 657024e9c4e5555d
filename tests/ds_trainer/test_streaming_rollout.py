"""LongLive's streaming long tuning (ds_trainer/streaming_rollout.py) on the tiny I2V Wan and the demo's
tiny encoders: windows continue the stream through the KV cache exactly as a full block-causal forward
over the stream would, only the new frames carry gradients, and a stream restarts at max_length."""
import pytest
import torch

from ds_trainer.streaming_rollout import StreamingRollout, StreamingSettings, reencode_window
from model.causal import CausalConfig, CausalWanModel
from model.config import WAN_TINY_I2V
from model.flow_matching import FlowMatchingScheduler
from tests.model.test_wan import randomize

CAUSAL = CausalConfig(2, independent_first_frame=True, local_attn_size=5, sink_size=1)
SETTINGS = StreamingSettings(chunk=5, max_length=11, min_new=2)  # 1 + 2 + 2 frames, then 2 or 4 a step


@pytest.fixture(scope="module")
def stream_parts(demo_config):
    from ds_trainer.config import load_train_config
    from model.encoders.bundle import load_frozen_encoders
    torch.manual_seed(0)
    model = randomize(CausalWanModel(WAN_TINY_I2V, CAUSAL)).double()
    encoders = load_frozen_encoders(load_train_config(demo_config).encoders)
    return model, encoders


def _rollout(model, steps=(1000.0,), last_step_only=True):
    return StreamingRollout(SETTINGS, CAUSAL, list(steps), FlowMatchingScheduler(shift=5.0), 0.0, True, last_step_only)


def _stream_source(encoders, starts):
    from data.encode import encode_i2v

    def start():
        starts.append(1)
        image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(len(starts))) * 2 - 1
        cond, first = encode_i2v(encoders, image, ["a red box"], SETTINGS.max_length)
        neg, _ = encode_i2v(encoders, image, [""], SETTINGS.max_length)
        return cond.to(dtype=torch.float64), neg.to(dtype=torch.float64), first.double()
    return start


def _reencode(encoders):
    def reencode(video, cond, uncond):
        c, u, first = reencode_window(encoders, video, cond, uncond)
        return c.to(dtype=torch.float64), u.to(dtype=torch.float64), first.double()
    return reencode


def test_windows_continue_the_stream_as_the_full_block_causal_forward(stream_parts):
    """One denoising step per block: each new block's x0 is the model's prediction from its noise at
    t = 1000 given the clean stream so far, which the full forward over [stream | block] computes
    without any cache (t = 0 on the clean frames, the window + sink mask)."""
    model, encoders = stream_parts
    roll, starts, rng = _rollout(model), [], torch.Generator().manual_seed(0)
    draws = torch.Generator().manual_seed(1)
    with torch.no_grad():
        first = roll.advance(model, model, _stream_source(encoders, starts), _reencode(encoders), rng, draws, False)
        assert first.video.shape[2] == 5 and first.stream_frames == 5
        assert first.new_mask.tolist() == [False, True, True, True, True]
        stream = roll.stream.window.clone()  # the raw frames 0-4
        cond = roll.stream.cond
        noise_rng = torch.Generator().manual_seed(7)
        rng = torch.Generator().manual_seed(7)
        second = roll.advance(model, model, _stream_source(encoders, starts), _reencode(encoders), rng, draws, False)
    new = int(second.new_mask.sum())
    assert new in (2, 4) and second.stream_frames == 5 + new and len(starts) == 1
    assert second.new_mask.tolist() == [False] * (5 - new) + [True] * new
    torch.testing.assert_close(second.video[:, :, 1:5 - new], stream[:, :, new + 1:], rtol=0, atol=0)  # the tail
    # the reference: block by block, the full forward over the clean frames so far + this block's noise
    frames = stream
    for start in range(5, 5 + new, 2):
        noise = torch.randn((1, 16, 2, 4, 6), generator=noise_rng).double()
        x = torch.cat([frames, noise], dim=2)
        t = torch.cat([torch.zeros(1, frames.shape[2]), torch.full((1, 2), 1000.0)], dim=1).double()
        with torch.no_grad():
            flow = model(x, t, cond.replace(y=cond.y[:, :, :start + 2]))[:, :, start:]
        frames = torch.cat([frames, FlowMatchingScheduler.x0_from_flow(noise, flow, torch.ones(1).double())], dim=2)
    torch.testing.assert_close(second.video[:, :, 5 - new:], frames[:, :, 5:], rtol=0, atol=1e-9)
    # the scores see the window as an I2V video: frame 0 re-encoded, its y and clip_fea the window's own
    torch.testing.assert_close(second.video[:, :, :1], second.cond.y[:, 4:, :1], rtol=0, atol=0)
    assert second.cond.y.shape[2] == 5 and not torch.equal(second.cond.clip_fea, cond.clip_fea)
    assert torch.equal(second.cond.context, cond.context)


def test_only_the_new_frames_carry_gradients_and_a_stream_restarts_at_max_length(stream_parts):
    model, encoders = stream_parts
    roll, starts = _rollout(model, steps=(1000.0, 500.0), last_step_only=False), []
    rng, draws = torch.Generator().manual_seed(2), torch.Generator().manual_seed(3)
    source, reencode = _stream_source(encoders, starts), _reencode(encoders)
    lengths = []
    for step in range(7):
        window = roll.advance(model, model, source, reencode, rng, draws, grad=True)
        lengths.append(window.stream_frames)
        if step == 1:
            model.zero_grad()
            window.video[:, :, ~window.new_mask].sum().backward(retain_graph=True)
            assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # the tail: no gradient
        model.zero_grad()
        window.video[:, :, window.new_mask].sum().backward()  # every step: its own graph, cross cache included
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert all(5 <= n <= SETTINGS.max_length for n in lengths), lengths
    restarts = [i for i, n in enumerate(lengths) if n == 5]
    assert restarts[0] == 0 and len(restarts) == len(starts) >= 2, lengths  # each restart took a new batch
    for i in range(1, len(lengths)):
        if i not in restarts:
            assert lengths[i] - lengths[i - 1] in (2, 4) and lengths[i - 1] + 2 <= SETTINGS.max_length


def test_settings_without_a_possible_new_frame_count_are_refused():
    with pytest.raises(ValueError, match=r"no multiple of num_frame_per_block 4 lies in \[streaming_min_new_frame 5, "
                                         r"streaming_chunk_size 7\]"):
        StreamingRollout(StreamingSettings(7, 20, 5), CausalConfig(4), [1000.0], FlowMatchingScheduler(), 0.0, True, True)
