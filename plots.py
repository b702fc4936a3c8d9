"""Plots of a train.py run (loss curve, per-layer expert load) and of a comparison
of methods (loss curves side by side). Needs matplotlib; nothing else imports it."""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def read_log(out_dir):
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in rows if "loss" in r]


def plot_expert_load(rows, path, title=""):
    """Heat map: layers x experts, fraction of routed tokens, from the last logged step."""
    load = rows[-1].get("expert_load") if rows else None
    if not load:
        return False
    names = list(load)
    fig, ax = plt.subplots(figsize=(6, max(2.5, 0.18 * len(names))))
    image = ax.imshow([load[n] for n in names], aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(names)), [n.replace("bert.encoder.layer.", "L").replace("model.layers.", "L")
                                      for n in names], fontsize=5)
    ax.set_xlabel("expert")
    experts = len(load[names[0]])
    ax.set_title(f"{title} expert load (uniform = {1 / experts:.3f})".strip(), fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


def plot_run(out_dir):
    out_dir = Path(out_dir)
    rows = read_log(out_dir)
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["step"] for r in rows], [r["task_loss"] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=130)
    plt.close(fig)
    plot_expert_load(rows, out_dir / "expert_load.png")


def plot_loss_curves(curves, path, title):
    """curves: {label: [(step, loss), ...]} on one axis."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, points in curves.items():
        ax.plot(*zip(*points), label=label, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_lr_sweeps(sweeps, path):
    """sweeps: {method: [(lr, mean validation metric), ...]}: one line per method, log lr axis."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, points in sweeps.items():
        points = sorted(points)
        ax.plot([lr for lr, _ in points], [100 * v for _, v in points], marker="o", label=label, linewidth=1.2)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("mean validation metric x100")
    ax.set_title("Learning-rate sweeps (seed 0, mean over tasks)", fontsize=10)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_intervals(panels, path, title, xlabel, seeds=None):
    """One panel per task, one row per method or variant: each seed's value a dot, the
    mean an open square with its 95% interval, n at the right. panels: {panel title:
    (rows, reference)}; rows: {label: (values, interval half-width or None)};
    reference: the x of a dashed line (0 for differences), or None. seeds: the seeds
    every row's values come from, in order, to colour each seed's dots apart."""
    labels = list(dict.fromkeys(label for rows, _ in panels.values() for label in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1.5, 0.32 * len(labels) + 1.4),
                             sharey=True, squeeze=False)
    for ax, (panel, (rows, reference)) in zip(axes[0], panels.items()):
        for y, label in enumerate(labels):
            if label not in rows or not rows[label][0]:
                continue
            values, half = rows[label]
            mean = sum(values) / len(values)
            ax.errorbar(100 * mean, y, xerr=None if half is None else 100 * half, fmt="s", color="C0",
                        markerfacecolor="none", markersize=6, capsize=3)
            if seeds and len(values) == len(seeds):
                labelled = ax.get_legend_handles_labels()[1]
                for j, (seed, v) in enumerate(zip(seeds, values)):
                    ax.plot(100 * v, y, "o", color=f"C{j + 1}", markersize=3,
                            label=None if f"seed {seed}" in labelled else f"seed {seed}")
            else:
                ax.plot([100 * v for v in values], [y] * len(values), "o", color="0.35", markersize=3)
            ax.text(1.01, y, f"n={len(values)}", transform=ax.get_yaxis_transform(), fontsize=6, va="center")
        if reference is not None:
            ax.axvline(100 * reference, color="0.3", linestyle="--", linewidth=0.8)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(axis="x", linewidth=0.3)
    if seeds:
        axes[0][-1].legend(fontsize=7, loc="lower left")
    axes[0][0].set_yticks(range(len(labels)), labels, fontsize=7)
    axes[0][0].invert_yaxis()  # the first row on top, as in the tables
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
