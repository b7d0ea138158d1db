"""The review page in a real headless browser (Debian's chromium through chromedriver): the latest
images with verdicts, scores and heat maps, the counts, and a reviewer's correction copied into
REVIEW_DIR. Outside CI a machine without the browser skips this test; under CI (CI=true, where
.ci/run installs chromium) a missing browser fails it."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from conftest import TINY, make_mvtec_category, outputs, run_script
from live_server import LiveServer

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
TOKEN = "page#token&x y+%"  # characters a URL query must escape: the page's pictures and buttons must still carry it


def _browser():
    """A headless chromium driven by selenium, or a skip (outside CI) / failure (in CI) saying what is missing."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("the selenium package")
    if missing:
        message = f"the review page test needs {', '.join(missing)} (apt-get install chromium chromium-driver; pip install -r requirements.txt)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="review-page-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    return driver, profile


def test_review_page_shows_verdicts_and_records_corrections(tmp_path):
    driver, profile = _browser()
    from selenium.webdriver.common.by import By

    try:
        category = make_mvtec_category(tmp_path / "data" / "part")
        result = run_script("train.py", f"DATASET_DIR={category}", *TINY, *outputs(tmp_path), "CLASSIFIER=False")
        assert result.returncode == 0, result.stderr
        review, watch = tmp_path / "review", tmp_path / "incoming"
        watch.mkdir()
        server = LiveServer(
            f"DATASET_DIR={category}", *TINY, *outputs(tmp_path), "CLASSIFIER=False", f"REVIEW_DIR={review}",
            f"SERVE_TOKEN={TOKEN}", f"WATCH_DIR={watch}", "WATCH_SETTLE_SECONDS=0.5", log_path=tmp_path / "serve.log",
        )
        try:
            defect = (category / "test" / "blob" / "000.png").read_bytes()
            answer = server.client.post("/inspect", content=defect, headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "image/png"})
            assert answer.status_code == 200
            sent_id = answer.json()["id"]
            shutil.copy(category / "test" / "good" / "000.png", watch / "from-the-line.png")  # the other source
            deadline = time.monotonic() + 30
            while server.client.get("/health").json()["watch"]["inspected"] < 1 and time.monotonic() < deadline:
                time.sleep(0.2)

            driver.get(f"{server.url}/")  # without the token the page shows no part
            assert "needs its token" in driver.find_element(By.TAG_NAME, "body").text
            assert not driver.find_elements(By.CSS_SELECTOR, ".card")
            driver.get(f"{server.url}/?token={quote(TOKEN, safe='')}")
            cards = driver.find_elements(By.CSS_SELECTOR, ".card")
            assert len(cards) == 2
            assert {card.get_attribute("data-verdict") for card in cards} <= {"good", "defect"}
            names = driver.find_element(By.ID, "images").text
            assert "from-the-line.png" in names and "folder" in names and "http" in names
            counts = int(driver.find_element(By.ID, "count-good").text) + int(driver.find_element(By.ID, "count-defect").text)
            assert counts == 2
            for image in driver.find_elements(By.CSS_SELECTOR, ".card img"):  # the heat maps were drawn and loaded
                assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image)
            card = driver.find_element(By.ID, f"image-{sent_id}")
            assert card.get_attribute("data-verdict") == answer.json()["verdict"]
            card.find_element(By.CSS_SELECTOR, "button.mark-good").click()  # the reviewer disagrees or agrees: either is recorded

            deadline = time.monotonic() + 15
            while not list((review / "good").glob("*")) and time.monotonic() < deadline:
                time.sleep(0.2)
            copies = list((review / "good").iterdir())
            assert [copy.name for copy in copies] == [f"{sent_id}.png"] and copies[0].read_bytes() == defect
            assert "reviewer: good" in driver.find_element(By.ID, f"image-{sent_id}").text
            driver.find_element(By.ID, f"image-{sent_id}").find_element(By.CSS_SELECTOR, "button.mark-defect").click()
            deadline = time.monotonic() + 15
            while not list((review / "defect").glob("*")) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert [p.name for p in (review / "defect").iterdir()] == [f"{sent_id}.png"] and not list((review / "good").iterdir())
            # without the token a correction is refused and nothing is written
            refused = server.client.post(f"/review/{sent_id}", data={"label": "good"})
            assert refused.status_code == 401 and not list((review / "good").iterdir())
        finally:
            assert server.stop() == 0, server.log()
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
