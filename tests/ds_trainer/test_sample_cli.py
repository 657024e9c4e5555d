"""`wanspeed sample`: the samplers against Wan's official grid and each other, guidance, subject
images, checkpoint refusals, and the command end to end on the demo's tiny data, encoders and
base (the trained weights are written by the trainer's own export code over perturbed adapters)."""
import json
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from ds_trainer.commands import main as wanspeed
from ds_trainer.sample import GuidanceBranches, denoise, guided_flow, latent_frames_for, load_subject_image
from ds_trainer.schedulers import FlowSampler
from model.conditioning import Conditioning
from model.config import WAN_TINY, ReferencePathsConfig
from model.wan import WanModel

SHIFTS = (1.0, 3.0, 5.0, 8.0)


def wan_official_sigmas(steps: int, shift: float, sigma_max: float) -> np.ndarray:
    """Wan2.1's grid, written out: s = linspace(sigma_max, 0, steps + 1)[:-1], shifted, then 0
    (sigma_max = 1 - 1/1000 for its UniPC solver, 1 for `get_sampling_sigmas`)."""
    s = np.linspace(sigma_max, 0.0, steps + 1)[:-1]
    return np.append(shift * s / (1 + (shift - 1) * s), 0.0)


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("steps", [1, 4, 50])
def test_diffusers_schedulers_run_on_wans_official_sigma_grid(shift, steps):
    unipc, euler = FlowSampler("unipc", steps, shift), FlowSampler("euler", steps, shift)
    np.testing.assert_allclose(unipc.sigmas.numpy(), wan_official_sigmas(steps, shift, 1 - 1 / 1000), atol=1e-7)
    np.testing.assert_allclose(euler.sigmas.numpy(), wan_official_sigmas(steps, shift, 1.0), atol=1e-7)
    # what the model is fed: Wan's UniPC path casts 1000 sigma to int64, the Euler one keeps floats
    assert unipc.timesteps.dtype == torch.int64
    assert unipc.timesteps.tolist() == (unipc.sigmas[:-1].double() * 1000).long().tolist()
    torch.testing.assert_close(euler.timesteps, euler.sigmas[:-1] * 1000)
    # the Euler grid is the training module's sampling grid
    from model.flow_matching import FlowMatchingScheduler
    torch.testing.assert_close(euler.sigmas, FlowMatchingScheduler(shift=shift).sampling_sigmas(steps))


def _tiny_reference_model(seed=0):
    torch.manual_seed(seed)
    model = WanModel(WAN_TINY.replace(reference_paths=ReferencePathsConfig(clip=True, vae=True))).eval()
    torch.nn.init.normal_(model.head.head.weight, std=WAN_TINY.dim ** -0.5)  # a head that says something
    return model


def _branches(g, ref_scale=1.0):
    def cond(context):
        return Conditioning(context, ref_vae=torch.randn(1, 1, 16, 4, 4, generator=g) * ref_scale,
                            ref_vae_lens=torch.tensor([16]), ref_clip=torch.randn(1, 1, 3, WAN_TINY.clip_dim, generator=g),
                            ref_clip_lens=torch.tensor([3]))
    from ds_trainer.sample import without_references
    full, neg = cond(torch.randn(1, 5, WAN_TINY.text_dim, generator=g)), cond(torch.randn(1, 5, WAN_TINY.text_dim, generator=g))
    return GuidanceBranches(full, neg, without_references(full), without_references(neg))


def test_unipc_with_few_steps_agrees_with_euler_with_many():
    model = _tiny_reference_model()
    g = torch.Generator().manual_seed(1)
    br = _branches(g)
    noise = torch.randn(1, 16, 1, 4, 4, generator=g)
    exact = denoise(model, noise, br, FlowSampler("euler", 60, 5.0), 1.0, None)  # ~0.8% from the ODE's end
    unipc = denoise(model, noise, br, FlowSampler("unipc", 12, 5.0), 1.0, None)
    euler = denoise(model, noise, br, FlowSampler("euler", 12, 5.0), 1.0, None)
    err = lambda x: float((x - exact).norm() / exact.norm())  # noqa: E731
    assert err(unipc) < 0.025, err(unipc)  # measured 1.2%
    assert err(unipc) < 0.5 * err(euler), (err(unipc), err(euler))  # second order beats first (3.7%)  # second order beats first order


def test_reference_guidance_is_plain_cfg_until_the_references_matter():
    """Zero-initialised value paths (an untrained adapter): text+ref == text-only, so any reference
    guidance gives plain CFG; with non-zero value paths it moves the result."""
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(1, 16, 1, 4, 4, generator=g), torch.tensor([700.0])
    untrained = WanModel(WAN_TINY.replace(reference_paths=ReferencePathsConfig(clip=True, vae=True))).eval()
    torch.nn.init.normal_(untrained.head.head.weight, std=0.1)
    br = _branches(g)
    with torch.no_grad():
        plain = guided_flow(untrained, x, t, br, 4.0, None)
        torch.testing.assert_close(guided_flow(untrained, x, t, br, 4.0, 3.0), plain, atol=1e-5, rtol=1e-5)
        cfg_by_hand = untrained(x, t, br.negative) + 4.0 * (untrained(x, t, br.full) - untrained(x, t, br.negative))
        torch.testing.assert_close(plain, cfg_by_hand)
        trained = _tiny_reference_model()
        for p in trained.parameters():
            p.normal_(0, 0.05, generator=g)
        a, b = guided_flow(trained, x, t, br, 4.0, 1.0), guided_flow(trained, x, t, br, 4.0, 3.0)
        assert (a - b).abs().max() > 1e-3
        # text-only really drops the references: changing them does not move that branch
        moved = br.text.replace(ref_vae=br.text.ref_vae * 5)
        torch.testing.assert_close(trained(x, t, moved), trained(x, t, br.text))


def test_subject_images_are_cut_out_on_white_like_the_training_data(tmp_path):
    from PIL import Image
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[10:30, 20:40] = (200, 30, 30, 255)  # an opaque red square on a transparent (black) field
    Image.fromarray(rgba).save(tmp_path / "s.png")
    img = load_subject_image(tmp_path / "s.png", 32, 48)
    assert img.shape == (3, 32, 48)
    assert torch.equal(img[:, 0, 0], torch.ones(3))  # letterbox padding is white, not the black field
    red = torch.tensor([200, 30, 30]) / 127.5 - 1
    torch.testing.assert_close(img[:, 16, 24], red, atol=2e-2, rtol=0)  # cropped to the box: fills the middle
    Image.fromarray(rgba[..., :3]).save(tmp_path / "opaque.png")  # opaque: taken as it is (black shows)
    assert load_subject_image(tmp_path / "opaque.png", 32, 48)[:, 16, 2].max() < -0.9
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(ValueError, match="fully transparent"):
        load_subject_image(tmp_path / "empty.png", 32, 48)
    with pytest.raises(FileNotFoundError, match="--subject-image: no such file"):
        load_subject_image(tmp_path / "nope.png", 32, 48)


def test_frames_must_fit_the_vae_stride():
    assert latent_frames_for(9) == 3 and latent_frames_for(1) == 1
    with pytest.raises(ValueError, match=r"--frames must be 1 \+ 4k .* got 10; e.g. 9 or 13"):
        latent_frames_for(10)


# ------------------------------------------------------------------------------ the command


def _export_perturbed(model, cfg, ckpt, g):
    """Perturb the trainable weights as training would (from `g`) and export them into `ckpt` as
    the trainer does (AdapterTrainer.write_exports)."""
    from ds_trainer.adapter_trainer import AdapterTrainer
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    ckpt.mkdir()
    AdapterTrainer.write_exports(types.SimpleNamespace(model=model, stage=0, cfg=cfg), ckpt)
    return ckpt


@pytest.fixture(scope="module")
def adapter_ckpt(demo_config, tmp_path_factory):
    """A checkpoint_opens2v_ directory as the trainer exports it (AdapterTrainer.write_exports and
    its compatibility key) over the demo base, with the adapters perturbed as training would."""
    from ds_trainer.adapter_trainer import AdapterTrainer
    from ds_trainer.config import load_train_config
    from ds_trainer.sample_weights import base_generator
    from ds_trainer.trainable import apply_freeze, reference_trainable_patterns

    cfg = load_train_config(demo_config)
    model = base_generator(cfg, cfg.wan_config())
    apply_freeze(model, reference_trainable_patterns(model.config))
    g = torch.Generator().manual_seed(3)
    ckpt = _export_perturbed(model, cfg, tmp_path_factory.mktemp("sample") / "checkpoint_opens2v_000004", g)
    (ckpt / "meta.json").write_text(json.dumps({"compat": AdapterTrainer.compatibility_key(cfg), "complete": True},
                                               default=str))
    return ckpt


def _subject(tmp_path: Path) -> Path:
    from PIL import Image
    yy, xx = np.mgrid[:48, :64]
    rgba = np.zeros((48, 64, 4), np.uint8)
    inside = ((yy - 24) / 16) ** 2 + ((xx - 32) / 24) ** 2 < 1
    rgba[inside] = (220, 40, 30, 255)
    rgba[inside & (xx % 8 < 4)] = (30, 40, 220, 255)
    Image.fromarray(rgba).save(tmp_path / "subject.png")
    return tmp_path / "subject.png"


def _sample(config, ckpt, out, *extra):
    return wanspeed(["sample", "--config", str(config), "--ckpt", str(ckpt), "--prompt", "a red striped ellipse",
                     "--steps", "3", "--out", str(out), *extra])


def _decord_count_and_size(path: Path) -> tuple[int, int, int]:
    import decord
    reader = decord.VideoReader(str(path))
    return (len(reader), *reader[0].shape[:2])


def _frames(path: Path) -> np.ndarray:
    """The decoded pixels, [T, H, W, 3] uint8. Through imageio's ffmpeg, not decord: decord 0.6
    mis-strides frames whose rows are not a multiple of 32 bytes (the tiny 48-pixel width), as
    [H, W, 4] arrays from single reads and an error from get_batch."""
    import imageio.v2 as imageio
    return np.stack(imageio.mimread(str(path)))


def test_sample_command_writes_a_deterministic_h264_video_and_a_contact_sheet(demo_config, adapter_ckpt, tmp_path,
                                                                               capsys):
    from PIL import Image
    subject = _subject(tmp_path)
    assert _sample(demo_config, adapter_ckpt, tmp_path / "a.mp4", "--subject-image", str(subject),
                   "--frames", "9", "--grid", "--ref-guidance", "2.0") == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert _decord_count_and_size(tmp_path / "a.mp4") == (9, 32, 48) and report["frames"] == 9
    a = _frames(tmp_path / "a.mp4")
    assert a.shape == (9, 32, 48, 3)
    sheet = Image.open(report["grid"])
    assert sheet.size[1] == 32 and sheet.size[0] > 48 * 7  # subject + 6 frames, side by side
    _sample(demo_config, adapter_ckpt, tmp_path / "b.mp4", "--subject-image", str(subject), "--frames", "9",
            "--ref-guidance", "2.0")
    assert np.array_equal(_frames(tmp_path / "b.mp4"), a)  # same seed, same video
    _sample(demo_config, adapter_ckpt, tmp_path / "c.mp4", "--subject-image", str(subject), "--frames", "9",
            "--ref-guidance", "2.0", "--seed", "1", "--sampler", "euler")
    assert not np.array_equal(_frames(tmp_path / "c.mp4"), a)


def test_sample_command_refuses_a_checkpoint_of_another_model_config(demo_config, adapter_ckpt, tmp_path):
    other = tmp_path / "no_fused.yaml"
    other.write_text(Path(demo_config).read_text().replace("train_fused_path: true", "train_fused_path: false"))
    with pytest.raises(SystemExit, match=r"trained with another model config .*model\.reference_paths\.fused: "
                                         r"checkpoint True vs this run False"):
        _sample(other, adapter_ckpt, tmp_path / "x.mp4", "--subject-image", str(_subject(tmp_path)))
    bare = tmp_path / "bare"  # no meta.json: the keys say it
    bare.mkdir()
    shutil.copy(adapter_ckpt / "model.pt", bare / "model.pt")
    with pytest.raises(SystemExit, match=r"keys the model lacks: \['blocks\.0\.cross_attn\.k_fused"):
        _sample(other, bare / "model.pt", tmp_path / "x.mp4", "--subject-image", str(_subject(tmp_path)))


def test_sample_command_names_the_missing_subject_image_flag(demo_config, adapter_ckpt, tmp_path):
    with pytest.raises(SystemExit, match="give the subject with --subject-image IMG"):
        _sample(demo_config, adapter_ckpt, tmp_path / "x.mp4")
    with pytest.raises(SystemExit, match="--subject-image: no such file"):
        _sample(demo_config, adapter_ckpt, tmp_path / "x.mp4", "--subject-image", str(tmp_path / "missing.png"))


def test_lora_checkpoints_load_from_model_pt_or_the_peft_dir_merged_or_not(demo_config, tmp_path):
    """A LoRA run's exports (AdapterTrainer.write_exports: model.pt, adapter.safetensors, lora/):
    every form gives the trained model's output; --merge-lora folds LoRA in with the same output."""
    from ds_trainer.config import load_train_config
    from ds_trainer.sample import build_generator
    from ds_trainer.sample_weights import base_generator
    from ds_trainer.trainable import apply_freeze, apply_lora, reference_trainable_patterns

    config = tmp_path / "lora.yaml"
    config.write_text(Path(demo_config).read_text().replace("# adapter: {", "adapter: {"))
    cfg = load_train_config(config)
    model = apply_lora(base_generator(cfg, cfg.wan_config()), cfg.adapter)
    apply_freeze(model, reference_trainable_patterns(model.config))
    g = torch.Generator().manual_seed(3)
    ckpt = _export_perturbed(model, cfg, tmp_path / "checkpoint_opens2v_000002", g)
    x, t = torch.randn(1, 16, 2, 4, 6, generator=g), torch.tensor([500.0])
    cond = Conditioning(torch.randn(1, 5, WAN_TINY.text_dim, generator=g), ref_vae=torch.randn(1, 1, 16, 4, 6, generator=g),
                        ref_vae_lens=torch.tensor([24]), ref_clip=torch.randn(1, 1, 7, WAN_TINY.clip_dim, generator=g),
                        ref_clip_lens=torch.tensor([7]))
    with torch.no_grad():
        expected = model.eval()(x, t, cond)
        for source, merge in ((ckpt, False), (ckpt / "lora", False), (ckpt / "lora", True), (ckpt / "model.pt", True)):
            got = build_generator(cfg, source, str(config), merge_lora=merge)(x, t, cond)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"{source.name} merge={merge}")
        with pytest.raises(ValueError, match="holds LoRA weights but .* has no `adapter` section"):
            build_generator(load_train_config(demo_config), ckpt / "model.pt", str(demo_config))
