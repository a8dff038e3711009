"""Strict JSON for the config files pelthub reads: pelthub.json and PEFT's adapter_config.json.

Python's json module accepts what no JSON writer of ours emits and what would turn into
wrong numbers or raw exceptions further in: `NaN` / `Infinity` and overflowing literals
such as `1e309` (a NaN alpha gives finite but wrong logits), integers of thousands of digits (ValueError from int()), nesting
deep enough to exhaust the stack (RecursionError). `loads` refuses each with the error
type the caller names, so every reader fails the same way with a message naming the file.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from ..errors import PeltError

MAX_DEPTH = 64  # nesting of a pelthub.json is under 12 (composition blocks inside blocks); 64 leaves room


class _Refused(Exception):
    """Raised inside the parser, turned into the caller's error type with the file named."""


def _no_constant(name: str) -> NoReturn:
    raise _Refused(f"it holds {name}, which is not a JSON number; write finite numbers")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _Refused(f"it holds {text}, which is beyond the float range; write finite numbers")
    return value


def loads(text: str | bytes, where: str, error: type[PeltError]) -> Any:
    """Parse `text` (the contents of `where`), raising `error` naming `where` for anything but plain JSON."""
    try:
        data = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except _Refused as e:
        raise error(f"{where} is refused: {e}") from None
    except RecursionError:
        raise error(f"{where} is nested too deeply to read (at most {MAX_DEPTH} levels)") from None
    except UnicodeDecodeError as e:
        raise error(f"{where} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise error(f"{where} is not valid JSON: {e}") from None
    except ValueError:  # int() refusing a literal of thousands of digits
        raise error(f"{where} holds an integer of more than {sys.get_int_max_str_digits():,} digits; no field of "
                    "a config needs one") from None
    _check_depth(data, where, error)
    return data


def read(path: Path, error: type[PeltError], max_bytes: int) -> Any:
    """The JSON in file `path`, at most `max_bytes` long (checked before reading)."""
    size = path.stat().st_size
    if size > max_bytes:
        raise error(f"{path} is {size:,} bytes; at most {max_bytes:,} are read, so it was not")
    return loads(path.read_bytes(), str(path), error)


def _check_depth(data: Any, where: str, error: type[PeltError]) -> None:
    """Refuse nesting over MAX_DEPTH, walked without recursion (what reads the data next may recurse)."""
    level = [data]
    for _ in range(MAX_DEPTH + 1):
        level = [v for x in level if isinstance(x, (dict, list)) for v in (x.values() if isinstance(x, dict) else x)]
        if not level:
            return
    raise error(f"{where} is nested more than {MAX_DEPTH} levels deep; a pelthub or PEFT config is not")
