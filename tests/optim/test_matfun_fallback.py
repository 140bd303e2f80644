"""Matrix functions that do not crash: ``sym_eigh`` (and so ``inverse_root``) retries what LAPACK
refuses in float64, then with damping, warns once what it did, and raises a CurvkitError that
says what to do only when nothing works; Shampoo, SOAP and K-FAC take the first step of a
torchvision-style ResNet-18, whose low-rank float32 conv factors LAPACK refuses."""

import warnings

import pytest
import torch
from torch import nn

from curvkit.approx import matfun
from curvkit.approx.matfun import inverse_root, sym_eigh
from curvkit.errors import CurvkitError, FallbackWarning
from curvkit.optim import KFAC, SOAP, Shampoo


def _center_taps(channels=32, seed=0):
    """``G^T G`` of a 3x3 conv's gradient ``(32, channels * 9)`` on a 1x1 feature map (ResNet-18's
    last stage on 32x32 inputs): only the centre tap of each channel is nonzero, so 8 of every 9
    rows are exactly zero, and LAPACK's float32 eigh gives up on the repeated eigenvalues."""
    G = torch.zeros(32, channels * 9)
    G[:, 4::9] = torch.randn(32, channels, generator=torch.Generator().manual_seed(seed))
    return G.T @ G


def _refusing(monkeypatch, fails):
    """torch.linalg.eigh raising LinAlgError on its first ``fails`` calls (then the real one)."""
    real, calls = torch.linalg.eigh, []

    def eigh(A, *args, **kw):
        calls.append(A.dtype)
        if len(calls) <= fails:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge (mock)")
        return real(A, *args, **kw)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    return calls


def test_a_factor_float32_lapack_refuses_is_decomposed_in_float64():
    A = _center_taps()
    try:
        torch.linalg.eigh(A)
    except torch.linalg.LinAlgError:
        pass
    else:
        pytest.skip("this LAPACK build converges on the float32 factor; the mocks below still test the fallback")
    with pytest.warns(FallbackWarning, match="float64"):
        w, Q = sym_eigh(A)
    assert w.dtype == Q.dtype == torch.float32
    A64 = A.double()
    torch.testing.assert_close((Q.double() * w.double()) @ Q.double().T, A64, atol=1e-4 * A64.abs().max().item(),
                               rtol=0)


def test_fallback_in_float64_then_damping_then_a_curvkit_error(monkeypatch):
    A = torch.diag(torch.tensor([3.0, 1.0, 0.5]))
    calls = _refusing(monkeypatch, 1)  # float32 refused, float64 fine
    with pytest.warns(FallbackWarning, match="float64 instead"):
        w, _ = sym_eigh(A)
    assert calls == [torch.float32, torch.float64] and torch.allclose(w, torch.tensor([0.5, 1.0, 3.0]))

    A64 = A.double()
    calls = _refusing(monkeypatch, 3)  # float64, and the two smallest dampings, refused
    with pytest.warns(FallbackWarning, match="identity"):
        w, _ = sym_eigh(A64)
    assert calls == [torch.float64] * 4
    norm = float(torch.linalg.matrix_norm(A64))
    torch.testing.assert_close(w, torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64) + 1e-8 * norm,
                               rtol=0, atol=1e-12)  # the damping that worked (the third), as said

    _refusing(monkeypatch, 100)
    with pytest.raises(CurvkitError, match="damping.*root_method='newton'"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        inverse_root(A, 4, eps=1e-6)


def test_the_warning_is_shown_once(monkeypatch):
    A = torch.eye(3)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")  # Python's own filter: one message from one place shows once
        for _ in range(3):
            _refusing(monkeypatch, 1)
            matfun.sym_eigh(A)
    assert len([w for w in seen if issubclass(w.category, FallbackWarning)]) == 1


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    """torchvision's resnet18 with ``width`` channels in its first stage (64 there)."""

    def __init__(self, width=4, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], width
        for i in range(4):
            cout = width * 2**i
            stages.append(nn.Sequential(BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@pytest.mark.parametrize("make", [lambda m: Shampoo(m.parameters(), every=1), lambda m: SOAP(m.parameters()),
                                  lambda m: KFAC(m)], ids=["shampoo", "soap", "kfac"])
def test_resnet18_first_steps(make):
    torch.manual_seed(0)
    model = ResNet18()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    opt = make(model)
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)  # where LAPACK refused a factor in float32
        for _ in range(2):  # SOAP's first step only takes its eigenbases
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
