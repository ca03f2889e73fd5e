"""The gallery behind the HTTP API: one Serve deployment that holds the embedding model and the
loaded gallery (search index over person aggregates), loaded once per replica.

A replica lists the gallery's parts at most every ``gallery_refresh_s`` seconds before a search
and reloads when the listing changed (only new parts are read), so an enrolment or a delete made
by another replica or process is seen within that time; its own enrolments and deletes reload at
once. Methods take extraction rows (the FaceExtractor's) and answer plain dicts; a request
problem comes back as {"error": {"status", "code", "message"}} for the ingress to raise.
"""

from __future__ import annotations

import asyncio
import threading
import time

from ray import serve

from facedist.serving.settings import ServeSettings


def _error(status: int, code: str, message: str) -> dict:
    return {"error": {"status": status, "code": code, "message": message}}


def _left_out(rows: list[dict], missing: dict, names: list[str | None]) -> list[dict]:
    return [{"index": i, "filename": names[i] if i < len(names) else None, "reason": why}
            for i, why in sorted(missing.items())]


@serve.deployment(name="FaceGallery")
class FaceGallery:
    def __init__(self, settings: dict):
        from facedist import storage
        from facedist.gallery.embedding import EMBEDDING_TASK, EmbeddingModel
        from facedist.gallery.store import Gallery, GalleryReader

        s = ServeSettings(**settings)
        uri = s.embedding_uri or (storage.join(s.models_uri, EMBEDDING_TASK) if s.models_uri else None)
        if uri is None:
            raise ValueError("the gallery needs an embedding bundle: models_uri with embedding/, or embedding_uri")
        self.model = EmbeddingModel.load(uri)
        self.embedding_uri = uri
        self.gallery = Gallery(s.gallery_uri)
        self.reader = GalleryReader(self.gallery, self.model.version)
        self.refresh_s = s.gallery_refresh_s
        self.top_k = s.top_k
        self.lock = threading.Lock()  # one reload at a time; searches use the index they got
        self.reader.refresh(force=True)
        self.checked = time.monotonic()

    def _current(self, force: bool = False):
        with self.lock:
            if force or time.monotonic() - self.checked >= self.refresh_s:
                self.reader.refresh(force=force)
                self.checked = time.monotonic()
            return self.reader.loaded

    async def enroll(self, person: str, rows: list[dict], names: list[str | None]) -> dict:
        return await asyncio.to_thread(self._enroll, person, rows, names)

    def _enroll(self, person: str, rows: list[dict], names: list[str | None]) -> dict:
        embeddings, have, missing = self.model.embed_rows(rows)
        if not have:
            return _error(422, "no_face", "no usable face in any of the images: "
                          + "; ".join(f"#{i}: {why}" for i, why in sorted(missing.items())))
        written = self.gallery.enroll(person, embeddings, [names[i] for i in have], self.model.version,
                                      self.model.kind)
        loaded = self._current(force=True)
        return {"person": person, "enrolled_photos": written["photos"], "photos": loaded.photos.get(person, 0),
                "left_out": _left_out(rows, missing, names), "people": len(loaded.photos)}

    async def delete(self, person: str) -> dict:
        return await asyncio.to_thread(self._delete, person)

    def _delete(self, person: str) -> dict:
        removed = self.gallery.delete(person)
        loaded = self._current(force=True)
        if not removed["photos"]:
            return _error(404, "not_found", f"{person!r} is not in the gallery")
        return {"person": person, "removed_photos": removed["photos"], "removed_enrolments": removed["enrolments"],
                "parts_removed": len(removed["parts_removed"]), "parts_written": len(removed["parts_written"]),
                "people": len(loaded.photos)}

    async def identify(self, rows: list[dict], names: list[str | None], top_k: int | None = None) -> dict:
        return await asyncio.to_thread(self._identify, rows, names, top_k)

    def _identify(self, rows: list[dict], names: list[str | None], top_k: int | None) -> dict:
        from facedist.gallery.search import identify

        embeddings, have, missing = self.model.embed_rows(rows)
        if not have:
            return _error(422, "no_face", "no usable face in any of the images: "
                          + "; ".join(f"#{i}: {why}" for i, why in sorted(missing.items())))
        loaded = self._current()
        answer = identify(loaded.index, self.model, embeddings, top_k or self.top_k)
        return {**answer, "left_out": _left_out(rows, missing, names), "people": len(loaded.photos)}

    async def verify(self, rows_a: list[dict], rows_b: list[dict], names_a: list, names_b: list) -> dict:
        from facedist.gallery.search import verify

        a, have_a, missing_a = self.model.embed_rows(rows_a)
        b, have_b, missing_b = self.model.embed_rows(rows_b)
        for label, have, missing in (("a", have_a, missing_a), ("b", have_b, missing_b)):
            if not have:
                return _error(422, "no_face", f"no usable face in any of the images of '{label}': "
                              + "; ".join(f"#{i}: {why}" for i, why in sorted(missing.items())))
        return {**verify(self.model, a, b), "left_out": {"a": _left_out(rows_a, missing_a, names_a),
                                                         "b": _left_out(rows_b, missing_b, names_b)}}

    def info(self) -> dict:
        loaded = self._current()
        return {"gallery_uri": self.gallery.uri, "people": len(loaded.photos),
                "photos": int(sum(loaded.photos.values())), "parts": loaded.parts,
                "embedding": {"uri": self.embedding_uri, "version": self.model.version, "kind": self.model.kind,
                              "inputs": list(self.model.inputs), "dim": self.model.dim,
                              "threshold": self.model.threshold, "far": self.model.far}}
