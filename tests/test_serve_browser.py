"""lsms serve end to end in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

Checks that the page opens the preselected bundled slice on load, large (scaled to the window), then opens
another, types two sentences, checks that they show two masks that differ, each with its existence score beside
the model's threshold, that each sentence box shows its whole sentence with a colour swatch beside it, and that
the downloaded PNGs are byte for byte what ``lsms predict`` writes for the same input, that a second tab has its own session which
closing the tab ends, that a bad sentence gets a message and the page keeps working, that a NIfTI volume
uploaded through the page and segmented whole downloads as the same mask volume ``lsms predict`` writes,
and that the page fetched nothing from anywhere but the viewer. Saves a screenshot.

Skips (with the reason) when Playwright or Chromium is missing: ``pip install -e '.[browser]'`` and
``apt-get install chromium``; ``.ci/run`` installs both. Environment:
    LSMS_REQUIRE_BROWSER=1: fail instead of skipping (CI).
    LSMS_CHROMIUM: the browser executable (default: ``chromium`` or ``chromium-browser`` on PATH).
    LSMS_SERVE_MODEL: serve this run or checkpoint instead of the tiny random model built here.
    LSMS_SERVE_SCREENSHOT: also write the screenshot there (docs/images/serve.png is made this way, with a
        trained ``make demo`` run as LSMS_SERVE_MODEL).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from lsms.cli import main
from lsms.predict import Predictor
from lsms.serve import Viewer, ViewerServer
from lsms.serve.examples import examples

from toy_data import make_text_sensitive_checkpoint

REQUIRED = os.environ.get("LSMS_REQUIRE_BROWSER") == "1"  # CI: fail rather than skip
CHROMIUM = os.environ.get("LSMS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
try:
    import playwright.sync_api as playwright
except ImportError:
    if REQUIRED:
        raise
    pytest.skip("Playwright is not installed: pip install -e '.[browser]'", allow_module_level=True)
if CHROMIUM is None:
    reason = "no Chromium found: apt-get install chromium (Debian/Ubuntu) or set LSMS_CHROMIUM to its executable"
    if REQUIRED:
        raise RuntimeError(reason)
    pytest.skip(reason, allow_module_level=True)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = os.environ.get("LSMS_SERVE_MODEL")
    predictor = Predictor.from_checkpoint(model, "cpu") if model else None
    if model is None:  # the tiny model has no existence threshold of its own: give it one, for the page to show
        model = make_text_sensitive_checkpoint(tmp_path_factory.mktemp("model") / "model.pt")
        predictor = Predictor.from_checkpoint(model, "cpu", existence_threshold=0.5)
    viewer = Viewer(predictor, model_name=str(model))
    server = ViewerServer(viewer, "127.0.0.1", 0)  # a free loopback port
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, model
    server.shutdown()
    server.server_close()


def test_two_sentences_in_a_real_browser(served, tmp_path):
    server, model = served
    e = examples()[5]  # four lesions; two of its sentences pick two of them (the screenshot)
    requests: list[str] = []
    volume = _nifti_volume(tmp_path / "ct.nii.gz")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 860}, accept_downloads=True)
        page.on("request", lambda r: requests.append(r.url))
        page.goto(server.url)
        page.wait_for_selector("body[data-ready='1']")
        # the preselected bundled slice is open at once, its window menu filled, the slice scaled to the space
        playwright.expect(page.locator("#image-info")).to_contain_text(examples()[0].id)
        assert page.locator("#window option").count() > 1 and page.input_value("#window") == "liver"
        page.wait_for_selector("#panels .panel img.base")
        shown = page.locator("#panels img.base").bounding_box()
        assert shown is not None and shown["width"] >= 600, shown  # a 128 px slice, in a 1400 x 860 window
        assert page.locator("#panels img.base").evaluate("i => getComputedStyle(i).imageRendering") == "pixelated"
        page.select_option("#example", e.id)
        page.click("#open-example")
        playwright.expect(page.locator("#image-info")).to_contain_text(e.id)
        boxes = page.locator("textarea.sentence")
        assert boxes.count() == 2  # a bundled slice comes with its first two reference sentences
        for i in range(2):
            boxes.nth(i).fill(e.texts[i])
        long = " ".join([e.texts[0]] * 4)  # a long sentence shows whole: its box grows, nothing is cut
        boxes.nth(1).fill(long)
        assert boxes.nth(1).evaluate("t => t.scrollHeight <= t.clientHeight + 1 && t.clientHeight > 60")
        boxes.nth(1).fill(e.texts[1])
        assert boxes.nth(1).evaluate("t => t.scrollHeight <= t.clientHeight + 1")
        colours = page.locator(".sentence-row .swatch").evaluate_all("s => s.map(x => getComputedStyle(x).backgroundColor)")
        assert len(colours) == 2 and colours[0] != colours[1]  # a legend beside each box
        assert boxes.nth(0).evaluate("t => getComputedStyle(t).borderColor") == boxes.nth(1).evaluate(
            "t => getComputedStyle(t).borderColor")  # the boxes themselves are not coloured
        page.check("#features")
        page.click("#segment")
        page.wait_for_selector("#panels .panel[data-index='1'] .features img")
        playwright.expect(page.locator("#message")).to_contain_text("2 sentence(s) in ")
        assert "slice" not in page.inner_text("#message")  # a 2D image has no slice to name
        assert page.locator("#panels .panel img.mask").count() == 2  # two sentences, two masks
        for i in range(2):
            mask = page.locator(f".panel[data-index='{i}'] img.mask").bounding_box()
            assert mask is not None and mask["width"] >= 400, mask
        areas = [int(page.locator(f".panel[data-index='{i}'] .area").inner_text()) for i in range(2)]
        threshold = server.viewer.predictor.existence_threshold
        for i in range(2):  # the existence score beside the model's threshold, and the verdict
            text = page.inner_text(f".panel[data-index='{i}'] .existence")
            said = re.escape(f"(threshold {threshold:.2f}): ")
            assert re.fullmatch(rf"existence score [01]\.\d\d {said}(found|not found)", text), text

        downloads = []
        for i in range(2):
            with page.expect_download() as info:
                page.click(f".panel[data-index='{i}'] a.mask-link")
            path = tmp_path / info.value.suggested_filename
            info.value.save_as(path)
            downloads.append(path.read_bytes())
        with page.expect_download() as info:
            page.click("#settings-link")
        settings_path = tmp_path / "settings.json"
        info.value.save_as(settings_path)

        shot = tmp_path / "serve.png"
        page.screenshot(path=str(shot), full_page=True)
        if os.environ.get("LSMS_SERVE_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["LSMS_SERVE_SCREENSHOT"])

        other = browser.new_page()  # a second tab: its own session, nothing shared
        other.goto(server.url)
        other.wait_for_selector("body[data-ready='1']")
        other.click("#open-example")
        playwright.expect(other.locator("#image-info")).to_contain_text(examples()[0].id)
        assert len(server.viewer.sessions) == 2
        other.close(run_before_unload=True)  # the page says it is closed: its session and files go at once
        for _ in range(600):  # at once on an idle machine; up to 30 s for a loaded one (CI beside training runs)
            if len(server.viewer.sessions) == 1:
                break
            page.wait_for_timeout(50)
        assert len(server.viewer.sessions) == 1
        playwright.expect(page.locator("#image-info")).to_contain_text(e.id)

        page.locator("textarea.sentence").nth(0).fill("x" * 10_000)  # bad input: message, page keeps working
        page.click("#segment")
        playwright.expect(page.locator("#message.error")).to_contain_text("10000 characters; the limit is 1000")
        page.locator("textarea.sentence").nth(0).fill(e.texts[0])
        page.click("#segment")
        playwright.expect(page.locator("#message")).to_contain_text("2 sentence(s) in ")

        # a NIfTI volume through the file input: slice slider, whole volume with progress, NIfTI download
        page.set_input_files("#file", str(volume))
        playwright.expect(page.locator("#image-info")).to_contain_text("ct.nii.gz: nifti, 40 x 48, 4 slices")
        page.locator("#slice").fill("1")
        page.click("#volume")
        playwright.expect(page.locator("#progress-text")).to_contain_text("done: 8 predictions")
        page.click("#segment")
        page.wait_for_selector(".panel[data-index='1'] a.nifti-link")
        playwright.expect(page.locator("#message")).to_contain_text("2 sentence(s) on slice 1 (of 0..3) in ")
        with page.expect_download() as info:
            page.click(".panel[data-index='0'] a.nifti-link")
        info.value.save_as(tmp_path / "served.nii.gz")
        browser.close()

    assert downloads[0] != downloads[1]  # the sentence moves the mask
    np.save(tmp_path / f"{e.id}.npy", e.image.array)
    same = ["--device", "cpu", "--existence-threshold", repr(threshold)]  # the viewer's model, as served
    for i in range(2):
        out = tmp_path / f"cli{i}"
        assert main(["predict", str(model), str(tmp_path / f"{e.id}.npy"), "--text", e.texts[i], "--threshold", "0.5",
                     "--out", str(out), *same]) == 0
        assert downloads[i] == (out / f"{e.id}_mask.png").read_bytes()  # byte for byte
    from PIL import Image

    assert areas == [int((np.array(Image.open(tmp_path / f"cli{i}" / f"{e.id}_mask.png")) > 0).sum()) for i in range(2)]
    assert '"threshold": 0.5' in settings_path.read_text()
    assert all(u.startswith((server.url, "data:", "blob:")) for u in requests), [u for u in requests if
                                                                                 not u.startswith(server.url)]
    assert Path(shot).stat().st_size > 10_000
    import SimpleITK as sitk

    assert main(["predict", str(model), str(volume), "--text", e.texts[0], "--out", str(tmp_path / "vol"), *same]) == 0
    served, cli = (sitk.ReadImage(str(p)) for p in (tmp_path / "served.nii.gz", tmp_path / "vol" / "ct_mask.nii.gz"))
    assert served.GetOrigin() == cli.GetOrigin() and served.GetSpacing() == cli.GetSpacing()
    assert np.array_equal(sitk.GetArrayFromImage(served), sitk.GetArrayFromImage(cli))  # every slice


def _nifti_volume(path: Path) -> Path:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.random.default_rng(1).normal(60, 40, (4, 40, 48)).astype(np.int16))
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((10.0, -20.0, 30.0))
    sitk.WriteImage(img, str(path))
    return path
