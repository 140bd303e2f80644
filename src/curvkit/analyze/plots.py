"""The report's figures (matplotlib, Agg backend, imported only when plotting).

``spectrum.png``: the SLQ density on a symmetric-log eigenvalue axis, ± 1 s.e. over probes, with
the top-k Lanczos eigenvalues (± residual) and the outlier gap marked.
``layers.png``: per-layer Hessian trace (± 1 s.e.) and top eigenvalue (± residual).
"""

from __future__ import annotations

from pathlib import Path

from ..plotting import pyplot


def plot_spectrum(r, path: Path) -> Path:
    """Write the spectral density figure to ``path``. Free (no products)."""
    plt = pyplot()
    import numpy as np

    d, h = r.density, r.hessian
    t, rho, se = np.array(d["grid"]), np.array(d["density"]), np.array(d["density_stderr"])
    floor = max(rho.max() * 1e-7, 1e-300)
    fig, ax = plt.subplots(figsize=(9, 5.2), dpi=110)
    ax.fill_between(t, np.maximum(rho - se, floor), rho + se, color="tab:blue", alpha=0.25, lw=0,
                    label=f"± 1 s.e. over {d['probes']} probes")
    ax.plot(t, np.maximum(rho, floor), color="tab:blue", lw=1.6,
            label=f"SLQ density ({d['probes']} probes × {d['iterations']} Lanczos steps, σ = {d['sigma']:.2g})")
    # linear within the smoothing width: closer to 0 the density cannot resolve anything anyway
    ax.set_xscale("symlog", linthresh=d["sigma"])
    ax.set_yscale("log")
    ax.set_ylim(floor, rho.max() * 5)
    ymark = rho.max() * 2
    ax.errorbar(h["values"], [ymark] * len(h["values"]), xerr=h["residuals"], fmt="v", color="tab:red",
                ms=6, capsize=3, label=f"top-{len(h['values'])} Hessian eigenvalues (Lanczos, ± residual "
                f"≤ {max(h['residuals']):.1e})")
    o = r.outliers
    if o["threshold"] is not None:
        ax.axvline(o["threshold"], color="0.3", ls="--", lw=1,
                   label=f"outlier threshold (bulk edge): {o['count']} outliers above it, "
                         f"{o['num_classes'] or 'n/a'} classes")
    ax.set_xlabel(f"Hessian eigenvalue λ (symmetric-log axis, linear within ±σ = ±{d['sigma']:.2g})")
    ax.set_ylabel("density of eigenvalues (fraction per unit λ)")
    tr = r.trace
    ax.set_title(f"Hessian spectrum — n = {r.model['analysed_parameters']:,} parameters, "
                 f"trace = {tr['value']:.4g} ± {tr['stderr']:.2g}", fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_layers(r, path: Path) -> Path:
    """Write the per-layer sensitivity figure to ``path``. Free (no products)."""
    plt = pyplot()
    import numpy as np

    L = r.layers
    labels = [f"{b['name']} ({b['type']}, {b['parameters']:,} params)" for b in L]
    y = np.arange(len(L))
    fig, axes = plt.subplots(1, 2, figsize=(10, 1.6 + 0.55 * len(L)), dpi=110, sharey=True)
    panels = [
        (axes[0], [b["trace"] for b in L], [b["trace_stderr"] for b in L], "tab:blue",
         "trace of the layer's Hessian block", "error bar: ± 1 s.e. (Hutch++)"),
        (axes[1], [b["top_eigenvalue"] for b in L], [b["top_residual"] for b in L], "tab:orange",
         "top eigenvalue of the layer's Hessian block", "error bar: ± residual ‖Hv − λv‖"),
    ]
    for ax, vals, errs, color, xlabel, note in panels:
        ax.barh(y, vals, xerr=errs, color=color, alpha=0.8, capsize=4, error_kw={"lw": 1.2})
        span = max(max(vals), 0) - min(min(vals), 0) or 1.0
        for yi, v, e in zip(y, vals, errs):  # the number itself, just past the bar's end
            ax.text(v + (e + 0.02 * span) * (1 if v >= 0 else -1), yi, f"{v:.3g} ± {e:.1g}", va="center",
                    ha="left" if v >= 0 else "right", fontsize=8)
        ax.set_xlim(min(min(vals), 0) - (0.35 * span if min(vals) < 0 else 0), max(max(vals), 0) + 0.35 * span)
        ax.set_xlabel(f"{xlabel}\n({note})", fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
        ax.axvline(0, color="0.4", lw=0.8)
    axes[0].set_yticks(y, labels, fontsize=9)
    axes[0].invert_yaxis()  # first layer on top
    fig.suptitle("Per-layer curvature (diagonal blocks of the Hessian): the layer sensitivities", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
