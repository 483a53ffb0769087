import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from PIL import Image
from pycocotools import mask as mask_utils
from transformers import CLIPSegProcessor, CLIPTokenizerFast, Trainer, TrainingArguments

from conftest import SHARED, needs_shared
from nemo_hf.evaluation.metrics import intersection_union, ris_metrics
from nemo_hf.masks import encode_rle
from nemo_hf.training import (
    ORIGINAL_MASK_KEY,
    TARGETS_KEY,
    CountsAtOriginalSize,
    RISCollator,
    RISTrainer,
    resize_mask,
    tiny_random_clipseg,
)

SENTENCES = ["the red square on the left", "blue thing", "top right", "small one at the bottom"]


def scene(i: int, height: int, width: int) -> tuple[Image.Image, np.ndarray]:
    """A smooth image with one coloured rectangle, and the rectangle's mask."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[..., 1] = np.linspace(0, 120, width, dtype=np.uint8)[None, :]
    mask = np.zeros((height, width), np.uint8)
    y0, x0 = (i * 5) % (height // 2), (i * 7) % (width // 2)
    mask[y0 : y0 + height // 2, x0 : x0 + width // 3] = 1
    arr[mask == 1] = (220, (40 + 40 * i) % 256, 30)
    return Image.fromarray(arr), mask


def train_row(i: int, size: int = 32) -> dict:
    image, mask = scene(i, size, size)
    return {"image": image, "mask": mask, "sentence": SENTENCES[i % 4], "sent_id": i, "ref_id": i, "mode": "single"}


def letterbox(batch: dict, size: int = 32) -> dict:
    """A stand-in evaluation transform (batch -> batch, 1:1): letterbox the original into size x size."""
    out = {k: [] for k in ("image", "mask", "sentence", "sent_id", "orig_size", "content_box", "orig_mask", "mode")}
    for i, (height, width) in enumerate(zip(batch["height"], batch["width"])):
        image, mask = scene(batch["seed"][i], height, width)
        scale = size / max(height, width)
        w, h = round(width * scale), round(height * scale)
        x0, y0 = (size - w) // 2, (size - h) // 2
        canvas, canvas_mask = Image.new("RGB", (size, size)), np.zeros((size, size), np.uint8)
        canvas.paste(image.resize((w, h), Image.Resampling.BILINEAR), (x0, y0))
        canvas_mask[y0 : y0 + h, x0 : x0 + w] = np.asarray(Image.fromarray(mask).resize((w, h), Image.Resampling.NEAREST))
        out["image"].append(canvas)
        out["mask"].append(canvas_mask)
        out["sentence"].append(batch["sentence"][i])
        out["sent_id"].append(batch["sent_id"][i])
        out["orig_size"].append([height, width])
        out["content_box"].append([x0, y0, x0 + w, y0 + h])
        out["orig_mask"].append(batch["mask"][i])
        out["mode"].append("eval")
    return out


def eval_dataset(n: int = 6) -> Dataset:
    """Raw refs-like rows (the mask as original-size RLE); the transform reads seed/height/width."""
    sizes = [(16, 32), (32, 16), (24, 24), (8, 32), (32, 32), (16, 8)]
    rows = {"seed": [], "height": [], "width": [], "sentence": [], "sent_id": [], "mask": []}
    for i in range(n):
        height, width = sizes[i % len(sizes)]
        rows["seed"].append(i)
        rows["height"].append(height)
        rows["width"].append(width)
        rows["sentence"].append(SENTENCES[i % 4])
        rows["sent_id"].append(100 + i)
        rows["mask"].append(encode_rle(scene(i, height, width)[1]))
    ds = Dataset.from_dict(rows)
    ds.set_transform(letterbox)
    return ds


def args(tmp_path, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", save_strategy="no",
        per_device_train_batch_size=4, per_device_eval_batch_size=4, dataloader_pin_memory=False, seed=0,
    )
    return TrainingArguments(**(kwargs | overrides))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run faster on one thread than on two shared ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_clipseg(image_size=32, seed=0)


def test_collator_shapes_and_dtypes(tiny):
    _, processor = tiny
    batch = RISCollator(processor)([train_row(i) for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape[0] == 3
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    assert batch["labels"].shape == (3, 32, 32) and batch["labels"].dtype == torch.float32
    assert set(batch["labels"].unique().tolist()) == {0.0, 1.0}
    assert TARGETS_KEY not in batch


def test_collator_with_real_clip_tokenizer_pads_to_longest():
    path = needs_shared(SHARED / "models/clip-vit-base-patch32-notweights")
    _, tiny_processor = tiny_random_clipseg(image_size=32)
    processor = CLIPSegProcessor(image_processor=tiny_processor.image_processor, tokenizer=CLIPTokenizerFast.from_pretrained(path))
    batch = RISCollator(processor)([train_row(0), train_row(1)])
    ids, attention = batch["input_ids"], batch["attention_mask"]
    # "the red square on the left" = 6 words + start + end; "blue thing" is padded to the same length.
    assert ids.shape == (2, 8)
    assert attention.sum(dim=1).tolist() == [8, 4]
    assert ids[:, 0].tolist() == [49406, 49406] and ids[0, -1] == 49407 and ids[1, 3] == 49407


def test_mask_resize_on_a_known_mask():
    mask = np.zeros((64, 64), np.uint8)
    mask[0:32, 16:48] = 1
    expected = np.zeros((32, 32), np.float32)
    expected[0:16, 8:24] = 1
    np.testing.assert_array_equal(resize_mask(mask, (32, 32)), expected)
    # a 1 px line survives upscaling but vanishes when halved (majority vote, not "any")
    line = np.zeros((8, 8), np.uint8)
    line[3] = 1
    assert resize_mask(line, (16, 16))[6:8].all() and resize_mask(line, (16, 16)).sum() == 32
    assert resize_mask(line, (4, 4)).sum() == 0


def test_collator_eval_rows_carry_original_ground_truth(tiny):
    _, processor = tiny
    ds = eval_dataset(4)
    batch = RISCollator(processor)([ds[i] for i in range(4)])
    targets = batch[TARGETS_KEY]
    assert [tuple(m.shape) for m in targets["gt_masks"]] == [(16, 32), (32, 16), (24, 24), (8, 32)]
    for i, gt in enumerate(targets["gt_masks"]):
        np.testing.assert_array_equal(gt.numpy(), scene(i, *gt.shape)[1].astype(bool))
    # (16, 32) letterboxed into 32x32 sits in rows 8..24: fractions of the image
    assert targets["content_boxes"][0].tolist() == [0.0, 0.25, 1.0, 0.75]
    assert targets["sent_ids"].tolist() == [100, 101, 102, 103]
    assert batch["labels"].shape == (4, 32, 32)


def test_collator_refuses_bad_batches(tiny):
    _, processor = tiny
    collate = RISCollator(processor)
    ds = eval_dataset(2)
    with pytest.raises(ValueError, match="mixes"):
        collate([ds[0], train_row(1)])
    row = dict(ds[1])
    del row[ORIGINAL_MASK_KEY]
    with pytest.raises(KeyError, match="sent_id=101"):
        collate([row])
    with pytest.raises(KeyError, match="set_transform"):
        collate([{"sentences": [], "mask": {}}])


def test_counts_identity_mapping_equal_direct_threshold():
    logits = torch.randn(1, 6, 8, generator=torch.Generator().manual_seed(0))
    gt = torch.rand(6, 8, generator=torch.Generator().manual_seed(1)) < 0.5
    counter = CountsAtOriginalSize()
    resampled = counter.resample(logits[0], [0.0, 0.0, 1.0, 1.0], (6, 8))
    torch.testing.assert_close(resampled, logits[0])
    counts = counter(logits, {"gt_masks": [gt], "content_boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]])})
    assert tuple(counts[0].tolist()) == intersection_union((logits[0] > 0).numpy(), gt.numpy())


def test_counts_at_original_size_equal_crop_then_interpolate():
    """Letterboxed content in rows 2..6 of 8x8 logits, original 8x16: crop, bilinear x2, threshold."""
    logits = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(2))
    gts = [torch.rand(8, 16, generator=torch.Generator().manual_seed(3)) < 0.3, torch.zeros(4, 4, dtype=torch.bool)]
    boxes = torch.tensor([[0.0, 0.25, 1.0, 0.75], [0.25, 0.25, 0.75, 0.75]])
    counter = CountsAtOriginalSize(threshold=0.6)
    counts = counter(logits, {"gt_masks": gts, "content_boxes": boxes})
    direct0 = F.interpolate(logits[0, 2:6][None, None], size=(8, 16), mode="bilinear", align_corners=False)[0, 0]
    direct1 = logits[1, 2:6, 2:6]  # same size: the crop itself
    torch.testing.assert_close(counter.resample(logits[0], boxes[0].tolist(), (8, 16)), direct0)
    logit_06 = float(np.log(0.6 / 0.4))
    assert tuple(counts[0].tolist()) == intersection_union((direct0 > logit_06).numpy(), gts[0].numpy())
    assert tuple(counts[1].tolist()) == intersection_union((direct1 > logit_06).numpy(), gts[1].numpy())


def raw_train_dataset(n: int = 8) -> Dataset:
    """Raw columns only; the transform turns them into NeMo transform rows."""
    ds = Dataset.from_dict({"seed": list(range(n)), "caption": [SENTENCES[i % 4] for i in range(n)]})

    def transform(batch):
        rows = [train_row(seed) for seed in batch["seed"]]
        return {key: [row[key] for row in rows] for key in rows[0]}

    ds.set_transform(transform)
    return ds


def test_plain_trainer_loses_raw_columns_ris_trainer_keeps_them(tiny, tmp_path):
    model, processor = tiny
    ds = raw_train_dataset()
    plain = Trainer(model=model, args=args(tmp_path), data_collator=RISCollator(processor), train_dataset=ds)
    with pytest.raises(ValueError, match="No columns in the dataset match"):
        next(iter(plain.get_train_dataloader()))
    with pytest.warns(UserWarning, match="remove_unused_columns=False"):
        trainer = RISTrainer(model=model, args=args(tmp_path), processing_class=processor, train_dataset=ds)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["labels"].shape == (4, 32, 32) and batch["pixel_values"].shape == (4, 3, 32, 32)


def test_evaluation_counts_at_original_resolution_match_direct_computation(tiny, tmp_path):
    model, processor = tiny
    ds = eval_dataset(6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer = RISTrainer(model=model, args=args(tmp_path), processing_class=processor, eval_dataset=ds)
    output = trainer.predict(ds)
    assert output.label_ids.tolist() == [100 + i for i in range(6)]

    rows = [ds[i] for i in range(6)]
    batch = RISCollator(processor)(rows)
    with torch.no_grad():
        logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits
    direct = []
    for i, row in enumerate(rows):
        # direct: logits -> transform output size -> crop the content box -> original size
        full = F.interpolate(logits[i][None, None], size=(32, 32), mode="bilinear", align_corners=False)[0, 0]
        x0, y0, x1, y1 = row["content_box"]
        orig = F.interpolate(full[y0:y1, x0:x1][None, None], size=tuple(row["orig_size"]), mode="bilinear", align_corners=False)
        gt = mask_utils.decode({"size": row[ORIGINAL_MASK_KEY]["size"], "counts": row[ORIGINAL_MASK_KEY]["counts"].encode()})
        direct.append(intersection_union((orig[0, 0] > 0).numpy(), gt))
    # the transform image and the logits are both 32x32 here, so the two-step path is the same sampling
    np.testing.assert_array_equal(output.predictions, np.array(direct))
    expected = ris_metrics([i for i, _ in direct], [u for _, u in direct])
    assert output.metrics["test_oIoU"] == pytest.approx(expected["oIoU"])
    assert output.metrics["test_mIoU"] == pytest.approx(expected["mIoU"])
    assert output.metrics["test_n_expressions"] == 6
    assert "test_loss" in output.metrics


def test_batch_eval_metrics_streaming_gives_the_same_metrics(tiny, tmp_path):
    model, processor = tiny
    ds = eval_dataset(6)
    results = []
    for streaming in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            trainer = RISTrainer(
                model=model, args=args(tmp_path, batch_eval_metrics=streaming, per_device_eval_batch_size=4),
                processing_class=processor, eval_dataset=ds,
            )
        results.append(trainer.evaluate())
    keys = {"eval_oIoU", "eval_mIoU", "eval_Prec@0.5", "eval_Prec@0.7", "eval_Prec@0.9", "eval_n_expressions"}
    assert keys <= results[0].keys()
    assert {k: results[0][k] for k in keys} == pytest.approx({k: results[1][k] for k in keys})
    assert results[1]["eval_n_expressions"] == 6


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """CLIPSeg's loss is a batch mean: 2 steps of 2 must update like 1 step of 4."""
    ds = raw_train_dataset(4)
    params = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        model, processor = tiny_random_clipseg(image_size=32, seed=0)
        training_args = args(
            tmp_path, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
            max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
            remove_unused_columns=False,
        )
        RISTrainer(model=model, args=training_args, processing_class=processor, train_dataset=ds).train()
        params.append(torch.cat([p.detach().flatten() for p in model.decoder.parameters()]))
    before = torch.cat([p.detach().flatten() for p in tiny_random_clipseg(image_size=32, seed=0)[0].decoder.parameters()])
    assert not torch.allclose(params[0], before)
    torch.testing.assert_close(params[1], params[0], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_overfitting_a_fixed_batch_is_scored_well_at_original_resolution(tmp_path):
    """Train on six fixed letterboxed scenes, then score the same scenes at their original sizes:
    the loss must fall and the IoU rise, which only happens if labels, pixels and the mapping back agree."""
    model, processor = tiny_random_clipseg(image_size=64, seed=0)
    ds = eval_dataset(6)
    ds.set_transform(lambda batch: letterbox(batch, size=64))
    training_args = args(
        tmp_path, max_steps=60, learning_rate=1e-2, lr_scheduler_type="constant", per_device_train_batch_size=6,
        logging_steps=10, remove_unused_columns=False,
    )
    trainer = RISTrainer(model=model, args=training_args, processing_class=processor, train_dataset=ds, eval_dataset=ds)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.5 * losses[0]
    assert after["eval_oIoU"] > 0.7 and after["eval_oIoU"] > before["eval_oIoU"] + 0.4
    assert after["eval_Prec@0.5"] > before["eval_Prec@0.5"] + 0.5


def run_example(tmp_path, *flags) -> tuple:
    """examples/train_clipseg.py on a 16-image synthetic folder, tiny CLIPSeg, 30 steps of 8, logging every 5.
    Returns (evaluation metrics, the logged training entries, the folder)."""
    import json
    import runpy
    from pathlib import Path

    from nemo_hf.folder import build_folder
    from nemo_hf.source.synthetic import make_refer_source

    source = make_refer_source(tmp_path / "src", n_images=16, seed=0, datasets=("refcoco",))
    folder = build_folder(source, tmp_path / "folder", ["refcoco_unc"], mining=None)
    example = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples/train_clipseg.py"))
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        metrics = example["main"]([
            "--data", str(folder), "--tiny-random", "--max-steps", "30", "--batch-size", "8", "--lr", "1e-2",
            "--logging-steps", "5", "--seed", "0", "--output-dir", str(run), *flags,
        ])  # fmt: skip
    assert (run / "model.safetensors").exists()
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    return metrics, [entry for entry in history if "loss" in entry], folder


@pytest.mark.slow
def test_example_trains_on_synthetic_mosaics_and_evaluates_every_sentence(tmp_path):
    from datasets import load_dataset

    metrics, logs, folder = run_example(tmp_path)
    for key in ("eval_oIoU", "eval_mIoU", "eval_Prec@0.5", "eval_Prec@0.7", "eval_Prec@0.9", "eval_loss"):
        assert 0.0 <= metrics[key] <= (1.0 if key != "eval_loss" else 10.0), key
    val = load_dataset(str(folder), "refcoco_unc", split="val")
    assert metrics["eval_n_expressions"] == sum(len(s) for s in val["sentences"]) > len(val)
    losses = [entry["loss"] for entry in logs]
    assert len(losses) == 6 and losses[-1] < 0.5 * losses[0]


def test_counts_agree_with_eval_transform_mapping_for_squashed_rows():
    """The metric counts the same pixels a user sees through geometry.prediction_to_original."""
    from nemo_hf.transforms.geometry import prediction_to_original

    logits = torch.randn(3, 22, 22, generator=torch.Generator().manual_seed(4))
    sizes = [(30, 50), (48, 64), (22, 40)]
    gts = [torch.rand(size, generator=torch.Generator().manual_seed(5)) < 0.4 for size in sizes]
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3)
    counts = CountsAtOriginalSize()(logits, {"gt_masks": gts, "content_boxes": boxes})
    for i, (size, gt) in enumerate(zip(sizes, gts)):
        mapped = prediction_to_original(logits[i].numpy(), size, [0, 0, 352, 352], 352)
        assert tuple(counts[i].tolist()) == intersection_union(mapped > 0, gt.numpy())
