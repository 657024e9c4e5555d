"""The loss curve of a run (raw and smoothed) as a PNG; `wanspeed plot` (ds_trainer/commands/plot.py)."""
from __future__ import annotations

from pathlib import Path

from ds_trainer.metrics import read_metrics


def plot_loss(logdir: Path, out: Path | None = None, smooth: int = 10) -> Path:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = read_metrics(logdir)
    if not rows:
        raise SystemExit(f"{logdir}: no metrics.jsonl rows to plot")
    steps, loss = [r["step"] for r in rows], [r["loss"] for r in rows]
    w = max(1, min(smooth, len(loss)))
    avg = [sum(loss[max(0, i - w + 1): i + 1]) / len(loss[max(0, i - w + 1): i + 1]) for i in range(len(loss))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, loss, alpha=0.35, label="loss")
    ax.plot(steps, avg, label=f"moving average ({w})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("flow-matching MSE")
    ax.set_title(Path(logdir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = out or Path(logdir) / "loss.png"
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
