"""Checkpoints survive crashes at any moment, and resuming continues bit for bit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from click.testing import CliRunner

from conftest import Interrupted, draw_picture, interrupt_at, write_tones
from mmtok.cli import cli
from mmtok.errors import MmtokError
from mmtok.train.checkpoint import STATE_FILE, WEIGHTS_FILE, latest_checkpoint, write_checkpoint


def write_step(folder: Path, step: int) -> None:
    safetensors.torch.save_file({"weight": torch.full((4,), float(step))}, str(folder / WEIGHTS_FILE))
    safetensors.torch.save_file({"state": torch.zeros(1)}, str(folder / STATE_FILE), metadata={"step": str(step)})


def saved_step(folder: Path) -> int:
    with safetensors.safe_open(str(folder / STATE_FILE), framework="pt") as handle:
        return int(handle.metadata()["step"])


# The checkpoint folder -------------------------------------------------------------------


def test_newest_checkpoint_wins(tmp_path):
    for step in (1, 2, 3):
        write_checkpoint(tmp_path, step, lambda folder, step=step: write_step(folder, step))

    folder = latest_checkpoint(tmp_path)

    assert folder.name == "step-000000003"
    assert [path.name for path in tmp_path.iterdir()] == ["step-000000003"]


def test_error_during_save_keeps_previous(tmp_path):
    write_checkpoint(tmp_path, 1, lambda folder: write_step(folder, 1))

    def failing_write(folder: Path) -> None:
        (folder / WEIGHTS_FILE).write_bytes(b"half a file")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(tmp_path, 2, failing_write)

    assert saved_step(latest_checkpoint(tmp_path)) == 1
    assert [path.name for path in tmp_path.iterdir()] == ["step-000000001"]


def test_process_death_during_save_keeps_previous(tmp_path):
    """A process that dies halfway through writing a checkpoint leaves the previous one loadable."""
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from test_checkpoint import write_step
        from mmtok.train.checkpoint import WEIGHTS_FILE, write_checkpoint

        folder = Path({str(tmp_path)!r})
        write_checkpoint(folder, 1, lambda target: write_step(target, 1))

        def dying_write(target):
            write_step(target, 2)
            data = (target / WEIGHTS_FILE).read_bytes()
            (target / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
            os._exit(9)

        write_checkpoint(folder, 2, dying_write)
        """
    )
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert process.returncode == 9, process.stderr

    assert saved_step(latest_checkpoint(tmp_path)) == 1
    leftovers = [path.name for path in tmp_path.iterdir() if path.name.startswith(".partial-")]
    assert len(leftovers) == 1

    write_checkpoint(tmp_path, 3, lambda folder: write_step(folder, 3))
    assert [path.name for path in tmp_path.iterdir()] == ["step-000000003"]


def test_same_step_from_earlier_run_replaced(tmp_path):
    write_checkpoint(tmp_path, 5, lambda folder: write_step(folder, 5))
    write_checkpoint(tmp_path, 5, lambda folder: write_step(folder, 50))

    assert saved_step(latest_checkpoint(tmp_path)) == 50
    assert [path.name for path in tmp_path.iterdir()] == ["step-000000005"]


def test_flat_layout_of_older_runs_loads(tmp_path):
    write_step(tmp_path, 7)

    assert latest_checkpoint(tmp_path) == tmp_path


def test_incomplete_checkpoint_folder_reported(tmp_path):
    (tmp_path / "step-000000004").mkdir()

    with pytest.raises(MmtokError, match="step-000000004: checkpoint is incomplete: model.safetensors, "):
        latest_checkpoint(tmp_path)


def test_empty_folder_has_no_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None


# Resuming the trainers -------------------------------------------------------------------


def resume_matches_straight_run(train, tmp_path: Path, stop: int) -> None:
    straight = train(tmp_path / "straight", False)
    undo = interrupt_at(stop)
    try:
        with pytest.raises(Interrupted):
            train(tmp_path / "resumed", False)
    finally:
        undo()
    resumed = train(tmp_path / "resumed", True)

    for (name, expected), actual in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(actual, expected), name


def test_image_tokenizer_resume_is_exact(tmp_path):
    from mmtok_image.train import train_image_tokenizer

    for split in ("train", "val"):
        (tmp_path / "data" / split).mkdir(parents=True)
        for index in range(4):
            draw_picture(tmp_path / "data" / split / f"{index}.png", (20 + 5 * index, 18))
    model_args = {"resolution": 16, "channels": [4, 8], "latent_dim": 4, "codebook_size": 16}

    def train(output: Path, resume: bool):
        return train_image_tokenizer(tmp_path / "data", output, steps=5, batch_size=3, checkpoint_every=2,
                                     model_args=model_args, resume=resume, device="cpu")

    resume_matches_straight_run(train, tmp_path, stop=3)


TINY_AUDIO = {
    "seanet": {"architecture": "seanet", "channels": [4, 8, 8, 16, 16], "strides": [4, 4, 4, 5], "dilations": [1],
               "bottleneck_dilations": [1, 3], "latent_dim": 8, "codebook_size": 32, "levels": 3},
    "spectral": {"architecture": "spectral", "width": 16, "encoder_blocks": 1, "decoder_blocks": 2, "latent_dim": 8,
                 "codebook_size": 32, "levels": 3},
    "harmonic": {"architecture": "harmonic", "width": 16, "encoder_blocks": 1, "decoder_blocks": 2, "latent_dim": 8,
                 "codebook_size": 32, "levels": 3},
}


@pytest.mark.parametrize("architecture", sorted(TINY_AUDIO))
def test_audio_tokenizer_resume_is_exact(tmp_path, architecture):
    from mmtok_audio.train import train_audio_tokenizer

    write_tones(tmp_path / "data" / "audio" / "train", 3)
    write_tones(tmp_path / "data" / "audio" / "val", 1)
    model_args = TINY_AUDIO[architecture]

    def train(output: Path, resume: bool):
        return train_audio_tokenizer(tmp_path / "data", output, steps=5, batch_size=2, segment_seconds=0.2,
                                     checkpoint_every=2, model_args=model_args, quantizer_dropout=0.5,
                                     resume=resume, device="cpu", command="test")

    resume_matches_straight_run(train, tmp_path, stop=3)


# Killing a training process --------------------------------------------------------------

FORTUNES = [f"Fortune number {index}: patience brings {index % 7} good things." for index in range(40)]


def text_data(root: Path) -> Path:
    folder = root / "data" / "text"
    folder.mkdir(parents=True)
    for split, rows in (("train", FORTUNES[:32]), ("val", FORTUNES[32:])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"text": row}) + "\n" for row in rows))
    return root / "data"


def generator_arguments(data: Path, output: Path, resume: bool) -> list[str]:
    arguments = ["train", "generator", "--data", str(data), "--modalities", "text", "--output", str(output),
                 "--steps", "40", "--batch-size", "4", "--checkpoint-every", "1", "--threads", "1", "--device", "cpu",
                 "--model-arg", "dim=16", "--model-arg", "depth=1", "--model-arg", "heads=2"]
    return arguments + (["--resume"] if resume else [])


def newest_step(checkpoint_dir: Path) -> int:
    """Return the highest step among the checkpoint folder names, reading no file a trainer may delete."""
    names = os.listdir(checkpoint_dir) if checkpoint_dir.is_dir() else []
    return max((int(name.split("-")[1]) for name in names if name.startswith("step-")), default=-1)


def saved_trainer_step(folder: Path) -> int:
    with safetensors.safe_open(str(folder / STATE_FILE), framework="pt") as handle:
        return int(json.loads(handle.metadata()["trainer"])["step"])


def test_killed_training_resumes_exactly(tmp_path):
    """SIGKILL a training process at random moments; every checkpoint loads and the end result is exact."""
    data = text_data(tmp_path)
    output = tmp_path / "killed"
    checkpoints = output / "checkpoint"
    moments = random.Random(8)
    kills = 0
    for attempt in range(3):
        before = newest_step(checkpoints)
        process = subprocess.Popen(
            [sys.executable, "-m", "mmtok.cli", *generator_arguments(data, output, resume=attempt > 0)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while newest_step(checkpoints) <= before and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(moments.uniform(0.0, 0.4))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()

        folder = latest_checkpoint(checkpoints)
        assert folder is not None
        safetensors.torch.load_file(str(folder / WEIGHTS_FILE))
        assert saved_trainer_step(folder) == int(folder.name.split("-")[1])
        assert newest_step(checkpoints) > before

    assert kills >= 1
    finished = CliRunner().invoke(cli, generator_arguments(data, output, resume=True), catch_exceptions=False)
    straight = CliRunner().invoke(cli, generator_arguments(data, tmp_path / "straight", resume=False),
                                  catch_exceptions=False)

    assert finished.exit_code == 0, finished.output
    assert straight.exit_code == 0, straight.output
    expected = safetensors.torch.load_file(str(tmp_path / "straight" / WEIGHTS_FILE))
    actual = safetensors.torch.load_file(str(output / WEIGHTS_FILE))
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name
    assert os.listdir(checkpoints) == ["step-000000040"]
