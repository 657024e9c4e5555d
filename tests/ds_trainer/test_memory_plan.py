"""The memory planner (ds_trainer/memory_plan.py): parameter counts from the real models, the
frozen-aware ZeRO formulas, the recommendation, `wanspeed plan-memory --write`, `--zero auto`, and
the prediction against the measured peak of real CPU training steps."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ds_trainer import memory_plan as mp
from ds_trainer import memory_trace as mt
from ds_trainer.trainable import reference_trainable_patterns
from model.config import (WAN_I2V_14B, WAN_T2V_1_3B, WAN_T2V_14B, WAN_TINY, ConfigError, ReferencePathsConfig,
                          WanConfig)
from model.wan import WanModel

REPO = Path(__file__).resolve().parents[2]
REFS = ReferencePathsConfig(clip=True, vae=True)
SMALL = WanConfig(dim=256, ffn_dim=1024, freq_dim=64, text_dim=64, clip_dim=64, num_heads=4, num_layers=4,
                  reference_paths=REFS)
"""The 'small' validation model: 4 blocks of dim 256 (head dim 64), with both reference paths."""
MEASURE_TOLERANCE = 0.15
"""Predicted vs measured CPU peak. Measured here: within 6 %. What the prediction cannot see is not
tensors (Python and autograd objects, allocations under the mmap threshold, the CPU flash kernel's
per-thread buffers); a wrong term is far outside it: charging the frozen weights gradients and Adam
moments adds ~70 % on the adapter case, leaving out the activations removes ~45 %."""


def numel_on_meta(cfg: WanConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in WanModel(cfg).parameters())


def frozen_role(arch: WanConfig) -> mp.RoleSpec:
    return mp.RoleSpec("teacher", arch, None, engine_always=False)


# ------------------------------------------------------------------------ parameters
def test_parameter_counts_are_the_real_models():
    c13 = mp.count_params(frozen_role(WAN_T2V_1_3B))
    c14 = mp.count_params(frozen_role(WAN_T2V_14B))
    i2v = mp.count_params(frozen_role(WAN_I2V_14B))
    assert c13.total == numel_on_meta(WAN_T2V_1_3B) and 1.3e9 < c13.total < 1.5e9
    assert c14.total == numel_on_meta(WAN_T2V_14B) and 13.5e9 < c14.total < 15e9
    d, layers = 5120, 40
    image_cross_attention = layers * (2 * (d * d + d) + d)          # k_img, v_img, norm_k_img per block
    img_emb = 2 * 1280 + 1280 * 1280 + 1280 + 1280 * d + d + 2 * d  # LayerNorm, Linear, Linear, LayerNorm
    patch_in = 20 * d * math.prod(WAN_I2V_14B.patch_size)           # in_dim 36 instead of 16
    assert i2v.total - c14.total == image_cross_attention + img_emb + patch_in
    assert c13.trainable == c14.trainable == 0


def test_adapter_and_lora_freezing_follow_the_trainer():
    job = mp.job_from_config(mp.preset_config("wan-1.3b", "adapter", 21, 480, 832, lora_rank=16))
    (role,) = job.roles
    counts = mp.count_params(role)
    d, layers = 1536, 30
    per_block = 2 * 2 * (d * d + d) + 2 * d                     # k/v of the CLIP and VAE paths, two norms
    lora = layers * 8 * 16 * 2 * d                               # q, k, v, o of both attentions, A and B
    assert counts.trainable == layers * per_block + (1280 * d + d) + (16 * d + d) + lora
    assert counts.frozen == numel_on_meta(WAN_T2V_1_3B)
    assert job.tokens == 21 * 30 * 52


# ------------------------------------------------------------------------- formulas
def test_frozen_parameters_get_no_gradient_or_optimizer_bytes():
    counts = mp.count_params(frozen_role(WAN_T2V_14B))
    z = mp.zero_settings("3")
    frozen = mp.role_states(frozen_role(WAN_T2V_14B), counts, "3", 8, True, z)
    assert frozen.gradients == frozen.optimizer == frozen.step == frozen.buffers == 0
    whole = counts.persistent(z["stage3_param_persistence_threshold"], False)
    assert frozen.frozen_weights == int(2 * (whole + (counts.frozen - whole) / 8))
    # DeepSpeed's estimate_zero3_model_states_mem_needs_all_live charges 18 bytes for each of them
    assert 18 * counts.total / 8 / frozen.states > 8.5
    job = mp.job_from_config(mp.preset_config("wan-14b", "adapter", 21, 480, 832))
    adapter = mp.role_states(job.roles[0], mp.count_params(job.roles[0]), "3", 8, True, z)
    t = mp.count_params(job.roles[0]).trainable
    assert adapter.optimizer == int(12 * t / 8) and adapter.gradients == int(2 * t / 8)


def test_zero3_shards_by_gpu_count_and_zero2_replicates_weights():
    job = mp.job_from_config(mp.preset_config("wan-14b", "adapter", 21, 480, 832))
    role, counts = job.roles[0], mp.count_params(job.roles[0])
    z3, z2 = mp.zero_settings("3"), mp.zero_settings("2")
    eight, sixteen = (mp.role_states(role, counts, "3", n, True, z3) for n in (8, 16))
    whole = 2 * counts.persistent(z3["stage3_param_persistence_threshold"], False)
    assert sixteen.frozen_weights - whole == pytest.approx((eight.frozen_weights - whole) / 2, rel=1e-6)
    assert sixteen.optimizer == pytest.approx(eight.optimizer / 2, rel=1e-6)
    two_8, two_16 = (mp.role_states(role, counts, "2", n, True, z2) for n in (8, 16))
    assert two_8.frozen_weights == two_16.frozen_weights == 2 * counts.frozen
    assert two_16.optimizer == pytest.approx(two_8.optimizer / 2, rel=1e-6)
    offload = mp.role_states(role, counts, "3-offload", 8, True, z3)
    assert offload.optimizer == 0 and offload.host > eight.optimizer


def test_layer_extrapolation_equals_a_direct_trace():
    for ckpt in (False, True):
        role = mp.RoleSpec("generator", WAN_TINY.replace(reference_paths=REFS, num_layers=5),
                           reference_trainable_patterns(WAN_TINY.replace(reference_paths=REFS)), checkpointing=ckpt)
        shapes = mt.Shapes(1, 3, 8, 12)

        def one(layers):
            model = mp.build_role(role, layers)
            return mt.trace(model, mt.flow_step_phase(model, shapes))
        assert mt.per_layers(one, 5) == one(5)


# -------------------------------------------------------------------- the recommendation
def tiny_plan(gpu_bytes: int, gpus: int = 2) -> mp.Plan:
    cfg = WAN_TINY.replace(reference_paths=REFS)
    role = mp.RoleSpec("generator", cfg, reference_trainable_patterns(cfg))
    return mp.make_plan(mp.JobSpec("opens2v-adapters", (role,), mt.Shapes(1, 4, 16, 24)), gpus, gpu_bytes,
                        on_gpu=False)


def test_recommendation_fits_and_no_fit_is_a_clear_message():
    roomy = tiny_plan(64 * mp.GIB)
    best = roomy.recommended()
    assert (best.layout, best.checkpointing) == mp.PREFERENCE[0] and best.fits
    assert mp.choose_zero(roomy, checkpointing=True) == "2"
    # between ZeRO-2's peak and ZeRO-3's (its fp32 reduce buckets alone are ~0.6 GiB): ZeRO-3
    z2, z3 = roomy.row("2", True).memory.peak, roomy.row("3", True).memory.peak
    assert z3 < z2
    squeezed = tiny_plan(int((z2 + z3) / 2 / mp.HEADROOM))
    assert squeezed.recommended(True).layout == "3" and squeezed.recommended(True).fits
    assert mp.choose_zero(squeezed, checkpointing=True) == "3"
    tight = tiny_plan(2 ** 20)
    assert tight.recommended() is None
    with pytest.raises(ConfigError, match="no ZeRO config fits 2 GPU"):
        mp.choose_zero(tight, checkpointing=True)


def test_zero_auto_resolves_for_the_run_and_is_refused_unresolved(monkeypatch, caplog):
    from ds_trainer.commands.train import auto_zero
    from ds_trainer.config import AdapterModelSection, TrainConfig
    from ds_trainer.ds_config import read_ds_config
    cfg = TrainConfig(cache_dir="unused", model=AdapterModelSection(preset="tiny"), zero="auto",
                      num_training_frames=2, height=32, width=48)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with caplog.at_level("INFO"):
        assert auto_zero(cfg) == "2"  # a tiny model fits in any host's memory
    assert "zero: auto -> ZeRO-2" in caplog.text and "2 GPU(s)" in caplog.text
    with pytest.raises(ConfigError, match="'auto' is resolved first"):
        read_ds_config("auto")


def test_plan_memory_writes_a_deepspeed_config(tmp_path, capsys):
    from deepspeed.runtime.config import DeepSpeedConfig
    from ds_trainer.commands import main
    out = tmp_path / "ds.json"
    assert main(["plan-memory", "--model", "wan-1.3b", "--frames", "5", "--height", "240", "--width", "416",
                 "--gpus", "1", "--gpu-mem", "80", "--write", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "zero3+offload ckpt off" in printed and "recommended: --zero 2" in printed
    parsed = DeepSpeedConfig(json.loads(out.read_text()))  # no process group: a world of one
    assert parsed.zero_optimization_stage == 2 and parsed.bfloat16_config.enabled and parsed.train_batch_size == 1
    assert main(["plan-memory", "--model", "wan-14b", "--gpus", "1", "--gpu-mem", "8",
                 "--write", str(tmp_path / "none.json")]) == 1
    assert "no ZeRO config fits 1 GPU(s) of 8 GiB" in capsys.readouterr().out
    assert not (tmp_path / "none.json").exists()


# ----------------------------------------------------------------- against measurements
CASES = {  # name -> (arch, latent frames, h, w, activation checkpointing, train everything)
    "small adapters, no checkpointing": (SMALL, 4, 16, 24, False, False),
    "small full fine-tune, checkpointing": (SMALL, 4, 16, 24, True, True),
}


def predicted_peak(arch, frames, h, w, ckpt, full) -> int:
    patterns = (r".",) if full else reference_trainable_patterns(arch)
    job = mp.JobSpec("opens2v-adapters", (mp.RoleSpec("generator", arch, patterns, checkpointing=ckpt),),
                     mt.Shapes(1, frames, h, w))
    plan = mp.make_plan(job, 1, 24 * mp.GIB, on_gpu=False, layouts=(mp.PLAIN,), checkpointing=(ckpt,))
    return plan.rows[0].memory.peak


def test_prediction_within_tolerance_of_measured_cpu_peaks():
    """Real training steps (forward, backward, AdamW) in fresh processes, both at once."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(REPO)}
    procs = {}
    for name, (arch, f, h, w, ckpt, full) in CASES.items():
        spec = {"arch": arch.to_dict(), "frames": f, "height": h, "width": w, "checkpointing": ckpt, "full": full}
        procs[name] = subprocess.Popen([sys.executable, str(REPO / "tests/ds_trainer/memory_probe.py"), json.dumps(spec)],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr[-2000:]
        measured = json.loads(stdout.strip().splitlines()[-1])["peak_bytes"]
        predicted = predicted_peak(*CASES[name])
        assert abs(predicted - measured) <= MEASURE_TOLERANCE * measured, (name, predicted, measured)
