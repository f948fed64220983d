"""Benchmark the masked-diffusion generator's samplers: sampling speed and token statistics of the samples.

The samplers are ``confidence``, ``ancestral`` and ``confidence-greedy`` (the confidence
sampler without Gumbel noise on its order). For each sampler and number of denoising
steps, the script generates ``--samples`` unconditional images and texts with
``Generator.generate`` in calls of ``--batch`` samples on the CPU, and reports:

- Speed: ``--batch`` over the median wall time of one ``generate`` call, in samples per
  second. Only sampling is timed, not decoding the ids to pixels or text. One untimed
  call per modality warms up first.
- Unigram JS: the Jensen-Shannon divergence, in bits, between the distribution of
  sampled token ids and that of held-out token ids.
- Pair JS: the same divergence between distributions of adjacent token pairs, over a
  smaller alphabet than the ids. For images, each code maps to one of 16 clusters
  (k-means on the image tokenizer's codebook), and horizontal and vertical neighbours on
  the token grid give two 256-bin distributions, which 64 samples fill with 3584 pairs
  each. For text, each id maps to itself if it is among the 255 most frequent held-out
  ids and to one "other" symbol if not, and consecutive ids give one 65536-bin
  distribution. That is many more bins than 64 texts have pairs, so the text pair JS of
  real data is high too.
- Distinct: the share of distinct sequences among the samples, and the mean share of
  distinct ids within one sample.

Held-out ids come from ``DATA/<modality>/val.jsonl``, tokenized with the pipeline's
tokenizers (cached in ``DATA/.cache/generator-tokens``) and cut into the generator's
segments. Two disjoint random draws of ``--samples`` segments each are taken: the first
is the reference for every row, and the second, scored against the first as if it were
generated, gives the "held-out" row. That row shows how far two samples of real data of
this size lie apart, so differences between samplers smaller than it are noise.

    python bench/generator.py --samples 64 --batch 16
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from mmtok import api
from mmtok.generate.sampler import SAMPLERS
from mmtok.quantize import VectorQuantizer
from mmtok.train.generator_data import read_manifest, tokenize_rows, windows

MODALITIES = ("image", "text")
DEFAULT_STEPS = (4, 8, 16, 32, 64)
# Image codes are grouped into this many k-means clusters before counting pairs, so the
# 16 x 16 = 256 pair bins fill from a few thousand pairs.
IMAGE_CLUSTERS = 16
# Text pairs count the most frequent held-out ids as themselves and every other id as
# one symbol, which gives (255 + 1)^2 pair bins.
TEXT_FREQUENT_IDS = 255
KMEANS_ITERATIONS = 100
HELD_OUT = "held-out"
# The confidence sampler with greedy ranking (no Gumbel noise on the order), for comparison.
GREEDY = "confidence-greedy"
SAMPLER_CHOICES = (*SAMPLERS, GREEDY)


# Arguments ------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    """Parse an integer of at least 1, for argparse."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def step_list(text: str) -> list[int]:
    """Parse a comma-separated list of step counts, each at least 1, for argparse."""
    steps = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise argparse.ArgumentTypeError(f"invalid step list {text!r}: empty entry")
        try:
            steps.append(positive_int(item))
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentTypeError(f"invalid step count {item!r} in {text!r}: {error}") from None
    return steps


def sampler_list(text: str) -> list[str]:
    """Parse a comma-separated list of sampler names, for argparse."""
    names = [item.strip() for item in text.split(",")]
    unknown = [name for name in names if name not in SAMPLER_CHOICES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown sampler(s) {', '.join(map(repr, unknown))}; choose from {', '.join(SAMPLER_CHOICES)}"
        )
    return names


# Held-out data --------------------------------------------------------------------------


def held_out_segments(pipeline, data: Path, modality: str) -> list[torch.Tensor]:
    """Return the local ids of every generator segment cut from ``DATA/<modality>/val.jsonl``.

    A fixed-length modality keeps only full segments and a variable-length one (text)
    keeps the shorter last piece too, as training does. Unreadable files are skipped.
    """
    generator = pipeline.generator
    rows = read_manifest(data, modality, "val")
    options = generator.sequence_options.get(modality, {})
    cache_dir = data / ".cache" / "generator-tokens"
    sequences = tokenize_rows(data, modality, "val", pipeline.tokenizers[modality], options, rows, cache_dir)
    length = generator.sequence_lengths[modality]
    variable = modality in generator.variable_length
    return [piece for sequence in sequences if sequence is not None for piece in windows(sequence, length, variable)]


def split_held_out(segments: list[torch.Tensor], count: int, seed: int, modality: str) -> tuple[list, list]:
    """Draw two disjoint random sets of ``count`` segments: the reference and the floor sample."""
    if len(segments) < 2 * count:
        raise SystemExit(
            f"error: the {modality} held-out data has {len(segments)} segments, fewer than the {2 * count} "
            f"needed for two sets of --samples {count}; lower --samples"
        )
    order = list(range(len(segments)))
    random.Random(seed).shuffle(order)
    return [segments[i] for i in order[:count]], [segments[i] for i in order[count : 2 * count]]


# Alphabets for pair statistics ----------------------------------------------------------


def image_codebook(tokenizer) -> torch.Tensor:
    """Return the ``(K, D)`` codebook of the image tokenizer's quantizer, one row per local id."""
    for module in tokenizer.modules():
        if isinstance(module, VectorQuantizer) and module.codebook.shape[0] == tokenizer.vocab_size:
            return module.codebook.detach().double().cpu()
    raise SystemExit(
        f"error: tokenizer {tokenizer.name_or_path!r} has no VectorQuantizer with {tokenizer.vocab_size} codes, "
        "so its codes cannot be clustered"
    )


def kmeans(vectors: torch.Tensor, clusters: int, seed: int) -> torch.Tensor:
    """Return the cluster index of each row of ``vectors``: Lloyd's k-means after k-means++ seeding."""
    generator = torch.Generator().manual_seed(seed)
    first = int(torch.randint(len(vectors), (1,), generator=generator))
    centres = vectors[first : first + 1]
    while len(centres) < clusters:
        distance = torch.cdist(vectors, centres).min(dim=1).values.pow(2)
        chosen = int(torch.multinomial(distance / distance.sum(), 1, generator=generator))
        centres = torch.cat([centres, vectors[chosen : chosen + 1]])

    labels = torch.cdist(vectors, centres).argmin(dim=1)
    for _ in range(KMEANS_ITERATIONS):
        for index in range(clusters):
            members = vectors[labels == index]
            if len(members):  # an empty cluster keeps its old centre
                centres[index] = members.mean(dim=0)
        updated = torch.cdist(vectors, centres).argmin(dim=1)
        if torch.equal(updated, labels):
            break
        labels = updated
    return labels


def text_symbols(segments: list[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """Map each text id to its rank among the ``TEXT_FREQUENT_IDS`` most frequent held-out ids, others to one last symbol."""
    counts = torch.bincount(torch.cat(segments), minlength=vocab_size)
    frequent = counts.argsort(descending=True, stable=True)[:TEXT_FREQUENT_IDS]
    symbols = torch.full((vocab_size,), TEXT_FREQUENT_IDS, dtype=torch.int64)
    symbols[frequent] = torch.arange(len(frequent))
    return symbols


# Statistics -----------------------------------------------------------------------------


def js_divergence(first: torch.Tensor, second: torch.Tensor) -> float:
    """Return the Jensen-Shannon divergence in bits between two histograms of counts."""
    p = first.double() / first.sum()
    q = second.double() / second.sum()
    middle = (p + q) / 2

    def kl_to_middle(distribution: torch.Tensor) -> float:
        support = distribution > 0
        return float((distribution[support] * (distribution[support] / middle[support]).log2()).sum())

    return (kl_to_middle(p) + kl_to_middle(q)) / 2


def unigram_counts(segments: list[torch.Tensor], vocab_size: int) -> torch.Tensor:
    return torch.bincount(torch.cat(segments), minlength=vocab_size)


def grid_pair_counts(segments: list[torch.Tensor], labels: torch.Tensor, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Count horizontal and vertical neighbour pairs of cluster labels on each raster-order grid."""
    clusters = int(labels.max()) + 1
    rows, columns = grid
    codes = labels[torch.stack(segments)].view(-1, rows, columns)  # (N, rows, columns)
    horizontal = codes[:, :, :-1] * clusters + codes[:, :, 1:]
    vertical = codes[:, :-1, :] * clusters + codes[:, 1:, :]
    return {
        "horizontal": torch.bincount(horizontal.reshape(-1), minlength=clusters**2),
        "vertical": torch.bincount(vertical.reshape(-1), minlength=clusters**2),
    }


def sequence_pair_counts(segments: list[torch.Tensor], symbols: torch.Tensor) -> dict[str, torch.Tensor]:
    """Count pairs of consecutive symbols within each sequence."""
    alphabet = int(symbols.max()) + 1
    pairs = [symbols[s[:-1]] * alphabet + symbols[s[1:]] for s in segments if len(s) > 1]
    flat = torch.cat(pairs) if pairs else torch.zeros(0, dtype=torch.int64)
    return {"adjacent": torch.bincount(flat, minlength=alphabet**2)}


def diversity(segments: list[torch.Tensor]) -> dict[str, float]:
    """Return the share of distinct sequences and the mean share of distinct ids per sequence.

    Empty sequences (a text that ends at once) count as sequences but not in the mean ratio.
    """
    distinct_sequences = len({tuple(s.tolist()) for s in segments}) / len(segments)
    ratios = [len(set(s.tolist())) / len(s) for s in segments if len(s)]
    return {
        "distinct_sequences": distinct_sequences,
        "distinct_token_ratio": statistics.fmean(ratios) if ratios else 0.0,
    }


class Scorer:
    """Token statistics of a set of segments against the held-out reference of one modality."""

    def __init__(self, pipeline, modality: str, reference: list[torch.Tensor], all_held_out: list[torch.Tensor], seed: int):
        self.modality = modality
        tokenizer = pipeline.tokenizers[modality]
        self.vocab_size = tokenizer.vocab_size
        if modality == "image":
            generator = pipeline.generator
            length = generator.sequence_lengths[modality]
            options = generator.sequence_options.get(modality, {})
            grid = generator.grid_shapes.get(modality) or tokenizer.sequence_grid(length, **options)
            if grid is None:
                raise SystemExit(f"error: {tokenizer.name_or_path!r} gives no token grid for {length} image tokens")
            self.grid = tuple(grid)
            self.labels = kmeans(image_codebook(tokenizer), IMAGE_CLUSTERS, seed)
            self.pairs = lambda segments: grid_pair_counts(segments, self.labels, self.grid)
        else:
            symbols = text_symbols(all_held_out, self.vocab_size)
            self.pairs = lambda segments: sequence_pair_counts(segments, symbols)
        self.reference_unigrams = unigram_counts(reference, self.vocab_size)
        self.reference_pairs = self.pairs(reference)

    def score(self, segments: list[torch.Tensor]) -> dict:
        pairs = self.pairs(segments)
        return {
            "unigram_js": js_divergence(unigram_counts(segments, self.vocab_size), self.reference_unigrams),
            "pair_js": {name: js_divergence(counts, self.reference_pairs[name]) for name, counts in pairs.items()},
            **diversity(segments),
            "mean_length": statistics.fmean(len(s) for s in segments),
        }


# Sampling -------------------------------------------------------------------------------


def sample_and_time(generator, modality: str, sampler: str, steps: int, samples: int, batch: int, seed: int):
    """Generate ``samples`` segments in calls of ``batch``; return them and the wall time of each call.

    Every call generates a full batch, so all timings are comparable, and samples past
    ``samples`` in the last call are dropped.
    """
    segments: list[torch.Tensor] = []
    seconds: list[float] = []
    call = 0
    while len(segments) < samples:
        start = time.perf_counter()
        if sampler == GREEDY:
            output = generator.generate(modality, batch, steps=steps, sampler="confidence", confidence_noise=0.0, seed=seed + call)
        else:
            output = generator.generate(modality, batch, steps=steps, sampler=sampler, seed=seed + call)
        seconds.append(time.perf_counter() - start)
        segments.extend(output)
        call += 1
    return segments[:samples], seconds


def benchmark_modality(pipeline, modality: str, arguments) -> dict:
    """Score the held-out floor and every sampler and step count of one modality."""
    generator = pipeline.generator
    if modality not in generator.sequence_lengths:
        raise SystemExit(f"error: generator {pipeline.name_or_path!r} has no {modality} segment")
    segments = held_out_segments(pipeline, arguments.data, modality)
    reference, floor = split_held_out(segments, arguments.samples, arguments.seed, modality)
    scorer = Scorer(pipeline, modality, reference, segments, arguments.seed)

    # One step per position of the target segment: 256 for a 16 x 16 image, and for text
    # its content length plus the end-marker slot.
    slots = generator.layout([modality]).segments[-1].slots
    steps = sorted(set(arguments.steps) | {slots})

    # An untimed warm-up call.
    generator.generate(modality, arguments.batch, steps=min(steps), sampler=arguments.samplers[0], seed=arguments.seed)
    rows = [{"sampler": HELD_OUT, "steps": None, "samples_per_second": None, **scorer.score(floor)}]
    for sampler in arguments.samplers:
        for count in steps:
            sampled, seconds = sample_and_time(
                generator, modality, sampler, count, arguments.samples, arguments.batch, arguments.seed
            )
            rows.append(
                {
                    "sampler": sampler,
                    "steps": count,
                    "samples_per_second": arguments.batch / statistics.median(seconds),
                    "seconds_per_call": seconds,
                    **scorer.score(sampled),
                }
            )
            print(f"{modality} {sampler} {count} steps: {rows[-1]['samples_per_second']:.1f} samples/s", file=sys.stderr)
    return {
        "segment_slots": slots,
        "held_out_segments": len(segments),
        "pair_alphabet": IMAGE_CLUSTERS if modality == "image" else TEXT_FREQUENT_IDS + 1,
        "rows": rows,
    }


# Output ---------------------------------------------------------------------------------


def environment(threads: int) -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE) if cpuinfo.exists() else []
    return {
        "processor": names[0] if names else platform.processor(),
        "logical_cpus": len(names) or None,
        "threads": threads,
        "torch": torch.__version__,
    }


def print_table(report: dict) -> None:
    info = report["environment"]
    print(
        f"{report['model']} on CPU ({info['processor']}), {info['threads']} torch thread(s), torch {info['torch']}; "
        f"{report['samples']} samples per row, generated in timed calls of {report['batch']} (surplus samples dropped), seed {report['seed']}"
    )
    for modality, result in report["modalities"].items():
        pair_header = "pair JS (h / v)" if modality == "image" else "pair JS"
        print()
        print(f"{modality} ({result['segment_slots']} positions, {result['held_out_segments']} held-out segments):")
        print()
        print(f"| sampler | steps | samples/s | unigram JS | {pair_header} | distinct (sequences / tokens) | mean length |")
        print("|---|---|---|---|---|---|---|")
        for row in result["rows"]:
            steps = "" if row["steps"] is None else row["steps"]
            speed = "" if row["samples_per_second"] is None else f"{row['samples_per_second']:.1f}"
            pair = " / ".join(f"{value:.3f}" for value in row["pair_js"].values())
            print(
                f"| {row['sampler']} | {steps} | {speed} | {row['unigram_js']:.3f} | {pair} | "
                f"{row['distinct_sequences']:.2f} / {row['distinct_token_ratio']:.2f} | {row['mean_length']:.1f} |"
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=api.DEFAULT_GENERATOR, help=f"pipeline or generator (default: {api.DEFAULT_GENERATOR})")
    parser.add_argument("--data", type=Path, default=Path("data"), help="data folder with image/val.jsonl and text/val.jsonl (default: data)")
    parser.add_argument(
        "--steps",
        type=step_list,
        default=list(DEFAULT_STEPS),
        help="comma-separated denoising step counts; one step per position of the segment is always added "
        "(default: 4,8,16,32,64)",
    )
    parser.add_argument(
        "--samplers",
        type=sampler_list,
        default=list(SAMPLER_CHOICES),
        help=f"comma-separated samplers; {GREEDY} is the confidence sampler without noise on its order "
        f"(default: {','.join(SAMPLER_CHOICES)})",
    )
    parser.add_argument("--modalities", default=",".join(MODALITIES), help="comma-separated: image, text or both (default: image,text)")
    parser.add_argument("--samples", type=positive_int, default=64, help="samples per sampler and step count, and size of each held-out draw (default: 64)")
    parser.add_argument("--batch", type=positive_int, default=16, help="samples per generate call, as timed (default: 16)")
    parser.add_argument("--threads", type=positive_int, default=1, help="CPU threads for torch (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out draw, k-means and sampling (default: 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of Markdown tables")
    arguments = parser.parse_args(argv)
    modalities = [item.strip() for item in arguments.modalities.split(",")]
    unknown = [modality for modality in modalities if modality not in MODALITIES]
    if unknown or not modalities:
        parser.error(f"--modalities: unknown modality {', '.join(map(repr, unknown))}; choose from {', '.join(MODALITIES)}")
    if not arguments.data.is_dir():
        parser.error(f"--data: folder {arguments.data} not found")

    torch.set_num_threads(arguments.threads)
    pipeline = api.load_pipeline(arguments.model, "cpu")
    report = {
        "model": arguments.model,
        "command": " ".join(sys.argv),
        "environment": environment(arguments.threads),
        "samples": arguments.samples,
        "batch": arguments.batch,
        "seed": arguments.seed,
        "modalities": {modality: benchmark_modality(pipeline, modality, arguments) for modality in modalities},
    }
    if arguments.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_table(report)


if __name__ == "__main__":
    main()
