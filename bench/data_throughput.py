"""Images per second decoded and preprocessed: memjax sources against a PyTorch DataLoader.

Both sides run the same work per image: decode a JPEG with PIL, then a CLIP checkpoint's
preprocessing at 224 (bicubic resize of the short side, centre crop, rescale, normalise;
transformers' ``CLIPImageProcessorPil`` on the PyTorch side, :class:`memjax.data.ImageProcessor`,
which gives the same pixels, on the memjax side), with the same number of workers:

- memjax: the source's ``read(indices)`` per batch, on grain reader threads
  (``grain.MapDataset.range(batches).map(read)`` with ``ReadOptions(num_threads=W)``), as
  ``memjax.engine.score`` reads data;
- PyTorch: ``torch.utils.data.DataLoader(num_workers=W, batch_size=B)`` worker processes
  (spawned, persistent, warmed up before timing): a map-style dataset over the image
  folder, and for the shards an iterable dataset streaming each worker's share of the tar
  files, as the ``webdataset`` library does.

Sources: an image folder (``images:DIR``) and WebDataset shards (``wds:PATTERN``) of the
same images (crops of scikit-learn's two sample photos, re-encoded as JPEG). The warm-up
pass of each memjax row is checked equal to its PyTorch peer's (``outputs_equal``). Run
``python -m bench.data_throughput [--quick]``; writes ``bench/results/data_throughput.json``
(``data_throughput_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench import common

PROCESSOR = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 224},
             "crop_size": {"height": 224, "width": 224}, "resample": 3}


# ----------------------------------------------------------------------------- data


def make_data(folder: Path, n: int, shards: int, seed: int = 0) -> tuple[Path, str]:
    """``n`` JPEG crops (240..400 x 240..400) of the sample photos in ``folder/images``
    and the same bytes in ``shards`` WebDataset tars; returns (image folder, pattern)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    images = folder / "images"
    images.mkdir(parents=True)
    per_shard = -(-n // shards)
    tars = [tarfile.open(folder / f"shard-{s:03d}.tar", "w") for s in range(shards)]
    for k in range(n):
        photo = photos[k % 2]
        height, width = (int(v) for v in rng.integers(240, 400, size=2))
        top = int(rng.integers(0, photo.shape[0] - height + 1))
        left = int(rng.integers(0, photo.shape[1] - width + 1))
        buffer = io.BytesIO()
        Image.fromarray(photo[top:top + height, left:left + width]).save(
            buffer, format="JPEG", quality=90)
        data = buffer.getvalue()
        (images / f"{k:06d}.jpg").write_bytes(data)
        for name, payload in ((f"{k:06d}.jpg", data), (f"{k:06d}.txt", f"photo {k}".encode())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tars[k // per_shard].addfile(info, io.BytesIO(payload))
    for tar in tars:
        tar.close()
    return images, str(folder / f"shard-{{000..{shards - 1:03d}}}.tar")


# --------------------------------------------------------------------- PyTorch peers


class FolderDataset(torch.utils.data.Dataset):
    """Map-style: PIL decode + transformers' CLIP processor, one image per item."""

    def __init__(self, files: list[str]):
        import transformers

        self.files = files
        self.processor = transformers.CLIPImageProcessorPil(**PROCESSOR)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> np.ndarray:
        from PIL import Image

        with Image.open(self.files[index]) as image:
            return self.processor(image, return_tensors="np")["pixel_values"][0]


class ShardStream(torch.utils.data.IterableDataset):
    """Each worker streams its share of the shards through ``tarfile`` and yields the
    processed image of every ``.jpg`` member (how the ``webdataset`` library reads)."""

    def __init__(self, shards: list[str]):
        import transformers

        self.shards = shards
        self.processor = transformers.CLIPImageProcessorPil(**PROCESSOR)

    def __iter__(self):
        from PIL import Image

        info = torch.utils.data.get_worker_info()
        mine = self.shards if info is None else self.shards[info.id::info.num_workers]
        for shard in mine:
            with tarfile.open(shard, "r|") as tar:
                for member in tar:
                    if member.name.endswith(".jpg"):
                        data = tar.extractfile(member).read()
                        with Image.open(io.BytesIO(data)) as image:
                            yield self.processor(image, return_tensors="np")[
                                "pixel_values"][0]


# ------------------------------------------------------------------------ the rows


def memjax_pass(source, batch: int, workers: int) -> list[np.ndarray]:
    """Every example of ``source`` read in batches on grain threads (the engine's way)."""
    import grain

    n = len(source)
    starts = list(range(0, n, batch))
    read = lambda b: source.read(np.arange(starts[b], min(starts[b] + batch, n)))["image"]
    dataset = grain.MapDataset.range(len(starts)).map(read)
    if workers <= 0:
        return [dataset[b] for b in range(len(starts))]
    options = grain.ReadOptions(num_threads=workers, prefetch_buffer_size=2 * workers)
    return list(dataset.to_iter_dataset(options))


def torch_pass(loader) -> list[np.ndarray]:
    return [np.asarray(b).transpose(0, 2, 3, 1) for b in loader]


def run(n: int, batch: int, workers: int, shards: int, repeats: int) -> dict:
    from memjax.data import ImageFolderSource, ImageProcessor, WebDatasetSource
    from memjax.data.webdataset import shard_paths

    processor = ImageProcessor.from_config(PROCESSOR)
    with tempfile.TemporaryDirectory() as tmp:
        folder, pattern = make_data(Path(tmp), n, shards)
        files = sorted(str(p) for p in folder.iterdir())
        datasets = {"images_torch": FolderDataset(files),
                    "wds_torch": ShardStream(shard_paths(pattern, "bench"))}
        loaders = {name: torch.utils.data.DataLoader(
            dataset, batch_size=batch, num_workers=workers, persistent_workers=workers > 0,
            multiprocessing_context="spawn" if workers > 0 else None)
            for name, dataset in datasets.items()}
        sources = {"images_memjax": ImageFolderSource(folder, transform=processor),
                   "wds_memjax": WebDatasetSource(pattern, transform=processor)}
        runs = {name: (lambda s=source: memjax_pass(s, batch, workers))
                for name, source in sources.items()}
        runs.update({name: (lambda ld=loader: torch_pass(ld)) for name, loader in
                     loaders.items()})
        start = time.perf_counter()
        first = {name: fn() for name, fn in runs.items()}  # warm-up: spawns the workers
        warmup_s = time.perf_counter() - start
        equal = {kind: _same_images(first[f"{kind}_memjax"], first[f"{kind}_torch"],
                                    sort=kind == "wds")
                 for kind in ("images", "wds")}
        times = common.time_interleaved(runs, repeats)
        del loaders
    rows = {name: {"images_per_s": n / float(np.median(t)), **common.summarize(t)}
            for name, t in times.items()}
    ratios = {kind: rows[f"{kind}_memjax"]["images_per_s"] / rows[f"{kind}_torch"]["images_per_s"]
              for kind in ("images", "wds")}
    return {"n_images": n, "batch": batch, "workers": workers, "shards": shards,
            "repeats": repeats, "warmup_s": warmup_s, "outputs_equal": equal, "rows": rows,
            "memjax_over_torch": ratios}


def _same_images(ours: list[np.ndarray], theirs: list[np.ndarray], sort: bool) -> bool:
    """Whether two passes produced the same images (as sets when worker interleaving
    reorders a streamed pass)."""
    a, b = np.concatenate(ours), np.concatenate(theirs)
    if a.shape != b.shape:
        return False
    if sort:
        key = lambda x: np.lexsort(x.reshape(len(x), -1)[:, :64].T[::-1])
        a, b = a[key(a)], b[key(b)]
    return bool(np.array_equal(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, checks it runs")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None,
                        help="reader threads (memjax) and worker processes (PyTorch); "
                        "default: the cores this process may use")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    n = args.images or (48 if args.quick else 1024)
    workers = args.workers if args.workers is not None else common.cores()
    result = run(n, 16 if args.quick else args.batch, workers,
                 shards=max(2, workers), repeats=args.repeats or (1 if args.quick else 5))
    result["machine"] = common.machine_info()
    path = common.write_json(common.result_name("data_throughput", args.quick), result)
    for name, row in result["rows"].items():
        print(f"{name:16s} {row['images_per_s']:9.1f} images/s  (spread {row['spread']:.2f})")
    print(f"outputs equal: {result['outputs_equal']}; written {path}")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
