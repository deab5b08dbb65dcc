"""The procedural shapes dataset: determinism, splits, caption grammar, and the pixel analyzer."""
import numpy as np
import pytest

from chameleon_jax.data import shapes as S


def test_sampling_is_deterministic_and_varied():
    a = [S.sample_scene(3, i) for i in range(50)]
    assert a == [S.sample_scene(3, i) for i in range(50)]
    assert a != [S.sample_scene(4, i) for i in range(50)]
    assert len(set(a)) > 45
    assert {len(s.objects) for s in a} == {1, 2}
    np.testing.assert_array_equal(S.render_array(a[0]), S.render_array(a[0]))


def test_uniform_sampling_weights_every_distinct_scene_alike():
    # the closed-form counts match an enumeration of the scene space
    import itertools
    attrs = list(itertools.product(S.SHAPES, S.COLOR_NAMES, S.SIZE_NAMES))
    singles = len(S.CELLS) * len(attrs)
    pairs = sum(1 for _ in itertools.combinations(range(len(S.CELLS)), 2)) * len(attrs) ** 2
    np.testing.assert_array_equal(S.scene_counts(), [singles, pairs])
    uniform = [S.sample_scene(0, i, uniform=True) for i in range(3000)]
    assert uniform == [S.sample_scene(0, i, uniform=True) for i in range(3000)]
    # 324 of 46,980 scenes have one object: ~21 expected in 3,000 draws; the default draws ~1,500
    assert 5 <= sum(len(s.objects) == 1 for s in uniform) <= 45
    assert 1300 <= sum(len(s.objects) == 1 for s in (S.sample_scene(0, i) for i in range(3000))) <= 1700
    assert len(set(uniform)) > 2850  # almost no repeats among 47k scenes
    # the default stream is unchanged by the option (the smoke corpora depend on it)
    assert S.sample_scene(0, 7) == S.sample_scene(0, 7, uniform=False)


def test_analyzer_recovers_clean_renders():
    scenes = [S.sample_scene(0, i) for i in range(400)]
    acc = np.mean([S.analyze(S.render_array(s)) == s for s in scenes])
    assert acc >= 0.99, acc


def test_analyzer_sees_every_attribute():
    # one object of each shape, colour and size, so a confusion between two values cannot hide
    for shape in S.SHAPES:
        for color in S.COLOR_NAMES:
            for size in S.SIZE_NAMES:
                s = S.Scene.of([S.Obj(4, shape, color, size), S.Obj(0, "square", "red", "small")])
                assert S.analyze(S.render_array(s)) == s, s


def test_analyzer_on_blank_and_noise():
    assert S.analyze(np.full((64, 64, 3), 255, np.uint8)) is None
    s = S.Scene.of([S.Obj(4, "circle", "red", "large")])
    img = S.render_array(s).astype(np.float64)
    img[22:42, 22:42] = 255  # erase the object: the cell reads as empty
    assert S.analyze(img) is None


def test_splits_are_disjoint_and_cover_all_scenes():
    seen = {}
    for i in range(3000):
        s = S.sample_scene(0, i)
        seen.setdefault(s, set()).add(S.split_of(s))
    assert all(len(v) == 1 for v in seen.values())
    counts = {k: sum(v == {k} for v in seen.values()) for k in S.SPLITS}
    assert counts["train"] > 0.8 * len(seen) and counts["val"] > 0 and counts["test"] > 0
    val = list(S.iter_split("val", seed=0, n=20))
    assert len(val) == 20 and all(S.split_of(s) == "val" for s in val)
    draws = list(S.iter_split("val", seed=0, n=256))
    assert len(set(draws)) < len(draws)  # plain draws repeat scenes (single-object ones above all)
    unique = list(S.iter_split("val", seed=0, n=256, unique=True))
    assert len(set(unique)) == 256 and all(S.split_of(s) == "val" for s in unique)
    first_seen = list(dict.fromkeys(S.iter_split("val", seed=0, n=len(draws) * 3)))[:256]
    assert unique == first_seen  # the same stream, repeats dropped, order kept
    with pytest.raises(ValueError, match="pick one of"):
        next(S.iter_split("holdout"))


def test_caption_round_trip_and_rejection():
    for i in range(200):
        s = S.sample_scene(1, i)
        assert S.parse_caption(S.caption(s)) == s
    assert S.caption(S.Scene.of([S.Obj(2, "circle", "blue", "large"), S.Obj(0, "triangle", "red", "small")])) == \
        "a small red triangle at the top left and a large blue circle at the top right."
    assert S.parse_caption("A large red square at the top left") == S.Scene.of([S.Obj(0, "square", "red", "large")])
    for bad in ["", "a big red square at the top.", "a large red square at the top and.",
                "a large red square at the top and a small blue circle at the top.", "hello"]:
        assert S.parse_caption(bad) is None, bad


def test_boxes_and_score():
    s = S.Scene.of([S.Obj(4, "circle", "red", "large")])
    (x0, y0, x1, y1), = S.object_boxes(s)
    assert x0 < 32 < x1 and y1 - y0 == pytest.approx(0.30 * 64)
    assert S.score(s, s)["exact"] == 1.0
    other = S.Scene.of([S.Obj(4, "circle", "red", "large"), S.Obj(0, "square", "blue", "small")])
    sc = S.score(other, s)
    assert sc["exact"] == 0.0 and sc["recall"] == 1.0 and sc["precision"] == 0.5
    assert S.score(None, s)["recall"] == 0.0
