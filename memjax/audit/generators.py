"""The audit's image-generator sections: membership and dataset inference for a pixel-space
DDPM (CDI, Dubiński et al. 2025) and for a class-conditional image-token model (Kowalczuk
et al. 2025, "Privacy attacks on image autoregressive models").

- Diffusion: a small diffusers-layout ``UNet2DModel`` (memjax's port) trained as a DDPM
  (Ho et al. 2020) on a random half of 512 real 8×8 digits; every digit's CDI features
  (denoising losses at three timesteps with K noise draws, SecMI, PIA/PIAN) through
  :func:`memjax.mia.diffusion_features`; per-feature AUCs; CDI's dataset inference
  (scaler + logistic regression fitted on a fifth of each set, Welch t-test on the rest)
  for the members as the suspect set, and its false-positive check on two halves of the
  non-members. The digits stay at 8×8: upsampling them to 16×16 costs 4× the FLOPs and,
  at the same 1,000 training steps, gave weaker membership signal (best feature AUC 0.57
  vs 0.76, measured), so the demo would show less in more time.
- Image tokens: a k-means codebook over 2×2 patches (a VQ tokenizer without its decoder)
  turns each digit into 16 tokens; a tiny LlamaGen (memjax's port) is trained on a random
  half with class dropout; every digit's IAR features on conditional, unconditional and
  CFG-difference logits (:func:`memjax.mia.iar_features`); AUCs with and without the CFG
  difference; the IAR code's dataset inference (min-max scale, sum, Welch) and its
  false-positive check.

Both models are saved in the report (with the DDPM's ``scheduler_config.json``), so
``memjax mia diffusion|iar`` and ``memjax mia di`` reproduce the numbers from the CLI.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memjax.audit import member_mask
from memjax.audit.data import read_only
from memjax.audit.text import plot_p_values
from memjax.convert import from_port, save
from memjax.data import digits
from memjax.engine.store import write_parquet
from memjax.metrics import roc_auc
from memjax.mia import dataset_inference, diffusion_features, iar_features, smallest_n
from memjax.models.llamagen import LlamaGen, LlamaGenConfig
from memjax.models.unet2d import UNet2DConfig, UNet2DModel
from memjax.report import Section
from memjax.signals import make_schedule
from memjax.train.generators import (
    fit_denoiser,
    fit_token_model,
    patch_codebook,
    patch_tokens,
)

DIFFUSION_TITLE = "Image generators: CDI membership and dataset inference for a DDPM"
IAR_TITLE = "Image generators: membership and dataset inference for an image-token model"

#: A two-level UNet2DModel (8×8 -> 4×4, self-attention in the middle block), ~0.4M params.
DDPM_CONFIG = UNet2DConfig(
    in_channels=1, out_channels=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    layers_per_block=1, norm_num_groups=8, attention_head_dim=8, sample_size=8)
DDPM_EXAMPLES = 512  # the first 512 digits; a random half trains the DDPM
DDPM_TRAINING = {"steps": 600, "batch_size": 64, "learning_rate": 2e-3}  # 150 epochs
DDPM_FEATURES = {"features": ("loss", "secmi", "pia"), "timesteps": (50, 100, 200),
                 "noise_draws": 4}
DDPM_SCHEDULER = {"_class_name": "DDPMScheduler", "beta_schedule": "linear",
                  "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 1000,
                  "prediction_type": "epsilon"}

#: 2×2 patches of the 8×8 digits: a 4×4 token grid, 16 tokens per image.
PATCH, CODEBOOK = 2, 64
IAR_CONFIG = LlamaGenConfig(dim=64, n_layer=2, n_head=4, multiple_of=32, num_classes=10,
                            vocab_size=CODEBOOK, cls_token_num=1, block_size=16,
                            class_dropout_prob=0.1)
IAR_TRAINING = {"steps": 600, "batch_size": 64, "learning_rate": 3e-3}





def _merged(build, params) -> nnx.Module:
    return nnx.merge(nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(0))))[0], params)


def _build_unet(rngs: nnx.Rngs) -> UNet2DModel:
    return UNet2DModel(DDPM_CONFIG, rngs=rngs)


def _build_llamagen(rngs: nnx.Rngs) -> LlamaGen:
    return LlamaGen(IAR_CONFIG, rngs=rngs)


# Deterministic and the slowest part of the section (a minute of training): cached, so the
# audit and the tests that check it share one run per seed.
@functools.lru_cache(maxsize=4)
def ddpm_demo(seed: int = 0, progress: bool = False) -> dict:
    """Train the digit DDPM on a random half and compute every digit's CDI features.

    Returns (read-only, cached): ``member`` [N] bool, ``features`` {column: [N] float32}
    (lower = more likely member), ``module`` (the trained UNet2DModel), ``images``
    [N, 8, 8, 1] in [-1, 1], ``train_seconds``, ``feature_seconds``.
    """
    images = np.asarray(digits().arrays["image"][:DDPM_EXAMPLES], np.float32) * 2.0 - 1.0
    member = member_mask(len(images), seed)
    schedule = make_schedule(DDPM_SCHEDULER["beta_schedule"])
    start = time.perf_counter()
    params = fit_denoiser(jax.random.key(seed), jnp.asarray(images), jnp.asarray(member),
                          build=_build_unet, alphas_cumprod=jnp.asarray(schedule.alphas_cumprod),
                          **DDPM_TRAINING)
    module = _merged(_build_unet, jax.block_until_ready(params))
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    features = diffusion_features(from_port(module, DDPM_CONFIG), {"image": images},
                                  schedule=schedule, pixel_range="signed", seed=seed,
                                  batch_size=64, progress=progress, **DDPM_FEATURES)
    features.pop("id")
    return read_only({"member": member, "features": features, "module": module,
                    "images": images, "train_seconds": train_seconds,
                    "feature_seconds": time.perf_counter() - start})


@functools.lru_cache(maxsize=4)
def iar_demo(seed: int = 0, progress: bool = False) -> dict:
    """Tokenise the digits, train the tiny LlamaGen on a random half, compute every digit's
    IAR features.

    Returns (read-only, cached): ``member`` [N] bool, ``class_labels`` [N], ``input_ids``
    [N, 16], ``features`` {column: [N]} (higher = more likely member), ``module``,
    ``train_seconds``, ``feature_seconds``.
    """
    source = digits()
    images = np.asarray(source.arrays["image"], np.float32)
    labels = np.asarray(source.arrays["label"], np.int32)
    member = member_mask(len(images), seed)
    # The tokenizer is public (fitted on every digit), as a released VQ tokenizer would be.
    tokens = patch_tokens(images, patch_codebook(images, patch=PATCH, size=CODEBOOK, seed=seed),
                          patch=PATCH)
    start = time.perf_counter()
    params = fit_token_model(jax.random.key(seed), jnp.asarray(labels), jnp.asarray(tokens),
                             jnp.asarray(member), build=_build_llamagen,
                             null_class=IAR_CONFIG.num_classes,
                             class_dropout=IAR_CONFIG.class_dropout_prob, **IAR_TRAINING)
    module = _merged(_build_llamagen, jax.block_until_ready(params))
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    features = iar_features(from_port(module, IAR_CONFIG),
                            {"class_labels": labels, "input_ids": tokens}, batch_size=64,
                            progress=progress)
    features.pop("id")
    return read_only({"member": member, "class_labels": labels, "input_ids": tokens,
                    "features": features, "module": module, "train_seconds": train_seconds,
                    "feature_seconds": time.perf_counter() - start})


def feature_aucs(features: dict[str, np.ndarray], member: np.ndarray, *,
                 lower_is_member: bool) -> dict[str, float]:
    """AUC of each feature column as a membership score."""
    sign = -1.0 if lower_is_member else 1.0
    return {name: roc_auc(sign * np.asarray(v, np.float64), member)
            for name, v in features.items()}


def _matrix(features: dict[str, np.ndarray], sign: float = 1.0) -> np.ndarray:
    return sign * np.stack([np.asarray(v, np.float64) for v in features.values()], axis=1)


def diffusion_inference(demo: dict, seed: int = 0) -> dict:
    """CDI on the demo's features: members as the suspect set vs the non-members, and the
    false-positive check (two halves of the non-members)."""
    x, member = _matrix(demo["features"], -1.0), demo["member"]
    run = functools.partial(dataset_inference, method="cdi", seed=seed)
    return {"members": run(x[member], x[~member]),
            "false_positive": run(x[member], x[~member], false_positive=True)}


def iar_inference(demo: dict, columns: tuple[str, ...], seed: int = 0) -> dict:
    """The IAR code's dataset inference (min-max scale, sum, Welch) on ``columns``."""
    x = _matrix({c: demo["features"][c] for c in columns})
    member = demo["member"]
    run = functools.partial(dataset_inference, method="iar", seed=seed)
    return {"members": run(x[member], x[~member]),
            "false_positive": run(x[member], x[~member], false_positive=True)}


def _p_text(p: float) -> str:
    """A p-value for the report; one that underflows float64 is shown as a bound."""
    return f"{p:.3g}" if p > 0 else "< 1e-300"


def _best(aucs: dict[str, float], prefix: str = "") -> tuple[str, float]:
    name = max((k for k in aucs if k.startswith(prefix)), key=aucs.get)
    return name, aucs[name]


def diffusion_section(folder: Path, demo: dict, seed: int) -> Section:
    """The DDPM section of a finished :func:`ddpm_demo`."""
    save(demo["module"], DDPM_CONFIG, folder / "ddpm")
    (folder / "ddpm" / "scheduler_config.json").write_text(json.dumps(DDPM_SCHEDULER))
    member = demo["member"]
    write_parquet([{**demo["features"], "member": member}], folder / "ddpm_features.parquet")
    aucs = feature_aucs(demo["features"], member, lower_is_member=True)
    di = diffusion_inference(demo, seed)
    plot_p_values({"suspect = members": di["members"],
                   "false-positive check (non-members)": di["false_positive"]},
                  folder / "cdi_p_values.png")
    n_smallest = smallest_n(di["members"], 0.01)
    metrics = [("digits (8×8, real)", len(member)), ("members (training set)", int(member.sum())),
               ("UNet2DModel parameters",
                sum(int(v.size) for v in jax.tree.leaves(nnx.state(demo["module"])))),
               ("training steps (batch 64)", DDPM_TRAINING["steps"]),
               ("training seconds", round(demo["train_seconds"], 1)),
               ("feature seconds (all digits)", round(demo["feature_seconds"], 1))]
    metrics += [(f"{name} AUC", auc) for name, auc in aucs.items()]
    metrics += [("CDI p-value (members vs non-members)", _p_text(di['members'].p_value)),
                ("CDI smallest suspect set reaching p ≤ 0.01",
                 "not reached" if n_smallest is None else n_smallest),
                ("CDI p-value (false-positive check)", _p_text(di['false_positive'].p_value))]
    text = (f"A diffusers-layout UNet2DModel (memjax's port) trained as a DDPM (linear β, "
            f"T = 1000) for {DDPM_TRAINING['steps']} Adam steps on a random half of "
            f"{len(member)} real 8×8 digits. Per-digit CDI features (lower = more likely a "
            "member): the denoising loss at three timesteps with 4 noise draws, SecMI's "
            "DDIM step error and PIA/PIAN. CDI (Dubiński et al. 2025) fits a scaler and a "
            "logistic regression on a fifth of the suspect (members) and validation "
            "(non-members) sets and t-tests the rest (two-sided Welch); the curve is the mean "
            "p-value over random subsets of n examples per set. The false-positive check "
            "runs the same test on two halves of the non-members. Reproduce: memjax mia "
            "diffusion --model ddpm, then memjax mia di --method cdi.")
    return Section(DIFFUSION_TITLE, text, metrics, figures=[
        ("cdi_p_values.png", "CDI p-value vs the owner's examples per set")],
        files=[("ddpm", "the trained DDPM (memjax mia diffusion --model)"),
               ("ddpm_features.parquet", "every digit's CDI features and membership")])


def iar_section(folder: Path, demo: dict, seed: int) -> Section:
    """The image-token section of a finished :func:`iar_demo`."""
    save(demo["module"], IAR_CONFIG, folder / "llamagen")
    member = demo["member"]
    write_parquet([{"class_labels": demo["class_labels"], **demo["features"],
                    "member": member}], folder / "iar_features.parquet")
    aucs = feature_aucs(demo["features"], member, lower_is_member=False)
    no_cfg = tuple(k for k in aucs if not k.startswith("cfg_"))
    with_cfg = tuple(aucs)
    di = {"without": iar_inference(demo, no_cfg, seed), "with": iar_inference(demo, with_cfg,
                                                                             seed)}
    plot_p_values({"suspect = members (all features)": di["with"]["members"],
                   "false-positive check (non-members)": di["with"]["false_positive"]},
                  folder / "iar_p_values.png")
    metrics = [("digits (8×8, real)", len(member)), ("members (training set)", int(member.sum())),
               ("tokens per digit (2×2 patches, k-means codebook)",
                demo["input_ids"].shape[1]), ("codebook size", CODEBOOK),
               ("training steps (batch 64)", IAR_TRAINING["steps"]),
               ("training seconds", round(demo["train_seconds"], 1)),
               ("feature seconds (all digits)", round(demo["feature_seconds"], 1))]
    for kind in ("cond", "uncond", "cfg"):
        name, auc = _best(aucs, kind + "_")
        metrics.append((f"best {kind} feature ({name}) AUC", auc))
    metrics += [(f"{name} AUC", aucs[name]) for name in
                ("cond_loss", "uncond_loss", "cfg_loss", "cond_min_k_pp_0.2",
                 "cfg_min_k_pp_0.2") if name in aucs]
    for label, result in di.items():
        n_smallest = smallest_n(result["members"], 0.01)
        metrics += [(f"dataset inference p-value, {label} CFG features",
                     _p_text(result['members'].p_value)),
                    (f"smallest suspect set reaching p ≤ 0.01, {label} CFG features",
                     "not reached" if n_smallest is None else n_smallest),
                    (f"false-positive check p-value, {label} CFG features",
                     _p_text(result['false_positive'].p_value))]
    text = (f"Each real 8×8 digit becomes {demo['input_ids'].shape[1]} tokens (the nearest of "
            f"{CODEBOOK} k-means codewords of its 2×2 patches). A tiny LlamaGen (memjax's "
            f"port: {IAR_CONFIG.n_layer} layers, width {IAR_CONFIG.dim}, 2-D RoPE, class "
            "prefix) is trained with next-token loss and 10% class dropout on a random half. "
            "IAR features (Kowalczuk et al. 2025; higher = more likely a member): loss, zlib, "
            "hinge, Min-K%, Min-K%++, SURP and CAMIA on the conditional, unconditional "
            "(null class) and CFG-difference (cond − uncond) logits. Dataset inference as "
            "the IAR code: min-max scale each feature over both sets, sum, two-sided Welch; "
            "the curve is the mean p-value over resamples of n examples per set.")
    return Section(IAR_TITLE, text, metrics, figures=[
        ("iar_p_values.png", "Dataset inference p-value vs the owner's examples per set")],
        files=[("llamagen", "the trained image-token model (memjax mia iar --model)"),
               ("iar_features.parquet", "every digit's IAR features and membership")])


def generators_section(folder: Path, *, seed: int = 0, progress: bool = False
                       ) -> list[Section]:
    """Both generator demonstrations; two Sections."""
    folder = Path(folder)
    return [diffusion_section(folder, ddpm_demo(seed, progress), seed),
            iar_section(folder, iar_demo(seed, progress), seed)]
