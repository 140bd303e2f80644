r"""Second-order Taylor mode over a network's inputs: a value that carries its derivatives.

A :class:`Jet` stands in for a tensor ``v`` of shape ``(B, *s)`` inside the user's function. It
also holds ``J`` ``(K, B, *s)``, the first derivatives of ``v`` along ``K`` input directions
``u_k``, and ``L``, their second derivatives: ``sum_k d^2 v[u_k, u_k]`` ``(B, *s)`` when
*collapsed* (the forward Laplacian of Li et al. 2023 / collapsed Taylor mode of Dangel et al.
2024), or one per direction ``(K, B, *s)`` (what the randomized estimators need for their
standard error). ``J`` may be broadcast over the example dimension (size 1 there) while it does
not depend on the example, and ``L = None`` means zero: both save work in the first layer.

The rules are written once per op, for the value, ``J`` and ``L`` together:

- linear maps ``A`` (``F.linear``, ``@``, sums, reshapes, indexing, ``cat`` ...): ``A v + b``,
  ``A J``, ``A L``;
- pointwise ``phi`` with known derivatives: ``J' = phi'(v) J``, ``L' = phi'(v) L + phi''(v)
  sum_k J_k^2``;
- bilinear ``a * b``, ``a @ b``: ``L' = L_a b + a L_b + 2 sum_k J_{a,k} J_{b,k}``.

The Jet is not a ``torch.Tensor``: it defines ``__torch_function__``, so ``torch.*`` and
``torch.nn.functional`` calls and ``nn.Module`` layers reach :func:`dispatch`, and Python
operators and tensor methods are forwarded to it. An op without a rule is computed exactly by
``torch.func`` (forward-over-forward per direction, over that op alone) with a
:class:`~curvkit.errors.FallbackWarning` naming it, or refused with
:class:`~curvkit.errors.UnsupportedOpError` when the fallback is off. Every rule is made of
ordinary torch ops, so results stay differentiable with respect to the network's parameters.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..errors import FallbackWarning, UnsupportedOpError

__all__ = ["Jet", "Context", "dispatch", "RULES"]


class Context:
    """What every Jet of one pass shares: the mode and the ops that fell back (warned once)."""

    def __init__(self, K: int, collapsed: bool, fallback: bool):
        self.K, self.collapsed, self.fallback = K, collapsed, fallback
        self.fell_back: set[str] = set()


class Jet:
    """A value ``v`` with its first (``J``) and second (``L``) derivatives along the pass's
    directions; see the module docstring for shapes."""

    __slots__ = ("v", "J", "L", "ctx", "is_part")

    def __init__(self, v: Tensor, J: Tensor | None, L: Tensor | None, ctx: Context):
        self.v, self.J, self.L, self.ctx = v, J, L, ctx
        self.is_part = False  # a part of another Jet (x[i], narrow, split ...): in-place ops refused

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return dispatch(func, args, kwargs or {})

    # tensor-like surface ----------------------------------------------------------------
    shape = property(lambda self: self.v.shape)
    dtype = property(lambda self: self.v.dtype)
    device = property(lambda self: self.v.device)
    ndim = property(lambda self: self.v.dim())
    requires_grad = property(lambda self: self.v.requires_grad)
    is_cuda = property(lambda self: self.v.is_cuda)
    T = property(lambda self: dispatch(Tensor.t if self.v.dim() == 2 else Tensor.permute,
                                       (self,) if self.v.dim() == 2 else (self, *reversed(range(self.v.dim()))), {}))
    mT = property(lambda self: dispatch(Tensor.transpose, (self, -2, -1), {}))

    def size(self, dim: int | None = None):
        return self.v.size() if dim is None else self.v.size(dim)

    def dim(self) -> int:
        return self.v.dim()

    def numel(self) -> int:
        return self.v.numel()

    def __len__(self) -> int:
        return len(self.v)

    def __repr__(self) -> str:
        kind = "collapsed" if self.ctx.collapsed else "per-direction"
        return f"Jet(shape={tuple(self.v.shape)}, directions={self.ctx.K}, {kind})"

    def __getattr__(self, name: str):
        method = getattr(Tensor, name, None)
        if method is None or name.startswith("_"):
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        if not callable(method):  # .data, .grad, .is_leaf ...: autograd state a Taylor pass does not have
            raise UnsupportedOpError(
                f"Taylor mode (ck.laplacian) cannot read the tensor attribute .{name} of a value that depends "
                "on the inputs; compute it outside f, or use ck.input_hessian, which runs f on plain tensors"
            )
        return lambda *a, **k: dispatch(method, (self, *a), k)

    def __setitem__(self, key, value):
        raise UnsupportedOpError(_SETITEM)

    def __bool__(self):
        return bool(self.v)

    def full_J(self) -> Tensor:
        return self.J.expand(self.ctx.K, *self.v.shape)

    def full_L(self) -> Tensor:
        shape = self.v.shape if self.ctx.collapsed else (self.ctx.K, *self.v.shape)
        return self.L.expand(shape)


def _binop(name: str, swap: bool = False):
    method = getattr(Tensor, name)

    def op(self, other):
        return dispatch(method, (other, self) if swap else (self, other), {})
    return op


for _name in ("add", "sub", "mul", "truediv", "matmul", "pow", "lt", "le", "gt", "ge", "eq", "ne"):
    setattr(Jet, f"__{_name}__", _binop(f"__{_name}__"))
for _name in ("add", "mul"):
    setattr(Jet, f"__r{_name}__", _binop(f"__{_name}__", swap=True))
# the reflected ops whose left operand may be a Python number go to their rules directly
Jet.__rsub__ = lambda self, other: _add_rule((other, self), {}, -1.0)
Jet.__rtruediv__ = lambda self, other: _div_rule((other, self), {})
Jet.__rmatmul__ = lambda self, other: _matmul_rule((other, self), {})
Jet.__rpow__ = lambda self, other: _pow_rule((other, self), {})
Jet.__neg__ = lambda self: dispatch(torch.neg, (self,), {})
Jet.__pos__ = lambda self: self
Jet.__abs__ = lambda self: dispatch(torch.abs, (self,), {})
Jet.__getitem__ = lambda self, idx: dispatch(Tensor.__getitem__, (self, idx), {})
Jet.__hash__ = object.__hash__


_SETITEM = ("in-place assignment of or into a tensor that depends on the inputs (t[...] = ...) cannot be "
            "differentiated in Taylor mode; build the tensor with torch.cat / torch.where (or torch.stack) instead")


# ---------------------------------------------------------------------------------------- helpers
def _make(v: Tensor, J: Tensor | None, L: Tensor | None, ctx: Context) -> Jet:
    """A Jet with ``J``/``L`` of the right rank (broadcast dims are kept, not expanded)."""
    if J is not None:
        J = _lift(J, v.dim() + 1)
    if L is not None and not ctx.collapsed:  # a collapsed L broadcasts right-aligned, as the value does
        L = _lift(L, v.dim() + 1)
    return Jet(v, J, L, ctx)


def _lift(T: Tensor, nd: int) -> Tensor:
    """Insert singleton dims after the direction dim so ``T`` has ``nd`` dims (right-aligned)."""
    if T.dim() >= nd:
        return T
    return T.reshape(T.shape[0], *([1] * (nd - T.dim())), *T.shape[1:])


def _lift_collapsed_or_k(jet: Jet, T: Tensor | None, nd: int) -> Tensor | None:
    """``L`` of ``jet`` ready to broadcast into an output of ``nd`` value dims."""
    if T is None or jet.ctx.collapsed:
        return T
    return _lift(T, nd + 1)


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _mulx(a: Tensor | None, c) -> Tensor | None:
    return None if a is None else a * c


def _quad(ctx: Context, A: Tensor, B: Tensor) -> Tensor:
    """``sum_k A_k B_k`` (collapsed) or ``A_k B_k`` per direction."""
    return (A * B).sum(0) if ctx.collapsed else A * B


def _ctx_of(args, kwargs) -> Context:
    for leaf in tree_flatten((args, kwargs))[0]:
        if isinstance(leaf, Jet):
            return leaf.ctx
    raise AssertionError("dispatch without a Jet")  # pragma: no cover


def _values(tree):
    return tree_map(lambda a: a.v if isinstance(a, Jet) else a, tree)


def _arg(args, kwargs, i: int, name: str, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _op_name(func) -> str:
    mod = getattr(func, "__module__", None) or ""
    qual = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
    if "Tensor" in qual or mod.startswith("torch._C") and "." in qual:
        return f"torch.Tensor.{getattr(func, '__name__', qual)}"
    if mod.startswith("torch.nn.functional") or mod == "torch._C._nn":
        return f"torch.nn.functional.{getattr(func, '__name__', qual)}"
    if mod.startswith("torch"):
        return f"torch.{getattr(func, '__name__', qual)}"
    return f"{mod}.{qual}" if mod else qual


# ---------------------------------------------------------------------------------------- pointwise
def _sigmoid_derivs(v):
    s = torch.sigmoid(v)
    d1 = s * (1 - s)
    return s, d1, d1 * (1 - 2 * s)


def _tanh(v, **_):
    t = torch.tanh(v)
    d1 = 1 - t * t
    return t, d1, -2 * t * d1


def _sigmoid(v, **_):
    return _sigmoid_derivs(v)


def _softplus(v, beta=1.0, threshold=20.0, **_):
    s, d1, _d2 = _sigmoid_derivs(beta * v)
    lin = beta * v > threshold  # torch's softplus is the identity there, with that derivative
    return (F.softplus(v, beta, threshold), torch.where(lin, torch.ones_like(s), s),
            torch.where(lin, torch.zeros_like(s), beta * d1))


_SQRT_2PI = math.sqrt(2 * math.pi)


def _gelu(v, approximate="none", **_):
    if approximate == "tanh":
        c, a = math.sqrt(2 / math.pi), 0.044715
        u = c * (v + a * v ** 3)
        du, ddu = c * (1 + 3 * a * v * v), c * 6 * a * v
        t = torch.tanh(u)
        sech2 = 1 - t * t
        d1 = 0.5 * (1 + t) + 0.5 * v * sech2 * du
        d2 = sech2 * du + 0.5 * v * (-2 * t * sech2 * du * du + sech2 * ddu)
        return 0.5 * v * (1 + t), d1, d2
    pdf = torch.exp(-0.5 * v * v) / _SQRT_2PI
    cdf = 0.5 * (1 + torch.erf(v / math.sqrt(2)))
    return v * cdf, cdf + v * pdf, pdf * (2 - v * v)


def _silu(v, **_):
    s, d1s, _ = _sigmoid_derivs(v)
    return v * s, s + v * d1s, d1s * (2 + v * (1 - 2 * s))


def _mish(v, **_):
    sp = F.softplus(v)
    t = torch.tanh(sp)
    s, ds, _ = _sigmoid_derivs(v)          # softplus' = sigmoid, softplus'' = sigmoid'
    sech2 = 1 - t * t
    dt = sech2 * s                          # d tanh(sp) / dv
    ddt = -2 * t * sech2 * s * s + sech2 * ds
    return v * t, t + v * dt, 2 * dt + v * ddt


def _logsigmoid(v, **_):
    s, d1, _ = _sigmoid_derivs(v)
    return F.logsigmoid(v), 1 - s, -d1


def _relu(v, **_):
    return torch.relu(v), (v > 0).to(v.dtype), None


def _leaky_relu(v, negative_slope=0.01, **_):
    pos = v > 0
    return (F.leaky_relu(v, negative_slope), torch.where(pos, torch.ones_like(v), torch.full_like(v, negative_slope)),
            None)


def _elu(v, alpha=1.0, **_):
    e = alpha * torch.exp(v)
    pos = v > 0
    return (F.elu(v, alpha), torch.where(pos, torch.ones_like(v), e), torch.where(pos, torch.zeros_like(v), e))


def _celu(v, alpha=1.0, **_):
    e = torch.exp(v / alpha)
    pos = v > 0
    return (F.celu(v, alpha), torch.where(pos, torch.ones_like(v), e),
            torch.where(pos, torch.zeros_like(v), e / alpha))


def _selu(v, **_):
    alpha, scale = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946
    e = alpha * torch.exp(v)
    pos = v > 0
    return (torch.selu(v), scale * torch.where(pos, torch.ones_like(v), e),
            scale * torch.where(pos, torch.zeros_like(v), e))


def _pow_scalar(v, p):
    if p == 0:
        return torch.ones_like(v), None, None
    if p == 1:
        return v, torch.ones_like(v), None
    if p == 2:
        return v * v, 2 * v, torch.full_like(v, 2.0)
    return v ** p, p * v ** (p - 1), p * (p - 1) * v ** (p - 2)


def _d(fn1, fn2):
    return lambda v, **_: (fn1(v), *fn2(v))


_POINTWISE: dict[str, Callable] = {
    "tanh": _tanh, "sigmoid": _sigmoid, "softplus": _softplus, "gelu": _gelu, "silu": _silu, "mish": _mish,
    "logsigmoid": _logsigmoid, "relu": _relu, "leaky_relu": _leaky_relu, "elu": _elu, "celu": _celu, "selu": _selu,
    "sin": lambda v, **_: (torch.sin(v), torch.cos(v), -torch.sin(v)),
    "cos": lambda v, **_: (torch.cos(v), -torch.sin(v), -torch.cos(v)),
    "exp": lambda v, **_: (lambda e: (e, e, e))(torch.exp(v)),
    "expm1": lambda v, **_: (lambda e: (e - 1, e, e))(torch.exp(v)),
    "log": lambda v, **_: (torch.log(v), 1 / v, -1 / (v * v)),
    "log1p": lambda v, **_: (torch.log1p(v), 1 / (1 + v), -1 / ((1 + v) * (1 + v))),
    "sqrt": lambda v, **_: (lambda s: (s, 0.5 / s, -0.25 / (s * s * s)))(torch.sqrt(v)),
    "rsqrt": lambda v, **_: (lambda r: (r, -0.5 * r ** 3, 0.75 * r ** 5))(torch.rsqrt(v)),
    "reciprocal": lambda v, **_: (lambda r: (r, -r * r, 2 * r ** 3))(torch.reciprocal(v)),
    "square": lambda v, **_: (v * v, 2 * v, torch.full_like(v, 2.0)),
    "abs": lambda v, **_: (torch.abs(v), torch.sign(v), None),
    "sinh": lambda v, **_: (torch.sinh(v), torch.cosh(v), torch.sinh(v)),
    "cosh": lambda v, **_: (torch.cosh(v), torch.sinh(v), torch.cosh(v)),
    "atan": lambda v, **_: (lambda q: (torch.atan(v), 1 / q, -2 * v / (q * q)))(1 + v * v),
    "erf": lambda v, **_: (lambda g: (torch.erf(v), g, -2 * v * g))(2 / math.sqrt(math.pi) * torch.exp(-v * v)),
}
_POINTWISE["arctan"] = _POINTWISE["atan"]
_POINTWISE["log_sigmoid"] = _POINTWISE["logsigmoid"]
_KWARGS = {"softplus": ("beta", "threshold"), "gelu": ("approximate",), "leaky_relu": ("negative_slope",),
           "elu": ("alpha",), "celu": ("alpha",)}


def _apply_pointwise(x: Jet, fn, **kw) -> Jet:
    val, d1, d2 = fn(x.v, **kw)
    ctx = x.ctx
    J = None if x.J is None or d1 is None else d1 * x.J
    L = _mulx(x.L, d1) if d1 is not None else None
    if d2 is not None and x.J is not None:
        L = _add(L, d2 * _quad(ctx, x.J, x.J))
    return _make(val, J, L, ctx)


def _pointwise_rule(name: str):
    names = _KWARGS.get(name, ())

    def rule(args, kwargs):
        x = args[0]
        kw = {n: a for n, a in zip(names, args[1:])}
        kw.update({k: v for k, v in kwargs.items() if k in names})
        return _apply_pointwise(x, _POINTWISE[name], **kw)
    return rule


# ---------------------------------------------------------------------------------------- arithmetic
def _as_jet(a, ctx: Context) -> Jet:
    return a if isinstance(a, Jet) else Jet(torch.as_tensor(a) if not isinstance(a, Tensor) else a, None, None, ctx)


def _add_rule(args, kwargs, sign: float = 1.0):
    a, b = args[0], args[1]
    alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
    ctx = _ctx_of(args, kwargs)
    c = sign * alpha
    v = (a.v if isinstance(a, Jet) else a) + c * (b.v if isinstance(b, Jet) else b)
    nd = v.dim()
    J = L = None
    if isinstance(a, Jet):
        J, L = _lift_j(a.J, nd), _lift_collapsed_or_k(a, a.L, nd)
    if isinstance(b, Jet):
        J = _add(J, _mulx(_lift_j(b.J, nd), c) if c != 1 else _lift_j(b.J, nd))
        L = _add(L, _mulx(_lift_collapsed_or_k(b, b.L, nd), c) if c != 1 else _lift_collapsed_or_k(b, b.L, nd))
    return _make(v, J, L, ctx)


def _lift_j(J, nd):
    return None if J is None else _lift(J, nd + 1)


def _mul_rule(args, kwargs):
    a, b = args[0], args[1]
    ctx = _ctx_of(args, kwargs)
    if not isinstance(a, Jet):
        a, b = b, a
    if not isinstance(b, Jet):  # a scalar or constant tensor: linear
        v = a.v * b
        nd = v.dim()
        return _make(v, _mulx(_lift_j(a.J, nd), b), _mulx(_lift_collapsed_or_k(a, a.L, nd), b), ctx)
    v = a.v * b.v
    nd = v.dim()
    Ja, Jb = _lift_j(a.J, nd), _lift_j(b.J, nd)
    J = _add(_mulx(Ja, b.v), _mulx(Jb, a.v))
    L = _add(_mulx(_lift_collapsed_or_k(a, a.L, nd), b.v), _mulx(_lift_collapsed_or_k(b, b.L, nd), a.v))
    if Ja is not None and Jb is not None:
        L = _add(L, 2 * _quad(ctx, Ja, Jb))
    return _make(v, J, L, ctx)


def _div_rule(args, kwargs):
    a, b = args[0], args[1]
    if kwargs.get("rounding_mode") is not None:
        return _constant(torch.div, args, kwargs)
    if not isinstance(b, Jet):
        return _mul_rule((a, 1 / b if not isinstance(b, Tensor) else torch.reciprocal(b)), {})
    rb = _apply_pointwise(b, _POINTWISE["reciprocal"])
    return _mul_rule((a, rb), {})


def _pow_rule(args, kwargs):
    a, p = args[0], _arg(args, kwargs, 1, "exponent")
    if isinstance(a, Jet) and not isinstance(p, (Jet, Tensor)):
        return _apply_pointwise(a, lambda v: _pow_scalar(v, p))
    if isinstance(a, Jet) and isinstance(p, Tensor) and p.numel() == 1 and not p.requires_grad:
        return _apply_pointwise(a, lambda v: _pow_scalar(v, p.item()))
    if isinstance(a, Jet) and isinstance(p, Tensor):  # a constant exponent per element: pointwise in a
        # (not exp(p log a), which is NaN for a negative base with integer exponents, as torch is not)
        return _apply_pointwise(a, lambda v: (v ** p, p * v ** (p - 1), p * (p - 1) * v ** (p - 2)))
    # c ** x = exp(x log c); a ** b = exp(b log a): compositions of rules
    if not isinstance(a, Jet):
        base = torch.as_tensor(a, dtype=p.dtype, device=p.device)
        return _apply_pointwise(_mul_rule((p, torch.log(base)), {}), _POINTWISE["exp"])
    loga = _apply_pointwise(a, _POINTWISE["log"])
    return _apply_pointwise(_mul_rule((p, loga), {}), _POINTWISE["exp"])


def _neg_rule(args, kwargs):
    return _mul_rule((args[0], -1.0), {})


def _rsub_rule(args, kwargs):  # torch.rsub(a, b) = b - alpha * a
    return _add_rule((args[1], args[0]), {"alpha": -kwargs.get("alpha", 1)})


# ---------------------------------------------------------------------------------------- linear / bilinear
def _linear_rule(args, kwargs):
    x, W, b = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    if not isinstance(x, Jet) or isinstance(W, Jet) or isinstance(b, Jet):
        return _fallback(F.linear, args, kwargs)
    ctx = x.ctx
    v = F.linear(x.v, W, b)
    J = None if x.J is None else x.J @ W.T
    L = None if x.L is None else x.L @ W.T
    return _make(v, J, L, ctx)


def _matmul_rule(args, kwargs, op=torch.matmul):
    a, b = args[0], args[1]
    ctx = _ctx_of(args, kwargs)
    if isinstance(a, Jet) and not isinstance(b, Jet) and b.dim() <= 2:  # the common case, no vmap
        v = op(a.v, b)
        return _make(v, None if a.J is None else op(a.J, b), None if a.L is None else op(a.L, b), ctx)
    return _bilinear(op, a, b, ctx)


def _bilinear(op, a, b, ctx: Context) -> Jet:
    """The product rule for an op bilinear in ``(a, b)``, vmapped over the directions."""
    av, bv = _values(a), _values(b)
    v = op(av, bv)
    vm = torch.vmap
    J = L = None
    if isinstance(a, Jet) and a.J is not None:
        J = vm(lambda t: op(t, bv))(a.full_J())
    if isinstance(b, Jet) and b.J is not None:
        J = _add(J, vm(lambda t: op(av, t))(b.full_J()))
    for x, left in ((a, True), (b, False)):
        if isinstance(x, Jet) and x.L is not None:
            f = (lambda t: op(t, bv)) if left else (lambda t: op(av, t))
            L = _add(L, f(x.full_L()) if ctx.collapsed else vm(f)(x.full_L()))
    if isinstance(a, Jet) and isinstance(b, Jet) and a.J is not None and b.J is not None:
        cross = vm(op)(a.full_J(), b.full_J())
        L = _add(L, 2 * (cross.sum(0) if ctx.collapsed else cross))
    return _make(v, J, L, ctx)


def _einsum_rule(args, kwargs):
    eq, ops = args[0], args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = tuple(ops[0])
    ctx = _ctx_of(args, kwargs)
    if len(ops) == 1:
        return _structural(torch.einsum, (eq, ops[0]), {})
    if len(ops) == 2:
        return _bilinear(lambda x, y: torch.einsum(eq, x, y), ops[0], ops[1], ctx)
    return _fallback(torch.einsum, args, kwargs)


# ---------------------------------------------------------------------------------------- structure
def _structural(func, args, kwargs):
    """An op linear in its Jet arguments (jointly), e.g. reshape, indexing, sum, cat, where over
    constant masks: ``J`` and ``L`` go through the same op, vmapped over the directions;
    constant data arguments (plain tensors in a cat) count as zero there."""
    ctx = _ctx_of(args, kwargs)
    flat, spec = tree_flatten((args, kwargs))
    jets = [i for i, a in enumerate(flat) if isinstance(a, Jet)]
    data = _data_leaves(func, args, kwargs, flat, spec)

    def call(leaves):
        a, k = tree_unflatten(leaves, spec)
        return func(*a, **k)

    vals = [a.v if isinstance(a, Jet) else a for a in flat]
    v = call(vals)

    def part(*tangents):
        leaves = list(vals)
        for i in data:
            leaves[i] = torch.zeros_like(vals[i]) if isinstance(vals[i], Tensor) else 0.0
        for i, t in zip(jets, tangents):
            leaves[i] = torch.zeros_like(vals[i]) if t is None else t
        return call(leaves)

    def through(kind: str, batched: bool):
        ts = [getattr(flat[i], kind) for i in jets]
        if all(t is None for t in ts):
            return None
        ts = [None if t is None else (flat[i].full_J() if kind == "J" else flat[i].full_L()) for i, t in zip(jets, ts)]
        if not batched:
            return part(*ts)
        return torch.vmap(part, in_dims=tuple(None if t is None else 0 for t in ts))(*ts)

    J = through("J", True)
    L = through("L", not ctx.collapsed)
    out = _wrap_out(v, J, L, ctx)
    if getattr(func, "__name__", "") in _PARTIAL_VIEWS:
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            o.is_part = True
    return out


def _data_leaves(func, args, kwargs, flat, spec) -> list[int]:
    """Positions of plain tensors that are data (not indices) of a structural op: zero there."""
    name = getattr(func, "__name__", "")
    if name in ("cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack", "where"):
        marked = list(flat)
        if name == "where":
            a = list(args)
            for j in (1, 2):  # a plain tensor or a Python number is constant: zero derivatives
                if len(a) > j and isinstance(a[j], (Tensor, int, float)) and not isinstance(a[j], bool):
                    a[j] = _MARK
            mflat = tree_flatten((tuple(a), kwargs))[0]
        else:
            seq = [(_MARK if isinstance(t, Tensor) else t) for t in args[0]]
            mflat = tree_flatten(((seq, *args[1:]), kwargs))[0]
        return [i for i, m in enumerate(mflat) if m is _MARK and i < len(marked)]
    return []


_MARK = object()


def _wrap_out(v, J, L, ctx):
    if isinstance(v, Tensor):
        return _make(v, J, L, ctx)
    n = len(v)  # tuple/list outputs (split, chunk, unbind)
    Js = [None] * n if J is None else list(J)
    Ls = [None] * n if L is None else list(L)
    return type(v)(_make(vi, ji, li, ctx) for vi, ji, li in zip(v, Js, Ls))


_STRUCTURAL = {
    "reshape", "view", "flatten", "unflatten", "squeeze", "unsqueeze", "permute", "transpose", "t", "movedim",
    "moveaxis", "swapaxes", "swapdims", "expand", "expand_as", "repeat", "narrow", "select", "__getitem__",
    "cat", "concat", "concatenate", "stack", "hstack", "vstack", "split", "chunk", "unbind", "tensor_split",
    "sum", "mean", "flip", "roll", "diagonal", "diag", "diag_embed", "tril", "triu", "clone", "contiguous",
    "cumsum", "trace", "index_select", "gather", "take_along_dim", "where", "masked_fill", "view_as",
    "reshape_as", "broadcast_to", "to", "double", "float", "half", "type_as",
    "nansum", "repeat_interleave", "tile", "flipud", "fliplr", "rot90", "ravel", "atleast_2d", "atleast_1d",
}
# ops whose result is a part of their input (a view in torch): writing into it in place would
# write into the input, which a Jet (not a view) cannot do
_PARTIAL_VIEWS = {"__getitem__", "narrow", "select", "split", "chunk", "unbind", "tensor_split", "diagonal"}
_CONSTANT = {
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like", "sign",
    "floor", "ceil", "round", "trunc", "frac_", "detach", "new_zeros", "new_ones", "new_full", "new_empty",
    "new_tensor", "heaviside", "argmax", "argmin", "argsort", "isfinite", "isnan", "isinf", "signbit", "sgn",
    "size", "dim", "numel", "cpu", "cuda", "item", "tolist", "__format__", "__len__", "equal",
}


def _constant(func, args, kwargs):
    """Ops whose result does not change (locally) with the inputs: computed on values only."""
    return func(*_values(args), **_values(kwargs))


def _masked_fill_check(args, kwargs):
    value = _arg(args, kwargs, 2, "value")
    if isinstance(value, Jet):
        return _fallback(Tensor.masked_fill, args, kwargs)
    # x.masked_fill(m, c): linear in x plus a constant where masked; J/L get zeros there
    x, mask = args[0], _arg(args, kwargs, 1, "mask")
    out = _structural(lambda t, m: t.masked_fill(m, 0.0), (x, mask), {})
    out.v = x.v.masked_fill(mask, value)
    return out


def _layer_norm_rule(args, kwargs):
    """``F.layer_norm`` composed of rules (torch.func's forward-over-forward of the fused kernel
    is wrong in torch 2.13: a second directional derivative off by 5x)."""
    x, shape = args[0], _arg(args, kwargs, 1, "normalized_shape")
    w, b, eps = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias"), _arg(args, kwargs, 4, "eps", 1e-5)
    if any(isinstance(t, Jet) for t in (w, b)):
        return _fallback(F.layer_norm, args, kwargs)
    dims = tuple(range(-len(shape), 0))
    c = x - x.mean(dims, keepdim=True)
    y = c * torch.rsqrt((c * c).mean(dims, keepdim=True) + eps)
    if w is not None:
        y = y * w
    return y if b is None else y + b


# ---------------------------------------------------------------------------------------- fallback
def _fallback(func, args, kwargs):
    """An op with no rule: its (J, L) from torch.func, forward-over-forward per direction over
    the op alone (exact), after a FallbackWarning; or an UnsupportedOpError."""
    ctx = _ctx_of(args, kwargs)
    name = _op_name(func)
    flat, spec = tree_flatten((args, kwargs))
    jets = [i for i, a in enumerate(flat) if isinstance(a, Jet)]
    vals = [a.v if isinstance(a, Jet) else a for a in flat]

    def g(*xs):
        leaves = list(vals)
        for i, x in zip(jets, xs):
            leaves[i] = x
        a, k = tree_unflatten(leaves, spec)
        return func(*a, **k)

    primals = tuple(vals[i] for i in jets)
    try:
        v = g(*primals)
        outs, ospec = tree_flatten(v)
        if not any(isinstance(o, Tensor) and o.is_floating_point() for o in outs):
            return v  # integer / boolean results carry no derivatives
        if not ctx.fallback:
            raise UnsupportedOpError(
                f"Taylor mode has no rule for {name}; pass fallback=True (the default) to compute it with "
                "torch.func per direction (exact, slower), rewrite it with supported ops, or use "
                "ck.input_hessian, which differentiates any op by torch.func"
            )
        if name not in ctx.fell_back:
            ctx.fell_back.add(name)
            warnings.warn(
                f"Taylor mode has no rule for {name}; computing its derivatives with torch.func "
                f"(forward-over-forward, {ctx.K} directions over that op): exact, but slower. Pass "
                "fallback=False to make this an error",
                FallbackWarning, stacklevel=5,
            )
        zeros = tuple(torch.zeros_like(p) for p in primals)
        Js = tuple(flat[i].full_J() if flat[i].J is not None else None for i in jets)
        Jin = tuple(J if J is not None else torch.zeros_like(p).expand(ctx.K, *p.shape) for J, p in zip(Js, primals))

        def first_second(*t):
            inner = lambda *u: torch.func.jvp(g, u, t)[1]  # noqa: E731
            return torch.func.jvp(inner, primals, t)

        dv, d2 = torch.vmap(first_second)(*Jin)
        Ls = tuple(flat[i].full_L() if flat[i].L is not None else None for i in jets)
        lin = None
        if any(L is not None for L in Ls):
            Lin = tuple(L if L is not None else (z if ctx.collapsed else z.expand(ctx.K, *z.shape))
                        for L, z in zip(Ls, zeros))
            dl = lambda *t: torch.func.jvp(g, primals, t)[1]  # noqa: E731
            lin = dl(*Lin) if ctx.collapsed else torch.vmap(dl)(*Lin)
    except UnsupportedOpError:
        raise
    except (RuntimeError, NotImplementedError, TypeError) as e:
        raise UnsupportedOpError(
            f"Taylor mode has no rule for {name}, and torch.func could not differentiate it either ({e}); "
            "rewrite it with supported ops, or use ck.input_hessian"
        ) from e
    dvs, d2s = tree_flatten(dv)[0], tree_flatten(d2)[0]
    lins = tree_flatten(lin)[0] if lin is not None else [None] * len(outs)
    res = []
    for o, j, s, li in zip(outs, dvs, d2s, lins):
        if not (isinstance(o, Tensor) and o.is_floating_point()):
            res.append(o)
            continue
        L = s.sum(0) if ctx.collapsed else s
        res.append(_make(o, j, _add(L, li), ctx))
    return tree_unflatten(res, ospec)


# ---------------------------------------------------------------------------------------- dispatch
def _inplace(rule, name: str):
    """The in-place form of ``rule``: the Jet ``args[0]`` takes the out-of-place result. A plain
    tensor cannot take a Jet's derivatives, nor can a part of a Jet (a view in torch): refused."""
    def run(args, kwargs):
        x = args[0]
        if not isinstance(x, Jet):  # t.add_(jet) and t += jet both arrive here as add_: refused
            raise UnsupportedOpError(
                f"torch.Tensor.{name} writes a value that depends on the inputs into a plain tensor in place, "
                f"which Taylor mode cannot track; use the out-of-place form (t = t.{name.rstrip('_')}(...), "
                "t = t + ... for t += ...) or build the tensor with torch.cat / torch.where"
            )
        if x.is_part:
            raise UnsupportedOpError(
                f"torch.Tensor.{name} modifies in place a part (x[...], narrow, split ...) of a tensor that "
                "depends on the inputs, which Taylor mode cannot write through to the whole tensor; use the "
                "out-of-place op and torch.cat / torch.where to assemble the result"
            )
        out = rule(args, kwargs)
        x.v, x.J, x.L = out.v, out.J, out.L
        return x
    return run


def _generic_inplace(name: str):
    """An in-place op without a rule of its own: its out-of-place twin, dispatched, then written
    into the Jet (never the fallback on the op itself, which would mutate the values it differentiates)."""
    twin = getattr(Tensor, name[:-1], None)
    if not callable(twin):
        def refuse(args, kwargs):
            raise UnsupportedOpError(
                f"Taylor mode cannot run the in-place op torch.Tensor.{name} on a tensor that depends on the "
                "inputs; use an out-of-place equivalent (torch.where, masked_fill, torch.cat ...)"
            )
        return refuse
    return _inplace(lambda a, k: dispatch(twin, a, k), name)


RULES: dict[str, Callable] = {name: _pointwise_rule(name) for name in _POINTWISE}
RULES.update({
    "add": _add_rule, "__add__": _add_rule, "sub": lambda a, k: _add_rule(a, k, -1.0),
    "__sub__": lambda a, k: _add_rule(a, k, -1.0), "subtract": lambda a, k: _add_rule(a, k, -1.0),
    "rsub": _rsub_rule, "mul": _mul_rule, "__mul__": _mul_rule, "multiply": _mul_rule,
    "div": _div_rule, "divide": _div_rule, "true_divide": _div_rule, "__truediv__": _div_rule,
    "pow": _pow_rule, "__pow__": _pow_rule, "neg": _neg_rule, "negative": _neg_rule,
    "linear": _linear_rule, "matmul": _matmul_rule, "__matmul__": _matmul_rule,
    "mm": lambda a, k: _matmul_rule(a, k, torch.mm), "bmm": lambda a, k: _bilinear(torch.bmm, a[0], a[1], _ctx_of(a, k)),
    "einsum": _einsum_rule, "masked_fill": _masked_fill_check, "layer_norm": _layer_norm_rule,
})
for _n in ("tanh", "sigmoid", "relu", "sin", "cos", "exp", "add", "mul", "sub", "div", "neg", "pow", "sqrt",
           "square", "abs", "log", "reciprocal", "silu", "elu", "leaky_relu", "celu", "selu"):
    RULES[_n + "_"] = _inplace(RULES[_n], _n + "_")


def dispatch(func, args, kwargs, name: str | None = None):
    """Run ``func`` on arguments some of which are Jets: by its rule, as a constant, or through
    the fallback."""
    name = name or getattr(func, "__name__", "")
    if name in ("silu", "relu", "elu", "leaky_relu", "celu", "selu") and kwargs.get("inplace"):
        kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}
        return _inplace(RULES[name], name + "_")(args, kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k != "inplace"} if "inplace" in kwargs else kwargs
    rule = RULES.get(name)
    if rule is not None:
        return rule(args, kwargs)
    if name == "__setitem__":  # a Jet assigned into a plain tensor (Jet.__setitem__ refuses the other way)
        raise UnsupportedOpError(_SETITEM)
    if name.endswith("_") and not name.startswith("_"):
        return _generic_inplace(name)(args, kwargs)
    if name in _STRUCTURAL:
        return _structural(func, args, kwargs)
    if name in _CONSTANT or name in ("__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__", "lt", "le", "gt",
                                     "ge", "eq", "ne", "__bool__", "__index__", "__int__", "__float__"):
        return _constant(func, args, kwargs)
    return _fallback(func, args, kwargs)
