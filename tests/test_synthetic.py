"""Behaviour of the synthetic sprites domain: exact rendering, prompt grammar, pairs and metrics."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
from PIL import Image

from customshift.errors import PromptError
from customshift.sprites import synthetic as S


@pytest.fixture(scope="module")
def clean_split() -> list[S.Pair]:
    return S.evaluation_split(64, "clean")


@pytest.fixture(scope="module")
def distractor_split() -> list[S.Pair]:
    return S.evaluation_split(64, "distractor")


def test_palettes_and_silhouettes_follow_the_spec() -> None:
    assert S.BACKGROUND_NAMES == ("white", "black", "gray", "pink", "cyan", "brown")
    assert S.BACKGROUNDS["pink"] == (245, 175, 200)
    assert S.SPRITE_COLOR_NAMES == ("red", "green", "blue", "yellow", "orange", "purple")
    assert S.SPRITE_COLORS["purple"] == (140, 70, 190)
    assert S.CLASSES["vase"] == (".XXX.", "..X..", ".XXX.", "XXXXX", ".XXX.")
    assert S.CLASSES["tree"] == ("..X..", ".XXX.", ".XXX.", "XXXXX", "..X..")
    assert {k: len(v) for k, v in S.SILHOUETTE_CELLS.items()} == {
        "robot": 25,
        "creature": 21,
        "vase": 15,
        "tree": 13,
    }
    assert S.SIZES == {"small": 4, "large": 8}


def test_render_known_subject_has_exact_cells_and_background_elsewhere() -> None:
    colors = tuple(i % 6 for i in range(13))
    subject = S.Subject("tree", colors)
    ctx = S.Context("small", "top", "right", "cyan")
    img = S.render(subject, ctx)
    assert img.dtype == np.uint8 and img.shape == (64, 64, 3)
    x0, y0, side = S.sprite_box(ctx)
    assert (x0, y0, side) == (36, 4, 20)
    expected = np.empty_like(img)
    expected[:] = S.BACKGROUNDS["cyan"]
    for (r, c), k in zip(S.SILHOUETTE_CELLS["tree"], colors, strict=True):
        rgb = S.SPRITE_COLORS[S.SPRITE_COLOR_NAMES[k]]
        assert tuple(img[y0 + 4 * r + 2, x0 + 4 * c + 2]) == rgb  # cell centre
        expected[y0 + 4 * r : y0 + 4 * r + 4, x0 + 4 * c : x0 + 4 * c + 4] = rgb
    np.testing.assert_array_equal(img, expected)  # solid cells, background everywhere else
    assert tuple(img[y0 + 2, x0 + 2]) == S.BACKGROUNDS["cyan"]  # empty corner cell


@pytest.mark.parametrize(
    "size,vertical,horizontal", list(itertools.product(S.SIZE_NAMES, S.VERTICAL_NAMES, S.HORIZONTAL_NAMES))
)
def test_box_placement_rule(size: str, vertical: str, horizontal: str) -> None:
    x0, y0, side = S.sprite_box(S.Context(size, vertical, horizontal, "white"))
    assert side == 5 * S.SIZES[size]
    for start, p in ((x0, S.HORIZONTAL[horizontal]), (y0, S.VERTICAL[vertical])):
        raw = math.floor((p * 64 - side / 2) / 4) * 4
        assert start == min(max(raw, 0), 64 - side)
        assert 0 <= start <= 64 - side and start % 4 == 0
        assert all((start + c * S.SIZES[size]) % 4 == 0 for c in range(6))  # every cell edge on the grid
    # the box centre lies in the requested third on both axes
    assert int((x0 + side / 2) * 3 // 64) == S.HORIZONTAL_NAMES.index(horizontal)
    assert int((y0 + side / 2) * 3 // 64) == S.VERTICAL_NAMES.index(vertical)


def test_known_boxes() -> None:
    assert S.sprite_box(S.Context("small", "top", "left", "gray")) == (4, 4, 20)
    assert S.sprite_box(S.Context("large", "top", "left", "gray")) == (0, 0, 40)
    assert S.sprite_box(S.Context("large", "bottom", "center", "gray")) == (12, 24, 40)


def test_prompt_grammar_round_trip() -> None:
    ctx = S.Context("small", "top", "left", "pink")
    assert ctx.prompt("robot") == "a small robot on a pink background, top left"
    rng = np.random.default_rng(0)
    for _ in range(200):
        ctx = S.sample_context(rng)
        cls = S.CLASS_NAMES[int(rng.integers(4))]
        assert S.parse_prompt(ctx.prompt(cls)) == (cls, ctx)
    for ctx in S.all_contexts():
        assert S.parse_prompt(ctx.prompt("vase")) == ("vase", ctx)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a small robot",
        "a tiny robot on a pink background, top left",
        "a small dog on a pink background, top left",
        "a small robot on a pink background, left top",
        "a small robot on a pink background top left",
        "a small robot on a pink background, top left please",
    ],
)
def test_parse_prompt_rejects_non_grammar(bad: str) -> None:
    with pytest.raises(ValueError, match="not a sprite prompt"):
        S.parse_prompt(bad)
    with pytest.raises(PromptError):
        S.parse_prompt(bad)


def test_subject_from_id_is_deterministic_and_valid() -> None:
    a, b = S.subject_from_id(123), S.subject_from_id(123)
    assert a == b and a.subject_id == 123 and a.name == a.cls
    assert len(a.colors) == len(S.SILHOUETTE_CELLS[a.cls])
    assert {S.subject_from_id(i).cls for i in range(40)} == set(S.CLASS_NAMES)
    assert len({S.subject_from_id(i) for i in range(50)}) == 50
    grid = a.color_grid()
    assert ((grid >= 0) == S.SILHOUETTES[a.cls]).all()
    with pytest.raises(ValueError):
        S.subject_from_id(-1)
    with pytest.raises(ValueError):
        S.Subject("tree", (0,) * 12)


def test_training_subjects_never_use_eval_ids() -> None:
    rng = np.random.default_rng(1)
    ids = [S.sample_training_subject(rng).subject_id for _ in range(200)]
    assert all(i is not None and i >= S.N_EVAL_IDS for i in ids)
    stream_ids = [p.subject.subject_id for p in S.PairStream(seed=3).take(50)]
    assert all(i is not None and i >= S.N_EVAL_IDS for i in stream_ids)


def test_eval_split_is_deterministic_and_uses_eval_ids(clean_split: list[S.Pair]) -> None:
    again = S.evaluation_split(64, "clean")
    for p, q in zip(clean_split, again, strict=True):
        assert p.prompt == q.prompt and p.subject == q.subject
        np.testing.assert_array_equal(p.reference, q.reference)
        np.testing.assert_array_equal(p.target, q.target)
    ids = [p.subject.subject_id for p in clean_split]
    assert all(S.is_eval_id(i) for i in ids) and len(set(ids)) == 64
    assert [p.subject for p in S.evaluation_split(8, "clean")] == [p.subject for p in clean_split[:8]]
    other = {p.subject.subject_id for p in S.evaluation_split(64, "clean", seed=1)}
    assert other != set(ids)


def test_sampled_targets_score_perfectly(clean_split: list[S.Pair], distractor_split: list[S.Pair]) -> None:
    for pair in clean_split + distractor_split:
        assert pair.prompt == pair.target_context.prompt(pair.subject_name)
        assert S.identity(pair.target, pair.subject) == 1.0
        assert S.prompt_accuracy(pair.target, pair.target_context) == 1.0
        x0, y0, side = S.sprite_box(pair.target_context)
        assert S.find_sprite(pair.target) == (x0, y0, side, side)
    result = S.score([p.target for p in distractor_split], distractor_split)
    assert result["identity"] == 1.0 and result["prompt_accuracy"] == 1.0
    assert result["psnr"] == S.PSNR_CAP and result["leakage"] == 0.0 and result["n"] == 64
    assert len(result["per_sample"]["identity"]) == 64


def test_copy_the_reference_baseline_misses_the_prompt(clean_split: list[S.Pair]) -> None:
    result = S.score([p.reference for p in clean_split], clean_split)
    assert result["identity"] == 1.0  # the reference shows the right subject ...
    assert result["prompt_accuracy"] < 0.6  # ... in the wrong context
    assert result["psnr"] < 20
    assert result["leakage"] is None


def test_blank_and_recoloured_images() -> None:
    subject = S.subject_from_id(7)
    ctx = S.Context("large", "middle", "center", "black")
    blank = np.empty((64, 64, 3), np.uint8)
    blank[:] = S.BACKGROUNDS["black"]
    assert S.find_sprite(blank) is None
    assert S.identity(blank, subject) == 0.0
    assert S.prompt_accuracy(blank, ctx) == pytest.approx(1 / 3)  # only the background is right
    n = len(subject.colors)
    colors = list(subject.colors)
    colors[3] = (colors[3] + 1) % 6
    recoloured = dataclasses.replace(subject, colors=tuple(colors))
    assert S.identity(S.render(recoloured, ctx), subject) == pytest.approx((n - 1) / n)
    assert S.identity(Image.fromarray(S.render(subject, ctx)), subject) == 1.0  # PIL input works


def test_metrics_tolerate_noise() -> None:
    subject = S.subject_from_id(11)
    ctx = S.Context("small", "bottom", "left", "gray")
    img = S.render(subject, ctx).astype(np.int64)
    noisy = np.clip(img + np.random.default_rng(0).integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
    assert S.identity(noisy, subject) == 1.0
    assert S.prompt_accuracy(noisy, ctx) == 1.0


def test_find_sprite_keeps_the_largest_region() -> None:
    img = np.full((64, 64, 3), 240, np.uint8)
    img[2:6, 50:54] = (220, 50, 50)  # small blob
    img[30:50, 10:30] = (50, 90, 220)  # large blob
    img[30:33, 30:31] = (50, 90, 220)  # 4-connected to the large blob
    img[52, 31] = (50, 90, 220)  # diagonal only: not connected
    assert S.find_sprite(img) == (10, 30, 21, 20)


def test_size_and_position_checks() -> None:
    subject = S.subject_from_id(5)
    img = S.render(subject, S.Context("small", "top", "left", "white"))
    checks = S.prompt_checks(img, S.Context("large", "bottom", "left", "pink"))
    assert checks == {"background": False, "position": False, "size": False}
    checks = S.prompt_checks(img, S.Context("small", "top", "left", "pink"))
    assert checks == {"background": False, "position": True, "size": True}


def test_distractors_never_overlap_and_leakage_is_detected(distractor_split: list[S.Pair]) -> None:
    rng = np.random.default_rng(5)
    pairs = distractor_split + [S.sample_pair(rng, track="distractor") for _ in range(100)]
    leaked_images = []
    for pair in pairs:
        assert pair.track == "distractor" and pair.distractor is not None
        assert pair.distractor_context is not None
        assert pair.distractor.cls != pair.subject.cls
        assert pair.distractor_context.background == pair.reference_context.background
        a = S.sprite_box(pair.reference_context)
        b = S.sprite_box(pair.distractor_context)
        assert not S.boxes_overlap(a, b)
        both = pair.reference
        only_subject = S.render(pair.subject, pair.reference_context)
        only_distractor = S.render(pair.distractor, pair.distractor_context)
        bg = np.array(S.BACKGROUNDS[pair.reference_context.background], np.uint8)
        subject_px = (only_subject != bg).any(axis=2)
        distractor_px = (only_distractor != bg).any(axis=2)
        assert not (subject_px & distractor_px).any()
        np.testing.assert_array_equal(both[subject_px], only_subject[subject_px])
        np.testing.assert_array_equal(both[distractor_px], only_distractor[distractor_px])
        # the target never holds the distractor
        np.testing.assert_array_equal(pair.target, S.render(pair.subject, pair.target_context))
        leaked_images.append(S.render(pair.distractor, pair.target_context))
        assert S.leaked(leaked_images[-1], pair.subject, pair.distractor)
        assert not S.leaked(pair.target, pair.subject, pair.distractor)
    result = S.score(leaked_images[:64], distractor_split)
    assert result["leakage"] == 1.0
    with pytest.raises(ValueError, match="overlaps"):
        ctx = S.Context("small", "top", "left", "white")
        S.render(S.subject_from_id(1), ctx, (S.subject_from_id(2), ctx))


def test_layouts_keep_what_the_curriculum_says() -> None:
    rng = np.random.default_rng(2)
    for _ in range(50):
        ref = S.sample_pair(rng, layout="same_layout")
        r, t = ref.reference_context, ref.target_context
        assert (r.size, r.vertical, r.horizontal) == (t.size, t.vertical, t.horizontal)
        assert r.background != t.background
        moved = S.sample_pair(rng, layout="same_size")
        r, t = moved.reference_context, moved.target_context
        assert r.size == t.size and (r.vertical, r.horizontal) != (t.vertical, t.horizontal)
    with pytest.raises(ValueError):
        S.sample_pair(rng, layout="sideways")
    with pytest.raises(ValueError):
        S.sample_pair(rng, track="noisy")


def test_pair_stream_is_seeded_and_groups_targets() -> None:
    a = S.PairStream(seed=4, targets_per_reference=3, layout={"same_layout": 1.0, "random": 0.0})
    b = S.PairStream(seed=4, targets_per_reference=3, layout={"same_layout": 1.0, "random": 0.0})
    pa, pb = a.take(6), b.take(6)
    assert [p.prompt for p in pa] == [p.prompt for p in pb]
    assert pa[0].reference is pa[1].reference is pa[2].reference
    assert pa[3].subject != pa[0].subject
    assert all(p.layout == "same_layout" for p in pa)
    a.layout = "random"  # a trainer moves to the next curriculum stage
    a.track = {"distractor": 1.0}
    assert all(p.track == "distractor" and p.layout == "random" for p in a.take(3))
    assert [p.prompt for p in S.PairStream(seed=5).take(6)] != [p.prompt for p in pa]


def test_psnr() -> None:
    img = S.render(S.subject_from_id(0), S.Context("small", "top", "left", "white"))
    assert S.psnr(img, img) == math.inf
    other = img.copy()
    other[0, 0, 0] ^= 1
    assert 80 < S.psnr(img, other) < S.PSNR_CAP
    with pytest.raises(ValueError):
        S.psnr(img, img[:32])
    with pytest.raises(ValueError):
        S.identity(img.astype(np.float32), S.subject_from_id(0))


def test_wrong_references_and_grid(clean_split: list[S.Pair]) -> None:
    wrong = S.wrong_references(clean_split[:4])
    assert wrong[0] is clean_split[1].reference and wrong[3] is clean_split[0].reference
    rows = [[p.reference, p.target, p.target] for p in clean_split[:3]] + [[clean_split[3].reference]]
    grid = S.make_grid(rows, labels=["reference", "generated", "target"], scale=2)
    assert isinstance(grid, Image.Image)
    assert grid.size == (3 * 128 + 4 * 2, 14 + 4 * 128 + 5 * 2)
    arr = np.asarray(grid)
    # top-left image pixel is the first reference's pixel, upscaled
    np.testing.assert_array_equal(arr[14 + 2, 2], clean_split[0].reference[0, 0])


def _bfs_largest_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        seen[y, x] = True
        stack, comp = [(int(y), int(x))], []
        while stack:
            cy, cx = stack.pop()
            comp.append((cy, cx))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < 64 and 0 <= nx < 64 and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(comp) > len(best):
            best = comp
    ys, xs = zip(*best, strict=True)
    return min(xs), min(ys), max(xs) - min(xs) + 1, max(ys) - min(ys) + 1


def test_find_sprite_matches_a_plain_flood_fill_on_random_masks() -> None:
    rng = np.random.default_rng(9)
    for density in (0.3, 0.5, 0.6):
        mask = rng.random((64, 64)) < density
        mask[0] = mask[-1] = mask[:, 0] = mask[:, -1] = False  # keep the border as background
        img = np.full((64, 64, 3), 25, np.uint8)
        img[mask] = (235, 210, 50)
        assert S.find_sprite(img) == _bfs_largest_box(mask)
