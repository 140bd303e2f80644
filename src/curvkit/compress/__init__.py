"""``curvkit.compress``: Hessian-aware compression. Per-layer sensitivity (the same blocks and
algorithms as the report's per-layer section), HAWQ bit allocation, OBS/SparseGPT-style and
M-FAC pruning, Optimal Brain Apoptosis structured pruning, GPTQ quantization."""

from .quantizers import QuantGrid, Quantizer, UniformQuantizer
from .results import PruneResult, load_state_dict, save_state_dict
from .prune import prune
from .quantize import QuantizeResult, quantize

__all__ = ["Quantizer", "QuantGrid", "UniformQuantizer", "PruneResult", "save_state_dict", "load_state_dict"]
__all__ += ["prune", "quantize", "QuantizeResult"]
