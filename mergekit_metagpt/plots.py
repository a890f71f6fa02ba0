"""The pictures of ``mergekit-metagpt inspect`` (matplotlib: the ``plots`` extra).

Three PNGs per model set, at 100 dpi, cropped to what is drawn: a heatmap of ‖δ_t‖² per
layer (rows: models; columns: embeddings, blocks, final norm, head), a bar chart of λ, and
the cosine matrix of the task vectors (not drawn where no pair was computed).
"""

from __future__ import annotations

import os
from typing import List, Sequence


DPI = 100
FONT = 11


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


#: matplotlib settings while drawing (set for the drawing only: a notebook's stay its own)
RC = {"font.size": FONT, "axes.titlesize": FONT + 2, "axes.labelsize": FONT}


def _figure(size):
    """A figure and its axes, outside pyplot: the caller's backend (a notebook's display)
    is neither switched nor used, and no figure is left open."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI)
    return fig, fig.subplots()


#: Most layer columns labelled on the heatmap (every k-th beyond it) and its widest figure.
LAYER_LABELS = 60
MAX_WIDTH = 16.0
#: Longest model label on a picture (longer ones are shortened in the middle).
LABEL_CHARS = 28


def layer_norms_size(stats) -> tuple:
    """Figure size in inches (about pixels / 100) of the heatmap."""
    return (min(MAX_WIDTH, max(8.0, 0.38 * len(stats.layers) + 4.5)), max(3.0, 0.55 * len(stats.models) + 2.2))


def lambdas_size(stats) -> tuple:
    return (max(6.0, 1.1 * len(stats.models) + 2.5), 4.0)


def cosines_size(stats) -> tuple:
    side = max(5.0, 0.9 * len(stats.models) + 3.0)
    return (side + 1.0, side)


def picture_labels(models) -> List[str]:
    """`short_names`, with names over LABEL_CHARS shortened in the middle; numbered
    ("1. …") where two shortened names would read the same."""
    from mergekit_metagpt.similarity import short_names

    half = (LABEL_CHARS - 1) // 2
    labels = [n if len(n) <= LABEL_CHARS else n[:half] + "…" + n[-(LABEL_CHARS - 1 - half):]
              for n in short_names(models)]
    if len(set(labels)) < len(labels):
        labels = [f"{i}. {label}" for i, label in enumerate(labels, 1)]
    return labels


def layer_ticks(layers: Sequence[str]) -> List[int]:
    """The heatmap columns labelled: all up to LAYER_LABELS, else the blocks whose number
    (in their stack, where the model has several) is a multiple of k, and every column that
    is not a block (embed, other, head)."""
    step = -(-len(layers) // LAYER_LABELS)
    numbers = [layer.rsplit(" ", 1)[-1] for layer in layers]  # "3", or "vision_tower 3" with stacks
    return [i for i, number in enumerate(numbers)
            if step == 1 or not number.isdigit() or int(number) % step == 0]


def tick_rotation(labels: Sequence[str], width: float) -> int:
    """90 beyond 24 labels, or where the labels side by side would not fit the heatmap's width
    (about 0.075 in a character at matplotlib's default size, 3 in taken by the model names
    and colour bar, e.g. a vision model's "vision_tower 0" columns), else 0."""
    return 90 if len(labels) > 24 or sum(len(label) + 2 for label in labels) * 0.075 > width - 3.0 else 0


def write_pictures(stats, out_dir: str, suffix: str = "", context: Sequence[str] = (),
                   sparse: bool = False) -> List[str]:
    """Write the PNGs of one model set; returns their paths. `context`: lines added under
    each title (which model set, what the λ are); `sparse`: the norms are of the
    sparsified task vectors. The cosine matrix is drawn only where some pair was computed."""
    import matplotlib

    with matplotlib.rc_context(RC):
        return _draw(stats, out_dir, suffix, context, sparse)


def _draw(stats, out_dir: str, suffix: str, context: Sequence[str], sparse: bool) -> List[str]:
    import matplotlib
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    from mergekit_metagpt.coefficients import formula
    from mergekit_metagpt.similarity import COSINE_WARNING, cosine_text

    names = picture_labels(stats.models)
    below = "".join("\n" + line for line in context)
    paths = []

    # 1. ‖δ‖² per layer
    size = layer_norms_size(stats)
    fig, ax = _figure(size)
    values = [[max(v, 0.0) for v in row] for row in stats.layer_norms]
    positive = [v for row in values for v in row if v > 0]
    norm = LogNorm(vmin=min(positive), vmax=max(positive)) if positive and min(positive) < max(positive) else None
    image = ax.imshow([[v if v > 0 else float("nan") for v in row] for row in values],
                      aspect="auto", cmap="viridis", norm=norm)
    step = -(-len(stats.layers) // LAYER_LABELS)
    ticks = layer_ticks(stats.layers)
    labels = [stats.layers[i] for i in ticks]
    ax.set_xticks(ticks, labels, rotation=tick_rotation(labels, size[0]))
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("layer (embed: embeddings; other: final norm etc.; head: output head)"
                  + (f"; blocks labelled one in {step}" if step > 1 else ""))
    ax.set_ylabel("model")
    what = "‖sparsified δ_t‖²" if sparse else "‖θ_t − θ₀‖²"
    ax.set_title(f"Where each fine-tune changed the model: {what} per layer{below}")
    fig.colorbar(image, ax=ax, label="‖δ‖² of the layer (log scale)", fraction=0.03, pad=0.01)
    paths.append(_save(fig, out_dir, "metagpt-layer-norms", suffix))

    # 2. λ
    fig, ax = _figure(lambdas_size(stats))
    bars = ax.bar(range(len(names)), stats.lambdas, color="tab:blue")  # one bar each, whatever the labels
    ax.set_xticks(range(len(names)), names)
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in stats.lambdas], padding=2)
    ax.set_ylim(0, max(stats.lambdas + [0.0]) * 1.15 or 1.0)
    if len(names) > 6 or max(len(n) for n in names) > 10:
        ax.tick_params(axis="x", labelrotation=30)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    ax.set_xlabel("model")
    ax.set_ylabel(formula([stats.alpha]))
    ax.set_title(f"MetaGPT coefficients{' (of the sparsified task vectors)' if sparse else ''}{below}")
    paths.append(_save(fig, out_dir, "metagpt-lambdas", suffix))

    # 3. cosine matrix
    if not stats.computed:
        return paths
    fig, ax = _figure(cosines_size(stats))
    matrix = [[float("nan") if v is None or a == b else v for b, v in enumerate(row)]
              for a, row in enumerate(stats.cosine)]
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#e6e6e6")  # the diagonal, and pairs not computed
    image = ax.imshow(matrix, cmap=cmap, vmin=-1.0, vmax=1.0)
    for a, row in enumerate(stats.cosine):
        for b, v in enumerate(row):
            if a == b:
                continue
            ax.text(b, a, "n/a" if v is None else cosine_text(v), ha="center", va="center",
                    color="white" if v is not None and abs(v) > 0.6 else "black")
            if v is not None and abs(v) >= COSINE_WARNING:
                ax.add_patch(Rectangle((b - 0.5, a - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2))
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_title(f"Cosine similarity of the task vectors{below}")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04,
                 label=f"cosine (MetaGPT assumes ~0; outlined: |cosine| ≥ {COSINE_WARNING})")
    paths.append(_save(fig, out_dir, "metagpt-cosines", suffix))
    return paths


def _save(fig, out_dir, stem, suffix) -> str:
    path = os.path.join(out_dir, f"{stem}{suffix}.png")
    fig.savefig(path, dpi=DPI, bbox_inches="tight")  # nothing cut off at the edges
    return path
