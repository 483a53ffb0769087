import math
import warnings

import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizerFast, PreTrainedTokenizerFast, ViTImageProcessorPil

from conftest import SHARED, needs_shared
from nemo_hf.training import TARGETS_KEY, RISCollator, RISTrainer, dcl_loss, dcl_terms, dcl_two_pass, tiny_random_clipseg
from nemo_hf.transforms.maskris import (
    MaskRIS,
    mask_image_patches,
    mask_text_tokens,
    replacement_vocabulary,
    text_mask_token_id,
)
from test_training import one_torch_thread  # noqa: F401 (the autouse fixture applies here too)
from test_training import args, eval_dataset, raw_train_dataset, run_example, train_row

CLIP = SHARED / "models/clip-vit-base-patch32-notweights"
WORDS = "the a red blue green man woman dog cat left right top bottom small big one on at of in car tree".split()


@pytest.fixture(scope="module")
def wordpiece():
    """A tiny BERT-style WordPiece tokenizer built in code: [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(specials + WORDS + ["##s", "##er"])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=20,
    )  # fmt: skip


@pytest.fixture(scope="module")
def clip_tokenizer():
    return CLIPTokenizerFast.from_pretrained(needs_shared(CLIP))


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(2, 12))) for _ in range(n)]


# ---------------------------------------------------------------- image masking


GRIDS = [(64, 64, 16, (4, 4)), (352, 352, 64, (6, 6)), (480, 480, 64, (8, 8)), (100, 150, 16, (7, 10))]


@pytest.mark.parametrize(("height", "width", "patch", "grid"), GRIDS)
def test_image_masking_count_fill_grid_and_untouched_pixels(height, width, patch, grid):
    pixels = torch.randn(3, 3, height, width, generator=torch.Generator().manual_seed(0)) + 5  # no zeros
    masked, patch_mask = mask_image_patches(pixels, patch, 0.75, generator=torch.Generator().manual_seed(1))
    n_patches = grid[0] * grid[1]
    assert patch_mask.shape == (3, *grid) and patch_mask.dtype == torch.bool
    assert patch_mask.flatten(1).sum(dim=1).tolist() == [n_patches - int(n_patches * 0.25)] * 3
    rows, cols = torch.arange(height) // patch, torch.arange(width) // patch
    expected = patch_mask[:, rows][:, :, cols]  # every pixel follows its (clipped) patch
    assert ((masked == 0) == expected[:, None]).all()
    assert torch.equal(masked[~expected[:, None].expand_as(masked)], pixels[~expected[:, None].expand_as(pixels)])
    assert not torch.equal(patch_mask[0], patch_mask[1])  # each sample its own mask


def test_image_masking_is_reproducible_from_the_generator():
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    draws = [mask_image_patches(pixels, 8, 0.5, torch.Generator().manual_seed(seed))[1] for seed in (7, 7, 8)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert mask_image_patches(pixels, 8, 0.0)[1].sum() == 0
    with pytest.raises(ValueError, match="patch_size"):
        mask_image_patches(pixels, 0)
    with pytest.raises(ValueError, match="ratio"):
        mask_image_patches(pixels, 8, ratio=1.5)


# ---------------------------------------------------------------- text masking


def binomial_ok(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_text_masking_frequencies_within_binomial_bounds(wordpiece):
    batch = wordpiece(sentences(3000), padding=True, return_tensors="pt")
    ids, attention = batch["input_ids"], batch["attention_mask"]
    real = attention.bool() & ~torch.isin(ids, torch.tensor(wordpiece.all_special_ids))
    n = int(real.sum())
    masked = mask_text_tokens(ids, attention, wordpiece, generator=torch.Generator().manual_seed(0))
    n_mask = int((masked[real] == wordpiece.mask_token_id).sum())
    n_random = int(((masked != ids) & (masked != wordpiece.mask_token_id))[real].sum())
    vocab = len(replacement_vocabulary(wordpiece))
    assert binomial_ok(n_mask, n, 0.15 * 0.8)
    assert binomial_ok(n_random, n, 0.15 * 0.1 * (1 - 1 / vocab))  # a random id may equal the original
    # everything chosen, to see the 80/10/10 split itself
    masked = mask_text_tokens(ids, attention, wordpiece, ratio=1.0, generator=torch.Generator().manual_seed(1))
    n_mask = int((masked[real] == wordpiece.mask_token_id).sum())
    n_random = int(((masked != ids) & (masked != wordpiece.mask_token_id))[real].sum())
    assert binomial_ok(n_mask, n, 0.8) and binomial_ok(n_random, n, 0.1 * (1 - 1 / vocab))


def test_text_masking_never_touches_specials_padding_or_masked_out_positions(wordpiece):
    batch = wordpiece(sentences(200, seed=1), padding=True, return_tensors="pt")
    ids, attention = batch["input_ids"], batch["attention_mask"].clone()
    attention[:, 1] = 0  # a real word the caller has masked out
    masked = mask_text_tokens(ids, attention, wordpiece, ratio=1.0, mask_fraction=0.5, random_fraction=0.5,
                              generator=torch.Generator().manual_seed(2))  # fmt: skip
    protected = ~attention.bool() | torch.isin(ids, torch.tensor(wordpiece.all_special_ids))
    assert torch.equal(masked[protected], ids[protected])
    assert (ids == wordpiece.pad_token_id).any() and (ids[:, 1] != wordpiece.pad_token_id).all()
    changed = masked[~protected]
    assert (changed != ids[~protected]).float().mean() > 0.9  # with ratio 1 nearly every real token changes


def test_random_replacements_are_never_special_and_cover_the_vocabulary(wordpiece):
    batch = wordpiece(sentences(500, seed=2), padding=True, return_tensors="pt")
    masked = mask_text_tokens(batch["input_ids"], batch["attention_mask"], wordpiece, ratio=1.0, mask_fraction=0.0,
                              random_fraction=1.0, generator=torch.Generator().manual_seed(3))  # fmt: skip
    real = batch["attention_mask"].bool() & ~torch.isin(batch["input_ids"], torch.tensor(wordpiece.all_special_ids))
    drawn = set(masked[real].tolist())
    assert drawn.isdisjoint(wordpiece.all_special_ids)
    assert drawn == set(range(wordpiece.vocab_size)) - set(wordpiece.all_special_ids)


def test_text_masking_validates_its_parameters(wordpiece):
    ids = torch.tensor([[2, 5, 3]])
    with pytest.raises(ValueError, match="sum to <= 1"):
        mask_text_tokens(ids, torch.ones_like(ids), wordpiece, mask_fraction=0.8, random_fraction=0.3)
    for fractions in ({"mask_fraction": float("nan")}, {"random_fraction": float("nan")}):  # NaN silently masked nothing
        with pytest.raises(ValueError, match=r"fraction must be a number in \[0, 1\], got nan"):
            mask_text_tokens(ids, torch.ones_like(ids), wordpiece, **fractions)
    with pytest.raises(ValueError, match="differ"):
        mask_text_tokens(ids, torch.ones(1, 2, dtype=torch.int64), wordpiece)


def test_clip_stand_in_is_a_plain_token_below_eos(clip_tokenizer):
    mask_id = text_mask_token_id(clip_tokenizer)
    assert mask_id == clip_tokenizer.convert_tokens_to_ids("*</w>") == 265
    assert mask_id not in clip_tokenizer.all_special_ids and mask_id < clip_tokenizer.eos_token_id
    # a [MASK] added to CLIP's vocabulary gets an id above eos: legacy configs would pool at it
    added = CLIPTokenizerFast.from_pretrained(CLIP)
    added.add_special_tokens({"mask_token": "[MASK]"})
    with pytest.raises(ValueError, match="above eos"):
        text_mask_token_id(added)


@pytest.mark.parametrize("eos_token_id", [2, 49407])  # legacy argmax pooling, and first-eos pooling
def test_clip_text_model_pools_at_the_same_position_after_masking(clip_tokenizer, eos_token_id):
    config = CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=77, eos_token_id=eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = CLIPTextModel(config).eval()
    batch = clip_tokenizer(sentences(64, seed=3), padding=True, return_tensors="pt")
    ids, attention = batch["input_ids"], batch["attention_mask"]
    eos_position = (ids == clip_tokenizer.eos_token_id).int().argmax(dim=1)
    masked = mask_text_tokens(ids, attention, clip_tokenizer, ratio=1.0, mask_fraction=0.5, random_fraction=0.5,
                              generator=torch.Generator().manual_seed(4))  # fmt: skip

    def pooled_position(input_ids):
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=attention)
        hits = (out.last_hidden_state == out.pooler_output[:, None]).all(dim=-1)
        assert hits.sum(dim=1).eq(1).all()
        return hits.int().argmax(dim=1)

    assert torch.equal(pooled_position(ids), eos_position)
    assert (masked == 265).any() and ((masked != ids) & (masked != 265)).any()
    assert torch.equal(pooled_position(masked), eos_position)
    # the stand-in the issue warns against would move it: eos written over the first word
    naive = ids.clone()
    naive[:, 1] = clip_tokenizer.eos_token_id
    assert (pooled_position(naive) == 1).all()


# ---------------------------------------------------------------- MaskRIS object


def test_maskris_repr_validation_and_seeded_epoch_draws(wordpiece):
    import nemo_hf

    maskris = nemo_hf.MaskRIS(patch_size=16, seed=3)
    assert repr(maskris) == (
        "MaskRIS(patch_size=16, image_ratio=0.75, text_ratio=0.15, mask_fraction=0.8, random_fraction=0.1, "
        "clean_weight=0.5, backward='per_pass', seed=3, class_weights=(0.9, 1.1), distil_at='logits', epoch=0)"
    )
    assert maskris.dcl_options() == {"clean_weight": 0.5, "class_weights": (0.9, 1.1), "distil_at": "logits"}
    assert MaskRIS(class_weights=None, distil_at="labels").dcl_options()["class_weights"] is None
    for bad in (dict(patch_size=0), dict(image_ratio=-0.1), dict(text_ratio=2), dict(clean_weight=1.5),
                dict(mask_fraction=0.9, random_fraction=0.2), dict(backward="twice"), dict(class_weights=(1.0,)),
                dict(class_weights=(0.9, float("nan"))), dict(class_weights="ab"), dict(class_weights=0.9),
                dict(distil_at="decoder")):  # fmt: skip
        with pytest.raises(ValueError):
            MaskRIS(**bad)
    batch = dict(wordpiece(sentences(8, seed=4), padding=True, return_tensors="pt"))
    batch["pixel_values"] = torch.randn(8, 3, 64, 64)

    def draw(maskris, keys=tuple(range(8))):
        out = maskris(batch, wordpiece, list(keys))
        return torch.cat([out["masked_pixels"].flatten().float(), out["input_ids_masked"].flatten().float()])

    first = draw(maskris)
    assert torch.equal(first, draw(MaskRIS(patch_size=16, seed=3)))
    assert not torch.equal(first, draw(maskris, keys=range(1, 9)))
    assert not torch.equal(first, draw(MaskRIS(patch_size=16, seed=4)))
    maskris.set_epoch(1)
    assert "epoch=1" in repr(maskris) and not torch.equal(first, draw(maskris))


# ---------------------------------------------------------------- DCL loss


def bce(logits, target):
    p = torch.sigmoid(logits)
    return -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()


@pytest.mark.parametrize("shape", [(2, 5, 6), (2, 1, 5, 6)])
def test_dcl_loss_unweighted_at_label_size_is_bce_and_stops_gradient(shape):
    """class_weights=None, distil_at="labels" (nemo_hf's rule before the official one became the default):
    binary logits as (0, z) make both terms plain BCE, the masked one against sigmoid(clean)."""
    gen = torch.Generator().manual_seed(0)
    clean = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    masked = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = (torch.rand(shape, generator=gen) < 0.4).double()
    labels = labels[:, 0] if labels.ndim == 4 else labels
    loss = dcl_loss(clean, masked, labels, clean_weight=0.3, class_weights=None, distil_at="labels")
    z_clean, z_masked = (t[:, 0] if t.ndim == 4 else t for t in (clean, masked))
    expected = 0.3 * bce(z_clean, labels) + 0.7 * bce(z_masked, torch.sigmoid(z_clean.detach()))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    clean_alone = torch.autograd.grad(bce(z_clean, labels), clean)[0]
    torch.testing.assert_close(clean.grad, 0.3 * clean_alone)  # nothing through the target
    masked_alone = torch.autograd.grad(bce(z_masked, torch.sigmoid(z_clean.detach())), masked)[0]
    torch.testing.assert_close(masked.grad, 0.7 * masked_alone)


def test_dcl_loss_class_logits_unweighted_against_hand_computation_and_stop_gradient():
    gen = torch.Generator().manual_seed(1)
    clean = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    masked = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(3, (2, 4, 5), generator=gen)

    def ce(logits):
        log_p = logits.log_softmax(dim=1)
        return -log_p.gather(1, labels[:, None])[:, 0].mean()

    def soft_ce(logits, target_logits):
        return -(target_logits.softmax(dim=1) * logits.log_softmax(dim=1)).sum(dim=1).mean()

    clean_term, masked_term = dcl_terms(clean, masked, labels, class_weights=None)
    torch.testing.assert_close(clean_term, ce(clean))
    torch.testing.assert_close(masked_term, soft_ce(masked, clean.detach()))
    dcl_loss(clean, masked, labels, class_weights=None).backward()
    torch.testing.assert_close(clean.grad, 0.5 * torch.autograd.grad(ce(clean), clean)[0])


def test_dcl_refuses_labels_that_are_not_class_indices():
    clean = torch.zeros(2, 3, 4, 5)
    with pytest.raises(ValueError, match="class indices"):
        dcl_loss(clean, clean, torch.zeros(2, 4))  # no batch of masks
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\).*found 3"):
        dcl_loss(clean, clean, torch.full((2, 4, 5), 3))
    with pytest.raises(ValueError, match="found 0.5"):
        dcl_loss(clean[:, 0], clean[:, 0], torch.full((2, 4, 5), 0.5))  # a soft label is not truncated silently
    with pytest.raises(ValueError, match="2 class weights for logits of 3 classes"):
        dcl_loss(clean, clean, torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="distil_at"):
        dcl_loss(clean, clean, torch.zeros(2, 4, 5), class_weights=None, distil_at="decoder")


# ---------------------------------------------------------------- collator


def test_collator_adds_masked_views_to_training_batches_only():
    _, processor = tiny_random_clipseg(image_size=32)
    maskris = MaskRIS(patch_size=8, text_ratio=1.0)
    collate = RISCollator(processor, maskris=maskris)
    train = collate([train_row(i) for i in range(4)])
    masked_pixels = train["masked_pixels"]
    assert masked_pixels.shape == (4, 32, 32) and masked_pixels.dtype == torch.bool
    assert masked_pixels.flatten(1).float().mean(dim=1).tolist() == [0.75] * 4  # 16 patches of 8 px, 12 masked
    assert train["input_ids_masked"].shape == train["input_ids"].shape
    assert (train["input_ids_masked"] == processor.tokenizer.convert_tokens_to_ids("*")).any()
    assert torch.equal(collate([train_row(i) for i in range(4)])["input_ids_masked"], train["input_ids_masked"])
    ds = eval_dataset(2)
    evaluation = collate([ds[0], ds[1]])
    assert TARGETS_KEY in evaluation and not {"masked_pixels", "input_ids_masked"} & set(evaluation)
    with pytest.raises(ValueError, match="not both"):
        RISCollator(processor, tokenizer=processor.tokenizer, image_processor=processor.image_processor)
    with pytest.raises(ValueError, match="not both"):
        RISCollator(tokenizer=processor.tokenizer)


@pytest.mark.parametrize("tokenizer_name", ["wordpiece", "clip_tokenizer"])
def test_collator_with_separate_tokenizer_and_image_processor(tokenizer_name, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    image_processor = ViTImageProcessorPil(size={"height": 48, "width": 48})
    maskris = MaskRIS(patch_size=16, text_ratio=1.0)
    collate = RISCollator(tokenizer=tokenizer, image_processor=image_processor, maskris=maskris)
    rows = [train_row(i) for i in range(3)]
    batch = collate(rows)
    expected = tokenizer([row["sentence"] for row in rows], padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert batch["pixel_values"].shape == (3, 3, 48, 48) and batch["labels"].shape == (3, 48, 48)
    ids, masked = batch["input_ids"], batch["input_ids_masked"]
    assert (masked == text_mask_token_id(tokenizer)).any()
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    assert torch.equal(masked[special], ids[special])
    assert "RISCollator(tokenizer=" in repr(collate)


def test_collator_as_a_plain_dataloader_collate_fn_in_a_hand_written_dcl_loop():
    """The README's loop: DataLoader(collate_fn=RISCollator(...)), dcl_two_pass, one optimiser step."""
    model, processor = tiny_random_clipseg(image_size=32, seed=0)
    maskris = MaskRIS(patch_size=8)
    collate = RISCollator(tokenizer=processor.tokenizer, image_processor=processor.image_processor, maskris=maskris)
    loader = torch.utils.data.DataLoader([train_row(i) for i in range(8)], batch_size=4, collate_fn=collate)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    seen = []
    model.register_forward_pre_hook(lambda module, a, kwargs: seen.append(kwargs), with_kwargs=True)
    batch = next(iter(loader))
    dcl_two_pass(model, batch)
    assert [set(kwargs) for kwargs in seen] == [{"input_ids", "attention_mask", "pixel_values"}] * 2
    assert torch.equal(seen[0]["pixel_values"], batch["pixel_values"])
    assert torch.equal(seen[1]["pixel_values"], batch["pixel_values"].masked_fill(batch["masked_pixels"][:, None], 0))
    assert torch.equal(seen[1]["input_ids"], batch["input_ids_masked"])
    assert seen[1]["attention_mask"] is batch["attention_mask"]
    losses = []
    for epoch in range(6):
        maskris.set_epoch(epoch)
        for batch in loader:
            loss, clean, masked = dcl_two_pass(model, batch, maskris.clean_weight, backward_clean=torch.Tensor.backward)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            torch.testing.assert_close(loss.detach(), 0.5 * clean + 0.5 * masked)
    assert losses[-1] < 0.7 * losses[0]


def test_collator_draws_do_not_depend_on_dataloader_workers():
    _, processor = tiny_random_clipseg(image_size=32)
    collate = RISCollator(processor, maskris=MaskRIS(patch_size=8, text_ratio=0.5))
    rows = [train_row(i) for i in range(8)]
    runs = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(rows, batch_size=2, collate_fn=collate, num_workers=workers)
        runs.append([(b["masked_pixels"], b["input_ids_masked"]) for b in loader])
    for (p0, t0), (p1, t1) in zip(*runs):
        assert torch.equal(p0, p1) and torch.equal(t0, t1)


# ---------------------------------------------------------------- Trainer


def train_dcl(tmp_path, maskris, **overrides):
    model, processor = tiny_random_clipseg(image_size=32, seed=0)
    forwards = []
    model.register_forward_hook(lambda module, inputs, output: forwards.append(1))
    training_args = args(tmp_path, remove_unused_columns=False, **overrides)
    trainer = RISTrainer(model=model, args=training_args, processing_class=processor,
                         train_dataset=raw_train_dataset(8), maskris=maskris)  # fmt: skip
    trainer.train()
    return trainer, model, len(forwards)


def test_trainer_runs_two_passes_and_logs_both_terms(tmp_path):
    maskris = MaskRIS(patch_size=8)
    trainer, _, forwards = train_dcl(tmp_path, maskris, max_steps=3, logging_steps=1, learning_rate=1e-2)
    assert forwards == 2 * 3
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for entry in logs:
        assert entry["loss"] == pytest.approx(0.5 * entry["loss_clean"] + 0.5 * entry["loss_masked"], rel=1e-5)
    assert maskris.epoch == 1  # 8 rows, batch 4: the third step starts epoch 1


def test_per_pass_and_combined_backward_give_the_same_update(tmp_path):
    params = []
    for backward in ("per_pass", "combined"):
        _, model, _ = train_dcl(
            tmp_path, MaskRIS(patch_size=8, backward=backward), max_steps=2, learning_rate=1.0, optim="sgd",
            max_grad_norm=0.0, gradient_accumulation_steps=2, per_device_train_batch_size=2,
        )  # fmt: skip
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    before = torch.cat([p.detach().flatten() for p in tiny_random_clipseg(image_size=32, seed=0)[0].parameters()])
    assert not torch.allclose(params[0], before)
    torch.testing.assert_close(params[0], params[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backward", ["per_pass", "combined"])
def test_gradient_accumulation_matches_one_big_batch_with_dcl(tmp_path, backward):
    """Masking off (ratios 0) so that both batchings see the same views: 2 x 2 must update like 1 x 4."""
    params = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        maskris = MaskRIS(image_ratio=0.0, text_ratio=0.0, clean_weight=0.3, backward=backward)
        _, model, forwards = train_dcl(
            tmp_path, maskris, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
            max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
        )  # fmt: skip
        assert forwards == 2 * accumulation
        params.append(torch.cat([p.detach().flatten() for p in model.decoder.parameters()]))
    torch.testing.assert_close(params[1], params[0], rtol=1e-4, atol=1e-6)


def test_trainer_refuses_a_collator_with_another_maskris(tmp_path):
    model, processor = tiny_random_clipseg(image_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(ValueError, match="same MaskRIS"):
            RISTrainer(model=model, args=args(tmp_path), data_collator=RISCollator(processor, maskris=MaskRIS()),
                       maskris=MaskRIS())  # fmt: skip
        with pytest.raises(ValueError, match="no maskris"):
            RISTrainer(model=model, args=args(tmp_path), data_collator=RISCollator(processor, maskris=MaskRIS()))
        with pytest.raises(ValueError, match="same MaskRIS"):
            RISTrainer(model=model, args=args(tmp_path), data_collator=RISCollator(processor), maskris=MaskRIS())
        plain = RISCollator(processor)  # any other collate_fn: the Trainer cannot see what it adds
        trainer = RISTrainer(model=model, args=args(tmp_path), data_collator=lambda rows: plain(rows),
                             maskris=MaskRIS(), train_dataset=raw_train_dataset(4))  # fmt: skip
    with pytest.raises(KeyError, match="maskris=MaskRIS"):
        trainer.compute_loss(model.train(), next(iter(trainer.get_train_dataloader())))


@pytest.mark.slow
def test_example_trains_clipseg_on_nemo_mosaics_with_maskris(tmp_path):
    """NeMo mosaics -> collator with MaskRIS -> DCL training, through examples/train_clipseg.py --maskris."""
    metrics, logs, _ = run_example(tmp_path, "--maskris")
    assert 0.0 <= metrics["eval_oIoU"] <= 1.0 and metrics["eval_n_expressions"] > 0
    assert len(logs) == 6 and all({"loss_clean", "loss_masked"} <= entry.keys() for entry in logs)
    assert logs[-1]["loss"] < 0.5 * logs[0]["loss"]
    assert logs[-1]["loss_clean"] < 0.5 * logs[0]["loss_clean"]


def test_mean_loss_is_not_scaled_by_the_number_of_processes(tmp_path, monkeypatch):
    """CLIPSeg's forward takes **kwargs; the Trainer must still not treat its mean loss as a sum over
    num_items_in_batch and multiply it by the processes (average_tokens_across_devices is on by default)."""
    from accelerate import Accelerator

    model, processor = tiny_random_clipseg(image_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer = RISTrainer(model=model, args=args(tmp_path), processing_class=processor)
    batch = RISCollator(processor)([train_row(i) for i in range(2)])
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    loss = trainer.compute_loss(model.train(), batch, num_items_in_batch=torch.tensor(2 * 32 * 32))
    torch.testing.assert_close(loss, model(**batch).loss)
