"""Taylor mode over a network's inputs: exact and randomized Laplacians, diffusion operators
and the biharmonic, for physics-informed losses (:mod:`curvkit.taylor.laplacian`), built on a
value that carries its input derivatives through the network (:mod:`curvkit.taylor.jet`)."""

from .jet import Jet
from .laplacian import LaplacianResult, PDEResidual, biharmonic, diffusion, laplacian

__all__ = ["Jet", "LaplacianResult", "PDEResidual", "laplacian", "diffusion", "biharmonic"]
