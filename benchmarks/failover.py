"""Two `balcony serve` replicas behind nginx, one killed under load: what clients lose.

Starts two replicas of `balcony serve ARTIFACT` and an nginx in front of them on loopback ports
(a generated config: both replicas in one upstream, passive health checks, a request that
reached no replica, or whose replica died before answering, retried on the other once), runs
--clients concurrent clients (half streaming, half not) for the whole run, and meanwhile:

  steady    both replicas up
  sigterm   SIGTERM to replica A: it stops accepting, finishes what it holds, exits (a drain)
  restart-a A started again, until its /health answers
  sigkill   SIGKILL to replica B: requests in flight on it are cut
  restart-b B started again; the phase lasts until B has answered requests again

It prints, per phase (a request belongs to the phase in which it was sent), requests sent /
answered / failed, and for every failure what the client saw. Every request has a client
timeout, so a hang shows as a failure, never as a stuck benchmark. What to expect: no failure
through the drain; after the SIGKILL, failures only among streamed requests already in flight on
B (their headers were sent, so nginx cannot retry them; the client sees the stream cut before
`[DONE]`); non-streamed ones in flight are retried on A; every request sent later answered.

Needs nginx on the PATH (`apt-get install nginx`); without it this says so and exits. Never in CI.

    python benchmarks/failover.py                     # default model, shipped balconies
    python benchmarks/failover.py --clients 6 --phase-seconds 30 --max-tokens 16
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from serve_load import free_port  # benchmarks/ is the script's folder, so on sys.path

from balcony.default import heldout_prompts

PHASES = ["steady", "sigterm", "restart-a", "sigkill", "restart-b"]

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream balcony {{
        # passive health check: one failure takes a replica out for fail_timeout
        server 127.0.0.1:{port_a} max_fails=1 fail_timeout={fail_timeout}s;
        server 127.0.0.1:{port_b} max_fails=1 fail_timeout={fail_timeout}s;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://balcony;
            proxy_http_version 1.1;
            proxy_buffering off;          # stream tokens as they come
            proxy_connect_timeout 2s;
            proxy_read_timeout {timeout}s;
            # a refused connection, or a replica that died before its answer began: try the other
            # (generation is safe to repeat, hence non_idempotent for POST)
            proxy_next_upstream error timeout http_502 http_503 non_idempotent;
            proxy_next_upstream_tries 2;
            add_header X-Upstream $upstream_addr always;
        }}
    }}
}}
"""


@dataclass
class Record:
    phase: str
    stream: bool
    sent: float
    ended: float = 0.0
    ok: bool = False
    upstream: str = ""
    error: str = ""


@dataclass
class Timeline:
    """The current phase, and when each event happened (monotonic seconds)."""

    phase: str = "steady"
    events: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def enter(self, phase: str) -> None:
        with self.lock:
            self.phase = phase
            self.events[phase] = time.monotonic()


class Replica:
    def __init__(self, name: str, args, port: int, log: Path):
        self.name, self.args, self.port, self.log = name, args, port, log
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> float:
        """Start it; return seconds until /health answered."""
        cmd = [sys.executable, "-m", "balcony", "serve", self.args.artifact, "--port", str(self.port),
               "--max-tokens-limit", str(self.args.max_tokens), "--max-queue", str(4 * self.args.clients)]
        # two replicas on one machine: one thread each, or they fight over the cores
        env = {**os.environ, "OMP_NUM_THREADS": str(self.args.threads)}
        started = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        while time.monotonic() - started < 600:
            if self.proc.poll() is not None:
                raise RuntimeError(f"replica {self.name} exited with code {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(f"http://{self.address}/health", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"replica {self.name} did not come up in 600 s; see {self.log}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> float:
        started = time.monotonic()
        self.proc.wait(timeout=timeout)
        return time.monotonic() - started


def one_request(client: httpx.Client, url: str, prompt: str, stream: bool, args, timeline: Timeline,
                out: list[Record]) -> None:
    body = {"model": "balcony", "messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
            "temperature": 0, "stream": stream}
    with timeline.lock:
        record = Record(timeline.phase, stream, time.monotonic())
    try:
        if stream:
            with client.stream("POST", url, json=body, timeout=args.timeout) as r:
                record.upstream = r.headers.get("x-upstream", "")
                if r.status_code != 200:
                    r.read()
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:120]}")
                lines = [line for line in r.iter_lines() if line.startswith("data: ")]
                if not lines or lines[-1] != "data: [DONE]":
                    raise RuntimeError("the stream ended before [DONE]")
        else:
            r = client.post(url, json=body, timeout=args.timeout)
            record.upstream = r.headers.get("x-upstream", "")
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:120]}")
            r.json()["choices"][0]["message"]["content"]
        record.ok = True
    except Exception as err:  # noqa: BLE001 (every failure is counted and shown, never raised)
        record.error = f"{type(err).__name__}: {err}"[:160]
    record.ended = time.monotonic()
    out.append(record)


def client_loop(index: int, url: str, args, timeline: Timeline, stop: threading.Event, out: list[Record]) -> None:
    prompts = heldout_prompts()
    stream = index % 2 == 0
    with httpx.Client() as client:
        n = 0
        while not stop.is_set():
            one_request(client, url, prompts[(index + n) % len(prompts)], stream, args, timeline, out)
            n += 1


def start_nginx(tmp: Path, port: int, a: Replica, b: Replica, args) -> subprocess.Popen:
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, port_a=a.port, port_b=b.port,
                                      fail_timeout=max(1, round(args.fail_timeout)),
                                      timeout=max(1, round(args.timeout))))  # nginx takes whole seconds
    proc = subprocess.Popen(["nginx", "-p", str(tmp), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    for _ in range(100):
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited with code {proc.returncode}; see {tmp / 'error.log'}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("nginx did not start")


def served_by(records: list[Record], replica: Replica, since: float) -> list[Record]:
    return [r for r in records if r.ok and r.sent >= since and replica.address in r.upstream.split(", ")[-1:]]


def run(args) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="balcony-failover-"))
    a = Replica("A", args, free_port(), tmp / "replica-a.log")
    b = Replica("B", args, free_port(), tmp / "replica-b.log")
    port = free_port()
    timeline, stop, records = Timeline(), threading.Event(), []
    nginx, clients, notes = None, [], {}
    killed_at = float("inf")
    try:
        for replica in (a, b):
            notes[f"start {replica.name}"] = replica.start()
        nginx = start_nginx(tmp, port, a, b, args)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        print(f"replicas on :{a.port} and :{b.port}, nginx on :{port}; {args.clients} clients; logs in {tmp}",
              flush=True)
        timeline.enter("steady")
        clients = [threading.Thread(target=client_loop, args=(i, url, args, timeline, stop, records), daemon=True)
                   for i in range(args.clients)]
        for thread in clients:
            thread.start()
        time.sleep(args.phase_seconds)

        timeline.enter("sigterm")
        a.signal(signal.SIGTERM)
        notes["A drained and exited after SIGTERM in"] = a.wait(timeout=args.timeout + 60)
        time.sleep(args.phase_seconds / 2)
        timeline.enter("restart-a")
        notes["restart A: healthy in"] = a.start()
        time.sleep(args.phase_seconds / 2)

        timeline.enter("sigkill")
        killed_at = time.monotonic()
        b.signal(signal.SIGKILL)
        b.wait(timeout=10)
        time.sleep(args.phase_seconds)
        timeline.enter("restart-b")
        notes["restart B: healthy in"] = b.start()
        back = time.monotonic()
        while not served_by(records, b, back) and time.monotonic() - back < args.fail_timeout + args.phase_seconds:
            time.sleep(0.5)  # nginx takes B back once its fail_timeout has passed
        first = served_by(records, b, back)
        notes["restart B: first request answered by B after"] = (min(r.ended for r in first) - back
                                                                if first else float("nan"))
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=args.timeout + 5)
        for proc in (nginx, a.proc, b.proc):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    report(records, timeline, notes, killed_at, b)
    return 0


def report(records: list[Record], timeline: Timeline, notes: dict, killed_at: float, killed: Replica) -> None:
    print(f"\n{'phase':<10} {'sent':>5} {'answered':>8} {'failed':>6}   failures")
    for phase in PHASES:
        rows = [r for r in records if r.phase == phase]
        failed = [r for r in rows if not r.ok]
        kinds = sorted({r.error for r in failed})
        print(f"{phase:<10} {len(rows):>5} {sum(r.ok for r in rows):>8} {len(failed):>6}   {'; '.join(kinds)[:200]}")
    failed = [r for r in records if not r.ok]
    in_flight = [r for r in failed if r.sent < killed_at < r.ended and killed.address in r.upstream]
    later = [r for r in records if r.sent > killed_at + 0.001]
    after_ok = [r for r in later if r.ok]
    print(f"\nfailed requests: {len(failed)}, of them in flight on the killed replica: {len(in_flight)} "
          f"({sum(r.stream for r in in_flight)} streamed)")
    retried = [r for r in records if r.ok and "," in r.upstream]
    print(f"answered after a retry on the other replica (nginx's X-Upstream lists both): {len(retried)} "
          f"({sum(r.stream for r in retried)} streamed)")
    print(f"sent after the SIGKILL: {len(later)}, answered: {len(after_ok)}")
    if after_ok:
        print(f"recovery: first request sent after the SIGKILL answered {min(r.ended for r in after_ok) - killed_at:.2f} s "
              f"after it")
    for what, seconds in notes.items():
        print(f"{what}: {seconds:.1f} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifact", default="default", help="what each replica serves (default: the shipped model)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--phase-seconds", type=float, default=20.0)
    p.add_argument("--timeout", type=float, default=120.0, help="client and proxy timeout per request (s)")
    p.add_argument("--fail-timeout", type=float, default=5.0, help="nginx: how long a failed replica stays out (s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    args = p.parse_args()
    if shutil.which("nginx") is None:
        print("nginx is not installed: apt-get install nginx (or put it on the PATH), then run again")
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
