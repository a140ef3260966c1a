"""GPU rows of issue 7: bf16 end-to-end per-example scoring, memjax vs PyTorch, examples/s and MFU.

NOT YET RUN ON A GPU: no GPU was lent to the session that wrote this script, so the GPU
rows of bench/README.md are pending. ``--smoke`` (tiny configs, CPU) exercises every code
path, the agreement checks included, in well under two minutes.

Two models with random weights (nothing is downloaded), built by ``transformers`` with its
own random init, saved with ``save_pretrained`` to a temporary folder and loaded into memjax
through ``memjax.convert.load_pretrained(folder, dtype=bfloat16)``: the same weights on
both sides. PyTorch runs the HF model cast with ``.to(torch.bfloat16)`` (pure bf16, as
memjax's bf16 params; not autocast) in ``torch.inference_mode()``, HF's default attention
(SDPA; the JSON records which).

- **CLIP ViT-B/16** (image 224, patch 16, width 768, 12 layers, 12 heads; text width 512,
  12 layers, 8 heads, 77 tokens; projection 512). Per example (one image-text pair):
  uint8 image [224, 224, 3] -> normalise on the device (OpenAI CLIP mean/std) -> image
  embedding; token ids + mask [77] -> text embedding; cosine of the pair
  (``memjax.signals._contrastive``; PyTorch: ``F.cosine_similarity`` in float32).
- **Pythia-160M** (width 768, 12 layers, 12 heads, vocab 50,304, rotary 0.25, parallel
  residual), sequences of ``--seq`` random tokens (512). Per example: final hidden states
  + unembedding -> ``memjax.signals._tokens`` (log p, Min-K%++ mu/sigma, vocabulary streamed
  in chunks of ``--chunk``) -> per-example ``mean_loss``, ``min_k`` (mean of the 20%
  lowest log p) and ``min_k_pp`` (mean of the 20% lowest (log p - mu) / sigma). PyTorch:
  ``model(ids).logits``, ``log_softmax`` over the vocabulary in float32, the same
  statistics (Min-K%++'s reference formulas) and reductions.

Rows per model:

- ``memjax``: ``memjax.engine.score(fn, params, data, batch_size=B, progress=False)`` from
  host arrays (uint8 images, int32 ids) to host scores: end to end.
- ``jax_raw_jit``: ``jax.jit(jax.vmap(fn))`` over the same batches already on the device,
  results fetched: the compute the engine wraps. (Pythia also ``jax_raw_jit_full_vocab``:
  ``chunk_size=None``, float32 logits [T, V] per example.)
- ``torch_batched``: batches sliced from host tensors (pinned on a GPU), copied to the
  device, scored, results gathered to the host once at the end.
- CLIP image tower alone (the goal names it): ``memjax_image_tower`` (the vmapped
  per-example ``encode_image``, jitted) and ``torch_image_tower``
  (``get_image_features``), both on uint8 images already on the device.

Before timing, every row runs once (compiles) and the outputs are checked to agree:
memjax vs PyTorch (both bf16) must be within ``max(TOLERANCE[field], 4 * bf16 noise)``,
where the bf16 noise is PyTorch bf16's own max deviation from PyTorch float32 on the first
batch (bf16 keeps 8 significant bits: memjax may round differently, but should be no
further from the float32 answer than PyTorch's own bf16). Then rows are timed
interleaved (``common.time_interleaved``), median and spread.

FLOPs (analytic, matmuls only: an [m, k] @ [k, n] is 2 m n k; norms, softmax, activations
and the vocabulary statistics, O(T V), are left out). A transformer layer of width D, MLP
width F over T tokens costs ``2 T (4 D^2 + 2 D F) + 4 T^2 D`` (q, k, v, out projections, the
MLP, and QK^T plus AV counted dense: causal masking is not halved). Then

- CLIP image: ``2 P (p^2 C) D`` (patch embedding, P = (224/16)^2 = 196 patches) + 12 layers
  at T = P + 1 = 197 + ``2 D E`` (projection);
- CLIP text: 12 layers at T = 77 (D = 512, F = 2048) + ``2 D E``;
- Pythia: 12 layers at T = seq + ``2 (T - 1) D V`` (unembedding at the T - 1 scored
  positions).

MFU = examples/s x FLOPs per example / peak, the peak being a bf16 n x n matmul (n = 8192
on a GPU) through ``jax.jit(jnp.matmul)`` and ``torch.mm``, the better median of the two,
measured at the start and at the end of the run (the better one is used).

Peak memory per row: on a GPU, PyTorch's ``max_memory_allocated`` (reset before the row)
and JAX's ``memory_stats()["peak_bytes_in_use"]`` (process-wide and never reset: the peak
of everything JAX ran so far) plus the raw step's ``compiled.memory_analysis()``; on a
CPU the RSS high-water mark over one run minus the RSS before it. JAX is told not to
preallocate GPU memory (``XLA_PYTHON_CLIENT_PREALLOCATE=false``) so the two frameworks
share the GPU.

Run here: ``PYTHONPATH=. python -m bench.gpu_throughput --smoke`` (writes
``bench/results/gpu_throughput_smoke.json``). On a lent H100/H200 (device tool; the repo
is copied there; its image has CUDA PyTorch, jax with the CUDA plugin, flax, orbax and
transformers, but not grain, array_record and portpicker, which memjax.engine imports;
nothing can be fetched there). Once, on the development machine, in the repo root:

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl grain==0.2.18 array_record==0.8.6 portpicker

then the device command (``carry=[".whl"]``, timeout 600; the full run takes a few
minutes: two model builds, compiles, 5 repeats):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
    && PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 -m bench.gpu_throughput
    2>&1 | tee $OUT/log; cp bench/results/gpu_throughput.json $OUT/

(``-e .``: memjax.kernels lives in ``kernels/``, mapped by setup.cfg, so the package must
be installed, not only on PYTHONPATH.) ``--batch N`` sets both models' batch size
(``--clip-batch``/``--lm-batch`` each one); ``--models clip`` or ``pythia`` runs one;
``--seq``, ``--chunk``, ``--batches``, ``--repeats``, ``--peak-n`` override the sizes;
``--no-json`` only prints. A full-size run without a GPU writes ``gpu_throughput_cpu.json``
instead, so it never passes for GPU rows.
"""

from __future__ import annotations

import os

# Before JAX is imported: by default it takes 75% of GPU memory at start, leaving PyTorch
# (same process, same GPU) too little for its peer rows.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from functools import partial  # noqa: E402

import numpy as np  # noqa: E402

from bench import common  # noqa: E402

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP preprocessing constants
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_K = 0.2  # Min-K% / Min-K%++: the fraction of lowest-scoring tokens averaged
NOISE_FACTOR = 4.0
# Absolute floors of the memjax-vs-PyTorch bf16 agreement check (see module docstring).
# cosine in [-1, 1]; mean_loss and min_k are log-probabilities (~ -log V ~ 11 at random
# init, bf16 rounds 11 to steps of 1/16); min_k_pp is in units of sigma.
TOLERANCE = {"cosine": 2e-2, "image_embedding": 5e-2, "mean_loss": 5e-2, "min_k": 1e-1,
             "min_k_pp": 2.5e-1}
LM_FIELDS = ("mean_loss", "min_k", "min_k_pp")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Model shapes (HF config kwargs) and how much work one timed run does."""

    clip: dict
    pythia: dict
    text_len: int
    seq: int
    clip_batch: int
    lm_batch: int
    batches: int  # batches per timed run, so N = batches * batch examples
    repeats: int
    peak_n: int
    chunk: int


FULL = Sizes(
    clip=dict(text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                               num_hidden_layers=12, num_attention_heads=8,
                               max_position_embeddings=77),
              vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                 num_attention_heads=12, image_size=224, patch_size=16),
              projection_dim=512),
    pythia=dict(vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072, rotary_pct=0.25, use_parallel_residual=True,
                max_position_embeddings=2048),
    text_len=77, seq=512, clip_batch=256, lm_batch=32, batches=8, repeats=5, peak_n=8192,
    chunk=8192,
)
SMOKE = Sizes(
    clip=dict(text_config=dict(vocab_size=512, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4,
                               max_position_embeddings=16),
              vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, image_size=32, patch_size=8),
              projection_dim=32),
    pythia=dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=256, rotary_pct=0.25, use_parallel_residual=True,
                max_position_embeddings=64),
    text_len=16, seq=32, clip_batch=16, lm_batch=8, batches=2, repeats=2, peak_n=512,
    chunk=200,  # does not divide 512: the scan and the remainder chunk both run
)


# ---------------------------------------------------------------------------- device


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def torch_device():
    import torch

    return torch.device("cuda" if on_gpu() else "cpu")


def sync() -> None:
    """Wait for queued CUDA work (PyTorch launches asynchronously); no-op on a CPU."""
    import torch

    if on_gpu():
        torch.cuda.synchronize()


def measure_bf16_peak(n: int, repeats: int = 7) -> dict[str, float]:
    """Achievable bf16 FLOP/s: an n^3 bf16 matmul through JAX and PyTorch (medians).

    ``common.measure_matmul_peak`` is float32 on the host; this one is bf16 on the device
    the rows run on. ``peak_flops`` is the better of the two frameworks.
    """
    import jax
    import jax.numpy as jnp
    import torch

    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in (0, 1))
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()  # compile outside the timing
    gen = torch.Generator(device=torch_device()).manual_seed(0)
    ta, tb = (torch.randn(n, n, device=torch_device(), dtype=torch.bfloat16, generator=gen)
              for _ in range(2))
    torch.mm(ta, tb)
    sync()
    times = common.time_interleaved(
        {"jax": lambda: matmul(a, b).block_until_ready(),
         "torch": lambda: (torch.mm(ta, tb), sync())},
        repeats,
    )
    rates = {k: 2.0 * n**3 / statistics.median(v) for k, v in times.items()}
    return {"matmul_n": n, "dtype": "bfloat16", "jax_flops": rates["jax"],
            "torch_flops": rates["torch"], "peak_flops": max(rates.values()),
            "jax_spread": common.summarize(times["jax"])["spread"],
            "torch_spread": common.summarize(times["torch"])["spread"]}


def machine(sizes: Sizes) -> dict:
    """Host info, the accelerator's name, and the bf16 peak measured now."""
    import jax
    import torch

    info = {"info": common.machine_info(), "gpu": on_gpu(),
            "jax_backend": jax.default_backend(),
            "jax_device_kind": jax.devices()[0].device_kind,
            "torch_cuda": torch.version.cuda,
            "torch_device_name": torch.cuda.get_device_name(0) if on_gpu() else "cpu",
            "xla_python_client_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")}
    info["peak_start"] = measure_bf16_peak(sizes.peak_n)
    return info


def finish_peak(info: dict, sizes: Sizes) -> float:
    """Measure the bf16 peak again and keep the better median (a busy spell flatters MFU)."""
    info["peak_end"] = measure_bf16_peak(sizes.peak_n)
    info["peak_flops"] = max(info["peak_start"]["peak_flops"], info["peak_end"]["peak_flops"])
    return info["peak_flops"]


def memory_probe(run: Callable[[], object]) -> dict:
    """Peak memory of one call of ``run`` (see the module docstring for what each means)."""
    if on_gpu():
        import jax
        import torch

        torch.cuda.reset_peak_memory_stats()
        run()
        sync()
        stats = jax.local_devices()[0].memory_stats() or {}
        return {"torch_peak_bytes": torch.cuda.max_memory_allocated(),
                "jax_process_peak_bytes": stats.get("peak_bytes_in_use")}
    reset = common.reset_peak_rss()
    before = common.rss_bytes()
    run()
    return {"peak_rss_delta_bytes": common.peak_rss_bytes() - before, "peak_reset": reset}


# ---------------------------------------------------------------------------- FLOPs


def layer_flops(tokens: int, dim: int, inner: int) -> int:
    """One transformer layer over ``tokens``: projections + MLP + dense attention."""
    return 2 * tokens * (4 * dim * dim + 2 * dim * inner) + 4 * tokens * tokens * dim


def clip_image_flops(vision: dict, projection: int) -> int:
    d, p = vision["hidden_size"], vision["patch_size"]
    patches = (vision["image_size"] // p) ** 2
    layers = vision["num_hidden_layers"] * layer_flops(patches + 1, d, vision["intermediate_size"])
    return 2 * patches * p * p * 3 * d + layers + 2 * d * projection


def clip_text_flops(text: dict, projection: int, length: int) -> int:
    d = text["hidden_size"]
    return (text["num_hidden_layers"] * layer_flops(length, d, text["intermediate_size"])
            + 2 * d * projection)


def pythia_flops(cfg: dict, seq: int) -> int:
    d = cfg["hidden_size"]
    return (cfg["num_hidden_layers"] * layer_flops(seq, d, cfg["intermediate_size"])
            + 2 * (seq - 1) * d * cfg["vocab_size"])


# ---------------------------------------------------------------------------- models


def hf_clip_config(sizes: Sizes):
    import transformers

    text = dict(sizes.clip["text_config"])
    vocab = text["vocab_size"]
    # EOS = the largest id and not the legacy id 2, so HF and memjax pool at its first
    # occurrence; pads are 0 (masked).
    text.update(eos_token_id=vocab - 1, bos_token_id=vocab - 2, pad_token_id=0)
    return transformers.CLIPConfig(text_config=text, vision_config=sizes.clip["vision_config"],
                                   projection_dim=sizes.clip["projection_dim"])


def build_pair(hf_model, folder: str):
    """(HF float32 model on the device, memjax bf16 model): one set of weights.

    The HF model goes through ``save_pretrained`` and memjax's own converter
    (``load_pretrained``), the path a user's checkpoint takes.
    """
    import jax.numpy as jnp

    from memjax.convert import load_pretrained

    hf_model.save_pretrained(folder)
    model, _ = load_pretrained(folder, dtype=jnp.bfloat16)
    return hf_model.eval().to(torch_device()), model


def split_placed(model):
    """(graphdef, state placed as the engine places params: replicated on the mesh).

    Pre-placing once means neither the engine nor the raw loop copies 100+ MB of weights
    per call.
    """
    from flax import nnx

    from memjax.engine import make_mesh, param_shardings
    from memjax.engine.mesh import place_params

    graphdef, state = nnx.split(model)
    return graphdef, place_params(state, param_shardings(state, make_mesh()))


def bf16_peer(hf32):
    """A bf16 copy of the HF model (the float32 one stays for the noise reference)."""
    import torch

    return copy.deepcopy(hf32).to(torch.bfloat16)


# ---------------------------------------------------------------------------- data


def clip_data(n: int, sizes: Sizes, seed: int = 0) -> dict[str, np.ndarray]:
    """uint8 images [N, H, W, 3]; int32 ids and mask [N, T], each text ending in EOS."""
    rng = np.random.default_rng(seed)
    size = sizes.clip["vision_config"]["image_size"]
    vocab, t = sizes.clip["text_config"]["vocab_size"], sizes.text_len
    lengths = rng.integers(max(2, t // 4), t + 1, n)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(1, vocab - 2, (n, t)).astype(np.int32) * mask
    ids[np.arange(n), lengths - 1] = vocab - 1
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return {"image": images, "input_ids": ids, "attention_mask": mask}


def lm_data(n: int, sizes: Sizes, seed: int = 1) -> dict[str, np.ndarray]:
    """int32 random token ids [N, T] (no padding)."""
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, sizes.pythia["vocab_size"], (n, sizes.seq),
                                      dtype=np.int32)}


def device_batches(data: dict[str, np.ndarray], batch: int) -> list[dict]:
    """The data cut into batches already on the default JAX device."""
    import jax

    n = len(next(iter(data.values())))
    return jax.device_put([{k: v[s:s + batch] for k, v in data.items()}
                           for s in range(0, n, batch)])


def torch_host(data: dict[str, np.ndarray]) -> dict:
    """Host tensors (pinned on a GPU so copies to it can be asynchronous); ids as int64."""
    import torch

    out = {}
    for k, v in data.items():
        t = torch.from_numpy(v.astype(np.int64) if v.dtype == np.int32 else v)
        out[k] = t.pin_memory() if on_gpu() else t
    return out


# ---------------------------------------------------------------------------- CLIP


def jax_pixels(image, dtype):
    """uint8 [..., H, W, 3] -> CLIP-normalised ``dtype`` (the model's compute dtype)."""
    import jax.numpy as jnp

    x = image.astype(jnp.float32) / 255.0
    return ((x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)).astype(dtype)


def clip_example(graphdef, state, example) -> dict:
    """memjax per pair: image [H, W, 3] uint8, input_ids / attention_mask [T] -> cosine."""
    from flax import nnx

    from memjax.signals import contrastive

    model = nnx.merge(graphdef, state)
    dtype = model.vision_model.patch_embed.kernel[...].dtype  # bf16 params -> bf16 compute
    image = model.encode_image(jax_pixels(example["image"], dtype)[None])[0]
    text = model.encode_text(example["input_ids"][None], example["attention_mask"][None])[0]
    return contrastive(image, text)


def image_example(graphdef, state, image):
    """memjax image tower for one uint8 image [H, W, 3] -> embedding [E]."""
    from flax import nnx

    model = nnx.merge(graphdef, state)
    dtype = model.vision_model.patch_embed.kernel[...].dtype
    return model.encode_image(jax_pixels(image, dtype)[None])[0]


def torch_pixels(images, dtype):
    """uint8 NHWC on the device -> CLIP-normalised NCHW ``dtype``."""
    import torch

    mean = torch.tensor(CLIP_MEAN, device=images.device)
    std = torch.tensor(CLIP_STD, device=images.device)
    x = (images.float() / 255.0 - mean) / std
    return x.permute(0, 3, 1, 2).to(dtype)


def features(out):
    """HF ``get_*_features`` returns a tensor (older) or an output with ``pooler_output``."""
    return out if hasattr(out, "shape") else out.pooler_output


def torch_image_embed(model, images):
    """[B, E] image embeddings of uint8 NHWC images on the device."""
    return features(model.get_image_features(pixel_values=torch_pixels(images, model.dtype)))


def torch_clip_batch(model, images, ids, mask):
    """[B] float32 cosine of each pair, the batch already on the device."""
    import torch.nn.functional as F

    image = torch_image_embed(model, images)
    text = features(model.get_text_features(input_ids=ids, attention_mask=mask))
    return F.cosine_similarity(image.float(), text.float(), dim=-1)


def torch_clip_scores(model, host: dict, batch: int) -> dict[str, np.ndarray]:
    """End to end: slice host tensors, copy each batch to the device, score, gather once."""
    import torch

    dev, parts = torch_device(), []
    with torch.inference_mode():
        for s in range(0, len(host["image"]), batch):
            b = {k: v[s:s + batch].to(dev, non_blocking=True) for k, v in host.items()}
            parts.append(torch_clip_batch(model, b["image"], b["input_ids"],
                                          b["attention_mask"]))
        return {"cosine": torch.cat(parts).cpu().numpy()}


def clip_runs(graphdef, state, hf16, data: dict, batch: int) -> tuple[dict, dict, dict]:
    """Row -> callable (each blocks until its result is ready), and raw-step memory."""
    import jax
    import torch

    import memjax.engine

    fn = partial(clip_example, graphdef)  # one object: the engine caches per fn
    step = jax.jit(jax.vmap(fn, in_axes=(None, 0)))
    tower = jax.jit(jax.vmap(partial(image_example, graphdef), in_axes=(None, 0)))
    batches = device_batches(data, batch)
    images = [b["image"] for b in batches]
    host = torch_host(data)
    with torch.inference_mode():
        dev_images = [host["image"][s:s + batch].to(torch_device())
                      for s in range(0, len(data["image"]), batch)]

    def raw():
        return {"cosine": np.concatenate([o["cosine"] for o in
                                          jax.device_get([step(state, b) for b in batches])])}

    def jax_tower():
        outs = [tower(state, x) for x in images]
        jax.block_until_ready(outs)
        return outs

    def torch_tower():
        with torch.inference_mode():
            outs = [torch_image_embed(hf16, x) for x in dev_images]
        sync()
        return outs

    runs = {
        "memjax": lambda: memjax.engine.score(fn, state, data, batch_size=batch,
                                              progress=False),
        "jax_raw_jit": raw,
        "torch_batched": lambda: torch_clip_scores(hf16, host, batch),
        "memjax_image_tower": jax_tower,
        "torch_image_tower": torch_tower,
    }
    xla = {"jax_raw_jit": common.memory_analysis(step.lower(state, batches[0]).compile()),
           "memjax_image_tower": common.memory_analysis(tower.lower(state, images[0]).compile())}
    return runs, xla, {"host": host, "dev_images": dev_images}


def clip_agreement(outputs: dict, hf32, data: dict, batch: int) -> dict:
    """memjax and the raw loop vs PyTorch bf16, limits scaled by PyTorch's own bf16 noise."""
    import torch

    first = torch_host({k: v[:batch] for k, v in data.items()})
    ref32 = torch_clip_scores(hf32, first, batch)["cosine"]
    ref16 = outputs["torch_batched"]["cosine"][:batch]
    noise = {"cosine": max_abs(ref16, ref32)}
    out = {"bf16_noise_torch_vs_float32": noise}
    for row in ("memjax", "jax_raw_jit"):
        out[f"{row}_vs_torch_batched"] = check(outputs[row], outputs["torch_batched"],
                                               ("cosine",), noise)
    # The tower's embeddings, relative to their largest entry (they are unnormalised).
    ours = np.concatenate([np.asarray(e, np.float32) for e in outputs["memjax_image_tower"]])
    theirs = np.concatenate([e.float().cpu().numpy() for e in outputs["torch_image_tower"]])
    with torch.inference_mode():
        emb32 = torch_image_embed(hf32, first["image"].to(torch_device())).float().cpu().numpy()
    scale = float(np.abs(emb32).max())
    tower_noise = {"image_embedding": max_abs(theirs[:batch], emb32) / scale}
    out["bf16_noise_torch_vs_float32"].update(tower_noise)
    out["memjax_image_tower_vs_torch"] = check(
        {"image_embedding": ours / scale}, {"image_embedding": theirs / scale},
        ("image_embedding",), tower_noise)
    return out


# ---------------------------------------------------------------------------- Pythia


def jax_lowest_mean(x, k: int):
    """Mean of the k smallest entries of x [T]."""
    import jax

    return -jax.lax.top_k(-x, k)[0].mean()


def lm_example(graphdef, chunk: int | None, k: int, state, example) -> dict:
    """memjax per sequence: ids [T] -> mean_loss, min_k, min_k_pp over the T - 1 targets."""
    from flax import nnx

    from memjax.signals import tokens

    lm = nnx.merge(graphdef, state)
    ids = example["input_ids"]
    hidden = lm.hidden_states(ids[None])[0][:-1]
    sig = tokens(hidden=hidden, unembedding=lm.unembedding(), targets=ids[1:],
                 chunk_size=chunk)
    z = (sig["logp"] - sig["mu"]) / sig["sigma"]
    return {"mean_loss": sig["mean_loss"], "min_k": jax_lowest_mean(sig["logp"], k),
            "min_k_pp": jax_lowest_mean(z, k)}


def torch_lm_batch(model, ids, k: int) -> dict:
    """The usual PyTorch way: full logits, float32 log_softmax, Min-K%++'s formulas."""
    import torch

    logits = model(input_ids=ids).logits[:, :-1].float()
    log_p = torch.log_softmax(logits, dim=-1)
    p = log_p.exp()
    mu = (p * log_p).sum(-1)
    sigma = ((p * log_p.square()).sum(-1) - mu.square()).clamp_min(0).sqrt()
    logp = log_p.gather(-1, ids[:, 1:, None])[..., 0]
    z = (logp - mu) / sigma
    return {"mean_loss": -logp.mean(-1),
            "min_k": logp.topk(k, dim=-1, largest=False).values.mean(-1),
            "min_k_pp": z.topk(k, dim=-1, largest=False).values.mean(-1)}


def torch_lm_scores(model, host: dict, batch: int, k: int) -> dict[str, np.ndarray]:
    import torch

    dev, parts = torch_device(), []
    with torch.inference_mode():
        for s in range(0, len(host["input_ids"]), batch):
            parts.append(torch_lm_batch(
                model, host["input_ids"][s:s + batch].to(dev, non_blocking=True), k))
        return {f: torch.cat([p[f] for p in parts]).cpu().numpy() for f in LM_FIELDS}


def lm_k(seq: int) -> int:
    return max(1, int(MIN_K * (seq - 1)))


def lm_runs(graphdef, state, hf16, data: dict, batch: int, chunk: int) -> tuple[dict, dict]:
    import jax

    import memjax.engine

    k = lm_k(data["input_ids"].shape[1])
    fn = partial(lm_example, graphdef, chunk, k)
    steps = {"jax_raw_jit": jax.jit(jax.vmap(fn, in_axes=(None, 0))),
             "jax_raw_jit_full_vocab": jax.jit(jax.vmap(partial(lm_example, graphdef, None, k),
                                                        in_axes=(None, 0)))}
    batches = device_batches(data, batch)
    host = torch_host(data)

    def raw(step):
        outs = jax.device_get([step(state, b) for b in batches])
        return {f: np.concatenate([o[f] for o in outs]) for f in LM_FIELDS}

    runs = {"memjax": lambda: memjax.engine.score(fn, state, data, batch_size=batch,
                                                  progress=False),
            **{name: partial(raw, step) for name, step in steps.items()},
            "torch_batched": lambda: torch_lm_scores(hf16, host, batch, k)}
    xla = {name: common.memory_analysis(step.lower(state, batches[0]).compile())
           for name, step in steps.items()}
    return runs, xla


def lm_agreement(outputs: dict, hf32, data: dict, batch: int) -> dict:
    k = lm_k(data["input_ids"].shape[1])
    first = torch_host({k_: v[:batch] for k_, v in data.items()})
    ref32 = torch_lm_scores(hf32, first, batch, k)
    noise = {f: max_abs(outputs["torch_batched"][f][:batch], ref32[f]) for f in LM_FIELDS}
    out = {"bf16_noise_torch_vs_float32": noise}
    for row in ("memjax", "jax_raw_jit", "jax_raw_jit_full_vocab"):
        out[f"{row}_vs_torch_batched"] = check(outputs[row], outputs["torch_batched"],
                                               LM_FIELDS, noise)
    return out


# ---------------------------------------------------------------------------- checks


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def check(ours: dict, theirs: dict, fields, noise: dict) -> dict:
    """Max abs difference per field against ``max(TOLERANCE, NOISE_FACTOR * noise)``."""
    out = {}
    for f in fields:
        limit = max(TOLERANCE[f], NOISE_FACTOR * noise[f])
        diff = max_abs(ours[f], theirs[f])
        out[f] = {"max_abs_diff": diff, "limit": limit}
        if not diff <= limit:
            raise AssertionError(f"{f}: memjax and PyTorch differ by {diff:.4g} > {limit:.4g}")
    return out


# ---------------------------------------------------------------------------- timing


def time_rows(runs: dict, examples: dict, flops: dict, repeats: int) -> dict:
    """Interleaved timings -> per-row median, spread, examples/s, FLOP/s, memory."""
    times = common.time_interleaved(runs, repeats)
    rows = {}
    for name, ts in times.items():
        stats = common.summarize(ts)
        rate = examples[name] / stats["median_s"]
        rows[name] = {"examples": examples[name], "examples_per_s": rate,
                      "flops_per_example": flops[name], "flops_per_s": rate * flops[name],
                      **stats}
    for name, run in runs.items():  # after the timing: a probe run never overlaps another
        rows[name]["memory"] = memory_probe(run)
    return rows


def warm_up(runs: dict) -> dict:
    """One call of every row (compiles; first-touch allocations); returns the outputs."""
    outputs = {}
    for name, run in runs.items():
        start = time.perf_counter()
        outputs[name] = run()
        print(f"  warm-up {name}: {time.perf_counter() - start:.1f} s", flush=True)
    return outputs


def bench_clip(sizes: Sizes, batch: int) -> dict:
    import torch
    import transformers

    n = sizes.batches * batch
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        hf32, model = build_pair(transformers.CLIPModel(hf_clip_config(sizes)), folder)
    hf16 = bf16_peer(hf32)
    graphdef, state = split_placed(model)
    data = clip_data(n, sizes)
    runs, xla, _keep = clip_runs(graphdef, state, hf16, data, batch)
    outputs = warm_up(runs)
    agreement = clip_agreement(outputs, hf32, data, batch)
    del outputs, hf32
    vision, text = sizes.clip["vision_config"], sizes.clip["text_config"]
    proj = sizes.clip["projection_dim"]
    image = clip_image_flops(vision, proj)
    pair = image + clip_text_flops(text, proj, sizes.text_len)
    flops = {name: image if name.endswith("image_tower") else pair for name in runs}
    rows = time_rows(runs, dict.fromkeys(runs, n), flops, sizes.repeats)
    return {"model": "clip", "config": sizes.clip, "text_len": sizes.text_len,
            "batch_size": batch, "n_examples": n,
            "attn_implementation": getattr(hf16.config, "_attn_implementation", None),
            "flops_per_pair": pair, "flops_per_image": image, "agreement": agreement,
            "xla_memory": xla, "rows": rows}


def bench_pythia(sizes: Sizes, batch: int) -> dict:
    import torch
    import transformers

    n = sizes.batches * batch
    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(**sizes.pythia)
    with tempfile.TemporaryDirectory() as folder:
        hf32, model = build_pair(transformers.GPTNeoXForCausalLM(config), folder)
    hf16 = bf16_peer(hf32)
    graphdef, state = split_placed(model)
    data = lm_data(n, sizes)
    runs, xla = lm_runs(graphdef, state, hf16, data, batch, sizes.chunk)
    outputs = warm_up(runs)
    agreement = lm_agreement(outputs, hf32, data, batch)
    del outputs, hf32
    per_seq = pythia_flops(sizes.pythia, sizes.seq)
    rows = time_rows(runs, dict.fromkeys(runs, n), dict.fromkeys(runs, per_seq), sizes.repeats)
    return {"model": "pythia", "config": sizes.pythia, "seq": sizes.seq, "chunk": sizes.chunk,
            "min_k_fraction": MIN_K, "batch_size": batch, "n_examples": n,
            "attn_implementation": getattr(hf16.config, "_attn_implementation", None),
            "flops_per_sequence": per_seq, "agreement": agreement, "xla_memory": xla,
            "rows": rows}


def add_mfu(result: dict, peak: float) -> None:
    for row in result["rows"].values():
        row["mfu"] = row["flops_per_s"] / peak
    torch_rate = result["rows"]["torch_batched"]["examples_per_s"]
    for row in result["rows"].values():
        row["ratio_vs_torch_batched"] = row["examples_per_s"] / torch_rate


def goals(results: dict) -> dict:
    """Issue 7: >= 50% MFU on the CLIP image tower; memjax >= 1.5x PyTorch end to end."""
    out = {}
    if "clip" in results:
        rows = results["clip"]["rows"]
        mfu = rows["memjax_image_tower"]["mfu"]
        out["clip_image_tower_mfu"] = {"value": mfu, "goal": 0.5, "met": mfu >= 0.5}
    for name, result in results.items():
        ratio = result["rows"]["memjax"]["ratio_vs_torch_batched"]
        out[f"{name}_memjax_over_torch"] = {"value": ratio, "goal": 1.5, "met": ratio >= 1.5}
    return out


def print_result(result: dict) -> None:
    print(f"\n{result['model']}: N={result['n_examples']}, batch {result['batch_size']}")
    for pair, fields in result["agreement"].items():
        if pair != "bf16_noise_torch_vs_float32":
            print(f"  agree {pair}: " + ", ".join(
                f"{f} {v['max_abs_diff']:.2g} <= {v['limit']:.2g}" for f, v in fields.items()))
    for name, r in result["rows"].items():
        print(f"  {name:24s} {r['examples_per_s']:10.1f} ex/s  x{r['ratio_vs_torch_batched']:.2f}"
              f" torch  MFU {100 * r['mfu']:6.2f}%  spread {100 * r['spread']:.0f}%", flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny configs on any device")
    parser.add_argument("--batch", type=int, help="batch size of both models")
    parser.add_argument("--clip-batch", type=int)
    parser.add_argument("--lm-batch", type=int)
    parser.add_argument("--seq", type=int, help="Pythia sequence length")
    parser.add_argument("--chunk", type=int, help="vocabulary chunk of memjax's token signals")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--batches", type=int, help="batches per timed run")
    parser.add_argument("--peak-n", type=int, help="size of the bf16 peak matmul")
    parser.add_argument("--no-json", action="store_true", help="print only (checks)")
    parser.add_argument("--models", default="clip,pythia")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    sizes = SMOKE if args.smoke else FULL
    sizes = dataclasses.replace(sizes, **{k: v for k, v in (
        ("seq", args.seq), ("chunk", args.chunk), ("repeats", args.repeats),
        ("batches", args.batches), ("peak_n", args.peak_n)) if v})
    clip_batch = args.clip_batch or args.batch or sizes.clip_batch
    lm_batch = args.lm_batch or args.batch or sizes.lm_batch

    common.set_torch_threads()
    info = machine(sizes)
    print(f"{info['torch_device_name']} / JAX {info['jax_backend']}: bf16 peak "
          f"{info['peak_start']['peak_flops'] / 1e12:.3f} TFLOP/s", flush=True)
    results = {}
    for name in args.models.split(","):
        print(f"{name}:", flush=True)
        results[name] = (bench_clip(sizes, clip_batch) if name == "clip"
                         else bench_pythia(sizes, lm_batch))
    peak = finish_peak(info, sizes)
    for result in results.values():
        add_mfu(result, peak)
        print_result(result)
    payload = {
        "benchmark": "gpu_throughput",
        "smoke": args.smoke,
        "machine": info,
        "notes": {
            "weights": "HF random init -> save_pretrained -> memjax load_pretrained(dtype="
                       "bfloat16); PyTorch peer: the same HF model .to(torch.bfloat16)",
            "flops": "matmuls only: per layer 2T(4D^2+2DF) + 4T^2D; CLIP image adds the "
                     "patch embedding and projection, text the projection; Pythia adds "
                     "2(T-1)DV for the unembedding",
            "mfu": "examples/s * FLOPs per example / bf16 matmul peak measured in this run "
                   "(better of start and end, better of JAX and PyTorch)",
            "agreement": f"|memjax - torch| <= max(TOLERANCE, {NOISE_FACTOR} x |torch bf16 - "
                         "torch float32|) on the first batch's noise, checked on every example",
            "memory": "GPU: torch max_memory_allocated per row; JAX process-wide "
                      "peak_bytes_in_use (never reset) and compiled.memory_analysis(); CPU: "
                      "VmHWM minus RSS before one run",
            "timing": "one warm-up run per row, then rows interleaved round-robin",
        },
        "tolerance": TOLERANCE,
        "models": results,
        "goals": goals(results),
        "wall_s": time.perf_counter() - start,
    }
    for key, goal in payload["goals"].items():
        print(f"{key}: {goal['value']:.3f} (goal {goal['goal']}) -> "
              f"{'met' if goal['met'] else 'NOT met'}")
    if args.smoke or not on_gpu():
        print("(no GPU / tiny configs: these numbers test the script, they measure nothing)")
    if not args.no_json:
        path = common.write_json(result_name(args.smoke), payload)
        print(f"wrote {path} in {payload['wall_s']:.0f} s")
    return payload


def result_name(smoke: bool) -> str:
    """Smoke runs and full-size runs without a GPU never overwrite the GPU results."""
    if smoke:
        return "gpu_throughput_smoke"
    return "gpu_throughput" if on_gpu() else "gpu_throughput_cpu"


if __name__ == "__main__":
    main()
