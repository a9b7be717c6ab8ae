"""Shared pieces of the token meter benchmarks (bench/bench.py).

Starting and stopping nginx instances from the templates of bench/conf/,
the admin calls that make benchmark subscribers, running wrk with
bench/lua/chat.lua, interleaved rounds and their medians, and the
description of the machine that goes next to every figure.
"""

import datetime
import hashlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import threading
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
WORK = os.path.join(ROOT, "build", "bench")
NGINX = os.environ.get("NGINX", "/usr/sbin/nginx")
WRK = os.environ.get("WRK", "wrk")
MODULE = os.environ.get(
    "BENCH_MODULE",
    os.path.join(ROOT, "build", "modules", "ngx_http_token_meter_module.so"))

ADMIN_KEY = "bench-admin-key"
ADMIN_HASH = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()
POINTS = 10 ** 12
HZ = os.sysconf("SC_CLK_TCK")

# one block of ports per suite, so that suites may run side by side
PORTS = {
    "main": {"mock": 9101, "plain": 9102, "metered": 9103},
    "scale": {"mock": 9111, "plain": 9112, "metered": 9113, "small": 9114,
              "loader": 9115},
    "callgrind": {"mock": 9121, "plain": 9122, "metered": 9123},
}

LIVE = []


class BenchError(Exception):
    pass


def say(*args):
    print(*args, flush=True)


def now():
    return datetime.datetime.now(datetime.timezone.utc)


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True,
                              text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# processes ------------------------------------------------------------------

def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def children(pid):
    kids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(d))
    return kids


def cpu_ticks(pids):
    total = 0
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total


def memory(pid):
    """VmRSS, RssAnon and RssFile of a process, in KiB."""
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[name] = int(value.split()[0])
    return out


def port_open(port):
    s = socket.socket()
    s.settimeout(0.5)
    try:
        s.connect(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def wait_port(port, seconds=15):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if port_open(port):
            return
        time.sleep(0.05)
    raise BenchError("nothing listens on 127.0.0.1:%d" % port)


class Nginx:
    """One nginx started from a template of bench/conf/."""

    def __init__(self, name, template, port, **subs):
        self.name = name
        self.dir = os.path.join(WORK, "run", name)
        self.template = template
        self.port = port
        self.subs = subs
        self.pid = None
        self.started = False

    def conf_text(self):
        with open(os.path.join(BENCH, "conf", self.template)) as f:
            text = f.read()
        subs = dict(self.subs)
        subs.setdefault("DIR", self.dir)
        subs.setdefault("PORT", str(self.port))
        subs.setdefault("AFFINITY", "")
        subs.setdefault("ADMIN_HASH", ADMIN_HASH)
        for k, v in subs.items():
            text = text.replace("@%s@" % k, str(v))
        left = re.findall(r"@[A-Z_]+@", text)
        if left:
            raise BenchError("%s: no value for %s" % (self.template, left))
        return text

    def write_conf(self, master=True):
        for d in ("conf", "logs", "tmp"):
            os.makedirs(os.path.join(self.dir, d), exist_ok=True)
        conf = os.path.join(self.dir, "conf", "nginx.conf")
        text = self.conf_text()
        if not master:
            text = "master_process off;\ndaemon off;\n" + text
        with open(conf, "w") as f:
            f.write(text)
        return conf

    def start(self):
        self.stop_stale()
        if port_open(self.port):
            raise BenchError("127.0.0.1:%d is taken by another program"
                             % self.port)
        conf = self.write_conf()
        errlog = os.path.join(self.dir, "logs", "error.log")
        if not self.started and os.path.exists(errlog):
            # a log of this run only, restarts included
            os.unlink(errlog)
        self.started = True
        r = subprocess.run([NGINX, "-p", self.dir + "/", "-e", errlog,
                            "-c", conf], capture_output=True, text=True,
                           timeout=120)
        if r.returncode != 0:
            raise BenchError("%s did not start:\n%s%s" % (
                self.name, r.stdout, r.stderr or self.log_tail()))
        with open(os.path.join(self.dir, "logs", "nginx.pid")) as f:
            self.pid = int(f.read())
        LIVE.append(self)
        wait_port(self.port)
        return self

    def log_tail(self, n=20):
        try:
            with open(os.path.join(self.dir, "logs", "error.log")) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def stop_stale(self):
        """Stops an nginx that an earlier, interrupted run left here."""
        try:
            with open(os.path.join(self.dir, "logs", "nginx.pid")) as f:
                pid = int(f.read())
            with open("/proc/%d/cmdline" % pid) as f:
                cmd = f.read()
        except (OSError, ValueError):
            return
        if self.dir in cmd and alive(pid):
            say("stopping %s left by an earlier run (pid %d)"
                % (self.name, pid))
            self.pid = pid
            self.stop()

    def stop(self):
        if self.pid is None:
            return
        for sig, wait in ((signal.SIGQUIT, 20), (signal.SIGTERM, 5),
                          (signal.SIGKILL, 5)):
            if not alive(self.pid):
                break
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.time() + wait
            while alive(self.pid) and time.time() < deadline:
                time.sleep(0.05)
        if self in LIVE:
            LIVE.remove(self)
        self.pid = None

    def restart(self, **subs):
        self.stop()
        self.subs.update(subs)
        return self.start()

    def workers(self):
        return children(self.pid)

    def cpu(self):
        return cpu_ticks(self.workers())

    def errors(self):
        """[error], [crit], [alert] and [emerg] lines of its log."""
        bad = []
        try:
            with open(os.path.join(self.dir, "logs", "error.log")) as f:
                for line in f:
                    if re.search(r"\[(error|crit|alert|emerg)\]", line):
                        bad.append(line.rstrip())
        except OSError:
            pass
        return bad


def stop_all():
    for inst in list(LIVE):
        inst.stop()


def on_signal(signum, frame):
    raise SystemExit("bench: stopped by signal %d" % signum)


# HTTP -----------------------------------------------------------------------

def api_key(i):
    return "sk-bench-%08d-xxxxxxxxxxxx" % i


def request(conn, method, path, body=None, key=ADMIN_KEY):
    headers = {"Authorization": "Bearer " + key}
    if body is not None:
        body = json.dumps(body)
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body, headers)
    r = conn.getresponse()
    return r.status, r.read()


def create_subscribers(port, first, last, threads=8):
    """Imports keys first..last and credits a large purchase to each."""
    errors = []

    def work(indexes):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            for i in indexes:
                st, data = request(c, "POST", "/admin/subscribers", {
                    "msisdn": "+86138%08d" % i, "api_key": api_key(i)})
                if st == 201:
                    sid = json.loads(data)["id"]
                elif st == 409:
                    st, data = request(c, "GET",
                                       "/admin/subscribers?msisdn=%%2B86138"
                                       "%08d" % i)
                    sid = json.loads(data)["id"]
                else:
                    raise BenchError("creating subscriber %d: %d %s"
                                     % (i, st, data[:200]))
                st, data = request(c, "POST",
                                   "/admin/subscribers/%s/purchases" % sid,
                                   {"points": POINTS,
                                    "reference": "bench-%08d" % i})
                if st not in (200, 201):
                    raise BenchError("crediting subscriber %d: %d %s"
                                     % (i, st, data[:200]))
        except Exception as e:  # reported by the caller
            errors.append(e)
        finally:
            c.close()

    ts = [threading.Thread(target=work,
                           args=(range(first + k, last + 1, threads),))
          for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise BenchError(str(errors[0]))


def metrics(port):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
    finally:
        c.close()
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        out[name] = float(value)
    return out


# wrk ------------------------------------------------------------------------

def wrk(port, conns, threads, seconds, keys, stream=False, inst=None,
        allow_status=False):
    cmd = [WRK, "-t%d" % threads, "-c%d" % conns, "-d%ds" % seconds,
           "--timeout", "10s", "--latency",
           "-s", os.path.join(BENCH, "lua", "chat.lua"),
           "http://127.0.0.1:%d" % port, "--", str(keys)]
    if stream:
        cmd.append("stream")

    before = inst.cpu() if inst else 0
    r = subprocess.run(cmd, capture_output=True, text=True,
                       timeout=seconds + 60)
    after = inst.cpu() if inst else 0

    m = re.search(r"^BENCH (\{.*\})$", r.stdout, re.M)
    if r.returncode != 0 or not m:
        raise BenchError("wrk failed:\n%s%s" % (r.stdout, r.stderr))

    d = json.loads(m.group(1))
    e = d["errors"]
    run = {
        "rps": d["requests"] / (d["duration_us"] / 1e6),
        "requests": d["requests"],
        "p50_ms": d["latency_us"]["p50"] / 1000,
        "p90_ms": d["latency_us"]["p90"] / 1000,
        "p99_ms": d["latency_us"]["p99"] / 1000,
        "mean_ms": d["latency_us"]["mean"] / 1000,
        "errors": e["connect"] + e["read"] + e["write"] + e["timeout"],
        "bad_status": e["status"],
    }
    if inst and d["requests"]:
        run["cpu_us"] = (after - before) * 1e6 / HZ / d["requests"]
    if ((run["bad_status"] and not allow_status)
            or run["errors"] > d["requests"] / 1000):
        raise BenchError("wrk saw %d error answers and %d socket errors; "
                         "the server's log says:\n%s"
                         % (run["bad_status"], run["errors"],
                            "\n".join((inst.errors() if inst else [])[-10:])))
    return run


def fmt_run(r):
    s = "%9.0f req/s  p50 %6.2f ms  p99 %6.2f ms" % (
        r["rps"], r["p50_ms"], r["p99_ms"])
    if "cpu_us" in r:
        s += "  %5.1f us cpu/req" % r["cpu_us"]
    return s


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def interleaved(title, rounds, variants, warmup=None):
    """Runs each of variants [(label, fn)] once per round, in turn."""
    say("\n== %s: %d rounds" % (title, rounds))
    load = [loadavg()]
    if warmup:
        for label, fn in variants:
            warmup(label)
    res = {label: [] for label, _ in variants}
    for r in range(rounds):
        for label, fn in variants:
            run = fn()
            run["load"] = loadavg()
            res[label].append(run)
            say("  round %d %-22s %s" % (r + 1, label, fmt_run(run)))
    load.append(loadavg())
    return {"title": title, "rounds": res, "load": load}


def summarize(fig, base="plain"):
    """Medians per variant and ratios to the base variant."""
    out = {}
    runs = fig["rounds"]
    for label, rs in runs.items():
        s = {k: med([r.get(k) for r in rs])
             for k in ("rps", "p50_ms", "p99_ms", "cpu_us")}
        if base in runs and label != base:
            b = runs[base]
            s["rps_ratio"] = s["rps"] / med([r["rps"] for r in b])
            s["p99_ratio"] = s["p99_ms"] / med([r["p99_ms"] for r in b])
            s["rps_ratio_rounds"] = med([m["rps"] / p["rps"]
                                         for m, p in zip(rs, b)])
            s["p99_ratio_rounds"] = med([m["p99_ms"] / p["p99_ms"]
                                         for m, p in zip(rs, b)])
        out[label] = s
    fig["summary"] = out
    return fig


# the environment ------------------------------------------------------------

def versions():
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    nginx = subprocess.run([NGINX, "-v"], capture_output=True,
                           text=True).stderr.strip()

    def pkg(name):
        return sh("dpkg-query -W -f '${Version}' %s" % name)

    return {
        "date": now().strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE")
                            * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1),
        "nginx": nginx.replace("nginx version: ", ""),
        "lmdb": pkg("liblmdb0"),
        "jansson": pkg("libjansson4"),
        "wrk": pkg("wrk"),
        "echo_module": pkg("libnginx-mod-http-echo"),
        "valgrind": pkg("valgrind"),
        "commit": sh("git -C %s rev-parse --short HEAD" % ROOT),
        "dirty": bool(sh("git -C %s status --porcelain -- "
                         "ngx_http_token_meter_module config" % ROOT)),
        "module": os.path.relpath(MODULE, ROOT),
        "module_sha256": file_sha256(MODULE)[:16],
        "module_source": os.environ.get("BENCH_MODULE_SOURCE", ""),
    }


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def wait_quiet(limit, minutes):
    """Polls the load average every 30 s until it is below limit."""
    start = time.time()
    deadline = start + minutes * 60
    seen = []
    while True:
        la = loadavg()
        seen.append(la)
        if la < limit:
            say("load average %.2f, below %.2f: measuring" % (la, limit))
            return {"quiet": True, "load": la, "polls": len(seen),
                    "waited_s": round(time.time() - start)}
        if time.time() >= deadline:
            say("load average %.2f after %d minutes: measuring anyway"
                % (la, minutes))
            return {"quiet": False, "load": la, "polls": len(seen),
                    "min_seen": min(seen),
                    "waited_s": round(time.time() - start)}
        say("load average %.2f, waiting for it to fall below %.2f"
            % (la, limit))
        time.sleep(30)


def copy_module(run):
    """Benchmarks use a copy: a rebuild during a run must not change it."""
    if not os.path.exists(MODULE):
        raise BenchError("%s is missing; run make first" % MODULE)
    os.makedirs(run, exist_ok=True)
    dst = os.path.join(run, "ngx_http_token_meter_module.so")
    shutil.copyfile(MODULE, dst)
    return dst


def mock_events(n, gap):
    """The echo directives of an SSE answer of n chunks."""
    head = ('{"id":"chatcmpl-bench","object":"chat.completion.chunk",'
            '"created":1764790000,"model":"bench",'
            '"system_fingerprint":"fp_bench","choices":[')
    words = ["Hello", " from", " the", " bench", "mark", ",", " one",
             " chunk", " at", " a", " time", ".", " Tokens", " keep",
             " coming", " until", " the", " end", " of", " the", " stream"]
    events = [head + '{"index":0,"delta":{"role":"assistant","content":""},'
              '"logprobs":null,"finish_reason":null}]}']
    for i in range(n - 2):
        events.append(head + '{"index":0,"delta":{"content":"%s"},'
                      '"logprobs":null,"finish_reason":null}]}'
                      % words[i % len(words)])
    events.append(head + '{"index":0,"delta":{},"logprobs":null,'
                  '"finish_reason":"stop"}]}')
    events.append(head + '],"usage":{"prompt_tokens":10,'
                  '"completion_tokens":5,"total_tokens":15,'
                  '"prompt_tokens_details":{"cached_tokens":0}}}')
    events.append("[DONE]")
    lines = []
    for i, e in enumerate(events):
        if i:
            lines.append("            echo_sleep %s;" % gap)
        lines.append("            echo 'data: %s\\n';" % e)
        lines.append("            echo_flush;")
    return "\n".join(lines)


def start_mock(run, port, workers, gap="0.002", chunks=20):
    return Nginx("mock", "mock.conf.in", port, MOCK_WORKERS=workers,
                 EVENTS=mock_events(chunks, gap)).start()


# output ---------------------------------------------------------------------

def table(rows, head):
    widths = [max(len(str(r[i])) for r in rows + [head])
              for i in range(len(head))]
    line = lambda r: "| " + " | ".join(
        str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def f(v, spec="%.2f"):
    return "n/a" if v is None else spec % v


def verdict(value, target, higher_better=True):
    if value is None:
        return "n/a"
    ok = value >= target if higher_better else value <= target
    return "met" if ok else "MISSED"


def env_block(res):
    e = res["env"]
    if e.get("module_source"):
        source = e["module_source"]
    else:
        source = "the work tree at commit %s%s" % (
            e["commit"], " with uncommitted changes" if e["dirty"] else "")
    lines = [
        "- date: %s; module built from %s, sha256 %s..." % (
            e["date"], source, e["module_sha256"]),
        "- machine: %d CPUs (`nproc`), %s, %s GiB RAM, kernel %s" % (
            e["nproc"], e["cpu"], e["memory_gib"], e["kernel"]),
        "- software: nginx %s, LMDB %s, jansson %s, wrk %s, echo module %s"
        % (e["nginx"], e["lmdb"], e["jansson"], e["wrk"],
           e["echo_module"]),
    ]
    q = res.get("quiet")
    if q is None:
        lines.append("- load average (1 min) at start %.2f, at end %.2f; "
                     "no wait for a quiet machine" % (
                         res["start_load"], res.get("end_load", 0)))
    elif q["quiet"]:
        lines.append("- waited %d s for a 1-minute load average below "
                     "0.8: %.2f at start, %.2f at end" % (
                         q.get("waited_s", 0), res["start_load"],
                         res.get("end_load", 0)))
    else:
        lines.append("- the machine never got quiet: the 1-minute load "
                     "average stayed at or above 0.8 for 40 minutes "
                     "(lowest seen %.2f); measured anyway at %.2f" % (
                         q["min_seen"], res["start_load"]))
    return "\n".join(lines)


def save(res, suite, args):
    os.makedirs(os.path.join(WORK, "results"), exist_ok=True)
    path = os.path.join(WORK, "results", "%s-%s.json" % (
        now().strftime("%Y%m%dT%H%M%SZ"), suite))
    with open(path, "w") as fp:
        json.dump(res, fp, indent=1)
    say("\nresults kept in %s" % os.path.relpath(path, ROOT))
    return path


def append_doc(args, title, body):
    if not args.doc:
        return
    with open(args.doc, "a") as fp:
        fp.write("\n\n### %s\n\n%s\n" % (title, body))
    say("appended to %s" % args.doc)
