"""The network side that every consumer shares, written once: parameters and vector spaces
(:mod:`.params`), the data (:mod:`.data`), loss specs (:mod:`.losses`), layers (:mod:`.layers`),
hooks (:mod:`.hooks`), the data loop (:mod:`.risk`) and per-example gradients
(:mod:`.per_example`)."""

from .data import Batches, split_batch
from .hooks import LayerHooks
from .layers import Layer, layers
from .losses import BCEWithLogits, CrossEntropy, FunctionLoss, LossSpec, MSE, NLL, loss_spec
from .params import ParamSpace, VectorSpace, flatten, resolve_params, unflatten
from .per_example import per_example_gradients
from .risk import Risk, Totals, model_mode

__all__ = [
    "Batches", "split_batch", "LayerHooks", "Layer", "layers",
    "LossSpec", "CrossEntropy", "NLL", "MSE", "BCEWithLogits", "FunctionLoss", "loss_spec",
    "ParamSpace", "VectorSpace", "flatten", "resolve_params", "unflatten",
    "per_example_gradients", "Risk", "Totals", "model_mode",
]
