"""DCL against the official MaskRIS recipe (naver-ai/maskris), transcribed here from its files:

- ``criterion.py:5-23`` ``SegCELoss``: ``nn.CrossEntropyLoss(weight=[0.9, 1.1])`` (line 8-9); logits upsampled
  to the target's size, bilinear with ``align_corners=True``, only when the sizes differ (lines 17-19).
- ``training.py:40-51``: pass 1 ``0.5 * loss(clean logits, mask)`` backward; pass 2 ``0.5 * loss(masked
  logits, softmax(clean logits.detach()))`` (line 48: the target at the decoder's own resolution); one step.
- ``model/models/maskris.py:112-117``: in training the model returns the decoder's logits unresized.

The transcription runs on CPU (the official weight tensor is ``.cuda()``).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nemo_hf.training import dcl_loss, dcl_terms, dcl_two_pass
from nemo_hf.transforms.maskris import MaskRIS


def official_criterion(pred, target):
    """criterion.py:5-23, SegCELoss.forward."""
    if pred.shape[-2:] != target.shape[-2:]:
        pred = F.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=True)
    return nn.CrossEntropyLoss(weight=torch.tensor([0.9, 1.1], dtype=pred.dtype))(pred, target)


def official_loss(clean, masked, mask):
    """training.py:42-50: both halves of the step's loss (the official code backpropagates each alone)."""
    return 0.5 * official_criterion(clean, mask) + 0.5 * official_criterion(masked, F.softmax(clean.detach(), dim=1))


def test_official_rule_on_hand_computed_values():
    """One decoder pixel (logits (0, ln 3): softmax (1/4, 3/4)) over two label pixels, background then
    foreground; the masked view's logits (0, 0). Clean: the weighted mean over the labels' pixels;
    masked: torch's probability-target mean, over the one decoder pixel, not divided by the weights."""
    clean = torch.tensor([0.0, math.log(3)], dtype=torch.float64).view(1, 2, 1, 1)
    masked = torch.zeros(1, 2, 1, 1, dtype=torch.float64)
    labels = torch.tensor([[[0, 1]]])
    clean_term, masked_term = dcl_terms(clean, masked, labels)
    expected_clean = (0.9 * math.log(4) + 1.1 * math.log(4 / 3)) / (0.9 + 1.1)
    expected_masked = (0.9 * 0.25 + 1.1 * 0.75) * math.log(2)
    assert clean_term.item() == pytest.approx(expected_clean, rel=1e-12)
    assert masked_term.item() == pytest.approx(expected_masked, rel=1e-12)
    assert dcl_loss(clean, masked, labels).item() == pytest.approx(0.5 * expected_clean + 0.5 * expected_masked)
    # binary logits z are the two-class logits (0, z): the same numbers
    assert dcl_loss(clean[:, 1], masked[:, 1], labels.double()).item() == pytest.approx(
        0.5 * expected_clean + 0.5 * expected_masked
    )


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_dcl_loss_matches_official_criterion_at_a_quarter_of_the_labels_size(binary, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (3, 1, 6, 8) if binary else (3, 2, 6, 8)
    clean = torch.randn(shape, generator=gen, requires_grad=True)
    masked = torch.randn(shape, generator=gen, requires_grad=True)
    labels = (torch.rand(3, 24, 32, generator=gen) < 0.3).long()

    ours = dcl_loss(clean, masked, labels)
    ours.backward()
    ours_grads = clean.grad.clone(), masked.grad.clone()
    clean.grad = masked.grad = None

    def two_class(z):
        return torch.cat([torch.zeros_like(z), z], dim=1) if binary else z

    official = official_loss(two_class(clean), two_class(masked), labels)
    official.backward()
    torch.testing.assert_close(ours, official)
    torch.testing.assert_close(ours_grads[0], clean.grad)
    torch.testing.assert_close(ours_grads[1], masked.grad)
    # and the rule differs from distilling at the labels' size: the switch changes the masked term
    assert not torch.allclose(dcl_loss(clean, masked, labels, distil_at="labels"), official)


class QuarterResolutionModel(nn.Module):
    """Logits at a quarter of the pixels' size from image and text, as a decoder of LAVT/CARIS gives."""

    def __init__(self, classes: int):
        super().__init__()
        self.image = nn.Conv2d(3, classes, kernel_size=4, stride=4)
        self.text = nn.Embedding(50, classes)

    def forward(self, pixel_values, input_ids, attention_mask):
        text = (self.text(input_ids) * attention_mask[..., None]).mean(dim=1)
        return {"logits": self.image(pixel_values) + text[..., None, None]}


@pytest.mark.parametrize("classes", [1, 2])
def test_dcl_two_pass_gives_the_official_loops_parameter_gradients(classes):
    torch.manual_seed(classes)
    model = QuarterResolutionModel(classes)
    gen = torch.Generator().manual_seed(7)
    batch = {
        "pixel_values": torch.randn(2, 3, 16, 16, generator=gen),
        "input_ids": torch.randint(50, (2, 5), generator=gen),
        "attention_mask": torch.ones(2, 5, dtype=torch.long),
        "labels": (torch.rand(2, 16, 16, generator=gen) < 0.4).float(),
        "masked_pixels": torch.rand(2, 16, 16, generator=gen) < 0.75,
        "input_ids_masked": torch.randint(50, (2, 5), generator=gen),
    }
    loss, clean, masked = dcl_two_pass(model, batch, backward_clean=torch.Tensor.backward, **MaskRIS().dcl_options())
    loss.backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    def logits(pixels, ids):  # binary logits as the two-class (0, z) the official criterion needs
        z = model(pixels, ids, batch["attention_mask"])["logits"]
        return torch.cat([torch.zeros_like(z), z], dim=1) if classes == 1 else z

    mask = batch["labels"].long()
    clean_logits = logits(batch["pixel_values"], batch["input_ids"])  # training.py:42
    official_clean = official_criterion(clean_logits, mask)
    (0.5 * official_clean).backward()  # training.py:43
    image_masked = batch["pixel_values"].masked_fill(batch["masked_pixels"][:, None], 0)
    target = F.softmax(clean_logits.detach(), dim=1)  # training.py:48
    official_masked = official_criterion(logits(image_masked, batch["input_ids_masked"]), target)
    (0.5 * official_masked).backward()  # training.py:50
    torch.testing.assert_close(clean, official_clean.detach())
    torch.testing.assert_close(masked, official_masked.detach())
    for got, expected in zip(ours, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(got, expected)
