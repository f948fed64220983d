"""Tests of the masked-diffusion generator: sequence layout, ELBO, samplers, Hub round trip.

The key checks use a stationary first-order Markov chain over 8 symbols, whose entropy
and bigram distribution are known exactly. An exact denoiser of that chain checks the
ELBO estimator and the samplers without training error. A small trained generator checks
that training reaches the chain's entropy and that its samples follow the chain.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mmtok import MmtokError, Tokenizer, TokenSpace, load_model
from mmtok.generate import Generator, build_batch
from mmtok.generate.schedule import CosineSchedule, LogLinearSchedule, masked_counts
from mmtok.generate.sampler import sample
from mmtok.generate.sequence import Batch
from mmtok.train.generator import evaluate_bits_per_token, train_generator
from conftest import one_torch_thread

# The Markov chain ----------------------------------------------------------------------

SYMBOLS = 8
CHAIN_LENGTH = 32
# Each symbol has three successors, chosen by three fixed permutations. A sum of
# permutation matrices is doubly stochastic, so the stationary distribution is uniform.
SUCCESSOR_PROBABILITIES = (0.55, 0.3, 0.15)
CHAIN_SEED = 4


def transition_matrix() -> torch.Tensor:
    generator = torch.Generator().manual_seed(CHAIN_SEED)
    transition = torch.zeros(SYMBOLS, SYMBOLS, dtype=torch.float64)
    for probability in SUCCESSOR_PROBABILITIES:
        transition[torch.arange(SYMBOLS), torch.randperm(SYMBOLS, generator=generator)] += probability
    return transition


TRANSITION = transition_matrix()
STATIONARY = torch.full((SYMBOLS,), 1 / SYMBOLS, dtype=torch.float64)
BIGRAMS = STATIONARY[:, None] * TRANSITION  # probability of (x_i, x_{i+1})


def draw_chain(count: int, generator: torch.Generator) -> torch.Tensor:
    """Draw ``(count, CHAIN_LENGTH)`` sequences started from the stationary distribution."""
    sequences = torch.empty(count, CHAIN_LENGTH, dtype=torch.long)
    sequences[:, 0] = torch.multinomial(STATIONARY.expand(count, SYMBOLS), 1, generator=generator)[:, 0]
    for position in range(1, CHAIN_LENGTH):
        sequences[:, position] = torch.multinomial(TRANSITION[sequences[:, position - 1]], 1, generator=generator)[:, 0]
    return sequences


def chain_bits_per_token(sequences: torch.Tensor) -> float:
    """Return the exact negative log2-likelihood of ``sequences`` per token."""
    log_likelihood = torch.log2(STATIONARY[sequences[:, 0]]).sum()
    log_likelihood += torch.log2(TRANSITION[sequences[:, :-1], sequences[:, 1:]]).sum()
    return float(-log_likelihood / sequences.numel())


def chain_entropy_per_token() -> float:
    """Return ``H(X_1 ... X_L) / L`` of the stationary chain in bits."""
    nonzero = TRANSITION > 0
    entropy_rate = float(-(STATIONARY[:, None] * TRANSITION)[nonzero].mul(TRANSITION[nonzero].log2()).sum())
    first = float(-(STATIONARY * STATIONARY.log2()).sum())
    return (first + (CHAIN_LENGTH - 1) * entropy_rate) / CHAIN_LENGTH


def bigram_frequencies(sequences: list[torch.Tensor]) -> torch.Tensor:
    counts = torch.zeros(SYMBOLS, SYMBOLS, dtype=torch.float64)
    for sequence in sequences:
        counts.index_put_((sequence[:-1], sequence[1:]), torch.ones(len(sequence) - 1, dtype=torch.float64), accumulate=True)
    return counts / counts.sum()


def total_variation(frequencies: torch.Tensor) -> float:
    return float(0.5 * (frequencies - BIGRAMS).abs().sum())


def chain_token_space() -> TokenSpace:
    return TokenSpace([{"modality": "chain", "tokenizer": "markov", "tokenizer_hash": "0", "size": SYMBOLS}])


def chain_examples(sequences: torch.Tensor) -> list[list[tuple[str, torch.Tensor]]]:
    return [[("chain", sequence)] for sequence in sequences]


class MarkovChainDenoiser(Generator):
    """The exact denoiser of the Markov chain, in place of the transformer.

    Given the unmasked symbols, a masked position depends only on the nearest unmasked
    symbol ``a`` on its left (``d`` steps away) and ``b`` on its right (``e`` steps
    away): ``p(x = c) ∝ P^d[a, c] P^e[c, b]``, with the stationary distribution when there
    is no left neighbour.
    """

    def __init__(self) -> None:
        super().__init__(
            token_space=chain_token_space().to_config(), sequence_lengths={"chain": CHAIN_LENGTH}, dim=8, depth=0, heads=2
        )
        # Parallel unmasking can draw neighbours that no path of the chain connects.
        # A 1e-9 floor keeps the distribution of the positions between them defined.
        smoothed = (1 - 1e-9) * TRANSITION + 1e-9 / SYMBOLS
        powers = [torch.eye(SYMBOLS, dtype=torch.float64)]
        for _ in range(CHAIN_LENGTH):
            powers.append(powers[-1] @ smoothed)
        self.log_powers = torch.stack(powers).log()  # (L + 1, K, K)

    def masked_logits(self, ids: torch.Tensor, batch: Batch, where: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        content = slice(1, CHAIN_LENGTH + 1)
        offset = self.token_space.range("chain").offset
        symbols = ids[:, content] - offset  # (B, L), negative where masked
        known = ids[:, content] != self.token_space.mask_id
        positions = torch.arange(CHAIN_LENGTH).expand_as(symbols)

        left = torch.where(known, positions, -1).cummax(1).values
        right = torch.where(known, positions, CHAIN_LENGTH).flip(1).cummin(1).values.flip(1)
        left_symbol = symbols.gather(1, left.clamp(min=0))
        right_symbol = symbols.gather(1, right.clamp(max=CHAIN_LENGTH - 1))

        log_probs = torch.where(
            (left >= 0)[..., None],
            self.log_powers[(positions - left).clamp(max=CHAIN_LENGTH), left_symbol.clamp(min=0)],
            STATIONARY.log().expand(*symbols.shape, SYMBOLS),
        )  # (B, L, K)
        right_term = self.log_powers[(right - positions).clamp(max=CHAIN_LENGTH), :, right_symbol.clamp(min=0)]
        log_probs = log_probs + torch.where((right < CHAIN_LENGTH)[..., None], right_term, 0.0)

        logits = torch.full((*ids.shape, self.token_space.vocab_size), float("-inf"), dtype=torch.float64)
        logits[:, content, offset : offset + SYMBOLS] = log_probs
        return logits[where].float()


single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def chain_validation() -> torch.Tensor:
    return draw_chain(512, torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def trained_chain_generator(tmp_path_factory) -> Generator:
    """A generator trained on fresh Markov sequences: 1000 steps of 32, about 35 s on one CPU core."""
    steps, batch_size = 1000, 32
    sequences = draw_chain(steps * batch_size, torch.Generator().manual_seed(0))
    return train_generator(
        chain_examples(sequences),
        chain_token_space(),
        {"chain": CHAIN_LENGTH},
        tmp_path_factory.mktemp("chain-generator"),
        steps=steps,
        batch_size=batch_size,
        lr=3e-3,
        seed=0,
        checkpoint_every=steps,
        model_args={"dim": 64, "depth": 2, "heads": 4},
        device="cpu",
    )


# ELBO and samplers on the exact denoiser ----------------------------------------------


def test_exact_denoiser_elbo_equals_likelihood(chain_validation):
    # For the exact denoiser the ELBO equals the log-likelihood for every sequence, so
    # only the Monte Carlo noise of the diffusion times separates the two.
    # With 32 diffusion times per sequence that noise is about 0.4% here.
    denoiser = MarkovChainDenoiser().eval()
    measured = evaluate_bits_per_token(denoiser, chain_examples(chain_validation), t_samples=32)["bits_per_token/chain"]
    exact = chain_bits_per_token(chain_validation)
    assert measured == pytest.approx(exact, rel=0.01)


@pytest.mark.parametrize("method, steps", [("ancestral", 128), ("confidence", CHAIN_LENGTH)])
def test_exact_denoiser_samples_follow_chain(method, steps):
    # 512 sequences drawn from the chain itself have a total variation of about 0.015.
    # Measured: 0.020 (ancestral) and 0.017 (confidence). Unmasking neighbours in the
    # same step can join them by an impossible transition, which 128 ancestral steps do
    # for about 0.4% of the bigrams.
    denoiser = MarkovChainDenoiser().eval()
    samples = denoiser.generate("chain", 512, steps=steps, sampler=method, seed=0)
    frequencies = bigram_frequencies(samples)
    assert total_variation(frequencies) < 0.035
    assert float(frequencies[TRANSITION == 0].sum()) < 0.01


# The trained generator -----------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_bits_per_token(trained_chain_generator, chain_validation) -> float:
    metrics = evaluate_bits_per_token(trained_chain_generator, chain_examples(chain_validation), t_samples=8)
    return metrics["bits_per_token/chain"]


def test_trained_elbo_within_five_percent_of_entropy(trained_bits_per_token):
    # Measured over three training seeds: 2.9-3.6% above the entropy after 1000 steps
    # (5.7-6.5% after 600).
    assert trained_bits_per_token < 1.05 * chain_entropy_per_token()


def test_trained_elbo_not_below_likelihood(trained_bits_per_token, chain_validation):
    # The ELBO bounds the likelihood of every sequence, so only the Monte Carlo noise of
    # the diffusion times (under 1% here) can put the estimate below it.
    assert trained_bits_per_token > 0.99 * chain_bits_per_token(chain_validation)


def test_trained_metrics_stored_after_training(trained_chain_generator):
    assert trained_chain_generator.metrics["train_steps"] == 1000


@pytest.mark.parametrize("method, steps", [("ancestral", 64), ("confidence", CHAIN_LENGTH)])
def test_trained_samples_follow_chain(trained_chain_generator, method, steps):
    # Measured over three training seeds: total variation 0.044-0.070 (ancestral) and
    # 0.054-0.064 (confidence), impossible bigrams 1.9-2.5% and 0.4-0.6%. Samples without
    # any dependence between positions would score 0.62 and 62%.
    samples = trained_chain_generator.generate("chain", 256, steps=steps, sampler=method, seed=0)
    frequencies = bigram_frequencies(samples)
    assert total_variation(frequencies) < 0.10
    assert float(frequencies[TRANSITION == 0].sum()) < 0.035


# Sequence layout -------------------------------------------------------------------------

TEXT_SIZE, GRID_SIZE = 20, 16
TEXT_LENGTH, GRID_LENGTH = 6, 8


def two_modality_space() -> TokenSpace:
    return TokenSpace(
        [
            {"modality": "text", "tokenizer": "text-tokenizer", "tokenizer_hash": "t0", "size": TEXT_SIZE},
            {"modality": "grid", "tokenizer": "grid-tokenizer", "tokenizer_hash": "g0", "size": GRID_SIZE},
        ]
    )


def small_generator(**overrides) -> Generator:
    torch.manual_seed(0)
    arguments = {
        "token_space": two_modality_space().to_config(),
        "sequence_lengths": {"text": TEXT_LENGTH, "grid": GRID_LENGTH},
        "dim": 32,
        "depth": 1,
        "heads": 2,
        **overrides,
    }
    return Generator(**arguments).eval()


def text_and_grid(text: list[int], grid: list[int] | None = None) -> list[tuple[str, torch.Tensor]]:
    grid_ids = torch.tensor(grid if grid is not None else list(range(GRID_LENGTH)))
    return [("text", torch.tensor(text)), ("grid", grid_ids)]


def test_batch_layout_markers_and_padding():
    space = two_modality_space()
    batch = build_batch(space, {"text": TEXT_LENGTH, "grid": GRID_LENGTH}, [text_and_grid([3, 4])])
    text_offset, grid_offset = space.range("text").offset, space.range("grid").offset
    expected = [space.begin_id("text"), 3 + text_offset, 4 + text_offset, space.end_id("text"), 0, 0, 0, 0]
    expected += [space.begin_id("grid"), *(grid_offset + i for i in range(GRID_LENGTH)), space.end_id("grid")]
    assert batch.ids[0].tolist() == expected


def test_grid_positions_are_rows_and_columns():
    space = two_modality_space()
    batch = build_batch(space, {"text": TEXT_LENGTH, "grid": GRID_LENGTH}, [text_and_grid([3, 4])], grid_shapes={"grid": (2, 4)})
    text_stop = TEXT_LENGTH + 2  # <text>, then L + 1 slots for content, </text> and padding
    assert batch.positions[:text_stop].tolist() == [[p, p] for p in range(text_stop)]
    grid = batch.positions[text_stop + 1 : text_stop + 1 + GRID_LENGTH] - (text_stop + 1)
    assert grid.tolist() == [[r, c] for r in range(2) for c in range(4)]
    assert batch.positions[text_stop].tolist() == [text_stop, text_stop]  # <grid> marker
    assert batch.positions[-1].tolist() == [text_stop + 5, text_stop + 5]  # </grid> after max(2, 4)


def test_grid_shape_must_hold_sequence_length():
    with pytest.raises(ValueError, match="grid shape"):
        small_generator(grid_shapes={"grid": [3, 3]})


def test_diagonal_rotary_equals_1d():
    # (p, p) positions rotate every channel pair by p times its frequency, as 1-D rotary does.
    from mmtok.generate.model import rotary_tables

    positions = torch.arange(10)
    cos, sin = rotary_tables(torch.stack([positions, positions], dim=1), 16)
    frequencies = 10000.0 ** (-torch.arange(0, 16, 2).float() / 16)
    assert torch.allclose(cos, (positions[:, None] * frequencies).cos())
    assert torch.allclose(sin, (positions[:, None] * frequencies).sin())


def test_grid_shape_changes_logits():
    # The same ids give other logits when the model reads them as a 2x4 rather than a 1-D grid.
    flat, grid = small_generator(), small_generator(grid_shapes={"grid": [2, 4]})
    example = [text_and_grid([3, 4])]
    assert not torch.allclose(flat(flat.make_batch(example).ids, flat.make_batch(example)), grid(grid.make_batch(example).ids, grid.make_batch(example)))


def test_time_conditioning_uses_time():
    model = small_generator(time_conditioning=True)
    batch = model.make_batch([text_and_grid([3, 4])])
    early = model(batch.ids, batch, torch.tensor([0.1]))
    late = model(batch.ids, batch, torch.tensor([0.9]))
    assert not torch.allclose(early, late)


def test_time_conditioning_trains_embedding():
    model = small_generator(time_conditioning=True).train()
    batch = model.make_batch([text_and_grid([3, 4])] * 4)
    model.loss(batch, generator=torch.Generator().manual_seed(0)).loss.backward()
    assert all(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in model.time_embedding.parameters())


def test_time_of_masked_share_inverts_schedule():
    t = torch.linspace(0.01, 1.0, 50)
    for schedule in (LogLinearSchedule(), CosineSchedule()):
        assert torch.allclose(schedule.time_of_masked_share(1 - schedule.alpha(t)), t, atol=1e-5)


def test_batch_maskable_excludes_markers():
    batch = build_batch(two_modality_space(), {"text": TEXT_LENGTH, "grid": GRID_LENGTH}, [text_and_grid([3])])
    # Text: begin marker fixed, 7 slots for tokens, end marker and padding.
    # Grid: begin and end markers fixed, 8 slots.
    assert batch.maskable.tolist() == [False] + [True] * 7 + [False] + [True] * 8 + [False]


def test_batch_condition_covers_all_but_last_segment():
    batch = build_batch(two_modality_space(), {"text": TEXT_LENGTH, "grid": GRID_LENGTH}, [text_and_grid([3])])
    assert batch.condition.tolist() == [False] + [True] * 7 + [False] * 10


def test_batch_rejects_wrong_fixed_length():
    with pytest.raises(MmtokError, match="expects exactly 8"):
        build_batch(two_modality_space(), {"text": TEXT_LENGTH, "grid": GRID_LENGTH}, [text_and_grid([3], [1, 2])])


def test_batch_rejects_long_text():
    with pytest.raises(MmtokError, match="more than the generator's 6"):
        build_batch(two_modality_space(), {"text": TEXT_LENGTH, "grid": GRID_LENGTH}, [text_and_grid([1] * 7)])


def test_batch_rejects_mixed_layouts():
    examples = [text_and_grid([3]), [("grid", torch.arange(GRID_LENGTH))]]
    with pytest.raises(MmtokError, match="expected"):
        build_batch(two_modality_space(), {"text": TEXT_LENGTH, "grid": GRID_LENGTH}, examples)


def test_text_decode_cuts_at_end_marker():
    layout = small_generator().layout(["text"])
    ids = layout.encode([("text", torch.tensor([5, 6, 7]))])
    assert layout.decode(ids).tolist() == [5, 6, 7]


def test_text_decode_cuts_at_pad():
    layout = small_generator().layout(["text"])
    ids = layout.encode([("text", torch.tensor([5, 6, 7, 8]))])
    ids[3] = 0  # a pad where the model put no end marker
    assert layout.decode(ids).tolist() == [5, 6]


def test_text_decode_keeps_full_length():
    layout = small_generator().layout(["text"])
    ids = layout.encode([("text", torch.arange(TEXT_LENGTH))])
    assert layout.decode(ids).tolist() == list(range(TEXT_LENGTH))


# Model -----------------------------------------------------------------------------------


def test_logits_infinite_outside_modality_range():
    model = small_generator()
    batch = model.make_batch([text_and_grid([3, 4])])
    logits = model(batch.ids, batch)[0]
    space = model.token_space
    grid_position = batch.layout.segments[1].content.start
    legal = torch.isfinite(logits[grid_position]).nonzero()[:, 0]
    assert legal.tolist() == list(range(space.range("grid").offset, space.range("grid").stop))


def test_text_logits_allow_end_and_pad():
    model = small_generator()
    batch = model.make_batch([text_and_grid([3, 4])])
    logits = model(batch.ids, batch)[0]
    space = model.token_space
    text_position = batch.layout.segments[0].content.start
    legal = set(torch.isfinite(logits[text_position]).nonzero()[:, 0].tolist())
    assert legal == {space.pad_id, space.end_id("text"), *range(space.range("text").offset, space.range("text").stop)}


def test_loss_counts_only_target_when_condition_given():
    model = small_generator()
    result = model.loss(model.make_batch([text_and_grid([3, 4])] * 4), condition="given")
    assert result.tokens == {"grid": 4 * GRID_LENGTH}


def test_loss_counts_condition_when_noised():
    model = small_generator()
    result = model.loss(model.make_batch([text_and_grid([3, 4])] * 4), condition="noised")
    assert result.tokens == {"text": 4 * (TEXT_LENGTH + 1), "grid": 4 * GRID_LENGTH}


def test_loss_bits_per_token_matches_loss():
    model = small_generator()
    result = model.loss(model.make_batch([text_and_grid([3, 4])] * 4))
    assert result.bits_per_token == pytest.approx(float(result.loss.detach()) / math.log(2))


def test_loss_gradient_reaches_every_parameter():
    model = small_generator().train()
    model.loss(model.make_batch([text_and_grid([3, 4])] * 8), condition="noised").loss.backward()
    missing = [name for name, parameter in model.named_parameters() if parameter.grad is None]
    assert missing == []


@pytest.mark.parametrize("schedule", [LogLinearSchedule(), CosineSchedule()])
def test_schedule_weight_matches_derivative(schedule):
    t = torch.tensor([0.01, 0.3, 0.9], dtype=torch.float64, requires_grad=True)
    alpha = schedule.alpha(t)
    (derivative,) = torch.autograd.grad(alpha.sum(), t)
    expected = -derivative / (1 - alpha.detach())
    assert torch.allclose(schedule.weight(t.detach()), expected)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "square", "sqrt"])
def test_unmasking_counts_reach_zero(schedule):
    counts = masked_counts(torch.tensor([32, 5, 0]), steps=8, schedule=schedule)
    assert counts[-1].tolist() == [0, 0, 0]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "square", "sqrt"])
def test_unmasking_counts_unmask_every_step(schedule):
    counts = masked_counts(torch.tensor([32]), steps=8, schedule=schedule)[:, 0]
    previous = torch.cat([torch.tensor([32]), counts[:-1]])
    assert bool((previous - counts >= 1).all())


def test_unmasking_schedules_differ_in_pace():
    # After half the steps: cosine keeps floor(64 cos(pi/4)) = 45, linear 32, square 48, sqrt 18.
    halfway = {name: int(masked_counts(torch.tensor([64]), steps=8, schedule=name)[3, 0]) for name in ("cosine", "linear", "square", "sqrt")}
    assert halfway == {"cosine": 45, "linear": 32, "square": 48, "sqrt": 18}


def test_confidence_noise_changes_order():
    model = small_generator()
    greedy = model.generate("grid", 4, steps=4, seed=0, confidence_noise=0.0)
    noisy = model.generate("grid", 4, steps=4, seed=0, confidence_noise=4.5)
    assert not all(torch.equal(a, b) for a, b in zip(greedy, noisy))
    assert all(((ids >= 0) & (ids < GRID_SIZE)).all() for ids in noisy)


def test_negative_confidence_noise_rejected():
    with pytest.raises(ValueError, match="confidence_noise must be at least 0"):
        small_generator().generate("grid", 1, steps=2, confidence_noise=-1.0)


def test_unknown_unmasking_schedule_lists_choices():
    with pytest.raises(ValueError, match="cosine, linear, square, sqrt"):
        masked_counts(torch.tensor([8]), steps=4, schedule="exp")


def test_unknown_schedule_lists_choices():
    with pytest.raises(ValueError, match="loglinear, cosine"):
        small_generator(schedule="linear")


# Generation ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["confidence", "ancestral"])
def test_generated_ids_inside_modality_range(method):
    samples = small_generator().generate("grid", 16, steps=4, sampler=method, seed=0)
    values = torch.cat(samples)
    assert int(values.min()) >= 0
    assert int(values.max()) < GRID_SIZE
    assert all(len(sample) == GRID_LENGTH for sample in samples)


@pytest.mark.parametrize("method", ["confidence", "ancestral"])
def test_generated_text_inside_range_and_length(method):
    samples = small_generator().generate("text", 16, steps=4, sampler=method, seed=0)
    assert all(len(sample) <= TEXT_LENGTH for sample in samples)
    assert all(bool(((sample >= 0) & (sample < TEXT_SIZE)).all()) for sample in samples)


@pytest.mark.parametrize("method", ["confidence", "ancestral"])
@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_sampler_keeps_condition_unchanged(method, guidance):
    model = small_generator()
    batch = model.make_batch([[("text", torch.tensor([3, 4, 5])), ("grid", None)]] * 4)
    keep = batch.ids != model.token_space.mask_id
    ids = sample(model, batch, keep, method=method, steps=3, guidance=guidance, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ids[keep], batch.ids[keep])
    assert not bool((ids == model.token_space.mask_id).any())


def test_sampler_options_leave_no_mask():
    model = small_generator()
    batch = model.make_batch([[("grid", None)]] * 4)
    keep = batch.ids != model.token_space.mask_id
    for temperature, top_p in [(0.0, 1.0), (0.7, 0.5)]:
        ids = sample(model, batch, keep, steps=3, temperature=temperature, top_p=top_p)
        assert not bool((ids == model.token_space.mask_id).any())


def test_seeded_generation_repeats():
    model = small_generator()
    first = model.generate("grid", 4, steps=4, seed=7, condition=[("text", torch.tensor([1, 2]))], guidance=1.0)
    second = model.generate("grid", 4, steps=4, seed=7, condition=[("text", torch.tensor([1, 2]))], guidance=1.0)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_generate_guidance_without_condition_rejected():
    with pytest.raises(ValueError, match="guidance needs a condition"):
        small_generator().generate("grid", 1, guidance=1.0)


def test_generate_cuts_long_text_condition():
    samples = small_generator().generate("grid", 2, steps=2, seed=0, condition=[("text", torch.arange(TEXT_LENGTH + 3))])
    assert [len(sample) for sample in samples] == [GRID_LENGTH, GRID_LENGTH]


def test_infill_keeps_given_tokens():
    model = small_generator()
    grid = torch.arange(GRID_LENGTH)
    keep = torch.tensor([True, False] * (GRID_LENGTH // 2))
    (result,) = model.infill([("grid", grid)], [keep], n=1, steps=4, seed=0)
    assert torch.equal(result[0][keep], grid[keep])


# Hub round trip and tokenizer checks -----------------------------------------------------


def test_save_load_gives_identical_logits(tmp_path):
    model = small_generator(tie_embeddings=True)
    model.metrics = {"bits_per_token/grid": 3.5}
    model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    batch = model.make_batch([text_and_grid([3, 4])])
    expected = model(batch.ids, batch)
    assert torch.equal(loaded(batch.ids, batch), expected)


def test_save_writes_card_with_vocabulary(tmp_path):
    model = small_generator()
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert f"Vocabulary size: {model.token_space.vocab_size}" in card


class GridTokenizer(Tokenizer):
    """A tokenizer with a codebook parameter, enough for weights hashes and vocabulary sizes."""

    modality = "grid"

    def __init__(self, size: int = GRID_SIZE) -> None:
        super().__init__()
        self.size = size
        self.codebook = nn.Parameter(torch.arange(size * 2, dtype=torch.float32).view(size, 2))

    @property
    def vocab_size(self) -> int:
        return self.size


def generator_for(tokenizer: GridTokenizer) -> Generator:
    space = TokenSpace(
        [{"modality": "grid", "tokenizer": "grid-tokenizer", "tokenizer_hash": tokenizer.weights_hash(), "size": GRID_SIZE}]
    )
    return Generator(token_space=space.to_config(), sequence_lengths={"grid": GRID_LENGTH}, dim=16, depth=1, heads=2)


def test_check_tokenizer_accepts_training_tokenizer():
    tokenizer = GridTokenizer()
    generator_for(tokenizer).check_tokenizer("grid", tokenizer)


def test_check_tokenizer_rejects_other_size():
    model = generator_for(GridTokenizer())
    with pytest.raises(MmtokError, match="has 12 grid ids"):
        model.check_tokenizer("grid", GridTokenizer(size=12))


def test_check_tokenizer_rejects_other_weights():
    model = generator_for(GridTokenizer())
    other = GridTokenizer()
    with torch.no_grad():
        other.codebook.add_(1)
    with pytest.raises(MmtokError, match="has weights"):
        model.check_tokenizer("grid", other)


# Training ----------------------------------------------------------------------------------


def test_train_generator_reports_conditional_metrics(tmp_path):
    generator = torch.Generator().manual_seed(0)
    examples = [text_and_grid([1, 2], torch.randint(0, GRID_SIZE, (GRID_LENGTH,), generator=generator).tolist()) for _ in range(8)]
    examples += [[("grid", torch.randint(0, GRID_SIZE, (GRID_LENGTH,), generator=generator))] for _ in range(8)]
    model = train_generator(
        examples,
        two_modality_space(),
        {"text": TEXT_LENGTH, "grid": GRID_LENGTH},
        tmp_path,
        steps=3,
        batch_size=4,
        checkpoint_every=2,
        logdir=tmp_path / "logs",
        model_args={"dim": 16, "depth": 1, "heads": 2},
        validation_examples=examples,
        device="cpu",
    )
    assert sorted(name for name in model.metrics if name.startswith("bits_per_token")) == [
        "bits_per_token/grid",
        "bits_per_token/grid_given_text",
        "bits_per_token/grid_given_text_condition_dropped",
    ]
    assert (tmp_path / "model.safetensors").is_file()
    assert model.layouts == [["text", "grid"], ["grid"]]
    assert "3 AdamW steps of batch 4" in (tmp_path / "README.md").read_text()


def test_train_generator_resume_matches_straight_run(tmp_path):
    examples = chain_examples(draw_chain(16, torch.Generator().manual_seed(0)))
    arguments = dict(
        token_space=chain_token_space(),
        sequence_lengths={"chain": CHAIN_LENGTH},
        steps=4,
        batch_size=4,
        checkpoint_every=2,
        model_args={"dim": 16, "depth": 1, "heads": 2},
        device="cpu",
    )
    straight = train_generator(examples, output_dir=tmp_path / "straight", **arguments)

    # A validation example of the wrong length fails the evaluation that follows the
    # step-2 checkpoint, which interrupts the run after that checkpoint was written.
    broken = [[("chain", torch.zeros(3, dtype=torch.long))]]
    with pytest.raises(MmtokError):
        train_generator(examples, output_dir=tmp_path / "resumed", validation_examples=broken, **arguments)
    resumed = train_generator(examples, output_dir=tmp_path / "resumed", resume=True, **arguments)

    for (name, expected), actual in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(actual, expected), name
