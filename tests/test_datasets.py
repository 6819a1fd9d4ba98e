"""Training datasets (issue 16, first part): the AWS SD extension's /dataset routes against the real stack,
files uploaded straight to S3 with the presigned PUT URLs, checked before the dataset is Enabled."""
from __future__ import annotations

import io
import uuid

import requests
from PIL import Image

from tests.helpers import gradient


def png(width: int = 16, height: int = 16) -> bytes:
    buffer = io.BytesIO()
    gradient(width, height).save(buffer, "PNG")
    return buffer.getvalue()


def new_name() -> str:
    return f"faces-{uuid.uuid4().hex[:8]}"


def create(api, name: str, files: list[str], key: str | None = None) -> requests.Response:
    content = [{"filename": f"/home/me/photos/{f}", "name": f, "type": f.rsplit(".", 1)[-1]} for f in files]
    return api.post("/dataset", {"dataset_name": name, "content": content, "params": {"description": "mine"}},
                    key=key)


def upload(urls: dict, filename: str, data: bytes) -> None:
    response = requests.put(urls[f"/home/me/photos/{filename}"], data=data, timeout=30)
    assert response.status_code == 200, response.text


def test_a_dataset_is_uploaded_by_presigned_put_checked_and_enabled(api):
    name = new_name()
    created = create(api, name, ["a.png", "b.jpg", "a.txt"])
    assert created.status_code == 200, created.text
    body = created.json()
    assert body["statusCode"] == 200 and body["datasetName"] == name
    urls = body["s3PresignUrl"]
    assert set(urls) == {"/home/me/photos/a.png", "/home/me/photos/b.jpg", "/home/me/photos/a.txt"}
    upload(urls, "a.png", png(32, 24))
    early = api.put("/dataset", {"dataset_name": name, "status": "Enabled"})
    assert early.status_code == 400 and "b.jpg: not uploaded yet" in early.json()["error"]
    buffer = io.BytesIO()
    gradient(16, 16).convert("RGB").save(buffer, "JPEG")
    upload(urls, "b.jpg", buffer.getvalue())
    upload(urls, "a.txt", "a portrait of sks person\n".encode())
    enabled = api.put("/dataset", {"dataset_name": name, "status": "Enabled"})
    assert enabled.status_code == 200 and enabled.json() == {"statusCode": 200, "datasetName": name, "status": "Enabled"}
    again = api.put("/dataset", {"dataset_name": name, "status": "Enabled"})
    assert again.status_code == 200                                       # idempotent
    listed = {d["datasetName"]: d for d in api.get("/datasets").json()["datasets"]}
    assert listed[name]["status"] == "Enabled" and listed[name]["description"] == "mine"
    assert listed[name]["s3"].startswith("s3://") and listed[name]["s3"].endswith(f"/{name}")
    assert name not in {d["datasetName"] for d in api.get("/datasets?dataset_status=Initialed").json()["datasets"]}
    data = api.get(f"/{name}/data").json()
    assert data["dataset_name"] == name and data["status"] == "Enabled"
    items = {item["name"]: item for item in data["data"]}
    assert items["a.png"]["caption"] == "a portrait of sks person" and items["a.png"]["type"] == "image"
    assert (items["a.png"]["width"], items["a.png"]["height"]) == (32, 24)
    assert items["a.png"]["original_file_name"] == "/home/me/photos/a.png"
    assert all(item["dataStatus"] == "Enabled" for item in data["data"])
    preview = requests.get(items["a.png"]["preview_url"], timeout=30)
    assert preview.status_code == 200 and Image.open(io.BytesIO(preview.content)).size == (32, 24)
    disabled = api.put("/dataset", {"dataset_name": name, "status": "Disabled"})
    assert disabled.json()["status"] == "Disabled"


def test_files_that_are_not_images_or_too_big_keep_a_dataset_from_being_enabled(api, settings):
    name = new_name()
    urls = create(api, name, ["fake.png", "huge.png"]).json()["s3PresignUrl"]
    upload(urls, "fake.png", b"#!/bin/sh\necho this is not an image\n")
    side = int(settings.datasets.max_pixels ** 0.5) + 8
    huge = io.BytesIO()
    Image.new("L", (side, side)).save(huge, "PNG")
    upload(urls, "huge.png", huge.getvalue())
    refused = api.put("/dataset", {"dataset_name": name, "status": "Enabled"})
    assert refused.status_code == 400 and refused.json()["error"].startswith("fake.png: not a readable image")
    upload(urls, "fake.png", png())
    refused = api.put("/dataset", {"dataset_name": name, "status": "Enabled"})
    assert refused.status_code == 400 and "huge.png" in refused.json()["error"] and "pixels" in refused.json()["error"]
    assert api.get(f"/{name}/data").json()["status"] == "Initialed"


def test_requests_are_checked_and_named(api):
    assert create(api, "../escape", ["a.png"]).status_code == 400
    bad_file = create(api, new_name(), ["run.exe"])
    assert bad_file.status_code == 400 and "run.exe" in bad_file.json()["error"]
    no_image = create(api, new_name(), ["only.txt"])
    assert no_image.status_code == 400 and "at least one image" in no_image.json()["error"]
    twice = new_name()
    assert create(api, twice, ["a.png"]).status_code == 200
    taken = create(api, twice, ["a.png"])
    assert taken.status_code == 400 and "already has a dataset" in taken.json()["error"]
    assert api.put("/dataset", {"dataset_name": twice, "status": "Sleeping"}).status_code == 400
    missing = api.put("/dataset", {"dataset_name": "no-such-dataset", "status": "Enabled"})
    assert missing.status_code == 404 and missing.json()["statusCode"] == 404


def test_a_dataset_is_its_creator_s(api, api_b):
    name = new_name()
    urls = create(api, name, ["a.png"]).json()["s3PresignUrl"]
    upload(urls, "a.png", png())
    assert api.put("/dataset", {"dataset_name": name, "status": "Enabled"}).status_code == 200
    other = api_b.get(f"/{name}/data")
    missing = api_b.get("/no-such-dataset/data")
    assert other.status_code == missing.status_code == 404
    assert other.json() == {**missing.json(), "error": missing.json()["error"].replace("no-such-dataset", name)}
    assert name not in {d["datasetName"] for d in api_b.get("/datasets").json()["datasets"]}
    assert api_b.put("/dataset", {"dataset_name": name, "status": "Disabled"}).status_code == 404
    mine = create(api_b, name, ["x.png"])                                 # names are per key
    assert mine.status_code == 200
    assert api.get(f"/{name}/data").json()["status"] == "Enabled"          # the first key's is untouched


# --- the native API -------------------------------------------------------------------------------

def test_native_datasets_upload_check_and_enable(api, api_b):
    name = new_name()
    created = api.post("/api/v1/datasets", {"name": name, "files": [
        {"name": "tom1.png", "caption": "a photo of sks cat"}, {"name": "tom2.png"}, {"name": "tom2.txt"}]})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["name"] == name and body["status"] == "Initialed"
    urls = {f["name"]: f["upload_url"] for f in body["files"]}
    for file, data in (("tom1.png", png()), ("tom2.png", png(24, 16))):
        assert requests.put(urls[file], data=data, timeout=30).status_code == 200
    early = api.post(f"/api/v1/datasets/{name}/enable")
    assert early.status_code == 422 and early.json()["detail"].startswith("tom2.txt: not uploaded yet")
    assert requests.put(urls["tom2.txt"], data="a photo of sks cat, sleeping".encode(), timeout=30).status_code == 200
    enabled = api.post(f"/api/v1/datasets/{name}/enable")
    assert enabled.status_code == 200 and enabled.json()["status"] == "Enabled"
    files = {f["name"]: f for f in api.get(f"/api/v1/datasets/{name}").json()["files"]}
    assert files["tom1.png"]["caption"] == "a photo of sks cat"
    assert files["tom2.png"]["caption"] == "a photo of sks cat, sleeping"
    assert (files["tom2.png"]["width"], files["tom2.png"]["height"]) == (24, 16) and "upload_url" not in files["tom2.png"]
    assert requests.get(files["tom1.png"]["url"], timeout=30).content == png()
    assert name in {d["name"] for d in api.get("/api/v1/datasets").json()["datasets"]}
    assert name not in {d["name"] for d in api_b.get("/api/v1/datasets").json()["datasets"]}
    for method, path in (("GET", f"/api/v1/datasets/{name}"), ("POST", f"/api/v1/datasets/{name}/enable")):
        other = requests.request(method, api.base + path, headers=api_b.headers(), timeout=30)
        missing = requests.request(method, api.base + path.replace(name, "no-such-dataset"), headers=api_b.headers(),
                                   timeout=30)
        assert other.status_code == missing.status_code == 404 and other.json() == missing.json()
    again = api.post("/api/v1/datasets", {"name": name, "files": [{"name": "x.png"}]})
    assert again.status_code == 409 and "already has" in again.json()["detail"]
    foreign = requests.delete(f"{api.base}/api/v1/datasets/{name}", headers=api_b.headers(), timeout=30)
    assert foreign.status_code == 404
    assert api.delete(f"/api/v1/datasets/{name}").status_code == 204
    assert api.get(f"/api/v1/datasets/{name}").status_code == 404
    assert requests.get(files["tom1.png"]["url"], timeout=30).status_code == 404          # its files are gone
    assert api.post("/api/v1/datasets", {"name": name, "files": [{"name": "x.png"}]}).status_code == 201


def test_native_dataset_requests_name_their_fields(api):
    bad = api.post("/api/v1/datasets", {"name": "a/b", "files": [{"name": "x.gif"}]})
    assert bad.status_code == 422
    fields = {tuple(e["loc"][1:]) for e in bad.json()["detail"]}
    assert ("name",) in fields and any(f[0] == "files" and f[-1] == "name" for f in fields), fields
