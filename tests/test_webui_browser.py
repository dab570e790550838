"""End to end in a real headless Chromium: load the page, upload a reference, type the subject and a
prompt, generate, see the image in the gallery.

Needs Debian's ``chromium`` and ``chromium-driver`` (``setup.sh`` installs them); skipped only where
/usr/bin/chromium is absent.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent: apt-get install chromium "
                                                     "chromium-driver (setup.sh does) to run the browser test"),
]


def chromedriver() -> str:
    found = shutil.which("chromedriver") or "/usr/lib/chromium/chromedriver"
    if not Path(found).exists():
        pytest.fail("chromium is installed but chromedriver is not: apt-get install chromium-driver")
    return found


def make_driver(user_data_dir: Path):
    """Headless Chromium that talks to nothing but the test server (no sync, updates or QUIC)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1100", f"--user-data-dir={user_data_dir}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(chromedriver()), options=options)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_upload_generate_and_see_the_gallery(tmp_path):
    pytest.importorskip("selenium")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from customshift import webui
    from customshift.tiny import build_tiny_pipeline

    reference = tmp_path / "my_robot.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(reference)
    demo = webui.create_app(build_tiny_pipeline("sd3"), notice=webui.TINY_NOTICE, default_steps=3, examples=2)
    url = webui.launch(demo, "127.0.0.1", free_port(), block=False, quiet=True)
    driver = make_driver(tmp_path / "chromium-profile")
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(url)
        wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#generate")))
        assert "No default model installed: random tiny model" in driver.find_element(By.ID, "notice").text

        driver.find_element(By.CSS_SELECTOR, "#references input[type=file]").send_keys(str(reference))
        wait.until(ec.text_to_be_present_in_element((By.ID, "references"), "my_robot"))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#reference-preview img")))
        driver.find_element(By.CSS_SELECTOR, "#subject input, #subject textarea").send_keys("robot")
        driver.find_element(By.CSS_SELECTOR, "#prompts textarea").send_keys("a robot on the beach")
        driver.find_element(By.ID, "generate").click()

        image = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#gallery img")))
        assert image.get_attribute("src")
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "Generated 1 image(s)"))
        assert demo.customshift_engine.requests_served == 1
        assert "seed 0" in driver.find_element(By.ID, "gallery").get_attribute("innerHTML")
        assert wait.until(lambda d: "parameters.json" in d.find_element(By.ID, "downloads").text)
    finally:
        driver.quit()
        demo.close()
