"""End to end on a local Ray cluster (`ray start --head`): job submissions for extraction and
training, `serve deploy`, and a real predict request (scripts/e2e_local.sh)."""

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.ray
def test_e2e_local_cluster(tmp_path, yale_dir):
    # A few people keep it inside CI's budget; the script itself takes any folder.
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted(yale_dir.iterdir()):
        if path.name.split(".")[0] in ("subject01", "subject02", "subject05", "subject07"):
            (images / path.name).write_bytes(path.read_bytes())
    work = tmp_path / "work"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "e2e_local.sh"), str(images), str(work)],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "E2E_EPOCHS": "2"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "e2e passed" in proc.stdout
    summary = json.loads((work / "coefficients" / "_summary.json").read_text())
    assert summary["rows"] == len(list(images.iterdir()))
    for task in ("cnet", "identity", "expression"):   # jobs/train.py, one job for the three
        assert (work / "models" / task / "model.pt").is_file()
        assert f"trained {task} (1 workers)" in proc.stdout
    predict = json.loads((work / "predict.json").read_text())
    assert predict["identity"]["top_k"][0]["label"].startswith("subject")
    assert len(predict["images"]) == 3
