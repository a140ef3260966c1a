"""Memorization benchmarks (issue 6): UnitMem vs PyTorch peers, LayerMem one pass vs per layer.

- UnitMem of a SimCLR CNN encoder (:func:`memjax.train.simclr.encoder_model`, conv 32-64,
  dense 256, embedding 128, random init) on the first N = 192 digits upsampled 4x
  (nearest) to 32x32 and repeated to 3 channels, n_aug = 10 SimCLR views per example,
  layers conv2 and dense1 (mean over space), UnitMem with the mean over the other examples:
  * ``memjax``: :func:`memjax.memorization.unitmem` (views made on the device, keyed by
    (example id, view id), as their own engine stage), engine batch 16 examples.
  * ``torch_reference``: written the way the UnitMem reference code does it: for each
    example, for each of the 10 views, a SimCLR augmentation on the CPU (random resized
    crop, flip, colour jitter in random order, grayscale; plain torch ops, one image at a
    time, torchvision's sampling), the model on a batch of 1, the unit means accumulated;
    then mu [N, U] and the per-unit max vs the mean of the others. Timed once, in full, on
    the first 96 examples (it runs at ~2 examples/s here); compared by examples/s.
  * ``torch_batched``: the fair peer: the same augmentations batched over all views of a
    block of examples (crop + flip as one ``affine_grid``/``grid_sample``; jitter factors
    per view, the order of the four jitter operations drawn per block), one batched
    forward under ``no_grad``, streaming per-unit max/argmax/sum; 64 and 16 examples
    (640 and 160 views) per block.
  The torch encoder carries the JAX weights; its taps must equal the JAX taps (1e-5)
  before timing, and both torch implementations must give the same scores on identical
  views (augmentation off). memjax's scores are checked against ``unitmem_from_activations``
  on its own mu. Diagnostics (64 examples per block): the views alone (memjax's
  ``simclr_views`` jitted, i.e. :func:`memjax.augment.color_jitter` with the hue computed
  once; the batched torch augmentation), summarised as ``views_alone``; the forward alone
  on ready views (JAX and torch), and views then forward as two jitted programs per block.
- LayerMem (:func:`memjax.memorization._sslmem.layermem`) of the same encoder, f and g two
  different inits, N = 128 digits, n_aug = 5 view pairs, all four layers in one call vs
  one call per layer (``layers=(name,)``); per-layer results must be equal.
- Floor: conv/matmul FLOPs of N·n_aug forward passes over the matmul peak measured in the
  same run (start and end, the better); memjax's time as a fraction of it.

Run: ``PYTHONPATH=. python -m bench.memorization`` (writes bench/results/memorization.json);
``--quick``: smaller N and fewer repeats (memorization_quick.json); ``--smoke``: the views
alone only (JAX vs torch, 64 examples x 10 views, 3 repeats), printed, nothing written.
"""

from __future__ import annotations

import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import (
    finish_ceilings,
    machine_ceilings,
    result_name,
    set_torch_threads,
    summarize,
    time_interleaved,
    write_json,
)
from memjax.augment import SimCLRView, simclr_views
from memjax.train import CNNConfig
from memjax.train.simclr import encoder_model

SIZE, CHANNELS, HIDDEN, EMBED = 32, (32, 64), (256,), 128
CONFIG = CNNConfig((SIZE, SIZE, 3), EMBED, channels=CHANNELS, hidden=HIDDEN)
UNIT_LAYERS = ("conv2", "dense1")
ALL_LAYERS = ("conv1", "conv2", "dense1", "embedding")
N_AUG, BATCH = 10, 64  # examples per batch: 640 views per forward
# memjax's best engine batch here (smaller batches keep a block's views in cache).
MEMJAX_BATCH = 16
# The engine rows score N_UNIT examples; the reference loop (~0.5 s per example on this
# machine) is timed in full on the first N_REF of them and compared by examples/s.
N_UNIT, N_REF = 192, 96
LAYERMEM_N, LAYERMEM_AUG = 128, 5
JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue (SimCLR)


def forward_flops() -> float:
    """Conv/matmul FLOPs of one forward pass of the encoder on one 32x32x3 image."""
    total, side, c_in = 0.0, SIZE, 3
    for c_out in CHANNELS:
        total += 2.0 * side * side * 9 * c_in * c_out
        side, c_in = side // 2, c_out
    widths = [side * side * c_in, *HIDDEN, EMBED]
    return total + sum(2.0 * a * b for a, b in zip(widths[:-1], widths[1:], strict=True))


def digits32(n: int | None = None) -> dict[str, np.ndarray]:
    """Digits [N, 32, 32, 3] in [0, 1]: 8x8 upsampled 4x (nearest), grey repeated to RGB."""
    from memjax.data import digits

    arrays = digits().arrays
    images = arrays["image"][:n]
    images = np.repeat(np.repeat(images, 4, axis=1), 4, axis=2)
    return {"image": np.ascontiguousarray(np.repeat(images, 3, axis=3)),
            "id": arrays["id"][:n]}


def encoder_layers(params, image):
    """Every activation of the encoder (conv1, conv2, dense1, embedding) on one image."""
    return encoder_model(params, CONFIG).activations("*")(params, image)


# ---- the torch encoder ----------------------------------------------------------------

def torch_encoder(params):
    """A torch module with the JAX weights returning the same taps (NCHW in, JAX layout
    out: conv taps [B, C, h, w], dense taps [B, U])."""
    import torch
    import torch.nn.functional as F

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = torch.nn.ModuleList()
            for conv in params["convs"]:
                w = np.asarray(conv["w"])
                layer = torch.nn.Conv2d(w.shape[2], w.shape[3], 3, padding=1)
                with torch.no_grad():
                    layer.weight.copy_(torch.from_numpy(w.transpose(3, 2, 0, 1).copy()))
                    layer.bias.copy_(torch.from_numpy(np.array(conv["b"])))
                self.convs.append(layer)
            self.dense = torch.nn.ModuleList()
            for dense in params["layers"]:
                w = np.asarray(dense["w"])
                layer = torch.nn.Linear(*w.shape)
                with torch.no_grad():
                    layer.weight.copy_(torch.from_numpy(w.T.copy()))
                    layer.bias.copy_(torch.from_numpy(np.array(dense["b"])))
                self.dense.append(layer)

        def forward(self, x):
            taps, h = {}, x
            for k, conv in enumerate(self.convs, start=1):
                h = taps[f"conv{k}"] = F.avg_pool2d(F.relu(conv(h)), 2)
            h = h.permute(0, 2, 3, 1).flatten(1)  # JAX flattens [h, w, C]
            *hidden, last = self.dense
            for k, dense in enumerate(hidden, start=1):
                h = taps[f"dense{k}"] = F.relu(dense(h))
            taps["embedding"] = last(h)
            return taps

    return Encoder().eval()


def check_forward(model, params, images: np.ndarray) -> float:
    """Max |torch tap - JAX tap| over every layer of a few images; asserts <= 1e-5 (rel)."""
    import torch

    taps = jax.jit(jax.vmap(encoder_layers, in_axes=(None, 0)))(params, images)
    with torch.no_grad():
        out = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    worst = 0.0
    for name, jax_tap in taps.items():
        t = out[name].numpy()
        t = t.transpose(0, 2, 3, 1) if t.ndim == 4 else t
        np.testing.assert_allclose(t, np.asarray(jax_tap), rtol=1e-5, atol=1e-5)
        worst = max(worst, float(np.abs(t - np.asarray(jax_tap)).max()))
    return worst


def unit_means(tap):
    """[B, C, h, w] or [B, U] -> [B, U] (conv channels averaged over space)."""
    return tap.mean(dim=(2, 3)) if tap.ndim == 4 else tap


# ---- torch augmentation (plain torch ops; torchvision is not installed) ---------------

def rgb_to_hsv(x):
    """[..., 3, H, W] RGB in [0, 1] -> HSV (torchvision's formulas)."""
    import torch

    r, g, b = x.unbind(-3)
    maxc, minc = x.max(-3).values, x.min(-3).values
    gray = maxc == minc
    chroma = maxc - minc
    s = chroma / torch.where(gray, torch.ones_like(maxc), maxc)
    div = torch.where(gray, torch.ones_like(chroma), chroma)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    return torch.stack([torch.remainder(h / 6.0 + 1.0, 1.0), s, maxc], dim=-3)


def hsv_to_rgb(x):
    import torch

    h, s, v = x.unbind(-3)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = torch.remainder(i.to(torch.int64), 6)
    p = (v * (1.0 - s)).clamp(0, 1)
    q = (v * (1.0 - s * f)).clamp(0, 1)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0, 1)
    sectors = torch.stack([torch.stack(c, dim=-3) for c in
                           ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))],
                          dim=-4)  # [..., 3, 6, H, W]
    # Pick sector i per pixel with a one-hot mask, as torchvision does.
    pick = (i.unsqueeze(-3) == torch.arange(6).view(6, 1, 1)).to(x.dtype)  # [..., 6, H, W]
    return (sectors * pick.unsqueeze(-4)).sum(-3)


def gray_of(x):
    """BT.601 luma [..., 1, H, W]."""
    r, g, b = x.unbind(-3)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def jitter_op(x, which: int, factor):
    """One of brightness, contrast, saturation, hue; factor a scalar or [B, 1, 1, 1]."""
    import torch

    if which == 0:
        return (x * factor).clamp(0, 1)
    if which == 1:
        mean = gray_of(x).mean(dim=(-3, -2, -1), keepdim=True)
        return (factor * x + (1 - factor) * mean).clamp(0, 1)
    if which == 2:
        return (factor * x + (1 - factor) * gray_of(x)).clamp(0, 1)
    hsv = rgb_to_hsv(x)
    hue = torch.remainder(hsv.narrow(-3, 0, 1) + factor, 1.0)
    return hsv_to_rgb(torch.cat([hue, hsv.narrow(-3, 1, 2)], dim=-3))


def crop_box(gen, H: int, W: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params: up to 10 tries, else the whole image."""
    import math

    import torch

    area = H * W
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(*scale, generator=gen).item()
        aspect = math.exp(torch.empty(1).uniform_(*log_r, generator=gen).item())
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= W and 0 < h <= H:
            top = int(torch.randint(0, H - h + 1, (1,), generator=gen).item())
            left = int(torch.randint(0, W - w + 1, (1,), generator=gen).item())
            return top, left, h, w
    return 0, 0, H, W


def reference_view(image, gen):
    """One SimCLR view of ONE image [3, H, W], the way torchvision's pipeline runs it."""
    import torch
    import torch.nn.functional as F

    _, H, W = image.shape
    top, left, h, w = crop_box(gen, H, W)
    x = F.interpolate(image[None, :, top:top + h, left:left + w], size=(H, W),
                      mode="bilinear", align_corners=False)[0]
    if torch.rand(1, generator=gen).item() < 0.5:
        x = x.flip(-1)
    if torch.rand(1, generator=gen).item() < 0.8:
        for which in torch.randperm(4, generator=gen).tolist():
            s = JITTER[which]
            low, high = (-s, s) if which == 3 else (max(0.0, 1 - s), 1 + s)
            x = jitter_op(x, which, torch.empty(1).uniform_(low, high, generator=gen).item())
    if torch.rand(1, generator=gen).item() < 0.2:
        x = gray_of(x).expand_as(x)
    return x.clamp(0, 1)


def batched_views(x, gen):
    """SimCLR views of every image of x [B, 3, H, W] at once (the batched peer)."""
    import torch
    import torch.nn.functional as F

    B, _, H, W = x.shape
    tries = 10
    # RandomResizedCrop's 10 tries drawn at once; the first valid one wins (else whole).
    target = H * W * torch.empty(B, tries).uniform_(0.08, 1.0, generator=gen)
    aspect = torch.exp(torch.empty(B, tries).uniform_(np.log(3 / 4), np.log(4 / 3),
                                                      generator=gen))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = ok.float().argmax(1, keepdim=True)
    any_ok = ok.any(1)
    w = torch.where(any_ok, w.gather(1, first)[:, 0], torch.tensor(float(W)))
    h = torch.where(any_ok, h.gather(1, first)[:, 0], torch.tensor(float(H)))
    top = torch.floor(torch.rand(B, generator=gen) * (H - h + 1))
    left = torch.floor(torch.rand(B, generator=gen) * (W - w + 1))
    flip = torch.rand(B, generator=gen) < 0.5
    # Crop + resize + flip as one affine resampling (align_corners=False: pixel centres).
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = torch.where(flip, -w / W, w / W)
    theta[:, 0, 2] = 2 * left / W - 1 + w / W
    theta[:, 1, 1] = h / H
    theta[:, 1, 2] = 2 * top / H - 1 + h / H
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    jittered = out
    for which in torch.randperm(4, generator=gen).tolist():
        s = JITTER[which]
        low, high = (-s, s) if which == 3 else (max(0.0, 1 - s), 1 + s)
        factor = torch.empty(B, 1, 1, 1).uniform_(low, high, generator=gen)
        jittered = jitter_op(jittered, which, factor)
    apply = (torch.rand(B, generator=gen) < 0.8)[:, None, None, None]
    out = torch.where(apply, jittered, out)
    gray = (torch.rand(B, generator=gen) < 0.2)[:, None, None, None]
    return torch.where(gray, gray_of(out).expand_as(out), out).clamp(0, 1)


# ---- UnitMem in torch -------------------------------------------------------------------

def ratio(mu_max, mu_others, eps: float = 1e-8):
    """UnitMem from the max and the mean of the others; a dead unit scores 0."""
    den = mu_max + mu_others
    return np.where(den > 0, (mu_max - mu_others) / np.where(den > 0, den + eps, 1.0), 0.0)


def torch_reference(model, images, n_aug: int, augment: bool = True, seed: int = 0):
    """The reference code's loop: example by example, view by view, batch of 1."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    n = len(images)
    mus = {}
    with torch.no_grad():
        for i in range(n):
            sums = {}
            for _ in range(n_aug):
                view = reference_view(images[i], gen) if augment else images[i]
                taps = model(view[None])
                for name in UNIT_LAYERS:
                    sums[name] = sums.get(name, 0.0) + unit_means(taps[name])[0]
            for name in UNIT_LAYERS:
                mus.setdefault(name, torch.empty(n, sums[name].shape[0]))[i] = \
                    sums[name] / n_aug
    out = {}
    for name, mu in mus.items():
        mu = np.maximum(mu.double().numpy(), 0.0)
        argmax = mu.argmax(0)
        mu_max = mu.max(0)
        out[name] = (ratio(mu_max, (mu.sum(0) - mu_max) / (n - 1)), argmax)
    return out


def torch_batched(model, images, n_aug: int, augment: bool = True, seed: int = 0,
                  batch: int = BATCH):
    """Blocks of examples, all their views augmented and encoded at once; streaming
    per-unit max/argmax/sum (float64), as memjax keeps them."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    n = len(images)
    stats = {}
    with torch.no_grad():
        for lo in range(0, n, batch):
            x = images[lo:lo + batch]
            views = x.repeat_interleave(n_aug, dim=0)
            if augment:
                views = batched_views(views, gen)
            taps = model(views)
            for name in UNIT_LAYERS:
                mu = unit_means(taps[name]).view(len(x), n_aug, -1).mean(1)
                mu = mu.double().clamp_min(0.0)
                best, where = mu.max(0)  # first index on ties
                if name not in stats:
                    stats[name] = [best, where + lo, mu.sum(0)]
                    continue
                s = stats[name]
                take = best > s[0]
                s[0] = torch.where(take, best, s[0])
                s[1] = torch.where(take, where + lo, s[1])
                s[2] = s[2] + mu.sum(0)
    return {name: (ratio(s[0].numpy(), ((s[2] - s[0]) / (n - 1)).numpy()), s[1].numpy())
            for name, s in stats.items()}


# ---- UnitMem benchmark --------------------------------------------------------------------

def memjax_unitmem(params, source, batch_size: int = MEMJAX_BATCH, return_mu: bool = False):
    from memjax.memorization import unitmem

    return unitmem(encoder_model(params, CONFIG), source, layers=UNIT_LAYERS, n_aug=N_AUG,
                   views_fn=SimCLRView(), batch_size=batch_size, return_mu=return_mu)


def check_agreement(model, params, data, torch_images) -> dict:
    """Torch reference == torch batched on identical (un-augmented) views; memjax's
    scores == unitmem_from_activations on its own mu."""
    from memjax.memorization._unitmem import unitmem_from_activations

    small = torch_images[:96]
    ref = torch_reference(model, small, N_AUG, augment=False)
    bat = torch_batched(model, small, N_AUG, augment=False, batch=32)
    out = {}
    for name in UNIT_LAYERS:
        np.testing.assert_allclose(bat[name][0], ref[name][0], rtol=1e-5, atol=1e-6)
        out[f"torch_{name}_max_abs_diff"] = float(np.abs(bat[name][0] - ref[name][0]).max())
        out[f"torch_{name}_argmax_equal"] = float((bat[name][1] == ref[name][1]).mean())
    sub = {"image": data["image"][:256], "id": data["id"][:256]}
    res = memjax_unitmem(params, sub, return_mu=True)
    for name, layer in res.layers.items():
        scores, argmax = unitmem_from_activations(layer.mu)
        np.testing.assert_allclose(layer.scores, scores, rtol=1e-9, atol=1e-12)
        assert (argmax == layer.argmax).all()
        out[f"memjax_{name}_vs_from_activations_max_abs_diff"] = float(
            np.abs(layer.scores - scores).max())
    return out


def _tap_means(params, view):
    """Per-unit means of the UnitMem layers for one view (the diagnostic forward)."""
    taps = encoder_layers(params, view)
    return {k: taps[k].reshape(-1, taps[k].shape[-1]).mean(0) for k in UNIT_LAYERS}


def _blocks(n: int) -> list[tuple[int, int]]:
    return [(lo, min(n, lo + BATCH)) for lo in range(0, n, BATCH)]


def view_runs(data, torch_images) -> dict[str, callable]:
    """The views alone, BATCH examples x N_AUG views per block: memjax's ``simclr_views``
    jitted (crop, flip, colour jitter with the hue computed once, grayscale) vs the
    batched torch augmentation (the same transforms, torchvision's sampling)."""
    import torch

    ids = jnp.asarray(data["id"])
    images = jnp.asarray(data["image"])
    views = jax.jit(functools.partial(simclr_views, n_aug=N_AUG))
    blocks = _blocks(len(ids))

    def jax_views():
        jax.block_until_ready([views(images[lo:hi], ids[lo:hi]) for lo, hi in blocks])

    def torch_views():
        gen = torch.Generator().manual_seed(0)
        for lo, hi in blocks:
            batched_views(torch_images[lo:hi].repeat_interleave(N_AUG, 0), gen)

    return {"diag_jax_views_only": jax_views, "diag_torch_views_only": torch_views}


def views_alone(per_example: dict[str, float]) -> dict[str, float]:
    """The views-alone row: examples/s (N_AUG views each) of JAX and torch, and the ratio."""
    jax_s, torch_s = per_example["diag_jax_views_only"], per_example["diag_torch_views_only"]
    return {"jax_examples_per_s": 1.0 / jax_s, "torch_examples_per_s": 1.0 / torch_s,
            "jax_over_torch": torch_s / jax_s, "views_per_example": N_AUG}


def diagnostics(params, data, model, torch_images) -> dict[str, callable]:
    """Where the time goes: the views alone (both sides), the forward alone (both sides),
    views then forward as two jitted programs."""
    import torch

    ids = jnp.asarray(data["id"])
    images = jnp.asarray(data["image"])
    views = jax.jit(functools.partial(simclr_views, n_aug=N_AUG))
    def flat_means(p, v):
        # All views of the block as one flat batch, as unitmem runs them (a vmap over
        # views nested in a vmap over examples ran the convolutions 3.3x slower).
        b, k = v.shape[:2]
        out = jax.vmap(_tap_means, in_axes=(None, 0))(p, v.reshape(b * k, *v.shape[2:]))
        return {name: m.reshape(b, k, -1) for name, m in out.items()}

    means = jax.jit(flat_means)
    blocks = _blocks(len(ids))
    ready = [views(images[lo:hi], ids[lo:hi]) for lo, hi in blocks]
    both_views = view_runs(data, torch_images)

    def jax_forward():
        jax.block_until_ready([means(params, v) for v in ready])

    def jax_two_stage():
        # Views and forward as two jitted programs per block (what the fused engine
        # program would take if XLA did not slow the fused version down).
        jax.block_until_ready([means(params, views(images[lo:hi], ids[lo:hi]))
                               for lo, hi in blocks])

    def torch_forward():
        with torch.no_grad():
            for lo, hi in blocks:
                model(torch_images[lo:hi].repeat_interleave(N_AUG, 0))

    return {"diag_jax_views_only": both_views["diag_jax_views_only"],
            "diag_jax_forward_only": jax_forward, "diag_jax_two_stage": jax_two_stage,
            "diag_torch_views_only": both_views["diag_torch_views_only"],
            "diag_torch_forward_only": torch_forward}


def bench_unitmem(quick: bool, repeats: int) -> dict:
    import torch

    data = digits32(128 if quick else N_UNIT)
    n, n_ref = len(data["id"]), 32 if quick else N_REF
    params = jax.tree.map(np.asarray, CONFIG.init(jax.random.key(0)))
    model = torch_encoder(params)
    torch_images = torch.from_numpy(data["image"].transpose(0, 3, 1, 2).copy())
    agreement = check_agreement(model, params, data, torch_images)
    agreement["forward_max_abs_diff"] = check_forward(model, params, data["image"][:8])

    runs = {"memjax": lambda: memjax_unitmem(params, data),
            "torch_batched": lambda: torch_batched(model, torch_images, N_AUG),
            "torch_batched_batch16": lambda: torch_batched(model, torch_images, N_AUG,
                                                           batch=16),
            **diagnostics(params, data, model, torch_images)}
    first_call = {}
    for name, run in runs.items():
        start = time.perf_counter()
        run()
        first_call[name] = time.perf_counter() - start
    # The reference loop is slow: timed once, in full on the first n_ref examples (after
    # a warm-up on 4), between the repeats of the others.
    torch_reference(model, torch_images[:4], N_AUG)
    load_before = os.getloadavg()
    first = max(1, repeats // 2)
    times = time_interleaved(runs, first)
    start = time.perf_counter()
    torch_reference(model, torch_images[:n_ref], N_AUG)
    reference_s = time.perf_counter() - start
    if repeats > first:
        for name, t in time_interleaved(runs, repeats - first).items():
            times[name] += t
    rows = {name: summarize(t) for name, t in times.items()}
    rows["torch_reference"] = summarize([reference_s])
    medians = {name: row["median_s"] for name, row in rows.items()}
    counts = {name: n_ref if name == "torch_reference" else n for name in rows}
    per_example = {name: medians[name] / counts[name] for name in rows}
    return {"N": n, "N_reference": n_ref, "n_aug": N_AUG, "layers": list(UNIT_LAYERS),
            "batch_examples": {"memjax": MEMJAX_BATCH,
                               "torch_batched": BATCH, "torch_batched_batch16": 16,
                               "diagnostics": BATCH},
            "encoder": CONFIG.describe() + " on 32x32x3, random init (key 0)",
            "data": "sklearn digits 8x8 upsampled 4x (nearest) to 32x32, repeated to 3 "
                    "channels, in [0, 1]; the first N",
            "reference_timed": f"once, in full, on the first {n_ref} of the N examples; "
                               "compared by examples/s (its cost is linear in N: a Python "
                               "loop over examples, scoring is negligible)",
            "rows": rows, "examples_counted": counts,
            "examples_per_s": {k: 1.0 / v for k, v in per_example.items()},
            "first_call_s": first_call,
            "compile_s": {"memjax": first_call["memjax"] - medians["memjax"]},
            "views_alone": views_alone(per_example),
            "speedup_vs_reference": per_example["torch_reference"] / per_example["memjax"],
            # Against the best batched PyTorch row of this run (64 or 16 examples a block).
            "best_torch_batched": min(("torch_batched", "torch_batched_batch16"),
                                      key=per_example.get),
            "speedup_vs_torch_batched": min(per_example["torch_batched"],
                                            per_example["torch_batched_batch16"])
            / per_example["memjax"],
            "forward_flops": forward_flops(), "flops_per_example": N_AUG * forward_flops(),
            "agreement": agreement, "load_average_before_timing": load_before,
            "load_average_after_timing": os.getloadavg(), "_per_example": per_example}


def add_floor(result: dict, peak: float) -> None:
    per_example = result.pop("_per_example")
    result["peak_flops"] = peak
    result["floor_s_per_example"] = result["flops_per_example"] / peak
    result["fraction_of_floor"] = {k: result["floor_s_per_example"] / v
                                   for k, v in per_example.items()}
    result["goal_50x_vs_reference_met"] = result["speedup_vs_reference"] >= 50
    result["goal_1_5x_vs_batched_met"] = result["speedup_vs_torch_batched"] >= 1.5


# ---- LayerMem -------------------------------------------------------------------------------

def bench_layermem(quick: bool, repeats: int) -> dict:
    from memjax.memorization._sslmem import layermem

    data = digits32(128 if quick else LAYERMEM_N)
    params_f = jax.tree.map(np.asarray, CONFIG.init(jax.random.key(1)))
    params_g = jax.tree.map(np.asarray, CONFIG.init(jax.random.key(2)))
    run = functools.partial(layermem, encoder_model(params_f, CONFIG),
                            encoder_model(params_g, CONFIG), data, views_fn=SimCLRView(),
                            n_aug=LAYERMEM_AUG, batch_size=BATCH,
                            progress=False)
    runs = {"one_pass": lambda: run(layers=ALL_LAYERS),
            "per_layer": lambda: [run(layers=(name,)) for name in ALL_LAYERS]}
    outs = {name: fn() for name, fn in runs.items()}  # also compiles
    diffs = {}
    for j, (name, single) in enumerate(zip(ALL_LAYERS, outs["per_layer"], strict=True)):
        for key in ("loss_f", "loss_g", "raw"):
            np.testing.assert_allclose(outs["one_pass"][key][:, j], single[key][:, 0],
                                       rtol=1e-5, atol=1e-6)
        diffs[name] = float(np.abs(outs["one_pass"]["raw"][:, j] - single["raw"][:, 0]).max())
    times = time_interleaved(runs, repeats)
    rows = {name: summarize(t) for name, t in times.items()}
    return {"N": len(data["id"]), "n_aug": LAYERMEM_AUG, "layers": list(ALL_LAYERS),
            "views_per_example_per_model": 2 * LAYERMEM_AUG, "rows": rows,
            "raw_max_abs_diff_per_layer": diffs,
            "per_layer_over_one_pass": rows["per_layer"]["median_s"]
            / rows["one_pass"]["median_s"]}


# ---- main -----------------------------------------------------------------------------------

def print_table(unit: dict, layer: dict) -> None:
    print(f"UnitMem N={unit['N']} (reference: first {unit['N_reference']}) "
          f"n_aug={unit['n_aug']} layers={unit['layers']}")
    for name, row in unit["rows"].items():
        print(f"  {name:24s} {row['median_s']:8.3f} s  spread {row['spread']:4.0%}  "
              f"{unit['examples_per_s'][name]:9.1f} ex/s  "
              f"floor fraction {unit['fraction_of_floor'][name]:6.1%}")
    print(f"  memjax vs reference {unit['speedup_vs_reference']:.1f}x (goal 50x: "
          f"{'met' if unit['goal_50x_vs_reference_met'] else 'NOT met'}); vs torch batched "
          f"{unit['speedup_vs_torch_batched']:.2f}x ({unit['best_torch_batched']}; goal 1.5x: "
          f"{'met' if unit['goal_1_5x_vs_batched_met'] else 'NOT met'})")
    views = unit["views_alone"]
    print(f"  views alone: JAX {views['jax_examples_per_s']:.0f} ex/s, torch "
          f"{views['torch_examples_per_s']:.0f} ex/s ({views['jax_over_torch']:.2f}x)")
    print(f"LayerMem N={layer['N']} n_aug={layer['n_aug']}: one pass "
          f"{layer['rows']['one_pass']['median_s']:.3f} s, per layer "
          f"{layer['rows']['per_layer']['median_s']:.3f} s, ratio "
          f"{layer['per_layer_over_one_pass']:.2f}x")


def smoke(n: int = BATCH, repeats: int = 3) -> None:
    """The views alone on ``n`` examples (one block), timed ``repeats`` times; prints only."""
    import torch

    set_torch_threads()
    data = digits32(n)
    torch_images = torch.from_numpy(data["image"].transpose(0, 3, 1, 2).copy())
    runs = view_runs(data, torch_images)
    for run in runs.values():
        run()  # compile / warm up
    load = os.getloadavg()
    times = time_interleaved(runs, repeats)
    per_example = {name: summarize(t)["median_s"] / n for name, t in times.items()}
    row = views_alone(per_example)
    print(f"views alone (smoke), {n} examples x {N_AUG} views, {repeats} repeats, load "
          f"{load[0]:.1f} before / {os.getloadavg()[0]:.1f} after: JAX "
          f"{row['jax_examples_per_s']:.0f} ex/s, torch {row['torch_examples_per_s']:.0f} "
          f"ex/s, JAX/torch {row['jax_over_torch']:.2f}x")


def main() -> None:
    if "--smoke" in sys.argv[1:]:
        smoke()
        return
    quick = "--quick" in sys.argv[1:]
    start = time.perf_counter()
    set_torch_threads()
    machine = machine_ceilings(quick)
    unit = bench_unitmem(quick, repeats=3 if quick else 5)
    layer = bench_layermem(quick, repeats=3 if quick else 5)
    peak = finish_ceilings(machine, quick)
    add_floor(unit, peak)
    machine["load_average_end"] = os.getloadavg()
    machine["total_wall_s"] = time.perf_counter() - start
    path = write_json(result_name("memorization", quick),
                      {"machine": machine, "unitmem": unit, "layermem": layer})
    print_table(unit, layer)
    print(f"peak {peak / 1e9:.1f} GFLOP/s; load {machine['load_average_end']}; "
          f"{machine['total_wall_s']:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
