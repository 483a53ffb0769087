"""The refer source: the refer toolkit's ``refs(<split_by>).p`` + ``instances.json`` over COCO images.

Modules: `refer` (reading the two files safely: no pickle code runs, every id and size checked),
`reader` (`ReferSource`: a source folder's configs, image checks and the negative pool, shared by all
configs), `images` (an image is kept iff PIL decodes it; orientation tags neutralised losslessly),
`synthetic` (`make_refer_source`: a synthetic source in the exact layout).
"""

from ..lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        ".refer": ["ReferFormatError", "load_refs", "load_instances"],
        ".reader": ["ReferSource", "open_source", "IncompleteEvalError"],
        ".synthetic": ["make_refer_source"],
    },
)
