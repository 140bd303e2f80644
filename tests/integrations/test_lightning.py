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


def test_a_failing_measurement_does_not_stop_training_and_only_rank_zero_writes(tmp_path):
    import types
    import warnings

    torch.manual_seed(0)
    x, y = data()
    probe = (x.clone(), y)
    module = Module()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)

    class Mutate(pl.Callback):  # re-augments the probe set in place (on the CPU the monitor holds
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, i):  # these tensors): a failure
            if trainer.global_step == 2:
                probe[0].add_(1.0)

    cb = CurvatureCallback(probe, nn.CrossEntropyLoss(), every=2, jsonl=tmp_path / "c.jsonl")
    trainer = pl.Trainer(max_steps=6, callbacks=[Mutate(), cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader)
    assert trainer.global_step == 6
    failed = [r for r in cb.history if r.info.get("failed")]
    assert failed and "changed" in failed[0].message
    assert sum("failed and was recorded" in str(w.message) for w in caught) == 1
    assert (tmp_path / "c.jsonl").exists()
    (tmp_path / "c.jsonl").unlink()
    cb.on_train_end(types.SimpleNamespace(is_global_zero=False), module)
    assert not (tmp_path / "c.jsonl").exists()
