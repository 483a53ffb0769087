"""Reading a built folder in place, and only inside it: the commands that look at a folder (`preview`, `stats`,
`show`, `eval`, `zeroshot`, `difficulty`) read its Parquet shards where they lie, never through the
`datasets` cache (`load_dataset` would copy the folder there first, gigabytes at RefCOCO scale).

Which files: those the manifest (``nemo_hf.json``) names, each a regular file inside the folder reached
without a symbolic link (`nemo_hf.folder.files.inside`). The dataset card's ``configs:`` paths and an image
row's ``path`` are never followed, whatever they say. What: each column must have the schema's type
(`nemo_hf.schema`), every image row must carry its bytes, and a refs split must agree with the images
config (`check_refs`), so a damaged folder stops with one line naming the shard instead of a wrong report.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..schema import IMAGES_CONFIG, IMAGES_FEATURES, REFS_FEATURES
from .files import inside

# a refs or images shard without these is not one nemo_hf wrote
REQUIRED = {
    "refs": ("ref_id", "ann_id", "image_id", "category_id", "split", "sentences", "mask"),
    IMAGES_CONFIG: ("image_id", "width", "height", "image"),
}
OBJECT_KEYS = ("ann_id", "category_id", "category")  # what `check_refs` compares, read without the masks


def shard_paths(folder: str | os.PathLike, report, config: str, split: str | None = None) -> list[Path]:
    """The shards of ``config`` (one ``split``, or all), as the manifest ``report`` names them, each checked
    to be a regular file inside ``folder``; a config or split the folder lacks is named with what it has."""
    folder = Path(folder)
    if config not in report.configs:
        built = ", ".join(c for c in report.configs if c != IMAGES_CONFIG)
        raise ValueError(f"{folder}: config {config!r} was not built here (built: {built})")
    splits = report.configs[config]["splits"]
    if split is not None and split not in splits:
        raise ValueError(f"{folder}: {config} has no split {split!r} (splits: {', '.join(splits)})")
    chosen = [splits[split]] if split is not None else list(splits.values())
    return [inside(folder, shard, f"{config} shard") for entry in chosen for shard in entry["shards"]]


def open_shard(path: Path, kind: str) -> pq.ParquetFile:
    """A shard opened memory-mapped, its columns checked against the schema (``kind``: ``"refs"`` or
    ``"images"``); errors name the shard."""
    features = IMAGES_FEATURES if kind == IMAGES_CONFIG else REFS_FEATURES
    try:
        parquet = pq.ParquetFile(path, memory_map=True)
        schema = parquet.schema_arrow
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: not a readable Parquet shard ({err}); rebuild the folder") from None
    missing = [c for c in REQUIRED[kind] if c not in schema.names]
    if missing:
        raise ValueError(f"{path}: no column(s) {', '.join(missing)}; not a {kind} shard written by nemo-hf build")
    expected = features.arrow_schema
    wrong = [n for n in schema.names if n in features and not schema.field(n).type.equals(expected.field(n).type)]
    if wrong:
        raise ValueError(f"{path}: column {wrong[0]} is {schema.field(wrong[0]).type}, not "
                         f"{expected.field(wrong[0]).type} (nemo_hf.schema): a damaged or foreign shard, rebuild the folder")
    return parquet


def read_shards(paths: list[Path], kind: str, columns: list[str] | None = None, image_ids: list[int] | None = None) -> pa.Table:
    """The shards' ``columns`` (all when None; those a shard lacks skipped, older builds lack some) as one
    table, memory-mapped and checked (`open_shard`); only the rows of ``image_ids`` when given."""
    tables = []
    for path in paths:
        parquet = open_shard(path, kind)
        wanted = None if columns is None else [c for c in columns if c in parquet.schema_arrow.names]
        try:
            if not image_ids:  # None: every row; []: none
                table = parquet.read(columns=wanted).slice(0, 0 if image_ids == [] else None)
            else:
                table = pq.read_table(path, columns=wanted, filters=[("image_id", "in", image_ids)], memory_map=True)
        except (pa.ArrowException, OSError) as err:
            raise ValueError(f"{path}: cannot read its columns ({err}); rebuild the folder") from None
        tables.append(table.replace_schema_metadata(None))
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="default")


def check_image_bytes(images: pa.Table, where: str) -> None:
    """Every image row carries its encoded bytes: a row with a ``path`` instead is refused, never opened (a
    folder's rows would otherwise make a reader open any file the row names)."""
    if "image" not in images.column_names:
        return
    missing = pc.is_null(pc.struct_field(images["image"], "bytes"))
    if pc.any(missing).as_py():
        row = int(np.flatnonzero(missing.to_numpy(zero_copy_only=False))[0])
        path = pc.struct_field(images["image"], "path")[row].as_py()
        raise ValueError(
            f"{where}: image {images['image_id'][row].as_py()} has no bytes"
            + (f" but a path ({path!r}), which is never read" if path else "")
            + "; a built folder carries every image's bytes: rebuild it"
        )


def check_refs(refs: pa.Table, images: pa.Table, where: str, split: str | None = None) -> None:
    """The refs rows agree with the images config: ``split`` (when given) in every row, each ``image_id`` an
    image of the folder, each ``mask`` of its image's size, and (with ``objects``) each ``ann_id`` an
    instance of that image with the row's category. Swapped or rewritten columns of the same type would
    otherwise be scored or drawn as if right."""
    if split is not None and "split" in refs.column_names:
        other = pc.not_equal(refs["split"], split)
        if pc.any(other).as_py():
            row = int(np.flatnonzero(other.to_numpy(zero_copy_only=False))[0])
            raise ValueError(f"{where}: ref {refs['ref_id'][row].as_py()} says split {refs['split'][row].as_py()!r} in the {split} shard")
    ref_ids = refs["ref_id"].to_numpy()
    image_ids = images["image_id"].to_numpy()
    order = np.argsort(image_ids, kind="stable")
    wanted = refs["image_id"].to_numpy()
    pos = np.minimum(np.searchsorted(image_ids[order], wanted), max(len(order) - 1, 0))
    absent = np.ones(len(wanted), bool) if not len(order) else image_ids[order][pos] != wanted
    if absent.any():
        i = int(np.flatnonzero(absent)[0])
        raise ValueError(f"{where}: ref {int(ref_ids[i])}: image_id {int(wanted[i])} is not in the images config")
    row = order[pos]
    sizes = refs["mask"].combine_chunks().field("size").flatten().to_numpy().reshape(-1, 2)
    expected = np.stack([images["height"].to_numpy()[row], images["width"].to_numpy()[row]], axis=1)
    off = np.flatnonzero((sizes != expected).any(axis=1))
    if off.size:
        i = int(off[0])
        raise ValueError(f"{where}: ref {int(ref_ids[i])}: mask of {sizes[i][0]}x{sizes[i][1]} (h x w) on image "
                         f"{int(wanted[i])} of {expected[i][0]}x{expected[i][1]}")
    if "objects" not in images.column_names:
        return
    objects = images["objects"].combine_chunks()
    flat = objects.flatten()
    parent = image_ids[pc.list_parent_indices(objects).to_numpy()]
    known = {
        (int(i), int(a)): (int(c), n)
        for i, a, c, n in zip(parent, flat.field("ann_id").to_numpy(), flat.field("category_id").to_numpy(),
                              flat.field("category").to_pylist())
    }
    categories = refs["category"].to_pylist() if "category" in refs.column_names else [None] * len(refs)
    for i, (image_id, ann_id, category_id, category) in enumerate(
        zip(wanted.tolist(), refs["ann_id"].to_pylist(), refs["category_id"].to_pylist(), categories)
    ):
        found = known.get((image_id, ann_id))
        if found is None:
            raise ValueError(f"{where}: ref {int(ref_ids[i])}: ann_id {ann_id} is not an instance of image {image_id}")
        if found[0] != category_id or category is not None and found[1] != category:
            raise ValueError(f"{where}: ref {int(ref_ids[i])}: category {category_id} ({category}) but ann {ann_id} "
                             f"is {found[0]} ({found[1]}) in the images config")


def images_for_check(folder: Path, report) -> pa.Table:
    """The images columns `check_refs` compares (the instances without their masks, no image bytes)."""
    paths = shard_paths(folder, report, IMAGES_CONFIG)
    table = read_shards(paths, IMAGES_CONFIG, ["image_id", "width", "height"])
    if paths and all("objects" in open_shard(p, IMAGES_CONFIG).schema_arrow.names for p in paths):
        nested = [f"objects.list.element.{key}" for key in OBJECT_KEYS]
        objects = pa.concat_tables(open_shard(p, IMAGES_CONFIG).read(columns=nested) for p in paths)
        table = table.append_column("objects", objects["objects"])
    return table


def _dataset(table: pa.Table, kind: str, paths: list[Path]):
    """A `datasets.Dataset` over ``table`` in memory: nothing written to the `datasets` cache."""
    import datasets

    features = IMAGES_FEATURES if kind == IMAGES_CONFIG else REFS_FEATURES
    digest = hashlib.sha256()
    for path in paths:  # a fingerprint from what was read, not a hash of every byte
        status = path.stat()
        digest.update(f"{path.resolve()}:{status.st_size}:{status.st_mtime_ns}:{table.column_names}".encode())
    info = datasets.DatasetInfo(features=datasets.Features({c: features[c] for c in table.column_names if c in features}))
    return datasets.Dataset(table, info=info, fingerprint=digest.hexdigest()[:32])


def read_split(folder: str | os.PathLike, config: str, split: str = "train", columns: list[str] | None = None,
               image_ids=None):
    """One split of a built folder as a `datasets.Dataset` read in place (the images config: ``config="images"``;
    ``image_ids``: only those rows, so memory holds the images a command uses, not the folder's).

    A refs split is checked against the images config (`check_refs`) before it is returned; image rows
    must carry their bytes (`check_image_bytes`)."""
    from .manifest import BuildReport

    folder = Path(folder)
    report = BuildReport.read(folder)
    kind = IMAGES_CONFIG if config == IMAGES_CONFIG else "refs"
    paths = shard_paths(folder, report, config, split)
    table = read_shards(paths, kind, columns, None if image_ids is None else [int(i) for i in image_ids])
    where = f"{folder} ({config}/{split})"
    if kind == IMAGES_CONFIG:
        check_image_bytes(table, where)
    else:
        full = table if columns is None else read_shards(paths, kind, list(REQUIRED["refs"]) + ["category"])
        check_refs(full, images_for_check(folder, report), where, split)
    return _dataset(table, kind, paths)


class FolderImages(Mapping):
    """image_id -> ``{"bytes", "objects"}`` read from a folder's images shards on demand, one row group at a
    time (the last few kept): `preview` and `difficulty` hold the images they draw, not the folder's. Give it
    to ``NeMoMosaic(images, pool=images.pool(config))``; the pool comes from ``negative_pool_of``, as the
    images Dataset's does."""

    CACHED_GROUPS = 4

    def __init__(self, folder: str | os.PathLike):
        from .manifest import BuildReport

        folder = Path(folder)
        paths = shard_paths(folder, BuildReport.read(folder), IMAGES_CONFIG)
        self._files = [open_shard(path, IMAGES_CONFIG) for path in paths]
        self._paths = paths
        self._where: dict[int, tuple[int, int, int]] = {}
        for f, parquet in enumerate(self._files):
            for group in range(parquet.metadata.num_row_groups):
                ids = parquet.read_row_group(group, columns=["image_id"])["image_id"].to_pylist()
                self._where.update((int(i), (f, group, row)) for row, i in enumerate(ids))
        self._groups: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()

    def __repr__(self) -> str:
        return f"FolderImages({len(self)} images in {len(self._files)} shard(s))"

    def __len__(self) -> int:
        return len(self._where)

    def __iter__(self):
        return iter(self._where)

    def __getitem__(self, image_id: int) -> dict:
        f, group, row = self._where[int(image_id)]
        table = self._group(f, group)
        return {"bytes": table["image"][row].as_py()["bytes"],
                "objects": table["objects"][row].as_py() if "objects" in table.column_names else None}

    def _group(self, f: int, group: int) -> pa.Table:
        key = (f, group)
        if key not in self._groups:
            parquet = self._files[f]
            columns = [c for c in ("image_id", "image", "objects") if c in parquet.schema_arrow.names]
            try:
                table = parquet.read_row_group(group, columns=columns)
            except (pa.ArrowException, OSError) as err:
                raise ValueError(f"{self._paths[f]}: cannot read row group {group} ({err}); rebuild the folder") from None
            check_image_bytes(table, str(self._paths[f]))
            self._groups[key] = table
            while len(self._groups) > self.CACHED_GROUPS:
                self._groups.popitem(last=False)
        self._groups.move_to_end(key)
        return self._groups[key]

    def pool(self, config: str) -> list[int]:
        """The random-mode pool of ``config``: images whose ``negative_pool_of`` names it (never val/test)."""
        table = read_shards(self._paths, IMAGES_CONFIG, ["image_id", "negative_pool_of"])
        if "negative_pool_of" not in table.column_names:
            return []
        return [int(i) for i, names in zip(table["image_id"].to_pylist(), table["negative_pool_of"].to_pylist())
                if config in (names or ())]
