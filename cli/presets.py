"""`synergy presets`: each preset's towers, sizes and parameter counts, counted on torch's meta device."""

from __future__ import annotations

import click


@click.command("presets")
def presets_command():
    """The model presets: each tower's geometry and the parameter count."""
    import torch

    from synergy.core.config import list_presets, load_config
    from synergy.core.towers import build_audio_tower, build_image_tower, build_text_tower

    builders = {"image": build_image_tower, "text": build_text_tower, "audio": build_audio_tower}
    presets = []
    for name in list_presets():
        config = load_config(name)
        counts = {}
        with torch.device("meta"):  # shapes only: no memory, no initialisation, milliseconds for `large`
            for tower, build in builders.items():
                module, width = build(getattr(config, tower), config.attn_implementation)
                counts[tower] = sum(p.numel() for p in module.parameters()) + width * config.embed_dim  # + projection
        i, t, a = config.image, config.text, config.audio
        towers = {
            "image": f"CLIP ViT  {i.image_size} px, patch {i.patch_size}, {i.layers} layers x {i.width}",
            "text": f"RoBERTa   {t.max_length} tokens, vocab {t.vocab_size}, {t.layers} layers x {t.width}",
            "audio": f"AST       {a.clip_seconds:g} s at {a.sample_rate / 1000:g} kHz, {a.n_mels} mel x "
            f"{a.num_frames} frames, patch {a.patch_size}, {a.layers} layers x {a.width}",
        }
        presets.append((sum(counts.values()) + 3, name, config, towers, counts))  # + the three logit scales
    column = max(len(text) for *_, towers, _ in presets for text in towers.values())
    for total, name, config, towers, counts in sorted(presets, key=lambda preset: preset[0]):
        click.echo(f"{name:<8} {_count(total)} parameters, embed_dim {config.embed_dim}")
        for tower, text in towers.items():
            pretrained = getattr(config, tower).pretrained
            source = f"  from {pretrained}" if pretrained else ""
            click.echo(f"  {tower:<6} {text:<{column}} {_count(counts[tower]):>8}{source}")
    click.echo("(parameters counted on torch's meta device: towers + projections + 3 logit scales)")


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)
