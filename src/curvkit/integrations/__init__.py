"""Adapters of :class:`curvkit.monitor.CurvatureMonitor` to training frameworks:
:mod:`curvkit.integrations.lightning` (``pip install 'curvkit[lightning]'``) and
:mod:`curvkit.integrations.hf` (``pip install 'curvkit[hf]'``). Each is imported on its own, so a
missing framework only matters to its adapter."""
