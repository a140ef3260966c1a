"""Embedding-space PGD throughput on a ViT image tower: memjax vs PyTorch batched.

The attack of Kowalczuk et al. (2024) as :func:`memjax.robustness.encoder_robustness` runs
it: L∞ PGD in [0, 1] pixel units with the checkpoint's mean/std inside the forward,
maximising ||f(x + δ) − f(x)||₂ of the CLS representation (last hidden state, token 0), a
random start keyed per example, ``steps`` signed-gradient steps with projection. The model
is a random-weight Hugging Face ``ViTModel`` at ViT-Tiny's size (192-d, 12 layers, 3 heads,
MLP 768, patch 16, 224 px: 197 tokens), saved with its ``ViTImageProcessor`` and opened
with ``memjax.load``; PyTorch runs the same module in eval mode on the whole batch (one
summed objective: the examples' gradients are independent, ViT has no batch statistics).

Rows (timed interleaved after a warm-up that compiles): ``memjax`` (the engine's
sharded, vmapped per-example program through ``encoder_robustness``) and ``torch``
(batched). Both do the same work: one clean forward, ``steps`` forward+backward passes,
one forward of the adversarial image. Before timing, both attack the same images from the
same start (memjax's keyed starts, passed to PyTorch) for a few steps and the script
reports and checks their agreement: the fraction of pixels whose δ differs (a gradient
component whose float32 sign differs between the stacks moves a pixel by 2α) and the
relative difference of the final shifts.

Throughput = examples × steps / s. FLOP floor: a PGD step is a forward and a backward to
the INPUT only (neither stack computes weight gradients: JAX differentiates w.r.t. δ alone,
PyTorch's ``autograd.grad(objective, delta)`` runs only the nodes that reach δ). That
backward costs one matmul per weight matmul (dX = dY Wᵀ, the patch embedding included) and
two per activation-activation matmul of attention (QKᵀ and AV), so an attack costs
``(steps + 2) · F + steps · (F_weights + 2 · F_attention)`` FLOPs, F = F_weights +
F_attention counted from the architecture (2 per multiply-add; elementwise work left out);
floor seconds = FLOPs / the machine's measured float32 matmul peak (bench.common). Load
average is recorded.

    PYTHONPATH=. python -m bench.robustness_pgd            # ViT-Tiny, 224 px
    PYTHONPATH=. python -m bench.robustness_pgd --quick    # tiny sizes, checks the script

Writes ``bench/results/robustness_pgd.json`` (``robustness_pgd_quick.json`` with --quick).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import common

FULL = {"hidden": 192, "layers": 12, "heads": 3, "mlp": 768, "image": 224, "patch": 16,
        "batch": 16, "steps": 10, "repeats": 3}
QUICK = {"hidden": 32, "layers": 2, "heads": 4, "mlp": 64, "image": 32, "patch": 8,
         "batch": 4, "steps": 3, "repeats": 2}
EPSILON = 8 / 255
SEED = 0
#: Agreement before timing: float32 sign ties may flip a few pixels' steps, never many.
MAX_DIFFERING_PIXELS = 0.01
MAX_SHIFT_RELATIVE = 0.02


def build_vit(folder: str, size: dict):
    """A seeded random-weight HF ViTModel (no pooler) + ViTImageProcessor in ``folder``."""
    import torch
    import transformers

    config = transformers.ViTConfig(
        hidden_size=size["hidden"], num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"], intermediate_size=size["mlp"],
        image_size=size["image"], patch_size=size["patch"])
    torch.manual_seed(0)
    model = transformers.ViTModel(config, add_pooling_layer=False).eval()
    model.save_pretrained(folder)
    transformers.ViTImageProcessor(
        size={"height": size["image"], "width": size["image"]}).save_pretrained(folder)
    return model


def forward_flops(size: dict) -> tuple[float, float]:
    """FLOPs of one ViT forward (2 per multiply-add) as (weight matmuls: patch embedding,
    QKV and output projections, MLP; attention's activation-activation matmuls: scores
    and mixing)."""
    d, m, p = size["hidden"], size["mlp"], size["patch"]
    patches = (size["image"] // p) ** 2
    t = patches + 1
    weights = 2 * patches * (p * p * 3) * d + size["layers"] * (
        2 * t * d * 3 * d + 2 * t * d * d + 2 * 2 * t * d * m)
    attention = size["layers"] * 2 * 2 * t * t * d
    return float(weights), float(attention)


def attack_flops(size: dict, n: int, steps: int) -> float:
    """FLOPs of n attacks: steps + 2 forwards and steps input-gradient backwards each."""
    weights, attention = forward_flops(size)
    return n * ((steps + 2) * (weights + attention) + steps * (weights + 2 * attention))


def torch_attack(model, images: np.ndarray, delta0: np.ndarray, mean, std, *, epsilon: float,
                 step_size: float, steps: int):
    """Batched PGD in PyTorch: NCHW tensors; returns (δ [N, H, W, C], shift L2 [N])."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def encode(pixels):
        return model(pixel_values=(pixels - mean_t) / std_t).last_hidden_state[:, 0]

    with torch.no_grad():
        clean = encode(x)
    delta = torch.from_numpy(np.ascontiguousarray(delta0.transpose(0, 3, 1, 2)))
    for _ in range(steps):
        delta.requires_grad_(True)
        objective = torch.sum((encode(x + delta) - clean) ** 2)
        (grad,) = torch.autograd.grad(objective, delta)
        with torch.no_grad():
            delta = delta + step_size * torch.sign(grad)
            delta = torch.clamp(x + torch.clamp(delta, -epsilon, epsilon), 0.0, 1.0) - x
    with torch.no_grad():
        shift = torch.linalg.vector_norm(encode(x + delta) - clean, dim=1)
    return delta.detach().numpy().transpose(0, 2, 3, 1), shift.numpy()


def memjax_starts(images: np.ndarray, ids: np.ndarray, epsilon: float) -> np.ndarray:
    """The random starts encoder_robustness uses for radius number 0 (attack_keys)."""
    from memjax.robustness import attack_keys, random_start

    def start(image, example_id):
        key, _ = attack_keys(SEED, example_id, jnp.int32(0))
        return random_start(key, image, epsilon)

    return np.asarray(jax.vmap(start)(jnp.asarray(images), jnp.asarray(ids, jnp.int32)))


def memjax_delta(encoder, params, images, ids, *, epsilon, step_size, steps):
    """δ of memjax's embedding_pgd for each image (vmapped), for the agreement check."""
    from memjax.robustness import attack_keys, embedding_pgd

    def attack(image, example_id):
        key, _ = attack_keys(SEED, example_id, jnp.int32(0))
        return embedding_pgd(encoder, params, image, key, epsilon=epsilon,
                             step_size=step_size, steps=steps)

    return np.asarray(jax.jit(jax.vmap(attack))(jnp.asarray(images),
                                                jnp.asarray(ids, jnp.int32)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (checks the script)")
    parser.add_argument("--image-size", type=int, default=None, help="override the image side")
    parser.add_argument("--batch", type=int, default=None, help="override the examples")
    parser.add_argument("--steps", type=int, default=None, help="override the PGD steps")
    args = parser.parse_args()
    size = dict(QUICK if args.quick else FULL)
    for key, value in (("image", args.image_size), ("batch", args.batch),
                       ("steps", args.steps)):
        if value is not None:
            size[key] = value
    from memjax.convert import load
    from memjax.robustness import encoder_robustness, image_encoder

    load_start = os.getloadavg()
    threads = common.set_torch_threads()
    machine = common.machine_ceilings(args.quick)
    steps, n = size["steps"], size["batch"]
    step_size = 2.5 * EPSILON / steps
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(n, size["image"], size["image"], 3)).astype(np.float32)
    ids = np.arange(n, dtype=np.int64)
    with tempfile.TemporaryDirectory() as folder:
        torch_model = build_vit(folder, size)
        model = load(folder)
    encoder = image_encoder(model)
    mean, std = encoder.mean, encoder.std

    # Agreement before timing: same images, same starts, a few steps.
    check_steps = min(3, steps)
    check_n = min(4, n)
    ours = memjax_delta(encoder, model.params, images[:check_n], ids[:check_n],
                        epsilon=EPSILON, step_size=step_size, steps=check_steps)
    delta0 = memjax_starts(images[:check_n], ids[:check_n], EPSILON)
    theirs, _ = torch_attack(torch_model, images[:check_n], delta0, mean, std,
                             epsilon=EPSILON, step_size=step_size, steps=check_steps)
    differing = float(np.mean(np.abs(ours - theirs) > step_size / 2))
    data = {"image": images, "id": ids}
    run = {"epsilons": [EPSILON], "steps": steps, "step_size": step_size, "seed": SEED,
           "batch_size": n, "progress": False}
    ours_full = encoder_robustness(model, data, **run)["shift_l2"][:, 0]
    starts = memjax_starts(images, ids, EPSILON)
    _, theirs_full = torch_attack(torch_model, images, starts, mean, std, epsilon=EPSILON,
                                  step_size=step_size, steps=steps)
    shift_relative = float(np.max(np.abs(ours_full - theirs_full) / np.abs(theirs_full)))
    agreement = {"steps": check_steps, "examples": check_n,
                 "max_abs_delta_difference": float(np.max(np.abs(ours - theirs))),
                 "fraction_pixels_differing": differing,
                 "max_relative_shift_difference_full_attack": shift_relative}
    print("agreement:", agreement, flush=True)
    if differing > MAX_DIFFERING_PIXELS or shift_relative > MAX_SHIFT_RELATIVE:
        raise SystemExit(f"memjax and PyTorch attacks disagree: {agreement}")

    runs = {"memjax": lambda: encoder_robustness(model, data, **run),
            "torch": lambda: torch_attack(torch_model, images, starts, mean, std,
                                          epsilon=EPSILON, step_size=step_size, steps=steps)}
    times = common.time_interleaved(runs, size["repeats"])
    peak = common.finish_ceilings(machine, args.quick)
    flops = attack_flops(size, n, steps)
    rows = {}
    for name, values in times.items():
        summary = common.summarize(values)
        summary["examples_steps_per_s"] = n * steps / summary["median_s"]
        summary["fraction_of_peak"] = flops / summary["median_s"] / peak
        rows[name] = summary
        print(f"{name}: {summary['median_s']:.3f} s, {summary['examples_steps_per_s']:.1f} "
              f"examples×steps/s, {summary['fraction_of_peak']:.1%} of peak", flush=True)
    ratio = rows["torch"]["median_s"] / rows["memjax"]["median_s"]
    print(f"memjax / PyTorch throughput: {ratio:.2f}x (goal >= 1.5x)")
    payload = {"size": size, "epsilon": EPSILON, "step_size": step_size,
               "torch_threads": threads, "forward_flops": sum(forward_flops(size)),
               "attack_flops": flops, "floor_s": flops / peak, "rows": rows,
               "speedup_memjax_over_torch": ratio, "agreement": agreement,
               "load_average_start": load_start, "load_average_end": os.getloadavg(),
               "machine": machine, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                         time.gmtime())}
    path = common.write_json(common.result_name("robustness_pgd", args.quick), payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
