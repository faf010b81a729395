"""The playground in a real headless Chromium (driven over the DevTools protocol): masked placeholders appear and are
replaced step by step until the answer is complete; a screenshot mid-denoising is saved ($SMDM_ARTIFACTS, else the
test's tmp dir). Skipped with a message where no Chromium is installed."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from serving import need_serve_extra, running_server, stop, train_tiny

need_serve_extra()
BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
if BROWSER is None:
    pytest.skip("no Chromium installed (apt-get install -y chromium); the playground test needs a real browser",
                allow_module_level=True)
websockets = pytest.importorskip("websockets.sync.client", reason="websockets not installed (comes with uvicorn)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,800", "--remote-debugging-port=0"]


class Page:
    """A minimal DevTools-protocol client for one page: evaluate JavaScript, navigate, take screenshots."""

    def __init__(self, url: str) -> None:
        self.socket = websockets.connect(url, max_size=None, open_timeout=30)
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60, every: float = 0.02):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(every)
        page = self.js("document.body.innerText.slice(0, 600)")
        raise AssertionError(f"timed out waiting for {expression}; the page shows: {page!r}")


@pytest.fixture
def browser():
    profile = tempfile.mkdtemp(prefix="smdm-chromium-")
    process = subprocess.Popen([BROWSER, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"{BROWSER} did not start a DevTools endpoint")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as response:
            target = next(t for t in json.loads(response.read()) if t["type"] == "page")
        page = Page(target["webSocketDebuggerUrl"])
        yield page
        page.socket.close()
    finally:
        stop(process, 10)
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def trained(toy_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("playground")
    return {objective: train_tiny(toy_data, root / objective, objective, steps=150) for objective in ("mdm", "arm")}


def fill_and_submit(page: Page, fields: dict) -> None:
    page.wait_for("window.smdmPlayground && window.smdmPlayground.family")
    for name, value in fields.items():
        page.js(f"document.getElementById({json.dumps(name)}).value = {json.dumps(str(value))}")
    page.js("document.getElementById('go').click()")


def test_playground_shows_the_mdm_unmasking_step_by_step(trained, browser, tmp_path):
    with running_server(trained["mdm"]) as base:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=base + "/")
        fill_and_submit(browser, {"prompt": "the cat sat on the", "max_tokens": 24, "steps": 12, "temperature": 0,
                                  "replay": 150})
        # Mid-denoising: some positions revealed, some still masked. The screenshot is the docs' picture.
        browser.wait_for("(() => { const f = window.smdmPlayground.frames; "
                         "return f.length >= 5 && f[f.length - 1].hidden > 0; })()")
        shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
        artifacts = Path(os.environ.get("SMDM_ARTIFACTS", tmp_path))
        artifacts.mkdir(parents=True, exist_ok=True)
        (artifacts / "playground.png").write_bytes(shot)
        assert shot[:8] == b"\x89PNG\r\n\x1a\n"
        browser.wait_for("window.smdmPlayground.done")
        frames = browser.js("window.smdmPlayground.frames")
        status = browser.js("document.getElementById('state').textContent")
        masks_left = browser.js("document.querySelectorAll('#tokens .mask').length")
        passes = browser.js("document.getElementById('passes').textContent")
    assert status.startswith("done"), status
    steps = [f for f in frames[:-1]]  # the last frame is the final answer
    assert [f["step"] for f in steps] == list(range(1, 13))
    assert [f["hidden"] for f in steps] == [24 - 2 * k for k in range(1, 13)]  # two revealed per step
    assert all(f["shown"] == f["hidden"] for f in frames)  # every hidden position is drawn as a placeholder
    assert all(f["highlighted"] == 2 for f in steps)  # exactly the newly revealed tokens are highlighted
    assert frames[-1]["hidden"] == 0 and masks_left == 0 and passes == "12"


def test_playground_shows_arm_tokens_in_order(trained, browser):
    with running_server(trained["arm"]) as base:
        browser.call("Page.navigate", url=base + "/")
        fill_and_submit(browser, {"prompt": "the quick", "max_tokens": 10, "temperature": 0, "replay": 0})
        browser.wait_for("window.smdmPlayground.done")
        frames = browser.js("window.smdmPlayground.frames")
        hidden_fields = browser.js("getComputedStyle(document.getElementById('steps').parentElement).display")
    assert hidden_fields == "none"  # MDM-only settings are hidden for an ARM
    lengths = [f["step"] for f in frames[:-1]]
    assert lengths == list(range(1, len(lengths) + 1)) and all(f["hidden"] == 0 for f in frames)
    assert all(f["highlighted"] == 1 for f in frames[:-1])  # one new token per step, appended in order
