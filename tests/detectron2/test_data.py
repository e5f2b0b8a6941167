"""The bundled digits dataset: generation, determinism, COCO files and detectron2 registration."""

import importlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.data.datasets.builtin import _PREDEFINED_SPLITS_COCO
from pycocotools.coco import COCO

import evalnorm_det.data
from evalnorm_det.data import digits

pytest.importorskip("sklearn")

SMALL = {"num_train": 6, "num_val": 6, "image_size": 64}


@pytest.fixture
def env(monkeypatch):
    """monkeypatch, then the default registration back under the original environment."""
    yield monkeypatch
    monkeypatch.undo()
    digits.register_digits()


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_rgb(path):
    return cv2.imread(path, cv2.IMREAD_UNCHANGED)[:, :, ::-1]


def overlaps(a, b):
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def check_coco(json_file, image_root, num_images, category_ids, max_digits=digits.MAX_DIGITS):
    """Checks a COCO json written by the generator; returns its dict."""
    coco = read_json(json_file)
    assert len(coco["images"]) == num_images
    image_ids = [im["id"] for im in coco["images"]]
    assert len(set(image_ids)) == num_images and min(image_ids) >= 1
    ann_ids = [a["id"] for a in coco["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids) and min(ann_ids) >= 1
    boxes = {i: [] for i in image_ids}
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        assert a["category_id"] in category_ids
        assert a["area"] == w * h and a["iscrowd"] == 0 and w > 0 and h > 0
        boxes[a["image_id"]].append(a["bbox"])
    for im in coco["images"]:
        assert read_rgb(os.path.join(image_root, im["file_name"])).shape == (
            im["height"],
            im["width"],
            3,
        )
        b = boxes[im["id"]]
        assert 1 <= len(b) <= max_digits
        for i, (x, y, w, h) in enumerate(b):
            assert x >= 0 and y >= 0 and x + w <= im["width"] and y + h <= im["height"]
            assert not any(overlaps(b[i], other) for other in b[i + 1 :])
    COCO(json_file)
    return coco


@pytest.mark.parametrize("style", sorted(digits.STYLES))
def test_render_masks_boxes_and_pixels_agree(style):
    counts = []
    for r in digits.render_split("train", 30, 64, seed=3, style=style):
        counts.append(len(r.boxes))
        assert r.image.dtype == np.uint8 and r.image.shape == (64, 64, 3)
        assert r.masks.sum(0).max() <= 1
        assert np.array_equal((r.image != r.background).any(-1), r.masks.any(0))
        assert set(r.labels.tolist()) <= set(range(10))
        for (x, y, w, h), mask in zip(r.boxes.tolist(), r.masks):
            ys, xs = np.nonzero(mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
    assert min(counts) >= 1 and max(counts) == digits.STYLES[style].max_digits


def test_photo_style_draws_small_digits_on_photographs():
    smooth = list(digits.render_split("train", 40, 128, seed=0))
    photo = list(digits.render_split("train", 40, 128, seed=0, style="photo"))
    sides = np.concatenate([r.boxes[:, 2:].max(1) for r in photo])
    assert 15 <= sides.min() and sides.max() <= 32  # 0.12-0.25 of 128 px
    assert np.mean([len(r.boxes) for r in photo]) > np.mean([len(r.boxes) for r in smooth])

    def detail(renders):
        # Mean difference of horizontal neighbours in the backgrounds averaged over 4x4 blocks
        # (which averages the pixel noise away): photographs have edges, smooth ones barely.
        small = [
            cv2.resize(r.background.astype(np.float32), (32, 32), interpolation=cv2.INTER_AREA)
            for r in renders
        ]
        return np.mean([np.abs(np.diff(b, axis=1)).mean() for b in small])

    assert detail(photo) > 3 * detail(smooth)


def test_unknown_style_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="style='sketch'.*'digits', 'photo'"):
        next(digits.render_split("train", 1, 64, seed=0, style="sketch"))
    with pytest.raises(ValueError, match="style='sketch'"):
        digits.generate_digits(str(tmp_path), 2, 2, 32, style="sketch")
    assert not any(tmp_path.iterdir())


def test_a_dataset_of_another_style_is_regenerated(tmp_path):
    first = digits.generate_digits(str(tmp_path), 2, 2, 32)
    with open(os.path.join(first, "info.json")) as f:
        assert "style" not in json.load(f)  # as written before there were styles
    photo = digits.generate_digits(str(tmp_path), 2, 2, 32, style="photo")
    with open(os.path.join(photo, "info.json")) as f:
        assert json.load(f)["style"] == "photo"
    json_file, image_root = digits.split_paths(photo, "train")
    check_coco(json_file, image_root, 2, set(range(1, 11)), max_digits=6)


def test_train_and_val_use_disjoint_samples():
    train, train_labels = digits.load_digit_samples("train")
    val, val_labels = digits.load_digit_samples("val")
    assert train.shape[1:] == (8, 8) and len(train) + len(val) == 1797
    assert set(train_labels.tolist()) == set(val_labels.tolist()) == set(range(10))
    rows = {row.tobytes() for row in train}
    assert not any(row.tobytes() in rows for row in val)


def test_generate_writes_coco_and_is_deterministic(tmp_path):
    a = digits.generate_digits(str(tmp_path / "a"), **SMALL, seed=0)
    b = digits.generate_digits(str(tmp_path / "b"), **SMALL, seed=0)
    other = digits.generate_digits(str(tmp_path / "c"), **SMALL, seed=1)
    assert os.listdir(tmp_path / "a") == [digits.DATASET_DIR]
    for k, split in enumerate(digits.SPLITS):
        json_a, root_a = digits.split_paths(a, split)
        json_b, root_b = digits.split_paths(b, split)
        coco = check_coco(json_a, root_a, 6, set(range(1, 11)))
        assert [c["name"] for c in coco["categories"]] == digits.CLASSES
        with open(json_a, "rb") as fa, open(json_b, "rb") as fb:
            assert fa.read() == fb.read()
        with open(json_a, "rb") as fa, open(digits.split_paths(other, split)[0], "rb") as fc:
            assert fa.read() != fc.read()
        renders = list(digits.render_split(split, 6, 64, seed=k))
        for im, r in zip(coco["images"], renders):
            pixels = read_rgb(os.path.join(root_a, im["file_name"]))
            assert np.array_equal(pixels, r.image)
            assert np.array_equal(pixels, read_rgb(os.path.join(root_b, im["file_name"])))
            anns = [x for x in coco["annotations"] if x["image_id"] == im["id"]]
            assert [x["bbox"] for x in anns] == r.boxes.tolist()
            assert [x["category_id"] - 1 for x in anns] == r.labels.tolist()


def test_generate_is_idempotent_and_regenerates_when_stale(tmp_path, monkeypatch):
    dataset_dir = digits.generate_digits(str(tmp_path), **SMALL)
    json_file, image_root = digits.split_paths(dataset_dir, "val")
    files = [
        os.path.join(dataset_dir, "info.json"),
        json_file,
        os.path.join(image_root, "000001.png"),
    ]
    for f in files:
        os.utime(f, (0, 0))
    with monkeypatch.context() as m:
        m.setattr(digits, "render_split", None)
        assert digits.generate_digits(str(tmp_path), **SMALL) == dataset_dir
    assert all(os.path.getmtime(f) == 0 for f in files)

    info = read_json(files[0])
    with open(files[0], "w") as f:
        json.dump({**info, "version": digits.VERSION - 1}, f)
    os.utime(files[1], (0, 0))
    digits.generate_digits(str(tmp_path), **SMALL)
    assert os.path.getmtime(files[1]) > 0
    assert read_json(files[0]) == info
    assert os.listdir(tmp_path) == [digits.DATASET_DIR]


def test_concurrent_generation(tmp_path):
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(digits.generate_digits, str(tmp_path), **SMALL) for _ in range(4)]
        results = [f.result() for f in futures]
    assert len(set(results)) == 1
    assert os.listdir(tmp_path) == [digits.DATASET_DIR]
    check_coco(*digits.split_paths(results[0], "train"), 6, set(range(1, 11)))


def test_registered_datasets(tmp_path, env):
    env.setenv("DETECTRON2_DATASETS", str(tmp_path))
    importlib.reload(evalnorm_det.data)
    for split, num_images in digits.DEFAULT_NUM_IMAGES.items():
        name = f"evalnorm_digits_{split}"
        dicts = DatasetCatalog.get(name)
        assert len(dicts) == num_images
        assert all(os.path.isfile(d["file_name"]) for d in dicts[:5])
        assert dicts[0]["file_name"].startswith(str(tmp_path))
        assert dicts[0]["height"] == dicts[0]["width"] == digits.DEFAULT_IMAGE_SIZE
        categories = {a["category_id"] for d in dicts for a in d["annotations"]}
        assert categories == set(range(10))
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == digits.CLASSES and meta.evaluator_type == "coco"
        assert meta.json_file == digits.split_paths(str(tmp_path / "evalnorm_digits"), split)[0]
        COCO(meta.json_file)


def test_metadata_follows_datasets_root(tmp_path, env):
    env.setenv("DETECTRON2_DATASETS", str(tmp_path / "a"))
    digits.register_digits(**SMALL)
    digits.register_digits(**SMALL)
    assert MetadataCatalog.get("evalnorm_digits_val").json_file.startswith(str(tmp_path / "a"))
    env.setenv("DETECTRON2_DATASETS", str(tmp_path / "b"))
    dicts = DatasetCatalog.get("evalnorm_digits_val")
    assert len(dicts) == 6 and dicts[0]["file_name"].startswith(str(tmp_path / "b"))
    assert MetadataCatalog.get("evalnorm_digits_val").json_file.startswith(str(tmp_path / "b"))
    assert not (tmp_path / "a").exists()


def test_coco2014_layout_loads_with_builtin_metadata(tmp_path):
    coco_dir = digits.write_coco2014_layout(str(tmp_path), num_train=4, num_val=3, image_size=64)
    assert coco_dir == str(tmp_path / "coco")
    splits = _PREDEFINED_SPLITS_COCO["coco"]
    counts = {"coco_2014_train": 4, "coco_2014_valminusminival": 3, "coco_2014_minival": 3}
    thing_ids = set(MetadataCatalog.get("coco_2014_train").thing_dataset_id_to_contiguous_id)
    file_names = set()
    for name, num_images in counts.items():
        image_root, json_file = (os.path.join(tmp_path, p) for p in splits[name])
        coco = check_coco(json_file, image_root, num_images, set(range(1, 11)))
        assert {c["id"] for c in coco["categories"]} == thing_ids
        dicts = load_coco_json(json_file, image_root, name)
        assert len(dicts) == num_images
        assert {a["category_id"] for d in dicts for a in d["annotations"]} <= set(range(10))
        file_names |= {d["file_name"] for d in dicts}
        assert len(MetadataCatalog.get(name).thing_classes) == 80
    assert len(file_names) == sum(counts.values())
