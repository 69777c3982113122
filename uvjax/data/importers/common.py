"""What every importer shares: the data error (:class:`FormatError`), the bounds on untrusted input
(:class:`Limits`), the import counters (:class:`ImportStats`) and the ambiguous-hour warning (see the
package docstring)."""
from __future__ import annotations

import collections
import dataclasses
import logging
import re
from typing import Any

from uvjax.data.records import Record

log = logging.getLogger(__name__)

ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
              "system": "system"}
EXPLICIT_TASK = "task"  # attributes key of a task given by the data (LLaVA ``task`` key, parquet column)


class FormatError(ValueError):
    """A data error: ``reason`` is the counter key under ``on_error="skip"``; ``fatal`` errors
    (file-level) are raised even then."""

    def __init__(self, where: str, message: str, reason: str, fatal: bool = False):
        super().__init__(f"{where}: {message}")
        self.where, self.reason, self.fatal = where, reason, fatal


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds on untrusted input, so one bad file cannot exhaust memory. A JSON list file is held
    in memory whole (split it into JSON Lines above ``max_file_bytes``)."""
    max_file_bytes: int = 4 << 30
    max_record_bytes: int = 16 << 20      # one JSON Lines line / one item of a JSON list
    max_text_chars: int = 1 << 20         # one turn's text
    max_turns: int = 1024
    max_images: int = 64                  # per record
    max_image_bytes: int = 64 << 20       # embedded (parquet) image bytes
    max_image_pixels: int = 1 << 26


DEFAULT_LIMITS = Limits()


HOUR_AMBIGUOUS = "hour_00_12_ambiguous"   # ImportStats.warnings key, see the package docstring
_AMBIGUOUS_HOUR = re.compile(r"(?:00|12):[0-5]\d(?::[0-5]\d)?")


class ImportStats:
    """Counts of an import: ``read`` items, ``kept`` records, ``skipped`` per reason, ``warnings``
    per kind (kept records that are suspicious, e.g. :data:`HOUR_AMBIGUOUS`), and the first few skip
    messages (so a person can find the bad records)."""

    def __init__(self, keep_messages: int = 20):
        self.read = 0
        self.kept = 0
        self.skipped: collections.Counter[str] = collections.Counter()
        self.warnings: collections.Counter[str] = collections.Counter()
        self.messages: list[str] = []
        self._keep = keep_messages

    def handle(self, err: FormatError, on_error: str) -> None:
        if on_error == "raise" or err.fatal:
            raise err
        self.skipped[err.reason] += 1
        if len(self.messages) < self._keep:
            self.messages.append(str(err))
            log.warning("skipping: %s", err)

    def absorb_reading(self, inner: "ImportStats") -> None:
        """Adds what ``inner`` counted while reading (read, skipped, warnings, messages), not its
        ``kept``: for a conversion stage that counts its own output."""
        self.read += inner.read
        self.skipped.update(inner.skipped)
        self.warnings.update(inner.warnings)
        self.messages.extend(inner.messages[:max(0, self._keep - len(self.messages))])

    def as_dict(self) -> dict[str, Any]:
        return {"read": self.read, "kept": self.kept, "skipped": dict(self.skipped),
                "skipped_total": sum(self.skipped.values()), "warnings": dict(self.warnings),
                "messages": list(self.messages)}

    def summary(self) -> str:
        return summary_line(self.as_dict())


def summary_line(counts: dict[str, Any]) -> str:
    """One human line from :meth:`ImportStats.as_dict`: read / kept / skipped per reason / warnings."""
    def per(d: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"
    skipped = counts.get("skipped") or {}
    total = counts.get("skipped_total", sum(skipped.values()))
    warnings = per(counts.get("warnings") or {})
    return (f"read {counts.get('read', 0)}, kept {counts.get('kept', 0)}, skipped {total}"
            + (f" ({per(skipped)})" if skipped else "") + f"; warnings: {warnings}")


def count_kept(stats: ImportStats, rec: Record) -> int:
    """Counts a kept record (and its ambiguous hour answers, returned for the per-file warning)."""
    stats.kept += 1
    n = ambiguous_hour_answers(rec)
    if n:
        stats.warnings[HOUR_AMBIGUOUS] += n
    return n


def ambiguous_hour_answers(record: Record) -> int:
    """How many assistant text answers of ``record`` are exactly a time whose hour is 00 or 12
    (``HH:MM`` or ``HH:MM:SS`` after stripping), which the 12-hour dial cannot tell apart."""
    return sum(1 for s in record.segments if s.role == "assistant" and s.kind == "text"
               and _AMBIGUOUS_HOUR.fullmatch((s.text or "").strip()))


def warn_ambiguous_hours(path: str, n: int) -> None:
    if n:
        log.warning("%s: %d assistant answer(s) are a time with hour 00 or 12 (e.g. '12:15:00'); "
                    "these labels are ambiguous: hour 0 and hour 12 draw the same hands, so the "
                    "reference data's 00 vs 12 cannot be learnt from the image. Records are kept "
                    "unchanged and counted as %r; uvjax's evaluation should treat the two hours as "
                    "equal (evaluation.metrics' tolerant/coarse/hour time scores compare hours "
                    "modulo 12; its strict string match does not)", path, n, HOUR_AMBIGUOUS)


def check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
