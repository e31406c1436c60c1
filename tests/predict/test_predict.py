"""rmt-predict end to end: real Pillow-made JPEG/PNG files (and broken ones), the trained Shapes10 model,
the real CLI in worker processes, killed runs resumed, tar shards, list files, and a real local Ray cluster."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from rmt_deploy import create_model
from rmt_deploy.preprocess import decode_image, preprocess
from rmt_deploy.predict.cli import main
from rmt_deploy.predict.output import part_files
from rmt_deploy.runners import open_runner

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures"     # ../shared beside the checkout
CONFIG, CHECKPOINT = FIXTURES / "shapes10_config.json", FIXTURES / "shapes10_rmt_tiny.pth"
pytestmark = pytest.mark.skipif(not CHECKPOINT.is_file(), reason=f"trained fixture missing: {CHECKPOINT}")
MODEL_ARGS = ["--model", str(CONFIG), "--checkpoint", str(CHECKPOINT), "--image-size", "96"]
BROKEN = ("broken/not_an_image.jpg", "broken/truncated.png")


def _write_images(folder: Path, per_class: int) -> list[Path]:
    """``per_class`` images of every Shapes10 class, alternately re-encoded by Pillow as JPEG and PNG
    (and some enlarged, so resizing happens), plus two broken files."""
    from PIL import Image
    written = []
    for class_dir in sorted(p for p in (FIXTURES / "shapes10_val").iterdir() if p.is_dir()):
        for i, src in enumerate(sorted(class_dir.glob("*.png"))[:per_class]):
            img = Image.open(src).convert("RGB")
            if i % 3 == 2:
                img = img.resize((200, 160), Image.BICUBIC)
            suffix = ".jpg" if i % 2 else ".png"
            dest = folder / class_dir.name / f"{src.stem}{suffix}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            img.save(dest, quality=92) if suffix == ".jpg" else img.save(dest)
            written.append(dest)
    (folder / "broken").mkdir()
    (folder / BROKEN[0]).write_bytes(b"this is not a JPEG at all")
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(png, "PNG")
    (folder / BROKEN[1]).write_bytes(png.getvalue()[:60])
    return written + [folder / b for b in BROKEN]


def _rows(output: Path) -> dict[str, dict]:
    table = pq.read_table(output)
    rows = table.to_pylist()
    assert len(rows) == len({r["path"] for r in rows}), "a path was written twice"
    return {r["path"]: r for r in rows}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    return _write_images(tmp_path_factory.mktemp("images"), per_class=3)


@pytest.fixture(scope="module")
def eager_model():
    return create_model(str(CONFIG), checkpoint=str(CHECKPOINT))


@pytest.fixture(scope="module")
def local_output(images, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("local") / "out.parquet"
    folder = images[0].parent.parent
    assert main([*MODEL_ARGS, "--data", str(folder), "--output", str(output), "--batch-size", "4",
                 "--workers", "2", "--top-k", "3", "--embeddings"]) == 0
    return output


@pytest.fixture(scope="module")
def local_run(local_output) -> dict[str, dict]:
    return _rows(local_output)


def test_one_row_per_file_broken_files_with_their_error(images, local_run):
    assert set(local_run) == {str(p) for p in images}
    for name in BROKEN:
        row = next(r for path, r in local_run.items() if path.endswith(name))
        assert row["error"] and row["top1"] is None and row["topk_indices"] is None
    good = [r for r in local_run.values() if r["error"] is None]
    assert len(good) == len(images) - 2
    assert all(len(r["topk_indices"]) == 3 and len(r["topk_scores"]) == 3 for r in good)


def test_top1_scores_and_embedding_equal_the_eager_runner(images, local_run, eager_model):
    """Same preprocessing and runner as the server: the eager runner on the same decoded files agrees."""
    paths = [p for p in images if local_run[str(p)]["error"] is None]
    batch = np.stack([preprocess(decode_image(p.read_bytes()), 96) for p in paths])
    runner = open_runner("eager", model=eager_model).load()
    logits = runner.infer({"images": batch})["logits"]
    with torch.inference_mode():
        embedding = eager_model.forward_head(eager_model.forward_features(torch.from_numpy(batch)), pre_logits=True)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for i, path in enumerate(paths):
        row = local_run[str(path)]
        assert row["top1"] == int(np.argmax(logits[i])), path
        assert row["top1_label"] == str(row["top1"])
        np.testing.assert_allclose(row["topk_scores"][0], probs[i].max(), rtol=1e-4)
        np.testing.assert_allclose(row["embedding"], embedding[i].numpy(), rtol=1e-4, atol=1e-5)
    # the trained model: the class folder is the right answer for nearly every image
    correct = sum(local_run[str(p)]["top1"] == sorted({q.parent.name for q in paths}).index(p.parent.name)
                  for p in paths)
    assert correct >= 0.9 * len(paths)


def test_list_file_and_tar_shards_give_the_same_rows(images, local_run, tmp_path):
    good = [p for p in images if local_run[str(p)]["error"] is None][:12]
    listing = tmp_path / "list.txt"
    listing.write_text("# images to label\n" + "\n".join(os.path.relpath(p, tmp_path) for p in good) + "\n\n")
    shards = tmp_path / "shards"
    shards.mkdir()
    for n, part in enumerate((good[:6], good[6:])):
        with tarfile.open(shards / f"shard-{n:04d}.tar", "w") as tar:
            for i, p in enumerate(part):
                tar.add(p, arcname=f"sample{n}{i:03d}{p.suffix}")
                label = tmp_path / "label.cls"
                label.write_text(p.parent.name)
                tar.add(label, arcname=f"sample{n}{i:03d}.cls")
            tar.add(label, arcname="textonly.cls")      # a sample without an image keeps its row
    for data, name in ((listing, "list"), (shards / "*.tar", "tar")):
        output = tmp_path / f"{name}.parquet"
        assert main([*MODEL_ARGS, "--data", str(data), "--output", str(output), "--workers", "1", "--top-k", "3"]) == 0
        rows = _rows(output)
        if name == "list":
            assert [rows[str(tmp_path / os.path.relpath(p, tmp_path))]["top1"] for p in good] == \
                   [local_run[str(p)]["top1"] for p in good]
        else:
            members = [f"{shards}/shard-{n:04d}.tar/sample{n}{i:03d}{p.suffix}"
                       for n, part in enumerate((good[:6], good[6:])) for i, p in enumerate(part)]
            assert [rows[m]["top1"] for m in members] == [local_run[str(p)]["top1"] for p in good]
            assert len(rows) == 14 and rows[f"{shards}/shard-0000.tar/textonly"]["error"].startswith("sample has no")


def _start(data: Path, output: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rmt_deploy.predict.cli", *MODEL_ARGS, "--data", str(data), "--output", str(output),
           "--batch-size", "1", "--rows-per-file", "3", "--workers", "1", "--threads", "1", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_when_written(proc: subprocess.Popen, output: Path, parts: int, sig: int) -> None:
    deadline = time.monotonic() + 180
    while len(part_files(output)) < parts:
        assert proc.poll() is None, f"finished before it could be killed: {proc.stdout.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "no part files within 180 s"
        time.sleep(0.02)
    os.killpg(proc.pid, sig)          # the whole job: the CLI and its decoding workers
    proc.wait(timeout=60)


@pytest.mark.slow
def test_killed_runs_resume_without_losing_or_repeating(tmp_path, local_run):
    images = _write_images(tmp_path / "images", per_class=12)
    output = tmp_path / "out.parquet"
    _kill_when_written(_start(tmp_path / "images", output), output, 2, signal.SIGKILL)
    after_kill = _rows(output)
    assert 0 < len(after_kill) < len(images)
    proc = _start(tmp_path / "images", output, "--resume")
    _kill_when_written(proc, output, len(part_files(output)) + 2, signal.SIGTERM)
    assert proc.returncode == 130, proc.stdout.read().decode()[-2000:]        # SIGTERM: rows so far written
    after_term = _rows(output)
    assert len(after_kill) < len(after_term) < len(images)
    finish = _start(tmp_path / "images", output, "--resume")
    out, _ = finish.communicate(timeout=300)
    assert finish.returncode == 0, out.decode()[-2000:]
    rows = _rows(output)          # asserts no path twice
    assert set(rows) == {str(p) for p in images}
    assert sum(r["error"] is not None for r in rows.values()) == 2
    assert not list(output.glob(".tmp-*"))


def test_existing_output_needs_resume_and_nothing_changes(images, tmp_path, capsys):
    output = tmp_path / "out.parquet"
    args = [*MODEL_ARGS, "--data", str(images[0].parent), "--output", str(output), "--workers", "0"]
    assert main(args) == 0
    before = sorted(p.name for p in output.iterdir())
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert sorted(p.name for p in output.iterdir()) == before
    assert main([*args, "--resume"]) == 0                 # nothing left to do: no new part
    assert sorted(p.name for p in output.iterdir()) == before


def test_features_pooled_one_column_per_stage(images, tmp_path):
    output = tmp_path / "features.parquet"
    assert main([*MODEL_ARGS, "--data", str(images[0].parent), "--output", str(output), "--workers", "0",
                 "--features-pooled"]) == 0
    table = pq.read_table(output)
    assert table.column_names == ["path", "stage1", "stage2", "stage3", "stage4", "error"]
    assert [len(table.column(f"stage{i}")[0].as_py()) for i in range(1, 5)] == [32, 64, 128, 256]


@pytest.mark.slow
def test_onnxruntime_backend_exports_with_the_embedding(images, local_run, tmp_path):
    output = tmp_path / "ort.parquet"
    assert main([*MODEL_ARGS, "--data", str(images[0].parent.parent), "--output", str(output), "--workers", "1",
                 "--backend", "onnxruntime", "--embeddings", "--top-k", "3", "--batch-size", "4",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    rows = _rows(output)
    assert set(rows) == set(local_run)
    for path, row in rows.items():
        assert row["top1"] == local_run[path]["top1"] and row["error"] == local_run[path]["error"]
        if row["error"] is None:
            np.testing.assert_allclose(row["embedding"], local_run[path]["embedding"], rtol=1e-3, atol=1e-4)


def test_ray_missing_says_how_to_install(images, tmp_path):
    code = ("import sys; sys.modules['ray'] = None; from rmt_deploy.predict.cli import main; "
            f"sys.exit(main({[*MODEL_ARGS, '--data', str(images[0].parent), '--output', str(tmp_path / 'o'), '--ray']!r}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "pip install 'rmt-deploy[ray]'" in done.stderr


@pytest.mark.slow
def test_ray_two_actors_give_the_same_rows(images, local_output, local_run, tmp_path):
    pytest.importorskip("ray.data", reason="the ray extra is not installed")
    output = tmp_path / "ray.parquet"
    cmd = [sys.executable, "-m", "rmt_deploy.predict.cli", *MODEL_ARGS, "--data", str(images[0].parent.parent),
           "--output", str(output), "--batch-size", "4", "--top-k", "3", "--embeddings", "--ray", "--num-actors", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _rows(output)
    assert set(rows) == set(local_run)
    assert pq.read_schema(part_files(output)[0]).equals(pq.read_schema(part_files(local_output)[0]))
    for path, row in rows.items():
        expected = local_run[path]
        assert (row["top1"], row["top1_label"], row["topk_indices"], row["error"]) == \
               (expected["top1"], expected["top1_label"], expected["topk_indices"], expected["error"])
        if row["error"] is None:
            np.testing.assert_allclose(row["topk_scores"], expected["topk_scores"], rtol=1e-4)
            np.testing.assert_allclose(row["embedding"], expected["embedding"], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_killed_ray_job_resumes_without_losing_or_repeating(tmp_path):
    """--ray writes the local run's way (whole parts renamed into place): a SIGKILLed job leaves only
    complete parts, and --resume (the same folder, on this machine) writes each remaining image once."""
    pytest.importorskip("ray.data", reason="the ray extra is not installed")
    images = _write_images(tmp_path / "images", per_class=12)
    output = tmp_path / "out.parquet"
    _kill_when_written(_start(tmp_path / "images", output, "--ray"), output, 1, signal.SIGKILL)
    after_kill = _rows(output)            # every part readable, no path twice
    assert 0 < len(after_kill) < len(images)
    assert main([*MODEL_ARGS, "--data", str(tmp_path / "images"), "--output", str(output), "--workers", "0",
                 "--resume"]) == 0
    rows = _rows(output)
    assert set(rows) == {str(p) for p in images} and not list(output.glob(".tmp-*"))
    assert all(after_kill[path] == rows[path] for path in after_kill)


def test_a_part_cut_short_is_named_not_skipped(tmp_path):
    """A part cut short outside rmt-predict (a copy, a full disk) stops --resume with its name, not ignored."""
    from rmt_deploy.predict.output import prepare_output
    output = tmp_path / "out.parquet"
    output.mkdir()
    (output / "0000_000000.parquet").write_bytes(b"PAR1 cut short")
    (output / ".tmp-part-x.parquet").write_bytes(b"a local temporary: removed")
    with pytest.raises(ValueError, match="0000_000000.parquet is not a complete Parquet file"):
        prepare_output(output, resume=True)
    assert not (output / ".tmp-part-x.parquet").exists()
