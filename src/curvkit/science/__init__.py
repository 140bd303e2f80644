"""Science experiments: phenomena of curvature during training reproduced with the monitor
(``curvkit experiment NAME``; see :mod:`curvkit.science.experiments`)."""

from .experiments import EXPERIMENTS, run

__all__ = ["EXPERIMENTS", "run"]
