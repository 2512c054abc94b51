"""gen_core.paired: edge maps from real Fashion-MNIST, side-by-side pairs, and A/B folder matching with its refusals."""

import numpy as np
import pytest

from gen_core.data import DEFAULT_SOURCE_URIS, FASHION_MNIST_CLASSES, read_idx_dataset
from gen_core.paired import PairError, edges, match_pairs, split_side_by_side


def test_edges_outline_a_square_and_nothing_else():
    image = np.zeros((1, 1, 16, 16))
    image[0, 0, 4:12, 4:12] = 1.0
    edge = edges(image)[0, 0]
    assert edge.shape == (16, 16) and set(np.unique(edge)) == {0.0, 1.0}
    assert edge[6:10, 6:10].sum() == 0 and edge[:2].sum() == 0  # flat inside, nothing far outside
    assert edge[4, 4:12].all() and edge[4:12, 11].all()  # the square's border
    assert not edges(np.zeros((2, 3, 8, 8))).any()
    stacked = edges(np.concatenate([image, np.zeros_like(image), image]))
    assert np.array_equal(stacked[0], stacked[2]) and not stacked[1].any()  # each image alone, whatever its neighbours
    magnitude = edges(image, threshold=None)
    assert 0 < magnitude.max() <= 1 and np.array_equal(edges((image * 255).astype(np.uint8)), edge[None, None])


def test_edges_of_real_garments_are_outlines():
    raw = read_idx_dataset(DEFAULT_SOURCE_URIS["fashion_mnist"], FASHION_MNIST_CLASSES)
    images = raw.eval.images[:200].transpose(0, 3, 1, 2)
    maps = edges(images)
    assert maps.shape == (200, 1, 28, 28) and np.array_equal(maps, edges(images))  # deterministic
    garment = images[:, 0] > 25
    share = maps[:, 0].sum((1, 2)) / garment.sum((1, 2))
    assert 0.2 < np.median(share) < 1.0  # an outline: a fraction of the garment's area, not all of it, not none
    from scipy import ndimage

    flat_black = ndimage.maximum_filter(images[:, 0], size=(1, 3, 3)) == 0
    assert flat_black.sum() > 0 and not maps[:, 0][flat_black].any()  # no edge where the 3x3 neighbourhood is all background


def test_side_by_side_pairs_split_in_halves():
    pair = np.arange(2 * 4 * 8).reshape(2, 4, 8)
    a, b = split_side_by_side(pair, "p.png")
    assert np.array_equal(a, pair[:, :, :4]) and np.array_equal(b, pair[:, :, 4:])
    with pytest.raises(PairError, match=r"q.png: a side-by-side pair must be twice as wide as high \(got 5x4\)"):
        split_side_by_side(np.zeros((1, 4, 5)), "q.png")


def test_folders_pair_by_name_and_unmatched_files_are_one_line_or_listed():
    assert match_pairs(["2.png", "1.png"], ["1.png", "2.png"], "root") == (["1.png", "2.png"], [])
    with pytest.raises(PairError, match=r"^root/A/3.png: unmatched \(no B/3.png\); 2 unmatched in all$"):
        match_pairs(["1.png", "3.png"], ["1.png", "4.png"], "root")
    pairs, skipped = match_pairs(["1.png", "3.png"], ["1.png", "4.png"], "root", on_bad="skip")
    assert pairs == ["1.png"] and skipped == [{"file": "A/3.png", "reason": "no B/3.png"}, {"file": "B/4.png", "reason": "no A/4.png"}]
    with pytest.raises(PairError, match="root: no pairs"):
        match_pairs(["1.png"], ["2.png"], "root", on_bad="skip")
