"""Optimizers that use curvature: ``from curvkit.optim import AdaHessian, Sophia, KFAC, Shampoo, SOAP, Muon``.

AdaHessian and Sophia are driven by a closure that returns the loss (Sophia-GNB:
``(loss, logits)``) WITHOUT calling backward; the optimizer differentiates it, with
``create_graph=True`` only on the steps that refresh the Hessian diagonal::

    opt = AdaHessian(model.parameters(), lr=0.15, update_each=1, seed=0)
    for x, y in loader:
        loss = opt.step(lambda: loss_fn(model(x), y))   # was: zero_grad; backward; step

The diagonal comes from the same Hutchinson samples as ``curvkit.diagonal``
(:func:`curvkit.linalg.diagonal.hutchinson_samples`). A runnable version: examples/optim.py.

KFAC, Shampoo, SOAP and Muon keep torch's loop (``zero_grad(); loss.backward(); step()``); only
the constructor changes (KFAC and, optionally, Muon take the model: K-FAC hooks its layers, Muon
tells the output head and embeddings from hidden matrices). Their factors, roots, eigenbases and
orthogonalisations come from :mod:`curvkit.approx` (one Kronecker core, one set of matrix
functions). A runnable version: examples/optim_kron.py.
"""

from .adahessian import AdaHessian, adahessian_update
from .kfac import KFAC
from .muon import Muon, muon_update
from .shampoo import Shampoo
from .soap import SOAP
from .sophia import Sophia, sophia_update

__all__ = ["AdaHessian", "Sophia", "KFAC", "Shampoo", "SOAP", "Muon",
           "adahessian_update", "sophia_update", "muon_update"]
