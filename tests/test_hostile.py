"""Hostile and broken input (issue 10): no crash, no hang, nothing read from outside, no user data deleted.

Risky calls that crashed or hung before run in a subprocess with a timeout, so a segfault or a hang
fails the test instead of pytest.
"""

import fcntl
import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import pyarrow.parquet as pq
from PIL import Image

from conftest import write_tiny_source
from nemo_hf import masks
from nemo_hf.source import refer
from nemo_hf.cli import main
from nemo_hf.folder import MANIFEST, BuildReport, OutFolderError, build_folder
from nemo_hf.folder.push import PushError, push_folder
from nemo_hf.source.reader import ReferSource

IMAGE_DIR = "images/mscoco/images/train2014"


def run_python(code: str, tmp_path: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter; a crash or a hang fails the calling test, not pytest."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "subprocess_cache")}
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung for more than {timeout} s")


def edit_instances(root: Path, change) -> None:
    path = root / "refcoco/instances.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def edit_refs(root: Path, change) -> None:
    path = root / "refcoco/refs(unc).p"
    refs = refer.load_refs(path)
    change(refs)
    path.write_bytes(pickle.dumps(refs, protocol=2))


def files_of(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- 1. --out never deletes what nemo_hf did not write


def test_out_holding_other_files_is_refused_and_kept(tmp_path, capsys):
    source = write_tiny_source(tmp_path / "src")
    mine = tmp_path / "v"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    assert main(["build", "--source", str(source), "--out", str(mine), "--no-mining"]) == 2
    err = capsys.readouterr().err
    assert f"--out {mine} exists and is not an earlier nemo-hf build (it holds notes.txt" in err
    assert len(err.strip().splitlines()) == 1
    assert (mine / "notes.txt").read_text() == "precious" and [p.name for p in mine.iterdir()] == ["notes.txt"]

    # an earlier build with one file added by the user is not replaced either
    out = build_folder(source, tmp_path / "out", ["refcoco_unc"], mining=None)
    (out / "data/refcoco_unc/my_split.csv").write_text("mine")
    before = files_of(out)
    with pytest.raises(OutFolderError, match="it holds data/refcoco_unc/my_split.csv"):
        build_folder(source, out, ["refcoco_unc"], mining=None)
    assert files_of(out) == before
    # a folder that merely has a nemo_hf.json is not a build either
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / MANIFEST).write_text("{}")
    with pytest.raises(OutFolderError, match="nemo_hf.json was not written by nemo_hf"):
        build_folder(source, fake, ["refcoco_unc"], mining=None)
    assert (fake / MANIFEST).read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake", "out", "src", "v"]  # no lock or partial left


@pytest.fixture
def built(tmp_path):
    return build_folder(write_tiny_source(tmp_path / "src"), tmp_path / "out", ["refcoco_unc"], mining=None)


def test_a_build_of_the_previous_version_is_replaced(built, tmp_path):
    for shard in built.glob("data/*/*.parquet"):  # nemo_hf 0.1.0 named shards without a content hash
        shard.rename(shard.with_name(shard.name[: -len("-0123456789abcdef.parquet")] + ".parquet"))
    assert (built / "data/refcoco_unc/val-00000-of-00001.parquet").is_file()
    build_folder(tmp_path / "src", built, ["refcoco_unc"], mining=None)
    assert not (built / "data/refcoco_unc/val-00000-of-00001.parquet").exists()
    assert all(len(p.stem.split("-")) == 5 for p in built.glob("data/*/*.parquet"))


def test_out_overlapping_the_source_is_refused(tmp_path, capsys, monkeypatch):
    source = write_tiny_source(tmp_path / "src")
    before = files_of(source)
    for out in (source, tmp_path, source / "refcoco", source / IMAGE_DIR):
        with pytest.raises(OutFolderError, match="overlaps --(source|image-dir)"):
            build_folder(source, out, ["refcoco_unc"], mining=None)
    monkeypatch.chdir(source)
    assert main(["build", "--source", ".", "--out", ".", "--no-mining"]) == 2
    assert "overlaps --source" in capsys.readouterr().err
    assert files_of(source) == before


def test_help_says_what_happens_to_an_existing_out(capsys):
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "replaced atomically only if it is an earlier nemo-hf build" in text and "refused" in text
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "replaced only if it is an earlier build" in readme


# ---------------------------------------------------------------- 2. numbers validated before pycocotools


def test_hostile_numbers_are_errors_not_crashes(tmp_path):
    proc = run_python("""
        import json, math
        from nemo_hf.masks import MaskFormatError, segmentation_to_rle as s
        cases = [
            ([[10, 10, 1e8, 10, 40, 40, 10, 40]], 48, 64),
            ([[10, 10, float("nan"), 10, 40, 40, 10, 40]], 48, 64),
            ([[10, 10, float("inf"), 10, 40, 40, 10, 40]], 48, 64),
            ([[10, 10, "40", 10, 40, 40, 10, 40]], 48, 64),
            ([[10, 10, 40, 10, 40, 40, 10, 40]], 60000, 60000),
            ([[10, 10, 40, 10, 40, 40, 10, 40]], 48, 0),
            ([[10, 10, 40, 10, 40, 40, 10, 40]], 48.5, 64),
            ([[70, 50, 100, 50, 100, 60]], 48, 64),             # entirely outside the image
            ([[1, 1, 5, 1, 9, 1]], 48, 64),                       # no area
        ]
        out = []
        for seg, h, w in cases:
            try:
                s(seg, h, w, "refs(unc).p: ref 7 (annotation 70)")
                out.append("accepted")
            except MaskFormatError as err:
                out.append(str(err))
        print(json.dumps(out))
    """, tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    errors = json.loads(proc.stdout.splitlines()[-1])
    assert all(e.startswith("refs(unc).p: ref 7 (annotation 70): ") for e in errors), errors
    assert "far outside the 64x48 image" in errors[0]
    assert all("not finite" in e for e in errors[1:3]) and "not a list of numbers" in errors[3]
    assert "width 60000 is not an integer in 1..32768" in errors[4] and "width 0" in errors[5] and "48.5" in errors[6]
    assert all("the mask is empty" in e for e in errors[7:])


def test_hostile_image_sizes_stop_the_build_naming_the_image(tmp_path):
    sizes = [(60000, 60000), (0, 48), ("64", 48)]  # a segfault, a hang, a traceback before
    for i, (width, height) in enumerate(sizes):
        edit_instances(write_tiny_source(tmp_path / f"src{i}"), lambda d: d["images"][1].update(width=width, height=height))
    proc = run_python(f"""
        import contextlib, io, json
        from nemo_hf.cli import main
        results = []
        for i in range({len(sizes)}):
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main(["build", "--source", f"src{{i}}", "--out", f"out{{i}}", "--no-mining"])
            results.append([code, err.getvalue()])
        print(json.dumps(results))
    """, tmp_path, timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for (code, err), (width, _) in zip(json.loads(proc.stdout.splitlines()[-1]), sizes):
        assert code == 2 and f"instances.json: image 12: width {width!r} is not an integer in 1..32768" in err


def test_real_image_size_is_checked_before_rasterising(tmp_path, monkeypatch):
    root = write_tiny_source(tmp_path / "src")
    edit_instances(root, lambda d: d["images"][1].update(width=30000, height=30000))  # the JPEG is 64x48
    rasterised = []
    real = refer.segmentation_to_rle
    monkeypatch.setattr(refer, "segmentation_to_rle", lambda seg, h, w, where: rasterised.append((h, w)) or real(seg, h, w, where))
    rows, skipped = ReferSource(root).rows("refcoco_unc")
    assert skipped["val"] == ["ref 1: image 12 is 64x48, instances.json says 30000x30000"]
    assert (30000, 30000) not in rasterised and len(rasterised) == 4


def test_polygon_outside_the_image_names_ann_and_ref(tmp_path):
    root = write_tiny_source(tmp_path / "src")
    edit_instances(root, lambda d: d["annotations"][2].update(segmentation=[[70, 50, 90, 50, 90, 60]]))
    with pytest.raises(refer.ReferFormatError, match=r"refs\(unc\)\.p: ref 2 \(annotation 113\): the mask is empty"):
        build_folder(root, tmp_path / "out", ["refcoco_unc"], mining=None)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 3. file_name never leaves --image-dir


def test_image_paths_leaving_the_image_folder_are_skipped_and_never_read(tmp_path):
    root = write_tiny_source(tmp_path / "src")
    image_dir = root / IMAGE_DIR
    secret = tmp_path / "secret.jpg"
    (image_dir / "COCO_train2014_000000000012.jpg").unlink()
    Image.fromarray(np.full((48, 64, 3), 77, np.uint8)).save(secret)  # a private photo of the right size
    secret_bytes = secret.read_bytes()
    (image_dir / "COCO_train2014_000000000013.jpg").unlink()
    (image_dir / "COCO_train2014_000000000013.jpg").symlink_to(secret)   # a symlink pointing out
    (image_dir / "COCO_train2014_000000000014.jpg").unlink()
    os.mkfifo(image_dir / "COCO_train2014_000000000014.jpg")               # a FIFO hung the build

    def point_out(d):
        d["images"][1]["file_name"] = "../../../../../secret.jpg"
        d["images"].append(dict(d["images"][0], id=15, file_name=str(secret)))  # an absolute path
        d["annotations"].append(dict(d["annotations"][0], id=300, image_id=15))

    edit_instances(root, point_out)
    edit_refs(root, lambda refs: refs.append(dict(refs[0], ref_id=20, ann_id=300, image_id=15, sent_ids=[200],
                                                  sentences=[dict(refs[0]["sentences"][0], sent_id=200)])))

    proc = run_python("""
        from nemo_hf.cli import main
        raise SystemExit(main(["build", "--source", "src", "--out", "out", "--no-mining", "--skip-broken-eval-images"]))
    """, tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = BuildReport.read(tmp_path / "out")
    assert report.skip_broken_eval_images
    skipped = report.configs["refcoco_unc"]["skipped"]
    assert "ref 1: image 12 '../../../../../secret.jpg' leads outside the image folder" in skipped["val"][0]
    assert "ref 2: image 13 'COCO_train2014_000000000013.jpg' leads outside the image folder" in skipped["testA"][0]
    assert skipped["testB"] == ["ref 3: image 14 is not a regular file"]
    assert f"ref 20: image 15 {str(secret)!r} leads outside" in skipped["train"][0]
    images = pq.read_table(next((tmp_path / "out/data/images").glob("*.parquet"))).to_pylist()
    assert [im["image_id"] for im in images] == [11]
    assert all(secret_bytes not in im["image"]["bytes"] for im in images)
    for shard in (tmp_path / "out/data/refcoco_unc").glob("*.parquet"):
        assert str(tmp_path) not in str(pq.read_table(shard, columns=["file_name"]).to_pylist())


# ---------------------------------------------------------------- 4. and 8. push uploads only the folder's own files


class RecordingApi:
    def __init__(self, existing=()):
        self.existing, self.calls = list(existing), []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo",))
        return f"https://huggingface.co/datasets/{repo_id}"

    def list_repo_files(self, repo_id, **kw):
        self.calls.append(("list_repo_files",))
        return self.existing

    def create_commit(self, repo_id, operations, **kw):
        self.calls.append(("create_commit", operations))


def test_push_refuses_symlinks_and_paths_outside_the_folder(built, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    api = RecordingApi()
    (built / "preview.png").unlink()
    (built / "preview.png").symlink_to(secret)
    with pytest.raises(PushError, match="preview.png is not a file inside the folder"):
        push_folder(built, "someone/x", token="hf_test", api=api)
    (built / "preview.png").unlink()

    shard = next((built / "data/refcoco_unc").glob("val-*.parquet"))
    moved = tmp_path / "moved.parquet"
    shard.rename(moved)
    shard.symlink_to(moved)
    with pytest.raises(PushError, match=f"{shard.relative_to(built)} is not a file inside the folder"):
        push_folder(built, "someone/x", token="hf_test", api=api)
    shard.unlink()
    moved.rename(shard)

    manifest = json.loads((built / MANIFEST).read_text())
    manifest["configs"]["refcoco_unc"]["splits"]["val"]["shards"] = [str(shard)]  # absolute
    (built / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(PushError, match="is not a file inside the folder"):
        push_folder(built, "someone/x", token="hf_test", api=api)
    assert api.calls == []


@pytest.mark.parametrize("configs", [{}, {"refcoco_unc": {"splits": {}}}])
def test_manifest_without_configs_or_shards_is_refused(built, configs):
    manifest = json.loads((built / MANIFEST).read_text())
    manifest["configs"] = configs
    (built / MANIFEST).write_text(json.dumps(manifest))
    api = RecordingApi(existing=["data/images/train-00000-of-00001.parquet", "data/refcoco_unc/val-x.parquet"])
    with pytest.raises(PushError, match="lists no (config|shards)"):
        push_folder(built, "someone/x", token="hf_test", api=api)
    assert api.calls == []


def test_no_images_keeps_remote_image_shards_unless_asked(built):
    from huggingface_hub import CommitOperationDelete

    existing = ["data/images/train-00000-of-00001-0123456789abcdef.parquet", "data/refcoco_unc/val-old.parquet"]
    for flag, deleted in ((False, ["data/refcoco_unc/val-old.parquet"]), (True, existing)):
        api = RecordingApi(existing=existing)
        push_folder(built, "someone/x", token="hf_test", include_images=False, delete_remote_images=flag, api=api)
        ops = next(c[1] for c in api.calls if c[0] == "create_commit")
        assert sorted(op.path_in_repo for op in ops if isinstance(op, CommitOperationDelete)) == sorted(deleted)


def test_push_without_network_is_one_line(built, monkeypatch, capsys):
    import httpx2 as httpx  # what huggingface_hub raises when the Hub is unreachable

    class Offline(RecordingApi):
        def create_repo(self, repo_id, **kw):
            raise httpx.ConnectError("[Errno -3] Temporary failure in name resolution\nmore detail")

    monkeypatch.setattr("nemo_hf.folder.push.HfApi", Offline)
    assert main(["push", str(built), "--repo-id", "someone/x", "--token", "hf_test"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["nemo-hf push: error: pushing to someone/x failed (ConnectError: [Errno -3] Temporary failure in "
                   "name resolution); nothing was committed"]


# ---------------------------------------------------------------- 5. pickle memory bomb, deep nesting


def _memo_bomb() -> bytes:
    leaf = [1] * 10
    for _ in range(9):
        leaf = [leaf] * 10  # pickled once, then referenced through the memo: 10^10 objects when walked
    return pickle.dumps(leaf, protocol=2)


def test_hostile_pickles_are_refused_at_once(tmp_path):
    loop = []
    loop.append(loop)
    hostile = {
        "bomb": (_memo_bomb(), "shared references expand to more than"),
        "deep": (b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b".", "nested deeper than 16 levels"),  # 100k deep
        "self": (pickle.dumps([{"ref_id": loop}], protocol=2), "nested deeper than 16 levels"),  # contains itself
    }
    assert len(hostile["bomb"][0]) < 300
    for name, (data, _) in hostile.items():
        (tmp_path / f"{name}.p").write_bytes(data)
    proc = run_python(f"""
        import time
        from nemo_hf.source.refer import ReferFormatError, load_refs
        for name in {list(hostile)}:
            start = time.perf_counter()
            try:
                load_refs(name + ".p")
            except ReferFormatError as err:
                print(f"{{time.perf_counter() - start:.3f}}", err)
    """, tmp_path, timeout=30)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(hostile)
    for line, (name, (_, expected)) in zip(lines, hostile.items()):
        seconds, message = line.split(" ", 1)
        assert float(seconds) < 1.0
        assert message.startswith(f"{name}.p: refused: ") and expected in message, message


# ---------------------------------------------------------------- 6. RLE validated (compressed and uncompressed)


@pytest.mark.parametrize("rle, message", [
    ({"size": [48, 64], "counts": [100, 50, 10]}, "RLE counts sum to 160, the image has h\\*w = 3072 pixels"),
    ({"size": [48, 64], "counts": [3000, 72, 5]}, "RLE counts sum to 3077"),
    ({"size": [48, 64], "counts": [3000, -8, 80]}, "RLE counts must be integers in 0..h\\*w"),
    ({"size": [40, 64], "counts": [2000, 560]}, "RLE size \\[40, 64\\] is not the image's \\[h, w\\] = \\[48, 64\\]"),
    ({"size": [48, 64], "counts": "not an rle"}, "malformed compressed RLE counts"),
    ({"size": [48, 64], "counts": "0`"}, "malformed compressed RLE counts \\(truncated"),
    ({"size": [48, 64], "counts": "PPP0"}, "RLE counts sum to"),
    ({"size": [48, 64], "counts": "5n0X1\\ooooooOSl2"}, "malformed compressed RLE counts \\(.* more than 6"),  # pycocotools misreads
    ({"size": [48, 64], "counts": {"a": 1}}, "RLE counts must be a list of integers or a compressed string"),
])
def test_bad_rle_on_an_eval_ref_names_ann_and_ref(tmp_path, rle, message):
    root = write_tiny_source(tmp_path / "src")
    edit_instances(root, lambda d: d["annotations"][1].update(segmentation=rle, iscrowd=1))  # ref 1, val
    with pytest.raises(refer.ReferFormatError, match=r"refs\(unc\)\.p: ref 1 \(annotation 112\): " + message):
        build_folder(root, tmp_path / "out", ["refcoco_unc"], mining=None)


def test_valid_rle_segmentations_are_kept(tmp_path):
    mask = np.zeros((48, 64), np.uint8)
    mask[5:20, 3:30] = 1
    encoded = masks.encode_rle(mask)
    runs = [int(v) for v in __import__("nemo_hf.masks", fromlist=["rle_runs"]).rle_runs(encoded["counts"])]
    for seg in ({"size": [48, 64], "counts": runs}, encoded):
        assert masks.segmentation_to_rle(seg, 48, 64, "x") == encoded


# ---------------------------------------------------------------- 7. 16-bit images scaled, not white


def _png16() -> tuple[bytes, np.ndarray]:
    values = np.tile(np.linspace(0, 65535, 64), (48, 1)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, "PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16"
    return buf.getvalue(), np.round(values / 257).astype(np.uint8)


def test_16bit_png_is_scaled_in_the_mosaic_the_embedder_and_the_build(tmp_path):
    from nemo_hf.mining.embed import ImageFiles as _ImageFiles
    from nemo_hf.transforms.images import EncodedImage

    data, expected = _png16()
    for layout in ("RGB", "RGBX"):
        pixels = EncodedImage(data).decode((64, 48), layout)
        np.testing.assert_array_equal(pixels[..., 0], expected)
        np.testing.assert_array_equal(pixels[..., 2], expected)

    def processor(images, return_tensors):  # the CLIP processor's job is not what is tested here
        return {"pixel_values": np.asarray(images, np.float32)[None]}

    tensor = _ImageFiles([(7, data)], processor)[0].numpy()
    np.testing.assert_array_equal(tensor[..., 1], expected)

    root = write_tiny_source(tmp_path / "src")
    (root / IMAGE_DIR / "COCO_train2014_000000000012.jpg").write_bytes(data)  # a PNG under a .jpg name
    rows, skipped = ReferSource(root).rows("refcoco_unc")
    assert not any(skipped.values()) and rows["val"][0]["image_id"] == 12
    buf = io.BytesIO()
    Image.fromarray(np.full((48, 64), 0.5, np.float32)).save(buf, "TIFF")
    (root / IMAGE_DIR / "COCO_train2014_000000000013.jpg").write_bytes(buf.getvalue())
    rows, skipped = ReferSource(root).rows("refcoco_unc")
    assert "ref 2: image 13 is unreadable or damaged (ValueError: floating-point pixels (mode F)" in skipped["testA"][0]


# ---------------------------------------------------------------- silently wrong data


def _bad(refs=None, instances=None):
    return {"refs": refs, "instances": instances}


@pytest.mark.parametrize("edit, message", [
    (_bad(refs=lambda refs: refs[1].update(category_id=99)), r"refs\(unc\)\.p: ref 1: category 99 is not in .*instances.json"),
    (_bad(refs=lambda refs: refs[3].update(ref_id=0)), r"refs\(unc\)\.p: ref #3 \(ref_id 0\): ref_id 0 appears twice \(first as ref #0\)"),
    (_bad(refs=lambda refs: refs[1].update(ref_id=1.5)), r"refs\(unc\)\.p: ref #1 \(ref_id 1.5\): ref_id 1.5 is not an integer"),
    (_bad(refs=lambda refs: refs[1].update(ref_id="1")), r"refs\(unc\)\.p: ref #1 \(ref_id '1'\): ref_id '1' is not an integer"),
    (_bad(refs=lambda refs: refs[1].update(image_id="12")), r"refs\(unc\)\.p: ref #1 \(ref_id 1\): image_id '12' is not an integer"),
    (_bad(refs=lambda refs: refs[1].update(ann_id=None)), r"refs\(unc\)\.p: ref #1 \(ref_id 1\): ann_id None is not an integer"),
    (_bad(refs=lambda refs: refs[1].update(sentences="the red cup")), r"refs\(unc\)\.p: ref 1: sentences is a str; expected a list"),
    (_bad(refs=lambda refs: refs[1].update(sentences={"sent": "x"})), r"refs\(unc\)\.p: ref 1: sentences is a dict; expected a list"),
    (_bad(refs=lambda refs: refs[1]["sentences"][0].pop("sent_id")), r"refs\(unc\)\.p: ref 1: sentence #0: lacks sent_id"),
    (_bad(refs=lambda refs: refs[1]["sentences"][0].update(sent=5)), r"refs\(unc\)\.p: ref 1: sentence 10: sent is a int, not text"),
    (_bad(refs=lambda refs: refs[1]["sentences"][0].update(tokens="the red cup")), r"refs\(unc\)\.p: ref 1: sentence 10: tokens is not a list of strings"),
    (_bad(instances=lambda d: d["annotations"][0].update(bbox=[8.0, float("nan"), 32.0, 20.0])),
     r"refs\(unc\)\.p: ref 0 \(annotation 111\): bbox .* is not 4 finite numbers"),
    (_bad(instances=lambda d: d["annotations"][0].update(bbox=[8.0, 10.0, 32.0])),
     r"refs\(unc\)\.p: ref 0 \(annotation 111\): bbox .* is not 4 numbers"),
    (_bad(instances=lambda d: d["annotations"][0].update(bbox=[8.0, 10.0, -3.0, 20.0])),
     r"refs\(unc\)\.p: ref 0 \(annotation 111\): bbox .* with w, h >= 0"),
    (_bad(instances=lambda d: d["images"][0].update(width="64")), r"instances.json: image 11: width '64' is not an integer"),
    (_bad(instances=lambda d: d["images"][0].update(id="11")), r"instances.json: image '11': id '11' is not an integer"),
    (_bad(instances=lambda d: d["images"][0].update(file_name=None)), r"instances.json: image 11: file_name None is not a file name"),
    (_bad(instances=lambda d: d["annotations"][0].update(image_id=11.0)), r"instances.json: annotation 111: image_id 11.0 is not an integer"),
])
def test_malformed_entries_name_the_file_and_the_ref_annotation_or_image(tmp_path, edit, message):
    root = write_tiny_source(tmp_path / "src")
    if edit["refs"]:
        edit_refs(root, edit["refs"])
    if edit["instances"]:
        edit_instances(root, edit["instances"])
    with pytest.raises(refer.ReferFormatError, match=message):
        ReferSource(root).rows("refcoco_unc")


def test_tuple_dict_key_and_empty_refs_are_errors(tmp_path):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{("ref", "id"): 1}], protocol=2))
    with pytest.raises(refer.ReferFormatError, match=r"refs\(unc\)\.p: a dict key is a tuple"):
        refer.load_refs(path)
    path.write_bytes(pickle.dumps([], protocol=2))
    with pytest.raises(refer.ReferFormatError, match=r"refs\(unc\)\.p: holds no refs"):
        refer.load_refs(path)


def test_jpeg_damaged_mid_stream_that_pil_decodes_is_kept_and_counted(tmp_path):
    """Never stricter than PIL: libjpeg warns (premature end of data segment), PIL decodes it, so it stays."""
    root = write_tiny_source(tmp_path / "src")
    path = root / IMAGE_DIR / "COCO_train2014_000000000013.jpg"
    data = path.read_bytes()
    middle = (data.find(b"\xff\xda") + len(data)) // 2
    path.write_bytes(data[:middle] + data[middle + 40:])  # PIL decodes this without a word
    Image.open(path).load()
    out = build_folder(root, tmp_path / "out", ["refcoco_unc"], mining=None)
    report = BuildReport.read(out)
    assert report.configs["refcoco_unc"]["skipped"] == {}
    assert report.configs["refcoco_unc"]["splits"]["testA"]["rows"] == 1
    assert report.images["decoded_with_warnings"] == [{
        "image_id": 13, "file_name": "COCO_train2014_000000000013.jpg",
        "warning": "Corrupt JPEG data: premature end of data segment",
    }]
    assert "1 decode with a libjpeg warning (e.g. image 13: Corrupt JPEG data" in (out / "README.md").read_text()


def test_rebuild_in_place_is_not_read_back_stale(tmp_path):
    from datasets import load_dataset

    root = write_tiny_source(tmp_path / "src")
    out = build_folder(root, tmp_path / "out", ["refcoco_unc"], mining=None)
    first = masks.decode_rle(load_dataset(str(out), "refcoco_unc", split="val")[0]["mask"])
    edit_instances(root, lambda d: d["annotations"][1].update(segmentation=[[8, 10, 40, 10, 40, 31, 8, 31]]))  # one row more
    build_folder(root, out, ["refcoco_unc"], mining=None)
    second = masks.decode_rle(load_dataset(str(out), "refcoco_unc", split="val")[0]["mask"])
    assert second.sum() == first.sum() + 32


def test_wrong_image_dir_stops_at_once_in_one_line(tmp_path, capsys):
    root = write_tiny_source(tmp_path / "src")
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    assert main(["build", "--source", str(root), "--image-dir", str(empty), "--out", str(tmp_path / "o"), "--no-mining"]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("INFO ")]  # progress log
    assert len(err) == 1 and f"4 of the 4 images that refcoco_unc names are not in {empty}" in err[0]
    assert "point --image-dir" in err[0]


@pytest.mark.parametrize("kwargs, message", [
    ({"p": {"single": float("nan")}}, "mode probabilities must be finite"),
    ({"p": {"single": float("inf"), "retrieval": 1.0}}, "mode probabilities must be finite"),
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"seed": 1.5}, "seed must be a non-negative integer"),
    ({"output_size": 2.7}, "output_size must be an integer number of pixels"),
])
def test_mosaic_parameters_are_validated_up_front(kwargs, message):
    from nemo_hf.transforms.mosaic import NeMoMosaic

    with pytest.raises(ValueError, match=message):
        NeMoMosaic({1: b""}, pool=[1], **kwargs)


# ---------------------------------------------------------------- leftovers and races


def test_next_build_cleans_up_after_an_interrupted_one(tmp_path, caplog):
    source = write_tiny_source(tmp_path / "src")
    out = build_folder(source, tmp_path / "out", ["refcoco_unc"], mining=None)
    first = files_of(out)
    stale = tmp_path / ".out.partial-0123abcd"
    (stale / "data").mkdir(parents=True)
    (stale / "data/half.parquet").write_bytes(b"x" * 1000)
    out.rename(tmp_path / ".out.old-89abcdef")  # killed inside the swap: out absent, the old build aside
    unrelated = tmp_path / ".out.partial-notours"
    unrelated.mkdir()

    # the next build fails mid-way: the old build is back in place, the stale partial gone
    (source / "refcocog").mkdir()
    (source / "refcocog/instances.json").write_text((source / "refcoco/instances.json").read_text())
    (source / "refcocog/refs(umd).p").write_bytes(b"not a pickle")
    with caplog.at_level("WARNING"), pytest.raises(refer.ReferFormatError):
        build_folder(source, out, ["refcoco_unc", "refcocog_umd"], mining=None)
    assert files_of(out) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.partial-notours", "out", "src"]
    assert "removed" in caplog.text and ".out.partial-0123abcd" in caplog.text and "put back" in caplog.text


def test_concurrent_build_into_the_same_out_is_refused(tmp_path, capsys):
    source = write_tiny_source(tmp_path / "src")
    with open(tmp_path / ".out.lock", "w") as held:  # what a running build holds
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(["build", "--source", str(source), "--out", str(tmp_path / "out"), "--no-mining"]) == 2
    assert "is being written by another nemo-hf build" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "src"]
    build_folder(source, tmp_path / "out", ["refcoco_unc"], mining=None)  # released: the next build runs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


# ---------------------------------------------------------------- packaging


def test_what_the_commands_import_is_a_core_dependency():
    """Every third-party module the build/stats/preview/push code imports comes with a plain ``pip install``."""
    import ast
    import importlib.metadata as md
    import re as regex
    import tomllib

    repo = Path(__file__).resolve().parents[1]
    core = {regex.split(r"[<>=!~\[ ;]", d)[0].lower() for d in tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"]}
    dists = md.packages_distributions()
    needed = set()
    for path in [*(repo / "nemo_hf").rglob("*.py"), *(repo / "builders").glob("*.py")]:
        if path.parent.name in ("training", "zeroshot"):  # the [training] and [zeroshot] extras
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for name in names:
                top = name.split(".")[0]
                if top in dists and top not in ("nemo_hf", "nemo_hf_builders", "nemo_hf_cards"):
                    needed.update(d.lower() for d in dists[top])
    assert {"transformers", "faiss-cpu", "matplotlib", "threadpoolctl"} <= needed
    assert needed - {"nemo-hf"} <= core, needed - core


def test_objects_column_validates_every_instance_and_keeps_an_empty_unreferred_one(tmp_path):
    root = write_tiny_source(tmp_path / "src")
    sliver = {"id": 500, "image_id": 11, "category_id": 47, "bbox": [1.0, 1.0, 8.0, 0.0], "area": 0.0, "iscrowd": 0,
              "segmentation": [[1, 1, 5, 1, 9, 1]]}  # no ref names it; it rasterises to nothing
    edit_instances(root, lambda d: d["annotations"].append(sliver))
    out = build_folder(root, tmp_path / "out", ["refcoco_unc"], mining=None)
    images = pq.read_table(next((out / "data/images").glob("*.parquet")), columns=["image_id", "objects"]).to_pylist()
    objects = {o["ann_id"]: o for o in next(im for im in images if im["image_id"] == 11)["objects"]}
    assert set(objects) == {111, 200, 500} and masks.decode_rle(objects[500]["mask"]).sum() == 0

    edit_instances(root, lambda d: d["annotations"][-1].update(segmentation=[[1, 1, float("nan"), 1, 9, 9]]))
    with pytest.raises(refer.ReferFormatError, match=r"instances.json: annotation 500 \(image 11\): polygon has a coordinate that is not finite"):
        build_folder(root, tmp_path / "out", ["refcoco_unc"], mining=None)
