"""The synthetic ground-truth domain ("sprites"): its spec (versions 1 and 2) as docs/synthetic.md describes it.

Real subject-driven benchmarks need big pretrained models and proxy metrics; here every target image
is known, so identity and prompt-following are measured exactly and a model can be trained from
scratch on a CPU. Images are 64 x 64 RGB uint8 arrays (H, W, 3) throughout.

Choices the spec leaves open (all documented where they are made):

* ``Subject.colors`` holds one sprite-colour index per *silhouette* cell, in row-major order of the
  X cells only (no entries for empty cells). ``Subject.color_grid()`` gives the 5 x 5 view with -1.
* ``subject_from_id(i)`` draws from ``np.random.default_rng([SPEC_SEED, i])``: first the class
  (``integers(4)`` over ``CLASS_NAMES``), then the colours (``integers(6, size=n_cells)``).
* A distractor's box never intersects the subject's box (edges may touch); when the reference
  context leaves no room for any distractor, the reference context is redrawn.
* ``find_sprite`` calls a pixel "far" from the background when its max-channel absolute difference
  exceeds ``FAR_THRESHOLD`` = 40 (the closest sprite/background pair, purple on gray, differs by 62).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

import numpy as np
from PIL import Image

from ..errors import PromptError
from ..images import make_grid  # noqa: F401 - part of this module's API (grids of sprite pairs)

# ----------------------------------------------------------------------------------------------
# Constants of the spec
# ----------------------------------------------------------------------------------------------

CANVAS = 64
GRID = 5
SPEC_SEED = 0x5B12E5  # root of every seeded stream in this module ("sprites")
N_EVAL_IDS = 10_000  # subject ids 0..9,999 are evaluation-only
MAX_SUBJECT_ID = 2**31  # training ids are drawn from [N_EVAL_IDS, MAX_SUBJECT_ID)
FAR_THRESHOLD = 40  # max-channel abs difference that makes a pixel "sprite" in find_sprite
PSNR_CAP = 100.0  # score() caps per-sample PSNR here so identical images keep means finite

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
    "pink": (245, 175, 200),
    "cyan": (110, 215, 225),
    "brown": (115, 80, 50),
}
SPRITE_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 50),
    "green": (50, 170, 70),
    "blue": (50, 90, 220),
    "yellow": (235, 210, 50),
    "orange": (240, 140, 40),
    "purple": (140, 70, 190),
}
CLASSES: dict[str, tuple[str, ...]] = {
    "robot": ("XXXXX", "XXXXX", "XXXXX", "XXXXX", "XXXXX"),
    "creature": (".XXX.", "XXXXX", "XXXXX", "XXXXX", ".XXX."),
    "vase": (".XXX.", "..X..", ".XXX.", "XXXXX", ".XXX."),
    "tree": ("..X..", ".XXX.", ".XXX.", "XXXXX", "..X.."),
}
SIZES: dict[str, int] = {"small": 4, "large": 8}  # px per cell
VERTICAL: dict[str, float] = {"top": 0.25, "middle": 0.5, "bottom": 0.75}
HORIZONTAL: dict[str, float] = {"left": 0.25, "center": 0.5, "right": 0.75}

BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)
SPRITE_COLOR_NAMES: tuple[str, ...] = tuple(SPRITE_COLORS)
CLASS_NAMES: tuple[str, ...] = tuple(CLASSES)
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)
VERTICAL_NAMES: tuple[str, ...] = tuple(VERTICAL)
HORIZONTAL_NAMES: tuple[str, ...] = tuple(HORIZONTAL)
TRACKS: tuple[str, ...] = ("clean", "distractor")
TRAINING_TRACKS: tuple[str, ...] = (*TRACKS, "two_subject")  # data.track names (two_subject: spec version 2)
LAYOUTS: tuple[str, ...] = ("random", "same_layout", "same_size")
# Spec version 2: where the reference's subject sits (``grid``: the prompt grid; ``free``: any pixel offset)
# and where a distractor may sit (``grid``: version 1's generator, the 3 x 3 prompt grid; ``any``: any pixel
# offset, boxes may touch, as the spec allows).
PLACEMENTS: tuple[str, ...] = ("grid", "free")
DISTRACTOR_OFFSETS: tuple[str, ...] = ("grid", "any")
CONTACTS: tuple[str, ...] = ("touching", "apart")  # a distractor's box against the subject's (boxes_touch)
MAX_REDRAWS = 1000  # references redrawn before a distractor constraint is declared impossible
MIN_TARGET_GAP = 4  # two-subject targets: the two boxes at least this many px apart

_BG_ARRAY = np.array(list(BACKGROUNDS.values()), dtype=np.int64)
_SPRITE_ARRAY = np.array(list(SPRITE_COLORS.values()), dtype=np.int64)


def _silhouette(rows: tuple[str, ...]) -> np.ndarray:
    mask = np.array([[ch == "X" for ch in row] for row in rows], dtype=bool)
    mask.setflags(write=False)
    return mask


SILHOUETTES: dict[str, np.ndarray] = {name: _silhouette(rows) for name, rows in CLASSES.items()}
# (row, col) of each silhouette cell in row-major order: the order of Subject.colors.
SILHOUETTE_CELLS: dict[str, tuple[tuple[int, int], ...]] = {
    name: tuple((int(r), int(c)) for r, c in zip(*np.nonzero(mask), strict=True))
    for name, mask in SILHOUETTES.items()
}

# ----------------------------------------------------------------------------------------------
# Subjects
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Subject:
    """A class and a colouring of its silhouette: one SPRITE_COLORS index per X cell (row-major)."""

    cls: str
    colors: tuple[int, ...]
    subject_id: int | None = None

    def __post_init__(self) -> None:
        if self.cls not in CLASSES:
            raise ValueError(f"unknown sprite class {self.cls!r}; expected one of {CLASS_NAMES}")
        colors = tuple(int(c) for c in self.colors)
        object.__setattr__(self, "colors", colors)
        n = len(SILHOUETTE_CELLS[self.cls])
        if len(colors) != n:
            raise ValueError(f"a {self.cls} has {n} cells, got {len(colors)} colours")
        if any(not 0 <= c < len(SPRITE_COLORS) for c in colors):
            raise ValueError(f"colour indices must be in [0, {len(SPRITE_COLORS)}), got {colors}")

    @property
    def name(self) -> str:
        """The subject name the spec uses in prompts and pairs: the class word."""
        return self.cls

    def color_grid(self) -> np.ndarray:
        """5 x 5 int array of colour indices, -1 where the silhouette is empty."""
        grid = np.full((GRID, GRID), -1, dtype=np.int64)
        for (r, c), k in zip(SILHOUETTE_CELLS[self.cls], self.colors, strict=True):
            grid[r, c] = k
        return grid


def subject_from_id(subject_id: int) -> Subject:
    """The subject with this id: class then colours from ``default_rng([SPEC_SEED, id])``."""
    subject_id = int(subject_id)
    if not 0 <= subject_id < MAX_SUBJECT_ID:
        raise ValueError(f"subject id must be in [0, {MAX_SUBJECT_ID}), got {subject_id}")
    rng = np.random.default_rng([SPEC_SEED, subject_id])
    cls = CLASS_NAMES[int(rng.integers(len(CLASS_NAMES)))]
    colors = rng.integers(len(SPRITE_COLORS), size=len(SILHOUETTE_CELLS[cls]))
    return Subject(cls, tuple(int(c) for c in colors), subject_id)


def is_eval_id(subject_id: int | None) -> bool:
    """True for ids reserved to evaluation (0..9,999)."""
    return subject_id is not None and 0 <= subject_id < N_EVAL_IDS


def sample_training_subject(rng: np.random.Generator) -> Subject:
    """A training subject: an id drawn uniformly from [10,000, 2**31), never an evaluation id."""
    return subject_from_id(int(rng.integers(N_EVAL_IDS, MAX_SUBJECT_ID)))


def random_subject(
    rng: np.random.Generator, cls: str | None = None, exclude_cls: str | None = None
) -> Subject:
    """A fresh colouring without an id (used for distractors); class uniform unless given."""
    if cls is None:
        choices = [c for c in CLASS_NAMES if c != exclude_cls]
        cls = choices[int(rng.integers(len(choices)))]
    colors = rng.integers(len(SPRITE_COLORS), size=len(SILHOUETTE_CELLS[cls]))
    return Subject(cls, tuple(int(c) for c in colors), None)


# ----------------------------------------------------------------------------------------------
# Contexts and prompts
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """What the prompt controls: sprite size, position and the background colour."""

    size: str
    vertical: str
    horizontal: str
    background: str

    def __post_init__(self) -> None:
        for value, allowed, what in (
            (self.size, SIZE_NAMES, "size"),
            (self.vertical, VERTICAL_NAMES, "vertical position"),
            (self.horizontal, HORIZONTAL_NAMES, "horizontal position"),
            (self.background, BACKGROUND_NAMES, "background"),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; expected one of {allowed}")

    def prompt(self, cls: str) -> str:
        """The spec's prompt: ``a {size} {class} on a {background} background, {vertical} {horizontal}``."""
        if cls not in CLASSES:
            raise ValueError(f"unknown sprite class {cls!r}; expected one of {CLASS_NAMES}")
        return f"a {self.size} {cls} on a {self.background} background, {self.vertical} {self.horizontal}"

    @property
    def box(self) -> tuple[int, int, int]:
        """``sprite_box(self)``."""
        return sprite_box(self)


def _pick(rng: np.random.Generator, names: Sequence[str], exclude: str | None = None) -> str:
    choices = [n for n in names if n != exclude]
    return choices[int(rng.integers(len(choices)))]


def sample_context(rng: np.random.Generator) -> Context:
    """A uniformly random context (size, vertical, horizontal, background drawn in that order)."""
    return Context(
        size=_pick(rng, SIZE_NAMES),
        vertical=_pick(rng, VERTICAL_NAMES),
        horizontal=_pick(rng, HORIZONTAL_NAMES),
        background=_pick(rng, BACKGROUND_NAMES),
    )


def all_contexts() -> list[Context]:
    """Every one of the 2 x 3 x 3 x 6 = 108 contexts, in a fixed order."""
    return [
        Context(s, v, h, b)
        for s in SIZE_NAMES
        for v in VERTICAL_NAMES
        for h in HORIZONTAL_NAMES
        for b in BACKGROUND_NAMES
    ]


def _alt(names: Sequence[str]) -> str:
    return "|".join(re.escape(n) for n in names)


_PROMPT_RE = re.compile(
    rf"a ({_alt(SIZE_NAMES)}) ({_alt(CLASS_NAMES)}) on a ({_alt(BACKGROUND_NAMES)}) background, "
    rf"({_alt(VERTICAL_NAMES)}) ({_alt(HORIZONTAL_NAMES)})"
)
PROMPT_GRAMMAR = "a {size} {class} on a {background} background, {vertical} {horizontal}"


def parse_prompt(text: str) -> tuple[str, Context]:
    """Inverse of ``Context.prompt``: returns (class, context); only surrounding whitespace is forgiven."""
    match = _PROMPT_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise PromptError(f"not a sprite prompt: {text!r}; expected {PROMPT_GRAMMAR!r}")
    size, cls, background, vertical, horizontal = match.groups()
    return cls, Context(size, vertical, horizontal, background)


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def _axis_start(p: float, side: int) -> int:
    start = math.floor((p * CANVAS - side / 2) / 4) * 4
    return min(max(start, 0), CANVAS - side)


def sprite_box(context: Context) -> tuple[int, int, int]:
    """(x0, y0, side): top-left ``p*64 - S/2`` rounded down to a multiple of 4, clamped to [0, 64-S]."""
    side = GRID * SIZES[context.size]
    return (
        _axis_start(HORIZONTAL[context.horizontal], side),
        _axis_start(VERTICAL[context.vertical], side),
        side,
    )


def boxes_overlap(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    """True when two (x0, y0, side) boxes share a pixel (touching edges do not count)."""
    ax, ay, aside = a
    bx, by, bside = b
    return ax < bx + bside and bx < ax + aside and ay < by + bside and by < ay + aside


def box_gap(a: tuple[int, int, int], b: tuple[int, int, int]) -> int:
    """Pixels between two (x0, y0, side) boxes (Chebyshev): 0 when they touch (an edge or a corner) or overlap."""
    ax, ay, aside = a
    bx, by, bside = b
    gap_x = max(0, bx - (ax + aside), ax - (bx + bside))
    gap_y = max(0, by - (ay + aside), ay - (by + bside))
    return max(gap_x, gap_y)


def boxes_touch(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    """True when two boxes share no pixel but their borders meet (along an edge or at a corner)."""
    return not boxes_overlap(a, b) and box_gap(a, b) == 0


def _draw(img: np.ndarray, subject: Subject, box: tuple[int, int, int]) -> None:
    x0, y0, side = box
    cell = side // GRID
    for (r, c), k in zip(SILHOUETTE_CELLS[subject.cls], subject.colors, strict=True):
        y, x = y0 + r * cell, x0 + c * cell
        img[y : y + cell, x : x + cell] = SPRITE_COLORS[SPRITE_COLOR_NAMES[k]]


def render_boxes(background: str, sprites: Sequence[tuple[Subject, tuple[int, int, int]]]) -> np.ndarray:
    """Sprites at explicit (x0, y0, side) boxes (side 20 or 40, inside the canvas, no two overlapping)."""
    img = np.empty((CANVAS, CANVAS, 3), dtype=np.uint8)
    img[:] = BACKGROUNDS[background]
    sides = {GRID * s for s in SIZES.values()}
    for i, (subject, box) in enumerate(sprites):
        x0, y0, side = box
        if side not in sides or not (0 <= x0 <= CANVAS - side and 0 <= y0 <= CANVAS - side):
            raise ValueError(f"sprite box {box} is not a {sorted(sides)}-px box inside the {CANVAS}-px canvas")
        for _, other in sprites[:i]:
            if boxes_overlap(box, other):
                raise ValueError(f"sprite box {box} overlaps the box {other}")
        _draw(img, subject, box)
    return img


def render(
    subject: Subject, context: Context, distractor: tuple[Subject, Context] | None = None
) -> np.ndarray:
    """The exact image: solid cells on the context's background; the distractor uses the same background."""
    sprites = [(subject, sprite_box(context))]
    if distractor is not None:
        sprites.append((distractor[0], sprite_box(distractor[1])))
    return render_boxes(context.background, sprites)


def context_of_box(box: tuple[int, int, int], background: str) -> Context:
    """The grid context whose thirds hold the box's centre (how a free-placed sprite would be prompted)."""
    x0, y0, side = box
    size = next(name for name, cell in SIZES.items() if GRID * cell == side)
    return Context(size, VERTICAL_NAMES[_third(y0 + side / 2, CANVAS)],
                   HORIZONTAL_NAMES[_third(x0 + side / 2, CANVAS)], background)


def distractor_contexts(context: Context) -> list[Context]:
    """Every distractor context (same background) whose box does not overlap ``context``'s box."""
    box = sprite_box(context)
    return [
        Context(s, v, h, context.background)
        for s in SIZE_NAMES
        for v in VERTICAL_NAMES
        for h in HORIZONTAL_NAMES
        if not boxes_overlap(box, sprite_box(Context(s, v, h, context.background)))
    ]


# ----------------------------------------------------------------------------------------------
# Pairs
# ----------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Pair:
    """One reference -> target example; ``prompt`` is the target's prompt, ``subject_name`` the class."""

    reference: np.ndarray
    target: np.ndarray
    prompt: str
    subject_name: str
    subject: Subject
    target_context: Context
    reference_context: Context
    distractor: Subject | None = None
    distractor_context: Context | None = None
    track: str = "clean"
    layout: str = "random"
    placement: str = "grid"
    reference_box: tuple[int, int, int] | None = None  # where the subject is drawn in the reference
    distractor_box: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.reference_box is None:
            self.reference_box = sprite_box(self.reference_context)
        if self.distractor_box is None and self.distractor_context is not None:
            self.distractor_box = sprite_box(self.distractor_context)

    @property
    def touching(self) -> bool | None:
        """Distractor track: whether the distractor's box touches the subject's (None without one)."""
        if self.distractor_box is None or self.reference_box is None:
            return None
        return boxes_touch(self.reference_box, self.distractor_box)


def _check_choice(value: str, allowed: Sequence[str], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {tuple(allowed)}")


def _target_context(rng: np.random.Generator, reference: Context, layout: str) -> Context:
    if layout == "random":
        return sample_context(rng)
    if layout == "same_layout":  # keep size and position, change the background
        background = _pick(rng, BACKGROUND_NAMES, exclude=reference.background)
        return Context(reference.size, reference.vertical, reference.horizontal, background)
    # same_size: keep the size, move to another of the 8 other positions, any background
    positions = [
        (v, h)
        for v in VERTICAL_NAMES
        for h in HORIZONTAL_NAMES
        if (v, h) != (reference.vertical, reference.horizontal)
    ]
    v, h = positions[int(rng.integers(len(positions)))]
    return Context(reference.size, v, h, _pick(rng, BACKGROUND_NAMES))


def _random_box(rng: np.random.Generator, size: str) -> tuple[int, int, int]:
    side = GRID * SIZES[size]
    x0, y0 = (int(v) for v in rng.integers(0, CANVAS - side + 1, size=2))
    return x0, y0, side


def _reference_placement(rng: np.random.Generator, placement: str,
                         size: str | None = None) -> tuple[Context, tuple[int, int, int]]:
    """The reference's context and subject box: on the prompt grid, or (``free``) at any pixel offset.

    ``size`` forces the subject's size (the grid context is still drawn whole, then resized).
    """
    if placement == "grid":
        ctx = sample_context(rng)
        ctx = ctx if size is None else replace(ctx, size=size)
        return ctx, sprite_box(ctx)
    box = _random_box(rng, size or _pick(rng, SIZE_NAMES))
    return context_of_box(box, _pick(rng, BACKGROUND_NAMES)), box


def _admits(subject_box: tuple[int, int, int], box: tuple[int, int, int], contact: str | None) -> bool:
    """Whether a distractor may sit at ``box``: no pixel shared with the subject, and ``contact`` (None: either)."""
    if boxes_overlap(subject_box, box):
        return False
    return contact is None or (box_gap(subject_box, box) == 0) == (contact == "touching")


def _distractor_anywhere(rng: np.random.Generator, subject_box: tuple[int, int, int], background: str,
                         contact: str | None = None, tries: int = 32) -> tuple[Context, tuple[int, int, int]] | None:
    """A distractor box at any pixel offset that does not overlap the subject's (touching allowed).

    With ``contact`` the box is drawn uniformly among every offset that meets it (touching boxes are too rare
    for rejection sampling); None when the drawn size has none.
    """
    if contact is None:
        for _ in range(tries):
            box = _random_box(rng, _pick(rng, SIZE_NAMES))
            if _admits(subject_box, box, None):
                return context_of_box(box, background), box
        return None
    side = GRID * SIZES[_pick(rng, SIZE_NAMES)]
    boxes = [(x, y, side) for y in range(CANVAS - side + 1) for x in range(CANVAS - side + 1)]
    options = [b for b in boxes if _admits(subject_box, b, contact)]
    if not options:
        return None
    box = options[int(rng.integers(len(options)))]
    return context_of_box(box, background), box


def sample_group(
    rng: np.random.Generator,
    n_targets: int,
    track: str = "clean",
    subject: Subject | None = None,
    layout: str = "random",
    placement: str = "grid",
    distractor_offsets: str = "grid",
    reference_size: str | None = None,
    distractor_contact: str | None = None,
) -> list[Pair]:
    """``n_targets`` pairs sharing one reference (same subject, reference image and distractor).

    Draw order: subject (if not given), reference placement, [distractor placement, distractor subject],
    then each target context. Layouts (staged curriculum): ``random`` = independent target context;
    ``same_layout`` = reference's size and grid position, another background; ``same_size`` = reference's
    size, another of the 8 other positions, any background. ``placement`` (spec version 2): ``grid`` puts
    the reference's subject on the prompt grid, ``free`` at any pixel offset (its context then names the
    thirds holding its centre). ``distractor_offsets``: ``grid`` is version 1's rule (a grid position),
    ``any`` the spec's (any pixel offset, boxes may touch). With ``grid``/``grid`` the stream is exactly
    version 1's. ``reference_size`` forces the reference subject's size and ``distractor_contact``
    (``touching``/``apart``) the distractor's contact with it; None (the default) draws nothing extra.
    When a reference leaves no room for such a distractor, the reference is redrawn.
    """
    _check_choice(track, TRACKS, "track")
    _check_choice(layout, LAYOUTS, "layout")
    _check_choice(placement, PLACEMENTS, "placement")
    _check_choice(distractor_offsets, DISTRACTOR_OFFSETS, "distractor_offsets")
    if reference_size is not None:
        _check_choice(reference_size, SIZE_NAMES, "reference_size")
    if distractor_contact is not None:
        _check_choice(distractor_contact, CONTACTS, "distractor_contact")
    if n_targets < 1:
        raise ValueError(f"n_targets must be >= 1, got {n_targets}")
    if subject is None:
        subject = sample_training_subject(rng)
    ref_ctx, ref_box = _reference_placement(rng, placement, reference_size)
    distractor: Subject | None = None
    d_ctx: Context | None = None
    d_box: tuple[int, int, int] | None = None
    if track == "distractor":
        for _ in range(MAX_REDRAWS):
            if distractor_offsets == "grid":
                options = [c for c in distractor_contexts(ref_ctx)
                           if _admits(ref_box, sprite_box(c), distractor_contact)]
                if options:
                    d_ctx = options[int(rng.integers(len(options)))]
                    d_box = sprite_box(d_ctx)
                    break
            else:
                found = _distractor_anywhere(rng, ref_box, ref_ctx.background, distractor_contact)
                if found is not None:
                    d_ctx, d_box = found
                    break
            ref_ctx, ref_box = _reference_placement(rng, placement, reference_size)  # no room: redraw
        else:
            where = "touching it" if distractor_contact == "touching" else "apart from it"
            raise ValueError(f"no {reference_size or 'any-size'} reference with {placement} placement leaves room "
                             f"for a distractor {where} at {distractor_offsets} offsets")
        distractor = random_subject(rng, exclude_cls=subject.cls)
    sprites = [(subject, ref_box)] + ([] if distractor is None else [(distractor, d_box)])
    reference = render_boxes(ref_ctx.background, sprites)
    reference.setflags(write=False)
    pairs = []
    for _ in range(n_targets):
        tgt_ctx = _target_context(rng, ref_ctx, layout)
        target = render(subject, tgt_ctx)
        target.setflags(write=False)
        pairs.append(
            Pair(
                reference=reference,
                target=target,
                prompt=tgt_ctx.prompt(subject.cls),
                subject_name=subject.name,
                subject=subject,
                target_context=tgt_ctx,
                reference_context=ref_ctx,
                distractor=distractor,
                distractor_context=d_ctx,
                track=track,
                layout=layout,
                placement=placement,
                reference_box=ref_box,
                distractor_box=d_box,
            )
        )
    return pairs


def sample_pair(
    rng: np.random.Generator,
    track: str = "clean",
    subject: Subject | None = None,
    layout: str = "random",
    placement: str = "grid",
    distractor_offsets: str = "grid",
    reference_size: str | None = None,
    distractor_contact: str | None = None,
) -> Pair:
    """One pair; a training subject (id >= 10,000) is drawn when ``subject`` is None."""
    return sample_group(rng, 1, track=track, subject=subject, layout=layout, placement=placement,
                        distractor_offsets=distractor_offsets, reference_size=reference_size,
                        distractor_contact=distractor_contact)[0]


def draw_weighted(rng: np.random.Generator, spec: str | Mapping[str, float]) -> str:
    """``spec`` itself when it is one name, else a name drawn with probability proportional to its weight."""
    if isinstance(spec, str):
        return spec
    names = list(spec)
    weights = np.array([float(spec[n]) for n in names])
    if len(names) == 0 or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {dict(spec)}")
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]


@dataclass
class PairStream:
    """Endless training pairs (subject ids >= 10,000) from ``seed``.

    ``track`` and ``layout`` are a name or a {name: weight} mapping drawn per reference; both are
    plain attributes, so a trainer can change the curriculum stage mid-stream. ``targets_per_reference``
    consecutive pairs share one reference (one reference pass feeds several targets: docs/default-model.md).
    """

    seed: int = 0
    track: str | Mapping[str, float] = "clean"
    layout: str | Mapping[str, float] = "random"
    targets_per_reference: int = 1
    placement: str | Mapping[str, float] = "grid"
    distractor_offsets: str = "grid"
    _rng: np.random.Generator = field(init=False, repr=False)
    _pending: list[Pair] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        # Tag 1 separates the training stream from subject_from_id's [SPEC_SEED, id] streams.
        self._rng = np.random.default_rng([SPEC_SEED, 1, int(self.seed)])

    def __iter__(self) -> Iterator[Pair]:
        return self

    def __next__(self) -> Pair:
        if not self._pending:
            track = draw_weighted(self._rng, self.track)
            layout = draw_weighted(self._rng, self.layout)
            placement = "grid" if self.placement == "grid" else draw_weighted(self._rng, self.placement)
            self._pending = sample_group(self._rng, self.targets_per_reference, track=track, layout=layout,
                                         placement=placement, distractor_offsets=self.distractor_offsets)
        return self._pending.pop(0)

    def take(self, n: int) -> list[Pair]:
        """The next ``n`` pairs."""
        return [next(self) for _ in range(n)]


def _evaluation_ids(n: int, seed: int) -> np.ndarray:
    if not 0 < n <= N_EVAL_IDS:
        raise ValueError(f"n must be in [1, {N_EVAL_IDS}], got {n}")
    return np.random.default_rng([SPEC_SEED, 2, int(seed)]).permutation(N_EVAL_IDS)[:n]


def evaluation_split(n: int = 64, track: str = "clean", seed: int = 0, layout: str = "random",
                     placement: str = "grid", distractor_offsets: str = "grid") -> list[Pair]:
    """Deterministic held-out pairs over evaluation ids 0..9,999.

    Subject ids are ``default_rng([SPEC_SEED, 2, seed]).permutation(10_000)[:n]`` (so a smaller ``n``
    is a prefix of a larger one). Pair k then calls ``sample_pair`` with the subject of the k-th id and
    ``default_rng([SPEC_SEED, 2, seed, k])``. The clean and distractor tracks therefore share
    subjects; their contexts differ only where a distractor needs a redraw. The defaults are version 1's
    split (the v1-v6 default models' tables); version 2's tracks pass ``placement`` and
    ``distractor_offsets="any"``.
    """
    _check_choice(track, TRACKS, "track")
    ids = _evaluation_ids(n, seed)
    return [
        sample_pair(
            np.random.default_rng([SPEC_SEED, 2, int(seed), k]),
            track=track,
            subject=subject_from_id(int(i)),
            layout=layout,
            placement=placement,
            distractor_offsets=distractor_offsets,
        )
        for k, i in enumerate(ids)
    ]


PairT = TypeVar("PairT")


def wrong_partners(pairs: Sequence[PairT]) -> list[PairT]:
    """Pair k+1 for pair k (cyclic): whose references make the wrong-reference control of pair k (one subject or
    two), so equal identity with right and wrong references means the references are ignored."""
    if len(pairs) < 2:
        raise ValueError("need at least two pairs to build wrong references")
    return [pairs[(k + 1) % len(pairs)] for k in range(len(pairs))]


def wrong_references(pairs: Sequence[Pair]) -> list[np.ndarray]:
    """The reference of `wrong_partners` for each one-subject pair."""
    return [partner.reference for partner in wrong_partners(pairs)]


# ----------------------------------------------------------------------------------------------
# Exact metrics
# ----------------------------------------------------------------------------------------------

Box = tuple[int, int, int, int]  # (x0, y0, width, height) of a found sprite


def _as_image(img: np.ndarray | Image.Image) -> np.ndarray:
    if isinstance(img, Image.Image):
        img = np.asarray(img.convert("RGB"))
    arr = np.asarray(img)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(
            f"expected a uint8 (H, W, 3) image or a PIL image, got dtype {arr.dtype} shape {arr.shape}"
        )
    return arr


def border_color(img: np.ndarray | Image.Image) -> np.ndarray:
    """Per-channel median of the 1-px border ring: the image's own background colour."""
    arr = _as_image(img).astype(np.int64)
    ring = np.concatenate([arr[0], arr[-1], arr[1:-1, 0], arr[1:-1, -1]])
    return np.median(ring, axis=0)


def nearest_background(color: Sequence[float] | np.ndarray) -> str:
    """Name of the background palette colour nearest (Euclidean RGB) to ``color``."""
    d = ((_BG_ARRAY - np.asarray(color, dtype=np.float64)) ** 2).sum(axis=1)
    return BACKGROUND_NAMES[int(np.argmin(d))]


def _components(mask: np.ndarray) -> np.ndarray:
    """4-connected labels of ``mask`` (-1 off-mask): min-label propagation with pointer jumping."""
    h, w = mask.shape
    big = h * w
    flat_idx = np.arange(big).reshape(h, w)
    lab = np.where(mask, flat_idx, big)
    while True:
        new = lab.copy()
        np.minimum(new[1:], lab[:-1], out=new[1:])
        np.minimum(new[:-1], lab[1:], out=new[:-1])
        np.minimum(new[:, 1:], lab[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], lab[:, 1:], out=new[:, :-1])
        new = np.where(mask, new, big)
        # pointer jumping: a pixel's label is a pixel of the same component; adopt that pixel's label
        ext = np.append(new.ravel(), big)
        for _ in range(4):
            ext[:-1] = ext[ext[:-1]]
        new = ext[:-1].reshape(h, w)
        if np.array_equal(new, lab):
            return np.where(mask, lab, -1)
        lab = new


def find_sprite(img: np.ndarray | Image.Image) -> Box | None:
    """(x0, y0, w, h) of the largest 4-connected region far (> FAR_THRESHOLD) from the border colour.

    Ties: the region whose first pixel comes first (`find_sprites`' order).
    """
    boxes = find_sprites(img, 1)
    return boxes[0] if boxes else None


def read_cells(img: np.ndarray | Image.Image, box: Box | None = None) -> np.ndarray | None:
    """5 x 5 sprite-colour indices at the box's cell centres (pixel at floor of each centre)."""
    arr = _as_image(img)
    if box is None:
        box = find_sprite(arr)
        if box is None:
            return None
    x0, y0, w, h = box
    centres = (np.arange(GRID) + 0.5) / GRID
    xs = np.clip(np.floor(x0 + centres * w).astype(int), 0, arr.shape[1] - 1)
    ys = np.clip(np.floor(y0 + centres * h).astype(int), 0, arr.shape[0] - 1)
    samples = arr[ys[:, None], xs[None, :]].astype(np.int64)  # (5, 5, 3)
    d = ((samples[:, :, None, :] - _SPRITE_ARRAY[None, None]) ** 2).sum(axis=3)
    return d.argmin(axis=2)


def _identity_from_cells(cells: np.ndarray | None, subject: Subject) -> float:
    if cells is None:
        return 0.0
    want = subject.color_grid()
    mask = SILHOUETTES[subject.cls]
    return float((cells[mask] == want[mask]).mean())


def identity(generated: np.ndarray | Image.Image, subject: Subject) -> float:
    """Fraction of the subject's silhouette cells whose snapped colour matches; 0 with no sprite."""
    return _identity_from_cells(read_cells(generated), subject)


def _third(centre: float, extent: int) -> int:
    return min(int(centre * 3 // extent), 2)


def _prompt_checks(arr: np.ndarray, box: Box | None, context: Context) -> dict[str, bool]:
    background = nearest_background(border_color(arr)) == context.background
    if box is None:
        return {"background": background, "position": False, "size": False}
    x0, y0, w, h = box
    cx, cy = x0 + w / 2, y0 + h / 2
    position = _third(cx, arr.shape[1]) == HORIZONTAL_NAMES.index(context.horizontal) and _third(
        cy, arr.shape[0]
    ) == VERTICAL_NAMES.index(context.vertical)
    side = (w + h) / 2  # generated boxes need not be square
    want = GRID * SIZES[context.size]
    other = GRID * SIZES[next(s for s in SIZE_NAMES if s != context.size)]
    size = abs(side - want) < abs(side - other)
    return {"background": background, "position": bool(position), "size": bool(size)}


def prompt_checks(generated: np.ndarray | Image.Image, context: Context) -> dict[str, bool]:
    """The three checks of prompt accuracy.

    background: the border colour snaps to the requested background; position: the box centre lies
    in the requested third on both axes; size: the box side (mean of width and height) is strictly
    nearer to the requested sprite side (20 or 40 px) than to the other.
    """
    arr = _as_image(generated)
    return _prompt_checks(arr, find_sprite(arr), context)


def prompt_accuracy(generated: np.ndarray | Image.Image, context: Context) -> float:
    """Mean of the background, position and size checks."""
    return float(np.mean(list(prompt_checks(generated, context).values())))


def leaked(generated: np.ndarray | Image.Image, subject: Subject, distractor: Subject) -> bool:
    """True when the found sprite matches the distractor's colouring strictly better than the subject's."""
    cells = read_cells(generated)
    return _identity_from_cells(cells, distractor) > _identity_from_cells(cells, subject)


def psnr(a: np.ndarray | Image.Image, b: np.ndarray | Image.Image) -> float:
    """PSNR in dB on the 0..255 scale; ``inf`` for identical images."""
    x, y = _as_image(a).astype(np.float64), _as_image(b).astype(np.float64)
    if x.shape != y.shape:
        raise ValueError(f"PSNR needs equal shapes, got {x.shape} and {y.shape}")
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def score(generated_images: Sequence[np.ndarray | Image.Image], pairs: Sequence[Pair]) -> dict:
    """Exact metrics of generated images against their pairs' targets.

    Returns means ``identity``, ``prompt_accuracy``, ``background``, ``position``, ``size``,
    ``found`` (share with a sprite), ``psnr`` (per-sample capped at PSNR_CAP), ``leakage`` (over
    pairs with a distractor; None when there are none), ``n``, and ``per_sample``: the same keys
    as lists (``leakage`` holds None for pairs without a distractor).
    """
    if len(generated_images) != len(pairs):
        raise ValueError(f"{len(generated_images)} images for {len(pairs)} pairs")
    if not pairs:
        raise ValueError("score needs at least one pair")
    keys = ("identity", "prompt_accuracy", "background", "position", "size", "found", "psnr")
    per: dict[str, list] = {k: [] for k in keys}
    per["leakage"] = []
    for img, pair in zip(generated_images, pairs, strict=True):
        arr = _as_image(img)
        box = find_sprite(arr)
        cells = read_cells(arr, box) if box is not None else None
        checks = _prompt_checks(arr, box, pair.target_context)
        per["identity"].append(_identity_from_cells(cells, pair.subject))
        per["prompt_accuracy"].append(float(np.mean(list(checks.values()))))
        for k, v in checks.items():
            per[k].append(float(v))
        per["found"].append(float(box is not None))
        per["psnr"].append(min(psnr(arr, pair.target), PSNR_CAP))
        if pair.distractor is None:
            per["leakage"].append(None)
        else:
            leak = _identity_from_cells(cells, pair.distractor) > _identity_from_cells(cells, pair.subject)
            per["leakage"].append(float(leak))
    out: dict = {k: float(np.mean(per[k])) for k in keys}
    leaks = [v for v in per["leakage"] if v is not None]
    out["leakage"] = float(np.mean(leaks)) if leaks else None
    out["n"] = len(pairs)
    out["per_sample"] = per
    return out


# ----------------------------------------------------------------------------------------------
# Two subjects (spec version 2)
# ----------------------------------------------------------------------------------------------

TWO_SUBJECT_GRAMMAR = ("a {size1} {class1} {vertical1} {horizontal1} and a {size2} {class2} {vertical2} "
                       "{horizontal2} on a {background} background")


def two_subject_prompt(classes: Sequence[str], contexts: Sequence[Context]) -> str:
    """The spec's two-subject prompt (both contexts share the background of the first)."""
    a, b = contexts
    return (f"a {a.size} {classes[0]} {a.vertical} {a.horizontal} and a {b.size} {classes[1]} {b.vertical} "
            f"{b.horizontal} on a {a.background} background")


@dataclass(eq=False)
class TwoSubjectPair:
    """Two subjects, each with its own reference image, in one target; ``subject_names`` are the classes."""

    references: tuple[np.ndarray, np.ndarray]
    target: np.ndarray
    prompt: str
    subjects: tuple[Subject, Subject]
    target_contexts: tuple[Context, Context]
    reference_contexts: tuple[Context, Context]
    reference_boxes: tuple[tuple[int, int, int], tuple[int, int, int]]
    placement: str = "grid"
    track: str = "two_subject"

    @property
    def subject_names(self) -> tuple[str, str]:
        return self.subjects[0].name, self.subjects[1].name


def sample_two_subject(rng: np.random.Generator, subjects: tuple[Subject, Subject] | None = None,
                       placement: str = "grid") -> TwoSubjectPair:
    """A two-subject pair: each reference holds its subject alone (clean rules, ``placement``); the target
    holds both on one background at their own grid contexts, boxes >= MIN_TARGET_GAP px apart.

    Draw order: subjects (if not given; the second redrawn until its class differs), each reference
    placement, the target background, then both target contexts (redrawn together until apart).
    """
    return sample_two_subject_group(rng, 1, subjects, placement)[0]


def sample_two_subject_group(rng: np.random.Generator, n_targets: int,
                             subjects: tuple[Subject, Subject] | None = None,
                             placement: str = "grid") -> list[TwoSubjectPair]:
    """``n_targets`` two-subject pairs sharing both references (training: several targets per reference
    pass); each target draws its own background and contexts, in `sample_two_subject`'s order."""
    if n_targets < 1:
        raise ValueError(f"n_targets must be >= 1, got {n_targets}")
    _check_choice(placement, PLACEMENTS, "placement")
    if subjects is None:
        first = sample_training_subject(rng)
        second = sample_training_subject(rng)
        while second.cls == first.cls:
            second = sample_training_subject(rng)
        subjects = (first, second)
    if subjects[0].cls == subjects[1].cls:
        raise ValueError(f"the two subjects must be of different classes, got two {subjects[0].cls}s")
    refs, ref_ctxs, ref_boxes = [], [], []
    for subject in subjects:
        ctx, box = _reference_placement(rng, placement)
        image = render_boxes(ctx.background, [(subject, box)])
        image.setflags(write=False)
        refs.append(image)
        ref_ctxs.append(ctx)
        ref_boxes.append(box)
    pairs = []
    for _ in range(n_targets):
        background = _pick(rng, BACKGROUND_NAMES)
        while True:
            ctxs = [Context(_pick(rng, SIZE_NAMES), _pick(rng, VERTICAL_NAMES), _pick(rng, HORIZONTAL_NAMES),
                            background) for _ in subjects]
            boxes = [sprite_box(c) for c in ctxs]
            if box_gap(*boxes) >= MIN_TARGET_GAP:
                break
        target = render_boxes(background, list(zip(subjects, boxes, strict=True)))
        target.setflags(write=False)
        pairs.append(TwoSubjectPair(
            references=(refs[0], refs[1]), target=target,
            prompt=two_subject_prompt([s.cls for s in subjects], ctxs), subjects=(subjects[0], subjects[1]),
            target_contexts=(ctxs[0], ctxs[1]), reference_contexts=(ref_ctxs[0], ref_ctxs[1]),
            reference_boxes=(ref_boxes[0], ref_boxes[1]), placement=placement,
        ))
    return pairs


def two_subject_split(n: int = 64, seed: int = 0, placement: str = "grid") -> list[TwoSubjectPair]:
    """Deterministic held-out two-subject pairs: held-out ids from ``default_rng([SPEC_SEED, 4, seed])``'s
    permutation, taken in order, each pair's second subject the next id of another class than the first;
    pair k draws its images from ``default_rng([SPEC_SEED, 4, seed, k])``."""
    if not 0 < n <= N_EVAL_IDS // 4:
        raise ValueError(f"n must be in [1, {N_EVAL_IDS // 4}], got {n}")
    order = iter(np.random.default_rng([SPEC_SEED, 4, int(seed)]).permutation(N_EVAL_IDS))
    pairs = []
    for k in range(n):
        first = subject_from_id(int(next(order)))
        second = subject_from_id(int(next(order)))
        while second.cls == first.cls:
            second = subject_from_id(int(next(order)))
        pairs.append(sample_two_subject(np.random.default_rng([SPEC_SEED, 4, int(seed), k]), (first, second),
                                        placement))
    return pairs


def find_sprites(img: np.ndarray | Image.Image, k: int = 2) -> list[Box]:
    """Boxes of the ``k`` largest 4-connected regions far from the border colour, largest first."""
    arr = _as_image(img)
    mask = np.abs(arr.astype(np.int64) - border_color(arr)).max(axis=2) > FAR_THRESHOLD
    if not mask.any():
        return []
    labels = _components(mask)
    ids, counts = np.unique(labels[mask], return_counts=True)
    boxes = []
    for label in ids[np.argsort(-counts, kind="stable")][:k]:
        ys, xs = np.nonzero(labels == label)
        x0, y0 = int(xs.min()), int(ys.min())
        boxes.append((x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1))
    return boxes


def _centre(box: Sequence[int]) -> np.ndarray:
    x0, y0, w, h = box if len(box) == 4 else (box[0], box[1], box[2], box[2])
    return np.array([x0 + w / 2, y0 + h / 2])


def assign_regions(regions: Sequence[Box], contexts: Sequence[Context]) -> list[Box | None]:
    """Region per subject: the assignment minimising the summed centre distance to the requested boxes."""
    want = [_centre(sprite_box(c)) for c in contexts]
    dist = [[float(np.linalg.norm(_centre(r) - w)) for w in want] for r in regions]
    if len(regions) >= 2:
        straight, crossed = dist[0][0] + dist[1][1], dist[0][1] + dist[1][0]
        return [regions[0], regions[1]] if straight <= crossed else [regions[1], regions[0]]
    out: list[Box | None] = [None, None]
    if regions:
        out[int(np.argmin(dist[0]))] = regions[0]
    return out


def _shared_cell_match(cells: np.ndarray, subject: Subject, shared: np.ndarray) -> float:
    return float((cells[shared] == subject.color_grid()[shared]).mean())


def score_two_subjects(generated_images: Sequence[np.ndarray | Image.Image],
                       pairs: Sequence[TwoSubjectPair]) -> dict:
    """Exact two-subject metrics (spec version 2).

    ``identity``: mean over both subjects of the cell accuracy in its assigned region (0 when missing);
    ``identity_first`` / ``identity_second`` per subject slot; ``swap_rate``: share of subjects (2 per image)
    whose region matches the other subject's colouring strictly better than its own on the cells both
    silhouettes share; ``prompt_accuracy``: mean of five checks (background, each subject's position and
    size), broken down as ``background_accuracy``, ``position_accuracy`` and ``size_accuracy`` (the latter two
    over both subjects: what a layout failure gets wrong); ``found``: share of images with both regions; ``psnr``
    against the target.
    """
    if len(generated_images) != len(pairs):
        raise ValueError(f"{len(generated_images)} images for {len(pairs)} pairs")
    if not pairs:
        raise ValueError("score_two_subjects needs at least one pair")
    keys = ("identity", "identity_first", "identity_second", "swap_rate", "prompt_accuracy", "background_accuracy",
            "position_accuracy", "size_accuracy", "found", "psnr")
    per: dict[str, list] = {k: [] for k in keys}
    for img, pair in zip(generated_images, pairs, strict=True):
        arr = _as_image(img)
        regions = find_sprites(arr, 2)
        assigned = assign_regions(regions, pair.target_contexts)
        shared = SILHOUETTES[pair.subjects[0].cls] & SILHOUETTES[pair.subjects[1].cls]
        ids, swaps, checks = [], [], [nearest_background(border_color(arr)) == pair.target_contexts[0].background]
        for slot, (box, subject, ctx) in enumerate(zip(assigned, pair.subjects, pair.target_contexts, strict=True)):
            if box is None:
                ids.append(0.0)
                swaps.append(0.0)
                checks += [False, False]
                continue
            cells = read_cells(arr, box)
            other = pair.subjects[1 - slot]
            ids.append(_identity_from_cells(cells, subject))
            swaps.append(float(_shared_cell_match(cells, other, shared) > _shared_cell_match(cells, subject, shared)))
            sub = _prompt_checks(arr, box, ctx)
            checks += [sub["position"], sub["size"]]
        per["identity"].append(float(np.mean(ids)))
        per["identity_first"].append(ids[0])
        per["identity_second"].append(ids[1])
        per["swap_rate"].append(float(np.mean(swaps)))
        per["prompt_accuracy"].append(float(np.mean(checks)))
        per["background_accuracy"].append(float(checks[0]))
        per["position_accuracy"].append(float(np.mean(checks[1::2])))
        per["size_accuracy"].append(float(np.mean(checks[2::2])))
        per["found"].append(float(len(regions) == 2))
        per["psnr"].append(min(psnr(arr, pair.target), PSNR_CAP))
    out: dict = {k: float(np.mean(per[k])) for k in keys}
    out["n"] = len(pairs)
    out["per_sample"] = per
    return out
