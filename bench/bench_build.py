"""Build a RefCOCO-scale synthetic source into a hub-ready folder (no mining), and time a cache hit of
``load_dataset("nemo_refcoco", ...)`` against the file listing `datasets` would do for ``data_dir``.

    python bench/bench_build.py --images 20000 --work /tmp/nemo_bench
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--work", default="/tmp/nemo_hf_bench_build")
    parser.add_argument("--configs", nargs="+", default=["refcoco_unc"])
    parser.add_argument("--keep-source", action="store_true", help="reuse a source generated earlier")
    args = parser.parse_args()

    import datasets
    from datasets.data_files import get_data_patterns

    import nemo_hf
    from nemo_hf.folder import build_folder
    from nemo_hf.source.synthetic import make_refer_source

    work = Path(args.work)
    source = work / "source"
    if not (args.keep_source and source.exists()):
        shutil.rmtree(source, ignore_errors=True)
        t = time.perf_counter()
        make_refer_source(source, n_images=args.images, seed=0, workers=os.cpu_count() or 1, progress=True)
        print(f"synthetic source: {args.images} images in {time.perf_counter() - t:.1f} s, {folder_size(source) / 1e9:.2f} GB")

    t = time.perf_counter()
    out = build_folder(source, work / "folder", args.configs, mining=None)
    build_s = time.perf_counter() - t
    report = nemo_hf.folder.build.BuildReport.read(out)
    for name, entry in report.configs.items():
        print(name, {s: (v["rows"], v.get("sentences")) for s, v in entry["splits"].items()})
    print(f"build ({', '.join(args.configs)} + images, no mining): {build_s:.1f} s, folder {folder_size(out) / 1e9:.2f} GB")

    cache = work / "hf_cache"
    shutil.rmtree(cache, ignore_errors=True)
    kw = dict(source=str(source), mine=False, cache_dir=str(cache))
    t = time.perf_counter()
    datasets.load_dataset("nemo_refcoco", args.configs[0], **kw)
    print(f"load_dataset('nemo_refcoco', {args.configs[0]!r}) first call (builds the cache): {time.perf_counter() - t:.1f} s")
    hits = []
    for _ in range(3):
        t = time.perf_counter()
        datasets.load_dataset("nemo_refcoco", args.configs[0], **kw)
        hits.append(time.perf_counter() - t)
    t = time.perf_counter()
    get_data_patterns(str(source))
    listing = time.perf_counter() - t
    print(f"cache hit: {min(hits):.3f} s (best of 3); listing data_dir as a packaged builder would: {listing:.2f} s")


if __name__ == "__main__":
    main()
