"""The CPU demos' data, all drawn from the 1,797 scanned 8x8 handwritten digits that scikit-learn ships
(UCI "Optical Recognition of Handwritten Digits", CC BY 4.0), so that every demo runs offline:

  * `DigitsDataset`: the digits themselves, for `train.py`'s classification demo;
  * `write_digit_scenes`: an ADE20k-format folder of digits drawn in four ink colours, for `eval_seg.py`;
  * `write_digit_coco`: a COCO-format set of the same scenes, one instance per digit, for `eval_det.py`.
"""
import json
import os

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import Dataset


class DigitsDataset(Dataset):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes; UCI "Optical
    Recognition of Handwritten Digits", CC BY 4.0) as RGB images; every 5th image is validation."""

    def __init__(self, train):
        digits = load_digits()
        keep = np.arange(len(digits.target)) % 5 != 0 if train else np.arange(len(digits.target)) % 5 == 0
        self.images = (digits.images[keep] * (255 / 16)).astype(np.uint8)
        self.targets = digits.target[keep].tolist()
        self.classes = [str(i) for i in range(10)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return Image.fromarray(self.images[i]).convert("RGB"), self.targets[i]


# ----------------------------------------------------------------------------------------------
# Scenes: real handwritten digits scattered on a canvas, labelled to the pixel


INK_COLOURS = np.array([[230, 60, 50], [60, 200, 70], [70, 110, 240], [235, 215, 60]])  # red green blue yellow


def render_digit_scene(rng, digits, size, count):
    """An RGB scene of `count` scanned digits (sides 3/8 to 1/2 of the canvas) in the four ink colours
    on a dark noisy background; returns the image and one (ink mask, colour index) per digit, the
    later digits drawn over the earlier ones."""
    rgb = rng.normal(40, 12, (size, size, 1)).clip(0, 255).repeat(3, axis=2)
    instances = []
    for _ in range(count):
        j, colour = rng.integers(len(digits.target)), int(rng.integers(len(INK_COLOURS)))
        side = int(rng.integers(3 * size // 8, size // 2 + 1))   # 24-32 px on a 64 px canvas
        glyph = np.asarray(Image.fromarray((digits.images[j] * 255 / 16).astype(np.uint8))
                           .resize((side, side), Image.BILINEAR)) / 255.0
        top, left = rng.integers(0, size - side, 2)
        mask = np.zeros((size, size), bool)
        mask[top:top + side, left:left + side] = glyph > 0.4
        rgb[mask] = glyph[mask[top:top + side, left:left + side], None] * INK_COLOURS[colour]
        for earlier in instances:
            earlier[0][mask] = False
        instances.append((mask, colour))
    return rgb.clip(0, 255).astype(np.uint8), instances


def write_digit_scenes(root, n_train=160, n_val=20, size=64, seed=0):
    """A tiny ADE-format folder from scikit-learn's scanned 8x8 digits: each image holds 1-3 digits in
    one of four ink colours. Annotation 1 is background and 2 + k the ink of colour k (5 classes):
    thin strokes, so boundaries decide the score."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    for split, count in (("training", n_train), ("validation", n_val)):
        for kind in ("images", "annotations"):
            os.makedirs(os.path.join(root, kind, split), exist_ok=True)
        for k in range(count):
            rgb, instances = render_digit_scene(rng, digits, size, rng.integers(1, 4))
            label = np.ones((size, size), np.uint8)
            for mask, colour in instances:
                label[mask] = 2 + colour
            name = f"ADE_{'train' if split == 'training' else 'val'}_{k:08d}"
            Image.fromarray(rgb).save(os.path.join(root, "images", split, name + ".jpg"), quality=95)
            Image.fromarray(label).save(os.path.join(root, "annotations", split, name + ".png"))
    return root


DEMO_CATEGORIES = {1: "red", 3: "green", 7: "blue", 9: "yellow"}  # ids with gaps, as COCO's have


def write_digit_coco(root, n_train=120, n_val=20, size=64, seed=0):
    """A tiny COCO-format set (train2017/, val2017/, annotations/instances_*.json) of real scanned
    digits in four ink colours: one instance per digit, its category the colour, an RLE mask of its
    ink; every fifth image holds no object."""
    import pycocotools.mask as mask_util

    digits, rng = load_digits(), np.random.default_rng(seed)
    category_ids = sorted(DEMO_CATEGORIES)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for split, count in (("train2017", n_train), ("val2017", n_val)):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        images, annotations = [], []
        for k in range(count):
            rgb, instances = render_digit_scene(rng, digits, size, 0 if k % 5 == 0 else int(rng.integers(1, 4)))
            name = f"{k:012d}.jpg"
            Image.fromarray(rgb).save(os.path.join(root, split, name), quality=95)
            images.append(dict(id=k + 1, file_name=name, height=size, width=size))
            for mask, colour in instances:
                if not mask.any():
                    continue
                rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
                annotations.append(dict(id=len(annotations) + 1, image_id=k + 1, category_id=category_ids[colour],
                                        iscrowd=0, area=float(mask_util.area(rle)), bbox=mask_util.toBbox(rle).tolist(),
                                        segmentation=dict(size=rle["size"], counts=rle["counts"].decode("ascii"))))
        with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump(dict(images=images, annotations=annotations,
                           categories=[dict(id=c, name=n) for c, n in DEMO_CATEGORIES.items()]), f)
    return root
