"""Put the demo's grids side by side with their mean rewards: python figure.py OUT_DIR FIGURE.png"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

PANELS = [  # (grid, evaluation, title)
    ("base", "tiny-digits (base), ddim eta=1 10 steps", "tiny-digits (base)\nDDIM eta=1, 10 steps"),
    ("ddpo", "ddpo, ddim eta=1 10 steps", "after train ddpo\nDDIM eta=1, 10 steps"),
    ("base-ode", "tiny-digits (base), ode 20 steps", "tiny-digits (base)\nODE, 20 steps"),
    ("reward-backprop", "reward-backprop, ode 20 steps", "after train reward-backprop\nODE, 20 steps"),
    ("flow-base", "tiny-digits-flow (base), ode 20 steps", "tiny-digits-flow (base)\nODE, 20 steps"),
    ("flow-grpo", "flow-grpo, ode 20 steps", "after train flow-grpo\nODE, 20 steps"),
]


def main() -> None:
    out, figure = Path(sys.argv[1]), sys.argv[2]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(2.6 * len(PANELS), 4.4))
    for ax, (grid, result, title) in zip(axes, PANELS):
        ax.imshow(Image.open(out / "grids" / f"{grid}.png"), cmap="gray")
        reward = json.loads((out / f"eval-{result}.json").read_text())["reward_mean"]
        ax.set_title(f"{title}\nmean reward {reward:.3f}", fontsize=8)
        ax.axis("off")
    fig.suptitle("held-out prompts 'the digit zero' ... 'the digit nine' (rows), 8 fixed seeds (columns)", fontsize=10)
    fig.tight_layout()
    fig.savefig(figure, dpi=110)
    print(f"wrote {figure}")


if __name__ == "__main__":
    main()
