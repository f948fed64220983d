"""Shared training machinery: checkpoints, resume, progress bar and TensorBoard logs.

Checkpoints are folders holding the model in Hub layout (``save_pretrained``) plus the
optimizer state, random states and step counter as safetensors, so resuming never
unpickles anything. :mod:`mmtok.train.checkpoint` writes them so that a crash cannot
damage the last one, and :mod:`mmtok.train.distributed` runs training under ``torchrun``.
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
from mmtok.train import distributed
from mmtok.train.checkpoint import CHECKPOINT_DIR, STATE_FILE, WEIGHTS_FILE, latest_checkpoint, write_checkpoint

logger = logging.getLogger(__name__)


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

    Under ``torchrun`` every process creates the same run. Only rank 0 shows the progress
    bar, writes TensorBoard logs and checkpoints, and calls ``on_checkpoint``; every rank
    loads the checkpoint on resume.

    Args:
        output_dir: folder for ``checkpoint/`` and, at the end, the final model.
        model: the model being trained (not wrapped; see :meth:`wrap`).
        optimizer: its optimizer.
        steps: total number of optimizer steps.
        checkpoint_every: steps between checkpoints.
        logdir: TensorBoard folder, or None for no TensorBoard logs.
        resume: continue from the newest checkpoint in ``output_dir/checkpoint`` when there is one.
        context: the process's place in a distributed run, from
            :func:`mmtok.train.distributed.setup`; by default set up for the model's device.
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
        context: distributed.Context | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.model = model
        self.optimizer = optimizer
        self.steps = steps
        self.checkpoint_every = checkpoint_every
        self.context = context or distributed.setup(_model_device(model))
        self.step = 0
        self.writer = None
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if logdir is not None and self.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise MmtokError("--logdir needs TensorBoard: pip install 'mmtok[train]'") from error
            self.writer = SummaryWriter(str(logdir))
        if resume:
            self._load_checkpoint()
        elif self.is_main:
            self._warn_about_existing_checkpoint()

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / CHECKPOINT_DIR

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and logs (rank 0, or the only process)."""
        return self.context.is_main

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """Return ``module`` wrapped in DistributedDataParallel under ``torchrun``, else unchanged.

        Call the wrapper's forward for each training step, so that backward averages the
        gradients over processes. ``module`` must already be on the context's device.
        """
        if not self.context.distributed:
            return module
        device_ids = [self.context.device.index] if self.context.device.type == "cuda" else None
        # The quantizers keep their codebook buffers equal on every rank themselves, by
        # all-reducing the EMA statistics, so DDP need not broadcast buffers each step.
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)

    def _warn_about_existing_checkpoint(self) -> None:
        try:
            existing = latest_checkpoint(self.checkpoint_dir)
        except MmtokError:
            existing = self.checkpoint_dir
        if existing is not None:
            logger.warning(
                "%s contains a checkpoint, but --resume was not given: starting from step 0, and the first "
                "checkpoint of this run replaces it",
                self.checkpoint_dir,
            )

    def _load_checkpoint(self) -> None:
        folder = latest_checkpoint(self.checkpoint_dir)
        if folder is None:
            logger.warning("no checkpoint in %s; starting from step 0", self.checkpoint_dir)
            return
        state_file = folder / STATE_FILE
        try:
            device = str(_model_device(self.model))
            safetensors.torch.load_model(self.model, str(folder / WEIGHTS_FILE), strict=True, device=device)
            tensors = safetensors.torch.load_file(str(state_file))
            with safetensors.safe_open(str(state_file), framework="pt") as handle:
                meta = json.loads(handle.metadata()["trainer"])
        except (safetensors.SafetensorError, OSError, KeyError, RuntimeError, json.JSONDecodeError) as error:
            raise MmtokError(f"{folder}: checkpoint cannot be loaded ({type(error).__name__}: {error})") from error
        _optimizer_from_flat(self.optimizer, tensors, meta["optimizer"])
        self.step = int(meta["step"])
        random.setstate((3, tuple(meta["python_random"]), None))
        self._restore_random_state(tensors, int(meta.get("world_size", 1)))
        if self.is_main:
            logger.info("resumed from %s at step %d", folder, self.step)

    def _restore_random_state(self, tensors: dict[str, torch.Tensor], saved_world_size: int) -> None:
        rank = self.context.rank
        if saved_world_size != self.context.world_size and self.is_main:
            logger.warning(
                "the checkpoint was written by %d processes, and %d resume it: every process takes rank 0's "
                "random state, so random draws outside the per-step generators differ from an uninterrupted run",
                saved_world_size,
                self.context.world_size,
            )
        if saved_world_size != self.context.world_size:
            rank = 0
        # Checkpoints written before distributed training store one state as "torch_rng".
        torch.set_rng_state(tensors.get(f"rng.torch.{rank}", tensors.get("torch_rng")))
        cuda_state = tensors.get(f"rng.cuda.{rank}")
        if cuda_state is not None and self.context.device.type == "cuda":
            torch.cuda.set_rng_state(cuda_state, self.context.device)

    def _random_states(self) -> dict[str, torch.Tensor]:
        """Collect the torch random states of every process, keyed by rank."""
        own = {"torch": torch.get_rng_state()}
        if self.context.device.type == "cuda":
            own["cuda"] = torch.cuda.get_rng_state(self.context.device)
        states = {}
        for rank, values in enumerate(distributed.gather_objects(own)):
            for kind, state in values.items():
                states[f"rng.{kind}.{rank}"] = state.cpu()
        return states

    def save_checkpoint(self) -> None:
        """Write the model, optimizer state, random states and step as the newest checkpoint.

        Every process must call it, because it gathers their random states; only rank 0
        writes.
        """
        random_states = self._random_states()
        if not self.is_main:
            return
        tensors, optimizer_meta = _optimizer_to_flat(self.optimizer)
        tensors.update(random_states)
        meta = {
            "step": self.step,
            "optimizer": optimizer_meta,
            "python_random": list(random.getstate()[1]),
            "world_size": self.context.world_size,
        }

        def write(folder: Path) -> None:
            was_training = self.model.training
            self.model.save_pretrained(folder)
            self.model.train(was_training)
            safetensors.torch.save_file(tensors, str(folder / STATE_FILE), metadata={"trainer": json.dumps(meta)})

        write_checkpoint(self.checkpoint_dir, self.step, write)

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
        """Call ``train_step(step)`` until ``steps``; it returns scalars to log and show.

        ``on_checkpoint`` runs on rank 0 after each checkpoint, in eval mode and without
        gradients. It runs with copies of the random states, so that it cannot change the
        random draws of the steps after it, which keeps a resumed run identical to an
        uninterrupted one.
        """
        self.model.train()
        progress = tqdm(
            total=self.steps, initial=self.step, desc="training", unit="step", dynamic_ncols=True,
            disable=not self.is_main,
        )
        try:
            while self.step < self.steps:
                values = train_step(self.step)
                self.step += 1
                progress.update(1)
                progress.set_postfix({key: f"{value:.4g}" for key, value in list(values.items())[:4]})
                self.log_scalars(values)
                if self.step % self.checkpoint_every == 0 or self.step == self.steps:
                    self.save_checkpoint()
                    if on_checkpoint is not None and self.is_main:
                        self._call_on_checkpoint(on_checkpoint)
        finally:
            progress.close()
            if self.writer is not None:
                self.writer.flush()
        self.model.eval()

    def _call_on_checkpoint(self, on_checkpoint: Callable[[], None]) -> None:
        python_state = random.getstate()
        devices = [self.context.device] if self.context.device.type == "cuda" else []
        self.model.eval()
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            on_checkpoint()
        random.setstate(python_state)
        self.model.train()


def _model_device(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def cycle(loader: Any) -> Iterator[Any]:
    """Yield batches from ``loader`` forever, restarting it at each end."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise MmtokError("the training data is empty")
