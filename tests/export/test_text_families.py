"""Text towers from local folders through the whole path: folder -> checkpoint -> exported bundle -> runtime, against
transformers computing the same (the folder's tokenizer, its pooling, the checkpoint's projection, L2 norm).

A tiny random sentence-transformers BERT (mean pooling, 29 tokens; its config.json carries keys BertConfig does not
define, as all-MiniLM-L6-v2's does), then the real all-MiniLM-L6-v2 after a few training steps. Texts of odd
lengths, an empty one, and one far past the max length (truncated, [SEP] kept). fp32 cosine >= 0.9999 per text.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from synergy.core.checkpoint import load_checkpoint
from synergy.core.model import create_model
from synergy.core.tokenizer import load_pretrained_tokenizer
from synergy.export import export_bundle
from synergy.runtime import Runtime

pytestmark = pytest.mark.slow

MIN_COSINE = 0.9999
TEXTS = [
    "a",
    "a red circle",
    "the sound of a dog barking in the rain",
    "",
    "Piano song, of a BIRD!",
    " ".join(["the sound of a piano"] * 80),  # 400 words: past BERT's 29 and MiniLM's 256 tokens
    "green star siren",
]


def _mean_pooled(folder, projection, texts, max_length):
    """sentence-transformers' definition, computed with transformers: the folder's tokenizer, mean of
    last_hidden_state over the attention mask; then the checkpoint's projection and L2 norm."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tower = AutoModel.from_pretrained(folder, add_pooling_layer=False).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = tower(**batch).last_hidden_state  # [B, L, H]
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return pooled, F.normalize(projection(pooled), dim=-1).numpy()


@pytest.fixture(scope="module")
def bert_bundle(tmp_path_factory, bert_folder_writer, model_exporter):
    root = tmp_path_factory.mktemp("bert")
    folder = bert_folder_writer(root / "folder", pooling="mean")
    torch.manual_seed(0)
    model = create_model("tiny", **{"text.pretrained": str(folder)}).eval()
    tokenizer = load_pretrained_tokenizer(folder, model.config.text.max_length, model.text_tower.config.pad_token_id)
    return folder, model, model_exporter(root, model, tokenizer)


def test_a_mean_pooled_bert_folder_exports_and_the_runtime_matches_transformers(bert_bundle, cosine):
    folder, model, bundle = bert_bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["text"]["max_length"] == 29  # the folder's sentence_bert_config.json, not the preset's 13
    bundled = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    assert bundled.get_vocab() == Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab()
    # fp32 parity is onnxruntime's: "auto" may pick OpenVINO bf16 for this bundle (its export's check passed)
    got = Runtime.open(bundle, backend="onnxruntime", threads=1, batch_size=3).embed_text(TEXTS)  # batches mix lengths
    _, want = _mean_pooled(folder, model.text_projection, TEXTS, 29)
    cosines = cosine(got, want)
    print(f"\nBERT (mean pooling) runtime vs transformers: worst cosine {cosines.min():.7f}")
    assert cosines.min() >= MIN_COSINE, cosines


def test_the_exported_checkpoint_pools_by_the_mean_not_the_first_token(bert_bundle):
    """The parity above could pass by accident only if mean and CLS pooling agreed; they do not."""
    bundle = bert_bundle[2]
    loaded, tokenizer = load_checkpoint(bundle.parent / "checkpoint")
    assert loaded.config.text.pooling == "mean"
    encodings = tokenizer.encode_batch(TEXTS[:3])
    ids, mask = torch.tensor([e.ids for e in encodings]), torch.tensor([e.attention_mask for e in encodings])
    with torch.no_grad():
        hidden = loaded.text_tower(input_ids=ids, attention_mask=mask).last_hidden_state
        assert not torch.allclose(loaded.text_features(ids, mask), hidden[:, 0], atol=1e-3)


# --- the real all-MiniLM-L6-v2 ------------------------------------------------------------------------------------


def test_minilm_pools_as_sentence_transformers_defines_it(minilm_folder):
    """Our pooled, L2-normalised MiniLM features are sentence-transformers' all-MiniLM-L6-v2 embeddings: mean of
    last_hidden_state over the attention mask (the folder's 1_Pooling), then L2 norm (its 2_Normalize), 256 tokens."""
    model = create_model("tiny", **{"text.pretrained": str(minilm_folder)}).eval()
    assert (model.config.text.pooling, model.config.text.max_length) == ("mean", 256)
    tokenizer = load_pretrained_tokenizer(minilm_folder, 256, model.text_tower.config.pad_token_id)
    encodings = tokenizer.encode_batch(TEXTS)
    ids, mask = torch.tensor([e.ids for e in encodings]), torch.tensor([e.attention_mask for e in encodings])
    assert ids.shape[1] == 256  # the long text is truncated at sentence-transformers' max_seq_length
    with torch.no_grad():
        ours = F.normalize(model.text_features(ids, mask), dim=-1)
    reference, _ = _mean_pooled(minilm_folder, model.text_projection, TEXTS, 256)
    assert torch.allclose(ours, F.normalize(reference, dim=-1), atol=1e-5)


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory, minilm_folder):
    """A few training steps of the tiny preset with MiniLM as its text tower, locked (LiT), on the synthetic set,
    exported."""
    from synergy.train.config import TrainConfig
    from synergy.train.datasets.synth import synthesize
    from synergy.train.loop import train

    root = tmp_path_factory.mktemp("minilm")
    synthesize(root / "data", seed=1, train_per_class=2, val_per_class=1, heldout_per_class=1, missing_rate=0.0)
    config = TrainConfig(
        model="tiny",
        model_overrides={"text.pretrained": str(minilm_folder)},
        data=str(root / "data" / "train.csv"),
        out=str(root / "run"),
        batch_size=8,
        steps=3,
        warmup_steps=1,
        workers=0,
        save_every=3,
        lock=("text",),
    )
    checkpoint = train(config, progress=False)
    export_bundle(checkpoint, root / "bundle")
    return checkpoint, root / "bundle"


def test_minilm_trains_locked_exports_and_the_runtime_agrees_with_torch(minilm_run, minilm_folder, cosine):
    checkpoint, bundle = minilm_run
    model, tokenizer = load_checkpoint(checkpoint)
    assert json.loads((bundle / "manifest.json").read_text())["text"]["max_length"] == 256
    bundled = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    assert bundled.get_vocab() == Tokenizer.from_file(str(minilm_folder / "tokenizer.json")).get_vocab()
    got = Runtime.open(bundle, backend="onnxruntime", threads=1, batch_size=4).embed_text(TEXTS)
    encodings = tokenizer.encode_batch(TEXTS)
    ids, mask = torch.tensor([e.ids for e in encodings]), torch.tensor([e.attention_mask for e in encodings])
    with torch.no_grad():
        want = model.encode_text(ids, mask).numpy()
    cosines = cosine(got, want)
    print(f"\nMiniLM (trained 3 steps) runtime vs torch: worst cosine {cosines.min():.7f}")
    assert cosines.min() >= MIN_COSINE, cosines
    # locked, the tower is still all-MiniLM-L6-v2: the bundle embeds as sentence-transformers' definition, computed
    # from the folder with transformers, through the trained projection
    _, reference = _mean_pooled(minilm_folder, model.text_projection, TEXTS, 256)
    cosines = cosine(got, reference)
    print(f"MiniLM bundle vs sentence-transformers' mean pooling (transformers): worst cosine {cosines.min():.7f}")
    assert cosines.min() >= MIN_COSINE, cosines
