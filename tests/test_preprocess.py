"""memjax.data.ImageProcessor against transformers' PIL image processors.

Every comparison is exact (``assert_array_equal``): memjax runs the same steps as
transformers' ``PilBackend`` in the same dtypes (PIL resize on uint8, float64 rescale cast
to float32, float32 normalisation), so no tolerance is needed; a one-level difference in a
resized pixel would show up as ~1/255/std ≈ 0.016 and fail.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from memjax.data import PROCESSOR_DEFAULTS, ImageProcessor
from memjax.errors import InputError

transformers = pytest.importorskip("transformers")

# The classes the tests compare with: transformers' PIL backends (torchvision is absent;
# the plain names fall back to them anyway).
REFERENCE = {name: getattr(transformers, f"{name}Pil") for name in PROCESSOR_DEFAULTS}

# (processor type, settings) pairs: defaults at 224, tiny sizes, every resize rule.
CASES = [
    ("CLIPImageProcessor", {}),
    ("CLIPImageProcessor", {"size": {"shortest_edge": 16},
                            "crop_size": {"height": 16, "width": 12}}),
    ("ViTImageProcessor", {}),
    ("ViTImageProcessor", {"size": {"height": 9, "width": 13}, "resample": 0}),
    ("ConvNextImageProcessor", {"size": {"shortest_edge": 224}, "crop_pct": 0.875}),
    ("ConvNextImageProcessor", {"size": {"shortest_edge": 20}, "crop_pct": 0.9}),
    ("ConvNextImageProcessor", {"size": {"shortest_edge": 384}}),  # warps, no crop
    ("BitImageProcessor", {"size": {"shortest_edge": 24, "longest_edge": 40},
                           "do_center_crop": False}),
    ("MobileNetV1ImageProcessor", {"size": {"max_height": 30, "max_width": 50},
                                   "do_center_crop": False}),
    ("DeiTImageProcessor", {"size": {"height": 40, "width": 40}, "crop_size": 32}),
    ("BlipImageProcessor", {"size": 20, "do_center_crop": True, "crop_size": 24}),  # pads
    ("SiglipImageProcessor", {"size": {"height": 16, "width": 16}, "resample": 4}),
    ("ChineseCLIPImageProcessor", {"size": {"shortest_edge": 18}, "crop_size": 18}),
    ("PvtImageProcessor", {"size": {"height": 12, "width": 12}, "resample": 1}),
    ("OwlViTImageProcessor", {"size": 20, "resample": 5}),
    ("ViTImageProcessor", {"do_rescale": False, "size": {"height": 8, "width": 8}}),
    ("ViTImageProcessor", {"do_normalize": False, "size": {"height": 8, "width": 8}}),
    ("CLIPImageProcessor", {"do_resize": False, "crop_size": 40}),
]


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """scikit-learn's two photos (427x640) and crops of them: portrait, thin, tiny."""
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    crops = [china[:300, :120], flower[50:62, 10:200], china[200:211, 300:307]]
    return [china, flower, *(np.ascontiguousarray(c) for c in crops)]


def _reference(processor, image: np.ndarray) -> np.ndarray:
    """transformers' output on a PIL image, as [H, W, C]."""
    from PIL import Image

    out = processor(Image.fromarray(image), return_tensors="np")["pixel_values"][0]
    return out.transpose(1, 2, 0)


@pytest.mark.parametrize(("kind", "settings"), CASES,
                         ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_equals_transformers(photos, kind, settings):
    """The saved config of a transformers processor gives the same pixels, exactly."""
    reference = REFERENCE[kind](**settings)
    config = json.loads(reference.to_json_string())  # what preprocessor_config.json holds
    processor = ImageProcessor.from_config(config)
    assert processor.processor_type == kind
    for image in photos:
        expected = _reference(reference, image)
        got = processor(image)
        assert got.dtype == np.float32 and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)
        if processor.output_shape() is not None:
            assert got.shape == processor.output_shape()


def test_random_images_and_sizes(rng):
    """Random pixels at random sizes and settings: still exactly transformers'."""
    for _ in range(6):
        height, width = (int(v) for v in rng.integers(1, 90, size=2))
        image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        edge = int(rng.integers(1, 40))
        settings = {"size": {"shortest_edge": edge}, "resample": int(rng.integers(0, 6)),
                    "crop_size": {"height": int(rng.integers(1, 40)),
                                  "width": int(rng.integers(1, 40))},
                    "image_mean": rng.uniform(0, 1, size=3).tolist(),
                    "image_std": rng.uniform(0.1, 1, size=3).tolist()}
        reference = REFERENCE["CLIPImageProcessor"](**settings)
        processor = ImageProcessor.from_config(json.loads(reference.to_json_string()))
        np.testing.assert_array_equal(processor(image), _reference(reference, image))


def test_legacy_configs(photos):
    """Old hub configs (int sizes, feature_extractor_type, Fast/Pil suffixes, keys the
    class ignores) resolve as transformers resolves them."""
    legacy = {"crop_size": 24, "do_center_crop": True, "do_normalize": True,
              "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor",
              "image_mean": [0.48145466, 0.4578275, 0.40821073],
              "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 24}
    reference = transformers.CLIPImageProcessorPil.from_dict(legacy)
    processor = ImageProcessor.from_config(legacy)
    assert dict(processor.size) == {"shortest_edge": 24}  # CLIP: int = shortest edge
    np.testing.assert_array_equal(processor(photos[0]), _reference(reference, photos[0]))
    vit = {"image_processor_type": "ViTImageProcessorFast", "size": 20, "crop_pct": 0.5,
           "do_center_crop": None}  # crop_pct: not a ViT option, ignored by transformers
    reference = transformers.ViTImageProcessorPil.from_dict(vit)
    processor = ImageProcessor.from_config(vit)
    assert dict(processor.size) == {"height": 20, "width": 20}  # ViT: int = square
    np.testing.assert_array_equal(processor(photos[1]), _reference(reference, photos[1]))
    assert ImageProcessor.from_config({**vit, "image_processor_type": "ViTImageProcessorPil"}
                                      ) == processor


def test_defaults_match_transformers_classes():
    """PROCESSOR_DEFAULTS holds the class attributes of each transformers PIL class."""
    for name, defaults in PROCESSOR_DEFAULTS.items():
        cls = REFERENCE[name]
        for key, value in defaults.items():
            actual = getattr(cls, key, None)
            if isinstance(value, tuple | list):
                assert list(actual) == pytest.approx(list(value), abs=0), (name, key)
            else:
                assert actual == value or (value is None and not actual), (name, key)
        # and nothing the generic steps would miss: only the PIL backend's own methods
        for method in ("_preprocess", "resize", "center_crop", "rescale", "normalize",
                       "process_image", "convert_to_rgb", "_standardize_kwargs"):
            if name != "ConvNextImageProcessor" or method not in ("_preprocess", "resize"):
                owner = next(c for c in cls.__mro__ if method in vars(c))
                assert owner.__name__ in ("PilBackend", "BaseImageProcessor"), (name, method)


def test_value_semantics(photos):
    """Frozen, equal and equally hashed for equal configs; spec() is JSON and tells
    different settings apart."""
    config = json.loads(transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 16}, crop_size=16).to_json_string())
    first, second = ImageProcessor.from_config(config), ImageProcessor.from_config(dict(config))
    assert first == second and hash(first) == hash(second)
    assert {first: 1}[second] == 1
    assert json.loads(json.dumps(first.spec())) == first.spec()
    other = ImageProcessor.from_config({**config, "resample": 2})
    assert other != first and other.spec() != first.spec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.resample = 2


@pytest.mark.parametrize(("config", "message"), [
    ({"image_processor_type": "BeitImageProcessor"},
     r"models/x/preprocessor_config.json: image processor type 'BeitImageProcessor' is "
     r"not supported.*supported: \['BitImageProcessor'"),
    ({"size": 224}, "no image_processor_type"),
    ({"image_processor_type": "CLIPImageProcessor", "do_pad": True},
     r"\(CLIPImageProcessor\): do_pad=true is not supported"),
    ({"image_processor_type": "ViTImageProcessor", "size": {"longest_edge": 30}},
     r"size \{'longest_edge': 30\} is not supported"),
    ({"image_processor_type": "ViTImageProcessor", "size": {"height": 3}},
     "has unknown keys"),
    ({"image_processor_type": "ViTImageProcessor", "resample": 9},
     "resample must be a PIL filter number"),
    ({"image_processor_type": "ViTImageProcessor", "image_mean": [0.5, 0.5]},
     r"image_mean must be a number or 3 numbers"),
    ({"image_processor_type": "ViTImageProcessor", "do_center_crop": True},
     "crop_size must be an int"),
    ({"image_processor_type": "ConvNextImageProcessor", "size": {"height": 3, "width": 3}},
     "size must have 'shortest_edge'"),
    ({"image_processor_type": "CLIPImageProcessor", "use_square_size": True},
     "use_square_size=true is not supported"),
    ({"image_processor_type": "ViTImageProcessor", "do_resize": "yes"},
     "do_resize must be true or false"),
])
def test_refusals_name_the_file_and_type(config, message):
    """Unsupported types and options are refused with the file and the type named."""
    with pytest.raises(InputError, match=message):
        ImageProcessor.from_config(config, where="models/x/preprocessor_config.json")


def test_rejects_non_rgb_arrays():
    """The processor takes decoded RGB uint8 only (decode_image makes it)."""
    processor = ImageProcessor.from_config({"image_processor_type": "ViTImageProcessor"})
    with pytest.raises(InputError, match=r"expected an RGB image uint8 \[H, W, 3\]"):
        processor(np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(InputError, match="expected an RGB image"):
        processor(np.zeros((4, 4, 3), np.float32))
