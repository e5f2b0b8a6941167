"""EvalNorm digits: a small, deterministic object-detection dataset in COCO format.

Handwritten digits from scikit-learn (``sklearn.datasets.load_digits``: 8x8 images, 16 gray levels)
are upscaled, colored and pasted without overlap on smooth, noisy RGB backgrounds, 1 to 3 per image
(the "digits" style). The "photo" style pastes 1 to 6 smaller digits on crops of scikit-learn's
two sample photographs (``STYLES``).
Nothing is downloaded: the images are generated on first use under
``$DETECTRON2_DATASETS/evalnorm_digits`` (default ``./datasets``)::

    evalnorm_digits/{train,val}/*.png
    evalnorm_digits/annotations/{train,val}.json
    evalnorm_digits/info.json

Digit d has COCO category id d + 1 and class name "d". Each annotation has the digit's box and,
as "segmentation", its own pixels as COCO RLE (read them with ``INPUT.MASK_FORMAT "bitmask"``). Train and val paste disjoint digit samples
(the even and the odd indices of ``load_digits``). ``register_digits`` registers them in detectron2
as ``evalnorm_digits_train`` and ``evalnorm_digits_val``. ``write_coco2014_layout`` writes a tiny
stand-in for COCO 2014 from the same generator, to exercise detectron2's builtin ``coco_2014_*``
datasets.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import cv2
import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

VERSION = 4  # 4: instance masks (RLE) in the annotations
DATASET_DIR = "evalnorm_digits"
SPLITS = ("train", "val")
CLASSES = [str(d) for d in range(10)]
DEFAULT_NUM_IMAGES = {"train": 1000, "val": 200}
DEFAULT_IMAGE_SIZE = 128
DEFAULT_SEED = 0
MAX_DIGITS = 3
DIGIT_SIZE = (0.25, 0.45)
ALPHA_MIN = 0.25
CONTRAST = 64
PIXEL_NOISE = 6.0
BACKGROUND_TINT = 24.0
MAX_TRIES = 50


class Style(NamedTuple):
    """How images are drawn: 1 to ``max_digits`` digits of sides ``digit_size`` x the image size
    on a ``background``, "smooth" (nearly gray, noisy) or "photo" (a crop of ``photo_crop`` x the
    image size of one of scikit-learn's sample photographs, resized to the image, maybe
    mirrored, noisy)."""

    max_digits: int = MAX_DIGITS
    digit_size: tuple = DIGIT_SIZE
    background: str = "smooth"
    photo_crop: tuple = (0.5, 2.5)


STYLES = {
    "digits": Style(),
    # Cluttered backgrounds, more and smaller digits (15-32 px at 128): a harder task.
    "photo": Style(max_digits=6, digit_size=(0.12, 0.25), background="photo"),
}


def check_style(style: str) -> Style:
    """The ``Style`` named ``style``; ValueError naming the known ones otherwise."""
    if style not in STYLES:
        raise ValueError(f"style={style!r}: expected one of {sorted(STYLES)}")
    return STYLES[style]


class Rendered(NamedTuple):
    """One generated image with its N digits.

    image, background: (H, W, 3) uint8 RGB, with and without the digits.
    boxes: (N, 4) int64 tight boxes of the masks, XYWH in pixels.
    labels: (N,) int64 digit classes 0-9.
    masks: (N, H, W) bool, the pixels each digit painted.
    """

    image: np.ndarray
    background: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    masks: np.ndarray


def datasets_root() -> str:
    """``$DETECTRON2_DATASETS`` (default ``datasets``), read at each call as detectron2 does."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def load_digit_samples(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The digit samples of ``split``: images (M, 8, 8) float32 in [0, 1] and labels (M,) int64.

    "train" takes the even indices of ``load_digits``, "val" the odd ones.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    start = SPLITS.index(split)
    images = (digits.images[start::2] / 16.0).astype(np.float32)
    return images, digits.target[start::2].astype(np.int64)


@functools.lru_cache(maxsize=1)
def _photographs() -> tuple[np.ndarray, ...]:
    """scikit-learn's two sample photographs (china.jpg, flower.jpg): (427, 640, 3) float32."""
    from sklearn.datasets import load_sample_images

    return tuple(image.astype(np.float32) for image in load_sample_images().images)


def _background(rng: np.random.Generator, s: int, style: Style) -> np.ndarray:
    """A (s, s, 3) float32 background in [0, 255] drawn as ``style`` says."""
    if style.background == "photo":
        photo = _photographs()[int(rng.integers(2))]
        height, width = photo.shape[:2]
        side = min(int(rng.integers(*(round(f * s) for f in style.photo_crop))), height)
        top, left = int(rng.integers(height - side + 1)), int(rng.integers(width - side + 1))
        crop = photo[top : top + side, left : left + side]
        background = cv2.resize(crop, (s, s), interpolation=cv2.INTER_AREA)
        if rng.uniform() < 0.5:
            background = background[:, ::-1]
    else:
        # Nearly gray: the digits' shapes, not color clutter, carry the task.
        shape = (*rng.integers(2, 6, size=2), 3)
        gray = rng.uniform(48, 208)
        grid = (gray + rng.uniform(-BACKGROUND_TINT, BACKGROUND_TINT, shape)).astype(np.float32)
        background = cv2.resize(grid, (s, s), interpolation=cv2.INTER_CUBIC)
    return np.clip(background + rng.normal(0, PIXEL_NOISE, (s, s, 3)), 0, 255)


def render_image(
    rng: np.random.Generator,
    samples: np.ndarray,
    labels: np.ndarray,
    image_size: int,
    style: Style = STYLES["digits"],
) -> Rendered:
    """Pastes 1 to ``style.max_digits`` random ``samples`` (M, 8, 8) with ``labels`` (M,) on a
    background.

    A digit is resized bilinearly to a side drawn from ``style.digit_size * image_size`` (32-58
    px at 128 in the "digits" style); its intensity below ALPHA_MIN is cut to 0 and the rest is
    its alpha mask. Each channel of its color lies at least CONTRAST (or as far as 0-255 allows)
    from the background under it. A digit that finds no free place in MAX_TRIES draws is left
    out.
    """
    s = image_size
    background = _background(rng, s, style)
    image = background.copy()
    min_side, max_side = (round(f * s) for f in style.digit_size)
    boxes, classes, masks = [], [], []
    for _ in range(int(rng.integers(1, style.max_digits + 1))):
        k = int(rng.integers(len(samples)))
        side = int(rng.integers(min_side, max_side + 1))
        alpha = cv2.resize(samples[k], (side, side), interpolation=cv2.INTER_LINEAR)
        alpha[alpha < ALPHA_MIN] = 0
        ys, xs = np.nonzero(alpha)
        alpha = alpha[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1, None]
        h, w = alpha.shape[:2]
        for _ in range(MAX_TRIES):
            x, y = int(rng.integers(s - w + 1)), int(rng.integers(s - h + 1))
            if all(
                x + w <= bx or bx + bw <= x or y + h <= by or by + bh <= y
                for bx, by, bw, bh in boxes
            ):
                break
        else:
            continue
        under = background[y : y + h, x : x + w][alpha[..., 0] > 0]
        lo, hi = under.min(0), under.max(0)
        u = rng.uniform(size=3)
        color = np.where(
            lo > 255 - hi,
            u * np.maximum(lo - CONTRAST, 0),
            255 - u * np.maximum(255 - hi - CONTRAST, 0),
        )
        patch = image[y : y + h, x : x + w]
        image[y : y + h, x : x + w] = patch * (1 - alpha) + color * alpha
        mask = np.zeros((s, s), bool)
        mask[y : y + h, x : x + w] = alpha[..., 0] > 0
        boxes.append((x, y, w, h))
        classes.append(labels[k])
        masks.append(mask)
    return Rendered(
        np.rint(image).astype(np.uint8),
        np.rint(background).astype(np.uint8),
        np.array(boxes, np.int64).reshape(-1, 4),
        np.array(classes, np.int64),
        np.array(masks, bool).reshape(-1, s, s),
    )


def render_split(
    split: str, num_images: int, image_size: int, seed: int, style: str = "digits"
) -> Iterator[Rendered]:
    """Yields ``num_images`` images of the digit samples of ``split`` in ``style`` (a key of
    ``STYLES``), from ``default_rng(seed)``."""
    drawn = check_style(style)
    rng = np.random.default_rng(seed)
    samples, labels = load_digit_samples(split)
    for _ in range(num_images):
        yield render_image(rng, samples, labels, image_size, drawn)


def _write_split(
    renders: Iterable[Rendered], image_dir: str, file_name: str, first_image_id: int
) -> tuple[list[dict], list[dict]]:
    """Saves ``renders`` as PNG in ``image_dir``, named ``file_name.format(image_id)``, and
    returns their COCO "images" and "annotations" (ids from ``first_image_id`` and 1). Each
    annotation's "segmentation" is the digit's own pixels as RLE (``mask_rle``); its "area"
    stays the box's, as in the box-only versions, so box evaluation is unchanged."""
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for image_id, r in enumerate(renders, first_image_id):
        name = file_name.format(image_id)
        if not cv2.imwrite(os.path.join(image_dir, name), r.image[:, :, ::-1]):
            raise OSError(f"cannot write {os.path.join(image_dir, name)}")
        height, width = r.image.shape[:2]
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
        for (x, y, w, h), label, mask in zip(r.boxes.tolist(), r.labels.tolist(), r.masks):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label + 1,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "segmentation": mask_rle(mask),
                }
            )
    return images, annotations


def mask_rle(mask: np.ndarray) -> dict:
    """COCO's compressed RLE of an (H, W) bool mask: {"size": [H, W], "counts": str}."""
    rle = mask_util.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(n) for n in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _write_json(path: str, images: list, annotations: list, categories: list) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    coco = {
        "info": {"description": "EvalNorm digits", "version": str(VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    with open(path, "w") as f:
        json.dump(coco, f)


def _read_info(dataset_dir: str) -> dict | None:
    try:
        with open(os.path.join(dataset_dir, "info.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def split_paths(dataset_dir: str, split: str) -> tuple[str, str]:
    """(json_file, image_root) of ``split`` in ``dataset_dir``."""
    json_file = os.path.join(dataset_dir, "annotations", f"{split}.json")
    return json_file, os.path.join(dataset_dir, split)


def generate_digits(
    root: str | None = None,
    num_train: int = DEFAULT_NUM_IMAGES["train"],
    num_val: int = DEFAULT_NUM_IMAGES["val"],
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = DEFAULT_SEED,
    style: str = "digits",
) -> str:
    """Makes ``<root>/evalnorm_digits`` (root defaults to ``datasets_root()``) in ``style`` (a
    key of ``STYLES``); returns its path.

    Does nothing if its ``info.json`` already records VERSION and these arguments. Otherwise
    writes the dataset into a temporary sibling folder and renames it into place, so that
    concurrent callers never see it half-written; a folder left by other arguments or another
    VERSION is replaced (only that replacement can race with concurrent readers). Split k uses
    ``np.random.default_rng(seed + k)``.
    """
    root = datasets_root() if root is None else root
    final = os.path.join(root, DATASET_DIR)
    info = {
        "version": VERSION,
        "num_images": {"train": num_train, "val": num_val},
        "image_size": image_size,
        "seed": seed,
        **_style_info(style),
    }
    if _read_info(final) == info:
        return final
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{DATASET_DIR}.", dir=root)
    try:
        categories = [
            {"id": d + 1, "name": name, "supercategory": "digit"} for d, name in enumerate(CLASSES)
        ]
        for k, split in enumerate(SPLITS):
            json_file, image_root = split_paths(tmp, split)
            renders = render_split(split, info["num_images"][split], image_size, seed + k, style)
            _write_json(json_file, *_write_split(renders, image_root, "{:06d}.png", 1), categories)
        with open(os.path.join(tmp, "info.json"), "w") as f:
            json.dump(info, f)
        if os.path.exists(final) and _read_info(final) != info:
            with contextlib.suppress(FileNotFoundError):
                os.replace(final, tmp + ".stale")
            shutil.rmtree(tmp + ".stale", ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if _read_info(final) != info:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def generate_extra_split(
    dataset_dir: str,
    digit_split: str,
    num_images: int,
    image_size: int,
    seed: int,
    style: str = "digits",
) -> tuple[str, str]:
    """Writes ``num_images`` images of the digit samples of ``digit_split`` ("train" or "val"),
    in ``style``, from ``default_rng(seed)``, to ``<dataset_dir>/images`` with COCO annotations in
    ``<dataset_dir>/annotations.json`` (e.g. a validation split of images in neither the train
    nor the val split, with a seed of its own); nothing is written when its ``info.json``
    records these arguments. Returns (json_file, image_root)."""
    info = {
        "version": VERSION,
        "digit_split": digit_split,
        "num_images": num_images,
        "image_size": image_size,
        "seed": seed,
        **_style_info(style),
    }
    json_file = os.path.join(dataset_dir, "annotations.json")
    image_root = os.path.join(dataset_dir, "images")
    if _read_info(dataset_dir) == info:
        return json_file, image_root
    shutil.rmtree(dataset_dir, ignore_errors=True)
    categories = [
        {"id": d + 1, "name": name, "supercategory": "digit"} for d, name in enumerate(CLASSES)
    ]
    renders = render_split(digit_split, num_images, image_size, seed, style)
    _write_json(json_file, *_write_split(renders, image_root, "{:06d}.png", 1), categories)
    with open(os.path.join(dataset_dir, "info.json"), "w") as f:  # last: marks it complete
        json.dump(info, f)
    return json_file, image_root


def _style_info(style: str) -> dict:
    # The default style is left out, so datasets generated before styles existed stay valid.
    check_style(style)
    return {} if style == "digits" else {"style": style}


def _load_digits_split(name: str, split: str, kwargs: dict) -> list[dict]:
    json_file, image_root = split_paths(generate_digits(**kwargs), split)
    if MetadataCatalog.get(name).get("json_file") != json_file:
        _set_metadata(name, json_file, image_root)
    return load_coco_json(json_file, image_root, name)


def _set_metadata(name: str, json_file: str, image_root: str) -> None:
    if name in MetadataCatalog:
        MetadataCatalog.remove(name)
    MetadataCatalog.get(name).set(
        json_file=json_file,
        image_root=image_root,
        evaluator_type="coco",
        generated_at_first_use=True,  # its files may not exist before its loader runs
        thing_classes=list(CLASSES),
        thing_dataset_id_to_contiguous_id={d + 1: d for d in range(len(CLASSES))},
    )


def register_digits(
    num_train: int = DEFAULT_NUM_IMAGES["train"],
    num_val: int = DEFAULT_NUM_IMAGES["val"],
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = DEFAULT_SEED,
) -> None:
    """Registers ``evalnorm_digits_train`` and ``evalnorm_digits_val``, replacing earlier ones.

    Their loaders call ``generate_digits`` under the ``$DETECTRON2_DATASETS`` of the moment, then
    ``load_coco_json``. The metadata's ``json_file`` and ``image_root`` are set from
    ``$DETECTRON2_DATASETS`` now, and reset by a loader that finds the variable changed.
    """
    kwargs = {"num_train": num_train, "num_val": num_val, "image_size": image_size, "seed": seed}
    dataset_dir = os.path.join(datasets_root(), DATASET_DIR)
    for split in SPLITS:
        name = f"evalnorm_digits_{split}"
        if name in DatasetCatalog:
            DatasetCatalog.remove(name)
        DatasetCatalog.register(
            name, lambda name=name, split=split: _load_digits_split(name, split, kwargs)
        )
        _set_metadata(name, *split_paths(dataset_dir, split))


def write_coco2014_layout(
    root: str, num_train: int = 8, num_val: int = 4, image_size: int = 128, seed: int = DEFAULT_SEED
) -> str:
    """Writes a tiny stand-in for COCO 2014 under ``<root>/coco``; returns that path.

    The layout is what detectron2's builtin ``coco_2014_train``, ``coco_2014_valminusminival``
    and ``coco_2014_minival`` expect: ``num_train`` images in ``train2014`` and ``num_val``
    images for each of the two val sets in ``val2014`` (distinct file names and image ids), and
    ``annotations/instances_{train,valminusminival,minival}2014.json``. The JSONs list the 80
    COCO thing categories with their ids; digit d is annotated as COCO id d + 1 (0 person,
    1 bicycle, 2 car, 3 motorcycle, 4 airplane, 5 bus, 6 train, 7 truck, 8 boat, 9 traffic light).
    Writes in place, overwriting; the sets draw from ``default_rng(seed + k)``, k = 0, 1, 2.
    """
    coco = os.path.join(root, "coco")
    categories = [{"id": c["id"], "name": c["name"]} for c in COCO_CATEGORIES if c["isthing"]]
    sets = [
        ("train", "train2014", "instances_train2014.json", num_train, 1),
        ("val", "val2014", "instances_valminusminival2014.json", num_val, num_train + 1),
        ("val", "val2014", "instances_minival2014.json", num_val, num_train + num_val + 1),
    ]
    for k, (split, image_dir, json_name, num_images, first_id) in enumerate(sets):
        renders = render_split(split, num_images, image_size, seed + k)
        file_name = "COCO_" + image_dir + "_{:012d}.png"
        images, annotations = _write_split(
            renders, os.path.join(coco, image_dir), file_name, first_id
        )
        _write_json(os.path.join(coco, "annotations", json_name), images, annotations, categories)
    return coco
