"""Diffusion membership features (issue 16): memjax vs diffusers PyTorch, examples/s.

One run, the same weights in both frameworks: a diffusers ``UNet2DModel`` with random
weights (``torch.manual_seed``, diffusers' own init) saved by ``save_pretrained`` and opened
by ``memjax.load``. Two sizes: a digit DDPM (16×16×1, channels (32, 64), attention at the
lower level, as the audit's demo) and a CIFAR-like one (32×32×3, channels (64, 128)), both
``layers_per_block=1``, norm groups 8, linear β schedule with T = 1000.

Features (their definitions: :mod:`memjax.signals._diffusion`):
- ``loss``: the denoising loss at timesteps 100, 300, 500 with K = 4 draws (12 forwards).
- ``secmi``: SecMI's t-error, t = 100, stride 10 (10 inversion steps + 2: 12 forwards,
  sequential).
- ``pia``: PIA and PIAN at t = 200, p = 4 (ε_θ(x₀, 0), then two forwards: 3).

Rows, timed per feature, interleaved (A B C A B C ...), warm:
- ``memjax``: ``memjax.mia.diffusion_features(model, source, features=(f,), ...)`` through
  the engine (vmapped per example, ``batch_size=B``).
- ``torch_cdi``: written the way CDI's feature extractors
  (unknowndi/dataset_inference_diffusion_models, ``src/attacks/features_extraction``) batch
  the work: the multiple-loss extractor runs one forward of the whole batch per timestep
  (repeated K times here, CDI's ``n_repetitions``); SecMI one forward of the batch per
  DDIM step; PIA three forwards of the batch; results moved to the host per call
  (``.cpu()``); ``torch.no_grad()`` (the extractors do not show their grad mode; no_grad
  is the generous reading). CDI's CIFAR config batches 128 images; here both peers and
  memjax use the same B (64 digits, 16 CIFAR-like images: the run must stay short).
- ``torch_batched``: the fair peer: every independent forward of a batch stacked into one
  (loss: the B·T·K noisy inputs with per-row timesteps; PIA: the PIA and PIAN inputs
  together, 2B); SecMI is sequential by nature, so it is one forward of the batch per step
  as in CDI; ``torch.inference_mode()``.

Both PyTorch peers compute memjax's definitions (mean of squares for the loss, CDI's code
reports the L2 norm; PIAN's normalisation as the PIA paper, see ``gaussian_normalized``),
so values can be compared; the work is the same.

Noise: memjax draws each example's noise from ``fold_in(fold_in(key(seed), id), stream)``;
this script draws the same arrays with the same calls and feeds them (NHWC → NCHW) to the
PyTorch peers, so features are compared on identical noise, example by example, before
anything is timed (``agreement`` in the JSON: max |diff| / max |memjax value| per column).

FLOP floor: the UNet forward's FLOPs per image counted from memjax's jaxpr (every
``dot_general``: 2·|out|·|contracted|; every ``conv_general_dilated``: 2·|out|·kh·kw·C_in /
groups; elementwise work, norms and softmax left out, as the other benchmarks), times the
forwards per example of each feature, over the float32 matmul peak measured in the same run
(start and end, the better). XLA's ``cost_analysis`` flops of the same forward (which count
elementwise work too) are recorded beside it.

Run: ``PYTHONPATH=. python -m bench.diffusion_features [--quick]`` (writes
``bench/results/diffusion_features[_quick].json``).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.extend.core import jaxprs_in_params  # noqa: E402

from bench.common import (  # noqa: E402
    finish_ceilings,
    machine_ceilings,
    result_name,
    set_torch_threads,
    summarize,
    time_interleaved,
    write_json,
)

SEED = 0
TIMESTEPS = (100, 300, 500)
NOISE_DRAWS = 4
SECMI_T, SECMI_INTERVAL = 100, 10
PIA_T, PIA_P = 200, 4.0
FEATURES = ("loss", "secmi", "pia")
AGREEMENT_TOL = 1e-3  # relative to max |value|: float32 UNets in two frameworks, up to
#                      12 chained DDIM steps (SecMI); observed differences are far smaller

MODELS = {
    "digits_16x16x1": dict(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
        attention_head_dim=8),
    "cifar_32x32x3": dict(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(64, 128),
        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
        attention_head_dim=8),
}
#: (examples N, batch B, timed repeats) per model; --quick: tiny
SIZES = {"digits_16x16x1": (64, 64, 3), "cifar_32x32x3": (16, 16, 3)}
QUICK_SIZES = {"digits_16x16x1": (8, 4, 1), "cifar_32x32x3": (4, 4, 1)}


def forwards_per_example(feature: str) -> int:
    """UNet forwards one example needs for ``feature`` (same count in every row)."""
    if feature == "loss":
        return len(TIMESTEPS) * NOISE_DRAWS
    if feature == "secmi":
        return SECMI_T // SECMI_INTERVAL + 2
    if feature == "pia":
        return 3
    raise ValueError(feature)


# ------------------------------------------------------------------------------ FLOPs


def _jaxpr_matmul_flops(jaxpr) -> float:
    """2·m·n·k of every dot_general and convolution in ``jaxpr`` (recursing into calls)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            k = math.prod(lhs[d] for d in lhs_contract)
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * k
        elif name == "conv_general_dilated":
            dn = eqn.params["dimension_numbers"]
            rhs = eqn.invars[1].aval.shape
            spec = dn.rhs_spec  # (out feature dim, in feature dim, *spatial dims)
            window = math.prod(rhs[d] for d in spec[2:])
            c_in = rhs[spec[1]]  # already divided by feature_group_count
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * window * c_in
        for sub in jaxprs_in_params(eqn.params):
            total += _jaxpr_matmul_flops(sub)
    return total


def forward_flops(model, shape: tuple[int, ...]) -> dict[str, float]:
    """FLOPs of one UNet forward on one image [H, W, C] (analytic matmul/conv count, and
    XLA's cost_analysis of the compiled forward)."""
    inputs = {"sample": jnp.zeros(shape, jnp.float32), "timestep": jnp.asarray(100, jnp.int32)}
    closed = jax.make_jaxpr(model.apply)(model.params, inputs)
    analytic = _jaxpr_matmul_flops(closed.jaxpr)
    cost = jax.jit(model.apply).lower(model.params, inputs).compile().cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    return {"matmul_conv_flops": analytic, "xla_cost_analysis_flops": float(cost["flops"])}


# ------------------------------------------------------------------------------ noise


def memjax_noise(n: int, stream: str, draws: int, shape: tuple[int, ...]) -> np.ndarray:
    """[N, draws, H, W, C]: the noise memjax's ``DiffusionFeatureFn`` draws for examples
    with ids 0..N-1 (same calls as there)."""
    from memjax.mia._diffusion import STREAMS

    def one(i):
        key = jax.random.fold_in(jax.random.key(SEED), i)
        return jax.random.normal(jax.random.fold_in(key, STREAMS[stream]), (draws, *shape),
                                 jnp.float32)
    return np.asarray(jax.vmap(one)(jnp.arange(n, dtype=jnp.int32)))


# ------------------------------------------------------------------------------ PyTorch


class TorchFeatures:
    """The two PyTorch peers over one diffusers model (NCHW tensors, x₀ in [-1, 1])."""

    def __init__(self, unet, alphas_cumprod: np.ndarray):
        import torch

        self.torch = torch
        self.unet = unet
        self.abar = [float(a) for a in alphas_cumprod]

    def eps(self, x, t):
        torch = self.torch
        if isinstance(t, int):
            t = torch.full((x.shape[0],), t, dtype=torch.long)
        return self.unet(x, t).sample

    def noisy(self, x0, noise, t):
        a = self.abar[t]
        return math.sqrt(a) * x0 + math.sqrt(1 - a) * noise

    # CDI-style: one forward of the whole batch per (repetition, timestep) / per step
    def loss_cdi(self, x0, noise):
        """noise [B, K, C, H, W] -> [B, T] mean over K of the per-element mean square."""
        torch = self.torch
        with torch.no_grad():
            per_rep = []
            for k in range(noise.shape[1]):
                rows = []
                for t in TIMESTEPS:
                    pred = self.eps(self.noisy(x0, noise[:, k], t), t)
                    rows.append(((pred - noise[:, k]) ** 2).flatten(1).mean(1).cpu())
                per_rep.append(torch.stack(rows, 1))
            return torch.stack(per_rep, 0).mean(0)

    def ddim_step(self, x, t_from, t_to):
        a_from, a_to = self.abar[t_from], self.abar[t_to]
        e = self.eps(x, t_from)
        x0_hat = (x - math.sqrt(1 - a_from) * e) / math.sqrt(a_from)
        return math.sqrt(a_to) * x0_hat + math.sqrt(1 - a_to) * e

    def secmi(self, x0, grad_free):
        with grad_free():
            x = x0
            for start in range(0, SECMI_T, SECMI_INTERVAL):
                x = self.ddim_step(x, start, start + SECMI_INTERVAL)
            forward = self.ddim_step(x, SECMI_T, SECMI_T + SECMI_INTERVAL)
            back = self.ddim_step(forward, SECMI_T + SECMI_INTERVAL, SECMI_T)
            return ((back - x) ** 2).flatten(1).sum(1).cpu()

    def _lp(self, diff):
        return (diff.abs().flatten(1) ** PIA_P).sum(1) ** (1 / PIA_P)

    def _gauss(self, e):
        return e / e.abs().flatten(1).mean(1).view(-1, 1, 1, 1) * math.sqrt(2 / math.pi)

    def pia_cdi(self, x0):
        torch = self.torch
        with torch.no_grad():
            e0 = self.eps(x0, 0)
            pia = self._lp(self.eps(self.noisy(x0, e0, PIA_T), PIA_T) - e0).cpu()
            en = self._gauss(e0)
            pian = self._lp(self.eps(self.noisy(x0, en, PIA_T), PIA_T) - en).cpu()
            return torch.stack([pia, pian], 1)

    # fair: all independent forwards of a batch stacked into one
    def loss_batched(self, x0, noise):
        torch = self.torch
        with torch.inference_mode():
            b, k = noise.shape[:2]
            chw = noise.shape[2:]
            eps = noise.unsqueeze(1).expand(b, len(TIMESTEPS), k, *chw)  # [B, T, K, C, H, W]
            sa = torch.tensor([math.sqrt(self.abar[t]) for t in TIMESTEPS]).view(1, -1, 1, 1,
                                                                                1, 1)
            sb = torch.tensor([math.sqrt(1 - self.abar[t]) for t in TIMESTEPS]).view(
                1, -1, 1, 1, 1, 1)
            x_t = sa * x0.view(b, 1, 1, *chw) + sb * eps
            ts = torch.tensor(TIMESTEPS, dtype=torch.long).view(1, -1, 1).expand(b, -1, k)
            pred = self.unet(x_t.reshape(-1, *chw), ts.reshape(-1)).sample
            err = ((pred.reshape(b, len(TIMESTEPS), k, -1) - eps.reshape(b, len(TIMESTEPS), k,
                                                                       -1)) ** 2).mean(-1)
            return err.mean(-1)

    def pia_batched(self, x0):
        torch = self.torch
        with torch.inference_mode():
            e0 = self.eps(x0, 0)
            both = torch.cat([e0, self._gauss(e0)])
            pred = self.eps(self.noisy(torch.cat([x0, x0]), both, PIA_T), PIA_T)
            d = self._lp(pred - both)
            b = x0.shape[0]
            return torch.stack([d[:b], d[b:]], 1)


def torch_rows(peer: TorchFeatures, images: np.ndarray, loss_noise: np.ndarray, batch: int):
    """{feature: {row: callable returning {column: [N] numpy}}} for the two PyTorch peers."""
    import torch

    x0_all = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)
    noise_all = torch.from_numpy(loss_noise.transpose(0, 1, 4, 2, 3).copy())
    n = x0_all.shape[0]
    starts = range(0, n, batch)

    def loss(method):
        def run():
            out = torch.cat([method(x0_all[s:s + batch], noise_all[s:s + batch])
                             for s in starts]).numpy()
            return {f"loss_t{t}": out[:, i] for i, t in enumerate(TIMESTEPS)}
        return run

    def secmi(grad_free):
        def run():
            out = torch.cat([peer.secmi(x0_all[s:s + batch], grad_free) for s in starts])
            return {"secmi": out.numpy()}
        return run

    def pia(method):
        def run():
            out = torch.cat([method(x0_all[s:s + batch]) for s in starts]).numpy()
            return {"pia": out[:, 0], "pian": out[:, 1]}
        return run

    return {
        "loss": {"torch_cdi": loss(peer.loss_cdi), "torch_batched": loss(peer.loss_batched)},
        "secmi": {"torch_cdi": secmi(torch.no_grad),
                  "torch_batched": secmi(torch.inference_mode)},
        "pia": {"torch_cdi": pia(peer.pia_cdi), "torch_batched": pia(peer.pia_batched)},
    }


def forward_rows(hf, model, shape: tuple[int, ...], images: int, repeats: int) -> dict:
    """Diagnostic: the UNet forward alone on ``images`` noisy inputs (timestep 100), the
    port ``jax.jit(jax.vmap(model.apply))`` vs diffusers under ``torch.inference_mode()``:
    how much of each feature row's time is the network itself."""
    import torch

    x = np.random.default_rng(2).standard_normal((images, *shape)).astype(np.float32)
    t = np.full((images,), 100, np.int32)
    forward = jax.jit(jax.vmap(lambda p, s, ts: model.apply(p, {"sample": s, "timestep": ts}),
                               in_axes=(None, 0, 0)))
    xj, tj = jnp.asarray(x), jnp.asarray(t)
    xt, tt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t.astype(
        np.int64))

    def torch_forward():
        with torch.inference_mode():
            return hf(xt, tt).sample

    ours = np.asarray(forward(model.params, xj, tj))
    theirs = torch_forward().numpy().transpose(0, 2, 3, 1)
    rel = float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-12))
    times = time_interleaved({"jax_jit_vmap": lambda: forward(model.params, xj,
                                                              tj).block_until_ready(),
                              "torch_inference_mode": torch_forward}, repeats)
    return {"images": images, "agreement_rel_max": rel,
            "rows": {row: {**summarize(ts), "images_per_s": images / statistics.median(ts)}
                     for row, ts in times.items()}}


# ------------------------------------------------------------------------------ one model


def build_pair(config: dict, folder: str):
    """diffusers UNet2DModel (random init, seed 0) saved to ``folder``, and memjax.load."""
    import torch
    from diffusers import UNet2DModel

    import memjax

    torch.manual_seed(0)
    hf = UNet2DModel(**config).eval()
    hf.save_pretrained(folder)
    return hf, memjax.load(folder)


def bench_model(name: str, config: dict, quick: bool) -> dict:
    import memjax
    from memjax.mia import diffusion_features
    from memjax.signals import make_schedule

    n, batch, repeats = (QUICK_SIZES if quick else SIZES)[name]
    size, channels = config["sample_size"], config["in_channels"]
    shape = (size, size, channels)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    source = {"image": images, "id": np.arange(n, dtype=np.int64)}
    schedule = make_schedule("linear")

    with tempfile.TemporaryDirectory() as folder:
        hf, model = build_pair(config, folder)
    assert isinstance(model, memjax.Model)
    peer = TorchFeatures(hf, np.asarray(schedule.alphas_cumprod))
    loss_noise = memjax_noise(n, "loss", NOISE_DRAWS, shape)
    rows = torch_rows(peer, images, loss_noise, batch)

    def memjax_row(feature):
        def run():
            out = diffusion_features(
                model, source, schedule=schedule, features=(feature,), timesteps=TIMESTEPS,
                noise_draws=NOISE_DRAWS, seed=SEED, secmi_t=SECMI_T,
                secmi_interval=SECMI_INTERVAL, pia_t=PIA_T, pia_p=PIA_P, batch_size=batch,
                progress=False)
            out.pop("id")
            return out
        return run

    flops = forward_flops(model, shape)
    result = {"n_examples": n, "batch_size": batch, "repeats": repeats, "image_shape": shape,
              "config": config, "unet_params": sum(p.numel() for p in hf.parameters()),
              "forward_flops_per_image": flops, "features": {}}
    result["forward"] = forward_rows(hf, model, shape, batch * NOISE_DRAWS, repeats)
    for feature in FEATURES:
        runs = {"memjax": memjax_row(feature), **rows[feature]}
        compile_start = time.perf_counter()
        reference = runs["memjax"]()  # warm-up (compiles), and the values compared
        compile_s = time.perf_counter() - compile_start
        agreement = {}
        for row in ("torch_cdi", "torch_batched"):
            values = runs[row]()  # warm-up of the peer too
            for column, ref in reference.items():
                scale = max(float(np.max(np.abs(ref))), 1e-12)
                rel = float(np.max(np.abs(values[column] - ref))) / scale
                agreement[f"{row}/{column}"] = rel
                if not rel <= AGREEMENT_TOL:
                    sys.exit(f"{name} {feature}: {row} {column} differs from memjax by "
                             f"{rel:.2e} (relative) > {AGREEMENT_TOL}")
        times = time_interleaved(runs, repeats)
        fwd = forwards_per_example(feature)
        entry = {"forwards_per_example": fwd, "agreement_rel_max": agreement,
                 "memjax_first_call_s": compile_s, "rows": {}}
        for row, ts in times.items():
            entry["rows"][row] = {**summarize(ts), "examples_per_s": n / statistics.median(ts)}
        entry["floor_flops_per_example"] = fwd * flops["matmul_conv_flops"]
        result["features"][feature] = entry
        print(f"{name} {feature}: " + ", ".join(
            f"{row} {e['examples_per_s']:.1f} ex/s" for row, e in entry["rows"].items())
            + f"; agreement max rel {max(agreement.values()):.1e}", flush=True)
    return result


def add_ratios(models: dict, peak: float) -> None:
    """× each peer (ratio of medians), fraction of peak, time / floor, per feature."""
    for entry_model in models.values():
        for entry in entry_model["features"].values():
            floor_s = entry["floor_flops_per_example"] / peak
            memjax_eps = entry["rows"]["memjax"]["examples_per_s"]
            for row in entry["rows"].values():
                s_per_example = 1.0 / row["examples_per_s"]
                row["time_over_floor"] = s_per_example / floor_s
                row["fraction_of_peak"] = floor_s / s_per_example
                row["memjax_speedup_over_this"] = memjax_eps / row["examples_per_s"]
            entry["floor_s_per_example"] = floor_s
        flops = entry_model["forward_flops_per_image"]["matmul_conv_flops"]
        for row in entry_model["forward"]["rows"].values():
            row["fraction_of_peak"] = flops * row["images_per_s"] / peak


def summary_table(models: dict) -> str:
    lines = ["| model | feature | row | ex/s | memjax × row | % of peak | time / floor | "
             "spread |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for name, entry_model in models.items():
        for feature, entry in entry_model["features"].items():
            for row, r in entry["rows"].items():
                lines.append(
                    f"| {name} | {feature} | {row} | {r['examples_per_s']:.1f} | "
                    f"{r['memjax_speedup_over_this']:.2f} | {100 * r['fraction_of_peak']:.1f} "
                    f"| {r['time_over_floor']:.2f} | {r['spread']:.2f} |")
    lines += ["", "| model | UNet forward alone | images/s | % of peak | spread |",
              "|---|---|---:|---:|---:|"]
    for name, entry_model in models.items():
        for row, r in entry_model["forward"]["rows"].items():
            lines.append(f"| {name} | {row} | {r['images_per_s']:.1f} | "
                         f"{100 * r['fraction_of_peak']:.1f} | {r['spread']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    args = parser.parse_args()
    start = time.perf_counter()
    set_torch_threads()
    machine = machine_ceilings(args.quick)
    models = {name: bench_model(name, config, args.quick)
              for name, config in MODELS.items()}
    peak = finish_ceilings(machine, args.quick)
    add_ratios(models, peak)
    table = summary_table(models)
    print(table)
    results = {
        "benchmark": "diffusion_features", "quick": args.quick, "machine": machine,
        "settings": {"timesteps": TIMESTEPS, "noise_draws": NOISE_DRAWS, "secmi_t": SECMI_T,
                     "secmi_interval": SECMI_INTERVAL, "pia_t": PIA_T, "pia_p": PIA_P,
                     "seed": SEED, "agreement_tol_rel": AGREEMENT_TOL,
                     "noise": "identical arrays (memjax's fold_in keys) fed to PyTorch"},
        "models": models, "table": table,
        "wall_s": time.perf_counter() - start,
        "load_average_end": os.getloadavg(),
    }
    path = write_json(result_name("diffusion_features", args.quick), results)
    print(f"wrote {path} ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
