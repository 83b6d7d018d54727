"""Combining shard reports into one view, and rendering it for people.

Shards report raw counters; the supervisor adds them up here, so `status --json`, the table,
systemd's STATUS= line and the Prometheus metrics all come from one record.
"""

from __future__ import annotations

from typing import Any

from tierswap import system
from tierswap.config import PAGE_SIZE, Config, format_size

_SUM_TIER = ("pages", "zero_pages", "stored_bytes", "capacity_bytes", "available_bytes",
             "free_bytes", "segments", "free_segments", "free_extents")


# Extras that describe the tier, not a shard's share of it: never summed.
_SAME = {"file_allocated_bytes", "replicas", "path"}


def combine_extra(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Add up shard extras: counters are summed, per-target lists merged by URL (a target is
    up only if every shard reaches it), descriptive values kept as they are."""
    extra: dict[str, Any] = {}
    for p in parts:
        for k, v in p.items():
            if k == "targets":
                merged = {t["url"]: dict(t) for t in extra.get("targets", [])}
                for t in v:
                    m = merged.setdefault(t["url"], {**t, "errors": 0, "reconnects": 0,
                                                      "resync_pending": 0, "up": True})
                    m["up"] = m["up"] and t["up"]
                    for c in ("errors", "reconnects", "resync_pending"):
                        m[c] += t.get(c, 0)
                extra["targets"] = list(merged.values())
            elif isinstance(v, int | float) and not isinstance(v, bool) and k not in _SAME:
                extra[k] = extra.get(k, 0) + v
            else:
                extra[k] = v
    return extra


def combine_status(config: Config, loops: list[str], shards: list[dict[str, Any]],
                   *, active: bool) -> dict[str, Any]:
    tiers: list[dict[str, Any]] = []
    for i, tcfg in enumerate(config.tiers):
        parts = [s["tiers"][i] for s in shards]
        t: dict[str, Any] = {"name": tcfg.name, "kind": tcfg.kind,
                             "compression": str(tcfg.compression)}
        for k in _SUM_TIER:
            t[k] = sum(p[k] for p in parts)
        t["largest_free_extent"] = max((p["largest_free_extent"] for p in parts), default=0)
        t["draining"] = any(p["draining"] for p in parts)
        t["counters"] = {k: sum(p["counters"][k] for p in parts) for k in parts[0]["counters"]}
        t["compression_ratio"] = (t["pages"] * PAGE_SIZE / t["stored_bytes"]
                                  if t["stored_bytes"] else 0.0)
        t.update(combine_extra([p.get("extra", {}) for p in parts]))
        tiers.append(t)
    stored = sum(s["stored_pages"] for s in shards)
    stored_bytes = sum(s["stored_bytes"] for s in shards)
    swaps = system.active_swaps()
    io = {k: sum(s[k] for s in shards)
          for k in ("reads", "writes", "discards", "read_errors", "write_errors", "enospc")}
    return {
        "active": active,
        "device": loops[0] if loops else "",
        "devices": loops,
        "shards": config.shards,
        "size_bytes": config.size,
        "priority": config.priority,
        "swap_used_bytes": sum(swaps.get(d, {}).get("used", 0) for d in loops),
        "swap_used_by_device": {d: swaps.get(d, {}).get("used", 0) for d in loops},
        "pages": {"stored": stored, "zero": sum(s["zero_pages"] for s in shards)},
        "stored_bytes": stored_bytes,
        "tiers": tiers,
        "compression_ratio": stored * PAGE_SIZE / stored_bytes if stored_bytes else 0.0,
        "metadata_bytes": sum(s["metadata_bytes"] for s in shards),
        "metadata_bytes_per_page": (sum(s["metadata_bytes"] for s in shards) / stored
                                    if stored else 0.0),
        "runs": sum(s["runs"] for s in shards),
        "io": io,
        "hardening": [s["hardening"] for s in shards],
    }


def one_line(st: dict[str, Any]) -> str:
    tiers = ", ".join(f"{t['name']} {format_size(t['stored_bytes'])}" for t in st["tiers"])
    return (f"{st['pages']['stored']} pages stored ({st['pages']['zero']} zero), "
            f"ratio {st['compression_ratio']:.2f}, {tiers}")


def render_table(st: dict[str, Any]) -> str:
    """A table in the manner of `swapon --show` / `zramctl`."""
    lines = []
    lines.append(f"{'NAME':<14}{'SIZE':>8}{'USED':>8}{'PRIO':>6}  {'STORED':>9} {'ZERO':>9} "
                 f"{'RATIO':>6} {'META':>8}")
    share = st["size_bytes"] // max(1, st["shards"])
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
            f"{c['pages_in']:>10}{c['pages_out']:>10}  {'draining' if t['draining'] else 'active'}"
        )
    io = st["io"]
    lines.append("")
    lines.append(f"io: {io['reads']} reads, {io['writes']} writes, {io['discards']} discards, "
                 f"{io['read_errors'] + io['write_errors']} errors ({io['enospc']} ENOSPC)")
    return "\n".join(lines)


async def combine_command(sup, req: dict[str, Any], progress=None) -> Any:
    """Tier commands go to every shard; progress lines are summed and forwarded."""
    import trio

    from tierswap.control import acall
    from tierswap.policy import combine_replies, split_request

    reqs = split_request(req, len(sup.procs))
    results: list[Any] = [None] * len(reqs)
    seen: list[dict[str, Any]] = [{} for _ in reqs]
    changed = trio.Event()

    def note(k: int, p: dict[str, Any]) -> None:
        seen[k] = p
        changed.set()

    async def one(k: int) -> None:
        results[k] = await acall(sup.config.shard_dir(k) / "control.sock", reqs[k],
                                 timeout=24 * 3600, on_progress=lambda p: note(k, p))

    async def forward() -> None:
        nonlocal changed
        while True:
            await changed.wait()
            changed = trio.Event()
            totals = [s.get("total") for s in seen]
            await progress({"pages": sum(s.get("pages", 0) for s in seen),
                            "total": sum(totals) if all(t is not None for t in totals) else None})
            await trio.sleep(0.2)

    async with trio.open_nursery() as n:
        if progress is not None:
            n.start_soon(forward)
        async with trio.open_nursery() as workers:
            for k in range(len(reqs)):
                workers.start_soon(one, k)
        n.cancel_scope.cancel()
    return combine_replies(req, results)
