"""The README's integration snippets, run exactly as they stand there (tiny model, CPU).

Each snippet's surroundings (the user's model, data and arguments) are given as names; the code
itself is read from README.md, so a snippet that stops working fails here.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from cluster_data import CLASSES, cluster_data
from torch import nn

import tolaria

README = Path(__file__).resolve().parents[1] / "README.md"


def snippets(heading: str) -> list[str]:
    """The python code blocks of the README section ``heading`` (up to the next heading)."""
    text = README.read_text()
    start = text.index(f"\n{heading}\n")
    following = re.search(r"\n#{2,3} ", text[start + 1 :])
    section = text[start : start + 1 + following.start()] if following else text[start:]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, CLASSES))


def run(code: str, **names) -> dict:
    namespace = {"math": math, "torch": torch, "num_classes": CLASSES, **names}
    exec(compile(code, str(README), "exec"), namespace)
    return namespace


def test_mixed_precision_snippet() -> None:
    (code,) = snippets("## Mixed precision (fp16 with a GradScaler)")
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    governor = tolaria.TolariaGovernor(model, optimizer=optimizer, random_guess_loss=math.log(CLASSES))
    loader = torch.utils.data.DataLoader(cluster_data(128), batch_size=32)
    names = run(code, GuardedStep=tolaria.GuardedStep, governor=governor, optimizer=optimizer, model=model,
                loader=loader, loss_fn=nn.functional.cross_entropy, device="cpu")  # fmt: skip
    assert names["step"].scaler is names["scaler"] and names["outcome"].healthy
    assert len(governor.loss_history) == 4


def test_trainer_hook_snippet() -> None:
    (code,) = snippets("### Any loop that calls backward and step itself")
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    governor = tolaria.TolariaGovernor(model, optimizer=optimizer)
    inputs, labels = cluster_data(128).tensors
    loss = nn.functional.cross_entropy(model(inputs), labels)
    names = run(code, TrainerHook=tolaria.TrainerHook, governor=governor, optimizer=optimizer, loss=loss,
                accumulation_steps=1, is_last=True)  # fmt: skip
    assert names["outcome"].stepped and names["outcome"].grad_norm is None


def test_lightning_snippet(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    lightning = pytest.importorskip("lightning")

    class Classifier(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def training_step(self, batch, batch_idx):
            inputs, labels = batch
            return nn.functional.cross_entropy(self.net(inputs), labels)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    monkeypatch.chdir(tmp_path)  # the default Trainer writes its logs and checkpoints here
    (code,) = snippets("### Lightning")
    names = run(code, lightning=lightning, model=Classifier(),
                train_loader=torch.utils.data.DataLoader(cluster_data(128), batch_size=32))  # fmt: skip
    (callback,) = [c for c in names["trainer"].callbacks if type(c).__name__ == "TolariaCallback"]
    assert callback.governor is not None and len(callback.governor.loss_history) > 0
    assert callback.rollbacks == 0


def test_hugging_face_snippets(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def forward(self, inputs, labels=None):
            logits = self.net(inputs)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    class Data(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.inputs, self.labels = cluster_data(128).tensors

        def __len__(self) -> int:
            return len(self.labels)

        def __getitem__(self, index):
            return {"inputs": self.inputs[index], "labels": self.labels[index]}

    callback_code, trainer_code = snippets("### Hugging Face Trainer")
    for code in (callback_code, trainer_code):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), use_cpu=True, max_steps=12, per_device_train_batch_size=32,
            report_to="none", save_strategy="no", disable_tqdm=True, learning_rate=0.1,
        )  # fmt: skip
        names = run(code, Trainer=transformers.Trainer, model=Classifier(), args=args, train_dataset=Data())
        callbacks = names["trainer"].callback_handler.callbacks
        (callback,) = [c for c in callbacks if type(c).__name__ == "TolariaCallback"]
        assert callback.governor is not None and len(callback.governor.loss_history) > 0
        assert callback.rollbacks == 0


def test_accelerate_snippet() -> None:
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(cluster_data(128), batch_size=16)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    (code,) = snippets("### accelerate")
    names = run(code, accelerator=accelerator, model=model, optimizer=optimizer, train_loader=loader,
                loss_fn=nn.functional.cross_entropy)  # fmt: skip
    hook = names["hook"]
    assert hook.optimizer_steps == 4 and hook.rollbacks == 0 and len(hook.governor.loss_history) == 8
