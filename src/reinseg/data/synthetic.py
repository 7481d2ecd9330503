"""A synthetic domain-shift benchmark: procedural street scenes rendered in several visual domains.

A seed fixes a scene: a street in perspective with road (and its markings), sidewalks, grass,
building facades with windows, trees, fences, a distant skyline, sky, poles with traffic signs
and lights, cars and pedestrians, labelled with the Cityscapes train IDs. A domain fixes how the
scene looks: ``game`` (the training source: flat, saturated colours, crisp), ``real`` (muted
palette, textures, shadows, haze, sensor noise, slight blur), ``dusk`` (dark warm light, pink
sky, lit windows and tail lights) and ``fog`` (dense depth-dependent fog, low contrast, blur).
The same seed gives the same layout, hence the same label, in every domain, so the domains
differ in appearance only.

Everything is vectorized numpy on a few full-image arrays; see docs/datasets.md for the speed.
``write_cityscapes_layout`` writes the benchmark in the Cityscapes layout, one folder per domain,
which ``build_dataset("cityscapes", root / domain, split)`` and ``build_dataset("synthetic",
root, split, domain=...)`` read. ``python -m reinseg.data.synthetic --grid out.png`` draws samples.
"""

from __future__ import annotations

import argparse
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .classes import colorize
from .io import write_png
from .parallel import parallel_map

__all__ = [
    "DOMAINS",
    "CLASSES_USED",
    "render",
    "render_domains",
    "scene_seed",
    "write_cityscapes_layout",
    "sample_grid",
    "save_grid",
]

DOMAINS = ("game", "real", "dusk", "fog")

ROAD, SIDEWALK, BUILDING, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON, CAR = (
    0,
    1,
    2,
    4,
    5,
    6,
    7,
    8,
    9,
    10,
    11,
    13,
)
CLASSES_USED = (ROAD, SIDEWALK, BUILDING, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON, CAR)

# Material kinds and their class. A scene is a map of materials; a domain gives each kind a colour.
KINDS = {
    "sky": SKY,
    "road": ROAD,
    "marking": ROAD,
    "sidewalk": SIDEWALK,
    "terrain": TERRAIN,
    "far_ground": TERRAIN,
    "facade": BUILDING,
    "window": BUILDING,
    "window_lit": BUILDING,
    "skyline": BUILDING,
    "tree": VEGETATION,
    "fence": FENCE,
    "pole": POLE,
    "sign": SIGN,
    "light_box": LIGHT,
    "lamp": LIGHT,
    "car": CAR,
    "glass": CAR,
    "tail_light": CAR,
    "tire": CAR,
    "shirt": PERSON,
    "trousers": PERSON,
    "skin": PERSON,
}
_KIND_NAMES = tuple(KINDS)
_KIND_CLASS = np.array([KINDS[k] for k in _KIND_NAMES], dtype=np.uint8)


@dataclass
class Scene:
    """A layout: ``material`` (H, W) uint8 indexes ``kinds`` (material kind index) and ``variation``
    (per-material random numbers in [0, 1) that pick its shade); ``nearness`` (H, W) float32 is
    inverse depth for fog (1 at the bottom row, towards 0 far away; 1 for the sky, which the
    sky gradient already colours)."""

    material: np.ndarray
    nearness: np.ndarray
    horizon: int
    kinds: list[int] = field(default_factory=list)
    variation: list[tuple[float, float, float]] = field(default_factory=list)

    def add(self, kind: str, rng: np.random.Generator) -> int:
        if len(self.kinds) == 255:
            raise RuntimeError("a scene holds at most 255 materials")
        self.kinds.append(_KIND_NAMES.index(kind))
        self.variation.append(tuple(rng.random(3)))
        return len(self.kinds) - 1

    @property
    def label(self) -> np.ndarray:
        return _KIND_CLASS[np.asarray(self.kinds, dtype=np.int64)][self.material]


# --- layout ---------------------------------------------------------------------------------


def _grid(size):
    height, width = size
    return np.arange(height, dtype=np.float32)[:, None], np.arange(width, dtype=np.float32)[None, :]


class _Workspace:
    """Full-image scratch arrays, reused from scene to scene: allocating fresh arrays of this
    size costs more than the arithmetic done on them, so the hot paths compute in place."""

    def __init__(self, size):
        self.real = [np.empty(size, np.float32) for _ in range(3)]
        self.mask = [np.empty(size, bool) for _ in range(3)]
        self.image = [np.empty((3, *size), np.float32) for _ in range(2)]  # channels first: fast broadcasts


_thread = threading.local()


def _workspace(size) -> _Workspace:
    spaces = _thread.__dict__.setdefault("workspaces", {})
    if size not in spaces:
        spaces[size] = _Workspace(size)
    return spaces[size]


def _facade_columns(scene: Scene, rng, vx: float, width: int):
    """Per column: the facade material and its top as a factor of the distance to the vanishing
    point (negative: below the horizon), for segments that widen away from it as in perspective."""
    material = np.full(width, scene.add("facade", rng), dtype=np.uint8)  # the street's far end
    height = np.ones(width, dtype=np.float32)
    for direction in (-1, 1):
        offset = 1.0
        while True:
            stop = offset * rng.uniform(1.25, 1.9)
            lo, hi = sorted((vx + direction * offset, vx + direction * stop))
            cols = slice(min(max(int(np.ceil(lo)), 0), width), min(max(int(np.ceil(hi)), 0), width))
            kind = str(rng.choice(["facade", "tree", "fence"], p=[0.62, 0.26, 0.12]))
            material[cols] = scene.add(kind, rng)
            if kind == "facade":
                height[cols] = rng.uniform(0.7, 3.2)
            elif kind == "tree":  # a dome-shaped crown
                x = np.arange(cols.start, cols.stop, dtype=np.float32)
                dome = 1 - ((x - (lo + hi) / 2) / max((hi - lo) / 2, 1)) ** 2
                height[cols] = rng.uniform(0.6, 1.3) * (0.55 + 0.45 * np.clip(dome, 0, 1))
            else:  # a fence lower than the camera (its top below the horizon), open land behind
                height[cols] = -0.6
            if (direction < 0 and lo <= 0) or (direction > 0 and hi >= width):
                break
            offset = stop
    return material, height


def _scene(seed: int, size: tuple[int, int]) -> Scene:
    """The layout of scene ``seed``: street, facades, skyline, then objects far to near."""
    rng = np.random.default_rng(seed)
    height, width = size
    ws = _workspace(size)
    ys, xs = _grid(size)
    horizon = int(height * rng.uniform(0.36, 0.47))
    depth_rows = height - horizon
    vx = width * rng.uniform(0.38, 0.62)
    scene = Scene(np.empty(0, np.uint8), np.empty(size, np.float32), horizon)  # material: below
    sky, road_id, marking_id, sidewalk_id, terrain_id, far_ground = (
        scene.add(k, rng) for k in ("sky", "road", "marking", "sidewalk", "terrain", "far_ground")
    )
    left = xs < vx

    def per_side(values) -> np.ndarray:  # (1, W): the left value left of the vanishing point
        return np.where(left, values[0], values[1]).astype(np.float32)

    # Ground zones by the ratio of the distance to the vanishing point to the depth below the
    # horizon, i.e. by lateral distance in the world: road, sidewalk, grass, then facades.
    road = width * rng.uniform(0.17, 0.3) / depth_rows
    walk_sides = road * rng.uniform(1.25, 1.6, 2)
    walk = per_side(walk_sides)
    grass = walk * per_side(np.where(rng.random(2) < 0.4, rng.uniform(1.15, 1.7, 2), 1.0))
    below = ys - horizon
    dx = np.maximum(np.abs(xs - vx), 0.01)
    ratio = np.multiply(dx, np.where(below > 0, 1 / np.maximum(below, 1e-3), 1e6), out=ws.real[0])
    material = np.full(size, road_id, np.uint8)
    for threshold, zone_material in ((road, sidewalk_id), (walk, terrain_id), (grass, far_ground)):
        past = np.greater_equal(ratio, threshold, out=ws.mask[2])
        np.copyto(material, zone_material, where=past)
    beyond = past  # past the outer edge: facades, and what lies above and behind them

    # A dashed centre line, the dashes evenly spaced in depth.
    dash = (np.floor(rng.uniform(6, 12) * depth_rows / np.maximum(below, 1)) % 2 == 0) & (below > 2)
    marking = np.less(ratio, road * 0.035, out=ws.mask[0])
    marking &= dash
    np.copyto(material, marking_id, where=marking)

    # Above the horizon: sky, and a distant skyline of blocks.
    skyline = scene.add("skyline", rng)
    above = material[:horizon]
    above.fill(sky)
    on_skyline = np.greater_equal(ys[:horizon], horizon - _skyline(rng, width, height), out=ws.mask[0][:horizon])
    np.copyto(above, skyline, where=on_skyline)

    # Facades (buildings, trees, fences) from the sidewalk's outer edge up to their top.
    facade_material, facade_height = _facade_columns(scene, rng, vx, width)
    on_facade = np.greater_equal(ys, horizon - dx * facade_height / walk, out=ws.mask[1])
    on_facade &= beyond
    np.copyto(material, facade_material, where=on_facade)
    scene.material = material

    # Nearness (inverse depth) for fog: the ground by its row, a facade by its distance to the
    # vanishing point; far ground and skyline far, the sky clear.
    nearness = scene.nearness
    np.copyto(nearness, np.clip(below / depth_rows, 0, 1))
    np.copyto(nearness, 0.03, where=beyond)
    nearness[:horizon] = 1.0
    np.copyto(nearness[:horizon], 0.02, where=on_skyline)
    np.copyto(nearness, np.clip(dx / (walk * depth_rows), 0, 1), where=on_facade)
    is_building = np.asarray(scene.kinds)[facade_material] == _KIND_NAMES.index("facade")
    _windows(scene, rng, ys, dx, horizon, on_facade & is_building)
    _objects(scene, rng, horizon, vx, road, walk_sides)
    return scene


def _skyline(rng, width: int, height: int) -> np.ndarray:
    """Heights (1, W) of a distant row of blocks, piecewise constant."""
    edges = np.sort(rng.integers(0, width, rng.integers(6, 14)))
    return np.repeat(rng.uniform(0.0, 0.11, len(edges) + 1) * height, np.diff(np.r_[0, edges, width]))[None, :]


def _windows(scene: Scene, rng, ys, dx, horizon: int, on_building: np.ndarray) -> None:
    """Window grids on building facades, evenly spaced along each facade (in 1 / dx) and up it
    (in (horizon - y) / dx), so they follow the perspective; some are lit (seen at dusk)."""
    ws = _workspace(scene.material.shape)
    along = rng.uniform(400, 720) / dx  # (1, W)
    across = (along % 1) < 0.55
    column_hash = (np.floor(along) * 0.618) % 1
    up = np.multiply((horizon - ys) * rng.uniform(5, 8), 1 / dx, out=ws.real[1])
    floor = np.floor(up, out=ws.real[2])
    up -= floor  # the position within a storey
    window = np.less(up, 0.5, out=ws.mask[2])
    window &= across
    window &= on_building
    floor *= 0.37
    floor += column_hash
    lit = np.less(floor - np.floor(floor), 0.4, out=ws.mask[0])
    np.copyto(scene.material, scene.add("window", rng), where=window)
    lit &= window
    np.copyto(scene.material, scene.add("window_lit", rng), where=lit)


def _paint(
    scene: Scene, material: int, near: float, top: float, bottom: float, left: float, right: float, shape: str = "box"
) -> None:
    """Fill a box (or the ellipse in it) with a material; clipped to the image."""
    height, width = scene.material.shape
    y0, y1 = max(int(np.floor(top)), 0), min(int(np.ceil(bottom)), height)
    x0, x1 = max(int(np.floor(left)), 0), min(int(np.ceil(right)), width)
    if y1 <= y0 or x1 <= x0:
        return
    region = (slice(y0, y1), slice(x0, x1))
    if shape == "ellipse":
        yy = (np.arange(y0, y1)[:, None] + 0.5 - (top + bottom) / 2) / max((bottom - top) / 2, 0.5)
        xx = (np.arange(x0, x1)[None, :] + 0.5 - (left + right) / 2) / max((right - left) / 2, 0.5)
        mask = yy**2 + xx**2 <= 1
        scene.material[region][mask] = material
        scene.nearness[region][mask] = near
    else:
        scene.material[region] = material
        scene.nearness[region] = near


def _objects(scene: Scene, rng, horizon: int, vx: float, road: float, walk_sides) -> None:
    """Cars on the road, people and poles on the sidewalks, painted from far to near.

    An object stands at ``near`` (its foot ``near`` of the way from the horizon to the bottom)
    and ``lateral`` (its distance to the street's axis as a multiple of the road's half width).
    """
    depth_rows = scene.material.shape[0] - horizon
    objects = [("car", rng.uniform(0.12, 1.05), rng.uniform(-0.7, 0.7)) for _ in range(rng.integers(1, 6))]
    for kind, count, across in (("person", rng.integers(0, 6), (0.25, 0.8)), ("pole", rng.integers(1, 5), (0.1, 0.2))):
        for _ in range(count):
            side = rng.integers(2)
            curb_to_wall = walk_sides[side] / road - 1
            lateral = (1 + rng.uniform(*across) * curb_to_wall) * (-1 if side == 0 else 1)
            objects.append((kind, rng.uniform(0.12, 0.95), lateral))
    draw = {"car": _car, "person": _person, "pole": _pole}
    for kind, near, lateral in sorted(objects, key=lambda o: o[1]):
        below = near * depth_rows  # rows between the horizon and the object's foot
        unit = road * below  # the road's half width at the object's depth, in pixels
        draw[kind](scene, rng, near, horizon + below, vx + lateral * unit, unit)


def _car(scene, rng, near, base, x, unit):
    w = unit * rng.uniform(0.75, 0.9)
    h = w * rng.uniform(0.7, 0.85)
    body, glass, tail, tire = (scene.add(k, rng) for k in ("car", "glass", "tail_light", "tire"))
    _paint(scene, tire, near, base - h * 0.18, base, x - w * 0.46, x - w * 0.26)
    _paint(scene, tire, near, base - h * 0.18, base, x + w * 0.26, x + w * 0.46)
    _paint(scene, body, near, base - h * 0.62, base - h * 0.1, x - w / 2, x + w / 2)
    _paint(scene, body, near, base - h, base - h * 0.55, x - w * 0.38, x + w * 0.38)
    _paint(scene, glass, near, base - h * 0.93, base - h * 0.62, x - w * 0.32, x + w * 0.32)
    for side in (-1, 1):
        _paint(
            scene,
            tail,
            near,
            base - h * 0.5,
            base - h * 0.38,
            x + side * w * 0.42 - w * 0.06,
            x + side * w * 0.42 + w * 0.06,
        )


def _person(scene, rng, near, base, x, unit):
    h = unit * rng.uniform(0.8, 1.0)
    w = h * 0.3
    shirt, trousers, skin = (scene.add(k, rng) for k in ("shirt", "trousers", "skin"))
    _paint(scene, trousers, near, base - h * 0.48, base, x - w * 0.35, x + w * 0.35)
    _paint(scene, shirt, near, base - h * 0.84, base - h * 0.42, x - w / 2, x + w / 2, "ellipse")
    _paint(scene, skin, near, base - h, base - h * 0.8, x - w * 0.28, x + w * 0.28, "ellipse")


def _pole(scene, rng, near, base, x, unit):
    h = unit * rng.uniform(2.2, 3.4)
    w = max(unit * 0.06, 1.2)
    pole = scene.add("pole", rng)
    _paint(scene, pole, near, base - h, base, x - w / 2, x + w / 2)
    top = base - h
    if rng.random() < 0.6:
        sign = scene.add("sign", rng)
        s = unit * rng.uniform(0.35, 0.55)
        _paint(scene, sign, near, top, top + s, x - s / 2, x + s / 2, rng.choice(["box", "ellipse"]))
    else:
        box, lamp = scene.add("light_box", rng), scene.add("lamp", rng)
        s = unit * 0.22
        _paint(scene, box, near, top, top + 3 * s, x - s / 2, x + s / 2)
        lit = rng.integers(3)
        _paint(scene, lamp, near, top + (lit + 0.2) * s, top + (lit + 0.8) * s, x - s * 0.3, x + s * 0.3, "ellipse")


# --- domains --------------------------------------------------------------------------------


# Material kinds in the source (game) look: RGB base, RGB spread between instances, roughness
# (how much of a domain's surface texture shows on it).
PAINTS = {
    "sky": ((120, 180, 250), (0, 0, 0), 0.0),
    "road": ((70, 70, 78), (8, 8, 8), 1.0),
    "marking": ((235, 235, 235), (5, 5, 5), 0.5),
    "sidewalk": ((180, 172, 165), (15, 15, 15), 1.0),
    "terrain": ((110, 185, 60), (20, 20, 15), 1.5),
    "far_ground": ((120, 170, 80), (10, 10, 10), 1.0),
    "facade": ((200, 150, 110), (55, 50, 45), 1.0),
    "window": ((90, 140, 200), (15, 15, 20), 0.3),
    "window_lit": ((90, 140, 200), (15, 15, 20), 0.3),
    "skyline": ((150, 160, 185), (25, 25, 25), 0.3),
    "tree": ((40, 150, 45), (20, 35, 15), 2.0),
    "fence": ((160, 110, 70), (25, 20, 15), 1.2),
    "pole": ((120, 120, 128), (10, 10, 10), 0.3),
    "sign": ((235, 200, 20), (20, 50, 20), 0.2),
    "light_box": ((35, 35, 35), (5, 5, 5), 0.2),
    "lamp": ((60, 230, 70), (120, 40, 20), 0.0),
    "car": ((150, 110, 120), (105, 105, 105), 0.4),
    "glass": ((40, 60, 90), (10, 10, 10), 0.3),
    "tail_light": ((230, 30, 30), (10, 10, 10), 0.0),
    "tire": ((25, 25, 25), (5, 5, 5), 0.3),
    "shirt": ((130, 110, 150), (110, 110, 110), 0.5),
    "trousers": ((60, 60, 110), (40, 40, 40), 0.5),
    "skin": ((225, 180, 145), (20, 20, 20), 0.2),
}


@dataclass(frozen=True)
class Look:
    """How a domain renders a scene: the paints desaturated (``saturation``) and replaced where
    ``repaint`` says, a surface texture of amplitude ``texture`` (times each paint's roughness),
    then sky gradient, light (``gain`` per channel, ``bias``), cast shadows, fog, blur and noise.
    ``emissive`` kinds glow: light, shade and fog leave them alone."""

    sky: tuple  # (top RGB, horizon RGB)
    saturation: float = 1.0
    repaint: dict = field(default_factory=dict)
    texture: float = 0.0
    gain: tuple = (1.0, 1.0, 1.0)
    bias: float = 0.0
    shadow: float = 1.0  # brightness inside cast shadows (1: none)
    fog: float = 0.0  # fog density: transmittance exp(-fog / nearness)
    fog_color: tuple = (200, 200, 200)
    blur: int = 0  # passes of a [1, 2, 1] filter
    noise: float = 0.0  # sensor noise std, 0-255 scale
    emissive: tuple = ()


LOOKS = {
    "game": Look(sky=((70, 150, 245), (175, 215, 250))),
    "real": Look(
        sky=((140, 170, 205), (210, 215, 222)),
        saturation=0.6,
        texture=0.16,
        gain=(0.95, 0.93, 0.9),
        bias=5,
        shadow=0.65,
        fog=0.01,
        fog_color=(205, 210, 215),
        blur=1,
        noise=5.0,
        repaint={"window": ((60, 75, 95), (15, 15, 15), 0.3), "window_lit": ((65, 80, 100), (15, 15, 15), 0.3)},
    ),
    "dusk": Look(
        sky=((75, 60, 130), (245, 150, 110)),
        saturation=0.75,
        texture=0.1,
        gain=(0.82, 0.64, 0.68),
        fog=0.006,
        fog_color=(160, 105, 110),
        blur=1,
        noise=6.0,
        repaint={
            "window": ((40, 40, 60), (10, 10, 10), 0.1),
            "window_lit": ((255, 205, 110), (10, 25, 30), 0.0),
            "tail_light": ((255, 40, 30), (5, 10, 10), 0.0),
            "lamp": ((120, 255, 140), (110, 50, 40), 0.0),
        },
        emissive=("window_lit", "tail_light", "lamp"),
    ),
    "fog": Look(
        sky=((200, 204, 210), (222, 224, 226)),
        saturation=0.7,
        texture=0.08,
        gain=(0.97, 0.98, 1.0),
        bias=10,
        fog=0.06,
        fog_color=(218, 220, 223),
        blur=2,
        noise=3.0,
    ),
}


@lru_cache(maxsize=16)
def _noise_tiles(domain: str, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Per domain and size: a texture field (2H, 2W) in [-1, 1] (fine grain plus blotches) and
    sensor noise (3, 2H, 2W) with the domain's std; each render takes a random window of them."""
    rng = np.random.default_rng(DOMAINS.index(domain) + 1)
    height, width = 2 * size[0], 2 * size[1]
    grain = _blur(rng.standard_normal((1, height, width)).astype(np.float32), 1)
    coarse = rng.standard_normal((1, height // 8 + 1, width // 8 + 1)).astype(np.float32)
    blotches = _blur(np.kron(coarse, np.ones((1, 8, 8), np.float32))[:, :height, :width], 3)
    texture = np.clip(grain[0] + blotches[0], -2, 2) / 2
    return texture, LOOKS[domain].noise * rng.standard_normal((3, height, width)).astype(np.float32)


def _blur(image: np.ndarray, passes: int, spare: np.ndarray | None = None) -> np.ndarray:
    """``passes`` separable [1, 2, 1] / 4 smoothings of a (C, H, W) float image, in place
    (``spare``: a scratch array like it); the border pixels are repeated outward."""
    spare = np.empty_like(image) if spare is None else spare
    for _ in range(passes):
        for axis in (1, 2):
            src, dst = np.moveaxis(image, axis, 0), np.moveaxis(spare, axis, 0)
            np.add(src[:-2], src[2:], out=dst[1:-1])
            dst[1:-1] += src[1:-1]
            dst[1:-1] += src[1:-1]
            np.add(src[0] * 3, src[1], out=dst[0])
            np.add(src[-1] * 3, src[-2], out=dst[-1])
            np.multiply(dst, 0.25, out=src)
    return image


def _material_colors(scene: Scene, look: Look):
    """Per material of ``scene`` under ``look``: colour (N, 3) with the light applied (emissive
    materials excepted), texture amplitude (N,), and whether it glows (N,)."""
    kinds = [_KIND_NAMES[k] for k in scene.kinds]
    base, spread, roughness = zip(*(look.repaint.get(kind, PAINTS[kind]) for kind in kinds), strict=False)
    colors = np.asarray(base, np.float32) + (np.asarray(scene.variation, np.float32) * 2 - 1) * np.asarray(spread)
    gray = colors.mean(axis=1, keepdims=True)
    colors = gray + look.saturation * (colors - gray)
    glows = np.array([kind in look.emissive for kind in kinds])
    lit = colors * np.asarray(look.gain, np.float32) + look.bias
    colors = np.where(glows[:, None], colors, lit).astype(np.float32)
    return colors, look.texture * np.asarray(roughness, np.float32), glows


def _render(scene: Scene, domain: str, rng: np.random.Generator) -> np.ndarray:
    """The image (H, W, 3) uint8 of ``scene`` in ``domain``, computed channels-first in place
    on scratch arrays."""
    look = LOOKS[domain]
    size = scene.material.shape
    height, width = size
    ws = _workspace(size)
    colors, amplitudes, glows = _material_colors(scene, look)
    gain = np.asarray(look.gain, np.float32)[:, None, None]
    image = np.take(colors.T, scene.material, axis=1, out=ws.image[0])  # (3, H, W)

    # The sky: a vertical gradient from its top colour to its horizon colour.
    horizon = scene.horizon
    rows = (np.arange(horizon, dtype=np.float32) / max(horizon, 1))[None, :, None] ** 1.5
    top, bottom = (np.asarray(c, np.float32)[:, None, None] for c in look.sky)
    is_sky = np.equal(scene.material[:horizon], scene.kinds.index(_KIND_NAMES.index("sky")), out=ws.mask[0][:horizon])
    np.copyto(image[:, :horizon], (top * (1 - rows) + bottom * rows) * gain + look.bias, where=is_sky)

    # Shading: surface texture and a cast shadow multiply the colour; glowing materials keep theirs.
    glowing = np.take(glows, scene.material, out=ws.mask[1]) if glows.any() else None
    texture, sensor = _noise_tiles(domain, size)
    dy, dx = rng.integers(height), rng.integers(width)
    if amplitudes.any() or look.shadow < 1:
        shade = np.take(amplitudes, scene.material, out=ws.real[0])
        shade *= texture[dy : dy + height, dx : dx + width]
        shade += 1
        if look.shadow < 1:  # a low sun puts one side of the street in shadow
            ys, xs = _grid(size)
            slope = rng.uniform(-1.5, 1.5)
            in_shadow = np.greater(
                np.add(ys, xs * slope, out=ws.real[1]), rng.uniform(0.3, 0.9) * height * (1 + slope), out=ws.mask[2]
            )
            np.multiply(shade, look.shadow, out=shade, where=in_shadow)
        if glowing is not None:
            np.copyto(shade, 1.0, where=glowing)
        image *= shade

    # Fog: transmittance exp(-density * depth) blends towards the fog colour.
    if look.fog:
        transmittance = np.maximum(scene.nearness, 1e-3, out=ws.real[0])
        np.divide(-look.fog, transmittance, out=transmittance)
        np.exp(transmittance, out=transmittance)
        if glowing is not None:
            np.copyto(transmittance, 1.0, where=glowing)
        fog = np.asarray(look.fog_color, np.float32)[:, None, None] * gain + look.bias
        image -= fog
        image *= transmittance
        image += fog
    if look.blur:
        _blur(image, look.blur, spare=ws.image[1])
    if look.noise:
        image += sensor[:, dy : dy + height, dx : dx + width]
    np.clip(image, 0, 255, out=image)
    planes = np.empty((3, height, width), np.uint8)
    np.copyto(planes, image, casting="unsafe")
    return np.array(Image.merge("RGB", [Image.fromarray(plane) for plane in planes]))  # interleave channels


# --- public API -----------------------------------------------------------------------------


def _check_domain(domain: str) -> None:
    if domain not in LOOKS:
        raise ValueError(f"unknown synthetic domain '{domain}'; valid: {', '.join(DOMAINS)}")


def render_domains(seed: int, domains=DOMAINS, size=(256, 512)) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Scene ``seed`` in each of ``domains``: {domain: (image (H, W, 3) uint8, label (H, W) uint8)}.
    The layout is built once, so this is faster than one :func:`render` per domain."""
    for domain in domains:
        _check_domain(domain)
    size = (int(size[0]), int(size[1]))
    if min(size) < 16:
        raise ValueError(f"size must be at least 16x16, got {size}")
    scene = _scene(seed, size)
    label = scene.label
    return {d: (_render(scene, d, np.random.default_rng([seed, DOMAINS.index(d)])), label) for d in domains}


def render(seed: int, domain: str = DOMAINS[0], size=(256, 512)) -> tuple[np.ndarray, np.ndarray]:
    """Scene ``seed`` in ``domain``: (image (H, W, 3) uint8 RGB, label (H, W) uint8 train IDs).
    The same seed gives the same label in every domain; the same (seed, domain), the same image."""
    return render_domains(seed, (domain,), size)[domain]


def scene_seed(seed: int, split: str, index: int) -> int:
    """The scene of item ``index`` of ``split`` in a benchmark generated with ``seed``."""
    return int(np.random.SeedSequence([seed, ("train", "val").index(split), index]).generate_state(1)[0])


def _stem(index: int) -> str:
    return f"synth_{index:06d}_000019"


def _write_item(job, root: Path, domains, size, seed: int, overwrite: bool) -> int:
    split, index = job
    stem = _stem(index)
    paths = {
        d: (
            root / d / "leftImg8bit" / split / "synth" / f"{stem}_leftImg8bit.png",
            root / d / "gtFine" / split / "synth" / f"{stem}_gtFine_labelTrainIds.png",
        )
        for d in domains
    }
    todo = [d for d in domains if overwrite or not all(p.exists() for p in paths[d])]
    if not todo:
        return 0
    for domain, (image, label) in render_domains(scene_seed(seed, split, index), todo, size).items():
        write_png(paths[domain][0], image, compress_level=1)
        write_png(paths[domain][1], label)
    return len(todo)


# The settings the scenes below a root were rendered with (write_cityscapes_layout).
MANIFEST = "synthetic.json"


def write_cityscapes_layout(
    root,
    domains=DOMAINS,
    num_train: int = 500,
    num_val: int = 100,
    size=(256, 512),
    seed: int = 0,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write the benchmark as one Cityscapes tree per domain::

        root/<domain>/leftImg8bit/{train,val}/synth/synth_<index>_000019_leftImg8bit.png
        root/<domain>/gtFine/{train,val}/synth/synth_<index>_000019_gtFine_labelTrainIds.png

    Item ``i`` of a split shows the same scene in every domain. Existing files are kept unless
    ``overwrite``, when ``root/synthetic.json`` says they are of this ``seed``, ``size`` and
    counts; the scenes of other settings, or of none recorded (an earlier release's), are deleted first,
    so that a run stopped midway and continued with other settings never mixes two benchmarks.
    Returns {"root", "domains", "num_train", "num_val", "size", "written", "seconds"} where
    ``written`` counts (domain, item) pairs rendered.
    """
    import json

    from ..checkpoints import atomic_write_bytes

    for domain in domains:
        _check_domain(domain)
    root = Path(root)
    settings = {"seed": int(seed), "size": [int(s) for s in size], "num_train": num_train, "num_val": num_val}
    manifest = root / MANIFEST
    try:
        recorded = json.loads(manifest.read_text())
    except (OSError, ValueError):
        recorded = None
    if recorded != settings:
        for scene in root.glob("*/*/*/synth/synth_*.png"):
            scene.unlink()
        atomic_write_bytes(manifest, json.dumps(settings).encode())  # before any scene of these settings
    jobs = [("train", i) for i in range(num_train)] + [("val", i) for i in range(num_val)]
    start = time.perf_counter()
    write = partial(_write_item, root=root, domains=tuple(domains), size=tuple(size), seed=seed, overwrite=overwrite)
    written = sum(parallel_map(write, jobs, workers, desc="synthetic scenes", progress=progress))
    return {
        "root": str(root),
        "domains": list(domains),
        "num_train": num_train,
        "num_val": num_val,
        "size": tuple(size),
        "written": written,
        "seconds": time.perf_counter() - start,
    }


def sample_grid(seeds=(1, 2, 3), domains=DOMAINS, size=(128, 256), gap: int = 4) -> np.ndarray:
    """A picture (rows, cols, 3) uint8: per domain, a row of images and a row of their labels in
    Cityscapes colours, each row named on the left. Columns are the same scenes throughout."""
    height, width = size
    renders = [render_domains(seed, domains, size) for seed in seeds]
    margin = 64
    rows = []
    for domain in domains:
        images, labels = [r[domain][0] for r in renders], [colorize(r[domain][1]) for r in renders]
        for name, tiles in ((domain, images), ("label", labels)):
            row = Image.new("RGB", (margin + len(seeds) * (width + gap) - gap, height + gap), "white")
            for i, tile in enumerate(tiles):
                row.paste(Image.fromarray(tile), (margin + i * (width + gap), 0))
            ImageDraw.Draw(row).text((6, height // 2 - 6), name, fill=(0, 0, 0))
            rows.append(np.asarray(row))
    return np.concatenate(rows)[:-gap]


def save_grid(path, **grid_options) -> None:
    """:func:`sample_grid` as a 256-colour PNG (a fifth of the RGB file, for the docs)."""
    image = Image.fromarray(sample_grid(**grid_options))
    image.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)


def _speed(size, count: int = 200) -> float:
    """Single-domain renders per second on this process, after a warm-up."""
    render(0, DOMAINS[0], size)
    for domain in DOMAINS:
        render(0, domain, size)
    start = time.perf_counter()
    for i in range(count):
        render(i, DOMAINS[i % len(DOMAINS)], size)
    return count / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reinseg.data.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--grid", metavar="PNG", help="draw samples of every domain to PNG")
    parser.add_argument("--write", metavar="ROOT", help="write the benchmark in the Cityscapes layout")
    parser.add_argument("--num-train", type=int, default=500)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--size", type=int, nargs=2, default=(256, 512), metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--speed", action="store_true", help="measure renders per second on one core")
    args = parser.parse_args(argv)
    if args.grid:
        save_grid(args.grid)
        print(f"wrote {args.grid}")
    if args.write:
        print(
            write_cityscapes_layout(
                args.write,
                num_train=args.num_train,
                num_val=args.num_val,
                size=args.size,
                seed=args.seed,
                workers=args.workers,
            )
        )
    if args.speed:
        print(f"{_speed(tuple(args.size)):.0f} images/s at {args.size[0]}x{args.size[1]} (one process)")
    if not (args.grid or args.write or args.speed):
        parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
