"""ExtractConfig: the settings of an extraction run, the one declaration every caller holds
(the CLI, jobs/extract.py, `facedist run`, `facedist predict` on images, the server)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from facedist.extractors import DEFAULT_BACKEND, DEFAULT_TEXTURE_BASIS
from facedist.extractors.base import Extractor


@dataclass
class ExtractConfig:
    backend: str = DEFAULT_BACKEND
    detector: str = "faceboxes"       # facedist.detection.DETECTORS
    landmark_source: str | None = None  # None: the backend's own (extractors.backends)
    device: str = "cpu"
    # Images per extractor call and per Parquet part. Under Ray each batch is one actor call; 64
    # rather than 16 cut Ray's per-image overhead (benchmarks/extract_ray.py); the tddfa network
    # still runs its own chunks of 16 crops.
    batch_size: int = 64
    max_side: int = 2048         # longer images are downscaled on decode
    preview: int = 0             # write this many landmark/mesh overlays
    # True: skip images already in the output (made with the same settings; other settings are
    # an error). False: replace whatever the output holds.
    resume: bool = True
    # Threads for dlib's HOG detection within a batch (it releases the GIL); 0: one
    # per core in a single process, one per CPU of its share in a Ray actor.
    detect_threads: int = 0
    # Sample each face's colour on the fitted mesh (the table's texture column), and project it
    # on a texture basis for tex_coeffs: DEFAULT_TEXTURE_BASIS (the shipped one, texture backends
    # only), a URI (`facedist texture fit`), or None (no tex_coeffs).
    texture: bool = True
    texture_basis: str | None = DEFAULT_TEXTURE_BASIS
    # Fill face_embedding: dlib's 128-d face descriptor of each ok face (facedist.face_descriptor).
    face_embedding: bool = True
    # Fill expression_feature, expression_probs, faceapi_age and faceapi_gender_male: face-api's nets on each ok
    # face's detector box (facedist.face_attributes).
    face_attributes: bool = True

    def build_extractor(self, device: str | None = None, detect_threads: int | None = None) -> Extractor:
        """The extractor these settings describe; its models load here."""
        from facedist.extractors import make_extractor

        return make_extractor(self.backend, detector=self.detector, landmark_source=self.landmark_source,
                              device=device or self.device, texture=self.texture, texture_basis=self.texture_basis,
                              face_embedding=self.face_embedding, face_attributes=self.face_attributes,
                              detect_threads=detect_threads or self.detect_threads or os.cpu_count() or 1)
