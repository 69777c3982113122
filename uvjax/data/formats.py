"""Import conversation data (LLaVA/ShareGPT4V JSON, caption files, UnifiedVisual parquet) into
ArrayRecord shards: the command line.

    python -m uvjax.data.formats convert SOURCE... --format=llava|caption_generation|unifiedvisual \\
        --out_dir=DIR [--image_dir=DIR] [--prefix=data] [--stream=...] [--on_error=raise|skip] ...
    python -m uvjax.data.formats describe FILE.parquet... [--rows=3]

The importers are ``uvjax.data.importers`` (one module per format; the package docstring describes the
formats, the checks, the ambiguous-hour warning and the import manifest).
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Sequence

from uvjax.data.importers.captions import skip_paths
from uvjax.data.importers.common import summary_line
from uvjax.data.importers.convert import FORMATS, convert
from uvjax.data.importers.parquet_layout import describe
from uvjax.data.tasks import STREAMS

__all__ = ["main", "convert", "FormatError", "ImportStats", "iter_llava", "decode_image_bytes", "stream_for"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m uvjax.data.formats convert|describe ...``"""
    ap = argparse.ArgumentParser(prog="python -m uvjax.data.formats",
                                 description="Importers of real conversation data into Records, and "
                                             "shard conversion.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="import files and write ArrayRecord shards")
    c.add_argument("source", nargs="+")
    c.add_argument("--format", required=True, choices=FORMATS)
    c.add_argument("--out_dir", required=True)
    c.add_argument("--image_dir", default="")
    c.add_argument("--prefix", default="data")
    c.add_argument("--stream", default=None, choices=STREAMS)
    c.add_argument("--on_error", default="raise", choices=("raise", "skip"))
    c.add_argument("--load_pixels", action="store_true")
    c.add_argument("--seed", type=int, default=0, help="caption_generation phrasing seed")
    c.add_argument("--limit", type=int, default=None, help="caption_generation record limit")
    c.add_argument("--skip_paths", nargs="*", default=[], help="caption_generation: skip image "
                   "paths with these components (e.g. sam)")
    d = sub.add_parser("describe", help="print schema, layout and rows of parquet files")
    d.add_argument("paths", nargs="+")
    d.add_argument("--rows", type=int, default=3)
    a = ap.parse_args(argv)
    if a.cmd == "describe":
        for p in a.paths:
            describe(p, a.rows)
        return 0
    opts: dict[str, Any] = {"load_pixels": a.load_pixels}
    if a.format == "caption_generation":
        opts.update(seed=a.seed, limit=a.limit, skip=skip_paths(*a.skip_paths) if a.skip_paths else None)
    res = convert(a.source, a.out_dir, format=a.format, image_dir=a.image_dir, prefix=a.prefix,
                  stream=a.stream, on_error=a.on_error, **opts)
    print(json.dumps(res, indent=1))
    print(f"manifest: {res['manifest']}")
    print(f"import summary: {summary_line(res['counts'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
