"""The three towers: transformers modules built from our config, or loaded from a local pretrained folder.

Each ``build_*`` returns ``(module, hidden_size)``. Attention goes through transformers' AttentionInterface, so
``attn_implementation`` picks "sdpa", "eager" or our fused kernel ("synergy") for every tower at once.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from pathlib import Path

from torch import nn
from transformers import (
    ASTConfig,
    AutoConfig,
    AutoModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Model,
    RobertaConfig,
    SiglipVisionModel,
    ViTModel,
)

from synergy.core import aisfx  # noqa: F401 - registers the aisfx CNN with AutoConfig / AutoModel
from synergy.core.audio_families import family_of
from synergy.core.config import AudioTowerConfig, ImageTowerConfig, TextTowerConfig
from synergy.core.efficientnet_lite import MODEL_TYPE as EFFICIENTNET_LITE0
from synergy.core.efficientnet_lite import EfficientNetLite, EfficientNetLiteConfig
from synergy.core.image_folder import image_family


def _attention(attn_implementation: str) -> str:
    if attn_implementation == "synergy":
        from synergy.kernels.attention import register_attention

        register_attention("synergy")
    return attn_implementation


def _config_from_dict(hf_config: dict, attn_implementation: str):
    config = AutoConfig.for_model(**hf_config)
    config._attn_implementation = attn_implementation
    return config


def _pretrained_folder(path: str, tower: str) -> Path:
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{tower} tower: pretrained folder {folder} has no config.json; pass a local folder written by "
            "save_pretrained (Synergy never downloads from a hub)"
        )
    return folder


def _from_folder(model_class, folder: Path, tower: str, unused_ok: tuple[str, ...] = ("pooler.",), **kwargs):
    """``model_class.from_pretrained(folder)`` with transformers' load report replaced by a warning that names only
    what matters: weights the model lacks in the folder (they start random) and folder weights it does not use,
    apart from those starting with ``unused_ok``: the pooler that text towers leave out on purpose (all-MiniLM-L6-v2
    ships one), the text half of a whole CLIP or SigLIP folder."""
    # a filter, not a higher level: transformers runs a tensor-parallel plan check (and its warnings) when the
    # level of this logger is WARNING or above
    report = logging.getLogger("transformers.modeling_utils")
    drop_report = logging.Filter()
    drop_report.filter = lambda record: "LOAD REPORT" not in str(record.msg)
    report.addFilter(drop_report)
    try:
        model, info = model_class.from_pretrained(folder, output_loading_info=True, **kwargs)
    finally:
        report.removeFilter(drop_report)
    missing = sorted(info["missing_keys"])
    unused = sorted(k for k in info["unexpected_keys"] if not k.startswith(unused_ok))
    if missing or unused:
        warnings.warn(
            f"{tower} tower from {folder}: weights missing from the folder (they start random): {missing[:8]}; "
            f"weights in the folder the tower does not use: {unused[:8]}. Check that the folder holds this model",
            stacklevel=3,
        )
    return model


# a whole CLIP or SigLIP folder: what its vision tower leaves (and, for a ViT pooled on its class token, the pooler)
_OTHER_HALF = ("text_model.", "text_projection.", "visual_projection.", "logit_scale", "logit_bias")


def build_image_tower(cfg: ImageTowerConfig, attn_implementation: str, hf_config: dict | None = None):
    """An image tower: from the checkpoint's ``hf_config`` (its model type names the family), from the local folder
    ``cfg.pretrained`` (the family from its config.json, :mod:`synergy.core.image_folder`) or, from scratch, a CLIP
    vision tower of ``cfg``'s sizes. A ViT pooled on its class token is built without its pooler."""
    attn = _attention(attn_implementation)
    pooler = {"add_pooling_layer": cfg.pooling != "cls"}
    if hf_config is not None:
        if hf_config.get("model_type") == EFFICIENTNET_LITE0:
            model = EfficientNetLite(_config_from_dict(hf_config, attn))
        else:
            config = _config_from_dict(hf_config, attn)
            model = AutoModel.from_config(config, **(pooler if config.model_type == "vit" else {}))
    elif cfg.pretrained:
        folder = _pretrained_folder(cfg.pretrained, "image")
        family = image_family(folder)
        if family == "efficientnet-lite0":
            model = _efficientnet_from_folder(folder)
        else:
            model_class = {
                "clip": CLIPVisionModel,
                "siglip": SiglipVisionModel,
                "vit": ViTModel,
                "dinov2": Dinov2Model,
            }[family]
            extra = pooler if family == "vit" else {}
            model = _from_folder(
                model_class, folder, "image", (*_OTHER_HALF, "pooler."), attn_implementation=attn, **extra
            )
    else:
        config = CLIPVisionConfig(
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            hidden_size=cfg.width,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            intermediate_size=cfg.mlp_dim,
            hidden_act="gelu",
        )
        config._attn_implementation = attn
        model = CLIPVisionModel(config)
    return model, model.config.hidden_size


def _efficientnet_from_folder(folder: Path) -> EfficientNetLite:
    """The folder ``synergy towers efficientnet-lite0`` writes: every weight of the network but the ImageNet
    classifier ``_fc`` (kept in the folder, unused by the tower) must load."""
    from safetensors.torch import load_file

    model = EfficientNetLite(EfficientNetLiteConfig.from_pretrained(folder))
    state = {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if not k.startswith("_fc.")}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"image tower from {folder}: weights missing {result.missing_keys[:8]}, unexpected "
            f"{result.unexpected_keys[:8]}; it is not an EfficientNet-Lite0 folder: rewrite it with "
            "`synergy towers efficientnet-lite0 --out DIR`"
        )
    return model


def _no_pooler(config) -> dict:
    """``add_pooling_layer=False`` for encoders that take it (BERT, RoBERTa, XLM-R: we pool ourselves, so their
    pooler would be weights without gradients); others (DistilBERT) have no pooler to leave out."""
    model_class = AutoModel._model_mapping[type(config)]
    return {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(model_class).parameters else {}


def build_text_tower(cfg: TextTowerConfig, attn_implementation: str, hf_config: dict | None = None):
    """Any transformers ``AutoModel`` encoder: from the checkpoint's ``hf_config``, from the local folder
    ``cfg.pretrained`` or, from scratch, a RoBERTa of ``cfg``'s sizes."""
    attn = _attention(attn_implementation)
    if hf_config is not None:
        config = _config_from_dict(hf_config, attn)
        model = AutoModel.from_config(config, **_no_pooler(config))
    elif cfg.pretrained:
        folder = _pretrained_folder(cfg.pretrained, "text")
        # the fused kernel has no attention dropout (roberta-base ships 0.1): drop it rather than fail in training
        extra = {"attention_probs_dropout_prob": 0.0} if attn == "synergy" else {}
        config = AutoConfig.from_pretrained(folder, attn_implementation=attn, **extra)
        model = _from_folder(AutoModel, folder, "text", config=config, **_no_pooler(config))
    else:
        config = RobertaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.width,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            intermediate_size=cfg.mlp_dim,
            max_position_embeddings=cfg.max_length + 2,  # RoBERTa positions start after padding_idx
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            type_vocab_size=1,
        )
        config._attn_implementation = attn
        model = AutoModel.from_config(config, add_pooling_layer=False)
    return model, model.config.hidden_size


def build_audio_tower(cfg: AudioTowerConfig, attn_implementation: str, hf_config: dict | None = None):
    """An audio tower of a supported family (:mod:`synergy.core.audio_families`): from the checkpoint's
    ``hf_config``, from the local folder ``cfg.pretrained`` (AST, wav2vec2 / HuBERT, the aisfx CNN; config.json's
    model_type picks) or, from scratch, an AST of ``cfg``'s sizes."""
    attn = _attention(attn_implementation)
    if hf_config is not None:
        model = AutoModel.from_config(_config_from_dict(hf_config, attn))
    elif cfg.pretrained:
        folder = _pretrained_folder(cfg.pretrained, "audio")
        family_of(AutoConfig.from_pretrained(folder).model_type, f"audio tower {folder}/config.json")
        model = _from_folder(AutoModel, folder, "audio", attn_implementation=attn)
    else:
        config = ASTConfig(
            hidden_size=cfg.width,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            intermediate_size=cfg.mlp_dim,
            patch_size=cfg.patch_size,
            frequency_stride=cfg.frequency_stride,
            time_stride=cfg.time_stride,
            max_length=cfg.num_frames,
            num_mel_bins=cfg.n_mels,
        )
        config._attn_implementation = attn
        model = AutoModel.from_config(config)
    family = family_of(model.config.model_type, "audio tower")
    if family == "ast" and (model.config.num_mel_bins != cfg.n_mels or model.config.max_length != cfg.num_frames):
        raise ValueError(
            f"audio tower expects {model.config.num_mel_bins} mels x {model.config.max_length} frames but the config "
            f"says n_mels={cfg.n_mels}, num_frames={cfg.num_frames}; set them to the tower's values"
        )
    if family == "wav2vec2" and getattr(model.config, "add_adapter", False):
        raise ValueError(
            "audio tower: a wav2vec2 adapter (add_adapter=true) changes the frame count; use the model without it"
        )
    return model, model.config.hidden_size


def tower_hf_config(module: nn.Module) -> dict:
    """The transformers config of a tower, as a dict that ``build_*(..., hf_config=...)`` rebuilds it from."""
    data = module.config.to_dict()
    for key in ("_attn_implementation_autoset", "architectures", "transformers_version", "_name_or_path"):
        data.pop(key, None)
    return data
