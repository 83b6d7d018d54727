"""Combining shard reports into one view, and rendering it for people.

Shards report raw counters; the supervisor adds them up here, so `status --json`, the table,
systemd's STATUS= line and the Prometheus metrics all come from one record. Each shard's row
also keeps that shard's own numbers, so every device row of the table shows its own.

The tables follow swapon/zramctl (see "tables" below). Limits: a shard that did not answer
has no numbers of its own (shown "-"), only what /proc/swaps says of its device; the tables
render records of older supervisors (rows without those numbers) the same way, never raise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tierswap import logs, system
from tierswap.commands import ShardReply
from tierswap.config import PAGE_SIZE, Config, format_size

_SUM_TIER = ("pages", "zero_pages", "stored_bytes", "capacity_bytes", "available_bytes",
             "free_bytes", "segments", "free_segments", "free_extents")


# Extras that describe the tier, not a shard's share of it: never summed.
_SAME = {"file_allocated_bytes", "replicas", "path"}
# Per-target numbers of the remote tier that add up over shards (each has its own region).
_SUM_TARGET = ("errors", "reconnects", "resync_pending", "rebuild_backlog", "fragments",
               "bytes", "slots", "free_slots")


def combine_extra(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Add up shard extras: counters are summed, per-target lists merged by URL (a target is
    up only if every shard reaches it), descriptive values kept as they are."""
    extra: dict[str, Any] = {}
    for p in parts:
        for k, v in p.items():
            if k == "targets":
                merged = {t["url"]: dict(t) for t in extra.get("targets", [])}
                for t in v:
                    m = merged.setdefault(t["url"], {
                        **t, **{c: 0 for c in _SUM_TARGET if c in t}, "up": True})
                    m["up"] = m["up"] and t["up"]
                    for c in _SUM_TARGET:
                        if c in t:
                            m[c] = m.get(c, 0) + t[c]
                extra["targets"] = list(merged.values())
            elif isinstance(v, int | float) and not isinstance(v, bool) and k not in _SAME:
                extra[k] = extra.get(k, 0) + v
            else:
                extra[k] = v
    return extra


_SHARD_KEYS = ("stored_pages", "stored_bytes", "zero_pages", "metadata_bytes", "runs", "reads",
               "writes", "discards", "read_errors", "write_errors", "enospc")


# a shard's own numbers, kept on its row of the status record (besides being summed)
_ROW_KEYS = ("stored_pages", "zero_pages", "stored_bytes", "metadata_bytes", "runs")
# counters of the native lane (tierswap.lane.LaneStatistics): summed when shards report them
_LANE_KEYS = ("native", "forwarded", "rmw", "rmw_conflicts", "corrupt", "threads_running")


def _malformed(report: Any, ntiers: int) -> str | None:
    """Why a shard's stats reply cannot be summed (an older or broken shard), or None."""
    if not isinstance(report, dict):
        return "not an object"
    missing = [k for k in _SHARD_KEYS if not isinstance(report.get(k), int)]
    tiers = report.get("tiers")
    if not isinstance(tiers, list) or len(tiers) != ntiers:
        missing.append("tiers")
    else:
        for t in tiers:
            if not isinstance(t, dict) or not isinstance(t.get("counters"), dict) or any(
                    not isinstance(t.get(k), int) for k in (*_SUM_TIER, "largest_free_extent")):
                missing.append("tier fields")
                break
    return f"missing {', '.join(missing)}" if missing else None


def combine_status(config: Config, shards: Sequence[Mapping[str, Any]],
                   replies: Sequence[ShardReply], *, active: bool) -> dict[str, Any]:
    """The status record from the supervisor's view of each shard and each shard's `stats`.

    `shards[k]` is the supervisor's record of shard k (index, pid, device, state, restarts);
    `replies[k]` its stats reply. Sums cover the shards that answered; a shard that did not is
    listed with its error and `partial` is true, so one silent shard never hides the others.
    """
    replies = [r if not r.ok or (why := _malformed(r.result, len(config.tiers))) is None
               else ShardReply(r.index, error=f"malformed report ({why})") for r in replies]
    reports = [r.result for r in replies if r.ok]
    tiers: list[dict[str, Any]] = []
    for i, tcfg in enumerate(config.tiers):
        parts = [s["tiers"][i] for s in reports]
        t: dict[str, Any] = {"name": tcfg.name, "kind": tcfg.kind,
                             "compression": str(tcfg.compression)}
        for k in _SUM_TIER:
            t[k] = sum(p[k] for p in parts)
        t["largest_free_extent"] = max((p["largest_free_extent"] for p in parts), default=0)
        t["draining"] = any(p["draining"] for p in parts)
        keys = sorted({k for p in parts for k in p["counters"]})
        t["counters"] = {k: sum(p["counters"].get(k, 0) for p in parts) for k in keys}
        t["compression_ratio"] = (t["pages"] * PAGE_SIZE / t["stored_bytes"]
                                  if t["stored_bytes"] else 0.0)
        t.update(combine_extra([p.get("extra", {}) for p in parts]))
        tiers.append(t)
    stored = sum(s["stored_pages"] for s in reports)
    stored_bytes = sum(s["stored_bytes"] for s in reports)
    loops = [s["device"] for s in shards if s.get("device")]
    swaps = system.active_swaps()
    io = {k: sum(s[k] for s in reports)
          for k in ("reads", "writes", "discards", "read_errors", "write_errors", "enospc")}
    by_index = {r.index: r for r in replies}
    shard_rows = []
    for s in shards:
        r = by_index.get(s["index"])
        row = {k: s.get(k) for k in ("index", "pid", "device", "state", "restarts", "reason")}
        row["in_swap"] = bool(s.get("device")) and s["device"] in swaps
        row["reporting"] = r is not None and r.ok
        row["error"] = None if r is None or r.ok else r.error
        row["hardening"] = r.result.get("hardening") if r is not None and r.ok else None
        row["tasks"] = r.result.get("tasks", {}) if r is not None and r.ok else {}
        # this shard's own numbers (None when it did not answer): each device row shows them
        row["size_bytes"] = config.size // max(1, config.shards)
        for k in _ROW_KEYS:
            row[k] = r.result[k] if r is not None and r.ok else None
        row["swap"] = dict(swaps[s["device"]]) if row["in_swap"] else None
        shard_rows.append(row)
    return {
        "active": active,
        "partial": not all(row["reporting"] for row in shard_rows),
        "device": loops[0] if loops else "",
        "devices": loops,
        "shards": shard_rows,
        "size_bytes": config.size,
        "priority": config.priority,
        "swap_used_bytes": sum(swaps.get(d, {}).get("used", 0) for d in loops),
        "swap_used_by_device": {d: swaps.get(d, {}).get("used", 0) for d in loops},
        "pages": {"stored": stored, "zero": sum(s["zero_pages"] for s in reports)},
        "stored_bytes": stored_bytes,
        "tiers": tiers,
        "compression_ratio": stored * PAGE_SIZE / stored_bytes if stored_bytes else 0.0,
        "metadata_bytes": sum(s["metadata_bytes"] for s in reports),
        "metadata_bytes_per_page": (sum(s["metadata_bytes"] for s in reports) / stored
                                    if stored else 0.0),
        "runs": sum(s["runs"] for s in reports),
        "io": io,
        "lane": {k: sum(s.get(k, 0) for s in reports) for k in _LANE_KEYS
                 if any(k in s for s in reports)},
        # log lines lost while the log output was stalled (tierswap.logs), shards + supervisor
        "log_dropped": sum(s.get("log_dropped", 0) for s in reports) + logs.dropped(),
    }


def one_line(st: dict[str, Any]) -> str:
    """systemd's STATUS= line: the totals, and every shard that is not serving."""
    tiers = ", ".join(f"{t['name']} {format_size(t['stored_bytes'])}" for t in st["tiers"])
    line = (f"{st['pages']['stored']} pages stored ({st['pages']['zero']} zero), "
            f"ratio {st['compression_ratio']:.2f}, {tiers}")
    bad = [f"shard {s['index']} {s['state'] if s['state'] != 'serving' else 'not answering'}"
           for s in st["shards"] if s["state"] != "serving" or not s["reporting"]]
    return line + ("; " + ", ".join(bad) if bad else "")


# ---------------------------------------------------------------------------- tables
#
# The tables follow `swapon --show` and `zramctl`: columns named as theirs where they mean the
# same (NAME, TYPE, SIZE, USED, PRIO from swapon; ZERO-PAGES, DATA, COMPR from zramctl), sizes
# human (1024-based) unless --bytes, --raw for one space between fields, --noheadings, and
# --output to choose the columns of the device table. A header means the same in every table:
# PAGES is always a count of non-zero pages, COMPR always bytes as stored (compressed).


@dataclass(frozen=True)
class Column:
    """One column: its header, what it means (`tierswap status --help` lists them), how to
    get its value from (status record, row), and whether the value is a size in bytes."""

    name: str
    help: str
    get: Callable[[Mapping[str, Any], Mapping[str, Any]], Any]
    size: bool = False
    left: bool = False  # text columns are aligned left, numbers right


def _ratio(data: Any, compr: Any) -> float | None:
    if not isinstance(data, int) or not isinstance(compr, int):
        return None
    return data / compr if compr else 0.0


def _data(r: Mapping[str, Any]) -> int | None:
    pages = r.get("stored_pages")
    return pages * PAGE_SIZE if isinstance(pages, int) else None


def _swap(r: Mapping[str, Any], key: str) -> Any:
    sw = r.get("swap")
    return sw.get(key) if isinstance(sw, Mapping) else None


def shard_state(r: Mapping[str, Any]) -> str:
    """The shard's state; "unresponsive" for a serving shard whose report is missing (it did
    not answer the status request in time, or answered something unusable)."""
    state = str(r.get("state") or "-")
    return "unresponsive" if state == "serving" and not r.get("reporting", True) else state


def shard_note(r: Mapping[str, Any]) -> str:
    notes = [str(r["reason"])] if r.get("reason") else []
    if shard_state(r) == "unresponsive":
        notes.append(f"not in the sums: {r.get('error')}")
    if r.get("device") and not r.get("in_swap"):
        notes.insert(0, "out of swap")
    notes += [f"{name} failed {h['failures']}x" for name, h in (r.get("tasks") or {}).items()
              if isinstance(h, Mapping) and h.get("failures")]
    return "; ".join(notes)


DEVICE_COLUMNS: dict[str, Column] = {c.name: c for c in (
    Column("NAME", "the shard's loop device (as swapon)", lambda s, r: r.get("device"),
           left=True),
    Column("TYPE", "swap area type from /proc/swaps (as swapon)",
           lambda s, r: _swap(r, "type"), left=True),
    Column("SIZE", "size of the device: the shard's share of [device] size",
           lambda s, r: r.get("size_bytes", s.get("size_bytes", 0) // max(
               1, len(s.get("shards") or ()))), size=True),
    Column("USED", "swap in use on the device, from /proc/swaps (as swapon)",
           lambda s, r: _swap(r, "used"), size=True),
    Column("PRIO", "swap priority from /proc/swaps (as swapon)",
           lambda s, r: _swap(r, "priority")),
    Column("SHARD", "shard index", lambda s, r: r.get("index"), left=True),
    Column("PID", "the shard's process", lambda s, r: r.get("pid")),
    Column("STATE", "serving, unresponsive (no answer within 2 s), restarting, failed, "
           "starting", lambda s, r: shard_state(r), left=True),
    Column("RESTARTS", "times the shard's process was replaced", lambda s, r: r.get("restarts")),
    Column("PAGES", "non-zero pages stored", lambda s, r: r.get("stored_pages")),
    Column("ZERO-PAGES", "zero pages (no storage; as zramctl)", lambda s, r: r.get("zero_pages")),
    Column("DATA", "uncompressed size of the stored pages (as zramctl)",
           lambda s, r: _data(r), size=True),
    Column("COMPR", "bytes stored, compressed (as zramctl)",
           lambda s, r: r.get("stored_bytes"), size=True),
    Column("RATIO", "DATA / COMPR", lambda s, r: _ratio(_data(r), r.get("stored_bytes"))),
    Column("META", "bytes of slot map in use", lambda s, r: r.get("metadata_bytes"), size=True),
    Column("NOTE", "why a shard is not serving, failed tasks", lambda s, r: shard_note(r),
           left=True),
)}
DEFAULT_DEVICE = ("NAME", "SIZE", "USED", "PRIO", "STATE", "PAGES", "ZERO-PAGES", "COMPR",
                  "RATIO", "META")
SHARD_TABLE = ("SHARD", "PID", "NAME", "STATE", "RESTARTS", "NOTE")


def parse_columns(text: str) -> list[str]:
    """Column names from `--output` ("NAME,SIZE,USED", any case); ValueError names the bad
    one and lists the known ones."""
    names = [n.strip().upper() for n in text.split(",")]
    for n in names:
        if n not in DEVICE_COLUMNS:
            raise ValueError(f"unknown column {n or '(empty)'!r}; known: "
                             + ",".join(DEVICE_COLUMNS))
    return names


@dataclass(frozen=True)
class Style:
    """How a table is printed: `--bytes`, `--raw`, `--noheadings`."""

    bytes: bool = False
    raw: bool = False
    headings: bool = True


def _cell(v: Any, size: bool, style: Style) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.2f}"
    if size and isinstance(v, int) and not style.bytes:
        return format_size(v)
    return str(v)


def _raw_escape(text: str) -> str:
    """util-linux's --raw escaping: a space or backslash inside a field is written \\xHH, so
    every line splits on spaces into exactly its fields."""
    return "".join(f"\\x{ord(ch):02x}" if ch in " \\\n\t" else ch for ch in text)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: Sequence[bool],
          style: Style) -> list[str]:
    """Lines of a table: aligned columns (text left, numbers right, two spaces between), or
    with --raw one space between escaped fields."""
    body = [list(headers)] if style.headings else []
    body += [list(r) for r in rows]
    if style.raw:
        return [" ".join(_raw_escape(c) for c in r) for r in body]
    widths = [max((len(r[i]) for r in body), default=0) for i in range(len(headers))]
    out = []
    for r in body:
        cells = [c.ljust(w) if lf else c.rjust(w)
                 for c, w, lf in zip(r, widths, left, strict=True)]
        out.append("  ".join(cells).rstrip())
    return out


def device_table(st: Mapping[str, Any], columns: Sequence[str] = DEFAULT_DEVICE,
                 style: Style = Style()) -> list[str]:
    """One line per shard's device (and the header), each with that shard's own values."""
    cols = [DEVICE_COLUMNS[c] for c in columns]
    rows = [[_cell(c.get(st, r), c.size, style) for c in cols]
            for r in st.get("shards") or () if isinstance(r, Mapping)]
    return table([c.name for c in cols], rows, [c.left for c in cols], style)


def render_table(st: Mapping[str, Any], style: Style = Style()) -> str:
    """The full view: devices, tiers, remote targets, shards, I/O."""
    lines = device_table(st, DEFAULT_DEVICE, style)
    lines.append("")
    heads = ("TIER", "KIND", "PAGES", "ZERO-PAGES", "COMPR", "CAPACITY", "RATIO", "PAGES-IN",
             "PAGES-OUT", "STATE")
    rows = []
    for t in st.get("tiers", []):
        c = t.get("counters", {})
        rows.append([_cell(t.get("name"), False, style), _cell(t.get("kind"), False, style),
                     _cell(t.get("pages"), False, style),
                     _cell(t.get("zero_pages"), False, style),
                     _cell(t.get("stored_bytes"), True, style),
                     _cell(t.get("capacity_bytes"), True, style),
                     _cell(t.get("compression_ratio"), False, style),
                     _cell(c.get("pages_in", 0), False, style),
                     _cell(c.get("pages_out", 0), False, style),
                     "draining" if t.get("draining") else "active"])
    lines += table(heads, rows, [True, True] + [False] * 7 + [True], style)
    for t in st.get("tiers", []):  # remote targets: health and balance (fragments, free slots)
        if t.get("targets"):
            lines.append("")
            theads = (f"TARGET({t['name']})", "UP", "FRAGMENTS", "BYTES", "FREE-SLOTS",
                      "BACKLOG", "ERRORS")
            rows = [[str(tg["url"]), _cell(bool(tg.get("up")), False, style),
                     _cell(tg.get("fragments", 0), False, style),
                     _cell(tg.get("bytes", 0), True, style),
                     _cell(tg.get("free_slots"), False, style),
                     _cell(tg.get("rebuild_backlog", tg.get("resync_pending", 0)), False, style),
                     _cell(tg.get("errors", 0), False, style)] for tg in t["targets"]]
            lines += table(theads, rows, [True] + [False] * 6, style)
    lines.append("")
    lines += device_table(st, SHARD_TABLE, style)
    io = st.get("io")
    if io:
        lines.append("")
        lines.append(f"io: {io['reads']} reads, {io['writes']} writes, {io['discards']} "
                     f"discards, {io['read_errors'] + io['write_errors']} errors "
                     f"({io['enospc']} ENOSPC)")
    return "\n".join(lines)


def render(st: Mapping[str, Any], columns: Sequence[str] | None = None,
           style: Style = Style()) -> str:
    """What `tierswap status` prints. The full view by default; with --output, --raw or
    --noheadings the device table alone (one line per device, for scripts; --json has the
    rest)."""
    if columns is None and not style.raw and style.headings:
        return render_table(st, style)
    return "\n".join(device_table(st, columns or DEFAULT_DEVICE, style))


def overlay_swaps(st: dict[str, Any], swaps: Mapping[str, Mapping[str, Any]]) -> None:
    """Put what /proc/swaps says now into each row (a summary read from the file, or a record
    of shards that did not answer: the kernel's view is always current)."""
    for r in st.get("shards") or ():
        dev = r.get("device")
        r["in_swap"] = bool(dev) and dev in swaps
        r["swap"] = dict(swaps[dev]) if r["in_swap"] else None
