"""Diffusion noise schedules and membership features against independent references.

- Schedules: equal to diffusers' DDPMScheduler / DDIMScheduler ``betas`` and
  ``alphas_cumprod`` value for value (float32), for every beta schedule and given betas.
- Features (denoising losses, SecMI, PIA/PIAN, gradient-masked loss, noise optimisation):
  equal to a float64 NumPy implementation written here from the papers' equations, on
  fresh random inputs with the same noise. The ε-network is one both can compute:
  ε(x, t, y) = tanh(W·vec(x) + b + U·emb(t) + E[y]) with emb the sinusoidal timestep
  features (diffusers' get_timestep_embedding defaults).
- Through the engine: noise keyed by example id, so 8 devices = 1 device, batch 3 =
  batch 8, and a resumed store gives the same features; the VAE path; bad inputs.
- ``memjax mia diffusion`` end to end on a tiny .npz, and its bad-input exits.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax import Model
from memjax.engine import ScoreStore, make_mesh
from memjax.errors import InputError
from memjax.mia import diffusion_features
from memjax.models.diffusion_layers import timestep_embedding
from memjax.signals import (
    denoising_losses,
    epsilon_from_prediction,
    gradient_masked_loss,
    make_schedule,
    noise_optimization,
    pia_scores,
    schedule_from_config,
    secmi_error,
)

SHAPE = (4, 4, 2)
N_ELEM = 32
EMB = 8
CLASSES = 3
# float32 JAX (a 32x32 matvec and tanh per ε evaluation) vs float64: relative differences
# measured over 85 seeds up to 2e-6; 2e-5 leaves a 10x margin, while a formula error is
# O(1e-2) or larger.
RTOL = 2e-5
# SecMI chains up to ~25 ε evaluations through DDIM steps that divide by √ᾱ_t, and its
# t-error is a small difference of two nearly equal states (cancellation): measured up to
# 1.2e-5 over 85 seeds; 2e-4 leaves a 16x margin.
SECMI_RTOL = 2e-4


# --------------------------------------------------------------------------- ε-network


def net_params(rng):
    return {"W": rng.normal(0, 1 / math.sqrt(N_ELEM), (N_ELEM, N_ELEM)),
            "b": rng.normal(0, 0.1, N_ELEM), "U": rng.normal(0, 0.3, (EMB, N_ELEM)),
            "E": rng.normal(0, 0.3, (CLASSES, N_ELEM))}


def emb_np(t):
    half = EMB // 2
    freqs = np.exp(-math.log(10_000.0) * np.arange(half) / (half - 1))
    return np.concatenate([np.sin(t * freqs), np.cos(t * freqs)])


def eps_np(p, x, t, y=None):
    pre = x.reshape(-1) @ p["W"] + p["b"] + emb_np(t) @ p["U"]
    if y is not None:
        pre = pre + p["E"][y]
    return np.tanh(pre).reshape(x.shape)


def eps_jax_apply(p, inputs):
    x = inputs["sample"]
    pre = (x.reshape(-1) @ p["W"] + p["b"]
           + timestep_embedding(inputs["timestep"][None], EMB)[0] @ p["U"])
    if "class_labels" in inputs:
        pre = pre + p["E"][inputs["class_labels"]]
    return jnp.tanh(pre).reshape(x.shape)


def jax_params(p):
    return {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}


def eps_fn_jax(p, y=None):
    params = jax_params(p)

    def eps(x, t):
        inputs = {"sample": x, "timestep": jnp.asarray(t, jnp.int32)}
        if y is not None:
            inputs["class_labels"] = jnp.asarray(y, jnp.int32)
        return eps_jax_apply(params, inputs)
    return eps


# --------------------------------------------------------------------------- references


def loss_ref(p, x0, noise, t, ab, y=None):
    a = ab[t]
    x_t = math.sqrt(a) * x0 + math.sqrt(1 - a) * noise
    return np.mean((noise - eps_np(p, x_t, t, y)) ** 2)


def ddim_ref(p, x, t_from, t_to, ab, y=None):
    e = eps_np(p, x, t_from, y)
    x0_hat = (x - math.sqrt(1 - ab[t_from]) * e) / math.sqrt(ab[t_from])
    return math.sqrt(ab[t_to]) * x0_hat + math.sqrt(1 - ab[t_to]) * e


def secmi_ref(p, x0, ab, t, k, y=None):
    x = x0
    for s in range(0, t, k):
        x = ddim_ref(p, x, s, s + k, ab, y)
    back = ddim_ref(p, ddim_ref(p, x, t, t + k, ab, y), t + k, t, ab, y)
    return np.sum((back - x) ** 2)


def pia_ref(p, x0, ab, t, norm_p, y=None):
    eps0 = eps_np(p, x0, 0, y)
    out = {}
    for name, e0 in (("pia", eps0),
                     ("pian", eps0 / np.mean(np.abs(eps0)) * math.sqrt(2 / math.pi))):
        x_t = math.sqrt(ab[t]) * x0 + math.sqrt(1 - ab[t]) * e0
        out[name] = np.sum(np.abs(eps_np(p, x_t, t, y) - e0) ** norm_p) ** (1 / norm_p)
    return out


def _pre_and_out(p, x, t, y):
    e = eps_np(p, x, t, y)
    return e, (1 - e.reshape(-1) ** 2)


def gm_ref(p, x0, noise, t, ab, fraction, y=None):
    a = ab[t]
    x_t = math.sqrt(a) * x0 + math.sqrt(1 - a) * noise
    e, dtanh = _pre_and_out(p, x_t, t, y)
    r = (e - noise).reshape(-1)
    grad = p["W"] @ (dtanh * r / np.linalg.norm(r))   # ∂‖r‖₂/∂vec(x_t)
    k = int(N_ELEM * fraction)
    mask = np.zeros(N_ELEM, bool)
    mask[np.argsort(-np.abs(grad))[:k]] = True
    mask = mask.reshape(x0.shape)
    masked = np.where(mask, noise, x0)
    residual = (noise - x0) - eps_np(p, masked, t, y)
    return np.mean(residual[mask] ** 2)


def noise_opt_ref(p, x0, noise, t, ab, steps, lr, y=None):
    a = ab[t]
    x_t = math.sqrt(a) * x0 + math.sqrt(1 - a) * noise
    delta = np.zeros_like(x_t)
    for _ in range(steps):
        e, dtanh = _pre_and_out(p, x_t + delta, t, y)
        # ∇_δ ½‖ε − ε_θ(x_t + δ)‖² = −Wᵀ-side chain rule: W @ (tanh' ⊙ (ε_θ − ε))
        delta = delta - lr * (p["W"] @ (dtanh * (e - noise).reshape(-1))).reshape(x_t.shape)
    loss = np.mean((noise - eps_np(p, x_t + delta, t, y)) ** 2)
    return loss, np.linalg.norm(delta)


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2", "trained"])
def test_schedules_equal_diffusers(kind, rng):
    from diffusers import DDIMScheduler, DDPMScheduler

    steps = int(rng.integers(50, 1200))
    start, end = float(rng.uniform(1e-5, 1e-3)), float(rng.uniform(0.01, 0.03))
    trained = (np.sort(rng.uniform(1e-4, 0.05, steps)).tolist() if kind == "trained" else None)
    config = {"num_train_timesteps": steps, "beta_start": start, "beta_end": end,
              "beta_schedule": "linear" if trained else kind, "trained_betas": trained}
    ours = schedule_from_config(config)
    for scheduler in (DDPMScheduler(**config), DDIMScheduler(**config)):
        np.testing.assert_array_equal(np.asarray(ours.betas, np.float32),
                                      scheduler.betas.numpy())
        np.testing.assert_array_equal(np.asarray(ours.alphas_cumprod, np.float32),
                                      scheduler.alphas_cumprod.numpy())
    assert ours.name == kind and hash(ours) == hash(schedule_from_config(config))


def test_scheduler_configs_accepted_and_refused():
    from diffusers import DDIMScheduler, DDPMScheduler

    # diffusers' own saved configs (every key they write) are accepted.
    for scheduler in (DDPMScheduler(), DDIMScheduler(beta_schedule="scaled_linear")):
        config = json.loads(scheduler.to_json_string())
        ours = schedule_from_config(config)
        np.testing.assert_array_equal(np.asarray(ours.alphas_cumprod, np.float32),
                                      scheduler.alphas_cumprod.numpy())
    for bad, message in [({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
                         ({"beta_schedule": "sigmoid"}, "'sigmoid' is not implemented"),
                         ({"prediction_type": "flow"}, "prediction_type"),
                         ({"karras_magic": 1}, "karras_magic"),
                         ({"num_train_timesteps": 0}, "num_train_timesteps")]:
        with pytest.raises(InputError, match=message):
            schedule_from_config(bad)


def test_prediction_conversions_are_exact(rng):
    x0, eps = rng.normal(size=SHAPE), rng.normal(size=SHAPE)
    for kind in ("v_prediction", "sample"):
        schedule = make_schedule("linear", prediction_type=kind)
        t = int(rng.integers(1, 1000))
        a = schedule.alphas_cumprod[t]
        x_t = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
        prediction = (math.sqrt(a) * eps - math.sqrt(1 - a) * x0 if kind == "v_prediction"
                      else x0)
        got = epsilon_from_prediction(jnp.asarray(prediction, jnp.float32),
                                      jnp.asarray(x_t, jnp.float32), t, schedule)
        # float32 inputs; the conversion divides by √(1−ᾱ) ≥ 0.01 for "sample".
        np.testing.assert_allclose(np.asarray(got), eps, rtol=0, atol=1e-4)


# --------------------------------------------------------------------------- features


def test_features_equal_float64_reference(rng):
    p = net_params(rng)
    schedule = make_schedule(str(rng.choice(["linear", "squaredcos_cap_v2"])))
    ab = np.asarray(schedule.alphas_cumprod, np.float64)
    x0 = rng.uniform(-1, 1, SHAPE).astype(np.float32).astype(np.float64)
    y = int(rng.integers(CLASSES))
    eps = eps_fn_jax(p, y)
    ts = sorted(rng.choice(np.arange(1, 1000), 2, replace=False).tolist())
    noises = rng.normal(size=(3, *SHAPE)).astype(np.float32)
    x0j = jnp.asarray(x0, jnp.float32)

    got = np.asarray(denoising_losses(eps, x0j, jnp.asarray(noises), ts, schedule))
    want = [[loss_ref(p, x0, n.astype(np.float64), t, ab, y) for n in noises] for t in ts]
    np.testing.assert_allclose(got, want, rtol=RTOL)

    k = int(rng.choice([5, 10, 20]))
    t_sec = k * int(rng.integers(2, 8))
    np.testing.assert_allclose(secmi_error(eps, x0j, schedule, t=t_sec, interval=k),
                               secmi_ref(p, x0, ab, t_sec, k, y), rtol=SECMI_RTOL)

    t_pia, norm_p = int(rng.integers(50, 400)), float(rng.choice([1.0, 2.0, 4.0]))
    got = pia_scores(eps, x0j, schedule, t=t_pia, p=norm_p)
    want = pia_ref(p, x0, ab, t_pia, norm_p, y)
    for name in ("pia", "pian"):
        np.testing.assert_allclose(got[name], want[name], rtol=RTOL, err_msg=name)

    noise = noises[0].astype(np.float64)
    fraction = float(rng.uniform(0.1, 0.5))
    np.testing.assert_allclose(
        gradient_masked_loss(eps, x0j, jnp.asarray(noises[0]), ts[0], schedule,
                             fraction=fraction),
        gm_ref(p, x0, noise, ts[0], ab, fraction, y), rtol=RTOL)

    steps, lr = int(rng.integers(1, 6)), float(rng.uniform(0.01, 0.2))
    got = noise_optimization(eps, x0j, jnp.asarray(noises[0]), ts[1], schedule, steps=steps,
                             learning_rate=lr)
    loss, delta = noise_opt_ref(p, x0, noise, ts[1], ab, steps, lr, y)
    np.testing.assert_allclose(got["loss"], loss, rtol=RTOL)
    np.testing.assert_allclose(got["delta"], delta, rtol=RTOL)
    assert float(got["loss"]) < loss_ref(p, x0, noise, ts[1], ab, y)  # the steps helped


# --------------------------------------------------------------------------- through the engine


def _source(rng, n=8):
    return {"image": rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8),
            "label": rng.integers(0, CLASSES, n).astype(np.int32),
            "id": (1000 + 7 * np.arange(n)).astype(np.int64)}


def _model(p, conditional=True):
    inputs = ("sample", "timestep", "class_labels") if conditional else ("sample", "timestep")
    return Model.from_apply(eps_jax_apply, jax_params(p), kind="diffusion", inputs=inputs,
                            name="tiny_eps")


SETTINGS = dict(timesteps=(30, 250), noise_draws=2, secmi_t=20, secmi_interval=10, pia_t=150,
                gm_fraction=0.25, noise_opt_t=80, noise_opt_steps=2, noise_opt_lr=0.1,
                progress=False)


def _noise(seed, example_id, stream, n):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), example_id), stream)
    return np.asarray(jax.random.normal(key, (n, *SHAPE), jnp.float32), np.float64)


def test_engine_features_keyed_by_id_match_reference(rng, seed):
    p = net_params(rng)
    data = _source(rng)
    schedule = make_schedule("linear")
    ab = np.asarray(schedule.alphas_cumprod, np.float64)
    feature_seed = int(rng.integers(1000))
    out = diffusion_features(_model(p), data, schedule=schedule, seed=feature_seed,
                             batch_size=8, **SETTINGS)
    assert list(out) == ["id", "loss_t30", "loss_t250", "secmi", "pia", "pian", "gm_loss_t30",
                         "gm_loss_t250", "noise_opt_loss", "noise_opt_delta"]
    np.testing.assert_array_equal(out["id"], data["id"])
    for i in range(len(data["id"])):
        x0 = data["image"][i].astype(np.float64) / 127.5 - 1
        y, eid = int(data["label"][i]), int(data["id"][i])
        loss_noise = _noise(feature_seed, eid, 0, 2)
        want = {f"loss_t{t}": np.mean([loss_ref(p, x0, n, t, ab, y) for n in loss_noise])
                for t in (30, 250)}
        want["secmi"] = secmi_ref(p, x0, ab, 20, 10, y)
        want.update(pia_ref(p, x0, ab, 150, 4.0, y))
        gm_noise = _noise(feature_seed, eid, 1, 1)[0]
        want.update({f"gm_loss_t{t}": gm_ref(p, x0, gm_noise, t, ab, 0.25, y)
                     for t in (30, 250)})
        want["noise_opt_loss"], want["noise_opt_delta"] = noise_opt_ref(
            p, x0, _noise(feature_seed, eid, 2, 1)[0], 80, ab, 2, 0.1, y)
        for name, value in want.items():
            rtol = SECMI_RTOL if name == "secmi" else RTOL
            np.testing.assert_allclose(out[name][i], value, rtol=rtol, err_msg=f"{name} {i}")


def test_devices_batch_size_and_resume_invariance(rng, tmp_path, monkeypatch):
    p = net_params(rng)
    data = _source(rng, n=10)
    schedule = make_schedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
    model = _model(p)
    settings = {**SETTINGS, "features": ("loss", "pia")}
    eight = diffusion_features(model, data, schedule=schedule, batch_size=8, **settings)
    one = diffusion_features(model, data, schedule=schedule, batch_size=3,
                             mesh=make_mesh(devices=jax.devices()[:1]), **settings)
    # The same per-example program on other batch widths: XLA may vectorise the matvec
    # differently (float32 summation order), nothing more: measured up to 4e-7 relative
    # (every feature, 4 seeds); 5e-6 leaves a 12x margin.
    for name in eight:
        np.testing.assert_allclose(one[name], eight[name], rtol=5e-6, err_msg=name)

    # Interrupted after its first chunk, then resumed: identical to an uninterrupted run.
    written = []
    original = ScoreStore.write_chunk

    def interrupted(self, index, *rest, **kwargs):
        if written:
            raise KeyboardInterrupt
        written.append(index)
        return original(self, index, *rest, **kwargs)

    monkeypatch.setattr(ScoreStore, "write_chunk", interrupted)
    path = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        diffusion_features(model, data, schedule=schedule, batch_size=8,
                           store=ScoreStore(path, chunk_size=8), **settings)
    monkeypatch.setattr(ScoreStore, "write_chunk", original)
    assert written == [0]
    resumed = diffusion_features(model, data, schedule=schedule, batch_size=8,
                                 store=ScoreStore(path, chunk_size=8), **settings)
    for name in eight:
        np.testing.assert_array_equal(resumed[name], eight[name], err_msg=name)


def test_vae_latents_and_pixel_ranges(rng):
    p = net_params(rng)
    schedule = make_schedule("linear")
    ab = np.asarray(schedule.alphas_cumprod, np.float64)
    proj = rng.normal(0, 0.5, (3, 2))   # a "VAE": 2x2 average pool, 3 -> 2 channels

    def vae_apply(params, x):   # a single-input model gets its input itself
        pooled = x.reshape(4, 2, 4, 2, 3).mean(axis=(1, 3))
        return pooled @ params["proj"]

    scaling, shift = float(rng.uniform(0.1, 2)), float(rng.uniform(-0.5, 0.5))
    vae = Model.from_apply(vae_apply, {"proj": jnp.asarray(proj, jnp.float32)}, kind="vae",
                           config={"scaling_factor": scaling, "shift_factor": shift})
    images = rng.uniform(0, 1, (3, 8, 8, 3)).astype(np.float32)
    out = diffusion_features(_model(p, conditional=False), {"image": images},
                             schedule=schedule, vae=vae, features=("secmi",),
                             **{**SETTINGS, "timesteps": (5,)})
    for i, image in enumerate(images.astype(np.float64)):
        pooled = (2 * image - 1).reshape(4, 2, 4, 2, 3).mean(axis=(1, 3)) @ proj
        x0 = (pooled - shift) * scaling
        np.testing.assert_allclose(out["secmi"][i], secmi_ref(p, x0, ab, 20, 10),
                                   rtol=SECMI_RTOL)

    # Floats already in [-1, 1] with pixel_range="signed" equal uint8 pixels mapped there.
    data = _source(rng, n=3)
    signed = {**data, "image": data["image"].astype(np.float32) / 127.5 - 1}
    kwargs = {**SETTINGS, "features": ("pia",)}
    a = diffusion_features(_model(p), data, schedule=schedule, **kwargs)
    b = diffusion_features(_model(p), signed, schedule=schedule, pixel_range="signed",
                           **kwargs)
    np.testing.assert_allclose(a["pia"], b["pia"], rtol=1e-6)  # same inputs up to rounding


def test_bad_inputs_refused(rng):
    p = net_params(rng)
    schedule = make_schedule("linear")
    data = _source(rng, n=4)
    model = _model(p)
    kwargs = {**SETTINGS, "features": ("pia",)}
    floats = {**data, "image": data["image"].astype(np.float32) / 255}
    floats["image"][2, 0, 0, 0] = 1.5
    cases = [
        (dict(source=floats), r"\(row 2\) has pixels outside \[0, 1\]"),
        (dict(source={**data, "image": data["image"].astype(np.int16)}), "dtype int16"),
        (dict(source={k: v for k, v in data.items() if k != "label"}),
         "no field 'label'"),
        (dict(source=data, pixel_range="signed"), "uint8 pixels"),
        (dict(source=data, features=("loss", "psnr")), "features"),
        (dict(source=data, timesteps=(1000,)), "timesteps"),
        (dict(source=data, features=("secmi",), secmi_t=25), "multiple of secmi_interval"),
        (dict(source=data, model=Model.from_apply(eps_jax_apply, jax_params(p))),
         "kind 'diffusion'"),
        (dict(source=data, schedule="linear"), "NoiseSchedule"),
    ]
    for overrides, message in cases:
        args = {"model": model, "schedule": schedule, **kwargs, **overrides}
        source = args.pop("source")
        with pytest.raises(InputError, match=message):
            diffusion_features(args.pop("model"), source, batch_size=8, **args)


# --------------------------------------------------------------------------- CLI


def test_cli_end_to_end_and_bad_inputs(rng, tmp_path, monkeypatch, capsys):
    import pyarrow.parquet as pq

    from memjax.cli import _common, main

    p = net_params(rng)
    data = _source(rng, n=5)
    np.savez(tmp_path / "data.npz", **data)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2",
         "num_train_timesteps": 500, "clip_sample": True}))
    model = _model(p)
    # The model is the test's pure-JAX ε-network (the real ports' folders are tested in
    # tests/test_diffusion_pipelines.py and tests/test_generators_demo.py).
    monkeypatch.setattr(_common, "load_model", lambda folder, flag, kind, *a, **k: model)
    out = tmp_path / "out"
    args = ["mia", "diffusion", "--model", str(model_dir), "--data",
            str(tmp_path / "data.npz"), "--features", "loss", "pia", "--timesteps", "10", "40",
            "--noise-draws", "2", "--seed", "3", "--batch-size", "8", "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    table = pq.read_table(out / "scores.parquet").to_pandas()
    assert list(table.columns) == ["id", "loss_t10", "loss_t40", "pia", "pian"]
    want = diffusion_features(model, data, schedule=make_schedule(
        "squaredcos_cap_v2", num_train_timesteps=500), features=("loss", "pia"),
        timesteps=(10, 40), noise_draws=2, seed=3, batch_size=8, progress=False)
    for name in want:
        np.testing.assert_array_equal(table[name].to_numpy(), want[name], err_msg=name)

    bad = [
        (["--scheduler", str(tmp_path / "missing.json")], "missing.json"),
        (["--timesteps", "500"], "timesteps"),
        (["--features", "psnr"], "invalid choice"),
        (["--labels-field", "klass"], "no field 'klass'"),
    ]
    (tmp_path / "zero_snr.json").write_text(json.dumps({"rescale_betas_zero_snr": True}))
    bad.append((["--scheduler", str(tmp_path / "zero_snr.json")], "rescale_betas_zero_snr"))
    for extra, message in bad:
        capsys.readouterr()
        fresh = str(tmp_path / f"out{len(extra)}{extra[0]}")
        cut = [a if a != str(out) else fresh for a in args]
        code = None
        try:
            code = main([*cut, *extra])
        except SystemExit as exit_:
            code = exit_.code
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (extra, err)
