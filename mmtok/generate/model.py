"""The masked-diffusion generator: a bidirectional transformer over the unified vocabulary.

The model is the denoiser of masked (absorbing-state) discrete diffusion in continuous
time, trained with the ELBO of MDLM (Sahoo et al., 2024) and Shi et al. (2024). It takes
no time input. Ou et al. (2024, "Your Absorbing Discrete Diffusion Secretly Models the
Conditional Distributions of Clean Data") show that the optimal denoiser of an absorbing
process does not depend on ``t``, because the set of masked positions already carries
that information.

Shape letters: ``B`` batch, ``T`` sequence positions, ``D`` model width, ``H`` heads,
``V`` unified vocabulary size, ``N`` selected positions.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmtok.errors import MmtokError
from mmtok.generate.sampler import DEFAULT_CONFIDENCE_NOISE
from mmtok.generate.schedule import get_schedule
from mmtok.generate.sequence import Batch, Example, Layout, allowed_ids, build_batch, inner_kind
from mmtok.hub import HubModel
from mmtok.tokenizer import Tokenizer
from mmtok.tokens import TokenSpace

logger = logging.getLogger(__name__)

# The loss integrates over t in [T_MIN, 1]. The ELBO weight -alpha'/(1 - alpha) grows
# like 1/t, so without a floor the variance of a one-sample estimate diverges. The
# left-out part [0, T_MIN] is at most a fraction 1 - alpha(T_MIN) of the ELBO (1e-3 for
# the log-linear schedule) when the denoiser's loss grows with the masked fraction. The
# estimate can fall below the true bound by that much.
T_MIN = 1e-3


# Building blocks --------------------------------------------------------------------


def rotary_tables(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(cos, sin)`` tables of shape ``(T, head_dim / 2)`` for ``(T, 2)`` positions.

    Rotary position embedding follows Su et al. (2021, "RoFormer"): pairs of query and key
    channels rotate by an angle proportional to the position. The frequencies form one
    geometric ladder as in 1-D rotary embedding, and alternate between the two axes: even
    pairs rotate with the row, odd pairs with the column. A position ``(p, p)`` therefore
    rotates exactly as position ``p`` of 1-D rotary embedding, and each grid axis keeps
    frequencies over the whole range.
    """
    frequencies = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    axis = torch.arange(head_dim // 2, device=positions.device) % 2  # (head_dim / 2,)
    angles = positions[:, axis].float() * frequencies[None, :]  # (T, head_dim / 2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``(B, H, T, head_dim)`` by the rotary tables."""
    first, second = x.float().chunk(2, dim=-1)  # (B, H, T, head_dim / 2) each
    rotated = torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)
    return rotated.type_as(x)


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention with rotary positions."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.dropout = dropout
        self.proj_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Map ``(B, T, D)`` to ``(B, T, D)``."""
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).split(dim, dim=-1)
        q, k, v = (tensor.view(batch, length, self.heads, dim // self.heads).transpose(1, 2) for tensor in (q, k, v))  # (B, H, T, D / H)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        attended = attended.transpose(1, 2).reshape(batch, length, dim)  # (B, T, D)
        return self.proj_dropout(self.proj(attended))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, hidden)
        self.proj = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = SelfAttention(dim, heads, dropout)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, int(mlp_ratio * dim), dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class TimeEmbedding(nn.Module):
    """Embed diffusion times ``(B,)`` in [0, 1] as ``(B, D)`` vectors: sinusoids, then an MLP.

    The sinusoidal features follow the timestep embedding of DiT (Peebles and Xie, 2023).
    """

    def __init__(self, dim: int, frequencies: int = 128) -> None:
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequencies // 2
        # Times are scaled to [0, 1000] so the fastest sinusoid turns many times over [0, 1].
        rates = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = 1000.0 * t.float()[:, None] * rates[None, :]  # (B, frequencies / 2)
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1))


@dataclass
class DiffusionLoss:
    """The negative ELBO of a batch, with bits per token overall and per modality.

    Only counted positions enter the loss: the maskable positions of the target segment,
    plus those of the condition segments in rows trained on the joint distribution.
    Bits per token divide the ELBO in bits by the number of counted positions, which for
    a variable-length segment include its end marker and padding.
    """

    loss: torch.Tensor
    """``()`` negative ELBO in nats per counted position; differentiable."""
    bits_per_token: float
    elbo_bits: dict[str, float] = field(default_factory=dict)
    """Sum over the batch of the negative ELBO in bits, per modality."""
    tokens: dict[str, int] = field(default_factory=dict)
    """Number of counted positions per modality."""

    @property
    def modality_bits_per_token(self) -> dict[str, float]:
        return {modality: self.elbo_bits[modality] / count for modality, count in self.tokens.items() if count}


# Condition handling per training row.
CONDITION_GIVEN = 0  # condition segments unmasked and not counted
CONDITION_DROPPED = 1  # condition segments fully masked and not counted (guidance training)
CONDITION_NOISED = 2  # condition segments masked like the target and counted (joint training)
CONDITION_MODES = {"given": CONDITION_GIVEN, "dropped": CONDITION_DROPPED, "noised": CONDITION_NOISED}


# The model ------------------------------------------------------------------------------


class Generator(HubModel):
    """Masked-diffusion transformer that generates token sequences of any modality.

    Args:
        token_space: the unified vocabulary as :meth:`mmtok.TokenSpace.to_config` writes it.
        sequence_lengths: content tokens per segment of each modality, e.g.
            ``{"image": 256, "text": 48}``. A text segment holds up to this many tokens.
        dim: transformer width.
        depth: number of transformer blocks.
        heads: attention heads; must divide ``dim``.
        mlp_ratio: hidden width of the feed-forward layers divided by ``dim``.
        dropout: dropout on attention weights and residual branches during training.
        schedule: noise schedule of training, ``"loglinear"`` or ``"cosine"``. Ancestral
            sampling follows the same schedule.
        condition_dropout: probability that training masks all condition segments of a
            row, which teaches the unconditional model for classifier-free guidance.
        condition_noising: probability that training masks the condition segments of a
            row at the same rate as the target and counts them in the loss, which learns
            the joint distribution that infilling across segments needs. Other rows keep
            the condition unmasked and learn the conditional.
        tie_embeddings: use the token embedding as output projection.
        variable_length: modalities whose segments may end early with ``</m>`` and
            padding. ``None`` means ``["text"]`` when the token space has text.
        layouts: segment orders seen in training, condition first. ``generate`` logs a
            warning for other orders. ``None`` means not recorded.
        sequence_options: per-modality keyword arguments for the tokenizer's
            ``to_sequence`` and ``from_sequence``, e.g. ``{"audio": {"levels": 2}}``.
        grid_shapes: ``[rows, columns]`` of modalities whose sequence is a raster-order
            grid, e.g. ``{"image": [8, 8]}``. Their content gets 2-D rotary positions;
            other modalities get 1-D positions (see :mod:`mmtok.generate.sequence`).
        time_conditioning: add an embedding of the diffusion time to every position.
            Off by default: the masked positions already tell the denoiser how far the
            process has gone (Ou et al., 2024; Sahoo et al., 2024). When on, sampling
            passes the share of masked positions as the time.
    """

    card_template = "generator"

    def __init__(
        self,
        *,
        token_space: list[dict[str, Any]],
        sequence_lengths: dict[str, int],
        dim: int = 256,
        depth: int = 6,
        heads: int = 8,
        mlp_ratio: float = 4,
        dropout: float = 0.0,
        schedule: str = "loglinear",
        condition_dropout: float = 0.1,
        condition_noising: float = 0.0,
        tie_embeddings: bool = True,
        variable_length: list[str] | None = None,
        layouts: list[list[str]] | None = None,
        sequence_options: dict[str, dict[str, Any]] | None = None,
        grid_shapes: dict[str, list[int]] | None = None,
        time_conditioning: bool = False,
    ) -> None:
        super().__init__()
        if dim % heads or (dim // heads) % 2:
            raise ValueError(f"dim {dim} must split into {heads} heads of even width")
        if not 0 <= condition_dropout + condition_noising <= 1:
            raise ValueError(
                f"condition_dropout ({condition_dropout}) plus condition_noising ({condition_noising}) must lie in [0, 1]"
            )
        self.token_space = TokenSpace(token_space)
        unknown = sorted(set(sequence_lengths) - set(self.token_space.modalities))
        if unknown:
            raise ValueError(
                f"sequence_lengths names {unknown}, which are not in the token space "
                f"({', '.join(self.token_space.modalities)})"
            )
        self.sequence_lengths = {modality: int(length) for modality, length in sequence_lengths.items()}
        if variable_length is None:
            variable_length = [modality for modality in ("text",) if modality in self.token_space.modalities]
        self.variable_length = list(variable_length)
        self.layouts = [list(layout) for layout in layouts] if layouts is not None else None
        self.sequence_options = {modality: dict(options) for modality, options in (sequence_options or {}).items()}
        self.grid_shapes = {modality: [int(size) for size in shape] for modality, shape in (grid_shapes or {}).items()}
        for modality, shape in self.grid_shapes.items():
            if len(shape) != 2 or modality not in self.sequence_lengths or shape[0] * shape[1] != self.sequence_lengths[modality]:
                raise ValueError(
                    f"grid shape {shape} of {modality!r} must be [rows, columns] holding its sequence length "
                    f"{self.sequence_lengths.get(modality)}"
                )
            if modality in self.variable_length:
                raise ValueError(f"{modality!r} is variable-length and cannot have a grid shape")
        self.schedule = get_schedule(schedule)
        self.condition_dropout = condition_dropout
        self.condition_noising = condition_noising
        self.heads = heads

        vocab_size = self.token_space.vocab_size
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.modality_embedding = nn.Embedding(len(self.token_space.modalities), dim)
        self.embedding_dropout = nn.Dropout(dropout)
        self.time_embedding = TimeEmbedding(dim) if time_conditioning else None
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio, dropout) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(dim)
        # Tying uses the embedding matrix in F.linear rather than sharing a Parameter,
        # so the state dict has no duplicate tensors to trip safetensors loading.
        self.head = None if tie_embeddings else nn.Linear(dim, vocab_size, bias=False)
        self.register_buffer("allowed", allowed_ids(self.token_space, self.variable_length), persistent=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # GPT-2 initialisation: N(0, 0.02) weights and zero biases.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    # Forward --------------------------------------------------------------------------

    def hidden_states(self, ids: torch.Tensor, batch: Batch, t: torch.Tensor | None = None) -> torch.Tensor:
        """Map ``(B, T)`` unified ids of ``batch``'s layout to ``(B, T, D)`` features.

        ``t`` is the ``(B,)`` diffusion time, used only with time conditioning. When it is
        None, the time is the one whose expected share of masked target positions equals
        the observed share.
        """
        x = self.token_embedding(ids) + self.modality_embedding(batch.modality_index)[None]  # (B, T, D)
        if self.time_embedding is not None:
            if t is None:
                target = batch.maskable & ~batch.condition
                masked = (ids == self.token_space.mask_id) & target[None, :]
                t = self.schedule.time_of_masked_share(masked.sum(1) / target.sum().clamp(min=1))
            x = x + self.time_embedding(t)[:, None, :]
        x = self.embedding_dropout(x)
        cos, sin = rotary_tables(batch.positions, x.shape[-1] // self.heads)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.final_norm(x)

    def restricted_logits(self, hidden: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
        """Project ``(..., D)`` features to ``(..., V)`` logits, -inf outside the legal ids.

        ``kinds`` has the leading shape of ``hidden`` (or broadcasts to it) and selects
        the row of the allowed-id table for each position.
        """
        weight = self.token_embedding.weight if self.head is None else self.head.weight
        logits = F.linear(hidden, weight).float()
        return logits.masked_fill(~self.allowed[kinds], float("-inf"))

    def forward(self, ids: torch.Tensor, batch: Batch, t: torch.Tensor | None = None) -> torch.Tensor:
        """Return ``(B, T, V)`` float32 logits of the clean token at every position.

        Args:
            ids: ``(B, T)`` unified ids of ``batch``'s layout, with ``<mask>`` at noised positions.
            batch: gives the per-position tables of the layout.
            t: ``(B,)`` diffusion times; read only with time conditioning.
        """
        return self.restricted_logits(self.hidden_states(ids, batch, t), batch.position_kind[None, :])

    def masked_logits(
        self, ids: torch.Tensor, batch: Batch, where: torch.Tensor, t: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return ``(N, V)`` float32 logits at the ``N`` positions where ``(B, T)`` ``where`` is True."""
        hidden = self.hidden_states(ids, batch, t)
        kinds = batch.position_kind[None, :].expand_as(where)
        return self.restricted_logits(hidden[where], kinds[where])

    # Loss ---------------------------------------------------------------------------

    def loss(
        self,
        batch: Batch,
        *,
        t: torch.Tensor | None = None,
        condition: str = "train",
        generator: torch.Generator | None = None,
        rows_of: tuple[int, int] | None = None,
    ) -> DiffusionLoss:
        """Estimate the negative ELBO of ``batch`` with one diffusion time per row.

        Args:
            batch: examples of one layout, on the model's device.
            t: ``(B,)`` diffusion times in [T_MIN, 1], each weighted as a draw from the
                uniform density on that interval. By default they are drawn as a randomly
                shifted grid (antithetic sampling, which lowers the variance of the batch
                mean).
            condition: ``"train"`` draws a condition mode per row from
                ``condition_dropout`` and ``condition_noising``. ``"given"``,
                ``"dropped"`` or ``"noised"`` applies that mode to every row.
            generator: source of randomness; the global one when None.
            rows_of: ``(offset, total)`` when ``batch`` is rows ``offset`` to ``offset + B``
                of a batch of ``total`` rows split across processes. The random draws are
                made for all ``total`` rows and this part is kept, so each row gets the
                noise it would get in one process.
        """
        ids = batch.ids
        rows, device = ids.shape[0], ids.device
        offset, total = rows_of if rows_of is not None else (0, rows)
        if not (0 <= offset and offset + rows <= total):
            raise ValueError(f"rows_of {rows_of} does not contain a batch of {rows} rows")
        part = slice(offset, offset + rows)
        if t is None:
            t = self._draw_times(total, device, generator)[part]
        elif bool((t < T_MIN).any() | (t > 1).any()):
            raise ValueError(f"diffusion times must lie in [{T_MIN}, 1]")
        scale = 1 - T_MIN  # the inverse of the density of t on [T_MIN, 1]
        modes = self._condition_modes(total, condition, device, generator)[part]

        # Positions that may be noised and count in the loss.
        target = batch.maskable & ~batch.condition
        noised_condition = (modes == CONDITION_NOISED)[:, None] & batch.condition[None, :]
        counted = target[None, :] | noised_condition  # (B, T)
        dropped = (modes == CONDITION_DROPPED)[:, None] & batch.condition[None, :]

        draw = torch.rand((total, ids.shape[1]), device=device, generator=generator)[part]  # (B, T)
        masked = counted & (draw < 1 - self.schedule.alpha(t)[:, None])
        noisy = ids.masked_fill(masked | dropped, self.token_space.mask_id)

        logits = self.masked_logits(noisy, batch, masked, t)  # (N, V)
        cross_entropy = F.cross_entropy(logits, ids[masked], reduction="none")  # (N,)
        weight = scale * self.schedule.weight(t)[:, None].expand_as(masked)[masked]
        elbo = weight * cross_entropy  # (N,) nats

        total_tokens = counted.sum()
        loss = elbo.sum() / total_tokens.clamp(min=1)
        return DiffusionLoss(
            loss=loss,
            bits_per_token=float(loss.detach()) / math.log(2),
            **self._per_modality(elbo.detach(), masked, counted, batch),
        )

    def _draw_times(self, rows: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
        offset = torch.rand((), device=device, generator=generator)
        grid = (offset + torch.arange(rows, device=device) / rows) % 1.0
        return T_MIN + (1 - T_MIN) * grid

    def _condition_modes(
        self, rows: int, condition: str, device: torch.device, generator: torch.Generator | None
    ) -> torch.Tensor:
        if condition in CONDITION_MODES:
            return torch.full((rows,), CONDITION_MODES[condition], device=device)
        if condition != "train":
            raise ValueError(f"unknown condition mode {condition!r}; choose train, {', '.join(CONDITION_MODES)}")
        draw = torch.rand(rows, device=device, generator=generator)
        modes = torch.full((rows,), CONDITION_GIVEN, device=device)
        modes[draw < self.condition_dropout + self.condition_noising] = CONDITION_NOISED
        modes[draw < self.condition_dropout] = CONDITION_DROPPED
        return modes

    def _per_modality(
        self, elbo: torch.Tensor, masked: torch.Tensor, counted: torch.Tensor, batch: Batch
    ) -> dict[str, dict[str, Any]]:
        count = len(self.token_space.modalities)
        modality_of = batch.modality_index[None, :].expand_as(masked)
        nats = torch.zeros(count, device=elbo.device).index_add_(0, modality_of[masked], elbo)
        tokens = torch.bincount(modality_of[counted], minlength=count)
        elbo_bits, token_counts = {}, {}
        for index, modality in enumerate(self.token_space.modalities):
            if int(tokens[index]):
                elbo_bits[modality] = float(nats[index]) / math.log(2)
                token_counts[modality] = int(tokens[index])
        return {"elbo_bits": elbo_bits, "tokens": token_counts}

    # Batches ------------------------------------------------------------------------

    def layout(self, modalities: Sequence[str]) -> Layout:
        """Return the layout of a segment order, condition segments first."""
        return Layout(self.token_space, self.sequence_lengths, modalities, self.variable_length, self.grid_shapes)

    def make_batch(self, examples: Sequence[Example]) -> Batch:
        """Build a batch on the model's device from examples of one segment order."""
        return build_batch(
            self.token_space, self.sequence_lengths, examples, self.variable_length, self.grid_shapes
        ).to(self.device)

    # Generation ---------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        modality: str,
        n: int,
        steps: int = 32,
        sampler: str = "confidence",
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        condition: list[tuple[str, torch.Tensor]] | None = None,
        guidance: float = 0.0,
        unmasking: str = "cosine",
        confidence_noise: float = DEFAULT_CONFIDENCE_NOISE,
        show_progress: bool = False,
    ) -> list[torch.Tensor]:
        """Generate ``n`` sequences of ``modality`` in one batch.

        Args:
            modality: the modality to generate.
            n: number of samples.
            steps: number of denoising steps. Each step calls the model at most once, on a
                doubled batch with guidance.
            sampler: ``"confidence"`` or ``"ancestral"``.
            temperature: divides the logits; 0 picks the most likely id.
            top_p: nucleus sampling threshold in (0, 1].
            seed: seed of a generator on the model's device; None uses the global one.
            condition: ``(modality, local_ids)`` segments to condition on, shared by all
                samples, in the order used in training.
            guidance: classifier-free guidance weight ``w``. The logits become
                ``(1 + w) * conditional - w * unconditional``, and 0 turns guidance off.
            unmasking: schedule of the confidence sampler: ``"cosine"``, ``"linear"``,
                ``"square"`` or ``"sqrt"`` (see :data:`mmtok.generate.schedule.UNMASKING_SCHEDULES`).
            confidence_noise: scale of the annealed Gumbel noise on the confidence
                sampler's ranking (MaskGIT's choice temperature); 0 ranks greedily.
            show_progress: show a progress bar on stderr.

        Returns:
            ``n`` 1-D int64 CPU tensors of local ids of ``modality``. Text is cut before its
            end marker, so lengths can differ.
        """
        from mmtok.generate.sampler import sample

        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        if guidance and not condition:
            raise ValueError("guidance needs a condition; pass condition=[(modality, ids), ...] or guidance=0")
        example = [*self._fit_condition(condition or []), (modality, None)]
        self._warn_unseen_layout([segment_modality for segment_modality, _ in example])
        batch = self.make_batch([example] * n)
        keep = batch.ids != self.token_space.mask_id
        ids = sample(
            self,
            batch,
            keep,
            method=sampler,
            steps=steps,
            temperature=temperature,
            top_p=top_p,
            generator=self._seeded_generator(seed),
            guidance=guidance,
            unmasking=unmasking,
            confidence_noise=confidence_noise,
            show_progress=show_progress,
        )
        return [batch.layout.decode(row) for row in ids]

    @torch.no_grad()
    def infill(
        self,
        segments: list[tuple[str, torch.Tensor]],
        keep_masks: list[torch.Tensor],
        n: int = 1,
        steps: int = 32,
        sampler: str = "confidence",
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        unmasking: str = "cosine",
        confidence_noise: float = DEFAULT_CONFIDENCE_NOISE,
        show_progress: bool = False,
    ) -> list[list[torch.Tensor]]:
        """Regenerate the tokens of ``segments`` where ``keep_masks`` is False.

        ``keep_masks[i]`` is a 1-D bool tensor as long as ``segments[i]``'s ids. In a
        variable-length segment (text) whose last token is kept, the end marker and the
        padding are kept too, and the regenerated positions may not end the text, so it
        keeps its length. When the last token is regenerated, the generated text may end
        anywhere after the last kept token.

        Returns:
            ``n`` lists with the local ids of every segment.
        """
        from mmtok.generate.sampler import sample

        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        if len(keep_masks) != len(segments):
            raise ValueError(f"got {len(keep_masks)} keep masks for {len(segments)} segments")
        batch = self.make_batch([segments] * n)
        keep = ~batch.maskable.clone()
        position_kind = batch.position_kind.clone()
        for segment, (modality, local_ids), keep_mask in zip(batch.layout.segments, segments, keep_masks):
            keep_mask = torch.as_tensor(keep_mask, dtype=torch.bool).reshape(-1)
            count = torch.as_tensor(local_ids).numel()
            if keep_mask.numel() != count:
                raise ValueError(f"the keep mask of the {modality} segment has {keep_mask.numel()} entries for {count} tokens")
            slots = torch.zeros(segment.slots, dtype=torch.bool)
            slots[:count] = keep_mask
            if segment.variable_length and count and bool(keep_mask[-1]):
                slots[count:] = True  # end marker and padding
            if segment.variable_length and bool(keep_mask.any()):
                last_kept = int(torch.nonzero(keep_mask)[-1])
                inner = torch.zeros(segment.slots, dtype=torch.bool)
                inner[:last_kept] = ~keep_mask[:last_kept]
                modality_index = self.token_space.modalities.index(modality)
                segment_kinds = position_kind[segment.content]  # a view into position_kind
                segment_kinds[inner.to(position_kind.device)] = inner_kind(modality_index)
            keep[segment.content] = slots.to(keep.device)
        batch = dataclasses.replace(batch, position_kind=position_kind)
        ids = sample(
            self,
            batch,
            keep[None, :].expand_as(batch.ids),
            method=sampler,
            steps=steps,
            temperature=temperature,
            top_p=top_p,
            generator=self._seeded_generator(seed),
            guidance=0.0,
            unmasking=unmasking,
            confidence_noise=confidence_noise,
            show_progress=show_progress,
        )
        return [[batch.layout.decode(row, index) for index in range(len(segments))] for row in ids]

    def supports_condition(self, condition: str, target: str) -> bool:
        """Return whether training saw ``target`` conditioned on ``condition`` (True when not recorded)."""
        return self.layouts is None or [condition, target] in self.layouts

    def _fit_condition(self, condition: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        """Cut condition segments that are too long (a long prompt or recording) to the segment length.

        Raises :class:`MmtokError` when a fixed-length condition is shorter than its segment.
        """
        fitted = []
        for modality, local_ids in condition:
            local_ids = torch.as_tensor(local_ids).reshape(-1)
            length = self.sequence_lengths.get(modality)
            if length is not None and local_ids.numel() > length:
                logger.warning("the %s condition has %d tokens; keeping the first %d", modality, local_ids.numel(), length)
                local_ids = local_ids[:length]
            if length is not None and modality not in self.variable_length and local_ids.numel() < length:
                raise MmtokError(
                    f"the {modality} condition has {local_ids.numel()} tokens, but the generator needs {length}"
                )
            fitted.append((modality, local_ids))
        return fitted

    def _seeded_generator(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(seed)

    def _warn_unseen_layout(self, modalities: list[str]) -> None:
        if self.layouts is not None and modalities not in self.layouts:
            logger.warning(
                "this generator was trained on segment orders %s, not %s; expect poor samples",
                self.layouts,
                modalities,
            )

    # Tokenizers and cards -----------------------------------------------------------

    def check_tokenizer(self, modality: str, tokenizer: Tokenizer) -> None:
        """Raise :class:`MmtokError` unless ``tokenizer`` is the one this generator was trained with.

        The tokenizer must encode ``modality``, have the vocabulary size of the modality's id
        range and the weights hash recorded in the token space. The message names both hashes.
        """
        token_range = self.token_space.range(modality)
        tokenizer_modality = getattr(tokenizer, "modality", modality)
        if tokenizer_modality != modality:
            raise MmtokError(f"tokenizer {tokenizer.name_or_path!r} is for {tokenizer_modality}, not {modality}")
        weights_hash = tokenizer.weights_hash()
        trained_with = (
            f"this generator was trained on {modality} tokens of {token_range.tokenizer!r} "
            f"({token_range.size} ids, weights {token_range.tokenizer_hash})"
        )
        if tokenizer.vocab_size != token_range.size:
            raise MmtokError(
                f"tokenizer {tokenizer.name_or_path!r} has {tokenizer.vocab_size} {modality} ids (weights {weights_hash}), "
                f"but {trained_with}; use that tokenizer"
            )
        if weights_hash != token_range.tokenizer_hash:
            raise MmtokError(
                f"tokenizer {tokenizer.name_or_path!r} has weights {weights_hash}, but {trained_with}; "
                "use that tokenizer"
            )

    def card_variables(self) -> dict[str, Any]:
        dim = self.token_embedding.embedding_dim
        grids = ", ".join(f"{modality} {rows}x{columns}" for modality, (rows, columns) in self.grid_shapes.items())
        positions = f"rotary positions (2-D for the {grids} grid)" if grids else "rotary positions"
        time = ", conditioned on the diffusion time" if self.time_embedding is not None else ""
        architecture = (
            f"Masked-diffusion transformer: {len(self.blocks)} bidirectional pre-norm blocks of width {dim} "
            f"with {self.heads} heads and {positions}, {self.schedule.name} noise schedule{time}"
        )
        segments = ", ".join(
            f"{modality} {'up to ' if modality in self.variable_length else ''}{length}"
            for modality, length in self.sequence_lengths.items()
        )
        return {
            "modality": self.token_space.modalities,
            "architecture": architecture,
            "vocab_size": self.token_space.vocab_size,
            "token_rate": f"{segments} tokens per sample",
            "token_space": self.token_space.to_config(),
            "sequence_lengths": self.sequence_lengths,
        }

    def card_tags(self) -> list[str]:
        return ["masked-diffusion"]
