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


def all_finite(tensors: list[Tensor]) -> Tensor:
    """A 0-d bool tensor: every entry of every tensor is finite, with no host sync.

    One ``torch._foreach_norm`` (L1) per dtype and device, so a few kernels for any number of
    tensors (a per-tensor ``isfinite().all()`` costs two launches each). L1 rather than max-abs:
    a sum carries NaN/inf on every backend, where a max kernel may drop NaN; it could only
    overflow for entries summing past float32's range (about 3e38; half types are summed in float32).
    """
    groups: dict = {}
    for t in tensors:
        if t.numel():
            groups.setdefault((t.dtype, t.device), []).append(t)
    if not groups:
        return torch.tensor(True)
    # float16 sums overflow at 65504: accumulate half types in float32
    flags = [torch.stack(torch._foreach_norm(ts, 1, dtype=torch.float32 if dt in (torch.float16, torch.bfloat16) else None))
             .isfinite().all() for (dt, _), ts in groups.items()]
    dev = flags[0].device
    return torch.stack([f.to(dev) for f in flags]).all() if len(flags) > 1 else flags[0]


def raise_non_finite(what: str, loss: Tensor | None = None, grads: list[Tensor] | None = None) -> None:
    """Say which of the loss, the gradient or ``what`` (the curvature estimate) is not finite."""
    if loss is not None and not torch.isfinite(torch.as_tensor(loss)).all():
        raise NonFiniteError(
            f"the loss is {float(loss)}; the parameters were not changed. Check the batch "
            "and lower the learning rate that led here"
        )
    if grads and not bool(all_finite(grads)):
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
