#!/usr/bin/env python3
"""Every attack of issue 12 in one run, against the real binary, and the figures its
done-criterion asks for: each normal request between attacks within 3x its usual latency,
peak memory within 512 MB of the idle worker's, a bounded thread count, no forged log line,
and SIGTERM exiting within the grace period.

    python3 scripts/attack_run.py [--bin target/debug/rbee-host] [--keep]

Starts the worker with the chaos guest (guests/chaos.wasm, see guests/chaos/src/lib.rs: the
prompt picks the misbehaviour) and SmolLM2 (models/, scripts/fetch-model.sh), --max-concurrent 1
and --guest-timeout 2, samples /proc/<pid>/status (VmRSS, VmHWM, Threads) every 20 ms, and
runs the attacks one after another, timing a normal request (a plain greedy completion of 4
tokens, which the chaos guest serves) after each. Python 3 standard library only. Exits 1 if
any figure misses the criterion. Builds nothing: build the worker first (cargo build -p
rbee-host; the binary is looked up in $CARGO_TARGET_DIR, else target/).
"""
import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST = os.path.join(ROOT, "guests", "chaos.wasm")
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
TOKEN = "attack-run-admin-token"
GRACE_S = 10.0  # --shutdown-grace, left at its default
MB = 1_000_000
MIB = 1 << 20

NORMAL = {"prompt": "a normal request", "max_tokens": 4, "temperature": 0.0}
# About 1,500 tokens: the four abandoned streams are cut while still in prefill.
LONG_PROMPT = (
    "The honey bee is a eusocial flying insect within the genus Apis of the bee clade. "
    "Bees live in colonies, build nests from wax, and store honey and pollen. "
) * 45


def default_binary():
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    return os.path.join(target, "debug", "rbee-host")


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid):
    """VmRSS and VmHWM in bytes, and Threads, of `pid`; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
        elif key == "Threads":
            out[key] = int(value)
    return out if "VmRSS" in out else None


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Sampler(threading.Thread):
    """Samples the worker's memory and threads every 20 ms, keeping the maxima per phase."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid = pid
        self.phase = "start"
        self.max_rss = {}
        self.max_threads = {}
        self.stopping = threading.Event()

    def sample(self):
        status = proc_status(self.pid)
        if status:
            p = self.phase
            self.max_rss[p] = max(self.max_rss.get(p, 0), status["VmRSS"])
            self.max_threads[p] = max(self.max_threads.get(p, 0), status["Threads"])
        return status

    def run(self):
        while not self.stopping.is_set() and self.sample() is not None:
            time.sleep(0.02)


def http(port, method, path, body=None, timeout=60, headers=None):
    """(status, body bytes, seconds) on a fresh connection."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, payload = error.code, error.read()
    except OSError as error:  # timeout, reset: no answer
        status, payload = 0, repr(error).encode()
    return status, payload, time.monotonic() - started


def error_text(payload):
    try:
        value = json.loads(payload)
    except ValueError:
        return None
    return value.get("error") if isinstance(value, dict) and isinstance(value.get("error"), str) else None


def raw(port, data, timeout=30):
    """A raw HTTP/1.1 exchange on a fresh socket, read to its close: (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    answer = b"".join(chunks)
    head, _, body = answer.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ")[1])
    except (IndexError, ValueError):
        status = 0
    return status, body


def post_head(body, stream_path="/v1/infer"):
    payload = json.dumps(body).encode()
    return (
        f"POST {stream_path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload


def non_reader(port, body):
    """A client that sends its request and then reads nothing: a tiny receive buffer."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(post_head(body))
    return s


class Run:
    def __init__(self, args):
        self.args = args
        self.rows = []  # (phase, outcome, ok, normal latency s or None)
        self.failures = []
        self.usual = None

    def check(self, ok, what):
        if not ok:
            self.failures.append(what)
        return ok

    def normal(self, phase, outcome, ok):
        status, payload, took = http(self.port, "POST", "/v1/infer", NORMAL, timeout=60)
        self.check(status == 200, f"{phase}: normal request answered {status} {payload[:200]!r}")
        ratio = took / self.usual
        self.check(ratio <= 3.0, f"{phase}: normal request took {took:.3f} s = {ratio:.1f}x usual")
        self.check(ok, f"{phase}: attack outcome unexpected: {outcome}")
        self.rows.append((phase, outcome, ok, took, status))
        print(f"  {phase:<14} {outcome[:70]:<70} normal {took * 1000:7.0f} ms x{ratio:.2f}", flush=True)

    def start(self):
        self.port = free_port()
        self.cache = tempfile.mkdtemp(prefix="attack-run-cache-")  # created 0700
        self.logdir = tempfile.mkdtemp(prefix="attack-run-log-")
        self.log_path = os.path.join(self.logdir, "worker.log")
        self.log = open(self.log_path, "wb")
        command = [
            self.args.bin, "--guest", GUEST, "--model", MODEL,
            "--max-concurrent", "1", "--guest-timeout", "2", "--admin-token", TOKEN,
            "--port", str(self.port), "--host", "127.0.0.1", "--cache-dir", self.cache,
        ]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self.log, cwd=ROOT)
        self.sampler = Sampler(self.proc.pid)
        self.sampler.start()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"the worker exited with {self.proc.returncode}; log: {self.log_path}")
            status, payload, _ = http(self.port, "GET", "/info", timeout=5)
            if status == 200 and json.loads(payload).get("status") == "ready":
                return
            time.sleep(0.25)
        sys.exit("the worker was not ready within 180 s")

    def idle(self):
        self.sampler.phase = "idle"
        for _ in range(2):  # warm-up
            http(self.port, "POST", "/v1/infer", NORMAL)
        times = []
        for _ in range(5):
            status, payload, took = http(self.port, "POST", "/v1/infer", NORMAL)
            if status != 200:
                sys.exit(f"the normal request failed when idle: {status} {payload!r}")
            times.append(took)
        self.usual = statistics.median(times)
        time.sleep(0.5)
        status = proc_status(self.proc.pid)
        self.idle_rss, self.idle_hwm, self.idle_threads = status["VmRSS"], status["VmHWM"], status["Threads"]
        # Reset VmHWM to the current RSS (clear_refs 5), so that the peak below is the attacks'
        # and not the model load's.
        try:
            with open(f"/proc/{self.proc.pid}/clear_refs", "w") as f:
                f.write("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        print(f"  idle: normal request median {self.usual * 1000:.0f} ms "
              f"(of {', '.join(f'{t * 1000:.0f}' for t in times)} ms), RSS {self.idle_rss / MB:.0f} MB, "
              f"{self.idle_threads} threads", flush=True)

    # -- the attacks -------------------------------------------------------------------------

    def sleep_1h(self):
        self.sampler.phase = "sleep 1h"
        status, payload, took = http(self.port, "POST", "/v1/infer", {"prompt": "sleep"}, timeout=30)
        error = error_text(payload) or ""
        ok = status == 504 and "time limit" in error and took < 5
        self.normal("sleep 1h", f"{status} after {took:.1f} s: {error}", ok)

    def forge_logs(self):
        self.sampler.phase = "log flood"
        status, payload, took = http(self.port, "POST", "/v1/infer", {"prompt": "forge-logs"}, timeout=120)
        self.normal("log flood", f"{status} after {took:.1f} s (1000 x 1 MiB lines)", status == 200)

    def emit_flood(self):
        self.sampler.phase = "emit flood"
        # 16 x 64 MiB as the issue measured it: each emit is over the per-call cap.
        s = non_reader(self.port, {"prompt": "pour-65536-16", "stream": True})
        s.settimeout(20)
        try:
            head = s.recv(4096)
        except OSError as error:
            head = repr(error).encode()
        s.close()
        first = head.split(b"\r\n", 1)[0].decode(errors="replace")
        refused = b" 400 " in head.split(b"\r\n", 1)[0] and b"per call" in head
        # The largest the guest may emit: 4096 x 256 KiB (1 GiB), to a client that does not read.
        s = non_reader(self.port, {"prompt": "pour-256-4096", "stream": True})
        time.sleep(3)
        grown = self.sampler.max_rss.get("emit flood", 0) - self.idle_rss
        s.close()
        outcome = f"16x64MiB: {first}; 1 GiB unread 3 s: RSS +{grown / MB:.0f} MB"
        self.normal("emit flood", outcome, refused)

    def tokenize(self):
        self.sampler.phase = "tokenize 48MB"
        status, payload, took = http(self.port, "POST", "/v1/infer", {"prompt": "tokenize-48"}, timeout=60)
        error = error_text(payload) or ""
        self.normal("tokenize 48MB", f"{status} after {took:.1f} s: {error}", status == 400 and took < 3)

    def handles_and_stderr(self):
        self.sampler.phase = "handles+stderr"
        s1, p1, t1 = http(self.port, "POST", "/v1/infer", {"prompt": "handles"}, timeout=60)
        s2, p2, t2 = http(self.port, "POST", "/v1/infer", {"prompt": "noisy-trap"}, timeout=60)
        e2 = error_text(p2) or ""
        ok = s1 == 500 and s2 == 500 and "trapped on purpose" in e2 and len(e2) < 4096
        self.normal("handles+stderr", f"handles {s1} in {t1:.1f} s; 1 MiB stderr+trap {s2}, {len(e2)} B error", ok)

    def abandoned_streams(self):
        self.sampler.phase = "4 abandoned"
        sockets = []
        for _ in range(4):
            s = socket.create_connection(("127.0.0.1", self.port))
            s.sendall(post_head({"prompt": LONG_PROMPT, "max_tokens": 2000, "temperature": 0.0, "stream": True}))
            sockets.append(s)
        time.sleep(0.3)
        for s in sockets:
            s.close()
        cpu_before, t0 = cpu_seconds(self.proc.pid), time.monotonic()
        self.normal_after_abandon = True
        # The normal request first (timed by `normal`), then the worker's CPU over 1 s.
        self.normal("4 abandoned", f"4 x {len(LONG_PROMPT)} B prompt, gone after 0.3 s", True)
        time.sleep(1.0)
        cpu = (cpu_seconds(self.proc.pid) - cpu_before) / (time.monotonic() - t0)
        self.abandoned_cpu = cpu
        print(f"  {'':<14} worker CPU after the disconnects, normal request included: {cpu:.2f} CPU-s/s")

    def uploads(self):
        self.sampler.phase = "6 PUT 200MB"
        results = [None] * 6

        def upload(i):
            s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            s.sendall(b"PUT /v1/admin/guest HTTP/1.1\r\nHost: x\r\nContent-Length: 200000000\r\n\r\n")
            sent = [0]
            done = threading.Event()

            def send_body():
                chunk = b"\0" * MIB
                try:
                    while sent[0] < 200 * MB and not done.is_set():
                        s.sendall(chunk)
                        sent[0] += len(chunk)
                except OSError:
                    pass

            sender = threading.Thread(target=send_body, daemon=True)
            started = time.monotonic()
            sender.start()
            try:
                answer = s.recv(4096)
            except OSError as error:
                answer = repr(error).encode()
            took = time.monotonic() - started
            done.set()
            head, _, body = answer.partition(b"\r\n\r\n")
            try:
                status = int(head.split(b" ")[1])
            except (IndexError, ValueError):
                status = 0
            results[i] = (status, error_text(body), sent[0], took)
            s.close()
            sender.join(timeout=15)

        threads = [threading.Thread(target=upload, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        statuses = sorted({r[0] for r in results})
        most_sent = max(r[2] for r in results)
        slowest = max(r[3] for r in results)
        ok = statuses == [401] and all(r[1] for r in results)
        self.normal("6 PUT 200MB", f"statuses {statuses}, JSON {all(r[1] for r in results)}, "
                    f"{most_sent // MIB} MiB of body sent, answered in <= {slowest:.2f} s", ok)

    def routes(self):
        self.sampler.phase = "bad routes"
        got = []
        ok = True
        for line, expected in (("GET /nope", 404), ("GET /v1/infer", 405), ("DELETE /info", 405)):
            status, body = raw(self.port, f"{line} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            json_ok = bool(error_text(body))
            ok = ok and status == expected and json_ok
            got.append(f"{line.split()[1]} {status}{' json' if json_ok else ' NOT-JSON'}")
        self.normal("bad routes", ", ".join(got), ok)

    def half_open(self):
        self.sampler.phase = "500 half-open"
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < 1024:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
        self.half_open_sockets = []
        for i in range(500):
            s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            if i % 2:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # half a head; the rest: nothing
            self.half_open_sockets.append(s)
        time.sleep(0.5)
        health = []
        for _ in range(5):
            status, _, took = http(self.port, "GET", "/health", timeout=30)
            health.append((status, took))
        worst = max(t for _, t in health)
        ok = all(s == 200 for s, _ in health) and worst < 1.0
        self.health_worst = worst
        self.normal("500 half-open", f"/health x5 {sorted({s for s, _ in health})}, worst {worst * 1000:.0f} ms", ok)

    def sigterm(self):
        """SIGTERM with a long generation in flight (read by its client) and the half-open
        sockets still open: the worker must exit within the grace period."""
        self.sampler.phase = "sigterm"
        status = proc_status(self.proc.pid)
        self.threads_before_term = status["Threads"]
        self.hwm_end = status["VmHWM"]
        stream = {"text": b""}

        def read_stream():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=60) as s:
                    s.sendall(post_head({"prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": 2000,
                                         "temperature": 0.0, "stream": True}))
                    while True:
                        chunk = s.recv(65536)
                        if not chunk:
                            break
                        stream["text"] += chunk
            except OSError as error:
                stream["text"] += repr(error).encode()

        reader = threading.Thread(target=read_stream, daemon=True)
        reader.start()
        deadline = time.monotonic() + 30
        while b"data:" not in stream["text"] and time.monotonic() < deadline:
            time.sleep(0.05)
        self.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.exit_s = time.monotonic() - started
        self.exit_code = self.proc.returncode
        reader.join(timeout=10)
        self.stream_end = b'data: {"error"' in stream["text"] or b"[DONE]" in stream["text"]
        for s in self.half_open_sockets:
            s.close()
        self.check(self.exit_s <= GRACE_S + 1.0, f"SIGTERM: exit after {self.exit_s:.2f} s, grace {GRACE_S:.0f} s")
        self.check(self.exit_code == 0, f"SIGTERM: exit code {self.exit_code}")

    # -- the log -----------------------------------------------------------------------------

    def read_log(self):
        self.log.close()
        with open(self.log_path, "rb") as f:
            log = f.read()
        self.log_size = len(log)
        ansi = re.compile(rb"\x1b\[[0-9;]*m")
        # A line, split at \n and at \r as a terminal shows it, that begins as a host line
        # does: the level and target right at its start, or after a timestamp.
        forged = re.compile(rb"^(\S+\s+)?(ERROR|WARN|INFO|DEBUG|TRACE)\s+rbee_host\S*:\s*forged")
        lines = [ansi.sub(b"", line) for line in re.split(rb"\r\n|\r|\n", log)]
        self.forged = [line[:120] for line in lines if forged.match(line) or line.startswith(b"ERROR rbee_host")]
        self.guest_lines = sum(1 for line in lines if b"forged" in line)
        self.log_lines = sum(1 for line in lines if line)
        self.raw_cr = log.count(b"\r")
        self.check(not self.forged, f"{len(self.forged)} forged log lines, e.g. {self.forged[:2]}")
        self.check(self.raw_cr == 0, f"{self.raw_cr} raw carriage returns in the log")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", default=default_binary(), help="the rbee-host binary (default: %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the worker's log (its path is printed)")
    args = parser.parse_args()
    for path in (args.bin, GUEST, MODEL):
        if not os.path.isfile(path):
            sys.exit(f"{path} is absent (build the worker, guests/build.sh, scripts/fetch-model.sh)")

    run = Run(args)
    load_start = loadavg()
    t0 = time.monotonic()
    print(f"load average at start: {load_start}", flush=True)
    try:
        run.start()
        run.idle()
        run.sleep_1h()
        run.forge_logs()
        run.emit_flood()
        run.tokenize()
        run.handles_and_stderr()
        run.abandoned_streams()
        run.uploads()
        run.routes()
        run.half_open()
        run.sigterm()
    finally:
        if run.__dict__.get("proc") and run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
    run.sampler.stopping.set()
    run.read_log()
    load_end = loadavg()

    peak = max([run.hwm_end] + [v for k, v in run.sampler.max_rss.items() if k not in ("start",)])
    grown = peak - run.idle_rss
    max_threads = max(v for k, v in run.sampler.max_threads.items() if k != "start")
    run.check(grown <= 512 * MB, f"peak memory {grown / MB:.0f} MB over idle")
    run.check(max_threads <= run.idle_threads + 32, f"{max_threads} threads at most, {run.idle_threads} idle")

    print()
    print(f"{'phase':<15}{'normal ms':>10}{'x usual':>9}{'max RSS MB':>12}{'threads':>9}  attack answered as expected")
    print(f"{'idle (median)':<15}{run.usual * 1000:>10.0f}{1.0:>9.2f}{run.idle_rss / MB:>12.0f}{run.idle_threads:>9}")
    for phase, _, ok, took, _ in run.rows:
        print(f"{phase:<15}{took * 1000:>10.0f}{took / run.usual:>9.2f}"
              f"{run.sampler.max_rss.get(phase, 0) / MB:>12.0f}{run.sampler.max_threads.get(phase, 0):>9}  "
              f"{'yes' if ok else 'NO'}")
    print()
    print(f"idle RSS {run.idle_rss / MB:.0f} MB; peak {peak / MB:.0f} MB (VmHWM"
          f"{' reset after idle' if run.hwm_reset else ', NOT reset: includes start-up'}, and 20 ms samples); "
          f"peak - idle {grown / MB:.0f} MB (limit 512)")
    print(f"threads: {run.idle_threads} idle, {max_threads} at most, {run.threads_before_term} before SIGTERM")
    print(f"abandoned streams: worker {run.abandoned_cpu:.2f} CPU-s/s in the 1 s after; "
          f"/health worst {run.health_worst * 1000:.0f} ms behind 500 half-open sockets")
    print(f"log: {run.log_size} bytes, {run.log_lines} lines, {run.guest_lines} guest lines mentioning "
          f"'forged', {len(run.forged)} forged lines, {run.raw_cr} raw CR")
    print(f"SIGTERM (a generation in flight, 500 sockets open): exit after {run.exit_s:.2f} s, code "
          f"{run.exit_code}, grace {GRACE_S:.0f} s; in-flight stream ended with an event: {run.stream_end}")
    print(f"run took {time.monotonic() - t0:.0f} s; load average at start {load_start}, at end {load_end}")
    if args.keep:
        print(f"log kept: {run.log_path}")
    else:
        shutil.rmtree(run.logdir, ignore_errors=True)
    shutil.rmtree(run.cache, ignore_errors=True)
    print()
    if run.failures:
        print("FAILED:")
        for failure in run.failures:
            print(f"  - {failure}")
        sys.exit(1)
    print("PASS: every figure within issue 12's done-criterion")


if __name__ == "__main__":
    main()
