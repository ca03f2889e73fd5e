"""The model deployments: a batched coefficient extractor and a batched recognizer.

Their resources and replica counts are set by the app builder (facedist.serving.app) from
ServeSettings; the decorators here carry only the names. Each replica gets the app's settings as
a dict and builds its models and its batcher (facedist.serving.batching) once, in __init__.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from collections import Counter

import numpy as np
from ray import serve

from facedist.recognition import bundle_version, check_layouts
from facedist.serving.batching import Batcher
from facedist.serving.settings import ServeSettings, resolve_device


@serve.deployment(name="FaceExtractor")
class FaceExtractor:
    """One extractor per replica; concurrent single-image calls are grouped into batches, and a
    batch's faces are detected together (FaceBoxes: one batched forward)."""

    def __init__(self, settings: dict):
        import torch

        s = ServeSettings(**settings)
        self.low_priority = s.extractor_low_priority
        # The replica's CPU share, whole CPUs, at least 1: FaceBoxes and the regressor use them.
        torch.set_num_threads(s.extractor_threads)
        self.torch_threads = torch.get_num_threads()
        self.max_side = s.extract.max_side  # uploads are downscaled on decode to at most this side
        self.device = resolve_device(s.extract.device)
        self.extractor = s.extract.build_extractor(device=self.device, detect_threads=s.extractor_detect_threads)
        self.batcher = Batcher(self._extract_batch, s.max_batch_size, s.batch_wait_timeout_s)
        self.batch_sizes: Counter[int] = Counter()
        self.dropped = 0  # images whose request's deadline passed before their batch ran
        self.started = time.time()

    async def extract(self, item: tuple) -> dict:
        """One image (encoded upload, with_mesh, deadline) -> its coefficients row, extracted in a
        batch with the images of concurrent calls. An upload that does not decode comes back as
        an error row marked decode_error; one whose deadline (wall-clock time.time(), or None)
        passed while it queued is not extracted and comes back marked deadline_exceeded.
        with_mesh adds the decimated fitted mesh in pixels (mesh2d)."""
        return await self.batcher.submit(item)

    async def _extract_batch(self, items: list[tuple]) -> list[dict]:
        now = time.time()
        live = [i for i, item in enumerate(items) if len(item) < 3 or item[2] is None or item[2] > now]
        rows: list[dict] = [{"status": "error", "deadline_exceeded": True,
                             "message": "deadline passed before extraction"} for _ in items]
        if live:
            self.batch_sizes[len(live)] += 1
            # Decoding and the models run in a worker thread so the replica keeps accepting (and
            # batching) requests.
            done = await asyncio.to_thread(self._extract_rows, [items[i][:2] for i in live])
            for i, row in zip(live, done):
                rows[i] = row
        self.dropped += len(items) - len(live)
        return rows

    def _extract_rows(self, items: list[tuple[bytes, bool]]) -> list[dict]:
        from facedist.mesh import result_mesh2d
        from facedist.extraction.rows import decode_row, extract_rows

        if self.low_priority:
            # Linux sets a nice value per thread: this worker thread (and the threads it starts)
            # runs the batch; raising one's own niceness needs no privilege.
            os.setpriority(os.PRIO_PROCESS, 0, 19)
        # Extraction's own row functions: a bad upload is its row's error, rows in = rows out.
        decoded = [decode_row({"path": f"upload-{i}", "bytes": upload}, self.max_side)
                   for i, (upload, _) in enumerate(items)]
        finished, results = extract_rows(decoded, self.extractor)
        # The mesh is computed here, where the camera is known (tddfa/fit; deep3d has none), and
        # only when asked for: a few thousand numbers per row most requests do not want.
        model = getattr(self.extractor, "model", None)
        for row, source, result, (_, with_mesh) in zip(finished, decoded, results, items):
            if row.get("status") == "ok":
                row["coefficients_sd"] = self.extractor.in_prior_units(row)
            if source["image"] is None:
                row["decode_error"] = True
            elif with_mesh and row.get("status") == "ok":
                points = result_mesh2d(result, model)
                if points is not None:
                    row["mesh2d"] = np.round(points, 1).tolist()
        return finished

    def mesh_triangles(self) -> list[list[int]] | None:
        """The decimated mesh's triangles (one topology for every image), or None without one."""
        from facedist.mesh import decimated_mesh

        model = getattr(self.extractor, "model", None)
        return decimated_mesh(model)[1].tolist() if model is not None else None

    def info(self) -> dict:
        layout = getattr(self.extractor, "layout", None)
        return {
            "name": getattr(self.extractor, "name", None),
            "device": self.device,
            "layout": dataclasses.asdict(layout) if layout is not None else None,
            "max_batch_size": self.batcher.max_batch_size,
            "detector": getattr(getattr(self.extractor, "detector", None), "name", None),
            "detect_threads": getattr(getattr(self.extractor, "detector", None), "threads", 1),
            "torch_threads": self.torch_threads,
        }

    def stats(self) -> dict:
        """Batch sizes seen and, when the extractor keeps them, CPU/wall seconds per stage."""
        timings = getattr(self.extractor, "timings", None)
        stages = {kind: dict(getattr(timings, kind)) for kind in ("cpu", "wall") if hasattr(timings, kind)}
        return {"batch_sizes": dict(self.batch_sizes), "stage_seconds": stages,
                "images": sum(size * count for size, count in self.batch_sizes.items()),
                "dropped_past_deadline": self.dropped, "uptime_s": time.time() - self.started}

    def reset_stats(self) -> None:
        self.batch_sizes.clear()
        self.dropped = 0
        timings = getattr(self.extractor, "timings", None)
        if hasattr(timings, "clear"):
            timings.clear()


@serve.deployment(name="FaceRecognizer")
class FaceRecognizer:
    """C-Net aggregation + classifiers from the training job's bundles, loaded once per replica."""

    def __init__(self, settings: dict):
        import torch

        s = ServeSettings(**settings)
        # The models are tiny: more threads only add their hand-offs (and it runs on a share of a CPU).
        torch.set_num_threads(max(1, round(s.recognizer_num_cpus)))
        self.models_uri = s.models_uri or None
        self.top_k = s.top_k
        self.recognizer = None
        self.versions: dict[str, str] = {}
        if self.models_uri:
            from facedist.recognition import Recognizer

            self.recognizer = Recognizer.from_directory(self.models_uri)
            check_layouts(self.recognizer.bundles, s.extract.backend)
            self.versions = {task: bundle_version(b) for task, b in self.recognizer.bundles.items()}
        self.batcher = Batcher(self._predict_batch, s.predict_max_batch_size, s.predict_batch_wait_timeout_s)

    async def predict(self, rows: list[dict]) -> dict:
        """One person's extraction rows -> the prediction, in a batch with concurrent calls' people."""
        return await self.batcher.submit(rows)

    async def _predict_batch(self, people: list[list[dict]]) -> list[dict]:
        # One model call per task for the whole batch: several times cheaper per person than one each.
        return await asyncio.to_thread(self.recognizer.predict_many, people, self.top_k)

    def info(self) -> dict | None:
        if self.recognizer is None:
            return None
        models = {}
        for task, bundle in self.recognizer.bundles.items():
            layout = json.loads(bundle["layout"]) if bundle.get("layout") else {}
            models[task] = {"version": self.versions[task], "labels": bundle.get("labels") or [],
                            "metrics": bundle.get("metrics") or {}, "trained_on": layout,
                            "format_version": bundle.get("format_version")}
        return {"models_uri": self.models_uri, "models": models}
