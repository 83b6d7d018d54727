"""Combining shard reports into one view, and rendering it for people.

Shards report raw counters; the supervisor adds them up here, so `status --json`, the table,
systemd's STATUS= line and the Prometheus metrics all come from one record.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


def render_table(st: dict[str, Any]) -> str:
    """A table in the manner of `swapon --show` / `zramctl`."""
    lines = []
    lines.append(f"{'NAME':<14}{'SIZE':>8}{'USED':>8}{'PRIO':>6}  {'STORED':>9} {'ZERO':>9} "
                 f"{'RATIO':>6} {'META':>8}")
    share = st["size_bytes"] // max(1, len(st["shards"]))
    used = st.get("swap_used_by_device", {})
    for i, dev in enumerate(st["devices"] or ["-"]):
        row = (f"{dev:<14}{format_size(share):>8}{format_size(used.get(dev, 0)):>8}"
               f"{st['priority']:>6}")
        if i == 0:  # the pages, ratio and map are the device's as a whole (all shards)
            row += (f"  {st['pages']['stored']:>9} {st['pages']['zero']:>9} "
                    f"{st['compression_ratio']:>6.2f} {format_size(st['metadata_bytes']):>8}")
        lines.append(row)
    lines.append("")
    lines.append(f"{'TIER':<10}{'KIND':<8}{'PAGES':>10}{'STORED':>9}{'CAPACITY':>10}{'RATIO':>7}"
                 f"{'IN':>10}{'OUT':>10}  STATE")
    for t in st["tiers"]:
        c = t["counters"]
        lines.append(
            f"{t['name']:<10}{t['kind']:<8}{t['pages']:>10}{format_size(t['stored_bytes']):>9}"
            f"{format_size(t['capacity_bytes']):>10}{t['compression_ratio']:>7.2f}"
            f"{c.get('pages_in', 0):>10}{c.get('pages_out', 0):>10}"
            f"  {'draining' if t['draining'] else 'active'}"
        )
    for t in st["tiers"]:  # remote targets: health and balance (fragments, free slots)
        if t.get("targets"):
            lines.append("")
            lines.append(f"{'TARGET (' + t['name'] + ')':<36}{'UP':>4}{'FRAGS':>8}{'BYTES':>9}"
                         f"{'FREE':>7}{'BACKLOG':>9}{'ERRORS':>8}")
            for tg in t["targets"]:
                lines.append(
                    f"{tg['url'][:35]:<36}{'yes' if tg['up'] else 'no':>4}"
                    f"{tg.get('fragments', 0):>8}{format_size(tg.get('bytes', 0)):>9}"
                    f"{tg.get('free_slots', '-')!s:>7}"
                    f"{tg.get('rebuild_backlog', tg.get('resync_pending', 0)):>9}"
                    f"{tg.get('errors', 0):>8}")
    lines.append("")
    lines.append(f"{'SHARD':<7}{'PID':>8}  {'DEVICE':<14}{'STATE':<12}{'RESTARTS':>8}  NOTE")
    for sh in st["shards"]:
        notes = [sh["reason"]] if sh.get("reason") else []
        if not sh["reporting"] and sh["state"] == "serving":
            notes.append(f"not in the sums: {sh['error']}")
        if sh["device"] and not sh["in_swap"]:
            notes.insert(0, "out of swap")
        notes += [f"{name} failed {h['failures']}x" for name, h in sh.get("tasks", {}).items()
                  if h.get("failures")]
        note = "; ".join(notes)
        lines.append(f"{sh['index']:<7}{sh['pid'] or '-':>8}  {sh['device'] or '-':<14}"
                     f"{sh['state']:<12}{sh['restarts']:>8}  {note}".rstrip())
    io = st["io"]
    lines.append("")
    lines.append(f"io: {io['reads']} reads, {io['writes']} writes, {io['discards']} discards, "
                 f"{io['read_errors'] + io['write_errors']} errors ({io['enospc']} ENOSPC)")
    return "\n".join(lines)
