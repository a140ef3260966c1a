"""The causal LM ports (GPT-2, GPT-NeoX/Pythia) against Hugging Face's PyTorch models.

Every HF model here has random weights (no hub is reachable) and runs in fp32 in eval
mode. Tolerances, written down once and never relaxed:

- tiny configs: every compared tensor (logits, each tap) within ``TOL = 1e-5`` of HF,
  absolute, or relative to the tensor's largest magnitude where that exceeds 1;
- full-shape models (GPT-2 small, Pythia-160M): within ``TOL`` relative to the largest
  magnitude of the HF tensor;
- token signals: ``log p(target)`` within ``TOL`` of HF's ``log_softmax`` at the targets;
- model-parallel scoring: within ``TOL`` of the one-device run (only the order of the
  row-parallel sums differs).

Only positions with ``attention_mask == 1`` are compared: HF and memjax both compute the
padded positions, but their values are meaningless.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from memjax.convert import ARCHITECTURES, TensorReader, load, load_pretrained, restore, save
from memjax.convert import partition_rules as rules_for
from memjax.convert.core import fill_params
from memjax.engine import make_mesh, param_shardings, score
from memjax.errors import InputError
from memjax.models import with_taps
from memjax.signals import tokens

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-5
TAPS = ["layers.*.attn_out", "layers.*.mlp_hidden", "layers.*.out", "final"]


@dataclasses.dataclass(frozen=True)
class Family:
    """How to build and probe one HF causal LM family."""

    name: str                                    # memjax architecture name
    hf_class: str
    config_class: str
    blocks: Callable[[object], list]             # HF model -> its decoder blocks
    attn_out: Callable[[object], object]         # HF block -> module whose output is attn_out
    act: Callable[[object], object]              # HF block -> the MLP activation module
    layers_key: str                              # HF config attribute: number of layers
    full: dict                                   # full-shape config


GPT2 = Family(
    name="gpt2", hf_class="GPT2LMHeadModel", config_class="GPT2Config",
    blocks=lambda m: list(m.transformer.h), attn_out=lambda b: b.attn.c_proj,
    act=lambda b: b.mlp.act, layers_key="n_layer",
    full=dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
)
NEOX = Family(
    name="gpt_neox", hf_class="GPTNeoXForCausalLM", config_class="GPTNeoXConfig",
    blocks=lambda m: list(m.gpt_neox.layers), attn_out=lambda b: b.attention.dense,
    act=lambda b: b.mlp.act, layers_key="num_hidden_layers",
    full=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
              intermediate_size=3072, vocab_size=50304, rotary_pct=0.25,
              use_parallel_residual=True, max_position_embeddings=2048),
)
FAMILIES = {"gpt2": GPT2, "gpt_neox": NEOX}

_GPT2_TINY = dict(vocab_size=97, n_positions=32, n_embd=32, n_layer=3, n_head=4)
_NEOX_TINY = dict(vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                  intermediate_size=96, max_position_embeddings=64)
TINY = {
    "gpt2-gelu_new": (GPT2, dict(_GPT2_TINY, activation_function="gelu_new")),
    "gpt2-gelu-inverse-layer-idx": (GPT2, dict(_GPT2_TINY, activation_function="gelu",
                                               scale_attn_by_inverse_layer_idx=True,
                                               n_inner=48)),
    "neox-rot0.25-parallel": (NEOX, dict(_NEOX_TINY, rotary_pct=0.25)),
    "neox-rot1.0-sequential-nobias": (NEOX, dict(_NEOX_TINY, rotary_pct=1.0,
                                                 use_parallel_residual=False,
                                                 attention_bias=False, rotary_emb_base=500)),
    # int(16 * 0.2) = 3 rotary dims: HF rotates 2 * len(range(0, 3, 2)) = 4 of them.
    "neox-rot-odd-tied-gelu_fast": (NEOX, dict(_NEOX_TINY, rotary_pct=0.2,
                                               tie_word_embeddings=True,
                                               hidden_act="gelu_fast")),
}


def hf_model(family: Family, kwargs: dict, seed: int, *, scale: float = 0.15):
    """An HF model in eval mode; with ``scale``, every weight redrawn around its init
    (norm scales around 1) so no parameter is at a trivial value."""
    config = getattr(transformers, family.config_class)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, family.hf_class)(config).eval()
    if scale:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                noise = torch.randn(p.shape, generator=gen) * scale
                is_norm_scale = p.ndim == 1 and name.endswith("weight")
                p.copy_(noise + 1.0 if is_norm_scale else noise)
    return model


def saved(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def inputs(vocab: int, seed: int, batch: int = 3, length: int = 12):
    """Token ids and a mask with a full row, a left-padded row and a right-padded row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, length))
    mask = np.ones((batch, length), np.int64)
    if batch > 1:
        mask[1, :4] = 0
    if batch > 2:
        mask[2, length - 3:] = 0
    return ids, mask


def hf_forward(family: Family, model, ids, mask):
    """HF logits, output_hidden_states, and every block's taps from forward hooks."""
    taps: dict[str, np.ndarray] = {}

    def keep(name):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            taps[name] = out.detach().numpy().copy()
        return hook

    handles = []
    for i, block in enumerate(family.blocks(model)):
        handles.append(block.register_forward_hook(keep(f"layers.{i}.out")))
        handles.append(family.attn_out(block).register_forward_hook(keep(f"layers.{i}.attn_out")))
        handles.append(family.act(block).register_forward_hook(keep(f"layers.{i}.mlp_hidden")))
    try:
        with torch.no_grad():
            out = model(torch.tensor(ids), attention_mask=None if mask is None
                        else torch.tensor(mask), output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return (out.logits.numpy(), [h.numpy() for h in out.hidden_states], taps)


def assert_close(ours, ref, mask, what: str, *, relative: bool = False):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs HF {ref.shape}"
    keep = np.ones(ref.shape[:2], bool) if mask is None else mask.astype(bool)
    err = np.abs(ours - ref)[keep].max()
    size = np.abs(ref[keep]).max()
    bound = TOL * (size if relative else max(1.0, size))
    assert err <= bound, f"{what}: max |memjax - HF| = {err:.3g} > {bound:.3g} (|HF| <= {size:.3g})"


def hf_logp(logits, ids):
    """HF-side log p(next token): log_softmax in torch at targets ids[:, 1:]."""
    logp = torch.log_softmax(torch.tensor(logits[:, :-1]), dim=-1)
    return torch.gather(logp, -1, torch.tensor(ids[:, 1:, None])).squeeze(-1).numpy()


def our_logp(model, ids, mask, chunk_size=8192):
    hidden = model.hidden_states(jnp.asarray(ids), jnp.asarray(mask))
    sig = jax.vmap(lambda h, t: tokens(hidden=h, unembedding=model.unembedding(), targets=t,
                                       chunk_size=chunk_size))(hidden[:, :-1],
                                                               jnp.asarray(ids[:, 1:]))
    return np.asarray(sig["logp"])


def seed_of(request) -> int:
    """This test's fresh seed from the conftest ``seed`` fixture (reported on failure)."""
    return request.getfixturevalue("seed")


# ---------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("case", list(TINY))
def test_tiny_models_match_hf_everywhere(case, tmp_path, request):
    family, kwargs = TINY[case]
    seed = seed_of(request)
    hf = hf_model(family, kwargs, seed)
    model, config = load_pretrained(saved(hf, tmp_path))
    ids, mask = inputs(kwargs["vocab_size"], seed)
    logits, hidden, hooked = hf_forward(family, hf, ids, mask)
    n_layers = kwargs[family.layers_key]

    ours_logits, taps = with_taps(model, TAPS, jnp.asarray(ids), jnp.asarray(mask))
    assert_close(ours_logits, logits, mask, f"{case} logits")
    # Every tap against HF's module outputs.
    assert set(taps) == set(hooked) | {"final"}
    for name, ref in hooked.items():
        assert_close(taps[name], ref, mask, f"{case} {name}")
    # HF's output_hidden_states: [embeddings, block 0, ..., block L-2, final norm]. The
    # last entry is the block output AFTER the final norm, not block L-1's output.
    assert len(hidden) == n_layers + 1
    for i in range(n_layers - 1):
        assert_close(taps[f"layers.{i}.out"], hidden[i + 1], mask, f"{case} hidden[{i + 1}]")
    assert_close(taps["final"], hidden[-1], mask, f"{case} hidden[-1]")
    assert np.abs(hidden[-1] - hooked[f"layers.{n_layers - 1}.out"]).max() > 1e-3

    # hidden_states @ unembedding() is the logits, and the chunked token signals on our
    # hidden states give HF's log-softmax at the targets.
    h = model.hidden_states(jnp.asarray(ids), jnp.asarray(mask))
    assert_close(h @ model.unembedding(), logits, mask, f"{case} hidden @ unembedding")
    assert model.unembedding().shape == (h.shape[-1], kwargs["vocab_size"])
    assert_close(our_logp(model, ids, mask), hf_logp(logits, ids), mask[:, :-1],
                 f"{case} token logp")


@pytest.mark.parametrize("family", [GPT2, NEOX], ids=lambda f: f.name)
def test_full_shape_random_weights_match_hf(family, request):
    """GPT-2 small and Pythia-160M shapes with HF's own random init, one [1, 16] input."""
    seed = seed_of(request)
    hf = hf_model(family, family.full, seed, scale=0)
    arch = ARCHITECTURES[family.name]
    hf_dict = hf.config.to_dict()
    config = arch.from_hf_config(hf_dict)
    # In memory: HF's state_dict (which names NeoX's unembedding lm_head) through the
    # converter, without writing ~600 MB of safetensors.
    reader = TensorReader({k: v.detach().numpy() for k, v in hf.state_dict().items()},
                          ignore=arch.ignore)
    abstract = nnx.eval_shape(lambda: arch.build(config, nnx.Rngs(0)))
    model = fill_params(abstract, arch.convert(reader, config), reader, jnp.float32, arch.name)

    ids, _ = inputs(hf.config.vocab_size, seed, batch=1, length=16)
    logits, hidden, _ = hf_forward(family, hf, ids, None)
    assert_close(model(jnp.asarray(ids)), logits, None, f"{family.name} logits", relative=True)
    ours_hidden = model.hidden_states(jnp.asarray(ids))
    assert_close(ours_hidden, hidden[-1], None, f"{family.name} final hidden", relative=True)
    logp = our_logp(model, ids, np.ones_like(ids))
    ref = hf_logp(logits, ids)
    assert np.abs(logp - ref).max() <= TOL, f"token logp: {np.abs(logp - ref).max():.3g}"


# ------------------------------------------------------------------------- strictness


def _tiny(family: Family) -> dict:
    return TINY["gpt2-gelu_new" if family is GPT2 else "neox-rot0.25-parallel"][1]


def _edit_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _block_key(folder: Path, family: Family, suffix: str) -> str:
    keys = load_file(folder / "model.safetensors")
    return next(k for k in sorted(keys) if k.endswith(suffix))


@pytest.mark.parametrize("family", [GPT2, NEOX], ids=lambda f: f.name)
def test_missing_extra_and_misshaped_tensors_are_named(family, tmp_path):
    folder = saved(hf_model(family, _tiny(family), 0), tmp_path / "hf")
    load_pretrained(folder)  # the untouched checkpoint loads

    norm_bias = _block_key(folder, family, "1.ln_2.bias" if family is GPT2 else
                           "1.post_attention_layernorm.bias")
    _edit_weights(folder, lambda t: t.pop(norm_bias))
    with pytest.raises(InputError, match=r"missing tensors: .*" + re.escape(norm_bias)):
        load_pretrained(folder)

    folder = saved(hf_model(family, _tiny(family), 0), tmp_path / "hf2")
    extra = "transformer.h.0.mlp.c_gate.weight" if family is GPT2 else \
        "gpt_neox.layers.0.mlp.gate.weight"
    _edit_weights(folder, lambda t: t.update({extra: np.zeros((4, 4), np.float32)}))
    with pytest.raises(InputError, match=r"unexpected tensors: .*" + re.escape(extra)):
        load_pretrained(folder)

    folder = saved(hf_model(family, _tiny(family), 0), tmp_path / "hf3")
    qkv = _block_key(folder, family, "0.attn.c_attn.weight" if family is GPT2 else
                     "0.attention.query_key_value.weight")
    _edit_weights(folder, lambda t: t.update({qkv: t[qkv][:, :-4].copy()}))
    path = "layers.0.c_attn.kernel" if family is GPT2 else "layers.0.query_key_value.kernel"
    # Named by both the model's parameter path and the checkpoint tensor it came from.
    with pytest.raises(InputError, match=re.escape(f"{path} (checkpoint tensor {qkv}): "
                                                   "checkpoint shape")):
        load_pretrained(folder)


def test_neox_unembedding_is_required_unless_tied(tmp_path):
    folder = saved(hf_model(NEOX, _tiny(NEOX), 0), tmp_path / "untied")
    _edit_weights(folder, lambda t: t.pop("embed_out.weight"))
    with pytest.raises(InputError, match=r"missing tensors: .*embed_out\.weight"):
        load_pretrained(folder)

    folder = saved(hf_model(NEOX, dict(_tiny(NEOX), tie_word_embeddings=True), 0),
                   tmp_path / "tied")
    model, config = load_pretrained(folder)
    assert config.tie_word_embeddings and model.embed_out is None
    np.testing.assert_array_equal(model.unembedding(), model.embed_in[...].T)
    # A tied config with a different unembedding in the file is refused.
    _edit_weights(folder, lambda t: t.update(
        {"embed_out.weight": t["gpt_neox.embed_in.weight"] + 1.0}))
    with pytest.raises(InputError, match="differs from embed_in"):
        load_pretrained(folder)


CONFIG_REFUSALS = [
    (GPT2, {"tie_word_embeddings": False}, "tie_word_embeddings"),
    (GPT2, {"activation_function": "bogus_act"}, "bogus_act"),
    (GPT2, {"some_new_switch": 1}, "some_new_switch"),
    (NEOX, {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4,
                                "partial_rotary_factor": 0.25}}, "linear"),
    (NEOX, {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "dynamic"),
    (NEOX, {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                "partial_rotary_factor": 0.25, "factor": 2.0}}, "factor"),
    (NEOX, {"hidden_act": "bogus_act"}, "bogus_act"),
    (NEOX, {"head_dim": 8}, "head_dim"),
    (NEOX, {"some_new_switch": 1}, "some_new_switch"),
]


@pytest.mark.parametrize("family,changes,named", CONFIG_REFUSALS,
                         ids=[f"{f.name}-{n}" for f, _, n in CONFIG_REFUSALS])
def test_unimplemented_config_attributes_are_refused(family, changes, named, tmp_path):
    folder = saved(hf_model(family, _tiny(family), 0), tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(InputError, match=re.escape(named)):
        load_pretrained(folder)


def test_neox_rope_settings_follow_hf_precedence():
    """rope_parameters (or rope_scaling) over the legacy rotary_pct / rotary_emb_base."""
    from_hf = ARCHITECTURES["gpt_neox"].from_hf_config
    base = dict(model_type="gpt_neox", hidden_size=64, num_attention_heads=4)
    legacy = from_hf(dict(base, rotary_pct=0.5, rotary_emb_base=500))
    assert (legacy.rotary_pct, legacy.rotary_emb_base) == (0.5, 500.0)
    both = from_hf(dict(base, rotary_pct=0.5, rotary_emb_base=500,
                        rope_parameters={"rope_type": "default", "rope_theta": 1e4}))
    assert (both.rotary_pct, both.rotary_emb_base) == (0.5, 1e4)
    default = from_hf(dict(base, rope_scaling=None))
    assert (default.rotary_pct, default.rotary_emb_base) == (0.25, 1e4)
    # Every attribute of HF's own default config is understood.
    hf_default = from_hf(transformers.GPTNeoXConfig().to_dict())
    assert (hf_default.hidden_size, hf_default.num_hidden_layers) == (6144, 44)


# ------------------------------------------------------------- save/restore, sharding


@pytest.mark.parametrize("family", [GPT2, NEOX], ids=lambda f: f.name)
def test_save_restore_round_trip(family, tmp_path):
    model, config = load_pretrained(saved(hf_model(family, _tiny(family), 1), tmp_path / "hf"))
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


@pytest.mark.parametrize("family", [GPT2, NEOX], ids=lambda f: f.name)
def test_model_parallel_scoring_equals_one_device(family, tmp_path, request):
    seed = seed_of(request)
    kwargs = dict(_tiny(family), vocab_size=96)  # even: the embeddings shard too
    model, config = load_pretrained(saved(hf_model(family, kwargs, seed), tmp_path))
    graphdef, state = nnx.split(model)
    rules = rules_for(config)

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

    mesh = make_mesh(model=2)
    specs = {k: s.spec for k, s in _named_shardings(state, mesh, rules).items()}
    qkv = "layers/0/c_attn/kernel" if family is GPT2 else "layers/0/query_key_value/kernel"
    out = "layers/0/c_proj/kernel" if family is GPT2 else "layers/0/dense/kernel"
    embed = "wte" if family is GPT2 else "embed_in"
    assert specs[qkv] == jax.P(None, "model") and specs[out] == jax.P("model", None)
    assert specs[embed] == jax.P("model", None)

    one = score(fn, state, data, batch_size=4, progress=False,
                mesh=make_mesh(devices=jax.devices()[:1]))
    sharded = score(fn, state, data, batch_size=8, progress=False, mesh=mesh,
                    param_rules=rules)
    for key in ("logp", "mean_loss", "mu", "sigma"):
        err = np.abs(sharded[key] - one[key]).max()
        assert err <= TOL, f"{key}: sharded vs one device differ by {err:.3g}"
    # And both are HF's numbers.
    hf = hf_model(family, kwargs, seed)
    logits, _, _ = hf_forward(family, hf, ids, mask)
    assert_close(one["logp"], hf_logp(logits, ids), mask[:, 1:], "scored logp")


def _named_shardings(state, mesh, rules) -> dict[str, object]:
    from memjax.engine.mesh import path_name

    shardings = param_shardings(state, mesh, rules)
    flat = jax.tree_util.tree_flatten_with_path(
        shardings, is_leaf=lambda x: hasattr(x, "spec"))[0]
    return {path_name(path): s for path, s in flat}


def test_neox_partition_rules_cover_every_projection():
    """Every projection and embedding of a NeoX model matches a rule."""
    config = ARCHITECTURES["gpt_neox"].from_hf_config(
        dict(_NEOX_TINY, model_type="gpt_neox", vocab_size=96))
    state = nnx.split(nnx.eval_shape(lambda: ARCHITECTURES["gpt_neox"].build(
        config, nnx.Rngs(0))))[1]
    specs = {k: s.spec for k, s in _named_shardings(state, make_mesh(model=2),
                                                     rules_for(config)).items()}
    sharded = sorted(k for k, s in specs.items() if any(a is not None for a in s))
    for i in range(config.num_hidden_layers):
        for name in ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"):
            assert f"layers/{i}/{name}/kernel" in sharded
        assert f"layers/{i}/query_key_value/bias" in sharded
        assert f"layers/{i}/dense_h_to_4h/bias" in sharded
    assert {"embed_in", "embed_out"} <= set(sharded)
    assert not any("layernorm" in k or "layer_norm" in k for k in sharded)
