"""Training and evaluation of the masked-diffusion generator.

Training minimises the continuous-time ELBO of :meth:`mmtok.generate.Generator.loss` with
AdamW and a linear-warmup, cosine-decay learning rate. Each batch contains examples of one
segment order. The batch contents and the diffusion noise of a step are functions of
``(seed, step)``, so a resumed run draws the same batches as an uninterrupted one.

Under ``torchrun`` each process takes a contiguous part of every batch, with the noise
that part would get in one process, and the loss is normalised by the token count of the
whole batch. So the gradient equals that of the same batch in one process, up to float
rounding in the reduction.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch

from torch import nn

from mmtok.errors import MmtokError
from mmtok.generate.model import T_MIN, DiffusionLoss, Generator
from mmtok.generate.sequence import Batch, Example, build_batch, group_by_layout
from mmtok.tokens import TokenSpace
from mmtok.train import distributed
from mmtok.train.loop import TrainingRun, seed_everything

logger = logging.getLogger(__name__)

# Diffusion times per example when measuring bits per token. More samples lower the
# variance of the estimate, not its expectation.
FINAL_T_SAMPLES = 16
CHECKPOINT_T_SAMPLES = 4


def learning_rate(step: int, steps: int, peak: float, warmup_steps: int, minimum_ratio: float = 0.1) -> float:
    """Return the learning rate at ``step``: linear warmup, then cosine decay to ``minimum_ratio * peak``."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return peak * (minimum_ratio + (1 - minimum_ratio) * cosine)


class LayoutBatches:
    """The training examples of each segment order, stacked once into unified ids.

    ``draw(step)`` picks a segment order with probability proportional to its number of
    examples, then ``batch_size`` distinct examples of it, from a generator seeded with
    ``(seed, step)``.
    """

    def __init__(
        self, model: Generator, examples: Sequence[Example], batch_size: int, seed: int
    ) -> None:
        self.batch_size = batch_size
        self.seed = seed
        self.batches: list[Batch] = []
        for indices in group_by_layout(examples).values():
            self.batches.append(
                build_batch(
                    model.token_space,
                    model.sequence_lengths,
                    [examples[i] for i in indices],
                    model.variable_length,
                    model.grid_shapes,
                )
            )
        self.sizes = torch.tensor([len(batch) for batch in self.batches], dtype=torch.float64)

    @property
    def layouts(self) -> list[list[str]]:
        return [list(batch.layout.modalities) for batch in self.batches]

    def draw(self, step: int, minimum_rows: int = 1) -> Batch:
        """Return the batch of ``step``, with at least ``minimum_rows`` rows.

        A segment order with fewer examples than ``batch_size`` gives all of them, and
        repeats them when it has fewer than ``minimum_rows``.
        """
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        group = self.batches[int(torch.multinomial(self.sizes, 1, generator=generator))]
        rows = torch.randperm(len(group), generator=generator)[: self.batch_size]
        if len(rows) < minimum_rows:
            rows = rows.repeat(-(-minimum_rows // len(rows)))[:minimum_rows]
        return group.rows(rows)


def train_generator(
    examples: list[list[tuple[str, torch.Tensor]]],
    token_space: TokenSpace,
    sequence_lengths: dict[str, int],
    output_dir: Path,
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-4,
    seed: int = 0,
    logdir: Path | None = None,
    resume: bool = False,
    checkpoint_every: int = 500,
    model_args: dict[str, Any] | None = None,
    validation_examples: list[list[tuple[str, torch.Tensor]]] | None = None,
    device: str | torch.device = "auto",
    warmup_steps: int | None = None,
    weight_decay: float = 0.01,
    max_grad_norm: float = 1.0,
) -> Generator:
    """Train a generator on token examples and save it to ``output_dir``.

    Args:
        examples: training examples, each a list of ``(modality, local_ids)`` segments
            with the condition first and the target last.
        token_space: the unified vocabulary.
        sequence_lengths: content tokens per segment of each modality.
        output_dir: folder of the checkpoint and the final model.
        steps: optimizer steps.
        batch_size: examples per step.
        lr: peak learning rate of AdamW.
        seed: seeds model initialisation, batch order and diffusion noise.
        logdir: TensorBoard folder, or None.
        resume: continue from ``output_dir/checkpoint`` when it exists.
        checkpoint_every: steps between checkpoints.
        model_args: keyword arguments of :class:`Generator` besides the token space,
            sequence lengths and layouts.
        validation_examples: held-out examples. Their bits per token are logged at each
            checkpoint and stored in ``model.metrics`` at the end.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or any torch device name.
        warmup_steps: steps of linear learning-rate warmup; None means 5% of ``steps``.
        weight_decay: AdamW weight decay of matrices; norms, biases and embeddings get none.
        max_grad_norm: gradient-norm clipping threshold.

    Returns:
        The trained model in eval mode.
    """
    if not examples:
        raise MmtokError("no training examples")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be at least 1, got {steps} and {batch_size}")
    context = distributed.setup(device)
    device = context.device
    seed_everything(seed)
    model = _make_model(token_space, sequence_lengths, examples, model_args or {}).to(device)
    data = LayoutBatches(model, examples, batch_size, seed)
    if context.is_main:
        logger.info(
            "training a %.2fM-parameter generator on %d examples in %d segment orders, %d process(es)",
            sum(p.numel() for p in model.parameters()) / 1e6,
            len(examples),
            len(data.batches),
            context.world_size,
        )

    optimizer = torch.optim.AdamW(_parameter_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98))
    warmup_steps = max(1, steps // 20) if warmup_steps is None else warmup_steps
    run = TrainingRun(output_dir, model, optimizer, steps, checkpoint_every, logdir, resume, context)
    loss_module = run.wrap(_DiffusionLossModule(model))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def train_step(step: int) -> dict[str, float]:
        rate = learning_rate(step, steps, lr, warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = rate
        batch = data.draw(step, minimum_rows=context.world_size)
        part = distributed.local_rows(len(batch), context)
        noise = torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)
        with autocast:
            result, scaled_loss = loss_module(batch.rows(part).to(device), noise, (part.start, len(batch)))
        optimizer.zero_grad(set_to_none=True)
        scaled_loss.backward()
        gradient_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        values = _batch_values(model.token_space.modalities, result)
        values["lr"] = rate
        values["gradient_norm"] = float(gradient_norm)
        return values

    def on_checkpoint() -> None:
        if validation_examples:
            metrics = evaluate_bits_per_token(model, validation_examples, t_samples=CHECKPOINT_T_SAMPLES, seed=seed)
            run.log_scalars({f"validation/{name}": value for name, value in metrics.items()})

    run.run(train_step, on_checkpoint)
    if not context.is_main:
        distributed.barrier()  # wait until rank 0 has saved the model
        return model

    model.metrics.update(
        {"train_steps": steps, "train_examples": len(examples), "train_batch_size": batch_size, "learning_rate": lr}
    )
    if validation_examples:
        measured = evaluate_bits_per_token(model, validation_examples, t_samples=FINAL_T_SAMPLES, seed=seed)
        # Four decimals are far below the estimate's sampling error and keep the card readable.
        model.metrics.update({name: round(value, 4) for name, value in measured.items()})
        model.metrics["validation_examples"] = len(validation_examples)
    if not model.training_note:
        orders = "; ".join(" then ".join(layout) for layout in data.layouts)
        model.training_note = (
            f"Trained by mmtok.train.generator.train_generator for {steps} AdamW steps of batch {batch_size} "
            f"(peak learning rate {lr}, seed {seed}) on {len(examples)} examples with segment orders: {orders}."
        )
    model.save_pretrained(output_dir)
    logger.info("saved the generator to %s", output_dir)
    distributed.barrier()
    return model


class _DiffusionLossModule(nn.Module):
    """Route :meth:`Generator.loss` through ``forward``, which DistributedDataParallel wraps.

    Returns the :class:`DiffusionLoss` of this process's rows and the loss to
    differentiate: the ELBO sum of the rows divided by the token count of the whole batch,
    times the number of processes, so that DDP's gradient average equals the gradient of
    the whole batch's mean loss.
    """

    def __init__(self, model: Generator) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, batch: Batch, noise: torch.Generator, rows_of: tuple[int, int]
    ) -> tuple[DiffusionLoss, torch.Tensor]:
        result = self.model.loss(batch, generator=noise, rows_of=rows_of)
        local_tokens = float(sum(result.tokens.values()))
        if not distributed.active():
            return result, result.loss
        total_tokens = float(distributed.sum_over_ranks(torch.tensor([local_tokens], dtype=torch.float64))[0])
        world_size = torch.distributed.get_world_size()
        return result, result.loss * (local_tokens * world_size / max(total_tokens, 1.0))


def _batch_values(modalities: list[str], result: DiffusionLoss) -> dict[str, float]:
    """Return the loss and bits per token of the whole batch, summed over processes.

    ``loss`` is nats per counted token and ``bits_per_token/<modality>`` is bits per
    counted token of that modality, as :meth:`Generator.loss` reports them in one process.
    """
    tokens = [float(result.tokens.get(m, 0)) for m in modalities]
    bits = [float(result.elbo_bits.get(m, 0.0)) for m in modalities]
    total = sum(tokens)
    local = torch.tensor([float(result.loss.detach()) * total, total, *bits, *tokens], dtype=torch.float64)
    summed = distributed.sum_over_ranks(local).tolist()
    loss = summed[0] / max(summed[1], 1.0)
    values = {"loss": loss, "bits_per_token": loss / math.log(2)}
    count = len(modalities)
    for index, modality in enumerate(modalities):
        if summed[2 + count + index]:
            values[f"bits_per_token/{modality}"] = summed[2 + index] / summed[2 + count + index]
    return values


def _make_model(
    token_space: TokenSpace, sequence_lengths: dict[str, int], examples: Sequence[Example], model_args: dict[str, Any]
) -> Generator:
    reserved = {"token_space", "sequence_lengths", "layouts"} & set(model_args)
    if reserved:
        raise ValueError(f"model_args may not set {sorted(reserved)}; train_generator sets them from the data")
    layouts = [list(layout) for layout in group_by_layout(examples)]
    try:
        return Generator(
            token_space=token_space.to_config(), sequence_lengths=dict(sequence_lengths), layouts=layouts, **model_args
        )
    except TypeError as error:
        raise ValueError(f"invalid model_args {sorted(model_args)}: {error}") from error


def _parameter_groups(model: Generator, weight_decay: float) -> list[dict[str, Any]]:
    # Decay only matrices of linear layers, as in GPT-2 training, so embeddings and norms keep their scale.
    embeddings = {id(model.token_embedding.weight), id(model.modality_embedding.weight)}
    decayed = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in embeddings]
    undecayed = [p for p in model.parameters() if p.dim() < 2 or id(p) in embeddings]
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": undecayed, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate_bits_per_token(
    model: Generator,
    examples: Sequence[Example],
    *,
    t_samples: int = FINAL_T_SAMPLES,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, float]:
    """Measure the negative ELBO of held-out examples in bits per target token.

    Each example is evaluated at ``t_samples`` diffusion times, one in each of
    ``t_samples`` equal strata of [T_MIN, 1], and the results are averaged. Bits per token
    are summed over examples and divided by the number of counted positions.

    Returns:
        ``bits_per_token/<target>`` for one-segment examples. For conditioned examples,
        ``bits_per_token/<target>_given_<condition>`` with the condition unmasked and
        ``bits_per_token/<target>_given_<condition>_condition_dropped`` with it masked,
        where ``<condition>`` joins the condition modalities with ``_and_``.
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=model.device).manual_seed(seed)
    bits: dict[str, float] = defaultdict(float)
    tokens: dict[str, int] = defaultdict(int)
    for layout, indices in group_by_layout(examples).items():
        target = layout[-1]
        if len(layout) == 1:
            modes = {f"bits_per_token/{target}": "given"}
        else:
            name = f"bits_per_token/{target}_given_{'_and_'.join(layout[:-1])}"
            modes = {name: "given", f"{name}_condition_dropped": "dropped"}
        for start in range(0, len(indices), batch_size):
            batch = model.make_batch([examples[i] for i in indices[start : start + batch_size]])
            for name, mode in modes.items():
                for k in range(t_samples):
                    offset = torch.rand(len(batch), device=model.device, generator=generator)
                    t = T_MIN + (1 - T_MIN) * (k + offset) / t_samples
                    result = model.loss(batch, t=t, condition=mode, generator=generator)
                    bits[name] += result.elbo_bits.get(target, 0.0) / t_samples
                    tokens[name] += result.tokens.get(target, 0) / t_samples
    model.train(was_training)
    return {name: bits[name] / tokens[name] for name in bits if tokens[name]}
