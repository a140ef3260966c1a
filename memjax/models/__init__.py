"""Models: the :class:`Model` protocol, Flax NNX ports, memjax's native small models.

Architectures: BERT, CLIP, ViT, ResNet (Hugging Face), GPT-2, GPT-NeoX (Pythia), the Llama
family (Llama / Mistral / Qwen2 / Qwen3 / OLMo 2 / Gemma / Gemma 2), LlamaGen's
class-conditional image-token GPT, diffusers' UNet2DModel, DiTTransformer2DModel and
AutoencoderKL, the native CIFAR ResNet-9/ResNet-18, and the small MLP/CNN/ResNet that
memjax.train trains (:mod:`memjax.models.classifier`). Importing this registers the ports'
checkpoint converters (:mod:`memjax.models.registry`). Every model reports named
activations through :class:`Taps` (see :mod:`memjax.models.taps`).
"""

from memjax.models import (
    autoencoder_kl,
    bert,
    cifar_resnet,
    classifier,
    clip,
    dit,
    gpt2,
    gpt_neox,
    llama,
    llamagen,
    resnet,
    unet2d,
    vit,
)
from memjax.models.protocol import Model
from memjax.models.taps import Taps, tap, with_taps

__all__ = ["Model", "Taps", "autoencoder_kl", "bert", "cifar_resnet", "classifier", "clip", "dit",
           "gpt2", "gpt_neox", "llama", "llamagen", "resnet", "tap", "unet2d", "vit", "with_taps"]
