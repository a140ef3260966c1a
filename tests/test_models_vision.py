"""The CLIP and ViT ports against Hugging Face PyTorch (fp32, random weights).

Tiny configs check the main output, every layer's hidden state, the pooled states and the
embeddings; a full-size CLIP ViT-B/32 and ViT-B/16 check one small forward each (there
the tolerance is ``1e-5 * max(1, max|ref|)``). Also: strict conversion (missing, extra,
mis-shaped tensors), the config guard, orbax round trips and sharded CLIP scoring.
"""

from __future__ import annotations

import functools
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub: everything is local

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from memjax.convert import load_pretrained, partition_rules, restore, save  # noqa: E402
from memjax.engine import make_mesh, score  # noqa: E402
from memjax.engine.mesh import param_shardings, path_name  # noqa: E402
from memjax.errors import InputError  # noqa: E402
from memjax.models import with_taps  # noqa: E402
from memjax.models.clip import CLIPConfig  # noqa: E402
from memjax.models.clip import from_hf_config as clip_from_hf  # noqa: E402
from memjax.models.vit import ViTConfig  # noqa: E402
from memjax.models.vit import from_hf_config as vit_from_hf  # noqa: E402
from memjax.signals import contrastive  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

TOL = 1e-5


def max_diff(ours, ref, where=None) -> float:
    diff = np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64))
    return float((diff if where is None else diff[where]).max())


def nhwc(pixels: np.ndarray) -> jax.Array:
    return jnp.asarray(pixels.transpose(0, 2, 3, 1))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(graphdef, method, state, *args):
    return method(nnx.merge(graphdef, state), *args)


def apply(model, method, *args):
    """``method(model, *args)`` as one jitted computation: eager JAX compiles op by op, which
    is slow on CPU; equal graphdefs (a restored model) reuse the executable."""
    graphdef, state = nnx.split(model)
    return _apply(graphdef, method, state, *args)


def clip_all(model, ids, pixels, mask):
    taps = ["*.embeddings", "*.layers.*.out", "*.pooled", "text.final", "*.layers.*.mlp_hidden"]
    logits, values = with_taps(model, taps, ids, pixels, mask)
    return logits, values, model.encode_image(pixels), model.encode_text(ids, mask)


def clip_logits(model, ids, pixels, mask):
    return model(ids, pixels, mask)


def clip_full(model, ids, pixels, mask):
    logits, values = with_taps(model, ["*.layers.*.out"], ids, pixels, mask)
    return logits, values, model.encode_image(pixels), model.encode_text(ids, mask)


def vit_all(model, pixels):
    patterns = ["embeddings", "layers.*.out", "final", "layers.*.mlp_hidden"]
    vit = model if hasattr(model, "pooler") else model.vit
    out, values = with_taps(model, patterns, pixels)
    return out, values, (vit.pool(values["final"]) if vit.pooler is not None else None)


def vit_out(model, pixels):
    return model(pixels)


# ----------------------------------------------------------------------------------------
# CLIP
# ----------------------------------------------------------------------------------------

# (text overrides, vision overrides, projection_dim, text length T). eos 98: pooled at the
# first EOS; eos 2: the legacy argmax of the ids; eos 1 = pad id: the first occurrence.
CLIP_CONFIGS = {
    "p8_T12_e24": (dict(hidden_size=32, num_attention_heads=4, max_position_embeddings=20,
                        eos_token_id=98, intermediate_size=64),
                   dict(hidden_size=48, num_attention_heads=4, image_size=32, patch_size=8,
                        intermediate_size=64),  # even widths: the sharded test splits them
                   24, 12),
    "p4_T16_e16_legacy_eos": (dict(hidden_size=24, num_attention_heads=2, num_hidden_layers=3,
                                   max_position_embeddings=16, eos_token_id=2,
                                   hidden_act="gelu"),
                              dict(hidden_size=32, num_attention_heads=2, image_size=16,
                                   patch_size=4, layer_norm_eps=1e-6),
                              16, 16),
    "p16_T7_e40_1ch": (dict(hidden_size=16, num_attention_heads=1, max_position_embeddings=9,
                            eos_token_id=1),
                       dict(hidden_size=32, num_attention_heads=8, image_size=32,
                            patch_size=16, num_channels=1, hidden_act="gelu_new"),
                       40, 7),
}
CLIP_VOCAB = 99


def clip_hf_config(text: dict, vision: dict, projection_dim: int):
    text = dict(dict(vocab_size=CLIP_VOCAB, intermediate_size=37, num_hidden_layers=2,
                     bos_token_id=0, pad_token_id=1), **text)
    vision = dict(dict(intermediate_size=37, num_hidden_layers=2), **vision)
    return transformers.CLIPConfig(text_config=text, vision_config=vision,
                                   projection_dim=projection_dim)


def clip_inputs(config, length: int, seed: int = 0):
    """Two images and three right-padded texts, each with an EOS token."""
    rng = np.random.default_rng(seed)
    v, t = config.vision_config, config.text_config
    pixels = rng.normal(size=(2, v.num_channels, v.image_size, v.image_size)).astype(np.float32)
    eos = t.eos_token_id
    # Legacy pooling takes the largest id, so the EOS there must be the largest (CLIP's
    # EOT is); otherwise ids avoid the EOS id.
    ids = rng.integers(3, CLIP_VOCAB - 1, (3, length))
    valid = np.array([length, length - 3, 2])
    mask = (np.arange(length)[None] < valid[:, None]).astype(np.int64)
    eos_value = CLIP_VOCAB - 1 if eos == 2 else eos
    ids[np.arange(3), valid - 1] = eos_value
    ids[2, valid[2]:] = eos_value  # pads equal to the EOS: pooling takes the first
    return pixels, ids, mask


_BUILT: dict[str, tuple] = {}  # HF models and checkpoints, built once per module run


def build_clip(name: str, tmp_path_factory):
    """(name, HF CLIPModel, checkpoint folder, (pixels NCHW, ids, mask)) for CLIP_CONFIGS[name]."""
    if f"clip_{name}" not in _BUILT:
        text, vision, proj, length = CLIP_CONFIGS[name]
        config = clip_hf_config(text, vision, proj)
        torch.manual_seed(0)
        hf = transformers.CLIPModel(config).eval()
        with torch.no_grad():  # a non-default logit scale, so it is really read
            hf.logit_scale.fill_(1.7)
        path = tmp_path_factory.mktemp(f"clip_{name}")
        hf.save_pretrained(path)
        _BUILT[f"clip_{name}"] = (name, hf, path, clip_inputs(config, length))
    return _BUILT[f"clip_{name}"]


@pytest.fixture(scope="module", params=list(CLIP_CONFIGS))
def clip_case(request, tmp_path_factory):
    return build_clip(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def clip_small(tmp_path_factory):
    """The first CLIP config, for the checks that need only one."""
    return build_clip("p8_T12_e24", tmp_path_factory)


def test_clip_matches_hf(clip_case):
    name, hf, path, (pixels, ids, mask) = clip_case
    model, config = load_pretrained(path)
    assert isinstance(config, CLIPConfig)
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                 attention_mask=torch.tensor(mask), output_hidden_states=True)
        image_ref = hf.get_image_features(pixel_values=torch.tensor(pixels)).pooler_output
        text_ref = hf.get_text_features(input_ids=torch.tensor(ids),
                                        attention_mask=torch.tensor(mask)).pooler_output
    logits, taps, image, text = apply(model, clip_all, jnp.asarray(ids), nhwc(pixels),
                                      jnp.asarray(mask))
    diffs = {"logits_per_image": max_diff(logits, out.logits_per_image),
             "image_embeds": max_diff(image, image_ref),
             "text_embeds": max_diff(text, text_ref)}
    assert logits.shape == (2, 3)
    valid = mask.astype(bool)
    for tower, hidden, where in (("vision", out.vision_model_output.hidden_states, None),
                                 ("text", out.text_model_output.hidden_states, valid)):
        n = len(hidden) - 1
        assert n == len(model.vision_model.layers if tower == "vision" else
                        model.text_model.layers)
        diffs[f"{tower}.embeddings"] = max_diff(taps[f"{tower}.embeddings"], hidden[0], where)
        for i in range(n):
            diffs[f"{tower}.layers.{i}.out"] = max_diff(taps[f"{tower}.layers.{i}.out"],
                                                        hidden[i + 1], where)
            assert f"{tower}.layers.{i}.mlp_hidden" in taps
    # CLIPModel's tower outputs carry the projected pooler_output; the towers' own do not.
    with torch.no_grad():
        vision_pooled = hf.vision_model(pixel_values=torch.tensor(pixels)).pooler_output
        text_pooled = hf.text_model(input_ids=torch.tensor(ids),
                                    attention_mask=torch.tensor(mask)).pooler_output
    diffs["vision.pooled"] = max_diff(taps["vision.pooled"], vision_pooled)
    diffs["text.pooled"] = max_diff(taps["text.pooled"], text_pooled)
    diffs["text.final"] = max_diff(taps["text.final"],
                                   out.text_model_output.last_hidden_state, valid)
    print(name, "max |diff|:", max(diffs.values()), diffs)
    assert max(diffs.values()) <= TOL, diffs


def test_clip_round_trip(clip_case, tmp_path):
    _, _, path, (pixels, ids, mask) = clip_case
    model, config = load_pretrained(path)
    save(model, config, tmp_path / "converted")
    again, config2 = restore(tmp_path / "converted")
    assert config2 == config
    args = (jnp.asarray(ids), nhwc(pixels), jnp.asarray(mask))
    assert max_diff(apply(again, clip_logits, *args), apply(model, clip_logits, *args)) == 0.0


def _edited(path, tmp_path, edit) -> str:
    """A copy of checkpoint ``path`` whose tensors dict was changed by ``edit``."""
    tensors = safetensors_numpy.load_file(str(path / "model.safetensors"))
    edit(tensors)
    out = tmp_path / "edited"
    out.mkdir(parents=True)
    (out / "config.json").write_text((path / "config.json").read_text())
    safetensors_numpy.save_file(tensors, str(out / "model.safetensors"))
    return str(out)


def _strictness(path, tmp_path, key: str):
    def drop(t):
        del t[key]

    def add(t):
        t["extra.weight"] = np.zeros((3,), np.float32)

    def reshape(t):
        t[key] = np.concatenate([t[key], t[key][:1]])

    for edit, name in ((drop, key), (add, "extra.weight"), (reshape, key)):
        with pytest.raises(InputError, match=name.replace(".", r"\.")) as error:
            load_pretrained(_edited(path, tmp_path / key / edit.__name__, edit))
        print(f"{edit.__name__}: {error.value}")


def test_clip_strict_and_ignores_buffers(clip_small, tmp_path):
    _, _, path, (pixels, ids, mask) = clip_small
    _strictness(path, tmp_path, "text_model.encoder.layers.1.mlp.fc2.weight")
    _strictness(path, tmp_path, "visual_projection.weight")

    def buffers(t):  # old checkpoints store the position_ids buffers
        t["text_model.embeddings.position_ids"] = np.arange(20)[None]
        t["vision_model.embeddings.position_ids"] = np.arange(17)[None]

    model, _ = load_pretrained(_edited(path, tmp_path / "buffers", buffers))
    reference, _ = load_pretrained(path)
    args = (jnp.asarray(ids), nhwc(pixels), jnp.asarray(mask))
    assert max_diff(apply(model, clip_logits, *args),
                    apply(reference, clip_logits, *args)) == 0.0


def _clip_json(**top) -> dict:
    config = clip_hf_config(*CLIP_CONFIGS["p8_T12_e24"][:3]).to_dict()
    config.update(top)
    return json.loads(json.dumps(config))


def test_clip_config_guard():
    assert clip_from_hf(_clip_json()).text_config.eos_token_id == 98
    cases = {
        "text_config.rope_theta": ("rope_theta", lambda c: c["text_config"].update(
            rope_theta=10000.0)),
        "vision_config.use_cls_token": ("use_cls_token", lambda c: c["vision_config"].update(
            use_cls_token=False)),
        "top-level": ("vision_pooling", lambda c: c.update(vision_pooling="mean")),
        "activation": ("hidden_act", lambda c: c["vision_config"].update(hidden_act="swiglu")),
        "eos list": ("eos_token_id", lambda c: c["text_config"].update(eos_token_id=[2, 3])),
        "patch list": ("patch_size", lambda c: c["vision_config"].update(patch_size=[8, 4])),
        "heads": ("num_attention_heads", lambda c: c["text_config"].update(
            num_attention_heads=5)),
    }
    for label, (name, edit) in cases.items():
        config = _clip_json()
        edit(config)
        with pytest.raises(InputError, match=name):
            clip_from_hf(config)
        print("refused:", label)
    # Keys of configs written by transformers 4 (openai/clip-vit-base-patch32 style).
    old = _clip_json(text_config_dict=None, vision_config_dict=None)
    old["text_config"].update(dropout=0.0, use_bfloat16=False, top_k=50, bad_words_ids=None,
                              eos_token_id=2, torch_dtype=None)
    old["vision_config"].update(dropout=0.0, use_bfloat16=False, num_beams=1)
    assert clip_from_hf(old).text_config.eos_token_id == 2
    # A legacy text_config_dict overrides text_config, expanded with HF's defaults.
    legacy = _clip_json(text_config_dict={"hidden_size": 64, "eos_token_id": 2})
    text = clip_from_hf(legacy).text_config
    assert (text.hidden_size, text.eos_token_id, text.vocab_size) == (64, 2, 49408)


def test_clip_image_size_and_layout_refused(clip_small):
    _, _, path, (pixels, ids, mask) = clip_small
    model, _ = load_pretrained(path)
    with pytest.raises(InputError, match="interpolate_pos_encoding"):
        model.encode_image(jnp.zeros((1, 48, 48, 3)))
    with pytest.raises(InputError, match="NHWC"):
        model.encode_image(jnp.asarray(pixels))  # NCHW
    with pytest.raises(InputError, match="at most 20"):
        model.encode_text(jnp.zeros((1, 21), jnp.int32))


def test_clip_sharded_scoring_matches_unsharded(clip_small):
    _, _, path, (pixels, ids, mask) = clip_small
    model, config = load_pretrained(path)
    graphdef, state = nnx.split(model)

    def fn(params, example):  # one image-text pair
        clip = nnx.merge(graphdef, params)
        image = clip.encode_image(example["pixel_values"][None])[0]
        text = clip.encode_text(example["input_ids"][None], example["attention_mask"][None])[0]
        return contrastive(image, text)

    rng = np.random.default_rng(1)
    n = 6  # not a multiple of the batch: the last batch is padded
    source = {"pixel_values": rng.normal(size=(n, 32, 32, 3)).astype(np.float32),
              "input_ids": np.concatenate([ids, ids]).astype(np.int32),
              "attention_mask": np.concatenate([mask, mask]).astype(np.int32)}
    rules = partition_rules(config)
    mesh = make_mesh(model=2)
    shardings = param_shardings(state, mesh, rules)
    specs = {path_name(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(
        shardings, is_leaf=lambda x: hasattr(x, "spec"))[0]}
    assert specs["text_model/layers/0/q_proj/kernel"] == jax.sharding.PartitionSpec(
        None, "model")
    assert specs["vision_model/layers/1/fc2/kernel"] == jax.sharding.PartitionSpec(
        "model", None)
    single = score(fn, state, source, batch_size=4, progress=False,
                   mesh=make_mesh(devices=jax.devices()[:1]))
    sharded = score(fn, state, source, batch_size=4, progress=False, mesh=mesh,
                    param_rules=rules)
    _, _, image, text = apply(model, clip_full, jnp.asarray(source["input_ids"]),
                              jnp.asarray(source["pixel_values"]),
                              jnp.asarray(source["attention_mask"]))
    image, text = np.asarray(image), np.asarray(text)
    cosine = np.sum(image * text, -1) / np.linalg.norm(image, axis=-1) / np.linalg.norm(
        text, axis=-1)
    print("sharded vs unsharded max |diff|:", max_diff(sharded["cosine"], single["cosine"]))
    assert max_diff(sharded["cosine"], single["cosine"]) <= TOL
    assert max_diff(single["cosine"], cosine) <= TOL


# ----------------------------------------------------------------------------------------
# ViT
# ----------------------------------------------------------------------------------------

# (HF class, config overrides).
VIT_CONFIGS = {
    "bare_p8_pooler": ("ViTModel", dict(patch_size=8, pooler_output_size=24,
                                        pooler_act="tanh")),
    "bare_p4_noqkvbias": ("ViTModel", dict(patch_size=4, qkv_bias=False, hidden_act="gelu_new",
                                           num_hidden_layers=3)),
    "cls_p8_5labels": ("ViTForImageClassification", dict(patch_size=8, num_labels=5,
                                                         layer_norm_eps=1e-6)),
    "cls_rect_noqkvbias": ("ViTForImageClassification", dict(
        image_size=[32, 24], patch_size=[8, 4], qkv_bias=False, num_labels=3,
        num_channels=1, num_attention_heads=2)),
}


def vit_image_shape(config) -> tuple[int, int, int]:
    size = config.image_size
    h, w = (size, size) if isinstance(size, int) else size
    return config.num_channels, h, w


def build_vit(name: str, tmp_path_factory):
    """(name, HF model, checkpoint folder, pixels NCHW) for VIT_CONFIGS[name]."""
    if f"vit_{name}" not in _BUILT:
        kind, overrides = VIT_CONFIGS[name]
        config = transformers.ViTConfig(**dict(dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=38,
            image_size=32), **overrides))
        torch.manual_seed(0)
        hf = getattr(transformers, kind)(config).eval()
        path = tmp_path_factory.mktemp(f"vit_{name}")
        hf.save_pretrained(path)
        pixels = np.random.default_rng(0).normal(size=(3, *vit_image_shape(config)))
        _BUILT[f"vit_{name}"] = (name, hf, path, pixels.astype(np.float32))
    return _BUILT[f"vit_{name}"]


@pytest.fixture(scope="module", params=list(VIT_CONFIGS))
def vit_case(request, tmp_path_factory):
    return build_vit(request.param, tmp_path_factory)


def test_vit_matches_hf(vit_case):
    name, hf, path, pixels = vit_case
    model, config = load_pretrained(path)
    assert isinstance(config, ViTConfig)
    with torch.no_grad():
        out = hf(pixel_values=torch.tensor(pixels), output_hidden_states=True)
    ours, taps, pooled = apply(model, vit_all, nhwc(pixels))
    classify = config.num_labels > 0
    ref = out.logits if classify else out.last_hidden_state
    assert ours.shape == ref.shape
    diffs = {"logits" if classify else "last_hidden_state": max_diff(ours, ref),
             "embeddings": max_diff(taps["embeddings"], out.hidden_states[0])}
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    for i in range(config.num_hidden_layers):
        diffs[f"layers.{i}.out"] = max_diff(taps[f"layers.{i}.out"], out.hidden_states[i + 1])
    if not classify:
        diffs["pooler"] = max_diff(pooled, out.pooler_output)
        assert max_diff(taps["final"], ours) == 0.0  # the bare model returns it
    print(name, "max |diff|:", max(diffs.values()), diffs)
    assert max(diffs.values()) <= TOL, diffs


def test_vit_round_trip_and_new_key_names(vit_case, tmp_path):
    name, _, path, pixels = vit_case
    model, config = load_pretrained(path)
    save(model, config, tmp_path / "converted")
    again, config2 = restore(tmp_path / "converted")
    assert config2 == config
    assert max_diff(apply(again, vit_out, nhwc(pixels)), apply(model, vit_out, nhwc(pixels))) == 0
    if name != "cls_p8_5labels":
        return
    # transformers 5 module names (layers.{i}.attention.q_proj, mlp.fc1, ...) load too.
    renames = [("encoder.layer.", "layers."), ("attention.attention.query", "attention.q_proj"),
               ("attention.attention.key", "attention.k_proj"),
               ("attention.attention.value", "attention.v_proj"),
               ("attention.output.dense", "attention.o_proj"),
               ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2")]

    def rename(tensors):
        for key in list(tensors):
            new = key
            for old, repl in renames:
                new = new.replace(old, repl)
            tensors[new] = tensors.pop(key)

    renamed, _ = load_pretrained(_edited(path, tmp_path / "renamed", rename))
    assert max_diff(apply(renamed, vit_out, nhwc(pixels)),
                    apply(model, vit_out, nhwc(pixels))) == 0.0


@pytest.mark.parametrize("name", ["bare_p8_pooler", "cls_p8_5labels"])
def test_vit_strict_and_guard(name, tmp_path_factory, tmp_path):
    _, _, path, pixels = build_vit(name, tmp_path_factory)
    prefix = "vit." if name.startswith("cls") else ""
    _strictness(path, tmp_path / "layer", f"{prefix}encoder.layer.1.output.dense.weight")
    _strictness(path, tmp_path / "head", "classifier.weight" if prefix else "pooler.dense.bias")
    model, _ = load_pretrained(path)
    with pytest.raises(InputError, match="interpolate_pos_encoding"):
        model(jnp.zeros((1, 64, 64, 3)))
    hf = json.loads((path / "config.json").read_text())
    cases = {"layerscale": dict(layerscale=1e-5), "hidden_act": dict(hidden_act="swiglu"),
             "ViTForMaskedImageModeling": dict(architectures=["ViTForMaskedImageModeling"]),
             "image_size": dict(image_size="big")}
    for match, edit in cases.items():
        with pytest.raises(InputError, match=match):
            vit_from_hf({**hf, **edit})


def test_vit_sharded_rules_match_unsharded(tmp_path_factory):
    _, _, path, pixels = build_vit("cls_p8_5labels", tmp_path_factory)
    model, config = load_pretrained(path)
    graphdef, state = nnx.split(model)

    def fn(params, example):
        return {"logits": nnx.merge(graphdef, params)(example["pixels"][None])[0]}

    source = {"pixels": np.asarray(nhwc(pixels))}
    shardings = param_shardings(state, make_mesh(model=2), partition_rules(config))
    assert shardings["vit"]["layers"][0]["fc1"]["kernel"].spec == jax.sharding.PartitionSpec(
        None, "model")
    single = score(fn, state, source, batch_size=4, progress=False,
                   mesh=make_mesh(devices=jax.devices()[:1]))
    sharded = score(fn, state, source, batch_size=4, progress=False, mesh=make_mesh(model=2),
                    param_rules=partition_rules(config))
    assert max_diff(sharded["logits"], single["logits"]) <= TOL


# ----------------------------------------------------------------------------------------
# Full-size models, random weights: one small forward each
# ----------------------------------------------------------------------------------------


def _relative(diffs: dict[str, tuple[float, float]]) -> dict[str, float]:
    """{name: max|diff| / max(1, max|ref|)} from {name: (max|diff|, max|ref|)}."""
    return {k: d / max(1.0, r) for k, (d, r) in diffs.items()}


def _pair(ours, ref, where=None) -> tuple[float, float]:
    ref = np.asarray(ref)
    return max_diff(ours, ref, where), float(np.abs(ref if where is None else ref[where]).max())


def test_clip_vit_b32_full_size(tmp_path):
    """openai/clip-vit-base-patch32's shapes: 1 image, 2 short texts."""
    config = transformers.CLIPConfig(
        text_config=dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=1),
        vision_config=dict(hidden_size=768, num_hidden_layers=12, patch_size=32,
                           image_size=224, intermediate_size=3072, num_attention_heads=12),
        projection_dim=512)
    torch.manual_seed(0)
    hf = transformers.CLIPModel(config).eval()
    hf.save_pretrained(tmp_path)
    model, cfg = load_pretrained(tmp_path)
    text = cfg.text_config
    assert (text.vocab_size, text.hidden_size, text.max_position_embeddings) == (49408, 512, 77)
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(1, 3, 224, 224)).astype(np.float32)
    ids = np.array([[49406, 320, 1125, 539, 320, 2368, 49407, 1, 1],
                    [49406, 320, 1125, 539, 320, 1929, 269, 2368, 49407]])
    mask = (ids != 1).astype(np.int64)
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                 attention_mask=torch.tensor(mask), output_hidden_states=True)
    del hf
    logits, taps, image, text = apply(model, clip_full, jnp.asarray(ids), nhwc(pixels),
                                      jnp.asarray(mask))
    valid = mask.astype(bool)
    diffs = {"logits_per_image": _pair(logits, out.logits_per_image),
             "image_embeds": _pair(image, out.vision_model_output.pooler_output),
             "text_embeds": _pair(text, out.text_model_output.pooler_output)}
    for i in range(12):
        diffs[f"vision.layers.{i}.out"] = _pair(taps[f"vision.layers.{i}.out"],
                                                out.vision_model_output.hidden_states[i + 1])
        diffs[f"text.layers.{i}.out"] = _pair(taps[f"text.layers.{i}.out"],
                                              out.text_model_output.hidden_states[i + 1], valid)
    relative = _relative(diffs)
    print("CLIP ViT-B/32 max |diff| / max(1, max|ref|):", max(relative.values()),
          {k: v for k, v in diffs.items() if "layers" not in k})
    assert max(relative.values()) <= TOL, relative


def test_vit_b16_full_size(tmp_path):
    """google/vit-base-patch16-224's shapes (ViTForImageClassification, 1000 classes)."""
    config = transformers.ViTConfig(num_labels=1000)
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(config).eval()
    hf.save_pretrained(tmp_path)
    model, cfg = load_pretrained(tmp_path)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.patch_size) == (768, 12, (16, 16))
    pixels = np.random.default_rng(0).normal(size=(1, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        out = hf(pixel_values=torch.tensor(pixels), output_hidden_states=True)
    del hf
    logits, taps, _ = apply(model, vit_all, nhwc(pixels))
    diffs = {"logits": _pair(logits, out.logits)}
    for i in range(12):
        diffs[f"layers.{i}.out"] = _pair(taps[f"layers.{i}.out"], out.hidden_states[i + 1])
    relative = _relative(diffs)
    print("ViT-B/16 max |diff| / max(1, max|ref|):", max(relative.values()), diffs["logits"])
    assert max(relative.values()) <= TOL, relative


def test_vit_saved_without_pooler_loads_without_one(tmp_path, seed):
    """HF's ViTModel(config, add_pooling_layer=False) leaves no pooler in the checkpoint."""
    from transformers import ViTConfig as HFViTConfig
    from transformers import ViTModel as HFViTModel

    from memjax.convert import load_pretrained

    config = HFViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32)
    torch.manual_seed(seed)
    hf = HFViTModel(config, add_pooling_layer=False).eval()
    hf.save_pretrained(tmp_path)
    model, loaded = load_pretrained(tmp_path)
    assert not loaded.add_pooling_layer and model.pooler is None
    pixels = np.random.default_rng(seed).normal(size=(2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        ref = hf(torch.tensor(pixels.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
    assert np.abs(np.asarray(model(pixels)) - ref).max() <= 1e-5
