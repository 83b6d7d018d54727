"""Prometheus metrics: the status record (`tierswap.status.combine_status`) in the text
exposition format, written as a node_exporter textfile.

Why a textfile and no HTTP endpoint of our own: node_exporter's textfile collector already
serves HTTP, with its TLS, authentication and connection limits, and it is on every host that
Prometheus watches. An HTTP server in the daemon duplicated that inside a process that must
stay small, locked in memory and on trio, and it added a listening port to a root daemon. The
`[metrics] listen` key is accepted for compatibility and ignored with one warning
(`LISTEN_REMOVED`; docs/configuration.md).

Why no prometheus_client at run time: the daemon has no metric objects to keep. Every value
already sits in the one status record that `status --json` and systemd's STATUS= line come
from, so all we need is its rendering in a stable, line-oriented format: a page of code. The
tests parse the output with prometheus_client's reference parser (a test extra).

Names follow the Prometheus conventions: a `tierswap_` prefix, base units in the name (bytes,
pages), counters end in `_total`. Counters restart from zero when the daemon restarts, which
Prometheus' rate() handles. Metrics describe amounts and counts only; no page content, no
addresses inside tiers.

The textfile is rewritten every `[metrics] interval` and removed when tierswap stops (and by
`down --force` after a crash), so node_exporter never serves numbers of a daemon that is gone.
Nothing here may end the supervisor: `write_textfile` logs and carries on when something
fails, because an exception there would take swap down.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("tierswap.metrics")

LISTEN_REMOVED = ("metrics.listen is no longer supported and is ignored: tierswap serves no "
                  "HTTP itself; set metrics.textfile in node_exporter's textfile directory "
                  "(docs/configuration.md, [metrics])")

Labels = Mapping[str, str]
Sample = tuple[Labels, Any]  # values that are not numbers are skipped (_number)


# ---------------------------------------------------------------------------- rendering


@functools.cache
def build_info() -> dict[str, str]:
    """tierswap's version and the pyfuse3 it runs with: its version and whether it has the
    fallocate handler of tierswap/contrib/pyfuse3-3.5.0-fallocate.patch ("patched"), without
    which freed swap slots never reach tierswap (docs/pyfuse3-fallocate.md)."""
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    try:
        import pyfuse3

        build = "patched" if hasattr(pyfuse3.Operations, "fallocate") else "unpatched"
    except ImportError:
        build = "missing"
    return {"version": version("tierswap"), "pyfuse3_version": version("pyfuse3"),
            "pyfuse3_build": build}



def escape_label(value: str) -> str:
    """Label value escaping of the text format: backslash, double quote and newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(v: float | int | bool) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _number(v: Any) -> float | int | bool | None:
    """A sample value, or None for anything that is not a number (skipped, never an error)."""
    return v if isinstance(v, int | float) else None


class _Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> None:
        """One metric family; omitted when it has no sample (e.g. a key older shards lack)."""
        body = []
        for labels, value in samples:
            v = _number(value)
            if v is None:
                continue
            if labels:
                lab = ",".join(f'{k}="{escape_label(str(x))}"' for k, x in labels.items())
                body.append(f"{name}{{{lab}}} {format_value(v)}")
            else:
                body.append(f"{name} {format_value(v)}")
        if body:
            self.lines.append(f"# HELP {name} {_escape_help(help_text)}")
            self.lines.append(f"# TYPE {name} {kind}")
            self.lines.extend(body)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n" if self.lines else ""


# per-tier gauges: (status key, metric suffix, help)
_TIER_GAUGES = (
    ("pages", "pages", "Non-zero pages stored in the tier."),
    ("zero_pages", "zero_pages", "Zero pages recorded in the tier's runs (they take no room)."),
    ("stored_bytes", "stored_bytes", "Bytes of (compressed) pages stored in the tier."),
    ("capacity_bytes", "capacity_bytes",
     "Capacity of the tier: the shards' shares, in whole segments."),
    ("available_bytes", "available_bytes",
     "Part of the capacity usable now (a memory tier grows into its capacity)."),
    ("free_bytes", "free_bytes", "Room for new pages in the usable part."),
    ("segments", "segments", "Segments usable now."),
    ("free_segments", "free_segments", "Empty segments."),
    ("free_extents", "free_extents", "Runs of adjacent free segments (fragmentation)."),
    ("largest_free_extent", "largest_free_extent_bytes",
     "Longest run of adjacent free segments, in bytes (largest of all shards)."),
    ("compression_ratio", "compression_ratio",
     "Uncompressed size of the tier's non-zero pages over their stored size (0 when empty)."),
    ("draining", "draining", "1 while the tier is drained: it takes no new pages."),
    ("arena_bytes", "arena_bytes", "Memory tier: locked RAM reserved for pages so far."),
    ("file_allocated_bytes", "file_allocated_bytes",
     "File tier: bytes the tier file occupies on disk."),
    ("degraded_segments", "degraded_segments",
     "Remote tier: live segments with fewer up-to-date copies than configured."),
    ("unreadable_segments", "unreadable_segments",
     "Remote tier, erasure coded: live segments with fewer than K fragments reachable."),
)

# per-tier counters: (key in tier["counters"] or in the tier, metric suffix, help)
_TIER_COUNTERS = (
    ("pages_in", "pages_in_total", "Pages written into the tier (writes and moves)."),
    ("pages_out", "pages_out_total", "Pages read from the tier."),
    ("promotions", "promoted_pages_total", "Pages moved up into the tier."),
    ("demotions", "demoted_pages_total", "Pages moved down into the tier."),
    ("bytes_moved", "moved_bytes_total", "Bytes moved into the tier by migration."),
    ("errors", "errors_total", "I/O errors of the tier."),
)

# per-tier counters some kinds report besides TierCounters: (key in the tier, suffix, help)
_TIER_EXTRA_COUNTERS = (
    ("grow_failures", "grow_failures_total",
     "Memory tier: failed attempts to map another arena chunk (a refusal for lack of "
     "headroom is not one)."),
    ("auth_failures", "auth_failures_total",
     "Encrypted file or remote tier: blocks that failed authentication when read."),
    ("stale_reads", "stale_reads_total",
     "Remote tier: reads served from a copy known to be stale (the last resort)."),
    ("degraded_writes", "degraded_writes_total",
     "Remote tier: writes acknowledged with fewer copies than configured."),
    ("resynced_segments", "resynced_segments_total",
     "Remote tier: segments copied to a target that had missed them."),
    ("rereplicated_segments", "rereplicated_segments_total",
     "Remote tier: segments copied to another target because one stayed down."),
    ("degraded_reads", "degraded_reads_total",
     "Remote tier, erasure coded: reads served by decoding from other fragments."),
    ("rebuilt_fragments", "rebuilt_fragments_total",
     "Remote tier, erasure coded: fragments rebuilt (in place or on another target)."),
    ("moved_fragments", "moved_fragments_total",
     "Remote tier, erasure coded: fragments rebuilt on another target because one stayed "
     "down."),
)

# per remote target: (key in a tier's "targets" entries, metric suffix, kind, help)
_TARGET_SERIES = (
    ("up", "up", "gauge", "Remote tier: 1 while the target is connected (in every shard)."),
    ("bytes", "bytes", "gauge",
     "Remote tier: bytes of sealed copies or fragments the target holds for live segments."),
    ("fragments", "fragments", "gauge",
     "Remote tier: live segment copies (replicas) or fragments (erasure) placed on the "
     "target."),
    ("rebuild_backlog", "rebuild_backlog", "gauge",
     "Remote tier: copies or fragments on the target still to rebuild or verify (all of "
     "them while it is down)."),
    ("free_slots", "free_slots", "gauge",
     "Remote tier, erasure coded: fragment slots still free on the target (the balance)."),
    ("errors", "errors_total", "counter", "Remote tier: failed requests to the target."),
    ("reconnects", "reconnects_total", "counter", "Remote tier: reconnections to the target."),
)

# device I/O counters: (key in status["io"], metric, help)
_IO_COUNTERS = (
    ("reads", "tierswap_reads_total", "Read requests from the swap device(s)."),
    ("writes", "tierswap_writes_total", "Write requests to the swap device(s)."),
    ("discards", "tierswap_discards_total", "Discard requests (freed swap slots)."),
    ("read_errors", "tierswap_read_errors_total", "Read requests answered with an error."),
    ("write_errors", "tierswap_write_errors_total", "Write requests answered with an error."),
    ("enospc", "tierswap_enospc_total",
     "Write requests refused because every tier was full (also in write errors)."),
)

# native lane counters: (key in status["lane"], metric, kind, help)
_LANE_SERIES = (
    ("native", "tierswap_lane_native_requests_total", "counter",
     "Requests the native lane answered on its own threads."),
    ("forwarded", "tierswap_lane_forwarded_requests_total", "counter",
     "Requests the lane handed to the trio side (slow tiers, growth)."),
    ("rmw", "tierswap_lane_partial_writes_total", "counter",
     "Partial-page writes (read-modify-write)."),
    ("rmw_conflicts", "tierswap_lane_partial_write_conflicts_total", "counter",
     "Partial-page writes started over because the page changed meanwhile."),
    ("corrupt", "tierswap_corrupt_reads_total", "counter",
     "Reads of a stored page that failed to decode (answered with an error; also in read "
     "errors)."),
    ("threads_running", "tierswap_lane_threads", "gauge",
     "Native lane threads running (all shards)."),
)


def render(status: Mapping[str, Any]) -> str:
    """The status record as Prometheus text exposition format (version 0.0.4); the first
    family is always tierswap_build_info."""
    out = _Exposition()
    g, c = "gauge", "counter"
    pages = status.get("pages", {})
    out.family("tierswap_build_info", g,
               "tierswap's version and its pyfuse3 (version; build: patched or unpatched); "
               "always 1.", [(build_info(), 1)])
    out.family("tierswap_active", g, "1 while tierswap's devices are in use as swap.",
               [({}, bool(status.get("active")))])
    out.family("tierswap_size_bytes", g, "Virtual size of the swap device(s) the kernel sees.",
               [({}, status.get("size_bytes"))])
    shards = [(str(s.get("index", k)), s) for k, s in enumerate(status.get("shards") or [])
              if isinstance(s, Mapping)]
    if "shards" in status:
        out.family("tierswap_shards", g, "Shard worker processes (one loop device each).",
                   [({}, len(shards))])
    out.family("tierswap_status_partial", g,
               "1 while a shard's report is missing from the sums (tierswap_shard_reporting).",
               [({}, status["partial"])] if "partial" in status else [])
    out.family("tierswap_device_info", g, "The loop device of each shard (value always 1).",
               [({"device": str(s["device"]), "shard": k}, 1) for k, s in shards
                if s.get("device")])
    out.family("tierswap_shard_state", g,
               "1 for the state each shard is in (serving, restarting, failed, starting).",
               [({"shard": k, "state": st}, s.get("state") == st) for k, s in shards
                for st in ("serving", "restarting", "failed", "starting")])
    out.family("tierswap_shard_reporting", g,
               "1 when the shard answered the last status request (its counters are summed).",
               [({"shard": k}, bool(s.get("reporting"))) for k, s in shards])
    out.family("tierswap_shard_restarts_total", c,
               "Times the shard's process was replaced after it died.",
               [({"shard": k}, s.get("restarts")) for k, s in shards])
    out.family("tierswap_swap_used_bytes", g,
               "Swap in use on tierswap's devices, as /proc/swaps reports it.",
               [({}, status.get("swap_used_bytes"))])
    out.family("tierswap_stored_pages", g, "Non-zero pages stored in the tiers.",
               [({}, pages.get("stored"))])
    out.family("tierswap_zero_pages", g, "Zero pages (recorded in the map, no storage).",
               [({}, pages.get("zero"))])
    out.family("tierswap_stored_bytes", g, "Bytes of (compressed) pages stored, all tiers.",
               [({}, status.get("stored_bytes"))])
    out.family("tierswap_compression_ratio", g,
               "Uncompressed size of non-zero pages over their stored size (0 when empty).",
               [({}, status.get("compression_ratio"))])
    out.family("tierswap_metadata_bytes", g, "Bytes of slot-map pages in use (all shards).",
               [({}, status.get("metadata_bytes"))])
    out.family("tierswap_map_runs", g, "Slot-map records (one per run of pages).",
               [({}, status.get("runs"))])

    io = status.get("io", {})
    for key, name, help_text in _IO_COUNTERS:
        out.family(name, c, help_text, [({}, io.get(key))])
    lane = status.get("lane") or {}
    for key, name, kind, help_text in _LANE_SERIES:
        out.family(name, kind, help_text, [({}, lane.get(key))])

    tiers = status.get("tiers", [])
    labels = [{"tier": t.get("name", str(i)), "kind": t.get("kind", "")}
              for i, t in enumerate(tiers)]
    for key, suffix, help_text in _TIER_GAUGES:
        out.family(f"tierswap_tier_{suffix}", g, help_text,
                   [(lab, t.get(key)) for lab, t in zip(labels, tiers, strict=True)])
    for key, suffix, help_text in _TIER_COUNTERS:
        out.family(f"tierswap_tier_{suffix}", c, help_text,
                   [(lab, t.get("counters", {}).get(key))
                    for lab, t in zip(labels, tiers, strict=True)])
    for key, suffix, help_text in _TIER_EXTRA_COUNTERS:
        out.family(f"tierswap_tier_{suffix}", c, help_text,
                   [(lab, t.get(key)) for lab, t in zip(labels, tiers, strict=True)])

    per_target = [({**lab, "target": str(tg.get("url", ""))}, tg)
                  for lab, t in zip(labels, tiers, strict=True)
                  for tg in t.get("targets", []) if isinstance(tg, dict)]
    for key, suffix, kind, help_text in _TARGET_SERIES:
        out.family(f"tierswap_remote_target_{suffix}", kind, help_text,
                   [(lab, tg.get(key)) for lab, tg in per_target])

    procs = [(f"shard{k}", s.get("tasks")) for k, s in shards]
    procs.append(("supervisor", (status.get("supervisor") or {}).get("tasks")))
    out.family("tierswap_task_failures_total", c,
               "Times a background task (policy, control server, growth, repair, FUSE loop, "
               "watchdog, ...) failed and was restarted.",
               [({"process": proc, "task": name}, h.get("failures"))
                for proc, tasks in procs if isinstance(tasks, Mapping)
                for name, h in tasks.items() if isinstance(h, Mapping)])
    hard = [(k, s["hardening"]) for k, s in shards if isinstance(s.get("hardening"), Mapping)]
    for key, name, help_text in (
        ("VmRSS", "tierswap_shard_resident_bytes", "Resident memory of the shard process."),
        ("VmLck", "tierswap_shard_locked_bytes",
         "Locked memory of the shard process (below resident: mlockall did not apply)."),
        ("oom_score_adj", "tierswap_shard_oom_score_adj",
         "oom_score_adj of the shard process (-1000: never chosen by the OOM killer)."),
    ):
        out.family(name, g, help_text, [({"shard": k}, h.get(key)) for k, h in hard])
    return out.text()


# ---------------------------------------------------------------------------- textfile

_textfile_error: str | None = None  # last failure logged, so a lasting one is logged once


def write_textfile(path: Path | str, status: Mapping[str, Any]) -> bool:
    """Replace `path` atomically with the rendered metrics; False (and a log line) on failure.

    The file is written next to its final name and renamed over it, so node_exporter never
    reads half a file; the temporary name starts with a dot and does not end in ".prom", which
    the textfile collector ignores. Mode 0644 on purpose, whatever the umask (the unit sets
    0077): node_exporter usually runs as its own user, and the file holds counts, no page
    content. No fsync: the file is rewritten every interval and worth nothing after a crash.

    Errors are logged, not raised: the supervisor calls this from its status loop, where an
    exception would end the daemon and take swap away over a metrics file.
    """
    global _textfile_error
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        text = render(status)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o644)
        with open(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(text)
        os.replace(tmp, path)
    except Exception as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        msg = f"{path}: {e.strerror if isinstance(e, OSError) and e.strerror else e}"
        if msg != _textfile_error:
            log.warning("metrics textfile not written: %s", msg)
            _textfile_error = msg
        return False
    if _textfile_error is not None:
        log.info("metrics textfile %s written again", path)
        _textfile_error = None
    return True
