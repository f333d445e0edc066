"""Procedural face drawing engine: synthetic stand-ins for Adience face crops.

Real Adience photos cannot be used here, so the dataset draws cartoon faces whose pixels carry a
learnable but noisy age-group and gender signal (head proportions, hair, wrinkles, beards, lips)
under realistic nuisance (pose, lighting, per-album background and colour cast, sensor noise).
Randomness is layered like the real data: per Flickr album (user), per face identity, per photo,
so that user-disjoint splits behave like the real benchmark.
"""

from __future__ import annotations

import colorsys
import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw

__all__ = ["render_face"]

FArr = NDArray[np.float64]
Color = tuple[int, int, int]

# Light -> dark skin tones; identities interpolate along this ramp.
_SKIN = np.array(
    [
        (250, 222, 204),
        (238, 198, 170),
        (216, 170, 132),
        (180, 130, 94),
        (132, 90, 63),
        (88, 60, 44),
    ],
    dtype=np.float64,
)
# Hair colours with sampling weights for light-skinned and dark-skinned identities.
_HAIR = np.array(
    [(28, 24, 22), (58, 40, 29), (98, 67, 44), (142, 106, 70), (206, 176, 118), (146, 68, 36)],
    dtype=np.float64,
)
_HAIR_W_LIGHT = np.array([0.10, 0.25, 0.25, 0.15, 0.17, 0.08])
_HAIR_W_DARK = np.array([0.62, 0.30, 0.06, 0.02, 0.0, 0.0])
_EYES = np.array(
    [(92, 56, 32), (48, 32, 22), (78, 118, 168), (88, 120, 72), (122, 96, 52), (118, 128, 140)],
    dtype=np.float64,
)
_EYES_W_LIGHT = np.array([0.25, 0.15, 0.28, 0.12, 0.12, 0.08])
_EYES_W_DARK = np.array([0.45, 0.50, 0.0, 0.0, 0.05, 0.0])
_GREY = np.array([162.0, 162.0, 166.0])
_WHITE = np.array([236.0, 235.0, 232.0])
_DARK = np.array([40.0, 22.0, 18.0])


def _rng(*parts: object) -> np.random.Generator:
    """Seed from a stable digest: Python's hash() is salted per process."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def _mix(a: FArr, b: FArr, t: float) -> FArr:
    return a * (1.0 - t) + b * t


def _c8(v: float) -> int:
    return 0 if v < 0.0 else 255 if v > 255.0 else int(v + 0.5)


def _col(x: FArr) -> Color:
    r, g, b = x.tolist()
    return (_c8(r), _c8(g), _c8(b))


def _hsv(h: float, s: float, v: float) -> FArr:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float64) * 255.0


def _smooth(x: float) -> float:
    t = min(1.0, max(0.0, x))
    return t * t * (3.0 - 2.0 * t)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------------------------
# Three levels of randomness
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _User:
    """Album-level look: every photo in one Flickr album shares camera, room and light."""

    bg_kind: int  # 0 plain backdrop, 1 room with fixed furniture, 2 bokeh blobs
    bg_from: FArr
    bg_to: FArr
    bg_dir: float
    palette: tuple[FArr, ...]
    scene: tuple[tuple[float, float, float, float, int], ...]
    brightness: float
    light_dir: float
    light_strength: float
    cast: FArr
    noise: float
    eff_res: float
    skin_bias: float


@dataclass(frozen=True)
class _Identity:
    """Traits of one person that persist across their photos."""

    gender: str
    age: float
    age_factor: float
    skin: FArr
    hair: FArr
    eye: FArr
    grey_onset: float
    width_k: float
    length_k: float
    eye_k: float
    eye_gap_k: float
    nose_k: float
    mouth_k: float
    jaw_k: float
    hair_u: float
    hair_volume: float
    fringe: bool
    part: float
    beard_u: float
    bald_u: float
    bald_onset: float
    earring_u: float
    earring_gold: bool
    lipstick_u: float
    glasses_u: float
    glasses_color: FArr
    wrinkle_k: float
    brow_k: float


@dataclass(frozen=True)
class _Shot:
    """Per-photo nuisance: pose, light, expression, clutter."""

    rot: float
    scale: float
    shift: FArr
    yaw: float
    gaze: FArr
    light_dir: float
    light_strength: float
    brightness: float
    smile: float
    mouth_open: float
    blink: bool
    noise: float
    clothes: FArr
    earring_on: bool
    shapes: tuple[tuple[int, float, float, float, float, float, int], ...]
    occluder: tuple[float, float, float, float, int] | None
    noise_seed: int


@lru_cache(maxsize=512)
def _make_user(seed: int, user_id: str) -> _User:
    r = _rng(seed, "user", user_id)
    base_h = float(r.uniform())
    sat = float(r.uniform(0.05, 0.55))
    val = float(r.uniform(0.25, 0.95))
    ends = [
        _hsv(
            base_h + float(r.normal(0, 0.06)),
            sat * float(r.uniform(0.6, 1.2)),
            min(1.0, val * float(r.uniform(0.6, 1.3))),
        )
        for _ in range(2)
    ]
    palette = tuple(
        _hsv(
            base_h + float(r.uniform(-0.5, 0.5)),
            float(r.uniform(0.1, 0.8)),
            float(r.uniform(0.15, 1.0)),
        )
        for _ in range(5)
    )
    scene: list[tuple[float, float, float, float, int]] = []
    for _ in range(int(r.integers(0, 4))):
        x0, y0 = float(r.uniform(-0.1, 0.9)), float(r.uniform(-0.1, 0.9))
        scene.append(
            (
                x0,
                y0,
                x0 + float(r.uniform(0.1, 0.6)),
                y0 + float(r.uniform(0.1, 0.6)),
                int(r.integers(0, 5)),
            )
        )
    return _User(
        bg_kind=int(r.integers(0, 3)),
        bg_from=ends[0],
        bg_to=ends[1],
        bg_dir=float(r.uniform(0, 2 * math.pi)),
        palette=palette,
        scene=tuple(scene),
        brightness=float(r.uniform(0.72, 1.18)),
        light_dir=float(r.uniform(0, 2 * math.pi)),
        light_strength=float(r.uniform(0.0, 0.45)),
        cast=np.exp(r.normal(0.0, 0.07, 3)),
        noise=float(r.uniform(1.0, 9.0)),
        eff_res=float(np.exp(r.uniform(math.log(90), math.log(900)))),
        skin_bias=float(r.beta(1.6, 2.2)),
    )


@lru_cache(maxsize=2048)
def _make_identity(
    seed: int, user_id: str, face_id: int, age: float | None, gender: str | None, skin_bias: float
) -> _Identity:
    r = _rng(seed, "face", user_id, face_id)
    # Fixed draw order: explicit age/gender must not shift the other traits.
    g_u, a_u = float(r.uniform()), float(r.uniform(0.0, 80.0))
    gen = gender if gender is not None else ("m" if g_u < 0.5 else "f")
    skin_t = float(np.clip(0.6 * skin_bias + 0.4 * r.uniform() + r.normal(0, 0.08), 0, 1))
    pos = skin_t * (len(_SKIN) - 1)
    lo = min(int(pos), len(_SKIN) - 2)
    skin = _mix(_SKIN[lo], _SKIN[lo + 1], pos - lo) * np.exp(r.normal(0, 0.025, 3))
    dark = _smooth((skin_t - 0.35) / 0.4)
    hw = _mix(_HAIR_W_LIGHT, _HAIR_W_DARK, dark)
    hair = _HAIR[int(r.choice(len(_HAIR), p=hw / hw.sum()))] * np.exp(
        r.normal(0, 0.1) + r.normal(0, 0.03, 3)
    )
    ew = _mix(_EYES_W_LIGHT, _EYES_W_DARK, dark)
    eye = _EYES[int(r.choice(len(_EYES), p=ew / ew.sum()))]
    return _Identity(
        gender=gen,
        age=float(age) if age is not None else a_u,
        age_factor=float(np.exp(r.normal(0.0, 0.12))),
        skin=skin,
        hair=hair,
        eye=eye,
        grey_onset=float(r.normal(50.0, 7.0)),
        width_k=float(np.exp(r.normal(0, 0.035))),
        length_k=float(np.exp(r.normal(0, 0.035))),
        eye_k=float(np.exp(r.normal(0, 0.08))),
        eye_gap_k=float(np.exp(r.normal(0, 0.05))),
        nose_k=float(np.exp(r.normal(0, 0.1))),
        mouth_k=float(np.exp(r.normal(0, 0.08))),
        jaw_k=float(r.normal(0, 0.5)),
        hair_u=float(r.uniform()),
        hair_volume=float(r.uniform(0.005, 0.05)),
        fringe=bool(r.uniform() < 0.35),
        part=float(r.uniform(-1, 1)),
        beard_u=float(r.uniform()),
        bald_u=float(r.uniform()),
        bald_onset=float(r.uniform(22, 55)),
        earring_u=float(r.uniform()),
        earring_gold=bool(r.uniform() < 0.6),
        lipstick_u=float(r.uniform()),
        glasses_u=float(r.uniform()),
        glasses_color=_hsv(
            float(r.uniform()), float(r.uniform(0, 0.6)), float(r.uniform(0.05, 0.6))
        ),
        wrinkle_k=float(np.exp(r.normal(0, 0.25))),
        brow_k=float(np.exp(r.normal(0, 0.2))),
    )


def _make_shot(seed: int, user_id: str, face_id: int, image_name: str, user: _User) -> _Shot:
    r = _rng(seed, "image", user_id, face_id, image_name)
    shapes: list[tuple[int, float, float, float, float, float, int]] = []
    for _ in range(int(r.integers(1, 5))):
        shapes.append(
            (
                int(r.integers(0, 3)),
                float(r.uniform(-0.1, 1.1)),
                float(r.uniform(-0.1, 1.1)),
                float(r.uniform(0.05, 0.35)),
                float(r.uniform(0.05, 0.35)),
                float(r.uniform(0, 180)),
                int(r.integers(0, 5)),
            )
        )
    occ_u = float(r.uniform())
    side = float(r.uniform(0, 2 * math.pi))
    occluder = None
    if occ_u < 0.12:
        occluder = (
            0.5 + 0.62 * math.cos(side),
            0.5 + 0.62 * math.sin(side),
            float(r.uniform(0.12, 0.3)),
            float(r.uniform(0.12, 0.3)),
            int(r.integers(0, 5)),
        )
    smile_u = float(r.uniform())
    return _Shot(
        rot=math.radians(float(np.clip(r.normal(0, 6.5), -15, 15))),
        scale=float(np.clip(r.normal(1.0, 0.06), 0.85, 1.15)),
        shift=np.clip(r.normal(0, 0.03, 2), -0.07, 0.07),
        yaw=float(np.clip(r.normal(0, 0.35), -1, 1)),
        gaze=r.normal(0, 0.25, 2),
        light_dir=user.light_dir + float(r.normal(0, 0.9)),
        light_strength=user.light_strength * float(r.uniform(0.4, 1.4)),
        brightness=user.brightness * float(np.exp(r.normal(0, 0.1))),
        smile=float(r.uniform(0.3, 1.0)) if smile_u < 0.6 else 0.0,
        mouth_open=float(r.uniform(0.2, 1.0)) if r.uniform() < 0.3 else 0.0,
        blink=bool(r.uniform() < 0.03),
        noise=user.noise * float(r.uniform(0.6, 1.4)),
        clothes=_hsv(float(r.uniform()), float(r.uniform(0, 0.8)), float(r.uniform(0.1, 0.95))),
        earring_on=bool(r.uniform() < 0.85),
        shapes=tuple(shapes),
        occluder=occluder,
        noise_seed=int(r.integers(0, 2**31 - 1)),
    )


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


class _Canvas:
    """Draws in face units (image width = 1, origin at centre) through the photo's pose."""

    def __init__(self, img: Image.Image, rot: float, scale: float, shift: FArr) -> None:
        self.draw = ImageDraw.Draw(img)
        self.px = float(img.size[0])
        c, s = math.cos(rot), math.sin(rot)
        self.m = np.array([[c, -s], [s, c]]) * scale * self.px
        self.off = (np.array([0.5, 0.5]) + shift) * self.px
        self.lw = scale * self.px

    def _tr(self, pts: FArr) -> list[float]:
        out: list[float] = (pts @ self.m.T + self.off).ravel().tolist()
        return out

    def poly(self, pts: FArr, color: FArr) -> None:
        self.draw.polygon(self._tr(pts), fill=_col(color))

    def line(self, pts: FArr, color: FArr, width: float) -> None:
        w = max(1, round(width * self.lw))
        self.draw.line(self._tr(pts), fill=_col(color), width=w, joint="curve")

    def ellipse(
        self, cx: float, cy: float, rx: float, ry: float, color: FArr, angle: float = 0.0
    ) -> None:
        self.poly(_ellipse_pts(cx, cy, rx, ry, angle, self.n(max(rx, ry))), color)

    def n(self, r: float) -> int:
        return int(np.clip(r * self.lw * 0.9, 10, 72))


@lru_cache(maxsize=256)
def _unit_circle(n: int) -> FArr:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _ellipse_pts(cx: float, cy: float, rx: float, ry: float, angle: float, n: int) -> FArr:
    u: FArr = _unit_circle(n) * np.array([rx, ry])
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        u = u @ np.array([[c, s], [-s, c]])
    out: FArr = u + np.array([cx, cy])
    return out


@lru_cache(maxsize=64)
def _unit_grid(n: int) -> FArr:
    return np.linspace(0.0, 1.0, n)


def _arc(cx: float, cy: float, rx: float, ry: float, t0: float, t1: float, n: int) -> FArr:
    t = t0 + (t1 - t0) * _unit_grid(n)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


@lru_cache(maxsize=8)
def _bezier_basis(n: int) -> FArr:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return np.hstack([(1 - t) ** 2, 2 * (1 - t) * t, t**2])


def _quad(
    p0: tuple[float, float], p1: tuple[float, float], p2: tuple[float, float], n: int = 9
) -> FArr:
    """Quadratic Bezier: cheap smooth curves for brows, lips and wrinkles."""
    out: FArr = _bezier_basis(n) @ np.array([p0, p1, p2], dtype=np.float64)
    return out


def _render_background(img: Image.Image, user: _User, shot: _Shot) -> None:
    size = img.size[0]
    d = ImageDraw.Draw(img)
    # Linear gradient as thin bands: far cheaper than resizing a gradient image at 816 px.
    n = max(4, min(24, size // 6))
    u = np.array([math.cos(user.bg_dir), math.sin(user.bg_dir)])
    v = np.array([-u[1], u[0]])
    t = np.linspace(-0.75, 0.75, n + 1)
    t1 = t[1:] + 0.2 / n  # slight overlap hides seams
    corners = np.stack(
        [t[:-1, None] * u - v, t1[:, None] * u - v, t1[:, None] * u + v, t[:-1, None] * u + v],
        axis=1,
    )
    bands = ((corners + 0.5) * size).reshape(n, 8).tolist()
    w = np.clip((np.arange(n) + 0.5) / n * 1.5 - 0.25, 0.0, 1.0)[:, None]
    cols = np.clip(np.round(user.bg_from * (1 - w) + user.bg_to * w), 0, 255).astype(int).tolist()
    for band, col in zip(bands, cols, strict=True):
        d.polygon(band, fill=tuple(col))
    if user.bg_kind == 1:  # indoor album: fixed furniture / windows behind everyone
        for x0, y0, x1, y1, ci in user.scene:
            d.rectangle((x0 * size, y0 * size, x1 * size, y1 * size), fill=_col(user.palette[ci]))
    for kind, cx, cy, rx, ry, ang, ci in shot.shapes:
        # Bokeh-style albums get blobs only; others mix blobs, boxes and triangles.
        n = 24 if user.bg_kind == 2 or kind == 0 else (4 if kind == 1 else 3)
        pts = _ellipse_pts(cx, cy, rx, ry, math.radians(ang), n) * size
        d.polygon(pts.ravel().tolist(), fill=_col(user.palette[ci]))


@dataclass(frozen=True)
class _Face:
    """Traits derived from identity, age and photo; every proportion is continuous in age."""

    male: bool
    age: float
    g: float  # growth: 0 newborn -> ~1 adult
    c: float  # how strongly sex differences show (0 in children)
    sgn: float  # +1 male, -1 female
    wr: float  # wrinkle strength
    sag: float
    grey: float
    hair_amt: float
    recede: float
    beard: float
    full_beard: bool
    style: int  # 0 short, 1 chin length, 2 long
    vol: float
    skin: FArr
    skin_dark: FArr
    hair: FArr
    fx: float  # sideways feature shift from yaw
    yaw: float
    head_len: float
    y_top: float
    y_mid: float
    y_chin: float
    hw: float
    hw_low: float
    chin_w: float
    jaw_p: float
    y_eye: float
    ex: float
    ew: float
    eh: float
    y_brow: float
    y_nose: float
    nw: float
    y_mouth: float
    mw: float


def _derive(ident: _Identity, shot: _Shot) -> _Face:
    male = ident.gender == "m"
    a = max(0.0, ident.age * ident.age_factor)
    g = 1.0 - math.exp(-a / 6.0)
    c = _smooth((a - 10.0) / 9.0)
    sgn = 1.0 if male else -1.0
    sag = _smooth((a - 42.0) / 40.0)
    grey = _sigmoid((a - ident.grey_onset) / 6.0)
    white = _sigmoid((a - ident.grey_onset - 18.0) / 6.0)
    hair_amt = min(1.0, 0.22 + a / 2.2)
    recede = _smooth((a - ident.bald_onset) / 25.0) if male and ident.bald_u < 0.55 else 0.0
    beard = 0.0
    if male and a >= 16.0 and ident.beard_u >= 0.5:
        beard = _smooth((a - 16.0) / 7.0)
    long_u = 0.25 - 0.17 * c if male else 0.35 + 0.42 * c
    style = 0 if ident.hair_u >= long_u else (2 if ident.hair_u < long_u * 0.6 else 1)
    if hair_amt < 0.7:
        style = 0
    hair = _mix(_mix(ident.hair, _GREY, 0.85 * grey), _WHITE, 0.9 * white)
    hair = _mix(hair, np.array([205.0, 176.0, 128.0]), 0.25 * (1 - g))  # fine baby hair
    hair = _mix(ident.skin, hair, hair_amt**1.5)  # sparse newborn hair shows skin through

    head_len = (0.72 + 0.10 * g) * ident.length_k * (1.0 + 0.02 * sgn * c)
    y_top = -0.41
    hw = 0.30 * (1.0 + 0.10 * (1.0 - g)) * ident.width_k * (1.0 + 0.02 * sgn * c)
    y_chin = y_top + head_len + 0.015 * sag
    y_eye = y_top + head_len * (0.47 + 0.11 * (1.0 - g))
    jaw = 0.05 * ident.jaw_k
    ew = 0.054 * (1.0 + 0.28 * (1.0 - g)) * ident.eye_k * (1.0 - 0.05 * sgn * c)
    eh = ew * (0.54 + 0.16 * (1.0 - g)) * (1.0 - 0.2 * sag) * (1.0 - 0.15 * shot.smile)
    y_nose = y_eye + (y_chin - y_eye) * (0.37 + 0.12 * g) * ident.nose_k**0.3
    return _Face(
        male=male,
        age=a,
        g=g,
        c=c,
        sgn=sgn,
        wr=min(1.2, max(0.0, (a - 25.0) / 50.0) ** 1.2 * ident.wrinkle_k),
        sag=sag,
        grey=grey,
        hair_amt=hair_amt,
        recede=recede,
        beard=beard,
        full_beard=ident.beard_u > 0.8,
        style=style,
        vol=ident.hair_volume * hair_amt,
        skin=ident.skin,
        skin_dark=ident.skin * 0.78,
        hair=hair,
        fx=0.035 * shot.yaw,
        yaw=shot.yaw,
        head_len=head_len,
        y_top=y_top,
        y_mid=y_top + head_len * (0.45 + 0.08 * (1.0 - g)),
        y_chin=y_chin,
        hw=hw,
        hw_low=hw * (1.0 - (0.02 + 0.05 * sgn) * c * g + jaw * 0.4 + 0.03 * sag),
        chin_w=max(0.0, (0.035 + (0.022 + 0.03 * sgn) * c * g + jaw * 0.3) * hw / 0.3),
        jaw_p=2.0 + (0.25 + 0.55 * sgn * c) * g + jaw,
        y_eye=y_eye,
        ex=hw * 0.40 * ident.eye_gap_k,
        ew=ew,
        eh=eh,
        y_brow=y_eye - eh - 0.035 - 0.012 * g + 0.006 * sgn * c,
        y_nose=y_nose,
        nw=0.038 * (1.0 + 0.15 * (1.0 - g)) * (1.0 + 0.07 * sgn * c) * ident.nose_k**0.5,
        y_mouth=y_nose + (y_chin - y_nose) * (0.38 + 0.05 * sag),
        mw=0.07 * (0.82 + 0.18 * g) * ident.mouth_k * (1.0 + 0.28 * shot.smile),
    )


def _outline(f: _Face, n: int) -> FArr:
    """Head silhouette: elliptic cranium over a superelliptic jaw (squarer = more male)."""
    t = np.linspace(math.pi, 2 * math.pi, n)
    top = np.stack([f.hw * np.cos(t), f.y_mid + (f.y_mid - f.y_top) * np.sin(t)], axis=1)
    u = np.linspace(0.0, 1.0, n)
    # Taper from cranium width to jaw width without a notch at the cheekbones.
    base = f.hw_low + (f.hw - f.hw_low) * (1.0 - np.clip(u / 0.4, 0.0, 1.0) ** 2)
    xs = f.chin_w + (base - f.chin_w) * (1.0 - u**f.jaw_p) ** (1.0 / f.jaw_p)
    ys = f.y_mid + (f.y_chin - f.y_mid) * u
    right = np.stack([xs, ys], axis=1)
    left = right[::-1] * np.array([-1.0, 1.0])
    chin = np.array([[0.0, f.y_chin + f.chin_w * 0.35]])  # round off the chin
    return np.concatenate([top, right, chin, left])


def _draw_body(cv: _Canvas, f: _Face, shot: _Shot) -> None:
    neck_w = f.hw * (0.45 + 0.05 * f.sgn * f.c)
    cv.poly(
        np.array(
            [[-neck_w, f.y_mid], [neck_w, f.y_mid], [neck_w * 1.1, 0.62], [-neck_w * 1.1, 0.62]]
        ),
        f.skin_dark,
    )
    sh_y = f.y_chin + 0.09
    shoulders = _arc(0.0, sh_y + 0.35, 0.62 + 0.06 * f.sgn * f.c, 0.35, math.pi, 2 * math.pi, 24)
    cv.poly(np.concatenate([shoulders, np.array([[0.7, 0.9], [-0.7, 0.9]])]), shot.clothes)
    cv.poly(
        _arc(0.0, sh_y - 0.005, neck_w * 1.05, 0.04 + 0.02 * (not f.male), 0, math.pi, 12),
        f.skin_dark * 0.97,
    )


def _draw_back_hair(cv: _Canvas, f: _Face) -> None:
    if f.style == 0:
        return
    bot = f.y_chin + (0.0 if f.style == 1 else 0.3)
    spread = f.hw + f.vol + (0.02 if f.style == 1 else 0.05)
    back = np.concatenate(
        [
            _arc(0.0, f.y_mid, f.hw + f.vol, f.y_mid - f.y_top + f.vol, math.pi, 2 * math.pi, 24),
            np.array(
                [
                    [spread, bot],
                    [spread * 0.6, bot + 0.02],
                    [-spread * 0.6, bot + 0.02],
                    [-spread, bot],
                ]
            ),
        ]
    )
    cv.poly(back, f.hair * 0.85)


def _draw_ears(cv: _Canvas, f: _Face, ident: _Identity, shot: _Shot) -> None:
    ear_y = (f.y_eye + f.y_nose) / 2
    earring = (
        not f.male
        and shot.earring_on
        and f.style < 2
        and ident.earring_u < 0.55 * _smooth((f.age - 3.0) / 10.0)
    )
    for side in (-1.0, 1.0):
        ear_x = side * (f.hw_low * 0.97 + 0.012) - f.yaw * 0.03
        cv.ellipse(ear_x, ear_y, 0.03, 0.058 * (0.9 + 0.1 * f.g), f.skin_dark * 1.05)
        cv.ellipse(ear_x, ear_y, 0.016, 0.036, f.skin_dark * 0.9)
        if earring:
            col = np.array([225.0, 185.0, 70.0]) if ident.earring_gold else _WHITE * 0.85
            big = ident.earring_u < 0.3
            r = 0.012 if big else 0.007
            cv.ellipse(ear_x, ear_y + 0.06 + r, r, r * (1.6 if big else 1.0), col)


def _draw_skin(cv: _Canvas, f: _Face, ident: _Identity) -> None:
    outline = _outline(f, cv.n(f.hw))
    cv.poly(outline, f.skin)
    makeup = 0.08 * f.c if ident.lipstick_u < 0.5 and not f.male else 0.0
    cheek = _mix(f.skin, np.array([230.0, 110.0, 110.0]), 0.10 + 0.12 * (1.0 - f.g) + makeup)
    for side in (-1.0, 1.0):
        cv.ellipse(
            side * f.ex * 1.05 + f.fx,
            (f.y_nose + f.y_eye) / 2 + 0.03,
            0.05 + 0.02 * (1 - f.g),
            0.035,
            cheek,
        )
    if f.beard <= 0.0:
        return
    # Stubble or full beard: jaw below the sideburns, bounded above by the cheek line.
    fx, mw, nw, yn = f.fx, f.mw, f.nw, f.y_nose
    if f.full_beard:
        bcol = _mix(f.skin, f.hair, 0.85 * f.beard)
    else:
        bcol = _mix(f.skin, f.hair, 0.3 * f.beard) * (1.0 - 0.08 * f.beard)
    jaw_pts = outline[outline[:, 1] > (f.y_eye + yn) / 2]
    if f.full_beard:  # grows past the chin
        below = np.clip((jaw_pts[:, 1] - f.y_mouth) / (f.y_chin - f.y_mouth), 0.0, 1.0)
        jaw_pts = jaw_pts * np.array([1.03, 1.0]) + np.stack([0 * below, 0.03 * below], axis=1)
    lift = 0.02 if f.full_beard else 0.0
    cheek_x = np.array(
        [-f.hw_low * 0.8, -(mw + 0.03), -nw * 1.1, nw * 1.1, mw + 0.03, f.hw_low * 0.8]
    )
    side_y, lip_y = yn + 0.01 - lift, yn + 0.02 - lift
    cheek_y = np.array([side_y, lip_y, yn + 0.008, yn + 0.008, lip_y, side_y])
    cheek = np.stack([cheek_x + fx * (np.abs(cheek_x) < f.hw_low * 0.5), cheek_y], axis=1)
    cv.poly(np.concatenate([jaw_pts, cheek]), bcol)
    if f.full_beard or ident.beard_u > 0.7:
        top_m = _quad(
            (-mw * 1.1 + fx, f.y_mouth + 0.004),
            (fx, yn - 0.004),
            (mw * 1.1 + fx, f.y_mouth + 0.004),
        )
        bot_m = _quad(
            (mw * 1.1 + fx, f.y_mouth + 0.008),
            (fx, f.y_mouth - 0.028),
            (-mw * 1.1 + fx, f.y_mouth + 0.008),
        )
        mcol = _mix(f.skin, f.hair, 0.9 * f.beard)
        cv.poly(np.concatenate([top_m, bot_m]), mcol)


def _draw_wrinkles(cv: _Canvas, f: _Face) -> None:
    wr, fx = f.wr, f.fx
    if wr <= 0.03:
        return
    line_c = _mix(f.skin, _DARK, min(0.55, 0.1 + 0.4 * wr))
    for i in range(1 + int(3.5 * min(1.0, wr))):  # forehead
        yy = f.y_brow - 0.035 - i * 0.025
        span = f.hw * (0.55 - 0.05 * i)
        cv.line(
            _quad((-span + fx, yy + 0.006), (fx, yy - 0.01), (span + fx, yy + 0.006)),
            line_c,
            0.0035 + 0.002 * wr,
        )
    for side in (-1.0, 1.0):  # nasolabial folds
        cv.line(
            _quad(
                (side * f.nw * 1.2 + fx, f.y_nose - 0.012),
                (side * (f.mw + 0.02) + fx, f.y_nose + 0.005),
                (side * (f.mw + 0.012) + fx, f.y_mouth + 0.03 * (0.5 + wr)),
            ),
            line_c,
            0.003 + 0.003 * wr,
        )
    if wr > 0.25:
        for side in (-1.0, 1.0):  # crow's feet and eye bags
            ox = side * (f.ex + f.ew * 1.1) + fx
            for k in (-1.0, 0.0, 1.0):
                cv.line(
                    np.array([[ox, f.y_eye + k * 0.006], [ox + side * 0.03, f.y_eye + k * 0.018]]),
                    line_c,
                    0.0025 + 0.002 * wr,
                )
            cv.line(
                _quad(
                    (side * f.ex - f.ew * 0.8 + fx, f.y_eye + f.eh + 0.012),
                    (side * f.ex + fx, f.y_eye + f.eh + 0.03),
                    (side * f.ex + f.ew * 0.8 + fx, f.y_eye + f.eh + 0.012),
                ),
                line_c,
                0.003,
            )
    if wr > 0.6:
        for side in (-1.0, 1.0):  # marionette lines
            cv.line(
                np.array(
                    [
                        [side * f.mw + fx, f.y_mouth + 0.01],
                        [side * (f.mw + 0.01) + fx, f.y_mouth + 0.05],
                    ]
                ),
                line_c,
                0.003,
            )
        for i in range(int(4 * wr)):  # age spots
            cv.ellipse(
                f.hw * (0.3 * i - 0.45),
                f.y_top + f.head_len * 0.25 + 0.03 * (i % 2),
                0.008,
                0.006,
                f.skin * 0.85,
            )


def _draw_eyes(cv: _Canvas, f: _Face, ident: _Identity, shot: _Shot) -> None:
    female_adult = f.c * (not f.male)
    brow_c = _mix(_mix(ident.hair * 0.8, _GREY, 0.6 * f.grey), f.skin, 0.7 * (1 - f.g) ** 2)
    lash = _mix(f.skin, _DARK * 0.6, 0.75 + 0.2 * female_adult)
    shadow = ident.lipstick_u < 0.4 and female_adult > 0.5
    eh = f.eh
    for side in (-1.0, 1.0):
        sx = side * f.ex * (1.0 + 0.15 * f.yaw * side) + f.fx
        w = f.ew * (1.0 + 0.2 * f.yaw * side)
        if shot.blink:
            cv.line(
                _quad((sx - w, f.y_eye), (sx, f.y_eye + eh * 0.6), (sx + w, f.y_eye)), lash, 0.006
            )
        else:
            cv.ellipse(sx, f.y_eye, w, eh, np.array([238.0, 234.0, 228.0]))
            ir = min(eh, w * 0.55)
            gx, gy = shot.gaze * np.array([w * 0.3, eh * 0.2])
            cx, cy = sx + gx, f.y_eye + gy
            cv.ellipse(cx, cy, ir, min(ir, eh * 0.98), ident.eye)
            cv.ellipse(cx, cy, ir * 0.45, min(ir, eh) * 0.45, _DARK * 0.5)
            cv.ellipse(cx + ir * 0.3, cy - ir * 0.3, ir * 0.15, ir * 0.15, _WHITE)
            lid = _arc(sx, f.y_eye, w * 1.05, eh * 1.05, math.pi, 2 * math.pi, 12)
            if f.sag > 0.05:  # hooded lid with age
                drop = np.array(
                    [
                        [sx + w * 1.05, f.y_eye - eh + eh * 0.7 * f.sag],
                        [sx - w * 1.05, f.y_eye - eh + eh * 0.5 * f.sag],
                    ]
                )
                cv.poly(np.concatenate([lid, drop]), f.skin_dark * 1.1)
            cv.line(lid, lash, 0.004 + 0.003 * female_adult)
            if shadow:
                cv.line(
                    _arc(sx, f.y_eye - 0.006, w, eh * 1.2, math.pi * 1.1, math.pi * 1.9, 8),
                    _mix(f.skin, np.array([120.0, 80.0, 130.0]), 0.5 * f.c),
                    0.006,
                )
        thick = (0.004 + (0.010 + 0.006 * f.sgn) * f.c * f.g) * ident.brow_k + 0.003 * f.g
        arch = 0.012 + 0.008 * female_adult
        cv.line(
            _quad(
                (sx - w * 1.15 * side, f.y_brow + 0.008),
                (sx + w * 0.1 * side, f.y_brow - arch),
                (sx + w * 1.25 * side, f.y_brow + 0.004),
            ),
            brow_c,
            thick,
        )


def _draw_glasses(cv: _Canvas, f: _Face, ident: _Identity) -> None:
    if ident.glasses_u >= 0.04 + 0.3 * _smooth((f.age - 35.0) / 35.0):
        return
    for side in (-1.0, 1.0):
        rim = _ellipse_pts(side * f.ex + f.fx, f.y_eye + 0.004, f.ew * 1.45, f.ew, 0.0, 24)
        cv.line(np.concatenate([rim, rim[:1]]), ident.glasses_color, 0.006)
    cv.line(
        np.array([[-f.ex + f.ew * 1.45 + f.fx, f.y_eye], [f.ex - f.ew * 1.45 + f.fx, f.y_eye]]),
        ident.glasses_color,
        0.005,
    )


def _draw_nose(cv: _Canvas, f: _Face) -> None:
    nfx, nw = 0.05 * f.yaw, f.nw
    side = -1.0 if f.yaw >= 0 else 1.0  # shade the far side
    cv.line(
        _quad(
            (side * 0.5 * nw + f.fx, (f.y_eye + 2 * f.y_nose) / 3),
            (side * 0.7 * nw + nfx, f.y_nose - 0.02),
            (side * 0.9 * nw + nfx, f.y_nose - 0.012),
        ),
        f.skin_dark,
        0.004 * f.g + 0.001,
    )
    cv.line(
        _quad((-nw + nfx, f.y_nose - 0.012), (nfx, f.y_nose + 0.012), (nw + nfx, f.y_nose - 0.012)),
        f.skin_dark * 0.95,
        0.004,
    )
    for s in (-1.0, 1.0):
        cv.ellipse(
            s * nw * 0.45 + nfx,
            f.y_nose - 0.004,
            nw * 0.28,
            nw * 0.14,
            f.skin * 0.55,
            angle=s * 0.3,
        )


def _draw_mouth(cv: _Canvas, f: _Face, ident: _Identity, shot: _Shot) -> None:
    female_adult = f.c * (not f.male)
    lip = _mix(f.skin, np.array([196.0, 74.0, 78.0]), 0.42 + 0.18 * female_adult)
    if not f.male and ident.lipstick_u < 0.45 and f.age > 15:
        lip = _mix(lip, np.array([190.0, 30.0, 60.0]), 0.55 * f.c)
    lip = _mix(lip, f.skin, 0.55 * f.sag + 0.15 * (1 - f.g))  # pale, thin lips with age
    full = (1.0 + 0.35 * female_adult - 0.1 * f.c * f.male) * (1.0 - 0.35 * f.sag)
    ul, ll = 0.014 * full, 0.02 * full
    mw, y = f.mw, f.y_mouth
    up = shot.smile * 0.018 - 0.012 * f.sag
    gap = shot.mouth_open * 0.04
    mx = f.fx * 1.1
    lc, rc = (-mw + mx, y - up), (mw + mx, y - up)
    if gap > 0.002:
        inner_top = _quad(lc, (mx, y - gap * 0.3 + 0.01 * shot.smile), rc)
        inner_bot = _quad(rc, (mx, y + gap + 0.02 * shot.smile), lc)
        cv.poly(np.concatenate([inner_top, inner_bot]), np.array([70.0, 20.0, 25.0]))
        if f.age > 1.5:  # babies have no teeth
            teeth = _quad(
                (lc[0] + mw * 0.25, lc[1] + 0.003),
                (mx, y + gap * 0.3),
                (rc[0] - mw * 0.25, rc[1] + 0.003),
            )
            cv.line(teeth, np.array([236.0, 232.0, 220.0]), gap * 0.45)
    else:
        inner_top = _quad(lc, (mx, y + 0.02 * shot.smile), rc)
        inner_bot = inner_top[::-1]
    bow = y - up * 0.5
    upper = np.concatenate(
        [
            inner_top[::-1],
            np.array(
                [
                    [lc[0] + mw * 0.1, lc[1] - ul * 0.3],
                    [mx - mw * 0.4, bow - ul],
                    [mx, bow - ul * 0.7],
                    [mx + mw * 0.4, bow - ul],
                    [rc[0] - mw * 0.1, rc[1] - ul * 0.3],
                ]
            ),
        ]
    )
    cv.poly(upper, lip * 0.92)
    lower_edge = _quad(lc, (mx, inner_bot[len(inner_bot) // 2, 1] + 2 * ll), rc)
    cv.poly(np.concatenate([inner_bot, lower_edge]), lip)
    if gap <= 0.002:
        cv.line(inner_top, lip * 0.6, 0.003)


def _draw_top_hair(cv: _Canvas, f: _Face, ident: _Identity) -> None:
    hw, vol = f.hw, f.vol
    t_hl = 0.2 + 0.16 * f.recede + (0.0 if f.male else 0.05) - 0.12 * (1.0 - f.hair_amt)
    y_hl = f.y_top + f.head_len * t_hl * (0.8 + 0.2 * f.g)
    if ident.fringe and f.recede < 0.2 and f.g > 0.3:
        y_hl = f.y_brow - 0.045
    y_side = f.y_eye + (-0.06 - 0.1 * (1.0 - f.hair_amt) if f.style == 0 else 0.15)
    outer = _arc(0.0, f.y_mid, hw + vol, f.y_mid - f.y_top + vol, math.pi, 2 * math.pi, 28)
    if f.style == 0:
        outer = outer[outer[:, 1] < y_side]
    xs = np.linspace(hw * 0.96, -hw * 0.96, 17)
    shape = np.abs(xs / (hw * 0.96)) ** 2.4
    part_shift = 0.02 * ident.part * (1.0 - shape) * (xs > 0)
    jag = 0.012 * (np.arange(len(xs)) % 2) * (1.0 - shape)  # ragged edge reads as hair
    inner = np.stack([xs, y_hl + (y_side - y_hl) * shape + part_shift + jag], axis=1)
    if f.style >= 1:
        cap = np.concatenate(
            [outer, [[hw + vol, y_side + 0.08]], inner, [[-(hw + vol), y_side + 0.08]]]
        )
    else:
        cap = np.concatenate([outer, inner])
    cv.poly(cap, f.hair)
    if f.hair_amt > 0.7 and f.recede < 0.25:
        # A few strands so the cap reads as hair rather than a hat.
        ry = f.y_mid - f.y_top + vol
        for k in range(5):
            ex_, ey_ = float(inner[2 + 3 * k, 0]), float(inner[2 + 3 * k, 1])
            sx_ = 0.4 * ex_ + 0.04 * ident.part
            sy_ = f.y_mid - ry * math.sqrt(max(0.0, 1.0 - (sx_ / (hw + vol)) ** 2)) + 0.02
            mid = (0.5 * (sx_ + ex_) * 1.15, 0.5 * (sy_ + ey_))
            cv.line(_quad((sx_, sy_), mid, (ex_, ey_)), f.hair * 0.82, 0.004)
    if f.recede > 0.25:
        # Bald crown: skin over the top of the skull, hair left only at the sides.
        half = 1.1 * f.recede
        crown = _arc(
            0.0,
            f.y_mid,
            hw + vol * 1.1,
            f.y_mid - f.y_top + vol + 0.003,
            1.5 * math.pi - half,
            1.5 * math.pi + half,
            16,
        )
        # Control point placed so the curve's apex dips just below the old hairline.
        apex = 2.0 * (y_hl + 0.02) - 0.5 * (crown[0, 1] + crown[-1, 1])
        front = _quad((crown[-1, 0], crown[-1, 1]), (0.0, apex), (crown[0, 0], crown[0, 1]))
        cv.poly(np.concatenate([crown, front]), _mix(f.skin, _WHITE, 0.06))


def _draw_face(cv: _Canvas, ident: _Identity, shot: _Shot) -> None:
    f = _derive(ident, shot)
    _draw_body(cv, f, shot)
    _draw_back_hair(cv, f)
    _draw_ears(cv, f, ident, shot)
    _draw_skin(cv, f, ident)
    _draw_wrinkles(cv, f)
    _draw_eyes(cv, f, ident, shot)
    _draw_glasses(cv, f, ident)
    _draw_nose(cv, f)
    _draw_mouth(cv, f, ident, shot)
    _draw_top_hair(cv, f, ident)


def _finish(img: Image.Image, user: _User, shot: _Shot) -> Image.Image:
    """Camera model: lighting gradient, colour cast and sensor noise.

    Lighting is separable (row gain x column gain) so that every numpy op is a contiguous
    2-D broadcast; the per-pixel (H, W, 3) version costs several times more at 816 px.
    """
    size = img.size[0]
    arr = np.asarray(img, dtype=np.float32).reshape(size, size * 3)
    coord = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    kx = shot.light_strength * math.cos(shot.light_dir)
    ky = shot.light_strength * math.sin(shot.light_dir)
    rows = np.float32(shot.brightness) * (1.0 + np.float32(ky) * coord)
    cols = ((1.0 + np.float32(kx) * coord)[:, None] * user.cast.astype(np.float32)).reshape(-1)
    arr *= rows[:, None]
    arr *= cols
    tex = _noise_field(1 << max(4, (size - 1).bit_length()))
    ox, oy = np.random.default_rng(shot.noise_seed).integers(0, _NOISE_PAD, 2)
    noise = tex[oy : oy + size, 3 * ox : 3 * (ox + size)]
    arr += noise * np.float32(shot.noise)
    np.clip(arr, 0, 255, out=arr)
    return Image.fromarray(arr.astype(np.uint8).reshape(size, size, 3), "RGB")


_NOISE_PAD = 64


@lru_cache(maxsize=4)
def _noise_field(n: int) -> NDArray[np.float32]:
    """Fixed noise texture read at a random offset: fresh Gaussian noise costs too much."""
    f: NDArray[np.float32] = np.random.default_rng(12345).standard_normal(
        (n + _NOISE_PAD, 3 * (n + _NOISE_PAD)), dtype=np.float32
    )
    f.flags.writeable = False
    return f


def render_face(
    user_id: str,
    face_id: int,
    image_name: str,
    age_years: float | None,
    gender: str | None,
    size: int = 816,
    seed: int = 0,
) -> Image.Image:
    """Draw one synthetic aligned face crop; deterministic in all arguments.

    ``gender`` is "m", "f" or None (then drawn from the identity); ``age_years`` None draws an
    age uniformly in 0..80 from the identity.
    """
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    if gender not in ("m", "f", None):
        raise ValueError(f"gender must be 'm', 'f' or None, got {gender!r}")
    user = _make_user(seed, str(user_id))
    ident = _make_identity(seed, str(user_id), int(face_id), age_years, gender, user.skin_bias)
    shot = _make_shot(seed, str(user_id), int(face_id), str(image_name), user)
    if user.eff_res < size * 0.9:
        # Low-resolution album: draw small, upscale (soft, like an upsampled Flickr photo).
        draw_px, k = max(16, round(user.eff_res)), 1
    else:
        k = max(1, math.ceil(96 / size))  # supersample tiny sizes so edges stay anti-aliased
        draw_px = size * k
    canvas_img = Image.new("RGB", (draw_px, draw_px))
    _render_background(canvas_img, user, shot)
    cv = _Canvas(canvas_img, shot.rot, shot.scale, shot.shift)
    _draw_face(cv, ident, shot)
    if shot.occluder is not None:
        ox, oy, rx, ry, ci = shot.occluder
        bg = _Canvas(canvas_img, 0.0, 1.0, np.zeros(2))
        bg.ellipse(ox - 0.5, oy - 0.5, rx, ry, user.palette[ci])
    if k > 1:
        canvas_img = canvas_img.reduce(k)
    out = _finish(canvas_img, user, shot)
    if out.size[0] != size:
        out = out.resize((size, size), Image.Resampling.BILINEAR)
    return out
