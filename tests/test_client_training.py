"""LoRA training through the Python client and `sdq train`, against the real stack (the `trainer` fixture
starts the training pool's worker).

Why against the stack: what the client promises here is the service's flow
(create a dataset, PUT each file to S3 at its presigned URL, enable it, train,
follow the task's events, use the LoRA), so it is checked end to end. What
the stack cannot show on demand (where an upload goes and with which headers,
a connection dropped after a request was sent) is shown by tests.test_client's
Scripted server.
"""
from __future__ import annotations

import asyncio
import io
import json
import math
import re
import uuid
from pathlib import Path

import pytest
from PIL import Image

import sdqueue_client
from sdqueue_client import (AsyncClient, Client, ConnectionProblem, Event, JobFailed, NotFound, ValidationError)
from sdqueue_client.files import dataset_files
from tests.conftest import KEY_A
from tests.test_client import Scripted, sdq

TINY = "sdq-tiny"
FAST_TRAINING = {"model": TINY, "resolution": 64, "learning_rate": 1e-2, "rank": 4, "seed": 3, "checkpoint_every": 0}
COLOURS = ((220, 40, 40), (40, 200, 60), (30, 60, 230))


def test_the_client_under_test_is_this_checkout_s():
    """The venv installs sdqueue-client editable from another checkout: PYTHONPATH must put this one first."""
    assert Path(sdqueue_client.__file__).resolve().parents[1] == Path(__file__).resolve().parents[1] / "client"


@pytest.fixture(scope="module")
def client(stack):
    with Client(stack.api_url, KEY_A) as c:
        yield c


def png_of(colour: tuple[int, int, int], size: int = 64) -> bytes:
    """A small striped square (some structure, not a flat field)."""
    image = Image.new("RGB", (size, size), colour)
    for x in range(0, size, 8):
        image.paste((255 - colour[0], 255 - colour[1], 255 - colour[2]), (x, 0, x + 4, size))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def image_folder(folder: Path, images: int = 2) -> Path:
    """`images` PNGs, the first with a caption file beside it, plus files that are no part of a dataset."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(images):
        (folder / f"img{n}.png").write_bytes(png_of(COLOURS[n % len(COLOURS)]))
    (folder / "img0.txt").write_text("a red striped square\n", encoding="utf-8")
    (folder / "notes.md").write_text("not an image", encoding="utf-8")
    (folder / "orphan.txt").write_text("a caption without its image", encoding="utf-8")
    return folder


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# -- the sync client ---------------------------------------------------------------------------------------
def test_a_dataset_is_uploaded_trained_on_and_its_lora_generates(client, trainer, tmp_path):
    folder = image_folder(tmp_path / "set")
    name, lora_name = unique("cset"), unique("clora")
    files = {"img0.png": folder / "img0.png", "img0.txt": str(folder / "img0.txt"), "img1.png": png_of(COLOURS[1])}
    dataset = client.create_dataset(name, files, captions={"img1.png": "a green striped square"})
    assert dataset["status"] == "Enabled"
    captions = {f["name"]: f["caption"] for f in dataset["files"] if f["type"] == "image"}
    assert captions == {"img0.png": "a red striped square", "img1.png": "a green striped square"}
    assert all("upload_url" not in f for f in dataset["files"])
    assert client.dataset(name)["status"] == "Enabled"
    assert name in [d["name"] for d in client.datasets()]

    seen: list[Event] = []
    body = client.train(name, max_steps=4, lora_name=lora_name, on_event=seen.append, **FAST_TRAINING)
    assert body["status"] == "completed" and body["dataset"] == name
    assert body["lora"]["name"] == lora_name and body["progress"]["step"] == 4
    progress = [e.data for e in seen if e.type == "progress"]
    assert progress and all(math.isfinite(p["loss"]) for p in progress)
    assert seen[-1].type == "completed"
    fixed = {k: v for k, v in body["lora"].items() if k != "download_url"}     # a URL presigned anew each time
    assert {k: v for k, v in client.training(body["id"])["lora"].items() if k != "download_url"} == fixed
    assert body["id"] in [t["id"] for t in client.trainings(limit=100)["trainings"]]
    assert client.status(body["id"])["status"] == "completed"        # a training job is a task too

    result = client.generate("a striped square", model=TINY, width=64, height=64, num_inference_steps=3, seed=5,
                             loras=[{"name": lora_name}])
    assert result.download().startswith(b"\x89PNG")
    assert {"name": lora_name, "source": "own"}.items() <= next(l for l in client.loras() if l["name"] == lora_name).items()
    client.delete_lora(lora_name)
    with pytest.raises(NotFound):
        client.delete_lora(lora_name)

    client.delete_dataset(name)
    with pytest.raises(NotFound):
        client.dataset(name)


def test_a_folder_is_a_dataset_of_its_images_and_their_captions(client, tmp_path):
    folder = image_folder(tmp_path / "set", images=3)
    assert sorted(dataset_files(folder)) == ["img0.png", "img0.txt", "img1.png", "img2.png"]
    name = unique("cdir")
    dataset = client.create_dataset(name, folder)
    try:
        assert sorted(f["name"] for f in dataset["files"]) == ["img0.png", "img0.txt", "img1.png", "img2.png"]
        assert [f["caption"] for f in dataset["files"] if f["name"] == "img0.png"] == ["a red striped square"]
    finally:
        client.delete_dataset(name)


def test_a_dataset_that_fails_its_check_is_removed_so_the_name_is_free(client):
    name = unique("cbad")
    with pytest.raises(ValidationError) as refused:
        client.create_dataset(name, {"fine.png": png_of(COLOURS[0]), "broken.png": b"not an image"})
    assert "broken.png" in refused.value.message
    with pytest.raises(NotFound):
        client.dataset(name)
    assert client.create_dataset(name, {"fine.png": png_of(COLOURS[0])})["status"] == "Enabled"
    client.delete_dataset(name)


def test_training_errors_are_the_client_s_typed_errors(client):
    with pytest.raises(NotFound) as missing:
        client.train("no-such-dataset", max_steps=2)
    assert "not found" in missing.value.message
    name = unique("cerr")
    client.create_dataset(name, {"a.png": png_of(COLOURS[2])})
    try:
        with pytest.raises(ValidationError) as bad:
            client.start_training(name, rank=0)
        assert bad.value.status == 422 and bad.value.message.startswith("rank:")
        with pytest.raises(ValidationError) as both:
            client.train(name, max_steps=5, epochs=2)
        assert "epochs:" in both.value.message
    finally:
        client.delete_dataset(name)
    with pytest.raises(NotFound):
        client.training(str(uuid.uuid4()))
    with pytest.raises(ValidationError) as not_an_image:
        client.create_dataset(unique("cerr"), {"a.gif": b"GIF89a"})
    assert "a.gif" in not_an_image.value.message
    with pytest.raises(ValueError):                # a caption for a file that is not sent: refused before any call
        client.create_dataset(unique("cerr"), {"a.png": b""}, captions={"b.png": "lost"})


# -- the async client --------------------------------------------------------------------------------------
def test_the_async_client_trains_and_a_cancelled_training_raises_job_failed(stack, trainer):
    async def scenario():
        async with AsyncClient(stack.api_url, KEY_A) as aclient:
            name = unique("aset")
            await aclient.create_dataset(name, {"a.png": png_of(COLOURS[0]), "b.png": png_of(COLOURS[1]),
                                                "a.txt": b"a red striped square"})
            seen: list[Event] = []
            done = await aclient.train(name, max_steps=3, on_event=seen.append, **FAST_TRAINING)

            cancels: list[asyncio.Task] = []

            def cancel_once_it_trains(event: Event) -> None:
                if event.type == "progress" and not cancels:
                    cancels.append(asyncio.get_running_loop().create_task(
                        aclient.cancel_training(event.data["task_id"])))

            with pytest.raises(JobFailed) as cancelled:
                await aclient.train(name, max_steps=5000, on_event=cancel_once_it_trains, **FAST_TRAINING)
            await asyncio.gather(*cancels)
            training_id = cancelled.value.task["task_id"]
            after = await aclient.training(training_id)
            listed = await aclient.trainings(limit=5)
            await aclient.delete_dataset(name)
            return done, seen, cancelled.value, after, listed, await aclient.datasets(), name

    done, seen, cancelled, after, listed, datasets, name = asyncio.run(scenario())
    assert done["status"] == "completed" and done["lora"]["name"] == done["lora_name"]
    assert any(e.type == "progress" and math.isfinite(e.data["loss"]) for e in seen)
    assert cancelled.status == "cancelled"
    assert after["status"] == "cancelled" and after["lora"] is None and after["progress"]["step"] < 5000
    assert {done["id"], after["id"]} <= {t["id"] for t in listed["trainings"]}
    assert name not in [d["name"] for d in datasets]


# -- the CLI -----------------------------------------------------------------------------------------------
def test_cli_train_uploads_a_folder_trains_and_prints_the_lora(stack, trainer, tmp_path):
    folder = image_folder(tmp_path / "set")
    name, lora_name = unique("qset"), unique("qlora")
    run = sdq(stack, "train", str(folder), "--name", name, "--model", TINY, "--steps", "4", "--rank", "4",
              "--lr", "0.01", "--resolution", "64", "--seed", "3", "--trigger", "sks", "--lora-name", lora_name)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [lora_name]
    assert f"dataset {name}: 2 images (1 with captions)" in run.stderr
    assert re.search(r": 100%\|[^\r\n]*loss=\d+\.\d{4}, completed", run.stderr), run.stderr
    assert f"--lora {lora_name}" in run.stderr

    taken = sdq(stack, "train", str(folder), "--name", name, "--steps", "2")
    assert taken.returncode == 1 and f"sdq delete-dataset {name}" in taken.stderr
    assert "409 dataset_name:" in taken.stderr.splitlines()[-1]
    datasets = sdq(stack, "datasets")
    assert datasets.returncode == 0 and datasets.stdout.startswith("DATASET")
    assert re.search(rf"^{name}\s+Enabled\s+2\s+1\s", datasets.stdout, re.M), datasets.stdout
    assert sdq(stack, "delete-dataset", name).returncode == 0
    assert name not in sdq(stack, "datasets").stdout
    assert sdq(stack, "delete-dataset", name).returncode == 1

    listed = sdq(stack, "trainings", "--json")
    assert listed.returncode == 0, listed.stderr
    mine = next(t for t in json.loads(listed.stdout)["trainings"] if t["lora_name"] == lora_name)
    assert mine["status"] == "completed" and mine["config"]["trigger_word"] == "sks"
    assert mine["config"]["max_steps"] == 4 and mine["config"]["rank"] == 4
    table = sdq(stack, "trainings")
    assert table.stdout.startswith("TRAINING") and mine["id"] in table.stdout and lora_name in table.stdout
    status = sdq(stack, "status", mine["id"])
    assert status.returncode == 0 and "completed" in status.stdout

    out = tmp_path / "out"
    generated = sdq(stack, "generate", "sks square", "--model", TINY, "--size", "64x64", "--steps", "3",
                    "--lora", f"{lora_name}:0.8", "--out", str(out))
    assert generated.returncode == 0, generated.stderr
    assert Path(generated.stdout.split()[0]).parent == out

    loras = sdq(stack, "loras")
    assert loras.returncode == 0 and any(line.split()[:2] == [lora_name, "own"] for line in loras.stdout.splitlines())
    assert sdq(stack, "delete-lora", lora_name).returncode == 0
    assert lora_name not in sdq(stack, "loras").stdout
    assert sdq(stack, "delete-lora", lora_name).returncode == 1                # not found: refused


def test_cli_train_no_wait_then_cancel_and_watch(stack, trainer, tmp_path):
    folder = image_folder(tmp_path / "set")
    run = sdq(stack, "train", str(folder), "--name", unique("qwait"), "--model", TINY, "--steps", "5000",
              "--resolution", "64", "--no-wait")
    assert run.returncode == 0, run.stderr
    training_id = run.stdout.strip()
    assert f"sdq cancel {training_id}" in run.stderr
    cancelled = sdq(stack, "cancel", training_id)              # a training id is a task id
    assert cancelled.returncode == 0 and training_id in cancelled.stdout
    watched = sdq(stack, "watch", training_id)
    assert watched.returncode == 1 and "cancelled" in watched.stderr


def test_cli_train_errors_exit_as_the_other_commands(stack, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    assert sdq(stack, "train", str(empty), "--name", "x").returncode == 2
    folder = image_folder(tmp_path / "set")
    both = sdq(stack, "train", str(folder), "--name", "x", "--steps", "2", "--epochs", "2")
    assert both.returncode == 2 and "not allowed with" in both.stderr

    name = unique("qerr")
    refused = sdq(stack, "train", str(folder), "--name", name, "--rank", "0")
    assert refused.returncode == 1 and refused.stderr.splitlines()[-1].startswith("sdq: error: 422 rank:")
    again = sdq(stack, "train", str(folder), "--name", name, "--resolution", "100")   # the name is free again
    assert again.returncode == 1 and "resolution: must be a multiple of 64" in again.stderr
    unreachable = sdq(stack, "--retries", "0", "train", str(folder), "--name", name, url="http://127.0.0.1:9")
    assert unreachable.returncode == 3 and "cannot reach" in unreachable.stderr


# -- behaviour shown by servers the test controls ----------------------------------------------------------
def test_files_go_to_their_presigned_urls_without_the_api_key():
    server = Scripted([])
    created = {"name": "s", "status": "Initialed", "files": [
        {"name": "a.png", "upload_url": f"{server.url}/bucket/a.png?X-Amz-Signature=x"},
        {"name": "a.txt", "upload_url": f"{server.url}/bucket/a.txt?X-Amz-Signature=y"}]}
    server.answers += [(201, {}, created), (503, {"Retry-After": "0"}, b"<Error>SlowDown</Error>"), (200, {}, b""),
                       (200, {}, b""), (200, {}, {"name": "s", "status": "Enabled", "files": []})]
    try:
        with Client(server.url, "secret-key", retries=2) as c:
            assert c.create_dataset("s", {"a.png": b"PNGDATA", "a.txt": b"caption"})["status"] == "Enabled"
    finally:
        server.close()
    create, *puts, enable = server.requests
    assert json.loads(create["body"]) == {"name": "s", "files": [{"name": "a.png"}, {"name": "a.txt"}], "params": {}}
    assert create["headers"]["X-API-Key"] == "secret-key"
    assert [(p["method"], p["path"].split("?")[0], p["body"]) for p in puts] == [      # the 503 one retried
        ("PUT", "/bucket/a.png", b"PNGDATA"), ("PUT", "/bucket/a.png", b"PNGDATA"),
        ("PUT", "/bucket/a.txt", b"caption")]
    assert all("X-API-Key" not in p["headers"] and "x-api-key" not in p["headers"] for p in puts)
    assert enable["path"] == "/api/v1/datasets/s/enable" and enable["headers"]["X-API-Key"] == "secret-key"


def test_a_training_submit_cut_off_after_sending_is_retried_under_one_idempotency_key():
    """A second POST after a lost answer names the same submission (the server answers with the first job)."""
    server = Scripted([None, (202, {}, {"id": "t-2"})])
    try:
        with Client(server.url, "k", retries=3) as c:
            assert c.start_training("set", max_steps=2) == "t-2"
    finally:
        server.close()
    first, second = server.requests
    assert first["headers"]["Idempotency-Key"] == second["headers"]["Idempotency-Key"]
