"""The gallery over HTTP on a real local Ray Serve app, the gallery and the embedding bundle on a
real S3 server (moto): London split by person, the test people's neutral photos enrolled through
/v1/gallery/{person}, their smiling photos identified through /v1/identify; rank-1 must be the
figure computed offline on the same split from the same extraction."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
from support.fixtures import free_port
from support.ray import fresh_ray

httpx = pytest.importorskip("httpx")

pytestmark = [pytest.mark.slow, pytest.mark.ray]

TOKEN = "gallery-token-1"
APP_NAME = "facedist-gallery-test"
TRAIN_PEOPLE = 12  # training people whose pairs set the threshold


@pytest.fixture(scope="module")
def london_split(yale_dir):
    """(test rows, training rows) of London's labels: seed 0, fold 0 of the person report's 5 folds."""
    from facedist.reports.person import person_folds

    root = yale_dir.parent / "london"
    if not (root / "labels.csv").is_file():
        pytest.fail(f"London set not found at {root}")
    with open(root / "labels.csv") as fh:
        # The manifest's age is years (a float label, "NA" unknown), as datasets.py reads it.
        labels = [dict(r, path=str(root / r["path"]), age=float(r["age"]) if r.get("age") not in (None, "", "NA") else None)
                  for r in csv.DictReader(fh)]
    subjects = np.array([r["subject"] for r in labels])
    folds = person_folds(subjects, 5, 0)
    test = [r for r, f in zip(labels, folds) if f == 0]
    train_people = sorted({r["subject"] for r, f in zip(labels, folds) if f != 0})[:TRAIN_PEOPLE]
    return test, [r for r in labels if r["subject"] in train_people]


@pytest.fixture(scope="module")
def extract_settings():
    from facedist.gallery.embedding import EMBEDDING_PRESET

    # What the shipped embedding reads, and no more: face-api's nets are not needed.
    return {"backend": "tddfa-fit", "detector": "faceboxes", "face_attributes": False,
            "texture": "tex" in EMBEDDING_PRESET["inputs"]}


@pytest.fixture(scope="module")
def extracted(london_split, extract_settings):
    """Every photo of the split extracted here, as `facedist extract` would: {path: row}."""
    from facedist.images import decode_image
    from facedist.extraction.config import ExtractConfig
    from facedist.extraction.rows import extract_rows

    extractor = ExtractConfig(**extract_settings).build_extractor()
    test, train = london_split
    labels = test + train
    rows = [{**r, "image": decode_image(open(r["path"], "rb").read())} for r in labels]
    finished, _ = extract_rows(rows, extractor)
    assert all(r["status"] == "ok" for r in finished)
    return {r["path"]: r for r in finished}, extractor.layout


@pytest.fixture(scope="module")
def embedding(london_split, extracted, s3_server):
    """The shipped preset's embedding fitted on the training people, saved on the S3 server."""
    import boto3

    from facedist.gallery.embedding import EMBEDDING_PRESET, EmbeddingModel, fit_embedding
    from facedist.schema import rows_to_table
    from facedist.training.data import table_to_data

    rows, layout = extracted
    _, train = london_split
    data = table_to_data(rows_to_table([rows[r["path"]] for r in train], layout))
    model = fit_embedding(data, EMBEDDING_PRESET["inputs"], EMBEDDING_PRESET["whiten"])
    bucket = "facedist-gallery-serve"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    model.save(f"s3://{bucket}/models/embedding")
    return EmbeddingModel.load(f"s3://{bucket}/models"), f"s3://{bucket}"


@pytest.fixture(scope="module")
def server(embedding, extract_settings):
    import ray
    from ray import serve

    from facedist import runtime
    from facedist.serving.app import run_server

    _, bucket = embedding
    saved = os.environ.get("FACEDIST_API_TOKEN")
    os.environ["FACEDIST_API_TOKEN"] = TOKEN
    fresh_ray()  # the replicas must inherit the token: a Ray started before it was set would not pass it on
    runtime.connect(num_cpus=2)
    port = free_port()
    try:
        run_server(None, host="127.0.0.1", port=port, name=APP_NAME, blocking=False,
                   gallery_uri=f"{bucket}/gallery", embedding_uri=f"{bucket}/models/embedding",
                   num_replicas=1, extractor_num_cpus=1, max_batch_size=4, request_timeout_s=120,
                   **extract_settings)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        if saved is None:
            os.environ.pop("FACEDIST_API_TOKEN", None)
        else:
            os.environ["FACEDIST_API_TOKEN"] = saved


def _files(rows: list[dict], field: str = "images") -> list:
    return [(field, (os.path.basename(r["path"]), open(r["path"], "rb").read(), "image/jpeg")) for r in rows]


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_london_split_by_person_over_http_matches_the_offline_rank1(server, london_split, extracted, embedding):
    model, _ = embedding
    rows, _ = extracted
    test, _ = london_split
    neutral = [r for r in test if r["expression"] == "neutral"]
    smiling = [r for r in test if r["expression"] != "neutral"]
    # Offline, the same split: each smiling photo against the test people's neutral photos.
    gallery_e, _, _ = model.embed_rows([rows[r["path"]] for r in neutral])
    probe_e, _, _ = model.embed_rows([rows[r["path"]] for r in smiling])
    nearest = np.array([neutral[j]["subject"] for j in (probe_e @ gallery_e.T).argmax(1)])
    offline = float(np.mean(nearest == np.array([r["subject"] for r in smiling])))

    with httpx.Client(base_url=server, timeout=180) as client:
        # Enrolment and deletion need the token.
        assert client.post(f"/v1/gallery/{neutral[0]['subject']}", files=_files(neutral[:1])).status_code == 401
        assert client.delete(f"/v1/gallery/{neutral[0]['subject']}").status_code == 401
        for r in neutral:
            answer = client.post(f"/v1/gallery/{r['subject']}", files=_files([r]), headers=AUTH)
            assert answer.status_code == 200, answer.text
            assert answer.json()["enrolled_photos"] == 1
        info = client.get("/v1/gallery", headers=AUTH).json()
        assert info["people"] == len(neutral) and info["embedding"]["version"] == model.version
        hits = []
        for r in smiling:
            answer = client.post("/v1/identify", files=_files([r]), headers=AUTH)
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["identity"] in (body["top_k"][0]["person"], "unknown")
            hits.append(body["top_k"][0]["person"] == r["subject"])
        assert float(np.mean(hits)) == offline

        # Verify: a person's neutral against their smiling photo, the score as offline.
        answer = client.post("/v1/verify", files=_files(neutral[:1], "a") + _files(smiling[:1], "b"), headers=AUTH)
        assert answer.status_code == 200, answer.text
        j = [r["subject"] for r in smiling].index(neutral[0]["subject"])
        np.testing.assert_allclose(answer.json()["score"], float(gallery_e[0] @ probe_e[j]), atol=1e-4)

        # Delete: gone from every answer, and a second delete finds nobody.
        gone = neutral[0]["subject"]
        answer = client.delete(f"/v1/gallery/{gone}", headers=AUTH)
        assert answer.status_code == 200 and answer.json()["removed_photos"] == 1, answer.text
        answer = client.post("/v1/identify?k=50", files=_files([smiling[j]]), headers=AUTH).json()
        assert gone not in [m["person"] for m in answer["top_k"]]
        assert len(answer["top_k"]) == len(neutral) - 1
        assert client.delete(f"/v1/gallery/{gone}", headers=AUTH).status_code == 404
