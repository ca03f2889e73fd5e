"""The HTTP API on a real local Ray Serve app: real uploads of Yale photos, real models.

One module-scoped app (Ray with 2 CPUs, fractional replicas; tests/support/serving.py) serves every
test; each bad request is followed by a good one to show the server keeps serving.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")

# The app's fixtures (server, client, models_uri, extractor, face_bytes) are tests/support/serving.py's.
from support.serving import (APP_NAME, MAX_IMAGE_BYTES, MAX_IMAGES, PERSON, TOKEN, error_of,  # noqa: E402
                             extract_files, png)

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _assert_good_extract(client, face_bytes) -> dict:
    response = client.post("/v1/extract", files={"image": ("subject01.normal", face_bytes)})
    assert response.status_code == 200, response.text
    return response.json()


def test_health_is_open_and_models_are_listed(server, client):
    base_url, _ = server
    health = httpx.get(f"{base_url}/v1/health", timeout=60)  # no token: probes must not need one
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["recognizer"] == "ready"
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
    assert len(body["coefficients"]["tex"]) == 80  # the shipped texture basis, by default
    # face-api's expression, age and gender, on by default.
    from facedist.schema import FACEAPI_EXPRESSIONS

    attributes = body["attributes"]
    expression = attributes["expression"]
    assert list(expression["probabilities"]) == list(FACEAPI_EXPRESSIONS)
    assert sum(expression["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert expression["label"] == max(expression["probabilities"], key=expression["probabilities"].get)
    assert attributes["age"] > 0
    assert attributes["gender"]["label"] in ("male", "female") and 0.5 <= attributes["gender"]["probability"] <= 1
    # A frontal Yale photo: small head rotation.
    assert abs(body["pose"]["yaw"]) < 30 and abs(body["pose"]["roll"]) < 30


def test_extract_response_attributes_are_null_where_the_row_has_none():
    """A server started with face_attributes=False (or a row from an old table) answers
    attributes: null; a low male probability reads as female with its complement."""
    from facedist.serving.schemas import ExtractResponse, extraction_response

    row = {"status": "ok", "backend": "tddfa", "num_faces": 1}
    assert extraction_response(row)["attributes"] is None
    body = extraction_response({**row, "expression_probs": [0.1, 0.0, 0.7, 0.1, 0.0, 0.0, 0.1], "faceapi_age": 40.0,
                                "faceapi_gender_male": 0.25})
    assert body["attributes"]["expression"]["label"] == "sad"
    assert body["attributes"]["gender"] == {"label": "female", "probability": 0.75}
    assert ExtractResponse(**body).attributes.age == 40.0


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
    error = error_of(response)
    assert error["code"] == "unauthorized" and why in error["message"]
    assert httpx.get(f"{base_url}/v1/models", headers=headers, timeout=60).status_code == 401
    _assert_good_extract(client, face_bytes)


def test_text_file_is_not_an_image(client, face_bytes):
    response = client.post("/v1/extract", files={"image": ("notes.jpg", b"hello, this is not a photo\n" * 20)})
    assert response.status_code == 415
    error = error_of(response)
    assert error["code"] == "not_an_image" and "not an image" in error["message"]
    assert error["filename"] == "notes.jpg"
    _assert_good_extract(client, face_bytes)


def test_truncated_image_is_invalid(client, face_bytes):
    response = client.post("/v1/extract", files={"image": ("cut.gif", face_bytes[:200])})
    assert response.status_code == 422
    assert error_of(response)["code"] == "invalid_image"
    _assert_good_extract(client, face_bytes)


def test_blank_image_has_no_face(client, face_bytes):
    blank = png(np.full((240, 320, 3), 128, np.uint8))
    response = client.post("/v1/extract", files={"image": ("blank.png", blank)})
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "no_face" and "face" in error["message"]
    _assert_good_extract(client, face_bytes)


def test_oversized_upload_gets_413(client, face_bytes):
    big = face_bytes + os.urandom(MAX_IMAGE_BYTES)
    response = client.post("/v1/extract", files={"image": ("big.gif", big)})
    assert response.status_code == 413
    error = error_of(response)
    assert error["code"] == "too_large" and str(MAX_IMAGE_BYTES) in error["message"]
    _assert_good_extract(client, face_bytes)
    # Within the request limit (several images allowed) but one file over the per-image limit.
    files = [("images", ("ok.gif", face_bytes)), ("images", ("big.gif", big))]
    response = client.post("/v1/predict", files=files)
    assert response.status_code == 413
    error = error_of(response)
    assert error["code"] == "too_large" and error["index"] == 1 and "big.gif" in error["message"]
    _assert_good_extract(client, face_bytes)


def test_missing_field_names_it(client, face_bytes):
    response = client.post("/v1/extract", files={"photo": ("a.gif", face_bytes)})
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "missing_field" and "'image'" in error["message"] and "photo" in error["message"]
    # A JSON body instead of an upload.
    response = client.post("/v1/extract", json={"image": "aGVsbG8="})
    assert response.status_code == 415 and error_of(response)["code"] == "not_multipart"
    _assert_good_extract(client, face_bytes)


def test_too_many_images_for_predict(client, face_bytes):
    files = [("images", (f"{i}.gif", face_bytes)) for i in range(MAX_IMAGES + 1)]
    response = client.post("/v1/predict", files=files)
    assert response.status_code == 413
    error = error_of(response)
    assert error["code"] == "too_many_images" and str(MAX_IMAGES) in error["message"]
    _assert_good_extract(client, face_bytes)


def test_openapi_documents_the_endpoints(client):
    spec = client.get("/openapi.json").json()
    for path in ("/v1/extract", "/v1/predict", "/v1/health", "/v1/models"):
        assert path in spec["paths"], path
    upload = spec["paths"]["/v1/extract"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert upload["schema"]["required"] == ["image"]


def _person_files(yale_dir, names=PERSON):
    return [("images", (name, (yale_dir / name).read_bytes())) for name in names]


def test_predict_identity_expressions_and_confidences(client, yale_dir, extractor, models_uri):
    from facedist.recognition import Recognizer

    response = client.post("/v1/predict", files=_person_files(yale_dir))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["num_images"] == 3 and body["num_used"] == 3
    identity = body["identity"]
    assert identity["aggregation"] == "cnet" and len(identity["coefficients"]) == 40
    scores = [entry["score"] for entry in identity["top_k"]]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True) and sum(scores) <= 1 + 1e-6
    assert all(entry["label"].startswith("subject") for entry in identity["top_k"])
    assert body["gender"] is None  # Yale has no gender labels: no gender model was trained
    # The age model's estimate (on the fixture's made-up ages, 23-65) with its validation MAE.
    assert 0 < body["age"] < 120 and body["age_mae"] > 0
    for image, name in zip(body["images"], PERSON):
        assert image["filename"] == name and image["status"] == "ok"
        probabilities = image["expression"]["probabilities"]
        assert set(probabilities) == {"happy", "normal", "sad", "sleepy", "surprised", "wink"}
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-4)
        assert image["expression"]["label"] == max(probabilities, key=probabilities.get)
        assert len(image["confidence"]) == 40 and min(image["confidence"]) > 0
    # The served answer is the in-process answer for the same photos (batching mixes nothing up).
    expected = Recognizer.from_directory(models_uri).predict(
        extract_files(extractor, [yale_dir / n for n in PERSON]), top_k=5)
    assert [e["label"] for e in identity["top_k"]] == [e["label"] for e in expected["identity"]["top_k"]]
    np.testing.assert_allclose(scores, [e["score"] for e in expected["identity"]["top_k"]], atol=1e-3)
    np.testing.assert_allclose(body["images"][0]["confidence"], expected["images"][0]["confidence"], atol=1e-3)


def test_predict_leaves_out_a_faceless_image_and_rejects_all_faceless(client, yale_dir, face_bytes):
    blank = png(np.full((240, 320, 3), 200, np.uint8))
    files = _person_files(yale_dir, PERSON[:2]) + [("images", ("blank.png", blank))]
    response = client.post("/v1/predict", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["num_images"] == 3 and body["num_used"] == 2
    assert body["images"][2]["status"] == "no_face" and body["images"][2]["expression"] is None
    response = client.post("/v1/predict", files=[("images", ("blank.png", blank))] * 2)
    assert response.status_code == 422 and error_of(response)["code"] == "no_face"
    # A text file among the photos rejects the request and names it.
    response = client.post("/v1/predict", files=_person_files(yale_dir, PERSON[:1]) + [("images", ("x.txt", b"hi there" * 9))])
    assert response.status_code == 415 and error_of(response)["index"] == 1
    assert client.post("/v1/predict", files=_person_files(yale_dir, PERSON[:1])).status_code == 200


def test_models_lists_recognizer_versions(client):
    recognizer = client.get("/v1/models").json()["recognizer"]
    assert recognizer["models_uri"].startswith("s3://")
    assert set(recognizer["models"]) == {"cnet", "identity", "expression", "age"}
    for task, model in recognizer["models"].items():
        assert len(model["version"]) == 12 and model["trained_on"]["backend"] == "tddfa"
    assert len(recognizer["models"]["identity"]["labels"]) == 15


def test_config_yaml_is_a_valid_serve_config_that_builds():
    """serve/config.yaml passes Ray's own schema, overrides no deployment, and its import path
    builds the app with every deployment option taken from the one ServeSettings."""
    import importlib

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from facedist.serving.app import deployment_options
    from facedist.serving.settings import ServeSettings

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "serve" / "config.yaml").read_text()))
    (app,) = config.applications
    assert not app.deployments  # a `deployments:` section would override what the settings derive
    module_name, attr = app.import_path.split(":")
    built = getattr(importlib.import_module(module_name), attr)(app.args)
    expected = deployment_options(ServeSettings.from_args(app.args))
    ingress = built._bound_deployment
    extractor, recognizer = (child._bound_deployment for child in ingress.init_args[:2])
    for deployment in (ingress, extractor, recognizer):
        options = expected[deployment.name]
        assert deployment.ray_actor_options["num_cpus"] == options["ray_actor_options"]["num_cpus"]
        assert deployment.max_ongoing_requests == options["max_ongoing_requests"]
        assert deployment._deployment_config.max_queued_requests == options["max_queued_requests"] > 0
    # The extractor's autoscaling stops at what the cluster's CPUs hold (the test cluster's 2:
    # one replica; with no Ray up, as `serve build` checks a config, 4).
    import ray

    cpus = ray.cluster_resources()["CPU"] if ray.is_initialized() else None
    scaling = expected["FaceExtractor"]["autoscaling_config"]
    assert scaling["max_replicas"] == (ServeSettings().replicas_that_fit(cpus) if cpus else 4)
    assert scaling["max_replicas"] >= scaling["min_replicas"]
    # The legacy import path is the same builder.
    from serve.app import build_app as legacy

    assert legacy is importlib.import_module("facedist.serving.app").build_app


# -- overload and deadlines (bounded queues: facedist.serving.ingress.Admission) --

LIMITS_PREFIX = "/limits"


@pytest.fixture(scope="module")
def limited_app(server):
    """A second app on the same Serve instance whose ingress accepts one image at a time: one
    upload held half-sent fills it, with no timing involved."""
    from ray import serve

    from facedist.serving.app import build_app

    base_url, _ = server
    settings = {"ingress_max_accepted_images": 1, "num_replicas": 1, "extractor_num_cpus": 0.25,
                "recognizer_num_cpus": 0.05, "ingress_num_cpus": 0.05, "max_image_bytes": MAX_IMAGE_BYTES}
    serve.run(build_app(settings), name="facedist-limits", route_prefix=LIMITS_PREFIX)
    try:
        yield f"{base_url}{LIMITS_PREFIX}"
    finally:
        serve.delete("facedist-limits")


def _multipart(data: bytes, boundary: str = "facedist-test-boundary") -> tuple[bytes, str]:
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="held.gif"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_a_full_ingress_answers_503_overloaded_at_once_and_serves_again_after(limited_app, face_bytes):
    """An upload sent only in part holds the app's one slot: every other model request is told
    503 overloaded with Retry-After, before its body is read (a JSON body, which would be a 415
    once admitted, shows it); once the held upload completes it is answered 200, and new
    requests are served again."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(limited_app)
    body, content_type = _multipart(face_bytes)
    held = socket.create_connection((url.hostname, url.port), timeout=120)
    try:
        held.sendall((f"POST {url.path}/v1/extract HTTP/1.1\r\nHost: {url.netloc}\r\n"
                      f"Authorization: Bearer {TOKEN}\r\nContent-Type: {content_type}\r\n"
                      f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body[:100])
        probe = None
        with httpx.Client(base_url=limited_app, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
            for _ in range(600):  # until the held upload has reached the ingress (bounded)
                probe = c.post("/v1/extract", json={"image": "not multipart"})
                if probe.status_code == 503:
                    break
                assert probe.status_code == 415, probe.text  # admitted: the upload check answers
            assert probe is not None and probe.status_code == 503, "the held upload never filled the ingress"
            assert error_of(probe)["code"] == "overloaded"
            assert int(probe.headers["retry-after"]) >= 1
            # A real photo is turned away the same way, before any model work.
            turned_away = c.post("/v1/extract", files={"image": ("subject01.normal", face_bytes)})
            assert turned_away.status_code == 503 and error_of(turned_away)["code"] == "overloaded"
            # The held request completes and is answered; then the app serves again.
            held.sendall(body[100:])
            answer = b""
            while chunk := held.recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
            again = c.post("/v1/extract", files={"image": ("subject01.normal", face_bytes)})
            assert again.status_code == 200, again.text
    finally:
        held.close()


def test_a_request_past_its_deadline_is_504_and_its_model_work_is_not_done(client, face_bytes):
    """X-Request-Timeout lowers the deadline: one of a nanosecond has passed by the time the
    upload is read, so the answer is 504 deadline_exceeded and the extractor sees no image."""
    from ray import serve

    extractor = serve.get_deployment_handle("FaceExtractor", APP_NAME)
    before = extractor.stats.remote().result()["images"]
    response = client.post("/v1/extract", files={"image": ("subject01.normal", face_bytes)},
                           headers={"X-Request-Timeout": "1e-9"})
    assert response.status_code == 504, response.text
    assert error_of(response)["code"] == "deadline_exceeded"
    assert extractor.stats.remote().result()["images"] == before
    _assert_good_extract(client, face_bytes)


def test_the_extractor_drops_an_image_whose_deadline_passed_while_it_queued(server, face_bytes):
    import time

    from ray import serve

    extractor = serve.get_deployment_handle("FaceExtractor", APP_NAME)
    before = extractor.stats.remote().result()
    row = extractor.extract.remote((face_bytes, False, time.time() - 1.0)).result()
    assert row["deadline_exceeded"] and row["status"] == "error"
    after = extractor.stats.remote().result()
    assert after["images"] == before["images"]
    assert after["dropped_past_deadline"] == before["dropped_past_deadline"] + 1
    # With time left it is extracted.
    assert extractor.extract.remote((face_bytes, False, time.time() + 600)).result()["status"] == "ok"
