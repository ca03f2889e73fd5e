"""What a photo's embedding is, and the threshold that says "same person".

An EmbeddingModel reads descriptor groups of an extraction row (schema.INPUT_GROUPS; dlib's
``face_embedding`` alone by default), optionally maps them by a linear map learned on training
people (standardise, PCA to at most 80 whitened dimensions, within-person whitening: the person
report's identity metric), and scales the result to unit length. Two embeddings are compared by
their dot product (cosine). A person is the unit-length mean of their photos' embeddings.

The bundle (``<models>/embedding/model.pt``, `facedist train --task embedding`) holds the
inputs, the map (none for the plain descriptor) and the verification threshold, chosen so that
1% of the training people's impostor pairs (photos of two different people) score at or above
it. Which embedding ships is measured in docs/results.md (scripts/embedding_report.py).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field

import numpy as np

from facedist import storage

EMBEDDING_TASK = "embedding"
DESCRIPTOR_INPUTS = ("emb",)             # dlib's 128-d face descriptor
TARGET_FAR = 0.01                        # the verification threshold's false-accept rate on training pairs
METRIC_DIMS = 80                         # as the person report's identity metric (person_report.PROBE_DIMS)
METRIC_FLOOR = 1e-2                      # its whitening floor (person_report.METRIC_FLOOR)
MAX_IMPOSTOR_PAIRS = 500_000             # impostor pairs scored when choosing a threshold (sampled past this)
IMPOSTOR_TAIL = 2_000                    # the highest training impostor scores the bundle keeps (open set)
# What `facedist train --task embedding` ships unless told otherwise: the best measured on people
# never seen in training (docs/results.md, "Gallery embedding").
EMBEDDING_PRESET = {"inputs": DESCRIPTOR_INPUTS, "whiten": False}


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def aggregate(embeddings: np.ndarray) -> np.ndarray:
    """One person from their photos' embeddings: the unit-length mean of the unit embeddings."""
    return unit(unit(embeddings).mean(0))


@dataclass
class EmbeddingModel:
    inputs: tuple[str, ...] = DESCRIPTOR_INPUTS
    input_dims: list[int] = field(default_factory=list)   # each group's width in training
    mean: np.ndarray | None = None                         # (D_in,); with projection
    projection: np.ndarray | None = None                   # (D_in, D_out); None: the inputs as they are
    threshold: float = 0.5                                 # cosine at or above: the same person
    far: float = TARGET_FAR                                # the training impostor rate the threshold was set at
    metrics: dict = field(default_factory=dict)
    layout: str = ""                                       # CoefficientLayout JSON of the training table
    # The highest training impostor scores (descending) out of impostor_pairs: what
    # open_set_threshold reads the far tail from.
    impostor_tail: np.ndarray | None = None
    impostor_pairs: int = 0

    @property
    def kind(self) -> str:
        return "descriptor" if self.projection is None else "whitened"

    @property
    def dim(self) -> int:
        return int(self.projection.shape[1]) if self.projection is not None else int(sum(self.input_dims))

    @property
    def version(self) -> str:
        """12 hex digits over what makes an embedding: a gallery enrolled with one version is
        searched only with the same (other embeddings live in another space)."""
        digest = hashlib.sha256(json.dumps([list(self.inputs), list(self.input_dims)]).encode())
        for array in (self.mean, self.projection):
            if array is not None:
                digest.update(np.ascontiguousarray(array, np.float32).tobytes())
        return digest.hexdigest()[:12]

    def open_set_threshold(self, people: int, false_alarm: float | None = None) -> float:
        """identify's cut-off ("unknown" below it) against ``people`` enrolled people. A probe of
        someone never enrolled meets ``people`` impostors, and the best of them decides: with each
        pair's FAR at false_alarm / people, the best passes with probability about false_alarm
        (the verification threshold alone would raise ~1 - 0.99^people false alarms: 0.53 on
        London's 81). Read from the training impostor pairs' tail; a rate finer than one of those
        pairs takes the highest training impostor score. Never below the verification threshold."""
        if self.impostor_tail is None or not self.impostor_pairs or people <= 1:
            return self.threshold
        k = int(np.floor((false_alarm or self.far) / people * self.impostor_pairs))
        tail = np.asarray(self.impostor_tail, np.float64)
        cut = float(np.nextafter(tail[min(k, len(tail) - 1)], np.inf))
        return max(self.threshold, cut)

    def embed(self, x: np.ndarray) -> np.ndarray:
        """Descriptors (N, D_in) -> unit embeddings (N, dim)."""
        x = np.asarray(x, np.float32)
        if self.projection is not None:
            x = (x - self.mean) @ self.projection
        return unit(x)

    def embed_rows(self, rows: list[dict]) -> tuple[np.ndarray, list[int], dict[int, str]]:
        """Extraction rows (table rows or /v1/extract's) -> (embeddings of the usable ones, their
        row indices, {row: why not} for the others)."""
        from facedist.recognition import row_descriptor
        from facedist.schema import STATUS_OK

        got, have, missing = [], [], {}
        for i, row in enumerate(rows):
            if row.get("status", STATUS_OK) != STATUS_OK:
                missing[i] = row.get("message") or row.get("status") or "unusable"
                continue
            value = row_descriptor(row, self.inputs, self.input_dims or None)
            if isinstance(value, str):
                missing[i] = value
            else:
                got.append(value)
                have.append(i)
        x = np.stack(got) if got else np.zeros((0, sum(self.input_dims) or 1), np.float32)
        return (self.embed(x) if got else np.zeros((0, self.dim), np.float32)), have, missing

    # -- the bundle --

    def to_bundle(self) -> dict:
        from facedist.training.bundle import make_bundle
        import torch

        state = {"threshold": torch.tensor([self.threshold], dtype=torch.float64)}
        if self.projection is not None:
            state.update(mean=torch.as_tensor(self.mean), projection=torch.as_tensor(self.projection))
        if self.impostor_tail is not None:
            state["impostor_tail"] = torch.as_tensor(np.asarray(self.impostor_tail, np.float64))
        return make_bundle(task=EMBEDDING_TASK, model_config={"name": "embedding", "kind": self.kind},
                           state_dict=state, labels=[], layout_json=self.layout, input_norm=None,
                           metrics=self.metrics, extra={"inputs": list(self.inputs),
                                                        "input_dims": list(self.input_dims),
                                                        "far": self.far, "kind": self.kind,
                                                        "impostor_pairs": self.impostor_pairs,
                                                        "version": self.version})

    @classmethod
    def from_bundle(cls, bundle: dict) -> "EmbeddingModel":
        if bundle.get("task") != EMBEDDING_TASK:
            raise ValueError(f"not an embedding bundle (task {bundle.get('task')!r})")
        state, extra = bundle["state_dict"], bundle.get("extra", {})
        array = lambda name: state[name].numpy().astype(np.float32) if name in state else None  # noqa: E731
        tail = state["impostor_tail"].numpy() if "impostor_tail" in state else None
        return cls(tuple(extra["inputs"]), list(extra["input_dims"]), array("mean"), array("projection"),
                   float(state["threshold"].numpy()[0]), float(extra.get("far", TARGET_FAR)),
                   dict(bundle.get("metrics") or {}), bundle.get("layout") or "", tail,
                   int(extra.get("impostor_pairs", 0)))

    def save(self, directory: str) -> str:
        from facedist.training.bundle import save_model_bundle

        return save_model_bundle(self.to_bundle(), directory)

    @classmethod
    def load(cls, uri: str) -> "EmbeddingModel":
        """From an embedding bundle directory, its model.pt, or a models directory holding
        embedding/ (local or s3://)."""
        import torch

        from facedist.training.bundle import BUNDLE_FILE

        candidates = [uri] if str(uri).endswith(".pt") else [storage.join(uri, BUNDLE_FILE),
                                                              storage.join(uri, EMBEDDING_TASK, BUNDLE_FILE)]
        for candidate in candidates:
            if storage.exists(candidate):
                bundle = torch.load(io.BytesIO(storage.read_bytes(candidate)), map_location="cpu", weights_only=False)
                return cls.from_bundle(bundle)
        raise FileNotFoundError(f"no embedding bundle at {uri} (looked for {', '.join(candidates)}); "
                                f"make one with `facedist train --task embedding`")


# ---- fitting ------------------------------------------------------------------------------

def fit_whitening(x: np.ndarray, subjects: np.ndarray, dims: int = METRIC_DIMS,
                  floor: float = METRIC_FLOOR) -> tuple[np.ndarray, np.ndarray]:
    """(mean, projection) of the person report's identity metric as one affine map: standardise,
    PCA to at most ``dims`` whitened components (fewer when there are fewer rows), then
    within-person whitening. Learned on the training people's rows ``x`` only."""
    from facedist.features import within_class_whitening

    x = np.asarray(x, np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    projection = np.diag(1 / std)
    if z.shape[1] > min(dims, len(z) - 1):
        _, s, vt = np.linalg.svd(z, full_matrices=False)
        # Components with almost no spread would be blown up by whitening: keep those with 1e-3
        # of the leading one's at least.
        d = min(dims, int(np.sum(s > 1e-3 * s[0])), len(z) - 1)
        pca = vt[:d].T * (np.sqrt(len(z)) / np.maximum(s[:d], 1e-9))
        projection, z = projection @ pca, z @ pca
    projection = projection @ within_class_whitening(z, subjects, floor).astype(np.float64)
    return mean.astype(np.float32), projection.astype(np.float32)


def pair_scores(embeddings: np.ndarray, subjects: np.ndarray, max_impostors: int = MAX_IMPOSTOR_PAIRS,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cosine of every pair of photos (i < j): (genuine: the same person, impostor: two people).
    Past ``max_impostors`` impostor pairs a uniform sample of them."""
    e = unit(embeddings)
    subjects = np.asarray([str(s) for s in subjects])
    i, j = np.triu_indices(len(e), 1)
    same = subjects[i] == subjects[j]
    genuine = np.einsum("nd,nd->n", e[i[same]], e[j[same]])
    ii, jj = i[~same], j[~same]
    if len(ii) > max_impostors:
        pick = np.random.default_rng(seed).choice(len(ii), max_impostors, replace=False)
        ii, jj = ii[pick], jj[pick]
    return genuine.astype(np.float64), np.einsum("nd,nd->n", e[ii], e[jj]).astype(np.float64)


def threshold_at_far(impostor: np.ndarray, far: float = TARGET_FAR) -> float:
    """The lowest threshold t with (impostor scores >= t) a fraction <= far of them."""
    s = np.sort(np.asarray(impostor, np.float64))[::-1]
    if not len(s):
        return 1.0
    k = int(np.floor(far * len(s)))
    return float(np.nextafter(s[k], np.inf)) if k < len(s) else float(s[-1])


def rates_at(genuine: np.ndarray, impostor: np.ndarray, threshold: float) -> dict:
    """TAR (genuine accepted) and FAR (impostors accepted) at a threshold."""
    return {"threshold": float(threshold), "tar": float(np.mean(np.asarray(genuine) >= threshold)),
            "far": float(np.mean(np.asarray(impostor) >= threshold)),
            "genuine_pairs": int(len(genuine)), "impostor_pairs": int(len(impostor))}


def fit_embedding(data, inputs: tuple[str, ...] = DESCRIPTOR_INPUTS, whiten: bool = False,
                  far: float = TARGET_FAR, rows: np.ndarray | None = None) -> EmbeddingModel:
    """The embedding on a CoefficientData's rows (``rows``: a subset, e.g. the training people):
    the map when ``whiten``, then the threshold at ``far`` on those rows' pairs."""
    rows = np.arange(len(data)) if rows is None else np.asarray(rows)
    subjects = np.asarray([str(s) for s in data.subject[rows]])
    x = data.descriptor(tuple(inputs))[rows]
    dims = [int(data.group(g).shape[1]) for g in inputs]
    model = EmbeddingModel(tuple(inputs), dims, far=far, layout=data.layout.to_json())
    if whiten:
        model.mean, model.projection = fit_whitening(x, subjects)
    genuine, impostor = pair_scores(model.embed(x), subjects)
    model.threshold = threshold_at_far(impostor, far)
    model.impostor_tail = np.sort(impostor)[::-1][:IMPOSTOR_TAIL].copy()
    model.impostor_pairs = int(len(impostor))
    model.metrics = {"train_" + k: v for k, v in rates_at(genuine, impostor, model.threshold).items()}
    model.metrics.update(train_people=int(len(set(subjects))), train_photos=int(len(rows)))
    return model
