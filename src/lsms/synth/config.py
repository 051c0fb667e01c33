"""Settings of a RefLiver-Synth generation run (one typed dataclass, checked on construction)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lsms.settings import DictRoundTrip

LESION_TYPES: tuple[str, ...] = ("cyst", "hemangioma", "hcc", "metastasis", "fnh")

# Plausible diameter range per type (mm); intersected with SynthConfig.diameter_mm.
TYPE_DIAMETER_MM: dict[str, tuple[float, float]] = {
    "cyst": (5.0, 70.0),
    "hemangioma": (8.0, 80.0),
    "hcc": (12.0, 80.0),
    "metastasis": (5.0, 50.0),
    "fnh": (12.0, 60.0),
}


@dataclass(frozen=True)
class SynthConfig(DictRoundTrip):
    """Everything that decides a generated dataset (together with the phrasing file).

    Args:
        patients: number of synthetic patients.
        slices_per_patient: axial slices per patient (distinct cranio-caudal levels).
        seed: master seed; every patient and slice gets its own child seed (``SeedSequence.spawn``).
        image_size: output height = width in pixels.
        fov_mm: field of view (mm) across the image; spacing = fov_mm / image_size.
        max_lesions: most lesions in one slice (1..4).
        multi_lesion_share: share of slices drawn with 2..max_lesions lesions (needs max_lesions >= 2).
        lesion_types: which of ``LESION_TYPES`` occur.
        diameter_mm: (min, max) lesion diameter in mm.
        noise_hu: (min, max) standard deviation of the correlated noise in HU, drawn per patient.
        val_share, test_share: shares of *patients* in the val and test splits.
        phrasing: path of a phrasing file (YAML/JSON); ``None`` uses the one shipped with the package.
        negative_share: share of slices that also get a *negative* expression: a sentence describing a lesion
            that is not on the slice (another type, another segment, or a relation no lesion satisfies), with an
            empty target mask (docs/refliver-synth.md, "Negatives"). Applies to the training split, and to
            every split with ``eval_negatives`` off.
        eval_negatives: instead of ``negative_share``'s, every test slice gets one negative of each kind it
            allows (type, location, relation), so that "not present" is measured on enough sentences, and every
            val slice one (the kinds in turn), to choose the existence threshold on.
        variants: paraphrases written per expression (the record's ``variants``) for train-time text
            augmentation: each in a random phrasing file of ``paraphrasings``, with some details dropped (only
            while the expression stays unique) and the rest reordered. 0: none.
        paraphrasings: phrasing files of the variants; ``None``: the packaged training set
            (``TRAINING_PHRASINGS``). The packaged ``phrasings-heldout.yaml`` is kept out of it.
    """

    settings_name: ClassVar[str] = "synth settings"

    patients: int = 100
    slices_per_patient: int = 10
    seed: int = 0
    image_size: int = 256
    fov_mm: float = 350.0
    max_lesions: int = 4
    multi_lesion_share: float = 0.6
    lesion_types: tuple[str, ...] = LESION_TYPES
    diameter_mm: tuple[float, float] = (8.0, 60.0)
    noise_hu: tuple[float, float] = (8.0, 14.0)
    val_share: float = 0.1
    test_share: float = 0.1
    phrasing: str | None = None
    negative_share: float = 0.2
    eval_negatives: bool = True
    variants: int = 4
    paraphrasings: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.patients < 1:
            raise ValueError(f"--patients must be at least 1, got {self.patients}")
        if self.slices_per_patient < 1:
            raise ValueError(f"--slices-per-patient must be at least 1, got {self.slices_per_patient}")
        if not 32 <= self.image_size <= 2048:
            raise ValueError(f"--image-size must be between 32 and 2048 pixels, got {self.image_size}")
        if not 150.0 <= self.fov_mm <= 600.0:
            raise ValueError(f"--fov-mm must be between 150 and 600 mm (the body is ~320 mm wide), got {self.fov_mm}")
        if not 1 <= self.max_lesions <= 4:
            raise ValueError(f"--lesions-per-slice must be 1..4, got {self.max_lesions}")
        if not 0.0 <= self.multi_lesion_share <= 1.0:
            raise ValueError(f"--multi-lesion-share must be in [0, 1], got {self.multi_lesion_share}")
        if self.max_lesions == 1 and self.multi_lesion_share > 0:
            raise ValueError("--multi-lesion-share > 0 needs --lesions-per-slice >= 2 (or set the share to 0)")
        bad = [t for t in self.lesion_types if t not in LESION_TYPES]
        if bad or not self.lesion_types:
            raise ValueError(f"--lesion-types must be a non-empty subset of {', '.join(LESION_TYPES)}; got {bad or 'none'}")
        lo, hi = self.diameter_mm
        if not 3.0 <= lo <= hi <= 80.0:
            raise ValueError(f"--diameter-mm must satisfy 3 <= MIN <= MAX <= 80, got {lo} {hi}")
        if all(TYPE_DIAMETER_MM[t][1] < lo or TYPE_DIAMETER_MM[t][0] > hi for t in self.lesion_types):
            raise ValueError(f"--diameter-mm {lo} {hi} fits none of the lesion types {self.lesion_types}")
        if hi < 3 * self.spacing_mm:
            raise ValueError(f"--diameter-mm MAX {hi} is under 3 pixels ({self.spacing_mm:.2f} mm each); raise it or --image-size")
        nlo, nhi = self.noise_hu
        if not 0.0 <= nlo <= nhi <= 100.0:
            raise ValueError(f"--noise must satisfy 0 <= MIN <= MAX <= 100 HU, got {nlo} {nhi}")
        for name in ("val_share", "test_share"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1), got {v}")
        if not 0.0 <= self.negative_share <= 1.0:
            raise ValueError(f"--negative-share must be in [0, 1], got {self.negative_share}")
        if not 0 <= self.variants <= 32:
            raise ValueError(f"--variants must be between 0 and 32 paraphrases per expression, got {self.variants}")
        if self.paraphrasings is not None and not self.paraphrasings:
            raise ValueError("--paraphrasing needs at least one phrasing file (or leave it out for the packaged set)")
        if self.val_share + self.test_share >= 1.0:
            raise ValueError("--val-share + --test-share must leave some patients for training (sum < 1)")

    @property
    def spacing_mm(self) -> float:
        return self.fov_mm / self.image_size


@dataclass(frozen=True)
class VolumeConfig(DictRoundTrip):
    """How the volumes are cut (with ``SynthConfig``, which sets everything else: size, lesions, text).

    Args:
        slices: slices per volume.
        slice_mm: distance between slice centres and slice thickness (mm).
        dicom: also write each volume as a DICOM CT series (``dicom/<patient>/``).
        off_slice_negatives: up to this many *off-slice negatives* per slice of the train and val volumes: the
            slice paired with the volume sentence of a lesion of the volume that has no voxel on it, with an
            empty target, on the 2D set's slices and on every 4th lesion-free slice of the liver's z-range
            (:mod:`lsms.synth.off_slice`). 0: none (the output is what it was before the setting existed).
        on_slice_sentences: each slice of the train and val volumes' 2D set also gets, for every lesion it
            describes, that lesion's volume sentence with its section on the slice as the target (the sentences
            a volume is queried with, where the slice has an answer). False: none (the output as before).
    """

    settings_name: ClassVar[str] = "volume settings"

    slices: int = 64
    slice_mm: float = 2.5
    dicom: bool = False
    off_slice_negatives: int = 0
    on_slice_sentences: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "slice_mm", float(self.slice_mm))
        if not 0 <= self.off_slice_negatives <= 16:
            raise ValueError(f"--off-slice-negatives must be between 0 and 16, got {self.off_slice_negatives}")
        if not 4 <= self.slices <= 512:
            raise ValueError(f"--volume-slices must be between 4 and 512, got {self.slices}")
        if not 0.5 <= self.slice_mm <= 10.0:
            raise ValueError(f"--slice-mm must be between 0.5 and 10 mm, got {self.slice_mm}")

    def to_dict(self) -> dict[str, Any]:
        """The settings; ``off_slice_negatives`` at 0 and ``on_slice_sentences`` off are left out, so
        ``dataset.json`` of a volume set without them reads as before the settings existed (``from_dict``
        restores the defaults)."""
        d = super().to_dict()
        for name in ("off_slice_negatives", "on_slice_sentences"):
            if not d[name]:
                del d[name]
        return d
