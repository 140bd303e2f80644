"""The one step protocol every curvkit optimizer follows, and what they all share.

A step (:meth:`CurvkitOptimizer._run_step`):

1. ``prepare()`` computes everything new OUT of place -- moments, factors, roots, curvature
   estimates, directions -- into a :class:`Staged` step, which lists in ``check`` every new value
   and what it came from (loss, gradients, curvature);
2. ONE finiteness check over ``check`` (one fused kernel per device and dtype, one host read: the
   step's only sync); a NaN/inf raises :class:`~curvkit.errors.NonFiniteError` saying whether the
   loss, the gradient or the curvature was at fault, and NOTHING has been written -- parameters,
   state, counters and the random generator are as before the step;
3. :meth:`Staged.commit` writes it all.

Also here: hyperparameters live in ``defaults`` and every param group (checked per group by
:meth:`CurvkitOptimizer._check_group`, renamed ones still accepted with a DeprecationWarning),
the refresh schedule (:func:`refresh_due`, one name ``every``), float32 state for bf16/fp16
parameters that survives ``load_state_dict``, and an optimizer-level state entry (the class
name, counters, the generator) that refuses a state_dict of another optimizer at load time.
The arithmetic shared by several optimizers (Adam's moments, momentum, decoupled weight decay)
is in :mod:`._moments`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import ArgumentError, NonFiniteError
from ._moments import decoupled_update

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


def refresh_due(step: int, every: int, start: int = 0) -> bool:
    """The one refresh schedule: steps ``start, start + every, start + 2 every, ...`` (``step``
    counts from 0) refresh a curvature estimate or preconditioner; steps in between reuse it."""
    return step >= start and (step - start) % every == 0


def renamed(cls: str, new: str, value: Any, default: Any, old: str, old_value: Any) -> Any:
    """The value of a renamed keyword argument: ``old_value`` (the deprecated name, ``None`` when
    not given) still works, with a DeprecationWarning; both names at once are refused."""
    if old_value is None:
        return value
    warnings.warn(f"{cls}({old}=...) is deprecated; pass {new}={old_value!r} instead", DeprecationWarning,
                  stacklevel=3)
    if value != default and value != old_value:
        raise ArgumentError(f"{cls} got {new}={value!r} and its deprecated name {old}={old_value!r}; pass {new} only")
    return old_value


class Staged:
    """One step computed out of place. Nothing is written until :meth:`commit`, which the
    protocol calls only after one finiteness check over :attr:`check`."""

    def __init__(self) -> None:
        self.check: list[Tensor] = []  # every new value, and the loss/gradients/curvature it came from
        self._dst: list[Tensor] = []   # existing tensors that get new values (one foreach copy)
        self._src: list[Tensor] = []
        self._store: list[tuple[dict, str, Tensor]] = []  # values copied into (maybe new) state entries
        self._put: list[tuple[dict, str, Any]] = []       # values stored as given
        self._moves: list[tuple[tuple, dict]] = []
        self._then: list[Callable[[], None]] = []
        self.fresh: dict[int, dict] = {}  # state dicts of parameters seen the first time, by id

    def replace(self, old: list[Tensor], new: list[Tensor]) -> None:
        """Existing state tensors ``old[k]`` get the values ``new[k]`` (copied in)."""
        self._dst += old
        self._src += new
        self.check += new

    def store(self, state: dict, key: str, value: Tensor) -> None:
        """``state[key]`` gets a copy of ``value`` in its own storage (made if missing): for views
        of stacked results, which would otherwise keep, and save, the whole stack. Not checked
        here: the caller checks the stack once."""
        self._store.append((state, key, value))

    def put(self, state: dict, key: str, value: Any, check: bool = True) -> None:
        """``state[key] = value`` as given (a new tensor, a counter)."""
        self._put.append((state, key, value))
        if check and isinstance(value, Tensor):
            self.check.append(value)

    def move(self, params: list[Tensor], dirs: list[Tensor], *, lr: float, weight_decay: float,
             alphas: list[float] | None = None, denoms: list[Tensor] | None = None, decay_first: bool = True,
             check: bool = True) -> None:
        """The parameters move along ``dirs`` with decoupled weight decay
        (:func:`curvkit.optim._moments.decoupled_update`)."""
        self._moves.append(((params, dirs, lr, weight_decay), dict(alphas=alphas, denoms=denoms,
                                                                  decay_first=decay_first)))
        if check:
            self.check += dirs

    def then(self, fn: Callable[[], None]) -> None:
        """In-place work that reads only checked values (a functional update), run at commit."""
        self._then.append(fn)

    def commit(self) -> None:
        for st, k, x in self._store:
            if k not in st or st[k].shape != x.shape or st[k].dtype != x.dtype:
                st[k] = torch.empty_like(x, memory_format=torch.contiguous_format)
        dst = self._dst + [st[k] for st, k, _ in self._store]
        if dst:
            torch._foreach_copy_(dst, self._src + [x for _, _, x in self._store])
        for st, k, v in self._put:
            st[k] = v
        for args, kw in self._moves:
            decoupled_update(*args, **kw)
        for fn in self._then:
            fn()


class CurvkitOptimizer(torch.optim.Optimizer):
    """Base of curvkit's optimizers: torch's Optimizer plus the step protocol (see the module
    docstring), per-group hyperparameter checks and an optimizer-level state entry.

    Subclasses give :meth:`_check_group` (ArgumentError for a bad hyperparameter of a group),
    ``_renamed`` (old hyperparameter name -> new) and keep their own counters in
    :meth:`_extra_state` / :meth:`_load_extra_state`; ``state_dict`` stores those and the class
    name under ``"curvkit"``. A subclass that draws random numbers keeps its generator in
    ``_gen``; a failed step leaves it where it was.
    """

    _renamed: dict[str, str] = {}
    _gen: torch.Generator | None = None

    def __init__(self, params: Any, defaults: dict) -> None:
        self._check_group(defaults)  # before torch's own checks: a bad default is named as such
        super().__init__(params, defaults)

    @staticmethod
    def _check_group(group: dict) -> None:
        """Raise ArgumentError for a hyperparameter of ``group`` outside its range."""

    def add_param_group(self, param_group: dict) -> None:
        """torch's ``add_param_group``; the group's hyperparameters (its own merged with the
        defaults) are checked before it is added, and deprecated names are renamed."""
        group = dict(param_group)
        for old, new in self._renamed.items():
            if old in group:
                warnings.warn(f"the param group key {old!r} is deprecated; use {new!r}", DeprecationWarning,
                              stacklevel=2)
                group[new] = group.pop(old)
        self._check_group({**self.defaults, **{k: v for k, v in group.items() if k != "params"}})
        super().add_param_group(group)

    # --- the step protocol -----------------------------------------------------------------
    @staticmethod
    def _closure_loss(closure: Callable[[], Any] | None) -> Any:
        """torch's closure convention: re-evaluate the model (the closure calls backward) and
        return its loss."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _run_step(self, prepare: Callable[[], Staged], what: str, loss: Any = None,
                  grads: list[Tensor] | None = None) -> None:
        """The protocol: ``prepare()`` out of place, ONE finiteness check over its ``check`` (and the
        loss), then the commit. On a NaN/inf -- or any error -- nothing is written and the
        generator is restored; ``what`` names the curvature in the error."""
        gen_state = self._gen.get_state() if self._gen is not None else None
        loss_t = loss if isinstance(loss, Tensor) else None
        try:
            try:
                staged = prepare()
            except NonFiniteError:  # an eigh/root refused a non-finite factor: say what was at fault
                raise_non_finite(what, loss, grads)
            if not all_finite(([loss_t.detach()] if loss_t is not None else []) + staged.check):
                raise_non_finite(what, loss, grads)
        except BaseException:
            if gen_state is not None:
                self._gen.set_state(gen_state)
            raise
        staged.commit()

    def _step_groups(self, closure: Callable[[], Any] | None) -> Any:
        """A step whose update is ``self._prepare(group, new)`` per parameter group, under the
        protocol of :meth:`_run_step` (``self._what`` names the curvature in a non-finite error).
        Returns the closure's loss."""
        loss = self._closure_loss(closure)
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]

        def prepare() -> Staged:
            new = Staged()
            for group in self.param_groups:
                self._prepare(group, new)
            return new

        self._run_step(prepare, self._what, loss, grads)
        return loss

    def _staged_state(self, p: Tensor, new: Staged) -> dict:
        """``p``'s state dict; for a parameter seen the first time a fresh one, which only the
        commit enters into ``self.state`` (a failed first step leaves no state behind)."""
        st = self.state.get(p)  # not self.state[p]: the defaultdict would create the entry now
        if st:
            return st
        if id(p) not in new.fresh:
            new.fresh[id(p)] = {}
            new.put(self.state, p, new.fresh[id(p)], check=False)
        return new.fresh[id(p)]

    # --- state -----------------------------------------------------------------------------
    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, extra: dict) -> None:
        pass

    def state_dict(self) -> dict:
        """torch's state_dict plus the optimizer-level entry (class name, counters, generator state)."""
        sd = super().state_dict()
        sd[_EXTRA] = {"class": type(self).__name__, **self._extra_state()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state_dict (from any device), hyperparameters included. Refuses one saved from
        another optimizer (torch's or another curvkit class). Unlike torch's, float32 state of
        bf16/fp16 parameters stays float32 (torch would cast it to the parameter's dtype and
        lose bits). Groups saved under deprecated hyperparameter names are renamed."""
        state_dict = dict(state_dict)
        mine = type(self).__name__
        extra = state_dict.pop(_EXTRA, None)
        if extra is None:
            raise ArgumentError(
                f"this state_dict has no '{_EXTRA}' entry (step counter and random generator): it was not "
                f"saved by a curvkit optimizer; load a state_dict saved from a curvkit {mine}"
            )
        saved = extra.get("class")
        if saved is not None and saved not in [c.__name__ for c in type(self).__mro__]:
            raise ArgumentError(
                f"this state_dict was saved from a curvkit {saved}; it cannot be loaded into a {mine} (their "
                f"states hold different things): build a {saved} to resume it, or start this {mine} afresh"
            )
        groups = []
        for n, saved_group in enumerate(state_dict["param_groups"]):
            g, group = dict(saved_group), (self.param_groups[n] if n < len(self.param_groups) else {})
            for old, new in self._renamed.items():
                if old in g:
                    g.setdefault(new, g.pop(old))
            for k, v in group.items():  # a key saved before it existed keeps this optimizer's value
                g.setdefault(k, v)
            groups.append(g)
        state_dict["param_groups"] = groups
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            for k, v in state_dict["state"].get(i, {}).items():
                if isinstance(v, Tensor) and v.is_floating_point():
                    self.state[p][k] = v.to(device=p.device, dtype=state_dtype(p), copy=True)
        self._load_extra_state({k: v for k, v in extra.items() if k != "class"})
