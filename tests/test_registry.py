"""load_dataset("nemo_refcoco", ...) after `import nemo_hf`: resolution, caching, messages."""

import pickle

import pytest
from datasets import load_dataset

from nemo_hf.source import refer
from nemo_hf import registry


def _cache_entries(cache):
    return sorted(p.name for p in (cache / "nemo_refcoco").iterdir())


def test_load_by_name_and_cache_behaviour(tiny_source, tmp_path):
    cache = tmp_path / "cache"
    kw = dict(source=str(tiny_source), mine=False, cache_dir=str(cache))
    dd = load_dataset("nemo_refcoco", "refcoco_unc", **kw)
    assert {s: len(d) for s, d in dd.items()} == {"train": 2, "val": 1, "testA": 1, "testB": 1}
    first = _cache_entries(cache)

    # a second call is a cache hit: it does not read the source at all (its images are gone now)
    images = tiny_source / "images"
    images.rename(tmp_path / "hidden")
    again = load_dataset("nemo_refcoco", "refcoco_unc", **kw)
    assert again["train"]["ref_id"] == dd["train"]["ref_id"] and _cache_entries(cache) == first
    # data_dir= is the same source, spelled the datasets way
    (tmp_path / "hidden").rename(images)
    load_dataset("nemo_refcoco", "refcoco_unc", data_dir=str(tiny_source), mine=False, cache_dir=str(cache))

    # a changed mining setting is a different cache entry
    before = _cache_entries(cache)
    load_dataset("nemo_refcoco", "refcoco_unc", top_k=7, **kw)
    assert len(_cache_entries(cache)) == len(before) + 1 and set(before) < set(_cache_entries(cache))

    # a changed refs file is rebuilt, not served stale
    refs = refer.load_refs(tiny_source / "refcoco/refs(unc).p")
    refs[0]["sentences"][0]["sent"] = "the changed cup"
    (tiny_source / "refcoco/refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    changed = load_dataset("nemo_refcoco", "refcoco_unc", split="train", **kw)
    assert changed[0]["sentences"][0]["sent"] == "the changed cup"


def test_images_config_and_no_source_message(tiny_source, tmp_path):
    images = load_dataset("nemo_refcoco", "images", split="train", source=str(tiny_source), cache_dir=str(tmp_path / "c"))
    assert images["image_id"] == [11, 12, 13, 14]
    assert images["negative_pool_of"] == [["refcoco_unc"], [], [], []]
    with pytest.raises(refer.ReferFormatError, match='no source given for nemo_refcoco/refcoco_unc.*source="/path/to/refer"'):
        load_dataset("nemo_refcoco", "refcoco_unc", cache_dir=str(tmp_path / "c"))


def test_other_names_still_reach_datasets(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d/train.csv").write_text("a,b\n1,2\n")
    assert load_dataset(str(tmp_path / "d"), split="train", cache_dir=str(tmp_path / "c"))[0] == {"a": 1, "b": 2}


def test_changed_datasets_internals_fail_loudly(monkeypatch):
    import datasets.load as load

    monkeypatch.setattr(load, "dataset_module_factory", None)
    with pytest.raises(registry.UnsupportedDatasetsVersion, match=r"nemo-hf build --source ROOT --out DIR.*load_dataset\(DIR"):
        registry.register()


def test_cache_key_follows_the_weights_behind_a_model_path(tiny_source, tmp_path):
    from nemo_hf_builders.nemo_refcoco import NemoRefcocoConfig

    checkpoint = tmp_path / "clip"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"weights v1")
    kwargs = {"source": str(tiny_source), "model": str(checkpoint), "tau": "p95"}
    config = NemoRefcocoConfig(name="refcoco_unc", **kwargs)
    first = config.create_config_id(kwargs)
    assert config.create_config_id(kwargs) == first
    (checkpoint / "model.safetensors").write_bytes(b"weights v2, retrained")
    assert config.create_config_id(kwargs) != first
    unmined = NemoRefcocoConfig(name="refcoco_unc", mine=False, **kwargs)
    assert unmined.create_config_id({**kwargs, "mine": False}) != first
