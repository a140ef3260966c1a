"""LlamaGen's c2i GPT port against an independent PyTorch forward written here from the facts
of LlamaGen's ``autoregressive/models/gpt.py`` (Sun et al. 2024).

The reference below is a plain functional forward over LlamaGen's own state-dict keys:
sequence ``[class row, tok_embeddings(ids[:-1])]``, fused ``wqkv`` split [q; k; v],
interleaved-pair 2-D rotary from a table of ``cls_token_num`` zero rows then the grid cells
(row-index angles on the first head_dim / 4 pairs, column-index on the rest), GQA by
``repeat_interleave``, causal SDPA, SwiGLU ``w2(silu(w1 x) * w3 x)``, RMSNorm
``norm(x.float()).type_as(x) * weight``. Random weights around LlamaGen's init, fp32.

Tolerance: ``TOL = 1e-5`` relative to the largest logit magnitude (logits here reach ~4;
fp32 sums of at most a few hundred terms in a different order; measured max 1.7e-6
relative). The same bound holds on 8 devices and on 1 (only the batch placement differs).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import memjax.models.llamagen  # noqa: F401 - registers the port (until memjax.models does)
from memjax.cli import main
from memjax.convert import load
from memjax.engine import make_mesh, score
from memjax.errors import InputError

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

TOL = 1e-5

# name -> config.json fields (ModelArgs names); head_dim = dim / n_head, a multiple of 4.
CONFIGS = {
    "mha-grid4-cls1": dict(dim=32, n_layer=2, n_head=2, multiple_of=8, vocab_size=40,
                           num_classes=5, block_size=16, cls_token_num=1),
    "gqa-grid3-cls1": dict(dim=48, n_layer=2, n_head=4, n_kv_head=2, multiple_of=16,
                           ffn_dim_multiplier=1.3, vocab_size=33, num_classes=3,
                           block_size=9, cls_token_num=1, rope_base=100.0),
    "gqa-grid5-cls3": dict(dim=24, n_layer=1, n_head=2, n_kv_head=1, multiple_of=4,
                           vocab_size=20, num_classes=4, block_size=25, cls_token_num=3,
                           norm_eps=1e-6),
    "mha-grid2-cls2": dict(dim=16, n_layer=2, n_head=1, multiple_of=8, vocab_size=12,
                           num_classes=2, block_size=4, cls_token_num=2),
}


def _ffn_hidden(c: dict) -> int:
    hidden = int(2 * (4 * c["dim"]) / 3)
    if c.get("ffn_dim_multiplier") is not None:
        hidden = int(c["ffn_dim_multiplier"] * hidden)
    m = c["multiple_of"]
    return hidden if hidden % m == 0 else hidden + m - hidden % m


def random_state_dict(c: dict, seed: int) -> dict:
    """LlamaGen's keys with random weights (N(0, 0.02) as its init; norms around 1 and the
    zero-initialised output drawn too, so nothing is trivial)."""
    g = torch.Generator().manual_seed(seed)
    n = lambda *shape, s=0.02: torch.randn(*shape, generator=g) * s
    d, h = c["dim"], c["n_head"]
    kv = c.get("n_kv_head") or h
    dh, f = d // h, _ffn_hidden(c)
    sd = {"tok_embeddings.weight": n(c["vocab_size"], d, s=1.0),
          "cls_embedding.embedding_table.weight": n(c["num_classes"] + 1, d, s=1.0),
          "norm.weight": 1 + n(d, s=0.1), "output.weight": n(c["vocab_size"], d, s=0.2)}
    for i in range(c["n_layer"]):
        p = f"layers.{i}."
        sd[p + "attention.wqkv.weight"] = n((h + 2 * kv) * dh, d, s=0.3)
        sd[p + "attention.wo.weight"] = n(d, d, s=0.2)
        sd[p + "feed_forward.w1.weight"] = n(f, d, s=0.2)
        sd[p + "feed_forward.w3.weight"] = n(f, d, s=0.2)
        sd[p + "feed_forward.w2.weight"] = n(d, f, s=0.2)
        sd[p + "attention_norm.weight"] = 1 + n(d, s=0.1)
        sd[p + "ffn_norm.weight"] = 1 + n(d, s=0.1)
    return sd


def torch_forward(sd: dict, c: dict, labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """LlamaGen's c2i training forward (eval mode), logits [B, T, V] for T = len(ids)."""
    F = torch.nn.functional
    d, h = c["dim"], c["n_head"]
    kv = c.get("n_kv_head") or h
    dh, eps, cls_num = d // h, c.get("norm_eps", 1e-5), c["cls_token_num"]
    labels, ids = torch.as_tensor(labels), torch.as_tensor(ids)
    b, t = ids.shape

    def rms(x, w):
        return (x.float() * torch.rsqrt(torch.mean(x * x, -1, keepdim=True) + eps)) * w

    # The rotary table: cls_num zero rows, then grid cell (r, c) in raster order.
    half, grid = dh // 2, int(c["block_size"] ** 0.5)
    freqs = 1.0 / (c.get("rope_base", 10000) ** (torch.arange(0, half, 2)[: half // 2].float()
                                                  / half))
    steps = torch.outer(torch.arange(grid), freqs)
    angles = torch.cat([steps[:, None, :].expand(-1, grid, -1),
                        steps[None, :, :].expand(grid, -1, -1)], -1).flatten(0, 1)
    table = torch.stack([torch.cos(angles), torch.sin(angles)], -1)
    table = torch.cat([torch.zeros(cls_num, half, 2), table])[:t]

    def rotate(x):  # x [B, T, H, dh], pairs (2j, 2j+1)
        pairs = x.reshape(*x.shape[:-1], -1, 2)
        cs = table.view(1, t, 1, half, 2)
        out = torch.stack([pairs[..., 0] * cs[..., 0] - pairs[..., 1] * cs[..., 1],
                           pairs[..., 1] * cs[..., 0] + pairs[..., 0] * cs[..., 1]], -1)
        return out.flatten(3)

    x = torch.cat([sd["cls_embedding.embedding_table.weight"][labels][:, None],
                   sd["tok_embeddings.weight"][ids[:, :-1]]], 1)
    for i in range(c["n_layer"]):
        p = f"layers.{i}."
        a = rms(x, sd[p + "attention_norm.weight"]) @ sd[p + "attention.wqkv.weight"].T
        q, k, v = a.split([d, kv * dh, kv * dh], -1)
        q = rotate(q.view(b, t, h, dh)).transpose(1, 2)
        k = rotate(k.view(b, t, kv, dh)).transpose(1, 2).repeat_interleave(h // kv, 1)
        v = v.view(b, t, kv, dh).transpose(1, 2).repeat_interleave(h // kv, 1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + o.transpose(1, 2).reshape(b, t, d) @ sd[p + "attention.wo.weight"].T
        m = rms(x, sd[p + "ffn_norm.weight"])
        w1, w2, w3 = (sd[f"{p}feed_forward.w{j}.weight"] for j in (1, 2, 3))
        x = x + (F.silu(m @ w1.T) * (m @ w3.T)) @ w2.T
    return (rms(x, sd["norm.weight"]) @ sd["output.weight"].T).numpy()


def write_folder(folder, c: dict, sd: dict, weights: str = "safetensors", wrap=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llamagen", **c}))
    if weights == "safetensors":
        safetensors_torch.save_file(sd, str(folder / "model.safetensors"))
    else:
        torch.save(sd if wrap is None else {wrap: sd}, folder / "c2i.pt")
    return folder


def _inputs(c: dict, rng, n: int, t: int):
    labels = rng.integers(0, c["num_classes"] + 1, n).astype(np.int32)  # incl. the null class
    labels[0] = c["num_classes"]
    return labels, rng.integers(0, c["vocab_size"], (n, t)).astype(np.int32)


# gqa-grid3-cls1 (ffn_dim_multiplier, rope_base, 2 K/V heads for 4) is compared in
# test_pickled_state_dict_loads_with_allow_pickle and tests/test_iar_features.py.
@pytest.mark.parametrize("name", ["mha-grid4-cls1", "gqa-grid5-cls3", "mha-grid2-cls2"])
def test_port_equals_pytorch_on_8_and_1_devices(name, tmp_path, rng, seed):
    c = CONFIGS[name]
    sd = random_state_dict(c, seed)
    model = load(write_folder(tmp_path / name, c, sd))
    assert model.kind == "iar" and model.inputs == ("class_labels", "input_ids")
    # The full grid on 8 devices and on 1; a shorter prefix of it on 8.
    for t, meshes in ((c["block_size"], ("8 devices", "1 device")),
                      (max(2, c["block_size"] - 3), ("8 devices",))):
        labels, ids = _inputs(c, rng, 11, t)
        expected = torch_forward(sd, c, labels, ids)
        assert np.abs(expected).max() > 0.1  # nothing trivial
        data = {"class_labels": labels, "input_ids": ids}
        runs = {"8 devices": dict(batch_size=8),
                "1 device": dict(batch_size=3, mesh=make_mesh(devices=jax.devices()[:1]))}
        for where in meshes:
            got = score(model.apply, model.params, data, progress=False, **runs[where])
            err = np.abs(got["score"] - expected).max() / max(1.0, np.abs(expected).max())
            assert err <= TOL, f"{name} T={t} {where}: max |memjax - torch| = {err:.3g}"


def _one_device(model, labels, ids) -> np.ndarray:
    return score(model.apply, model.params, {"class_labels": labels, "input_ids": ids},
                 batch_size=len(ids), progress=False,
                 mesh=make_mesh(devices=jax.devices()[:1]))["score"]


def test_pickled_state_dict_loads_with_allow_pickle(tmp_path, rng, seed):
    c = CONFIGS["gqa-grid3-cls1"]
    sd = random_state_dict(c, seed)
    # DDP's "module." prefix on every key, and LlamaGen's freqs_cis buffer: both handled.
    wrapped = {f"module.{k}": v for k, v in sd.items()} | {"module.freqs_cis": torch.zeros(3)}
    folder = write_folder(tmp_path / "pt", c, wrapped, weights="pt")
    with pytest.raises(InputError, match="pickle"):
        load(folder)
    labels, ids = _inputs(c, rng, 4, 9)
    expected = torch_forward(sd, c, labels, ids)
    # memjax.load, and `memjax convert --allow-pickle` then memjax.load of its folder.
    assert main(["convert", "--allow-pickle", str(folder), str(tmp_path / "converted")]) == 0
    for model in (load(folder, allow_pickle=True), load(tmp_path / "converted")):
        assert model.kind == "iar"
        got = _one_device(model, labels, ids)
        assert np.abs(got - expected).max() <= TOL * max(1.0, np.abs(expected).max())


def test_released_model_dict_pickle_loads(tmp_path, rng, seed):
    c = CONFIGS["mha-grid2-cls2"]
    sd = random_state_dict(c, seed)
    model = load(write_folder(tmp_path / "released", c, sd, weights="pt", wrap="model"),
                 allow_pickle=True)
    labels, ids = _inputs(c, rng, 3, 4)
    got = _one_device(model, labels, ids)
    expected = torch_forward(sd, c, labels, ids)
    assert np.abs(got - expected).max() <= TOL * max(1.0, np.abs(expected).max())


def test_training_checkpoint_with_objects_is_refused_by_name(tmp_path, seed):
    """A training checkpoint that pickles an argparse.Namespace beside the weights is
    refused (never unpickled) with what to do instead."""
    import argparse

    c = CONFIGS["mha-grid2-cls2"]
    folder = write_folder(tmp_path / "train", c, random_state_dict(c, seed), weights="pt",
                          wrap="model")
    pt = next(folder.glob("*.pt"))
    torch.save({"model": torch.load(pt)["model"], "args": argparse.Namespace(lr=1e-4)}, pt)
    with pytest.raises(InputError, match="Re-save just the weights"):
        load(folder, allow_pickle=True)


@pytest.mark.parametrize("change, match", [
    ({"gpt_type": "t2i"}, "c2i"),
    ({"block_size": 10}, "square"),
    ({"n_head": 3}, "head_dim"),
    ({"n_kv_head": 3, "n_head": 2}, "n_kv_head"),
    ({"rope_scaling": {"type": "linear"}}, "rope_scaling"),
])
def test_bad_configs_are_refused_by_name(tmp_path, change, match, seed):
    c = dict(CONFIGS["mha-grid4-cls1"], **change)
    base = CONFIGS["mha-grid4-cls1"]
    folder = write_folder(tmp_path / "bad", c, random_state_dict(base, seed))
    with pytest.raises(InputError, match=match):
        load(folder)


def test_mis_shaped_wqkv_is_named(tmp_path, seed):
    c = CONFIGS["gqa-grid3-cls1"]
    sd = random_state_dict(dict(c, n_kv_head=4), seed)
    with pytest.raises(InputError, match="layers.0.attention.wqkv.weight"):
        load(write_folder(tmp_path / "mis", c, sd))
