"""Makes ``datasets.load_dataset("nemo_refcoco", ...)`` resolve to the nemo_hf builder.

`datasets` 4.0 removed loading scripts, and a packaged-module name makes `datasets` list every file under
``data_dir`` on each call (seconds for COCO-sized folders). nemo_hf instead answers the name
``nemo_refcoco`` in `datasets.load.dataset_module_factory` with its own builder module, without listing
anything: the source root is a config field (``source=``; ``data_dir=`` is accepted as the same thing), so
a cache hit costs two ``stat`` calls. This leans on `datasets` internals; if they move, the error says
so and names the supported path that needs none of them.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import inspect
import os

DATASET_NAME = "nemo_refcoco"
BUILDER_MODULE = "nemo_hf_builders.nemo_refcoco"
FALLBACK = (
    "use the supported path instead: `nemo-hf build --source ROOT --out DIR` (or nemo_hf.build_folder) "
    "and then `datasets.load_dataset(DIR, config)`"
)


class UnsupportedDatasetsVersion(RuntimeError):
    pass


def _builder_hash() -> str:
    """Changes whenever the builder's code does, so its cache entries do too."""
    from nemo_hf_builders import nemo_refcoco

    return hashlib.sha256(inspect.getsource(nemo_refcoco).encode()).hexdigest()[:16]


def register() -> None:
    """Install the ``nemo_refcoco`` name into `datasets`. Idempotent."""
    import datasets
    import datasets.load as load

    original = getattr(load, "dataset_module_factory", None)
    if getattr(original, "nemo_hf_original", None) is not None:
        return
    module_type = getattr(load, "DatasetModule", None)
    if original is None or module_type is None or "path" not in inspect.signature(original).parameters:
        raise UnsupportedDatasetsVersion(
            f"datasets {datasets.__version__} no longer has the internals nemo_hf uses to serve "
            f'load_dataset("{DATASET_NAME}"); {FALLBACK}'
        )

    def dataset_module_factory(path, *args, **kwargs):
        if path == DATASET_NAME:
            return module_type(BUILDER_MODULE, _builder_hash(), {"dataset_name": DATASET_NAME})
        return original(path, *args, **kwargs)

    dataset_module_factory.nemo_hf_original = original
    load.dataset_module_factory = dataset_module_factory
    atexit.register(close_suspended_readers)


def close_suspended_readers() -> None:
    """At exit, close `datasets`' file readers that a streamed iteration left suspended (an iterator kept
    in a global): closed later, during the interpreter's teardown, their ``except pa.ArrowInvalid`` meets a
    module already emptied and prints ``Exception ignored in: <generator ... Parquet._generate_tables>``."""
    import gc
    import sys
    import types

    datasets = sys.modules.get("datasets")
    if datasets is None or "datasets.packaged_modules.parquet.parquet" not in sys.modules:
        return
    package = os.path.dirname(datasets.__file__)
    for obj in gc.get_objects():
        if type(obj) is types.GeneratorType and obj.gi_frame is not None and (  # type(): no __class__ lookups
            obj.gi_code.co_filename.startswith(package)
        ):
            with contextlib.suppress(Exception):
                obj.close()
