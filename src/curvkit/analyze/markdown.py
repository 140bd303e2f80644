"""``Report.to_markdown``: the human summary, one table per kind of result."""

from __future__ import annotations

from typing import Any


def _f(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}" if 1e-3 <= abs(x) < 1e5 else f"{x:.{max(digits - 1, 1)}e}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _table(head: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render(r) -> str:
    s, h, g = r.settings, r.hessian, r.ggn
    out = [f"# Curvature report\n\n{r.model['description']}\n"]
    out.append("## Summary\n")
    out.append(_table(["quantity", "value", "error"], [
        ["loss (analysed data)", _f(r.loss["data"]), "exact"],
        ["loss (held-out)", _f(r.loss["heldout"]), "exact"],
        ["accuracy (analysed data)", _pct(r.accuracy["data"]), f"{r.data['examples']:,} examples"],
        ["accuracy (held-out)", _pct(r.accuracy["heldout"]), f"{r.data['heldout_examples']:,} examples"],
        ["top Hessian eigenvalue (sharpness)", _f(h["values"][0]), f"residual {_f(h['residuals'][0], 2)}"],
        ["top GGN eigenvalue", _f(g["values"][0]), f"residual {_f(g['residuals'][0], 2)}"],
        ["Hessian trace", _f(r.trace["value"]), f"± {_f(r.trace['stderr'], 2)} (1 s.e.)"],
        [f"gradient in top-{r.gradient['k']} Hessian eigenspace", _pct(r.gradient["fraction_in_top_k"]),
         f"‖g‖ = {_f(r.gradient['norm'], 3)}"],
        ["outlier eigenvalues / classes",
         f"{r.outliers['count']}{'+' if r.outliers['capped_at_k'] else ''} / {r.outliers['num_classes'] or 'n/a'}",
         f"gap ×{_f(r.outliers['gap_ratio'], 3)}" if r.outliers["gap_ratio"] else "no gap"],
    ]))
    if getattr(r, "condition", None):
        c = r.condition
        out.append(f"\nGGN condition number ≥ {_f(c['lower_bound'])} (λ_max {_f(c['lambda_max'])}, "
                   f"λ_min ≤ {_f(c['lambda_min'])}, residual {_f(c['lambda_min_residual'], 2)}, "
                   f"converged: {c['converged']}).")
    out.append(f"\nOutlier rule: {r.outliers['rule']}."
               + (" The gap is at the end of the top-k: raise k to count the outliers." if r.outliers["capped_at_k"] else ""))
    out.append("\n## Top eigenvalues\n")
    def cell(e: dict, i: int) -> list[str]:
        return [_f(e["values"][i]), _f(e["residuals"][i], 2)] if i < len(e["values"]) else ["", ""]

    rows = [[i + 1, *cell(h, i), *cell(g, i)] for i in range(max(len(h["values"]), len(g["values"])))]
    out.append(_table(["#", "Hessian λ", "residual ‖Hv−λv‖", "GGN λ", "residual ‖Gv−λv‖"], rows))
    out.append(f"\nHessian: {h['products']} products, converged: {h['converged']}. "
               f"GGN: {g['products']} products, converged: {g['converged']}. "
               f"Block Lanczos, tolerance {s['tol']:g} relative to the largest |λ| sought.")
    out.append("\n## Per-layer sensitivity (diagonal Hessian blocks)\n")
    out.append(_table(
        ["layer", "type", "parameters", "trace ± 1 s.e.", "top eigenvalue", "residual", "converged"],
        [[f"`{b['name']}`", b["type"], f"{b['parameters']:,}", f"{_f(b['trace'])} ± {_f(b['trace_stderr'], 2)}",
          _f(b["top_eigenvalue"]), _f(b["top_residual"], 2), b["converged"]] for b in r.layers],
    ))
    layer_sum = sum(b["trace"] for b in r.layers)
    out.append(f"\nSum of the layer traces: {_f(layer_sum)} (full trace {_f(r.trace['value'])} "
               f"± {_f(r.trace['stderr'], 2)}).")
    d = r.density
    out.append("\n## Spectral density\n")
    out.append(f"Stochastic Lanczos quadrature: {d['probes']} probes × {d['iterations']} iterations, "
               f"Gaussian smoothing σ = {_f(d['sigma'], 3)}; quadrature nodes span "
               f"[{_f(d['node_min'], 3)}, {_f(d['node_max'], 3)}]. See `spectrum.png` (shaded: ± 1 s.e. over probes).")
    out.append("\n## Settings (to reproduce)\n")
    out.append(_table(["setting", "value"], [[k, f"`{v}`"] for k, v in s.items()] + [
        ["examples / batches", f"{r.data['examples']:,} / {r.data['batches']}"],
        ["parameters (analysed / total)", f"{r.model['analysed_parameters']:,} / {r.model['parameters']:,}"],
    ]))
    out.append("\n## Cost\n")
    q = r.cost["quantities"]
    out.append(_table(["quantity", "operator products", "passes over the data", "seconds"],
                      [[name, c["products"], "—" if c["passes"] is None else c["passes"], f"{c['seconds']:.2f}"] for name, c in q.items()]
                      + [["**total**", r.cost["total_products"], "", f"{r.cost['total_seconds']:.2f}"]]))
    out.append("\nA product with one probe vector counts 1; a block of b probes counts b and costs one pass.")
    if r.warnings:
        out.append("\n## Warnings\n")
        out += [f"- {w}" for w in r.warnings]
    return "\n".join(out) + "\n"
