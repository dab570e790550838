"""Training data: sources of (reference, targets, prompts, subject) groups and a resumable loader.

Every source is *indexable*: item ``i`` is always the same example, so the data position of a run is
one integer per process (how many positions it consumed) and ``--resume`` continues exactly. A
broken row (missing file, unreadable image, malformed line) is skipped and counted with its line or
row number; it never stops a long run — unless nearly everything is broken, which is a wrong path,
not bad luck, and stops with a clear message.

Sources:

* a plugged-in source (customshift/plugins.py): ``data.kind: synthetic`` is the sprite domain's
  (customshift/sprites/data.py), endless; a user's own is named by entry point or ``module:Class``.
* `ManifestSource`: a JSONL file, one ``{"reference", "target", "caption", "subject"}`` object per line;
  relative paths are resolved against the manifest's folder.
* `Subjects200KSource`: Subjects200K parquet files (side-by-side pair images, 16 px of padding
  around each half, ``description.description_0/1`` per half, ``description.item`` as the subject);
  each row gives two items, left -> right and right -> left.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import CustomShiftError, ImageLoadError, ManifestError
from ..images import load_image

logger = logging.getLogger(__name__)

__all__ = [
    "DataError",
    "Group",
    "GroupLoader",
    "ManifestSource",
    "SkipItem",
    "Subjects200KSource",
    "build_source",
]


class DataError(CustomShiftError, RuntimeError):
    """The data cannot feed the run (e.g. almost every row is broken)."""


class SkipItem(Exception):
    """Raised by a source for an item that cannot be used; ``reason`` is the counter key."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Group:
    """One reference image with its target images and their prompts (same subject)."""

    reference: Image.Image
    subject: str
    targets: list[Image.Image]
    prompts: list[str]
    origin: str
    pairs: list[Any] | None = field(default=None, repr=False)  # synthetic Pairs, for exact metrics
    second: tuple[Image.Image, str] | None = None  # a second subject (reference, name) in the same targets
    # Per target, boolean (H, W) masks of where the first and the second subject are (train.routing_loss_weight).
    subject_masks: list[tuple[np.ndarray, np.ndarray]] | None = field(default=None, repr=False)


# ----------------------------------------------------------------------------------------------------
# JSONL manifest

MANIFEST_FIELDS = ("reference", "target", "caption", "subject")


@dataclass
class ManifestRow:
    line: int
    reference: Path
    target: Path
    caption: str
    subject: str


class ManifestSource:
    """Pairs listed in a JSONL manifest; malformed rows are skipped at load time and counted.

    Each line: ``{"reference": path, "target": path, "caption": str, "subject": str}`` (``prompt`` is
    accepted for ``caption``); other keys are ignored. Blank lines and lines starting with ``#`` are
    skipped silently.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        self.skipped: Counter[str] = Counter()
        self.rows: list[ManifestRow] = []
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ManifestError(f"manifest {self.path} does not exist") from None
        except (OSError, UnicodeDecodeError) as error:
            raise ManifestError(f"cannot read manifest {self.path}: {error}") from None
        root = self.path.parent
        for number, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip() or raw.lstrip().startswith("#"):
                continue
            try:
                self.rows.append(self._parse(raw, number, root))
            except SkipItem as skip:
                self.skipped[skip.reason] += 1
                logger.warning("skipping %s", skip)
        if not self.rows:
            raise ManifestError(
                f"manifest {self.path}: no usable rows ({_summary(self.skipped) or 'the file is empty'}); "
                f"each line needs {', '.join(MANIFEST_FIELDS)}"
            )
        if self.skipped:
            logger.warning("manifest %s: %d usable rows, skipped %s", self.path, len(self.rows), _summary(self.skipped))

    @property
    def length(self) -> int:
        return len(self.rows)

    def _where(self, number: int) -> str:
        return f"{self.path} line {number}"

    def _parse(self, raw: str, number: int, root: Path) -> ManifestRow:
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as error:
            raise SkipItem("bad_json", f"{self._where(number)}: not valid JSON ({error.msg})") from None
        if not isinstance(obj, dict):
            raise SkipItem("bad_json", f"{self._where(number)}: expected a JSON object, got {type(obj).__name__}")
        if "caption" not in obj and "prompt" in obj:
            obj["caption"] = obj["prompt"]
        values = {}
        for name in MANIFEST_FIELDS:
            value = obj.get(name)
            if value is None:
                raise SkipItem("missing_field", f"{self._where(number)}: missing field {name!r}")
            if not isinstance(value, str) or not value.strip():
                raise SkipItem("bad_field", f"{self._where(number)}: field {name!r} must be a non-empty string")
            values[name] = value.strip()
        paths = {}
        for name in ("reference", "target"):
            path = Path(values[name]).expanduser()
            path = path if path.is_absolute() else root / path
            if not path.is_file():
                raise SkipItem("missing_file", f"{self._where(number)}: {name} file {path} does not exist")
            paths[name] = path
        return ManifestRow(number, paths["reference"], paths["target"], values["caption"], values["subject"])

    def get(self, index: int) -> Group:
        row = self.rows[index]
        images = []
        for name, path in (("reference", row.reference), ("target", row.target)):
            try:
                images.append(load_image(path))
            except ImageLoadError as error:
                raise SkipItem("unreadable_image", f"{self._where(row.line)}: {name}: {error}") from None
        return Group(images[0], row.subject, [images[1]], [row.caption], self._where(row.line))


# ----------------------------------------------------------------------------------------------------
# Subjects200K


def parquet_files(spec: str | os.PathLike[str]) -> list[Path]:
    """A parquet file, a folder (searched recursively) or a glob, as a sorted list of files."""
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
    if not files:
        raise ManifestError(f"no parquet files at {text}; give a .parquet file, a folder of them or a glob")
    return files


@dataclass
class _S200KRow:
    file: int
    group: int
    row: int  # row inside its row group
    number: int  # row number inside the file, for messages
    item: str
    descriptions: tuple[str, str]


class Subjects200KSource:
    """Subjects200K pairs: item ``2 r`` is row r left -> right, ``2 r + 1`` right -> left.

    Only the small columns are read up front (to filter by ``collections`` and ``min_quality`` and to
    check the descriptions); images are read per row group and decoded on demand. ``padding`` pixels
    are cropped from every side of each half (Subjects200K composites: 16 px between and around the
    two halves, i.e. 8 px per half-side).
    """

    def __init__(
        self,
        spec: str | os.PathLike[str],
        padding: int = 8,
        min_quality: int = 0,
        collections: Sequence[str] = (),
        cache_row_groups: int = 2,
    ) -> None:
        try:
            import pyarrow.parquet as pq
        except ImportError:  # pragma: no cover - pyarrow is in the data extra
            raise DataError("data.kind=subjects200k needs pyarrow: pip install 'customshift[data]'") from None
        self.files = parquet_files(spec)
        self.padding = int(padding)
        self.skipped: Counter[str] = Counter()
        self.rows: list[_S200KRow] = []
        self.blocks: list[tuple[int, int]] = []  # (first item, end item) per row group, for block shuffling
        self._handles: dict[int, Any] = {}
        self._cache: OrderedDict[tuple[int, int], Any] = OrderedDict()
        self._cache_size = max(1, cache_row_groups)
        self._lock = threading.Lock()
        wanted = set(collections)
        for file_index, path in enumerate(self.files):
            try:
                handle = pq.ParquetFile(path)
            except Exception as error:  # noqa: BLE001 - any unreadable file is skipped, not fatal
                self.skipped["unreadable_file"] += 1
                logger.warning("skipping %s: not a readable parquet file (%s)", path, error)
                continue
            names = set(handle.schema_arrow.names)
            if "image" not in names or "description" not in names:
                self.skipped["unreadable_file"] += 1
                logger.warning("skipping %s: no 'image'/'description' columns (has %s)", path, sorted(names))
                continue
            self._handles[file_index] = handle
            columns = [c for c in ("description", "collection", "quality_assessment") if c in names]
            number = 0
            for group_index in range(handle.num_row_groups):
                table = handle.read_row_group(group_index, columns=columns).to_pylist()
                first = len(self.rows) * 2
                for row_index, record in enumerate(table):
                    where = f"{path} row {number}"
                    number += 1
                    try:
                        self.rows.append(self._check(record, file_index, group_index, row_index, number - 1,
                                                     where, wanted, min_quality))
                    except SkipItem as skip:
                        self.skipped[skip.reason] += 1
                        if skip.reason != "filtered":
                            logger.warning("skipping %s", skip)
                if len(self.rows) * 2 > first:
                    self.blocks.append((first, len(self.rows) * 2))
        if not self.rows:
            raise ManifestError(f"{spec}: no usable Subjects200K rows ({_summary(self.skipped) or 'no rows'})")
        logger.info("Subjects200K: %d rows (%d items) from %d file(s); skipped %s", len(self.rows),
                    2 * len(self.rows), len(self.files), _summary(self.skipped) or "none")

    @staticmethod
    def _check(record: dict, file_index: int, group: int, row: int, number: int, where: str,
               wanted: set[str], min_quality: int) -> _S200KRow:
        if wanted and record.get("collection") not in wanted:
            raise SkipItem("filtered", f"{where}: collection {record.get('collection')!r} not selected")
        if min_quality > 0:
            quality = record.get("quality_assessment") or {}
            scores = [quality.get(k) for k in ("compositeStructure", "objectConsistency", "imageQuality")]
            if any(s is None or s < min_quality for s in scores):
                raise SkipItem("filtered", f"{where}: quality {scores} below {min_quality}")
        description = record.get("description")
        if not isinstance(description, dict):
            raise SkipItem("missing_field", f"{where}: no description")
        texts = []
        for key in ("item", "description_0", "description_1"):
            value = description.get(key)
            if not isinstance(value, str) or not value.strip():
                raise SkipItem("missing_field", f"{where}: description.{key} is missing or empty")
            texts.append(value.strip())
        return _S200KRow(file_index, group, row, number, texts[0], (texts[1], texts[2]))

    @property
    def length(self) -> int:
        return 2 * len(self.rows)

    def _row_group(self, file_index: int, group: int) -> Any:
        key = (file_index, group)
        with self._lock:  # one reader per row group; decoding happens outside the lock
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            column = self._handles[file_index].read_row_group(group, columns=["image"]).column("image")
            self._cache[key] = column
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return column

    def get(self, index: int) -> Group:
        row = self.rows[index // 2]
        direction = index % 2
        where = f"{self.files[row.file]} row {row.number}"
        try:
            value = self._row_group(row.file, row.group)[row.row].as_py()
        except Exception as error:  # noqa: BLE001 - a corrupt page skips the row
            raise SkipItem("unreadable_image", f"{where}: cannot read the image ({error})") from None
        data = value.get("bytes") if isinstance(value, dict) else value
        if not data:
            raise SkipItem("unreadable_image", f"{where}: empty image")
        try:
            composite = load_image(data)
        except ImageLoadError as error:
            raise SkipItem("unreadable_image", f"{where}: {error}") from None
        width, height = composite.size
        half, pad = width // 2, self.padding
        if half - 2 * pad < 8 or height - 2 * pad < 8:
            raise SkipItem("bad_layout", f"{where}: {width}x{height} is too small for two halves with {pad} px padding")
        left = composite.crop((pad, pad, half - pad, height - pad))
        right = composite.crop((half + pad, pad, 2 * half - pad, height - pad))
        if direction == 0:  # reference = left, target = right
            return Group(left, row.item, [right], [row.descriptions[1]], f"{where} (left -> right)")
        return Group(right, row.item, [left], [row.descriptions[0]], f"{where} (right -> left)")


# ----------------------------------------------------------------------------------------------------
# Order and loader


class ItemOrder:
    """Global position -> item index: an epoch-wise permutation (block-wise for row-grouped sources).

    With ``blocks`` (item ranges stored together, e.g. parquet row groups) the blocks are shuffled
    and then the items inside each block, so consecutive positions read the same row group.
    """

    def __init__(self, length: int | None, seed: int, shuffle: bool = True,
                 blocks: Sequence[tuple[int, int]] | None = None) -> None:
        self.length = length
        self.seed = int(seed)
        self.shuffle = shuffle
        self.blocks = list(blocks) if blocks else None
        self._epoch: int | None = None
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        assert self.length is not None
        rng = np.random.default_rng([self.seed, 7, epoch])
        if self.blocks is None:
            return rng.permutation(self.length)
        parts = [np.arange(a, b)[rng.permutation(b - a)] for a, b in self.blocks]
        order = rng.permutation(len(parts))
        return np.concatenate([parts[i] for i in order])

    def __call__(self, position: int) -> int:
        if self.length is None:
            return position
        if not self.shuffle:
            return position % self.length
        epoch, offset = divmod(position, self.length)
        if epoch != self._epoch:
            self._perm, self._epoch = self._permutation(epoch), epoch
        assert self._perm is not None
        return int(self._perm[offset])


class GroupLoader:
    """Batches of groups for one process, resumable from ``cursor``, with a thread prefetch.

    Process ``rank`` of ``world_size`` reads global positions ``k * world_size + rank`` for
    k = cursor, cursor + 1, ...; a skipped item just moves on to the next position. Items are
    prefetched by ``num_workers`` threads but always consumed in position order, so the batches do
    not depend on thread timing.
    """

    def __init__(self, source: Any, order: ItemOrder, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, max_skip_fraction: float = 0.5, cursor: int = 0,
                 skipped: Mapping[str, int] | None = None, attempted: int = 0) -> None:
        self.source = source
        self.order = order
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.cursor = int(cursor)
        self.skipped: Counter[str] = Counter(dict(skipped or {}))
        self.attempted = int(attempted)
        self.max_skip_fraction = max_skip_fraction
        self._pool = ThreadPoolExecutor(num_workers, thread_name_prefix="customshift-data") if num_workers else None
        self._ahead = 2 * batch_size + num_workers
        self._pending: OrderedDict[int, Future] = OrderedDict()

    def state(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "skipped": dict(self.skipped), "attempted": self.attempted}

    def _index(self, k: int) -> int:
        # Called from this (the consuming) thread only: ItemOrder caches one epoch and is not thread-safe.
        return self.order(k * self.world_size + self.rank)

    def _fetch(self, k: int) -> Group:
        if self._pool is None:
            return self.source.get(self._index(k))
        for ahead in range(k, k + self._ahead):
            if ahead not in self._pending:
                self._pending[ahead] = self._pool.submit(self.source.get, self._index(ahead))
        return self._pending.pop(k).result()

    def next_batch(self) -> list[Group]:
        groups: list[Group] = []
        while len(groups) < self.batch_size:
            k = self.cursor
            self.cursor += 1
            self.attempted += 1
            try:
                groups.append(self._fetch(k))
            except SkipItem as skip:
                self.skipped[skip.reason] += 1
                logger.warning("skipping %s", skip)
                skipped = sum(self.skipped.values())
                if self.attempted >= 100 and skipped > self.max_skip_fraction * self.attempted:
                    raise DataError(
                        f"{skipped} of {self.attempted} items could not be used ({_summary(self.skipped)}); "
                        "check data.path and the files it points to"
                    ) from None
        return groups

    def close(self) -> None:
        if self._pool is not None:
            for future in self._pending.values():
                future.cancel()
            self._pending.clear()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _summary(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in sorted(counts.items()) if count)


def build_source(data: Any, seed: int, items_per_step: int) -> tuple[Any, ItemOrder]:
    """The source and item order described by a `DataConfig`."""
    if data.kind == "manifest":
        source = ManifestSource(data.path)
        return source, ItemOrder(source.length, seed, data.shuffle)
    if data.kind == "subjects200k":
        source = Subjects200KSource(data.path, data.padding, data.min_quality, data.collections)
        return source, ItemOrder(source.length, seed, data.shuffle, blocks=source.blocks)
    source = source_class(data.kind).from_config(data, seed, items_per_step)
    return source, ItemOrder(source.length, seed, getattr(data, "shuffle", True))


BUILT_IN_KINDS = ("manifest", "subjects200k")


def source_class(kind: str) -> Any:
    """A plugged-in source class (customshift/plugins.py): ``from_config(data, seed, items_per_step)``,
    ``get(i)``, ``length`` (None: endless); optionally ``several_targets`` and the validation hooks of
    customshift/training/validation.py."""
    from ..plugins import load

    try:
        return load("data", kind, dotted=True)
    except LookupError as error:
        raise ValueError(f"data.kind: {error} (built in: {', '.join(BUILT_IN_KINDS)})") from None
