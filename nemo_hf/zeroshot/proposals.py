"""Mask proposals for an image: its own COCO instances (an oracle) or SAM's automatic masks.

Every proposer has a ``name`` that goes into the predictions' provenance and every report; the
``instances`` proposer says it is an oracle (an upper bound: the true object is always among the
proposals, with its exact mask).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..masks import decode_rle
from ..mining.identity import ModelIdentity, checkpoint_identity, module_identity
from .loading import load_pretrained

MIN_PROPOSAL_AREA = 2000  # TAS: masks under 2,000 px are dropped
OVERLAP_OF_SMALLER = 0.4  # TAS: of two masks overlapping by more than this share of the smaller, keep the larger


def tas_filter(masks: np.ndarray) -> np.ndarray:
    """Indices of the masks TAS keeps: at least 2,000 px, and for every pair whose intersection is more than
    0.4 of the smaller mask's area, only the larger (equal areas: the lower index). Pairs are judged on the
    masks that passed the area test, each pair on its own (a mask dropped by one pair still drops others).
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (n, H, W), got shape {masks.shape}")
    flat = masks.reshape(masks.shape[0], masks.shape[1] * masks.shape[2]).astype(np.float32)
    areas = flat.sum(axis=1)
    big = np.flatnonzero(areas >= MIN_PROPOSAL_AREA)
    if big.size < 2:
        return big
    inter = flat[big] @ flat[big].T
    smaller = np.minimum(areas[big][:, None], areas[big][None, :])
    overlapping = inter > OVERLAP_OF_SMALLER * smaller
    np.fill_diagonal(overlapping, False)
    # i loses to j when they overlap and j is larger (or as large and earlier)
    a = areas[big]
    beats = (a[None, :] > a[:, None]) | ((a[None, :] == a[:, None]) & (big[None, :] < big[:, None]))
    dropped = (overlapping & beats).any(axis=1)
    return big[~dropped]


class InstanceProposals:
    """The image's own COCO instances (the ``objects`` column): an ORACLE, an upper bound on any proposer."""

    name = "instances"
    label = "instances (ORACLE: the image's own ground-truth instance masks)"
    oracle = True
    reads_objects = True

    def __repr__(self) -> str:
        return "InstanceProposals()"

    def cache_key(self) -> dict:
        return {"proposer": repr(self)}

    def __call__(self, image: np.ndarray, objects: Sequence[dict], where: str) -> np.ndarray:
        """(n, H, W) bool, one mask per non-empty instance, at the image's size."""
        h, w = image.shape[:2]
        masks = []
        for obj in objects or ():
            rle = obj["mask"]
            if [int(v) for v in rle["size"]] != [h, w]:
                raise ValueError(f"{where}: object {obj.get('ann_id')} has a mask of size {rle['size']}, image {h}x{w}")
            mask = decode_rle(rle).astype(bool)
            if mask.any():
                masks.append(mask)
        return np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool)


def _point_grid(per_side: int) -> np.ndarray:
    """SAM's grid: ``per_side``**2 points (x, y) in [0, 1], cell centres, x fastest."""
    centres = (np.arange(per_side) + 0.5) / per_side
    xs, ys = np.meshgrid(centres, centres)
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def _box_nms(masks: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression on the masks' boxes (best score first)."""
    boxes = []
    for mask in masks:
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        boxes.append((cols[0], rows[0], cols[-1], rows[-1]) if rows.size else (0, 0, -1, -1))
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    area = (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)
    keep: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        if keep:
            k = np.asarray(keep)
            w = (np.minimum(boxes[k, 2], boxes[i, 2]) - np.maximum(boxes[k, 0], boxes[i, 0])).clip(0)
            h = (np.minimum(boxes[k, 3], boxes[i, 3]) - np.maximum(boxes[k, 1], boxes[i, 1])).clip(0)
            union = area[k] + area[i] - w * h
            if (np.where(union > 0, w * h / np.where(union > 0, union, 1), 0) > iou_threshold).any():
                continue
        keep.append(int(i))
    return np.asarray(keep, dtype=np.intp)


def remove_small_regions(mask: np.ndarray, min_area: int) -> np.ndarray:
    """SAM's ``min_mask_region_area``: fill holes, then drop islands, smaller than ``min_area`` px
    (8-connectivity as OpenCV's ``connectedComponentsWithStats`` in SAM; the largest island always stays)."""
    from scipy import ndimage

    eight = np.ones((3, 3), dtype=bool)
    out = mask.copy()
    for fill_holes in (True, False):
        labels, n = ndimage.label(~out if fill_holes else out, structure=eight)
        if n == 0:
            continue
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        small = np.flatnonzero(sizes < min_area) + 1
        if fill_holes:
            out[np.isin(labels, small)] = True
        else:
            if small.size == n:  # keep the largest
                small = small[small != np.argmax(sizes) + 1]
            out[np.isin(labels, small)] = False
    return out


class SamProposals:
    """SAM's automatic masks with TAS's settings, through a ``transformers`` ``SamModel``, then `tas_filter`.

    A grid of ``points_per_side``**2 single-point prompts, three masks each; kept when the predicted IoU
    exceeds ``pred_iou_thresh`` and the stability score (IoU of the mask thresholded at +1 and -1) reaches
    ``stability_score_thresh``; box NMS at 0.7; small holes and islands (``min_mask_region_area``) removed,
    then NMS again preferring untouched masks, as SAM's generator does. (The ``mask-generation``
    pipeline needs torchvision for its NMS; this does not.)
    """

    oracle = False
    reads_objects = False

    def __init__(
        self,
        model,
        image_processor,
        name: str,
        *,
        points_per_side: int = 8,
        pred_iou_thresh: float = 0.7,
        stability_score_thresh: float = 0.7,
        min_mask_region_area: int = 800,
        box_nms_thresh: float = 0.7,
        points_per_batch: int = 64,
        device=None,
        identity: ModelIdentity | None = None,
    ):
        if min_mask_region_area > 0:
            try:
                import scipy.ndimage  # noqa: F401
            except ImportError as err:
                raise OSError("SAM proposals remove small regions with scipy: pip install scipy (or nemo-hf[zeroshot])") from err
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.model = model.to(self.device, self.dtype).eval()
        self.identity = identity or module_identity(model, name)  # a checkpoint rewritten at the same path is another
        self.image_processor = image_processor
        self.name = f"sam:{name}"
        self.label = f"SAM automatic masks ({name}; TAS settings and filter)"
        self.points_per_side, self.points_per_batch = int(points_per_side), int(points_per_batch)
        self.pred_iou_thresh, self.stability_score_thresh = float(pred_iou_thresh), float(stability_score_thresh)
        self.min_mask_region_area, self.box_nms_thresh = int(min_mask_region_area), float(box_nms_thresh)

    def __repr__(self) -> str:
        return (
            f"SamProposals({self.name!r}, points_per_side={self.points_per_side}, pred_iou_thresh={self.pred_iou_thresh}, "
            f"stability_score_thresh={self.stability_score_thresh}, min_mask_region_area={self.min_mask_region_area}, "
            f"box_nms_thresh={self.box_nms_thresh})"
        )

    @classmethod
    def from_pretrained(cls, model_id_or_path: str, **kwargs) -> SamProposals:
        from transformers import AutoImageProcessor, SamModel

        name, (model, image_processor) = load_pretrained(
            f"SAM for --proposals sam:{model_id_or_path}", model_id_or_path,
            SamModel.from_pretrained, AutoImageProcessor.from_pretrained,
        )  # fmt: skip
        return cls(model, image_processor, name, identity=checkpoint_identity(name), **kwargs)

    def cache_key(self) -> dict:
        """What its masks depend on: the settings (repr), the weights (not only the name), the dtype."""
        return {"proposer": repr(self), "model": self.identity.as_dict(), "dtype": str(self.dtype)}

    def __call__(self, image: np.ndarray, objects: Sequence[dict], where: str) -> np.ndarray:
        h, w = image.shape[:2]
        inputs = self.image_processor(images=Image.fromarray(image), return_tensors="pt")
        reshaped = inputs["reshaped_input_sizes"]
        rh, rw = (int(v) for v in reshaped[0])
        points = _point_grid(self.points_per_side) * np.array([rw, rh], dtype=np.float64)
        masks, scores = [], []
        with torch.inference_mode():
            embeddings = self.model.get_image_embeddings(inputs["pixel_values"].to(self.device, self.dtype))
            for start in range(0, len(points), self.points_per_batch):
                batch = torch.as_tensor(points[start : start + self.points_per_batch], dtype=self.dtype)
                out = self.model(
                    image_embeddings=embeddings,
                    input_points=batch[None, :, None, :].to(self.device),
                    input_labels=torch.ones(1, len(batch), 1, dtype=torch.long, device=self.device),
                    multimask_output=True,
                )
                iou = out.iou_scores[0].flatten().float()
                logits = out.pred_masks[0].flatten(0, 1)[iou > self.pred_iou_thresh]
                if not len(logits):
                    continue
                logits = self.image_processor.post_process_masks(
                    [logits[:, None].float().cpu()], inputs["original_sizes"], reshaped, binarize=False
                )[0][:, 0]
                stability = (logits > 1.0).flatten(1).sum(1) / (logits > -1.0).flatten(1).sum(1).clamp(min=1)
                keep = stability >= self.stability_score_thresh
                masks.append((logits[keep] > 0).numpy())
                scores.append(iou[iou > self.pred_iou_thresh][keep].cpu().numpy())
        if not masks:
            return np.zeros((0, h, w), dtype=bool)
        masks, scores = np.concatenate(masks), np.concatenate(scores)
        keep = _box_nms(masks, scores, self.box_nms_thresh)
        masks = masks[keep]
        if self.min_mask_region_area > 0 and len(masks):
            cleaned = np.stack([remove_small_regions(m, self.min_mask_region_area) for m in masks])
            untouched = (cleaned == masks).reshape(len(masks), -1).all(1).astype(np.float64)
            masks = cleaned[_box_nms(cleaned, untouched, self.box_nms_thresh)]
        masks = masks[masks.reshape(len(masks), -1).any(1)]
        return masks[tas_filter(masks)] if len(masks) else masks
