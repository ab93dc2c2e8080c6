"""Embeddings reused across eval sets (crfr/evaluation/reuse.py): identical inputs only, same answers."""

import numpy as np

from crfr.evaluation.reuse import EmbeddingReuse


def fake_embed(log):
    def embed(images):
        log.append(len(images))
        return images.reshape(len(images), -1)[:, :4].astype(np.float32) / 255
    return embed


def test_images_seen_under_the_same_key_are_not_embedded_again():
    rng = np.random.default_rng(0)
    first = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    second = np.concatenate([first[[3, 1]], rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8), first[[1]]])
    reuse, log = EmbeddingReuse(), []
    a = reuse("hr", first, fake_embed(log))
    b = reuse("hr", second, fake_embed(log))
    assert log == [5, 2]  # the second set's two new images only (its repeat of image 1 too)
    assert reuse.reused == 3
    np.testing.assert_array_equal(b, fake_embed([])(second))
    np.testing.assert_array_equal(a, fake_embed([])(first))
    reuse("linear/14", first[:2], fake_embed(log))  # another way of feeding them: embedded anew
    assert log == [5, 2, 2]
