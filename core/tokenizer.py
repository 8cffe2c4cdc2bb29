"""Text tokenizers: a pretrained tower's own ``tokenizer.json``, or one trained with the ``tokenizers`` library on
the training captions for towers trained from scratch. Either way the saved file carries its padding, truncation
and special-token template, so the torch-free runtime tokenizes exactly as training did."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"  # ids 0, 1, 2, 3: the scratch RoBERTa config uses them
END_OF_WORD = "</w>"  # CLIP's BPE marks a word's last piece, so ids decode back to words ("dog", not "do g")


def train_tokenizer(texts: Iterable[str], vocab_size: int, max_length: int) -> Tokenizer:
    """A lower-cased BPE over whitespace/punctuation pieces with CLIP's end-of-word marker (so ``decode`` gives
    words back), <s> ... </s> around every sequence."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK, end_of_word_suffix=END_OF_WORD))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.BPEDecoder(suffix=END_OF_WORD)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, UNK],
        end_of_word_suffix=END_OF_WORD,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer = _canonical_ids(tokenizer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, tokenizer.token_to_id(BOS)), (EOS, tokenizer.token_to_id(EOS))]
    )
    return configure(tokenizer, max_length)


def _canonical_ids(tokenizer: Tokenizer) -> Tokenizer:
    """The trained BPE with ids that depend on the texts only. The trainer numbers the end-of-word forms of the
    alphabet ("e</w>") in hash-set order, which changes from process to process (the merges do not): a resumed run,
    which loads the saved tokenizer, would otherwise disagree with a fresh one on the same data. Ids: the special
    tokens, then the alphabet sorted, then each merge's result in merge order -- the trainer's own order, minus the
    shuffle."""
    data = json.loads(tokenizer.to_str())
    model = data["model"]
    merged = ["".join(pair) if isinstance(pair, list) else pair.replace(" ", "", 1) for pair in model["merges"]]
    specials = [t for t in (PAD, BOS, EOS, UNK) if t in model["vocab"]]
    alphabet = sorted(set(model["vocab"]) - set(specials) - set(merged))
    order = list(dict.fromkeys(specials + alphabet + merged))
    if sorted(order) != sorted(model["vocab"]):  # a merge result missing from the vocabulary: keep the trainer's ids
        return tokenizer
    ids = {token: i for i, token in enumerate(order)}
    if ids == model["vocab"]:
        return tokenizer
    model["vocab"] = ids
    return Tokenizer.from_str(json.dumps(data))


def configure(tokenizer: Tokenizer, max_length: int, pad_id: int | None = None) -> Tokenizer:
    """Truncate to ``max_length`` and pad to the batch's longest sequence."""
    if pad_id is None:
        padding = tokenizer.padding
        pad_id = padding["pad_id"] if padding else tokenizer.token_to_id(PAD)
    if pad_id is None:
        raise ValueError("tokenizer has no padding token; give pad_id (the text tower's pad_token_id)")
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=pad_id, pad_token=tokenizer.id_to_token(pad_id) or PAD)
    return tokenizer


def load_pretrained_tokenizer(folder: str | Path, max_length: int, pad_id: int | None) -> Tokenizer:
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"text tower folder {folder} has no tokenizer.json; save the tokenizer with the tower "
            "(AutoTokenizer.save_pretrained writes it)"
        )
    return configure(Tokenizer.from_file(str(path)), max_length, pad_id)
