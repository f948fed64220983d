"""mmtok encode-dataset: token shards, parallel workers, resuming after a kill, and training from shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import draw_picture
from mmtok import api
from mmtok.cli import cli
from mmtok.encode_dataset import encode_dataset
from mmtok.errors import MmtokError
from mmtok.shards import ShardDataset, index_path


def picture_tree(root: Path, count: int) -> list[str]:
    """Draw ``count`` pictures in nested folders plus files that must be skipped or fail; return the readable ones."""
    names = []
    for index in range(count):
        name = f"{'deep/er/' if index % 3 == 0 else 'flat/' if index % 3 == 1 else ''}p{index:03d}.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        draw_picture(root / name, (24 + index % 17, 20 + index % 11))
        names.append(name)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    draw_picture(root / ".hidden" / "skipped.png")
    return sorted(names)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("pictures")
    return root, picture_tree(root, 10)


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((folder / "shards").iterdir())}


def test_shards_hold_every_readable_file(tree, tmp_path):
    root, names = tree
    summary = encode_dataset(root, tmp_path / "out", "image", shard_size=4)
    dataset = ShardDataset(tmp_path / "out")

    assert [item.path for item in dataset] == names
    assert summary.encoded == len(names)
    assert summary.failed == 1
    assert summary.shards == 3


def test_shard_codes_equal_encode_file(tree, tmp_path):
    root, names = tree
    encode_dataset(root, tmp_path / "out", "image", shard_size=4)
    dataset = ShardDataset(tmp_path / "out")
    items = {item.path: item for item in dataset}

    for name in names[:3]:
        expected = api.encode_file(root / name)
        tokens = dataset.tokens(items[name])
        assert torch.equal(tokens.codes, expected.codes), name
        assert tokens.metadata == expected.metadata
        assert tokens.tokenizer_hash == expected.tokenizer_hash


def test_shard_tokens_decode(tree, tmp_path):
    root, _ = tree
    encode_dataset(root, tmp_path / "out", "image", shard_size=4)
    dataset = ShardDataset(tmp_path / "out")
    item = next(iter(dataset))

    sample = api.decode_tokens(dataset.tokens(item))

    assert tuple(sample.data.shape) == (3, item.metadata["height"], item.metadata["width"])


def test_ids_are_memory_mapped(tree, tmp_path):
    root, _ = tree
    encode_dataset(root, tmp_path / "out", "image", shard_size=4)
    item = next(iter(ShardDataset(tmp_path / "out")))

    assert isinstance(item.codes.base, np.memmap)
    assert item.codes.dtype == np.uint16


def test_error_report_names_file_and_reason(tree, tmp_path):
    root, _ = tree
    encode_dataset(root, tmp_path / "out", "image", shard_size=4)
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]

    assert [error["path"] for error in errors] == ["broken.png"]
    assert "broken.png: corrupt or truncated image" in errors[0]["error"]


def test_two_workers_write_same_shards(tree, tmp_path):
    root, _ = tree
    encode_dataset(root, tmp_path / "one", "image", shard_size=4, workers=1)
    encode_dataset(root, tmp_path / "two", "image", shard_size=4, workers=2)

    assert shard_bytes(tmp_path / "two") == shard_bytes(tmp_path / "one")


def test_rerun_encodes_nothing_twice(tree, tmp_path):
    root, _ = tree
    encode_dataset(root, tmp_path / "out", "image", shard_size=4)
    before = shard_bytes(tmp_path / "out")

    summary = encode_dataset(root, tmp_path / "out", "image", shard_size=4)

    assert summary.shards_encoded == 0
    assert summary.shards_done_before == 3
    assert shard_bytes(tmp_path / "out") == before


def test_jobs_split_the_shards(tree, tmp_path):
    root, names = tree
    first = encode_dataset(root, tmp_path / "out", "image", shard_size=2, job_index=0, num_jobs=2)
    with pytest.raises(MmtokError, match="3 of 6 shards are not complete"):
        ShardDataset(tmp_path / "out")
    second = encode_dataset(root, tmp_path / "out", "image", shard_size=2, job_index=1, num_jobs=2)

    assert (first.shards_encoded, second.shards_encoded) == (3, 3)
    assert [item.path for item in ShardDataset(tmp_path / "out")] == names


def test_new_files_become_new_shards(tmp_path):
    root = tmp_path / "pictures"
    names = picture_tree(root, 4)
    encode_dataset(root, tmp_path / "out", "image", shard_size=3)
    draw_picture(root / "a-new.png")

    summary = encode_dataset(root, tmp_path / "out", "image", shard_size=3)

    assert summary.shards_encoded == 1
    assert [item.path for item in ShardDataset(tmp_path / "out")] == names + ["a-new.png"]


def test_other_tokenizer_rejected_on_rerun(tree, tmp_path):
    from mmtok_image import ImageTokenizer

    root, _ = tree
    encode_dataset(root, tmp_path / "out", "image", shard_size=4)
    other = tmp_path / "other-tokenizer"
    ImageTokenizer(resolution=16, channels=[4, 8], latent_dim=4, codebook_size=16).save_pretrained(other)

    with pytest.raises(MmtokError, match="encoded with tokenizer weights"):
        encode_dataset(root, tmp_path / "out", "image", str(other), shard_size=4)


def test_other_shard_size_rejected_on_rerun(tree, tmp_path):
    root, _ = tree
    encode_dataset(root, tmp_path / "out", "image", shard_size=4)

    with pytest.raises(MmtokError, match="encoded with shard size 4, not 5"):
        encode_dataset(root, tmp_path / "out", "image", shard_size=5)


def test_encode_options_reach_every_file(tree, tmp_path):
    root, names = tree
    encode_dataset(root, tmp_path / "out", "image", shard_size=4, options={"resize": "pad"})
    items = {item.path: item for item in ShardDataset(tmp_path / "out")}

    for name in names[:3]:
        expected = api.encode_file(root / name, options={"resize": "pad"})
        tokens = ShardDataset(tmp_path / "out").tokens(items[name])
        assert torch.equal(tokens.codes, expected.codes), name
        assert tokens.metadata["resize"] == "pad"


def test_other_encode_options_rejected_on_rerun(tree, tmp_path):
    root, _ = tree
    encode_dataset(root, tmp_path / "out", "image", shard_size=4, options={"resize": "crop"})

    with pytest.raises(MmtokError, match="encoded with encode options {'resize': 'crop'}, not {}"):
        encode_dataset(root, tmp_path / "out", "image", shard_size=4)


def test_unknown_encode_option_rejected(tree, tmp_path):
    root, _ = tree
    result = CliRunner().invoke(
        cli, ["encode-dataset", str(root), str(tmp_path / "out"), "--modality", "image", "--option", "levels=2"]
    )

    assert result.exit_code == 1
    assert "has no encode option 'levels'" in result.output
    assert not (tmp_path / "out").exists()


def test_tampered_shard_index_rejected(tree, tmp_path):
    root, _ = tree
    encode_dataset(root, tmp_path / "out", "image", shard_size=4)
    index = index_path(tmp_path / "out", 0)
    rows = [json.loads(line) for line in index.read_text().splitlines()]
    rows[1]["shape"] = [9, 9]
    index.write_text("".join(json.dumps(row) + "\n" for row in rows))

    with pytest.raises(MmtokError, match=r"has shape \(9, 9\), but 256 ids"):
        list(ShardDataset(tmp_path / "out"))


def test_cli_shows_progress_and_summary(tree, tmp_path):
    root, names = tree
    result = CliRunner().invoke(
        cli, ["encode-dataset", str(root), str(tmp_path / "out"), "--modality", "image", "--shard-size", "4"],
        catch_exceptions=False,
    )

    assert result.exit_code == 0, result.output
    assert "encoding image" in result.stderr
    assert f"encoded {len(names)} files into 3 shards" in result.stderr
    assert "errors.jsonl" in result.stderr
    assert result.stdout == ""


def test_cli_rejects_job_index_beyond_count(tree, tmp_path):
    root, _ = tree
    result = CliRunner().invoke(
        cli, ["encode-dataset", str(root), str(tmp_path / "out"), "--modality", "image", "--job-index", "2",
              "--num-jobs", "2"],
    )

    assert result.exit_code == 2
    assert "must be below --num-jobs" in result.output


def test_cli_old_job_option_names_still_work(tree, tmp_path):
    root, _ = tree
    result = CliRunner().invoke(
        cli, ["encode-dataset", str(root), str(tmp_path / "out"), "--modality", "image", "--shard-size", "2",
              "--shard-index", "1", "--num-shards", "2"],
        catch_exceptions=False,
    )

    assert result.exit_code == 0, result.output
    assert "encoded 5 files into 3 shards" in result.stderr
    assert index_path(tmp_path / "out", 1).is_file()
    assert not index_path(tmp_path / "out", 0).is_file()


def test_cli_help_hides_old_job_options():
    result = CliRunner().invoke(cli, ["encode-dataset", "--help"])

    assert "--num-jobs" in result.output
    assert "--num-shards" not in result.output
    assert "--shard-index" not in result.output


def test_cli_summary_uses_singular(tmp_path):
    root = tmp_path / "pictures"
    root.mkdir()
    draw_picture(root / "only.png")
    result = CliRunner().invoke(
        cli, ["encode-dataset", str(root), str(tmp_path / "out"), "--modality", "image"], catch_exceptions=False,
    )

    assert result.exit_code == 0, result.output
    assert "encoded 1 file into 1 shard in" in result.stderr
    assert "0 shards were already done" in result.stderr
    assert "has 1 shard for 1 file\n" in result.stderr


def test_dataset_length_counts_items(tree, tmp_path):
    root, names = tree
    encode_dataset(root, tmp_path / "out", "image", shard_size=4)
    dataset = ShardDataset(tmp_path / "out")

    assert len(dataset) == len(names)
    assert len(list(dataset)) == len(names)


def test_rerun_reports_failures_without_retrying(tree, tmp_path, caplog):
    root, _ = tree
    encode_dataset(root, tmp_path / "out", "image", shard_size=4)

    summary = encode_dataset(root, tmp_path / "out", "image", shard_size=4)

    assert summary.shards_encoded == 0
    assert summary.failed_before == 1
    assert "pass --retry-failed" in caplog.text


def test_retry_failed_encodes_fixed_file(tmp_path):
    root = tmp_path / "pictures"
    names = picture_tree(root, 10)
    output = tmp_path / "out"
    encode_dataset(root, output, "image", shard_size=4)
    before = shard_bytes(output)
    draw_picture(root / "broken.png")

    summary = encode_dataset(root, output, "image", shard_size=4, retry_failed=True)

    assert summary.shards_encoded == 1
    assert summary.shards_done_before + summary.shards_encoded == summary.shards
    assert (summary.encoded, summary.failed, summary.failed_before) == (4, 0, 0)
    assert (output / "errors.jsonl").read_text() == ""
    assert sorted(item.path for item in ShardDataset(output)) == sorted(names + ["broken.png"])
    changed = {name for name, data in shard_bytes(output).items() if before.get(name) != data}
    assert {name.split(".")[0] for name in changed} == {"shard-000000"}


def test_retry_failed_keeps_failure_that_remains(tree, tmp_path):
    root, _ = tree
    encode_dataset(root, tmp_path / "out", "image", shard_size=4)

    summary = encode_dataset(root, tmp_path / "out", "image", shard_size=4, retry_failed=True)

    assert (summary.shards_encoded, summary.failed) == (1, 1)
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert [error["path"] for error in errors] == ["broken.png"]


def test_rerun_warns_about_deleted_input(tmp_path, caplog):
    root = tmp_path / "pictures"
    names = picture_tree(root, 4)
    encode_dataset(root, tmp_path / "out", "image", shard_size=3)
    (root / names[0]).unlink()

    summary = encode_dataset(root, tmp_path / "out", "image", shard_size=3)

    assert summary.missing == 1
    assert f"no longer in the input folder (first: {names[0]})" in caplog.text
    assert names[0] in [item.path for item in ShardDataset(tmp_path / "out")]


def test_killed_run_resumes_without_loss_or_duplicates(tmp_path):
    """SIGKILL encode-dataset with two workers mid-run, run it again, and compare with an uninterrupted run."""
    root = tmp_path / "pictures"
    names = picture_tree(root, 48)
    output = tmp_path / "out"
    command = [sys.executable, "-m", "mmtok.cli", "encode-dataset", str(root), str(output), "--modality", "image",
               "--shard-size", "2", "--workers", "2"]
    # A new session, so that killing its process group also kills the workers, as a
    # scheduler that cancels the job does.
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        done = sum(index_path(output, index).is_file() for index in range(25))
        if done >= 3:
            break
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done_at_kill = sum(index_path(output, index).is_file() for index in range(25))
    assert 3 <= done_at_kill < 25

    summary = encode_dataset(root, output, "image", shard_size=2)
    encode_dataset(root, tmp_path / "straight", "image", shard_size=2)

    paths = [item.path for item in ShardDataset(output)]
    assert paths == names
    assert summary.shards_encoded == 25 - done_at_kill
    assert shard_bytes(output) == shard_bytes(tmp_path / "straight")
    assert sorted(path.name for path in (output / "shards").glob(".*")) == []


def worker_count(pid: int) -> int:
    """Return how many spawned multiprocessing children process ``pid`` has."""
    count = 0
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        # The second field of stat is "(name)", which may contain spaces, so the parent
        # id is read after its closing bracket.
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == pid and b"spawn_main" in command:
            count += 1
    return count


def process_group_exists(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("moment", ["worker start", "mid-run"])
def test_ctrl_c_exits_cleanly_and_resumes(tmp_path, moment):
    """SIGINT to encode-dataset's process group stops it with code 130 and no traceback; a rerun finishes."""
    root = tmp_path / "pictures"
    names = picture_tree(root, 48)
    output = tmp_path / "out"
    command = [sys.executable, "-m", "mmtok.cli", "encode-dataset", str(root), str(output), "--modality", "image",
               "--shard-size", "2", "--workers", "2"]
    # A new session, so that the signal goes to the workers too, as Ctrl-C in a terminal does.
    # A shell starts background jobs with SIGINT ignored, and the child would inherit that.
    # A Python-level handler here makes the child start with the default action instead.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, text=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if moment == "worker start" and worker_count(process.pid) == 2:
            break
        if moment == "mid-run" and sum(index_path(output, index).is_file() for index in range(25)) >= 3:
            break
        time.sleep(0.01)
    assert process.poll() is None, "encode-dataset finished before the signal"
    os.killpg(process.pid, signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f"encode-dataset did not exit within 60 s of SIGINT; stderr:\n{stderr}")

    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "Exception ignored" not in stderr
    assert "interrupted; rerun the same command to finish the remaining" in stderr
    deadline = time.monotonic() + 10
    while process_group_exists(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_group_exists(process.pid), "a worker outlived the main process"
    done_at_interrupt = sum(index_path(output, index).is_file() for index in range(25))
    assert done_at_interrupt < 25

    summary = encode_dataset(root, output, "image", shard_size=2)

    assert summary.shards_encoded == 25 - done_at_interrupt
    assert [item.path for item in ShardDataset(output)] == names
    assert sorted(path.name for path in (output / "shards").glob(".*")) == []


# Training from shards --------------------------------------------------------------------


def test_train_generator_from_shards(tree, tmp_path):
    root, _ = tree
    encode_dataset(root, tmp_path / "shards", "image", shard_size=4)
    result = CliRunner().invoke(
        cli,
        ["train", "generator", "--shards", f"image={tmp_path / 'shards'}", "--validation-shards",
         f"image={tmp_path / 'shards'}", "--output", str(tmp_path / "generator"), "--steps", "2",
         "--batch-size", "2", "--threads", "1", "--device", "cpu", "--model-arg", "dim=16", "--model-arg", "depth=1",
         "--model-arg", "heads=2"],
        catch_exceptions=False,
    )

    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "generator" / "config.json").read_text())
    assert [entry["modality"] for entry in config["token_space"]] == ["image"]
    assert config["token_space"][0]["tokenizer_hash"] == ShardDataset(tmp_path / "shards").tokenizer_hash
    assert "bits_per_token/image" in config["metrics"]


def test_train_generator_rejects_incomplete_shards(tree, tmp_path):
    root, _ = tree
    encode_dataset(root, tmp_path / "shards", "image", shard_size=4)
    index_path(tmp_path / "shards", 1).unlink()
    result = CliRunner().invoke(
        cli, ["train", "generator", "--shards", f"image={tmp_path / 'shards'}", "--output", str(tmp_path / "g"),
              "--steps", "1", "--device", "cpu"],
    )

    assert result.exit_code == 1
    assert "1 of 3 shards are not complete" in result.output


def test_train_generator_needs_data_or_shards(tmp_path):
    result = CliRunner().invoke(cli, ["train", "generator", "--output", str(tmp_path / "g")])

    assert result.exit_code == 2
    assert "give --data, --shards MODALITY=DIR, or both" in result.output
