"""Per-row transforms for ``set_transform``, in the manner of torchvision's transforms v2.

Modules: `mosaic` (`NeMoMosaic`, `EvalTransform`: render a row's tiles), `sampling` (which mode, cell and
tiles a mosaic shows, drawn from a seeded generator), `images` (decoding the images table), `geometry` (one
`Placement` for a tile's pixels, mask and box), `maskris` (MaskRIS's patch and token masking of a batch).
"""

from ..lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        ".mosaic": ["NeMoMosaic", "EvalTransform", "MosaicEpochCallback", "explode_sentences"],
        ".images": ["ImageTable"],
        ".geometry": ["Placement", "grid_cells", "prediction_to_original"],
        ".maskris": ["MaskRIS", "mask_image_patches", "mask_text_tokens"],
    },
)
