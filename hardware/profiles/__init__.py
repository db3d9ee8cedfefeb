"""Committed calibrated profiles (`<gpu-id>.json`, written by `calibrate/refit.sh`) and how a user names a
profile: a JSON file, `calibrated`, `datasheet`, or a catalog GPU id (`resolve_profile`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from hardware.errors import ServesimError, describe_validation_error
from hardware.files import read_json
from hardware.profile import DEFAULT_PROFILE, Profile


def load_profile(path: str | Path, field: str = "profile") -> Profile:
    """Read a profile JSON file; kinds it lacks fall back to the defaults."""
    p = Path(path)
    data = read_json(p, field)
    try:
        return Profile.model_validate(data).merged_over(DEFAULT_PROFILE)
    except ValidationError as exc:
        raise ServesimError(describe_validation_error(exc, str(p), Profile)) from None


PROFILES_DIR = Path(__file__).resolve().parent  # shipped with the package


def packaged_profile(gpu_id: str) -> Profile | None:
    """The calibrated profile committed for this GPU id (`hardware/profiles/<id>.json`), if any."""
    path = PROFILES_DIR / f"{gpu_id}.json"
    return load_profile(path) if path.is_file() else None


def resolve_profile(value: str | None, gpu_id: str, engine: str | None = None,
                    field: str = "profile") -> Profile | None:
    """A profile named by a user: None or "datasheet" give None (the documented defaults); "calibrated" the
    committed profile of `gpu_id` (an error if it has none); a path to a JSON file; or the id or alias of
    a catalog GPU with a committed profile (price one GPU with another's profile: the what-if rule).
    `engine`, named the same way, replaces the profile's engine section (host costs) with that profile's."""
    if engine is not None:
        own = resolve_profile(value, gpu_id) or DEFAULT_PROFILE
        return own.with_engine_of(resolve_profile(engine, gpu_id, field="engine") or DEFAULT_PROFILE)
    if value is None or value == "datasheet":
        return None
    if value == "calibrated":
        value = gpu_id
    if Path(value).suffix == ".json" or Path(value).exists():
        return load_profile(value, field)
    from hardware.catalog import get_gpu

    try:
        gid = get_gpu(value).id
    except ServesimError:
        raise ServesimError(f"{field}: {value!r} is neither a profile JSON file nor a catalog GPU id") from None
    found = packaged_profile(gid)
    if found is None:
        shipped = sorted(p.stem for p in PROFILES_DIR.glob("*.json"))
        raise ServesimError(f"{field}: no committed profile for GPU {gid!r}; committed: {', '.join(shipped) or 'none'}")
    return found
