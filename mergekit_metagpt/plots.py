"""The pictures of ``mergekit-metagpt inspect`` (matplotlib: the ``plots`` extra).

Three PNGs per model set, at 100 dpi so that their pixel size follows their figure size:
a heatmap of ‖δ_t‖² per layer (rows: models; columns: embeddings, blocks, final norm,
head), a bar chart of λ, and the cosine matrix of the task vectors.
"""

from __future__ import annotations

import os
from typing import List

DPI = 100
FONT = 11


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": FONT, "axes.titlesize": FONT + 2, "axes.labelsize": FONT})
    return plt


def layer_norms_size(stats) -> tuple:
    """Figure size in inches (pixels / 100) of the heatmap."""
    return (max(8.0, 0.38 * len(stats.layers) + 4.5), max(3.0, 0.55 * len(stats.models) + 2.2))


def lambdas_size(stats) -> tuple:
    return (max(6.0, 1.1 * len(stats.models) + 2.5), 4.0)


def cosines_size(stats) -> tuple:
    side = max(5.0, 0.9 * len(stats.models) + 3.0)
    return (side + 1.0, side)


def write_pictures(stats, out_dir: str, suffix: str = "") -> List[str]:
    """Write the three PNGs of one model set; returns their paths."""
    from matplotlib.colors import LogNorm

    from mergekit_metagpt.coefficients import formula
    from mergekit_metagpt.similarity import short_names

    plt = _pyplot()
    names = short_names(stats.models)
    paths = []

    # 1. ‖δ‖² per layer
    fig, ax = plt.subplots(figsize=layer_norms_size(stats), dpi=DPI)
    values = [[max(v, 0.0) for v in row] for row in stats.layer_norms]
    positive = [v for row in values for v in row if v > 0]
    norm = LogNorm(vmin=min(positive), vmax=max(positive)) if positive and min(positive) < max(positive) else None
    image = ax.imshow([[v if v > 0 else float("nan") for v in row] for row in values],
                      aspect="auto", cmap="viridis", norm=norm)
    ax.set_xticks(range(len(stats.layers)), stats.layers, rotation=90 if len(stats.layers) > 24 else 0)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("layer (embed: embeddings; other: final norm etc.; head: output head)")
    ax.set_ylabel("model")
    ax.set_title("Where each fine-tune changed the model: ‖θ_t − θ₀‖² per layer")
    fig.colorbar(image, ax=ax, label="‖δ‖² of the layer (log scale)")
    fig.tight_layout()
    paths.append(_save(fig, plt, out_dir, "metagpt-layer-norms", suffix))

    # 2. λ
    fig, ax = plt.subplots(figsize=lambdas_size(stats), dpi=DPI)
    bars = ax.bar(names, stats.lambdas, color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in stats.lambdas], padding=2)
    ax.set_ylim(0, max(stats.lambdas + [0.0]) * 1.15 or 1.0)
    ax.set_xlabel("model")
    ax.set_ylabel(formula([stats.alpha]))
    ax.set_title("MetaGPT coefficients")
    fig.tight_layout()
    paths.append(_save(fig, plt, out_dir, "metagpt-lambdas", suffix))

    # 3. cosine matrix
    fig, ax = plt.subplots(figsize=cosines_size(stats), dpi=DPI)
    matrix = [[float("nan") if v is None else v for v in row] for row in stats.cosine]
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    for a, row in enumerate(stats.cosine):
        for b, v in enumerate(row):
            ax.text(b, a, "n/a" if v is None else f"{v:.3f}".replace("-0.000", "0.000"), ha="center", va="center",
                    color="white" if v is not None and abs(v) > 0.6 else "black")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_title("Cosine similarity of the task vectors")
    fig.colorbar(image, ax=ax, label="cosine (MetaGPT assumes ~0 off the diagonal)")
    fig.tight_layout()
    paths.append(_save(fig, plt, out_dir, "metagpt-cosines", suffix))
    return paths


def _save(fig, plt, out_dir, stem, suffix) -> str:
    path = os.path.join(out_dir, f"{stem}{suffix}.png")
    try:
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)
    return path
