"""`nemo-hf show`: one ref of a built folder as the refer toolkit's ``showRef`` draws it, plus what NeMo
added: each training sentence's negatives as thumbnails with their t2i and i2i cosines and, with
``show_all``, the candidates the false-negative filter dropped on the way, marked.

Reads the folder's Parquet shards directly (one ref, its image, the negatives' images) and the mining
embeddings it keeps (``nemo_hf.folder.embeddings``); needs neither the model nor a rebuild.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from ..folder import embeddings
from ..folder.reading import check_image_bytes, check_refs, images_for_check, open_shard, shard_paths
from ..masks import check_image_size, decode_mask
from ..schema import IMAGES_CONFIG, TRAIN_SPLIT
from ..transforms.images import DECODE_ERRORS
from .drawing import NOTE_COLOUR, TEXT_COLOUR, draw_lines, draw_outline, load_font, outline_mask, wrap_text

KEPT_FRAME = (0, 90, 255)  # a negative the build kept
DROPPED_FRAME = (255, 0, 0)  # a candidate the filter dropped (show_all)
DROPPED_TEXT = (200, 0, 0)  # not the frame's colour: frames can be counted on the sheet
OTHER_COLOUR = (255, 200, 0)  # outlines of the image's other referred objects of the same category
FRAME = 3
MARGIN = 10
MAX_CANDIDATES = 60  # show_all: thumbnails per sentence at most (a sentence deep in near-duplicates drops hundreds)


@dataclass
class Tile:
    """One thumbnail: where it is on the sheet (x0, y0, x1, y1, frame included) and what it shows."""

    image_id: int
    box: tuple[int, int, int, int]
    t2i: float
    i2i: float | None
    dropped: bool = False


@dataclass
class Shown:
    """What ``show_ref`` drew: the sheet, the same as text, and the thumbnails per sentence id."""

    image: Image.Image
    text: str
    tiles: dict[int, list[Tile]] = field(default_factory=dict)


def _find_row(shards: list[Path], ref_id: int | None, sent_id: int | None) -> pa.Table:
    """The ref's row (a one-row table) from the checked shards."""
    for shard in shards:
        open_shard(shard, "refs")
        if ref_id is not None:
            table = pq.read_table(shard, filters=[("ref_id", "=", int(ref_id))])
        else:
            ids = pq.read_table(shard, columns=["ref_id", "sentences"])
            sentences = ids["sentences"].combine_chunks()
            hits = np.flatnonzero(pc.list_flatten(sentences).field("sent_id").to_numpy() == int(sent_id))
            if not hits.size:
                continue
            parent = pc.list_parent_indices(sentences).to_numpy()[hits[0]]
            table = pq.read_table(shard, filters=[("ref_id", "=", ids["ref_id"][int(parent)].as_py())])
        if len(table):
            return table.slice(0, 1)
    raise ValueError(f"no ref with {'ref_id' if ref_id is not None else 'sent_id'} {ref_id if ref_id is not None else sent_id}")


def _image_bytes(folder: Path, report, image_ids: set[int]) -> dict[int, bytes]:
    found = {}
    for shard in shard_paths(folder, report, IMAGES_CONFIG):
        open_shard(shard, IMAGES_CONFIG)
        table = pq.read_table(shard, columns=["image_id", "image"], filters=[("image_id", "in", sorted(image_ids))])
        check_image_bytes(table, str(shard))  # a row's path is never opened
        for image_id, image in zip(table["image_id"].to_pylist(), table["image"].to_pylist()):
            found[image_id] = image["bytes"]
    return found


def _same_category(folder: Path, report, shards: list[Path], row: dict) -> tuple[list[dict], str]:
    """The image's other objects of the row's category: every COCO instance from the images config's
    ``objects`` column, or (a folder built before it) the other referred objects; and which of the two."""
    images = shard_paths(folder, report, IMAGES_CONFIG)
    if "objects" in open_shard(images[0], IMAGES_CONFIG).schema_arrow.names:
        objects = pa.concat_tables(
            pq.read_table(s, columns=["objects"], filters=[("image_id", "=", row["image_id"])]) for s in images
        )["objects"].to_pylist()
        found = [o for o in (objects[0] if objects else []) if o["category_id"] == row["category_id"]]
        return [o for o in found if o["ann_id"] != row["ann_id"]], "annotated"
    same = pa.concat_tables(
        pq.read_table(s, columns=["ann_id", "category_id", "mask"], filters=[("image_id", "=", row["image_id"])])
        for s in shards
    ).to_pylist()
    return [r for r in same if r["category_id"] == row["category_id"] and r["ann_id"] != row["ann_id"]], "referred"


def _decode(data: bytes, image_id: int) -> Image.Image:
    """The image's pixels; one larger than a build accepts (masks.MAX_SIDE) is refused from its header."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            check_image_size(image.height, image.width, f"image {image_id}")
            return image.convert("RGB")
    except DECODE_ERRORS as err:  # a MaskFormatError (too large) is a ValueError
        raise ValueError(f"image {image_id} cannot be shown: {err}") from None


def _thumbnail(data: bytes | None, image_id: int, side: int, frame: tuple[int, int, int]) -> Image.Image:
    """The image letterboxed into ``side`` x ``side`` on white, framed ``FRAME`` pixels in ``frame``."""
    tile = Image.new("RGB", (side, side), frame)
    inner = side - 2 * FRAME
    canvas = Image.new("RGB", (inner, inner), "white")
    if data is not None:
        image = _decode(data, image_id)
        image.thumbnail((inner, inner))
        canvas.paste(image, ((inner - image.width) // 2, (inner - image.height) // 2))
    tile.paste(canvas, (FRAME, FRAME))
    return tile


def _candidates(row, index, kept, pool_ids, mining, show_all) -> list[tuple[int, float, float | None, bool]]:
    """(image_id, t2i, i2i, dropped) for sentence ``index``: its negatives, or with ``show_all`` the ranked
    pool walked until as many survived (the dropped ones marked)."""
    negatives, scores = row["negatives"][index], row["negative_scores"][index]
    sent_id = row["sentences"][index]["sent_id"]
    if kept is None:
        if show_all:
            raise ValueError("this folder keeps no mining embeddings (built by an older nemo_hf): --all needs them")
        return [(i, s, None, False) for i, s in zip(negatives, scores)]
    row_of = {int(i): r for r, i in enumerate(kept.image_ids)}
    own = kept.images[row_of[int(row["image_id"])]]
    if not show_all:
        return [(i, s, float(own @ kept.images[row_of[int(i)]]), False) for i, s in zip(negatives, scores)]
    text = kept.sentences[kept.sent_ids.index(sent_id)]
    pool = [int(i) for i in pool_ids if int(i) != int(row["image_id"]) and int(i) in row_of]
    pool_emb = kept.images[[row_of[i] for i in pool]]
    t2i, i2i = pool_emb @ text, pool_emb @ own
    tau = float(mining["tau_cosine"])
    dropped = (i2i if mining["mode"] == "i2i" else t2i) > tau
    walked, survivors = [], 0
    for j in np.argsort(-t2i, kind="stable"):
        if survivors >= len(negatives) or len(walked) >= MAX_CANDIDATES:
            break
        walked.append((pool[j], float(t2i[j]), float(i2i[j]), bool(dropped[j])))
        survivors += not dropped[j]
    return walked


def show_ref(
    folder: str | Path,
    config: str,
    ref_id: int | None = None,
    sent_id: int | None = None,
    show_all: bool = False,
    size: int = 480,
    thumb: int = 112,
    per_row: int = 8,
) -> Shown:
    """Draw one ref (by ``ref_id``, or the ref of ``sent_id``, whose sentence alone is then shown)."""
    from ..folder.manifest import BuildReport
    from .stats import negative_pool

    if (ref_id is None) == (sent_id is None):
        raise ValueError("give exactly one of ref_id and sent_id")
    folder = Path(folder)
    report = BuildReport.read(folder)
    if config not in report.configs or config == IMAGES_CONFIG:
        known = ", ".join(c for c in report.configs if c != IMAGES_CONFIG)
        raise ValueError(f"{folder}: no refs config {config!r} in this folder (it has {known})")
    shards = shard_paths(folder, report, config)
    found = _find_row(shards, ref_id, sent_id)
    check_refs(found, images_for_check(folder, report), f"{folder} ({config})")
    row = found.to_pylist()[0]
    mining = report.configs[config].get("mining")
    indices = [i for i, s in enumerate(row["sentences"]) if sent_id is None or s["sent_id"] == int(sent_id)]
    mined = bool(mining) and row["split"] == TRAIN_SPLIT  # eval rows keep one empty list per sentence
    kept = embeddings.read(folder, config, [row["sentences"][i]["sent_id"] for i in indices]) if mined else None
    pool_ids = negative_pool(folder, report, config) if show_all and mined else []

    others, which = _same_category(folder, report, shards, row)
    candidates = {i: _candidates(row, i, kept, pool_ids, mining, show_all) for i in indices} if mined else {}
    wanted = {row["image_id"]} | {c[0] for cands in candidates.values() for c in cands}
    images = _image_bytes(folder, report, wanted)
    if row["image_id"] not in images:
        raise ValueError(f"{folder}: image {row['image_id']} of ref {row['ref_id']} is not in the images config")

    picture = np.asarray(_decode(images[row["image_id"]], row["image_id"]))
    for other in others:
        picture = draw_outline(picture.copy(), decode_mask(other), OTHER_COLOUR)
    target = Image.fromarray(outline_mask(picture, decode_mask(row)))
    target.thumbnail((size, size))

    lines = [
        f"ref {row['ref_id']} | ann {row['ann_id']} | image {row['image_id']} | {row['category']} | split {row['split']}",
        f"target outlined in red; other {which} {row['category']} objects in this image: {len(others)}"
        + (" (outlined in yellow)" if others else ""),
    ]
    if mining:
        lines.append(f"mining: {mining['mode']} tau {mining['tau']} = {float(mining['tau_cosine']):.4f}, top_k {mining['top_k']}")
        if mined:
            lines.append("thumbnails: each sentence's negatives, framed in blue" + (", red: dropped by tau" if show_all else ""))
    font, small = load_font(15), load_font(11)
    width = max(size, per_row * (thumb + MARGIN)) + 2 * MARGIN
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    blocks = []  # (text lines, small lines, candidates)
    for i in indices:
        sentence = row["sentences"][i]
        head = wrap_text(f"{sentence['sent_id']}: \u201c{sentence['sent']}\u201d", measure, font, width - 2 * MARGIN)
        if not mined:
            note = [f"no negatives ({row['split']} split)" if row["split"] != TRAIN_SPLIT else "no negatives (built with --no-mining)"]
            blocks.append((head, note, []))
            continue
        cands = candidates[i]
        note = []
        if row["negative_fallback"][i]:
            note.append("fallback: nothing passed the filter, these are the least similar images")
        if show_all:
            n_dropped = sum(c[3] for c in cands)
            note.append(f"candidates by t2i, best first: {len(cands)} walked, {n_dropped} dropped by tau (red)")
        blocks.append((head, note, cands))

    line_h, small_h = 20, 14
    caption_h = 3 * small_h + 4
    grid_h = lambda n: ((n + per_row - 1) // per_row) * (thumb + caption_h + MARGIN)  # noqa: E731
    height = MARGIN + len(lines) * line_h + target.height + MARGIN
    height += sum(len(h) * line_h + len(n) * small_h + grid_h(len(c)) + MARGIN for h, n, c in blocks)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    y = draw_lines(draw, MARGIN, MARGIN, lines, TEXT_COLOUR, font, line_h)
    sheet.paste(target, (MARGIN, y))
    y += target.height + MARGIN
    shown = Shown(sheet, "", {})
    text = list(lines)
    for i, (head, note, cands) in zip(indices, blocks):
        y = draw_lines(draw, MARGIN, y, head, TEXT_COLOUR, font, line_h)
        y = draw_lines(draw, MARGIN, y, note, NOTE_COLOUR, small, small_h)
        text += head + ["  " + n for n in note]
        tiles = shown.tiles.setdefault(row["sentences"][i]["sent_id"], [])
        for k, (image_id, t2i, i2i, dropped) in enumerate(cands):
            x0 = MARGIN + (k % per_row) * (thumb + MARGIN)
            y0 = y + (k // per_row) * (thumb + caption_h + MARGIN)
            sheet.paste(_thumbnail(images.get(image_id), image_id, thumb, DROPPED_FRAME if dropped else KEPT_FRAME), (x0, y0))
            caption = [f"#{image_id}", f"t2i {t2i:.3f}", "i2i " + ("n/a" if i2i is None else f"{i2i:.3f}")]
            if dropped:
                caption[0] += " dropped"
            for j, line in enumerate(caption):
                draw.text((x0, y0 + thumb + 2 + j * small_h), line, fill=DROPPED_TEXT if dropped else NOTE_COLOUR, font=small)
            tiles.append(Tile(image_id, (x0, y0, x0 + thumb, y0 + thumb), t2i, i2i, dropped))
            text.append("  " + " ".join(caption))
        y += grid_h(len(cands)) + MARGIN
    shown.text = "\n".join(text)
    return shown
