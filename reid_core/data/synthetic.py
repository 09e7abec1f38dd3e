"""Deterministic synthetic re-ID data, written to disk in the Market-1501 or VeRi-776 layout.

Each identity is a procedurally drawn person (market1501 layout) or vehicle (veri776 layout) with its own
attributes: colours, a pattern or decal, body proportions, accessories or stickers. About a third of the
identities are near-duplicates of an earlier one (one or two attributes re-drawn), which is what makes
the task hard. Each camera has its own nuisances: colour cast, brightness and contrast, blur, sensor
noise, framing (scale and shift), background, occluders and a preferred viewpoint. Each image adds its own
pose and jitter. Half of the identities (chosen by the seed) are for training, the other half for testing;
in the test half one image per (identity, camera) is a query and the rest are gallery images.

The same arguments give the same bytes: every image is drawn from a random generator seeded by
``(seed, pid, cam, k)`` and written as a JPEG of quality 90.

CLI: ``python -m reid_core.data.synthetic --out DIR --layout market1501 --ids 60 --cams 4 --seed 0``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from reid_core.config import SyntheticConfig

GENERATOR_VERSION = 1  # bump when the drawing changes, so that cached folders are regenerated
JPEG_QUALITY = 90
META_FILE = "synthetic.json"
LAYOUTS = ("market1501", "veri776")
SUPERSAMPLE = 2  # images are drawn at this multiple of the output size, then downsampled

Colour = tuple[int, int, int]
Attrs = dict[str, Any]

# Base colours shared by clothes and car bodies; identities jitter around them, so two identities with
# the same base colour differ only slightly (and a camera's colour cast can exceed the difference).
_PALETTE = np.array([
    (200, 30, 35), (30, 60, 170), (235, 235, 230), (25, 25, 28), (120, 120, 125), (40, 130, 50),
    (230, 200, 40), (130, 80, 40), (240, 130, 30), (110, 40, 140), (90, 170, 210), (210, 120, 160),
], dtype=np.float64)
_SKIN = np.array([(240, 200, 170), (210, 160, 120), (160, 110, 75), (100, 65, 45)], dtype=np.float64)
_HAIR = np.array([(20, 15, 10), (90, 55, 25), (180, 140, 80), (130, 130, 130), (150, 60, 30)], dtype=np.float64)
_TINTS = np.array([(30, 40, 50), (70, 90, 110), (20, 20, 20), (110, 130, 140)], dtype=np.float64)


def _colour(rng: np.random.Generator, palette: np.ndarray = _PALETTE, jitter: float = 14.0) -> Colour:
    base = palette[rng.integers(len(palette))]
    return tuple(int(v) for v in np.clip(base + rng.normal(0.0, jitter, 3), 0, 255))


# ---- identity attributes -------------------------------------------------------------
# One sampler per attribute, so that a near-duplicate can re-draw just one or two of them.

_PERSON_ATTRS: dict[str, Callable[[np.random.Generator], Any]] = {
    "top": _colour,
    "bottom": lambda r: _colour(r),
    "skin": lambda r: _colour(r, _SKIN, 8.0),
    "hair": lambda r: _colour(r, _HAIR, 10.0),
    "long_hair": lambda r: bool(r.random() < 0.35),
    "shoes": lambda r: _colour(r, _PALETTE[[2, 3, 4, 7]], 10.0),
    "pattern": lambda r: int(r.integers(5)),  # none, horizontal stripes, vertical stripes, checks, chest logo
    "pattern_colour": _colour,
    "period": lambda r: float(r.uniform(0.05, 0.11)),  # of the figure height
    "height": lambda r: float(r.uniform(0.86, 1.0)),
    "build": lambda r: float(r.uniform(0.21, 0.33)),  # shoulder width / figure height
    "torso": lambda r: float(r.uniform(0.38, 0.5)),  # torso / (figure height - head)
    "bottom_kind": lambda r: int(r.integers(3)),  # trousers, shorts, skirt
    "bag": lambda r: int(r.choice(4, p=[0.4, 0.3, 0.15, 0.15])),  # none, backpack, bag left, bag right
    "bag_colour": _colour,
    "hat": lambda r: bool(r.random() < 0.2),
    "hat_colour": _colour,
}

_VEHICLE_TYPES = {  # length (of the frame width), body height, cabin start, cabin end, cabin height (of length)
    "sedan": (0.92, 0.17, 0.28, 0.72, 0.13),
    "hatch": (0.80, 0.19, 0.30, 0.88, 0.15),
    "suv": (0.90, 0.23, 0.22, 0.86, 0.16),
    "van": (0.95, 0.27, 0.12, 0.95, 0.17),
    "pickup": (0.96, 0.20, 0.22, 0.52, 0.16),
}

_VEHICLE_ATTRS: dict[str, Callable[[np.random.Generator], Any]] = {
    "body": lambda r: _colour(r, jitter=10.0),
    "kind": lambda r: str(r.choice(list(_VEHICLE_TYPES))),
    "stretch": lambda r: float(r.uniform(0.93, 1.07)),
    "tint": lambda r: _colour(r, _TINTS, 8.0),
    "wheel": lambda r: float(r.uniform(0.09, 0.13)),  # radius, of the length
    "rim": lambda r: _colour(r, _PALETTE[[2, 3, 4]], 8.0),
    "decal": lambda r: int(r.integers(4)),  # none, side stripe, two-tone roof, dark lower body
    "decal_colour": _colour,
    "rack": lambda r: bool(r.random() < 0.25),
    "stickers": lambda r: [(float(r.uniform(0.1, 0.9)), float(r.uniform(0.15, 0.85)), _colour(r))
                           for _ in range(int(r.integers(0, 3)))],
}


def _identities(n: int, attrs: dict[str, Callable[[np.random.Generator], Any]], seed: int,
                twin_prob: float = 0.35) -> list[Attrs]:
    """Attributes of identities 1..n; with ``twin_prob`` one is an earlier one with 1-2 attributes re-drawn."""
    rng = np.random.default_rng([seed, 1])
    out: list[Attrs] = []
    names = list(attrs)
    for i in range(n):
        if i > 0 and rng.random() < twin_prob:
            ident = dict(out[int(rng.integers(i))])
            for name in rng.choice(names, size=int(rng.integers(1, 3)), replace=False):
                ident[str(name)] = attrs[str(name)](rng)
        else:
            ident = {name: sample(rng) for name, sample in attrs.items()}
        out.append(ident)
    return out


def _camera(seed: int, cam: int) -> Attrs:
    """The nuisances of one camera (fixed for all its images)."""
    r = np.random.default_rng([seed, 2, cam])
    scale_lo = float(r.uniform(0.68, 0.9))
    return {
        "gain": r.uniform(0.72, 1.28, 3),  # per-channel colour cast
        "brightness": float(r.uniform(0.6, 1.3)),
        "contrast": float(r.uniform(0.65, 1.15)),
        "blur": float(r.uniform(0.0, 1.8)),  # Gaussian radius at the drawing scale
        "noise": float(r.uniform(2.0, 9.0)),  # std of sensor noise, grey levels
        "scale": (scale_lo, scale_lo + 0.12),  # figure size, of the frame
        "shift": float(r.uniform(0.03, 0.14)),  # max framing offset, of the frame
        "bg": (_colour(r, jitter=40.0), _colour(r, jitter=40.0)),
        "bg_kind": int(r.integers(3)),  # plain gradient, ground line, vertical structures
        "occlusion": float(r.uniform(0.1, 0.45)),  # probability per image
        "occluder": _colour(r, jitter=30.0),
        "back_prob": float(r.uniform(0.15, 0.85)),  # person seen from the back / vehicle facing left
        "squash": float(r.uniform(0.6, 1.0)),  # vehicle: horizontal foreshortening of an oblique view
    }


# ---- drawing ---------------------------------------------------------------------------

def _background(rng: np.random.Generator, cam: Attrs, h: int, w: int) -> Image.Image:
    c1, c2 = (np.array(c, dtype=np.float32) for c in cam["bg"])
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    img = np.broadcast_to(c1 * (1 - t) + c2 * t, (h, w, 3)).copy()
    if cam["bg_kind"] == 1:  # ground plane below a horizon that moves a little per image
        y = int(h * rng.uniform(0.55, 0.8))
        img[y:] = img[y:] * 0.6 + c2[::-1] * 0.4
    elif cam["bg_kind"] == 2:  # poles / windows
        period = max(4, int(w * rng.uniform(0.2, 0.4)))
        offset = int(rng.integers(period))
        cols = ((np.arange(w) + offset) % period) < period // 3
        img[:, cols] = img[:, cols] * 0.65
    img += rng.normal(0.0, 6.0, (h, w, 3)).astype(np.float32)  # texture
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _draw_person(img: Image.Image, p: Attrs, cam: Attrs, rng: np.random.Generator) -> None:
    h, w = img.height, img.width
    d = ImageDraw.Draw(img)
    back = rng.random() < cam["back_prob"]
    fh = h * p["height"] * rng.uniform(*cam["scale"])  # figure height
    cx = w / 2 + rng.uniform(-1, 1) * cam["shift"] * w
    y0 = (h - fh) / 2 + rng.uniform(-1, 1) * cam["shift"] * h
    r = 0.075 * fh  # head radius
    sw = p["build"] * fh * rng.uniform(0.93, 1.07)  # shoulder width
    t0 = y0 + 2.1 * r
    t1 = t0 + p["torso"] * (fh - 2.1 * r)
    foot = y0 + fh
    stride = rng.uniform(-0.12, 0.12) * sw
    leg_w = 0.36 * sw
    # legs and shoes
    for side in (-1, 1):
        lx = cx + side * (0.25 * sw) + side * stride
        d.rectangle([lx - leg_w / 2, t1, lx + leg_w / 2, foot - 0.03 * fh], fill=p["skin"])
        trouser_end = {0: foot - 0.03 * fh, 1: t1 + 0.45 * (foot - t1), 2: t1}[p["bottom_kind"]]
        if p["bottom_kind"] != 2:
            d.rectangle([lx - leg_w / 2, t1, lx + leg_w / 2, trouser_end], fill=p["bottom"])
        d.rectangle([lx - leg_w / 2 - 1, foot - 0.04 * fh, lx + leg_w / 2 + 1, foot], fill=p["shoes"])
    if p["bottom_kind"] == 2:  # skirt
        sl = t1 + 0.4 * (foot - t1)
        d.polygon([(cx - 0.45 * sw, t1), (cx + 0.45 * sw, t1), (cx + 0.62 * sw, sl), (cx - 0.62 * sw, sl)],
                  fill=p["bottom"])
    # arms
    arm_w = 0.2 * sw
    for side in (-1, 1):
        swing = rng.uniform(-0.06, 0.06) * fh
        ax = cx + side * (sw / 2 + arm_w / 2 - 1)
        d.rectangle([ax - arm_w / 2, t0 + 1, ax + arm_w / 2, t1 + 0.05 * fh + swing], fill=p["top"])
        d.rectangle([ax - arm_w / 2, t1 + 0.05 * fh + swing, ax + arm_w / 2, t1 + 0.1 * fh + swing],
                    fill=p["skin"])
    # torso (with its pattern through a mask)
    torso = [(cx - sw / 2, t0), (cx + sw / 2, t0), (cx + 0.42 * sw, t1), (cx - 0.42 * sw, t1)]
    d.polygon(torso, fill=p["top"])
    pattern, period = p["pattern"], max(2.0, p["period"] * fh)
    if pattern in (1, 2, 3):
        layer = Image.new("RGB", (w, h), p["top"])
        ld = ImageDraw.Draw(layer)
        if pattern in (1, 3):
            for y in np.arange(t0, t1, period):
                ld.rectangle([0, y, w, y + period / 2], fill=p["pattern_colour"])
        if pattern in (2, 3):
            for x in np.arange(cx - sw / 2, cx + sw / 2, period):
                ld.rectangle([x, t0, x + period / 2, t1], fill=p["pattern_colour"])
        mask = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask).polygon(torso, fill=255)
        img.paste(layer, (0, 0), mask)
    elif pattern == 4 and not back:  # chest logo, seen from the front only
        s = 0.28 * sw
        ly = t0 + 0.3 * (t1 - t0)
        d.ellipse([cx - s, ly - s, cx + s, ly + s], fill=p["pattern_colour"])
    # accessories
    if p["bag"] == 1:
        if back:
            d.rectangle([cx - 0.36 * sw, t0 + 0.08 * fh * 0.3, cx + 0.36 * sw, t1 - 0.15 * (t1 - t0)],
                        fill=p["bag_colour"])
        else:
            for side in (-1, 1):
                d.line([(cx + side * 0.3 * sw, t0), (cx + side * 0.22 * sw, t1 - 0.2 * (t1 - t0))],
                       fill=p["bag_colour"], width=max(1, int(0.07 * sw)))
    elif p["bag"] in (2, 3):
        side = -1 if p["bag"] == 2 else 1
        side = -side if back else side
        bx = cx + side * (sw / 2 + arm_w)
        d.rectangle([bx - 0.2 * sw, t1 - 0.05 * fh, bx + 0.2 * sw, t1 + 0.1 * fh], fill=p["bag_colour"])
    # head, hair, hat
    d.rectangle([cx - 0.35 * r, t0 - 0.25 * r, cx + 0.35 * r, t0 + 1], fill=p["skin"])
    head = [cx - r, y0, cx + r, y0 + 2 * r]
    if back:
        d.ellipse(head, fill=p["hair"])
    else:
        d.ellipse(head, fill=p["skin"])
        d.chord(head, 180, 360, fill=p["hair"])
    if p["long_hair"]:
        d.rectangle([cx - r, y0 + r, cx + r, t0 + (0.35 if back else 0.1) * (t1 - t0)] if back else
                    [cx - r, y0 + r, cx - 0.65 * r, t0 + 0.1 * (t1 - t0)], fill=p["hair"])
        if not back:
            d.rectangle([cx + 0.65 * r, y0 + r, cx + r, t0 + 0.1 * (t1 - t0)], fill=p["hair"])
    if p["hat"]:
        d.rectangle([cx - 1.05 * r, y0 - 0.2 * r, cx + 1.05 * r, y0 + 0.6 * r], fill=p["hat_colour"])
        d.rectangle([cx - 1.5 * r, y0 + 0.45 * r, cx + 1.5 * r, y0 + 0.75 * r], fill=p["hat_colour"])


def _box(d: ImageDraw.ImageDraw, xa: float, ya: float, xb: float, yb: float, fill: Colour) -> None:
    """A filled rectangle between two corners given in any order."""
    d.rectangle([min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)], fill=fill)


def _draw_vehicle(img: Image.Image, v: Attrs, cam: Attrs, rng: np.random.Generator) -> None:
    h, w = img.height, img.width
    d = ImageDraw.Draw(img)
    length_f, body_f, c0, c1, cab_f = _VEHICLE_TYPES[v["kind"]]
    length = w * length_f * v["stretch"] * rng.uniform(*cam["scale"])
    squash = cam["squash"] * rng.uniform(0.95, 1.05)
    lx = length * squash  # drawn length
    # Heights scale with the true length: an oblique view shortens the car, not its height.
    body_h, cab_h, wheel_r = body_f * length, cab_f * length, v["wheel"] * length
    facing_left = rng.random() < cam["back_prob"]
    x0 = (w - lx) / 2 + rng.uniform(-1, 1) * cam["shift"] * w
    ground = h / 2 + (body_h + cab_h) / 2 + rng.uniform(-1, 1) * cam["shift"] * h

    def X(f: float) -> float:  # position along the car (0 = front) -> pixel column
        return x0 + (f if facing_left else 1.0 - f) * lx

    body_top = ground - wheel_r * 0.6 - body_h
    cab = [(X(c0), body_top), (X(c0 + 0.08), body_top - cab_h), (X(c1 - 0.05), body_top - cab_h),
           (X(c1), body_top)]
    cab_colour = v["decal_colour"] if v["decal"] == 2 else v["body"]
    d.polygon(cab, fill=cab_colour)
    inset = 0.18 * cab_h
    d.polygon([(X(c0 + 0.04), body_top - 1), (X(c0 + 0.09), body_top - cab_h + inset),
               (X(c1 - 0.06), body_top - cab_h + inset), (X(c1 - 0.02), body_top - 1)], fill=v["tint"])
    d.line([(X((c0 + c1) / 2), body_top), (X((c0 + c1) / 2), body_top - cab_h + inset)], fill=cab_colour,
           width=max(1, int(0.015 * lx)))
    for fx, fy, colour in v["stickers"]:  # small marks on the windows
        sx, sy = X(c0 + 0.06 + fx * (c1 - c0 - 0.12)), body_top - cab_h + inset + fy * (cab_h - inset)
        s = max(1.0, 0.018 * lx)
        d.rectangle([sx - s, sy - s, sx + s, sy + s], fill=colour)
    if v["rack"]:
        _box(d, X(c0 + 0.1), body_top - cab_h - 0.05 * length, X(c1 - 0.07), body_top - cab_h, (40, 40, 40))
    xs = sorted((X(0.0), X(1.0)))
    d.rounded_rectangle([xs[0], body_top, xs[1], ground - wheel_r * 0.6], radius=max(1, int(0.2 * body_h)),
                        fill=v["body"])
    if v["decal"] == 1:
        sy = body_top + 0.35 * body_h
        d.rectangle([xs[0], sy, xs[1], sy + 0.15 * body_h], fill=v["decal_colour"])
    elif v["decal"] == 3:
        d.rectangle([xs[0], body_top + 0.65 * body_h, xs[1], ground - wheel_r * 0.6], fill=v["decal_colour"])
    _box(d, X(0.0), body_top + 0.15 * body_h, X(0.04), body_top + 0.35 * body_h, (250, 240, 190))  # headlight
    for f in (0.18, 0.8):
        wx, wy = X(f), ground - wheel_r
        d.ellipse([wx - wheel_r * squash, wy - wheel_r, wx + wheel_r * squash, wy + wheel_r], fill=(15, 15, 15))
        d.ellipse([wx - 0.5 * wheel_r * squash, wy - 0.5 * wheel_r, wx + 0.5 * wheel_r * squash,
                   wy + 0.5 * wheel_r], fill=v["rim"])


def _occlude(img: Image.Image, cam: Attrs, rng: np.random.Generator) -> None:
    if rng.random() >= cam["occlusion"]:
        return
    h, w = img.height, img.width
    colour = tuple(int(c) for c in np.clip(np.array(cam["occluder"]) + rng.normal(0, 15, 3), 0, 255))
    d = ImageDraw.Draw(img)
    if rng.random() < 0.5:  # something in front of the lower part (a car, a bench, a barrier)
        top = h * rng.uniform(0.6, 0.8)
        d.rectangle([-1, top, w, h], fill=colour)
    else:  # a pole or a passer-by at one side
        x = w * rng.uniform(0.0, 1.0)
        half = w * rng.uniform(0.1, 0.22)
        d.rectangle([x - half, -1, x + half, h], fill=colour)


def render(identity: Attrs, cam: Attrs, layout: str, height: int, width: int,
           rng: np.random.Generator) -> Image.Image:
    """One image (``height`` x ``width`` pixels, RGB) of an identity seen by a camera."""
    h, w = height * SUPERSAMPLE, width * SUPERSAMPLE
    img = _background(rng, cam, h, w)
    (_draw_person if layout == "market1501" else _draw_vehicle)(img, identity, cam, rng)
    _occlude(img, cam, rng)
    if cam["blur"] > 0.05:
        img = img.filter(ImageFilter.GaussianBlur(cam["blur"] * rng.uniform(0.7, 1.3)))
    x = np.asarray(img, dtype=np.float32)
    x = x * (cam["gain"] * cam["brightness"] * rng.uniform(0.9, 1.1)).astype(np.float32)
    mean = x.mean()
    x = (x - mean) * cam["contrast"] + mean
    x += rng.normal(0.0, cam["noise"], x.shape).astype(np.float32)
    img = Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))
    return img.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=None)


# ---- writing a dataset -------------------------------------------------------------------

def _file_name(layout: str, pid: int, cam: int, k: int) -> str:
    frame = 50 * (k + 1) + pid  # unique per (pid, cam, k), like a frame number
    if layout == "market1501":
        return f"{pid:04d}_c{cam + 1}s1_{frame:06d}_{k + 1:02d}.jpg"
    return f"{pid:04d}_c{cam + 1:03d}_{frame:08d}_0.jpg"


def _folders(layout: str) -> dict[str, str]:
    if layout == "market1501":
        return {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
    return {"train": "image_train", "query": "image_query", "gallery": "image_test"}


def _check(layout: str, ids: int, cams: int, images_per_id_cam: int, height: int, width: int, seed: int) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"synthetic layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    if ids < 4:
        raise ValueError(f"synthetic ids must be at least 4 (half train, half test), got {ids}")
    if cams < 2:
        raise ValueError(f"synthetic cams must be at least 2 (a query needs a match from another camera), got {cams}")
    if images_per_id_cam < 1:
        raise ValueError(f"synthetic images_per_id_cam must be positive, got {images_per_id_cam}")
    if height < 8 or width < 8:
        raise ValueError(f"synthetic height and width must be at least 8 pixels, got {height}x{width}")
    if seed < 0:
        raise ValueError(f"synthetic seed must not be negative, got {seed}")


def generate(out_dir: str | os.PathLike, layout: str = "market1501", ids: int = 60, cams: int = 4,
             images_per_id_cam: int = 3, height: int = 64, width: int = 32, seed: int = 0) -> Path:
    """Write a synthetic dataset into ``out_dir`` (created; it must be empty) and return its path.

    Writes ``ids * cams * images_per_id_cam`` JPEGs of ``height`` x ``width`` pixels, plus ``synthetic.json``
    (the parameters and the train/test identities). Identities are numbered 1..ids; ``ids // 2`` of them
    (chosen by the seed) are training identities. In the test half, image 0 of each (identity, camera) is
    a query and the others are gallery images; with one image per (identity, camera), one camera per
    identity gives the query and the others the gallery.
    """
    _check(layout, ids, cams, images_per_id_cam, height, width, seed)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"synthetic output folder is not empty: {out}")
    folders = _folders(layout)
    for sub in folders.values():
        (out / sub).mkdir(parents=True, exist_ok=True)
    attrs = _PERSON_ATTRS if layout == "market1501" else _VEHICLE_ATTRS
    identities = _identities(ids, attrs, seed)
    cameras = [_camera(seed, c) for c in range(cams)]
    perm = np.random.default_rng([seed, 0]).permutation(np.arange(1, ids + 1))
    train_ids = sorted(int(i) for i in perm[: ids // 2])
    test_ids = sorted(int(i) for i in perm[ids // 2:])
    train_set = set(train_ids)
    for pid in range(1, ids + 1):
        for cam in range(cams):
            for k in range(images_per_id_cam):
                if pid in train_set:
                    split = "train"
                elif images_per_id_cam > 1:
                    split = "query" if k == 0 else "gallery"
                else:
                    split = "query" if cam == pid % cams else "gallery"
                rng = np.random.default_rng([seed, 3, pid, cam, k])
                img = render(identities[pid - 1], cameras[cam], layout, height, width, rng)
                img.save(out / folders[split] / _file_name(layout, pid, cam, k), "JPEG", quality=JPEG_QUALITY)
    meta = {"generator_version": GENERATOR_VERSION, "layout": layout, "ids": ids, "cams": cams,
            "images_per_id_cam": images_per_id_cam, "height": height, "width": width, "seed": seed,
            "train_ids": train_ids, "test_ids": test_ids}
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    return out


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$MOREID_CACHE``, else ``~/.cache/moreid``."""
    if cache_dir:
        return Path(cache_dir)
    return Path(os.environ.get("MOREID_CACHE") or Path.home() / ".cache" / "moreid")


def cache_key(cfg: SyntheticConfig) -> str:
    """Folder name of a generated dataset: every parameter plus the generator version."""
    return (f"{cfg.layout}-ids{cfg.ids}-cams{cfg.cams}-n{cfg.images_per_id_cam}-{cfg.height}x{cfg.width}"
            f"-seed{cfg.seed}-v{GENERATOR_VERSION}")


def ensure(cfg: SyntheticConfig, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of the dataset ``cfg`` describes, generated on first use.

    It is generated into a temporary folder beside the target and renamed into place, so a folder under
    the cache is always complete; when several processes race, the first rename wins and the others
    discard their copy.
    """
    _check(cfg.layout, cfg.ids, cfg.cams, cfg.images_per_id_cam, cfg.height, cfg.width, cfg.seed)
    parent = cache_root(cache_dir) / "synthetic"
    target = parent / cache_key(cfg)
    if (target / META_FILE).is_file():
        return target
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=parent))
    try:
        generate(tmp, **asdict(cfg))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / META_FILE).is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reid_core.data.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (created; must be empty)")
    parser.add_argument("--layout", choices=LAYOUTS, default="market1501")
    parser.add_argument("--ids", type=int, default=60, help="identities (half train, half test)")
    parser.add_argument("--cams", type=int, default=4)
    parser.add_argument("--images-per-id-cam", type=int, default=3)
    parser.add_argument("--height", type=int, default=64, help="pixels")
    parser.add_argument("--width", type=int, default=32, help="pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out = generate(args.out, args.layout, args.ids, args.cams, args.images_per_id_cam, args.height,
                       args.width, args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n = args.ids * args.cams * args.images_per_id_cam
    print(f"wrote {n} images ({args.layout} layout) to {out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
