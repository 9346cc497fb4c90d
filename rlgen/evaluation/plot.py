"""Training curves from metrics.jsonl (matplotlib, headless)."""
from __future__ import annotations

import os
from pathlib import Path

CURVES = (("reward", "train reward"), ("accuracy", "train accuracy"), ("eval/accuracy", "held-out accuracy"),
          ("eval/reward", "held-out reward"), ("loss", "loss"))


def plot_run(rows: list[dict], out: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [(key, label) for key, label in CURVES if any(r.get(key) is not None for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(present)), figsize=(4.2 * max(1, len(present)), 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], present):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(points) < 30 else None, markersize=3)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, target)
