"""Loss curves of a run (raw and smoothed) as a PNG; `wanspeed plot` (ds_trainer/commands/plot.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ds_trainer.metrics import read_metrics


def plot_loss(logdir: Path, out: Path | None = None, smooth: int = 10, keys: Sequence[str] = ("loss",),
              ylabel: str = "flow-matching MSE") -> Path:
    """One panel per metric in `keys` (rows without the metric, e.g. DMD's generator_loss on
    critic-only steps, are left out of that curve)."""
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = read_metrics(logdir)
    if not rows:
        raise SystemExit(f"{logdir}: no metrics.jsonl rows to plot")
    missing = [k for k in keys if not any(k in r for r in rows)]
    if missing:
        raise SystemExit(f"{logdir}: metrics.jsonl has no {missing[0]!r} (it has {sorted(rows[0])})")
    fig, axes = plt.subplots(1, len(keys), figsize=(7 * len(keys), 4), dpi=100, squeeze=False)
    for ax, key in zip(axes[0], keys):
        steps, loss = zip(*[(r["step"], r[key]) for r in rows if key in r])
        w = max(1, min(smooth, len(loss)))
        avg = [sum(loss[max(0, i - w + 1): i + 1]) / len(loss[max(0, i - w + 1): i + 1]) for i in range(len(loss))]
        ax.plot(steps, loss, alpha=0.35, label=key)
        ax.plot(steps, avg, label=f"moving average ({w})")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel if len(keys) == 1 else key)
        ax.set_title(Path(logdir).name)
        ax.grid(alpha=0.3)
        ax.legend()
    out = out or Path(logdir) / "loss.png"
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
