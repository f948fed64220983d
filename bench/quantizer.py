"""Benchmark nearest-code search: mmtok's VectorQuantizer against a peer library and a naive search.

All methods run in this one process, on the same inputs and device, in eval mode:

- ``mmtok``: ``mmtok.quantize.VectorQuantizer`` forward (chunked float32 search, lookup,
  usage statistics).
- ``vector-quantize-pytorch``: ``vector_quantize_pytorch.VectorQuantize`` with the
  rotation trick off and the same codebook, forward in eval mode. Install it with
  ``pip install 'mmtok[bench]'``. Without it the row is left out.
- ``naive``: one matrix product for the whole ``N x K`` distance matrix, then argmin.
- with ``--chunk-rows``: ``mmtok.quantize.nearest_codes`` alone, at each given number of
  rows per chunk.

The methods are timed in rounds, each round running every method once, together with a
large square float32 matrix product as the reference rate, so that a busy moment on a
shared machine hits all of them alike. Each row reports the best time over the rounds
and that time relative to mmtok's. It also reports the rate of the distance product
(``2 N K D`` FLOPs over the time) and that rate as a fraction of the square product's
rate in the same rounds. The last columns are the peak memory that the method's tensors
took and the fraction of codes equal to mmtok's.

Usage::

    python bench/quantizer.py [--device cpu|cuda] [--threads 1] [--chunk-rows 64 256 1024] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from mmtok.quantize import VectorQuantizer, nearest_codes

try:
    from vector_quantize_pytorch import VectorQuantize
except ImportError:  # the bench extra is not installed
    VectorQuantize = None

SQUARE = "square float32 matmul"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_times(runs: dict[str, Callable[[], object]], device: torch.device, rounds: int) -> dict[str, float]:
    """Return the shortest wall-clock seconds of each run over ``rounds`` rounds, after one warm-up round."""
    best = {name: float("inf") for name in runs}
    for round_index in range(rounds + 1):
        for name, run in runs.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            if round_index > 0:
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def peak_memory(run: Callable[[], object], device: torch.device) -> int:
    """Return the peak bytes of tensor memory that one call of ``run`` allocated.

    On CUDA this is the caching allocator's peak above the memory allocated before. On CPU
    it replays the allocations and frees that the torch profiler records, op by op, so
    it counts tensors only, not memory that libraries allocate internally.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        run()
    live = peak = 0
    # An op event carries the net bytes that the op itself allocated, and a "[memory]"
    # event carries the negative bytes of a free.
    for event in sorted(profiler.events(), key=lambda event: event.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def naive_codes(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Materialise the whole ``N x K`` squared-distance matrix and take its argmin."""
    distances = vectors.pow(2).sum(1, keepdim=True) - 2 * vectors @ codebook.t() + codebook.pow(2).sum(1)  # (N, K)
    return distances.argmin(dim=1)


def make_methods(
    vectors: torch.Tensor, codebook: torch.Tensor, chunk_rows: list[int]
) -> dict[str, Callable[[], torch.Tensor]]:
    """Build one zero-argument encode function per method, each returning ``(N,)`` codes."""
    count, dim = vectors.shape
    size = codebook.shape[0]
    device = vectors.device

    ours = VectorQuantizer(dim, size).to(device).eval()
    ours.codebook.copy_(codebook)
    ours.initialized.fill_(True)
    methods = {"mmtok": lambda: ours(vectors).codes}
    for rows in chunk_rows:
        methods[f"mmtok search, {rows} rows per chunk"] = lambda rows=rows: nearest_codes(vectors, codebook, rows)

    if VectorQuantize is not None:
        peer = VectorQuantize(dim=dim, codebook_size=size, rotation_trick=False, kmeans_init=False).to(device).eval()
        peer.codebook = codebook
        batch = vectors.unsqueeze(0)  # (1, N, D): the peer expects a batch axis
        methods["vector-quantize-pytorch"] = lambda: peer(batch)[1].view(count)

    methods["naive"] = lambda: naive_codes(vectors, codebook)
    return methods


def square_matmul(device: torch.device) -> tuple[int, Callable[[], object]]:
    """Return the side of the reference square product and a function that runs it."""
    side = 4096 if device.type == "cpu" else 8192
    generator = torch.Generator(device=device).manual_seed(0)
    left = torch.randn(side, side, device=device, generator=generator)
    right = torch.randn(side, side, device=device, generator=generator)
    output = torch.empty(side, side, device=device)
    return side, lambda: torch.mm(left, right, out=output)


def run_case(count: int, dim: int, size: int, device: torch.device, rounds: int, chunk_rows: list[int]) -> list[dict]:
    """Time every method on one random problem, returning one row per method: mmtok first, the square product last."""
    generator = torch.Generator(device=device).manual_seed(size)
    vectors = torch.randn(count, dim, device=device, generator=generator)
    codebook = torch.randn(size, dim, device=device, generator=generator)
    side, square = square_matmul(device)
    flops = 2 * count * size * dim
    with torch.no_grad():
        methods = make_methods(vectors, codebook, chunk_rows)
        reference = methods["mmtok"]()
        seconds = best_times(methods | {SQUARE: square}, device, rounds)
        square_rate = 2 * side**3 / seconds[SQUARE]
        rows = []
        for name, encode in methods.items():
            rate = flops / seconds[name]
            rows.append(
                {
                    "N": count,
                    "D": dim,
                    "K": size,
                    "method": name,
                    "seconds": seconds[name],
                    "time_vs_mmtok": seconds[name] / seconds["mmtok"],
                    "gflops": rate / 1e9,
                    "fraction_of_square_matmul": rate / square_rate,
                    "peak_memory_mib": peak_memory(encode, device) / 2**20,
                    "same_codes_as_mmtok": float((encode() == reference).float().mean()),
                }
            )
    rows.append(
        {
            "N": count,
            "D": dim,
            "K": size,
            "method": f"{SQUARE} {side}^3",
            "seconds": seconds[SQUARE],
            "gflops": square_rate / 1e9,
        }
    )
    return rows


def environment(device: torch.device, threads: int) -> dict:
    if device.type == "cuda":
        processor = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE) if cpuinfo.exists() else []
        processor = names[0] if names else platform.processor()
    try:
        from importlib.metadata import version

        peer_version = version("vector-quantize-pytorch")
    except Exception:  # not installed
        peer_version = None
    return {
        "device": str(device),
        "processor": processor,
        "threads": threads if device.type == "cpu" else None,
        "torch": torch.__version__,
        "vector_quantize_pytorch": peer_version,
    }


def print_table(info: dict, rows: list[dict]) -> None:
    print(
        f"{info['device']} ({info['processor']}), threads {info['threads']}, torch {info['torch']}, "
        f"vector-quantize-pytorch {info['vector_quantize_pytorch']}"
    )
    print()
    print(
        "| N | D | K | method | time (ms) | time vs mmtok | GFLOP/s | of square matmul | peak memory (MiB) "
        "| same codes |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "time_vs_mmtok" not in row:  # the reference product
            print(
                f"| {row['N']} | {row['D']} | {row['K']} | {row['method']} | {row['seconds'] * 1000:.1f} | | "
                f"{row['gflops']:.1f} | 100% | | |"
            )
            continue
        print(
            f"| {row['N']} | {row['D']} | {row['K']} | {row['method']} | {row['seconds'] * 1000:.1f} | "
            f"{row['time_vs_mmtok']:.2f}x | {row['gflops']:.1f} | {row['fraction_of_square_matmul']:.0%} | "
            f"{row['peak_memory_mib']:.1f} | {row['same_codes_as_mmtok']:.4f} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device to run on, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default: 1)")
    parser.add_argument("--count", type=int, default=32768, help="vectors N to encode (default: 32768)")
    parser.add_argument("--dim", type=int, default=64, help="vector dimension D (default: 64)")
    parser.add_argument(
        "--codebook-sizes",
        type=int,
        nargs="+",
        default=[4096, 16384],
        help="codebook sizes K to run (default: 4096 16384)",
    )
    parser.add_argument(
        "--chunk-rows",
        type=int,
        nargs="*",
        default=[],
        help="also time mmtok's nearest_codes alone with these rows per chunk, to tune SEARCH_CHUNK_ROWS",
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="timed rounds, each running every method once (default: 5)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a Markdown table")
    args = parser.parse_args(argv)
    for name in ("threads", "count", "dim", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if any(value < 1 for value in args.codebook_sizes + args.chunk_rows):
        parser.error("--codebook-sizes and --chunk-rows must be at least 1")

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was requested, but torch finds no CUDA device")
    torch.set_num_threads(args.threads)

    rows = []
    for size in args.codebook_sizes:
        rows += run_case(args.count, args.dim, size, device, args.rounds, args.chunk_rows)
    info = environment(device, args.threads)

    if args.json:
        json.dump({"environment": info, "command": " ".join(sys.argv), "results": rows}, sys.stdout, indent=2)
        print()
    else:
        print_table(info, rows)


if __name__ == "__main__":
    main()
