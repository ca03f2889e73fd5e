"""The gallery on a local folder or an s3:// prefix (through facedist.storage):

    <gallery>/gallery.json          the embedding it holds (version, kind, width); written once
    <gallery>/parts/part-<time>-<id>.parquet
                                    immutable; one per enrolment (a bulk enrolment: one per batch
                                    of whole enrolments). A row per photo: person, photo,
                                    enrolment id, photo index, embedding (unit float32)

The manifest is the listing of parts/: a part is in the gallery exactly when its object exists.

Why parts and a listing, not one manifest object updated in place: without conditional writes
(compare-and-swap), two writers that each read the manifest, add their entry and write it back
lose one of the two entries. Here a writer only ever creates a new object under a name nobody
else uses (time + random id), and a PUT is all or nothing (on S3 the object appears whole or not
at all, multipart uploads included; locally facedist.storage writes a hidden temporary file and
renames it): two processes enrolling at once both land, and a writer killed mid-enrolment leaves
the gallery as it was plus the enrolments whose part was written whole. S3 lists are strongly
consistent (since December 2020; MinIO and Ceph alike), so a part written is listed by the next
reader. A person's aggregate (the unit mean of their photos' embeddings) is computed when the
gallery is loaded, over all their parts: stored, it would go stale when a second enrolment of the
same person lands in another part.

delete(person) writes each part holding the person again without their rows (a new name), then
removes the old part, then lists again until no part holds them. Rewritten parts keep the
enrolment ids of the rows they carry, and readers keep one copy of each enrolment, so a part
rewritten by two deleters at once (a copy each) never counts a photo twice. What is not
guarded: two deletes (or a delete and another rewrite) of the same part at the same moment can
write back the person the other removed; run deletes from one process at a time (the serving
replicas' deletes go through one gallery deployment).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from facedist import storage
from facedist.gallery.embedding import unit
from facedist.gallery.search import GalleryIndex

PARTS_DIR = "parts"
CONFIG_FILE = "gallery.json"
PART_PREFIX = "part-"
METADATA_KEY = b"facedist.gallery"
FORMAT_VERSION = 1
PART_SCHEMA = pa.schema([
    pa.field("person", pa.string(), nullable=False),
    pa.field("photo", pa.string()),                    # the photo's name (path or upload file name)
    pa.field("enrolment", pa.string(), nullable=False),  # one id per enrolment of one person
    pa.field("photo_index", pa.int32(), nullable=False),
    pa.field("embedding", pa.list_(pa.float32()), nullable=False),
])


class GalleryError(ValueError):
    """A gallery that cannot be used as asked (another embedding, unknown person)."""


@dataclass
class Enrolment:
    """One person's photos to add: their unit embeddings (N, D) and the photos' names."""

    person: str
    embeddings: np.ndarray
    photos: list[str] | None = None


def new_part_name() -> str:
    # Time first: listings come back oldest first; the random id makes the name nobody else's.
    return f"{PART_PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.parquet"


class Gallery:
    def __init__(self, uri: str, options: storage.S3Options | None = None):
        self.uri = storage.absolute(str(uri)).rstrip("/")
        self.options = options

    @property
    def parts_uri(self) -> str:
        return storage.join(self.uri, PARTS_DIR)

    # -- what it holds --

    def config(self) -> dict | None:
        path = storage.join(self.uri, CONFIG_FILE)
        return json.loads(storage.read_bytes(path, self.options)) if storage.exists(path, self.options) else None

    def check_embedding(self, version: str, dim: int, kind: str = "", create: bool = False) -> None:
        """Refuse an embedding other than the gallery's; with create, record it in a new gallery.
        The record's bytes depend only on the embedding, so writers creating the gallery at once
        write the same object."""
        config = self.config()
        if config is None:
            if create:
                body = {"format": FORMAT_VERSION, "embedding_version": version, "dim": int(dim), "kind": kind}
                storage.write_bytes(storage.join(self.uri, CONFIG_FILE),
                                    json.dumps(body, sort_keys=True).encode(), self.options)
            return
        if config.get("embedding_version") != version:
            raise GalleryError(f"{self.uri} holds embeddings of version {config.get('embedding_version')} "
                               f"({config.get('kind')}); these models' embedding is {version} ({kind}): use the "
                               f"models the gallery was enrolled with, or another gallery")

    def parts(self) -> list[str]:
        """The parts now in the gallery (the manifest), oldest first."""
        try:
            files = storage.list_files(self.parts_uri, self.options, recursive=False)
        except FileNotFoundError:
            return []
        return [f for f in files if f.rsplit("/", 1)[-1].startswith(PART_PREFIX) and f.endswith(".parquet")]

    @staticmethod
    def listing_version(parts: list[str]) -> str:
        """Changes exactly when the set of parts does (names are never reused)."""
        return hashlib.sha256("\n".join(sorted(parts)).encode()).hexdigest()[:16]

    def version(self) -> str:
        return self.listing_version(self.parts())

    # -- writing --

    def enroll(self, person: str, embeddings: np.ndarray, photos: list[str] | None = None,
               embedding_version: str = "", kind: str = "") -> dict:
        """Add one person's photos (one new part)."""
        return self.enroll_many([Enrolment(person, embeddings, photos)], embedding_version, kind)

    def enroll_many(self, enrolments: list[Enrolment], embedding_version: str = "", kind: str = "") -> dict:
        """Add whole enrolments in one new part: all of them land, or (the writer killed, the
        store failing) none."""
        enrolments = [e for e in enrolments if len(e.embeddings)]
        if not enrolments:
            return {"part": None, "people": 0, "photos": 0}
        dim = int(np.asarray(enrolments[0].embeddings).shape[1])
        self.check_embedding(embedding_version, dim, kind, create=True)
        columns: dict[str, list] = {name: [] for name in PART_SCHEMA.names}
        flat = []
        for e in enrolments:
            if not str(e.person).strip():
                raise GalleryError("a person's name must not be empty")
            x = unit(np.asarray(e.embeddings, np.float32))
            if x.shape[1] != dim:
                raise GalleryError(f"embeddings of width {x.shape[1]} beside width {dim}")
            enrolment = uuid.uuid4().hex
            photos = list(e.photos) if e.photos is not None else [None] * len(x)
            columns["person"] += [str(e.person)] * len(x)
            columns["photo"] += [None if p is None else str(p) for p in photos]
            columns["enrolment"] += [enrolment] * len(x)
            columns["photo_index"] += list(range(len(x)))
            flat.append(x)
        values = np.concatenate(flat).astype(np.float32)
        arrays = [pa.array(columns[n], PART_SCHEMA.field(n).type)
                  for n in ("person", "photo", "enrolment", "photo_index")]
        arrays.append(pa.ListArray.from_arrays(pa.array(np.arange(0, values.size + 1, dim, dtype=np.int32)),
                                               pa.array(values.ravel())))
        meta = {METADATA_KEY: json.dumps({"format": FORMAT_VERSION, "embedding_version": embedding_version,
                                          "dim": dim}).encode()}
        table = pa.Table.from_arrays(arrays, schema=PART_SCHEMA.with_metadata(meta))
        part = storage.join(self.parts_uri, new_part_name())
        storage.write_table(table, part, self.options)
        return {"part": part, "people": len(enrolments), "photos": int(len(values))}

    # -- reading --

    def read_part(self, part: str) -> pa.Table:
        return storage.read_table(part, self.options)

    def read(self) -> pa.Table:
        """Every photo row, one copy of each enrolment."""
        parts = self.parts()
        return dedupe([(p, self.read_part(p)) for p in parts])

    def load(self) -> "LoadedGallery":
        reader = GalleryReader(self)
        reader.refresh(force=True)
        return reader.loaded

    # -- deleting --

    def delete(self, person: str, max_rounds: int = 5) -> dict:
        """Remove every photo of ``person``: each part that holds them is written again without
        them, then removed; repeated until a listing shows none left (a part another writer was
        still writing). Returns what was removed."""
        removed_photos, rewritten, removed_parts, enrolments = 0, [], [], set()
        for _ in range(max_rounds):
            touched = False
            for part in self.parts():
                try:
                    table = self.read_part(part)
                except FileNotFoundError:
                    continue  # removed meanwhile (another delete)
                mine = pc.equal(table.column("person"), person)
                hits = int(pc.sum(mine).as_py() or 0)
                if not hits:
                    continue
                touched = True
                removed_photos += hits
                enrolments.update(table.filter(mine).column("enrolment").to_pylist())
                rest = table.filter(pc.invert(mine))
                if rest.num_rows:
                    target = storage.join(self.parts_uri, new_part_name())
                    storage.write_table(rest, target, self.options)
                    rewritten.append(target)
                storage.delete(part, self.options)
                removed_parts.append(part)
            removed_parts += self._remove_stale_temporaries(person)
            if not touched:
                break
        return {"person": person, "photos": removed_photos, "enrolments": len(enrolments),
                "parts_removed": removed_parts, "parts_written": rewritten}

    def _remove_stale_temporaries(self, person: str) -> list[str]:
        """Local galleries: the hidden temporary file a writer killed mid-write left behind
        (never renamed into a part, so never read) may still hold the person's embedding."""
        if storage.is_s3(self.uri) or not os.path.isdir(self.parts_uri):
            return []
        removed = []
        for name in os.listdir(self.parts_uri):
            if not (name.startswith(".") and ".tmp-" in name):
                continue
            path = os.path.join(self.parts_uri, name)
            pid = name.rsplit(".tmp-", 1)[-1]
            alive = pid.isdigit() and _pid_alive(int(pid))
            holds = True
            if alive:
                try:
                    holds = person in pq.read_table(path, columns=["person"]).column("person").to_pylist()
                except Exception:
                    holds = False  # being written now: the writer renames it into a part, seen next round
            if holds or not alive:
                try:
                    os.remove(path)
                    removed.append(path)
                except FileNotFoundError:
                    pass
        return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dedupe(tables: list[tuple[str, pa.Table]]) -> pa.Table:
    """The parts' rows with each enrolment kept from the first (oldest) part that has it: a part
    rewritten twice at once (two deletes) holds copies of the same enrolments."""
    seen: set[str] = set()
    kept = []
    for _, table in tables:
        if not table.num_rows:
            continue
        ids = table.column("enrolment")
        unique = set(pc.unique(ids).to_pylist())
        if unique & seen:
            table = table.filter(pc.invert(pc.is_in(ids, pa.array(sorted(unique & seen)))))
        seen |= unique
        kept.append(table.replace_schema_metadata(None))
    if not kept:
        return PART_SCHEMA.empty_table()
    return pa.concat_tables(kept)


@dataclass
class LoadedGallery:
    """A gallery as loaded: the search index over person aggregates, photos per person."""

    index: GalleryIndex
    photos: dict[str, int]
    version: str
    parts: int


def person_aggregates(table: pa.Table) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(people, their aggregates (P, D) unit rows, photos per person) from photo rows."""
    if not table.num_rows:
        return [], np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    people = table.column("person").to_numpy(zero_copy_only=False).astype(object)
    column = table.column("embedding").combine_chunks()
    dim = len(column[0])
    values = np.asarray(column.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(-1, dim)
    names, inverse = np.unique(people.astype(str), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse, minlength=len(names))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    sums = np.add.reduceat(unit(values)[order], starts, axis=0)
    return names.tolist(), unit(sums / counts[:, None]), counts


class GalleryReader:
    """Loads a gallery once and again only when its listing changes; parts are cached by name
    (immutable), so a reload reads just the new ones and forgets the removed ones."""

    def __init__(self, gallery: Gallery, embedding_version: str | None = None):
        self.gallery = gallery
        self.embedding_version = embedding_version
        self.cache: dict[str, pa.Table] = {}
        self.loaded: LoadedGallery | None = None

    def refresh(self, force: bool = False) -> bool:
        """List the parts; rebuild when they changed (or force). True when it rebuilt."""
        parts = self.gallery.parts()
        version = Gallery.listing_version(parts)
        if not force and self.loaded is not None and self.loaded.version == version:
            return False
        if self.embedding_version is not None and parts:
            self.gallery.check_embedding(self.embedding_version, 0)
        fresh = {}
        for part in parts:
            if part in self.cache:
                fresh[part] = self.cache[part]
                continue
            try:
                fresh[part] = self.gallery.read_part(part)
            except FileNotFoundError:
                continue  # removed between the listing and the read (a delete): gone
        self.cache = fresh
        names, matrix, counts = person_aggregates(dedupe(list(fresh.items())))
        if not names:
            matrix = np.zeros((0, 1), np.float32)
        self.loaded = LoadedGallery(GalleryIndex(names, matrix), dict(zip(names, counts.tolist())), version,
                                    len(fresh))
        return True
