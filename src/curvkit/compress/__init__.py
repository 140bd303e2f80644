"""``curvkit.compress``: Hessian-aware compression. Per-layer sensitivity (the same blocks and
algorithms as the report's per-layer section), HAWQ bit allocation, OBS/SparseGPT-style and
M-FAC pruning, Optimal Brain Apoptosis structured pruning, GPTQ quantization."""

from .hawq import BitPlan, FrontierPoint, allocate_bits
from .mfac import mfac_prune
from .quantizers import QuantGrid, Quantizer, UniformQuantizer
from .oba import OBAScores, oba_scores
from .prune import prune
from .quantize import QuantizeResult, quantize
from .results import PruneResult, load_state_dict, save_state_dict
from .sensitivity import LayerSensitivity, Sensitivity, layer_sensitivity, sensitivity
from .structured import apply_structure, find_groups, prune_structured

__all__ = [
    "sensitivity", "layer_sensitivity", "Sensitivity", "LayerSensitivity",
    "allocate_bits", "BitPlan", "FrontierPoint",
    "prune", "quantize", "QuantizeResult", "mfac_prune",
    "prune_structured", "apply_structure", "find_groups", "oba_scores", "OBAScores",
    "Quantizer", "QuantGrid", "UniformQuantizer",
    "PruneResult", "save_state_dict", "load_state_dict",
]
