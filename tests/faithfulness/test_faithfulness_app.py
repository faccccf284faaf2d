"""`xclip app` in a real headless browser (Debian's Chromium driven by Selenium): the page opens on
the first prompt with its table, images and heatmap figure; an uploaded file scores what the
database holds; errors show their message. Plus the app's logic without a browser (`Browser`).

Needs ``chromium`` + ``chromium-driver`` (``apt-get install -y chromium chromium-driver``, done by
``.ci/run``) and the ``test`` extra (selenium, gradio)."""

import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from file_fixtures import write_bomb_png
from PIL import Image
from tipai_fixtures import write_database, write_odd_images

from xclip.cli import main
from xclip.data.images import load_image01
from xclip.faithfulness.app import PLACEHOLDER, Browser, build_app, shown_errors
from xclip.faithfulness.database import (
    FaithfulnessDatabase,
    ImageRecord,
    PromptRecord,
    ScoreRecord,
    file_sha256,
)

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("app") / "tipai.db"
    write_database(path, n=3)
    return path


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """The shipped example folder plus an RGBA, a 300x200 and a 128x96 image, scored by `xclip
    validate` (3x3 grid): (folder, database, {odd file: what it is})."""
    root = tmp_path_factory.mktemp("scored")
    folder = shutil.copytree(ROOT / "examples" / "tipai_folder", root / "images")
    odd = write_odd_images(folder)
    main(
        [
            "validate",
            "--config",
            str(ROOT / "configs" / "tipai_folder.yaml"),
            "--data.init_args.data_root",
            str(folder),
            "--model.init_args.db_path",
            str(root / "tipai.db"),
            "--model.init_args.grid",
            "3",
            "--trainer.logger.init_args.save_dir",
            str(root / "logs"),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    return folder, root / "tipai.db", odd


def test_browser_logic_without_a_browser(db):
    browser = Browser(db)
    assert [pid for _, pid in browser.choices()] == ["prompt_000", "prompt_001", "prompt_002"]
    table, gallery, figure = browser.prompt_view("prompt_001")
    assert table.count("| chosen |") == 1 and table.count("| rejected |") == 1
    assert len(gallery) == 4 and gallery[0][0].shape == (64, 64, 3)
    assert figure.ndim == 3 and figure.shape[2] == 3 and figure.shape[1] > 500
    with pytest.raises(ValueError, match="not in"):
        browser.prompt_view("nope")
    with pytest.raises(ValueError, match="type a prompt"):
        browser.score_upload(None, " ")


def test_an_uploaded_file_scores_what_the_database_holds(scored, tmp_path, monkeypatch):
    folder, db, odd = scored
    monkeypatch.chdir(tmp_path)  # the stored paths resolve from any working directory
    browser = Browser(db)
    compared = []
    for pid, prompt in browser.db.prompts():
        stored = browser.db.scores(pid)
        for rec in browser.db.images(pid):
            _, out = browser.score_file(rec.path, prompt)
            assert float(out.global_score[0]) == pytest.approx(stored[rec.image_id]["clip"].global_score, abs=1e-5), (
                rec.path
            )
            for name in ("crops", "dense", "dense_gradeclip"):
                np.testing.assert_allclose(out.maps[name][0].numpy(), stored[rec.image_id][name].grid, atol=1e-5)
            compared.append(Path(rec.path).name)
    assert len(compared) == 27 and set(odd) <= set(compared)
    # the RGBA file's transparent half is composited on white (Gradio's array dropped the alpha)
    rgba, _ = browser.score_file(folder / "odd_0.png", "a red circle")
    assert torch.equal(rgba[0, :, :, 40:], torch.ones(3, 64, 24))
    # and the prompt view shows the stored files themselves, from this other working directory
    _, gallery, _ = browser.prompt_view("odd")
    for (shown, _), rec in zip(gallery, browser.db.images("odd")):
        expected = (load_image01(rec.path, 64).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        assert np.array_equal(shown, expected)


def _pixels(path: Path, value: int) -> Path:
    Image.fromarray(np.full((64, 64, 3), value, np.uint8)).save(path)
    return path


def test_the_app_shows_only_unchanged_files_of_the_recorded_folder(tmp_path):
    """A crafted database points at files outside its recorded folder (by an absolute path and by
    ``..``); a scored file went missing, another changed: none is shown, each is named."""
    folder, private = tmp_path / "run", tmp_path / "private"
    folder.mkdir()
    private.mkdir()
    secret = _pixels(private / "photo.png", 10)
    files = [_pixels(folder / f"p_{s}.png", 40 * s + 20) for s in range(5)]
    records = [
        ImageRecord(f"p_{s}", "p", s, "folder", 64, 64, path=str(f), sha256=file_sha256(f)) for s, f in enumerate(files)
    ]
    scores = [ScoreRecord(f"p_{s}", "clip", 0.1 * s) for s in range(5)]
    with FaithfulnessDatabase(tmp_path / "tipai.db", {"backbone": "xclip:tiny-shapes", "grid": 3}) as stored:
        stored.write([PromptRecord("p", "a red circle", records, scores, root=str(folder))])
    with sqlite3.connect(tmp_path / "tipai.db") as conn:  # what a crafted file could hold
        conn.execute("UPDATE images SET path = ? WHERE image_id = 'p_3'", (str(secret),))
        conn.execute("UPDATE images SET path = ? WHERE image_id = 'p_4'", (f"{folder}/../private/photo.png",))
    _pixels(files[1], 255)  # changed since scored
    files[2].unlink()  # missing
    table, gallery, _ = Browser(tmp_path / "tipai.db").prompt_view("p")
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| p_")]
    notes = {row[0]: row[-1] for row in cells}
    assert notes["p_0"] == ""
    assert notes["p_1"].startswith(f"changed since it was scored: {files[1]}")
    assert notes["p_2"].startswith(f"missing file: {files[2]}")
    assert notes["p_3"].startswith(f"not shown: {secret} is not a file of the database's image folder {folder}")
    assert notes["p_4"].startswith(f"not shown: {folder}/../private/photo.png is not a file")
    grey = round(PLACEHOLDER * 255)
    assert np.array_equal(gallery[0][0], np.full((64, 64, 3), 20, np.uint8))
    for shown, _ in gallery[1:]:
        assert np.array_equal(shown, np.full((64, 64, 3), grey, np.uint8))


def test_app_errors_reach_the_user_as_their_message(scored, tmp_path):
    gr = pytest.importorskip("gradio", reason='needs the app extra: pip install "xclip[app]"')
    folder, db, _ = scored
    score = shown_errors(Browser(db).score_upload)
    with pytest.raises(gr.Error, match="type a prompt to score the image against"):
        score(str(folder / "odd_0.png"), " ")
    with pytest.raises(gr.Error, match="upload an image file"):
        score(None, "a red circle")
    bomb = write_bomb_png(tmp_path / "bomb.png")
    with pytest.raises(gr.Error, match=re.escape(f"{bomb}: declares more than")):
        score(str(bomb), "a red circle")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(gr.Error, match="junk.png: cannot read the image"):
        score(str(tmp_path / "junk.png"), "a red circle")


def test_the_app_opens_on_the_first_prompt(db):
    pytest.importorskip("gradio", reason='needs the app extra: pip install "xclip[app]"')
    demo = build_app(Browser(db))
    picker = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "prompt-select")
    assert picker.value == "prompt_000"
    loads = [fn for fn in demo.fns.values() if any(t[1] == "load" for t in fn.targets)]
    assert len(loads) == 1 and [b._id for b in loads[0].inputs] == [picker._id]


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


def test_app_in_headless_chromium(scored):
    if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
        pytest.skip("needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")
    pytest.importorskip("gradio", reason='needs the app extra: pip install "xclip[app]"')
    webdriver = pytest.importorskip("selenium.webdriver", reason='needs selenium: pip install "xclip[test]"')
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    folder, db, _ = scored
    with FaithfulnessDatabase(db, readonly=True) as stored:
        pids = [pid for pid, _ in stored.prompts()]
        odd_score = stored.scores("odd")["odd_0"]["clip"].global_score
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "xclip.cli", "app", "--db", str(db), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
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
        for arg in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--window-size=1400,1800",
        ):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service(DRIVER), options=options)
        driver.get(url)
        assert "TiPAI" in _wait(lambda: driver.find_elements(By.TAG_NAME, "h1"), 60, "the page")[0].text

        def text(css: str) -> str:
            """The text of the element `css`, "" while the page has not rendered it (or re-renders it)."""
            try:
                return "\n".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, css))
            except StaleElementReferenceException:
                return ""

        def heatmap_loaded() -> bool:
            try:
                images = [
                    i for i in driver.find_elements(By.CSS_SELECTOR, "#prompt-heatmaps img") if i.get_attribute("src")
                ]
                return (
                    bool(images)
                    and driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", images[0])
                    > 500
                )
            except StaleElementReferenceException:
                return False

        # the first prompt is shown without touching the picker
        _wait(lambda: "odd_0" in text("#prompt-table"), 120, "the first prompt")
        _wait(heatmap_loaded, 60, "the first prompt's heatmaps")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#prompt-images img")) == 3
        _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#prompt-select input"), 60, "the prompt picker")[0].click()
        options_shown = _wait(
            lambda: driver.find_elements(By.CSS_SELECTOR, "#prompt-select [role=option]"), 30, "the prompt options"
        )
        assert [o.get_attribute("aria-label").split(":")[0] for o in options_shown] == pids
        options_shown[pids.index("prompt_001")].click()
        table = _wait(
            lambda: "prompt_001_0" in text("#prompt-table") and text("#prompt-table"),
            120,
            "the selected prompt's table",
        )
        assert "chosen" in table and "rejected" in table
        _wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#prompt-images img")) == 4, 60, "its 4 images")

        # an uploaded RGBA file scores what the database holds for it
        next(b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if "Score an image" in b.text).click()
        _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#upload-image input[type=file]"), 30, "the upload field")[
            0
        ].send_keys(str(folder / "odd_0.png"))
        _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#upload-image [aria-label='odd_0.png']"), 60, "the upload")
        prompt = driver.find_element(By.CSS_SELECTOR, "#upload-prompt textarea")
        prompt.send_keys("a red circle")
        driver.find_element(By.CSS_SELECTOR, "#upload-score").click()
        result = _wait(
            lambda: re.search(r"global score \(cosine with the prompt\): ([-0-9.]+)", text("#upload-result")),
            120,
            "the score",
        )
        assert result[1] == f"{odd_score:.4f}"
        # an error reaches the page as its message
        prompt.send_keys(Keys.CONTROL, "a")
        prompt.send_keys(Keys.BACK_SPACE)
        driver.find_element(By.CSS_SELECTOR, "#upload-score").click()
        _wait(lambda: "type a prompt to score the image against" in text("body"), 60, "the error message")
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)
