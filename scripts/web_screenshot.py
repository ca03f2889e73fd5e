"""The README's screenshot of the web page, made with real models: `facedist serve --models M` on a
free local port, three photos of one person uploaded through the page in the system chromium,
the page captured once the prediction is in, and what the page predicted printed (so a wrong
prediction is seen, not shipped).

    python scripts/web_screenshot.py --models out/models --out docs/images/web_page.png \
        ../shared/data/yalefaces/subject01.normal ../shared/data/yalefaces/subject01.happy ...
"""

from __future__ import annotations

import argparse
import io
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError(f"{url} did not answer within {seconds:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photos", nargs="+", help="photos to upload (one person)")
    parser.add_argument("--models", required=True, help="model bundles (facedist run's out/models)")
    parser.add_argument("--out", default="docs/images/web_page.png")
    args = parser.parse_args()
    chromium = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if chromium is None:
        print("no system chromium (apt-get install chromium)", file=sys.stderr)
        return 2
    from PIL import Image
    from playwright.sync_api import sync_playwright

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "facedist.cli", "serve", "--models", args.models,
                               "--port", str(port)])
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_ready(f"{base}/v1/health")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{base}/")
            page.set_input_files("#files", args.photos)
            page.wait_for_selector('body[data-state="done"]', timeout=300_000)
            print("identity (top row):", page.locator("#prediction tr").nth(1).inner_text().replace("\t", " | "))
            print("gender:", page.inner_text("#gender"))
            print("expressions:", page.inner_text("#expressions").replace("\n", "; "))
            png = page.screenshot(full_page=True)
            browser.close()
        image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        image.save(args.out, format="PNG", optimize=True)
        print(f"screenshot: {args.out}")
    finally:
        server.terminate()
        server.wait(timeout=60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
