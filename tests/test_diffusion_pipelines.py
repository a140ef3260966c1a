"""diffusers pipeline folders (``model_index.json``) as users have them: ``memjax.load``
opens the denoiser, ``memjax mia diffusion`` finds the pipeline's scheduler and, for a
latent pipeline, its VAE; the features equal those from the component folders given
one by one."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from memjax.cli import main
from memjax.convert import load
from memjax.errors import InputError

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def ddpm_pipeline(tmp_path_factory):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1,
                                 block_out_channels=(8, 16), layers_per_block=1,
                                 norm_num_groups=4, down_block_types=("DownBlock2D",
                                                                      "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    folder = tmp_path_factory.mktemp("ddpm") / "pipeline"
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(
        beta_schedule="squaredcos_cap_v2")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dit_pipeline(tmp_path_factory):
    torch.manual_seed(1)
    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
        num_layers=1, sample_size=4, patch_size=2, num_embeds_ada_norm=3)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                  block_out_channels=(8, 8), norm_num_groups=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2)
    folder = tmp_path_factory.mktemp("dit") / "pipeline"
    diffusers.DiTPipeline(transformer=transformer, vae=vae,
                          scheduler=diffusers.DDIMScheduler()).save_pretrained(folder)
    return folder


def _features(tmp_path, name, argv):
    out = tmp_path / name
    assert main(["mia", "diffusion", *argv, "--features", "loss", "pia", "--timesteps", "10",
                 "50", "--noise-draws", "2", "--batch-size", "8", "--out", str(out),
                 "--no-progress"]) == 0
    return pq.read_table(out / "scores.parquet").to_pandas()


def test_load_of_a_pipeline_folder_is_its_denoiser(ddpm_pipeline, dit_pipeline, tmp_path):
    assert load(ddpm_pipeline).kind == "diffusion"
    assert load(dit_pipeline).kind == "diffusion"
    assert load(dit_pipeline / "vae").kind == "vae"
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(InputError, match="unet or transformer"):
        load(tmp_path)


def test_cli_on_a_pixel_pipeline_uses_its_scheduler(ddpm_pipeline, tmp_path, rng):
    np.savez(tmp_path / "x.npz", image=rng.integers(0, 256, (8, 8, 8, 1), dtype=np.uint8))
    data = ["--data", str(tmp_path / "x.npz")]
    whole = _features(tmp_path, "whole", ["--model", str(ddpm_pipeline), *data])
    parts = _features(tmp_path, "parts", ["--model", str(ddpm_pipeline / "unet"), "--scheduler",
                                          str(ddpm_pipeline / "scheduler"), *data])
    assert list(whole.columns) == list(parts.columns)
    for column in whole.columns:
        np.testing.assert_array_equal(whole[column], parts[column])


def test_cli_on_a_latent_pipeline_uses_its_vae(dit_pipeline, tmp_path, rng, capsys):
    np.savez(tmp_path / "x.npz", image=rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8),
             label=rng.integers(0, 3, 8))
    data = ["--data", str(tmp_path / "x.npz")]
    whole = _features(tmp_path, "whole", ["--model", str(dit_pipeline), *data])
    assert "using the pipeline's VAE" in capsys.readouterr().err
    parts = _features(tmp_path, "parts", [
        "--model", str(dit_pipeline / "transformer"), "--vae", str(dit_pipeline / "vae"),
        "--scheduler", str(dit_pipeline / "scheduler"), *data])
    for column in whole.columns:
        np.testing.assert_array_equal(whole[column], parts[column])
