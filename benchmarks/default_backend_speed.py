"""CPU ms per image of the default extraction (tddfa-fit + texture) next to plain tddfa, by stage.

One thread, 64 decoded London photos (675 x 675), best of 2 passes; CPU time (process_time), so
the figures stay meaningful on a shared machine. Writes benchmarks/results/default_backend_speed.json.

    FACEDIST_MODEL_DIR=../shared/models .venv/bin/python benchmarks/default_backend_speed.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from facedist.extractors import make_extractor
from facedist.images import decode_image

LONDON = Path(__file__).resolve().parents[2] / "shared/data/london"


def main() -> None:
    torch.set_num_threads(1)
    images = [decode_image(p.read_bytes()) for p in sorted(LONDON.glob("*.jpg"))[:64]]
    out = {}
    for name, backend, texture in (("tddfa", "tddfa", False), ("tddfa-fit", "tddfa-fit", False),
                                   ("tddfa-fit+texture", "tddfa-fit", True)):
        extractor = make_extractor(backend, detect_threads=1, texture=texture)
        extractor.extract(images[:8])  # warm-up
        best, stages = float("inf"), {}
        for _ in range(2):
            extractor.timings.clear()
            started = time.process_time()
            extractor.extract(images)
            ms = (time.process_time() - started) / len(images) * 1000
            if ms < best:
                best = ms
                stages = {k: round(v / len(images) * 1000, 2) for k, v in extractor.timings.cpu.items()}
        out[name] = {"cpu_ms_per_image": round(best, 1), "stages_cpu_ms": stages,
                     "after_detection_ms": round(sum(v for k, v in stages.items() if k != "detect"), 2)}
    print(json.dumps(out, indent=1))
    path = Path(__file__).parent / "results" / "default_backend_speed.json"
    path.write_text(json.dumps({"images": "64 London photos, 675x675, decoded", "threads": 1, **out}, indent=1))


if __name__ == "__main__":
    main()
