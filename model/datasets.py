"""Detection datasets for the chest X-ray opacity detector, and the item they share.

Every dataset here and every reader in ``model.readers`` yields the same item,
``(image, target)``:

    image   float32 tensor (1, H, W) in [0, 1]; max(H, W) == image_size
    target  dict
        boxes      float32 tensor (N, 4): x1, y1, x2, y2 in the resized image's
                   pixels (continuous coordinates, (0, 0) is the top-left corner
                   of the top-left pixel); shape (0, 4) for a negative image
        labels     int64 tensor (N,), all ``OPACITY_LABEL``
        image_id   int, unique within the dataset
        scale      float, resized = original * scale
        orig_size  (rows, cols) of the stored image

Pixels always go through ``model.preprocess`` -- the preprocessing the
streaming pipeline applies to live DICOM -- so the detector is trained and
evaluated on exactly what it will see in production.

Seed convention for synthetic data: image ``i`` of a dataset with seed ``s`` is
drawn from ``np.random.default_rng([s, i])`` alone, so items are independent,
reproducible and can be generated in any order by any worker. Training uses
``seed``, validation ``seed + 1``, and held-out test sets use seeds chosen at
evaluation time (``medtwin evaluate --synthetic-seed 9001``); no two of these
may coincide, or the test set repeats training images.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from model.preprocess import PreparedImage, prepare_pixels
from model.radiograph import synthesize_chest_xray

# The detector has one foreground class; torchvision reserves 0 for background.
OPACITY_LABEL = 1


def detection_item(prepared: PreparedImage, boxes_original: np.ndarray, image_id: int) -> tuple[torch.Tensor, dict]:
    """Builds the shared ``(image, target)`` item from a prepared image.

    Args:
        prepared: the output of ``prepare_pixels``/``prepare_dicom``; ``image``
            is (H, W) float32 in [0, 1].
        boxes_original: (N, 4) x1, y1, x2, y2 in the stored image's pixels.
        image_id: the id to carry in the target.

    Returns:
        ``(image (1, H, W) float32, target)`` as described in the module
        docstring; boxes are scaled by ``prepared.scale`` and clipped to the
        resized image, whose size is rounded from ``original * scale``.
    """
    image = torch.from_numpy(np.ascontiguousarray(prepared.image, dtype=np.float32)).unsqueeze(0)
    height, width = image.shape[-2:]
    boxes = np.asarray(boxes_original, dtype=np.float32).reshape(-1, 4) * np.float32(prepared.scale)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    target = {
        "boxes": torch.from_numpy(boxes),
        "labels": torch.full((len(boxes),), OPACITY_LABEL, dtype=torch.int64),
        "image_id": int(image_id),
        "scale": float(prepared.scale),
        "orig_size": tuple(int(n) for n in prepared.original_shape),
    }
    return image, target


def collate_detection(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Keeps a batch as lists: images differ in shape, and torchvision's
    detection models take a list of (C, H, W) tensors and a list of targets."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


class SyntheticChestXrayDataset(Dataset):
    """Synthetic chest radiographs with known opacity boxes, prepared like live DICOM.

    Each image is acquired with randomly drawn parameters, so the detector sees
    the variety real scanners produce: source size (rows 512-1024, a portrait
    or landscape aspect, unless ``source_size`` fixes it), bits stored (12, 14
    or 16) and photometric interpretation (MONOCHROME1 images are stored
    inverted, as such modalities write them, and inverted back by
    ``prepare_pixels``). A fraction ``positive_fraction`` of images (drawn per
    image, so roughly) carries 1-4 opacities; the rest are negatives.

    Items follow the module docstring; ``image_id`` is the index. See the module
    docstring for the seed convention.
    """

    SOURCE_ROWS_RANGE = (512, 1024)
    SOURCE_ASPECT_RANGE = (0.8, 1.2)  # cols / rows
    BITS_STORED_CHOICES = (12, 14, 16)
    PHOTOMETRIC_CHOICES = ("MONOCHROME2", "MONOCHROME1")
    OPACITIES_PER_POSITIVE = (1, 4)

    def __init__(
        self,
        *,
        seed: int,
        num_images: int,
        image_size: int,
        positive_fraction: float = 0.6,
        source_size: tuple[int, int] | None = None,
    ):
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy seed sequences take no negatives), got {seed}")
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
        if source_size is not None and (len(source_size) != 2 or min(source_size) < 1):
            raise ValueError(f"source_size must be (rows, cols) of positive ints, got {source_size}")
        self.seed = seed
        self.num_images = num_images
        self.image_size = image_size
        self.positive_fraction = positive_fraction
        self.source_size = None if source_size is None else (int(source_size[0]), int(source_size[1]))

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        rng = np.random.default_rng([self.seed, index])
        rows, cols = self._draw_source_size(rng)
        bits_stored = int(rng.choice(self.BITS_STORED_CHOICES))
        photometric = str(rng.choice(self.PHOTOMETRIC_CHOICES))
        is_positive = rng.random() < self.positive_fraction
        low, high = self.OPACITIES_PER_POSITIVE
        num_opacities = int(rng.integers(low, high + 1)) if is_positive else 0

        radiograph = synthesize_chest_xray(
            rng, rows=rows, cols=cols, bits_stored=bits_stored, num_opacities=num_opacities
        )
        stored = radiograph.pixels
        if photometric == "MONOCHROME1":
            # PS3.3 C.7.6.3.1.2: in MONOCHROME1 the minimum value is displayed white.
            stored = ((1 << bits_stored) - 1 - stored.astype(np.int64)).astype(np.uint16)
        prepared = prepare_pixels(
            stored, bits_stored=bits_stored, photometric=photometric, target_size=self.image_size
        )
        image, target = detection_item(prepared, radiograph.boxes, image_id=index)
        # Evaluation only (per-kind recall, `model.evaluation.recall_by_kind`); training ignores it.
        target["kinds"] = tuple(opacity.kind for opacity in radiograph.opacities)
        return image, target

    def _draw_source_size(self, rng: np.random.Generator) -> tuple[int, int]:
        if self.source_size is not None:
            return self.source_size
        low, high = self.SOURCE_ROWS_RANGE
        rows = int(rng.integers(low, high + 1))
        cols = int(round(rows * rng.uniform(*self.SOURCE_ASPECT_RANGE)))
        return rows, cols
