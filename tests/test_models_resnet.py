"""ResNet ports: HF ResNetModel / ResNetForImageClassification and the CIFAR ResNet-9/18.

HF models are tiny random ones built from a config (plus one full-size ResNet-50 on one
64x64 image), with random BatchNorm weights and running statistics so that loading the
statistics is checked too. The CIFAR presets are checked against PyTorch
re-implementations written here, in eval and train mode.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from torch import nn
from transformers import ResNetConfig, ResNetForImageClassification, ResNetModel

import memjax.signals
from memjax.convert import from_torch_state_dict, load_pretrained, restore, save
from memjax.engine import make_mesh, score
from memjax.errors import InputError
from memjax.models import cifar_resnet, resnet, with_taps
from memjax.models.taps import Taps

TOL = 1e-5
SMALL = {
    "basic": dict(layer_type="basic", hidden_sizes=[8, 16, 24], depths=[1, 2, 1],
                  embedding_size=8, downsample_in_first_stage=True, hidden_act="gelu"),
    "bottleneck": dict(layer_type="bottleneck", hidden_sizes=[16, 32], depths=[2, 1],
                       embedding_size=8, downsample_in_bottleneck=True),
    # embedding_size == hidden_sizes[0]: the first block keeps an identity shortcut.
    "bare": dict(layer_type="basic", hidden_sizes=[8, 16], depths=[2, 1], embedding_size=8,
                 hidden_act="silu"),
}


def randomize_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm affine weights and running statistics (HF inits them to 1/0/0/1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))
    return module


def hf_model(kind: str, folder) -> nn.Module:
    torch.manual_seed(0)
    if kind == "resnet50":
        model = ResNetForImageClassification(ResNetConfig(num_labels=10))
    elif kind == "bare":
        model = ResNetModel(ResNetConfig(**SMALL[kind]))
    else:
        model = ResNetForImageClassification(ResNetConfig(num_labels=5, **SMALL[kind]))
    model = randomize_bn(model).eval()
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module", params=["basic", "bottleneck", "bare", "resnet50"])
def hf(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, hf_model(request.param, folder), folder


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small")
    return hf_model("basic", folder), folder


def images(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def nhwc(x: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(x.transpose(0, 2, 3, 1))


def max_diff(ours, ref: np.ndarray) -> float:
    return float(np.abs(np.asarray(ours) - ref).max())


def run(model, x, patterns=(), **kwargs):
    """``with_taps(model, patterns, x)`` under jax.jit: one compile instead of one per
    eager op (the CPU test machine is slow). Returns (output, taps)."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, x: with_taps(nnx.merge(graphdef, s), list(patterns), x,
                                          **kwargs))(state, x)


def traced(model, shape, patterns=("*",)):
    """Trace (no compute) ``model`` on an input of ``shape``: (output shape, tap names
    seen, {matched tap: shape})."""
    taps = Taps(patterns)
    graphdef, state = nnx.split(model)
    out, values = jax.eval_shape(lambda s, x: (nnx.merge(graphdef, s)(x, taps=taps),
                                               taps.values),
                                 state, jax.ShapeDtypeStruct(shape, jnp.float32))
    taps.check()
    return out.shape, taps.seen, {k: v.shape for k, v in values.items()}


def train_step(model, x):
    """A train-mode forward under jax.jit, functionally: (output, updated model)."""
    graphdef, state = nnx.split(model)

    def step(state, x):
        m = nnx.merge(graphdef, state)
        return m(x, train=True), nnx.state(m)

    out, state = jax.jit(step)(state, x)
    return out, nnx.merge(graphdef, state)


def test_matches_hf_logits_and_every_stage(hf):
    kind, torch_model, folder = hf
    model, config = load_pretrained(folder)
    n_stages = len(config.depths)
    # ResNet is size-agnostic: a small odd-sized image exercises the padding arithmetic.
    x = images((1, 3, 64, 64) if kind == "resnet50" else (2, 3, 37, 29))
    with torch.no_grad():
        out = torch_model(torch.tensor(x), output_hidden_states=True)
    names = ["embedder"] + [f"stages.{s}.out" for s in range(n_stages)]
    ours, taps = run(model, nhwc(x), [*names, "pooled"])
    refs = dict(zip(names, [h.numpy().transpose(0, 2, 3, 1) for h in out.hidden_states],
                    strict=True))
    if kind == "bare":
        refs["output"] = out.pooler_output.numpy()[:, :, 0, 0]
        refs["last_hidden_state"] = out.last_hidden_state.numpy().transpose(0, 2, 3, 1)
        taps["last_hidden_state"] = taps[f"stages.{n_stages - 1}.out"]
        assert config.num_labels == 0
    else:
        refs["output"] = out.logits.numpy()
        assert config.num_labels == torch_model.config.num_labels
    taps["output"] = ours
    for name, ref in refs.items():
        assert taps[name].shape == ref.shape, name
        # Full-size ResNet-50 activations reach O(10-100): tolerance relative to the scale.
        tol = TOL * max(1.0, float(np.abs(ref).max())) if kind == "resnet50" else TOL
        assert max_diff(taps[name], ref) <= tol, (kind, name, max_diff(taps[name], ref))


def test_tap_names(small):
    model, _ = load_pretrained(small[1])
    _, seen, _ = traced(model, (1, 20, 20, 3))
    expected = ["embedder"]
    for s, depth in enumerate(SMALL["basic"]["depths"]):
        for b in range(depth):
            expected += [f"stages.{s}.blocks.{b}.{n}" for n in ("conv0", "conv1", "out")]
        expected.append(f"stages.{s}.out")
    assert seen == [*expected, "pooled"]
    with pytest.raises(InputError, match="stages.0.blocks.0.conv1"):
        traced(model, (1, 20, 20, 3), ["stages.*.conv9"])


def test_bottleneck_convs_and_strides():
    config = resnet.ResNetConfig(embedding_size=8, hidden_sizes=(16, 32), depths=(1, 1))
    model = nnx.eval_shape(lambda: resnet.ResNet(config, rngs=nnx.Rngs(0)))
    out, _, taps = traced(model, (1, 32, 32, 3), ["stages.1.blocks.0.conv*"])
    # v1.5: the stride is on the 3x3 conv; stage 1 halves 8x8 -> 4x4.
    assert list(taps.values()) == [(1, 8, 8, 8), (1, 4, 4, 8), (1, 4, 4, 32)]
    assert out == (1, 32)  # bare model: pooled features
    v1 = dataclasses.replace(config, downsample_in_bottleneck=True)
    model = nnx.eval_shape(lambda: resnet.ResNet(v1, rngs=nnx.Rngs(0)))
    _, _, taps = traced(model, (1, 32, 32, 3), ["stages.1.blocks.0.conv*"])
    assert list(taps.values()) == [(1, 4, 4, 8), (1, 4, 4, 8), (1, 4, 4, 32)]


def test_config_guard():
    base = {"model_type": "resnet", **SMALL["basic"]}
    assert resnet.from_hf_config(base).hidden_sizes == (8, 16, 24)
    with pytest.raises(InputError, match="stem_type"):
        resnet.from_hf_config({**base, "stem_type": "deep"})
    with pytest.raises(InputError, match="layer_type"):
        resnet.from_hf_config({**base, "layer_type": "preactivation"})
    with pytest.raises(InputError, match="hidden_act"):
        resnet.from_hf_config({**base, "hidden_act": "mish"})
    with pytest.raises(InputError, match="depths"):
        resnet.from_hf_config({**base, "depths": [1, 1]})


def edited_checkpoint(folder, tmp_path, edit):
    out = tmp_path / "edited"
    out.mkdir(parents=True)
    shutil.copy(folder / "config.json", out / "config.json")
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


STAT = "resnet.encoder.stages.1.layers.0.shortcut.normalization.running_var"
CONV = "resnet.encoder.stages.0.layers.0.layer.1.convolution.weight"


@pytest.mark.parametrize("edit, named", [
    (lambda t: t.pop(STAT), STAT),
    (lambda t: t.update({"resnet.encoder.stages.0.layers.0.extra.weight": np.ones(3)}),
     "resnet.encoder.stages.0.layers.0.extra.weight"),
    (lambda t: t.update({CONV: np.ones((8, 8, 3, 1), np.float32)}),
     "stages.0.blocks.0.convs.1.conv.kernel"),
    (lambda t: t.update({STAT.replace("running_var", "running_mean"): np.ones(4, np.float32)}),
     "stages.1.blocks.0.shortcut.norm.mean"),
], ids=["missing", "extra", "misshaped", "misshaped_statistic"])
def test_converter_is_strict(small, tmp_path, edit, named):
    with pytest.raises(InputError, match=named.replace(".", r"\.")):
        load_pretrained(edited_checkpoint(small[1], tmp_path, edit))


def with_architectures(folder, tmp_path, architectures):
    folder = edited_checkpoint(folder, tmp_path, lambda t: None)
    config = json.loads((folder / "config.json").read_text())
    if architectures is None:
        config.pop("architectures")
    else:
        config["architectures"] = architectures
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_the_weights_decide_the_head(small, tmp_path):
    model, config = load_pretrained(with_architectures(small[1], tmp_path / "a", None))
    assert config.num_labels == 5 and model.classifier is not None
    with pytest.raises(InputError, match="ResNetForImageClassification"):
        load_pretrained(with_architectures(small[1], tmp_path / "b", ["ResNetModel"]))
    hf_model("bare", tmp_path / "bare")  # a bare checkpoint whose config claims a head
    folder = with_architectures(tmp_path / "bare", tmp_path / "c",
                                ["ResNetForImageClassification"])
    assert load_pretrained(folder)[1].num_labels == 0


def test_statistics_are_batch_stats_and_round_trip(small, tmp_path):
    model, config = load_pretrained(small[1])
    stats = nnx.state(model, nnx.BatchStat)
    assert len(jax.tree.leaves(stats)) == 2 * 12  # 12 BatchNorms, mean and var each
    grads = nnx.jit(nnx.grad(lambda m: m(jnp.ones((1, 16, 16, 3))).sum()))(model)
    assert not jax.tree.leaves(nnx.state(grads, nnx.BatchStat))
    assert len(jax.tree.leaves(grads)) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    x = nhwc(images((2, 3, 24, 24)))
    save(model, config, tmp_path / "converted")
    restored, config2 = restore(tmp_path / "converted")
    assert config2 == config
    assert max_diff(run(restored, x)[0], np.asarray(run(model, x)[0])) == 0


def test_sharded_scoring_matches_one_device(small):
    model, _ = load_pretrained(small[1])
    graphdef, state = nnx.split(model)

    def fn(params, example):
        logits = nnx.merge(graphdef, params)(example["image"][None])[0]
        return memjax.signals.classification(logits, example["label"])

    data = {"image": images((16, 16, 16, 3)),
            "label": np.random.default_rng(1).integers(0, 5, 16).astype(np.int32)}
    one = score(fn, state, data, batch_size=8, progress=False,
                mesh=make_mesh(devices=jax.devices()[:1]))
    eight = score(fn, state, data, batch_size=8, progress=False, mesh=make_mesh())
    assert len(jax.devices()) == 8
    for key, value in one.items():
        np.testing.assert_allclose(eight[key], value, atol=TOL, rtol=0, err_msg=key)


# --------------------------------------------------------------------------- CIFAR ResNets


class TorchBasicBlock(nn.Module):
    """kuangliu/pytorch-cifar's BasicBlock."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class TorchResNet18(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        c_in, layers = 64, []
        for s, width in enumerate((64, 128, 256, 512)):
            layers.append(nn.Sequential(TorchBasicBlock(c_in, width, 2 if s else 1),
                                        TorchBasicBlock(width, width, 1)))
            c_in = width
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        stages = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            stages.append(x)
        return self.linear(x.mean((2, 3))), stages


def torch_conv_bn(c_in, c_out):
    return nn.ModuleDict({"conv": nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False),
                          "bn": nn.BatchNorm2d(c_out)})


def run_conv_bn(block, x):
    return torch.relu(block["bn"](block["conv"](x)))


class TorchResNet9(nn.Module):
    """Page's DAWNBench ResNet-9 (conv-BN-ReLU, pool after the conv; x + res(x))."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.prep = torch_conv_bn(3, 64)
        self.layer1 = nn.ModuleDict({**torch_conv_bn(64, 128), "residual": nn.ModuleList([
            nn.ModuleDict({"res1": torch_conv_bn(128, 128), "res2": torch_conv_bn(128, 128)})])})
        self.layer2 = torch_conv_bn(128, 256)
        self.layer3 = nn.ModuleDict({**torch_conv_bn(256, 512), "residual": nn.ModuleList([
            nn.ModuleDict({"res1": torch_conv_bn(512, 512), "res2": torch_conv_bn(512, 512)})])})
        self.linear = nn.Linear(512, num_classes, bias=False)

    def forward(self, x):
        x = run_conv_bn(self.prep, x)
        stages = []
        for layer in (self.layer1, self.layer2, self.layer3):
            x = nn.functional.max_pool2d(run_conv_bn(layer, x), 2)
            for res in layer["residual"] if "residual" in layer else []:
                x = x + run_conv_bn(res["res2"], run_conv_bn(res["res1"], x))
            stages.append(x)
        return self.linear(nn.functional.max_pool2d(x, 4).flatten(1)) * 0.125, stages


PRESETS = {"resnet9": (cifar_resnet.resnet9_config, TorchResNet9),
           "resnet18": (cifar_resnet.resnet18_config, TorchResNet18)}


@pytest.mark.parametrize("arch", ["resnet9", "resnet18"])
def test_cifar_matches_pytorch_in_eval_and_train_mode(arch):
    preset, torch_cls = PRESETS[arch]
    torch.manual_seed(0)
    ref = randomize_bn(torch_cls()).eval()
    config = preset()
    model = from_torch_state_dict(ref.state_dict(), config)
    x = images((2, 3, 32, 32))
    with torch.no_grad():
        logits, stages = ref(torch.tensor(x))
    ours, taps = run(model, nhwc(x), ["stages.*.out"])
    assert max_diff(ours, logits.numpy()) <= TOL
    for s, stage in enumerate(stages):
        assert max_diff(taps[f"stages.{s}.out"], stage.numpy().transpose(0, 2, 3, 1)) <= TOL

    ref.train()  # batch statistics, and the running statistics move (momentum 0.1)
    with torch.no_grad():
        logits, _ = ref(torch.tensor(x))
    ours, model = train_step(model, nhwc(x))
    assert max_diff(ours, logits.numpy()) <= TOL
    updated = from_torch_state_dict(ref.state_dict(), config)
    ours_stats = nnx.to_flat_state(nnx.state(model, nnx.BatchStat))
    ref_stats = dict(nnx.to_flat_state(nnx.state(updated, nnx.BatchStat)))
    assert len(ours_stats) == len(ref_stats) > 0
    for path, var in ours_stats:
        assert max_diff(var.get_value(), np.asarray(ref_stats[path].get_value())) <= TOL, path


SMALL9 = cifar_resnet.CifarResNetConfig(arch="resnet9", num_classes=4, stem_width=8,
                                        widths=(8, 16, 16), depths=(1, 0, 1), logit_scale=0.125)
SMALL18 = cifar_resnet.CifarResNetConfig(arch="resnet18", num_classes=4, stem_width=8,
                                         widths=(8, 16), depths=(2, 1))


@pytest.mark.parametrize("preset, classes, out", [
    (cifar_resnet.resnet9, 10, 10), (cifar_resnet.resnet9, None, 512),
    (cifar_resnet.resnet18, 10, 10), (cifar_resnet.resnet18, 0, 512)])
def test_cifar_presets_shapes(preset, classes, out):
    model = nnx.eval_shape(lambda: preset(classes))  # shapes only: nothing is computed
    assert traced(model, (2, 32, 32, 3))[0] == (2, out)
    assert traced(model, (1, 24, 24, 3), ["pooled"])[2] == {"pooled": (1, 512)}
    with pytest.raises(InputError, match="NHWC"):
        traced(model, (2, 3, 32, 32))


def test_cifar_tap_names():
    model = nnx.eval_shape(lambda: cifar_resnet.CifarResNet(SMALL9, rngs=nnx.Rngs(0)))
    _, seen, _ = traced(model, (1, 16, 16, 3))
    assert seen == [
        "embedder", "stages.0.blocks.0.conv0", "stages.0.blocks.0.out",
        "stages.0.blocks.1.conv0", "stages.0.blocks.1.conv1", "stages.0.blocks.1.out",
        "stages.0.out", "stages.1.blocks.0.conv0", "stages.1.blocks.0.out", "stages.1.out",
        "stages.2.blocks.0.conv0", "stages.2.blocks.0.out", "stages.2.blocks.1.conv0",
        "stages.2.blocks.1.conv1", "stages.2.blocks.1.out", "stages.2.out", "pooled"]
    model = nnx.eval_shape(lambda: cifar_resnet.CifarResNet(SMALL18, rngs=nnx.Rngs(0)))
    _, seen, _ = traced(model, (1, 16, 16, 3))
    block = lambda s, b: [f"stages.{s}.blocks.{b}.{n}" for n in ("conv0", "conv1", "out")]
    assert seen == ["embedder", *block(0, 0), *block(0, 1), "stages.0.out",
                         *block(1, 0), "stages.1.out", "pooled"]


def random_model(config, seed=0) -> cifar_resnet.CifarResNet:
    """He-normal weights from NumPy (an eager jax init compiles once per array shape, which
    takes seconds on the slow test machine)."""
    abstract = nnx.eval_shape(lambda: cifar_resnet.CifarResNet(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat, rng = nnx.to_flat_state(state), np.random.default_rng(seed)
    for path, var in flat:
        shape = var.get_value().shape
        value = {"scale": np.ones(shape), "var": np.ones(shape)}.get(path[-1], np.zeros(shape))
        if path[-1] == "kernel":
            value = rng.normal(size=shape) * np.sqrt(2 / np.prod(shape[:-1]))
        var.set_value(jnp.asarray(value, jnp.float32))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def stats(model) -> dict:
    """A snapshot of the BatchNorm running statistics (plain arrays)."""
    return jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))


def test_batchnorm_matches_torch_eagerly():
    norm, ref = resnet.BatchNorm(3), randomize_bn(nn.BatchNorm2d(3))
    for name, value in (("scale", ref.weight), ("bias", ref.bias), ("mean", ref.running_mean),
                        ("var", ref.running_var)):
        getattr(norm, name)[...] = jnp.asarray(value.detach().numpy())
    for step in range(2):  # two train steps move the statistics twice, as PyTorch
        x = images((4, 3, 5, 6), seed=step) * 2 + 1
        with torch.no_grad():
            expected = ref.train()(torch.tensor(x)).numpy().transpose(0, 2, 3, 1)
        assert max_diff(norm(nhwc(x), train=True), expected) <= TOL
    assert max_diff(norm.mean[...], ref.running_mean.numpy()) <= TOL
    assert max_diff(norm.var[...], ref.running_var.numpy()) <= TOL
    with torch.no_grad():
        expected = ref.eval()(torch.tensor(x)).numpy().transpose(0, 2, 3, 1)
    assert max_diff(norm(nhwc(x)), expected) <= TOL


def test_cifar_batchnorm_train_and_eval():
    model = random_model(SMALL18)
    # nnx.jit applies the in-place statistics update to the module, like an eager call.
    forward = nnx.jit(lambda m, x, train: with_taps(m, ["embedder"], x, train=train),
                      static_argnames="train")
    x = jnp.asarray(images((8, 16, 16, 3))) * 3 + 1
    before = stats(model)
    eval_out = np.asarray(forward(model, x, False)[0])
    assert max_diff(forward(model, x, False)[0], eval_out) == 0  # eval: no state change
    assert max(jax.tree.leaves(jax.tree.map(max_diff, stats(model), before))) == 0
    _, taps = forward(model, x, True)
    # train: batch statistics, so each channel is standardised (ReLU of ~N(0, 1): mean ~0.4).
    assert 0.3 < float(np.asarray(taps["embedder"]).mean()) < 0.5
    after = stats(model)
    assert min(jax.tree.leaves(jax.tree.map(max_diff, after, before))) > 0  # all moved
    assert max_diff(forward(model, x, False)[0], eval_out) > 1e-3  # eval: new statistics

    # The functional form (split state in, updated state out) gives the same update.
    _, updated = train_step(random_model(SMALL18), x)
    assert max(jax.tree.leaves(jax.tree.map(max_diff, stats(updated), after))) <= 1e-6


def test_cifar_round_trip_and_strict_torch_weights(tmp_path):
    model = random_model(SMALL9, seed=1)
    _, model = train_step(model, jnp.asarray(images((4, 16, 16, 3))))  # moved statistics
    x = jnp.asarray(images((2, 16, 16, 3), seed=1))
    save(model, SMALL9, tmp_path / "saved")
    restored, config = restore(tmp_path / "saved")
    assert config == SMALL9
    assert max_diff(run(restored, x)[0], np.asarray(run(model, x)[0])) == 0

    state = TorchResNet9().state_dict()
    del state["layer3.residual.0.res2.bn.running_mean"]
    state["linear.bias"] = torch.zeros(10)
    with pytest.raises(InputError) as err:
        from_torch_state_dict(state, cifar_resnet.resnet9_config())
    assert "layer3.residual.0.res2.bn.running_mean" in str(err.value)
    assert "linear.bias" in str(err.value)
