"""Errors and warnings raised by curvkit.

Every user mistake raises a :class:`CurvkitError` subclass whose message says what was wrong
and what to do. Subclasses also derive from the matching built-in exception (``ValueError``,
``TypeError``, ...) so code that already catches those keeps working.
"""

from __future__ import annotations


class CurvkitError(Exception):
    """Base class of every error curvkit raises on purpose."""


class ArgumentError(CurvkitError, ValueError):
    """An option has a value curvkit does not accept (an unknown method, a negative tolerance, ...)."""


class ModelError(CurvkitError, ValueError):
    """The model or its parameters cannot be used as given (no trainable parameters,
    parameters that do not belong to it, a train-mode model with dropout, ...)."""


class DataError(CurvkitError, ValueError):
    """The data is empty, not made of ``(inputs, targets)`` batches, or changes between passes."""


class LossError(CurvkitError, ValueError):
    """The loss function returned something unusable, or a curvature type does not support it."""


class NonFiniteError(CurvkitError, FloatingPointError):
    """A loss or a curvature product is NaN or infinite."""


class ShapeError(CurvkitError, ValueError):
    """A vector or block has the wrong length, dtype or device for an operator."""


class TooLargeError(CurvkitError, MemoryError):
    """A dense matrix was asked for a model too large to hold one."""


class CurvkitWarning(UserWarning):
    """Base class of curvkit's warnings."""


class ConvergenceWarning(CurvkitWarning):
    """An iterative algorithm stopped at its budget before reaching its tolerance."""


class LossWarning(CurvkitWarning):
    """What curvkit had to assume about a loss (its terms, a zero GGN) that may not be what you meant."""


class FallbackWarning(CurvkitWarning):
    """A computation took a slower or more robust path than asked for (it says which and why)."""


class UnsupportedOpError(CurvkitError, NotImplementedError):
    """An op that Taylor mode (``ck.laplacian``) cannot differentiate as asked: no rule for it and
    the fallback turned off, or one torch.func cannot differentiate either (it names the op)."""
