"""A contact sheet of rendered mosaics, so a person can see at a glance that masks, boxes and sentences fit."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import datasets
import numpy as np
from PIL import Image, ImageDraw

from ..transforms.mosaic import NeMoMosaic
from ..transforms.sampling import check_seed
from .drawing import NOTE_COLOUR, TEXT_COLOUR, draw_lines, load_font, outline_mask, wrap_text

BOX_COLOUR = (255, 220, 0)
GRID_COLOUR = (255, 255, 255)
MARGIN = 8
BOX_GAP = 4  # the box lies this far outside the target's box: clear of the mask outline and its halo


def _overlay(sample: Mapping, output_size: int) -> Image.Image:
    """The mosaic with its cell lines, the box drawn just outside the mask's outline (on a rectangular
    target the two would otherwise coincide and the box hide the outline), then the outline."""
    image = np.asarray(sample["image"].convert("RGB") if isinstance(sample["image"], Image.Image) else sample["image"])
    picture = Image.fromarray(image)
    draw = ImageDraw.Draw(picture)
    if sample["target_quadrant"] >= 0:
        cells = round(len(sample["tile_image_ids"]) ** 0.5)  # 2 or 3 per side
        for k in range(1, cells):
            at = k * output_size // cells
            draw.line([(at, 0), (at, output_size)], fill=GRID_COLOUR, width=1)
            draw.line([(0, at), (output_size, at)], fill=GRID_COLOUR, width=1)
    x, y, w, h = sample["bbox"]
    if w > 0 and h > 0:
        gap = BOX_GAP
        draw.rectangle([x - gap, y - gap, x + w - 1 + gap, y + h - 1 + gap], outline=BOX_COLOUR, width=2)
    return Image.fromarray(outline_mask(np.asarray(picture), sample["mask"]))


def _tiles(sample: Mapping, row: Mapping) -> str:
    """The tiles, row-major, each negative with its t2i score from the row's negative columns."""
    if sample["target_quadrant"] < 0:
        return f"image {sample['tile_image_ids'][0]}"
    scores = {}
    for sentence, negatives, values in zip(row["sentences"], row.get("negatives") or [], row.get("negative_scores") or []):
        if sentence["sent_id"] == sample["sent_id"]:
            scores = dict(zip(negatives, values))
    tiles = []
    for quadrant, image_id in enumerate(sample["tile_image_ids"]):
        if quadrant == sample["target_quadrant"]:
            tiles.append(f"{image_id} target")
        elif image_id in scores:
            tiles.append(f"{image_id} t2i {scores[image_id]:.3f}")
        else:
            tiles.append(f"{image_id} random")
    return "tiles " + ", ".join(tiles)


def _caption(sample: Mapping, row: Mapping) -> tuple[str, str]:
    detail = f"{sample['mode']} | ref {sample['ref_id']} | {_tiles(sample, row)}"
    if sample["notes"]:
        detail += " | " + "; ".join(sample["notes"])
    return f"\u201c{sample['sentence']}\u201d", detail


def render_preview(
    refs_dataset,
    images,
    n: int = 16,
    output_size: int = 256,
    seed: int = 0,
    config: str | None = None,
    columns: int = 4,
    p: Mapping[str, float] | None = None,
    tile: str = "squash",
    grid: int | str = 2,
    pool: Sequence[int] | None = None,
) -> Image.Image:
    """A grid of ``n`` mosaics (training rows, drawn with ``seed``), the target mask tinted, its box outlined,
    the sentence and the mode/tiles/notes written under each.

    ``p`` defaults to retrieval mosaics (unmined rows fall back to random mosaics, which the caption says);
    ``grid``: tiles per side, as ``NeMoMosaic``'s; ``images`` and ``pool`` as ``NeMoMosaic``'s (a Mapping such as
    `nemo_hf.folder.reading.FolderImages` needs the pool).
    """
    seed = check_seed(seed)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer (how many mosaics), got {n!r}")
    rows = _pick_rows(refs_dataset, n, seed)
    if not rows:
        raise ValueError("no refs rows to preview")
    transform = NeMoMosaic(
        images, output_size=output_size, p=p or {"retrieval": 1.0}, seed=seed, config=config, tile=tile, grid=grid,
        pool=pool,
    )
    batch = {key: [row[key] for row in rows] for key in rows[0]}
    out = transform(batch)
    samples = [{key: values[i] for key, values in out.items()} for i in range(len(rows))]

    font, small = load_font(14), load_font(11)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = int(font.size * 1.3) if hasattr(font, "size") else 14
    small_height = int(small.size * 1.3) if hasattr(small, "size") else 12
    captions = []
    for sample, row in zip(samples, rows):
        sentence, detail = _caption(sample, row)
        captions.append((wrap_text(sentence, measure, font, output_size), wrap_text(detail, measure, small, output_size)))
    columns = max(1, min(columns, len(samples)))
    grid_rows = [captions[i : i + columns] for i in range(0, len(captions), columns)]
    text_heights = [max(len(s) * line_height + len(d) * small_height for s, d in row) + MARGIN for row in grid_rows]
    cell_w = output_size + MARGIN
    sheet_h = MARGIN + sum(output_size + MARGIN + t for t in text_heights)
    sheet = Image.new("RGB", (MARGIN + columns * cell_w, sheet_h), "white")
    draw = ImageDraw.Draw(sheet)
    top = MARGIN
    for r, row_captions in enumerate(grid_rows):
        for c, (sentence_lines, detail_lines) in enumerate(row_captions):
            sample = samples[r * columns + c]
            left = MARGIN + c * cell_w
            sheet.paste(_overlay(sample, output_size), (left, top))
            y = draw_lines(draw, left, top + output_size + 4, sentence_lines, TEXT_COLOUR, font, line_height)
            draw_lines(draw, left, y, detail_lines, NOTE_COLOUR, small, small_height)
        top += output_size + MARGIN + text_heights[r]
    return sheet


def _pick_rows(refs_dataset, n: int, seed: int) -> list[dict]:
    """``n`` training rows at random (all rows if none is a training row); the first ``n`` of a stream."""
    if isinstance(refs_dataset, datasets.IterableDataset):
        return list(refs_dataset.take(n))
    refs_dataset = refs_dataset.with_format(None)
    splits = refs_dataset["split"] if "split" in refs_dataset.column_names else []
    candidates = [i for i, split in enumerate(splits) if split == "train"] or list(range(len(refs_dataset)))
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(candidates, size=min(n, len(candidates)), replace=False).tolist())
    return [refs_dataset[i] for i in chosen]
