"""UnifiedVisual-style parquet files: the documented layouts (:data:`LAYOUTS`), matching a file's schema
against them (:func:`detect_layout`, :func:`read_layout`), reading rows in batches (:func:`parquet_rows`)
and :func:`describe` (schema, detected layout and a few rows, for inspecting unverified data)."""
from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from uvjax.data.importers.common import FormatError

TURN_COLUMNS = ("conversations", "messages", "conversation")
ROLE_FIELDS = ("from", "role")
CONTENT_FIELDS = ("value", "content")
IMAGE_COLUMNS = ("images", "image")
PROMPT_COLUMNS = ("prompt", "question", "input", "instruction", "query")
RESPONSE_COLUMNS = ("response", "answer", "output", "solution")
ID_COLUMNS = ("id", "uid", "sample_id")
TASK_COLUMNS = ("task", "subset")

LAYOUTS = {
    "turns": "a list<struct<from|role: string, value|content: string>> column named "
             f"{'|'.join(TURN_COLUMNS)} with placeholders in the text, + optional image column",
    "typed_turns": "the same column with content: list<struct<type: string ('text'|'image'), "
                   "text: string>>; each 'image' item takes the next image of the image column",
    "prompt_response": f"string columns {'|'.join(PROMPT_COLUMNS)} and {'|'.join(RESPONSE_COLUMNS)} "
                       "with placeholders, + an image column (consumed prompt first) or separate "
                       "input_images/output_images columns",
}
IMAGE_COLUMN_DOC = (f"image column {'|'.join(IMAGE_COLUMNS)}: list of (or one) relative path string, "
                    "binary image bytes, or struct<bytes: binary, path: string> (HF Image)")


def _pa():
    return pa, pq


def _image_type_ok(t) -> bool:
    pa, _ = _pa()
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return True
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    if pa.types.is_struct(t):
        names = {t.field(i).name for i in range(t.num_fields)}
        return bool(names & {"bytes", "path"})
    return False


def _is_list(t) -> bool:
    pa, _ = _pa()
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _is_str(t) -> bool:
    pa, _ = _pa()
    return pa.types.is_string(t) or pa.types.is_large_string(t)


@dataclasses.dataclass(frozen=True)
class Layout:
    """A recognised parquet layout: ``name`` (a key of :data:`LAYOUTS`) and the physical column (or
    struct field) names it reads."""
    name: str
    turns: str = ""
    role_field: str = ""
    content_field: str = ""
    prompt: str = ""
    response: str = ""
    images: str = ""
    input_images: str = ""
    output_images: str = ""
    id: str = ""
    task: str = ""

    def columns(self) -> list[str]:
        return [c for c in (self.turns, self.prompt, self.response, self.images, self.input_images,
                            self.output_images, self.id, self.task) if c]


def _columns_text(schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


def detect_layout(schema, path: str = "parquet", column_map: dict[str, str] | None = None) -> Layout:
    """Matches a parquet schema against :data:`LAYOUTS`. ``column_map`` names columns explicitly
    (keys: turns, prompt, response, images, input_images, output_images, id, task). Unknown layouts
    raise a fatal :class:`FormatError` listing the columns found."""
    cm = dict(column_map or {})
    allowed = {f.name for f in dataclasses.fields(Layout)} - {"name"}
    if set(cm) - allowed:
        raise ValueError(f"column_map keys {sorted(set(cm) - allowed)} unknown; expected {sorted(allowed)}")
    names = set(schema.names)

    def pick(key: str, candidates: Sequence[str], ok) -> str:
        if key in cm:
            if cm[key] not in names:
                raise FormatError(path, f"column_map[{key!r}] = {cm[key]!r} is not a column; columns "
                                        f"found: {_columns_text(schema)}", "schema", fatal=True)
            return cm[key]
        for c in candidates:
            if c in names and ok(schema.field(c).type):
                return c
        return ""

    def image_col_ok(t) -> bool:
        return _image_type_ok(t) or (_is_list(t) and _image_type_ok(t.value_type))

    common = {
        "id": pick("id", ID_COLUMNS, lambda t: _is_str(t) or _pa()[0].types.is_integer(t)),
        "task": pick("task", TASK_COLUMNS, _is_str),
    }
    images = pick("images", IMAGE_COLUMNS, image_col_ok)
    turns = pick("turns", TURN_COLUMNS, lambda t: _is_list(t) and _pa()[0].types.is_struct(t.value_type))
    if turns:
        st = schema.field(turns).type.value_type
        fields = {st.field(i).name: st.field(i).type for i in range(st.num_fields)}
        role = cm.get("role_field") or next((f for f in ROLE_FIELDS if f in fields), "")
        content = cm.get("content_field") or next((f for f in CONTENT_FIELDS if f in fields), "")
        if role in fields and content in fields and _is_str(fields[role]):
            ct = fields[content]
            if _is_str(ct):
                return Layout("turns", turns=turns, role_field=role, content_field=content,
                              images=images, **common)
            if _is_list(ct) and _pa()[0].types.is_struct(ct.value_type):
                sub = {ct.value_type.field(i).name for i in range(ct.value_type.num_fields)}
                if {"type", "text"} <= sub:
                    return Layout("typed_turns", turns=turns, role_field=role, content_field=content,
                                  images=images, **common)
    prompt = pick("prompt", PROMPT_COLUMNS, _is_str)
    response = pick("response", RESPONSE_COLUMNS, _is_str)
    if prompt and response:
        inp = pick("input_images", ("input_images", "input_image"), image_col_ok)
        outp = pick("output_images", ("output_images", "output_image"), image_col_ok)
        if (inp or outp) and images:
            raise FormatError(path, f"both a shared image column {images!r} and input/output image "
                                    f"columns; columns found: {_columns_text(schema)}", "schema",
                              fatal=True)
        return Layout("prompt_response", prompt=prompt, response=response, images=images,
                      input_images=inp, output_images=outp, **common)
    layouts = "; ".join(f"{k}: {v}" for k, v in LAYOUTS.items())
    raise FormatError(path, f"unrecognised UnifiedVisual parquet layout. Columns found: "
                            f"{_columns_text(schema)}. Supported layouts: {layouts}; {IMAGE_COLUMN_DOC}. "
                            "Inspect rows with `python -m uvjax.data.formats describe FILE` and pass "
                            "column_map=... or add a layout", "unknown_layout", fatal=True)


def read_layout(path: str, column_map: dict[str, str] | None = None) -> Layout:
    """The layout of one parquet file, from its schema (``pyarrow.parquet.read_schema``)."""
    _, pq = _pa()
    try:
        schema = pq.read_schema(path)
    except (OSError, ValueError) as e:
        raise FormatError(path, f"cannot read a parquet schema ({e})", "io", fatal=True) from e
    return detect_layout(schema, path, column_map)


def parquet_rows(path: str, columns: list[str], batch_size: int) -> Iterator[dict]:
    """Rows as dicts, batch by batch; pyarrow read errors become fatal FormatErrors."""
    _, pq = _pa()
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns)
        for batch in batches:
            rows = batch.to_pylist()
            yield from rows
    except (OSError, ValueError) as e:
        if isinstance(e, FormatError):
            raise
        raise FormatError(path, f"cannot read parquet rows ({e})", "io", fatal=True) from e


def _short(v: Any, n: int = 160) -> Any:
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v)} bytes>"
    if isinstance(v, str):
        return v if len(v) <= n else v[:n] + f"...<{len(v)} chars>"
    if isinstance(v, list):
        return [_short(x, n) for x in v[:8]] + ([f"...<{len(v)} items>"] if len(v) > 8 else [])
    if isinstance(v, dict):
        return {k: _short(x, n) for k, x in v.items()}
    return v


def describe(path: str, rows: int = 3, out=None) -> str:
    """Prints (to ``out``, default stdout) and returns: the schema, the detected layout (or why none
    matched) and the first ``rows`` rows with long values shortened. For inspecting unverified data."""
    _, pq = _pa()
    pf = pq.ParquetFile(path)
    lines = [f"{path}: {pf.metadata.num_rows} rows, {pf.metadata.num_row_groups} row groups",
             "columns:"] + [f"  {f.name}: {f.type}" for f in pf.schema_arrow]
    try:
        lines.append(f"layout: {detect_layout(pf.schema_arrow, path)}")
    except FormatError as e:
        lines.append(f"layout: none ({e})")
    shown = 0
    for batch in pf.iter_batches(batch_size=max(1, rows)):
        for row in batch.to_pylist():
            if shown >= rows:
                break
            lines.append(f"row {shown}: {json.dumps(_short(row), ensure_ascii=False, default=str)}")
            shown += 1
        if shown >= rows:
            break
    text = "\n".join(lines)
    print(text, file=out or sys.stdout)
    return text
