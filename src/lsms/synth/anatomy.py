"""Procedural abdominal anatomy at portal-venous phase, one axial slice at a time.

A :class:`Patient` holds everything fixed for one synthetic person (body habitus, liver template
deformation, hepatic-vein angles, tissue HU, scanner); :func:`render_anatomy` draws the slice at a level
``z`` in [0, 1] (0 = liver dome, cranial; 1 = liver tip, caudal). Organs appear and shrink with ``z``.
Coordinates follow :mod:`lsms.synth.geometry` (radiological convention: patient's right on image left).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import distance_transform_edt

from lsms.synth.geometry import (
    Grid,
    angle_from_anterior,
    direction,
    ellipse_rho,
    segment_distance,
    smooth_field,
    smooth_min,
)

# Couinaud segment codes used in segment maps (0 = not liver).
SEGMENTS: tuple[str, ...] = ("I", "II", "III", "IVa", "IVb", "V", "VI", "VII", "VIII")
SEGMENT_CODE = {name: i + 1 for i, name in enumerate(SEGMENTS)}
SEGMENT_LOBE = {"I": "caudate", "II": "left", "III": "left", "IVa": "left", "IVb": "left",
                "V": "right", "VI": "right", "VII": "right", "VIII": "right"}

LIVER_ENDS = (-0.1, 1.12)  # levels where the liver has vanished above the dome and below the tip

# "Scanners": (intensity scale, offset HU, noise correlation length mm). Mild drift between them.
SCANNERS: tuple[tuple[float, float, float], ...] = ((1.0, 0.0, 0.8), (0.97, 6.0, 1.1), (1.03, -5.0, 0.6), (1.0, 9.0, 1.4))


@dataclass(frozen=True)
class Patient:
    """Per-patient anatomy and acquisition parameters (all lengths in mm, intensities in HU)."""

    index: int
    body_a: float
    body_b: float
    body_power: float
    body_cy: float
    fat_mm: float
    muscle_mm: float
    liver_scale: float
    left_lobe: float
    liver_dx: float
    liver_modes: np.ndarray  # (M, 5): amplitude, kx, ky, kz, phase of the template deformation
    ivc_x: float
    aorta_x: float
    phi_rhv: float  # right hepatic vein plane, degrees from anterior (negative = patient's right)
    phi_mhv: float  # middle hepatic vein plane (Cantlie line)
    phi_uf: float  # left hepatic vein / umbilical fissure plane
    portal_z: float  # level of the portal bifurcation: segments above are VII/VIII/IVa/II
    gallbladder: bool
    gallbladder_z: float
    gallbladder_len: float
    hu: dict[str, float]
    scanner: int
    noise_sigma: float
    spleen_scale: float


def draw_patient(index: int, rng: np.random.Generator, noise_hu: tuple[float, float]) -> Patient:
    """Draws one synthetic patient's parameters."""
    u = rng.uniform
    liver = u(92, 118)
    modes = np.stack([
        u(0.015, 0.045, 8),
        u(-0.035, 0.035, 8),
        u(-0.035, 0.035, 8),
        u(-3.0, 3.0, 8),
        u(0, 2 * np.pi, 8),
    ], axis=1).astype(np.float32)
    vessel = liver + u(35, 60)
    hu = {
        "fat": u(-115, -75), "muscle": u(42, 60), "liver": liver, "spleen": min(130.0, liver + u(4, 16)),
        "kidney_cortex": u(155, 200), "kidney_medulla": u(110, 140), "aorta": u(150, 185), "ivc": u(130, 165),
        "vessel": vessel, "cortical": u(700, 1100), "cancellous": u(200, 380), "gallbladder": u(0, 22),
        "fluid": u(0, 20), "bowel_wall": u(40, 70), "pancreas": u(85, 110), "lung": u(-880, -820),
        "csf": u(5, 15), "stool": u(10, 40),
    }
    return Patient(
        index=index,
        body_a=u(138, 165), body_b=u(100, 122), body_power=u(2.1, 2.6), body_cy=u(-6, 6),
        fat_mm=u(8, 28), muscle_mm=u(5, 9),
        liver_scale=u(0.9, 1.08), left_lobe=u(0.7, 1.2), liver_dx=u(-6, 6), liver_modes=modes,
        ivc_x=u(-28, -20), aorta_x=u(6, 14),
        phi_rhv=u(-68, -52), phi_mhv=u(-20, -8), phi_uf=u(16, 30), portal_z=u(0.38, 0.48),
        gallbladder=bool(rng.random() < 0.92), gallbladder_z=u(0.5, 0.62), gallbladder_len=u(0.22, 0.35),
        hu=hu, scanner=int(rng.integers(len(SCANNERS))), noise_sigma=u(*noise_hu), spleen_scale=u(0.85, 1.15),
    )


@dataclass
class Anatomy:
    """One rendered slice without lesions.

    Attributes:
        hu: (H, W) float32 Hounsfield units before blur, noise and scanner drift.
        liver: (H, W) bool, the liver including its intrahepatic vessels (lesions must lie inside it).
        segments: (H, W) uint8 Couinaud code (``SEGMENTS[code - 1]``), 0 outside the liver.
        gallbladder: (H, W) bool.
        ivc: (H, W) bool.
        ivc_center: (x, y) in mm.
    """

    hu: np.ndarray
    liver: np.ndarray
    segments: np.ndarray
    gallbladder: np.ndarray
    ivc: np.ndarray
    ivc_center: tuple[float, float]
    z: float


def _profile(z: float, zs: list[float], vs: list[float]) -> float:
    return float(np.interp(z, zs, vs))


def render_anatomy(p: Patient, z: float, grid: Grid, rng: np.random.Generator) -> Anatomy:
    """Renders the lesion-free slice of patient ``p`` at level ``z`` (0 cranial .. 1 caudal)."""
    X, Y = grid.x, grid.y
    n = grid.size
    hu = p.hu
    img = np.full((n, n), -1000.0, dtype=np.float32)

    # --- body wall: skin/subcutaneous fat, muscle, cavity (superellipses, flat back on the table)
    cy = p.body_cy
    back = cy + p.body_b * 0.93
    body = (ellipse_rho(X, Y, 0, cy, p.body_a, p.body_b, power=p.body_power) < 1) & (Y < back)
    t_f, t_m = p.fat_mm, p.muscle_mm
    inner_fat = (ellipse_rho(X, Y, 0, cy, p.body_a - t_f, p.body_b - t_f, power=p.body_power) < 1) & (Y < back - t_f)
    cavity_a, cavity_b = p.body_a - t_f - t_m, p.body_b - t_f - t_m
    cavity_rho = ellipse_rho(X, Y, 0, cy, cavity_a, cavity_b, power=p.body_power)
    cavity = (cavity_rho < 1) & (Y < back - t_f - t_m)
    # CT table under the patient
    table = (Y > back + 3) & (Y < back + 8) & (np.abs(X) < p.body_a * 1.05)
    img[table] = 250.0
    img[body] = hu["fat"]
    img[inner_fat & ~cavity] = hu["muscle"]
    # rectus abdominis (anterior, paired)
    front = cy - p.body_b + t_f
    for sx in (-1, 1):
        rect = ellipse_rho(X, Y, sx * 38, front + 6, 34, 7) < 1
        img[rect & inner_fat] = hu["muscle"]
    img[cavity] = hu["fat"] + 6.0  # intra-abdominal (mesenteric, retroperitoneal) fat

    # --- spine: vertebral body, canal, posterior elements; paraspinal muscles and psoas
    yv = back - t_f - 58.0
    para_excl: list[np.ndarray] = []
    for sx in (-1, 1):
        para_rho = ellipse_rho(X, Y, sx * 30, yv + 36, 24, 17, rot_deg=sx * 10)
        img[(para_rho < 1) & body] = hu["muscle"]
        para_excl.append(para_rho < 1.25)
        psoas_r = _profile(z, [0.45, 1.0], [0.0, 16.0])
        if psoas_r > 1:
            img[ellipse_rho(X, Y, sx * 28, yv - 2, psoas_r * 0.9, psoas_r) < 1] = hu["muscle"]
    vb = ellipse_rho(X, Y, 0, yv, 17, 15)
    img[vb < 1] = hu["cortical"]
    img[vb < 0.86] = hu["cancellous"]
    arch = ellipse_rho(X, Y, 0, yv + 26, 14, 13)
    canal = ellipse_rho(X, Y, 0, yv + 25, 8, 7.5)
    img[(arch < 1) & (vb >= 1)] = hu["cortical"] * 0.8
    img[canal < 1] = hu["csf"]
    spin = ellipse_rho(X, Y, 0, yv + 44, 4.5, 11) < 1
    img[spin] = hu["cortical"] * 0.8
    for sx in (-1, 1):
        img[ellipse_rho(X, Y, sx * 24, yv + 20, 13, 4, rot_deg=sx * 15) < 1] = hu["cortical"] * 0.8

    # --- ribs: cross-sections within the wall, many cranially, a few laterally caudally
    n_ribs = int(round(_profile(z, [0.0, 0.6, 1.0], [7, 4, 2])))
    rib_angles = np.linspace(-150, -40, n_ribs) if n_ribs else np.zeros(0)
    for side in (-1, 1):
        for ang in rib_angles:
            phi = side * (ang + rng.uniform(-6, 6))
            dx, dy = direction(phi)
            # place at the wall's muscle layer along the ray
            r_wall = 1.0 / ((abs(dx) / (p.body_a - t_f - t_m / 2)) ** p.body_power
                            + (abs(dy) / (p.body_b - t_f - t_m / 2)) ** p.body_power) ** (1 / p.body_power)
            rx, ry = dx * r_wall, cy + dy * r_wall
            if ry > back - t_f - 10:
                continue
            rho = ellipse_rho(X, Y, rx, ry, 5.5, 8.0, rot_deg=phi)
            img[rho < 1] = hu["cortical"]
            img[rho < 0.6] = hu["cancellous"]

    organ_excl = np.logical_or.reduce(para_excl)  # what the liver may not occupy

    # --- lung bases (posterior costophrenic recesses) at the dome
    lung_s = _profile(z, [0.0, 0.18], [1.0, 0.0])
    if lung_s > 0:
        for sx in (-1, 1):
            lung = (ellipse_rho(X, Y, sx * 72, yv + 8, 58 * lung_s, 38 * lung_s) < 1) & cavity
            img[lung] = hu["lung"]
            organ_excl |= lung

    # --- great vessels
    ivc_c = (p.ivc_x, yv - 24.0)
    ivc_rho = ellipse_rho(X, Y, ivc_c[0], ivc_c[1], 13, 10, rot_deg=-20)
    ivc = ivc_rho < 1
    ao_r = 11.5
    aorta_rho = ellipse_rho(X, Y, p.aorta_x, yv - 16 - ao_r - 2, ao_r, ao_r)
    img[aorta_rho < 1] = hu["aorta"]
    organ_excl |= aorta_rho < 1.35
    organ_excl |= ivc_rho < 1.15
    organ_excl |= vb < 1.2
    for sx in (-1, 1):
        organ_excl |= ellipse_rho(X, Y, sx * 28, yv - 2, 20, 20) < 1

    # --- kidneys (ellipsoid cross-sections), cortex / medulla / sinus fat
    for sx, zc in ((1, 0.62), (-1, 0.72)):
        ks = 1.0 - ((z - zc) / 0.34) ** 2
        if ks <= 0:
            continue
        ks = float(np.sqrt(ks))
        kx, ky = sx * 64.0, yv + 2.0
        k_rho = ellipse_rho(X, Y, kx, ky, 30 * ks, 21 * ks, rot_deg=sx * 50 + 90)
        kid = k_rho < 1
        img[kid] = hu["kidney_cortex"]
        img[(k_rho < 0.72)] = hu["kidney_medulla"]
        sinus = ellipse_rho(X, Y, kx - sx * 14 * ks, ky - 6 * ks, 10 * ks, 6 * ks) < 1
        img[sinus & kid] = hu["fat"] + 20
        organ_excl |= k_rho < 1.2

    # --- spleen (left posterolateral)
    ss = _profile(z, [0.0, 0.15, 0.45, 0.7], [0.6, 1.0, 0.8, 0.0]) * p.spleen_scale
    if ss > 0:
        s_rho = ellipse_rho(X, Y, cavity_a * 0.68, yv - 8, 56 * ss, 24 * ss, rot_deg=-55)
        spleen = (s_rho < 1) & (cavity_rho < 0.97)
        img[spleen] = hu["spleen"]
        organ_excl |= s_rho < 1.15

    # --- stomach: wall, fluid or food, gas anterior (supine air-fluid level)
    st = _profile(z, [0.0, 0.2, 0.55, 0.7], [0.7, 1.0, 0.7, 0.0])
    if st > 0:
        sx0, sy0 = 50.0 + 8 * p.left_lobe, cy - 18.0
        s_rho = ellipse_rho(X, Y, sx0, sy0, 46 * st, 32 * st, rot_deg=-25)
        stomach = (s_rho < 1) & (cavity_rho < 0.95)
        lumen = stomach & (s_rho < 1 - 4.0 / (32 * st))
        img[stomach] = hu["bowel_wall"]
        content = hu["fluid"] + 18.0 * float(rng.random() < 0.4)
        img[lumen] = content
        level = sy0 - 32 * st * rng.uniform(0.1, 0.6)
        img[lumen & (Y < level)] = -1000.0
        organ_excl |= s_rho < 1.12

    # --- pancreas body/tail at mid levels
    pz = _profile(z, [0.4, 0.5, 0.7, 0.8], [0.0, 1.0, 1.0, 0.0])
    if pz > 0:
        pan_d, _ = segment_distance(X, Y, (p.aorta_x - 20, yv - 50), (p.aorta_x + 60, yv - 20))
        pan = (pan_d < 11 * pz) & cavity & ~organ_excl
        img[pan] = hu["pancreas"]
        organ_excl |= pan_d < 11 * pz + 3

    # --- gallbladder along the middle hepatic vein (Cantlie) line, in the liver's visceral surface
    gb_s = 0.0
    if p.gallbladder:
        t = (z - p.gallbladder_z) / p.gallbladder_len
        gb_s = float(np.sqrt(max(0.0, 1.0 - (2 * t - 1) ** 2))) if 0 <= t <= 1 else 0.0
    gallbladder = np.zeros((n, n), dtype=bool)
    dgx, dgy = direction(p.phi_mhv)
    gb_len = 60.0 + 10 * (z - 0.5)
    if gb_s > 0.15:
        gcx, gcy = ivc_c[0] + dgx * gb_len, ivc_c[1] + dgy * gb_len
        g_rho = ellipse_rho(X, Y, gcx, gcy, 22 * gb_s, 14 * gb_s, rot_deg=p.phi_mhv - 90)
        gallbladder = (g_rho < 1) & cavity
        img[gallbladder & (g_rho > 1 - 2.0 / (14 * gb_s))] = hu["bowel_wall"]
        img[gallbladder & (g_rho <= 1 - 2.0 / (14 * gb_s))] = hu["gallbladder"]
        organ_excl |= g_rho < 1.1

    # --- liver: smooth union of right lobe, left lobe and caudate, deformed per patient, clipped
    s = p.liver_scale
    # beyond the dome (z < 0) and the tip (z > 1), seen only in volumes, the liver ends within ~0.1
    sr = _profile(z, [LIVER_ENDS[0], 0.0, 0.3, 0.6, 1.0, LIVER_ENDS[1]], [0.0, 0.82, 1.0, 0.85, 0.42, 0.0]) * s
    sl = _profile(z, [LIVER_ENDS[0], 0.0, 0.35, 0.7, 0.85], [0.0, 0.9, 1.0, 0.35, 0.0]) * s
    sc = _profile(z, [0.22, 0.32, 0.6, 0.7], [0.0, 1.0, 1.0, 0.0])
    right = ellipse_rho(X, Y, -62 + p.liver_dx - 18 * z, cy - 4 - 28 * z, 78 * sr, 96 * sr, rot_deg=-10)
    left = ellipse_rho(X, Y, 12 + 22 * p.left_lobe, cy - p.body_b * 0.52 + 6, 62 * p.left_lobe * sl, 30 * sl, rot_deg=-8)
    caud = ellipse_rho(X, Y, ivc_c[0] + 17, ivc_c[1] - 14, 20 * sc, 14 * sc)
    rho = smooth_min([right, left, caud], k=0.09)
    m = p.liver_modes
    deform = np.zeros((n, n), dtype=np.float32)
    for a, kx, ky, kz, ph in m:
        deform += a * np.cos(kx * X + ky * Y + kz * z + ph)
    liver = (rho - deform < 1) & (cavity_rho < 0.985) & ~organ_excl & (Y < back - t_f - t_m - 3)
    img[liver] = hu["liver"]

    # --- intrahepatic vessels: hepatic veins (cranial), portal bifurcation (portal level), branch dots
    vessels = np.zeros((n, n), dtype=bool)
    hv = _profile(z, [0.0, 0.3, 0.4], [1.0, 1.0, 0.0])
    if hv > 0:
        for phi, length, w0 in ((p.phi_rhv, 95, 12.0), (p.phi_mhv, 80, 11.0), (p.phi_uf, 65, 10.0)):
            dx, dy = direction(phi + rng.uniform(-3, 3))
            d, t = segment_distance(X, Y, ivc_c, (ivc_c[0] + dx * length * hv, ivc_c[1] + dy * length * hv))
            vessels |= d < (w0 * (1 - 0.65 * t)) / 2
    pv = 1.0 - abs(z - p.portal_z) / 0.12
    if pv > 0:
        hilum = (ivc_c[0] + 12, ivc_c[1] - 26)
        rdx, rdy = direction(-100 + rng.uniform(-8, 8))
        ldx, ldy = direction(55 + rng.uniform(-8, 8))
        r_end = (hilum[0] + rdx * 55, hilum[1] + rdy * 55)
        l_end = (hilum[0] + ldx * 35, hilum[1] + ldy * 35)
        udx, udy = direction(p.phi_uf - 15)
        u_end = (l_end[0] + udx * 35, l_end[1] + udy * 35)
        for a, b, w in ((hilum, r_end, 11.0), (hilum, l_end, 9.0), (l_end, u_end, 7.0)):
            d, t = segment_distance(X, Y, a, b)
            vessels |= d < w * pv * (1 - 0.4 * t) / 2
    # scattered branch cross-sections and short branches (vectorised over small windows)
    liver_idx = np.flatnonzero(liver)
    if liver_idx.size:
        n_dots = int(rng.integers(8, 16))
        picks = liver_idx[rng.integers(0, liver_idx.size, n_dots)]
        for k in picks:
            r, c = divmod(int(k), n)
            x0, y0 = grid.to_mm(r, c)
            rad = rng.uniform(1.8, 3.5)
            ang = rng.uniform(0, 360)
            length = rng.uniform(4, 14) if rng.random() < 0.3 else 0.0
            bx, by = direction(ang)
            win, dxl, dyl = grid.local(x0, y0, length + rad)
            d, _ = segment_distance(dxl, dyl, (0.0, 0.0), (bx * length, by * length))
            vessels[win] |= d < rad
    vessels &= liver
    img[vessels] = hu["vessel"]
    img[ivc] = hu["ivc"]

    # --- bowel loops in the free cavity (caudal, anterior); colon with mottled stool
    free = cavity & ~liver & ~organ_excl & ~ivc & (cavity_rho < 0.93) & (img < 0)
    n_loops = int(round(_profile(z, [0.3, 0.6, 1.0], [0, 8, 12])))
    if n_loops and free.any():
        edt = distance_transform_edt(free, sampling=grid.spacing)
        cand = np.flatnonzero(edt > 7.0)
        if cand.size:
            cand = cand[rng.permutation(cand.size)[:200]]
            placed: list[tuple[float, float, float]] = []
            for k in cand:
                if len(placed) >= n_loops:
                    break
                r, c = divmod(int(k), n)
                x0, y0 = grid.to_mm(r, c)
                rad = min(float(edt.flat[k]) - 1.0, rng.uniform(7, 17))
                if any(np.hypot(x0 - a, y0 - b) < rad + rr + 1.5 for a, b, rr in placed):
                    continue
                placed.append((x0, y0, rad))
                win, dxl, dyl = grid.local(x0, y0, rad)
                rr_ = ellipse_rho(dxl, dyl, 0.0, 0.0, rad, rad * rng.uniform(0.6, 1.0), rot_deg=rng.uniform(0, 180))
                sub = img[win]
                sub[rr_ < 1] = hu["bowel_wall"]
                lumen = rr_ < 1 - 2.5 / rad
                kind = rng.random()
                if kind < 0.3:
                    sub[lumen] = -1000.0
                elif kind < 0.6:
                    sub[lumen] = hu["fluid"]
                elif kind < 0.8:
                    sub[lumen] = hu["fluid"]
                    sub[lumen & (dyl < rng.uniform(-0.5, 0.3) * rad)] = -1000.0
                else:
                    bubbles = smooth_field(rng, sub.shape, max(3, int(rad / 3))) > 0.6
                    sub[lumen] = hu["stool"]
                    sub[lumen & bubbles] = -900.0

    # --- Couinaud segments from landmarks (see couinaud docs in docs/refliver-synth.md)
    segments = couinaud_map(p, z, X, Y, liver, ivc_c, caud < 1)
    return Anatomy(hu=img, liver=liver, segments=segments, gallbladder=gallbladder, ivc=ivc,
                   ivc_center=ivc_c, z=z)


def couinaud_map(p: Patient, z: float, X: np.ndarray, Y: np.ndarray, liver: np.ndarray,
                 ivc_c: tuple[float, float], caudate: np.ndarray) -> np.ndarray:
    """Approximate Couinaud segments of the liver pixels of one slice.

    The right, middle and left hepatic vein / umbilical fissure planes are vertical planes through the IVC,
    i.e. rays from the IVC centre at the patient's angles ``phi_rhv < phi_mhv < phi_uf`` (0 = anterior,
    negative = patient's right). They split the liver into posterior-right, anterior-right, medial-left and
    lateral-left sectors; the portal plane (level ``portal_z``) splits each into cranial (VII, VIII, IVa, II)
    and caudal (VI, V, IVb, III) segments. The caudate (I) is the caudate lobe blob beside the IVC.
    """
    phi = angle_from_anterior(X - ivc_c[0], Y - ivc_c[1])
    cranial = z < p.portal_z
    code = SEGMENT_CODE
    seg = np.where(phi < p.phi_rhv, code["VII" if cranial else "VI"],
                   np.where(phi < p.phi_mhv, code["VIII" if cranial else "V"],
                            np.where(phi < p.phi_uf, code["IVa" if cranial else "IVb"],
                                     code["II" if cranial else "III"])))
    seg = np.where(caudate | (phi > 120), code["I"], seg)
    return np.where(liver, seg, 0).astype(np.uint8)
