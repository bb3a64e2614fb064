"""The report in a real browser: headless Chromium (Debian's ``chromium``) loads index.html;
every image decodes (naturalWidth > 0), every table has body rows, the console logs no error.
A full-page screenshot is kept under the test's tmp_path; its path is printed and recorded
as the ``screenshot`` property (``pytest -s`` shows it).

Chromium is driven over the DevTools protocol (CDP) with aiohttp's websocket client (aiohttp
comes with s3fs). ``.ci/run`` installs chromium with apt-get where it is missing; without it
the tests are skipped, saying so.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from conftest import extract_demo_stores
from test_report import write_sweep_dir

from stitchtrain.studies.report.page import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (apt-get install chromium; .ci/run installs "
    "it where apt-get works)",
)
WIDTH = 1200
# what the page reports once loaded: each image's decoded width, each table's body rows
_INSPECT = """JSON.stringify({
  images: [...document.images].map(i => ({src: i.getAttribute("src"), width: i.naturalWidth})),
  tables: [...document.querySelectorAll("table")].map(t => ({
    caption: t.previousElementSibling ? t.previousElementSibling.textContent : "",
    rows: t.tBodies.length ? t.tBodies[0].rows.length : 0,
  })),
  height: document.documentElement.scrollHeight,
})"""


class _Browser:
    """A headless Chromium process and a CDP session on its first page."""

    def __init__(self, profile: Path):
        self.log = profile / "chromium.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [
                    CHROMIUM,
                    "--headless",
                    "--no-sandbox",  # CI containers run as root
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--remote-debugging-port=0",
                    f"--user-data-dir={profile}",
                    f"--window-size={WIDTH},900",
                    "about:blank",
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        port_file = profile / "DevToolsActivePort"  # chromium writes its port here
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as reply:
            pages = [t for t in json.load(reply) if t["type"] == "page"]
        self.url = pages[0]["webSocketDebuggerUrl"]

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def load(self, page: Path, screenshot: Path | None = None) -> dict:
        """Open ``page``; return what _INSPECT reports plus ``errors`` (console errors,
        uncaught exceptions, failed loads); write a full-page PNG to ``screenshot``."""
        return asyncio.run(self._load(page.resolve().as_uri(), screenshot))

    async def _load(self, url: str, screenshot: Path | None) -> dict:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(self.url, max_msg_size=0) as socket,
        ):
            cdp = _Session(socket)
            for domain in ("Page", "Runtime", "Log"):
                await cdp.call(f"{domain}.enable")
            await cdp.call("Page.navigate", url=url)
            await cdp.wait_for("Page.loadEventFired")
            reply = await cdp.call("Runtime.evaluate", expression=_INSPECT, returnByValue=True)
            found = json.loads(reply["result"]["value"])
            if screenshot is not None:
                await cdp.call(
                    "Emulation.setDeviceMetricsOverride",
                    width=WIDTH,
                    height=found["height"],
                    deviceScaleFactor=1,
                    mobile=False,
                )
                shot = await cdp.call("Page.captureScreenshot", format="png")
                screenshot.write_bytes(base64.b64decode(shot["data"]))
                await cdp.call("Emulation.clearDeviceMetricsOverride")
            found["errors"] = cdp.errors()
            return found


class _Session:
    """Request/response over one CDP websocket; events are kept for ``errors``."""

    def __init__(self, socket):
        self.socket, self.sent, self.events = socket, 0, []

    async def _next(self) -> dict:
        return await self.socket.receive_json(timeout=60)

    async def call(self, method: str, **params) -> dict:
        self.sent += 1
        await self.socket.send_json({"id": self.sent, "method": method, "params": params})
        while True:
            message = await self._next()
            if message.get("id") == self.sent:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    async def wait_for(self, method: str) -> dict:
        while not any(e.get("method") == method for e in self.events):
            self.events.append(await self._next())
        return next(e for e in self.events if e.get("method") == method)

    def errors(self) -> list[str]:
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                found.append(
                    " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
                )
            elif method == "Runtime.exceptionThrown":
                found.append(params["exceptionDetails"].get("text", "exception"))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(f"{params['entry']['text']} {params['entry'].get('url', '')}")
        return found


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    browser = _Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield browser
    browser.close()


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """A report with every kind of figure: per-direction, self-stitch, CKA and its heatmap
    (CKA computed from real tiny stores' layers 2 and 3)."""
    root = tmp_path_factory.mktemp("browser-report")
    models = ["dinov2-tiny", "siglip2-tiny"]
    urls = extract_demo_stores(
        root / "data", root / "stores", models=models, layers=[2, 3], shard_size=16, per_class=4
    )
    stores = {"dinov2": urls["dinov2-tiny", "train"], "siglip2": urls["siglip2-tiny", "train"]}
    sweep = write_sweep_dir(root / "sweep", stores=stores)
    return build_report([sweep], root / "report", predictions=False).parent


def test_report_renders_in_chromium(browser, report, tmp_path, record_property):
    screenshot = tmp_path / "report.png"
    found = browser.load(report / "index.html", screenshot)
    record_property("screenshot", str(screenshot))
    print(f"report screenshot: {screenshot}")
    where = f"(screenshot: {screenshot})"
    names = sorted(i["src"] for i in found["images"])
    assert names == sorted(p.name for p in report.glob("*.png")), where
    assert any("cka_heatmap" in n for n in names) and any("_cka_" in n for n in names), names
    assert all(i["width"] > 0 for i in found["images"]), (found["images"], where)
    assert len(found["tables"]) >= 6 and all(t["rows"] > 0 for t in found["tables"]), (
        found["tables"],
        where,
    )
    assert found["errors"] == [], where
    assert screenshot.stat().st_size > 10_000 and found["height"] > 2000, where


def test_the_browser_check_sees_broken_pages(browser, tmp_path):
    page = tmp_path / "broken.html"
    page.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>t</title></head><body>"
        "<img src='missing.png'><table><tbody></tbody></table>"
        "<script>console.error('drawn wrong')</script></body></html>"
    )
    found = browser.load(page)
    assert [i["width"] for i in found["images"]] == [0]
    assert [t["rows"] for t in found["tables"]] == [0]
    assert any("drawn wrong" in e for e in found["errors"]), found["errors"]
    assert any("missing.png" in e or "ERR_FILE_NOT_FOUND" in e for e in found["errors"]), found[
        "errors"
    ]
