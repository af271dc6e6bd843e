"""`python -m cotir_jax.demo` served on 127.0.0.1: restores through Gradio's HTTP API
(gradio_client) and in headless Chromium (selenium), answers bad uploads with a message and
deletes uploads once answered; `--help` and user errors on the command line."""

import glob
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from test_train import SHORT, _env, shared_run  # the session's short tiny run and compile cache

gradio_client = pytest.importorskip("gradio_client")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 5  # the page's default (inference.num_steps of configs/tiny.py): one compile for both tests
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1400")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _demo_env(tmp):
  return dict(_env(), GRADIO_TEMP_DIR=str(tmp), GRADIO_ANALYTICS_ENABLED="False",
              HF_HUB_OFFLINE="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  """The demo on a free port with the session's short tiny run; (url, gradio's upload dir)."""
  weights = shared_run("short", *SHORT)
  uploads = tmp_path_factory.mktemp("gradio")
  port = _free_port()
  log = open(tmp_path_factory.mktemp("log") / "demo.log", "w+")
  proc = subprocess.Popen([sys.executable, "-m", "cotir_jax.demo", "--port", str(port),
                           "--weights", weights], cwd=REPO, env=_demo_env(uploads), stdout=log,
                          stderr=subprocess.STDOUT, text=True)
  url = f"http://127.0.0.1:{port}/"
  start = time.time()
  while True:
    try:
      with socket.create_connection(("127.0.0.1", port), timeout=1):
        break
    except OSError:
      log.seek(0)
      assert proc.poll() is None, "demo exited: " + log.read()[-3000:]
      assert time.time() - start < 600, "demo did not start: " + log.read()[-3000:]
      time.sleep(1)
  yield url, uploads
  proc.terminate()
  proc.wait(timeout=60)
  log.close()


def _example(tmp_path) -> str:
  """A held-out LQ image of data/sample_val mirrored, as a user would upload it (other bytes
  than the page's examples, which are kept)."""
  import io
  import tarfile
  shard = sorted(glob.glob(os.path.join(REPO, "data", "sample_val", "image", "*", "*.tar")))[0]
  with tarfile.open(shard) as t:
    member = next(m for m in t.getmembers() if m.name.endswith(".lq.png"))
    with Image.open(io.BytesIO(t.extractfile(member).read())) as im:
      path = tmp_path / "upload.png"
      im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path)
  return str(path)


def _restore(url, path, **kw):
  client = gradio_client.Client(url, verbose=False)
  args = dict(prompt="Make this picture clearer.", steps=STEPS, seed=42, max_edge=512)
  args.update(kw)
  return client.predict(gradio_client.handle_file(path), args["prompt"], args["steps"],
                        args["seed"], args["max_edge"], api_name="/restore")


def test_http_api_restores_an_example_and_keeps_no_upload(server, tmp_path):
  url, uploads = server
  path = _example(tmp_path)
  result, slider, status = _restore(url, path)
  with Image.open(path) as lq, Image.open(result) as out:
    assert out.size == lq.size and out.mode == "RGB"
    assert np.asarray(out).std() > 0
  assert status.startswith("Restored 64×64 in "), status
  with Image.open(slider[0]) as before:  # the before/after pair: the input as restored
    assert before.size == (64, 64)
  # the uploaded file is gone once answered (what the page shows, the input as restored and the
  # result, stays in Gradio's cache, swept every minute of files older than 10 minutes)
  kept = glob.glob(os.path.join(uploads, "**", os.path.basename(path)), recursive=True)
  assert not kept, kept


def test_bad_uploads_are_answered_with_a_message(server, tmp_path):
  url, _ = server
  junk = tmp_path / "junk.png"
  junk.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
  result, slider, status = _restore(url, str(junk))
  assert result is None and "not an image that can be read" in status, status
  big = tmp_path / "big.png"  # 4100 x 4100 > data.max_image_pixels: refused from the header
  Image.new("L", (4100, 4100)).save(big)
  _, _, status = _restore(url, str(big))
  assert "16,810,000 pixels, more than this demo takes" in status, status
  _, _, status = _restore(url, _example(tmp_path), max_edge=8)
  assert "at least 16 pixels" in status, status


def test_help_and_user_errors():
  env = _env()
  run = lambda *a: subprocess.run([sys.executable, "-m", "cotir_jax.demo", *a], cwd=REPO,
                                  env=env, capture_output=True, text=True, timeout=300)
  proc = run("--help")
  assert proc.returncode == 0 and "--weights" in proc.stdout and "--share" in proc.stdout
  for args, message in ((["--weights", "/nonexistent/run"], "--weights '/nonexistent/run' does"),
                        (["--config", "configs/nope.py"], "configs/nope.py' does not exist"),
                        (["--config.model.nope=1"], "unknown config field")):
    proc = run(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("cotir_jax: error: ") and message in lines[-1], proc.stderr


def _chrome():
  """A selenium Chrome driver on Debian's chromium, or the reason there is none."""
  chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
  if not (chromium and driver):
    return None, ("Debian's chromium and chromium-driver are not installed (.ci/run installs "
                  "them with apt-get when it can)")
  try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
  except ImportError as e:
    return None, f"selenium is missing ({e})"
  return (webdriver, Service, chromium, driver), None


def test_browser_restores_an_example(server, tmp_path):
  """Headless Chromium: load the page, pick a held-out example, restore, screenshot."""
  found, reason = _chrome()
  if found is None:
    pytest.skip(reason)
  webdriver, Service, chromium, driver_path = found
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support import expected_conditions as EC
  from selenium.webdriver.support.ui import WebDriverWait
  url, _ = server
  options = webdriver.ChromeOptions()
  options.binary_location = chromium
  for flag in CHROMIUM_FLAGS:
    options.add_argument(flag)
  options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
  browser = webdriver.Chrome(service=Service(driver_path), options=options)
  try:
    browser.get(url)
    wait = WebDriverWait(browser, 300)
    example = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, ".gallery-item, "
                                                     "[data-testid='examples'] button, "
                                                     ".examples button")))
    example.click()
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#input img"))
    browser.find_element(By.ID, "restore").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "Restored"))
    assert browser.find_elements(By.CSS_SELECTOR, "#result img")
    shot = tmp_path / "demo.png"
    browser.save_screenshot(str(shot))
    with Image.open(shot) as im:
      assert im.size[0] >= 800
  finally:
    browser.quit()
