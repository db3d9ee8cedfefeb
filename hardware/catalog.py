"""The shipped catalog of GPUs, interconnects and models, looked up by id or alias, or from a user's file."""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from hardware.errors import ServesimError, UnknownIdError, describe_validation_error
from hardware.files import parse_yaml, read_json, read_yaml
from hardware.specs import GPUSpec, InterconnectSpec, ModelSpec, Spec

S = TypeVar("S", bound=Spec)


def _build(cls: type[S], entry_id: str, fields: Any, source: str) -> S:
    if not isinstance(fields, dict):
        raise ServesimError(f"{source}: entry {entry_id!r} must be a mapping of fields, got {fields!r}")
    try:
        if cls is ModelSpec:
            return ModelSpec.from_hf_config(fields, entry_id)  # type: ignore[return-value]
        return cls.model_validate({"id": entry_id, **fields})
    except ValidationError as exc:
        raise ServesimError(describe_validation_error(exc, f"{source}: {entry_id}")) from None
    except ValueError as exc:
        raise ServesimError(f"{source}: {entry_id}: {exc}") from None


@cache
def _load(cls: type[S], filename: str) -> dict[str, S]:
    """Every entry of one shipped catalog file, keyed by id and by each alias."""
    text = resources.files("hardware").joinpath("catalog").joinpath(filename).read_text()
    entries = parse_yaml(text, filename) or {}
    table: dict[str, S] = {}
    for entry_id, fields in entries.items():
        spec = _build(cls, entry_id, {k: v for k, v in fields.items()}, filename)
        for key in (entry_id, *spec.aliases):
            if key in table:
                raise ServesimError(f"{filename}: id or alias {key!r} is used twice")
            table[key] = spec
    return table


def _ids(cls: type[S], filename: str) -> list[str]:
    return sorted({spec.id for spec in _load(cls, filename).values()})


def gpu_ids() -> list[str]:
    return _ids(GPUSpec, "gpus.yaml")


def interconnect_ids() -> list[str]:
    return _ids(InterconnectSpec, "interconnects.yaml")


def model_ids() -> list[str]:
    return _ids(ModelSpec, "models.yaml")


def _known_names(cls: type[S], filename: str) -> list[str]:
    return sorted(_load(cls, filename))


def _lookup(cls: type[S], filename: str, what: str, key: str) -> S:
    table = _load(cls, filename)
    spec = table.get(key.lower())
    if spec is None:
        raise UnknownIdError(what, key, _known_names(cls, filename))
    return spec


def _user_file(path: Path) -> Any:
    return read_json(path, "file") if path.suffix == ".json" else read_yaml(path, "file")


def get_gpu(key: str) -> GPUSpec:
    """A catalog GPU by id or alias, or a YAML file holding one GPU's fields (its stem is the id)."""
    path = Path(key)
    if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
        return _build(GPUSpec, path.stem, _user_file(path), str(path))
    return _lookup(GPUSpec, "gpus.yaml", "GPU", key)


def get_interconnect(key: str) -> InterconnectSpec:
    """A catalog interconnect by id or alias."""
    return _lookup(InterconnectSpec, "interconnects.yaml", "interconnect", key)


def get_model(key: str) -> ModelSpec:
    """A catalog model by id or alias, or a Hugging Face `config.json` (or YAML of the same fields)."""
    path = Path(key)
    if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
        stem = path.parent.name if path.stem == "config" else path.stem
        return _build(ModelSpec, stem, _user_file(path), str(path))
    return _lookup(ModelSpec, "models.yaml", "model", key)
