"""The Lightning callback with the real framework (skipped where Lightning is not installed)."""

import json

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from curvkit.integrations.lightning import CurvatureCallback  # noqa: E402

import curvkit as ck  # noqa: E402


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        self.logged = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, i):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.5)

    def log_dict(self, metrics, *a, **kw):
        self.logged.append(dict(metrics))
        super().log_dict(metrics, *a, **kw)


def data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g)
    return x, y


def test_callback_logs_writes_and_matches_the_monitor(tmp_path):
    torch.manual_seed(0)
    x, y = data()
    module = Module()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    cb = CurvatureCallback((x, y), nn.CrossEntropyLoss(), every=3, quantities=("sharpness", "batch_sharpness"),
                           tol=1e-6, jsonl=tmp_path / "c.jsonl", plot=tmp_path / "c.png")
    trainer = pl.Trainer(max_steps=8, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, loader)
    assert [r.step for r in cb.history] == [0, 3, 6]
    state = cb.state_dict()
    assert len(module.logged) == 3
    m = module.logged[-1]
    assert m["curvature/sharpness_threshold"] == pytest.approx((2 + 2 * 0.5) / 0.2)
    assert "curvature/batch_sharpness" in m
    # the monitor measured the module being trained: its weights now give what a measurement now gives
    now = cb.monitor.measure(batch=(x[:16], y[:16])).values["sharpness"][0]
    exact = float(torch.linalg.eigvalsh(ck.hessian(module, nn.CrossEntropyLoss(), (x, y)).dense())[-1])
    assert abs(now - exact) <= cb.monitor.history[-1].errors["sharpness"][0] + 1e-5 * exact
    lines = (tmp_path / "c.jsonl").read_text().splitlines()
    assert [json.loads(s)["step"] for s in lines] == [0, 3, 6]
    assert (tmp_path / "c.png").stat().st_size > 1000
    again = CurvatureCallback((x, y), nn.CrossEntropyLoss(), every=3)
    again.load_state_dict(state)
    again.on_train_start(trainer, module)
    assert [r.step for r in again.history] == [0, 3, 6]
