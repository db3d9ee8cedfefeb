"""Reading users' files in one place: a missing path, bytes that are not UTF-8 (a leading byte-order mark is
dropped) and YAML or JSON syntax errors become one `ServesimError` line naming the file, with the line and
column where the parser knows them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from hardware.errors import ServesimError


def read_text(path: str | Path, what: str) -> str:
    """The text of a user's file (`what`: its kind, for the message)."""
    p = Path(path)
    if not p.is_file():
        raise ServesimError(f"{what}: no such file {str(p)!r}")
    data = p.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ServesimError(f"{p}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
                            ) from None


def parse_yaml(text: str, source: str) -> Any:
    """YAML from a user (`source`: the file or option it came from)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ServesimError(f"{source}{where}: not valid YAML: {problem}") from None


def read_yaml(path: str | Path, what: str) -> Any:
    return parse_yaml(read_text(path, what), str(path))


def read_json(path: str | Path, what: str) -> Any:
    """JSON from a user's file (NaN and Infinity pass here: the schema that reads the values refuses them where
    they have no meaning)."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ServesimError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from None


def read_table(path: str | Path, numeric: tuple[str, ...] = (), what: str = "table") -> Any:
    """A user's CSV file as a pandas DataFrame, the `numeric` columns present and numbers in every row."""
    import io

    import pandas as pd

    text = read_text(path, what)
    try:
        df = pd.read_csv(io.StringIO(text))
    except pd.errors.EmptyDataError:
        raise ServesimError(f"{path}: empty CSV (no header)") from None
    except pd.errors.ParserError as exc:
        raise ServesimError(f"{path}: not valid CSV: {str(exc).strip().splitlines()[-1]}") from None
    return numeric_columns(df, path, numeric)


def numeric_columns(df: Any, path: str | Path, numeric: tuple[str, ...]) -> Any:
    """`df` (read from `path`) with its `numeric` columns present and a finite number in every row."""
    import pandas as pd

    missing = [c for c in numeric if c not in df.columns]
    if missing:
        raise ServesimError(f"{path}: missing column(s) {missing}")
    for c in numeric:
        values = pd.to_numeric(df[c], errors="coerce")
        bad = values.isna() & df[c].notna() | ~np.isfinite(values.fillna(0.0))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise ServesimError(f"{path}:{row + 2}: {c} = {df[c].iloc[row]!r}: not a finite number")
        df[c] = values
    return df


def check_out_dir(path: str | Path | None, flag: str = "--out") -> None:
    """Refuse, before any work, an output folder that is a file or lies under one."""
    if path is None:
        return
    p = Path(path)
    for q in (p, *p.parents):
        if q.exists() and not q.is_dir():
            raise ServesimError(f"{flag} = {str(p)!r}: {str(q)!r} is a file, not a folder")
