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
    save_figure(fig, out)


def plot_front(points: list[dict], x_reward: str, y_reward: str, out: str, title: str = "",
               labels: list[str] | None = None) -> None:
    """Sweep points (`weights`, `rewards`, `on_front`) as a scatter of two rewards' means, the Pareto front
    joined by a line, each point labelled with its weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    xs = [p["rewards"][x_reward] for p in points]
    ys = [p["rewards"][y_reward] for p in points]
    ax.scatter(xs, ys, c=["tab:red" if p["on_front"] else "tab:gray" for p in points], s=28, zorder=3)
    front = sorted((x, y) for x, y, p in zip(xs, ys, points) if p["on_front"])
    if len(front) > 1:
        ax.plot([f[0] for f in front], [f[1] for f in front], color="tab:red", alpha=0.6, label="Pareto front")
        ax.legend(loc="best", fontsize=8)
    for x, y, p in zip(xs, ys, points):
        ax.annotate("/".join(f"{w:.1f}" for w in p["weights"]), (x, y), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel(labels[0] if labels else x_reward)
    ax.set_ylabel(labels[1] if labels else y_reward)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, out)


def save_figure(fig, out, dpi: int = 110) -> None:
    """Write `fig` to OUT atomically (a temporary file beside it, then a rename) and close it."""
    import matplotlib.pyplot as plt

    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, target)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
