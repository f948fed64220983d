"""Shared training machinery: checkpoints, resume, progress bar and TensorBoard logs.

Checkpoints are folders holding the model in Hub layout (``save_pretrained``) plus the
optimizer state and step counter as safetensors, so resuming never unpickles anything.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import safetensors.torch
import torch
from tqdm import tqdm

from mmtok.errors import MmtokError
from mmtok.hub import HubModel

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trainer_state.safetensors"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch random generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        if not name.startswith("optimizer."):
            continue
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


class TrainingRun:
    """A training run in ``output_dir``: checkpoints every N steps, resume, logs.

    Args:
        output_dir: folder for ``checkpoint/`` and, at the end, the final model.
        model: the model being trained.
        optimizer: its optimizer.
        steps: total number of optimizer steps.
        checkpoint_every: steps between checkpoints.
        logdir: TensorBoard folder, or None for no TensorBoard logs.
        resume: continue from ``output_dir/checkpoint`` when it exists.
    """

    def __init__(
        self,
        output_dir: Path,
        model: HubModel,
        optimizer: torch.optim.Optimizer,
        steps: int,
        checkpoint_every: int = 500,
        logdir: Path | None = None,
        resume: bool = False,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.optimizer = optimizer
        self.steps = steps
        self.checkpoint_every = checkpoint_every
        self.step = 0
        self.writer = None
        if logdir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise MmtokError("--logdir needs TensorBoard: pip install 'mmtok[train]'") from error
            self.writer = SummaryWriter(str(logdir))
        if resume:
            self._load_checkpoint()

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / CHECKPOINT_DIR

    def _load_checkpoint(self) -> None:
        state_file = self.checkpoint_dir / STATE_FILE
        if not state_file.is_file():
            logger.warning("no checkpoint in %s; starting from step 0", self.checkpoint_dir)
            return
        safetensors.torch.load_model(self.model, str(self.checkpoint_dir / "model.safetensors"), strict=True)
        tensors = safetensors.torch.load_file(str(state_file))
        with safetensors.safe_open(str(state_file), framework="pt") as handle:
            meta = json.loads(handle.metadata()["trainer"])
        _optimizer_from_flat(self.optimizer, tensors, meta["optimizer"])
        self.step = int(meta["step"])
        random.setstate((3, tuple(meta["python_random"]), None))
        torch.set_rng_state(tensors["torch_rng"])
        logger.info("resumed from %s at step %d", self.checkpoint_dir, self.step)

    def save_checkpoint(self) -> None:
        """Write the model, optimizer state and step to ``output_dir/checkpoint``."""
        was_training = self.model.training
        self.model.save_pretrained(self.checkpoint_dir)
        self.model.train(was_training)
        tensors, optimizer_meta = _optimizer_to_flat(self.optimizer)
        tensors["torch_rng"] = torch.get_rng_state()
        meta = {"step": self.step, "optimizer": optimizer_meta, "python_random": list(random.getstate()[1])}
        temporary = self.checkpoint_dir / (STATE_FILE + ".tmp")
        safetensors.torch.save_file(tensors, str(temporary), metadata={"trainer": json.dumps(meta)})
        temporary.replace(self.checkpoint_dir / STATE_FILE)

    def log_scalars(self, values: dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, self.step)

    def log_image(self, name: str, image: torch.Tensor) -> None:
        """Log a ``(3, H, W)`` image in [0, 1]."""
        if self.writer is not None:
            self.writer.add_image(name, image.clamp(0, 1), self.step)

    def log_audio(self, name: str, audio: torch.Tensor, sample_rate: int) -> None:
        """Log a mono ``(samples,)`` waveform in [-1, 1]."""
        if self.writer is not None:
            self.writer.add_audio(name, audio.clamp(-1, 1).unsqueeze(0), self.step, sample_rate=sample_rate)

    def run(self, train_step: Callable[[int], dict[str, float]], on_checkpoint: Callable[[], None] | None = None) -> None:
        """Call ``train_step(step)`` until ``steps``; it returns scalars to log and show."""
        self.model.train()
        progress = tqdm(total=self.steps, initial=self.step, desc="training", unit="step", dynamic_ncols=True)
        try:
            while self.step < self.steps:
                values = train_step(self.step)
                self.step += 1
                progress.update(1)
                progress.set_postfix({key: f"{value:.4g}" for key, value in list(values.items())[:4]})
                self.log_scalars(values)
                if self.step % self.checkpoint_every == 0 or self.step == self.steps:
                    self.save_checkpoint()
                    if on_checkpoint is not None:
                        self.model.eval()
                        with torch.no_grad():
                            on_checkpoint()
                        self.model.train()
        finally:
            progress.close()
            if self.writer is not None:
                self.writer.flush()
        self.model.eval()


def cycle(loader: Any) -> Iterator[Any]:
    """Yield batches from ``loader`` forever, restarting it at each end."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise MmtokError("the training data is empty")
