"""Locked towers (LiT; open_clip's ``--lock-image`` / ``--lock-text``): frozen, in eval mode, features cached.

A locked tower's parameters take no gradient and it stays in eval mode (no dropout) whatever ``model.train()``
says, so its pooled features are a function of its input alone. They are computed once per distinct input and kept
for the run: a run over N items costs one tower pass per item, then only the projections train. The cache key is
the input itself (a digest of the token ids without padding, of the pixels, of the log-mel), not the row number,
because a row's input can change between epochs (prompt templates, captions in ``mixed`` text mode): equal inputs
share an entry. Training feeds a locked tower's modality without random crops (``train/data.py``), so an image or a
clip is one entry for the whole run. Each entry is computed alone, at its own length, so its value
does not depend on which batch first met it: a resumed run, whose cache starts empty, gets the same features
bit for bit, and so the same weights.

``unlock_last_layers`` {tower: N} trains the tower's last N layers (and whatever follows them: a final LayerNorm)
while the rest stays frozen. Its features change as it trains, so such a tower is not cached; it keeps its
training mode.
"""

from __future__ import annotations

import hashlib
import types
import warnings

import torch
from torch import Tensor, nn

from synergy.core.config import ConfigError

LOCKABLE = ("image", "text", "audio")
MAX_CACHED_BYTES = 2 << 30  # past this the features of new inputs are computed but not kept (a warning says so)


def lock_towers(model, lock: tuple[str, ...], unlock_last_layers: dict, resumed: bool) -> dict[str, int]:
    """Freeze the towers named in ``lock`` in ``model`` (a SynergyModel, before its optimizer is built) -> what
    was locked, {tower: unlocked last layers}, also set as ``model.locked`` so the checkpoint records it. A resumed
    ``model`` must have been locked the same way (its optimizer state holds exactly the trainable parameters)."""
    wanted = {name: int(unlock_last_layers.get(name, 0)) for name in lock}
    if resumed and model.locked != wanted:
        raise ConfigError(
            f"the checkpoint was trained with lock {model.locked or 'none'} (tower: unlocked last layers) but this "
            f"run asks for {wanted or 'none'}; resume with the same lock and unlock_last_layers, or start a new run"
        )
    for name, unlocked in wanted.items():
        tower = getattr(model, f"{name}_tower")
        for parameter in tower.parameters():
            parameter.requires_grad_(False)
        if unlocked:
            for parameter in _last_layers(tower, unlocked, name):
                parameter.requires_grad_(True)
            continue
        _stay_in_eval(tower)
        features = f"{name}_features"
        setattr(model, features, CachedFeatures(getattr(model, features), name))
    model.locked = wanted
    return wanted


def _stay_in_eval(tower: nn.Module) -> None:
    """``tower.train(mode)`` keeps it in eval mode: the loop's ``model.train()`` reaches it through its parent."""
    tower.eval()
    tower.train = types.MethodType(lambda self, mode=True: nn.Module.train(self, False), tower)


def _last_layers(tower: nn.Module, count: int, name: str) -> list[nn.Parameter]:
    """The parameters of the last ``count`` blocks of the tower's layer stack (its longest ModuleList: BERT's
    ``encoder.layer``, CLIP's ``encoder.layers``) and of every module registered after the stack (a final norm)."""
    stacks = [(len(m), prefix) for prefix, m in tower.named_modules() if isinstance(m, nn.ModuleList)]
    if not stacks:
        raise ConfigError(f"unlock_last_layers.{name}: the {name} tower has no layer stack (ModuleList) to unlock")
    size, stack = max(stacks)
    if not 0 < count <= size:
        raise ConfigError(f"unlock_last_layers.{name}={count}: the {name} tower has {size} layers; choose 1..{size}")
    first = f"{stack}.{size - count}."
    names = [n for n, _ in tower.named_parameters()]
    start = next(i for i, n in enumerate(names) if n.startswith(first))
    parameters = dict(tower.named_parameters())
    return [parameters[n] for n in names[start:]]


class CachedFeatures:
    """A locked tower's ``SynergyModel.<tower>_features`` behind a per-run cache of one pooled vector per input.

    A plain callable set on the model instance (not a Module: the state dict stays the model's); ``forward_calls``
    counts tower passes."""

    def __init__(self, compute, modality: str):
        self.compute, self.modality = compute, modality
        self.cache: dict[bytes, Tensor] = {}
        self.cached_bytes, self.forward_calls, self.full = 0, 0, False

    def __call__(self, *inputs: Tensor) -> Tensor:
        rows = [self._row(self._one(inputs, i)) for i in range(inputs[0].shape[0])]
        return torch.stack(rows)  # [B, width] float32, no graph: only what comes after (projections) trains

    def _one(self, inputs: tuple[Tensor, ...], i: int) -> tuple[Tensor, ...]:
        """Row ``i`` of a batch as a batch of one at its own length: text without its padding."""
        if self.modality == "text":
            ids, mask = inputs
            real = mask[i].bool()
            return ids[i][real][None], mask[i][real][None]
        return tuple(x[i : i + 1] for x in inputs)

    def _row(self, inputs: tuple[Tensor, ...]) -> Tensor:
        key = _digest(inputs)
        feature = self.cache.get(key)
        if feature is None:
            with torch.no_grad():
                feature = self.compute(*inputs)[0].float()
            self.forward_calls += 1
            if self.cached_bytes < MAX_CACHED_BYTES:
                self.cache[key] = feature
                self.cached_bytes += feature.numel() * feature.element_size()
            elif not self.full:
                self.full = True
                warnings.warn(
                    f"locked {self.modality} tower: its feature cache reached {MAX_CACHED_BYTES >> 20} MiB; features "
                    "of inputs not seen yet are computed each time (inputs that never repeat, such as random crops, "
                    "gain nothing from a lock's cache)",
                    stacklevel=2,
                )
        return feature


def _digest(inputs: tuple[Tensor, ...]) -> bytes:
    digest = hashlib.blake2b(digest_size=20)
    for x in inputs:
        x = x.detach().to("cpu").contiguous()
        digest.update(f"{x.dtype}{tuple(x.shape)}".encode())
        digest.update(x.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.digest()
