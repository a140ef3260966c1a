"""The image-generator demonstrations of the audit (memjax.audit.generators), asserted with
margins, and reproduced from the CLI on the models the report saves.

Seed 0 is tested (the audit's run, cached and shared with tests/test_cli.py's audit);
the margins were measured over seeds 0-2 under the tests' 8 CPU devices (training is
chaotic in the last bits, so 1 device trains a slightly different model), written beside
each assertion as seed0/seed1/seed2, and every bound below holds for each of them. A
false-positive check's p-value is uniform under the null, so its bound is 1e-3: a 1-in-1,000
draw, not a property of the method.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from memjax.audit.generators import (
    DDPM_EXAMPLES,
    DDPM_FEATURES,
    diffusion_inference,
    diffusion_section,
    feature_aucs,
    iar_demo,
    iar_inference,
    iar_section,
)
from memjax.audit.generators import ddpm_demo as run_ddpm_demo
from memjax.cli import main
from memjax.mia import smallest_n


@pytest.fixture(scope="module")
def ddpm():
    return run_ddpm_demo(0)


@pytest.fixture(scope="module")
def iar():
    return iar_demo(0)


def test_ddpm_members_have_lower_cdi_features(ddpm):
    """The DDPM memorises its half: every CDI feature but PIAN ranks members first.
    Seeds 0/1/2: PIA AUC 0.702/0.648/0.686, SecMI 0.654/0.544/0.677, loss at t=100
    0.650/0.613/0.697, the lowest loss AUC over t 0.597/0.570/0.625."""
    aucs = feature_aucs(ddpm["features"], ddpm["member"], lower_is_member=True)
    print({k: round(v, 3) for k, v in aucs.items()})
    assert aucs["pia"] >= 0.62
    assert aucs["secmi"] >= 0.52
    assert aucs["loss_t100"] >= 0.58
    assert min(aucs[f"loss_t{t}"] for t in DDPM_FEATURES["timesteps"]) >= 0.55


def test_cdi_identifies_the_training_set_and_not_the_non_members(ddpm):
    """CDI's p-value for the members is tiny and reaches 0.01 within the suspect set; two
    halves of the non-members are not flagged. Seeds 0/1/2: p 2e-15/4.7e-6/1.5e-16,
    smallest n 40/200/40, false-positive p 0.31/0.30/0.19."""
    di = diffusion_inference(ddpm, 0)
    n = smallest_n(di["members"], 0.01)
    print(di["members"].p_value, n, di["false_positive"].p_value)
    assert di["members"].p_value < 1e-4
    assert n is not None and n <= 200
    assert di["false_positive"].p_value > 1e-3


def test_iar_features_separate_members_and_dataset_inference_needs_few_images(iar):
    """The image-token model memorises its half: conditional loss AUC near 1; the CFG
    difference alone still separates; the IAR code's dataset inference reaches p ≤ 0.01
    with a handful of images, and the false-positive check is not flagged.
    Seeds 0/1/2: cond loss 0.999/0.996/0.996, uncond loss 0.991/0.983/0.987, CFG loss
    0.758/0.730/0.736, smallest n 5/6/7, false-positive p 0.0054/0.33/0.27."""
    aucs = feature_aucs(iar["features"], iar["member"], lower_is_member=False)
    print({k: round(v, 3) for k, v in aucs.items() if k.endswith(("loss", "0.2"))})
    assert aucs["cond_loss"] >= 0.97 and aucs["uncond_loss"] >= 0.95
    assert aucs["cfg_loss"] >= 0.65
    di = iar_inference(iar, tuple(aucs), 0)
    n = smallest_n(di["members"], 0.01)
    print(di["members"].p_value, n, di["false_positive"].p_value)
    assert n is not None and n <= 20
    assert di["false_positive"].p_value > 1e-3


@pytest.fixture(scope="module")
def saved(ddpm, iar, tmp_path_factory):
    folder = tmp_path_factory.mktemp("generators")
    diffusion_section(folder, ddpm, 0)
    iar_section(folder, iar, 0)
    return folder


def test_cli_reproduces_the_ddpm_features_from_the_saved_model(saved, ddpm, tmp_path):
    """memjax mia diffusion on the report's DDPM folder (memjax's saved format with its
    scheduler_config.json) gives the demo's features: the same ids key the same noise."""
    rows = 16
    np.savez(tmp_path / "digits.npz", image=np.asarray(ddpm["images"][:rows]))
    out = tmp_path / "cli"
    assert main(["mia", "diffusion", "--model", str(saved / "ddpm"), "--data",
                 str(tmp_path / "digits.npz"), "--pixel-range", "signed", "--features",
                 *DDPM_FEATURES["features"], "--timesteps",
                 *map(str, DDPM_FEATURES["timesteps"]), "--noise-draws",
                 str(DDPM_FEATURES["noise_draws"]), "--batch-size", "8", "--out", str(out),
                 "--no-progress"]) == 0
    table = pq.read_table(out / "scores.parquet").to_pandas()
    for name, values in ddpm["features"].items():
        # float32 features of two programs (batch 8 vs 64): equal up to rounding.
        np.testing.assert_allclose(table[name], values[:rows], rtol=2e-5, atol=1e-6)
    assert len(ddpm["images"]) == DDPM_EXAMPLES


def test_cli_reproduces_the_iar_features_and_dataset_inference(saved, iar, tmp_path):
    rows = 16
    np.savez(tmp_path / "tokens.npz", class_labels=iar["class_labels"][:rows],
             input_ids=iar["input_ids"][:rows])
    out = tmp_path / "iar"
    assert main(["mia", "iar", "--model", str(saved / "llamagen"), "--data",
                 str(tmp_path / "tokens.npz"), "--batch-size", "8", "--out", str(out),
                 "--no-progress"]) == 0
    table = pq.read_table(out / "scores.parquet").to_pandas()
    for name, values in iar["features"].items():
        np.testing.assert_allclose(table[name], values[:rows], rtol=2e-5, atol=1e-6)
    # Dataset inference from the report's features table, as a user would run it.
    out = tmp_path / "di"
    assert main(["mia", "di", "--features", str(saved / "iar_features.parquet"), "--method",
                 "iar", "--member-column", "member", "--columns", *iar["features"],
                 "--out", str(out)]) == 0
    (metrics,) = json.loads((out / "metrics.json").read_text()).values()
    di = iar_inference(iar, tuple(iar["features"]), 0)
    print(metrics)
    assert metrics["p-value"] == pytest.approx(di["members"].p_value, rel=1e-9, abs=1e-300)
    assert metrics["smallest n with p <= 0.01"] == smallest_n(di["members"], 0.01)
