"""The real programs bench_programs.py runs: inputs, command lines, and output checks.

Each program is one nobody here wrote (GNU sort, gcc, the sqlite3 shell). Inputs are built
once and cached; every check compares against something computed without the program under
test (Python's sort of the same lines, Python's evaluation of the same formula) or, for a
compiler's object code where nothing else can say what is right, against the build with no
swap. Limits: the expected results are computed in this process, so preparing the sort input
holds its lines in Python (about 1.7x the input size) once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import IO, Any

from bench_swap import BenchError, sh

MiB = 1 << 20
ZSTANDARD = ("zstandard", "0.25.0",
             "7713e1179d162cf5c7906da876ec2ccb9c3a9dcbdffef0cc7f70c3667a205f0b")
LOREM = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
         "incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud "
         "exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat.")


class Program:
    """One real program: inputs built once, a command line, and a check of its output.

    `check` must not trust the program: it compares against something computed without it
    (Python's sort, a formula) or, where nothing else can say what is right (a compiler's
    object code), against the run with no swap.
    """

    name = "?"
    label = "?"

    def prepare(self, work: Path) -> None: ...

    def describe(self) -> dict[str, Any]:
        return {}

    def argv(self, rundir: Path) -> list[str]:
        raise NotImplementedError

    def cwd(self) -> Path | None:
        return None

    def stdin_path(self) -> Path | None:
        return None

    def streams_stdout(self) -> bool:
        """True: stdout is a pipe consumed by `consume` while the program runs."""
        return False

    def consume(self, stdout: IO[bytes], box: dict[str, Any]) -> None: ...

    def warm(self) -> list[Path]:
        """Input files to read into the page cache (outside the cgroup) before a run."""
        return []

    def check(self, rundir: Path, box: dict[str, Any], ref: dict[str, Any] | None,
              ) -> dict[str, Any]:
        raise NotImplementedError


class SortProgram(Program):
    name = "sort"

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.label = f"GNU sort, {size // MiB} MiB of text in memory"
        self.input: Path | None = None
        self.meta: dict[str, Any] = {}

    def prepare(self, work: Path) -> None:
        """Deterministic lines of words and a hex number; expected output from Python's sort.

        With LC_ALL=C, GNU sort without keys orders lines by memcmp, as Python orders bytes.
        """
        stem = work / f"sort-input-v1-{self.size}-{self.seed}"
        self.input = stem.with_suffix(".txt")
        meta_path = stem.with_suffix(".json")
        if self.input.exists() and meta_path.exists():
            self.meta = json.loads(meta_path.read_text())
            if self.meta.get("bytes") == self.input.stat().st_size:
                return
        print(f"   preparing {self.input} ({self.size // MiB} MiB)", file=sys.stderr, flush=True)
        rng = random.Random(self.seed)
        letters = "abcdefghijklmnopqrstuvwxyz"
        vocab = sorted({"".join(rng.choices(letters, k=rng.randint(3, 10))) for _ in range(6000)})
        lines: list[bytes] = []
        total = 0
        while total < self.size:
            w = rng.choices(vocab, k=4)
            line = f"{w[0]} {w[1]} {w[2]} {w[3]} {rng.getrandbits(32):08x}\n".encode()
            lines.append(line)
            total += len(line)
        tmp = self.input.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for i in range(0, len(lines), 100_000):
                f.write(b"".join(lines[i:i + 100_000]))
        lines.sort()
        h = hashlib.sha256()
        for i in range(0, len(lines), 100_000):
            h.update(b"".join(lines[i:i + 100_000]))
        self.meta = {"bytes": total, "lines": len(lines), "sorted_sha256": h.hexdigest()}
        del lines
        tmp.rename(self.input)
        meta_path.write_text(json.dumps(self.meta))

    def buffer_bytes(self) -> int:
        return max(256 * MiB, 4 * self.meta["bytes"])

    def describe(self) -> dict[str, Any]:
        return {"input": str(self.input), **self.meta, "buffer": self.buffer_bytes()}

    def argv(self, rundir: Path) -> list[str]:
        assert self.input is not None
        # A temporary directory that does not exist: a spill to disk fails the run.
        return ["sort", "-S", f"{self.buffer_bytes() // 1024}K", "-T", str(rundir / "absent"),
                str(self.input)]

    def warm(self) -> list[Path]:
        return [self.input] if self.input else []

    def streams_stdout(self) -> bool:
        return True

    def consume(self, stdout: IO[bytes], box: dict[str, Any]) -> None:
        """Hash and count the output and pipe it through `sort -c`, all outside the cgroup."""
        h = hashlib.sha256()
        n = lines = 0
        checker = subprocess.Popen(["sort", "-c"], stdin=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env={**os.environ, "LC_ALL": "C"})
        box["checker"] = checker
        feeding = True
        assert checker.stdin is not None
        while chunk := stdout.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
            lines += chunk.count(b"\n")
            if feeding:
                try:
                    checker.stdin.write(chunk)
                except BrokenPipeError:  # sort -c stops at the first line out of order
                    feeding = False
        with contextlib.suppress(BrokenPipeError):
            checker.stdin.close()
        assert checker.stderr is not None
        err = checker.stderr.read()
        checker.wait(timeout=600)
        box.update(sha256=h.hexdigest(), bytes=n, lines=lines, sort_c_rc=checker.returncode,
                   sort_c_err=err.decode(errors="replace").strip()[-300:])

    def check(self, rundir: Path, box: dict[str, Any], ref: dict[str, Any] | None,
              ) -> dict[str, Any]:
        problems = [box["consumer_error"]] if "consumer_error" in box else []
        if box.get("sort_c_rc") != 0:
            problems.append(f"sort -c: exit {box.get('sort_c_rc')} {box.get('sort_c_err')}")
        if box.get("bytes") != self.meta["bytes"] or box.get("lines") != self.meta["lines"]:
            problems.append(f"{box.get('bytes')} bytes / {box.get('lines')} lines, expected "
                            f"{self.meta['bytes']} / {self.meta['lines']}")
        if box.get("sha256") != self.meta["sorted_sha256"]:
            problems.append("sha256 differs from Python's sort of the same lines")
        return {"ok": not problems, "problems": problems, "digest": box.get("sha256"),
                "how": "sort -c; bytes, lines and sha256 equal to Python's sort of the input"}


class GccProgram(Program):
    name = "gcc"

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.src: Path | None = None
        self.label = f"gcc -O2, zstd.c amalgamation ({ZSTANDARD[0]} {ZSTANDARD[1]} sdist)"
        self.lines = 0

    def prepare(self, work: Path) -> None:
        name, ver, sha = ZSTANDARD
        d = work / f"{name}-{ver}"
        self.src = d / "zstd" / "zstd.c"
        if not self.src.exists():
            sdist = work / f"{name}-{ver}.tar.gz"
            if not sdist.exists():
                print(f"   pip download {name}=={ver} (sdist)", file=sys.stderr, flush=True)
                sh([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                       "--no-binary", ":all:", "-d", str(work), f"{name}=={ver}"], timeout=600)
            got = hashlib.sha256(sdist.read_bytes()).hexdigest()
            if got != sha:
                raise BenchError(f"{sdist}: sha256 {got}, expected {sha}")
            with tarfile.open(sdist) as tf:
                members = [m for m in tf.getmembers()
                           if m.name.startswith(f"{name}-{ver}/zstd/") and m.isfile()]
                tf.extractall(work, members=members, filter="data")
        self.lines = self.src.read_bytes().count(b"\n")

    def describe(self) -> dict[str, Any]:
        return {"source": str(self.src), "lines": self.lines, "sdist_sha256": ZSTANDARD[2],
                "gcc": sh(["gcc", "--version"]).splitlines()[0]}

    def argv(self, rundir: Path) -> list[str]:
        return ["gcc", "-O2", "-pipe", "-c", "zstd.c", "-o", str(rundir / "zstd.o")]

    def cwd(self) -> Path | None:
        return self.src.parent if self.src else None

    def warm(self) -> list[Path]:
        assert self.src is not None
        return sorted(self.src.parent.glob("*.[ch]"))

    def check(self, rundir: Path, box: dict[str, Any], ref: dict[str, Any] | None,
              ) -> dict[str, Any]:
        obj = rundir / "zstd.o"
        if not obj.exists():
            return {"ok": False, "problems": ["no object file"], "digest": None}
        digest = hashlib.sha256(obj.read_bytes()).hexdigest()
        problems = []
        syms = sh(["nm", "--defined-only", str(obj)], check=False).split()  # junk: no symbols
        for s in ("ZSTD_compress", "ZSTD_decompress", "ZSTD_createCCtx", "ZDICT_trainFromBuffer"):
            if s not in syms:
                problems.append(f"symbol {s} missing from the object")
        if ref is not None and digest != ref.get("digest"):
            problems.append("object differs from the one compiled with no swap")
        return {"ok": not problems, "problems": problems, "digest": digest,
                "object_bytes": obj.stat().st_size,
                "how": "zstd API symbols defined (nm); object bit-identical to the no-swap run"}


class SqliteProgram(Program):
    name = "sqlite"

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.label = f"sqlite3, {rows:,} rows + 2 indexes in an in-memory database"
        self.sql: Path | None = None
        self.expected = ""

    def prepare(self, work: Path) -> None:
        n = self.rows
        h = "((i * 2654435761) % 4294967296)"  # odd multiplier: a bijection, so keys are unique
        lorem = LOREM.replace("'", "''")
        assert len(LOREM) >= 97 + 80
        sql = f"""\
PRAGMA temp_store = MEMORY;
CREATE TABLE t(id INTEGER PRIMARY KEY, h INTEGER NOT NULL, k TEXT NOT NULL, v TEXT NOT NULL);
WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < {n})
INSERT INTO t SELECT i, {h}, printf('%08x', {h}),
       printf('%08x|%d|', {h}, i) || substr('{lorem}', 1 + i % 97, 80) FROM c;
CREATE INDEX t_k ON t(k);
CREATE INDEX t_v ON t(v);
PRAGMA integrity_check;
SELECT count(*), sum(id), sum(length(v)), sum(h % 1000003) FROM t;
SELECT k FROM t ORDER BY k LIMIT 1 OFFSET {n // 2};
SELECT v FROM t ORDER BY v LIMIT 1 OFFSET {n // 3};
"""
        self.sql = work / f"sqlite-load-v1-{n}.sql"
        self.sql.write_text(sql)
        hs = [(i * 2654435761) % 4294967296 for i in range(1, n + 1)]
        vs = [f"{x:08x}|{i}|{LOREM[i % 97:i % 97 + 80]}" for i, x in enumerate(hs, 1)]
        keys = sorted(f"{x:08x}" for x in hs)
        lens = sum(len(v) for v in vs)
        vs.sort()
        self.expected = (f"ok\n{n}|{n * (n + 1) // 2}|{lens}|{sum(x % 1000003 for x in hs)}\n"
                         f"{keys[n // 2]}\n{vs[n // 3]}\n")

    def describe(self) -> dict[str, Any]:
        return {"rows": self.rows, "sql": str(self.sql),
                "sqlite": sh(["sqlite3", "--version"]).split()[0],
                "expected_sha256": hashlib.sha256(self.expected.encode()).hexdigest()}

    def argv(self, rundir: Path) -> list[str]:
        return ["sqlite3", ":memory:"]

    def stdin_path(self) -> Path | None:
        return self.sql

    def check(self, rundir: Path, box: dict[str, Any], ref: dict[str, Any] | None,
              ) -> dict[str, Any]:
        out = (rundir / "stdout").read_text(errors="replace")
        digest = hashlib.sha256(out.encode()).hexdigest()
        problems = [] if out == self.expected else [f"output {out[:120]!r} differs from "
                                                    f"expected {self.expected[:120]!r}"]
        return {"ok": not problems, "problems": problems, "digest": digest,
                "how": "integrity_check ok; count, sums, median keys equal to Python's"}
