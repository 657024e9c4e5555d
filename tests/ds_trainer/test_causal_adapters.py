"""OpenS2V reference adapters on the block-causal generator (`model.causal` in the adapter job):
per-block timesteps, the block-causal mask and teacher forcing in the loss, only the reference
paths learn, the config check at load, and one real 2-rank ZeRO-3 run."""
import json
import math
import re
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from ds_trainer.config import TrainConfig, load_train_config
from ds_trainer.flow_step import FlowInputs, block_sigmas, flow_matching_loss, step_generator
from ds_trainer.trainable import apply_freeze, reference_trainable_patterns
from model.causal import CausalConfig, CausalWanModel, frame_blocks
from model.conditioning import Conditioning
from model.config import ConfigError, ReferencePathsConfig, WAN_TINY
from model.flow_matching import FlowMatchingScheduler
from model.wan import WanModel
from tests.model.test_wan import randomize

H, W = 4, 6  # latent size: 2 x 3 = 6 tokens per frame
REFS = WAN_TINY.replace(reference_paths=ReferencePathsConfig(clip=True, vae=True, fused=True))


def _inputs(cfg, frames, b=2, seed=0) -> FlowInputs:
    g = torch.Generator().manual_seed(seed)
    cond = Conditioning(torch.randn(b, 7, cfg.text_dim, generator=g),
                        ref_vae=torch.randn(b, 1, 16, H, W, generator=g),
                        ref_clip=torch.randn(b, 1, 5, cfg.clip_dim, generator=g))
    return FlowInputs(torch.randn(b, 16, frames, H, W, generator=g), cond)


class Recording(torch.nn.Module):
    """The real model, remembering the arguments of each call (what the loss fed it)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, t, cond, **kwargs):
        self.calls.append((x.detach().clone(), t.detach().clone(), kwargs))
        return self.model(x, t, cond, **kwargs)


# ------------------------------------------------------------------------------ timesteps
@pytest.mark.parametrize("causal, frames", [(CausalConfig(3), 21), (CausalConfig(4, independent_first_frame=True), 21),
                                            (CausalConfig(1), 5)])
def test_block_timesteps_are_one_per_block(causal, frames):
    scheduler = FlowMatchingScheduler(shift=5.0)
    sigma = block_sigmas(scheduler, 4, frames, causal, step_generator(0, 7, 0, 1))
    assert sigma.shape == (4, frames)
    blocks = frame_blocks(frames, causal)
    if causal.independent_first_frame:
        assert blocks[0] == (0, 1)  # the first frame has its own timestep
    for row in sigma:
        per_block = [row[a:b] for a, b in blocks]
        assert all(torch.equal(v, v[:1].expand_as(v)) for v in per_block), row  # constant within a block
        assert len({float(v[0]) for v in per_block}) == len(blocks), row  # a fresh draw for every block
    assert all(float(s) in set(scheduler.sigmas.float().tolist()) for s in sigma.flatten())  # on the grid
    # a pure function of (seed, step, micro, rank): resume draws the same, another step draws anew
    assert torch.equal(sigma, block_sigmas(scheduler, 4, frames, causal, step_generator(0, 7, 0, 1)))
    assert not torch.equal(sigma, block_sigmas(scheduler, 4, frames, causal, step_generator(0, 8, 0, 1)))


def test_one_block_over_all_frames_gives_the_bidirectional_loss():
    """The causal path draws and noises as the bidirectional one: with one block covering every
    frame (the mask is then full), CausalWanModel's loss equals WanModel's with the same weights."""
    causal = randomize(CausalWanModel(REFS, CausalConfig(num_frame_per_block=3)))
    wan = WanModel(REFS)
    wan.load_state_dict(causal.state_dict())
    inputs, scheduler = _inputs(REFS, 3), FlowMatchingScheduler(shift=3.0)
    bidirectional = flow_matching_loss(wan, inputs, scheduler, step_generator(1, 2, 0, 0))
    blockwise = flow_matching_loss(causal, inputs, scheduler, step_generator(1, 2, 0, 0), causal=causal.causal)
    torch.testing.assert_close(blockwise, bidirectional, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ the loss
@pytest.mark.parametrize("teacher_forcing", [False, True], ids=["block-causal", "teacher-forcing"])
def test_causal_loss_trains_only_the_reference_paths(teacher_forcing):
    causal_cfg = CausalConfig(num_frame_per_block=1, independent_first_frame=False)
    model = randomize(CausalWanModel(REFS, causal_cfg))
    trainable = set(apply_freeze(model, reference_trainable_patterns(REFS)))
    assert trainable and len(trainable) < len(list(model.parameters()))
    rec = Recording(model)
    inputs, scheduler = _inputs(REFS, 3), FlowMatchingScheduler(shift=5.0)
    loss = flow_matching_loss(rec, inputs, scheduler, step_generator(0, 3, 0, 0), causal=causal_cfg,
                              teacher_forcing=teacher_forcing)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name  # frozen base: no gradient at all
    # what the model was given: t [B, F], one value per block; the clean latents with teacher forcing
    (x_t, t, kwargs), = rec.calls
    assert t.shape == (2, 3) and all(len(set(row.tolist())) == 3 for row in t)
    if teacher_forcing:
        assert set(kwargs) == {"clean_x"} and torch.equal(kwargs["clean_x"], inputs.latents)
    else:
        assert kwargs == {}
    # the block-causal mask is in effect: frame 0's prediction ignores the later noisy frames
    with torch.no_grad():
        later = x_t.clone()
        later[:, :, 1:] += 1.0
        base_out = model(x_t, t, inputs.cond, **kwargs)
        moved = model(later, t, inputs.cond, **kwargs)
    torch.testing.assert_close(moved[:, :, 0], base_out[:, :, 0], rtol=1e-5, atol=1e-6)
    assert (moved[:, :, 2] - base_out[:, :, 2]).abs().max() > 1e-3
    if teacher_forcing:  # noisy frame 2 sees the clean frames 0, 1 (the prefix), not the noisy ones
        clean = dict(clean_x=inputs.latents.clone())
        clean["clean_x"][:, :, 0] += 1.0
        with torch.no_grad():
            moved_clean = model(x_t, t, inputs.cond, **clean)
        assert (moved_clean[:, :, 2] - base_out[:, :, 2]).abs().max() > 1e-3
        torch.testing.assert_close(moved_clean[:, :, 0], base_out[:, :, 0], rtol=1e-5, atol=1e-6)  # not its own


def test_teacher_forcing_without_the_causal_model_is_refused():
    model = WanModel(REFS)
    with pytest.raises(ValueError, match="teacher_forcing needs the block-causal generator"):
        flow_matching_loss(model, _inputs(REFS, 2), FlowMatchingScheduler(), step_generator(0, 0, 0, 0),
                           teacher_forcing=True)


# ------------------------------------------------------------------------------ config
BASE = """
cache_dir: /somewhere/cache
num_training_frames: 21
"""


def _load(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(BASE + text))
    return path, load_train_config(path)


def test_model_causal_loads_and_enters_the_compatibility_key(tmp_path):
    from ds_trainer.adapter_trainer import AdapterTrainer
    _, plain = _load(tmp_path, "model: {preset: tiny}\n")
    assert plain.model.causal is None
    assert "causal" not in AdapterTrainer.compatibility_key(plain)  # bidirectional runs keep their key
    _, cfg = _load(tmp_path, "model: {preset: tiny, causal: {num_frame_per_block: 4, independent_first_frame: true,"
                             " local_attn_size: 12, sink_size: 3, teacher_forcing: true}}\n")
    assert isinstance(cfg, TrainConfig)
    assert cfg.model.causal.causal_config() == CausalConfig(4, True, 12, 3)
    assert cfg.model.causal.teacher_forcing is True
    key = AdapterTrainer.compatibility_key(cfg)
    assert key["causal"]["num_frame_per_block"] == 4 and key["causal"]["teacher_forcing"] is True
    assert AdapterTrainer.fingerprint(cfg) != AdapterTrainer.fingerprint(plain)
    _, defaults = _load(tmp_path, "model: {preset: tiny, causal: {}}\n")  # LongLive T2V: 21 frames = 7 x 3
    assert defaults.model.causal.causal_config() == CausalConfig(3, False, -1, 0)


@pytest.mark.parametrize("causal, key, says", [
    ("{num_frame_per_block: 4}", "model.causal.num_frame_per_block",
     "num_training_frames = 21 must be a multiple of num_frame_per_block; got num_frame_per_block = 4; "
     "block sizes that work with 21 frames: [1, 3, 7, 21]"),
    ("{num_frame_per_block: 3, independent_first_frame: true}", "model.causal.num_frame_per_block",
     "(num_training_frames - 1) = 20 must be a multiple of num_frame_per_block with independent_first_frame; "
     "got num_frame_per_block = 3; block sizes that work with 21 frames: [1, 2, 4, 5, 10, 20]"),
    ("{num_frame_per_block: 0}", "model.causal.num_frame_per_block", "must be >= 1"),
    ("{local_attn_size: 3, sink_size: 3}", "model.causal.sink_size", "must be in [0, local_attn_size=3)"),
    ("{local_attn_size: 0}", "model.causal.local_attn_size", "must be -1 (no window) or >= 1"),
    ("{num_frame_per_blok: 3}", "model.causal.num_frame_per_blok", "unknown key"),
])
def test_a_bad_causal_section_is_an_error_at_load(tmp_path, causal, key, says):
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(BASE + f"model: {{preset: tiny, causal: {causal}}}\n"))
    with pytest.raises(ConfigError) as err:
        load_train_config(path)
    message = str(err.value)
    assert message.startswith(str(path)) and key in message and says in message, message


# ------------------------------------------------------------------------------ a real run
@pytest.mark.slow
def test_zero3_two_ranks_trains_the_adapters_of_the_causal_generator(demo_config, tmp_path):
    from ds_trainer.metrics import read_metrics
    from model.checkpoint import read_checkpoint
    from tests.ds_trainer.conftest import finished, launch
    from tests.ds_trainer.test_training import _subject_png
    causal = "model.causal={num_frame_per_block: 1, independent_first_frame: true, teacher_forcing: true}"
    # validation samples the causal generator block by block under ZeRO-3: 3 prompts on 2 ranks
    images = [_subject_png(tmp_path / f"s{i}.png", c) for i, c in enumerate(["red", "blue"])]
    validation = (f"validation={{every: 3, prompts: [a red ellipse, a blue ellipse, a red ellipse moving], "
                  f"subject_images: ['{images[0]}', '{images[1]}', '{images[0]}'], steps: 2, guidance: 2.0, "
                  f"ref_gain_samples: 3, ref_gain_repeats: 1}}")
    proc = launch(demo_config, tmp_path / "run", sets=("lr=0.01", "warmup_steps=2", "max_iters=3", "log_iters=1",
                                                      "keep_last_checkpoints=3", "export_full=true", causal,
                                                      validation))
    summary = finished(proc)
    rows = [json.loads(line) for line in (tmp_path / "run" / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 3] and rows[0]["ref_gain"] == 1.0, rows
    import decord
    for row in rows:
        videos = sorted((tmp_path / "run" / "validation" / f"step_{row['step']:06d}").glob("prompt_*.mp4"))
        assert [v.name for v in videos] == ["prompt_00.mp4", "prompt_01.mp4", "prompt_02.mp4"]
        assert all(len(decord.VideoReader(str(v))) == 4 * (load_train_config(demo_config).num_training_frames - 1) + 1
                   for v in videos)
    assert summary["step"] == 3 and summary["nonfinite_losses"] == 0
    assert "block-causal" in proc.output and "teacher-forced" in proc.output  # the causal generator trained
    curve = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert len(curve) == 3 and all(math.isfinite(v) for v in curve), curve
    cfg = load_train_config(demo_config)
    base, _, _ = read_checkpoint(cfg.generator_ckpt)
    final = load_file(str(tmp_path / "run" / "final_model.safetensors"))
    for k, value in base.items():  # every frozen base weight is bit-identical
        assert torch.equal(final[k], value), k
    step = {i: torch.load(tmp_path / "run" / f"checkpoint_opens2v_00000{i}" / "model.pt",
                          weights_only=True)["generator"] for i in (1, 3)}
    trainable = re.compile("|".join(reference_trainable_patterns(cfg.wan_config())))
    assert step[3] and all(trainable.search(k) for k in step[3]) and not set(step[3]) & set(base)
    changed = {k for k in step[3] if not torch.equal(step[3][k], step[1][k])}
    assert {k.split(".")[0] for k in changed} >= {"clip_proj", "vae_proj"}, sorted(changed)  # the adapters learn
    assert {k.split(".")[3] for k in changed if k.startswith("blocks.")} >= {"k_vae", "v_vae", "v_fused"}, changed
    for k in step[3]:
        torch.testing.assert_close(final[k], step[3][k], rtol=0, atol=0)  # the full export holds them
    fresh = CausalWanModel(cfg.wan_config(), CausalConfig(1, True))  # the seed's load, into the causal model
    missing, unexpected = fresh.load_state_dict(step[3], strict=False)
    assert not unexpected and set(missing) == set(base)
    meta = json.loads((tmp_path / "run" / "checkpoint_opens2v_000003" / "meta.json").read_text())
    assert meta["compat"]["causal"]["teacher_forcing"] is True
