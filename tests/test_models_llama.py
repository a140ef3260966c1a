"""The Llama-family port (Llama, Mistral, Qwen2, Qwen3, OLMo 2) against Hugging Face's PyTorch
models.

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
              "olmo2": ("Olmo2Config", "Olmo2ForCausalLM")}

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
    logp = jax.vmap(lambda hh, t: tokens(hidden=hh, unembedding=model.unembedding(),
                                         targets=t, chunk_size=32)["logp"])(
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
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0,
                                   "rope_theta": 1e4}}, "dynamic"),
    ("llama", {"rope_scaling": {"type": "yarn", "factor": 2.0}}, "yarn"),
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
               "layer_types": ["sliding_attention", "full_attention"]}, "use_sliding_window"),
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
    for config_class, _ in HF_CLASSES.values():
        config = from_hf(getattr(transformers, config_class)().to_dict())
        assert config.num_hidden_layers == 32 and config.head_dim == 128
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
