"""32x32 colour images of handwritten digits on photographs: CIFAR's size, from what installed
packages ship (scikit-learn's 8x8 digits and its two sample photographs), nothing downloaded.

Each image is a random crop of a photograph (china.jpg or flower.jpg, 24-160 px resized to 32,
randomly mirrored), with one digit warped onto it (10-26 px tall, rotated up to 15 degrees,
anywhere it fits) in a random colour kept at a minimum luminance contrast from its background,
then per-image lighting (gain and offset) and pixel noise. The per-image backgrounds and
lighting give every image statistics of its own, as natural photographs have; the contrast
floor keeps every digit legible, the clutter and small sizes keep large-batch error clearly
above zero. Training, validation and test images are drawn from disjoint digit instances.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits, load_sample_images

__all__ = ["SCENES", "DigitScenes", "render", "seeded_generator"]

IMAGE_SIZE = 32
# Ranges of the random rendering; lighting acts on [0, 1] pixels before normalization.
SCENES = {
    "crop": (24, 160),  # side of the photograph crop (px) resized to the image
    "digit_height": (10, 26),  # px
    "rotation": 15.0,  # degrees, +-
    "min_contrast": 0.3,  # luminance difference between digit colour and background mean
    "gain": 1.5,  # log-uniform in [1/gain, gain]
    "offset": 0.2,  # N(0, offset)
    "noise": 0.05,  # N(0, noise) per pixel and channel
}
# Fixed input normalization (pixels of the rendered scenes are roughly uniform on [0, 1]).
PIXEL_MEAN, PIXEL_STD = 0.44, 0.39
LUMA = torch.tensor([0.299, 0.587, 0.114])


def seeded_generator(*keys):
    """A ``torch.Generator`` determined by integer ``keys`` alone (seed, purpose, index)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


def _photographs():
    """scikit-learn's two sample photographs: (2, 3, 427, 640) float in [0, 1]."""
    images = np.stack(load_sample_images().images).astype(np.float32) / 255.0
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def _uniform(n, low, high, generator):
    return low + (high - low) * torch.rand(n, generator=generator)


def background_bank(count, generator, photographs=None):
    """``count`` random photograph crops resized to 32x32: (count, 3, 32, 32) in [0, 1]."""
    photos = _photographs() if photographs is None else photographs
    _, _, height, width = photos.shape
    low, high = SCENES["crop"]
    sides = torch.randint(low, high + 1, (count,), generator=generator)
    which = torch.randint(len(photos), (count,), generator=generator)
    flips = torch.rand(count, generator=generator) < 0.5
    bank = torch.empty(count, 3, IMAGE_SIZE, IMAGE_SIZE)
    for i in range(count):
        side = int(sides[i])
        top = int(torch.randint(height - side + 1, (), generator=generator))
        left = int(torch.randint(width - side + 1, (), generator=generator))
        crop = photos[which[i], :, top : top + side, left : left + side][None]
        crop = F.interpolate(crop, size=IMAGE_SIZE, mode="bilinear", antialias=True)
        bank[i] = crop[0].flip(-1) if flips[i] else crop[0]
    return bank.clamp_(0, 1)


def render(digits, backgrounds, generator):
    """Digits warped onto backgrounds, coloured and lit.

    Args:
        digits (Tensor): (N, 1, 8, 8) intensities in [0, 1].
        backgrounds (Tensor): (N, 3, 32, 32) in [0, 1].
    Returns:
        Tensor: (N, 3, 32, 32) normalized images (``PIXEL_MEAN``, ``PIXEL_STD``).
    """
    n = len(digits)
    height = _uniform(n, *SCENES["digit_height"], generator)
    angle = _uniform(n, -1, 1, generator) * SCENES["rotation"] * math.pi / 180
    # affine_grid maps output coordinates in [-1, 1] to input ones: the 8 px digit spans
    # ``height`` of the 32 px image around a centre where it fits whole.
    scale = IMAGE_SIZE / height
    room = 1 - height * math.sqrt(2) / IMAGE_SIZE  # room for the rotated digit's corners
    cx, cy = (_uniform(n, -1, 1, generator) * room.clamp(min=0) for _ in range(2))
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack(
        [
            torch.stack([cos, -sin, -(cos * cx - sin * cy)], dim=1),
            torch.stack([sin, cos, -(sin * cx + cos * cy)], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, [n, 1, IMAGE_SIZE, IMAGE_SIZE], align_corners=False)
    mask = F.grid_sample(digits, grid, align_corners=False).clamp(0, 1)

    color = torch.rand(n, 3, generator=generator)
    background_luma = (backgrounds.mean(dim=(2, 3)) * LUMA).sum(1)
    too_close = ((color * LUMA).sum(1) - background_luma).abs() < SCENES["min_contrast"]
    color[too_close] = 1 - color[too_close]
    still_close = ((color * LUMA).sum(1) - background_luma).abs() < SCENES["min_contrast"]
    color[still_close] = (background_luma[still_close] < 0.5).float()[:, None].expand(-1, 3)
    images = backgrounds * (1 - mask) + color[:, :, None, None] * mask

    gain = torch.exp(_uniform(n, -1, 1, generator) * math.log(SCENES["gain"]))
    offset = SCENES["offset"] * torch.randn(n, generator=generator)
    images = images * gain[:, None, None, None] + offset[:, None, None, None]
    images = images + SCENES["noise"] * torch.randn(images.shape, generator=generator)
    return (images - PIXEL_MEAN) / PIXEL_STD


class DigitScenes:
    """One seed's data. scikit-learn's 1,797 digits are split into disjoint test, validation and
    training instances; test and validation images are rendered once (``copies`` renderings of
    each digit), training batches are rendered afresh for every step and depend only on (seed,
    step), never on the run.

    Attributes:
        splits (dict): "train", "val", "test": (K,) indices of the split's digits in
            ``load_digits()``.
        test_x, val_x (Tensor): (M, 3, 32, 32) images; ``test_y``, ``val_y`` (M,) labels.
        steps_per_epoch (int): SGD steps per pass over the training digits.
    """

    def __init__(
        self,
        seed,
        test_digits,
        val_digits,
        test_copies,
        val_copies,
        train_digits=None,
        batch_size=128,
        bank=4096,
    ):
        data = load_digits()
        images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(data.target)
        order = torch.randperm(len(labels), generator=seeded_generator(seed, 0))
        test, val = order[:test_digits], order[test_digits : test_digits + val_digits]
        train = order[test_digits + val_digits :]
        if train_digits is not None:
            train = train[:train_digits]
        if len(train) < batch_size:
            raise ValueError(f"{len(train)} training digits: fewer than one batch of {batch_size}")
        self.seed, self.batch_size = seed, batch_size
        self.splits = {"train": train, "val": val, "test": test}  # indices into load_digits()
        self.train_digits, self.train_y = images[train], labels[train]
        photos = _photographs()
        # Separate crops for each split, so no test background was seen in training.
        self.train_backgrounds = background_bank(bank, seeded_generator(seed, 1), photos)
        self.test_x, self.test_y = self._fixed(images[test], labels[test], test_copies, photos, 2)
        self.val_x, self.val_y = self._fixed(images[val], labels[val], val_copies, photos, 3)
        self.steps_per_epoch = len(self.train_y) // batch_size

    def _fixed(self, digits, labels, copies, photos, purpose):
        digits, labels = digits.repeat(copies, 1, 1, 1), labels.repeat(copies)
        generator = seeded_generator(self.seed, purpose)
        backgrounds = background_bank(len(digits), generator, photos)
        return render(digits, backgrounds, generator), labels

    def batch(self, step):
        """Training batch ``step`` (any step >= 0; past training, fresh data for offline
        estimation and PreciseBN): (batch_size, 3, 32, 32) images and (batch_size,) labels."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.train_y), generator=seeded_generator(self.seed, 4, epoch))
        chosen = order[index * self.batch_size : (index + 1) * self.batch_size]
        generator = seeded_generator(self.seed, 5, step)
        pick = torch.randint(len(self.train_backgrounds), (len(chosen),), generator=generator)
        images = render(self.train_digits[chosen], self.train_backgrounds[pick], generator)
        return images, self.train_y[chosen]
