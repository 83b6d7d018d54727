"""The status summary: the last status record, in a world-readable file, for `tierswap status`
when the control socket cannot be used (a user who is not root, or a supervisor that does not
answer in time).

Where: next to the run directory, not in it (`Layout.summary_file`: /run/tierswap.status.json
for run_dir /run/tierswap). The run directory is 0700 on purpose (the unit's
RuntimeDirectoryMode, and tierswap's own make_private_dir): its control socket, state and log
are root's alone, so nothing inside it can be read by anyone else, whatever the file's mode.

What: the status record of `tierswap status --json` (counts, sizes, states, device names, tier
names and file paths, remote target URLs: what the node_exporter textfile already shows to
anyone), with the supervisor's pid and start time and the time it was written. Never page
content, keys or secrets: the record has none.

When: the supervisor rewrites it on each status round (`[metrics] interval`, 15 s by default),
atomically (a temporary name, then rename), and removes it when it stops; `down --force`
removes one a crash left. A reader checks that the supervisor named in it still runs, so a
stale file is never shown as live.

Limits: as fresh as the last round (its age is shown); only a root-owned file that nobody else
can write is believed. A user who cannot read the config (it may hold secrets: /etc/tierswap
is 0700) gets the summary of the default run_dir, DEFAULT_FILE; for an instance with another
run_dir, pass a readable --config.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

from tierswap.procs import ProcessId

log = logging.getLogger("tierswap.summary")

VERSION = 1
# The summary of the default run_dir (/run/tierswap): what a user who is not root reads when
# the config itself is root's alone (/etc/tierswap is 0700) and its run_dir cannot be known.
DEFAULT_FILE = Path("/run/tierswap.status.json")
MAX_BYTES = 4 << 20  # a summary larger than this is not ours

_last_error: str | None = None  # a lasting failure is logged once


def write(path: Path, status: dict[str, Any], ident: ProcessId) -> bool:
    """Replace `path` with the summary (mode 0644 whatever the umask); False and a log line
    (once per distinct error) on failure: never worth stopping swap for."""
    global _last_error
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    doc = {"version": VERSION, "written": time.time(), "supervisor": ident.record(),
           "status": status}
    try:
        text = json.dumps(doc, separators=(",", ":"))
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # ours from an earlier round cut short (O_EXCL below)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o644)
        with open(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(text)
        os.replace(tmp, path)
    except (OSError, TypeError, ValueError) as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        msg = f"{path}: {e.strerror if isinstance(e, OSError) and e.strerror else e}"
        if msg != _last_error:
            log.warning("status summary not written: %s", msg)
            _last_error = msg
        return False
    _last_error = None
    return True


def remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


class SummaryError(Exception):
    """Why there is no summary to show (one line)."""


def read(path: Path) -> tuple[dict[str, Any], float]:
    """(status record, age in seconds) from `path`; SummaryError when there is none, it is not
    root's, or the supervisor that wrote it no longer runs."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise SummaryError(f"no status summary ({path})") from None
    except OSError as e:
        raise SummaryError(f"{path}: {e.strerror or e}") from None
    with open(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
            raise SummaryError(f"{path}: not root's own file: ignored")
        raw = f.read(MAX_BYTES + 1)
    try:
        doc = json.loads(raw) if len(raw) <= MAX_BYTES else None
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("version") != VERSION or not isinstance(
            doc.get("status"), dict) or not isinstance(doc.get("written"), int | float):
        raise SummaryError(f"{path}: not a status summary of this version")
    ident = ProcessId.from_record(doc.get("supervisor"))
    if ident is None or ProcessId.of(ident.pid) != ident:
        raise SummaryError(f"tierswap is not running (stale summary {path})")
    return doc["status"], max(0.0, time.time() - doc["written"])
