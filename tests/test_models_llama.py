"""The Llama-family port (Llama, Mistral, Qwen2, Qwen3, OLMo 2, Gemma, Gemma 2) against Hugging
Face's PyTorch models.

Every HF model here has random weights (no hub is reachable), every parameter redrawn
around its init so nothing is trivial, and runs in fp32 in eval mode. Tolerances, never
relaxed:

- every compared tensor (logits, each tap) within ``TOL = 1e-5`` of HF, absolute, or
  relative to the tensor's largest magnitude where that exceeds 1 (fp32 sums of a few
  hundred terms in a different order);
- token signals: ``log p(target)`` within ``TOL`` of HF's ``log_softmax`` at the targets;
- model-parallel scoring: within ``TOL`` of the one-device run (only the order of the
  row-parallel sums differs).

Only positions with ``attention_mask == 1`` are compared: HF and memjax both compute the
padded positions, but their values are meaningless.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from memjax.convert import ARCHITECTURES, load, load_pretrained, restore, save
from memjax.convert import partition_rules as rules_for
from memjax.engine import make_mesh, param_shardings, score
from memjax.errors import InputError
from memjax.models import with_taps
from memjax.models.llama import rotary_inv_freq
from memjax.signals import signal_function, tokens
from tests.test_models_lm import hf_logp, inputs, saved

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-5
TAPS = ["layers.*.attn_out", "layers.*.mlp_hidden", "layers.*.out", "final"]
HF_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
              "mistral": ("MistralConfig", "MistralForCausalLM"),
              "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
              "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
              "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
              "gemma": ("GemmaConfig", "GemmaForCausalLM"),
              "gemma2": ("Gemma2Config", "Gemma2ForCausalLM")}

_TINY = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
             intermediate_size=96, max_position_embeddings=64)
_LLAMA3 = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
# (family, config kwargs); GQA ratio = num_attention_heads / num_key_value_heads.
TINY = {
    "llama-mha-untied": ("llama", dict(_TINY, num_key_value_heads=8)),
    "llama-gqa2-tied-linear-bias": ("llama", dict(
        _TINY, num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True,
        mlp_bias=True, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                        "rope_theta": 1000.0})),
    # head_dim 16 given explicitly (not hidden_size / heads = 8); llama3 bands: with
    # wavelengths 2 pi 500^(i/16) in [6, 1450] and original length 64, some are kept, some
    # divided by the factor, some smoothed.
    "llama-gqa4-llama3-headdim16": ("llama", dict(_TINY, num_key_value_heads=2, head_dim=16,
                                                  rope_parameters=_LLAMA3)),
    "mistral-gqa2-window5": ("mistral", dict(_TINY, num_key_value_heads=4, sliding_window=5,
                                             head_dim=8)),
    "qwen2-gqa4-tied": ("qwen2", dict(_TINY, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3-gqa2-qknorm-bias": ("qwen3", dict(_TINY, num_key_value_heads=4, head_dim=16,
                                             attention_bias=True)),
    "olmo2-gqa2-postnorm-qknorm": ("olmo2", dict(_TINY, num_key_value_heads=4)),
    # Dynamic NTK: inputs() has T = 12, above max_position_embeddings = 8 (HF recomputes
    # the base from T) and below 64 (HF's init frequencies).
    "llama-gqa2-dynamic-above": ("llama", dict(
        _TINY, num_key_value_heads=4, max_position_embeddings=8,
        rope_parameters={"rope_type": "dynamic", "factor": 3.0, "rope_theta": 500.0})),
    "qwen2-gqa4-dynamic-below": ("qwen2", dict(
        _TINY, num_key_value_heads=2,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500.0})),
    # YaRN with head_dim 16, theta 500, original length 64: the ramp bounds are dims 0 and 3
    # of 8 (some kept, some interpolated, some mixed); attention factor 0.1 ln 4 + 1.
    "qwen2-gqa2-yarn": ("qwen2", dict(
        _TINY, num_key_value_heads=4, head_dim=16, max_position_embeddings=256,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 500.0,
                         "original_max_position_embeddings": 64})),
    # Every optional yarn key off its default: mscale ratio, no truncation, betas.
    "llama-mha-yarn-mscale-notruncate": ("llama", dict(
        _TINY, num_key_value_heads=8, head_dim=16,
        rope_parameters={"rope_type": "yarn", "factor": 8.0, "rope_theta": 300.0,
                         "original_max_position_embeddings": 32, "beta_fast": 16.0,
                         "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 0.5,
                         "truncate": False})),
    "llama-gqa4-yarn-attention-factor": ("llama", dict(
        _TINY, num_key_value_heads=2,
        rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1000.0,
                         "original_max_position_embeddings": 32,
                         "attention_factor": 1.3})),
    # Qwen2 sliding layers: layer 1 (>= max_window_layers) windowed.
    "qwen2-gqa2-sliding-layer1": ("qwen2", dict(
        _TINY, num_key_value_heads=4, use_sliding_window=True, sliding_window=4,
        max_window_layers=1)),
    "qwen3-gqa2-sliding-layertypes": ("qwen3", dict(
        _TINY, num_key_value_heads=4, head_dim=16, use_sliding_window=True, sliding_window=3,
        layer_types=["sliding_attention", "full_attention"])),
    # Gemma: embeddings times sqrt(64), (1 + weight) norms, GeGLU, explicit head_dim.
    "gemma-gqa2-headdim16-tied": ("gemma", dict(_TINY, num_key_value_heads=4, head_dim=16)),
    "gemma-mqa-untied-bias-linear": ("gemma", dict(
        _TINY, num_key_value_heads=1, tie_word_embeddings=False, attention_bias=True,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0})),
    # Gemma 2: sandwich norms, soft-caps small enough to bend the scores and logits,
    # query_pre_attn_scalar != head_dim, sliding (window 5) / full alternating over 3 layers.
    "gemma2-gqa2-softcap-window5": ("gemma2", dict(
        _TINY, num_hidden_layers=3, num_key_value_heads=4, head_dim=16,
        query_pre_attn_scalar=24, sliding_window=5, attn_logit_softcapping=3.0,
        final_logit_softcapping=2.0, attn_implementation="eager")),
    "gemma2-mha-nocap-full": ("gemma2", dict(
        _TINY, num_key_value_heads=8, head_dim=8, query_pre_attn_scalar=8,
        attn_logit_softcapping=None, final_logit_softcapping=None, sliding_window=4,
        layer_types=["full_attention", "sliding_attention"], attn_implementation="eager")),
}


def hf_model(family: str, kwargs: dict, seed: int, *, scale: float = 0.15):
    """An HF model in eval mode, every weight redrawn around its init (norm scales around 1)."""
    config_class, model_class = HF_CLASSES[family]
    config = getattr(transformers, config_class)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * scale
            is_norm_scale = p.ndim == 1 and name.endswith("norm.weight")
            p.copy_(noise + 1.0 if is_norm_scale else noise)
    return model


def hf_forward(model, ids, mask):
    """HF logits, output_hidden_states, and every block's taps from forward hooks
    (``mlp_hidden``: the input of ``down_proj``)."""
    taps: dict[str, np.ndarray] = {}

    def keep(name):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            taps[name] = out.detach().numpy().copy()
        return hook

    def keep_input(name):
        def hook(module, args):
            taps[name] = args[0].detach().numpy().copy()
        return hook

    handles = []
    for i, block in enumerate(model.model.layers):
        handles.append(block.register_forward_hook(keep(f"layers.{i}.out")))
        handles.append(block.self_attn.o_proj.register_forward_hook(
            keep(f"layers.{i}.attn_out")))
        handles.append(block.mlp.down_proj.register_forward_pre_hook(
            keep_input(f"layers.{i}.mlp_hidden")))
    try:
        with torch.no_grad():
            out = model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                        output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states], taps


def max_error(ours, ref, mask) -> tuple[float, float]:
    """(max |ours - ref| over unpadded positions, the bound it must meet)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"shape {ours.shape} vs HF {ref.shape}"
    keep = mask.astype(bool)
    return float(np.abs(ours - ref)[keep].max()), TOL * max(1.0, float(np.abs(ref[keep]).max()))


def assert_close(ours, ref, mask, what: str):
    err, bound = max_error(ours, ref, mask)
    assert err <= bound, f"{what}: max |memjax - HF| = {err:.3g} > {bound:.3g}"


# ---------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("case", list(TINY))
def test_tiny_models_match_hf_everywhere(case, tmp_path, seed):
    family, kwargs = TINY[case]
    hf = hf_model(family, kwargs, seed)
    model, config = load_pretrained(saved(hf, tmp_path))
    ids, mask = inputs(kwargs["vocab_size"], seed)
    logits, hidden, hooked = hf_forward(hf, ids, mask)
    n_layers = kwargs["num_hidden_layers"]

    ours_logits, taps = with_taps(model, TAPS, jnp.asarray(ids), jnp.asarray(mask))
    assert_close(ours_logits, logits, mask, f"{case} logits")
    assert set(taps) == set(hooked) | {"final"}
    for name, ref in hooked.items():
        assert_close(taps[name], ref, mask, f"{case} {name}")
    # HF's output_hidden_states: [embeddings, block 0, ..., block L-2, final norm].
    assert len(hidden) == n_layers + 1
    for i in range(n_layers - 1):
        assert_close(taps[f"layers.{i}.out"], hidden[i + 1], mask, f"{case} hidden[{i + 1}]")
    assert_close(taps["final"], hidden[-1], mask, f"{case} hidden[-1]")

    # hidden_states @ unembedding() is the logits; the chunked token signals give HF's
    # log-softmax at the targets.
    h = model.hidden_states(jnp.asarray(ids), jnp.asarray(mask))
    assert model.unembedding().shape == (h.shape[-1], kwargs["vocab_size"])
    cap = model.final_logit_softcap
    logp = jax.vmap(lambda hh, t: tokens(hidden=hh, unembedding=model.unembedding(),
                                         targets=t, chunk_size=32, softcap=cap)["logp"])(
        h[:, :-1], jnp.asarray(ids[:, 1:]))
    assert_close(logp, hf_logp(logits, ids), mask[:, :-1], f"{case} token logp")


def test_sliding_window_and_rope_scaling_change_the_output(tmp_path, seed):
    """The cases above would not notice a missing window or scaling: show both matter."""
    family, kwargs = TINY["mistral-gqa2-window5"]
    model, config = load_pretrained(saved(hf_model(family, kwargs, seed), tmp_path / "m"))
    ids, mask = inputs(kwargs["vocab_size"], seed)
    windowed = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    model.config = dataclass_replace(config, sliding_window=None)
    full = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(windowed - full)[0, 5:].max() > 1e-3
    np.testing.assert_allclose(windowed[0, :5], full[0, :5], atol=1e-6)

    llama3 = ARCHITECTURES["llama"].from_hf_config(
        dict(TINY["llama-gqa4-llama3-headdim16"][1], model_type="llama"))
    scaled, plain = rotary_inv_freq(llama3), rotary_inv_freq(
        dataclass_replace(llama3, rope_type="default"))
    ratio = plain / scaled
    # Kept (high frequency), divided by the factor (low), and smoothed in between.
    assert np.isclose(ratio, 1.0).any() and np.isclose(ratio, 8.0).any()
    assert ((ratio > 1.01) & (ratio < 7.99)).any()


def dataclass_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


# ------------------------------------------------------------------------- strictness


def _edit_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_missing_extra_and_misshaped_tensors_are_named(tmp_path):
    kwargs = TINY["llama-mha-untied"][1]
    folder = saved(hf_model("llama", kwargs, 0), tmp_path / "a")
    _edit_weights(folder, lambda t: t.pop("model.layers.1.post_attention_layernorm.weight"))
    with pytest.raises(InputError, match=r"missing tensors: .*layers\.1\.post_attention"):
        load_pretrained(folder)

    folder = saved(hf_model("llama", kwargs, 0), tmp_path / "b")
    _edit_weights(folder, lambda t: t.update(
        {"model.layers.0.mlp.extra.weight": np.zeros((4, 4), np.float32)}))
    with pytest.raises(InputError, match=r"unexpected tensors: .*layers\.0\.mlp\.extra"):
        load_pretrained(folder)

    folder = saved(hf_model("llama", kwargs, 0), tmp_path / "c")
    key = "model.layers.0.self_attn.k_proj.weight"
    _edit_weights(folder, lambda t: t.update({key: t[key][:-8].copy()}))
    with pytest.raises(InputError, match=re.escape(
            f"layers.0.k_proj.kernel (checkpoint tensor {key}): checkpoint shape")):
        load_pretrained(folder)

    folder = saved(hf_model("llama", kwargs, 0), tmp_path / "d")
    _edit_weights(folder, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(InputError, match=r"missing tensors: .*lm_head\.weight"):
        load_pretrained(folder)


CONFIG_REFUSALS = [
    ("llama", {"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 4,
                                   "long_factor": [2.0] * 4, "rope_theta": 1e4}}, "longrope"),
    ("llama", {"rope_scaling": {"type": "yarn", "factor": 2.0,
                                "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4}}, "factor"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "factor"),
    ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                   "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
    ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                   "factor": 2.0}}, "factor"),
    ("llama", {"pretraining_tp": 2}, "pretraining_tp"),
    ("llama", {"sliding_window": 4}, "sliding_window"),
    ("llama", {"hidden_act": "bogus_act"}, "bogus_act"),
    ("llama", {"num_key_value_heads": 3}, "num_key_value_heads"),
    ("llama", {"some_new_switch": 1}, "some_new_switch"),
    ("qwen2", {"use_sliding_window": True,
               "layer_types": ["sliding_attention", "full_attention"]}, "use_sliding_window"),
    ("qwen2", {"attention_bias": False}, "attention_bias"),
    ("mistral", {"some_new_switch": 1}, "some_new_switch"),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 4,
               "layer_types": ["sliding_attention"]}, "layer_types"),
    ("gemma", {"hidden_activation": "silu"}, "hidden_activation"),
    ("gemma", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma", {"mlp_bias": True}, "mlp_bias"),
    ("gemma", {"sliding_window": 4}, "sliding_window"),
    ("gemma2", {"layer_types": ["sliding_attention", "global"]}, "layer_types"),
    ("gemma2", {"final_logit_softcapping": -1.0}, "final_logit_softcapping"),
    ("gemma2", {"some_new_switch": 1}, "some_new_switch"),
    ("gemma2", {"model_type": "gemma3_text"}, "q_norm/k_norm"),
    ("llama", {"model_type": "falcon"}, "'gemma', 'gemma2'"),
]


@pytest.mark.parametrize("family,changes,named", CONFIG_REFUSALS,
                         ids=[f"{f}-{n}" for f, _, n in CONFIG_REFUSALS])
def test_unimplemented_config_attributes_are_refused(family, changes, named, tmp_path):
    kwargs = dict(_TINY, num_key_value_heads=4)
    folder = saved(hf_model(family, kwargs, 0), tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(InputError, match=re.escape(named)):
        load_pretrained(folder)


def test_hf_default_configs_are_understood():
    """Every attribute of HF's own default config of each family is read, not refused."""
    from_hf = ARCHITECTURES["llama"].from_hf_config
    for family, (config_class, _) in HF_CLASSES.items():
        config = from_hf(getattr(transformers, config_class)().to_dict())
        if not family.startswith("gemma"):
            assert config.num_hidden_layers == 32 and config.head_dim == 128
    gemma = from_hf(transformers.GemmaConfig().to_dict())
    assert (gemma.hidden_act, gemma.tie_word_embeddings, gemma.embed_scale,
            gemma.norm_plus_one, gemma.head_dim) == ("gelu_pytorch_tanh", True, True, True, 256)
    gemma2 = from_hf(transformers.Gemma2Config().to_dict())
    assert (gemma2.query_pre_attn_scalar, gemma2.attn_logit_softcapping,
            gemma2.final_logit_softcapping, gemma2.sliding_window) == (256, 50.0, 30.0, 4096)
    assert gemma2.layer_types[:2] == ("sliding_attention", "full_attention")
    # A config.json that leaves attributes out gets HF's Gemma defaults, not Llama's.
    assert from_hf({"model_type": "gemma2"}) == gemma2
    # Legacy Gemma files: hidden_act "gelu" means the tanh approximation in HF.
    legacy = from_hf({"model_type": "gemma", "hidden_act": "gelu",
                      "hidden_activation": "gelu_pytorch_tanh"})
    assert legacy.hidden_act == "gelu_pytorch_tanh"
    assert from_hf(transformers.MistralConfig().to_dict()).sliding_window == 4096
    qwen2 = from_hf(transformers.Qwen2Config().to_dict())
    assert (qwen2.qkv_bias, qwen2.o_bias, qwen2.sliding_window) == (True, False, None)


# ------------------------------------------------------------- save/restore, sharding


def test_save_restore_and_memjax_load(tmp_path):
    family, kwargs = TINY["qwen2-gqa4-tied"]
    model, config = load_pretrained(saved(hf_model(family, kwargs, 1), tmp_path / "hf"))
    save(model, config, tmp_path / "converted")
    restored, restored_config = restore(tmp_path / "converted")
    assert restored_config == config
    ids, mask = inputs(config.vocab_size, 1)
    expected = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_array_equal(restored(jnp.asarray(ids), jnp.asarray(mask)), expected)
    again = load(tmp_path / "converted")  # memjax.load: a Model, one example at a time
    assert again.kind == "causal_lm" and again.config == config
    np.testing.assert_array_equal(again({"input_ids": ids[0], "attention_mask": mask[0]}),
                                  expected[0])
    # What `memjax score --signal tokens` / `memjax mia tokens` run on this folder.
    fn, validate = signal_function(again, "tokens")
    data = {"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32)}
    validate(data, np.arange(len(ids)))
    scored = score(fn, again.params, data, batch_size=3, progress=False,
                   mesh=make_mesh(devices=jax.devices()[:1]))
    hf = hf_model(family, kwargs, 1)
    logits, _, _ = hf_forward(hf, ids, mask)
    # causal_lm_tokens: position t scores target t + 1 (the last position scores nothing).
    # Compared where input and target are real (HF's padded queries see no key at all).
    assert_close(scored["logp"][:, :-1], hf_logp(logits, ids), mask[:, :-1] * mask[:, 1:],
                 "scored logp")


def _named_specs(state, mesh, rules) -> dict[str, object]:
    from memjax.engine.mesh import path_name

    shardings = param_shardings(state, mesh, rules)
    flat = jax.tree_util.tree_flatten_with_path(
        shardings, is_leaf=lambda x: hasattr(x, "spec"))[0]
    return {path_name(path): s.spec for path, s in flat}


def test_model_parallel_scoring_equals_one_device(tmp_path, seed):
    family, kwargs = TINY["llama-gqa2-tied-linear-bias"]
    kwargs = dict(kwargs, tie_word_embeddings=False)
    hf = hf_model(family, kwargs, seed)
    model, config = load_pretrained(saved(hf, tmp_path))
    graphdef, state = nnx.split(model)
    rules = rules_for(config)
    mesh = make_mesh(model=8)

    specs = _named_specs(state, mesh, rules)
    for i in range(config.num_hidden_layers):
        for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            assert specs[f"layers/{i}/{name}/kernel"] == jax.P(None, "model")
            assert specs[f"layers/{i}/{name}/bias"] == jax.P("model")
        for name in ("o_proj", "down_proj"):
            assert specs[f"layers/{i}/{name}/kernel"] == jax.P("model", None)
    assert specs["embed_tokens"] == specs["lm_head"] == jax.P("model", None)
    unsharded = sorted(k for k, s in specs.items() if all(a is None for a in s))
    assert all(k.endswith(("norm/scale", "o_proj/bias", "down_proj/bias")) for k in unsharded)

    def fn(params, example):
        m = nnx.merge(graphdef, params)
        h = m.hidden_states(example["input_ids"][None], example["attention_mask"][None])[0]
        return tokens(hidden=h[:-1], unembedding=m.unembedding(),
                      targets=example["input_ids"][1:],
                      mask=example["attention_mask"][1:], chunk_size=32)

    ids, _ = inputs(96, seed, batch=13, length=12)
    rng = np.random.default_rng(seed)
    mask = (np.arange(12)[None, :] < rng.integers(3, 13, (13, 1))).astype(np.int32)
    data = {"input_ids": ids.astype(np.int32), "attention_mask": mask}
    one = score(fn, state, data, batch_size=4, progress=False,
                mesh=make_mesh(devices=jax.devices()[:1]))
    sharded = score(fn, state, data, batch_size=8, progress=False, mesh=mesh,
                    param_rules=rules)
    for key in ("logp", "mean_loss", "mu", "sigma"):
        err = np.abs(sharded[key] - one[key]).max()
        assert err <= TOL, f"{key}: sharded vs one device differ by {err:.3g}"
    logits, _, _ = hf_forward(hf, ids, mask)
    assert_close(one["logp"], hf_logp(logits, ids), mask[:, 1:], "scored logp")


def test_cli_scores_a_llama_folder_as_pytorch_does(tmp_path_factory, tmp_path):
    """A user's Llama folder (weights + tokenizer files) through `memjax convert` and
    `memjax score --signal tokens`: mean token loss equals PyTorch's on the same ids."""
    import json

    import pyarrow.parquet as pq

    from memjax.cli import main
    from tests import hf_tiny

    folder, hf = hf_tiny.cached(tmp_path_factory, "llama")
    texts = hf_tiny.corpus(24)
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert main(["convert", str(folder), str(tmp_path / "converted")]) == 0
    assert main(["score", "--model", str(tmp_path / "converted"), "--data",
                 f"jsonl:{tmp_path / 't.jsonl'}", "--signal", "tokens", "--max-length", "32",
                 "--batch-size", "8", "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    assert main(["export", str(tmp_path / "s"), str(tmp_path / "s.parquet")]) == 0
    ours = pq.read_table(tmp_path / "s.parquet").to_pandas().sort_values("id")
    enc = transformers.AutoTokenizer.from_pretrained(folder)(
        texts, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        logits = hf(**enc).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, enc["input_ids"][:, 1:, None])[..., 0]
    mask = enc["attention_mask"][:, 1:].double()
    ref = (-(logp * mask).sum(1) / mask.sum(1)).numpy()
    # float32 forward vs float64 PyTorch log-softmax of float32 logits: 1e-5 as above.
    np.testing.assert_allclose(ours["mean_loss"].to_numpy(), ref, rtol=0, atol=1e-5)


# ------------------------------------------------- rope variants, Gemma 2, soft-capping


def test_dynamic_ntk_and_yarn_frequencies_match_float64_formulas(seed):
    """Dynamic NTK (emozilla 2023) and YaRN (Peng et al. 2023) frequencies against their
    formulas in float64 NumPy, and each variant really changes something."""
    from memjax.models.llama import layer_windows, yarn_attention_factor

    from_hf = ARCHITECTURES["llama"].from_hf_config
    dynamic = from_hf(dict(TINY["llama-gqa2-dynamic-above"][1], model_type="llama"))
    dim, theta, factor, original = 8, 500.0, 3.0, 8
    plain = rotary_inv_freq(dataclass_replace(dynamic, rope_type="default"))
    # Up to the original length: HF's init frequencies, which are the unscaled ones.
    np.testing.assert_array_equal(rotary_inv_freq(dynamic, original), plain)
    rng = np.random.default_rng(seed)
    for length in (original + 1, int(rng.integers(10, 200))):
        base = theta * (factor * length / original - (factor - 1)) ** (dim / (dim - 2))
        expected = base ** -(np.arange(0, dim, 2) / dim)
        # float32 (HF's arithmetic) against float64: a few float32 ulps.
        np.testing.assert_allclose(rotary_inv_freq(dynamic, length), expected, rtol=2e-6)
        assert (rotary_inv_freq(dynamic, length)[1:] < plain[1:] * 0.99).all()

    yarn = from_hf(dict(TINY["qwen2-gqa2-yarn"][1], model_type="qwen2"))
    dim, theta, factor, original = 16, 500.0, 4.0, 64
    corr = lambda rot: dim * np.log(original / (rot * 2 * np.pi)) / (2 * np.log(theta))
    low, high = max(np.floor(corr(32.0)), 0), min(np.ceil(corr(1.0)), dim - 1)
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
    extrapolated = theta ** -(np.arange(0, dim, 2) / dim)
    expected = extrapolated / factor * ramp + extrapolated * (1 - ramp)
    np.testing.assert_allclose(rotary_inv_freq(yarn), expected, rtol=2e-6)
    ratio = extrapolated / rotary_inv_freq(yarn)
    assert np.isclose(ratio, 1).any() and np.isclose(ratio, factor).any()
    assert ((ratio > 1.01) & (ratio < factor - 0.01)).any()
    assert yarn_attention_factor(yarn) == pytest.approx(0.1 * np.log(4.0) + 1)
    mscaled = from_hf(dict(TINY["llama-mha-yarn-mscale-notruncate"][1], model_type="llama"))
    assert yarn_attention_factor(mscaled) == pytest.approx(
        (0.1 * np.log(8.0) + 1) / (0.05 * np.log(8.0) + 1))
    assert not mscaled.rope_truncate and mscaled.rope_beta_fast == 16.0

    qwen2 = from_hf(dict(TINY["qwen2-gqa2-sliding-layer1"][1], model_type="qwen2"))
    assert layer_windows(qwen2) == (None, 4)


def test_gemma2_soft_caps_and_windows_change_the_output(tmp_path, seed):
    """The HF comparison would not notice a cap or window the tiny inputs never reach."""
    family, kwargs = TINY["gemma2-gqa2-softcap-window5"]
    model, config = load_pretrained(saved(hf_model(family, kwargs, seed), tmp_path))
    ids, mask = (jnp.asarray(a) for a in inputs(kwargs["vocab_size"], seed))
    capped = np.asarray(model(ids, mask))
    assert np.abs(capped).max() <= 2.0 and np.abs(capped).max() > 1.5
    state = nnx.state(model)
    for change in (dict(attn_logit_softcapping=None), dict(sliding_window=None),
                   dict(query_pre_attn_scalar=None)):
        # The same weights in a module built from the changed config.
        built = ARCHITECTURES["llama"].build(dataclass_replace(config, **change), nnx.Rngs(0))
        other = nnx.merge(nnx.graphdef(built), state)
        assert np.abs(np.asarray(other(ids, mask)) - capped).max() > 1e-3, change


def _float64_capped_stats(hidden, weight, targets, cap):
    z = hidden.astype(np.float64) @ weight.astype(np.float64)
    z = cap * np.tanh(z / cap)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    logp = z - lse[:, None]
    p = np.exp(logp)
    mu = (p * logp).sum(-1)
    sigma = np.sqrt((p * (logp - mu[:, None]) ** 2).sum(-1))
    return {"logp": logp[np.arange(len(targets)), targets], "lse": lse, "mu": mu,
            "sigma": sigma}


def test_soft_capped_token_statistics_equal_float64(seed):
    """tokens(softcap=c) on every path (full, logits chunks, hidden chunks, Pallas kernel in
    interpret mode) equals the float64 log-softmax of c * tanh(z / c)."""
    from memjax import kernels

    rng = np.random.default_rng(seed)
    t, d, v, cap = 9, 16, 203, 4.0
    hidden = rng.normal(size=(t, d)).astype(np.float32)
    weight = (rng.normal(size=(d, v)) * 2).astype(np.float32)  # |z| ~ 8: the cap bends it
    targets = rng.integers(0, v, t)
    ref = _float64_capped_stats(hidden, weight, targets, cap)
    logits = jnp.asarray(hidden) @ jnp.asarray(weight)
    paths = {  # jitted: one compilation each instead of op-by-op dispatch
        "full": lambda h, w, z: tokens(hidden=h, unembedding=w, targets=targets, softcap=cap),
        "hidden-chunks": lambda h, w, z: tokens(hidden=h, unembedding=w, targets=targets,
                                                chunk_size=32, softcap=cap),
        "logits-chunks": lambda h, w, z: tokens(z, targets=targets, chunk_size=50,
                                                softcap=cap),
        "kernel": lambda h, w, z: kernels.token_stats(h, w, targets, impl="kernel",
                                                      block_rows=16, block_vocab=128,
                                                      softcap=cap),
    }
    runs = {name: jax.jit(path)(hidden, weight, logits) for name, path in paths.items()}
    for name, out in runs.items():
        for key, expected in ref.items():
            # float32 logits of 16 products and a 203-term float32 reduction: 1e-5.
            np.testing.assert_allclose(out[key], expected, atol=1e-5, rtol=1e-5,
                                       err_msg=f"{name} {key}")
    uncapped = jax.jit(lambda h, w: tokens(hidden=h, unembedding=w, targets=targets,
                                           chunk_size=32))(hidden, weight)
    assert np.abs(np.asarray(uncapped["logp"]) - ref["logp"]).max() > 1e-2
    with pytest.raises(InputError, match="softcap"):
        tokens(logits, targets=targets, softcap=0.0)


def test_gemma2_scores_through_signal_function_with_the_cap(tmp_path, seed):
    """`memjax score --signal tokens` path (CausalLMTokenSignals) applies Gemma 2's cap."""
    family, kwargs = TINY["gemma2-gqa2-softcap-window5"]
    hf = hf_model(family, kwargs, seed)
    model, config = load_pretrained(saved(hf, tmp_path / "hf"))
    save(model, config, tmp_path / "converted")
    lm = load(tmp_path / "converted")
    fn, _ = signal_function(lm, "tokens")
    ids, mask = inputs(kwargs["vocab_size"], seed)
    out = jax.jit(fn)(lm.params, {"input_ids": jnp.asarray(ids[0], jnp.int32),
                                  "attention_mask": jnp.asarray(mask[0], jnp.int32)})
    logits, _, _ = hf_forward(hf, ids, mask)
    assert_close(out["logp"][None, :-1], hf_logp(logits, ids)[:1], mask[:1, :-1],
                 "gemma2 scored logp")
