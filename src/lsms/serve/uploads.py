"""Uploads of ``lsms serve``: safe file names, zip extraction with a size check, hashes."""

from __future__ import annotations

import hashlib
import re
import shutil
import zipfile
from pathlib import Path

from lsms.serve.errors import ServeError


def safe_name(name: str) -> Path:
    """An upload's (relative) file name -> a path of harmless parts (no '..', no absolute paths)."""
    parts = [re.sub(r"[^A-Za-z0-9._-]", "_", p) for p in re.split(r"[\\/]+", name)]
    parts = [p for p in parts if p not in ("", ".", "..")]
    return Path(*parts) if parts else Path("upload")


def write_upload(folder: Path, name: str, data: bytes) -> Path:
    path = folder / safe_name(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def extract_zip(path: Path, out: Path, max_bytes: int) -> list[Path]:
    """Extract a zip after checking its total size; member names are sanitised (no zip-slip)."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = [i for i in z.infolist() if not i.is_dir()]
            total = sum(i.file_size for i in infos)
            if total > max_bytes:
                raise ServeError(413, f"{path.name}: unpacks to {total / 2**20:.0f} MB; the limit is "
                                      f"{max_bytes / 2**20:.0f} MB")
            paths = []
            for info in infos:
                if Path(info.filename).name.startswith(".") or "__MACOSX" in info.filename:
                    continue
                target = out / safe_name(info.filename)
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                paths.append(target)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError) as err:
        raise ServeError(400, f"{path.name}: cannot unpack the zip ({err}); it is damaged or not a zip") from None
    if not paths:
        raise ServeError(400, f"{path.name}: the zip holds no files")
    return paths


def hide_folder(message: str, folder: Path) -> str:
    """Error messages name the uploaded file, not the server's temporary folder."""
    return re.sub(re.escape(str(folder)) + r"[^/\s:]*/?", "", message)


def files_sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
