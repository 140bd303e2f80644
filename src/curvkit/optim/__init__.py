"""Optimizers that use curvature: ``from curvkit.optim import AdaHessian, Sophia``.

Both are ``torch.optim.Optimizer`` subclasses driven by a closure that returns the loss
(Sophia-GNB: ``(loss, logits)``) WITHOUT calling backward; the optimizer differentiates it, with
``create_graph=True`` only on the steps that refresh the Hessian diagonal::

    opt = AdaHessian(model.parameters(), lr=0.15, update_each=1, seed=0)
    for x, y in loader:
        loss = opt.step(lambda: loss_fn(model(x), y))   # was: zero_grad; backward; step

The diagonal comes from the same Hutchinson samples as ``curvkit.diagonal``
(:func:`curvkit.linalg.diagonal.hutchinson_samples`). A runnable version: examples/optim.py.
"""

from .adahessian import AdaHessian, adahessian_update
from .sophia import Sophia, sophia_update

__all__ = ["AdaHessian", "Sophia", "adahessian_update", "sophia_update"]
