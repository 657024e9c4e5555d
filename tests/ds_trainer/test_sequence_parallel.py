"""`sequence_parallel_size` / `--sp`: a 2-rank SP = 2 adapter run trains exactly as a 1-rank run
(same samples, same noise, same gradients), its checkpoint resumes with another K (SP = 1 on one
rank) and continues the same losses, and the settings are checked at load."""
from pathlib import Path

import pytest
import torch

from ds_trainer.config import load_train_config
from ds_trainer.demo import prepare_dmd
from ds_trainer.ds_config import read_ds_config, resolve_ds_config
from ds_trainer.metrics import read_metrics
from model.config import ConfigError
from tests.ds_trainer.conftest import finished, launch

SETS = ("lr=0.01", "warmup_steps=2", "max_iters=6", "log_iters=3")


@pytest.mark.slow
def test_two_rank_sp2_run_gives_the_one_rank_loss_sequence(demo_config, tmp_path):
    # both runs at once: the suite's wall time pays for one
    runs = {"sp1": launch(demo_config, tmp_path / "sp1", ranks=1, sets=SETS, wait=False),
            "sp2": launch(demo_config, tmp_path / "sp2", ranks=2, sets=SETS, extra=("--sp", "2"), wait=False)}
    for proc in runs.values():
        proc.output, _ = proc.communicate(timeout=600)
        assert finished(proc)["step"] == 6
    assert "sequence parallel: 1 data-parallel groups of 2 ranks" in runs["sp2"].output
    rows = {name: read_metrics(tmp_path / name) for name in runs}
    for key in ("loss", "grad_norm"):  # the grad norm catches a gradient scaled by K (Adam would hide it)
        one, two = (torch.tensor([r[key] for r in rows[n]], dtype=torch.float64) for n in ("sp1", "sp2"))
        assert len(one) == 6 and (one - two).abs().max() < 1e-5, (key, one, two)
    assert rows["sp2"][0]["samples_per_s"] > 0
    # the SP = 2 run's step-3 checkpoint resumes with K = 1 on one rank (2 -> 1 ranks: the universal
    # conversion) and continues with the uninterrupted K = 1 run's losses
    import shutil
    resumed = tmp_path / "sp2-to-sp1"
    shutil.copytree(tmp_path / "sp2", resumed, ignore=shutil.ignore_patterns("checkpoint_*000006*", "metrics.jsonl"))
    proc = launch(demo_config, resumed, ranks=1, sets=SETS)
    assert finished(proc)["step"] == 6 and "checkpoint_opens2v_000003" in proc.output
    after = {r["step"]: r["loss"] for r in read_metrics(resumed)}
    assert sorted(after) == [4, 5, 6], after
    for r in rows["sp1"][3:]:
        assert abs(after[r["step"]] - r["loss"]) < 1e-5, (r["step"], after, rows["sp1"])


def test_sequence_parallel_size_is_checked_at_load(demo_config):
    assert load_train_config(demo_config).sequence_parallel_size == 1
    assert load_train_config(demo_config, {"sequence_parallel_size": 2}).sequence_parallel_size == 2
    with pytest.raises(ConfigError, match="sequence_parallel_size.*between 1 and 64, got 0"):
        load_train_config(demo_config, {"sequence_parallel_size": 0})
    with pytest.raises(ConfigError, match="sequence_parallel_size.*more than the model's 2 attention heads"):
        load_train_config(demo_config, {"sequence_parallel_size": 4})  # the tiny model has 2 heads
    dmd = prepare_dmd(Path(demo_config).parent)
    assert load_train_config(dmd).sequence_parallel_size == 1
    assert load_train_config(dmd, {"sequence_parallel_size": 2}).sequence_parallel_size == 2
    with pytest.raises(ConfigError, match="sequence_parallel_size.*more than the generator's 2 attention heads"):
        load_train_config(dmd, {"sequence_parallel_size": 4})


def test_zero3_with_sp_takes_deepspeeds_summing_reduction():
    cfg = resolve_ds_config(read_ds_config("3"), 1, 1, 1.0, False, 1, sequence_parallel_size=2)
    assert cfg["sequence_parallel_size"] == 2 and cfg["zero_optimization"]["reduce_scatter"] is False
    assert "sequence_parallel_size" not in resolve_ds_config(read_ds_config("3"), 1, 1, 1.0, False, 2)
    raw = read_ds_config("3")
    raw["zero_optimization"]["reduce_scatter"] = True
    with pytest.raises(ConfigError, match="reduce_scatter=True cannot be used with sequence parallelism"):
        resolve_ds_config(raw, 1, 1, 1.0, False, 1, sequence_parallel_size=2)
