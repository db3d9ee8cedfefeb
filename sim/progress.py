"""Progress bars for long commands (tqdm: a text bar on a terminal, a widget in Jupyter where ipywidgets is
installed, else text), shown only where someone watches: a terminal, or a notebook that asks for one."""

from __future__ import annotations

import sys
import warnings
from typing import Any


def watched() -> bool:
    """Whether stderr is a terminal or this runs in a Jupyter kernel."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def bar(total: int, desc: str, unit: str, enabled: bool) -> Any:
    """A progress bar (disabled: every call is a no-op) refreshed at most twice a second."""
    with warnings.catch_warnings():  # tqdm.auto warns when a notebook lacks ipywidgets, then prints text
        warnings.simplefilter("ignore")
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, mininterval=0.5, file=sys.stderr,
                    dynamic_ncols=True)
