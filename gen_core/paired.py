"""Paired images for image-to-image translation (Pix2Pix, Isola et al. 2017): an input A and its target B.

Two ways to get pairs:
- **made from any labelled dataset** by a deterministic transform of B: `edges` (Sobel gradient magnitude of the grey
  image, optionally thresholded to a binary edge map, as in pix2pix's edges2shoes), so Fashion-MNIST becomes edges -> garment;
- **brought by the user**, as in the original pix2pix datasets: `A/` and `B/` folders with matching file names
  (`match_pairs`), or one image per pair with A on the left half and B on the right (`split_side_by_side`).
An unmatched or malformed pair is a one-line PairError naming it, or, with on_bad "skip", left out and listed (as the
image-folder reader does with unreadable images).
"""

from __future__ import annotations

import numpy as np

SOBEL_X = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
SOBEL_MAX = 4 * np.sqrt(2)  # the largest Sobel magnitude of an image in [0, 1]: each kernel's absolute weights sum to 4


class PairError(ValueError):
    """A pair that cannot be used; the message names it."""


def edges(images: np.ndarray, threshold: float | None = 0.2) -> np.ndarray:
    """(N, C, H, W) images in [0, 1] (uint8: / 255) -> (N, 1, H, W) edge maps in [0, 1]: the Sobel gradient magnitude of
    the grey image over SOBEL_MAX, then 1 where it exceeds `threshold` (None: the magnitude itself). Deterministic."""
    from scipy import ndimage  # here: gen_core.data imports this module for every stage, and only edges need scipy

    x = images.astype(np.float64) / 255.0 if images.dtype == np.uint8 else images.astype(np.float64)
    grey = x.mean(axis=1)
    # per image: ndimage.sobel on the (N, H, W) stack would also smooth across the batch axis
    gx = ndimage.correlate(grey, SOBEL_X[None], mode="constant")
    gy = ndimage.correlate(grey, SOBEL_X.T[None], mode="constant")
    magnitude = np.hypot(gx, gy)[:, None] / SOBEL_MAX
    return (magnitude > threshold).astype(np.float32) if threshold is not None else magnitude.astype(np.float32)


def split_side_by_side(image: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(C, H, 2H) -> (A (C, H, H), B (C, H, H)): A on the left half, B on the right; PairError naming `name` otherwise."""
    if image.ndim != 3 or image.shape[2] != 2 * image.shape[1]:
        raise PairError(f"{name}: a side-by-side pair must be twice as wide as high (got {image.shape[2]}x{image.shape[1]})")
    half = image.shape[1]
    return image[:, :, :half], image[:, :, half:]


def match_pairs(a_names: list[str], b_names: list[str], source: str, on_bad: str = "error") -> tuple[list[str], list[dict]]:
    """File names present in both A/ and B/ (sorted) and the ones left out: [{"file": "A/x.png", "reason": ...}].
    With on_bad "error" the first unmatched name is a PairError instead; no pair at all is always one."""
    a, b = set(a_names), set(b_names)
    unmatched = [{"file": f"{side}/{name}", "reason": f"no {other}/{name}"} for side, other, mine, theirs in (("A", "B", a, b), ("B", "A", b, a))
                 for name in sorted(mine - theirs)]  # fmt: skip
    if unmatched and on_bad == "error":
        raise PairError(f"{source}/{unmatched[0]['file']}: unmatched ({unmatched[0]['reason']}); {len(unmatched)} unmatched in all")
    pairs = sorted(a & b)
    if not pairs:
        raise PairError(f"{source}: no pairs (A/ and B/ share no file name)")
    return pairs, unmatched
