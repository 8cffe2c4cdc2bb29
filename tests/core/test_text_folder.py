"""What a pretrained text folder says: its pooling (sentence-transformers' Pooling config, else CLS) and its max
length (max_seq_length, else the tokenizer's model_max_length, capped by the position embeddings)."""

import json

import pytest
import torch

from synergy.core.config import ConfigError
from synergy.core.model import create_model
from synergy.core.text_folder import read_text_folder


def test_the_folders_pooling_and_length_reach_the_model(bert_folder_writer, tmp_path):
    assert read_text_folder(bert_folder_writer(tmp_path / "mean", pooling="mean")).pooling == "mean"
    assert read_text_folder(bert_folder_writer(tmp_path / "cls", pooling="cls", max_seq_length=17)).max_length == 17
    plain = bert_folder_writer(tmp_path / "plain", pooling=None)  # no sentence-transformers files
    assert (read_text_folder(plain).pooling, read_text_folder(plain).max_length) == ("cls", 40)  # 512 capped by 40
    model = create_model("tiny", **{"text.pretrained": str(plain), "text.pooling": "mean"})
    assert (model.config.text.pooling, model.config.text.max_length) == ("mean", 40)  # the config key wins


def test_mean_pooling_is_over_the_mask_and_cls_is_the_first_token(bert_folder_writer, tmp_path):
    folder = bert_folder_writer(tmp_path / "bert", pooling="mean")
    mean = create_model("tiny", **{"text.pretrained": str(folder)}).eval()
    cls = create_model("tiny", **{"text.pretrained": str(folder), "text.pooling": "cls"}).eval()
    ids = torch.tensor([[2, 30, 31, 32, 3, 0, 0], [2, 40, 3, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        hidden = mean.text_tower(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.allclose(mean.text_features(ids, mask)[1], hidden[1, :3].mean(0), atol=1e-6)
        assert torch.allclose(cls.text_features(ids, mask), hidden[:, 0], atol=1e-6)
        padded = torch.cat([ids, torch.zeros(2, 4, dtype=ids.dtype)], 1)  # padding never changes an embedding
        assert torch.allclose(mean.encode_text(padded, (padded != 0).long()), mean.encode_text(ids, mask), atol=1e-5)


def test_roberta_positions_after_padding_are_not_counted(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 1})
    )
    assert read_text_folder(tmp_path).max_length == 512


def test_unsupported_pooling_and_values_say_what_to_do(bert_folder_writer, tmp_path):
    folder = bert_folder_writer(tmp_path / "bert", pooling="mean")
    config = json.loads((folder / "1_Pooling" / "config.json").read_text())
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({**config, "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": True})
    )
    with pytest.raises(ValueError, match=r"pooling \['max_tokens'\] is not supported.*set text.pooling"):
        read_text_folder(folder)
    with pytest.raises(ConfigError, match="text.pooling='max': choose one of cls, mean"):
        create_model("tiny", **{"text.pooling": "max"})


def test_an_encoder_without_a_pooler_argument_builds_and_round_trips(bert_folder_writer, tmp_path):
    """DistilBERT's model class takes no add_pooling_layer (it has no pooler): any AutoModel encoder builds."""
    import shutil

    from transformers import DistilBertConfig, DistilBertModel

    from synergy.core.checkpoint import load_checkpoint, save_checkpoint
    from synergy.core.tokenizer import load_pretrained_tokenizer

    bert = bert_folder_writer(tmp_path / "bert", pooling=None)
    config = DistilBertConfig(vocab_size=61, dim=36, n_layers=2, n_heads=3, hidden_dim=37, max_position_embeddings=33)
    DistilBertModel(config).save_pretrained(tmp_path / "distil")
    shutil.copyfile(bert / "tokenizer.json", tmp_path / "distil" / "tokenizer.json")
    model = create_model("tiny", **{"text.pretrained": str(tmp_path / "distil")}).eval()
    assert (model.config.text.pooling, model.config.text.max_length) == ("cls", 33)
    tokenizer = load_pretrained_tokenizer(tmp_path / "distil", 33, 0)
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    ids = torch.tensor([tokenizer.encode("a red circle").ids])
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(ids, torch.ones_like(ids)), model.encode_text(ids, torch.ones_like(ids)))


def test_weights_missing_from_a_folder_are_named_and_a_left_out_pooler_is_not(bert_folder_writer, tmp_path):
    import warnings

    folder = bert_folder_writer(tmp_path / "bert", pooling=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the folder's own weights, all used: nothing to say
        create_model("tiny", **{"text.pretrained": str(folder)})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))  # a layer the folder lacks
    with pytest.warns(UserWarning, match=r"weights missing from the folder \(they start random\): \['encoder.layer.2"):
        create_model("tiny", **{"text.pretrained": str(folder)})
