r"""The one notion of a layer: a module with its chosen parameters, what kind it is, and for
linear and convolution layers their matrix view.

Every per-layer result (``blocks("layer")``, the report's layer table, K-FAC's factors, Muon's
split of hidden matrices from embeddings and the head) goes through :func:`layers`:

- a parameter belongs to the module that holds it (``named_parameters(recurse=False)``); the
  parameters a module holds directly form one layer, named after the module ("(root)" for the
  model itself);
- a parameter held by several modules is **tied**; its layer is its first holder's;
- a layer's **kind** is known by what it computes, not only by its class: ``nn.Linear`` and any
  module with a 2-D ``weight`` (and maybe a 1-D ``bias``) that computes ``x W^T + b`` are
  "linear"; one that computes ``x W + b`` (transformers' GPT-2 ``Conv1D``) is "linear" with
  ``transposed=True``. ``nn.Conv2d`` is "conv2d", embeddings "embedding", normalisation layers
  "norm", anything else "other".

A linear or conv2d layer computes ``s = W~ a~`` per row with ``W~ = [W | b]`` (the weight as
``(out, in)``, a conv kernel as ``(out, C*kh*kw)``, the bias a last column): the matrix view K-FAC
and the Kronecker optimizers work on (:meth:`Layer.to_matrix` / :meth:`Layer.from_matrix`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


@dataclass(eq=False)
class Layer:
    """One module and the chosen parameters it holds (``param_names``, in the model's order)."""

    name: str
    module: nn.Module
    kind: str
    param_names: list[str] = field(default_factory=list)
    attrs: list[str] = field(default_factory=list)  # the chosen parameters' attribute names
    tied: bool = False
    transposed: bool = False  # weight stored as (in, out)

    @property
    def weight(self) -> bool:
        return "weight" in self.attrs

    @property
    def bias(self) -> bool:
        return "bias" in self.attrs

    @property
    def has_bias(self) -> bool:
        return getattr(self.module, "bias", None) is not None

    @property
    def is_matrix(self) -> bool:
        """Linear or conv2d: a layer with a matrix view."""
        return self.kind in ("linear", "conv2d")

    # the matrix view (linear and conv2d) -------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """``(out, columns)`` of the full matrix form ``[W | b]``."""
        w = self.module.weight
        out = w.shape[1] if self.transposed else w.shape[0]
        return out, w.numel() // out + int(self.has_bias)

    def columns(self) -> slice:
        """The columns of ``[W | b]`` that the chosen parameters use."""
        _, cols = self.shape
        return slice(0 if self.weight else cols - 1, cols if (self.bias or not self.has_bias) else cols - 1)

    def kron_params(self) -> list[str]:
        """The chosen parameters in matrix-form order: the weight first, then the bias."""
        return sorted(self.param_names, key=lambda n: n.rpartition(".")[2] != "weight")

    def to_matrix(self, parts: list[Tensor]) -> Tensor:
        """The chosen parameters' tensors (in :meth:`kron_params` order) with a leading batch dim
        ``(k, *p.shape)`` -> ``(k, out, cols)``."""
        k, out = parts[0].shape[0], self.shape[0]
        mats, i = [], 0
        if self.weight:
            w = parts[i]
            mats.append(w.transpose(-1, -2) if self.transposed else w.reshape(k, out, -1))
            i += 1
        if self.bias:
            mats.append(parts[i].reshape(k, out, 1))
        return torch.cat(mats, dim=2) if len(mats) > 1 else mats[0]

    def from_matrix(self, M: Tensor) -> list[Tensor]:
        """Inverse of :meth:`to_matrix`: ``(k, out, cols)`` -> the chosen parameters ``(k, *p.shape)``."""
        k, parts = M.shape[0], []
        if self.weight:
            w = self.module.weight
            cols = w.numel() // self.shape[0]
            Mw = M[:, :, :cols]
            parts.append(Mw.transpose(-1, -2) if self.transposed else Mw.reshape(k, *w.shape))
        if self.bias:
            parts.append(M[:, :, -1])
        return parts

    def kron_reason(self) -> str | None:
        """None if K-FAC's Kronecker factors apply to this layer; otherwise what it is."""
        shown = f"module {self.name!r}"
        if self.tied:
            return f"{shown} shares a parameter with another module (tied weights)"
        if not self.is_matrix:
            return f"{shown} is a {type(self.module).__name__}"
        if set(self.attrs) - {"weight", "bias"}:
            return f"{shown} has parameters other than weight and bias"
        return conv_reason(self.module) if self.kind == "conv2d" else None


def conv_reason(m: nn.Module) -> str | None:
    if m.groups != 1:
        return f"a grouped Conv2d (groups={m.groups})"
    if m.padding_mode != "zeros":
        return f"a Conv2d with padding_mode={m.padding_mode!r}"
    if m.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(m.dilation, m.kernel_size)):
        return "a Conv2d with asymmetric padding='same'"
    return None


def classify(module: nn.Module) -> tuple[str, bool]:
    """``(kind, transposed)`` of a module, by class, else by what it computes."""
    if isinstance(module, nn.Linear):
        return "linear", False
    if isinstance(module, nn.Conv2d):
        return "conv2d", False
    if isinstance(module, EMBEDDINGS):
        return "embedding", False
    if isinstance(module, NORMS):
        return "norm", False
    transposed = _computes_linear(module)
    return ("linear", transposed) if transposed is not None else ("other", False)


def _computes_linear(module: nn.Module) -> bool | None:
    """Whether a module holding exactly a 2-D ``weight`` (and maybe a ``bias``) computes
    ``x W^T + b`` (False), ``x W + b`` (True: transposed), or neither (None). Judged by one
    forward of a random input of 3 rows for each orientation (hooks are not run)."""
    own = dict(module.named_parameters(recurse=False))
    w, b = own.get("weight"), own.get("bias")
    if w is None or w.dim() != 2 or set(own) - {"weight", "bias"} or any(True for _ in module.children()):
        return None
    if w.is_meta or not w.is_floating_point():
        return None
    gen = torch.Generator(device="cpu").manual_seed(0)
    for transposed in (False, True):
        n_in, n_out = (w.shape[0], w.shape[1]) if transposed else (w.shape[1], w.shape[0])
        if b is not None and (b.dim() != 1 or b.shape[0] != n_out):
            continue
        x = torch.randn(3, n_in, generator=gen, dtype=torch.float64).to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            expect = x @ w + (0 if b is None else b) if transposed else F.linear(x, w, b)
            try:
                got = module.forward(x)
            except Exception:  # noqa: BLE001 - a module that refuses a plain matrix is not a linear layer
                continue
        if isinstance(got, Tensor) and got.shape == expect.shape:
            tol = 1e-3 if w.dtype in (torch.float16, torch.bfloat16) else 1e-5
            if torch.allclose(got, expect, rtol=tol, atol=tol * float(expect.abs().max().clamp_min(1))):
                return transposed
    return None


def layers(model: nn.Module, named: list[tuple[str, Tensor]] | None = None) -> list[Layer]:
    """The layers holding the chosen ``(name, parameter)`` pairs (default: every parameter), in
    the model's order. Cost: one tiny forward per module of unknown class holding a 2-D weight."""
    if named is None:
        named = list(model.named_parameters())
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mname, m in model.named_modules():
        for attr, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((mname, m, attr))
    tied = {id(m) for own in owners.values() if len(own) > 1 for _, m, _ in own}
    out: dict[int, Layer] = {}
    for pname, p in named:
        mname, m, attr = owners[id(p)][0]
        layer = out.get(id(m))
        if layer is None:
            kind, transposed = classify(m)
            layer = out[id(m)] = Layer(mname or "(root)", m, kind, tied=id(m) in tied, transposed=transposed)
        layer.param_names.append(pname)
        layer.attrs.append(attr)
    return list(out.values())


def matrix_shape(shape: torch.Size) -> tuple[int, int] | None:
    """A parameter seen as a matrix when it has no layer to say better: ``(shape[0],
    prod(shape[1:]))`` for ``dim >= 2`` (a conv kernel ``(out, in*kh*kw)``), None otherwise."""
    if len(shape) < 2:
        return None
    return shape[0], int(torch.Size(shape[1:]).numel())


__all__ = ["Layer", "layers", "classify", "conv_reason", "matrix_shape", "NORMS", "EMBEDDINGS"]
