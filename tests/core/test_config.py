"""The one check of config dicts (``core.config.checked_fields``), as the model, training and MMR configs use it:
an unknown key names the file or section and lists the valid keys, a value of the wrong type names the key and the
expected type, and a nested dataclass is checked under its own section."""

import json
import re

import pytest

from synergy.core.config import ConfigError, ImageTowerConfig, SynergyConfig, checked_fields, config_from_dict
from synergy.train.config import load_train_config
from synergy.train.mmr.train import mmr_config


def test_checked_fields_unknown_key_wrong_type_and_nested_sections():
    with pytest.raises(ConfigError, match=r"^here: unknown key\(s\) \['embed_dimm'\] \(did you mean 'embed_dim'\?\)"):
        checked_fields(SynergyConfig, {"embed_dimm": 3}, "here")
    with pytest.raises(ConfigError, match=r"^here: embed_dim: expected int, got str 'x'"):
        checked_fields(SynergyConfig, {"embed_dim": "x"}, "here")
    with pytest.raises(ConfigError, match=r"^here.image: unknown key\(s\) \['widht'\].*valid keys: \[.*'width'"):
        checked_fields(SynergyConfig, {"image": {"widht": 3}}, "here")
    with pytest.raises(ConfigError, match=r"^here.image: expected an object of ImageTowerConfig fields, got 3"):
        checked_fields(SynergyConfig, {"image": 3}, "here")
    with pytest.raises(ConfigError, match=r"^here: unknown key\(s\) \['width'\]; valid keys: \['heads', 'layers'"):
        checked_fields(ImageTowerConfig, {"width": 3}, "here", exclude=("width", "image_size", "patch_size"))
    values = checked_fields(SynergyConfig, {"embed_dim": 8, "image": {"mean": [0.5, 0.5, 0.5]}}, "here")
    assert values["image"] == ImageTowerConfig(mean=(0.5, 0.5, 0.5)) and values["embed_dim"] == 8
    assert config_from_dict({"embed_dim": 8}).embed_dim == 8


def test_training_and_mmr_configs_name_their_file_or_section(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"stpes": 3}))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: unknown key(s) ['stpes'] (did you mean 'steps'?)")):
        load_train_config(path)
    path.write_text(json.dumps({"steps": "3"}))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: steps: expected int, got str '3'")):
        load_train_config(path)
    base = {"checkpoint": "c", "data": "d"}
    with pytest.raises(ConfigError, match=r"^mmr: unknown key\(s\) \['epoch'\] \(did you mean 'epochs'\?\)"):
        mmr_config({**base, "epoch": 3})
    with pytest.raises(ConfigError, match=r"^mmr: epochs: expected int, got float 2.5"):
        mmr_config({**base, "epochs": 2.5})
    with pytest.raises(ConfigError, match=r"^mmr: head: unknown key\(s\) \['vocab_size'\]; valid keys: \['bottleneck'"):
        mmr_config({**base, "head": {"vocab_size": 7}})  # sizes from the checkpoint are not options
    with pytest.raises(ConfigError, match=r"^mmr: head: fusion_width: expected int, got str 'wide'"):
        mmr_config({**base, "head": {"fusion_width": "wide"}})
    assert mmr_config({**base, "head": {"fusion_width": 64}}).head == {"fusion_width": 64}
