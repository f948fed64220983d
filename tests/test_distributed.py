"""Data-parallel training with two gloo processes on the CPU, compared with one process.

The two processes rendezvous on 127.0.0.1 and gloo is bound to the loopback interface,
so nothing leaves the machine. Both run several tiny trainings in one process group (one
spawn costs seconds of imports), save their results, and the tests compare them with the
same trainings run here in one process.

Tolerance: with the same seed and global batch, one and two processes differ only by the
order in which gradients are summed, about 1e-7 relative. The per-step losses must agree
within ``LOSS_TOLERANCE`` relative. AdamW divides each update by the running gradient
magnitude. A bias followed by GroupNorm has a zero gradient in exact arithmetic, so its
gradient is rounding noise, and the two runs can move it by up to the learning rate per
step in different directions. So every weight must agree within ``lr x steps``, and at
least ``CLOSE_SHARE`` of them within ``WEIGHT_TOLERANCE``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.multiprocessing

from conftest import Interrupted, draw_picture, interrupt_at, write_tones
from mmtok.tokens import TokenSpace
from mmtok.train.generator import train_generator
from mmtok.train.loop import TrainingRun

WORLD_SIZE = 2
WEIGHT_TOLERANCE = 1e-5
CLOSE_SHARE = 0.95
LOSS_TOLERANCE = 1e-5
# Learning rates the trainings below use: train_chain's, and the image trainer's default.
CHAIN_LR = 1e-3
IMAGE_LR = 2e-3
GENERATOR_ARGUMENTS = {"dim": 16, "depth": 1, "heads": 2}
# A tiny image tokenizer with a finite scalar quantizer, whose codes do not depend on
# codebook state, so one and two processes must train it alike.
FSQ_IMAGE = {"resolution": 16, "channels": [4, 8], "latent_dim": 4, "codebook_size": 16,
             "quantizer_type": "fsq", "fsq_levels": [4, 4]}
# The same with the EMA vector quantizer: k-means++ seeding and restarts draw from rank 0's
# part of the batch, so only the equality of the codebooks across ranks is checked.
VQ_IMAGE = {"resolution": 16, "channels": [4, 8], "latent_dim": 4, "codebook_size": 16}
TINY_AUDIO = {"architecture": "seanet", "channels": [4, 8, 8, 16, 16], "strides": [4, 4, 4, 5], "dilations": [1],
              "bottleneck_dilations": [1, 3], "latent_dim": 8, "codebook_size": 32, "levels": 3}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def chain_data() -> tuple[list, TokenSpace]:
    generator = torch.Generator().manual_seed(3)
    examples = [[("chain", torch.randint(0, 12, (16,), generator=generator))] for _ in range(24)]
    space = TokenSpace([{"modality": "chain", "tokenizer": "random", "tokenizer_hash": "0", "size": 12}])
    return examples, space


def train_chain(output: Path, steps: int = 4, resume: bool = False) -> torch.nn.Module:
    examples, space = chain_data()
    return train_generator(
        examples, space, {"chain": 16}, output, steps=steps, batch_size=6, lr=CHAIN_LR, checkpoint_every=2,
        model_args=GENERATOR_ARGUMENTS, device="cpu", resume=resume,
    )


def recorded_losses(monkeypatch_target: list) -> None:
    """Make every TrainingRun append its logged loss to ``monkeypatch_target``."""
    original = TrainingRun.log_scalars

    def log_scalars(self, values):
        if "loss" in values:
            monkeypatch_target.append(values["loss"])
        return original(self, values)

    TrainingRun.log_scalars = log_scalars


def save_state(model: torch.nn.Module, path: Path) -> None:
    safetensors.torch.save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(path))


def run_rank(rank: int, port: int, root: Path) -> None:
    """Train every case of this file in a process group of WORLD_SIZE ranks; save the results."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
    )
    torch.set_num_threads(1)
    from mmtok.train import distributed
    from mmtok_audio.train import train_audio_tokenizer
    from mmtok_image.train import train_image_tokenizer

    losses: list[float] = []
    recorded_losses(losses)
    out = root / f"rank{rank}"
    out.mkdir()

    save_state(train_chain(root / "chain"), out / "chain.safetensors")
    (out / "chain-losses.json").write_text(json.dumps(losses))

    undo = interrupt_at(3)
    try:
        train_chain(root / "chain-resumed")
    except Interrupted:
        pass
    undo()
    save_state(train_chain(root / "chain-resumed", resume=True), out / "chain-resumed.safetensors")

    losses.clear()
    image_options = {"steps": 3, "batch_size": 4, "checkpoint_every": 3, "device": "cpu"}
    fsq = train_image_tokenizer(root / "images", root / "fsq", model_args=FSQ_IMAGE, **image_options)
    save_state(fsq, out / "fsq.safetensors")
    (out / "fsq-losses.json").write_text(json.dumps(losses))
    save_state(train_image_tokenizer(root / "images", root / "vq", model_args=VQ_IMAGE, **image_options),
               out / "vq.safetensors")

    audio = train_audio_tokenizer(
        root / "audio", root / "audio-run", steps=4, batch_size=4, segment_seconds=0.2, checkpoint_every=4,
        model_args=TINY_AUDIO, quantizer_dropout=0.5, device="cpu", command="test",
    )
    save_state(audio, out / "audio.safetensors")
    distributed.shutdown()
    leave_together(rank, root)


def leave_together(rank: int, root: Path, timeout: float = 60.0) -> None:
    """Keep rank 0 alive until every rank has shut down.

    Rank 0 hosts the rendezvous store. When it exits while another rank is still closing
    its process group, that rank aborts with "terminate called without an active exception".
    """
    (root / f"rank{rank}" / "done").touch()
    if rank != 0:
        return
    deadline = time.monotonic() + timeout
    while not all((root / f"rank{other}" / "done").exists() for other in range(WORLD_SIZE)):
        if time.monotonic() > deadline:
            raise TimeoutError("the other ranks did not finish shutting down")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """Run :func:`run_rank` in two spawned processes; return the folder with their results."""
    root = tmp_path_factory.mktemp("two-ranks")
    for split, count in (("train", 6), ("val", 2)):
        (root / "images" / split).mkdir(parents=True)
        for index in range(count):
            draw_picture(root / "images" / split / f"{index}.png", (20 + 3 * index, 16 + 2 * index))
        write_tones(root / "audio" / "audio" / split, count)
    torch.multiprocessing.spawn(run_rank, args=(free_port(), root), nprocs=WORLD_SIZE, join=True)
    return root


def load(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def assert_weights_close(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], lr: float, steps: int) -> None:
    """Check the tolerance that the module docstring states."""
    assert first.keys() == second.keys()
    differences = torch.cat([(first[name].double() - second[name].double()).abs().flatten() for name in first])
    assert float(differences.max()) <= lr * steps
    assert float((differences <= WEIGHT_TOLERANCE).double().mean()) >= CLOSE_SHARE


def test_generator_two_ranks_match_one_rank(two_ranks, tmp_path):
    losses: list[float] = []
    original = TrainingRun.log_scalars
    recorded_losses(losses)
    try:
        single = train_chain(tmp_path / "single")
    finally:
        TrainingRun.log_scalars = original
    parallel = load(two_ranks / "rank0" / "chain.safetensors")

    assert_weights_close(parallel, single.state_dict(), CHAIN_LR, steps=4)
    parallel_losses = json.loads((two_ranks / "rank0" / "chain-losses.json").read_text())
    assert parallel_losses == pytest.approx(losses, rel=LOSS_TOLERANCE)


def test_generator_ranks_hold_equal_weights(two_ranks):
    first = load(two_ranks / "rank0" / "chain.safetensors")
    second = load(two_ranks / "rank1" / "chain.safetensors")
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name


def test_generator_two_rank_resume_is_exact(two_ranks):
    straight = load(two_ranks / "rank0" / "chain.safetensors")
    resumed = load(two_ranks / "rank0" / "chain-resumed.safetensors")
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name


def test_only_rank_zero_writes(two_ranks):
    assert (two_ranks / "chain" / "model.safetensors").is_file()
    assert [path.name for path in (two_ranks / "chain" / "checkpoint").iterdir()] == ["step-000000004"]


def test_fsq_image_tokenizer_two_ranks_match_one_rank(two_ranks, tmp_path):
    from mmtok_image.train import train_image_tokenizer

    losses: list[float] = []
    original = TrainingRun.log_scalars
    recorded_losses(losses)
    try:
        single = train_image_tokenizer(
            two_ranks / "images", tmp_path / "fsq", model_args=FSQ_IMAGE, steps=3, batch_size=4,
            checkpoint_every=3, device="cpu",
        )
    finally:
        TrainingRun.log_scalars = original

    assert_weights_close(load(two_ranks / "rank0" / "fsq.safetensors"), single.state_dict(), IMAGE_LR, steps=3)
    parallel_losses = json.loads((two_ranks / "rank0" / "fsq-losses.json").read_text())
    assert parallel_losses == pytest.approx(losses, rel=LOSS_TOLERANCE)


@pytest.mark.parametrize("name", ["vq", "audio"])
def test_codebooks_equal_across_ranks(two_ranks, name):
    first = load(two_ranks / "rank0" / f"{name}.safetensors")
    second = load(two_ranks / "rank1" / f"{name}.safetensors")
    buffers = [key for key in first if key.startswith("quantizer.")]
    assert any(key.endswith("codebook") for key in buffers)
    for key in buffers:
        assert torch.equal(first[key], second[key]), key
    for key, tensor in first.items():
        assert torch.equal(tensor, second[key]), key


def test_codebooks_trained_under_two_ranks(two_ranks):
    state = load(two_ranks / "rank0" / "vq.safetensors")
    assert bool(state["quantizer.initialized"])


def test_batch_smaller_than_world_rejected():
    from mmtok.errors import MmtokError
    from mmtok.train.distributed import Context, local_rows

    with pytest.raises(MmtokError, match="smaller than the 4 processes"):
        local_rows(3, Context(0, 4, 0, torch.device("cpu")))


def test_local_rows_cover_batch_once():
    from mmtok.train.distributed import Context, local_rows

    parts = [local_rows(10, Context(rank, 3, rank, torch.device("cpu"))) for rank in range(3)]
    covered = [row for part in parts for row in range(10)[part]]
    assert covered == list(range(10))


# torchrun, as a user runs it -------------------------------------------------------------


def test_torchrun_cli_matches_one_process(tmp_path):
    """``torchrun --nproc_per_node 2 mmtok train tokenizer`` trains as one process does."""
    from click.testing import CliRunner

    from mmtok.cli import cli

    for split, count in (("train", 6), ("val", 2)):
        (tmp_path / "images" / split).mkdir(parents=True)
        for index in range(count):
            draw_picture(tmp_path / "images" / split / f"{index}.png", (20 + 3 * index, 16 + 2 * index))
    arguments = ["train", "tokenizer", "--modality", "image", "--data", str(tmp_path / "images"), "--steps", "2",
                 "--batch-size", "4", "--threads", "1", "--device", "cpu"]
    for key, value in FSQ_IMAGE.items():
        arguments += ["--model-arg", f"{key}={json.dumps(value)}"]

    single = CliRunner().invoke(cli, arguments + ["--output", str(tmp_path / "single")], catch_exceptions=False)
    assert single.exit_code == 0, single.output
    environment = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(WORLD_SIZE),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                "--no-python", str(Path(sys.executable).parent / "mmtok")]
    process = subprocess.run(
        launcher + arguments + ["--output", str(tmp_path / "parallel")], capture_output=True, text=True,
        env=environment, timeout=300,
    )

    assert process.returncode == 0, process.stderr
    assert process.stderr.count("saved ImageTokenizer") == 1
    single_state = load(tmp_path / "single" / "model.safetensors")
    assert_weights_close(load(tmp_path / "parallel" / "model.safetensors"), single_state, IMAGE_LR, steps=2)
