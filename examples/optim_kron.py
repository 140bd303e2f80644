"""Train a small CNN on real handwritten digits with K-FAC, Shampoo, SOAP and Muon:
`python examples/optim_kron.py`.

The ordinary loop stays as it is (zero_grad / backward / step); only the constructor changes.
K-FAC takes the model (it hooks its Linear and Conv2d layers to collect its Kronecker factors
during your backward pass); Muon may take the model too, so it can leave the output head to its
built-in AdamW. No network: the digits ship with scikit-learn's wheel.
"""

import torch
from torch import nn

from curvkit import datasets
from curvkit.optim import KFAC, SOAP, Muon, Shampoo


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128, 10))


def train(name, make_opt, steps=60):
    (x, y), (xt, yt) = datasets.split(*datasets.digits(), test_fraction=0.2, seed=0)
    model = make_model()
    opt = make_opt(model)
    data = datasets.batches(x, y, batch_size=128)
    for step in range(steps):
        xb, yb = data[step % len(data)]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    print(f"{name:8s} last batch loss {loss.item():.3f}  held-out accuracy {acc:.3f}")
    return acc


OPTIMIZERS = {
    "AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2),
    "K-FAC": lambda m: KFAC(m, lr=0.05, damping=1e-2, inverse_every=10),
    "Shampoo": lambda m: Shampoo(m.parameters(), lr=1e-2, every=10),
    "SOAP": lambda m: SOAP(m.parameters(), lr=1e-2, every=10),
    "Muon": lambda m: Muon(m, lr=0.05, adamw_lr=1e-2),
}

if __name__ == "__main__":
    for name, make in OPTIMIZERS.items():
        train(name, make)
