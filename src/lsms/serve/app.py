"""The viewer's request handlers, without HTTP: one :class:`Viewer` holds the model and the open pages.

Every browser tab gets its own :class:`Session` (a random id kept in the page's memory, not a cookie), with
its own upload folder, image, predictions and volume job; no handler reads another session's state. All
forward passes go through one lock, so requests from several tabs are served one at a time, in arrival order.

Handlers take and return plain Python values (dicts, bytes); :mod:`lsms.serve.http` maps them to URLs. A bad
request raises :class:`ServeError` with the HTTP status and a message for the page; the viewer keeps serving.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import secrets
import shlex
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lsms.data import CT_WINDOWS, ImageData
from lsms.data.formats import READERS, is_series_file, reader_for
from lsms.data.readers import ImageTooLargeError, ReadLimits, Volume, context_stack, write_volume_mask
from lsms.metrics import check_threshold
from lsms.pictures import (
    COLOURS,
    colormap,
    data_url,
    display_image,
    heat_over,
    overlay_rgba,
    png,
    save_mask_png,
    to_uint8,
)
from lsms.predict import Prediction, Predictor, threshold_mask
from lsms.serve.errors import ServeError
from lsms.serve.uploads import extract_zip, files_sha256, hide_folder, write_upload
from lsms.volumes import VolumeAnswer, assemble, voxel_spacing

log = logging.getLogger("lsms.serve")

# Limits, documented in docs/serve.md. The readers check sizes from the file header, before decoding.
MAX_GUNZIP_BYTES = 4 << 30  # a .nii.gz volume is decompressed once when it unpacks to at most this (4 GiB)
MAX_UPLOAD_MB = 1024  # one upload request (a file, a zip or a folder)
MAX_TEXT_CHARS = 1000  # one sentence; the model reads at most its max_tokens tokens of it anyway
MAX_SENTENCES = 4  # sentences compared side by side
MAX_SESSIONS = 16  # open pages at once
SESSION_IDLE_S = 300.0  # a page pings every 60 s; a session silent this long is closed and its files deleted
CACHE_SLICES = 32  # predictions (probability maps) kept per session for re-thresholding
VOLUME_BATCH = 8  # slices per forward pass of Whole volume: lsms predict's default --batch-size, so the same answers
WINDOW_MODEL = "model input"  # the display the model sees (the checkpoint's intensity scaling)
WINDOW_FULL = "full range"  # 0.5..99.5 percentile


@dataclass
class Opened:
    """An image open in a session: ``depth`` slices, each read by ``read(k)`` as :func:`read_image` gives it."""

    name: str
    depth: int
    read: Callable[[int], ImageData]
    files: list[Path] = field(default_factory=list)  # on disk, for the settings' sha256 (none for examples)
    source: str = ""  # what to give `lsms predict` for the same input
    source_sha256: str | None = None  # a file `source` that is not on disk: its sha256 once written
    make_source: str = ""  # a file `source` that is not on disk: the command that writes it
    geometry: bool = False  # NIfTI / DICOM: a mask can be written in the input's geometry
    series: Path | None = None  # a DICOM series folder: a DICOM-SEG can reference it

    def spacing(self) -> tuple[float, ...] | None:
        """mm per voxel along x, y (and z) of a NIfTI / DICOM input; None for other images."""
        geometry = self.read(0).geometry if self.geometry else None
        return geometry.spacing if geometry is not None else None


@dataclass
class VolumeJob:
    """Whole-volume prediction running in a thread; the page polls ``done``/``total``."""

    texts: list[str]
    threshold: float
    total: int
    done: int = 0
    state: str = "running"  # running, finished, failed, cancelled
    error: str = ""
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class Session:
    """State of one browser tab."""

    id: str
    folder: Path
    last_seen: float
    opened: Opened | None = None
    uploads: int = 0
    cache: OrderedDict = field(default_factory=OrderedDict)  # (slice, text) -> Prediction
    masks: dict = field(default_factory=dict)  # (text, threshold) -> {slice: packed bool mask}
    job: VolumeJob | None = None
    # after Whole volume: text -> (probability float32 (Z, H, W), existence (Z,)), and the 3D answers assembled
    # from them, (text, threshold) -> VolumeAnswer (lsms.volumes.assemble, as lsms predict)
    volume: dict = field(default_factory=dict)
    answers: OrderedDict = field(default_factory=OrderedDict)
    lock: threading.RLock = field(default_factory=threading.RLock)


class Viewer:
    """The model and the open pages; one per ``lsms serve`` process.

    Args:
        predictor: the loaded model with its preprocessing.
        model_name: what the page shows as the model (the run folder or checkpoint given).
        checkpoint: the checkpoint file, for the settings JSON (and its sha256).
        root: folder for the sessions' uploads (a fresh temporary folder when None; removed by :meth:`close`).
        max_megapixels: largest image or slice; None: the readers' ``max_image_pixels`` (``LSMS_MAX_IMAGE_PIXELS``),
            as everywhere in lsms (docs/reliability.md).
        max_upload_mb: largest upload.
    """

    def __init__(self, predictor: Predictor, model_name: str = "", checkpoint: str | Path | None = None,
                 root: str | Path | None = None, max_megapixels: float | None = None,
                 max_upload_mb: float = MAX_UPLOAD_MB):
        self.predictor = predictor
        self.model_name = model_name
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.checkpoint_sha256 = files_sha256([self.checkpoint]) if self.checkpoint and self.checkpoint.is_file() else None
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="lsms-serve-")) if root is None else Path(root)
        self.limits = ReadLimits.from_env()  # the same limits as lsms predict, unless --max-megapixels says otherwise
        if max_megapixels is not None:
            self.limits = dataclasses.replace(self.limits, max_image_pixels=max(1, int(max_megapixels * 1e6)))
        self.max_upload_bytes = int(max_upload_mb * 2**20)
        self.sessions: dict[str, Session] = {}
        self._lock = threading.Lock()  # the sessions dict
        self.model_lock = threading.Lock()  # every forward pass: requests are served one at a time

    # ------------------------------------------------------------------ sessions

    def new_session(self) -> dict[str, Any]:
        """Open a session for a new page; returns its id and what the page needs to draw itself."""
        from lsms.serve.examples import examples

        self.reap()
        with self._lock:
            if len(self.sessions) >= MAX_SESSIONS:
                raise ServeError(503, f"{MAX_SESSIONS} pages are open already; close one (or wait "
                                      f"{SESSION_IDLE_S / 60:.0f} min for closed ones to expire) and reload")
            sid = secrets.token_urlsafe(18)
            folder = self.root / sid
            folder.mkdir(mode=0o700)
            self.sessions[sid] = Session(sid, folder, time.monotonic())
        log.info("session %s opened (%d open)", sid[:6], len(self.sessions))
        p = self.predictor.preprocessing
        return {
            "sid": sid,
            "model": {"name": self.model_name, "uses_text": self.predictor.uses_text,
                      "image_size": list(p.image_size), "intensity": p.intensity, "window": p.window,
                      "device": str(getattr(self.predictor, "device", ""))},
            # the bundled slices are CT in HU: offered to models that read CT through a window
            "examples": [{"id": e.id, "texts": e.texts} for e in examples()] if p.intensity == "window" else [],
            "limits": {"megapixels": self.limits.max_image_pixels / 1e6, "upload_bytes": self.max_upload_bytes,
                       "text_chars": MAX_TEXT_CHARS, "sentences": MAX_SENTENCES, "idle_s": SESSION_IDLE_S},
            "colours": ["#" + "".join(f"{int(255 * c):02x}" for c in rgb) for rgb in COLOURS],
            "accept": upload_accept(),
        }

    def session(self, sid: str | None) -> Session:
        with self._lock:
            s = self.sessions.get(sid or "")
            if s is None:
                raise ServeError(410, "this page's session has ended (closed, expired after "
                                      f"{SESSION_IDLE_S / 60:.0f} idle minutes, or the server restarted); reload the page")
            s.last_seen = time.monotonic()
            return s

    def ping(self, sid: str) -> dict[str, Any]:
        s = self.session(sid)
        return {"ok": True, "opened": s.opened is not None}

    def close_session(self, sid: str) -> None:
        """Forget a session and delete its files (the page sends this when it is closed)."""
        with self._lock:
            s = self.sessions.pop(sid, None)
        if s is None:
            return
        if s.job is not None:
            s.job.cancel.set()
        shutil.rmtree(s.folder, ignore_errors=True)
        log.info("session %s closed, its files deleted (%d open)", sid[:6], len(self.sessions))

    def reap(self) -> None:
        """Close sessions whose page stopped pinging (closed without saying so)."""
        now = time.monotonic()
        with self._lock:
            stale = [sid for sid, s in self.sessions.items() if now - s.last_seen > SESSION_IDLE_S]
        for sid in stale:
            self.close_session(sid)

    def close(self) -> None:
        """Close every session and remove the upload folder (server shutdown)."""
        for sid in list(self.sessions):
            self.close_session(sid)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ opening images

    def open_example(self, sid: str, example_id: str) -> dict[str, Any]:
        """Open one of the bundled RefLiver-Synth test slices."""
        from lsms.serve.examples import example

        s = self.session(sid)
        try:
            e = example(example_id)
        except ValueError as err:
            raise ServeError(404, str(err)) from None
        opened = Opened(e.id, 1, lambda k: e.image, source=e.file_name, source_sha256=e.file_sha256(),
                        make_source=e.write_command())
        return self._set_opened(s, opened, texts=e.texts)

    def open_upload(self, sid: str, files: list[tuple[str, bytes]]) -> dict[str, Any]:
        """Open uploaded files: one image, a NIfTI volume, a DICOM series (zip, or every file of a folder)."""
        s = self.session(sid)
        if not files:
            raise ServeError(400, "no file in the upload; choose an image, a NIfTI volume, or a DICOM series")
        size = sum(len(data) for _, data in files)
        if size > self.max_upload_bytes:
            raise ServeError(413, f"the upload is {size / 2**20:.0f} MB; the limit is "
                                  f"{self.max_upload_bytes / 2**20:.0f} MB (lsms serve --max-upload-mb)")
        with s.lock:
            s.uploads += 1
            folder = s.folder / f"upload-{s.uploads}"
            folder.mkdir()
            try:
                paths = [write_upload(folder, name, data) for name, data in files]
                if len(paths) == 1 and paths[0].suffix.lower() == ".zip":
                    paths = extract_zip(paths[0], folder / "zip", 2 * self.max_upload_bytes)
                info = self._set_opened(s, self._open_paths(paths, folder))
            except ServeError:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            except (ValueError, FileNotFoundError, OSError) as err:
                shutil.rmtree(folder, ignore_errors=True)
                raise ServeError(400, hide_folder(str(err), folder)) from None
            for old in s.folder.glob("upload-*"):  # only the image on screen is kept on disk
                if old != folder:
                    shutil.rmtree(old, ignore_errors=True)
            return info

    def _open_paths(self, paths: list[Path], folder: Path) -> Opened:
        paths = [p for p in paths if not p.name.startswith(".")]
        if not paths:
            raise ServeError(400, "the upload holds no files (hidden files are ignored)")
        if len(paths) == 1:
            return self._open_file(paths[0], folder)
        dicom = [p for p in paths if is_series_file(p)]
        if len(dicom) != len(paths):
            others = sorted(p.name for p in paths if p not in dicom)[:3]
            raise ServeError(400, f"{len(paths)} files uploaded and not all are DICOM (e.g. {', '.join(others)}); "
                                  "open one image, or one DICOM series (a zip or a folder of its slices)")
        parents = sorted({p.parent for p in dicom})
        if len(parents) > 1:
            raise ServeError(400, f"the DICOM files lie in {len(parents)} folders "
                                  f"({', '.join(hide_folder(str(p), folder) or '.' for p in parents[:3])}); open one series")
        return self._open_series(parents[0], folder, len(dicom))

    def _open_series(self, series: Path, folder: Path, n_files: int) -> Opened:
        name = series.name if series != folder else "DICOM series"
        volume = self._read_volume(series, folder)
        return Opened(f"{name} ({volume.depth} slices)", volume.depth, volume.slice,
                      files=sorted(p for p in series.iterdir() if p.is_file()), source="DICOM_SERIES_FOLDER",
                      geometry=True, series=series)

    def _open_file(self, path: Path, folder: Path) -> Opened:
        volume = self._read_volume(path, folder)
        if volume.depth > 1:
            # a slice of a .nii.gz is read by decompressing everything before it: decompressed once here, the
            # slider and the whole-volume run read each slice directly (the same voxels, the same geometry)
            plain = reader_for(path).uncompressed(path, MAX_GUNZIP_BYTES)
            if plain is not None:
                volume = self._read_volume(plain, folder)
        return Opened(path.name, volume.depth, volume.slice, files=[path], source=path.name,
                      geometry=volume.slice(volume.depth // 2).geometry is not None)

    def _read_volume(self, path: Path, folder: Path):
        """The readers' :func:`~lsms.data.read_volume` with the viewer's limits; their errors as page messages."""
        from lsms.data import read_volume
        from lsms.data.readers import ImageTooLargeError

        try:
            return read_volume(path, limits=self.limits)
        except ImageTooLargeError as err:  # checked from the header, before any pixel is decoded
            raise ServeError(413, hide_folder(str(err), folder).split("; if the file is genuine")[0] +
                             " (lsms serve --max-megapixels, or the environment variables of docs/reliability.md)"
                             ) from None
        except ValueError as err:  # several series: the page cannot pick one, the user can
            raise ServeError(400, hide_folder(str(err), folder).replace("choose one with series_uid",
                                                                   "upload the files of one series only")) from None

    def _set_opened(self, s: Session, opened: Opened, texts: list[str] | None = None) -> dict[str, Any]:
        k = opened.depth // 2
        image = opened.read(k)  # an unreadable image fails here, before it replaces the one on screen
        with s.lock:
            if s.job is not None:
                s.job.cancel.set()
            s.opened, s.job = opened, None
            s.cache.clear()
            s.masks.clear()
            s.volume.clear()
            s.answers.clear()
        ct = _is_ct(image)
        windows = ([*CT_WINDOWS, WINDOW_MODEL] if ct else [WINDOW_MODEL, WINDOW_FULL])
        log.info("session %s opened %s: %s, %d slice(s) of %s", s.id[:6], opened.name, image.format,
                 opened.depth, "x".join(map(str, image.array.shape)))
        return {"name": opened.name, "format": image.format, "modality": image.modality, "depth": opened.depth,
                "slice": k, "shape": list(image.array.shape), "ct": ct, "windows": windows,
                "window": "liver" if ct else WINDOW_MODEL, "geometry": opened.geometry, "texts": texts or [],
                "dicom_seg": opened.series is not None}

    def _image(self, s: Session, k: int) -> ImageData:
        if s.opened is None:
            raise ServeError(409, "open an image first")
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < s.opened.depth:
            raise ServeError(400, f"slice must be an integer in 0..{s.opened.depth - 1}, got {k!r}")
        try:
            return s.opened.read(k)
        except (ValueError, OSError) as err:
            raise ServeError(400, hide_folder(str(err), s.folder)) from None

    # ------------------------------------------------------------------ pictures and predictions

    def image_png(self, sid: str, k: int, window: str) -> bytes:
        """The slice as the page shows it, through ``window``."""
        s = self.session(sid)
        with s.lock:
            return png(to_uint8(self._grey(self._image(s, k), window)))

    def _grey(self, image: ImageData, window: str) -> np.ndarray:
        from lsms.data import apply_window, percentile_scale

        if window == WINDOW_MODEL:
            return display_image(image.array, self.predictor.preprocessing)
        if window == WINDOW_FULL:
            return percentile_scale(image.array)
        if window in CT_WINDOWS:
            a = image.array if image.array.ndim == 2 else image.array.mean(-1)
            return apply_window(a, *CT_WINDOWS[window])
        raise ServeError(400, f"unknown window {window!r}; choose {', '.join([*CT_WINDOWS, WINDOW_MODEL, WINDOW_FULL])}")

    def predict(self, sid: str, k: int, texts: list[str], threshold: float, window: str = WINDOW_MODEL,
                features: bool = False) -> dict[str, Any]:
        """Segment what each sentence refers to on slice ``k``: overlay, probability and feature maps as PNGs."""
        s = self.session(sid)
        texts = self._check_texts(texts)
        threshold = _check_threshold(threshold)
        started = time.perf_counter()
        with s.lock:
            image = self._image(s, k)
            grey = self._grey(image, window)
            results = []
            for i, text in enumerate(texts):
                pred = self._prediction(s, k, image, text, features)
                mask, found, answer = self._shown(s, k, text, threshold, pred)
                r = {"text": text, "area_px": int(mask.sum()), "max_probability": round(float(pred.probability.max()), 4),
                     "existence": round(pred.existence, 4), "found": found, "warning": pred.warning,
                     "overlay": data_url(overlay_rgba(mask, COLOURS[i % len(COLOURS)])),
                     "probability": data_url(colormap(pred.probability, "viridis"))}
                if answer is not None:  # Whole volume ran with this sentence: the slice of its one 3D answer
                    r["volume"] = answer.summary(image.geometry.spacing if image.geometry else None)
                    r["existence"] = r["volume"]["score"]  # the score its verdict ("found") is made on
                if features and pred.features is not None:
                    r["features"] = [data_url(heat_over(grey, m)) for m in pred.features]
                results.append(r)
        seconds = time.perf_counter() - started
        message = status_text(len(texts), k, s.opened.depth if s.opened else 1, seconds)
        log.info("session %s: %s", s.id[:6], message)
        return {"slice": k, "threshold": threshold, "existence_threshold": self.predictor.existence_threshold,
                "results": results, "seconds": round(seconds, 3), "message": message}

    def _check_texts(self, texts: Any) -> list[str]:
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ServeError(400, "texts must be a list of sentences")
        texts = [t.strip() for t in texts]
        if not texts:
            raise ServeError(400, "type a sentence first")
        if len(texts) > MAX_SENTENCES:
            raise ServeError(400, f"{len(texts)} sentences; the page compares at most {MAX_SENTENCES}")
        for i, t in enumerate(texts, start=1):
            if not t and self.predictor.uses_text:
                raise ServeError(400, f"sentence {i} is empty; type what to segment, e.g. 'the larger cyst in segment VI'")
            if len(t) > MAX_TEXT_CHARS:
                raise ServeError(400, f"sentence {i} has {len(t)} characters; the limit is {MAX_TEXT_CHARS} (the model "
                                      "reads only its first tokens anyway); shorten it")
        return texts

    def _prediction(self, s: Session, k: int, image: ImageData, text: str, features: bool) -> Prediction:
        """Cached per (slice, text): moving the threshold or the window needs no new forward pass."""
        key = (k, text)
        pred = s.cache.get(key)
        if pred is None or (features and pred.features is None):
            with self.model_lock:
                try:
                    pred = self.predictor.predict(image, text, features=features, context=self._context(s, k))
                except (ValueError, TypeError, RuntimeError) as err:  # e.g. an image the model cannot take
                    raise ServeError(400, f"the model cannot segment this image: {hide_folder(str(err), s.folder)}") \
                        from None
            s.cache[key] = pred
            while len(s.cache) > CACHE_SLICES:
                s.cache.popitem(last=False)
        s.cache.move_to_end(key)
        return pred

    def _context(self, s: Session, k: int) -> np.ndarray | None:
        """Slice ``k`` with its neighbours for a 2.5D model (:func:`~lsms.data.readers.context_stack`); None for a
        2D model or a 2D image (which a 2.5D model refuses, naming what it needs)."""
        c = self.predictor.preprocessing.context_slices
        if not c or s.opened is None or s.opened.depth == 1:
            return None
        return context_stack(lambda j: self._image(s, j).array, k, s.opened.depth, c)

    def _shown(self, s: Session, k: int, text: str, threshold: float, pred: Prediction
               ) -> tuple[np.ndarray, bool, VolumeAnswer | None]:
        """(mask, found, 3D answer) of ``text`` on slice ``k``: once Whole volume ran with the sentence, the slice of
        the volume's one 3D answer (:func:`lsms.volumes.assemble`, as ``lsms predict`` gives it); before, the
        slice's own mask (remembered for the NIfTI of the slices segmented so far)."""
        answer = self._answer(s, text, threshold)
        if answer is None:
            return self._remember(s, k, text, threshold, pred), pred.found, None
        return answer.mask[k], answer.present, answer

    def _answer(self, s: Session, text: str, threshold: float) -> VolumeAnswer | None:
        """The 3D answer of ``text`` at ``threshold`` from Whole volume's probabilities (None before it ran); the
        last few are kept, so moving the threshold back needs no new assembly."""
        if text not in s.volume:
            return None
        key = (text, threshold)
        if key not in s.answers:
            prob, existence = s.volume[text]
            spacing = voxel_spacing(s.opened.spacing() if s.opened is not None else None)
            s.answers[key] = assemble(prob, existence, threshold, self.predictor.existence_threshold, text=text,
                                      spacing=spacing)
            while len(s.answers) > MAX_SENTENCES:
                s.answers.popitem(last=False)
        s.answers.move_to_end(key)
        return s.answers[key]

    def _remember(self, s: Session, k: int, text: str, threshold: float, pred: Prediction) -> np.ndarray:
        # below the model's existence threshold the lesion is "not found": no mask, whatever the threshold
        mask = threshold_mask(pred.probability, threshold) & pred.found
        s.masks.setdefault((text, threshold), {})[k] = (np.packbits(mask, axis=-1), mask.shape[1])
        return mask

    # ------------------------------------------------------------------ downloads

    def mask_png(self, sid: str, k: int, text: str, threshold: float) -> bytes:
        """The mask of ``text`` on slice ``k`` as 0/255 PNG: the same bytes as ``lsms predict`` writes."""
        s = self.session(sid)
        text = self._check_texts([text])[0]
        threshold = _check_threshold(threshold)
        with s.lock:
            image = self._image(s, k)
            mask = self._shown(s, k, text, threshold, self._prediction(s, k, image, text, False))[0]
        buf = io.BytesIO()
        save_mask_png(mask, buf)
        return buf.getvalue()

    def _download(self, sid: str, text: str, threshold: float) -> tuple[Session, str, float]:
        """A download request's session, sentence and threshold, checked."""
        return self.session(sid), self._check_texts([text])[0], _check_threshold(threshold)

    def mask_nifti(self, sid: str, text: str, threshold: float) -> bytes:
        """NIfTI in the input's geometry holding every slice predicted so far for ``text`` at ``threshold``."""
        s, text, threshold = self._download(sid, text, threshold)
        with s.lock:
            opened = _opened(s)
            if not opened.geometry:
                raise ServeError(400, f"{opened.name} has no spatial geometry (only NIfTI and DICOM do); "
                                      "download the PNG mask instead")
            answer = self._answer(s, text, threshold)
            done = s.masks.get((text, threshold))
            if answer is not None:
                masks = dict(enumerate(answer.mask))
            elif done:
                masks = {k: np.unpackbits(packed, axis=-1, count=w).astype(bool) for k, (packed, w) in done.items()}
            else:
                raise ServeError(409, "segment with this sentence and threshold first")
            geometry = self._image(s, next(iter(masks))).geometry
            path = s.folder / f"mask-{secrets.token_hex(4)}.nii.gz"
            try:
                write_volume_mask(masks, geometry, path)
                return path.read_bytes()
            except ImageTooLargeError as err:  # the input's size is above max_volume_voxels
                raise ServeError(413, f"{opened.name}: {str(err).removeprefix(f'{path}: ')}") from None
            finally:
                path.unlink(missing_ok=True)

    def mask_dicom_seg(self, sid: str, text: str, threshold: float) -> bytes:
        """The 3D answer of ``text`` at ``threshold`` as a DICOM-SEG referencing the open DICOM series (after Whole
        volume): the file ``lsms predict --format dicom-seg`` writes."""
        from lsms import __version__
        from lsms.data.formats.dicom_seg import write_dicom_seg

        s, text, threshold = self._download(sid, text, threshold)
        with s.lock:
            opened = _opened(s)
            if opened.series is None:
                raise ServeError(400, f"{opened.name} is not a DICOM series; a DICOM-SEG references the series' "
                                      "images: download the NIfTI mask instead")
            answer = self._answer(s, text, threshold)
            if answer is None:
                raise ServeError(409, "run Whole volume with this sentence first: the DICOM-SEG holds its one 3D answer")
            path = s.folder / f"seg-{secrets.token_hex(4)}.dcm"
            try:
                write_dicom_seg(answer.mask, opened.series, path, text, __version__)
                return path.read_bytes()
            except ValueError as err:  # e.g. the series has no frame of reference
                raise ServeError(400, hide_folder(str(err), s.folder)) from None
            finally:
                path.unlink(missing_ok=True)

    def settings(self, sid: str, k: int, texts: list[str], threshold: float, window: str) -> dict[str, Any]:
        """What produced the masks on screen: model, checkpoint hash, preprocessing, input, slice, sentences."""
        from lsms import __version__

        s = self.session(sid)
        texts = self._check_texts(texts)
        threshold = _check_threshold(threshold)
        with s.lock:
            image = self._image(s, k)
            opened = s.opened
            assert opened is not None
            rows = []
            for text in texts:
                pred = self._prediction(s, k, image, text, False)
                mask = self._shown(s, k, text, threshold, pred)[0]
                rows.append({"text": text, "area_px": int(mask.sum()),
                             "max_probability": round(float(pred.probability.max()), 6), "warning": pred.warning})
        model = self.checkpoint or self.model_name
        slices = f" --slices {k}" if opened.depth > 1 else ""
        allow = " --allow-modality-mismatch" if self.predictor.allow_modality_mismatch else ""
        sha256 = opened.source_sha256 or (files_sha256(opened.files) if opened.files else None)
        commands = [f"lsms predict {shlex.quote(str(model))} {shlex.quote(opened.source)}{slices} --text "
                    f"{shlex.quote(t)} --threshold {threshold:g}{allow} --out OUT" for t in texts]
        return {
            "lsms_version": __version__,
            "model": {"given": self.model_name, "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                      "checkpoint_sha256": self.checkpoint_sha256, "uses_text": self.predictor.uses_text},
            "preprocessing": self.predictor.preprocessing.to_dict(),
            "input": {"name": opened.name, "format": image.format, "modality": image.modality,
                      "shape": list(image.array.shape), "slices": opened.depth, "file": opened.source,
                      "sha256": sha256, **({"write_file": opened.make_source} if opened.make_source else {})},
            "slice": k, "display_window": window, "threshold": threshold, "sentences": rows,
            "same_with_lsms_predict": commands,
        }

    # ------------------------------------------------------------------ whole volume

    def start_volume(self, sid: str, texts: list[str], threshold: float) -> dict[str, Any]:
        """Predict every slice for each sentence in a thread; poll :meth:`volume_progress`."""
        s = self.session(sid)
        texts = self._check_texts(texts)
        threshold = _check_threshold(threshold)
        with s.lock:
            if s.opened is None:
                raise ServeError(409, "open an image first")
            if s.job is not None and s.job.state == "running":
                raise ServeError(409, "a whole-volume prediction is running already; wait for it")
            try:  # Whole volume runs VOLUME_BATCH slices per forward pass
                self.predictor.spec.check_memory(min(VOLUME_BATCH, s.opened.depth), "Whole volume",
                                                 f"it predicts {VOLUME_BATCH} slices at once: segment slices one by "
                                                 "one with the slider", getattr(self.predictor.backend, "device", None))
            except ValueError as err:
                raise ServeError(413, str(err)) from None
            job = VolumeJob(texts, threshold, total=s.opened.depth * len(texts))
            s.job = job
        threading.Thread(target=self._run_volume, args=(s, job), name=f"volume-{sid[:6]}", daemon=True).start()
        return self.volume_progress(sid)

    def _run_volume(self, s: Session, job: VolumeJob) -> None:
        """Every slice in batches of :data:`VOLUME_BATCH` (the model lock held one batch at a time, so other pages
        are served in between), then one 3D answer per sentence from the probabilities kept in the session."""
        started = time.perf_counter()
        try:
            assert s.opened is not None
            depth = s.opened.depth
            volume = Volume(Path(s.opened.name), depth, s.opened.read)
            kept: list[tuple[np.ndarray, np.ndarray]] = []
            for start in range(0, depth, VOLUME_BATCH):
                if job.cancel.is_set():
                    job.state = "cancelled"
                    return
                ks = list(range(start, min(depth, start + VOLUME_BATCH)))
                with self.model_lock:
                    part = self.predictor.predict_volume(volume, ks, job.texts, VOLUME_BATCH)
                if not kept:  # (Z, H, W) float32 and (Z,) per sentence
                    kept = [(np.empty((depth, *p.shape[1:]), np.float32), np.empty(depth)) for p, _ in part]
                for (prob, existence), (p, e) in zip(kept, part, strict=True):
                    prob[start:start + len(ks)], existence[start:start + len(ks)] = p, e
                job.done += len(ks) * len(job.texts)
            with s.lock:
                if s.job is job:  # not replaced by another image meanwhile
                    for key in [key for key in s.answers if key[0] in job.texts]:
                        del s.answers[key]
                    s.volume.update(zip(job.texts, kept))
                    for text in job.texts:
                        self._answer(s, text, job.threshold)
            job.state = "finished"
            log.info("session %s: whole volume (%d predictions) in %.1f s", s.id[:6], job.total,
                     time.perf_counter() - started)
        except Exception as err:  # the page shows it; the server keeps serving
            job.state, job.error = "failed", hide_folder(f"{type(err).__name__}: {err}", s.folder)
            log.warning("session %s: whole-volume prediction failed: %s", s.id[:6], job.error)

    def volume_progress(self, sid: str) -> dict[str, Any]:
        s = self.session(sid)
        job = s.job
        if job is None:
            return {"state": "none"}
        out = {"state": job.state, "done": job.done, "total": job.total, "error": job.error,
               "texts": job.texts, "threshold": job.threshold}
        if job.state == "finished":
            with s.lock:
                answers = [self._answer(s, t, job.threshold) for t in job.texts]
                spacing = s.opened.spacing() if s.opened is not None else None
                out["answers"] = [{"text": t, **a.summary(spacing)} for t, a in zip(job.texts, answers) if a is not None]
        return out


# --------------------------------------------------------------------------- helpers


def status_text(n_sentences: int, k: int, depth: int, seconds: float) -> str:
    """The page's status line after a prediction: the slice is named only for a volume (a 2D image has one)."""
    where = f" on slice {k} (of 0..{depth - 1})" if depth > 1 else ""
    return f"{n_sentences} sentence(s){where} in {seconds:.2f} s."


def upload_accept() -> str:
    """The upload picker's filter: every reader's endings and media types, ``.gz`` for ``.nii.gz`` (browsers match
    the last suffix only) and ``.zip`` (a DICOM series, zipped)."""
    suffixes = [s for r in READERS for s in r.suffixes]
    last = ["." + s.rsplit(".", 1)[1] for s in suffixes if s.count(".") > 1]
    return ",".join(dict.fromkeys([*suffixes, *last, ".zip", *(m for r in READERS for m in r.media_types)]))


def _opened(s: Session) -> Opened:
    """The session's open image; a 409 before one is open."""
    if s.opened is None:
        raise ServeError(409, "open an image first")
    return s.opened


def _check_threshold(threshold: Any) -> float:
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise ServeError(400, f"threshold must be a number between 0 and 1, got {threshold!r}") from None
    try:
        return check_threshold(t)
    except ValueError as err:
        raise ServeError(400, str(err)) from None


def _is_ct(image: ImageData) -> bool:
    """CT in HU: DICOM says CT, or a single-channel NIfTI/DICOM/NumPy image with air below -500."""
    if image.modality:
        return image.modality.upper() == "CT"
    return image.array.ndim == 2 and image.format in ("nifti", "dicom", "dicom-series", "npy", "npz") and \
        float(image.array.min()) < -500
