"""A bounded reader of JSON list / JSON Lines data files: items one at a time, each error naming its
record index. A JSON list file is held in memory whole (``Limits.max_file_bytes``); JSON Lines stream
with bounded memory (``Limits.max_record_bytes`` per line)."""
from __future__ import annotations

import json
import os
from typing import Any, Iterator

from uvjax.data.importers.common import DEFAULT_LIMITS, FormatError, Limits


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _json_error(where: str, e: Exception, fatal: bool) -> FormatError:
    if isinstance(e, json.JSONDecodeError):
        msg = f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}"
    elif isinstance(e, RecursionError):
        msg = "malformed JSON: nesting too deep"
    else:
        msg = f"malformed JSON: {e}"
    return FormatError(where, msg + "; expected one JSON object per record", "malformed_json", fatal)


def iter_json_items(path: str, limits: Limits = DEFAULT_LIMITS) -> Iterator[tuple[int, Any]]:
    """(index, parsed item or FormatError) of a JSON list or JSON Lines file. List items are
    decoded one at a time, so a syntax error names its record index; a broken JSON list is fatal
    (later records cannot be located), a broken JSON Lines line only costs that record."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise FormatError(path, f"cannot read data file ({e})", "io", fatal=True) from e
    if size > limits.max_file_bytes:
        raise FormatError(path, f"file of {size} bytes exceeds max_file_bytes={limits.max_file_bytes}; "
                                "split it (JSON Lines streams with bounded memory) or raise the "
                                "limit", "oversized", fatal=True)
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:].lstrip()
    if head[:1] == b"[" and not path.endswith(".jsonl"):
        yield from _iter_json_list(path, limits)
    else:
        yield from _iter_json_lines(path, limits)


def _iter_json_list(path: str, limits: Limits) -> Iterator[tuple[int, Any]]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except (UnicodeDecodeError, OSError) as e:
        raise FormatError(path, f"cannot read as UTF-8 JSON ({e})", "malformed_json", fatal=True) from e
    dec = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if not text.startswith("[", pos):
        raise FormatError(path, "expected a JSON list of records", "malformed_json", fatal=True)
    pos = _skip_ws(text, pos + 1)
    if text.startswith("]", pos):
        pos = _skip_ws(text, pos + 1)
        if pos != len(text):
            raise FormatError(path, "extra data after the JSON list", "malformed_json", fatal=True)
        return
    i = 0
    while True:
        where = f"{path} record {i}"
        try:
            item, end = dec.raw_decode(text, pos)
        except (ValueError, RecursionError) as e:
            raise _json_error(where, e, fatal=True) from e
        if end - pos > limits.max_record_bytes:
            yield i, FormatError(where, f"record of {end - pos} characters exceeds max_record_bytes="
                                        f"{limits.max_record_bytes}", "oversized")
        else:
            yield i, item
        i += 1
        pos = _skip_ws(text, end)
        if text.startswith(",", pos):
            pos = _skip_ws(text, pos + 1)
            if text.startswith("]", pos):
                raise FormatError(f"{path} record {i}", "malformed JSON: trailing comma before ']'",
                                  "malformed_json", fatal=True)
            continue
        if text.startswith("]", pos):
            if _skip_ws(text, pos + 1) != len(text):
                raise FormatError(path, "extra data after the JSON list", "malformed_json", fatal=True)
            return
        raise FormatError(f"{path} record {i - 1}", "malformed JSON: expected ',' or ']' after the "
                                                    "record", "malformed_json", fatal=True)


def _iter_json_lines(path: str, limits: Limits) -> Iterator[tuple[int, Any]]:
    cap = limits.max_record_bytes
    with open(path, "rb") as f:
        i = 0
        first = True
        while True:
            line = f.readline(cap + 1)
            if not line:
                return
            oversized = len(line) > cap
            if oversized:  # consume the rest of the line in bounded chunks
                while line and not line.endswith(b"\n"):
                    line = f.readline(cap + 1)
            if first:
                first = False
                if not oversized and line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]
            if not oversized and not line.strip():
                continue
            where = f"{path} record {i}"
            if oversized:
                yield i, FormatError(where, f"line longer than max_record_bytes={cap}", "oversized")
            else:
                try:
                    yield i, json.loads(line.decode("utf-8"))
                except (ValueError, RecursionError) as e:
                    yield i, _json_error(where, e, fatal=False)
            i += 1
