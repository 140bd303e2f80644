"""Fused kernels without second derivatives, and the context that turns them off.

PyTorch's fast paths dispatch to kernels that have a first derivative only: the
``scaled_dot_product_attention`` backends (flash, memory-efficient, cuDNN; flash on the CPU), the
``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` fast paths, cuDNN/mkldnn RNNs, and
``embedding_bag``. Curvature needs a double backward or forward-mode AD through them, so a product
fails deep inside PyTorch. :func:`differentiable_kernels` runs the same model on the composite
paths that have both: the math attention backend, the slow MHA/encoder path, native RNN cells and
an embedding lookup plus reduction for bags. The results are the same functions; the cost is
the math path's (attention memory grows with the sequence length squared).

:func:`fused_op` tells such an error from any other, so the data loop (:class:`curvkit.model.Risk`)
can retry the product in that context once, with a warning naming the op.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

# ops whose derivatives stop at first order, by the names PyTorch's errors give
_FUSED = re.compile(
    r"(_scaled_dot_product_\w+|_native_multi_head_attention|_transformer_encoder_layer_fwd|"
    r"mkldnn_rnn\w*|_cudnn_rnn\w*|cudnn_rnn\w*|miopen_rnn\w*|_embedding_bag\w*|_thnn_fused_\w+)"
)


OutOfMemory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch < 2.5: only the cuda name


def is_rnn_op(op: str) -> bool:
    """Whether a fused op (as :func:`fused_op` names it) is a cuDNN/mkldnn/MIOpen RNN kernel."""
    return "rnn" in op or "lstm" in op or "gru" in op


def fused_op(e: BaseException) -> str | None:
    """The fused op an autograd error names (e.g. ``_scaled_dot_product_flash_attention_for_cpu``),
    or None when the error is about something else."""
    if not isinstance(e, (RuntimeError, NotImplementedError)):
        return None
    m = _FUSED.search(str(e))
    return m.group(1) if m else None


@contextlib.contextmanager
def differentiable_kernels(rnn: bool = True) -> Iterator[None]:
    """Run the model on kernels that have double backward and forward-mode AD: SDPA's math
    backend, the MHA/transformer fast paths off, ``F.embedding_bag`` as an embedding lookup plus
    reduction, and with ``rnn`` mkldnn and cuDNN off (native RNN cells; this also takes cuDNN from
    convolutions, so the data loop asks for it only when an RNN kernel was met). Restores
    everything on exit. Cost: the composite paths' (math attention is O(T^2) memory per head)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fast, bag = torch.backends.mha.get_fastpath_enabled(), F.embedding_bag
    mkldnn, cudnn = torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled
    torch.backends.mha.set_fastpath_enabled(False)
    F.embedding_bag = _embedding_bag  # nn.EmbeddingBag.forward looks it up on each call
    if rnn:  # the flags themselves, not their context managers, which also reset TF32 settings (and warn)
        torch.backends.mkldnn.enabled = torch.backends.cudnn.enabled = False
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        F.embedding_bag = bag
        torch.backends.mha.set_fastpath_enabled(fast)
        torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled = mkldnn, cudnn


def _embedding_bag(input: Tensor, weight: Tensor, offsets: Tensor | None = None, max_norm: float | None = None,
                   norm_type: float = 2, scale_grad_by_freq: bool = False, mode: str = "mean",
                   sparse: bool = False, per_sample_weights: Tensor | None = None,
                   include_last_offset: bool = False, padding_idx: int | None = None) -> Tensor:
    """``F.embedding_bag`` as ``F.embedding`` plus a per-bag sum, mean or max: the same numbers,
    made of ops with every derivative. Bags are the rows of a 2-D ``input``, or the segments
    ``offsets`` cut a 1-D one into."""
    if input.dim() == 2:  # equal bags: one lookup and one reduction for all
        if offsets is not None:
            raise ValueError("offsets must be None when input is 2-D")
        e = F.embedding(input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq)  # (B, L, D)
        keep = torch.ones(input.shape, dtype=e.dtype, device=e.device) if padding_idx is None \
            else (input != padding_idx).to(e.dtype)
        if per_sample_weights is not None:
            keep = keep * per_sample_weights
        if mode == "sum":
            return (e * keep[..., None]).sum(1)
        if mode == "mean":
            return (e * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp_min(1)
        if mode == "max":
            return e.masked_fill(keep[..., None] == 0, float("-inf")).amax(1)
        raise ValueError(f"mode has to be one of sum, mean or max, got {mode!r}")
    else:
        ends = offsets.tolist()[1:] + ([] if include_last_offset else [input.shape[0]])  # bags of any length
        starts = offsets.tolist()[: len(ends)]
        bags = [input[a:b] for a, b in zip(starts, ends)]
        psw = None if per_sample_weights is None else [per_sample_weights[a:b] for a, b in zip(starts, ends)]
    out = []
    for j, idx in enumerate(bags):
        e = F.embedding(idx, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq)
        keep = torch.ones(len(idx), dtype=e.dtype, device=e.device) if padding_idx is None \
            else (idx != padding_idx).to(e.dtype)
        if psw is not None:
            keep = keep * psw[j]
        if mode == "sum":
            out.append((e * keep[:, None]).sum(0))
        elif mode == "mean":
            out.append((e * keep[:, None]).sum(0) / keep.sum().clamp_min(1))
        elif mode == "max":
            out.append(e.masked_fill(keep[:, None] == 0, float("-inf")).amax(0) if len(idx) else e.new_zeros(e.shape[1]))
        else:
            raise ValueError(f"mode has to be one of sum, mean or max, got {mode!r}")
    return torch.stack(out) if out else weight.new_zeros(0, weight.shape[1])


__all__ = ["differentiable_kernels", "fused_op", "is_rnn_op", "OutOfMemory"]
