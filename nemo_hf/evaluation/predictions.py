"""The predictions file `nemo-hf eval` scores: one row per expression, its mask at the image's original size.

A row is ``{"sent_id": int, "mask": {"size": [h, w], "counts": str}}`` (COCO compressed RLE, the refs'
``mask`` format), in JSON Lines (``.jsonl``, one object a line) or Parquet (``.parquet``, columns
``sent_id`` int64 and ``mask`` struct). Both are written and read in bounded memory: rows stream.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..folder.files import open_regular, regular_file
from ..masks import MAX_SIDE, encode_rle

FORMATS = {".jsonl": "jsonl", ".parquet": "parquet"}
PARQUET_SCHEMA = pa.schema(
    [
        ("sent_id", pa.int64()),
        ("mask", pa.struct([("size", pa.list_(pa.int64(), 2)), ("counts", pa.string())])),
    ]
)


# What one row may cost, checked before it is parsed: a line (JSON Lines) holds one expression's mask, whose
# counts string is at most a few MB for any photo; the values on a line are a handful
MAX_LINE = 64 << 20
MAX_VALUES = 256
MAX_ROW_GROUP = 512 << 20  # Parquet, uncompressed: PredictionWriter writes 1024 rows a group


class PredictionsFormatError(ValueError):
    """A predictions file that cannot be read as the format above."""


def predictions_format(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{path}: a predictions file ends in .jsonl (JSON Lines) or .parquet, not {suffix or 'nothing'!r}")
    return FORMATS[suffix]


class PredictionWriter:
    """Writes a predictions file row by row (``with PredictionWriter("preds.jsonl") as w: ...``).

    ``add_mask(sent_id, mask)``: a mask already at the original size (array, non-zero = object) or an RLE.
    ``add(row, pred)``: a model's output over an `EvalTransform` row's square (a mask, or logits /
    probabilities at any resolution), mapped back with `EvalTransform.to_original`'s geometry; floats are
    thresholded after mapping (``threshold``: 0.5 for probabilities, 0.0 for logits).
    The file is written beside ``path`` and renamed into place on a clean close, so a crash never
    leaves a half-written file under the final name.
    """

    def __init__(self, path: str | os.PathLike, output_size: int | None = None, threshold: float = 0.5,
                 batch_rows: int = 1024):  # fmt: skip
        self.path = Path(path)
        self.format = predictions_format(self.path)
        self.output_size = output_size
        self.threshold = float(threshold)
        self.batch_rows = int(batch_rows)
        self._partial = self.path.with_name(f".{self.path.name}.partial")
        self._pending: list[dict] = []
        self._writer = None
        self._file = None
        self.rows = 0

    def __repr__(self) -> str:
        return f"PredictionWriter({str(self.path)!r}, rows={self.rows})"

    def __enter__(self) -> "PredictionWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def add_mask(self, sent_id: int, mask) -> None:
        """One expression's mask at the image's original size: a 2-D array or an RLE dict."""
        if isinstance(mask, Mapping):
            counts = mask["counts"]
            rle = {"size": [int(v) for v in mask["size"]], "counts": counts.decode("ascii") if isinstance(counts, bytes) else str(counts)}
        else:
            mask = np.asarray(mask)
            if mask.ndim != 2:
                raise ValueError(f"sent_id {sent_id}: a mask must be 2-D (h, w), got shape {mask.shape}")
            rle = encode_rle(mask)
        self._pending.append({"sent_id": int(sent_id), "mask": rle})
        self.rows += 1
        if len(self._pending) >= self.batch_rows:
            self._flush()

    def add(self, row: Mapping, pred) -> None:
        """A prediction over an `EvalTransform` output row's square, at any resolution (mask, logits or probabilities)."""
        from ..transforms.geometry import prediction_to_original

        missing = {"sent_id", "orig_size", "content_box"} - set(row)
        if missing:
            raise KeyError(f"row lacks {sorted(missing)}: pass rows rendered by nemo_hf.EvalTransform")
        output_size = self.output_size or _square_side(row)
        mapped = prediction_to_original(pred, row["orig_size"], row["content_box"], output_size)
        self.add_mask(row["sent_id"], mapped > self.threshold if mapped.dtype == np.float32 else mapped)

    def _open(self) -> None:
        if self._file is None and self._writer is None:
            self._partial.parent.mkdir(parents=True, exist_ok=True)
            if self.format == "jsonl":
                self._file = open(self._partial, "w", encoding="utf-8")
            else:
                self._writer = pq.ParquetWriter(self._partial, PARQUET_SCHEMA)

    def _flush(self) -> None:
        if not self._pending:
            return
        self._open()
        if self._file is not None:
            self._file.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in self._pending)
        else:
            self._writer.write_table(pa.Table.from_pylist(self._pending, schema=PARQUET_SCHEMA))
        self._pending = []

    def close(self) -> Path:
        """Write what is pending and move the file into place; returns its path."""
        self._flush()
        self._open()  # no rows still makes a valid (empty) file
        for handle in (self._file, self._writer):
            if handle is not None:
                handle.close()
        self._file = self._writer = None
        os.replace(self._partial, self.path)
        return self.path

    def abort(self) -> None:
        for handle in (self._file, self._writer):
            if handle is not None:
                handle.close()
        self._file = self._writer = None
        self._partial.unlink(missing_ok=True)


def _square_side(row: Mapping) -> int:
    image = row.get("image")
    if image is None:
        raise ValueError("pass output_size= to PredictionWriter: the row carries no image to read it from")
    size = getattr(image, "size", None)
    return int(size[0]) if isinstance(size, tuple) else int(np.asarray(image).shape[1])


def write_predictions(path: str | os.PathLike, masks: Mapping[int, object] | Sequence[tuple[int, object]]) -> Path:
    """Write ``{sent_id: mask at original size}`` (or (sent_id, mask) pairs) as a predictions file."""
    items = masks.items() if isinstance(masks, Mapping) else masks
    with PredictionWriter(path) as writer:
        for sent_id, mask in items:
            writer.add_mask(sent_id, mask)
    return Path(path)


def read_predictions(path: str | os.PathLike, batch_rows: int = 4096) -> Iterator[tuple[int, dict, str]]:
    """(sent_id, RLE, where) per row, streamed; ``where`` names the file and line or row for error messages.

    Rows are checked for shape (a sent_id integer, a mask with a 2-int size and a str counts), not content.
    What one row may cost is bounded before it is parsed (`MAX_LINE`, `MAX_VALUES`, `MAX_ROW_GROUP`): a small
    hostile file cannot exhaust memory. Only a regular file is opened (a FIFO would block forever).
    """
    path = Path(path)
    fmt = predictions_format(path)
    if fmt == "jsonl":
        with open_regular(path, "predictions file") as f:  # bytes: a line that is not UTF-8 is reported by json.loads
            for line_no, line in enumerate(iter(lambda: f.readline(MAX_LINE + 1), b""), 1):
                where = f"{path}:{line_no}"
                if len(line) > MAX_LINE:
                    raise PredictionsFormatError(f"{where}: a line longer than {MAX_LINE >> 20} MiB is not one expression's mask")
                if not line.strip():
                    continue
                if line.count(b",") + line.count(b"{") > MAX_VALUES:  # neither appears in an RLE counts string
                    raise PredictionsFormatError(f"{where}: more than {MAX_VALUES} JSON values on one line; a row is "
                                                 '{"sent_id": int, "mask": {"size": [h, w], "counts": str}}')
                try:
                    record = json.loads(line)
                except RecursionError:
                    raise PredictionsFormatError(f"{where}: JSON nested too deeply to be a predictions row") from None
                except ValueError as err:
                    raise PredictionsFormatError(f"{where}: not JSON ({err})") from None
                yield _checked(record, where)
        return
    regular_file(path, "predictions file")
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a file that is not Parquet
        raise PredictionsFormatError(f"{path}: not a readable Parquet file ({type(err).__name__}: {err})") from None
    missing = {"sent_id", "mask"} - set(parquet.schema_arrow.names)
    if missing:
        raise PredictionsFormatError(f"{path}: Parquet columns {sorted(missing)} missing; expected sent_id and mask")
    for group in range(parquet.metadata.num_row_groups):
        size = parquet.metadata.row_group(group).total_byte_size
        if size > MAX_ROW_GROUP:
            raise PredictionsFormatError(f"{path}: row group {group} holds {size >> 20} MiB uncompressed, more than "
                                         f"{MAX_ROW_GROUP >> 20} MiB: write it in smaller row groups (PredictionWriter does)")
    row_no = 0
    try:
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=["sent_id", "mask"]):
            for record in batch.to_pylist():
                yield _checked(record, f"{path}: row {row_no}")
                row_no += 1
    except (pa.ArrowException, OSError) as err:
        raise PredictionsFormatError(f"{path}: unreadable after row {row_no} ({type(err).__name__}: {err})") from None


def _checked(record, where: str) -> tuple[int, dict, str]:
    if not isinstance(record, dict) or "sent_id" not in record or "mask" not in record:
        raise PredictionsFormatError(f"{where}: expected {{\"sent_id\": int, \"mask\": {{\"size\": [h, w], \"counts\": str}}}}")
    sent_id, mask = record["sent_id"], record["mask"]
    if isinstance(sent_id, bool) or not isinstance(sent_id, int):
        raise PredictionsFormatError(f"{where}: sent_id {sent_id!r} is not an integer")
    if not -(2**63) <= sent_id < 2**63:
        raise PredictionsFormatError(f"{where}: sent_id {sent_id} does not fit in 64 bits; no expression has it")
    size = mask.get("size") if isinstance(mask, dict) else None
    if (
        not isinstance(size, (list, tuple)) or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_SIDE for v in size)
        or not isinstance(mask.get("counts"), str)
    ):  # fmt: skip
        raise PredictionsFormatError(
            f"{where}: sent_id {sent_id}: mask must be COCO compressed RLE {{\"size\": [h, w], \"counts\": str}}"
        )
    return sent_id, mask, where
