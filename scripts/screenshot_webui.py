"""Make docs/images/webui.png: `customshift serve`'s page (default model), after a generation from an example.

Runs offline against 127.0.0.1 only, with Debian's headless Chromium (``setup.sh`` installs it):

    python scripts/screenshot_webui.py [--out docs/images/webui.png]

It also checks the example flow end to end (an example's reference must reach the generator).
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "webui.png")
    parser.add_argument("--width", type=int, default=1400)
    args = parser.parse_args()

    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from customshift import webui

    driver_path = shutil.which("chromedriver")
    if not Path(CHROMIUM).exists() or driver_path is None:
        print("needs /usr/bin/chromium and chromedriver: apt-get install chromium chromium-driver", file=sys.stderr)
        return 2
    pipe, notice, name = webui.load_pipeline(device="cpu")  # what `customshift serve` shows by default
    demo = webui.create_app(pipe, notice=notice, model_name=name, default_steps=20,
                            default_guidance=webui.default_guidance_for(name))
    url = webui.launch(demo, "127.0.0.1", free_port(), block=False, quiet=True)
    with tempfile.TemporaryDirectory() as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", "--hide-scrollbars", f"--window-size={args.width},1000",
                     f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
        try:
            wait = WebDriverWait(driver, 60)
            driver.get(url)
            wait.until(ec.element_to_be_clickable((By.ID, "generate")))
            # Start from an example (a held-out synthetic robot), ask for two images of it.
            example = wait.until(ec.element_to_be_clickable(
                (By.XPATH, "//tr[.//*[contains(text(), 'robot on a')]] | //*[contains(@class, 'example')]"
                           "[.//*[contains(text(), 'robot on a')]]")))
            example.click()
            wait.until(ec.text_to_be_present_in_element((By.ID, "references"), "robot"))
            count = driver.find_element(By.CSS_SELECTOR, "#num-images input[type=number]")
            count.send_keys(Keys.CONTROL, "a")
            count.send_keys("2", Keys.TAB)
            driver.find_element(By.ID, "generate").click()
            wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "Generated 2 image(s)"))
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) >= 2)
            wait.until(lambda d: "parameters.json" in d.find_element(By.ID, "downloads").text)
            time.sleep(1.0)  # let the gallery's images finish painting
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(args.width, min(int(height) + 40, 2400))
            driver.execute_script("window.scrollTo(0, 0)")
            time.sleep(0.5)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out))
        finally:
            driver.quit()
            demo.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
