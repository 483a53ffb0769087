"""`datasets` builder for RefCOCO, RefCOCO+ and RefCOCOg with NeMo hard-negative pools.

Configs: one per refer annotation set (``refcoco_unc``, ``refcocoplus_unc``, ``refcocog_umd``,
``refcocog_google``, ``refcoco_google``), one row per referred object, plus ``images`` (one row per
image, encoded bytes, shared by every refs config). The source is a folder in the original refer
toolkit's layout, given as the ``source`` config field (``data_dir`` works too): a config field, so a
cache hit never lists the source's files.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import datasets

from nemo_hf import __version__, progress
from nemo_hf.schema import DEFAULT_CONFIG, IMAGES_CONFIG, IMAGES_FEATURES, REFS_CONFIGS, REFS_FEATURES, TRAIN_SPLIT
from nemo_hf.source import refer
from nemo_hf.source.reader import open_source
from nemo_hf.source.refer import ReferFormatError

DEMO_MODEL = "demo-random"  # a randomly initialised CLIP: for the offline demo only, its negatives mean nothing
_DESCRIPTION = "RefCOCO / RefCOCO+ / RefCOCOg referring segmentation with NeMo hard-negative pools (nemo_hf)."


@dataclass
class NemoRefcocoConfig(datasets.BuilderConfig):
    """Where the refer files are, and how negatives are mined.

    Args:
        source: root of the refer layout (``<source>/<dataset>/refs(<split_by>).p`` ...).
        image_dir: COCO train2014 folder, default ``<source>/images/mscoco/images/train2014``.
        refs_configs: for ``images``: comma-separated refs configs whose images it holds (default: all present).
        mine: compute the negative columns for the train split (False leaves them empty).
        model, model_revision, tau, top_k, mode, index: the mining settings (see ``nemo_hf.mining.negatives.MiningParams``).
        embed_cache_dir: where embeddings are cached between runs (default under the HF datasets cache).
        embed_batch_size: images or sentences per model forward.
        skip_broken_eval_images: build without the val/test refs whose image cannot be used (missing, or
            not decodable by PIL) instead of stopping; ``skipped`` lists them.
        ``model="demo-random"`` mines with a randomly initialised CLIP: for the offline demo only.
    """

    source: str | None = None
    image_dir: str | None = None
    refs_configs: str | None = None
    mine: bool = True
    model: str = "openai/clip-vit-base-patch32"
    model_revision: str | None = None
    tau: str | float = "p99"
    top_k: int = 20
    mode: str = "i2i"
    index: str = "flat"
    embed_cache_dir: str | None = None
    embed_batch_size: int = 64
    skip_broken_eval_images: bool = False

    @property
    def source_root(self) -> str:
        root = self.source or self.data_dir
        if not root:
            example = f'load_dataset("nemo_refcoco", "{self.name}", source="/path/to/refer")'
            raise ReferFormatError(
                f"no source given for nemo_refcoco/{self.name}: pass the folder that holds refcoco/, refcoco+/, "
                f"refcocog/ and images/ (the refer toolkit's layout), e.g. {example}"
            )
        return root

    def create_config_id(self, config_kwargs: dict, custom_features=None) -> str:
        # The annotation files' size, mtime and ctime join the cache key (a few stat calls, no listing),
        # so a changed source is rebuilt while a cache hit stays instant. The images config stores the
        # image files' bytes, so its key also covers every file of the image folder (a listing).
        config_kwargs = dict(config_kwargs)
        root = self.source or self.data_dir
        if root:
            cfgs = [REFS_CONFIGS[self.name]] if self.name in REFS_CONFIGS else REFS_CONFIGS.values()
            paths = [p for cfg in cfgs for p in (refer.refs_path(root, cfg), refer.instances_path(root, cfg))]
            config_kwargs["source_stamp"] = ",".join(
                f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}" for st in (p.stat() for p in paths if p.is_file())
            )
            if self.name == IMAGES_CONFIG:
                config_kwargs["images_stamp"] = _folder_stamp(Path(self.image_dir or refer.default_image_dir(root)))
        if self.mine and self.name in REFS_CONFIGS:
            config_kwargs["model_stamp"] = _model_stamp(self.model, self.model_revision)
        config_kwargs["nemo_hf_version"] = __version__
        return super().create_config_id(config_kwargs, custom_features=custom_features)


def _folder_stamp(folder: Path) -> str:
    """A digest of each file in ``folder`` by name, size, modification and change time: a file replaced
    (even by one of the same size with its mtime put back: the change time moves), added or removed
    changes it, without reading any file."""
    digest = hashlib.sha256()
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError as err:
        return f"unreadable ({err.strerror})"  # building will name the folder
    for entry in entries:
        try:
            st = entry.stat()
        except OSError:
            continue  # a dangling link: the build names the image that needs it
        digest.update(f"{entry.name}\0{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}\n".encode(errors="surrogateescape"))
    return digest.hexdigest()


def _model_stamp(model: str, revision: str | None) -> str:
    """Cheap evidence of which weights ``model`` names now: size, mtime and ctime of a local checkpoint's files,
    or the commit the HF cache resolves a hub id to. New weights under the same name are a new cache entry."""
    path = Path(model).expanduser()
    if path.is_dir():
        return ",".join(f"{f.name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
                        for f in sorted(path.iterdir()) if f.is_file() for st in (f.stat(),))
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(model, "config.json", revision=revision)
    except ValueError:  # not a valid repo id either: loading the model will say so, clearly
        cached = None
    return Path(cached).parent.name if isinstance(cached, str) else str(revision)


class NemoRefcoco(datasets.GeneratorBasedBuilder):
    BUILDER_CONFIG_CLASS = NemoRefcocoConfig
    BUILDER_CONFIGS = [NemoRefcocoConfig(name=name) for name in (*REFS_CONFIGS, IMAGES_CONFIG)]
    DEFAULT_CONFIG_NAME = DEFAULT_CONFIG
    DEFAULT_WRITER_BATCH_SIZE = 256  # image rows carry ~100 KB of JPEG each

    def _info(self):
        features = IMAGES_FEATURES if self.config.name == IMAGES_CONFIG else REFS_FEATURES
        return datasets.DatasetInfo(description=_DESCRIPTION, features=features)

    def _split_generators(self, dl_manager):
        source = open_source(self.config.source_root, self.config.image_dir)
        source.forget_changed_images()  # a cache miss may follow a replaced image (the cache key covers it)
        if self.config.name == IMAGES_CONFIG:
            return [datasets.SplitGenerator(name=TRAIN_SPLIT, gen_kwargs={"source": source})]
        if not self.config.skip_broken_eval_images:
            source.require_complete_eval([self.config.name])
        rows, self.skipped = source.rows(self.config.name)
        with progress.stage("read", sum(map(len, rows.values()))) as bar:
            bar.update(sum(map(len, rows.values())))
        self.provenance = self.embeddings = None
        if self.config.mine and rows[TRAIN_SPLIT]:
            rows = {**rows, TRAIN_SPLIT: self._mined(source, rows[TRAIN_SPLIT])}
            self.info.description = f"{_DESCRIPTION}\nnemo_hf mining provenance: {json.dumps(self.provenance)}"
        return [datasets.SplitGenerator(name=split, gen_kwargs={"rows": rows[split]}) for split in rows]

    def _mined(self, source, train_rows: list[dict]) -> list[dict]:
        """Copies of the train rows with their negative columns filled (the source's rows stay unmined)."""
        from nemo_hf.folder.embeddings import MiningEmbeddings
        from nemo_hf.mining.refs import mine_refs

        job = self._mining_job(source, train_rows)
        columns, self.provenance = mine_refs(train_rows, **job)
        with progress.stage("select", self.provenance["sentences"]) as bar:
            bar.update(self.provenance["sentences"])
        # The vectors the rule saw (cache hits now), so a folder can show and re-check its negatives.
        embedder, image_files, cache_dir = job["embedder"], job["image_files"], job["cache_dir"]
        sentences = [(s["sent_id"], s["sent"], row["image_id"]) for row in train_rows for s in row["sentences"]]
        self.embeddings = MiningEmbeddings(
            image_ids=list(image_files),
            images=embedder.embed_images(list(image_files.items()), cache_dir=cache_dir),
            sent_ids=[sent_id for sent_id, _, _ in sentences],
            sent_image_ids=[image_id for _, _, image_id in sentences],
            sentences=embedder.embed_texts([(sent_id, text) for sent_id, text, _ in sentences], cache_dir=cache_dir),
        )
        mined = []
        for row in train_rows:
            negatives, scores, fallback = columns[row["ref_id"]]
            mined.append({**row, "negatives": negatives, "negative_scores": scores, "negative_fallback": fallback})
        return mined

    def embed_mining_share(self, ranks) -> dict[str, int]:
        """Under several processes (``nemo_hf.mining.ranks``): this rank's share of the embeddings this
        config's mining needs, into the shared embedding cache. Returns how many of each kind it embedded."""
        from nemo_hf.mining.refs import embed_share

        source = open_source(self.config.source_root, self.config.image_dir)
        train_rows = source.rows(self.config.name)[0][TRAIN_SPLIT]
        if not (self.config.mine and train_rows and self.config.name in REFS_CONFIGS):
            return {}
        job = self._mining_job(source, train_rows)
        del job["params"]
        return embed_share(train_rows, ranks=ranks, **job)

    def _mining_job(self, source, train_rows: list[dict]) -> dict:
        """``mine_refs``'s arguments after the refs: images, pool, embedder, params, cache."""
        from nemo_hf.mining.embed import Embedder, demo_embedder
        from nemo_hf.mining.negatives import MiningParams

        tau = self.config.tau
        params = MiningParams(
            tau=tau if isinstance(tau, float) or str(tau).startswith("p") else float(tau),
            top_k=int(self.config.top_k),
            mode=self.config.mode,
            index=self.config.index,
        )
        batch_size = int(self.config.embed_batch_size)
        if self.config.model == DEMO_MODEL:
            embedder = demo_embedder(batch_size=batch_size)
        else:
            embedder = Embedder.from_pretrained(self.config.model, revision=self.config.model_revision,
                                                batch_size=batch_size)
        images = source.instances(self.config.name).images
        pool = source.training_pool(self.config.name)
        own_and_pool = {row["image_id"] for row in train_rows} | set(pool)
        return {
            "image_files": {i: source.image_path(images[i]["file_name"]) for i in sorted(own_and_pool)},
            # the embedder checks each decoded image against these: a file replaced since it was checked is caught
            "image_sizes": {i: (int(images[i]["width"]), int(images[i]["height"])) for i in own_and_pool},
            "pool_image_ids": pool,
            "embedder": embedder,
            "params": params,
            "cache_dir": self.config.embed_cache_dir
            or os.path.join(datasets.config.HF_DATASETS_CACHE, "nemo_hf_embeddings"),
        }

    def _generate_examples(self, rows=None, source=None):
        if source is None:
            with progress.stage("write", len(rows)) as bar:
                for row in rows:
                    yield row["ref_id"], row
                    bar.update()
            return
        yield from self._image_examples(source)

    def _image_examples(self, source):
        configs = (
            [c.strip() for c in self.config.refs_configs.split(",") if c.strip()]
            if self.config.refs_configs
            else source.present_configs
        )
        if not configs:
            raise ReferFormatError(f"{source.root}: no refs files found, so there are no images to build")
        declared = source.declared_images(configs)  # one size per image across the configs, or an error
        images: dict[int, dict] = {}
        holders: dict[int, dict[Path, refer.Instances]] = {}  # the instances files that hold each image
        for config in configs:
            instances = source.instances(config)
            for split_rows in source.rows(config)[0].values():
                for row in split_rows:
                    images.setdefault(row["image_id"], declared[row["image_id"]])
                    holders.setdefault(row["image_id"], {}).setdefault(instances.path, instances)
        # what the build reports about the stored images (nemo_hf.json "images", the card)
        self.image_notes = notes = {"decoded_with_warnings": [], "orientation_neutralised": []}
        pools = {config: set(source.training_pool(config)) for config in configs}
        bar = progress.stage("write", len(images))
        for image_id in sorted(images):
            image = images[image_id]
            data, orientation = source.image_bytes(image)
            warning = source.image_warning(image)
            if warning:
                notes["decoded_with_warnings"].append({"image_id": image_id, "file_name": image["file_name"], "warning": warning})
            if orientation is not None:
                notes["orientation_neutralised"].append({"image_id": image_id, "file_name": image["file_name"], "orientation": orientation})
            bar.update()
            yield image_id, {
                "image_id": image_id,
                "file_name": image["file_name"],
                "width": int(image["width"]),
                "height": int(image["height"]),
                "license": int(image.get("license", 0)),
                "image": {"bytes": data, "path": image["file_name"]},
                "negative_pool_of": [c for c in configs if image_id in pools[c]],
                "objects": refer.image_objects(list(holders[image_id].values()), image_id),
            }
        bar.close()

