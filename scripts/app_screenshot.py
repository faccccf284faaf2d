"""A screenshot of ``xclip app`` for the docs (docs/tipai_app.png): starts the app on a TiPAI database, opens it in
Debian's headless Chromium, selects a prompt and saves the page.

    python scripts/app_screenshot.py --db runs/tipai_shapes/tipai.db --head checkpoints/tspo-head-tiny-shapes \
        --prompt 2 --out docs/tipai_app.png
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By


def wait(condition, timeout: float):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError("the app did not show what was expected in time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--head", default=None)
    parser.add_argument("--prompt", type=int, default=0, help="position of the prompt in the picker")
    parser.add_argument("--out", default="docs/tipai_app.png")
    parser.add_argument("--size", default="1400,1700")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "xclip.cli", "app", "--db", args.db, "--port", str(port)]
    if args.head:
        cmd += ["--head", args.head]
    server = subprocess.Popen(cmd, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        f"--window-size={args.size}",
    ):
        options.add_argument(arg)
    driver = None
    try:
        url = f"http://127.0.0.1:{port}/"

        def up() -> bool:
            try:
                return urllib.request.urlopen(url, timeout=2).status == 200
            except OSError:
                return False

        wait(up, 300)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        driver.get(url)
        wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#prompt-select input"), 60)[0].click()
        option = wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#prompt-select [role=option]"), 30)[args.prompt]
        pid = option.get_attribute("aria-label").split(":")[0]
        option.click()
        # the app opens on the first prompt: wait for the chosen one's table, then for its figure
        wait(lambda: f"{pid}_" in driver.find_element(By.CSS_SELECTOR, "#prompt-table").text, 300)
        image = wait(
            lambda: [
                i for i in driver.find_elements(By.CSS_SELECTOR, "#prompt-heatmaps img") if i.get_attribute("src")
            ],
            300,
        )[0]
        wait(lambda: driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image), 60)
        time.sleep(1)
        driver.save_screenshot(args.out)
        print(f"wrote {args.out}")
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
