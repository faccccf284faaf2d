"""`xclip app` in a real headless browser (Debian's Chromium driven by Selenium): the page loads, a
prompt is selected, its table, images and heatmap figure appear. Plus the app's logic without a
browser (`Browser`).

Needs ``chromium`` + ``chromium-driver`` (``apt-get install -y chromium chromium-driver``, done by
``.ci/run``) and the ``test`` extra (selenium, gradio)."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from tipai_fixtures import write_database

from xclip.faithfulness.app import Browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("app") / "tipai.db"
    write_database(path, n=3)
    return path


def test_browser_logic_without_a_browser(db):
    browser = Browser(db)
    assert [pid for _, pid in browser.choices()] == ["prompt_000", "prompt_001", "prompt_002"]
    table, gallery, figure = browser.prompt_view("prompt_001")
    assert table.count("| chosen |") == 1 and table.count("| rejected |") == 1
    assert len(gallery) == 4 and gallery[0][0].shape == (64, 64, 3)
    assert figure.ndim == 3 and figure.shape[2] == 3 and figure.shape[1] > 500
    with pytest.raises(ValueError, match="not in"):
        browser.prompt_view("nope")
    with pytest.raises(ValueError, match="upload an image and type a prompt"):
        browser.score_upload(np.zeros((8, 8, 3), np.uint8), " ")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(condition, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_app_in_headless_chromium(db):
    if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
        pytest.skip("needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")
    pytest.importorskip("gradio", reason='needs the app extra: pip install "xclip[app]"')
    webdriver = pytest.importorskip("selenium.webdriver", reason='needs selenium: pip install "xclip[test]"')
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen([sys.executable, "-m", "xclip.cli", "app", "--db", str(db), "--port", str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    driver = None
    try:
        url = f"http://127.0.0.1:{port}/"

        def up() -> bool:
            if server.poll() is not None:
                raise AssertionError(f"xclip app exited: {server.stdout.read()}")
            try:
                return urllib.request.urlopen(url, timeout=2).status == 200
            except OSError:
                return False

        _wait(up, 180, "the app to serve")
        options = Options()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--window-size=1400,1800"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service(DRIVER), options=options)
        driver.get(url)
        assert "TiPAI" in _wait(lambda: driver.find_elements(By.TAG_NAME, "h1"), 60, "the page")[0].text
        _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#prompt-select input"), 60, "the prompt picker")[0].click()
        options_shown = _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#prompt-select [role=option]"), 30,
                              "the prompt options")
        assert [o.get_attribute("aria-label").split(":")[0] for o in options_shown] == ["prompt_000", "prompt_001",
                                                                                        "prompt_002"]
        options_shown[1].click()
        heatmap = _wait(lambda: [i for i in driver.find_elements(By.CSS_SELECTOR, "#prompt-heatmaps img")
                                 if i.get_attribute("src")], 120, "the heatmap figure")[0]
        _wait(lambda: driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", heatmap), 30,
              "the heatmap image to load")
        assert driver.execute_script("return arguments[0].naturalWidth", heatmap) > 500
        assert len(driver.find_elements(By.CSS_SELECTOR, "#prompt-images img")) == 4
        table = driver.find_element(By.CSS_SELECTOR, "#prompt-table").text
        assert "prompt_001_0" in table and "chosen" in table and "rejected" in table
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)
