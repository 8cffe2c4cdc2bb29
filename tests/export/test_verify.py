"""The verification's pass/fail logic and its evaluation sets."""

from __future__ import annotations

import numpy as np
import pytest

from synergy.export.verify import (
    MIN_DECIDED_QUERIES,
    TowerCheck,
    Verification,
    _batches,
    builtin_evaluation_set,
    read_evaluation_set,
)


def _verification(precision, *, max_abs=1e-6, cosine=1.0, decided_agreement=1.0, decided=100) -> Verification:
    check = TowerCheck(max_abs, cosine, cosine, items=64, batch_sizes=(1, 3, 17))
    return Verification(
        target="test",
        precision=precision,
        towers={"image": check, "text": check, "audio": check},
        agreement=0.97,
        queries=128,
        labels=12,
        decided_agreement=decided_agreement,
        decided_queries=decided,
        evaluation_set="test",
    )


def test_thresholds():
    assert _verification("fp32").failures() == []
    assert "max abs error" in _verification("fp32", max_abs=2e-4).failures()[0]
    assert "min cosine" in _verification("fp32", cosine=0.9998).failures()[0]
    assert _verification("fp16", max_abs=1e-2, cosine=0.9995).failures() == []
    assert "min cosine" in _verification("fp16", cosine=0.998).failures()[0]
    assert "agreement 98.00%" in _verification("fp16", decided_agreement=0.98).failures()[0]
    assert _verification("fp32", decided_agreement=0.5).failures() == []  # fp32 is gated on errors, not agreement
    assert _verification("fp16", cosine=float("nan")).failures()  # NaN never passes


def test_agreement_gate_needs_decided_queries():
    few = _verification("fp16", decided_agreement=0.5, decided=MIN_DECIDED_QUERIES - 1)
    assert not few.agreement_gated and few.failures() == []
    assert "agreement not gated" in few.format()
    assert few.to_dict()["zero_shot_gate_applied"] is False
    enough = _verification("fp16", decided_agreement=0.5, decided=MIN_DECIDED_QUERIES)
    assert enough.agreement_gated and enough.failures()


@pytest.mark.parametrize("count", [1, 5, 21, 64])
def test_batches_cover_every_item_with_sizes_1_3_17(count):
    batches = _batches(count)
    assert [len(b) for b in batches[:3]] == [1, 3, 17]
    assert np.array_equal(np.concatenate(batches)[:count], np.arange(count))


def test_builtin_set_is_fixed():
    args = (30, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 16000, 8000)
    first, second = builtin_evaluation_set(*args), builtin_evaluation_set(*args)
    assert first.images.shape == (64, 3, 30, 30) and first.waveforms.shape == (64, 8000)
    assert first.images.dtype == np.float32 and first.waveforms.dtype == np.float32
    assert np.array_equal(first.images, second.images) and np.array_equal(first.waveforms, second.waveforms)
    assert np.abs(first.waveforms).max() < 1.0


def test_reads_a_synergy_clip_csv(tmp_path):
    from synergy.train.datasets import synth  # imported plainly: a broken import must fail, not skip

    summary = synth.synthesize(
        tmp_path / "data",
        train_per_class=1,
        val_per_class=1,
        heldout_per_class=0,
        image_size=32,
        clip_seconds=0.5,
        missing_rate=0.0,
        workers=1,
    )
    csv_path = tmp_path / "data" / "val.csv"
    assert csv_path.is_file(), summary
    evaluation = read_evaluation_set(csv_path, 30, (0.5,) * 3, (0.25,) * 3, 16000, 8000, limit=5)
    assert evaluation.images.shape == (5, 3, 30, 30) and evaluation.waveforms.shape == (5, 8000)
    assert len(evaluation.labels) >= 2 and "val.csv" in evaluation.source
    assert evaluation.texts and all(t.strip() for t in evaluation.texts)  # the CSV's captions: the text check's
    with pytest.raises(ValueError, match="no such file"):
        read_evaluation_set(tmp_path / "missing.csv", 30, (0.5,) * 3, (0.25,) * 3, 16000, 8000)


def test_engines_verified_on_one_set_share_pytorch_s_embeddings(reference_model):
    """A second engine's verification (the export's OpenVINO check after onnxruntime's) reads PyTorch's embeddings
    from the shared ``references`` and runs the model no more; other feeds still run it (keyed by the feeds' bytes)."""
    import copy

    import torch

    from synergy.export.verify import verify_towers

    model, tokenizer = reference_model
    config = model.config
    image = config.image.preprocessing()
    clip = round(config.audio.clip_seconds * config.audio.sample_rate)

    def evaluation(seed):
        return builtin_evaluation_set(image.size, image.mean, image.std, config.audio.sample_rate, clip, 8, seed)

    twin = copy.deepcopy(model)  # the "engine": the same weights, without the reference's hooks below
    calls = []
    hooks = [
        getattr(model, f"{m}_projection").register_forward_hook(lambda *_, m=m: calls.append(m))
        for m in ("image", "text", "audio")
    ]

    def run(encode):
        return lambda feeds: encode(*(torch.from_numpy(v) for v in feeds.values())).detach().numpy()

    engine = {"image": run(twin.encode_image), "text": run(twin.encode_text), "audio": run(twin.encode_audio)}
    references = {}
    try:
        with torch.no_grad():
            first = verify_towers(model, tokenizer, engine, evaluation(0), "fp32", "a", references=references)
            calls_first = len(calls)
            calls.clear()
            second = verify_towers(model, tokenizer, engine, evaluation(0), "fp32", "b", references=references)
            assert not calls  # the engine ran (below), PyTorch did not
            third = verify_towers(model, tokenizer, engine, evaluation(1), "fp32", "c", references=references)
    finally:
        for hook in hooks:
            hook.remove()
    # another seed: new pictures and sounds run the model again; the labels' prompts are the same feeds, and do not
    assert calls_first > 0 and set(calls) == {"image", "audio"}
    assert first.towers == second.towers and not second.failures() and not third.failures()


def test_free_text_is_checked_beside_the_prompts(reference_model):
    """A text engine exact on the short label prompts and wrong on sentences (as int8 MiniLM nearly is) fails the
    gate: the built-in sentences and a CSV's captions go through the text tower too."""
    import dataclasses

    import torch

    from synergy.export.verify import BUILTIN_LABELS, BUILTIN_SENTENCES, combine_evaluation_sets, verify_towers
    from synergy.runtime.prompts import fill_prompt

    model, tokenizer = reference_model
    config = model.config
    image = config.image.preprocessing()
    clip = round(config.audio.clip_seconds * config.audio.sample_rate)
    evaluation = builtin_evaluation_set(image.size, image.mean, image.std, config.audio.sample_rate, clip, 8)
    assert evaluation.texts == BUILTIN_SENTENCES
    prompts = [fill_prompt(t, label) for label in BUILTIN_LABELS for t in config.prompt_templates]
    longest_prompt = max(len(tokenizer.encode(p).ids) for p in prompts)

    def run(encode, skew=False):
        def runner(feeds):
            out = encode(*(torch.from_numpy(v) for v in feeds.values())).detach().numpy()
            if skew:  # rows with more real tokens than any prompt: the sentences
                longer = feeds["attention_mask"].sum(1) > longest_prompt
                out[longer] += 0.2 * np.roll(out[longer], 1, axis=1)
            return out

        return runner

    def engine(skew):
        towers = {"image": run(model.encode_image), "audio": run(model.encode_audio)}
        return {**towers, "text": run(model.encode_text, skew)}

    with torch.no_grad():
        exact = verify_towers(model, tokenizer, engine(False), evaluation, "int8", "exact")
        skewed = verify_towers(model, tokenizer, engine(True), evaluation, "int8", "skewed")
        prompts_only = dataclasses.replace(evaluation, texts=())
        blind = verify_towers(model, tokenizer, engine(True), prompts_only, "int8", "prompts only")
    assert not exact.failures() and exact.towers["text"].items > blind.towers["text"].items
    assert any("text: min cosine" in f for f in skewed.failures()), skewed.format()
    assert not blind.failures()  # without free text the same engine passes: what the sentences are there for
    # a CSV's captions join the built-in sentences
    captioned = combine_evaluation_sets(evaluation, dataclasses.replace(evaluation, texts=("a cat on a mat",)))
    assert captioned.texts == (*BUILTIN_SENTENCES, "a cat on a mat")
