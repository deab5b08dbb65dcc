"""Document formats -> sequences (paper §2.2, §3.2), record encoding, and JSONL document parsing."""
import numpy as np
import pytest

from chameleon_jax import vocab as V
from chameleon_jax.data import readers, records

VOC = V.custom(text_pieces=50, image_codes=16)
T = lambda *xs: np.array([VOC.text_start + x for x in xs], np.int32)
GRID = np.arange(4).reshape(2, 2)


def test_every_sequence_is_bos_body_eos_with_wrapped_images():
    seq = records.interleaved_tokens([T(1, 2), records.Image(GRID), T(3)], VOC)
    want = [VOC.bos, *T(1, 2), VOC.begin_image, *VOC.image_ids(GRID.ravel()), VOC.end_image, *T(3), VOC.eos]
    np.testing.assert_array_equal(seq, want)
    np.testing.assert_array_equal(records.text_tokens(T(7), VOC), [VOC.bos, *T(7), VOC.eos])


def test_pairs_flip_to_image_first_half_the_time_deterministically():
    flips = [records.image_first(f"doc{i}", seed=0) for i in range(4000)]
    assert abs(np.mean(flips) - 0.5) < 0.03
    assert flips == [records.image_first(f"doc{i}", seed=0) for i in range(4000)]
    other = [records.image_first(f"doc{i}", seed=1) for i in range(4000)]
    assert 0.4 < np.mean(np.array(flips) != np.array(other)) < 0.6  # the seed re-draws the coin
    first = records.pair_tokens(T(1), GRID, VOC, is_image_first=True)
    assert first[1] == VOC.begin_image and first[-2] == T(1)[0]
    second = records.pair_tokens(T(1), GRID, VOC, is_image_first=False)
    assert second[1] == T(1)[0] and second[-2] == VOC.end_image


def test_image_first_fraction_sets_the_share_and_nests():
    keys = [f"doc{i}" for i in range(4000)]
    for fraction in (0.0, 0.35, 1.0):
        assert abs(np.mean([records.image_first(k, 0, fraction) for k in keys]) - fraction) < 0.03
    # one uniform draw per key: a pair image-first at 0.35 stays image-first at any larger share
    low = np.array([records.image_first(k, 0, 0.35) for k in keys])
    high = np.array([records.image_first(k, 0, 0.6) for k in keys])
    assert np.all(high[low])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        records.image_first("doc", 0, 1.5)


def test_sft_loss_only_on_answers_and_their_end_of_turn():
    turns = [records.Turn("user", [T(1, 2), records.Image(GRID)]), records.Turn("assistant", [T(3, 4)]),
             records.Turn("user", [T(5)]), records.Turn("assistant", [T(6)])]
    tokens, mask = records.sft_tokens(turns, VOC)
    # <s> | u u BOI c c c c EOI <eot> | a a <eot> | u <eot> | a <eot> | </s>
    assert tokens[0] == VOC.bos and tokens[-1] == VOC.eos
    assert list(np.flatnonzero(tokens == VOC.end_turn)) == [9, 12, 14, 16]
    np.testing.assert_array_equal(tokens[mask == 1], [*T(3, 4), VOC.end_turn, *T(6), VOC.end_turn, VOC.eos])


def test_a_conversation_ending_on_the_user_has_no_loss_on_eos():
    tokens, mask = records.sft_tokens([records.Turn("assistant", [T(1)]), records.Turn("user", [T(2)])], VOC)
    assert mask[-1] == 0 and mask.sum() == 2


def test_record_round_trip_with_and_without_mask():
    tokens, mask = records.sft_tokens([records.Turn("user", [T(1)]), records.Turn("assistant", [T(2)])], VOC)
    back = records.deserialize(records.serialize(tokens, mask))
    np.testing.assert_array_equal(back["tokens"], tokens)
    np.testing.assert_array_equal(back["loss_mask"], mask)
    plain = records.deserialize(records.serialize(tokens))
    assert plain["loss_mask"].dtype == np.int32 and plain["loss_mask"].all()
    with pytest.raises(ValueError, match="pretokenize"):
        records.deserialize(b"XXXX" + bytes(20))


@pytest.mark.parametrize("obj,kind", [
    ({"text": "hi"}, "text"),
    ({"image": "a.png", "caption": "c"}, "pair"),
    ({"segments": [{"text": "x"}, {"image": "a.png"}]}, "interleaved"),
    ({"turns": [{"role": "user", "content": [{"image": "a.png"}]}, {"role": "assistant", "content": "b"}]}, "sft"),
])
def test_document_shapes_parse(obj, kind):
    doc = readers.parse_document(obj, "/base", "f.jsonl:1")
    assert doc.kind == kind and doc.key == "f.jsonl:1"
    images = [ref for k, ref in (doc.segments or [s for _, ss in doc.turns for s in ss]) if k == "image"]
    assert all(ref == "/base/a.png" for ref in images)


@pytest.mark.parametrize("obj,reason", [
    ([1, 2], "JSON object"),
    ({"foo": 1}, "unrecognised document"),
    ({"image": "a.png"}, "caption"),
    ({"segments": [{"video": "x"}]}, "neither"),
    ({"turns": [{"role": "robot", "content": "x"}]}, "role"),
])
def test_bad_documents_are_named(obj, reason):
    with pytest.raises(readers.BadItem, match=reason):
        readers.parse_document(obj, "/base", "k")


def test_pair_target_mask_trains_only_the_second_modality():
    caption = T(1, 2, 3)
    for first in (True, False):
        tokens = records.pair_tokens(caption, GRID, VOC, is_image_first=first)
        mask = records.pair_target_mask(caption, GRID, VOC, is_image_first=first)
        assert mask.shape == tokens.shape
        trained = tokens[mask == 1]
        if first:  # image -> caption: the caption and </s>
            np.testing.assert_array_equal(trained, [*caption, VOC.eos])
        else:  # caption -> image: begin-image, the 4 codes, end-image and </s>
            np.testing.assert_array_equal(
                trained, [VOC.begin_image, *VOC.image_ids(GRID.ravel()), VOC.end_image, VOC.eos])
