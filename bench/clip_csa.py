"""End-to-end CLIP CSA: image-caption pairs on disk -> per-pair cosine, memjax vs PyTorch.

The work a user's ``memjax mia clip --model CLIP --data pairs:FILE`` does before its attack:
read each pair's JPEG, preprocess it as the checkpoint's ``CLIPImageProcessor`` says
(bicubic resize of the short side to 224, centre crop, rescale, normalise), tokenise the
caption with the checkpoint's tokenizer, run both towers and take the image-text cosine
(CSA, Ko et al. 2023). The CLIP is random (no download), ViT-B/32-shaped in its vision
tower at 224 but narrower (width 384, 6 layers, both towers) so a CPU run stays short.

Rows (the same pairs, the same checkpoint folder):

- ``memjax``: :func:`memjax.mia.embed_pairs` over ``open_source("pairs:FILE", model=m)``
  (grain reader threads decode and preprocess; the engine runs both towers, jitted and
  vmapped), then :func:`memjax.mia.csa`; warm (compiled) before timing.
- ``torch_reference``: the research-code loop, one pair at a time: PIL open,
  ``CLIPImageProcessor``, tokenizer, ``CLIPModel`` forward, cosine.
- ``torch_batched``: a ``DataLoader`` (same number of workers as memjax's reader threads,
  batch 32) doing the same decoding and preprocessing, ``CLIPModel`` on the batch under
  ``torch.inference_mode``.

The CSA values of every row are checked equal (max abs difference recorded). The floor:
the towers' FLOPs per pair (XLA cost analysis of one pair) over the measured matmul peak.
Run ``PYTHONPATH=. python -m bench.clip_csa [--quick]``; writes
``bench/results/clip_csa.json`` (``clip_csa_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench import common

BATCH = 32


def make_pairs(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` JPEG crops of the sample photos with standard-library captions; pairs.csv."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from memjax.data import stdlib_docstrings

    photos = load_sample_images().images
    captions = [t.split(".")[0][:200] for t in stdlib_docstrings(n)]
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    rows = []
    for k in range(n):
        photo = photos[k % 2]
        height, width = (int(v) for v in rng.integers(240, 400, size=2))
        top = int(rng.integers(0, photo.shape[0] - height + 1))
        left = int(rng.integers(0, photo.shape[1] - width + 1))
        name = f"images/{k:05d}.jpg"
        Image.fromarray(photo[top:top + height, left:left + width]).save(folder / name,
                                                                         quality=90)
        rows.append({"image": name, "text": captions[k % len(captions)]})
    path = folder / "pairs.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "text"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_clip(folder: Path) -> Path:
    """A random CLIP checkpoint folder with its tokenizer and image processor."""
    import transformers

    from tests.hf_tiny import BOS, EOS, PAD, bpe_tokenizer

    tokenizer = bpe_tokenizer(2000, add_bos_eos=True)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=384, intermediate_size=1536,
                         num_hidden_layers=6, num_attention_heads=6,
                         max_position_embeddings=77, bos_token_id=BOS, eos_token_id=EOS,
                         pad_token_id=PAD),
        vision_config=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                           num_attention_heads=6, image_size=224, patch_size=32),
        projection_dim=256)
    torch.manual_seed(0)
    transformers.CLIPModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 224},
                                    crop_size={"height": 224, "width": 224}
                                    ).save_pretrained(folder)
    return folder


class _PairsDataset(torch.utils.data.Dataset):
    """The PyTorch side's pairs: decode + CLIPImageProcessor + tokenizer per item."""

    def __init__(self, pairs: Path, model_folder: Path):
        with pairs.open() as f:
            self.rows = list(csv.DictReader(f))
        self.root, self.model_folder = pairs.parent, model_folder
        self.processor = self.tokenizer = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        import transformers
        from PIL import Image

        if self.processor is None:  # per worker process
            self.processor = transformers.CLIPImageProcessor.from_pretrained(self.model_folder)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.model_folder)
        with Image.open(self.root / self.rows[i]["image"]) as image:
            pixels = self.processor(image.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        tokens = self.tokenizer(self.rows[i]["text"], padding="max_length", truncation=True,
                                max_length=77, return_tensors="pt")
        return pixels, tokens["input_ids"][0], tokens["attention_mask"][0]


def _torch_csa(model, pixels, ids, mask) -> np.ndarray:
    with torch.inference_mode():
        image = model.get_image_features(pixel_values=pixels)
        text = model.get_text_features(input_ids=ids, attention_mask=mask)
        image = getattr(image, "pooler_output", image)
        text = getattr(text, "pooler_output", text)
        cos = torch.nn.functional.cosine_similarity(image, text, dim=-1)
    return cos.numpy().astype(np.float64)


def torch_reference(dataset: _PairsDataset, model) -> np.ndarray:
    return np.concatenate([_torch_csa(model, *(t[None] for t in dataset[i]))
                           for i in range(len(dataset))])


def torch_batched(loader, model) -> np.ndarray:
    return np.concatenate([_torch_csa(model, *batch) for batch in loader])


def memjax_csa(model, source, workers: int) -> np.ndarray:
    from memjax.mia import csa, embed_pairs

    emb = embed_pairs(model, source, batch_size=BATCH, progress=False)
    return np.asarray(csa(emb["image_emb"], emb["text_emb"]), np.float64)


def flops_per_pair(model, source) -> float:
    """Both towers on one pair, from XLA's cost analysis."""
    import jax

    example = {k: v[0] for k, v in source.read(np.array([0])).items()
               if k in ("image", "input_ids", "attention_mask")}
    image, text = model.tower("image"), model.tower("text")

    def both(params_i, params_t, ex):
        return image.apply(params_i, ex), text.apply(params_t, ex)

    lowered = jax.jit(both).lower(image.params, text.params, example)
    cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def run(n: int, repeats: int, quick: bool) -> dict:
    import transformers

    from memjax import load
    from memjax.data import open_source

    workers = common.cores()
    machine = common.machine_ceilings(quick)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pairs = make_pairs(tmp / "pairs", n)
        folder = make_clip(tmp / "clip")
        model = load(folder)
        source = open_source(f"pairs:{pairs}", model=model, max_length=77)
        torch_model = transformers.CLIPModel.from_pretrained(folder).eval()
        dataset = _PairsDataset(pairs, folder)
        loader = torch.utils.data.DataLoader(
            _PairsDataset(pairs, folder), batch_size=BATCH, num_workers=workers,
            persistent_workers=True, multiprocessing_context="spawn")
        outputs = {"memjax": memjax_csa(model, source, workers),  # warm-up: compiles
                   "torch_reference": torch_reference(dataset, torch_model),
                   "torch_batched": torch_batched(loader, torch_model)}
        times = common.time_interleaved({
            "memjax": lambda: memjax_csa(model, source, workers),
            "torch_reference": lambda: torch_reference(dataset, torch_model),
            "torch_batched": lambda: torch_batched(loader, torch_model)}, repeats)
        flops = flops_per_pair(model, source)
    peak = common.finish_ceilings(machine, quick)
    rows = {}
    for name, t in times.items():
        summary = common.summarize(t)
        rate = n / summary["median_s"]
        rows[name] = {**summary, "pairs_per_s": rate,
                      "max_abs_csa_diff_vs_memjax": float(np.abs(outputs[name]
                                                                 - outputs["memjax"]).max()),
                      "fraction_of_floor": rate * flops / peak}
    best_torch = max(rows["torch_reference"]["pairs_per_s"], rows["torch_batched"]["pairs_per_s"])
    return {"machine": machine, "n_pairs": n, "batch": BATCH, "workers": workers,
            "flops_per_pair": flops, "rows": rows,
            "memjax_over_torch_batched": rows["memjax"]["pairs_per_s"] / best_torch,
            "memjax_over_torch_reference": rows["memjax"]["pairs_per_s"]
            / rows["torch_reference"]["pairs_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    common.set_torch_threads()
    start = time.perf_counter()
    result = run(32 if args.quick else 256, 1 if args.quick else args.repeats, args.quick)
    result["wall_s"] = time.perf_counter() - start
    path = common.write_json(common.result_name("clip_csa", args.quick), result)
    for name, row in result["rows"].items():
        print(f"{name}: {row['pairs_per_s']:.1f} pairs/s, {100 * row['fraction_of_floor']:.1f}% "
              f"of floor, max |CSA diff| {row['max_abs_csa_diff_vs_memjax']:.1e}")
    print(f"memjax / best torch: {result['memjax_over_torch_batched']:.2f}; wrote {path}")


if __name__ == "__main__":
    main()
