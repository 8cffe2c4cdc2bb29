"""Synergy: a tri-modal (image, text, audio) CLIP, after Synergy-CLIP (IEEE Access 2025).

The package root stays import-light: `import synergy.runtime` must not pull in torch, so the public names
below are resolved lazily on first use.
"""

__version__ = "0.1.0"

_LAZY = {
    "create_model": "synergy.core.model",
    "list_presets": "synergy.core.config",
    "SynergyModel": "synergy.core.model",
    "SynergyConfig": "synergy.core.config",
    "load_checkpoint": "synergy.core.checkpoint",
    "save_checkpoint": "synergy.core.checkpoint",
    "trimodal_contrastive_loss": "synergy.kernels.contrastive",
    "Runtime": "synergy.runtime",
}

__all__ = [*sorted(_LAZY), "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'synergy' has no attribute {name!r}")
