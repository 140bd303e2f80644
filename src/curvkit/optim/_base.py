"""What every curvkit optimizer shares: state in float32 for bf16/fp16 parameters that survives
``load_state_dict``, an optimizer-level entry in the state_dict (step counter, random generator,
whatever a subclass adds), hyperparameter checks and the one-sync finiteness check that keeps a
NaN step out of the parameters."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import ArgumentError, NonFiniteError

_EXTRA = "curvkit"  # key of the optimizer-level state in state_dict


def state_dtype(p: Tensor) -> torch.dtype:
    """float32 state (and update arithmetic) for bf16/fp16 parameters; the parameter's dtype otherwise."""
    return torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype


def check_positive_int(name: str, v: Any) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ArgumentError(f"{name} must be a positive integer, got {v!r}")


def check_number(name: str, v: Any, low: float = 0.0, strict: bool = False, high: float = float("inf"),
                 high_open: bool = True) -> None:
    """ArgumentError unless ``v`` is a real number in the stated range, naming it and the range."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
    ok = ok and (v > low if strict else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        lo = f"{'>' if strict else '>='} {low}"
        hi = "" if high == float("inf") else f" and {'<' if high_open else '<='} {high}"
        raise ArgumentError(f"{name} must be a finite number {lo}{hi}, got {v!r}")


def check_betas(betas: Any, n: int = 2) -> None:
    if not (isinstance(betas, (tuple, list)) and len(betas) == n
            and all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)):
        raise ArgumentError(f"betas must be {n} numbers in [0, 1), got {betas!r}")


def use_foreach(foreach: bool | None, params: list[Tensor], *state: list[Tensor]) -> bool:
    """Whether the multi-tensor (``torch._foreach_*``) path applies: asked for (``None``: on CUDA,
    as torch decides) and every parameter shares the device and dtype of its state, which foreach
    kernels need (bf16 parameters with float32 state take the per-tensor path)."""
    if foreach is False or not params:
        return False
    if foreach is None and not all(p.is_cuda for p in params):
        return False
    dev, dt = params[0].device, params[0].dtype
    return all(t.device == dev and t.dtype == dt for ts in (params, *state) for t in ts)


def copy_back(params: list[Tensor], xs: list[Tensor]) -> None:
    """Write values computed in the state dtype (``xs``) back into their parameters, in one foreach
    call; a parameter that is its own working copy (same dtype, updated in place) is skipped."""
    pairs = [(p, x) for p, x in zip(params, xs) if p is not x]
    if pairs:
        torch._foreach_copy_([p for p, _ in pairs], [x for _, x in pairs])


_ONES: dict = {}  # a 1-element 1.0 per device: the "scale" of the fused check, made once


def non_finite_flag(tensors: list[Tensor]) -> Tensor | None:
    """A 1-element float32 tensor, nonzero (or NaN) iff some entry of some tensor is NaN/inf;
    no host read for tensors on one device (``None`` for no entries). See :func:`all_finite`."""
    groups: dict = {}
    for t in tensors:
        if t.numel():
            t = t.detach()
            if t.is_complex():
                t = torch.view_as_real(t.resolve_conj())  # real and imaginary parts as floats
            if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
                t = t.contiguous()  # an expanded gradient: the kernel writes, so no shared entries
            groups.setdefault((t.device, t.dtype), []).append(t)
    if not groups:
        return None
    found: dict = {}
    with torch.no_grad():
        for (dev, dt), ts in groups.items():
            if dev not in found:  # float32 whatever the default dtype: the AMP kernel needs it
                found[dev] = torch.zeros(1, device=dev, dtype=torch.float32)
                if dev not in _ONES:
                    _ONES[dev] = torch.ones(1, device=dev, dtype=torch.float32)
            if dev.type == "cpu" or (dev.type == "cuda" and dt != torch.bfloat16):
                torch._amp_foreach_non_finite_check_and_unscale_(ts, found[dev], _ONES[dev])
            else:  # bf16 on CUDA and other backends lack that kernel: an L1 sum in float32
                # carries any NaN/inf; times alpha=0 it adds 0 or NaN to the flag
                half = dt in (torch.float16, torch.bfloat16)
                found[dev].add_(torch.stack(torch._foreach_norm(ts, 1, dtype=torch.float32 if half else None)).sum(),
                                alpha=0)
    flags = list(found.values())
    return flags[0] if len(flags) == 1 else sum(f.cpu() for f in flags)


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every entry of every tensor is finite. ONE host read (the step's one sync).

    One fused multi-tensor kernel per dtype and device, all setting one flag per device: torch's
    AMP inf/NaN check (``_amp_foreach_non_finite_check_and_unscale_``, the kernel GradScaler
    uses) with scale 1, which rewrites each value unchanged. It tests entries one by one in
    float32 or wider, so no sum can overflow. bf16 on CUDA and devices other than CPU/CUDA, which
    lack that kernel, take a foreach L1 norm instead (half types summed in float32: a false alarm
    only for sums past 3e38). A per-tensor ``isfinite().all()`` would launch two kernels per
    tensor, and foreach norms plus their reductions about six per dtype, which is what sets the
    step's cost on launch-bound models.
    """
    flag = non_finite_flag(tensors)
    return flag is None or not bool(flag)


def raise_non_finite(what: str, loss: Tensor | None = None, grads: list[Tensor] | None = None) -> None:
    """Say which of the loss, the gradient or ``what`` (the curvature estimate) is not finite."""
    loss = None if loss is None else torch.as_tensor(loss).detach()
    if loss is not None and not torch.isfinite(loss).all():
        raise NonFiniteError(
            f"the loss is {float(loss)}; the parameters were not changed. Check the batch "
            "and lower the learning rate that led here"
        )
    if grads and not all_finite(grads):
        raise NonFiniteError("the gradient has NaN/inf entries; the parameters were not changed")
    raise NonFiniteError(f"{what} has NaN/inf entries; the parameters were not changed")


class CurvkitOptimizer(torch.optim.Optimizer):
    """Base of curvkit's optimizers: torch's Optimizer plus an optimizer-level state entry.

    Subclasses keep their own counters in :meth:`_extra_state` / :meth:`_load_extra_state`
    (the step count, generators); ``state_dict`` stores them under ``"curvkit"`` and
    ``load_state_dict`` refuses a state_dict without it (one from another optimizer).
    """

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, extra: dict) -> None:
        pass

    def state_dict(self) -> dict:
        """torch's state_dict plus the optimizer-level entry (counters, generator state)."""
        sd = super().state_dict()
        sd[_EXTRA] = self._extra_state()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state_dict (from any device). Unlike torch's, float32 state of bf16/fp16
        parameters stays float32 (torch would cast it to the parameter's dtype and lose bits)."""
        state_dict = dict(state_dict)
        extra = state_dict.pop(_EXTRA, None)
        if extra is None:
            raise ArgumentError(
                f"this state_dict has no '{_EXTRA}' entry (step counter and random generator); "
                f"load a state_dict saved from a curvkit {type(self).__name__}"
            )
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            for k, v in state_dict["state"].get(i, {}).items():
                if isinstance(v, Tensor) and v.is_floating_point():
                    self.state[p][k] = v.to(device=p.device, dtype=state_dtype(p), copy=True)
        self._load_extra_state(extra)
