"""``occface serve``: the API over FaceService, storage that survives crashes, API keys, limits, bad input."""
import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from occface.cli import main
from occface.errors import InputError
from occface.models import ModelConfig, OccFaceModel
from occface.service import FaceService, Limits
from occface.service.app import create_app
from occface.service.database import Database, database_url
from occface.service.server import Settings, check_access

fastapi = pytest.importorskip("fastapi", reason="the service needs occface[serve] (fastapi, uvicorn, sqlalchemy)")
from fastapi.testclient import TestClient  # noqa: E402


def tiny_model(path, seed=0):
    torch.manual_seed(seed)
    model = OccFaceModel(ModelConfig(arch="ir_18", width=0.125, feature_level="block4", occlusion_hidden_channels=8))
    return model.eval().save_pretrained(path)


def face_png(seed: int, size: int = 112, fmt: str = "PNG") -> bytes:
    """A random 'aligned face' (an image of the model's input size is taken as aligned)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def model_dir(tmp_path):
    return tiny_model(tmp_path / "model")


@pytest.fixture
def service(tmp_path, model_dir):
    return FaceService(model_dir, gallery=tmp_path / "gallery", limits=Limits(max_upload_bytes=400_000,
                                                                              max_pixels=4_000_000))


@pytest.fixture
def client(service):
    return TestClient(create_app(service))


def enrol(client, subject, seed):
    return client.post(f"/v1/subjects/{subject}/faces", files={"image": (f"{seed}.png", face_png(seed), "image/png")})


def test_the_operations_over_http(client, service):
    assert client.get("/healthz").json()["status"] == "ok"
    info = client.get("/v1/info").json()
    assert info["precision"] == "fp32" and info["gallery"]["faces"] == 0 and info["runtime"] == "torch"
    faces = client.post("/v1/faces", files={"image": ("a.png", face_png(1))}, data={"embedding": "true",
                                                                                   "overlay": "true"}).json()
    [face] = faces["faces"]
    assert face["aligned_input"] and len(face["embedding"]) == 512 and face["occlusion"] in ("occluded", "clean")
    assert np.array(face["visibility"]["map"]).shape == (7, 7)
    assert Image.open(io.BytesIO(base64.b64decode(face["overlay_png"]))).size == (224, 224)
    # JSON with base64 images works the same as uploads.
    as_json = client.post("/v1/faces", json={"image": base64.b64encode(face_png(1)).decode()}).json()
    assert as_json["faces"][0]["visibility"] == face["visibility"]
    verified = client.post("/v1/verify", files={"first": ("a.png", face_png(1)), "second": ("b.png", face_png(2))}).json()
    assert set(verified["scores"]) == {"embedding", "qaconv", "qaconv_weighted"}  # an uncalibrated model: no fusion
    assert verified["stratum"]["pair_type"] in ("clean-clean", "occluded-clean", "occluded-occluded")
    assert "first:" in verified["stratum"]["why"] and verified["decision"] is None
    same = client.post("/v1/verify", files={"first": ("a.png", face_png(1)), "second": ("b.png", face_png(1))}).json()
    assert same["scores"]["embedding"] == pytest.approx(1.0, abs=1e-4)
    for subject, seed in (("ann", 11), ("ann", 12), ("bob", 21)):
        response = enrol(client, subject, seed)
        assert response.status_code == 201 and not response.json()["duplicate"]
    assert enrol(client, "ann", 11).json()["duplicate"]  # the same file again: once
    as_base64 = client.post("/v1/subjects/ann/faces", json={"image": base64.b64encode(face_png(11)).decode()})
    assert as_base64.json()["duplicate"]  # however it is sent
    listed = client.get("/v1/subjects").json()
    assert listed["total"] == 2 and [(s["id"], s["faces"]) for s in listed["subjects"]] == [("ann", 2), ("bob", 1)]
    ann = client.get("/v1/subjects/ann").json()
    assert len(ann["faces"]) == 2 and all(f["model_sha256"] == service.model_sha256 for f in ann["faces"])
    found = client.post("/v1/search", files={"image": ("q.png", face_png(21))}, data={"top": "2"}).json()
    assert found["decision"] == "bob" and [c["subject"] for c in found["candidates"]] == ["bob", "ann"]
    assert found["candidates"][0]["scores"]["embedding"] == pytest.approx(1.0, abs=1e-4)
    against = client.post("/v1/verify", files={"first": ("q.png", face_png(12))}, data={"subject": "ann"}).json()
    assert against["subject"] == "ann" and against["compared_faces"] == 2
    assert against["scores"]["embedding"] == pytest.approx(1.0, abs=1e-4)  # its best face: the same image
    assert client.delete("/v1/subjects/ann").json() == {"subject": "ann", "removed_faces": 2}
    assert client.get("/v1/subjects").json()["total"] == 1 and len(service.gallery) == 1
    assert client.get("/").status_code == 200 and "Compare two photos" in client.get("/").text
    assert client.get("/static/page.js").status_code == 200
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert "/v1/verify" in client.get("/openapi.json").json()["paths"]


def bad_requests(tmp_path):
    """(name, request keyword arguments, expected status, expected code); each must write nothing."""
    big = io.BytesIO()
    Image.new("RGB", (8000, 6250), (90, 90, 90)).save(big, format="PNG")  # 50 MP, a small file
    truncated = face_png(3, size=300, fmt="JPEG")[:2000]
    one_pixel = io.BytesIO()
    Image.new("RGB", (1, 1)).save(one_pixel, format="PNG")
    face = ("f.png", face_png(5))
    return [
        ("not an image", dict(method="POST", url="/v1/faces", files={"image": ("x.png", b"just some text")}), 422,
         "not_an_image"),
        ("truncated JPEG", dict(method="POST", url="/v1/faces", files={"image": ("t.jpg", truncated)}), 422,
         "truncated_image"),
        ("1x1 pixel", dict(method="POST", url="/v1/faces", files={"image": ("p.png", one_pixel.getvalue())}), 422,
         "image_too_small"),
        ("50 MP image", dict(method="POST", url="/v1/faces", files={"image": ("b.png", big.getvalue())}), 413,
         "too_many_pixels"),
        ("upload over the limit", dict(method="POST", url="/v1/subjects/ann/faces",
                                       files={"image": ("r.png", b"\x89PNG" + b"0" * 500_000)}), 413,
         "upload_too_large"),
        ("empty upload", dict(method="POST", url="/v1/subjects/ann/faces", files={"image": ("e.png", b"")}), 422,
         "empty_image"),
        ("malformed JSON", dict(method="POST", url="/v1/search", content=b"{not json",
                                headers={"content-type": "application/json"}), 400, "malformed_json"),
        ("JSON that is not an object", dict(method="POST", url="/v1/search", json=[1, 2]), 400, "malformed_json"),
        ("wrong content type", dict(method="POST", url="/v1/search", content=b"image",
                                    headers={"content-type": "text/plain"}), 415, "unsupported_media_type"),
        ("no content type", dict(method="POST", url="/v1/search", content=b"image"), 415, "unsupported_media_type"),
        ("missing image field", dict(method="POST", url="/v1/subjects/ann/faces", files={"photo": face}), 422,
         "missing_field"),
        ("bad base64", dict(method="POST", url="/v1/subjects/ann/faces", json={"image": "@@not base64@@"}), 422,
         "not_base64"),
        ("base64 of a non-image", dict(method="POST", url="/v1/subjects/ann/faces",
                                       json={"image": base64.b64encode(b"hello").decode()}), 422, "not_an_image"),
        ("unknown subject", dict(method="GET", url="/v1/subjects/nobody"), 404, "unknown_subject"),
        ("verify against an unknown subject", dict(method="POST", url="/v1/verify", files={"first": face},
                                                   data={"subject": "nobody"}), 404, "unknown_subject"),
        ("delete an unknown subject", dict(method="DELETE", url="/v1/subjects/nobody"), 404, "unknown_subject"),
        ("verify with a subject and a second photo", dict(method="POST", url="/v1/verify",
                                                          files={"first": face, "second": face},
                                                          data={"subject": "ann"}), 422, "verify_needs_two"),
        ("verify with one photo only", dict(method="POST", url="/v1/verify", files={"first": face}), 422,
         "missing_field"),
        ("top out of range", dict(method="POST", url="/v1/search", files={"image": face}, data={"top": "0"}), 422,
         "bad_top"),
        ("top not a number", dict(method="POST", url="/v1/search", files={"image": face}, data={"top": "five"}), 422,
         "bad_number"),
        ("a flag that is no boolean", dict(method="POST", url="/v1/faces", files={"image": face},
                                           data={"overlay": "maybe"}), 422, "bad_flag"),
        ("a subject id too long", dict(method="POST", url="/v1/subjects/" + "x" * 300 + "/faces",
                                       files={"image": face}), 422, "bad_subject"),
        ("a page size out of range", dict(method="GET", url="/v1/subjects?limit=0"), 422, "bad_page"),
        ("a page size not a number", dict(method="GET", url="/v1/subjects?limit=ten"), 422, "bad_parameter"),
        ("unknown route", dict(method="GET", url="/v1/nothing"), 404, "not_found"),
        ("wrong method", dict(method="GET", url="/v1/search"), 405, "method_not_allowed"),
        ("request over the size limit", dict(method="POST", url="/v1/faces", content=b"0" * 900_000,
                                             headers={"content-type": "multipart/form-data; boundary=x"}), 413,
         "upload_too_large"),
        ("malformed multipart", dict(method="POST", url="/v1/faces", content=b"--x\r\nnonsense",
                                     headers={"content-type": "multipart/form-data"}), 400, "malformed_multipart"),
    ]


def test_bad_input_is_one_json_line_with_its_status_and_writes_nothing(tmp_path, client, service):
    assert enrol(client, "ann", 11).status_code == 201
    generation, rows = service.gallery.generation, service.db.counts()
    cases = bad_requests(tmp_path)
    assert len(cases) >= 20
    for name, request, status, code in cases:
        response = client.request(**request)
        body = response.json()
        assert response.status_code == status, (name, response.status_code, body)
        assert set(body) == {"error"} and body["error"]["code"] == code, (name, body)
        assert "Traceback" not in response.text and "\n" not in body["error"]["message"], name
    assert service.gallery.generation == generation and service.db.counts() == rows
    assert service.gallery.refresh() is False  # nothing committed on disk either


def test_api_keys_are_needed_once_one_exists(tmp_path, model_dir, capsys):
    gallery = tmp_path / "gallery"
    FaceService(model_dir, gallery=gallery)  # makes the gallery and its database
    assert main(["serve", "keys", "add", "gate-3", "--gallery", str(gallery)]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    assert key.startswith("occ_")
    database = Database(database_url(None, gallery))
    stored = database.keys()
    assert [k["name"] for k in stored] == ["gate-3"] and key.split("_", 2)[2] not in json.dumps(stored)
    with database.engine.connect() as connection:  # hashed at rest: the key itself is nowhere in the database
        rows = connection.exec_driver_sql("SELECT secret_sha256 FROM api_keys").fetchall()
    assert key.split("_", 2)[2] not in str(rows) and len(rows[0][0]) == 64
    client = TestClient(create_app(FaceService(model_dir, gallery=gallery)))
    assert client.get("/v1/info").json()["error"]["code"] == "no_api_key"
    assert client.get("/v1/info", headers={"Authorization": "Bearer occ_nope_nope"}).status_code == 401
    assert client.get("/v1/info", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert client.get("/v1/info", headers={"X-API-Key": key}).status_code == 200
    assert client.get("/healthz").status_code == 200 and client.get("/").status_code == 200  # open
    assert main(["serve", "keys", "list", "--gallery", str(gallery)]) == 0
    assert "gate-3" in capsys.readouterr().out
    assert main(["serve", "keys", "revoke", "gate-3", "--gallery", str(gallery)]) == 0
    assert client.get("/v1/info", headers={"X-API-Key": key}).status_code == 200  # no key left: open again
    assert main(["serve", "keys", "revoke", "gate-3", "--gallery", str(gallery)]) == 2
    assert "no active API key" in capsys.readouterr().err


def test_without_keys_the_server_stays_on_loopback(model_dir):
    assert "loopback only" in check_access(Settings(str(model_dir)), 0)
    assert "1 API key(s) active" in check_access(Settings(str(model_dir), host="0.0.0.0"), 1)
    with pytest.raises(InputError, match="--host 0.0.0.0: no API keys are set"):
        check_access(Settings(str(model_dir), host="0.0.0.0"), 0)


def test_rows_and_shards_agree_after_a_crash_between_them(tmp_path, model_dir, monkeypatch):
    service = FaceService(model_dir, gallery=tmp_path / "gallery")
    client = TestClient(create_app(service))
    assert enrol(client, "ann", 1).status_code == 201
    # Killed after the shard's commit and before the rows': the write was never acknowledged ...
    monkeypatch.setattr(Database, "add_faces", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        service.enroll("bob", np.asarray(Image.open(io.BytesIO(face_png(2)))))
    monkeypatch.undo()
    assert len(service.gallery) == 2 and service.db.counts() == (1, 1)
    # ... and a restart adds the rows for the face the shards hold.
    again = FaceService(model_dir, gallery=tmp_path / "gallery")
    assert again.db.counts() == (2, 2) and {s["id"] for s in again.subjects()["subjects"]} == {"ann", "bob"}
    # Killed after a removal's commit and before the rows went: a restart removes them.
    monkeypatch.setattr(Database, "remove_faces", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        again.delete_subject("ann")
    monkeypatch.undo()
    assert again.db.counts() == (2, 2) and len(again.gallery) == 1
    third = FaceService(model_dir, gallery=tmp_path / "gallery")
    assert third.db.counts() == (1, 1) and third.subject("bob")["faces"]


def test_a_write_past_its_deadline_or_without_a_worker_writes_nothing(service):
    from occface.service.core import Deadline
    from occface.service.errors import ServiceError

    face = np.asarray(Image.open(io.BytesIO(face_png(7))))
    with pytest.raises(ServiceError) as error:
        service.enroll("ann", face, deadline=Deadline(-1.0))
    assert error.value.status == 504 and "nothing was written" in error.value.message
    for _ in range(2):  # every compute slot taken
        service._slots.acquire()
    with pytest.raises(ServiceError) as error:
        service.enroll("ann", face, deadline=Deadline(0.2))
    assert error.value.status == 503 and error.value.code == "busy"
    assert len(service.gallery) == 0 and service.db.counts() == (0, 0)


def test_a_gallery_of_another_model_is_refused_at_start(tmp_path, model_dir):
    FaceService(model_dir, gallery=tmp_path / "gallery")
    other = tiny_model(tmp_path / "other", seed=1)
    with pytest.raises(InputError, match="the gallery was built with the model at"):
        FaceService(other, gallery=tmp_path / "gallery")


def test_the_cli_and_the_service_share_one_gallery(tmp_path, model_dir, capsys):
    from conftest import write_png

    people = tmp_path / "people"
    for name, seed in (("ann", 1), ("bob", 2)):
        write_png(people / name / "0.png", np.asarray(Image.open(io.BytesIO(face_png(seed)))))
    gallery = tmp_path / "gallery"
    assert main(["enroll", str(people), "--model", str(model_dir), "--gallery", str(gallery)]) == 0
    capsys.readouterr()
    service = FaceService(model_dir, gallery=gallery)  # the enrolment's rows were written by the command
    assert service.db.counts() == (2, 2)
    assert main(["search", str(people / "bob" / "0.png"), "--model", str(model_dir), "--gallery", str(gallery),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["decision"] == "bob"


def test_two_workers_on_one_gallery_see_each_others_writes(tmp_path, model_dir):
    # `occface serve --workers 2` runs two processes, each with its own FaceService on the gallery.
    first, second = (FaceService(model_dir, gallery=tmp_path / "gallery") for _ in range(2))
    face = np.asarray(Image.open(io.BytesIO(face_png(3))))
    first.enroll("ann", face)
    assert second.search(face, top=1)["decision"] == "ann"
    assert second.verify(face, subject="ann")["compared_faces"] == 1
    second.enroll("bob", np.asarray(Image.open(io.BytesIO(face_png(4)))))
    assert first.subjects()["total"] == 2 and len(first.gallery) == 1  # rows at once, shards on next use
    assert first.search(face, top=2)["gallery_faces"] == 2
    second.delete_subject("ann")
    assert first.search(face, top=2)["candidates"][0]["subject"] == "bob"


def test_verification_against_a_subject_fuses_as_a_calibrated_model_does(tmp_path):
    """A model with a fusion calibration, a subject with one face and with two: the probe is scored
    against each of the subject's faces and decided on the best fused score, which is the pair's own."""
    from occface.match import match

    model_dir = tiny_model(tmp_path / "model")
    model = OccFaceModel.from_pretrained(model_dir)
    stats = {"all": [0.0, 1.0]}
    model.config.calibration = {
        "normalization": {"hidden_below": 0.2, "hidden_share": 0.25, "embedding": stats, "qaconv": stats,
                          "qaconv_weighted": stats},
        "fusion_weight": {"all": {"embedding": 0.5, "qaconv": 0.5}},
        "fused": {"far": 0.01, "threshold": 0.0}}
    model.save_pretrained(model_dir)
    service = FaceService(model_dir, gallery=tmp_path / "gallery")
    faces = [np.asarray(Image.open(io.BytesIO(face_png(seed)))) for seed in (5, 6, 7)]
    service.enroll("ann", faces[0])
    one = service.verify(faces[2], subject="ann")
    assert one["compared_faces"] == 1
    assert one["scores"]["fused"] == pytest.approx(match(service.model, faces[2], faces[0], precision="fp32")["scores"]
                                                   ["fused"], abs=1e-4)
    service.enroll("ann", faces[1])
    two = service.verify(faces[2], subject="ann")
    best = max(match(service.model, faces[2], f, precision="fp32")["scores"]["fused"] for f in faces[:2])
    assert two["compared_faces"] == 2 and two["scores"]["fused"] == pytest.approx(best, abs=1e-4)
    assert two["decision"]["same"] == (best >= 0.0)
