"""Optimizers that use curvature: ``from curvkit.optim import AdaHessian, Sophia, KFAC, Shampoo, SOAP, Muon, MFAC``.

All take torch's loop (``opt.zero_grad(); loss.backward(); opt.step()``); AdaHessian and
Sophia-H need ``loss.backward(create_graph=True)`` there, since their Hessian-vector products go
through the gradient's graph. AdaHessian and Sophia also take a closure that returns the loss
(Sophia-G, which samples targets from the outputs: ``(loss, outputs)``) WITHOUT calling
backward; the optimizer differentiates it, with ``create_graph=True`` only on the steps that
refresh the Hessian diagonal::

    opt = AdaHessian(model.parameters(), lr=0.15, every=1, seed=0)
    for x, y in loader:
        loss = opt.step(lambda: loss_fn(model(x), y))

KFAC and, optionally, Muon take the model: K-FAC hooks its layers, Muon tells the output head
and embeddings from hidden matrices (both by :func:`curvkit.model.layers`).

One step protocol (:mod:`curvkit.optim._base`): everything new is computed out of place, checked
once for NaN/inf (one host sync), then written; hyperparameters are per param group and in the
state_dict; refresh periods are called ``every``. The diagonals come from the same Hutchinson
samples as ``curvkit.diagonal``; factors, roots, eigenbases and orthogonalisations from
:mod:`curvkit.approx` (MFAC's sliding-window inverse Fisher: :mod:`curvkit.approx.mfac`). Runnable versions: examples/optim.py, examples/optim_kron.py.
"""

from .adahessian import AdaHessian, adahessian_update
from .kfac import KFAC
from .mfac import MFAC
from .muon import Muon, muon_update
from .shampoo import Shampoo
from .soap import SOAP
from .sophia import Sophia, sophia_update

__all__ = ["AdaHessian", "Sophia", "KFAC", "Shampoo", "SOAP", "Muon", "MFAC",
           "adahessian_update", "sophia_update", "muon_update"]
