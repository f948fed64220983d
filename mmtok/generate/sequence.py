"""Sequence layout of the generator: segments of modalities in one unified-id sequence.

An example is a list of ``(modality, local_ids)`` segments, where ``local_ids`` is a 1-D
tensor of the tokenizer's flattened ids in ``[0, size)``. Each segment becomes
``<m> c_1 ... c_L </m>`` with ``L = sequence_lengths[m]``. A variable-length modality
(text) may end early and is padded after its end marker to the same number of positions:
``<text> t_1 ... t_n </text> <pad> ... <pad>``. All segments but the last form the
condition. The last segment is the target.

The begin marker of every segment and the end marker of a fixed-length segment are never
masked. In a variable-length segment the ``L + 1`` positions after the begin marker are
all maskable, because the position of the end marker is part of what is generated.

Every position also has a 2-D rotary position ``(row, column)``, following the
multimodal rotary positions of Qwen2-VL (Wang et al., 2024). A position of a 1-D segment
(text, audio, the markers) at running index ``p`` gets ``(p, p)``. The content of a grid
segment (an ``h x w`` image in raster order) starting at ``p`` gets ``(p + r, p + c)`` for
row ``r`` and column ``c``, and the running index then advances by ``max(h, w)``. With
the rotary frequencies split between the two axes, 1-D positions rotate exactly as in
ordinary 1-D rotary embedding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from mmtok.errors import MmtokError
from mmtok.tokens import TokenSpace

Example = Sequence[tuple[str, "torch.Tensor | None"]]


@dataclass(frozen=True)
class Segment:
    """The place of one modality in a sequence.

    ``start`` is the position of the begin marker. The segment then has ``slots``
    maskable positions: ``L`` for a fixed-length modality (followed by its end marker),
    ``L + 1`` for a variable-length one (content, end marker and padding).
    """

    modality: str
    start: int
    length: int
    variable_length: bool

    @property
    def slots(self) -> int:
        return self.length + 1 if self.variable_length else self.length

    @property
    def content(self) -> slice:
        return slice(self.start + 1, self.start + 1 + self.slots)

    @property
    def stop(self) -> int:
        """Position after the segment's last position."""
        return self.start + self.length + 2


class Layout:
    """The positions of a fixed order of segments and the per-position tables the model uses.

    Args:
        token_space: the unified vocabulary.
        sequence_lengths: content length ``L`` per modality.
        modalities: the segment order, condition segments first and the target last.
        variable_length: modalities whose segments may end early (text).
        grid_shapes: ``(rows, columns)`` of modalities whose content is a raster-order
            grid (images); the other modalities get 1-D positions.
    """

    def __init__(
        self,
        token_space: TokenSpace,
        sequence_lengths: dict[str, int],
        modalities: Sequence[str],
        variable_length: Iterable[str],
        grid_shapes: dict[str, Sequence[int]] | None = None,
    ) -> None:
        if not modalities:
            raise MmtokError("an example needs at least one segment")
        variable = set(variable_length)
        self.token_space = token_space
        self.modalities = tuple(modalities)
        self.segments: list[Segment] = []
        start = 0
        for modality in self.modalities:
            token_space.range(modality)
            if modality not in sequence_lengths:
                raise MmtokError(
                    f"the generator has no sequence length for {modality!r}; "
                    f"it knows {', '.join(sorted(sequence_lengths))}"
                )
            segment = Segment(modality, start, int(sequence_lengths[modality]), modality in variable)
            self.segments.append(segment)
            start = segment.stop
        self.length = start

        modality_order = token_space.modalities
        self.modality_index = torch.zeros(self.length, dtype=torch.long)
        self.position_kind = torch.zeros(self.length, dtype=torch.long)
        self.maskable = torch.zeros(self.length, dtype=torch.bool)
        self.condition = torch.zeros(self.length, dtype=torch.bool)
        self.template = torch.full((self.length,), token_space.pad_id, dtype=torch.long)
        for number, segment in enumerate(self.segments):
            index = modality_order.index(segment.modality)
            self.modality_index[segment.start : segment.stop] = index
            self.position_kind[segment.start : segment.stop] = content_kind(index)
            self.maskable[segment.content] = True
            if number < len(self.segments) - 1:
                self.condition[segment.content] = True
            self.template[segment.start] = token_space.begin_id(segment.modality)
            if segment.variable_length:
                # The last slot can only hold the end marker (a full-length text) or pad.
                self.position_kind[segment.content.stop - 1] = tail_kind(index)
            else:
                self.template[segment.stop - 1] = token_space.end_id(segment.modality)
        self.positions = rotary_positions(self.segments, grid_shapes or {})

    @property
    def target(self) -> Segment:
        return self.segments[-1]

    def encode(self, example: Example) -> torch.Tensor:
        """Return the ``(T,)`` unified ids of one example. A ``None`` segment becomes masks."""
        modalities = tuple(modality for modality, _ in example)
        if modalities != self.modalities:
            raise MmtokError(f"example has segments {list(modalities)}, expected {list(self.modalities)}")
        ids = self.template.clone()
        for segment, (modality, local_ids) in zip(self.segments, example):
            if local_ids is None:
                ids[segment.content] = self.token_space.mask_id
                continue
            local_ids = torch.as_tensor(local_ids).reshape(-1).long().cpu()
            count = local_ids.numel()
            if segment.variable_length and count > segment.length:
                raise MmtokError(
                    f"{modality} segment has {count} tokens, more than the generator's {segment.length}; "
                    "truncate it or train a generator with a longer sequence length"
                )
            if not segment.variable_length and count != segment.length:
                raise MmtokError(
                    f"{modality} segment has {count} tokens, but the generator expects exactly {segment.length}"
                )
            content = ids[segment.content]
            content[:count] = self.token_space.to_global(modality, local_ids)
            if segment.variable_length:
                content[count] = self.token_space.end_id(modality)
                content[count + 1 :] = self.token_space.pad_id
        return ids

    def decode(self, ids: torch.Tensor, segment_index: int = -1) -> torch.Tensor:
        """Return the local ids of one segment of a ``(T,)`` row of unified ids.

        A variable-length segment is cut before its first end marker or pad. Raises
        :class:`MmtokError` when the kept ids lie outside the segment's modality range,
        for example when mask tokens remain.
        """
        segment = self.segments[segment_index]
        content = ids[segment.content].cpu()
        if segment.variable_length:
            token_range = self.token_space.range(segment.modality)
            inside = (content >= token_range.offset) & (content < token_range.stop)
            outside = torch.nonzero(~inside)
            if outside.numel():
                content = content[: int(outside[0])]
        return self.token_space.to_local(segment.modality, content)


def rotary_positions(segments: Sequence[Segment], grid_shapes: dict[str, Sequence[int]]) -> torch.Tensor:
    """Return the ``(T, 2)`` int64 ``(row, column)`` rotary position of every position of ``segments``."""
    length = segments[-1].stop if segments else 0
    positions = torch.zeros(length, 2, dtype=torch.long)
    running = 0
    for segment in segments:
        shape = grid_shapes.get(segment.modality)
        if shape is None:
            span = segment.stop - segment.start
            positions[segment.start : segment.stop] = (running + torch.arange(span))[:, None]
            running += span
            continue
        rows, columns = (int(size) for size in shape)
        if rows * columns != segment.length or segment.variable_length:
            raise MmtokError(
                f"the {segment.modality} grid of {rows}x{columns} does not hold its {segment.length} tokens"
            )
        positions[segment.start] = running  # begin marker
        grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(columns), indexing="ij"), dim=-1)
        positions[segment.start + 1 : segment.stop - 1] = running + 1 + grid.reshape(-1, 2)  # (rows * columns, 2)
        running += 1 + max(rows, columns)
        positions[segment.stop - 1] = running  # end marker
        running += 1
    return positions


# Rows of the allowed-id table per modality: content positions, the last slot of a
# variable-length segment, and inner positions of an infilled variable-length segment.
KINDS_PER_MODALITY = 3


def content_kind(modality_index: int) -> int:
    """Return the position kind of content positions of the modality at this index."""
    return KINDS_PER_MODALITY * modality_index


def tail_kind(modality_index: int) -> int:
    """Return the position kind of the last slot of a variable-length segment."""
    return KINDS_PER_MODALITY * modality_index + 1


def inner_kind(modality_index: int) -> int:
    """Return the position kind of a variable-length position followed by kept content.

    Infilling the middle of a text must not end it there, so such positions allow only
    the modality's ids, not ``</m>`` or pad.
    """
    return KINDS_PER_MODALITY * modality_index + 2


def allowed_ids(token_space: TokenSpace, variable_length: Iterable[str]) -> torch.Tensor:
    """Return a ``(3 M, V)`` bool table of the ids a position of each kind may output.

    Row :func:`content_kind` of modality ``m`` allows ``m``'s id range, plus ``</m>`` and
    pad when ``m`` is variable-length. Row :func:`tail_kind` allows only ``</m>`` and pad,
    and row :func:`inner_kind` only the id range. No row allows ``<mask>``.
    """
    variable = set(variable_length)
    table = torch.zeros(KINDS_PER_MODALITY * len(token_space.modalities), token_space.vocab_size, dtype=torch.bool)
    for index, modality in enumerate(token_space.modalities):
        token_range = token_space.range(modality)
        table[content_kind(index), token_range.offset : token_range.stop] = True
        table[inner_kind(index), token_range.offset : token_range.stop] = True
        if modality in variable:
            for kind in (content_kind(index), tail_kind(index)):
                table[kind, token_space.end_id(modality)] = True
                table[kind, token_space.pad_id] = True
        else:
            # A fixed-length segment has no tail slot. The row only keeps softmax finite.
            table[tail_kind(index)] = table[content_kind(index)]
    return table


@dataclass
class Batch:
    """Examples of one layout as model input.

    ``T`` is the layout length. Per-position tables are shared by every row.
    """

    ids: torch.Tensor
    """``(B, T)`` int64 unified ids, with ``<mask>`` where a segment was not given."""
    modality_index: torch.Tensor
    """``(T,)`` int64 index of each position's modality in ``TokenSpace.modalities``."""
    position_kind: torch.Tensor
    """``(T,)`` int64 row of :func:`allowed_ids` for each position."""
    maskable: torch.Tensor
    """``(T,)`` bool, True where diffusion may mask a position."""
    condition: torch.Tensor
    """``(T,)`` bool, True at maskable positions of all segments but the last."""
    positions: torch.Tensor
    """``(T, 2)`` int64 ``(row, column)`` rotary position of each position."""
    layout: Layout

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(
            ids=self.ids.to(device),
            modality_index=self.modality_index.to(device),
            position_kind=self.position_kind.to(device),
            maskable=self.maskable.to(device),
            condition=self.condition.to(device),
            positions=self.positions.to(device),
            layout=self.layout,
        )

    def __len__(self) -> int:
        return self.ids.shape[0]

    def rows(self, index: slice | torch.Tensor) -> "Batch":
        """Return the batch of the selected rows; the per-position tables are shared."""
        return dataclasses.replace(self, ids=self.ids[index])


def build_batch(
    token_space: TokenSpace,
    sequence_lengths: dict[str, int],
    examples: Sequence[Example],
    variable_length: Iterable[str] = ("text",),
    grid_shapes: dict[str, Sequence[int]] | None = None,
) -> Batch:
    """Build a :class:`Batch` from examples that share one segment order.

    Each example is a list of ``(modality, local_ids)`` pairs. ``local_ids`` is a 1-D
    tensor in ``[0, size)`` of the modality's tokenizer, or ``None`` for a segment to
    generate (all its slots become ``<mask>``). ``grid_shapes`` are those of
    :class:`Layout`. Raises :class:`MmtokError` when examples differ in segment order or a
    segment has the wrong length.
    """
    if not examples:
        raise MmtokError("cannot build a batch from no examples")
    modalities = tuple(modality for modality, _ in examples[0])
    layout = Layout(token_space, sequence_lengths, modalities, variable_length, grid_shapes)
    ids = torch.stack([layout.encode(example) for example in examples])
    return Batch(
        ids=ids,
        modality_index=layout.modality_index,
        position_kind=layout.position_kind,
        maskable=layout.maskable,
        condition=layout.condition,
        positions=layout.positions,
        layout=layout,
    )


def group_by_layout(examples: Sequence[Example]) -> dict[tuple[str, ...], list[int]]:
    """Return the indices of the examples of each segment order, in first-seen order."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for index, example in enumerate(examples):
        groups.setdefault(tuple(modality for modality, _ in example), []).append(index)
    return groups
