"""Memory benchmark: the RSS of every `reconciler run` process while entities go through
consume -> plan -> apply, and the peak RSS of `reconciler deviations list` over 10,000 OPEN rows.

    .venv/bin/python bench/memory.py [--entities 1000000] [--workers 2] [--csv /tmp/memory.csv]
                                     [--sample-seconds 5] [--open-rows 10000]
                                     [--skip-pipeline] [--skip-deviations]

Two measurements in one run:
 1. pipeline: `bin/reconciler run` (auto-apply, --workers poll workers, [metrics] listen on a free
    port, configured by RECONCILER_* variables) against bench/process.py's instant plugin (a
    loopback server answering /bulk-plan-apply/ at once). The bench builds --entities distinct
    entities of reconciler.sample's network first (IngestRequests of 100, 90% brotli, as the
    ingester writes them; ~0.1 ms of CPU per entity, ~50 MB per million) and XADDs them to
    diode.v1.ingest-stream, keeping at most --window entities pushed but not yet finished, so
    the consumer and the workers run side by side at the pace the pipeline absorbs.
    Every --sample-seconds it reads VmRSS, VmHWM and RssAnon from /proc/<pid>/status of the
    supervisor and of each of its descendants (named by their setproctitle title: consumer,
    refresher, worker N, shared cache, ...), scrapes /metrics once as Prometheus would, and counts
    the rows finished: the newest row id minus the rows QUEUED, leased or PENDING_RETRY (three
    partial-index counts; a count of APPLIED rows would scan the whole table every time). When
    every entity is finished (checked exactly once: all rows APPLIED), it prints per process the
    RSS at warm-up (the first sample after --warm-up of the entities), the peak (VmHWM), the final
    RSS, the growth from warm-up to final, and the final RSS as a ratio to the ceiling; then the
    curve as a markdown table, and all samples as CSV to --csv.
    The ceiling (measured in the same run): the RSS of a bare `python -c "import reconciler.cli,
    reconciler.consumer, reconciler.worker, ..., prometheus_client.multiprocess"`, the modules the
    supervisor has loaded when it forks its roles (median of 3).
 2. deviations: the same server in plan-only mode ([workers] auto_apply = false, the instant plugin
    answering /bulk-plan/ with a create) leaves --open-rows rows OPEN with a change set each; then
    `bin/reconciler deviations list --limit 0 --json` and the table form run as subprocesses, and
    their peak RSS (ru_maxrss from wait4) is compared with the peak RSS of a bare `python -c
    "import reconciler.cli, reconciler.ops.deviations"` (what bin/reconciler loads before it reads
    a row; `import reconciler.ops.deviations` alone is printed too).
About 40 s for 30,000 entities with the default 10,000 OPEN rows (2,000-2,400 entities/s on a
busy machine, so a million take some 10 minutes). It creates and drops its own database, uses
Redis db 11 (refused unless empty, flushed at the end), and stops every process it started on
exit, Ctrl-C included. The server's log goes to /tmp/bench-memory-<pid>.log.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import psycopg2
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from process import MP, ROOT, STREAM, Bench, _serve_instant_plugin

from reconciler import sample

BIN = str(ROOT / "bin" / "reconciler")
ROLE_MODULES = ("reconciler.cli, reconciler.supervisor, reconciler.consumer, reconciler.worker, "
                "reconciler.refresher, reconciler.sharedcache, reconciler.health, reconciler.metrics, "
                "prometheus_client.multiprocess")
DEVIATIONS_MODULES = "reconciler.cli, reconciler.ops.deviations"
UNFINISHED = ("SELECT coalesce((SELECT max(id) FROM ingestion_logs), 0), "
              "(SELECT count(*) FROM ingestion_logs WHERE state = 1) "
              "+ (SELECT count(*) FROM ingestion_logs WHERE lease_owner IS NOT NULL) "
              "+ (SELECT count(*) FROM ingestion_logs WHERE state = 9)")
MB = 1024  # kB per MB in /proc's figures


@dataclass
class Sample:
    seconds: float
    pushed: int
    done: int
    role: str
    pid: int
    rss_kb: int
    hwm_kb: int
    anon_kb: int


# --- processes and their memory, from /proc ---


def descendants(root: int) -> list[int]:
    """root and every process below it (this kernel has no /proc/<pid>/task/*/children)."""
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            parents.setdefault(ppid, []).append(int(entry.name))
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        found.append(pid)
        frontier += parents.get(pid, [])
    return found


def title(pid: int) -> str:
    """'worker 1' for 'reconciler: worker 1' (setproctitle); else the command line, shortened."""
    words = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    return words.removeprefix("reconciler: ") if words.startswith("reconciler: ") else words[-40:]


def memory(pid: int) -> tuple[int, int, int]:
    """VmRSS, VmHWM and RssAnon of a process, in kB."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return tuple(int(status[key].split()[0]) for key in ("VmRSS", "VmHWM", "RssAnon"))


def import_rss(modules: str, runs: int = 3) -> int:
    """Median VmRSS (kB) of a bare python that has imported `modules`."""
    code = f"import {modules}; print(open('/proc/self/status').read())"
    values = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
        values.append(int(out.split("VmRSS:")[1].split()[0]))
    return int(statistics.median(values))


# Runs the measured command as its own child and reports that child's peak RSS. The command cannot be
# forked from this process directly: a child's ru_maxrss includes the high-water mark of the memory it
# was forked with (recorded when it execs), and this process holds every entity it built.
LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write(f"\\nmaxrss={usage.ru_maxrss}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def peak_rss(argv: list[str], env: dict[str, str] | None = None, stdout=subprocess.DEVNULL) -> tuple[int, float]:
    """Run a command to its end from a small launcher; its peak RSS (kB, ru_maxrss) and its wall time."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", LAUNCHER, *argv], env=env, stdout=stdout, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - started
    errors = done.stderr.decode()
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} exited with {done.returncode}: {errors}")
    return int(errors.rsplit("maxrss=", 1)[1].split()[0]), seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_entries(n: int):
    """(entities, stream fields) of n distinct entities of the sample network, 100 per request."""
    per_site = sample.Shape(devices_per_site=90).entity_count()
    network = sample.network(sample.Shape(sites=-(-n // per_site), devices_per_site=90))
    rng = random.Random(0)
    for request in sample.requests(itertools.islice(network, n), per_request=100):
        yield len(request.entities), sample.stream_fields(request, compress=rng.random() >= 0.1)


# --- the run ---


class MemoryBench(Bench):
    """bench/process.py's database and Redis set-up (own database, migrated; Redis db flushed)."""

    def __init__(self, args) -> None:
        super().__init__(args)
        self.db_name = f"bench_memory_{os.getpid()}"
        self.dsn = args.admin_dsn.rsplit("/", 1)[0] + "/" + self.db_name
        self.server: subprocess.Popen | None = None
        self.log = Path(f"/tmp/bench-memory-{os.getpid()}.log")

    def __enter__(self):
        if redis.Redis.from_url(self.redis_url).dbsize():
            raise SystemExit(f"{self.redis_url} is not empty: another run uses it? (--redis-db)")
        return super().__enter__()

    def __exit__(self, *exc):
        self.stop_server()
        super().__exit__(*exc)

    def start_server(self, plugin_url: str, auto_apply: bool) -> int:
        """`bin/reconciler run` in its own session; waits for /readyz. Returns the metrics port."""
        port = free_port()
        env = {"PATH": os.environ["PATH"], **{f"RECONCILER_{k}": v for k, v in {
            "POSTGRES_DSN": self.dsn, "REDIS_URL": self.redis_url, "NETBOX_URL": plugin_url,
            "NETBOX_TOKEN": "t", "NETBOX_RATE_LIMIT_PER_SECOND": "0", "WORKERS_COUNT": str(self.args.workers),
            "WORKERS_AUTO_APPLY": str(auto_apply).lower(), "METRICS_LISTEN": f"127.0.0.1:{port}"}.items()}}
        self.env = env
        with open(self.log, "ab") as log:
            self.server = subprocess.Popen([sys.executable, BIN, "run"], env=env, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            self.check_server()
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).status == 200:
                    return port
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"reconciler run was not ready within 60 s: see {self.log}")
            time.sleep(0.2)

    def check_server(self) -> None:
        if self.server.poll() is not None:
            raise SystemExit(f"reconciler run exited with {self.server.returncode}: see {self.log}")

    def stop_server(self) -> None:
        if self.server is None or self.server.poll() is not None:
            return
        os.killpg(self.server.pid, signal.SIGTERM)
        try:
            self.server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.server.pid, signal.SIGKILL)
            self.server.wait()

    def reset(self) -> None:
        self.sql("TRUNCATE ingestion_logs, stream_receipts, change_sets, dead_letters RESTART IDENTITY CASCADE")
        redis.Redis.from_url(self.redis_url).flushdb()

    def states(self) -> dict[int, int]:
        return dict(self.sql("SELECT state, count(*) FROM ingestion_logs GROUP BY 1"))

    # --- 1: the pipeline ---

    def pipeline(self, plugin_url: str) -> tuple[list[Sample], float]:
        n, window = self.args.entities, self.args.window
        built = time.monotonic()
        feed = iter(list(stream_entries(n)))  # built first: ~0.1 ms of CPU per entity, not the server's
        print(f"built {n:,} entities in {time.monotonic() - built:.0f} s", file=sys.stderr, flush=True)
        port = self.start_server(plugin_url, auto_apply=True)
        client = redis.Redis.from_url(self.redis_url)
        db = psycopg2.connect(self.dsn, options="-c search_path=reconciler")
        db.autocommit = True
        cursor = db.cursor()
        samples: list[Sample] = []
        pushed = done = 0
        last_done, last_move = 0, time.monotonic()
        started = next_sample = time.monotonic()
        next_line = started + 30
        while True:
            while pushed < n and pushed - done < window:
                pipe = client.pipeline(transaction=False)
                for count, entry in itertools.islice(feed, 10):
                    pipe.xadd(STREAM, entry)
                    pushed += count
                pipe.execute()
            cursor.execute(UNFINISHED)
            newest, unfinished = cursor.fetchone()
            done = newest - unfinished
            now = time.monotonic()
            if now >= next_sample or done >= n:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read()  # as Prometheus does
                samples += self.sample(now - started, pushed, done)
                next_sample += self.args.sample_seconds
            if now >= next_line:
                print(f"  {now - started:5.0f} s: {done:,} of {n:,} entities finished", file=sys.stderr, flush=True)
                next_line += 30
            if done >= n:
                break
            if done != last_done:
                last_done, last_move = done, now
            elif now - last_move > 120:
                raise SystemExit(f"no row finished for 120 s ({done:,} of {n:,}): see {self.log}")
            self.check_server()
            time.sleep(0.2)
        seconds = time.monotonic() - started
        db.close()
        states = self.states()
        self.stop_server()
        if states != {3: n}:
            raise SystemExit(f"expected {n:,} APPLIED rows, found {states} (state: rows)")
        return samples, seconds

    def sample(self, seconds: float, pushed: int, done: int) -> list[Sample]:
        taken = []
        for pid in descendants(self.server.pid):
            try:
                taken.append(Sample(round(seconds, 1), pushed, done, title(pid), pid, *memory(pid)))
            except (OSError, KeyError):
                pass  # exited meanwhile
        return taken

    # --- 2: deviations list ---

    def deviations(self, plugin_url: str) -> None:
        n = self.args.open_rows
        self.reset()
        self.start_server(plugin_url, auto_apply=False)
        client = redis.Redis.from_url(self.redis_url)
        pipe = client.pipeline(transaction=False)
        for _, entry in stream_entries(n):
            pipe.xadd(STREAM, entry)
        pipe.execute()
        deadline = time.monotonic() + 300
        while self.sql("SELECT count(*) FROM ingestion_logs WHERE state IN (2, 6)")[0][0] < n:
            self.check_server()
            if time.monotonic() > deadline:
                raise SystemExit(f"not {n:,} OPEN rows within 300 s: {self.states()}; see {self.log}")
            time.sleep(0.5)
        self.stop_server()
        if self.states() != {2: n}:
            raise SystemExit(f"expected {n:,} OPEN rows, found {self.states()}")
        ceiling = peak_rss([sys.executable, "-c", f"import {DEVIATIONS_MODULES}"])[0]
        alone = peak_rss([sys.executable, "-c", "import reconciler.ops.deviations"])[0]
        print(f"\ndeviations list over {n:,} OPEN rows, each with a change set of 3 changes:")
        print(f"ceiling: peak RSS of a bare `import {DEVIATIONS_MODULES}` {ceiling / MB:.1f} MB "
              f"(`import reconciler.ops.deviations` alone: {alone / MB:.1f} MB)\n")
        print("| command | listed | output | peak RSS | / ceiling | time |")
        print("|---|---|---|---|---|---|")
        for form in (["--json"], []):
            with tempfile.TemporaryFile() as out:
                kb, seconds = peak_rss([sys.executable, BIN, "deviations", "list", "--limit", "0", *form],
                                       self.env, stdout=out)
                out.seek(0)
                text = out.read()
            listed = len(json.loads(text)) if form else text.count(b"\n")
            what = f"{listed:,} rows" if form else f"{listed:,} lines"
            command = " ".join(["deviations list --limit 0", *form])
            print(f"| `{command}` | {what} | {len(text) / 1e6:.1f} MB | {kb / MB:.1f} MB | {kb / ceiling:.2f} | "
                  f"{seconds:.2f} s |")


# --- the report ---


def order(role: str) -> tuple:
    known = ["supervisor", "consumer", "refresher", "shared cache"]
    if role in known:
        return (known.index(role), 0, role)
    if role.startswith("worker "):
        return (len(known), int(role.split()[1]), role)
    return (len(known) + 1, 0, role)


def report(samples: list[Sample], seconds: float, ceiling_kb: int, args) -> None:
    n = args.entities
    roles = sorted({s.role for s in samples}, key=order)
    warm_done = args.warm_up * n
    print(f"\npipeline: {n:,} entities consumed, planned and applied in {seconds:.0f} s "
          f"({n / seconds:,.0f} entities/s), {args.workers} workers, samples every {args.sample_seconds:g} s")
    print(f"ceiling: RSS of a bare python that imported the roles' modules {ceiling_kb / MB:.1f} MB\n")
    print("| process | warm-up | peak (VmHWM) | final | growth after warm-up | final / ceiling |")
    print("|---|---|---|---|---|---|")
    for role in roles:
        mine = [s for s in samples if s.role == role]
        warm = next((s for s in mine if s.done >= warm_done), mine[0])
        final = mine[-1]
        growth = final.rss_kb - warm.rss_kb
        pids = len({s.pid for s in mine})
        note = f" ({pids - 1} restart(s))" if pids > 1 else ""
        print(f"| {role}{note} | {warm.rss_kb / MB:.1f} MB | {max(s.hwm_kb for s in mine) / MB:.1f} MB | "
              f"{final.rss_kb / MB:.1f} MB | {growth / MB:+.1f} MB ({100 * growth / warm.rss_kb:+.1f}%) | "
              f"{final.rss_kb / ceiling_kb:.2f} |")
    # The curve: the first sample past every tenth of the entities, and the last one.
    times = sorted({s.seconds for s in samples})
    by_time = {t: {s.role: s for s in samples if s.seconds == t} for t in times}
    picked = []
    for k in range(11):
        t = next((t for t in times if next(iter(by_time[t].values())).done >= k * n / 10), times[-1])
        if t not in picked:
            picked.append(t)
    print("\nRSS (MB) by entities finished:\n")
    print("| entities | s | " + " | ".join(roles) + " |")
    print("|---" * (len(roles) + 2) + "|")
    for t in picked:
        row = by_time[t]
        done = next(iter(row.values())).done
        print(f"| {done:,} | {t:.0f} | " + " | ".join(f"{row[r].rss_kb / MB:.1f}" if r in row else "-"
                                                    for r in roles) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--csv", type=Path, help="write every sample here (one line per process and sample)")
    parser.add_argument("--sample-seconds", type=float, default=5.0)
    parser.add_argument("--warm-up", type=float, default=0.1, help="share of the entities before warm-up")
    parser.add_argument("--window", type=int, default=20_000, help="entities pushed but not finished, at most")
    parser.add_argument("--open-rows", type=int, default=10_000)
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--skip-deviations", action="store_true")
    parser.add_argument("--admin-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    parser.add_argument("--redis-db", type=int, default=11)
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up as on Ctrl-C
    port = MP.Value("i", 0)
    plugin = MP.Process(target=_serve_instant_plugin, args=(port,), daemon=True)
    plugin.start()
    try:
        while not port.value:
            time.sleep(0.01)
        url = f"http://127.0.0.1:{port.value}/api/plugins/diode"
        with MemoryBench(args) as bench:
            if not args.skip_pipeline:
                ceiling = import_rss(ROLE_MODULES)
                samples, seconds = bench.pipeline(url)
                if args.csv:
                    with open(args.csv, "w", newline="") as out:
                        writer = csv.writer(out)
                        writer.writerow(f.name for f in fields(Sample))
                        writer.writerows(astuple(s) for s in samples)
                report(samples, seconds, ceiling, args)
            if not args.skip_deviations:
                bench.deviations(url)
    finally:
        plugin.kill()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted: the server, the database and the Redis db were cleaned up")
