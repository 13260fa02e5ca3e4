"""Detector checkpoints: weights in safetensors, everything else in a JSON beside them.

    save_detector(model, config, "cascade", "out/best.safetensors", extra={"epoch": 12})
    loaded = load_detector("out/best.safetensors")     # .model, .config, .arch, .version

`best.safetensors` holds the state dict (tensors only: nothing in it can run
code) and, in its header metadata, the architecture, the full `DetectorConfig`
(canonical JSON) and `version`, a short hash of the weights that is checked on
load.  `best.json` repeats them beside the trainer's extras for people and
tools; on load its arch, config and version must equal the weights file's, so
a JSON edited or paired with other weights is refused, and the config the
model is built from is the one inside the weights file.  Every config value
is type- and range-checked (`model.configs.config_from_dict`) before any
tensor is read or any model built: a tampered ``input_size: 60000`` is a
clear refusal, not a worker killed for memory.  Headers and JSON are read
with size bounds.  Pickle-based files (.pt, .pth, .ckpt) are refused outright.

Training state for `--resume` (optimiser, schedule, AMP scaler, RNG, progress)
is kept the same way in `<stem>.train_state.safetensors` + `.json` beside the
model checkpoint, so a shipped model file never carries optimiser buffers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file

from model.configs import DetectorConfig, config_from_dict, config_to_dict
from model.detector import ARCHS, build_detector

FORMAT = "medtwin-detector"
TRAIN_STATE_FORMAT = "medtwin-detector-train-state"
FORMAT_VERSION = 1
VERSION_HEX_CHARS = 12
SUFFIX = ".safetensors"
MAX_JSON_BYTES = 4 << 20  # a checkpoint's JSON (config, extras, training history)
MAX_HEADER_BYTES = 16 << 20  # a safetensors header: tensor names, shapes, offsets and our metadata


class LoadedDetector(NamedTuple):
    """A detector rebuilt from a checkpoint, in eval mode on the requested device."""

    model: torch.nn.Module
    config: DetectorConfig
    arch: str
    version: str  # short hash of the weights
    extra: dict[str, Any] = {}  # whatever the trainer stored: epoch, metrics, data, ...


class TrainingState(NamedTuple):
    """What `load_training_state` restored into the optimiser etc., and what it hands back."""

    progress: dict[str, Any]  # JSON the trainer saved: epoch, step, best metric, history
    rng_states: dict[str, torch.Tensor]  # name -> RNG state tensor (e.g. "torch_cpu")


def save_detector(
    model: torch.nn.Module,
    config: DetectorConfig,
    arch: str,
    path: str | Path,
    *,
    extra: dict[str, Any] | None = None,
) -> str:
    """Writes `path` (.safetensors) and the JSON of the same stem; returns the weights' version.

    Both files are written to temporary names and renamed into place, so an
    interrupted save never leaves a half-written checkpoint behind.
    """
    path = _checkpoint_path(path)
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    version = weights_version(state)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "version": version,
        "weights_file": path.name,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "config": config_to_dict(config),
        "extra": extra or {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": FORMAT, "version": version, "arch": arch, "config": canonical_config(metadata["config"])}
    _atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=header))
    _write_json(path.with_suffix(".json"), metadata)
    return version


def load_detector(path: str | Path, *, device: str | torch.device = "cpu") -> LoadedDetector:
    """Rebuilds the detector saved by `save_detector` at `path` (the .safetensors file).

    Raises:
        ValueError: not a .safetensors file, no JSON beside it, a foreign
            format, a JSON whose arch, config or version differ from the
            weights file's, a config value of the wrong type or out of range
            (`model.configs.ConfigError`), weights whose hash differs from
            their version, or weights that do not fit the architecture.
    """
    path = _checkpoint_path(path)
    metadata = read_detector_metadata(path)
    check_against_weights_file(path, metadata)  # no tensor has been read yet
    config = config_from_dict(metadata["config"])
    arch = metadata["arch"]
    state = load_file(str(path), device="cpu")
    version = weights_version(state)
    if version != metadata["version"]:
        raise ValueError(f"{path}: weights hash to {version} but {path.with_suffix('.json').name} names "
                         f"{metadata['version']}; the JSON belongs to other weights")
    # The backbone's initial weights are inside the checkpoint: do not reload the original file.
    model = build_detector(dataclasses.replace(config, backbone_weights=None), arch=arch)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path}: weights do not fit a {arch} detector with config {config.name!r}: {error}") from error
    model.to(device).eval()
    return LoadedDetector(model=model, config=config, arch=arch, version=version, extra=metadata.get("extra", {}))


def weights_version(state: dict[str, torch.Tensor]) -> str:
    """A short SHA-256 of names, dtypes, shapes and bytes of a state dict, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:VERSION_HEX_CHARS]


def train_state_path(checkpoint_path: str | Path) -> Path:
    """Where the training state of the checkpoint at `checkpoint_path` lives."""
    path = _checkpoint_path(checkpoint_path)
    return path.with_name(f"{path.stem}.train_state{SUFFIX}")


def save_training_state(
    path: str | Path,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    progress: dict[str, Any],
    rng_states: dict[str, torch.Tensor],
) -> None:
    """Writes the optimiser's tensors and RNG states to `path`, the rest to its JSON."""
    path = _checkpoint_path(path)
    tensors, optimizer_json = _flatten_optimizer_state(optimizer.state_dict())
    tensors.update({f"rng.{name}": state.detach().cpu().contiguous() for name, state in rng_states.items()})
    metadata = {
        "format": TRAIN_STATE_FORMAT,
        "format_version": FORMAT_VERSION,
        "optimizer": optimizer_json,
        "scheduler": _scheduler_json(scheduler),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "progress": progress,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": TRAIN_STATE_FORMAT}))
    _write_json(path.with_suffix(".json"), metadata)


def load_training_state(
    path: str | Path,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
) -> TrainingState:
    """Restores optimiser, scheduler and scaler from `path`; returns progress and RNG states."""
    path = _checkpoint_path(path)
    metadata = _read_json(path.with_suffix(".json"), expected_format=TRAIN_STATE_FORMAT)
    tensors = load_file(str(path), device="cpu")
    optimizer.load_state_dict(_unflatten_optimizer_state(tensors, metadata["optimizer"]))
    scheduler.load_state_dict(metadata["scheduler"])
    if scaler is not None and metadata["scaler"]:
        scaler.load_state_dict(metadata["scaler"])
    rng_states = {name[len("rng."):]: tensor for name, tensor in tensors.items() if name.startswith("rng.")}
    return TrainingState(progress=metadata["progress"], rng_states=rng_states)


def _flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Splits an optimiser state dict into tensors ("optimizer.state.<param>.<name>") and JSON."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.state.{param_id}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer_state(tensors: dict[str, torch.Tensor], optimizer_json: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        if key.startswith("optimizer.state."):
            param_id, name = key[len("optimizer.state."):].split(".", 1)
            state.setdefault(int(param_id), {})[name] = tensor
    for param_id, values in optimizer_json["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": optimizer_json["param_groups"]}


def _scheduler_json(scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict:
    state = scheduler.state_dict()
    # LambdaLR keeps None for plain-function lambdas: their behaviour is code, rebuilt by the trainer.
    json.dumps(state, allow_nan=False)  # raises if anything is not plain JSON
    return state


def _checkpoint_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix != SUFFIX:
        raise ValueError(f"{path}: detector checkpoints are safetensors files ({SUFFIX}) with a .json beside "
                         "them; pickle-based files (.pt, .pth, .ckpt) are refused because loading them can run code")
    return path


def read_detector_metadata(path: str | Path) -> dict[str, Any]:
    """The checked JSON beside a detector checkpoint (config, arch, version), without reading the weights.

    The config must pass `config_from_dict`'s type and range checks (ConfigError, a ValueError,
    naming the field and its range).  This is what a launcher reads to build the job; the weights
    file's own copy is compared when the weights are loaded (`load_detector`).
    """
    path = _checkpoint_path(path)
    metadata = _read_json(path.with_suffix(".json"), expected_format=FORMAT)
    if metadata.get("arch") not in ARCHS:
        raise ValueError(f"{path}: unknown arch in its JSON; expected one of {ARCHS}")
    if not isinstance(metadata.get("config"), dict):
        raise ValueError(f"{path}: its JSON has no config object")
    config_from_dict(metadata["config"])  # before anything is built
    return metadata


def check_against_weights_file(path: Path, metadata: dict[str, Any]) -> None:
    """Refuses a JSON whose arch, version or config differ from the weights file's header metadata.

    Only the header is read.  Raises ValueError.
    """
    header = read_safetensors_metadata(path)
    if header.get("format") != FORMAT or "config" not in header:
        raise ValueError(f"{path}: the weights file does not carry its own format, version and config (another "
                         "tool or an older save_detector wrote it); the JSON belongs to other weights")
    for field in ("arch", "version"):
        if header.get(field) != metadata.get(field):
            raise ValueError(f"{path}: the {field} in {path.with_suffix('.json').name} differs from the one in "
                             "the weights file; the JSON was edited or belongs to other weights")
    if canonical_config(metadata["config"]) != header["config"]:
        raise ValueError(f"{path}: the config in {path.with_suffix('.json').name} differs from the one in the "
                         "weights file; the JSON was edited or belongs to other weights")
    try:
        config_from_dict(json.loads(header["config"]))
    except (json.JSONDecodeError, RecursionError):
        raise ValueError(f"{path}: the config in the weights file is not valid JSON") from None


def canonical_config(config: dict[str, Any]) -> str:
    """The one JSON spelling of a config dict (sorted keys, no spaces) that a weights file carries."""
    return json.dumps(_finite_or_none(config), sort_keys=True, separators=(",", ":"), allow_nan=False)


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, reading only its bounded header."""
    if not os.path.isfile(path):  # a FIFO or device is never opened
        raise ValueError(f"{path}: missing or not a regular file")
    try:
        with open(path, "rb") as file:
            prefix = file.read(8)
            if len(prefix) != 8:
                raise ValueError(f"{path}: too short for a safetensors file")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise ValueError(f"{path}: safetensors header of {length} bytes, over {MAX_HEADER_BYTES}")
            header = json.loads(file.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"{path}: unreadable safetensors header ({type(error).__name__})") from None
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: malformed safetensors header")
    return metadata


def _read_json(path: Path, *, expected_format: str) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path}: missing; a checkpoint's JSON (config, arch, version) must sit beside its weights")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ValueError(f"{path}: over {MAX_JSON_BYTES} bytes, too large for a checkpoint's JSON")
    try:
        metadata = json.loads(path.read_bytes()[:MAX_JSON_BYTES + 1])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"{path}: not valid JSON ({type(error).__name__})") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: a checkpoint's JSON is an object")
    if metadata.get("format") != expected_format:
        raise ValueError(f"{path}: not a {expected_format!r} JSON")
    format_version = metadata.get("format_version", 0)
    if not isinstance(format_version, int) or format_version > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version is newer than this code's {FORMAT_VERSION}")
    return metadata


def _write_json(path: Path, metadata: dict[str, Any]) -> None:
    text = json.dumps(_finite_or_none(metadata), indent=2, allow_nan=False) + "\n"
    _atomic_write(path, lambda tmp: tmp.write_text(text))


def _finite_or_none(value: Any) -> Any:
    """NaN and infinities become null: strict JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # safetensors creates files owner-only; checkpoints are meant to be shared
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
