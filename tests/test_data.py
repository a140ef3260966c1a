"""Data sources: content round trips, read order, fingerprints and error messages."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import pytest

from memjax.data import (
    ArraySource,
    ImageFolderSource,
    JsonlTextSource,
    PairsSource,
    TFDSSource,
    WebDatasetSource,
    digits,
    grain_source,
    memmap_source,
    open_source,
)
from memjax.errors import InputError

# ---------------------------------------------------------------------------- fixtures

TFDS_N = 7  # examples in the tiny TFDS dataset
TEXTS = ["the cat sat", "a dog ran far away", "héllo wörld ✓", "one", "two words"]


def _tiny_builder_class():
    """A local TFDS builder: image, class label and text features; nothing to download."""
    import tensorflow_datasets as tfds
    from PIL import Image

    # skip_registration: the name is then resolved from the prepared files on disk, which
    # is what happens for a user whose process never defined the builder class.
    class MemjaxTiny(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")
        # No code path: tfds would look for a download-checksums file beside this module
        # through importlib_resources (not installed); nothing is downloaded anyway.
        code_path = None

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(4, 5, 3)),
                "label": tfds.features.ClassLabel(num_classes=3),
                "text": tfds.features.Text(),
            }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(TFDS_N)}

        def _generate_examples(self, n):
            for k in range(n):
                # PIL images, not arrays: tfds encodes arrays to PNG with TensorFlow.
                image = Image.fromarray(_tfds_image(k))
                yield k, {"image": image, "label": k % 3, "text": f"doc {k}"}

    return MemjaxTiny


def _tfds_image(k: int) -> np.ndarray:
    """Example k's image: a distinct value per pixel and channel, so layout errors show."""
    base = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    return (base + 3 * k).astype(np.uint8)


def _png(path, array: np.ndarray) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def _solid(height: int, width: int, rgb) -> np.ndarray:
    return np.broadcast_to(np.asarray(rgb, np.uint8), (height, width, 3)).copy()


def _write_jsonl(path, texts, extra=None) -> None:
    with open(path, "w", encoding="utf-8") as file:
        for k, text in enumerate(texts):
            file.write(json.dumps({"text": text, "key": f"k{k}", **(extra or {})}) + "\n")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """One folder with every kind of data on disk, built once for the module."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    # .npy folder and .npz file
    arrays = {"x": rng.normal(size=(10, 3)).astype(np.float32),
              "label": np.arange(10, dtype=np.int32) % 4}
    (root / "npy").mkdir()
    for key, value in arrays.items():
        np.save(root / "npy" / f"{key}.npy", value)
    np.savez(root / "arrays.npz", **arrays)
    # TFDS dataset, prepared offline into a local data_dir
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    builder = _tiny_builder_class()(data_dir=str(root / "tfds"), file_format="array_record")
    builder.download_and_prepare()
    # image folder: classes created out of order, one non-image file to ignore
    _png(root / "images" / "dog" / "b.png", _solid(6, 4, (255, 0, 0)))
    _png(root / "images" / "dog" / "a.png", _solid(6, 4, (0, 255, 0)))
    _png(root / "images" / "cat" / "z.png", _solid(6, 4, (0, 0, 255)))
    (root / "images" / "cat" / "notes.txt").write_text("not an image")
    # a flat image folder, image-caption pairs (CSV) and two WebDataset shards of them
    for k, color in enumerate([(9, 8, 7), (200, 100, 0), (0, 50, 250), (1, 2, 3)]):
        _png(root / "flat" / f"{k}.png", _solid(5, 3, color))
    (root / "pairs.csv").write_text("image,text\n" + "".join(
        f"flat/{k}.png,caption {k}\n" for k in (3, 0, 2, 1)))
    import io
    import tarfile

    for shard, ks in enumerate([(2, 0), (1, 3)]):
        with tarfile.open(root / f"shard-{shard}.tar", "w") as tar:
            for k in ks:
                for name, data in ((f"k{k}.png", (root / "flat" / f"{k}.png").read_bytes()),
                                   (f"k{k}.txt", f"caption {k}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    # jsonl, with a blank line in the middle (skipped: not an example)
    _write_jsonl(root / "docs.jsonl", TEXTS)
    lines = (root / "docs.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (root / "docs.jsonl").write_text("".join(lines[:2] + ["\n"] + lines[2:]), encoding="utf-8")
    return root


def _word_lengths(text: str) -> list[int]:
    """A plain-callable tokenizer: the length of each word."""
    return [len(word) for word in text.split()]


@pytest.fixture(scope="module")
def hf_tokenizer():
    """A word-level tokenizer trained here on stdlib docstrings (no hub download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"])
    tokenizer.train_from_iterator([json.__doc__, os.__doc__, " ".join(TEXTS)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]",
                                   unk_token="[UNK]")


# One opener per kind of source: each call opens the data afresh.
OPENERS = {
    "digits": lambda root: digits(),
    "npy": lambda root: memmap_source(root / "npy"),
    "npz": lambda root: memmap_source(root / "arrays.npz"),
    "tfds": lambda root: TFDSSource("memjax_tiny", split="train", data_dir=root / "tfds"),
    "images": lambda root: ImageFolderSource(root / "images", size=(3, 2)),
    "images_flat": lambda root: ImageFolderSource(root / "flat"),
    "pairs": lambda root: PairsSource(root / "pairs.csv", tokenizer=_word_lengths,
                                      max_length=2),
    "wds": lambda root: WebDatasetSource(root / "shard-{0..1}.tar", tokenizer=_word_lengths,
                                         max_length=2),
    "jsonl": lambda root: JsonlTextSource(root / "docs.jsonl"),
    "jsonl_tokens": lambda root: JsonlTextSource(root / "docs.jsonl", tokenizer=_word_lengths,
                                                 max_length=3, id_field="key"),
}


def _assert_batches_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ------------------------------------------------------------------ every source


@pytest.mark.parametrize("kind", sorted(OPENERS))
def test_read_follows_index_order(root, kind):
    """read() returns rows in the order asked, repeats included, equal to single reads."""
    source = OPENERS[kind](root)
    n = len(source)
    indices = np.asarray([n - 1, 0, 2, 0, 1, n - 1])
    batch = source.read(indices)
    rows = [source.read(np.asarray([i])) for i in indices]
    expected = {key: np.concatenate([r[key] for r in rows]) for key in batch}
    _assert_batches_equal(batch, expected)
    for j, i in enumerate(indices):  # __getitem__ (grain's access) agrees with read()
        record = source[int(i)]
        for key in batch:
            np.testing.assert_array_equal(np.asarray(record[key]), batch[key][j])
    assert all(v.shape[0] == len(indices) for v in batch.values())


@pytest.mark.parametrize("kind", sorted(OPENERS))
def test_spec_is_json_and_stable(root, kind):
    """spec() serialises to JSON and is the same for two opens of the same data."""
    first, second = OPENERS[kind](root), OPENERS[kind](root)
    text = json.dumps(first.spec(), sort_keys=True)
    assert text == json.dumps(second.spec(), sort_keys=True)
    assert json.loads(text)["n"] == len(first)


@pytest.mark.parametrize("kind", sorted(OPENERS))
def test_grain_reads_sources(root, kind):
    """grain.MapDataset.source takes a memjax source as is (its __len__ / __getitem__)."""
    import grain

    source = OPENERS[kind](root)
    assert grain_source(source) is source
    dataset = grain.MapDataset.source(grain_source(source))
    assert len(dataset) == len(source)
    last = len(source) - 1
    _assert_record_equal(dataset[last], source[last])


def _assert_record_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def test_grain_wraps_read_only_sources():
    """A source with only read(): grain_source adds __getitem__ that reads one row."""

    class ReadOnly:
        def __init__(self):
            self.inner = ArraySource({"x": np.arange(5) * 10})

        def __len__(self):
            return 5

        def read(self, indices):
            return self.inner.read(indices)

        def spec(self):
            return {"kind": "test"}

    import grain

    dataset = grain.MapDataset.source(grain_source(ReadOnly()))
    assert [int(dataset[i]["x"]) for i in range(5)] == [0, 10, 20, 30, 40]
    with pytest.raises(InputError, match="grain_source: expected a memjax source"):
        grain_source(object())


# ------------------------------------------------------------------ arrays and digits


def test_memmap_folder_round_trip(root):
    """A .npy folder opens memory-mapped, one field per file, and reads back exactly."""
    source = memmap_source(root / "npy")
    x, label = np.load(root / "npy" / "x.npy"), np.load(root / "npy" / "label.npy")
    assert isinstance(source.arrays["x"], np.memmap)
    assert sorted(source.arrays) == ["label", "x"] and len(source) == 10
    batch = source.read(np.asarray([7, 3, 3]))
    np.testing.assert_array_equal(batch["x"], x[[7, 3, 3]])
    np.testing.assert_array_equal(batch["label"], label[[7, 3, 3]])
    assert source.spec()["fields"]["x"]["file"]["path"] == str(root / "npy" / "x.npy")


def test_memmap_npz_and_fields(root):
    """A .npz is loaded eagerly (content-hashed); fields picks and orders a subset."""
    source = memmap_source(root / "arrays.npz", fields=["label"])
    assert list(source.arrays) == ["label"]
    assert not isinstance(source.arrays["label"], np.memmap)
    np.testing.assert_array_equal(source.read(np.arange(10))["label"], np.arange(10) % 4)
    assert "hash" in source.spec()["fields"]["label"]
    with pytest.raises(InputError, match=r"fields \['y'\] not found; available fields"):
        memmap_source(root / "npy", fields=["x", "y"])


def test_memmap_errors(tmp_path):
    """Missing paths, folders without .npy files and unreadable files are named."""
    with pytest.raises(InputError, match=f"no such file or folder: {tmp_path / 'nope'}"):
        memmap_source(tmp_path / "nope")
    with pytest.raises(InputError, match="has no .npy files.*images:FOLDER"):
        memmap_source(tmp_path)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match=r"cannot read .*bad\.npz as \.npz"):
        memmap_source(tmp_path / "bad.npz")


def test_array_source_reads_negative_and_out_of_range_runs():
    """Contiguous runs outside [0, n) are indexed, not sliced (a [-2:0] slice is empty)."""
    source = ArraySource({"x": np.arange(5)})
    np.testing.assert_array_equal(source.read(np.asarray([-2, -1]))["x"], [3, 4])
    with pytest.raises(IndexError):
        source.read(np.asarray([4, 5]))


def test_digits_content():
    """digits(): sklearn's images / 16 as [N, 8, 8, 1] float32, int32 labels, int64 ids."""
    from sklearn.datasets import load_digits

    reference = load_digits()
    source = digits()
    assert len(source) == 1797 and source.name == "digits"
    batch = source.read(np.asarray([1796, 0, 42]))
    assert batch["image"].dtype == np.float32 and batch["image"].shape == (3, 8, 8, 1)
    np.testing.assert_array_equal(batch["image"][..., 0], reference.images[[1796, 0, 42]] / 16)
    assert batch["label"].dtype == np.int32
    np.testing.assert_array_equal(batch["label"], reference.target[[1796, 0, 42]])
    np.testing.assert_array_equal(batch["id"], np.asarray([1796, 0, 42], dtype=np.int64))
    assert 0.0 == source.arrays["image"].min() and source.arrays["image"].max() == 1.0


# ---------------------------------------------------------------------------- TFDS


def test_tfds_runs_without_tensorflow(root):
    """The whole TFDS path (prepare and read) works with TensorFlow absent."""
    source = OPENERS["tfds"](root)
    source.read(np.arange(len(source)))
    assert importlib.util.find_spec("tensorflow") is None
    assert "tensorflow" not in sys.modules


def test_tfds_records_round_trip(root):
    """Every example comes back with its own image, label and text, each exactly once."""
    source = OPENERS["tfds"](root)
    assert len(source) == TFDS_N
    batch = source.read(np.arange(TFDS_N))
    assert batch["image"].dtype == np.float32 and batch["image"].shape == (TFDS_N, 4, 5, 3)
    assert batch["label"].dtype == np.int32 and batch["text"].dtype == object
    # TFDS shuffles examples on disk, so match each row to its example by its text.
    ks = [int(text.split()[1]) for text in batch["text"]]
    assert sorted(ks) == list(range(TFDS_N))
    for row, k in enumerate(ks):
        assert batch["text"][row] == f"doc {k}" and batch["label"][row] == k % 3
        np.testing.assert_array_equal(batch["image"][row], _tfds_image(k) / np.float32(255))


def test_tfds_options(root):
    """image_scale=False keeps uint8; fields keeps a subset; a split slice is honoured."""
    raw = TFDSSource("memjax_tiny", split="train", data_dir=root / "tfds", image_scale=False)
    scaled = OPENERS["tfds"](root)
    image = raw.read(np.asarray([2]))["image"]
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image / np.float32(255), scaled.read(np.asarray([2]))["image"])
    labels = TFDSSource("memjax_tiny", split="train", data_dir=root / "tfds", fields=["label"])
    assert list(labels.read(np.asarray([0, 1]))) == ["label"]
    head = TFDSSource("memjax_tiny", split="train[:3]", data_dir=root / "tfds")
    assert len(head) == 3
    np.testing.assert_array_equal(head.read(np.arange(3))["text"],
                                  scaled.read(np.arange(3))["text"])
    with pytest.raises(InputError, match="field 'caption' not found; available fields"):
        TFDSSource("memjax_tiny", split="train", data_dir=root / "tfds", fields=["caption"])


def test_tfds_spec(root):
    """spec() names the dataset, version, split, size and data folder; slices differ."""
    spec = OPENERS["tfds"](root).spec()
    version_dir = str(root / "tfds" / "memjax_tiny" / "1.0.0")
    assert {k: spec[k] for k in ("name", "version", "split", "n", "data_dir")} == {
        "name": "memjax_tiny", "version": "1.0.0", "split": "train", "n": TFDS_N,
        "data_dir": version_dir}
    by_dir = TFDSSource(version_dir, split="train")
    assert by_dir.spec() == spec  # the version folder opens the same dataset
    head = TFDSSource("memjax_tiny", split="train[:3]", data_dir=root / "tfds")
    assert head.spec()["split"] == "train[:3]" and head.spec()["n"] == 3


def test_tfds_errors(root, tmp_path):
    """Unknown splits, unprepared datasets and bad folders raise InputError, offline."""
    with pytest.raises(InputError, match="cannot read split 'test'"):
        TFDSSource("memjax_tiny", split="test", data_dir=root / "tfds")
    # mnist is registered but not prepared here: no download is attempted.
    with pytest.raises(InputError, match="'mnist' is not prepared under .*never downloads"):
        TFDSSource("mnist", split="train", data_dir=tmp_path)
    with pytest.raises(InputError, match="is not a prepared TFDS dataset version folder"):
        TFDSSource(tmp_path, split="train")
    with pytest.raises(InputError, match="neither registered nor prepared"):
        TFDSSource("no_such_dataset_xyz", split="train", data_dir=tmp_path)


# ----------------------------------------------------------------------- image folder


def test_image_folder_labels_and_pixels(root):
    """Sorted classes give labels, files are sorted, pixels are RGB float32 in [0, 1]."""
    source = ImageFolderSource(root / "images")  # no size: the images' own 6x4
    assert source.classes == ["cat", "dog"]
    assert source.files == [os.path.join("cat", "z.png"), os.path.join("dog", "a.png"),
                            os.path.join("dog", "b.png")]
    batch = source.read(np.asarray([2, 0, 1]))
    assert batch["image"].dtype == np.float32 and batch["image"].shape == (3, 6, 4, 3)
    np.testing.assert_array_equal(batch["label"], np.asarray([1, 0, 1], dtype=np.int32))
    np.testing.assert_array_equal(batch["id"], np.asarray([2, 0, 1], dtype=np.int64))
    np.testing.assert_array_equal(batch["image"][:, 0, 0], [[1, 0, 0], [0, 0, 1], [0, 1, 0]])


def test_image_folder_exact_and_resized(tmp_path):
    """Unresized pixels round-trip exactly; size= resizes; grey images become RGB."""
    pixels = np.random.default_rng(1).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    _png(tmp_path / "a" / "x.png", pixels)
    exact = ImageFolderSource(tmp_path)
    np.testing.assert_array_equal(exact[0]["image"], pixels / np.float32(255))
    _png(tmp_path / "b" / "grey.png", np.full((9, 9), 51, np.uint8))  # mode "L"
    resized = ImageFolderSource(tmp_path, size=(2, 3))
    batch = resized.read(np.asarray([0, 1]))
    assert batch["image"].shape == (2, 2, 3, 3)
    np.testing.assert_allclose(batch["image"][1], 0.2, atol=1e-6)  # 51 / 255, still solid
    with pytest.raises(InputError, match=r"grey\.png is 9x9 \(HxW\) .* pass size="):
        exact = ImageFolderSource(tmp_path)
        exact[1]


def test_image_folder_spec_changes_with_files(tmp_path):
    """The fingerprint follows the file list and sizes; it is stable otherwise."""
    _png(tmp_path / "a" / "x.png", _solid(4, 4, (1, 2, 3)))
    before = ImageFolderSource(tmp_path).spec()
    assert ImageFolderSource(tmp_path).spec() == before
    assert before["classes"] == ["a"] and before["n"] == 1 and before["root"] == str(tmp_path)
    _png(tmp_path / "a" / "x.png", np.random.default_rng(2).integers(0, 256, (4, 4, 3),
                                                                      dtype=np.uint8))
    rewritten = ImageFolderSource(tmp_path).spec()
    assert rewritten["files_hash"] != before["files_hash"]
    _png(tmp_path / "b" / "y.png", _solid(4, 4, (1, 2, 3)))
    added = ImageFolderSource(tmp_path).spec()
    assert added["classes"] == ["a", "b"] and added["files_hash"] != rewritten["files_hash"]


def test_image_folder_errors(tmp_path):
    """Empty folders, missing roots and unreadable images are named in the message."""
    with pytest.raises(InputError, match=f"no images found in {tmp_path}"):
        ImageFolderSource(tmp_path)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "readme.md").write_text("x")
    with pytest.raises(InputError, match=r"no images found .*class folders found: \['cls'\]"):
        ImageFolderSource(tmp_path)
    with pytest.raises(InputError, match="no such file or folder"):
        ImageFolderSource(tmp_path / "missing")
    (tmp_path / "cls" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"cannot read image .*cls/broken\.png"):
        ImageFolderSource(tmp_path, size=(2, 2))[0]


# ------------------------------------------------------------------------------ JSONL


def test_jsonl_text_and_ids(root):
    """Without a tokenizer: text (object array, unicode intact) and index ids."""
    source = JsonlTextSource(root / "docs.jsonl")
    assert len(source) == len(TEXTS)  # the blank line is not an example
    batch = source.read(np.asarray([2, 4, 2]))
    assert batch["text"].dtype == object and list(batch["text"]) == [TEXTS[2], TEXTS[4],
                                                                      TEXTS[2]]
    np.testing.assert_array_equal(batch["id"], np.asarray([2, 4, 2], dtype=np.int64))
    keyed = JsonlTextSource(root / "docs.jsonl", id_field="key")
    assert list(keyed.read(np.asarray([3, 0]))["id"]) == ["k3", "k0"]


def test_jsonl_callable_tokenizer(root):
    """A plain callable's ids are truncated / right-padded with 0, with a matching mask."""
    source = JsonlTextSource(root / "docs.jsonl", tokenizer=_word_lengths, max_length=3)
    batch = source.read(np.asarray([1, 3, 0]))  # 4 words, 1 word, 3 words
    assert batch["input_ids"].dtype == np.int32 and batch["attention_mask"].dtype == np.int32
    np.testing.assert_array_equal(batch["input_ids"], [[1, 3, 3], [3, 0, 0], [3, 3, 3]])
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1], [1, 0, 0], [1, 1, 1]])
    assert list(batch["text"]) == [TEXTS[1], TEXTS[3], TEXTS[0]]


def test_jsonl_transformers_tokenizer(root, hf_tokenizer):
    """A transformers tokenizer's ids, padded with its pad id, truncated to max_length."""
    source = JsonlTextSource(root / "docs.jsonl", tokenizer=hf_tokenizer, max_length=4)
    batch = source.read(np.arange(len(TEXTS)))
    pad = hf_tokenizer.pad_token_id
    for row, text in enumerate(TEXTS):
        ids = hf_tokenizer(text)["input_ids"][:4]
        expected = ids + [pad] * (4 - len(ids))
        assert batch["input_ids"][row].tolist() == expected, text
        assert batch["attention_mask"][row].tolist() == [1] * len(ids) + [0] * (4 - len(ids))
    assert batch["input_ids"].shape == (len(TEXTS), 4)
    assert source.spec()["tokenizer"]["hash"]  # the vocabulary is part of the fingerprint
    json.dumps(source.spec())


def test_jsonl_bad_lines_name_file_and_line(tmp_path):
    """Invalid JSON and a missing text field report the file and the 1-based line."""
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": oops}\n{"body": "no text"}\n[1, 2]\n')
    source = JsonlTextSource(path)
    assert source.read(np.asarray([0]))["text"][0] == "fine"
    with pytest.raises(InputError, match=rf"{path}, line 3: invalid JSON"):
        source.read(np.asarray([1]))
    with pytest.raises(InputError, match=r"line 4: text field 'text' is missing.*\['body'\]"):
        source[2]
    with pytest.raises(InputError, match="line 5: expected a JSON object, got list"):
        source[3]
    with pytest.raises(InputError, match="line 3: invalid JSON"):
        JsonlTextSource(path, validate=True)


def test_jsonl_argument_errors(root, tmp_path):
    """max_length is required with a tokenizer; empty and missing files are refused."""
    with pytest.raises(InputError, match="max_length is required with a tokenizer"):
        JsonlTextSource(root / "docs.jsonl", tokenizer=_word_lengths)
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(InputError, match="empty.jsonl has no examples"):
        JsonlTextSource(tmp_path / "empty.jsonl")
    with pytest.raises(InputError, match=f"no such file or folder: {tmp_path / 'x.jsonl'}"):
        JsonlTextSource(tmp_path / "x.jsonl")


def test_jsonl_spec_follows_content(tmp_path):
    """The fingerprint hashes the content: a same-size edit changes it."""
    path = tmp_path / "docs.jsonl"
    _write_jsonl(path, ["aaa", "bbb"])
    before = JsonlTextSource(path).spec()
    assert JsonlTextSource(path).spec() == before
    _write_jsonl(path, ["aaa", "bbc"])  # same size, maybe the same mtime
    assert JsonlTextSource(path).spec()["content_hash"] != before["content_hash"]
    tokenized = JsonlTextSource(path, tokenizer=_word_lengths, max_length=2).spec()
    assert tokenized["tokenizer"]["type"].endswith("_word_lengths")


# ------------------------------------------------------------------------ open_source


def test_open_source_forms(root):
    """Each accepted data argument opens the matching source."""
    assert open_source("digits").spec() == digits().spec()
    assert open_source(str(root / "arrays.npz")).spec() == OPENERS["npz"](root).spec()
    assert open_source(str(root / "npy")).spec() == OPENERS["npy"](root).spec()
    assert isinstance(open_source(f"images:{root / 'images'}"), ImageFolderSource)
    assert len(open_source(f"jsonl:{root / 'docs.jsonl'}")) == len(TEXTS)
    tfds_spec = open_source(f"tfds:memjax_tiny:train@{root / 'tfds'}").spec()
    assert tfds_spec == OPENERS["tfds"](root).spec()
    sliced = open_source(f"tfds:memjax_tiny:1.0.0:train[:2]@{root / 'tfds'}")
    assert sliced.spec()["split"] == "train[:2]" and len(sliced) == 2


def test_open_source_errors(root, tmp_path):
    """Unknown forms list the accepted ones; missing files are named."""
    with pytest.raises(InputError, match=r"unknown data argument \(for a TFDS dataset: "
                                         r"tfds:mnist:train\); accepted forms: digits"):
        open_source("mnist")
    with pytest.raises(InputError, match=f"no such file or folder: {tmp_path / 'a.npz'}"):
        open_source(str(tmp_path / "a.npz"))
    with pytest.raises(InputError, match=f"no such file or folder: {tmp_path / 'no'}"):
        open_source(f"images:{tmp_path / 'no'}")
    with pytest.raises(InputError, match="expected tfds:NAME:SPLIT"):
        open_source("tfds:mnist")
    with pytest.raises(InputError, match="no such TFDS data folder"):
        open_source(f"tfds:mnist:train@{tmp_path / 'none'}")
    with pytest.raises(InputError, match="accepted forms"):
        open_source(123)
