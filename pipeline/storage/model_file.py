"""Model files: tensors in safetensors (no code is executed on load) plus JSON metadata in its header.

The header also holds a sha256 over the metadata and every tensor (`checksum`), so a file with one
flipped byte is refused on load instead of predicting with a silently changed weight or setting;
files written before the checksum load unchecked."""

from __future__ import annotations

import hashlib
import os
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.errors import BadInput
from pipeline.storage.atomic import write_atomically
from pipeline.science.descriptor_types import SymmetryFunctionParams
from pipeline.science.networks import ELEMENT_NETWORKS
from pipeline.science.model import EnsembleModel
from pipeline.science.device import resolve_device

FORMAT_NAME = "nft-ensemble"
FORMAT_VERSION = 1
CHECKSUM_KEY = "checksum"
"""Header metadata key of the file's content sha256 (`content_checksum`)."""
MIN_MEMBERS = 2
"""δ is the spread of the members' forces: an ensemble of one has none."""


class ModelFileError(BadInput):
    """A model file is missing, corrupt, foreign or of an unknown version."""


def save_model(model: EnsembleModel, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the ensemble atomically (`write_atomically`) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": FORMAT_NAME,
        "version": str(FORMAT_VERSION),
        "descriptor": json.dumps(model.params.to_dict()),
        "hidden": json.dumps(list(model.networks.hidden)),
        "element_networks": model.element_networks,
        "member_seeds": json.dumps(model.member_seeds),
        "extra": json.dumps(extra or {}),
    }
    tensors = {name: t.detach().to(torch.float64).contiguous().clone() for name, t in model.state_dict().items()}
    metadata[CHECKSUM_KEY] = content_checksum(metadata, tensors)
    with write_atomically(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
    return path


def content_checksum(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the metadata (but the checksum itself) and every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    plain = {key: value for key, value in metadata.items() if key != CHECKSUM_KEY}
    digest.update(json.dumps(plain, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def _raw_metadata(path: Path) -> dict[str, str]:
    """The header's `__metadata__` strings (ValueError/OSError when the header is unreadable)."""
    with open(path, "rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        if not 0 < header_size < 100_000_000:
            raise ValueError("bad header size")
        header = json.loads(handle.read(header_size))
    raw = header.get("__metadata__") or {}
    if not isinstance(raw, dict):
        raise ValueError("metadata is not a table")
    return raw


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON metadata of a model file; ModelFileError if it is not an nft model."""
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"{path}: is a folder, not a model file")
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    try:
        raw = _raw_metadata(path)
        if raw.get("format") != FORMAT_NAME:
            raise ModelFileError(f"{path}: not an nft model file (format {raw.get('format')!r})")
        if raw.get("version") != str(FORMAT_VERSION):
            raise ModelFileError(f"{path}: nft model format version {raw.get('version')}, this nft reads {FORMAT_VERSION}")
        return {
            "descriptor": json.loads(raw["descriptor"]),
            "hidden": json.loads(raw["hidden"]),
            "element_networks": raw.get("element_networks", "per-element"),  # files before the shared network had none
            "member_seeds": json.loads(raw["member_seeds"]),
            "extra": json.loads(raw.get("extra", "{}")),
            "raw": raw,
        }
    except ModelFileError:
        raise
    except (ValueError, KeyError, UnicodeDecodeError, OSError) as error:
        raise ModelFileError(f"{path}: not a readable nft model file ({error.__class__.__name__})") from None


def load_ensemble(path: str | os.PathLike[str], dtype: torch.dtype = torch.float64, device: str = "cpu") -> EnsembleModel:
    """Rebuild the ensemble from a model file, in `dtype` on `device` ("cpu", "cuda" or "auto": cuda
    when torch sees a GPU); ModelFileError on anything malformed, ValueError for "cuda" without a GPU."""
    meta = read_metadata(path)
    try:
        params = SymmetryFunctionParams.from_dict(meta["descriptor"])
        _check_size(params, meta["hidden"], meta["member_seeds"], path)
        if meta["element_networks"] not in ELEMENT_NETWORKS:
            raise ModelFileError(
                f"{path}: unknown element_networks {str(meta['element_networks'])[:40]!r} (known: {', '.join(ELEMENT_NETWORKS)})"
            )
        model = EnsembleModel(
            params, hidden=tuple(meta["hidden"]), member_seeds=meta["member_seeds"], element_networks=meta["element_networks"]
        )
        state = load_file(str(path))
        _check_checksum(meta["raw"], state, path)
        state.pop("lowering", None)  # files before the descriptor registered its own constants held a copy
        model.load_state_dict(state)
    except (SafetensorError, RuntimeError, ValueError, TypeError, KeyError) as error:
        message = str(error).splitlines()[0][:160]
        raise ModelFileError(f"{path}: corrupt nft model file ({message})") from None
    if not all(bool(torch.isfinite(tensor).all()) for tensor in model.state_dict().values()):
        raise ModelFileError(f"{path}: the model holds weights that are not finite numbers (a diverged training?)")
    model.extra_metadata = meta["extra"]
    return model.to(device=resolve_device(device), dtype=dtype).eval()


MAX_MEMBERS = 1024
MAX_LAYERS = 16
MAX_LAYER_WIDTH = 4096
MAX_FEATURES = 100_000
"""Bounds on what a model file's header may ask for, checked before any tensor is allocated."""


def _check_checksum(raw: dict[str, str], state: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """ModelFileError when the file's content differs from the checksum written with it."""
    recorded = raw.get(CHECKSUM_KEY)
    if recorded is None:
        return  # written before files carried one
    if recorded != content_checksum(raw, state):
        raise ModelFileError(f"{path}: corrupt nft model file (its content does not match the checksum written with it)")


def _check_size(params: SymmetryFunctionParams, hidden: Any, member_seeds: Any, path: str | os.PathLike[str]) -> None:
    """ModelFileError unless the header's network is of a size an nft model can have."""
    widths_ok = (
        isinstance(hidden, list)
        and 1 <= len(hidden) <= MAX_LAYERS
        and all(isinstance(w, int) and 1 <= w <= MAX_LAYER_WIDTH for w in hidden)
    )
    seeds_ok = (
        isinstance(member_seeds, list)
        and MIN_MEMBERS <= len(member_seeds) <= MAX_MEMBERS
        and all(isinstance(seed, int) for seed in member_seeds)
    )
    if not widths_ok:
        raise ModelFileError(
            f"{path}: hidden layer widths {str(hidden)[:60]} are out of bounds (1–{MAX_LAYERS} layers of 1–{MAX_LAYER_WIDTH})"
        )
    if not seeds_ok:
        raise ModelFileError(
            f"{path}: an ensemble of {MIN_MEMBERS}–{MAX_MEMBERS} members is needed (δ is their spread), "
            f"the file gives member seeds {str(member_seeds)[:60]}"
        )
    if params.n_elements > 118 or params.n_features > MAX_FEATURES:
        raise ModelFileError(
            f"{path}: descriptor of {params.n_features} features for {params.n_elements} elements is out of bounds (at most {MAX_FEATURES})"
        )
