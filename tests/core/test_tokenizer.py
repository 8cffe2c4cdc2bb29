"""The scratch tokenizer (towers trained from scratch): ids decode back to the words, the special ids the scratch
RoBERTa config assumes, and the saved JSON (what a bundle carries) tokenizes and decodes the same."""

import subprocess
import sys

from tokenizers import Tokenizer

from synergy.core.tokenizer import BOS, EOS, PAD, UNK, train_tokenizer

CAPTIONS = ["a dog barking in the rain", "the sound of a red circle", "a photo of a blue square", "an old piano"] * 5


def test_decode_gives_the_words_back():
    tokenizer = train_tokenizer(CAPTIONS, 131, 13)
    for text in ["a dog barking", "the old piano in the rain", "a red square"]:
        encoding = tokenizer.encode(text)
        assert len(encoding.ids) < len(text.replace(" ", "")) + 2, "no merges learned: the test would prove nothing"
        assert tokenizer.decode(encoding.ids, skip_special_tokens=True) == text
    # a word split into pieces the training never joined still decodes whole (the end-of-word marker, not spaces)
    assert tokenizer.decode(tokenizer.encode("barkingdog").ids, skip_special_tokens=True) == "barkingdog"


def test_special_ids_padding_and_the_saved_file():
    tokenizer = train_tokenizer(CAPTIONS, 131, 7)
    assert [tokenizer.token_to_id(t) for t in (PAD, BOS, EOS, UNK)] == [0, 1, 2, 3]
    short, long = tokenizer.encode_batch(["a dog", "the sound of a red circle in the rain"])
    assert short.ids[0] == 1 and short.ids[-1] == 0 and len(short.ids) == len(long.ids) == 7  # padded, truncated
    assert long.ids[-1] == 2
    reloaded = Tokenizer.from_str(tokenizer.to_str())
    assert reloaded.encode("a dog barking").ids == tokenizer.encode("a dog barking").ids
    assert reloaded.decode(reloaded.encode("a dog barking").ids, skip_special_tokens=True) == "a dog barking"


def test_the_same_texts_give_the_same_tokenizer_in_every_process():
    """The BPE trainer numbers the alphabet's end-of-word forms in hash-set order, which differs per process: a resumed
    run (saved tokenizer) and a fresh one (retrained) must still agree id for id."""
    script = (
        "from synergy.core.tokenizer import train_tokenizer; import sys; "
        f"sys.stdout.write(train_tokenizer({CAPTIONS!r}, 131, 13).to_str())"
    )
    runs = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
            for _ in range(4)}  # fmt: skip
    assert len(runs) == 1
    assert runs.pop() == train_tokenizer(CAPTIONS, 131, 13).to_str()
