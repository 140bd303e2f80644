"""The HF Trainer callback with the real framework (skipped where transformers is not installed)."""

import json

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from curvkit.integrations.hf import CurvatureCallback  # noqa: E402
from curvkit.errors import ArgumentError  # noqa: E402


class Tiny(nn.Module):
    """A Trainer-compatible model: keyword inputs, returns a dict with loss and logits."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class Data(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def test_trainer_callback_logs_and_writes(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g)
    cb = CurvatureCallback([({"x": x}, y)], nn.CrossEntropyLoss(), every=2, output="logits", tol=1e-6,
                           quantities=("sharpness", "grad_overlap"), jsonl=tmp_path / "h.jsonl", plot=tmp_path / "h.png")
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=16,
                                          learning_rate=0.1, logging_steps=2, report_to=[], save_strategy="no",
                                          use_cpu=True, disable_tqdm=True, optim="adamw_torch", lr_scheduler_type="constant")
    trainer = transformers.Trainer(model=Tiny(), args=args, train_dataset=Data(x, y), callbacks=[cb])
    trainer.train()
    assert [r.step for r in cb.history] == [0, 2, 4]
    logged = [h for h in trainer.state.log_history if "curvature/sharpness" in h]
    assert logged and all(h["curvature/sharpness"] > 0 for h in logged)
    assert cb.history[0].info["grad_overlap_source"] == "probe"
    assert [json.loads(s)["step"] for s in (tmp_path / "h.jsonl").read_text().splitlines()] == [0, 2, 4]
    assert (tmp_path / "h.png").stat().st_size > 1000
    with pytest.raises(ArgumentError, match="batch"):
        CurvatureCallback([({"x": x}, y)], nn.CrossEntropyLoss(), quantities=("batch_sharpness",))
