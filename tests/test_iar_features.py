"""IAR membership features (Kowalczuk et al. 2025) against an independent float64 NumPy
transcription of the reference extractor's definitions (sprintml/privacy_attacks_against_iars,
``llm_mia.py``), written here batch-wise as the reference computes them: ``sigma`` as
``sum p log^2 p - mu^2``, ``topk`` of negated scores, SURP's bound ``max(topk(-log p, k))``,
the zlib length of ``str(list)``, CAMIA's below-(running-)mean fractions and slope. The
reference orients every feature "members lower"; memjax's value is exactly minus it.

Tolerances: per-example functions within 1e-9 relative (both float64; only the variance
formula and summation order differ). The engine path runs the model in float32 on the
device: its continuous features within 5e-5 relative (float32 model and log-softmax, errors
~1e-6, amplified by Min-K%++'s division by the variance; measured max 9.5e-6 over 40
examples x 3 logits kinds), and the
token-count features (CAMIA's fractions, SURP's count) within one token (1 / T): a float32
rounding can move a token lying within ~1e-6 of its threshold.
"""

from __future__ import annotations

import argparse
import json
import zlib

import numpy as np
import pytest

import memjax.mia
import memjax.models.llamagen  # noqa: F401 - registers the port (until memjax.models does)
from memjax.convert import load
from memjax.errors import InputError
from memjax.mia import _iar
from tests.test_models_llamagen import CONFIGS, random_state_dict, torch_forward, write_folder

# Until memjax/mia/__init__.py re-exports them (the CLI imports the public names).
for _name in ("iar_features", "IAR_FEATURES", "IAR_LOGITS", "IAR_KS", "IAR_MAX_ENTROPIES"):
    if not hasattr(memjax.mia, _name):
        setattr(memjax.mia, _name, getattr(_iar, _name))

REL = 1e-9


# --------------------------------------------------------------------------- the reference


def ref_features(logits: np.ndarray, tokens: np.ndarray, ks, entropies) -> dict:
    """{name: [N]} in the REFERENCE's orientation (members lower), float64."""
    z = np.asarray(logits, np.float64)
    n, t, _ = z.shape
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) + z.max(
        -1, keepdims=True)
    logp_all = z - lse
    p = np.exp(logp_all)
    lp = np.take_along_axis(logp_all, tokens[..., None], 2)[..., 0]
    mu = (p * logp_all).sum(2)
    var = (p * logp_all ** 2).sum(2) - mu ** 2  # the reference's "sigma"
    topk_mean = lambda a, k: -np.sort(-a, axis=1)[:, :k].mean(1)  # torch.topk(a, k).mean
    out = {"loss": (-lp).mean(1),
           "zlib": -lp.mean(1) / np.array([len(zlib.compress(bytes(str(r.tolist()), "utf=8")))
                                           for r in tokens])}
    others = z.copy()
    np.put_along_axis(others, tokens[..., None], -np.inf, 2)
    out["hinge"] = -(np.take_along_axis(z, tokens[..., None], 2)[..., 0]
                     - others.max(2)).mean(1)
    for k in ks:
        kk = int(k * t)
        out[f"min_k_{k:g}"] = topk_mean(-lp, kk)
        out[f"min_k_pp_{k:g}"] = topk_mean(-(lp - mu) / np.sqrt(var), kk)  # the paper's sigma
        out[f"min_k_pp_var_{k:g}"] = topk_mean(-(lp - mu) / (var + 1e-6), kk)
    for e in entropies:
        bound = np.sort(-lp, axis=1)[:, ::-1][:, :int(ks[0] * t)].max(1)[:, None]
        chosen = (-mu < e) & (lp < bound)
        out[f"surp_{e:g}"] = -(lp * chosen).sum(1) / np.clip(chosen.sum(1), 1e-6, None)
        out[f"surp_count_{e:g}"] = -chosen.mean(1)
    zs = (lp - mu) / (var + 1e-6)
    running = lambda a: np.cumsum(a, 1) / np.arange(1, t + 1)
    x = np.arange(t, dtype=np.float64)
    out |= {"camia_below_mean": (lp < lp.mean(1, keepdims=True)).mean(1),
            "camia_below_mean_z": (zs < zs.mean(1, keepdims=True)).mean(1),
            "camia_below_prev_mean": -(lp < running(lp)).mean(1),
            "camia_below_prev_mean_z": -(zs < running(zs)).mean(1),
            "camia_slope": ((x - x.mean()) * (lp - lp.mean(1, keepdims=True))).sum(1)
            / ((x - x.mean()) ** 2).sum()}
    return out


def random_logits(rng, n: int, t: int, v: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits with per-token temperature (entropies from ~0 to ~log V) and tokens that are
    sometimes the argmax."""
    z = rng.normal(size=(n, t, v)) * rng.uniform(0.3, 6.0, (n, t, 1))
    tokens = rng.integers(0, v, (n, t))
    top = rng.random((n, t)) < 0.3
    tokens = np.where(top, z.argmax(2), tokens)
    return z, tokens


def close(got, want, rel=REL) -> bool:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return bool(np.all(np.abs(got - want) <= rel * np.maximum(1.0, np.abs(want))))


# --------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("t, v", [(16, 40), (25, 7)])
def test_each_feature_equals_the_reference(rng, t, v):
    z, tokens = random_logits(rng, 6, t, v)
    ks, entropies = (0.1, 0.2, 0.5), (0.5, 1.0, 1.8)
    want = ref_features(z, tokens, ks, entropies)
    for i in range(len(z)):
        w = {name: col[i] for name, col in want.items()}
        zi, ti = z[i], tokens[i]
        assert close(_iar.iar_loss(zi, ti), -w["loss"])
        assert close(_iar.iar_zlib(zi, ti), -w["zlib"])
        assert close(_iar.iar_hinge(zi, ti), -w["hinge"])
        for k in ks:
            assert close(_iar.iar_min_k(zi, ti, k), -w[f"min_k_{k:g}"])
            assert close(_iar.iar_min_k_pp(zi, ti, k), -w[f"min_k_pp_{k:g}"])
            assert close(_iar.iar_min_k_pp(zi, ti, k, scale="variance"),
                         -w[f"min_k_pp_var_{k:g}"])
        for e in entropies:
            surp, count = _iar.iar_surp(zi, ti, e)
            assert close(surp, -w[f"surp_{e:g}"]) and close(count, -w[f"surp_count_{e:g}"])
        camia = _iar.iar_camia(zi, ti)
        for name in _iar.CAMIA:
            assert close(camia[name], -w[f"camia_{name}"]), name
    # Nothing degenerate: SURP selected some tokens but not all, for some example.
    counts = -want["surp_count_1"]
    assert ((counts > 0) & (counts < 1)).any()


def test_min_k_pp_variants_differ_and_tiny_k_scores_one_token(rng):
    z, tokens = random_logits(rng, 1, 12, 30)
    std = _iar.iar_min_k_pp(z[0], tokens[0], 0.3)
    var = _iar.iar_min_k_pp(z[0], tokens[0], 0.3, scale="variance")
    assert not np.isclose(std, var)
    stats = _iar.iar_token_statistics(z[0], tokens[0])
    # k * T < 1: memjax scores the single lowest token (the reference's topk(0) is NaN).
    assert close(_iar.iar_min_k(z[0], tokens[0], 0.01), stats["logp"].min())
    with pytest.raises(InputError, match="scale"):
        _iar.iar_min_k_pp(z[0], tokens[0], 0.3, scale="sigma")


def test_cfg_difference_is_cond_minus_uncond_used_as_logits(rng):
    cond, tokens = random_logits(rng, 4, 10, 20)
    uncond = rng.normal(size=cond.shape) * 2
    want = ref_features(cond - uncond, tokens, (0.2,), (1.0,))
    diff = _iar.cfg_logits(cond, uncond)
    for i in range(4):
        assert close(_iar.iar_loss(diff[i], tokens[i]), -want["loss"][i])
        assert close(_iar.iar_min_k_pp(diff[i], tokens[i], 0.2), -want["min_k_pp_0.2"][i])
        assert not close(_iar.iar_loss(uncond[i] - cond[i], tokens[i]), -want["loss"][i])


# --------------------------------------------------------------------------- engine path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    c = CONFIGS["gqa-grid3-cls1"]
    sd = random_state_dict(c, 7)
    folder = write_folder(tmp_path_factory.mktemp("llamagen"), c, sd)
    return load(folder), c, sd, folder


def test_iar_features_equal_reference_on_model_logits(tiny_model, rng):
    model, c, sd, _ = tiny_model
    n, t = 10, c["block_size"]
    labels = rng.integers(0, c["num_classes"], n).astype(np.int32)
    ids = rng.integers(0, c["vocab_size"], (n, t)).astype(np.int32)
    ks, entropies = (0.2, 0.5), (1.0, 3.0)
    data = {"class_labels": labels, "input_ids": ids}
    got = _iar.iar_features(model, data, k=ks, max_entropies=entropies, batch_size=8,
                            progress=False)
    cond = torch_forward(sd, c, labels, ids).astype(np.float64)
    uncond = torch_forward(sd, c, np.full(n, c["num_classes"]), ids).astype(np.float64)
    np.testing.assert_array_equal(got["id"], np.arange(n))
    # How far the two float32 forwards are apart (the port's own test bounds it; ~1e-5 here).
    logit_error = {kind: np.abs(memjax_logits(model, np.full(n, label) if kind == "uncond"
                                              else labels, ids) - ref).max()
                   for kind, label, ref in (("cond", None, cond),
                                            ("uncond", c["num_classes"], uncond))}
    logit_error["cfg"] = logit_error["cond"] + logit_error["uncond"]
    counted = ("camia_below", "surp_count")
    for kind, logits in (("cond", cond), ("uncond", uncond), ("cfg", cond - uncond)):
        want = ref_features(logits, ids, ks, entropies)
        moved = feature_sensitivity(logits, ids, ks, entropies, logit_error[kind], rng)
        assert len(want) == sum(name.startswith(kind + "_") for name in got)
        for name, ref in want.items():
            column = f"{kind}_{name}"
            # 5e-5: float32 statistics of well-conditioned features; where a feature is
            # ill-conditioned, 3x its own response to a logit error of the measured size (the
            # variance-scaled Min-K%++ of CFG-difference logits divides by the variance of
            # near-uniform tokens where cond ~ uncond: 2e-4 over 150 seeds, vs <= 1.2e-5 for
            # every other feature).
            tol = 1.0 / t + 1e-9 if name.startswith(counted) else max(5e-5, 3 * moved[name])
            err = np.abs(got[column] + ref) / np.maximum(1.0, np.abs(ref))
            assert err.max() <= tol, f"{column}: {err.max():.3g} (tolerance {tol:.3g})"


def memjax_logits(model, labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """[N, T, V] float64 logits of memjax's port, one example at a time."""
    import jax.numpy as jnp

    return np.stack([np.asarray(model.apply(model.params, {
        "class_labels": jnp.int32(label), "input_ids": jnp.asarray(row)}), np.float64)
        for label, row in zip(labels, ids, strict=True)])


def feature_sensitivity(logits, ids, ks, entropies, error: float, rng, draws: int = 8
                        ) -> dict[str, float]:
    """Each reference feature's largest relative change (as the test measures errors) when
    every logit moves by up to ``error`` (uniform draws): its conditioning at this input."""
    base = ref_features(logits, ids, ks, entropies)
    moved = {name: 0.0 for name in base}
    for _ in range(draws):
        shifted = ref_features(logits + rng.uniform(-error, error, logits.shape), ids, ks,
                               entropies)
        for name, ref in base.items():
            change = np.abs(shifted[name] - ref) / np.maximum(1.0, np.abs(ref))
            moved[name] = max(moved[name], float(change.max()))
    return moved


def test_store_rerun_reads_the_same_features(tiny_model, tmp_path, rng):
    model, c, _, _ = tiny_model
    data = {"class_labels": rng.integers(0, c["num_classes"], 5).astype(np.int32),
            "input_ids": rng.integers(0, c["vocab_size"], (5, c["block_size"])).astype(
                np.int32)}
    first = _iar.iar_features(model, data, batch_size=8, store=tmp_path / "s", progress=False)
    again = _iar.iar_features(model, data, batch_size=8, store=tmp_path / "s", progress=False)
    plain = _iar.iar_features(model, data, batch_size=8, progress=False)
    assert set(first) == set(again) == set(plain)
    for name in first:
        np.testing.assert_array_equal(again[name], first[name])
        np.testing.assert_array_equal(plain[name], first[name])


def test_iar_features_refuses_bad_input(tiny_model):
    model, c, _, _ = tiny_model
    ok = {"class_labels": np.zeros(2, np.int32),
          "input_ids": np.zeros((2, c["block_size"]), np.int32)}
    with pytest.raises(InputError, match="class_labels"):
        _iar.iar_features(model, dict(ok, class_labels=np.array([0, c["num_classes"]])),
                          progress=False)
    with pytest.raises(InputError, match="input_ids"):
        _iar.iar_features(model, dict(ok, input_ids=np.full((2, 9), c["vocab_size"])),
                          progress=False)
    with pytest.raises(InputError, match="features"):
        _iar.iar_features(model, ok, features=("loss", "ppl"), progress=False)
    with pytest.raises(InputError, match="k="):
        _iar.iar_features(model, ok, k=1.5, progress=False)


# --------------------------------------------------------------------------- CLI


def run_cli(argv: list[str]) -> int:
    """``memjax.cli.main`` with ``mia iar`` registered (until memjax/cli/_mia.py does)."""
    from memjax import cli
    from memjax.cli import _mia_iar

    parser = cli.build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices["mia"]._actions:
                if isinstance(sub, argparse._SubParsersAction) and "iar" not in sub.choices:
                    _mia_iar.register(sub)
                    cli._distributed.add_options(sub.choices["iar"])
    return cli._run(parser, argv)


def test_cli_writes_the_features_as_parquet(tiny_model, tmp_path, rng, capsys):
    import pyarrow.parquet as pq

    model, c, _, folder = tiny_model
    n = 6
    labels = rng.integers(0, c["num_classes"], n)
    ids = rng.integers(0, c["vocab_size"], (n, c["block_size"]))
    member = np.arange(n) % 2 == 0
    np.savez(tmp_path / "tokens.npz", class_labels=labels, input_ids=ids, member=member)
    rows = [{"class_labels": int(a), "input_ids": b.tolist()} for a, b in zip(labels, ids,
                                                                              strict=True)]
    (tmp_path / "tokens.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    want = _iar.iar_features(model, {"class_labels": labels.astype(np.int32),
                                     "input_ids": ids.astype(np.int32)},
                             features=("loss", "min_k_pp"), k=(0.2,), progress=False)
    for data in ("tokens.npz", "tokens.jsonl"):
        out = tmp_path / f"out-{data}"
        assert run_cli(["mia", "iar", "--model", str(folder), "--data", str(tmp_path / data),
                        "--features", "loss", "min_k_pp", "--k", "0.2", "--out", str(out),
                        "--no-progress"]) == 0
        table = pq.read_table(out / "scores.parquet").to_pydict()
        names = ["cond_loss", "cond_min_k_pp_0.2", "uncond_loss", "uncond_min_k_pp_0.2",
                 "cfg_loss", "cfg_min_k_pp_0.2"]
        assert set(names) <= set(table)
        for name in names:
            np.testing.assert_allclose(table[name], want[name], rtol=1e-6)
        assert ("member" in table) == (data == "tokens.npz")
    assert "cfg_loss AUC" in capsys.readouterr().out


@pytest.mark.parametrize("content, argv_extra, message", [
    (None, [], "no such file"),
    ("npz-missing", [], "input_ids"),
    ("npz-float", [], "integers"),
    ("npz-range", [], "input_ids"),
    ("jsonl-bad", [], "line 1"),
    ("jsonl-ragged", [], "one length"),
    ("npz-ok", ["--k", "2"], "--k"),
    ("npz-ok", ["--features", "ppl"], "--features"),
])
def test_cli_bad_input_exits_2_without_traceback(tiny_model, tmp_path, capsys, content,
                                                 argv_extra, message):
    _, c, _, folder = tiny_model
    t = c["block_size"]
    path = tmp_path / ("data.jsonl" if content and content.startswith("jsonl") else "data.npz")
    if content == "npz-missing":
        np.savez(path, class_labels=np.zeros(2, int))
    elif content == "npz-float":
        np.savez(path, class_labels=np.zeros(2, int), input_ids=np.zeros((2, t)))
    elif content == "npz-range":
        np.savez(path, class_labels=np.zeros(2, int), input_ids=np.full((2, t), 10**4))
    elif content == "npz-ok":
        np.savez(path, class_labels=np.zeros(2, int), input_ids=np.zeros((2, t), int))
    elif content == "jsonl-bad":
        path.write_text("{not json\n")
    elif content == "jsonl-ragged":
        path.write_text('{"class_labels": 0, "input_ids": [1, 2]}\n'
                        '{"class_labels": 1, "input_ids": [1]}\n')
    code = run_cli(["mia", "iar", "--model", str(folder), "--data", str(path),
                    "--out", str(tmp_path / "out"), "--no-progress", *argv_extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
