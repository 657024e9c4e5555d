"""Self-Forcing's training rollout and the DMD config checks, on a tiny causal I2V Wan (one process)."""
import pytest
import torch

from ds_trainer.self_forcing import draw_exit_steps, self_forcing_rollout, warped_steps
from model.causal import CausalConfig, CausalWanModel, frame_blocks
from model.config import WAN_TINY_I2V
from model.conditioning import Conditioning
from model.flow_matching import FlowMatchingScheduler
from tests.model.test_wan import randomize

H, W, F = 4, 6, 5
CAUSAL = CausalConfig(2, independent_first_frame=True)
STEPS = [1000.0, 937.5, 833.3, 625.0]


WINDOWED = CausalConfig(2, independent_first_frame=True, local_attn_size=3, sink_size=1)  # LongLive's sink + window


def _setup(dtype=torch.float64, causal=CAUSAL):
    torch.manual_seed(0)
    model = randomize(CausalWanModel(WAN_TINY_I2V, causal)).to(dtype)
    g = torch.Generator().manual_seed(3)
    cond = Conditioning(torch.randn(1, 7, WAN_TINY_I2V.text_dim, generator=g, dtype=dtype),
                        clip_fea=torch.randn(1, 9, WAN_TINY_I2V.clip_dim, generator=g, dtype=dtype),
                        y=torch.randn(1, 20, F, H, W, generator=g, dtype=dtype))
    first = torch.randn(1, 16, 1, H, W, generator=g, dtype=dtype)
    noise = torch.randn(1, 16, F, H, W, generator=g, dtype=dtype)
    return model, cond, first, noise


def _full_sequence_rollout(model, noise, cond, first, exits, scheduler, rng, context_noise=0.0):
    """The same rollout without a KV cache: every step re-runs the whole prefix with the
    block-causal mask (finished blocks clean at t = context_noise, the current block noisy)."""
    done = [first]
    for index, (start, end) in enumerate(frame_blocks(noise.shape[2], model.causal)):
        if index == 0:
            continue
        x = noise[:, :, start:end]
        for i, t in enumerate(STEPS):
            prefix = torch.cat(done + [x], dim=2)
            ts = torch.cat([torch.full((1, start), context_noise), torch.full((1, end - start), t)], dim=1)
            flow = model(prefix, ts.to(prefix.dtype), cond.replace(y=cond.y[:, :, :end]))[:, :, start:end]
            x0 = scheduler.x0_from_flow(x, flow, torch.full((1,), t / 1000))
            if i == exits[index]:
                break
            fresh = torch.randn(x.shape, generator=rng).to(x.dtype)
            x = scheduler.add_noise(x0, fresh, torch.full((1,), STEPS[i + 1] / 1000))
        done.append(x0)
    return torch.cat(done, dim=2)


def test_warped_step_list_is_self_forcings():
    out = warped_steps([1000, 750, 500, 250], FlowMatchingScheduler(5.0), warp=True)
    assert out == pytest.approx([1000.0, 937.5, 833.333, 625.0], abs=1e-3)
    assert warped_steps([1000, 500], FlowMatchingScheduler(5.0), warp=False) == [1000.0, 500.0]


@pytest.mark.parametrize("causal", [CAUSAL, WINDOWED], ids=["global", "sink-window"])
@pytest.mark.parametrize("exit_index", [0, 2, 3])
def test_the_kv_cache_rollout_equals_the_full_block_causal_rollout(exit_index, causal):
    model, cond, first, noise = _setup(causal=causal)
    scheduler = FlowMatchingScheduler(5.0)
    exits = [exit_index] * 3
    with torch.no_grad():
        cached = self_forcing_rollout(model, model, noise, cond, first, causal, STEPS, exits, scheduler, 0.0,
                                      grad=False, rng=torch.Generator().manual_seed(7))
        full = _full_sequence_rollout(model, noise, cond, first, exits, scheduler, torch.Generator().manual_seed(7))
    assert cached.shape == noise.shape
    torch.testing.assert_close(cached, full, rtol=1e-9, atol=1e-9)  # float64 both ways
    assert torch.equal(cached[:, :, :1], first)  # the I2V first frame is the image latent
    if causal is WINDOWED:  # the window really hides frames: the global rollout differs
        model.causal = CAUSAL
        with torch.no_grad():
            unwindowed = self_forcing_rollout(model, model, noise, cond, first, CAUSAL, STEPS, exits, scheduler,
                                              0.0, grad=False, rng=torch.Generator().manual_seed(7))
        assert not torch.allclose(unwindowed[:, :, 3:], cached[:, :, 3:], atol=1e-6)


def test_gradients_flow_through_exactly_the_exit_step_of_each_block():
    model, cond, first, noise = _setup(torch.float32)
    calls = []

    def count(module, args, kwargs, output):
        calls.append((kwargs["block"].start_frame, torch.is_grad_enabled(), output.requires_grad))
    handle = model.register_forward_hook(count, with_kwargs=True)
    exits = [0, 2, 1]
    video = self_forcing_rollout(model, model, noise, cond, first, CAUSAL, STEPS, exits,
                                 FlowMatchingScheduler(5.0), 0.0, grad=True, rng=torch.Generator().manual_seed(1))
    handle.remove()
    with_grad = [c for c in calls if c[1]]
    assert [c[0] for c in with_grad] == [1, 3] and all(c[2] for c in with_grad)  # one exit forward per block
    # forwards: the first frame's commit, then per block (exit + 1) denoising steps + one commit
    assert len(calls) == 1 + (exits[1] + 1 + 1) + (exits[2] + 1 + 1)
    assert video.requires_grad and torch.equal(video[:, :, :1], first)
    video.square().mean().backward()
    assert model.blocks[0].self_attn.q.weight.grad.abs().sum() > 0
    assert model.blocks[0].cross_attn.k_img.weight.grad.abs().sum() > 0  # clip_fea's path learns too


def test_exit_steps_are_drawn_once_for_all_blocks_by_default():
    g = torch.Generator().manual_seed(0)
    same = draw_exit_steps(5, 4, g, same_across_blocks=True, last_step_only=False)
    assert len(set(same)) == 1 and 0 <= same[0] < 4
    assert draw_exit_steps(5, 4, g, same_across_blocks=False, last_step_only=True) == [3] * 5


DMD_YAML = """
job: dmd
data: {images: prompts.jsonl}
encoders: {t5: t, clip: c, vae: v}
generator: {preset: tiny-i2v}
real_score: {preset: tiny-i2v}
fake_score: {preset: tiny-i2v}
"""


@pytest.mark.parametrize("extra, key, message", [
    ("num_training_frames: 21\ncausal: {num_frame_per_block: 3}", "causal.num_frame_per_block",
     "(num_training_frames - 1) = 20 must be a multiple of num_frame_per_block with independent_first_frame; "
     "got num_frame_per_block = 3; block sizes that work with 21 frames: [1, 2, 4, 5, 10, 20]"),
    ("num_training_frames: 21\ncausal: {num_frame_per_block: 4, independent_first_frame: false}",
     "causal.num_frame_per_block", "num_training_frames = 21 must be a multiple of num_frame_per_block"),
    ("generator: {preset: tiny}", "generator.preset", "must be an i2v model"),
    ("encoders: {t5: t, vae: v}", "encoders.clip", "clip_fea"),
    ("gradient_accumulation_steps: 2", "gradient_accumulation_steps", "must be 1"),
    ("denoising_step_list: [250, 1000]", "denoising_step_list", "decreasing"),
    ("lr_critic: -1", "lr_critic", "> 0"),
    ("causal: {local_attn_size: 3, sink_size: 3}", "causal.sink_size", "local_attn_size"),
])
def test_dmd_config_errors_name_the_key_at_load(tmp_path, extra, key, message):
    from ds_trainer.config import load_train_config
    from model.config import ConfigError
    lines = [ln for ln in DMD_YAML.strip().splitlines() if not ln.startswith(extra.split(":")[0] + ":")]
    path = tmp_path / "dmd.yaml"
    path.write_text("\n".join(lines) + "\n" + extra + "\n")
    with pytest.raises(ConfigError) as err:
        load_train_config(path)
    assert f"{key}:" in str(err.value) and message in str(err.value), str(err.value)


def test_the_seeds_i2v_frame_choice_loads(tmp_path):
    from ds_trainer.config import load_train_config
    path = tmp_path / "dmd.yaml"
    path.write_text(DMD_YAML + "num_training_frames: 21\ncausal: {num_frame_per_block: 4, independent_first_frame: true}\n")
    cfg = load_train_config(path)
    assert type(cfg).__name__ == "DMDConfig" and cfg.lr == 2e-6 and cfg.lr_critic == 4e-7
    assert (cfg.beta1, cfg.beta2, cfg.weight_decay, cfg.dfake_gen_update_ratio) == (0.0, 0.999, 0.01, 5)


def test_the_shipped_dmd_configs_load():
    from ds_trainer.config import load_train_config
    from ds_trainer.shipped import configs_dir
    full = load_train_config(configs_dir() / "train_i2v_dmd.yaml")
    assert (full.num_training_frames, full.causal.num_frame_per_block, full.causal.independent_first_frame) == (21, 4, True)
    assert (full.lr, full.lr_critic, full.dfake_gen_update_ratio, full.ema_weight) == (2e-6, 4e-7, 5, 0.99)
