"""``nemo-hf zeroshot``: TAS over a split of a built folder, written as a predictions file for ``nemo-hf eval``."""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from .. import progress as progress_lines
from ..evaluation.predictions import PredictionWriter, predictions_format
from ..masks import encode_rle
from ..mining.cache import atomic_write
from ..mining.embed import Embedder, demo_embedder
from ..transforms.images import DECODE_ERRORS, ImageTable
from .captioner import Captioner
from .encode import ClipEncoder, FeatureCache
from .gate import SpacyParseGate
from .phrases import NEGATIVE_PHRASES, SYNONYM_THRESHOLD, CaptionNounChunks, VocabularyNegatives, load_spacy
from .predict import TasPredictor, expression_words
from .proposals import InstanceProposals, SamProposals
from .provenance import provenance_path


def _expressions(refs) -> dict[int, list[dict]]:
    """image_id -> its expressions (sent_id, sentence, tokens), in refs order."""
    by_image: dict[int, list[dict]] = {}
    for row in refs.select_columns(["image_id", "sentences"]):
        for sentence in row["sentences"]:
            by_image.setdefault(int(row["image_id"]), []).append(
                {"sent_id": int(sentence["sent_id"]), "sent": sentence["sent"], "tokens": sentence.get("tokens")}
            )
    return by_image


def decode_full(table: ImageTable, image_id: int) -> np.ndarray:
    """The stored image at full size as uint8 HxWx3 (EXIF orientation not applied); errors name the image.
    Its header's size is bounded (`EncodedImage`: masks.MAX_SIDE, as the build) before any pixel is allocated."""
    try:
        source = table.open(image_id)
        return source.decode(source.size)
    except KeyError:
        raise ValueError(f"image {image_id} is not in the images config") from None
    except DECODE_ERRORS as err:
        raise ValueError(f"image {image_id} cannot be decoded: {err}") from None


def run_zeroshot(refs, images, predictor: TasPredictor, out, cache_dir=None, progress: bool = True) -> dict:
    """Predict a mask for every expression of ``refs`` (one split) and write ``out`` (a predictions file,
    ``.jsonl`` or ``.parquet``); returns a summary.

    Resumable: each image's features are cached under ``cache_dir`` (default ``<out>.cache``) as soon as
    they are computed, so a rerun after an interruption computes only the images not yet done.
    """
    out = Path(out)
    predictions_format(out)  # fail on a bad suffix before any work
    cache = FeatureCache(cache_dir or out.with_name(out.name + ".cache"), predictor.cache_key())
    by_image = _expressions(refs)
    n_expr = sum(len(v) for v in by_image.values())
    table = ImageTable(images)
    if not table.has_objects:
        raise ValueError(
            "the images config has no 'objects' column (every instance of each image), which zero-shot "
            "proposals and scoring need: rebuild the folder with this nemo_hf version (nemo-hf build)"
        )

    start = time.perf_counter()
    sentences = [e for exprs in by_image.values() for e in exprs]
    text_emb = predictor.encoder.embedder.embed_texts(
        [(e["sent_id"], e["sent"]) for e in sentences], cache_dir=cache.directory / "texts"
    )
    text_of = {e["sent_id"]: row for e, row in zip(sentences, text_emb)}
    predictor.timings["text forward"] += time.perf_counter() - start
    predictor.prepare([e["sent"] for e in sentences])

    cached = 0
    bar = progress_lines.bar(n_expr, f"zeroshot ({predictor.proposer.name})", "expr", disable=not progress)
    with PredictionWriter(out) as writer, bar:  # an interrupted run leaves no file under the final name
        for image_id, expressions in by_image.items():
            data, objects = table.bytes_of(image_id), table.objects_of(image_id)
            if data is None:
                raise ValueError(f"image {image_id} is not in the images config")
            content = predictor.image_content(data, objects)
            features = cache.get(image_id, content)
            if features is None:
                start = time.perf_counter()
                pixels = decode_full(table, image_id)
                predictor.timings["decode"] += time.perf_counter() - start
                features = predictor.image_features(pixels, objects, f"image {image_id}")
                cache.put(image_id, content, features)
            else:
                cached += 1
            for expr in expressions:
                words = expression_words(expr["sent"], expr["tokens"])
                k = predictor.choose(features, expr["sent"], words, text_of[expr["sent_id"]])
                mask = features.masks[k] if k is not None else encode_rle(np.zeros(features.size, dtype=np.uint8))
                writer.add_mask(expr["sent_id"], mask)
            bar.update(len(expressions))
    summary = {
        **predictor.describe(),
        "expressions": n_expr,
        "images": len(by_image),
        "images_from_cache": cached,
        "cache": str(cache.directory),
        "predictions": str(out),
    }
    atomic_write(provenance_path(out), json.dumps(summary, indent=2).encode())
    return summary


DEMO_MODEL = "demo-random"
DEMO_WARNING = (
    "DEMO MODEL: --model demo-random is a randomly initialised tiny CLIP; every score it gives is "
    "MEANINGLESS. Use a real checkpoint (e.g. openai/clip-vit-base-patch32) for any number you keep."
)


def load_encoder(model: str, batch_size: int = 64) -> ClipEncoder:
    """The scoring CLIP: a hub id or local path, or ``demo-random`` (with its warning on stderr)."""
    if model == DEMO_MODEL:
        print(DEMO_WARNING, file=sys.stderr)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # said above, once
            return ClipEncoder(demo_embedder(batch_size=batch_size, progress=False))
    return ClipEncoder(Embedder.from_pretrained(model, batch_size=batch_size, progress=False))


def build_predictor(
    encoder: ClipEncoder,
    proposals: str = "instances",
    captioner: str | None = None,
    phrases: str = "vocabulary",
    negative_phrases: int = NEGATIVE_PHRASES,
    synonym_threshold: float = SYNONYM_THRESHOLD,
    spacy_model: str = "en_core_web_trf",
    rectifier: str = "tas",
    crop_box: str = "tas",
) -> TasPredictor:
    """The predictor the command line describes: ``proposals`` is ``instances`` or ``sam:PATH_OR_ID``,
    ``phrases`` ``vocabulary`` (offline default), ``spacy`` (needs spaCy, a model and a captioner) or ``none``.
    With ``spacy`` the same pipeline gates the spatial rectifier as TAS does (`gate.SpacyParseGate`);
    otherwise every sentence with a spatial word is rectified, and the provenance says so."""
    if proposals == "instances":
        proposer = InstanceProposals()
    elif proposals.startswith("sam:") and len(proposals) > 4:
        proposer = SamProposals.from_pretrained(proposals[4:])
    else:
        raise ValueError(f"--proposals {proposals!r}: expected 'instances' or 'sam:PATH_OR_ID'")
    if phrases == "spacy" and captioner is None:
        raise ValueError("--phrases spacy takes noun chunks of the whole image's caption: pass --captioner too")
    caption_model = Captioner.from_pretrained(captioner) if captioner else None
    gate = None
    if phrases == "vocabulary":
        negatives = VocabularyNegatives(encoder, negative_phrases, synonym_threshold)
    elif phrases == "spacy":
        nlp = load_spacy(spacy_model)
        negatives, gate = CaptionNounChunks(encoder, nlp, synonym_threshold), SpacyParseGate(nlp)
    elif phrases == "none":
        negatives = None
    else:
        raise ValueError(f"--phrases {phrases!r}: expected vocabulary, spacy or none")
    return TasPredictor(encoder, proposer, negatives, caption_model, rectifier=rectifier, gate=gate, crop_box=crop_box)


def format_summary(summary: dict) -> str:
    lines = [
        f"zero-shot TAS predictions: {summary['expressions']} expressions over {summary['images']} images "
        f"({summary['images_from_cache']} images from the cache)",
        f"  proposals: {summary['proposals']}",
        f"  model: {summary['model']['model_id']}",
        f"  negative phrases: {summary['negative_phrases']}, captioner: {summary['captioner']}",
        f"  spatial rectifier: {summary['spatial_rectifier']} ({summary['rectifier_gate']})",
        f"  crop box: {summary['crop_box']}",
        f"  wrote {summary['predictions']} (provenance beside it: {summary['predictions']}.provenance.json)",
    ]
    if summary["oracle_proposals"]:
        lines.insert(1, "  ORACLE SETTING: the proposals are the ground-truth instance masks; scores are an upper bound, "
                        "not comparable with TAS's SAM numbers")  # fmt: skip
    return "\n".join(lines)
