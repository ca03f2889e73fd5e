"""The HTTP API on a real local Ray Serve app: real uploads of Yale photos, real models.

One module-scoped app (Ray with 2 CPUs, fractional replicas) serves every test; each bad request
is followed by a good one to show the server keeps serving.
"""

from __future__ import annotations

import io
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")

REPO = Path(__file__).resolve().parents[1]
TOKEN = "test-token-123"
MAX_IMAGE_BYTES = 1_000_000
MAX_IMAGES = 4
APP_NAME = "facedist-test"

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server():
    """Serve the app on 127.0.0.1:<free port>; yields (base_url, settings)."""
    import ray
    from ray import serve

    sys.path.insert(0, str(REPO))
    from serve.app import run_server

    saved_token = os.environ.get("FACEDIST_API_TOKEN")
    os.environ["FACEDIST_API_TOKEN"] = TOKEN  # replicas read it when they start
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO),
                                       "FACEDIST_MODEL_DIR": os.environ["FACEDIST_MODEL_DIR"]}})
    port = _free_port()
    try:
        settings = {"max_image_bytes": MAX_IMAGE_BYTES, "max_images": MAX_IMAGES,
                    "max_batch_size": 8, "batch_wait_timeout_s": 0.05, "num_replicas": 1}
        # What `facedist serve` runs (Ray is already up, so it is used as is).
        run_server(None, host="127.0.0.1", port=port, name=APP_NAME, blocking=False, **settings)
        yield f"http://127.0.0.1:{port}", settings
    finally:
        serve.shutdown()
        ray.shutdown()
        if saved_token is None:
            os.environ.pop("FACEDIST_API_TOKEN", None)
        else:
            os.environ["FACEDIST_API_TOKEN"] = saved_token


@pytest.fixture(scope="module")
def client(server):
    base_url, _ = server
    with httpx.Client(base_url=base_url, timeout=120.0,
                      headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        yield c


@pytest.fixture(scope="module")
def face_bytes(yale_dir) -> bytes:
    return (yale_dir / "subject01.normal").read_bytes()


def _error(response) -> dict:
    body = response.json()
    assert "error" in body, body
    return body["error"]


def _assert_good_extract(client, face_bytes) -> dict:
    response = client.post("/v1/extract", files={"image": ("subject01.normal", face_bytes)})
    assert response.status_code == 200, response.text
    return response.json()


def test_health_is_open_and_models_are_listed(server, client):
    base_url, _ = server
    health = httpx.get(f"{base_url}/v1/health", timeout=60)  # no token: probes must not need one
    assert health.status_code == 200 and health.json()["status"] == "ok"
    models = client.get("/v1/models").json()
    extractor = models["extractor"]
    assert extractor["name"] == "tddfa"
    assert extractor["layout"]["model_name"].startswith("3ddfa_v2")
    assert len(extractor["layout"]["model_version"]) == 12
    assert models["limits"]["max_images"] == MAX_IMAGES


def test_extract_returns_coefficients_landmarks_and_pose(client, face_bytes):
    body = _assert_good_extract(client, face_bytes)
    assert body["status"] == "ok" and body["backend"] == "tddfa"
    assert (body["width"], body["height"]) == (320, 243)
    face = body["face"]
    assert len(face["landmarks"]) == 68 and len(face["landmarks"][0]) == 2
    assert len(face["landmarks_fit"]) == 68
    # The detected face sits inside the image and the fit agrees with the detected points.
    x0, y0, x1, y1 = face["box"]
    assert 0 <= x0 < x1 <= 320 and 0 <= y0 < y1 <= 243
    assert face["landmark_error"] < 0.2
    assert len(body["coefficients"]["id"]) == 40 and len(body["coefficients"]["exp"]) == 10
    # A frontal Yale photo: small head rotation.
    assert abs(body["pose"]["yaw"]) < 30 and abs(body["pose"]["roll"]) < 30


def test_same_image_gives_same_coefficients_under_concurrency(server, client, face_bytes, yale_dir):
    """Concurrent requests are batched together and each gets its own image's answer."""
    import concurrent.futures

    from ray import serve

    names = ["subject02.happy", "subject03.normal", "subject04.sad", "subject05.wink"] * 2
    reference = _assert_good_extract(client, face_bytes)["coefficients"]["id"]
    before = serve.get_deployment_handle("FaceExtractor", APP_NAME).stats.remote().result()

    def post(name):
        data = face_bytes if name is None else (yale_dir / name).read_bytes()
        return client.post("/v1/extract", files={"image": (name or "ref", data)})

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, names + [None]))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    # Batching must not mix up results: the reference image answers the same as alone.
    np.testing.assert_allclose(responses[-1].json()["coefficients"]["id"], reference, rtol=1e-4, atol=1e-4)
    assert {r.json()["filename"] for r in responses[:-1]} == set(names)
    after = serve.get_deployment_handle("FaceExtractor", APP_NAME).stats.remote().result()
    new_batches = {int(k): v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
    assert max(k for k, v in new_batches.items() if v > 0) > 1, new_batches


@pytest.mark.parametrize("headers, why", [({}, "missing"), ({"Authorization": "Bearer nope"}, "wrong"),
                                          ({"Authorization": f"Basic {TOKEN}"}, "missing")])
def test_requests_without_the_token_get_401(server, client, face_bytes, headers, why):
    base_url, _ = server
    response = httpx.post(f"{base_url}/v1/extract", files={"image": ("a", face_bytes)}, headers=headers, timeout=60)
    assert response.status_code == 401
    assert response.headers.get("www-authenticate") == "Bearer"
    error = _error(response)
    assert error["code"] == "unauthorized" and why in error["message"]
    assert httpx.get(f"{base_url}/v1/models", headers=headers, timeout=60).status_code == 401
    _assert_good_extract(client, face_bytes)


def test_text_file_is_not_an_image(client, face_bytes):
    response = client.post("/v1/extract", files={"image": ("notes.jpg", b"hello, this is not a photo\n" * 20)})
    assert response.status_code == 415
    error = _error(response)
    assert error["code"] == "not_an_image" and "not an image" in error["message"]
    assert error["filename"] == "notes.jpg"
    _assert_good_extract(client, face_bytes)


def test_truncated_image_is_invalid(client, face_bytes):
    response = client.post("/v1/extract", files={"image": ("cut.gif", face_bytes[:200])})
    assert response.status_code == 422
    assert _error(response)["code"] == "invalid_image"
    _assert_good_extract(client, face_bytes)


def test_blank_image_has_no_face(client, face_bytes):
    blank = _png(np.full((240, 320, 3), 128, np.uint8))
    response = client.post("/v1/extract", files={"image": ("blank.png", blank)})
    assert response.status_code == 422
    error = _error(response)
    assert error["code"] == "no_face" and "face" in error["message"]
    _assert_good_extract(client, face_bytes)


def test_oversized_upload_gets_413(client, face_bytes):
    big = face_bytes + os.urandom(MAX_IMAGE_BYTES)
    response = client.post("/v1/extract", files={"image": ("big.gif", big)})
    assert response.status_code == 413
    error = _error(response)
    assert error["code"] == "too_large" and str(MAX_IMAGE_BYTES) in error["message"]
    _assert_good_extract(client, face_bytes)


def test_missing_field_names_it(client, face_bytes):
    response = client.post("/v1/extract", files={"photo": ("a.gif", face_bytes)})
    assert response.status_code == 422
    error = _error(response)
    assert error["code"] == "missing_field" and "'image'" in error["message"] and "photo" in error["message"]
    # A JSON body instead of an upload.
    response = client.post("/v1/extract", json={"image": "aGVsbG8="})
    assert response.status_code == 415 and _error(response)["code"] == "not_multipart"
    _assert_good_extract(client, face_bytes)


def test_too_many_images_for_predict(client, face_bytes):
    files = [("images", (f"{i}.gif", face_bytes)) for i in range(MAX_IMAGES + 1)]
    response = client.post("/v1/predict", files=files)
    assert response.status_code == 413
    error = _error(response)
    assert error["code"] == "too_many_images" and str(MAX_IMAGES) in error["message"]
    _assert_good_extract(client, face_bytes)


def test_openapi_documents_the_endpoints(client):
    spec = client.get("/openapi.json").json()
    for path in ("/v1/extract", "/v1/predict", "/v1/health", "/v1/models"):
        assert path in spec["paths"], path
    upload = spec["paths"]["/v1/extract"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert upload["schema"]["required"] == ["image"]
