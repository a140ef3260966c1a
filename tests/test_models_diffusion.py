"""The diffusers UNet2DModel and AutoencoderKL ports against diffusers PyTorch (fp32).

Tiny random configs (attention on/off, multi-head attention, class conditioning by a table,
by ``class_embed_type="timestep"`` and ``"identity"``, ``scale_shift`` norms, odd channel
counts, non-square inputs, quant convs off) compare the outputs and every block's output
(taps vs forward hooks) after loading the ``save_pretrained`` folder through
``memjax.load`` (which also checks the converter and the model interface). Weights are
diffusers' random init with every parameter perturbed, so GroupNorm affines and zero-init
biases are not trivially 1 / 0. Tolerance: ``TOL * max(1, max|ref|)``, TOL = 1e-5, the
bound of the other ports' full-size tests (tests/test_models_vision.py,
tests/test_models_llama_scale.py): float32 reassociation over a few hundred ops. Full
shapes at random weights: google/ddpm-cifar10-32's UNet on one 32x32 sample and
stabilityai/sd-vae-ft-ema's VAE on one 32x32 image, same bound. GroupNorm and the spatial
attention block are also checked against float64 NumPy.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

import memjax  # noqa: E402
from memjax.convert import load_pretrained  # noqa: E402
from memjax.errors import InputError  # noqa: E402
from memjax.models import autoencoder_kl, diffusion_layers, unet2d, with_taps  # noqa: E402

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.strict_dtypes  # the ports run under strict dtype promotion

TOL = 1e-5  # relative to max(1, max|ref|): float32 rounding, as the other ports' tests

# ------------------------------------------------------------------------------ configs

UNET_TINY = {
    # DDPM layout (flip False, freq_shift 1, padding-0 downsample), 4-head attention
    "ddpm_like": dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                      layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                      attention_head_dim=4, flip_sin_to_cos=False, freq_shift=1,
                      downsample_padding=0, norm_eps=1e-6),
    # class table, scale_shift (mid attention without its GroupNorm, as diffusers), odd
    # channels, head_dim None (one head of all channels), centred input
    "class_table_scale_shift": dict(
        in_channels=1, out_channels=2, block_out_channels=(6, 9), layers_per_block=1,
        down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D"), norm_num_groups=3,
        attention_head_dim=None, resnet_time_scale_shift="scale_shift", num_class_embeds=5,
        center_input_sample=True),
    # class labels through the timestep MLP; own time width, attn groups, mid scale factor
    "class_timestep": dict(
        in_channels=3, out_channels=3, block_out_channels=(8, 12), layers_per_block=1,
        down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"), norm_num_groups=4,
        attention_head_dim=4, class_embed_type="timestep", time_embedding_dim=20,
        attn_norm_num_groups=2, mid_block_scale_factor=2.0, downsample_padding=1),
    # identity class embedding, no mid attention, no attention anywhere
    "identity_no_attention": dict(
        in_channels=2, out_channels=2, block_out_channels=(4, 8), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=2, add_attention=False,
        class_embed_type="identity", resnet_time_scale_shift="scale_shift"),
}

VAE_TINY = {
    "two_levels": dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                       norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2),
    "odd_no_quant_convs_no_attention": dict(
        block_out_channels=(6, 9), layers_per_block=2, latent_channels=3, in_channels=1,
        out_channels=2, norm_num_groups=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, use_quant_conv=False,
        use_post_quant_conv=False, mid_block_add_attention=False, scaling_factor=0.5,
        shift_factor=0.1),
}

# google/ddpm-cifar10-32's config.json (diffusers 0.0.4 export)
DDPM_CIFAR10 = dict(
    act_fn="silu", attention_head_dim=None, block_out_channels=(128, 256, 256, 256),
    center_input_sample=False,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, in_channels=3,
    layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-6, norm_num_groups=32,
    out_channels=3, sample_size=32, time_embedding_type="positional",
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))

# stabilityai/sd-vae-ft-ema's config.json
SD_VAE = dict(
    act_fn="silu", block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, in_channels=3, latent_channels=4,
    layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=256,
    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)


def _torch_model(cls, config: dict, seed: int, perturb: float):
    torch.manual_seed(seed)
    model = cls(**config).eval()
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturb * torch.randn_like(p))
    return model


_BUILT: dict[str, tuple] = {}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (folder, torch model, memjax.load(folder)), built once for the module."""

    def get(name: str, cls, config: dict, perturb: float = 0.1):
        if name not in _BUILT:
            hf = _torch_model(cls, config, len(_BUILT), perturb)
            folder = tmp_path_factory.mktemp(name)
            hf.save_pretrained(folder)
            # The reference: diffusers' forward in float64 on the same (float32) weights.
            # Its sinusoidal features are float32 (as ours), cast to float64 by a hook: its
            # class_embed_type="timestep" path does not cast them (float64 would fail).
            if hasattr(hf, "time_proj"):
                hf.time_proj.register_forward_hook(lambda _m, _a, out: out.double())
            _BUILT[name] = (folder, hf.double(), memjax.load(folder))
        return _BUILT[name]

    return get


def nhwc(x) -> np.ndarray:
    return np.asarray(x.detach().numpy() if hasattr(x, "detach") else x).transpose(0, 2, 3, 1)


def nchw(x: np.ndarray):
    """NHWC -> a float64 NCHW tensor (the float64 reference's input)."""
    return torch.tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), dtype=torch.float64)


def relative(ours, ref) -> float:
    """max |ours - ref| / max(1, max |ref|) in float64."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"shape {ours.shape} vs diffusers {ref.shape}"
    return float(np.abs(ours - ref).max() / max(1.0, np.abs(ref).max()))


def hooked(model, names: list[str]) -> tuple[dict, list]:
    """Forward hooks recording each named submodule's output (first item of a tuple)."""
    outputs, handles = {}, []
    for name in names:
        def hook(_module, _args, out, name=name):
            outputs[name] = out[0] if isinstance(out, tuple) else out
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    return outputs, handles


def per_example_taps(model, names: list[str], batch: dict) -> dict[str, np.ndarray]:
    """The Model's taps on each example (vmapped, as the engine runs it) -> [B, ...]."""
    fn = jax.jit(jax.vmap(model.activations(names), in_axes=(None, 0)))
    return {k: np.asarray(v)[:, 0] for k, v in fn(model.params, batch).items()}


def unet_inputs(config: dict, rng: np.random.Generator, batch: int = 2,
                size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    size = size or (8, 12)
    inputs = {"sample": rng.normal(size=(batch, *size, config["in_channels"])).astype(
        np.float32), "timestep": rng.integers(0, 1000, size=batch)}
    if config.get("class_embed_type") == "identity":
        dim = config.get("time_embedding_dim") or 4 * config["block_out_channels"][0]
        inputs["class_labels"] = rng.normal(size=(batch, dim)).astype(np.float32)
    elif config.get("class_embed_type") == "timestep":
        inputs["class_labels"] = rng.integers(0, 1000, size=batch)
    elif config.get("num_class_embeds"):
        inputs["class_labels"] = rng.integers(0, config["num_class_embeds"], size=batch)
    return inputs


def unet_block_names(config: dict) -> list[str]:
    n = len(config["block_out_channels"])
    return ([f"down_blocks.{i}" for i in range(n)] + ["mid_block"]
            + [f"up_blocks.{i}" for i in range(n)])


def compare_unet(hf, model, config: dict, rng, *, batch: int = 2,
                 size: tuple[int, int] | None = None) -> dict[str, float]:
    """{output / block: relative error} of the loaded Model vs diffusers ``hf``."""
    inputs = unet_inputs(config, rng, batch, size)
    names = unet_block_names(config)
    outputs, handles = hooked(hf, names)
    labels = inputs.get("class_labels")
    with torch.no_grad():
        if labels is not None:
            labels = torch.tensor(labels, dtype=None if labels.dtype.kind == "i"
                                  else torch.float64)
        ref = hf(nchw(inputs["sample"]), torch.tensor(inputs["timestep"]), labels).sample
    for h in handles:
        h.remove()
    taps = per_example_taps(model, [*names, "out"], inputs)
    errors = {"out": relative(taps["out"], nhwc(ref))}
    errors.update({n: relative(taps[n], nhwc(outputs[n])) for n in names})
    return errors


# ------------------------------------------------------------------------------ UNet


@pytest.mark.parametrize("case", sorted(UNET_TINY))
def test_unet_tiny_matches_diffusers(case, built, rng):
    config = UNET_TINY[case]
    _, hf, model = built(f"unet_{case}", diffusers.UNet2DModel, config)
    conditional = "class_embed_type" in config or "num_class_embeds" in config
    assert model.kind == "diffusion"
    assert model.inputs == ("sample", "timestep") + ("class_labels",) * conditional
    errors = compare_unet(hf, model, config, rng)
    print(case, "max relative error:", max(errors.values()))
    assert max(errors.values()) <= TOL, errors


def module_of(model):
    """The NNX module of a loaded port Model."""
    return nnx.merge(model.forward.graphdef, model.params)


def test_unet_inputs_checked(built):
    """Class labels given to an unconditional UNet, missing for a conditional one, and a
    sample with the wrong channel count raise InputError naming the input."""
    plain = module_of(built("unet_ddpm_like", diffusers.UNet2DModel, UNET_TINY["ddpm_like"])[2])
    sample = jnp.zeros((1, 8, 8, 3))
    with pytest.raises(InputError, match="class_labels"):
        plain(sample, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
    with pytest.raises(InputError, match="sample"):
        plain(jnp.zeros((1, 8, 8, 2)), jnp.zeros((1,)))
    conditional = module_of(built("unet_class_timestep", diffusers.UNet2DModel,
                                  UNET_TINY["class_timestep"])[2])
    with pytest.raises(InputError, match="class_labels"):
        conditional(sample, jnp.zeros((1,)))


def test_unet_ddpm_cifar10_full_shape(built, rng):
    """google/ddpm-cifar10-32's layout (35.7M params) at random weights, one sample."""
    _, hf, model = built("unet_ddpm_cifar10", diffusers.UNet2DModel, DDPM_CIFAR10,
                         perturb=0.0)
    errors = compare_unet(hf, model, DDPM_CIFAR10, rng, batch=1, size=(32, 32))
    print("DDPM-CIFAR10 max relative error:", max(errors.values()), errors["out"])
    assert max(errors.values()) <= TOL, errors


# ------------------------------------------------------------------------------ VAE


def compare_vae(hf, model, config: dict, rng, size=(8, 12), *, batch: int = 2,
                with_output: bool = False) -> dict[str, float]:
    """{output / block: relative error} of the loaded Model (encoder taps per example,
    the module's jitted decode) vs diffusers ``hf``."""
    channels = config.get("in_channels", 3)
    image = rng.uniform(-1, 1, size=(batch, *size, channels)).astype(np.float32)
    n = len(config["block_out_channels"])
    enc_names = [f"encoder.down_blocks.{i}" for i in range(n)] + ["encoder.mid_block"]
    dec_names = [f"decoder.up_blocks.{i}" for i in range(n)] + ["decoder.mid_block"]
    outputs, handles = hooked(hf, enc_names + dec_names)
    with torch.no_grad():
        posterior = hf.encode(nchw(image)).latent_dist
        latents = rng.normal(size=(batch, *np.asarray(posterior.mean.shape)[[2, 3]],
                                   config["latent_channels"])).astype(np.float32)
        decoded = hf.decode(nchw(latents)).sample
    for h in handles:
        h.remove()
    enc_taps = per_example_taps(model, [*enc_names, "posterior.*"], {"image": image})
    graphdef = model.forward.graphdef
    decode = jax.jit(lambda params, z: with_taps(nnx.merge(graphdef, params).decode,
                                                 dec_names, z))
    out, dec_taps = decode(model.params, jnp.asarray(latents))
    if with_output:  # the "vae" Model's own output on each example: the posterior mean
        latent = jax.jit(jax.vmap(model.apply, in_axes=(None, 0)))(model.params,
                                                                   {"image": image})
        enc_taps["latent"] = np.asarray(latent)
    errors = {"mean": relative(enc_taps.pop("posterior.mean"), nhwc(posterior.mean)),
              "logvar": relative(enc_taps.pop("posterior.logvar"), nhwc(posterior.logvar)),
              "decode": relative(out, nhwc(decoded))}
    if with_output:
        errors["latent"] = relative(enc_taps.pop("latent"), nhwc(posterior.mean))
    errors.update({k: relative(v, nhwc(outputs[k])) for k, v in {**enc_taps, **dec_taps}.items()})
    return errors


@pytest.mark.parametrize("case", sorted(VAE_TINY))
def test_vae_tiny_matches_diffusers(case, built, rng):
    config = VAE_TINY[case]
    _, hf, model = built(f"vae_{case}", diffusers.AutoencoderKL, config)
    assert (model.kind, model.inputs) == ("vae", ("image",))
    # kept in the config, not applied: the "vae" kind returns the unscaled mean
    assert model.config.scaling_factor == config.get("scaling_factor", 0.18215)
    assert model.config.shift_factor == config.get("shift_factor")
    errors = compare_vae(hf, model, config, rng, with_output=True)
    print(case, "max relative error:", max(errors.values()))
    assert max(errors.values()) <= TOL, errors


def test_vae_posterior_split_and_clamp(rng):
    """diffusers' DiagonalGaussianDistribution: mean = first half of the channels, logvar
    = second half clamped to [-30, 20] (float64 NumPy reference; exact: only a clip)."""
    moments = (rng.normal(size=(2, 3, 3, 8)) * 40).astype(np.float32)
    mean, logvar = autoencoder_kl.posterior(jnp.asarray(moments))
    np.testing.assert_array_equal(mean, moments[..., :4])
    np.testing.assert_array_equal(logvar, np.clip(moments[..., 4:].astype(np.float64), -30, 20))
    assert (moments[..., 4:] > 20).any() and (moments[..., 4:] < -30).any()


def test_sd_vae_full_shape(built, rng):
    """stabilityai/sd-vae-ft-ema's layout (83.7M params) at random weights, one 32x32
    image encoded (latent 4x4) and one 4x4 latent decoded."""
    _, hf, model = built("vae_sd", diffusers.AutoencoderKL, SD_VAE, perturb=0.0)
    errors = compare_vae(hf, model, SD_VAE, rng, size=(32, 32), batch=1)
    print("SD VAE max relative error:", max(errors.values()), errors["mean"], errors["decode"])
    assert max(errors.values()) <= TOL, errors


# ------------------------------------------------------------------------------ layers


def test_resampling_matches_float64(rng):
    """Downsample2D without a conv is PyTorch's AvgPool2d(2) (odd edges dropped); the
    padding-0 conv pads one zero row/column at the bottom/right; Upsample2D without a conv
    repeats each pixel 2x2. Float64 NumPy references."""
    x = rng.normal(size=(2, 5, 7, 3)).astype(np.float32)
    pool = diffusion_layers.Downsample2D(3, 3, use_conv=False, padding=1, rngs=nnx.Rngs(0))
    want = x[:, :4, :6].astype(np.float64).reshape(2, 2, 2, 3, 2, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(pool(jnp.asarray(x)), want, rtol=1e-6, atol=1e-6)  # 4 terms
    conv = diffusion_layers.Downsample2D(3, 4, use_conv=True, padding=0, rngs=nnx.Rngs(0))
    kernel = np.asarray(conv.conv.kernel[...], np.float64)
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 1), (0, 1), (0, 0)))
    want = np.stack([np.stack([np.einsum("bhwc,hwco->bo", padded[:, 2 * i:2 * i + 3,
                                                                  2 * j:2 * j + 3], kernel)
                               for j in range(3)], axis=1) for i in range(2)], axis=1)
    # 27-term float32 sums of unit-size terms
    np.testing.assert_allclose(conv(jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)
    up = diffusion_layers.Upsample2D(3, 3, use_conv=False, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(up(jnp.asarray(x)), x.repeat(2, axis=1).repeat(2, axis=2))


def test_group_norm_and_attention_match_float64(rng):
    """GroupNorm and the spatial attention block against float64 NumPy formulas."""
    x = rng.normal(size=(2, 3, 5, 6)).astype(np.float32)
    norm = diffusion_layers.GroupNorm(6, 3, eps=1e-5)
    scale, bias = rng.normal(size=6), rng.normal(size=6)
    norm.scale.set_value(jnp.asarray(scale, jnp.float32))
    norm.bias.set_value(jnp.asarray(bias, jnp.float32))
    g = x.astype(np.float64).reshape(2, 3, 5, 3, 2)
    mean, var = g.mean(axis=(1, 2, 4), keepdims=True), g.var(axis=(1, 2, 4), keepdims=True)
    want = ((g - mean) / np.sqrt(var + 1e-5)).reshape(x.shape) * scale + bias
    # float32 statistics over 30 values: a few ulps of values of size ~3
    np.testing.assert_allclose(norm(jnp.asarray(x)), want, atol=2e-6, rtol=1e-5)

    attn = diffusion_layers.SpatialAttention(6, head_dim=2, groups=None, eps=1e-6,
                                             rngs=nnx.Rngs(0), rescale_output_factor=2.0)
    h = x.astype(np.float64).reshape(2, 15, 6)
    params = {n: (np.asarray(getattr(attn, n).kernel[...], np.float64),
                  rng.normal(size=getattr(attn, n).bias[...].shape))
              for n in ("to_q", "to_k", "to_v", "to_out")}
    for n, (_, b) in params.items():
        getattr(attn, n).bias.set_value(jnp.asarray(b, jnp.float32))
    q, k, v = ((h @ params[n][0] + params[n][1]).reshape(2, 15, 3, 2)
               for n in ("to_q", "to_k", "to_v"))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(2)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    a = np.einsum("bhqk,bkhd->bqhd", w, v).reshape(2, 15, 6)
    want = ((a @ params["to_out"][0] + params["to_out"][1]).reshape(x.shape) + x) / 2
    # float32 products of width 6 and a 15-way softmax: ~1e-6 relative
    np.testing.assert_allclose(attn(jnp.asarray(x)), want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("arch, change, named", [
    ("unet", {"time_embedding_type": "fourier"}, "time_embedding_type"),
    ("unet", {"downsample_type": "resnet"}, "downsample_type"),
    ("unet", {"upsample_type": "resnet"}, "upsample_type"),
    ("unet", {"resnet_time_scale_shift": "spatial"}, "resnet_time_scale_shift"),
    ("unet", {"class_embed_type": "projection"}, "class_embed_type"),
    ("unet", {"down_block_types": ["SkipDownBlock2D", "DownBlock2D"]}, "down_block_types"),
    ("unet", {"mid_block_type": "UNetMidBlock2DCrossAttn"}, "mid_block_type"),
    ("unet", {"act_fn": "mish"}, "act_fn"),
    ("unet", {"cross_attention_dim": 8}, "cross_attention_dim"),
    ("vae", {"down_block_types": ["DownBlock2D", "DownEncoderBlock2D"]}, "down_block_types"),
    ("vae", {"norm_type": "spatial"}, "norm_type"),
    ("vae", {"act_fn": "mish"}, "act_fn"),
])
def test_unimplemented_config_refused_by_name(arch, change, named):
    if arch == "unet":
        hf = {"_class_name": "UNet2DModel", **UNET_TINY["ddpm_like"], **change}
        parse = unet2d.from_hf_config
    else:
        hf = {"_class_name": "AutoencoderKL", **VAE_TINY["two_levels"], **change}
        parse = autoencoder_kl.from_hf_config
    hf = {k: list(v) if isinstance(v, tuple) else v for k, v in hf.items()}
    with pytest.raises(InputError, match=named):
        parse(hf)


@pytest.mark.parametrize("name, cls, config", [
    ("unet_class_table_scale_shift", "UNet2DModel", UNET_TINY["class_table_scale_shift"]),
    ("vae_odd_no_quant_convs_no_attention", "AutoencoderKL",
     VAE_TINY["odd_no_quant_convs_no_attention"])])
def test_saved_folder_round_trip(name, cls, config, built, tmp_path):
    """memjax's own folder (as ``memjax convert`` writes it) reloads the same config,
    interface and params."""
    from memjax.convert import save

    model = built(name, getattr(diffusers, cls), config)[2]
    save(module_of(model), model.config, tmp_path / "saved")
    again = memjax.load(tmp_path / "saved")
    assert (again.kind, again.inputs, again.config) == (model.kind, model.inputs, model.config)
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(again.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_mismatched_checkpoint_named(built, tmp_path):
    """A tensor of the wrong shape is named by its diffusers key."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    folder = built("vae_two_levels", diffusers.AutoencoderKL, VAE_TINY["two_levels"])[0]
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    tensors = load_file(folder / "diffusion_pytorch_model.safetensors")
    tensors["encoder.conv_in.weight"] = tensors["encoder.conv_in.weight"][:4]
    save_file(tensors, tmp_path / "diffusion_pytorch_model.safetensors")
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    with pytest.raises(InputError, match="encoder.conv_in.weight"):
        load_pretrained(tmp_path)
