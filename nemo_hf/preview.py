"""A contact sheet of rendered mosaics, so a person can see at a glance that masks, boxes and sentences fit."""

from __future__ import annotations

from collections.abc import Mapping

import datasets
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .mosaic import NeMoMosaic

MASK_COLOUR = (255, 30, 60)
MASK_ALPHA = 0.45
BOX_COLOUR = (255, 220, 0)
GRID_COLOUR = (255, 255, 255)
TEXT_COLOUR = (20, 20, 20)
NOTE_COLOUR = (120, 120, 120)
MARGIN = 8


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(text: str, draw: ImageDraw.ImageDraw, font, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def _overlay(sample: Mapping, output_size: int) -> Image.Image:
    image = np.asarray(sample["image"].convert("RGB") if isinstance(sample["image"], Image.Image) else sample["image"])
    mask = sample["mask"].astype(bool)
    tinted = image.astype(np.float32)
    tinted[mask] = (1 - MASK_ALPHA) * tinted[mask] + MASK_ALPHA * np.array(MASK_COLOUR, np.float32)
    picture = Image.fromarray(tinted.round().astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    if sample["target_quadrant"] >= 0:
        half = output_size // 2
        draw.line([(half, 0), (half, output_size)], fill=GRID_COLOUR, width=1)
        draw.line([(0, half), (output_size, half)], fill=GRID_COLOUR, width=1)
    x, y, w, h = sample["bbox"]
    if w > 0 and h > 0:
        draw.rectangle([x, y, x + w - 1, y + h - 1], outline=BOX_COLOUR, width=2)
    return picture


def _caption(sample: Mapping) -> tuple[str, str]:
    detail = f"{sample['mode']} | ref {sample['ref_id']} | tiles {sample['tile_image_ids']}"
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
) -> Image.Image:
    """A grid of ``n`` mosaics (training rows, drawn with ``seed``), the target mask tinted, its box outlined,
    the sentence and the mode/tiles/notes written under each.

    ``p`` defaults to retrieval mosaics (unmined rows fall back to random mosaics, which the caption says).
    """
    rows = _pick_rows(refs_dataset, n, seed)
    if not rows:
        raise ValueError("no refs rows to preview")
    transform = NeMoMosaic(
        images, output_size=output_size, p=p or {"retrieval": 1.0}, seed=seed, config=config, tile=tile
    )
    batch = {key: [row[key] for row in rows] for key in rows[0]}
    out = transform(batch)
    samples = [{key: values[i] for key, values in out.items()} for i in range(len(rows))]

    font, small = _font(14), _font(11)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = int(font.size * 1.3) if hasattr(font, "size") else 14
    small_height = int(small.size * 1.3) if hasattr(small, "size") else 12
    captions = []
    for sample in samples:
        sentence, detail = _caption(sample)
        captions.append((_wrap(sentence, measure, font, output_size), _wrap(detail, measure, small, output_size)))
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
            y = top + output_size + 4
            for line in sentence_lines:
                draw.text((left, y), line, fill=TEXT_COLOUR, font=font)
                y += line_height
            for line in detail_lines:
                draw.text((left, y), line, fill=NOTE_COLOUR, font=small)
                y += small_height
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
