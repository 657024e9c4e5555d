"""metrics.jsonl rows and the progress bar (rank 0 only)."""
from ds_trainer.metrics import MetricsLogger, read_metrics


def _logger(tmp_path, rank):
    return MetricsLogger(tmp_path, rank=rank, total_steps=2, start_step=0, wandb_cfg=None, disable_wandb=True,
                         run_config={})


def test_rank_zero_writes_rows_and_shows_the_data_wait_share(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANSPEED_NO_PROGRESS", raising=False)
    metrics = _logger(tmp_path, rank=0)
    metrics.log(1, {"loss": 1.5, "samples_per_s": 2.0, "step_time_s": 2.0, "data_wait_s": 0.5})
    metrics.close()
    assert "data=25%" in capsys.readouterr().err  # 0.5 s of a 2 s step waiting for data
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.5, "samples_per_s": 2.0, "step_time_s": 2.0,
                                       "data_wait_s": 0.5}]


def test_other_ranks_write_nothing(tmp_path):
    metrics = _logger(tmp_path, rank=1)
    metrics.log(1, {"loss": 1.0, "samples_per_s": 1.0, "step_time_s": 1.0})
    metrics.close()
    assert read_metrics(tmp_path) == []


def _row(step, loss):
    return {"loss": loss, "samples_per_s": 1.0, "step_time_s": 1.0}


def test_a_run_from_step_zero_starts_a_fresh_file_and_keeps_the_old_one(tmp_path):
    """`--no-auto-resume` in a used log dir: two runs' rows are never mixed in one file."""
    for loss in (1.0, 2.0):
        metrics = _logger(tmp_path, rank=0)
        metrics.log(1, _row(1, loss))
        metrics.close()
    assert [r["loss"] for r in read_metrics(tmp_path)] == [2.0]
    kept = (tmp_path / "metrics.previous-1.jsonl").read_text()
    assert '"loss": 1.0' in kept and '"loss": 2.0' not in kept


def test_a_resumed_run_appends(tmp_path):
    first = _logger(tmp_path, rank=0)
    first.log(1, _row(1, 1.0))
    first.close()
    resumed = MetricsLogger(tmp_path, rank=0, total_steps=2, start_step=1, wandb_cfg=None, disable_wandb=True,
                            run_config={})
    resumed.log(2, _row(2, 0.5))
    resumed.close()
    assert [r["loss"] for r in read_metrics(tmp_path)] == [1.0, 0.5]
    assert not (tmp_path / "metrics.previous-1.jsonl").exists()
