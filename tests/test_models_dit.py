"""The DiT port (diffusers' ``DiTTransformer2DModel``) against diffusers PyTorch, fp32.

Tiny random configs (learned sigma on and off, patch sizes 1 and 2, several class counts,
odd head dims, GELU exact / tanh, affine and plain norm3, no attention bias), each saved
with ``save_pretrained`` and opened with ``memjax.load``: the full output, every block's
output (forward hooks vs taps) and ``epsilon`` through the ``Model`` protocol within
``TOL = 1e-5`` absolute (their outputs are O(1)). One DiT-XL/2-256 at its real shape with
random weights within ``1e-5 * max(1, max|ref|)`` (the full-shape bound of
tests/test_models_vision.py). Also: the sin-cos position table against an independent
float64 formula, 8-device model-sharded scoring equal to one device, bad configs and
inputs refused by name.
"""

from __future__ import annotations

import functools
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub: everything is local

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

import memjax  # noqa: E402
import memjax.models.dit  # noqa: E402, F401  (registers the architecture)
from memjax.convert import load_pretrained, save  # noqa: E402
from memjax.convert.checkpoint import TensorReader  # noqa: E402
from memjax.engine import make_mesh, score  # noqa: E402
from memjax.engine.mesh import param_shardings  # noqa: E402
from memjax.errors import InputError  # noqa: E402
from memjax.models import with_taps  # noqa: E402
from memjax.models.dit import (  # noqa: E402
    DiTConfig,
    from_hf_config,
    sincos_position_table,
    time_features,
)
from memjax.models.registry import ARCHITECTURES, fill_params  # noqa: E402

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

# The port and the engine path promote no dtype implicitly (see tests/conftest.py).
pytestmark = pytest.mark.strict_dtypes

# fp32 against fp32 at O(1) outputs: rounding differences of the two frameworks' kernels
# (measured max ~1e-6, see the report), well under this.
TOL = 1e-5
# Largest timestep compared with diffusers' own (unpatched) timestep features.
SMALL_T = 20

# name -> DiTTransformer2DModel kwargs
TINY = {
    "sigma_p2_c10": dict(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                         out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                         num_embeds_ada_norm=10),
    "eps_p1_c5_gelu_affine_nobias": dict(
        num_attention_heads=3, attention_head_dim=4, in_channels=3, out_channels=None,
        num_layers=2, sample_size=6, patch_size=1, num_embeds_ada_norm=5,
        activation_fn="gelu", norm_elementwise_affine=True, attention_bias=False),
    "sigma_p2_c1_headdim5": dict(num_attention_heads=4, attention_head_dim=5, in_channels=2,
                                 out_channels=4, num_layers=3, sample_size=4, patch_size=2,
                                 num_embeds_ada_norm=1, norm_eps=1e-6),
}


def fill_random(model, seed: int) -> None:
    """Seeded normal weights, fast at any size: std 1/sqrt(fan in) for matrices and conv
    kernels (so activations stay O(1)), 0.1 for vectors (biases, norm3 affine). Each
    parameter is a window at a random offset into one pool of normals as long as the
    largest parameter (DiT-XL's 675M weights fill at copy speed, not at sampling speed)."""
    rng = np.random.default_rng(seed)
    params = list(model.parameters())
    size = max(p.numel() for p in params)
    pool = rng.standard_normal(size, dtype=np.float32)
    pool = np.concatenate([pool, pool])
    with torch.no_grad():
        for param in params:
            std = 0.1 if param.ndim == 1 else 1 / math.sqrt(math.prod(param.shape[1:]))
            start = int(rng.integers(0, size))
            window = pool[start:start + param.numel()].reshape(param.shape)
            param.copy_(torch.from_numpy(window * np.float32(std)))


def torch_dit(kwargs: dict, seed: int):
    torch.manual_seed(seed)
    model = diffusers.DiTTransformer2DModel(**kwargs).eval()
    fill_random(model, seed)
    return model


def inputs(kwargs: dict, seed: int, batch: int = 3, max_t: int = 999):
    """NCHW samples, timesteps (``max_t``, 0, then random), labels (the null label first)."""
    rng = np.random.default_rng(seed)
    c, s, classes = kwargs["in_channels"], kwargs["sample_size"], kwargs["num_embeds_ada_norm"]
    sample = rng.normal(size=(batch, c, s, s)).astype(np.float32)
    timestep = np.array([max_t, 0, *rng.integers(1, max_t, max(0, batch - 2))])[:batch]
    labels = np.array([classes, *rng.integers(0, classes, batch - 1)])
    return sample, timestep, labels


@jax.jit
def _time_features(timestep: jax.Array) -> jax.Array:
    return time_features(timestep)


def torch_forward(model, sample, timestep, labels, *, time_features=None):
    """diffusers' output (NCHW) and each block's output, from forward hooks.

    ``time_features`` [B, 256]: what every block's ``time_proj`` returns instead of
    diffusers' own features (memjax's, from the port's ``timestep_features`` tap). At
    t ~ 1,000 the float32 argument ``t * f_k`` has an ulp of 6e-5, so two float32
    implementations whose ``exp`` differs by one ulp in one frequency (XLA's and PyTorch's,
    and even XLA's host-folded and compiled ones) give features 6e-5 apart, both correct to
    float32. The port after the features is compared given the same features at any t,
    and with diffusers' own features only at t <= SMALL_T (see
    :func:`test_timestep_features_within_float32_conditioning` for the features).
    """
    if time_features is not None:
        for block in model.transformer_blocks:
            block.norm1.emb.time_proj.forward = lambda _t: torch.from_numpy(
                np.asarray(time_features))
    blocks = {}
    hooks = [block.register_forward_hook(
        lambda _m, _a, out, i=i: blocks.__setitem__(i, out.detach().numpy()))
        for i, block in enumerate(model.transformer_blocks)]
    with torch.no_grad():
        out = model(torch.tensor(sample), timestep=torch.tensor(timestep),
                    class_labels=torch.tensor(labels)).sample.numpy()
    for hook in hooks:
        hook.remove()
    if time_features is not None:
        for block in model.transformer_blocks:
            del block.norm1.emb.time_proj.forward
    return out, blocks


@functools.partial(jax.jit, static_argnums=0)
def _dit_all(graphdef, state, sample, timestep, labels):
    module = nnx.merge(graphdef, state)
    return with_taps(module, ["timestep_features", "layers.*.out"], sample, timestep, labels)


def dit_all(module, sample, timestep, labels):
    graphdef, state = nnx.split(module)
    return _dit_all(graphdef, state, sample, timestep, labels)


def nhwc(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 2, 3, 1)


def max_diff(ours, ref) -> float:
    return float(np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64)).max())


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request, tmp_path_factory):
    kwargs = TINY[request.param]
    model = torch_dit(kwargs, seed=len(request.param))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, kwargs, model, path


def test_matches_diffusers(tiny, seed):
    name, kwargs, model, path = tiny
    loaded = memjax.load(path)
    assert (loaded.kind, loaded.inputs) == ("diffusion", ("sample", "timestep", "class_labels"))
    module = nnx.merge(loaded.forward.graphdef, loaded.params)
    sample, timestep, labels = inputs(kwargs, seed)
    errors = {}
    # Given the same timestep features, at any t: the output and every block.
    out, taps = dit_all(module, jnp.asarray(nhwc(sample)), jnp.asarray(timestep),
                        jnp.asarray(labels))
    ref, ref_blocks = torch_forward(model, sample, timestep, labels,
                                    time_features=taps["timestep_features"])
    assert out.shape == nhwc(ref).shape
    errors["out"] = max_diff(out, nhwc(ref))
    for i, block in ref_blocks.items():
        errors[f"layers.{i}.out"] = max_diff(taps[f"layers.{i}.out"], block)
    # diffusers unpatched, at t <= SMALL_T (features within float32 rounding of each other).
    _, small_t, _ = inputs(kwargs, seed, max_t=SMALL_T)
    ref_own, _ = torch_forward(model, sample, small_t, labels)
    out_own, _ = dit_all(module, jnp.asarray(nhwc(sample)), jnp.asarray(small_t),
                         jnp.asarray(labels))
    errors["out, diffusers' own features"] = max_diff(out_own, nhwc(ref_own))
    print(name, "max |memjax - diffusers|:", errors, "max |ref|:", np.abs(ref).max())
    assert max(errors.values()) <= TOL, errors



def test_timestep_features_within_float32_conditioning():
    """memjax's features vs diffusers' at every t < 1000: the float32 argument t * f_k is
    only known to half an ulp of t (6.1e-5 at t = 999), so a one-ulp difference of a
    frequency moves sin / cos by up to ulp(t); the bound is two ulps of the largest t."""
    t = np.arange(1000)
    from diffusers.models.embeddings import get_timestep_embedding
    ref = get_timestep_embedding(torch.tensor(t), 256, flip_sin_to_cos=True,
                                 downscale_freq_shift=1).numpy()
    ours = _time_features(jnp.asarray(t))
    assert max_diff(ours, ref) <= 2 * np.spacing(np.float32(999))


def test_sincos_position_table_matches_float64_formula(rng):
    """Vaswani et al.'s sinusoids on each axis: column features first, then row features,
    against a direct float64 loop (and diffusers' own table)."""
    dim, grid = 4 * int(rng.integers(1, 9)), int(rng.integers(1, 7))
    quarter = dim // 4
    want = np.zeros((grid * grid, dim))
    for i in range(grid):
        for j in range(grid):
            for axis, pos in enumerate((j, i)):
                for k in range(quarter):
                    w = 10_000.0 ** (-k / quarter)
                    want[i * grid + j, axis * 2 * quarter + k] = math.sin(pos * w)
                    want[i * grid + j, axis * 2 * quarter + quarter + k] = math.cos(pos * w)
    table = sincos_position_table(dim, grid)
    # float32 rounding of values in [-1, 1]: half an ulp at 1 is 6e-8.
    assert np.abs(table - want).max() <= 1e-7
    from diffusers.models.embeddings import get_2d_sincos_pos_embed
    ref = get_2d_sincos_pos_embed(dim, grid, base_size=grid).float().numpy()
    assert np.array_equal(table, ref)


def test_sharded_scoring_matches_one_device(tmp_path, seed):
    """8 devices (4 data x 2 model, every rule's dimension split) = 1 device, and the
    ``Model``'s per-example ``epsilon`` (learned sigma dropped) = diffusers' first
    ``in_channels`` output channels."""
    kwargs = TINY["sigma_p2_c10"]
    reference = torch_dit(kwargs, seed)
    reference.save_pretrained(tmp_path)
    model = memjax.load(tmp_path)
    # Small t: compared with diffusers' own timestep features (see torch_forward).
    sample, timestep, labels = inputs(kwargs, seed, batch=6, max_t=SMALL_T)
    ref, _ = torch_forward(reference, sample, timestep, labels)
    source = {"sample": nhwc(sample), "timestep": timestep.astype(np.int32),
              "class_labels": labels.astype(np.int32)}

    def fn(params, example):
        return {"eps": model.apply(params, example)}

    mesh = make_mesh(model=2)
    rules = list(model.partition_rules)
    shardings = param_shardings(model.params, mesh, rules)
    spec = jax.sharding.PartitionSpec
    assert shardings["layers"][0]["to_q"]["kernel"].spec == spec(None, "model")
    assert shardings["layers"][1]["ff_out"]["kernel"].spec == spec("model", None)
    assert shardings["layers"][0]["ada_linear"]["kernel"].spec == spec(None, "model")
    single = score(fn, model.params, source, batch_size=4, progress=False,
                   mesh=make_mesh(devices=jax.devices()[:1]))
    sharded = score(fn, model.params, source, batch_size=4, progress=False, mesh=mesh,
                    param_rules=rules)
    # The same float32 sums split over two devices: reassociation only.
    assert max_diff(sharded["eps"], single["eps"]) <= TOL
    assert max_diff(single["eps"], nhwc(ref)[..., :kwargs["in_channels"]]) <= TOL


def test_bad_config_refused_by_name():
    hf = {"_class_name": "DiTTransformer2DModel", **TINY["eps_p1_c5_gelu_affine_nobias"]}
    assert from_hf_config(hf).output_channels == 3
    cases = {"norm_type": dict(norm_type="ada_norm"),
             "activation_fn": dict(activation_fn="geglu"),
             "cross_attention_dim": dict(cross_attention_dim=8),
             "interpolation_scale": dict(interpolation_scale=2.0),
             "pos_embed_max_size": dict(pos_embed_max_size=64),
             "sample_size": dict(sample_size=[8, 8]),
             "patch_size": dict(patch_size=4),
             "num_embeds_ada_norm": dict(num_embeds_ada_norm=None),
             "divisible by 4": dict(num_attention_heads=1, attention_head_dim=6)}
    for match, edit in cases.items():
        with pytest.raises(InputError, match=match):
            from_hf_config({**hf, **edit})
    # The legacy class facebook/DiT-XL-2-256 was published as: its keys, at DiT's values.
    legacy = {"_class_name": "Transformer2DModel", "_diffusers_version": "0.12.0.dev0",
              "activation_fn": "gelu-approximate", "attention_bias": True,
              "attention_head_dim": 72, "cross_attention_dim": None, "dropout": 0.0,
              "in_channels": 4, "norm_elementwise_affine": False, "norm_num_groups": 32,
              "norm_type": "ada_norm_zero", "num_attention_heads": 16,
              "num_embeds_ada_norm": 1000, "num_layers": 28, "num_vector_embeds": None,
              "only_cross_attention": False, "out_channels": 8, "patch_size": 2,
              "sample_size": 32, "upcast_attention": False, "use_linear_projection": False}
    assert memjax.models.registry.detect_architecture(legacy).name == "dit"
    assert from_hf_config(legacy) == DiTConfig(out_channels=8)
    with pytest.raises(InputError, match="norm_type='ada_norm_single'"):
        from_hf_config({**legacy, "norm_type": "ada_norm_single"})


def test_bad_inputs_refused(tiny):
    _, kwargs, _, path = tiny
    module, _ = load_pretrained(path)
    s, c, classes = kwargs["sample_size"], kwargs["in_channels"], kwargs["num_embeds_ada_norm"]
    t, y = jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32)
    with pytest.raises(InputError, match="NHWC"):
        module(jnp.zeros((1, c, s, s + 1)), t, y)
    with pytest.raises(InputError, match="class_labels"):
        module(jnp.zeros((1, s, s, c)), t, jnp.full(1, classes + 1, jnp.int32))
    with pytest.raises(InputError, match="timestep"):
        module(jnp.zeros((1, s, s, c)), jnp.zeros(2, jnp.int32), y)


def test_round_trip_and_strict_conversion(tmp_path, seed):
    """memjax's own folder (``save`` / ``memjax.load``) gives the same model; a checkpoint
    with a tensor missing, an unexpected one and a mis-shaped one is refused, each named."""
    kwargs = TINY["sigma_p2_c1_headdim5"]
    torch_dit(kwargs, seed).save_pretrained(tmp_path / "hf")
    model = memjax.load(tmp_path / "hf")
    module, config = load_pretrained(tmp_path / "hf")
    save(module, config, tmp_path / "memjax")
    again = memjax.load(tmp_path / "memjax")
    assert again.config == model.config and again.kind == "diffusion"
    flat = lambda params: jax.tree.leaves(params)  # noqa: E731
    assert all(np.array_equal(a, b) for a, b in zip(flat(model.params), flat(again.params),
                                                    strict=True))

    tensors = safetensors_numpy.load_file(tmp_path / "hf" / "diffusion_pytorch_model.safetensors")
    del tensors["transformer_blocks.1.attn1.to_k.weight"]
    tensors["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"] = \
        np.zeros((kwargs["num_embeds_ada_norm"], 20), np.float32)  # the null row dropped
    tensors["transformer_blocks.0.norm2.weight"] = np.zeros(20, np.float32)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    safetensors_numpy.save_file(tensors, bad / "diffusion_pytorch_model.safetensors")
    with pytest.raises(InputError) as error:
        memjax.load(bad)
    for name in ("transformer_blocks.1.attn1.to_k.weight", "embedding_table.weight",
                 "transformer_blocks.0.norm2.weight"):
        assert name in str(error.value)


def test_dit_xl_2_256_full_shape(seed):
    """facebook/DiT-XL-2-256's transformer (diffusers' defaults: 28 layers, 16 heads x 72,
    patch 2, 4 -> 8 channels, 32 x 32 latents, 1000 classes), random weights, one example,
    converted in memory from the state dict (no 2.7 GB checkpoint written)."""
    kwargs = dict(out_channels=8)
    with torch.device("meta"):
        model = diffusers.DiTTransformer2DModel(**kwargs)
    model = model.to_empty(device="cpu").eval()
    fill_random(model, seed)
    config = model.config
    assert (config.num_layers, config.num_attention_heads, config.attention_head_dim,
            config.patch_size, config.in_channels, config.sample_size,
            config.num_embeds_ada_norm) == (28, 16, 72, 2, 4, 32, 1000)
    # The position table is a non-persistent buffer that to_empty left uninitialised.
    from diffusers.models.embeddings import get_2d_sincos_pos_embed
    model.pos_embed.pos_embed = get_2d_sincos_pos_embed(1152, 16, base_size=16)[None].float()
    sample, _, _ = inputs(dict(config), seed, batch=1)
    rng = np.random.default_rng(seed)  # any timestep, any label (the null label included)
    timestep, labels = rng.integers(0, 1000, 1), rng.integers(0, 1001, 1)

    arch = ARCHITECTURES["dit"]
    dit_config = arch.from_hf_config(json.loads(model.to_json_string()))
    reader = TensorReader({k: v.numpy() for k, v in model.state_dict().items()})
    abstract = nnx.eval_shape(lambda: arch.build(dit_config, nnx.Rngs(0)))
    module = fill_params(abstract, arch.convert(reader, dit_config), reader, jnp.float32,
                         arch.name)
    del reader
    out, taps = dit_all(module, jnp.asarray(nhwc(sample)), jnp.asarray(timestep),
                        jnp.asarray(labels))
    out = np.asarray(out)
    del module, abstract  # peak memory: one framework's 2.7 GB of weights at a time, plus one
    ref, ref_blocks = torch_forward(model, sample, timestep, labels,
                                    time_features=taps["timestep_features"])
    pairs = {"out": (out, nhwc(ref))}
    pairs.update({f"layers.{i}.out": (taps[f"layers.{i}.out"], b) for i, b in ref_blocks.items()})
    relative = {k: max_diff(a, b) / max(1.0, float(np.abs(b).max())) for k, (a, b) in
                pairs.items()}
    print("DiT-XL/2-256 max |diff| / max(1, max|ref|):", max(relative.values()),
          "out:", max_diff(out, nhwc(ref)), np.abs(ref).max())
    assert max(relative.values()) <= TOL, relative
