"""Numbered rotations: `app.log` is written, its older copies are `app.log.1` ... `app.log.N`.

The scheme of dockerd's json-file driver (`max-size` / `max-file`), of Python's
RotatingFileHandler and of logrotate without `dateext`: on rotation `.N-1` becomes `.N`,
..., the written file becomes `.1` and a new empty file takes its name; the oldest copy
beyond the configured count is deleted. So the number is the age: the higher, the older.
With compression (dockerd's `compress=true`, logrotate's `compress`) a copy becomes
`app.log.N.gz` once it is rotated away.

Pure: `parse` and `order` work on names; `RotatedCopies.list` is the one directory read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def parse(base: str, name: str) -> tuple[int, bool] | None:
    """(number, compressed) when `name` is a numbered copy of `base`, else None.

    `base` and `name` are file names without folders: parse("a.log", "a.log.3") is
    (3, False), parse("a.log", "a.log.2.gz") is (2, True), parse("a.log", "a.log") None.
    """
    if not name.startswith(base + "."):
        return None
    suffix = name[len(base) + 1 :]
    compressed = suffix.endswith(".gz")
    if compressed:
        suffix = suffix[:-3]
    if not suffix.isdigit() or suffix.startswith("0") or not suffix.isascii():
        return None
    return int(suffix), compressed


def chain_of(path: str) -> str:
    """The written file a path belongs to: `app.log.3` -> `app.log`; else the path itself."""
    head, dot, suffix = path.rpartition(".")
    if dot and suffix.isdigit() and suffix.isascii() and not suffix.startswith("0"):
        return head
    return path


@dataclass(frozen=True, slots=True)
class RotatedCopies:
    """The rotated copies of one written file that exist now."""

    plain: list[str] = field(default_factory=list)  # oldest first (highest number first)
    compressed: list[str] = field(default_factory=list)


def list_copies(path: str) -> RotatedCopies:
    """The numbered copies of `path` in its folder (one directory listing).

    A missing or unreadable folder has none: the caller finds that out when it opens
    the written file itself.
    """
    folder, base = os.path.split(path)
    plain: list[tuple[int, str]] = []
    compressed: list[tuple[int, str]] = []
    try:
        with os.scandir(folder or ".") as entries:
            for entry in entries:
                parsed = parse(base, entry.name)
                if parsed is not None:
                    number, gz = parsed
                    (compressed if gz else plain).append((number, os.path.join(folder, entry.name)))
    except OSError:
        return RotatedCopies()
    plain.sort(reverse=True)
    compressed.sort(reverse=True)
    return RotatedCopies([p for _, p in plain], [p for _, p in compressed])
