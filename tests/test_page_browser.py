"""The service's page in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``) driven by
Selenium uploads real LFW faces to ``crfr serve`` on 127.0.0.1 and reads the answer from the page.

Opt-in (about a minute): ``CRFR_BROWSER_TESTS=1``. It serves the main job's student (``models/student``) when
it is there, else a random tiny network; the screenshot goes to ``outputs/serve-page.png`` (the one in
``docs/serve-page.png`` came from this test).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from tests.facedata import free_port, image_path, make_params, require_lfw, save_random_model, stop, wait_for_health

REPO = Path(__file__).resolve().parents[1]
SHOT = REPO / "outputs" / "serve-page.png"
PEOPLE = ("Tony_Blair", "Serena_Williams", "Colin_Powell", "Hugo_Chavez", "Gerhard_Schroeder")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    os.environ.get("CRFR_BROWSER_TESTS") != "1" or not (CHROMIUM and DRIVER),
    reason="opt-in real-browser test of the page: apt-get install chromium chromium-driver, then "
           "CRFR_BROWSER_TESTS=1" + ("" if CHROMIUM and DRIVER else " (chromium or chromedriver not found)"))


@pytest.fixture()
def service(tmp_path):
    require_lfw()
    trained, thresholds = REPO / "models" / "student", REPO / "reports" / "evaluate" / "thresholds.json"
    if (trained / "model.pt").is_file() and thresholds.is_file():  # the main job's student, with its thresholds
        model = shutil.copytree(trained, tmp_path / "student")
        (model / "thresholds.json").write_text(json.dumps(json.loads(thresholds.read_text())["models"]["student"]))
    else:
        model = save_random_model(tmp_path / "m", 1, "waveresnet")
    make_params(tmp_path)
    args = ["--model", str(model), "--params", str(tmp_path / "params.yaml")]
    enrol = tmp_path / "enrol"
    for person in PEOPLE:
        (enrol / person).mkdir(parents=True)
        shutil.copy(image_path(person, 1), enrol / person)
    gallery = tmp_path / "gallery"
    subprocess.run([sys.executable, "-m", "crfr.cli", "gallery", "build", str(enrol), "--out", str(gallery), *args],
                   check=True, capture_output=True, timeout=600)
    port, token = free_port(), "browser-test-token"
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "crfr.cli", "serve", "--port", str(port), "--gallery",
                             str(gallery), *args], env={**os.environ, "CRFR_SERVE_TOKEN": token}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_health(f"http://127.0.0.1:{port}/health", proc)
        yield f"http://127.0.0.1:{port}/", token
    finally:
        stop(proc)
        log.close()


@pytest.fixture()
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1500"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_an_operator_identifies_and_verifies_real_faces_on_the_page(service, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    url, token = service
    wait = WebDriverWait(browser, 120)
    browser.get(url)
    wait.until(lambda d: "version" in d.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "token").send_keys(token)

    # The enrolled photo itself: whatever the model, its own gallery face is at distance 0.
    browser.find_element(By.ID, "probe").send_keys(str(image_path("Tony_Blair", 1)))
    browser.find_element(By.CSS_SELECTOR, "#identify-form button").click()
    decision = wait.until(seen.visibility_of_element_located((By.ID, "decision")))
    assert decision.text == "Decision: Tony_Blair", decision.text
    cards = browser.find_elements(By.CSS_SELECTOR, "#identify-result .card img")
    assert len(cards) == 1 + len(PEOPLE)  # the probe and the top-5 gallery faces
    wait.until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", c)
                             for c in cards))
    assert "threshold" in browser.find_element(By.ID, "identify-result").text

    # Verify side by side: another photo of him, brought down to 28 px as a camera would see him.
    small = tmp_path / "Tony_Blair_0002_28px.png"
    face = cv2.imread(str(image_path("Tony_Blair", 2)))
    cv2.imwrite(str(small), cv2.resize(face[62:188, 62:188], (28, 28), interpolation=cv2.INTER_AREA))
    browser.find_element(By.ID, "a").send_keys(str(small))
    browser.find_element(By.ID, "b").send_keys(str(image_path("Tony_Blair", 1)))
    browser.find_element(By.CSS_SELECTOR, "#verify-form button").click()
    verdict = wait.until(seen.visibility_of_element_located((By.ID, "verdict")))
    assert verdict.text in ("Decision: same", "Decision: different"), verdict.text
    assert "(probe 28 px)" in browser.find_element(By.ID, "verify-result").text

    # A wrong token is shown as the service's one-line answer, not a broken page.
    browser.find_element(By.ID, "token").clear()
    browser.find_element(By.ID, "token").send_keys("wrong")
    browser.find_element(By.CSS_SELECTOR, "#identify-form button").click()
    wait.until(lambda d: "missing or wrong token" in d.find_element(By.ID, "identify-result").text)
    browser.find_element(By.ID, "token").clear()
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "#identify-form button").click()
    wait.until(lambda d: d.find_element(By.ID, "decision").text == "Decision: Tony_Blair")
    SHOT.parent.mkdir(exist_ok=True)
    browser.save_screenshot(str(SHOT))
    assert SHOT.stat().st_size > 10_000
