"""One prompt filler: ``{}`` and ``{label}`` fill alike in the runtime, training evaluation, training text and export
verification; a bad template is refused with its name when the training config is built or the bundle opens."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from synergy.runtime import BundleError, Runtime
from synergy.runtime.bundle import load_manifest, write_manifest
from synergy.runtime.prompts import check_template, fill_prompt, label_prompts
from synergy.runtime.zeroshot import LabelCache

from .conftest import LABELS


def test_fill_prompt_takes_both_placeholders_and_literal_braces():
    assert fill_prompt("a {}.", "dog") == fill_prompt("a {label}.", "dog") == "a dog."
    assert fill_prompt("{label}, a sound of a {}", "cat") == "cat, a sound of a cat"
    assert fill_prompt("{{x}} {label}", "dog") == "{x} dog"  # as str.format reads it
    assert fill_prompt("a {}.", "{label} {}") == "a {label} {}."  # a label is text, never a template
    assert label_prompts("dog", ("a {}.", "{label} barking")) == ["a dog.", "dog barking"]


@pytest.mark.parametrize(
    "template, problem",
    [
        ("a photo", "has no '{}' or '{label}' placeholder"),
        ("a {name}.", "has the field '{name}'"),
        ("a {0}.", "has the field '{0}'"),
        ("a {label!r}.", "has the field '{label!r}'"),
        ("a {label:>9}.", "has the field '{label:>9}'"),
        ("a {label.", "expected '}'"),
        ("a } {}", "Single '}'"),
    ],
)
def test_bad_templates_are_refused_naming_the_template(template, problem):
    with pytest.raises(ValueError, match="prompt template " + repr(template).replace("{", r"\{").replace("}", r"\}")):
        check_template(template)
    with pytest.raises(ValueError) as error:
        fill_prompt(template, "dog")
    assert problem in str(error.value)


def test_bad_template_is_refused_when_the_training_config_is_built(tmp_path):
    from synergy.core.config import ConfigError
    from synergy.train.config import load_train_config

    for template in ("a photo", "a {name}."):
        path = tmp_path / "config.json"
        path.write_text(json.dumps({"data": "t.csv", "model_overrides": {"prompt_templates": [template]}}))
        with pytest.raises(ConfigError, match=r"model\.prompt_templates: prompt template " + repr(template)[:4]):
            load_train_config(path)
    path.write_text(json.dumps({"data": "t.csv", "model_overrides": {"prompt_templates": ["a {label}.", "{}"]}}))
    assert load_train_config(path).model_overrides["prompt_templates"] == ["a {label}.", "{}"]


def test_runtime_label_embeddings_agree_for_both_placeholders(runtime, bundle_copy):
    plain = LabelCache().embeddings(LABELS, ("a {}.", "the sound of a {}"), runtime.embed_text)
    named = LabelCache().embeddings(LABELS, ("a {label}.", "the sound of a {label}"), runtime.embed_text)
    np.testing.assert_array_equal(named, plain)
    manifest = load_manifest(bundle_copy)
    templates = tuple(t.replace("{}", "{label}") for t in manifest.text.prompt_templates)
    assert templates != manifest.text.prompt_templates
    write_manifest(
        bundle_copy, dataclasses.replace(manifest, text=dataclasses.replace(manifest.text, prompt_templates=templates))
    )
    with Runtime.open(bundle_copy, threads=1) as named_runtime:
        np.testing.assert_array_equal(named_runtime.label_embeddings(LABELS), runtime.label_embeddings(LABELS))
    write_manifest(
        bundle_copy, dataclasses.replace(manifest, text=dataclasses.replace(manifest.text, prompt_templates=("a {0}",)))
    )
    with pytest.raises(BundleError, match=r"prompt template 'a \{0\}' has the field"):
        Runtime.open(bundle_copy)


@pytest.fixture(scope="module")
def tiny_models():
    """Two tiny models with the same weights, one with ``{}`` templates and one with ``{label}``, and a tokenizer."""
    from synergy.core.model import create_model
    from synergy.core.tokenizer import train_tokenizer

    plain = ("a {}.", "the sound of a {}.")
    named = tuple(t.replace("{}", "{label}") for t in plain)
    models = []
    for templates in (plain, named):
        torch.manual_seed(0)
        models.append(create_model("tiny", prompt_templates=templates).eval())
    config = models[0].config
    corpus = [fill_prompt(t, label) for label in LABELS for t in plain] * 4
    return models, train_tokenizer(corpus, config.text.vocab_size, config.text.max_length)


def test_training_evaluation_agrees_for_both_placeholders(tiny_models):
    from synergy.train.evaluate import label_embeddings

    (plain, named), tokenizer = tiny_models
    torch.testing.assert_close(
        label_embeddings(named, tokenizer, list(LABELS)),
        label_embeddings(plain, tokenizer, list(LABELS)),
        rtol=0,
        atol=0,
    )


def test_training_text_agrees_for_both_placeholders(tiny_models):
    from synergy.train.data import ManifestDataset, Row

    (plain, named), _ = tiny_models
    row = Row(line=2, image=None, audio=None, label="dog", caption="")
    texts = []
    for model in (plain, named):
        dataset = ManifestDataset.for_model([], model.config, text_mode="prompt")
        rng = np.random.default_rng(0)
        texts.append([dataset._text(row, rng) for _ in range(8)] + [dataset._text(row, None)])
    assert texts[0] == texts[1] and set(texts[0]) == {"a dog.", "the sound of a dog."}


def test_export_verification_agrees_for_both_placeholders(tiny_models):
    from synergy.export.verify import builtin_evaluation_set, verify_towers

    (plain, named), tokenizer = tiny_models
    config = plain.config
    clip = round(config.audio.clip_seconds * config.audio.sample_rate)
    evaluation = builtin_evaluation_set(
        config.image.image_size, config.image.mean, config.image.std, config.audio.sample_rate, clip, count=4
    )
    results = []
    for model in (plain, named):
        runners = {m: _torch_runner(model, m) for m in ("image", "text", "audio")}  # the exported side: torch itself
        results.append(verify_towers(model, tokenizer, runners, evaluation, "fp32", "test", audio_lengths=()).to_dict())
    assert results[0] == results[1]


def _torch_runner(model, modality: str):
    def runner(feeds):
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
        with torch.no_grad():
            if modality == "text":
                return model.encode_text(tensors["input_ids"], tensors["attention_mask"]).numpy()
            if modality == "image":
                return model.encode_image(tensors["pixel_values"]).numpy()
            return model.encode_audio(tensors["waveform"], tensors["waveform_lengths"]).numpy()

    return runner
