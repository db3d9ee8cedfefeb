"""Readers of real request traces: the Azure LLM inference trace (CSV) and Mooncake's JSONL.

Both return a `TraceData` whose times start at zero (the trace's first row). A malformed row raises an
error naming the file and line, unless `on_bad_row="skip"`, which skips it and counts it.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, TextIO

import numpy as np
import pandas as pd

from hardware.errors import ServesimError

BadRow = Literal["error", "skip"]
MAX_HASH_ID = 1 << 26  # prefix-cache keys keep 26 bits for a trace's block id
MAX_TOKENS = 1 << 31  # longest prompt or output a trace or generator may give


@dataclass(frozen=True)
class TraceData:
    """Requests of a trace in time order: arrival (s from the first row), prompt and output tokens."""

    path: str
    time_s: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    hash_ids: tuple[tuple[int, ...], ...] | None  # Mooncake: ids of 512-token prompt blocks
    skipped_rows: int

    def __len__(self) -> int:
        return self.time_s.size


def _positive_int(value: object, field: str) -> int:
    n = int(value)  # type: ignore[call-overload]
    if n < 1 or n > MAX_TOKENS or float(value) != n:  # type: ignore[arg-type]
        raise ValueError(f"{field} must be an integer in [1, {MAX_TOKENS}], got {value!r}")
    return n


def _finish(path: Path, times: list[float] | np.ndarray, prompt: list[int] | np.ndarray,
            output: list[int] | np.ndarray, hashes: list[tuple[int, ...]] | None, skipped: int) -> TraceData:
    if not len(times):
        raise ServesimError(f"{path}: no valid rows")
    t = np.asarray(times, dtype=np.float64)
    order = np.argsort(t, kind="stable")  # some traces are not sorted; keep file order on ties
    t = t[order] - t[order[0]]
    return TraceData(
        path=str(path),
        time_s=t,
        prompt=np.asarray(prompt, dtype=np.int64)[order],
        output=np.asarray(output, dtype=np.int64)[order],
        hash_ids=None if hashes is None else tuple(hashes[i] for i in order),
        skipped_rows=skipped,
    )


def _open(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise ServesimError(f"trace: no such file {str(p)!r}")
    return p


def _text(p: Path) -> TextIO:
    """The trace as text: UTF-8 (a byte-order mark dropped); bytes that are not UTF-8 kept as surrogates, so
    that their row is a bad row (`_utf8`) rather than the whole file unreadable."""
    return p.open(newline="", encoding="utf-8-sig", errors="surrogateescape")


def _utf8(text: str) -> str:
    if text.isascii():  # (the common case, checked in C)
        return text
    if any("\udc80" <= ch <= "\udcff" for ch in text):
        raise ValueError("not UTF-8 text")
    return text


AZURE_HEADER = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
# naive ISO 8601 as the Azure traces write it, years 1970-2199 (nanoseconds since 1970 fit 64 bits)
_ISO_TIME = r"(?:19[7-9]\d|2[01]\d\d)-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?"
_TOKENS = r"[0-9]{1,10}"


def _azure_at_once(p: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The Azure trace read whole by pandas' C parser (`bench/speed.py --reader`: 100k rows in 0.21 s, against
    0.55 s row by row): arrival seconds since the epoch and both token counts, the values `read_azure`'s rows
    give (timestamps truncated to the microsecond, as `datetime.fromisoformat`). None where any row is not of
    the plain form (naive timestamp, digits only): the row-by-row reader then reads the file, with its checks
    and errors."""
    try:
        # (no header row: with one, pandas would take a first field more in every row for an index)
        df = pd.read_csv(p, header=None, dtype=str, na_filter=False, encoding="utf-8-sig")
        if df.shape[1] != 3 or df.iloc[0].tolist() != AZURE_HEADER or len(df) < 2:
            return None
        stamp, prompt, output = (df[c].iloc[1:] for c in range(3))
        if not (stamp.str.fullmatch(_ISO_TIME).all() and prompt.str.fullmatch(_TOKENS).all()
                and output.str.fullmatch(_TOKENS).all()):
            return None
        ns = pd.to_datetime(stamp, format="ISO8601").to_numpy().astype("datetime64[ns]").astype(np.int64)
    except (ValueError, UnicodeError, OverflowError, pd.errors.ParserError):
        return None
    counts = [c.to_numpy().astype(np.int64) for c in (prompt, output)]
    if any(((c < 1) | (c > MAX_TOKENS)).any() for c in counts):
        return None
    return (ns // 1000) / 1e6, counts[0], counts[1]  # (integer microseconds over 1e6: `datetime.timestamp`)


def read_azure(path: str | Path, on_bad_row: BadRow = "error") -> TraceData:
    """Azure LLM inference trace 2023 (`TIMESTAMP,ContextTokens,GeneratedTokens`; Patel et al., Splitwise)."""
    p = _open(path)
    whole = _azure_at_once(p)
    return _azure_by_rows(p, on_bad_row) if whole is None else _finish(p, *whole, None, 0)


def _azure_by_rows(p: Path, on_bad_row: BadRow) -> TraceData:
    """The Azure trace row by row, each row checked: a bad row stops the read with its line, or is skipped."""
    times: list[float] = []
    prompt: list[int] = []
    output: list[int] = []
    skipped = 0
    with _text(p) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != AZURE_HEADER:
            raise ServesimError(f"{p}:1: header must be {','.join(AZURE_HEADER)}, got {header}")
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):  # blank lines (a trailing newline or two)
                continue
            try:
                _utf8(",".join(row))
                if len(row) != 3:
                    raise ValueError(f"expected 3 fields, got {len(row)}")
                t = datetime.fromisoformat(row[0].strip()).replace(tzinfo=timezone.utc).timestamp()
                pr, out = _positive_int(row[1], "ContextTokens"), _positive_int(row[2], "GeneratedTokens")
            except ValueError as exc:
                if on_bad_row == "skip":
                    skipped += 1
                    continue
                raise ServesimError(f"{p}:{line}: bad row {','.join(row)!r}: {exc}") from None
            times.append(t)
            prompt.append(pr)
            output.append(out)
    return _finish(p, times, prompt, output, None, skipped)


def read_mooncake(path: str | Path, on_bad_row: BadRow = "error") -> TraceData:
    """Mooncake FAST'25 JSONL (`timestamp` ms, `input_length`, `output_length`, `hash_ids`; Qin et al.)."""
    p = _open(path)
    times: list[float] = []
    prompt: list[int] = []
    output: list[int] = []
    hashes: list[tuple[int, ...]] = []
    skipped = 0
    with _text(p) as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(_utf8(text))
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
                t = float(row["timestamp"]) / 1000.0
                if not math.isfinite(t):
                    raise ValueError(f"timestamp must be a finite number of ms, got {row['timestamp']!r}")
                pr = _positive_int(row["input_length"], "input_length")
                out = _positive_int(row["output_length"], "output_length")
                ids = tuple(int(h) for h in row.get("hash_ids", ()))
                if any(not 0 <= h < MAX_HASH_ID for h in ids):
                    raise ValueError(f"hash_ids must be integers in [0, {MAX_HASH_ID})")
            except (ValueError, KeyError, TypeError, OverflowError) as exc:
                if on_bad_row == "skip":
                    skipped += 1
                    continue
                what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
                raise ServesimError(f"{p}:{line}: bad row: {what}") from None
            times.append(t)
            prompt.append(pr)
            output.append(out)
            hashes.append(ids)
    return _finish(p, times, prompt, output, hashes, skipped)


READERS = {"azure": read_azure, "mooncake": read_mooncake}


def read_trace(path: str | Path, format: str | None = None, on_bad_row: BadRow = "error") -> TraceData:
    """Read a trace; the format defaults from the suffix (.csv: azure, .jsonl: mooncake)."""
    fmt = format or {".csv": "azure", ".jsonl": "mooncake"}.get(Path(path).suffix)
    if fmt not in READERS:
        raise ServesimError(f"trace.format = {fmt!r} for {path}: allowed: {', '.join(READERS)}")
    return READERS[fmt](path, on_bad_row)
