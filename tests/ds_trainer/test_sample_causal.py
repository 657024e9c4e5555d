"""`wanspeed sample`'s causal I2V mode on the tiny DMD config: the streamed mp4 equals generating every
block then decoding once, the EMA generator is the one sampled, and bad input is a clear error."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ds_trainer.commands import main as wanspeed


@pytest.fixture(scope="module")
def dmd_ckpt(demo_config, tmp_path_factory):
    """(config, checkpoint_model_ dir, first-frame png): model.pt in Self-Forcing's layout
    ({"generator" | "generator_ema": {"model.<key>": ...}}, as the DMD job writes it) over the tiny
    I2V base, the EMA perturbed so it differs from the generator, and the job's compatibility key."""
    from PIL import Image

    from ds_trainer.config import load_train_config
    from ds_trainer.demo import prepare_dmd
    from ds_trainer.dmd_trainer import DMDTrainer
    from model.checkpoint import read_checkpoint, strip_wrapper_prefix

    config = prepare_dmd(Path(demo_config).parent)
    cfg = load_train_config(config)
    base = strip_wrapper_prefix(read_checkpoint(cfg.generator_ckpt)[0])[0]
    g = torch.Generator().manual_seed(0)
    ema = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    ckpt = tmp_path_factory.mktemp("causal") / "checkpoint_model_000006"
    ckpt.mkdir()
    torch.save({"generator": {f"model.{k}": v for k, v in base.items()},
                "generator_ema": {f"model.{k}": v for k, v in ema.items()}}, ckpt / "model.pt")
    (ckpt / "meta.json").write_text(json.dumps({"compat": DMDTrainer.compatibility_key(cfg), "complete": True},
                                               default=str))
    yy, xx = np.mgrid[:64, :96]
    frame = np.stack([(xx * 2.6).astype(np.uint8), (yy * 3.9).astype(np.uint8), np.full_like(xx, 90, np.uint8)], -1)
    frame[20:44, 30:60] = (230, 40, 40)
    Image.fromarray(frame).save(ckpt.parent / "first.png")
    return config, ckpt, ckpt.parent / "first.png", ema


def test_streamed_blocks_equal_generating_all_blocks_then_decoding(dmd_ckpt):
    from ds_trainer.causal_sample import i2v_inputs, load_causal_generator, stream_rollout
    from ds_trainer.config import load_train_config
    from ds_trainer.stream_decode import StreamingDecoder
    from model.encoders.bundle import load_frozen_encoders

    config, ckpt, image, ema = dmd_ckpt
    cfg = load_train_config(config)
    model = load_causal_generator(cfg, ckpt, str(config))
    torch.testing.assert_close(model.state_dict()["head.head.weight"], ema["head.head.weight"], rtol=0, atol=0)
    encoders = load_frozen_encoders(cfg.encoders)
    frames = 7  # longer than the 5 training frames: the image + 3 blocks of 2
    cond, first, _ = i2v_inputs(cfg, encoders, image, "a red box", frames)

    def noise_and_rng():
        rng = torch.Generator().manual_seed(4)
        return torch.randn((1, 16, *cond.y.shape[2:]), generator=rng), rng

    decoder, streamed, order = StreamingDecoder(encoders.vae), [], []

    def on_block(index, x0):
        order.append((index, x0.shape[2]))
        streamed.append(decoder.push(x0))

    noise, rng = noise_and_rng()
    latents = stream_rollout(model, cfg, cond, first, noise, rng, on_block)
    decoder.close()
    assert order == [(0, 1), (1, 2), (2, 2), (3, 2)]
    assert [c.shape[2] for c in streamed] == [1, 8, 8, 8]  # pixel frames as each block finishes
    torch.testing.assert_close(latents[:, :, :1], first)  # the image latent is the first block
    noise, rng = noise_and_rng()
    again = stream_rollout(model, cfg, cond, first, noise, rng)  # all blocks, no streaming
    torch.testing.assert_close(again, latents, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(streamed, dim=2), encoders.vae.decode(again), rtol=0, atol=1e-6)


def test_causal_sample_command_writes_the_requested_frames(dmd_ckpt, tmp_path, capsys):
    import decord
    config, ckpt, image, _ = dmd_ckpt
    assert wanspeed(["sample", "--config", str(config), "--ckpt", str(ckpt), "--prompt", "a red box", "--image",
                     str(image), "--frames", "25", "--grid", "--out", str(tmp_path / "v.mp4")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    reader = decord.VideoReader(str(tmp_path / "v.mp4"))
    assert (len(reader), *reader[0].shape[:2]) == (25, 32, 48)
    assert report["blocks"] == 4 and Path(report["grid"]).is_file()


def test_causal_sample_command_names_what_is_wrong(dmd_ckpt, tmp_path):
    config, ckpt, image, _ = dmd_ckpt
    base = ["sample", "--config", str(config), "--ckpt", str(ckpt), "--prompt", "a", "--out", str(tmp_path / "v.mp4")]
    with pytest.raises(SystemExit, match="needs the first frame: give it with --image"):
        wanspeed(base)
    with pytest.raises(SystemExit, match=r"--frames 13: 4 latent frames do not split into blocks"):
        wanspeed(base + ["--image", str(image), "--frames", "13"])
    with pytest.raises(SystemExit, match=r"--image .*missing\.png"):
        wanspeed(base + ["--image", str(tmp_path / "missing.png")])
    other = tmp_path / "other.yaml"
    other.write_text(Path(config).read_text().replace("generator: {preset: tiny-i2v,",
                                                      "generator: {preset: tiny-i2v, overrides: {num_layers: 1},"))
    with pytest.raises(SystemExit, match=r"another model config .*generator\.num_layers: checkpoint 2 vs this run 1"):
        wanspeed(["sample", "--config", str(other), *base[3:], "--image", str(image)])


def test_longlive_lora_pt_loads_on_its_base_and_is_merged(dmd_ckpt, tmp_path):
    """LongLive's inference inputs: `longlive_base.pt` ({"generator": {"model.<key>"}}) as the
    config's generator_ckpt and `lora.pt` ({"generator_lora": peft's state dict of a peft model
    over the generator, LoRA on every Linear of the causal blocks, r = alpha}); the loaded model
    equals the peft model's forward (merged), its Linears are plain again."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from ds_trainer.causal_sample import load_causal_generator
    from ds_trainer.config import load_train_config
    from model.causal import CausalWanModel
    from model.checkpoint import read_checkpoint, strip_wrapper_prefix

    config, _, _, _ = dmd_ckpt
    cfg = load_train_config(config)
    base = strip_wrapper_prefix(read_checkpoint(cfg.generator_ckpt)[0])[0]
    torch.save({"generator": {f"model.{k}": v for k, v in base.items()}}, tmp_path / "longlive_base.pt")
    cfg = dataclasses.replace(cfg, generator_ckpt=str(tmp_path / "longlive_base.pt"))
    reference = CausalWanModel(cfg.generator.architecture(), cfg.causal.causal_config())
    reference.load_state_dict(base)
    targets = sorted({n for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")})
    peft_model = get_peft_model(reference, LoraConfig(r=4, lora_alpha=4, target_modules=targets))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    ckpt = tmp_path / "lora.pt"
    torch.save({"generator_lora": get_peft_model_state_dict(peft_model), "critic_lora": {}, "step": 3}, ckpt)
    assert all(k.startswith("base_model.model.blocks.") for k in torch.load(ckpt)["generator_lora"])

    loaded = load_causal_generator(cfg, ckpt, str(config))
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    name = targets[0]
    lora_a = peft_model.get_submodule(name).lora_A["default"].weight
    lora_b = peft_model.get_submodule(name).lora_B["default"].weight
    torch.testing.assert_close(loaded.get_submodule(name).weight, base[f"{name}.weight"] + lora_b @ lora_a)
    untouched = "head.head.weight"
    assert torch.equal(loaded.state_dict()[untouched], base[untouched])

    # with an adapter section, its alpha scales the update and its rank must match
    from ds_trainer.config import AdapterSection
    halved = load_causal_generator(dataclasses.replace(cfg, adapter=AdapterSection(r=4, lora_alpha=2)), ckpt, str(config))
    torch.testing.assert_close(halved.get_submodule(name).weight, base[f"{name}.weight"] + 0.5 * lora_b @ lora_a)
    with pytest.raises(ValueError, match="LoRA rank 4, but the config's adapter.r is 8"):
        load_causal_generator(dataclasses.replace(cfg, adapter=AdapterSection(r=8)), ckpt, str(config))


@pytest.fixture(scope="module")
def switch_setup(dmd_ckpt):
    """The tiny DMD generator with a window of 4 frames and a 1-frame sink, the conditionings of two
    prompts and a 9-frame rollout's noise: blocks (0,1) (1,3) (3,5) (5,7) (7,9)."""
    from ds_trainer.causal_sample import i2v_inputs, load_causal_generator, prompt_conditions
    from ds_trainer.config import load_train_config
    from model.encoders.bundle import load_frozen_encoders

    config, ckpt, image, _ = dmd_ckpt
    cfg = load_train_config(config)
    cfg = dataclasses.replace(cfg, causal=dataclasses.replace(cfg.causal, local_attn_size=4, sink_size=1))
    model = load_causal_generator(cfg, ckpt, str(config))
    encoders = load_frozen_encoders(cfg.encoders)
    cond, first, _ = i2v_inputs(cfg, encoders, image, "a red box", 9)
    (cond_b,) = prompt_conditions(encoders, cond, ["a blue ball rolling away"])
    return cfg, model, cond, cond_b, first


def _switch_rollout(setup, switches, keep_sink=True, spy=None):
    from ds_trainer.causal_sample import stream_rollout
    cfg, model, cond, _, first = setup
    rng = torch.Generator().manual_seed(5)
    noise = torch.randn((1, 16, *cond.y.shape[2:]), generator=rng)
    caches = []
    real = model.new_kv_caches
    model.new_kv_caches = lambda *a, **k: caches.extend(real(*a, **k)) or caches
    original = model.forward_block
    if spy is not None:
        def forward_block(x, t, start, kv, cross, y=None):
            spy.append((start, x.shape[2], float(t.flatten()[0]), cross[0], [c.k.clone() for c in kv]))
            return original(x, t, start, kv, cross, y)
        model.forward_block = forward_block
    try:
        return stream_rollout(model, cfg, cond, first, noise, rng, switches=switches, keep_sink=keep_sink), caches
    finally:
        model.forward_block, model.new_kv_caches = original, real


def test_a_prompt_switch_changes_the_cross_attention_cache_at_its_block_and_recaches(switch_setup):
    """Switch before block 3 (frame 5): blocks 0-2 are those of the one-prompt rollout; then the
    frames the window still sees after the sink (1-4: window 4 minus sink 1 = 3 frames, 2-4) are
    re-run at context_noise under prompt b's cross cache, block by block along the rollout's own
    boundaries (2-3 is the tail of block (1,3)); every later call uses prompt b's cache."""
    from ds_trainer.prompt_switch import PromptSwitch

    cfg, model, cond, cond_b, first = switch_setup
    plain, _ = _switch_rollout(switch_setup, [])
    calls = []
    switched, caches = _switch_rollout(switch_setup, [PromptSwitch(3, cond_b)], spy=calls)
    torch.testing.assert_close(switched[:, :, :5], plain[:, :, :5], rtol=0, atol=0)
    assert (switched[:, :, 5:] - plain[:, :, 5:]).abs().max() > 1e-4
    text_a, text_b = (model.embed_context(c).text for c in (cond, cond_b))
    prompt_of = [("a" if torch.equal(ctx.text, text_a) else "b" if torch.equal(ctx.text, text_b) else "?")
                 for _, _, _, ctx, _ in calls]
    steps = len(cfg.denoising_step_list)
    # block 0 (the image): its clean pass; blocks 1, 2: 4 steps + the clean pass each
    before = 1 + 2 * (steps + 1)
    assert prompt_of[:before] == ["a"] * before and set(prompt_of[before:]) == {"b"}
    recache = [(start, n, t) for start, n, t, _, _ in calls[before:before + 2]]
    assert recache == [(2, 1, cfg.context_noise), (3, 2, cfg.context_noise)]
    assert calls[before + 2][:2] == (5, 2)  # then block 3's first denoising step
    # the sink (frame 0's tokens) is the first prompt's, untouched by the re-cache
    sink = caches[0].sink
    torch.testing.assert_close(calls[before + 2][4][0][:, :sink], calls[before][4][0][:, :sink], rtol=0, atol=0)


def test_recache_sink_rewrites_the_window_from_its_first_frame(switch_setup):
    """LongLive's global_sink false: the cache is emptied and the last 4 frames (1-4) re-run, so frame
    1 becomes the sink."""
    from ds_trainer.prompt_switch import PromptSwitch
    from model.causal import recache_range

    cfg, _, _, cond_b, _ = switch_setup
    causal = cfg.causal.causal_config()
    assert recache_range(5, causal, keep_sink=True) == (2, True)
    assert recache_range(5, causal, keep_sink=False) == (1, False)
    assert recache_range(1, causal, keep_sink=True) == (0, False)  # nothing past the sink yet
    calls = []
    _switch_rollout(switch_setup, [PromptSwitch(3, cond_b)], keep_sink=False, spy=calls)
    starts = [(start, n) for start, n, t, _, _ in calls if t == cfg.context_noise]
    # clean passes of blocks 0-2, the re-cache (1-3, 3-5), clean passes of blocks 3, 4
    assert starts == [(0, 1), (1, 2), (3, 2), (1, 2), (3, 2), (5, 2), (7, 2)]


def test_causal_sample_command_switches_prompts(dmd_ckpt, tmp_path, capsys):
    import decord
    config, ckpt, image, _ = dmd_ckpt
    base = ["sample", "--config", str(config), "--ckpt", str(ckpt), "--image", str(image), "--frames", "25",
            "--out", str(tmp_path / "v.mp4"), "--prompt", "a red box", "--prompt", "a blue ball"]
    assert wanspeed(base + ["--switch-at", "3"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["switch_blocks"] == [2] and len(decord.VideoReader(str(tmp_path / "v.mp4"))) == 25
    with pytest.raises(SystemExit, match=r"--switch-at 4: a switch must be at the first latent frame of a block "
                                         r"after the first; this video's blocks start at \[1, 3, 5\]"):
        wanspeed(base + ["--switch-at", "4"])
    with pytest.raises(SystemExit, match="2 --prompt for 0 --switch-at: give one prompt more than switches"):
        wanspeed(base)
    with pytest.raises(SystemExit, match=r"switches must be in increasing order, got \[5, 3\]"):
        wanspeed(base + ["--prompt", "c", "--switch-at", "5", "--switch-at", "3"])
