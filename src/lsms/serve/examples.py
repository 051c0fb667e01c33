"""The viewer's bundled images: RefLiver-Synth test slices of ``lsms demo``, rendered on demand.

Nothing is stored in the package: :func:`~lsms.synth.render_slice` re-renders any slice of the demo's
synthetic set exactly (deterministic in the seed), so the slices offered are the ones ``make demo`` holds
out as its test patients, with their reference sentences.
"""

from __future__ import annotations

import hashlib
import io
import shlex
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from lsms.data import ImageData

N_EXAMPLES = 8  # multi-lesion test slices offered on the page


@dataclass
class Example:
    """One bundled slice: the image in HU and one full sentence per lesion."""

    id: str
    image: ImageData
    texts: list[str]

    @property
    def file_name(self) -> str:
        """The slice as a file that ``lsms predict`` reads: HU values in a NumPy ``.npy`` (see :meth:`write_command`)."""
        return f"{self.id}.npy"

    def file_sha256(self) -> str:
        """sha256 of the file :meth:`write_command` writes (``np.save``'s bytes)."""
        buf = io.BytesIO()
        np.save(buf, self.image.array)
        return hashlib.sha256(buf.getvalue()).hexdigest()

    def write_command(self) -> str:
        """A shell command that writes :attr:`file_name` in the current folder (nothing is stored in the package)."""
        code = (f"import numpy as np; from lsms.serve.examples import example; "
                f"np.save({self.file_name!r}, example({self.id!r}).image.array)")
        return f"python -c {shlex.quote(code)}"


@lru_cache(maxsize=1)
def examples() -> tuple[Example, ...]:
    """The first :data:`N_EXAMPLES` test-split slices of the demo's RefLiver-Synth set with 2+ lesions."""
    from lsms.demo import DemoConfig, synth_config
    from lsms.synth import render_slice, split_of_patients

    cfg = synth_config(DemoConfig())
    out: list[Example] = []
    for i, split in enumerate(split_of_patients(cfg)):
        if split != "test":
            continue
        for j in range(cfg.slices_per_patient):
            s = render_slice(cfg, i, j, paraphrasings=[])  # no paraphrases: only the expressions are shown
            if len(s.texts) < 2:
                continue
            spacing = cfg.fov_mm / cfg.image_size
            image = ImageData(s.image.astype(np.float32), Path(f"refliver-synth/{s.slice_id}"), "npy",
                              spacing=(spacing, spacing), modality="CT", bit_depth=16)
            out.append(Example(s.slice_id, image, [t["full"] for t in s.texts]))
            if len(out) == N_EXAMPLES:
                return tuple(out)
    return tuple(out)


def example(example_id: str) -> Example:
    """The bundled slice called ``example_id`` (e.g. ``p0011_s01``)."""
    for e in examples():
        if e.id == example_id:
            return e
    raise ValueError(f"no bundled slice {example_id!r}; choose one of {', '.join(e.id for e in examples())}")
