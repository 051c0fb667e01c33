"""Vectorised shape primitives on a millimetre grid (no per-pixel Python loops).

Grid convention (radiological, as displayed): rows run anterior (top) -> posterior (bottom), columns run
from the patient's RIGHT (image left) to the patient's LEFT (image right). In millimetres ``x`` grows to the
patient's left and ``y`` grows posteriorly; the image centre is (0, 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Grid:
    """Pixel-centre coordinates (mm) of a square image."""

    size: int
    spacing: float  # mm per pixel, rows and columns

    @property
    def x(self) -> np.ndarray:  # (1, W) patient's left positive
        return ((np.arange(self.size, dtype=np.float32) + 0.5 - self.size / 2) * self.spacing)[None, :]

    @property
    def y(self) -> np.ndarray:  # (H, 1) posterior positive
        return ((np.arange(self.size, dtype=np.float32) + 0.5 - self.size / 2) * self.spacing)[:, None]

    def to_px(self, x_mm: float, y_mm: float) -> tuple[float, float]:
        """(x, y) in mm -> (row, col) in fractional pixels."""
        return y_mm / self.spacing + self.size / 2 - 0.5, x_mm / self.spacing + self.size / 2 - 0.5

    def to_mm(self, row: float, col: float) -> tuple[float, float]:
        """(row, col) in pixels -> (x, y) in mm."""
        return (col + 0.5 - self.size / 2) * self.spacing, (row + 0.5 - self.size / 2) * self.spacing

    def window(self, x_mm: float, y_mm: float, radius_mm: float) -> tuple[slice, slice]:
        """Row and column slices of the pixels within ``radius_mm`` of a point (clipped to the image)."""
        r, c = self.to_px(x_mm, y_mm)
        h = radius_mm / self.spacing + 1.5
        r0, r1 = max(0, int(np.floor(r - h))), min(self.size, int(np.ceil(r + h)) + 1)
        c0, c1 = max(0, int(np.floor(c - h))), min(self.size, int(np.ceil(c + h)) + 1)
        return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))

    def local(self, x_mm: float, y_mm: float, radius_mm: float) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
        """Window around a point and the (dx, dy) offsets (mm) of its pixels from the point."""
        win = self.window(x_mm, y_mm, radius_mm)
        return win, self.x[:, win[1]] - x_mm, self.y[win[0], :] - y_mm


def ellipse_rho(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, rot_deg: float = 0.0,
                power: float = 2.0, *, windowed: bool = True) -> np.ndarray:
    """Normalised radius of a (super)ellipse: < 1 inside, 1 on the outline.

    ``a`` is the semi-axis along the direction ``rot_deg`` (degrees from +x towards +y), ``b`` across it.
    A zero or negative axis gives an empty shape (rho = inf).
    """
    shape = np.broadcast_shapes(x.shape, y.shape)
    if a <= 0 or b <= 0:
        return np.full(shape, np.inf, dtype=np.float32)
    if windowed and x.ndim == 2 and x.shape[0] == 1 and y.ndim == 2 and y.shape[1] == 1 and x.shape[1] > 16 and y.shape[0] > 16:
        # separable grid: evaluate only in a window around the shape (rho > ~1.6 outside reads as inf)
        reach = 1.6 * max(a, b)
        xs, ys = x[0], y[:, 0]
        c0, c1 = np.searchsorted(xs, [cx - reach, cx + reach])
        r0, r1 = np.searchsorted(ys, [cy - reach, cy + reach])
        out = np.full(shape, np.inf, dtype=np.float32)
        if c1 > c0 and r1 > r0:
            out[r0:r1, c0:c1] = ellipse_rho(x[:, c0:c1], y[r0:r1, :], cx, cy, a, b, rot_deg, power,
                                                    windowed=False)
        return out
    t = np.deg2rad(rot_deg)
    dx, dy = x - cx, y - cy
    u = (dx * np.cos(t) + dy * np.sin(t)) / a
    v = (-dx * np.sin(t) + dy * np.cos(t)) / b
    if power == 2.0:
        return np.sqrt(u * u + v * v)
    return (np.abs(u) ** power + np.abs(v) ** power) ** (1.0 / power)


def smooth_min(values: list[np.ndarray], k: float) -> np.ndarray:
    """Soft minimum (log-sum-exp) of implicit fields: a smooth union of shapes."""
    finite = [np.minimum(v, 10.0) for v in values if np.isfinite(v).any()]  # far outside: value irrelevant
    if not finite:
        return values[0]
    m = np.minimum.reduce(finite)
    acc = np.zeros_like(m)
    for v in finite:
        acc += np.exp(-(v - m) / k)
    return m - k * np.log(acc)


def segment_distance(x: np.ndarray, y: np.ndarray, p0: tuple[float, float], p1: tuple[float, float]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Distance (mm) of each point to the segment p0-p1 and the position t in [0, 1] along it."""
    vx, vy = p1[0] - p0[0], p1[1] - p0[1]
    length2 = max(vx * vx + vy * vy, 1e-6)
    t = np.clip(((x - p0[0]) * vx + (y - p0[1]) * vy) / length2, 0.0, 1.0)
    return np.hypot(x - p0[0] - t * vx, y - p0[1] - t * vy), t


def direction(phi_deg: float) -> tuple[float, float]:
    """Unit vector at angle phi measured from ANTERIOR (0) towards the patient's LEFT (+90)."""
    p = np.deg2rad(phi_deg)
    return float(np.sin(p)), float(-np.cos(p))


def angle_from_anterior(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Inverse of :func:`direction`: degrees in (-180, 180], 0 = anterior, +90 = patient's left."""
    return np.rad2deg(np.arctan2(dx, -dy))


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Smooth random field with zero mean and unit-ish amplitude (bicubic upsampling of a coarse grid)."""
    from scipy.ndimage import zoom

    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    out = zoom(coarse, (shape[0] / cells, shape[1] / cells), order=3, mode="reflect", grid_mode=True)
    return out[: shape[0], : shape[1]]


def _boundary_voxels(mask: np.ndarray) -> np.ndarray:
    """(N, 3) voxels of a 3D mask with a 6-neighbour outside it."""
    pad = np.pad(mask, 1)
    inner = (pad[:-2, 1:-1, 1:-1] & pad[2:, 1:-1, 1:-1] & pad[1:-1, :-2, 1:-1] & pad[1:-1, 2:, 1:-1]
             & pad[1:-1, 1:-1, :-2] & pad[1:-1, 1:-1, 2:])
    return np.argwhere(mask & ~inner)


def max_diameter_mm(mask: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """Largest distance (mm) between two voxel centres of a 3D mask (its maximal Feret diameter), 0.1 mm;
    ``spacing``: mm between voxel centres along the mask's three axes. The distances are taken between the
    vertices of the boundary's convex hull (in the plane for a mask one voxel thick), so a large mask costs
    little time and memory."""
    spans = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != k))) for k in range(3)]
    if any(len(span) == 0 for span in spans):
        return 0.0
    box = tuple(slice(span[0], span[-1] + 1) for span in spans)  # the mask's bounding box: a lesion in a volume
    pts = _boundary_voxels(mask[box]) * np.asarray(spacing)
    if len(pts) > 64:
        from scipy.spatial import ConvexHull, QhullError

        axes = np.flatnonzero(np.ptp(pts, axis=0) > 0)  # the axes the mask extends along
        if len(axes) < 2:  # a line or a point
            return round(float(np.ptp(pts, axis=0).max()), 1)
        try:
            pts = pts[ConvexHull(pts[:, axes]).vertices]
        except QhullError:  # every point on one line of a plane: all of them are candidates
            pass
    best = 0.0
    rows = max(1, (1 << 20) // max(len(pts), 1))  # (rows, N, 3) float64 temporaries of at most 24 MB
    for a in range(0, len(pts), rows):
        d2 = ((pts[a:a + rows, None, :] - pts[None, :, :]) ** 2).sum(-1)
        best = max(best, float(d2.max()))
    return round(float(np.sqrt(best)), 1)
