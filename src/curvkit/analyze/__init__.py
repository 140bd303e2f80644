"""Curvature reports: ``ck.analyze(model, loss_fn, data) -> Report`` and the ``curvkit analyze`` command."""

from .report import Report, analyze, schema

__all__ = ["analyze", "Report", "schema"]
