"""lsms serve without a browser: the request handlers (Viewer) and the HTTP layer, good and bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import re
import shlex
import socket
import struct
import threading
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lsms.cli import main
from lsms.predict import Predictor
from lsms.serve import ServeError, Viewer, ViewerServer
from lsms.serve.examples import examples

from toy_data import make_text_sensitive_checkpoint, make_untrained_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_text_sensitive_checkpoint(tmp_path_factory.mktemp("model") / "model.pt")


@pytest.fixture(scope="module")
def predictor(ckpt) -> Predictor:
    return Predictor.from_checkpoint(ckpt, "cpu")


@pytest.fixture
def viewer(predictor, ckpt, tmp_path):
    v = Viewer(predictor, model_name=str(ckpt), checkpoint=ckpt, root=tmp_path / "sessions")
    (tmp_path / "sessions").mkdir()
    yield v
    v.close()


def _png_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _ct_dicom(path: Path, stored: np.ndarray, z: float, series: str = "1.2.3.4") -> None:
    from fuzz_inputs import dicom_bytes

    path.write_bytes(dicom_bytes(stored, SeriesInstanceUID=series, InstanceNumber=int(z) + 1, SliceThickness=2.0,
                                 ImagePositionPatient=[-10.0, -20.0, z]))


def _status(call, *args) -> tuple[int, str]:
    with pytest.raises(ServeError) as err:
        call(*args)
    return err.value.status, str(err.value)


# --------------------------------------------------------------------------- handlers


def test_two_sentences_give_two_masks_equal_to_predictor_and_lsms_predict(viewer, predictor, ckpt, tmp_path):
    e = examples()[0]
    sid = viewer.new_session()["sid"]
    info = viewer.open_example(sid, e.id)
    assert info["ct"] and info["window"] == "liver" and info["texts"] == e.texts and info["depth"] == 1
    out = viewer.predict(sid, 0, e.texts[:2], 0.5, window="liver", features=True)
    areas = [r["area_px"] for r in out["results"]]
    direct = [predictor.predict(e.image, t) for t in e.texts[:2]]
    assert areas == [int(p.mask.sum()) for p in direct]
    assert [(r["existence"], r["found"]) for r in out["results"]] == [(round(p.existence, 4), p.found) for p in direct]
    assert (direct[0].mask != direct[1].mask).any()  # the sentence moves the mask
    assert len(out["results"][0]["features"]) == 4
    assert out["existence_threshold"] == predictor.existence_threshold  # the page shows it beside each score
    assert out["message"].startswith("2 sentence(s) in ") and "slice" not in out["message"]  # a 2D image: no slice
    np.save(tmp_path / f"{e.id}.npy", e.image.array)
    for j, text in enumerate(e.texts[:2]):
        served = viewer.mask_png(sid, 0, text, 0.5)
        cli_out = tmp_path / f"cli{j}"
        assert main(["predict", str(ckpt), str(tmp_path / f"{e.id}.npy"), "--text", text, "--threshold", "0.5",
                     "--out", str(cli_out), "--device", "cpu"]) == 0
        assert served == (cli_out / f"{e.id}_mask.png").read_bytes()  # byte for byte


def test_threshold_and_window_changes_need_no_new_forward_pass(viewer, predictor, monkeypatch):
    e = examples()[1]
    sid = viewer.new_session()["sid"]
    viewer.open_example(sid, e.id)
    calls = []
    real = predictor.predict
    monkeypatch.setattr(predictor, "predict", lambda *a, **k: calls.append(1) or real(*a, **k))
    a = viewer.predict(sid, 0, [e.texts[0]], 0.3)["results"][0]["area_px"]
    b = viewer.predict(sid, 0, [e.texts[0]], 0.7, window="abdomen")["results"][0]["area_px"]
    assert len(calls) == 1 and a >= b
    assert viewer.image_png(sid, 0, "lung")[:8] == b"\x89PNG\r\n\x1a\n"
    settings = viewer.settings(sid, 0, [e.texts[0]], 0.7, "abdomen")
    assert settings["threshold"] == 0.7 and settings["sentences"][0]["area_px"] == b
    assert settings["model"]["checkpoint_sha256"] and settings["preprocessing"]["window"] == "liver"
    assert "--threshold 0.7" in settings["same_with_lsms_predict"][0]
    # under the model's existence threshold the lesion is "not found": no mask, whatever the threshold
    monkeypatch.setattr(predictor, "spec", dataclasses.replace(predictor.spec, existence_threshold=0.999999))
    fresh = viewer.new_session()["sid"]  # a new session: no cached prediction
    viewer.open_example(fresh, e.id)
    hidden = viewer.predict(fresh, 0, [e.texts[0]], 0.3)["results"][0]
    assert hidden["found"] is False and hidden["area_px"] == 0 and hidden["existence"] < 0.999999


def test_sessions_are_isolated_and_closing_deletes_uploads(viewer):
    a, b = viewer.new_session()["sid"], viewer.new_session()["sid"]
    viewer.open_upload(a, [("x.png", _png_bytes(np.full((20, 30), 100, np.uint8)))])
    assert _status(viewer.image_png, b, 0, "model input")[0] == 409  # b has opened nothing
    assert _status(viewer.image_png, "not-a-session", 0, "model input")[0] == 410
    folder = viewer.sessions[a].folder
    assert any(folder.rglob("x.png"))
    _status(viewer.open_upload, a, [("bad.png", b"not a png")])
    assert any(folder.rglob("x.png")) and not any(folder.rglob("bad.png"))  # a failed upload keeps the image
    assert viewer.image_png(a, 0, "model input")[:4] == b"\x89PNG"
    viewer.open_upload(a, [("y.png", _png_bytes(np.zeros((8, 8), np.uint8)))])
    assert not any(folder.rglob("x.png"))  # only the image on screen is kept
    viewer.close_session(a)
    assert not folder.exists() and a not in viewer.sessions
    assert _status(viewer.ping, a)[0] == 410
    assert viewer.ping(b)["ok"]


def test_colour_image_and_3d_array(viewer, tmp_path):
    sid = viewer.new_session()["sid"]
    rgb = np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    info = viewer.open_upload(sid, [("photo.png", _png_bytes(rgb))])
    assert info["ct"] is False and info["windows"] == ["model input", "full range"] and info["shape"] == [24, 32, 3]
    status, message = _status(viewer.predict, sid, 0, ["the polyp"], 0.5, "full range", True)  # a photo, a CT model
    assert status == 400 and "the model reads CT (modality CT, 1 channel, HU through the liver window" in message
    assert "but this is a colour (RGB) PNG image" in message and "--allow-modality-mismatch" in message
    assert "sessions" not in message  # the upload folder stays hidden
    allowed = Viewer(Predictor.from_checkpoint(viewer.checkpoint, "cpu", allow_modality_mismatch=True),
                     checkpoint=viewer.checkpoint, root=tmp_path)
    sid2 = allowed.new_session()["sid"]
    allowed.open_upload(sid2, [("photo.png", _png_bytes(rgb))])
    out = allowed.predict(sid2, 0, ["the polyp"], 0.5, window="full range", features=True)
    assert len(out["results"][0]["features"]) == 4 and out["results"][0]["warning"].startswith("MEANINGLESS: ")
    settings = allowed.settings(sid2, 0, ["the polyp"], 0.5, "full range")
    assert settings["sentences"][0]["warning"] and "--allow-modality-mismatch" in settings["same_with_lsms_predict"][0]
    allowed.close()
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(1).normal(0, 1, (3, 16, 20)).astype(np.float32))
    info = viewer.open_upload(sid, [("stack.npy", buf.getvalue())])
    assert info["depth"] == 3 and info["shape"] == [16, 20] and not info["geometry"]
    assert viewer.predict(sid, 2, ["a"], 0.5)["slice"] == 2


def test_bundled_ct_slices_only_for_ct_models(predictor, tmp_path):
    import copy
    import dataclasses

    other = copy.copy(predictor)
    other.spec = dataclasses.replace(predictor.spec, preprocessing=dataclasses.replace(predictor.preprocessing,
                                                                                          intensity="percentile"))
    v = Viewer(other, root=tmp_path)
    assert v.new_session()["examples"] == []
    assert len(Viewer(predictor, root=tmp_path).new_session()["examples"]) == 8


def test_model_without_text_takes_an_empty_sentence(tmp_path):
    ckpt = make_untrained_checkpoint(tmp_path / "no-text.pt", use_text=False)
    v = Viewer(Predictor.from_checkpoint(ckpt, "cpu"), root=tmp_path)
    info = v.new_session()
    assert info["model"]["uses_text"] is False
    v.open_example(info["sid"], examples()[0].id)
    empty, other = (v.predict(info["sid"], 0, [t], 0.5)["results"][0]["area_px"] for t in ("", "any words"))
    assert empty == other


def test_idle_sessions_expire(viewer, monkeypatch):
    import lsms.serve.app as app

    sid = viewer.new_session()["sid"]
    monkeypatch.setattr(app, "SESSION_IDLE_S", -1.0)
    viewer.reap()
    assert sid not in viewer.sessions


def test_nifti_volume_slices_and_whole_volume_match_lsms_predict(viewer, ckpt, tmp_path, monkeypatch):
    import SimpleITK as sitk

    vol = np.random.default_rng(1).normal(60, 40, (4, 40, 48)).astype(np.int16)  # (z, y, x) HU
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((10.0, -20.0, 30.0))
    sitk.WriteImage(img, str(tmp_path / "ct.nii.gz"))
    sid = viewer.new_session()["sid"]
    info = viewer.open_upload(sid, [("ct.nii.gz", (tmp_path / "ct.nii.gz").read_bytes())])
    assert info["depth"] == 4 and info["slice"] == 2 and info["geometry"] and info["ct"] is False
    assert len(list(viewer.sessions[sid].folder.rglob("ct.nii"))) == 1  # decompressed once for the slider
    assert viewer.predict(sid, 1, ["the lesion"], 0.5)["message"].startswith("1 sentence(s) on slice 1 (of 0..3) in ")
    settings = viewer.settings(sid, 1, ["the lesion"], 0.5, "model input")
    assert settings["input"]["file"] == "ct.nii.gz" and "write_file" not in settings["input"]
    assert settings["input"]["sha256"] == hashlib.sha256((tmp_path / "ct.nii.gz").read_bytes()).hexdigest()
    assert " ct.nii.gz --slices 1 --text 'the lesion' " in settings["same_with_lsms_predict"][0]
    job = viewer.start_volume(sid, ["the lesion"], 0.5)
    assert job["total"] == 4
    for _ in range(600):
        if viewer.volume_progress(sid)["state"] != "running":
            break
        threading.Event().wait(0.05)
    progress = viewer.volume_progress(sid)
    assert progress | {"texts": None, "answers": None} == {"state": "finished", "done": 4, "total": 4, "error": "",
                                                            "texts": None, "threshold": 0.5, "answers": None}
    assert [a["text"] for a in progress["answers"]] == ["the lesion"]  # its 3D answer (tests/test_volumes.py)
    (tmp_path / "served.nii.gz").write_bytes(viewer.mask_nifti(sid, "the lesion", 0.5))
    assert main(["predict", str(ckpt), str(tmp_path / "ct.nii.gz"), "--text", "the lesion", "--out",
                 str(tmp_path / "cli"), "--device", "cpu"]) == 0
    served, cli = sitk.ReadImage(str(tmp_path / "served.nii.gz")), sitk.ReadImage(str(tmp_path / "cli" / "ct_mask.nii.gz"))
    assert served.GetSpacing() == cli.GetSpacing() and served.GetOrigin() == cli.GetOrigin()
    assert np.array_equal(sitk.GetArrayFromImage(served), sitk.GetArrayFromImage(cli))
    monkeypatch.setenv("LSMS_MAX_VOLUME_VOXELS", "100")  # the mask volume is refused before it is allocated
    status, message = _status(viewer.mask_nifti, sid, "the lesion", 0.5)
    assert status == 413 and message.startswith("ct.nii.gz: voxels of the mask volume") and "= 100;" in message


def test_a_2_5d_model_in_the_viewer_reads_each_slice_with_its_neighbours(tmp_path):
    """A slice of a volume gets the same probabilities as the whole-volume path (both stack the neighbouring
    slices); a 2D image is refused with what the model needs."""
    import SimpleITK as sitk

    from lsms.data.readers import read_volume

    ckpt = make_untrained_checkpoint(tmp_path / "m.pt", in_channels=3, context_slices=1)
    predictor = Predictor.from_checkpoint(ckpt, "cpu")
    viewer = Viewer(predictor, model_name=str(ckpt), checkpoint=ckpt, root=tmp_path / "sessions")
    (tmp_path / "sessions").mkdir()
    try:
        vol = np.random.default_rng(2).normal(60, 40, (4, 40, 48)).astype(np.int16)
        sitk.WriteImage(sitk.GetImageFromArray(vol), str(tmp_path / "ct.nii.gz"))
        sid = viewer.new_session()["sid"]
        viewer.open_upload(sid, [("ct.nii.gz", (tmp_path / "ct.nii.gz").read_bytes())])
        viewer.predict(sid, 3, ["the lesion"], 0.5)
        served = viewer.sessions[sid].cache[(3, "the lesion")].probability
        ((whole, _),) = predictor.predict_volume(read_volume(tmp_path / "ct.nii.gz"), [2, 3], ["the lesion"])
        np.testing.assert_allclose(served, whole[1], atol=1e-6)
        flat = viewer.new_session()["sid"]
        viewer.open_upload(flat, [("a.png", _png_bytes(np.full((32, 32), 90, np.uint8)))])
        status, message = _status(viewer.predict, flat, 0, ["the lesion"], 0.5)
        assert status == 400 and "give it a volume" in message
    finally:
        viewer.close()


def test_dicom_series_as_zip_and_mixed_series_refused(viewer, tmp_path):
    def series_zip(uids: list[str]) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for k, uid in enumerate(uids):
                path = tmp_path / f"s{k}.dcm"
                _ct_dicom(path, np.full((12, 10), 1000 + 20 * k, np.uint16), z=2.0 * k, series=uid)
                z.write(path, f"study/series/s{k}.dcm")
        return buf.getvalue()

    sid = viewer.new_session()["sid"]
    info = viewer.open_upload(sid, [("ct.zip", series_zip(["1.2.3.4"] * 3))])
    assert info["depth"] == 3 and info["modality"] == "CT" and info["ct"] and info["format"] == "dicom-series"
    status, msg = _status(viewer.open_upload, sid, [("mixed.zip", series_zip(["1.2.3.4", "1.2.3.5", "1.2.3.4"]))])
    assert status == 400 and "2 DICOM series" in msg and "upload the files of one series" in msg
    assert str(viewer.root) not in msg
    # a folder, as the browser sends it: every file with its relative path
    for k in range(3):
        _ct_dicom(tmp_path / f"f{k}.dcm", np.full((12, 10), 1000 + 20 * k, np.uint16), z=2.0 * k)
    folder = [(f"my series/s{k}.dcm", (tmp_path / f"f{k}.dcm").read_bytes()) for k in range(3)]
    info = viewer.open_upload(sid, folder)
    assert info["depth"] == 3 and info["name"] == "my_series (3 slices)" and info["geometry"]
    status, msg = _status(viewer.open_upload, sid, [*folder[:2], ("my series/notes.txt", b"hello")])
    assert status == 400 and "not all are DICOM (e.g. notes.txt)" in msg


@pytest.mark.parametrize("name, data, status, words", [
    ("broken.png", _png_bytes(np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8))[:900], 400,
     "broken.png: cannot decode"),
    ("notes.txt", b"hello", 400, "unsupported image format '.txt'"),
    ("bad.zip", b"PK\x03\x04 not really", 400, "bad.zip: cannot unpack the zip"),
    ("bad.nii.gz", b"\x1f\x8b garbage", 400, "bad.nii.gz: cannot read"),
])
def test_bad_files_get_a_clear_message_naming_them(viewer, name, data, status, words):
    sid = viewer.new_session()["sid"]
    got, msg = _status(viewer.open_upload, sid, [(name, data)])
    assert got == status and words in msg and str(viewer.root) not in msg
    viewer.open_example(sid, examples()[0].id)  # and the session still works


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header says width x height but holds no pixel data (a huge image in 69 bytes)."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def test_100_megapixel_image_refused_from_its_header(viewer):
    sid = viewer.new_session()["sid"]
    status, msg = _status(viewer.open_upload, sid, [("huge.png", _png_header_only(10_000, 10_000))])
    assert status == 413 and "huge.png: the image declares 10000 x 10000 pixels" in msg
    assert "above the limit max_image_pixels = 33,554,432" in msg and "--max-megapixels" in msg


def test_zip_member_names_cannot_escape_the_session_folder(viewer, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("../../escaped.png", _png_bytes(np.zeros((8, 8), np.uint8)))
    sid = viewer.new_session()["sid"]
    assert viewer.open_upload(sid, [("x.zip", buf.getvalue())])["name"] == "escaped.png"
    assert not (tmp_path / "escaped.png").exists() and not (viewer.root / "escaped.png").exists()
    assert any(viewer.sessions[sid].folder.rglob("escaped.png"))


def test_settings_of_a_bundled_slice_give_runnable_commands(viewer, ckpt, tmp_path, monkeypatch):
    """The bundled slice has no file: the settings say how to write it (with its sha256), then lsms predict it."""
    e = examples()[2]
    sid = viewer.new_session()["sid"]
    viewer.open_example(sid, e.id)
    settings = viewer.settings(sid, 0, e.texts[:2], 0.4, "liver")
    given = settings["input"]
    assert given["file"] == f"{e.id}.npy" and given["write_file"].startswith("python -c ")
    monkeypatch.chdir(tmp_path)
    exec(shlex.split(given["write_file"])[2], {})  # what `python -c` runs, in this process
    assert hashlib.sha256(Path(given["file"]).read_bytes()).hexdigest() == given["sha256"]
    for text, command in zip(e.texts[:2], settings["same_with_lsms_predict"], strict=True):
        argv = shlex.split(command.replace(" --out OUT", " --out cli"))
        assert argv[:3] == ["lsms", "predict", str(ckpt)] and argv[3] == given["file"]
        assert main([*argv[1:], "--device", "cpu"]) == 0
        assert (tmp_path / "cli" / f"{e.id}_mask.png").read_bytes() == viewer.mask_png(sid, 0, text, 0.4)


def test_status_line_names_the_slice_only_for_a_volume():
    from lsms.serve.app import status_text

    assert status_text(2, 0, 1, 0.414) == "2 sentence(s) in 0.41 s."
    assert status_text(1, 7, 40, 1.0) == "1 sentence(s) on slice 7 (of 0..39) in 1.00 s."


def test_bad_sentences_and_settings(viewer):
    sid = viewer.new_session()["sid"]
    viewer.open_example(sid, examples()[0].id)
    assert "sentence 1 is empty" in _status(viewer.predict, sid, 0, ["  "], 0.5)[1]
    status, msg = _status(viewer.predict, sid, 0, ["x" * 10_000], 0.5)
    assert status == 400 and "10000 characters; the limit is 1000" in msg
    assert "at most 4" in _status(viewer.predict, sid, 0, ["a"] * 5, 0.5)[1]
    assert "strictly between 0 and 1" in _status(viewer.predict, sid, 0, ["a"], 1.5)[1]
    assert "slice must be an integer in 0..0" in _status(viewer.predict, sid, 3, ["a"], 0.5)[1]
    assert "unknown window" in _status(viewer.image_png, sid, 0, "rainbow")[1]
    assert "no spatial geometry" in _status(viewer.mask_nifti, sid, "a", 0.5)[1]
    assert _status(viewer.open_example, sid, "p9999_s00")[0] == 404


def test_requests_from_two_tabs_at_once_are_served_apart(viewer, predictor):
    e0, e1 = examples()[0], examples()[2]
    sids = [viewer.new_session()["sid"] for _ in range(2)]
    viewer.open_example(sids[0], e0.id)
    viewer.open_example(sids[1], e1.id)
    results: dict[int, list[int]] = {}

    def work(i: int) -> None:
        e = (e0, e1)[i]
        results[i] = [viewer.predict(sids[i], 0, e.texts[:2], 0.5)["results"][j]["area_px"] for j in range(2)
                      for _ in range(3)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, e in enumerate((e0, e1)):
        expected = [int(predictor.predict(e.image, t).mask.sum()) for t in e.texts[:2]]
        assert results[i] == [expected[0]] * 3 + [expected[1]] * 3


# --------------------------------------------------------------------------- HTTP


@pytest.fixture
def server(viewer):
    srv = ViewerServer(viewer, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _request(url: str, data: bytes | None = None, headers: dict | None = None, method: str | None = None):
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_http_page_is_self_contained_and_guarded(server):
    status, headers, body = _request(server.url)
    assert status == 200 and b"/static/app.js" in body
    assert "default-src 'self'" in headers["Content-Security-Policy"] and headers["Cache-Control"] == "no-store"
    for name in ("index.html", "app.js", "style.css"):  # nothing fetched from anywhere else
        text = (Path(__file__).parents[1] / "src/lsms/serve/static" / name).read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name
    status, _, body = _request(server.url, headers={"Host": "attacker.example:7860"})
    assert status == 403 and b"loopback" in body
    assert _request(server.url + "api/nothing")[0] == 404
    status, _, body = _request(server.url + "api/session", b"", {"Origin": "https://attacker.example"}, "POST")
    assert status == 403 and b"another site" in body
    host = server.url.split("/")[2]
    assert _request(server.url + "api/session", b"", {"Origin": f"http://{host}"}, "POST")[0] == 200


def test_the_documented_http_api_lists_every_route():
    """docs/serve.md's HTTP API table holds exactly the server's routes: the doc cannot drift from the code."""
    from lsms.serve.http import ROUTES, STATIC

    doc = (Path(__file__).parents[1] / "docs" / "serve.md").read_text(encoding="utf-8")
    section = doc.split("\n## HTTP API\n", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `(GET|POST)` \| `(/[^`]*)` \|", section, flags=re.MULTILINE)
    assert sorted(documented) == sorted([*ROUTES, *(("GET", path) for path in STATIC)])


def test_http_refused_upload_does_not_poison_the_connection(server):
    import http.client

    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("POST", "/api/open?sid=ended", body=b"x" * 5000, headers={"Content-Type": "multipart/form-data"})
    r = conn.getresponse()
    assert r.status == 410 and b"session has ended" in r.read()
    conn.request("POST", "/api/session", body=b"")  # reconnects if the server closed it; never reads the old body
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["sid"]


def test_http_a_page_gone_mid_answer_is_logged_quietly(server, viewer, monkeypatch, caplog):
    """The browser closes the connection before the answer is sent: no ERROR and no traceback, and it serves on."""
    sid = viewer.new_session()["sid"]
    viewer.open_example(sid, examples()[0].id)
    asked, gone = threading.Event(), threading.Event()

    def slow_image(*args):  # answers once the client has gone: a large body, so the write meets the reset
        asked.set()
        gone.wait(30)
        return b"\x89PNG" + bytes(8 << 20)

    monkeypatch.setattr(viewer, "image_png", slow_image)
    caplog.set_level(logging.DEBUG, logger="lsms.serve")
    client = socket.create_connection(server.server_address[:2], timeout=30)
    client.sendall(f"GET /api/image.png?sid={sid}&slice=0&window=liver HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    assert asked.wait(30)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
    client.close()
    threading.Event().wait(0.2)
    gone.set()
    for _ in range(200):
        if any("dropped" in r.getMessage() for r in caplog.records):
            break
        threading.Event().wait(0.05)
    dropped = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert dropped and all(r.levelno == logging.DEBUG and r.exc_info is None for r in dropped)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert _request(server.url)[0] == 200  # still serving


def test_http_upload_predict_download(server, viewer):
    status, _, body = _request(server.url + "api/session", b"", method="POST")
    sid = json.loads(body)["sid"]
    boundary = "----lsmsboundary"
    png = _png_bytes(np.random.default_rng(0).integers(0, 255, (30, 40), dtype=np.uint8))
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a b.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()
    status, _, body = _request(f"{server.url}api/open?sid={sid}", form,
                               {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200 and json.loads(body)["shape"] == [30, 40], body
    req = json.dumps({"slice": 0, "texts": ["left", "right"], "threshold": 0.5}).encode()
    status, _, body = _request(f"{server.url}api/predict?sid={sid}", req, {"Content-Type": "application/json"})
    assert status == 200 and len(json.loads(body)["results"]) == 2
    status, headers, body = _request(f"{server.url}api/mask.png?sid={sid}&slice=0&text=left&threshold=0.5&name=m.png")
    assert status == 200 and "attachment" in headers["Content-Disposition"]
    assert np.array(Image.open(io.BytesIO(body))).shape == (30, 40)
    status, _, body = _request(f"{server.url}api/predict?sid={sid}", b"{not json", method="POST")
    assert status == 400 and json.loads(body)["error"] == "the request body is not JSON"
    status, _, body = _request(f"{server.url}api/open?sid={sid}", b"x" * 10, {"Content-Type": "text/plain"})
    assert status == 400 and "multipart/form-data" in json.loads(body)["error"]
    status, _, _ = _request(f"{server.url}api/close?sid={sid}", b"", method="POST")
    assert status == 200 and sid not in viewer.sessions


def test_cli_refuses_a_checkpoint_of_the_wrong_kind(tmp_path, capsys):
    import torch

    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    assert main(["serve", str(tmp_path / "other.pt"), "--port", "0"]) == 2
    assert "is not an lsms checkpoint" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["serve", str(tmp_path / "empty")]) == 2
    assert "no checkpoint in run folder" in capsys.readouterr().err


def test_cli_serves_warns_off_loopback_and_cleans_up_on_sigterm(ckpt, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "lsms", "serve", str(ckpt), "--host", "0.0.0.0", "--port", "0",
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("lsms serve: http://0.0.0.0:"), line + proc.stderr.read()
        port = int(line.split("http://0.0.0.0:")[1].split("/")[0])
        status, _, body = _request(f"http://127.0.0.1:{port}/api/session", b"", method="POST")
        assert status == 200 and json.loads(body)["sid"]
        assert len(list(tmp_path.glob("lsms-serve-*/*"))) == 1  # the session's folder
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert "bound to 0.0.0.0: anyone who can reach this machine" in err
    assert not list(tmp_path.glob("lsms-serve-*"))  # every upload folder removed
