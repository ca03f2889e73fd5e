"""The web page (GET /) in a real browser against a real local Serve app, and the mesh flag of
/v1/extract over plain HTTP.

The app, its trained recognition bundles and the bearer token are tests/support/serving.py's
fixtures, shared with test_serve.py. The browser is the system chromium driven by playwright (no browser download);
without either the browser tests skip.

FACEDIST_SCREENSHOT=docs/images/web_page.png also writes the page's screenshot there.
"""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

# The HTTP tests' fixtures (tests/support/serving.py): trained bundles on S3 (once a session), the
# served app with a token, a client.
from support.serving import PERSON, TOKEN, error_of

PREFIX_APP = "facedist-prefixed"
PREFIX = "/facedist"
LANDMARK_GREEN = "(r, g, b) => r < 60 && g > 180 && b < 60"  # the page's rgb(0, 220, 0)
SCREENSHOT_BYTES = 300_000


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    """The system chromium under playwright; skips (before any server starts) when either is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; the browser is the system chromium)")
    path = _chromium()
    if path is None:
        pytest.skip("no system chromium found (apt-get install chromium); playwright's own browsers are not used")
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
        try:
            yield instance
        finally:
            instance.close()


# ---- the decimated mesh (no server) ----------------------------------------------------------

def test_decimated_mesh_is_a_light_valid_wireframe():
    from facedist.mesh import decimated_mesh, project_mesh
    from facedist.morphable import MorphableModel, Pose, apply_affine

    model = MorphableModel.from_tddfa()
    indices, triangles = decimated_mesh(model, 1200)
    assert 1100 <= len(indices) <= 1300 and len(np.unique(indices)) == len(indices)
    assert triangles.min() >= 0 and triangles.max() < len(indices)
    assert len(triangles) > 1.5 * len(indices)  # a surface, not a fringe of slivers
    assert decimated_mesh(model, 1200)[0] is indices  # cached
    rng = np.random.default_rng(0)
    shape, exp = rng.normal(size=model.n_id) * 1e4, rng.normal(size=model.n_exp)
    camera = Pose.from_angles(10, -5, 3, 1e-3, (160, 120, 0)).affine()
    full = apply_affine(model.vertices(shape, exp), camera)[indices, :2]
    np.testing.assert_allclose(project_mesh(model, shape, exp, camera, 1200), full, atol=1e-3)


# ---- the mesh flag over plain HTTP -----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.ray
def test_extract_mesh_only_when_asked(client, face_bytes):
    plain = client.post("/v1/extract", files={"image": ("subject01.normal", face_bytes)})
    assert plain.status_code == 200, plain.text
    assert "mesh" not in plain.json()
    response = client.post("/v1/extract", params={"mesh": "true"}, files={"image": ("subject01.normal", face_bytes)})
    assert response.status_code == 200, response.text
    body = response.json()
    vertices, triangles = np.array(body["mesh"]["vertices"]), np.array(body["mesh"]["triangles"])
    assert vertices.shape[1] == 2 and 1000 <= len(vertices) <= 1500
    assert triangles.shape[1] == 3 and triangles.min() >= 0 and triangles.max() < len(vertices)
    # In the image, and on the face: the mesh's extent is about the face box's (ears and forehead
    # reach a little beyond it), centred on it.
    width, height = body["width"], body["height"]
    inside = (vertices[:, 0] >= 0) & (vertices[:, 0] < width) & (vertices[:, 1] >= 0) & (vertices[:, 1] < height)
    assert inside.mean() > 0.95
    x0, y0, x1, y1 = body["face"]["box"]
    size = max(x1 - x0, y1 - y0)
    assert vertices[:, 0].min() > x0 - 0.5 * size and vertices[:, 0].max() < x1 + 0.5 * size
    assert vertices[:, 1].min() > y0 - 0.5 * size and vertices[:, 1].max() < y1 + 0.5 * size
    cx, cy = vertices.mean(0)
    assert x0 < cx < x1 and y0 < cy < y1
    # The landmarks lie on the mesh: each is near some mesh vertex.
    landmarks = np.array(body["face"]["landmarks_fit"])
    nearest = np.min(np.linalg.norm(landmarks[:, None] - vertices[None], axis=2), axis=1)
    assert np.median(nearest) < 0.05 * size
    spec = client.get("/openapi.json").json()["components"]["schemas"]
    assert "mesh" in spec["ExtractResponse"]["properties"]


@pytest.mark.slow
@pytest.mark.ray
def test_bad_mesh_flag_is_a_422(client, face_bytes):
    response = client.post("/v1/extract", params={"mesh": "sometimes"}, files={"image": ("a", face_bytes)})
    assert response.status_code == 422 and error_of(response)["code"] == "invalid_request"


# ---- the page in a browser -------------------------------------------------------------------

_PHOTO_PIXELS = f"""() => [...document.querySelectorAll("canvas.photo")].map((canvas) => {{
  const green = {LANDMARK_GREEN};
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let count = 0;
  for (let i = 0; i < data.length; i += 4) if (green(data[i], data[i + 1], data[i + 2])) count++;
  const card = canvas.closest(".card");
  return {{file: card.dataset.filename, landmarks: canvas.dataset.landmarks || null,
          mesh: canvas.dataset.mesh || null, green: count}};
}})"""


def _upload(page, paths: list[Path]) -> None:
    page.set_input_files("#files", [str(p) for p in paths])


def _save_screenshot(page, tmp_path: Path) -> None:
    path = tmp_path / "web_page.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"\nscreenshot: {path}")
    target = os.environ.get("FACEDIST_SCREENSHOT")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_bytes(_small_png(path.read_bytes()))
        print(f"screenshot: {target}")


def _small_png(png: bytes) -> bytes:
    """A palette PNG (the page is mostly flat colours and grey photos) to keep docs images small."""
    from PIL import Image

    if len(png) <= SCREENSHOT_BYTES:
        return png
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


@pytest.mark.slow
@pytest.mark.ray
def test_page_draws_fits_shows_predictions_and_the_bad_file(browser, server, yale_dir, tmp_path):
    base_url, _ = server
    notes = tmp_path / "notes.txt"
    notes.write_text("hello, this is not a photo\n" * 20)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    console_errors: list[str] = []
    page.on("pageerror", lambda exc: console_errors.append(str(exc)))
    page.goto(f"{base_url}/")
    assert page.title() == "facedist"
    _upload(page, [yale_dir / name for name in PERSON] + [notes])

    # The server has a token: every card says 401 and the token field appears; with it, the run repeats.
    page.wait_for_selector('body[data-state="token"]', timeout=120_000)
    assert page.is_visible("#token")
    assert page.locator('.card[data-error-code="unauthorized"]').count() == 4
    page.fill("#token", TOKEN)
    page.press("#token", "Enter")
    page.wait_for_selector('body[data-state="done"]', timeout=180_000)
    assert not console_errors, console_errors

    # Every photo drawn with its 68 landmarks (really painted: landmark-green pixels) and its mesh.
    drawn = {c["file"]: c for c in page.evaluate(_PHOTO_PIXELS)}
    for name in PERSON:
        assert drawn[name]["landmarks"] == "68", drawn
        assert int(drawn[name]["mesh"]) > 1000, drawn
        assert drawn[name]["green"] > 68 * 10, drawn  # 68 dots of a few pixels' radius each
    # The text file: its own card with the API's 415, the others unaffected.
    bad = page.locator('.card[data-filename="notes.txt"]')
    assert bad.get_attribute("data-error-code") == "not_an_image"
    assert "415 not_an_image" in bad.inner_text() and "not an image" in bad.inner_text()
    assert page.locator(".card.failed").count() == 1
    # The prediction from the three good photos: identity top-5 with scores, expressions, confidences.
    rows = page.locator("#prediction tr")
    assert rows.count() == 1 + 5
    assert rows.nth(1).locator("td").nth(1).inner_text().startswith("subject")
    assert 0 < float(rows.nth(1).locator("td").nth(2).inner_text()) <= 1
    assert "none" in page.inner_text("#gender")  # no gender model trained on Yale
    # Age with its expected error (the fixture's age model, on made-up Yale ages).
    assert re.fullmatch(r"age \d+ ± \d+ years .*", page.inner_text("#age")), page.inner_text("#age")
    expressions = page.locator("#expressions tr")
    assert expressions.count() == 1 + 3
    for name in PERSON:
        card = page.locator(f'.card[data-filename="{name}"]')
        confidence = card.locator('[data-field="confidence"] b').inner_text()
        assert float(confidence) > 0, confidence  # mean of the C-Net's positive c_i (not a probability)
        assert "expression" in card.inner_text() and "yaw" in card.inner_text()
        assert card.locator("canvas.bars").count() == 3  # identity, expression, texture (the default basis)
        assert "σ" in card.inner_text()  # the bars are in standard deviations of the prior
    _save_screenshot(page, tmp_path)
    page.close()


@pytest.mark.slow
@pytest.mark.ray
def test_page_under_a_route_prefix_without_models(browser, server, yale_dir, tmp_path):
    """The same app mounted at /facedist, no recognizer: relative URLs reach it, predict's 503
    not_configured is shown and the extraction still is."""
    import httpx
    from ray import serve

    from facedist.serving import build_app

    base_url, _ = server
    serve.run(build_app({"num_replicas": 1, "max_batch_size": 4, "extractor_num_cpus": 0.5}), name=PREFIX_APP, route_prefix=PREFIX,
              blocking=False)
    try:
        html = httpx.get(f"{base_url}{PREFIX}", timeout=60, follow_redirects=True).text
        assert f'<base href="{PREFIX}/">' in html
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{base_url}{PREFIX}/")
        _upload(page, [yale_dir / PERSON[0]])
        page.wait_for_selector('body[data-state="token"]', timeout=120_000)
        page.fill("#token", TOKEN)
        page.click("#tokenbtn")
        page.wait_for_selector('body[data-state="done"]', timeout=180_000)
        drawn = page.evaluate(_PHOTO_PIXELS)
        assert drawn[0]["landmarks"] == "68" and drawn[0]["green"] > 68 * 10, drawn
        assert page.get_attribute("#summary", "data-error-code") == "not_configured"
        assert "503 not_configured" in page.inner_text("#summary")
        assert "none (503 not_configured)" in page.inner_text(".card")  # no prediction, said on the card too
        page.screenshot(path=str(tmp_path / "prefixed.png"), full_page=True)
        page.close()
    finally:
        serve.delete(PREFIX_APP)
