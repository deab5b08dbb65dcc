"""Unified vocabulary: official ids, custom layouts, modality in-graph, rendering back to text + images."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chameleon_jax import vocab as V


def test_chameleon_layout_has_official_ids():
    v = V.CHAMELEON
    assert (v.bos, v.pad, v.eos, v.end_image, v.begin_image, v.end_turn, v.size) == (0, 1, 2, 8196, 8197, 8710, 65536)
    np.testing.assert_array_equal(v.image_ids([0, 8191]), [4, 8195])  # code + 4 (spec §4.7)


def test_custom_layout_blocks_are_contiguous_and_disjoint():
    v = V.custom(text_pieces=500, image_codes=1024)
    ids = np.arange(v.size)
    image = v.is_image(ids)
    assert image.sum() == 1024 and np.all(np.flatnonzero(image) == np.arange(4, 4 + 1024))
    assert v.end_image == 4 + 1024 and v.begin_image == v.end_image + 1 and v.text_start == v.end_image + 3
    assert v.size == v.text_start + 500
    m = v.modality(ids)
    assert (m == V.SPECIAL).sum() == 7 and (m == V.TEXT).sum() == 500


def test_modality_is_pure_and_matches_under_jit():
    v = V.custom(100, 64)
    ids = np.random.default_rng(0).integers(0, v.size, (4, 33)).astype(np.int32)
    got = jax.jit(v.modality)(jnp.asarray(ids))
    np.testing.assert_array_equal(np.asarray(got), v.modality(ids))


def test_render_round_trips_text_and_images():
    v = V.custom(100, 64)
    decode = lambda ids: " ".join(str(i) for i in ids)
    text1, text2 = [v.text_start + 3, v.text_start + 9], [v.text_start + 1]
    grid = np.arange(16).reshape(4, 4) % 64
    seq = np.concatenate([[v.bos], text1, v.image_block(grid), text2, [v.end_turn, v.eos]])
    out = V.render(seq, v, decode)
    assert out[0] == decode(text1) and out[2] == decode(text2)
    np.testing.assert_array_equal(out[1], grid)


def test_render_completes_a_truncated_image_with_its_first_code():
    v = V.custom(10, 64)
    seq = np.concatenate([[v.bos, v.begin_image], v.image_ids([5, 6, 7])])
    (img,) = V.render(seq, v, str, image_shape=(2, 2))
    np.testing.assert_array_equal(img, [[5, 6], [7, 5]])


def test_out_of_range_codes_are_rejected_with_the_fix():
    with pytest.raises(ValueError, match="codebook size"):
        V.custom(10, 64).image_ids([64])
