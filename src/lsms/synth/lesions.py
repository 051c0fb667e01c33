"""Liver lesions: placement inside the liver without overlap, and their portal-venous appearance.

Five types (spec table): cyst, hemangioma, hepatocellular carcinoma (``hcc``), metastasis and focal nodular
hyperplasia (``fnh``). A lesion is a star-shaped outline ``rho(theta) < 1`` in a rotated, stretched frame
(oval = stretched, lobulated / irregular = low / high Fourier harmonics of the radius). The mask is the hard
outline on the pixel grid; the picture blends the lesion's interior pattern in with a soft edge whose
width encodes the boundary (clear ~0.3 mm, blurred ~2.5 mm).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np
from scipy.ndimage import distance_transform_edt

from lsms.synth.config import TYPE_DIAMETER_MM
from lsms.synth.geometry import Grid, smooth_field

# Shape / boundary / density / enhancement vocabularies (values of the structured attributes).
TYPE_SHAPES = {"cyst": (("round", 0.6), ("oval", 0.4)), "hemangioma": (("lobulated", 0.6), ("round", 0.4)),
               "hcc": (("round", 0.5), ("irregular", 0.5)), "metastasis": (("round", 0.6), ("oval", 0.4)),
               "fnh": (("lobulated", 1.0),)}
TYPE_DENSITY = {"cyst": "fluid", "hemangioma": "low", "hcc": "mixed", "metastasis": "low", "fnh": "slightly_high"}

GAP_MM = 3.0  # minimum gap between two lesions' outlines
EDGE_MARGIN_MM = 1.5  # minimum distance of a lesion's outline from the liver's edge


@dataclass
class Lesion:
    """One placed lesion (geometry in mm, appearance parameters in HU)."""

    kind: str
    x: float
    y: float
    radius: float  # nominal mean radius (mm)
    elong: float
    rot: float  # radians
    harmonics: np.ndarray  # (K, 3): k, amplitude, phase
    shape: str
    boundary: str
    density: str
    enhancement: str
    capsule: bool = False
    params: dict[str, float] = field(default_factory=dict)
    window: tuple[slice, slice] | None = None
    local_mask: np.ndarray | None = None  # bool mask within ``window``
    z: float = 0.0  # volumes: centre along the slice axis (mm from the centre of slice 0)
    half_z: float = 0.0  # volumes: half the extent along the slice axis (mm); 0 for a lesion of one slice

    @property
    def max_radius(self) -> float:
        return self.radius * max(np.sqrt(self.elong), 1.0) * (1.0 + float(np.abs(self.harmonics[:, 1]).sum()))

    @property
    def bound(self) -> float:
        """Radius (mm) of a ball about the centre holding the whole 3D body (see :meth:`section`)."""
        return max(self.max_radius, self.half_z)

    def section(self, z_mm: float) -> Lesion | None:
        """The body's cross-section at ``z_mm`` (volumes): the same outline scaled by ``sqrt(1 - t^2)``,
        ``t = (z_mm - z) / half_z``, so the body is a stretched, lobulated ellipsoid; None outside it.

        A point of the section lies within ``max_radius * sqrt(1 - t^2)`` of the axis, so within
        :attr:`bound` of the centre in 3D."""
        t = (z_mm - self.z) / self.half_z if self.half_z > 0 else float("inf")
        if abs(t) >= 1.0:
            return None
        return replace(self, radius=self.radius * float(np.sqrt(1.0 - t * t)), window=None, local_mask=None)

    def frame(self, dx: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Normalised frame of pixel offsets: (rho, theta, u, v); ``rho < 1`` is inside the outline."""
        c, s = np.cos(self.rot), np.sin(self.rot)
        se = np.sqrt(self.elong)
        u = (dx * c + dy * s) / (self.radius * se)
        v = (-dx * s + dy * c) * se / self.radius
        r = np.hypot(u, v)
        theta = np.arctan2(v, u)
        f = np.ones_like(r)
        for k, a, ph in self.harmonics:
            f += a * np.cos(k * theta + ph)
        return r / f, theta, u, v

    def full_mask(self, size: int) -> np.ndarray:
        out = np.zeros((size, size), dtype=bool)
        if self.window is not None and self.local_mask is not None:
            out[self.window] = self.local_mask
        return out


def _choice(rng: np.random.Generator, options: tuple[tuple[str, float], ...]) -> str:
    names = [o[0] for o in options]
    w = np.array([o[1] for o in options])
    return names[int(rng.choice(len(names), p=w / w.sum()))]


def draw_lesion(kind: str, diameter: float, rng: np.random.Generator, liver_hu: float, vessel_hu: float) -> Lesion:
    """Draws shape and appearance of one lesion of ``kind`` with nominal ``diameter`` (mm)."""
    shape = _choice(rng, TYPE_SHAPES[kind])
    if shape == "round":
        elong, harm = rng.uniform(1.0, 1.12), [(2, rng.uniform(0, 0.03), rng.uniform(0, 6.28))]
    elif shape == "oval":
        elong, harm = rng.uniform(1.35, 1.7), [(3, rng.uniform(0, 0.03), rng.uniform(0, 6.28))]
    elif shape == "lobulated":
        k = int(rng.integers(3, 6))
        elong = rng.uniform(1.0, 1.25)
        harm = [(k, rng.uniform(0.09, 0.15), rng.uniform(0, 6.28)), (k + 2, rng.uniform(0.02, 0.05), rng.uniform(0, 6.28))]
    else:  # irregular
        elong = rng.uniform(1.0, 1.3)
        harm = [(int(k), rng.uniform(0.03, 0.07), rng.uniform(0, 6.28)) for k in rng.choice(np.arange(2, 10), 4, replace=False)]
    les = Lesion(kind=kind, x=0.0, y=0.0, radius=diameter / 2, elong=elong, rot=rng.uniform(0, np.pi),
                 harmonics=np.array(harm, dtype=np.float64), shape=shape, boundary="clear",
                 density=TYPE_DENSITY[kind], enhancement="none")
    p = les.params
    if kind == "cyst":
        p["base"] = rng.uniform(0, 18)
        les.enhancement = "none"
    elif kind == "hemangioma":
        p["base"] = liver_hu - rng.uniform(45, 60)
        p["nodule"] = vessel_hu + rng.uniform(-5, 10)
        p["n_nodules"] = float(rng.integers(4, 8))
        p["nodule_seed"] = float(rng.integers(1 << 30))
        les.enhancement = "peripheral_nodular"
    elif kind == "hcc":
        p["base"] = liver_hu - rng.uniform(28, 42)
        p["mosaic"] = rng.uniform(12, 20)
        p["mosaic_seed"] = float(rng.integers(1 << 30))
        les.capsule = bool(rng.random() < 0.65)
        p["capsule"] = liver_hu + rng.uniform(12, 25)
        les.boundary = "clear" if rng.random() < 0.6 else "blurred"
        les.enhancement = "washout_capsule" if les.capsule else "washout"
    elif kind == "metastasis":
        p["base"] = liver_hu - rng.uniform(45, 60)
        p["rim"] = liver_hu - rng.uniform(0, 12)
        p["core"] = p["base"] - rng.uniform(5, 15)
        les.boundary = "blurred"
        les.enhancement = "ring"
    elif kind == "fnh":
        p["base"] = liver_hu + rng.uniform(25, 35)
        p["scar"] = liver_hu - rng.uniform(15, 30)
        p["n_spokes"] = float(rng.integers(3, 6))
        p["spoke_phase"] = rng.uniform(0, 6.28)
        les.enhancement = "homogeneous_scar"
    else:  # pragma: no cover - validated by SynthConfig
        raise ValueError(f"unknown lesion type {kind!r}")
    p["edge_mm"] = 0.3 if les.boundary == "clear" else rng.uniform(2.0, 3.0)
    return les


def sample_diameter(kind: str, rng: np.random.Generator, lo: float, hi: float) -> float:
    """Log-uniform diameter (mm) within the type's range and the configured one."""
    tlo, thi = TYPE_DIAMETER_MM[kind]
    a, b = max(lo, tlo), min(hi, thi)
    if a > b:  # the type's range misses the configured one: use the nearer end of the configured range
        a = b = lo if thi < lo else hi
    return float(np.exp(rng.uniform(np.log(a), np.log(b))))


def _shrink_to_fit(les: Lesion, candidates: Callable[[Lesion], np.ndarray], min_diameter: float) -> np.ndarray | None:
    """Where ``les`` may go (``candidates(les)``, flat indices), shrinking it by 15 % steps while nowhere fits;
    None when it would have to shrink below ``min_diameter``."""
    while True:
        cand = candidates(les)
        if cand.size:
            return cand
        if 2 * les.radius * 0.85 < min_diameter:
            return None
        les.radius *= 0.85


def place_lesions(lesions: list[Lesion], liver: np.ndarray, grid: Grid, rng: np.random.Generator,
                  min_diameter: float) -> list[Lesion]:
    """Places lesions (largest first) inside the liver, disjoint, shrinking those that do not fit.

    Lesions that do not fit even at ``min_diameter`` are dropped. Returns the placed ones with masks set.
    """
    edt = distance_transform_edt(liver, sampling=grid.spacing)
    X, Y = grid.x, grid.y
    placed: list[Lesion] = []
    def candidates(les: Lesion) -> np.ndarray:
        need = les.max_radius + EDGE_MARGIN_MM
        ok = edt >= need
        for q in placed:
            ok &= np.hypot(X - q.x, Y - q.y) >= need + q.max_radius + GAP_MM
        return np.flatnonzero(ok)

    for les in sorted(lesions, key=lambda l_: -l_.radius):
        cand = _shrink_to_fit(les, candidates, min_diameter)
        if cand is None:
            continue
        r, c = divmod(int(cand[int(rng.integers(cand.size))]), grid.size)
        les.x, les.y = grid.to_mm(r, c)
        les.window, les.local_mask = section_mask(les, grid)
        if les.local_mask.sum() < 3:
            continue
        placed.append(les)
    return placed


def place_lesions_3d(lesions: list[Lesion], liver: np.ndarray, grid: Grid, slice_mm: float,
                     rng: np.random.Generator, min_diameter: float, same_level_p: float = 0.0) -> list[Lesion]:
    """Places 3D lesion bodies (largest first) inside the liver volume ``liver`` (Z, H, W), disjoint, shrinking
    those that do not fit (as :func:`place_lesions` does on a slice).

    Each body gets a z half-extent of 0.75..1.25 times its mean radius. Its centre is a voxel whose 3D distance
    to the nearest non-liver voxel (or beyond the first / last slice) is at least :attr:`Lesion.bound` +
    :data:`EDGE_MARGIN_MM`, and whose distance to every placed centre leaves :data:`GAP_MM` between their
    bounding balls: so every voxel of the body is liver and no two bodies touch. With probability
    ``same_level_p`` a lesion after the first is centred within the first one's z-extent where it fits there
    (so that slices show several lesions), else anywhere.
    """
    padded = np.pad(liver, ((1, 1), (0, 0), (0, 0)))  # the volume ends: outside is not liver
    edt = distance_transform_edt(padded, sampling=(slice_mm, grid.spacing, grid.spacing))[1:-1]
    placed: list[Lesion] = []
    def candidates(les: Lesion, ratio: float) -> np.ndarray:
        les.half_z = les.radius * ratio
        cand = np.flatnonzero(edt >= les.bound + EDGE_MARGIN_MM)
        if cand.size and placed:
            k, r, c = np.unravel_index(cand, liver.shape)
            x, y, z = grid.x[0, c], grid.y[r, 0], k * slice_mm
            ok = np.ones(cand.size, dtype=bool)
            for q in placed:
                ok &= np.sqrt((x - q.x) ** 2 + (y - q.y) ** 2 + (z - q.z) ** 2) >= les.bound + q.bound + GAP_MM
            cand = cand[ok]
        return cand

    for les in sorted(lesions, key=lambda l_: -l_.radius):
        cand = _shrink_to_fit(les, partial(candidates, ratio=rng.uniform(0.75, 1.25)), min_diameter)
        if cand is None:
            continue
        if placed and rng.random() < same_level_p:
            first = placed[0]
            level = np.abs(np.unravel_index(cand, liver.shape)[0] * slice_mm - first.z) < first.half_z
            cand = cand[level] if level.any() else cand
        k, r, c = (int(v) for v in np.unravel_index(int(cand[int(rng.integers(cand.size))]), liver.shape))
        les.x, les.y = grid.to_mm(r, c)
        les.z = k * slice_mm
        placed.append(les)
    return placed


def section_mask(les: Lesion, grid: Grid) -> tuple[tuple[slice, slice], np.ndarray]:
    """The pixels of a (placed) lesion's outline: its window and the bool mask within it."""
    win, dx, dy = grid.local(les.x, les.y, les.max_radius + 4.0)
    rho, _, _, _ = les.frame(dx, dy)
    return win, rho < 1.0


def render_lesion(img: np.ndarray, les: Lesion, grid: Grid) -> None:
    """Blends the lesion's portal-venous appearance into ``img`` (in place, within its window)."""
    edge = max(les.params["edge_mm"], 0.25 * grid.spacing)
    win, dx, dy = grid.local(les.x, les.y, les.max_radius + 3 * edge + 1.0)
    rho, theta, u, v = les.frame(dx, dy)
    p = les.params
    val = np.full(rho.shape, p["base"], dtype=np.float32)
    if les.kind == "hemangioma":
        rng = np.random.default_rng(int(p["nodule_seed"]))
        n = int(p["n_nodules"])
        angles = rng.uniform(0, 2 * np.pi, n)  # discontinuous: random, not evenly spaced
        blob = np.zeros_like(val)
        for a in angles:
            f = 1.0 + sum(h[1] * np.cos(h[0] * a + h[2]) for h in les.harmonics)
            cu, cv = 0.8 * f * np.cos(a), 0.8 * f * np.sin(a)
            s = rng.uniform(0.13, 0.22)
            blob = np.maximum(blob, np.exp(-((u - cu) ** 2 + (v - cv) ** 2) / (2 * s * s)))
        val += (p["nodule"] - p["base"]) * blob
    elif les.kind == "hcc":
        rng = np.random.default_rng(int(p["mosaic_seed"]))
        cells = max(3, int(2 * les.radius / 6))
        val += p["mosaic"] * smooth_field(rng, rho.shape, cells)
        if les.capsule:
            ring = np.exp(-((rho - 0.95) / 0.06) ** 2)
            val += (p["capsule"] - val) * ring
    elif les.kind == "metastasis":
        t = np.clip((rho - 0.55) / 0.3, 0, 1)
        val = p["base"] + (p["rim"] - p["base"]) * t * (1.0 - np.clip((rho - 0.95) / 0.1, 0, 1) * 0.3)
        val = np.where(rho < 0.35, p["core"], val).astype(np.float32)
    elif les.kind == "fnh":
        n = int(p["n_spokes"])
        scar = rho < 0.16
        for i in range(n):
            a = p["spoke_phase"] + 2 * np.pi * i / n
            along = u * np.cos(a) + v * np.sin(a)
            across = np.abs(-u * np.sin(a) + v * np.cos(a))
            scar |= (along > 0) & (along < 0.6) & (across < 0.05 + 0.04 * (1 - along / 0.6))
        val = np.where(scar, p["scar"], val).astype(np.float32)
    alpha = 0.5 * (1.0 - np.tanh((rho - 1.0) * les.radius / edge))
    sub = img[win]
    sub += alpha * (val - sub)
