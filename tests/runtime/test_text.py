"""Text is cut far past the model's context before it is tokenized: the same ids as tokenizing the whole text and
truncating, for natural texts, and bounded memory for a 12 MB string (which cost 3 GB when tokenized whole)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from synergy.runtime.text import MAX_CHARS_PER_TOKEN, cut_long_text, load_tokenizer, tokenize

from .conftest import MAX_LENGTH, build_tokenizer

WORDS = ["the", "a", "dog", "cat", "barking", "rain", "piano", "bird", "song", "small", "old", "red", "square"]
WORDS += ["circle", "café", "naïve", "über", "東京", "😀", "x"]


def _texts(seed: int, count: int, max_length: int) -> list[str]:
    """Sentences from WORDS with punctuation, newlines and runs of spaces, from short to many times the cut."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(count):
        words = rng.choice(WORDS, size=int(rng.integers(1, max_length * MAX_CHARS_PER_TOKEN // 2)))
        gaps = rng.choice([" ", " ", " ", ", ", ".\n", "  ", "\t", " - "], size=len(words))
        texts.append("".join(w + g for w, g in zip(words, gaps)))
    return texts


def _whole(tokenizer, texts):
    """The reference: every text tokenized whole, then truncated (the tokenizer's own order), unpadded."""
    return [[i for i, m in zip(e.ids, e.attention_mask) if m] for e in tokenizer.encode_batch(texts)]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from synergy.core.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("tokenizers")
    word_level = build_tokenizer()
    word_level.save(str(folder / "word_level.json"))
    bpe = train_tokenizer(_texts(1, 50, 8), 300, 40)  # a BPE of the training code, max length 40
    bpe.save(str(folder / "bpe.json"))
    return {
        "word_level": load_tokenizer(folder / "word_level.json", MAX_LENGTH),
        "bpe": load_tokenizer(folder / "bpe.json", 40),
    }


@pytest.mark.parametrize("name", ["word_level", "bpe"])
def test_cutting_gives_the_ids_of_the_whole_text(tokenizers, name):
    tokenizer = tokenizers[name]
    max_length = tokenizer.truncation["max_length"]
    texts = _texts(0, 60, max_length)
    long = [t * 40 for t in texts[:10]]  # far past the cut
    texts += long
    assert max(len(t) for t in texts) > 10 * max_length * MAX_CHARS_PER_TOKEN
    assert sum(cut_long_text(t, max_length) != t for t in texts) >= 10
    ids, mask = tokenize(tokenizer, texts)
    for row, row_mask, want in zip(ids, mask, _whole(tokenizer, texts)):
        assert row[row_mask == 1].tolist() == want


def test_cut_ends_at_a_space_and_keeps_short_text():
    text = "word " * 1000
    cut = cut_long_text(text, 4)
    assert len(cut) <= 4 * MAX_CHARS_PER_TOKEN and cut.endswith("word") and text.startswith(cut)
    assert cut_long_text("a" * 10_000, 4) == "a" * (4 * MAX_CHARS_PER_TOKEN)  # no space: cut at the limit
    assert cut_long_text("short text", 4) == "short text"


def test_a_12_mb_text_and_a_1_mb_label_stay_small(tiny_bundle):
    """Peak RSS of a fresh process around embedding one 12 MB string and classifying against a 1 MB label: a few MB
    (tokenized whole, 3 GB and 1 GB)."""
    code = textwrap.dedent(
        f"""
        import resource
        from synergy.runtime import Runtime
        runtime = Runtime.open({str(tiny_bundle[0])!r}, threads=1).load()
        runtime.embed_text(["warm up " * 100])
        runtime.label_embeddings(["warm", "up"])
        big = "a dog barking in the rain " * 480_000  # 12.5 MB
        label = "x" * 1_000_000
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        vector = runtime.embed_text([big])
        labels = runtime.label_embeddings(["dog", label])
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert vector.shape[0] == 1 and labels.shape[0] == 2
        print("GROWTH_MB", (after - before) / 1024)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[3]), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    growth = float(result.stdout.split("GROWTH_MB")[1])
    assert growth < 100, f"peak RSS grew {growth:.0f} MB embedding a 12 MB text"
