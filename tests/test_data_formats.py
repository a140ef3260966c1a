"""The data formats users have: image decoding in every mode, image-caption pairs
(JSONL/CSV/TSV), WebDataset shards, image folders, and opening them for a checkpoint.

References are independent: PIL + NumPy for decoding and [0, 1] scaling, transformers'
own ``convert_to_rgb``, image processors and tokenizers for what a model gets.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tarfile
import types

import numpy as np
import pytest
from PIL import Image

from memjax.data import (
    ImageFolderSource,
    JsonlTextSource,
    PairsSource,
    WebDatasetSource,
    decode_image,
    expand_braces,
    open_source,
)
from memjax.errors import InputError
from memjax.models import Model
from tests import hf_tiny

transformers = pytest.importorskip("transformers")


# ------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return hf_tiny.sample_photos()


def _crop(photos, k: int, height: int, width: int) -> np.ndarray:
    """A distinct crop of a sample photo, uint8 [height, width, 3]."""
    photo = photos[k % 2]
    top, left = (17 * k) % (photo.shape[0] - height), (29 * k) % (photo.shape[1] - width)
    return np.ascontiguousarray(photo[top:top + height, left:left + width])


def _encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


CAPTIONS = hf_tiny.corpus(12)


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory, photos):
    """Six pairs with images of different sizes and formats, listed as JSONL, CSV, TSV;
    plus a same-size set (for sources without a model)."""
    root = tmp_path_factory.mktemp("pairs")
    (root / "img").mkdir()
    rows = []
    for k, (height, width, fmt) in enumerate([(40, 60, "png"), (64, 48, "jpg"),
                                               (33, 33, "webp"), (80, 30, "png"),
                                               (50, 70, "png"), (45, 45, "jpg")]):
        name = f"img/p{k}.{fmt}"
        data = _encode(_crop(photos, k, height, width), "JPEG" if fmt == "jpg" else fmt)
        (root / name).write_bytes(data)
        rows.append({"image": name, "text": CAPTIONS[k], "caption": f"short {k}"})
    rows.append({"image": str(root / "img" / "p0.png"), "text": CAPTIONS[6],  # absolute,
                 "caption": "again"})  # and an image listed twice
    with open(root / "pairs.jsonl", "w") as file:
        file.writelines(json.dumps(r) + "\n" for r in rows)
    for suffix, delimiter in ((".csv", ","), (".tsv", "\t")):
        with open(root / f"pairs{suffix}", "w", newline="") as file:
            writer = csv.DictWriter(file, ["image", "text", "caption"], delimiter=delimiter)
            writer.writeheader()
            writer.writerows(rows)
    same = []
    for k in range(4):
        _png(root / "same" / f"s{k}.png", _crop(photos, k + 7, 12, 10))
        same.append({"image": f"same/s{k}.png", "text": f"caption, with comma {k}"})
    with open(root / "same.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, ["image", "text"])
        writer.writeheader()
        writer.writerows(same)
    return root


def _png(path, array) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


WDS_KEYS = {0: ["b/0002", "a/0001", "c/0000"], 1: ["d/0005", "d/0004"], 2: ["e/0009"]}


@pytest.fixture(scope="module")
def wds_dir(tmp_path_factory, photos):
    """Three shards: members out of key order, .txt captions in shard 0 and 2, .json in
    shard 1, a .cls member for every example, images of one size (96x96 noise-free
    crops, so payloads dwarf the 512-byte headers)."""
    root = tmp_path_factory.mktemp("wds")
    expected = {}
    k = 0
    for shard, keys in WDS_KEYS.items():
        with tarfile.open(root / f"shard-{shard:03d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for key in keys:
                image = _crop(photos, k, 96, 96)
                caption = CAPTIONS[k]
                fmt = ["png", "webp", "jpg"][k % 3]
                data = _encode(image, {"jpg": "JPEG"}.get(fmt, fmt))
                _add(tar, f"{key}.cls", str(k % 4).encode())
                if shard == 1:
                    _add(tar, f"{key}.json", json.dumps({"caption": caption, "text": "no",
                                                         "alt": f"alt {k}"}).encode())
                else:
                    _add(tar, f"{key}.txt", caption.encode())
                _add(tar, f"{key}.{fmt}", data)
                expected[key] = {"image": data, "text": caption, "label": k % 4,
                                 "alt": f"alt {k}" if shard == 1 else caption}
                k += 1
    return root, expected


def _ordered_keys() -> list[str]:
    """Keys in (shard, key) order: the ids WebDatasetSource must give."""
    return [key for shard in sorted(WDS_KEYS) for key in sorted(WDS_KEYS[shard])]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """The tiny CLIP (tests/hf_tiny.py) loaded by memjax, and its folder."""
    import memjax

    folder, _ = hf_tiny.cached(tmp_path_factory, "clip")
    return memjax.load(folder), folder


def _pixels(image: np.ndarray | Image.Image) -> np.ndarray:
    """Independent [0, 1] scaling: PIL RGB -> float32 / 255."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return np.asarray(image.convert("RGB"), np.float32) / np.float32(255)


# ------------------------------------------------------------------ decoding modes


def _modes(photo: np.ndarray) -> dict[str, Image.Image]:
    """One image per mode transformers' convert_to_rgb handles, made from a photo."""
    rgb = Image.fromarray(photo)
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, photo.shape[1]).astype(np.uint8),
                                    (photo.shape[0], 1)))
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    grey_alpha = rgb.convert("L")
    grey_alpha.putalpha(alpha)
    palette = rgb.quantize(16)
    palette.info["transparency"] = 3
    return {"RGB": rgb, "L": rgb.convert("L"), "1": rgb.convert("1"), "RGBA": rgba,
            "LA": grey_alpha, "P": palette, "CMYK": rgb.convert("CMYK"),
            "YCbCr": rgb.convert("YCbCr")}


def _roundtrip(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_decode_matches_transformers_convert_to_rgb(photos):
    """Every 8-bit mode decodes to what transformers' convert_to_rgb gives (alpha and
    palette transparency composited onto white), read back from a real file."""
    from transformers.image_transforms import convert_to_rgb

    for mode, image in _modes(photos[0][100:124, 200:232]).items():
        fmt = {"CMYK": "JPEG", "YCbCr": "JPEG"}.get(mode, "PNG")
        data = _roundtrip(image, fmt)
        got = decode_image(data, name=f"x.{mode}")
        assert got.dtype == np.uint8 and got.shape == (24, 32, 3), mode
        with Image.open(io.BytesIO(data)) as reopened:
            np.testing.assert_array_equal(got, convert_to_rgb(reopened, return_numpy=True),
                                          err_msg=mode)


def test_decode_composites_alpha_onto_white(photos):
    """RGBA: NumPy's c*a + 255*(1-a) (PIL rounds in integer arithmetic: within 1 level)."""
    photo = photos[1][:16, :20]
    alpha = np.random.default_rng(0).integers(0, 256, size=(16, 20), dtype=np.uint8)
    rgba = np.concatenate([photo, alpha[..., None]], axis=-1)
    got = decode_image(_encode(rgba))
    a = alpha[..., None].astype(np.float64) / 255
    expected = photo * a + 255 * (1 - a)
    assert np.max(np.abs(got - expected)) <= 1.0  # integer rounding inside PIL


def test_decode_sixteen_bit_scales_not_clips(rng, tmp_path):
    """16-bit PNG (I;16) and 32-bit TIFF (I): round(v / 257), the full range kept (PIL's
    convert would clip everything above 255 to white)."""
    values = rng.integers(0, 65536, size=(9, 11), dtype=np.uint16)
    values[0, :3] = [0, 128, 65535]  # the ends and the first rounding step
    expected = np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    png = _encode(values)
    with Image.open(io.BytesIO(png)) as image:
        assert image.mode.startswith("I;16")
    got = decode_image(png)
    np.testing.assert_array_equal(got, np.repeat(expected[..., None], 3, axis=-1))
    Image.fromarray(values.astype(np.int32)).save(tmp_path / "i32.tif")
    with Image.open(tmp_path / "i32.tif") as image:
        assert image.mode == "I"
    np.testing.assert_array_equal(decode_image(tmp_path / "i32.tif"), got)
    Image.fromarray(np.full((2, 2), 70000, np.int32)).save(tmp_path / "big.tif")
    with pytest.raises(InputError, match=r"big\.tif: mode I pixels span 70000\.\.70000"):
        decode_image(tmp_path / "big.tif")


def test_decode_float_images(rng, tmp_path):
    """F: values in [0, 1] are scaled by 255; whole values in 0..255 are kept."""
    unit = rng.uniform(0, 1, size=(5, 6)).astype(np.float32)
    Image.fromarray(unit).save(tmp_path / "unit.tif")
    np.testing.assert_array_equal(decode_image(tmp_path / "unit.tif")[..., 0],
                                  np.rint(unit.astype(np.float64) * 255).astype(np.uint8))
    whole = rng.integers(0, 256, size=(5, 6)).astype(np.float32)
    Image.fromarray(whole).save(tmp_path / "whole.tif")
    np.testing.assert_array_equal(decode_image(tmp_path / "whole.tif")[..., 1], whole)
    Image.fromarray(np.full((2, 2), 300.5, np.float32)).save(tmp_path / "bad.tif")
    with pytest.raises(InputError, match="mode F pixels span"):
        decode_image(tmp_path / "bad.tif")


def test_decode_ignores_exif_orientation(photos):
    """EXIF orientation is not applied (transformers does not apply it either)."""
    image = Image.fromarray(photos[0][:10, :30])
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert decode_image(buffer.getvalue()).shape == (10, 30, 3)


def test_decode_errors_name_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(InputError, match=r"cannot read image .*broken\.png"):
        decode_image(tmp_path / "broken.png")
    with pytest.raises(InputError, match="cannot read image shard.tar:key7"):
        decode_image(b"nope", name="shard.tar:key7")


# ------------------------------------------------------------------------ pairs


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".tsv"])
def test_pairs_with_clip_equal_transformers(pairs_dir, clip, suffix):
    """pairs:FILE with a CLIP: pixel values equal CLIPImageProcessor.from_pretrained,
    token ids equal the checkpoint tokenizer's, ids are row numbers, names the paths."""
    model, folder = clip
    source = open_source(f"pairs:{pairs_dir / ('pairs' + suffix)}", model=model)
    processor = transformers.CLIPImageProcessor.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    n = len(source)
    assert n == 7
    order = np.asarray([6, 0, 3, 3, 5, 1, 2, 4])
    batch = source.read(order)
    rows = [json.loads(line) for line in open(pairs_dir / "pairs.jsonl")]
    for j, i in enumerate(order):
        path = rows[i]["image"]
        with Image.open(path if os.path.isabs(path) else pairs_dir / path) as image:
            pixels = processor(image, return_tensors="np")["pixel_values"][0]
        np.testing.assert_array_equal(batch["image"][j], pixels.transpose(1, 2, 0))
        tokens = tokenizer(rows[i]["text"], padding="max_length", truncation=True,
                           max_length=model.context_length)
        assert batch["input_ids"][j].tolist() == tokens["input_ids"]
        assert batch["attention_mask"][j].tolist() == tokens["attention_mask"]
        assert batch["text"][j] == rows[i]["text"]
    np.testing.assert_array_equal(batch["id"], order)
    assert batch["input_ids"].dtype == np.int32 and batch["image"].dtype == np.float32
    assert source.names() == [r["image"] for r in rows[:6]] + [rows[6]["image"]]
    lengths = [len(tokenizer(r["text"])["input_ids"]) for r in rows]
    assert source.truncated() == (sum(v > model.context_length for v in lengths), 7,
                                  model.context_length)


def test_pairs_without_model(pairs_dir):
    """Without a model: [0, 1] pixels of the image named on each row, text as given
    (CSV quoting kept), a configurable caption column."""
    source = open_source(f"pairs:{pairs_dir / 'same.csv'}")
    batch = source.read(np.asarray([3, 1]))
    for j, k in enumerate([3, 1]):
        np.testing.assert_array_equal(batch["image"][j],
                                      _pixels(Image.open(pairs_dir / "same" / f"s{k}.png")))
        assert batch["text"][j] == f"caption, with comma {k}"
    assert "input_ids" not in batch and source.truncated() == (0, 4, None)
    captions = PairsSource(pairs_dir / "pairs.tsv", text_field="caption", size=(8, 9))
    assert captions.read(np.asarray([2]))["text"][0] == "short 2"
    assert captions.read(np.asarray([2]))["image"].shape == (1, 8, 9, 3)
    # names stay unique when an image is listed twice
    assert captions.names()[6] == "/".join([str(pairs_dir), "img", "p0.png"])
    twice = PairsSource(pairs_dir / "pairs.jsonl", size=(4, 4))
    assert len(set(twice.names())) == 7
    with pytest.raises(InputError, match=r"image .*img/p1\.jpg is 64x48 \(HxW\) but the "
                                         r"first image is 40x60; pass size="):
        PairsSource(pairs_dir / "pairs.csv").read(np.asarray([0, 1]))


def test_pairs_spec_is_stable_and_follows_content(pairs_dir, tmp_path):
    first = PairsSource(pairs_dir / "same.csv").spec()
    assert json.dumps(first, sort_keys=True) == json.dumps(
        PairsSource(pairs_dir / "same.csv").spec(), sort_keys=True)
    shutil.copytree(pairs_dir / "same", tmp_path / "same")
    shutil.copy(pairs_dir / "same.csv", tmp_path / "same.csv")
    (tmp_path / "same" / "s1.png").write_bytes((pairs_dir / "same" / "s2.png").read_bytes())
    assert PairsSource(tmp_path / "same.csv").spec()["images_hash"] != first["images_hash"]


def test_pairs_errors(pairs_dir, tmp_path):
    """Missing columns, missing files, bad JSON lines and unreadable images are named."""
    (tmp_path / "a.png").write_bytes(_encode(np.zeros((4, 4, 3), np.uint8)))
    (tmp_path / "cols.csv").write_text("picture,text\na.png,hi\n")
    with pytest.raises(InputError, match=r"cols\.csv\): missing column\(s\) \['image'\]; "
                                         r"the header has \['picture', 'text'\]"):
        PairsSource(tmp_path / "cols.csv")
    (tmp_path / "gone.tsv").write_text("image\ttext\na.png\tok\nb.png\tmissing\n")
    with pytest.raises(InputError, match=r"gone\.tsv\), line 3: image file 'b\.png' not "
                                         r"found: .*b\.png"):
        PairsSource(tmp_path / "gone.tsv")
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "text": "x"}\n\n{"image": oops}\n')
    with pytest.raises(InputError, match=r"bad\.jsonl\), line 3: invalid JSON"):
        PairsSource(tmp_path / "bad.jsonl")
    (tmp_path / "notext.jsonl").write_text('{"image": "a.png", "caption": "x"}\n')
    with pytest.raises(InputError, match=r"line 1: text field 'text' is missing"):
        PairsSource(tmp_path / "notext.jsonl")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    (tmp_path / "junk.csv").write_text("image,text\njunk.png,x\n")
    with pytest.raises(InputError, match=r"cannot read image .*junk\.png"):
        PairsSource(tmp_path / "junk.csv", size=(2, 2))[0]
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(InputError, match=r"expected a \.jsonl, \.csv, \.tsv file"):
        PairsSource(tmp_path / "x.txt")


# ---------------------------------------------------------------------- WebDataset


def test_expand_braces():
    assert expand_braces("s/{000..003}.tar") == [f"s/{k:03d}.tar" for k in range(4)]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("{3..1}") == ["3", "2", "1"] and expand_braces("x") == ["x"]


def test_wds_reads_examples_by_key(wds_dir):
    """Fields equal the members' own bytes decoded independently; ids follow the sorted
    (shard, key) order; names are the keys; JSON captions use "caption"."""
    root, expected = wds_dir
    source = open_source(f"wds:{root}/shard-{{000..002}}.tar")
    keys = _ordered_keys()
    assert len(source) == len(keys) and source.names() == keys
    order = np.asarray([5, 0, 3, 3, 2])
    batch = source.read(order)
    for j, i in enumerate(order):
        item = expected[keys[i]]
        np.testing.assert_array_equal(batch["image"][j],
                                      _pixels(Image.open(io.BytesIO(item["image"]))))
        assert batch["text"][j] == item["text"] and batch["label"][j] == item["label"]
    np.testing.assert_array_equal(batch["id"], order)
    assert batch["label"].dtype == np.int32
    # the same shards named by a folder or a glob open the same examples
    assert open_source(f"wds:{root}").spec() == source.spec()
    assert open_source(f"wds:{root}/shard-*.tar").names() == keys
    alt = WebDatasetSource(root, caption_field="alt", size=(4, 4))  # .txt members as is
    assert list(alt.read(np.arange(len(keys)))["text"]) == [expected[k]["alt"] for k in keys]
    json.dumps(source.spec())


class _CountingFile:
    """A file that records (file name, position, bytes) of every read."""

    def __init__(self, file, log):
        self._file, self._log = file, log

    def read(self, size=-1):
        position = self._file.tell()
        data = self._file.read(size)
        self._log.append((os.path.basename(self._file.name), position, len(data)))
        return data

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


def _count_reads(monkeypatch) -> list:
    import memjax.data.webdataset as module

    log: list = []
    monkeypatch.setattr(module, "open", lambda path, mode="r": _CountingFile(
        open(path, mode), log), raising=False)
    return log


def test_wds_index_skips_payloads_and_reads_only_requested(wds_dir, monkeypatch):
    """Opening reads tar headers only; read() reads exactly the asked examples' members."""
    root, _ = wds_dir
    log = _count_reads(monkeypatch)
    source = WebDatasetSource(f"{root}/shard-{{000..002}}.tar", size=(8, 8))
    members: dict[str, dict[str, tuple[str, int, int]]] = {}
    for shard in range(3):
        name = f"shard-{shard:03d}.tar"
        with tarfile.open(root / name) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".")
                members.setdefault(key, {})[ext] = (name, member.offset_data, member.size)
    # Header reads only: a read may touch a payload by at most the one byte tarfile reads
    # (at the end of the previous member's padded payload) to detect a truncated file.
    payloads = [span for ext in members.values() for span in ext.values()]
    overlap = sum(max(0, min(pos + n, start + size) - max(pos, start))
                  for file, pos, n in log for shard, start, size in payloads if file == shard)
    assert overlap <= len(payloads) and all(n <= 512 for _, _, n in log)
    log.clear()
    keys = _ordered_keys()
    source.read(np.asarray([4, 1]))
    wanted = {member for i in (4, 1) for member in members[keys[i]].values()}
    assert set(log) == wanted and len(log) == len(wanted)


def test_wds_with_clip(wds_dir, clip):
    """With a model: the checkpoint's processor on each member, its tokenizer on each
    caption; truncated() counts long captions."""
    model, folder = clip
    root, expected = wds_dir
    source = open_source(f"wds:{root}/shard-{{000..002}}.tar", model=model, max_length=10)
    processor = transformers.CLIPImageProcessor.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    keys = _ordered_keys()
    batch = source.read(np.arange(len(keys)))
    for i, key in enumerate(keys):
        pixels = processor(Image.open(io.BytesIO(expected[key]["image"])),
                           return_tensors="np")["pixel_values"][0]
        np.testing.assert_array_equal(batch["image"][i], pixels.transpose(1, 2, 0))
        tokens = tokenizer(expected[key]["text"], padding="max_length", truncation=True,
                           max_length=10)
        assert batch["input_ids"][i].tolist() == tokens["input_ids"]
    long = sum(len(tokenizer(expected[k]["text"])["input_ids"]) > 10 for k in keys)
    assert source.truncated() == (long, len(keys), 10)


def test_wds_errors(tmp_path, photos):
    image = _encode(_crop(photos, 0, 8, 8))
    with tarfile.open(tmp_path / "mixed.tar", "w") as tar:
        _add(tar, "k1.png", image)
        _add(tar, "k1.txt", b"cap")
        _add(tar, "k2.png", image)
    with pytest.raises(InputError, match=r"example 'k2' has no caption \(key\.txt or "
                                         r"key\.json\) but others do"):
        WebDatasetSource(tmp_path / "mixed.tar")
    with tarfile.open(tmp_path / "noimage.tar", "w") as tar:
        _add(tar, "k1.txt", b"cap")
    with pytest.raises(InputError, match=r"example 'k1' in .*noimage\.tar has no image"):
        WebDatasetSource(tmp_path / "noimage.tar")
    with tarfile.open(tmp_path / "dup.tar", "w") as tar:
        _add(tar, "k1.png", image)
    with pytest.raises(InputError, match=r"key 'k1' is in .*dup\.tar and in .*dup2\.tar"):
        shutil.copy(tmp_path / "dup.tar", tmp_path / "dup2.tar")
        WebDatasetSource(f"{tmp_path}/{{dup,dup2}}.tar")
    with tarfile.open(tmp_path / "z.tar.gz", "w:gz") as tar:
        _add(tar, "k1.png", image)
    with pytest.raises(InputError, match=r"is not an uncompressed tar file"):
        WebDatasetSource(tmp_path / "z.tar.gz")
    shutil.copy(tmp_path / "dup.tar", tmp_path / "shard-002.tar")
    with pytest.raises(InputError, match=r"shard not found: .*shard-003\.tar"):
        WebDatasetSource(f"{tmp_path}/shard-{{002..003}}.tar")
    with tarfile.open(tmp_path / "json.tar", "w") as tar:
        _add(tar, "k1.png", image)
        _add(tar, "k1.json", b'{"title": "x"}')
    source = WebDatasetSource(tmp_path / "json.tar")
    with pytest.raises(InputError, match=r"k1\.json has no string field 'caption' or "
                                         r"'text' \(keys: \['title'\]\)"):
        source[0]


# ---------------------------------------------------------------------- image folders


def test_image_folders_flat_and_labelled(tmp_path, photos):
    """images:DIR: class folders give labels; a flat folder gives none; names are the
    relative paths; with a model the checkpoint's processor runs."""
    for k, rel in enumerate(["cat/b.png", "cat/a.png", "dog/x/c.png"]):
        _png(tmp_path / "classes" / rel, _crop(photos, k, 10, 12))
        _png(tmp_path / "flat" / f"{k}.png", _crop(photos, k, 10, 12))
    labelled = open_source(f"images:{tmp_path / 'classes'}")
    assert labelled.names() == ["cat/a.png", "cat/b.png", "dog/x/c.png"]
    batch = labelled.read(np.arange(3))
    np.testing.assert_array_equal(batch["label"], [0, 0, 1])
    np.testing.assert_array_equal(batch["image"][2], _crop(photos, 2, 10, 12) / np.float32(255))
    flat = open_source(f"images:{tmp_path / 'flat'}")
    assert "label" not in flat.read(np.asarray([0])) and flat.names() == ["0.png", "1.png",
                                                                         "2.png"]
    _png(tmp_path / "classes" / "top.png", _crop(photos, 0, 10, 12))
    with pytest.raises(InputError, match="both images at the top"):
        ImageFolderSource(tmp_path / "classes")


def test_image_folder_with_checkpoints(tmp_path_factory, tmp_path, photos):
    """ViT (ViTImageProcessor) and ResNet (ConvNextImageProcessor) checkpoints: the
    source's images equal transformers' processors loaded from the same folders."""
    import memjax

    for k in range(3):
        _png(tmp_path / f"{k}.png", _crop(photos, k, 30 + 9 * k, 50 - 7 * k))
    for name, cls in (("vit", "ViTImageProcessor"), ("resnet", "ConvNextImageProcessor")):
        folder, _ = hf_tiny.cached(tmp_path_factory, name)
        source = open_source(f"images:{tmp_path}", model=memjax.load(folder))
        processor = getattr(transformers, cls).from_pretrained(folder)
        batch = source.read(np.arange(3))
        for k in range(3):
            pixels = processor(Image.open(tmp_path / f"{k}.png"),
                               return_tensors="np")["pixel_values"][0]
            np.testing.assert_array_equal(batch["image"][k], pixels.transpose(1, 2, 0))


# -------------------------------------------------------------- models and tokenizers


def _stub(**fields) -> Model:
    """A model that only declares what open_source reads (inputs, config, files)."""
    return Model.from_apply(lambda params, inputs: inputs, {}, **fields)


def test_model_refusals(tmp_path, pairs_dir, clip):
    model, folder = clip
    vision = _stub(inputs=("image",), config=types.SimpleNamespace(image_size=32),
                   source=str(tmp_path / "vit"))
    with pytest.raises(InputError, match=r"model .*vit takes 32x32 images but has no "
                                         r"preprocessor_config\.json.*copy the checkpoint"):
        open_source(f"pairs:{pairs_dir / 'same.csv'}", model=vision)
    source = open_source(f"pairs:{pairs_dir / 'same.csv'}", model=vision,
                         image_transform=lambda image: image[:2, :2] / 2)
    np.testing.assert_array_equal(source.read(np.asarray([0]))["image"][0],
                                  _crop(hf_tiny.sample_photos(), 7, 12, 10)[:2, :2] / 2)
    text = _stub(inputs=("input_ids", "attention_mask"),
                 config=types.SimpleNamespace(n_positions=16), source=str(tmp_path / "lm"))
    with pytest.raises(InputError, match=r"model .*lm reads input_ids but has no tokenizer "
                                         r"files"):
        open_source(f"pairs:{pairs_dir / 'same.csv'}", model=text)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    (tmp_path / "broken" / "tokenizer_config.json").write_text("{}")
    broken = _stub(inputs=("input_ids", "attention_mask"), tokenizer=str(tmp_path / "broken"),
                   config=types.SimpleNamespace(n_positions=16), source=str(tmp_path / "broken"))
    with pytest.raises(InputError, match=r"cannot load the tokenizer files in .*broken"):
        open_source(f"pairs:{pairs_dir / 'same.csv'}", model=broken)
    with pytest.raises(InputError, match="max_length 25 is more than the model's context "
                                         "of 24 tokens"):
        open_source(f"pairs:{pairs_dir / 'same.csv'}", model=model, max_length=25)
    mismatch = model.replace(preprocess={**model.preprocess, "crop_size": 16})
    with pytest.raises(InputError, match="makes 16x16 images but model .* takes 32x32"):
        open_source(f"pairs:{pairs_dir / 'same.csv'}", model=mismatch)


def test_jsonl_with_model_and_truncation(tmp_path, clip):
    """jsonl:FILE with a model: its tokenizer at its context (default) or max_length;
    a malformed line names file and line."""
    model, folder = clip
    path = tmp_path / "docs.jsonl"
    with open(path, "w") as file:
        file.writelines(json.dumps({"body": text}) + "\n" for text in CAPTIONS)
    source = open_source(f"jsonl:{path}", model=model, text_field="body", max_length=12)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    batch = source.read(np.arange(len(CAPTIONS)))
    for row, text in enumerate(CAPTIONS):
        ids = tokenizer(text, padding="max_length", truncation=True, max_length=12)
        assert batch["input_ids"][row].tolist() == ids["input_ids"]
    long = sum(len(tokenizer(text)["input_ids"]) > 12 for text in CAPTIONS)
    assert source.truncated() == (long, len(CAPTIONS), 12) and long > 0
    assert open_source(f"jsonl:{path}", model=model, text_field="body").truncated()[2] == 24
    path.write_text('{"body": "fine"}\n{"body": broken\n')
    with pytest.raises(InputError, match=rf"{path}, line 2: invalid JSON"):
        open_source(f"jsonl:{path}", model=model, text_field="body").read(np.asarray([1]))


def test_tokenizer_spec_hashes_contents_not_paths(tmp_path, clip, monkeypatch):
    """./tok, tok and a copy elsewhere fingerprint the same; changed files do not."""
    _, folder = clip
    (tmp_path / "docs.jsonl").write_text('{"text": "a b"}\n')
    shutil.copytree(folder, tmp_path / "tok")
    shutil.copytree(folder, tmp_path / "elsewhere" / "copy")
    monkeypatch.chdir(tmp_path)
    specs = [JsonlTextSource("docs.jsonl", tokenizer=path, max_length=4).spec()["tokenizer"]
             for path in ("tok", "./tok", str(tmp_path / "elsewhere" / "copy"))]
    assert specs[0] == specs[1] == specs[2] and "files_hash" in specs[0]
    assert str(tmp_path) not in json.dumps(specs[0])
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    config["model_max_length"] = 7
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(config))
    changed = JsonlTextSource("docs.jsonl", tokenizer="tok", max_length=4).spec()["tokenizer"]
    assert changed != specs[0]
