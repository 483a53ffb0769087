"""Looking at a built folder: `nemo-hf stats` (tau, negative scores, pool sizes), `nemo-hf show` (one ref
and its negatives) and `nemo-hf preview` (a grid of rendered mosaics); `drawing` holds what their
pictures share.
"""

from ..lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        ".stats": ["folder_stats", "negative_stats", "write_stats"],
        ".show": ["show_ref"],
        ".preview": ["render_preview"],
    },
)
