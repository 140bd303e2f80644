"""The influence report's figures (matplotlib, Agg backend, imported only when plotting).

``self_influence.png``: the histogram of self-influence (log axis) with the most self-influential
examples marked (and, when known, the flipped labels drawn apart).
``top_examples.png``: per query (rows), the query image, then its most helpful and most harmful
training images with their labels and scores.
"""

from __future__ import annotations

from pathlib import Path

from ..plotting import pyplot


def plot_self_influence(r, path: Path) -> Path:
    """Write the self-influence histogram to ``path``. Free."""
    plt = pyplot()
    import numpy as np

    v = np.asarray(r.self_influence_values, dtype=float)
    pos = v[v > 0]
    floor = pos.min() if pos.size else 1.0
    v = np.maximum(v, floor)  # self-influence is >= 0; exact zeros drawn at the smallest value
    bins = np.geomspace(v.min(), v.max() * 1.0001, 40) if v.max() > v.min() else 10
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    m = r.mislabels
    if m is not None:
        bad = np.zeros(len(v), dtype=bool)
        bad[m["indices"]] = True
        ax.hist([v[~bad], v[bad]], bins=bins, stacked=True, color=["tab:blue", "tab:red"], alpha=0.8,
                label=[f"correct labels ({int((~bad).sum())})", f"flipped labels ({int(bad.sum())})"])
    else:
        ax.hist(v, bins=bins, color="tab:blue", alpha=0.8, label=f"{len(v)} training examples")
    top = r.self_influence["top"]
    for j, e in enumerate(top):
        ax.axvline(max(e["score"], floor), color="0.15", lw=0.8, ls=":",
                   label=f"the {len(top)} most self-influential" if j == 0 else None)
    for e in top[:3]:
        ax.annotate(f"#{e['index']}" + (f" (label {e['label']})" if "label" in e else ""),
                    (max(e["score"], floor), 1), xytext=(2, 4), textcoords="offset points", rotation=90,
                    fontsize=7, va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("self-influence  grad_i^T (H + damping I)^-1 grad_i  (log axis)")
    ax.set_ylabel("training examples")
    s = r.settings
    title = f"Self-influence ({s['method']}, damping {s['damping']:.2g}): inspect from the right"
    if m is not None:
        title += f" — top 10% holds {m['found_top_10pct']:.0%} of the flipped labels"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _show(ax, img, title: str, color: str) -> None:
    img = img.float()
    if img.ndim == 3:
        img = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) / (hi - lo) if hi > lo else img * 0
    ax.imshow(img.numpy(), cmap="gray_r" if img.ndim == 2 else None)
    ax.set_title(title, fontsize=7, color=color)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_top_examples(r, path: Path, max_queries: int = 6, per_side: int = 4) -> Path:
    """Write the grid of queries and their top helpful / harmful training images to ``path``. Free."""
    plt = pyplot()

    x_tr, x_q = r._images
    queries = r.queries[:max_queries]
    n = min(per_side, r.settings["k"])
    cols = 1 + 2 * n
    fig, axes = plt.subplots(len(queries), cols, figsize=(1.25 * cols, 1.45 * len(queries) + 0.6), dpi=110,
                             squeeze=False)
    for row, q in zip(axes, queries):
        _show(row[0], x_q[q["index"]], f"query {q['index']}" + (f"\ntarget {q['target']}" if "target" in q else ""),
              "black")
        for j, (kind, color) in enumerate((("helpful", "tab:green"), ("harmful", "tab:red"))):
            for i, e in enumerate(q[kind][:n]):
                lab = (f" y={e['label']}" if "label" in e else "") + (" (flipped)" if e.get("flipped") else "")
                _show(row[1 + j * n + i], x_tr[e["index"]], f"#{e['index']}{lab}\n{e['score']:+.3g}", color)
    fig.suptitle(f"Each query, then its {n} most helpful (green, score > 0) and {n} most harmful "
                 "(red, score < 0) training images", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
