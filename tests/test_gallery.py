"""The gallery store (facedist.gallery): concurrent enrolment, a killed writer, delete, reloads and
exact search, on a local folder and on a real S3 server (moto), with real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from facedist import storage
from facedist.gallery.embedding import (EmbeddingModel, aggregate, fit_whitening, pair_scores, threshold_at_far,
                                        unit)
from facedist.gallery.search import GalleryIndex, identify
from facedist.gallery.store import Enrolment, Gallery, GalleryReader

REPO = Path(__file__).resolve().parents[1]
VERSION, DIM = "synthetic01", 32

# A writer process: enrols people NAME-0 .. NAME-(N-1), PHOTOS photos each, one part per person.
# With GATE it says "ready" once imported and waits for a line on stdin before its first
# enrolment, so that two writers started together enrol at the same time (their start-up, about
# a second of imports, varies more than a short run of enrolments lasts).
WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from facedist.gallery.store import Gallery
    uri, name, n, photos, gate = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
    gallery = Gallery(uri)
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    if gate:
        print("ready", flush=True)
        sys.stdin.readline()
    for i in range(n):
        gallery.enroll(f"{name}-{i}", rng.normal(size=(photos, DIM)).astype(np.float32),
                       [f"{name}-{i}-{k}.jpg" for k in range(photos)], "VERSION", "descriptor")
        print(i, flush=True)
""").replace("DIM", str(DIM)).replace("VERSION", VERSION)


def _writer(uri: str, name: str, n: int, photos: int = 2, gate: bool = False) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", WRITER, uri, name, str(n), str(photos), "1" if gate else "0"],
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(params=["local", "s3"])
def gallery_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "gallery")
    return request.getfixturevalue("s3_bucket") + "/galleries/g1"


def _people(rng, n: int, photos: int = 3, spread: float = 0.3) -> dict[str, np.ndarray]:
    centres = unit(rng.normal(size=(n, DIM)))
    return {f"person-{i:03d}": unit(c + spread * rng.normal(size=(photos, DIM)) / np.sqrt(DIM))
            for i, c in enumerate(centres)}


def _every_file_rows(uri: str) -> list[tuple[str, list[str], np.ndarray]]:
    """Every file under the gallery URI, hidden ones included where local: (file, people, embeddings)
    of each Parquet file; other files as raw bytes checked by the caller."""
    out = []
    if storage.is_s3(uri):
        files = storage.list_files(uri)
    else:
        files = [str(p) for p in Path(uri).rglob("*") if p.is_file()]
    for f in files:
        if f.endswith(".parquet") or ".tmp-" in f:
            fs, path = storage.filesystem_for(f)
            table = pq.read_table(path, filesystem=fs)
            people = table.column("person").to_pylist()
            values = np.asarray(table.column("embedding").to_pylist(), np.float32).reshape(len(people), -1)
            out.append((f, people, values))
        else:
            out.append((f, [], np.zeros((0, DIM), np.float32)))
    return out


def test_two_processes_enrolling_at_once_lose_neither(gallery_uri):
    n = 60
    writers = [_writer(gallery_uri, name, n, gate=True) for name in ("a", "b")]
    for w in writers:
        assert w.stdout.readline().strip() == "ready", w.stderr.read()
    for w in writers:  # both start enrolling now
        w.stdin.write("go\n")
        w.stdin.flush()
    for w in writers:
        _, err = w.communicate(timeout=600)
        assert w.returncode == 0, err
    loaded = Gallery(gallery_uri).load()
    assert len(loaded.photos) == 2 * n
    assert set(loaded.photos) == {f"{name}-{i}" for name in "ab" for i in range(n)}
    assert set(loaded.photos.values()) == {2}


def test_a_writer_killed_mid_enrolment_leaves_the_gallery_as_before_plus_whole_enrolments(gallery_uri):
    gallery = Gallery(gallery_uri)
    rng = np.random.default_rng(0)
    before = _people(rng, 5)
    for person, x in before.items():
        gallery.enroll(person, x, None, VERSION, "descriptor")
    # Large enrolments (4,000 photos: a part of about 0.6 MB), so the kill lands while writing.
    writer = _writer(gallery_uri, "killed", 50, photos=4000)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(gallery.parts()) < 7:
        time.sleep(0.05)
    time.sleep(float(rng.uniform(0, 0.3)))
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=60)
    loaded = gallery.load()
    for person, x in before.items():
        assert loaded.photos[person] == len(x)
        assert loaded.index.top(aggregate(x), 1)[0].person == person
    added = {p: n for p, n in loaded.photos.items() if p.startswith("killed-")}
    assert added, "the writer was killed before its first enrolment landed"
    assert len(added) < 50, "the writer finished before it was killed"
    assert set(added.values()) == {4000}  # whole enrolments only
    # ...and they are the writer's first ones, in order.
    assert sorted(added, key=lambda p: int(p.split("-")[1])) == [f"killed-{i}" for i in range(len(added))]


def test_delete_removes_every_trace_and_identify_never_returns_the_person(gallery_uri):
    gallery = Gallery(gallery_uri)
    rng = np.random.default_rng(1)
    people = _people(rng, 30)
    target = "person-007"
    # The target is in a shared part (a bulk enrolment) and enrolled a second time on their own.
    gallery.enroll_many([Enrolment(p, x, [f"{p}-{k}.jpg" for k in range(len(x))]) for p, x in people.items()],
                        VERSION, "descriptor")
    extra = unit(people[target] + 0.01)
    gallery.enroll(target, extra, None, VERSION, "descriptor")
    reader = GalleryReader(gallery, VERSION)
    reader.refresh()
    model = EmbeddingModel(("emb",), [DIM], threshold=-1.0)  # every match is "known"
    assert identify(reader.loaded.index, model, people[target], 3)["identity"] == target

    removed = gallery.delete(target)
    assert removed["photos"] == len(people[target]) + len(extra)
    assert removed["enrolments"] == 2
    assert len(removed["parts_removed"]) == 2 and len(removed["parts_written"]) == 1

    assert reader.refresh()  # the listing changed: reloaded
    assert target not in reader.loaded.photos and len(reader.loaded.photos) == 29
    for person, x in people.items():  # nobody answers with the deleted person, whatever the query
        answer = identify(reader.loaded.index, model, x, len(people))
        assert target not in [m["person"] for m in answer["top_k"]]
    gone = np.concatenate([people[target], extra])
    for f, names, values in _every_file_rows(gallery_uri):
        assert target not in names, f
        if len(values):
            assert np.abs(values @ gone.T).max() < 0.999, f"{f} still holds one of the person's embeddings"
        else:
            assert target.encode() not in storage.read_bytes(f), f
    assert gallery.delete(target)["photos"] == 0  # nothing left to remove


def test_a_reader_reloads_only_when_the_listing_changes(tmp_path):
    uri = str(tmp_path / "g")
    rng = np.random.default_rng(2)
    people = _people(rng, 4)
    writer, reader = Gallery(uri), GalleryReader(Gallery(uri), VERSION)
    assert reader.refresh(force=True) and len(reader.loaded.index) == 0
    writer.enroll("person-000", people["person-000"], None, VERSION, "descriptor")
    assert reader.refresh() and list(reader.loaded.photos) == ["person-000"]
    assert not reader.refresh()  # unchanged: nothing read
    writer.enroll("person-000", people["person-001"][:1], None, VERSION, "descriptor")  # a second enrolment
    assert reader.refresh() and reader.loaded.photos == {"person-000": 4}
    # The aggregate is over both enrolments' photos.
    both = np.concatenate([people["person-000"], people["person-001"][:1]])
    np.testing.assert_allclose(reader.loaded.index.matrix[0], aggregate(both), atol=1e-5)


def test_another_embedding_is_refused(tmp_path):
    from facedist.gallery.store import GalleryError

    gallery = Gallery(str(tmp_path / "g"))
    gallery.enroll("x", np.ones((1, DIM), np.float32), None, VERSION, "descriptor")
    with pytest.raises(GalleryError, match="version"):
        gallery.enroll("y", np.ones((1, DIM), np.float32), None, "another", "whitened")
    with pytest.raises(GalleryError):
        GalleryReader(gallery, "another").refresh()


def test_search_is_exact_across_blocks_and_batches():
    from facedist.gallery import search

    rng = np.random.default_rng(3)
    n = search.GALLERY_BLOCK + 1234  # two blocks
    matrix = unit(rng.normal(size=(n, 16)))
    index = GalleryIndex([str(i) for i in range(n)], matrix)
    queries = unit(rng.normal(size=(search.QUERY_BATCH + 7, 16)))
    scores, rows = index.search(queries, 5)
    full = queries @ matrix.T
    expected = np.argsort(-full, axis=1)[:, :5]
    np.testing.assert_array_equal(rows, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(full, expected, 1), rtol=1e-5, atol=1e-6)
    assert index.search(queries[:2], 10 * n)[1].shape == (2, n)  # k past the gallery: everyone


def test_threshold_at_far_accepts_at_most_that_share_of_impostors():
    rng = np.random.default_rng(4)
    impostor = rng.normal(size=1000)
    t = threshold_at_far(impostor, 0.01)
    assert np.mean(impostor >= t) <= 0.01
    assert np.mean(impostor >= np.sort(impostor)[::-1][10]) > 0.01  # and it is the lowest such threshold


def test_the_whitened_embedding_discounts_what_varies_within_a_person_and_round_trips(tmp_path):
    """People differ along some directions; one nuisance direction (say expression) varies within
    each person far more: the learned map must rank a person's own photos first, the raw cosine not."""
    rng = np.random.default_rng(5)
    people, photos, d = 40, 4, 12
    centres = rng.normal(size=(people, d))
    nuisance = np.zeros(d)
    nuisance[0] = 1
    x = np.repeat(centres, photos, 0) * 0.2 + rng.normal(size=(people * photos, 1)) * 5 * nuisance
    x += 0.02 * rng.normal(size=x.shape)
    subjects = np.repeat([f"s{i}" for i in range(people)], photos)
    raw_genuine, raw_impostor = pair_scores(x, subjects)
    mean, projection = fit_whitening(x, subjects)
    model = EmbeddingModel(("emb",), [d], mean, projection)
    genuine, impostor = pair_scores(model.embed(x), subjects)
    tar = lambda g, i: np.mean(g >= threshold_at_far(i, 0.01))  # noqa: E731
    assert tar(genuine, impostor) > tar(raw_genuine, raw_impostor) + 0.3
    model.threshold = threshold_at_far(impostor)
    model.save(str(tmp_path / "models" / "embedding"))
    back = EmbeddingModel.load(str(tmp_path / "models"))
    assert back.version == model.version and back.kind == "whitened" and back.threshold == model.threshold
    np.testing.assert_allclose(back.embed(x[:3]), model.embed(x[:3]), atol=1e-6)


def test_serve_takes_a_models_folder_holding_only_the_embedding(tmp_path):
    from facedist.gallery.command import serve_uris

    models = tmp_path / "models"
    EmbeddingModel(("emb",), [DIM]).save(str(models / "embedding"))
    assert serve_uris(str(models), None) == (None, str(models / "embedding"))  # no classifier: gallery only
    (models / "gender").mkdir()
    (models / "gender" / "model.pt").write_bytes(b"")
    assert serve_uris(str(models), "elsewhere") == (str(models), "elsewhere")


def test_the_open_set_threshold_rises_with_the_gallery_and_travels_in_the_bundle(tmp_path):
    """Against N people a never-enrolled probe meets N impostors: identify's cut-off must sit
    where one pair in N/0.01 passes, not one in 100."""
    rng = np.random.default_rng(6)
    impostor = rng.normal(size=20_000)
    model = EmbeddingModel(("emb",), [DIM], threshold=threshold_at_far(impostor, 0.01),
                           impostor_tail=np.sort(impostor)[::-1][:2000].copy(), impostor_pairs=len(impostor))
    cuts = [model.open_set_threshold(n) for n in (1, 10, 100, 10_000)]
    assert cuts[0] == model.threshold and cuts == sorted(cuts) and cuts[1] < cuts[2] < cuts[3]
    assert np.mean(impostor >= cuts[2]) <= 0.01 / 100
    assert cuts[3] > impostor.max()  # finer than one training pair: above every training impostor
    model.save(str(tmp_path / "embedding"))
    back = EmbeddingModel.load(str(tmp_path / "embedding"))
    assert [back.open_set_threshold(n) for n in (1, 10, 100, 10_000)] == cuts
