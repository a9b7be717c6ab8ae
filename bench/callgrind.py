"""Instructions per request spent in the module, measured with callgrind.

"make bench-callgrind" (bench/bench.py callgrind) runs a single-process
nginx (master_process off, daemon off) under valgrind --tool=callgrind,
once with the module and once as the plain proxy, both in front of the
mock provider, and sends it requests on --cg-connections keep-alive
connections at once (each connection one request after another; one
connection by default):
some to warm up, then counters are zeroed
(callgrind_control -z), then --requests measured ones, then a dump
(callgrind_control -d).  The dump is read here.

What the module costs is taken from the call graph, arc by arc: the
inclusive cost of every call from outside the module into a function of
the module (the access handler, the body handler that reading the request
body calls back, the log handler, the header and body filters, variable
getters, pool cleanups), less the inclusive cost of every call the module
makes back into nginx's own request processing (running the next phases,
reading the request body, finalizing, the next header or body filter).
LMDB, jansson, libcrypto and libc calls made by the module count as the
module's.  Divided by the number of requests, that is the module's cost
per request.
"""

import collections
import http.client
import json
import os
import random
import re
import shutil
import subprocess
import threading
import time

from benchlib import (BenchError, Nginx, PORTS, WORK, api_key, copy_module,
                      create_subscribers, loadavg, say, start_mock,
                      table, versions, wait_port, wait_quiet)


PREFIX = "ngx_http_token_meter_"

# nginx's request processing: the module's calls into these hand control
# back to nginx, and their cost is not the module's
EXITS = {
    "ngx_http_core_run_phases",
    "ngx_http_read_client_request_body",
    "ngx_http_finalize_request",
    "ngx_http_send_header",
    "ngx_http_output_filter",
    "ngx_http_discard_request_body",
}


def is_exit(name):
    return (name in EXITS
            or (not name.startswith(PREFIX)
                and (name.endswith("_header_filter")
                     or name.endswith("_body_filter"))))


def exits_of(arcs):
    """The functions whose calls from the module hand control to nginx.

    Besides EXITS by name: functions of the nginx binary that have no
    symbol (static ones, which the module reaches only through a pointer:
    the next header or body filter), and stubs of no known object (the
    PLT entries of the module's calls into nginx) that lead to an exit.
    """
    out = set()
    stubs = collections.defaultdict(set)
    for (a, b) in arcs:
        if a is not None and a[1].startswith("0x"):
            stubs[a].add(b)
    for (a, b) in arcs:
        if a is None or not a[1].startswith(PREFIX) or b[1].startswith(PREFIX):
            continue
        ob = os.path.basename(b[0] or "")
        if is_exit(b[1]):
            out.add(b)
        elif b[1].startswith("0x") and ob == "nginx":
            out.add(b)
        elif b[1].startswith("0x") and any(
                is_exit(c[1].split("'")[0]) for c in stubs[b]):
            out.add(b)
    return out


def parse(path):
    """Self costs, call arcs (cost, count) of a callgrind dump, Ir only."""
    names = {"fn": {}, "ob": {}}
    self_cost = collections.Counter()
    arcs = collections.Counter()
    counts = collections.Counter()
    ob = cob = fn = cfn = None
    call_next = False
    total = 0

    def name(kind, text):
        m = re.match(r"\((\d+)\)(?:\s+(.*))?$", text)
        if not m:
            return text
        if m.group(2) is not None:
            names[kind][m.group(1)] = m.group(2)
        return names[kind].get(m.group(1), text)

    with open(path, errors="replace") as fp:
        for line in fp:
            line = line.rstrip("\n")
            if not line:
                continue
            c = line[0]
            if c.isdigit() or c in "+-*":
                parts = line.split()
                cost = int(parts[1]) if len(parts) > 1 else 0
                if call_next:
                    arcs[(fn, cfn)] += cost
                    call_next = False
                    cob = None
                else:
                    self_cost[fn] += cost
                continue
            key, _, value = line.partition("=")
            if key == "ob":
                ob = name("ob", value)
            elif key == "cob":
                cob = name("ob", value)
            elif key == "fn":
                fn = (ob, name("fn", value))
                cob = None
            elif key == "cfn":
                cfn = (cob or ob, name("fn", value))
                cob = None
            elif key == "calls":
                counts[(fn, cfn)] += int(value.split()[0])
                call_next = True
            elif line.startswith("totals:") or line.startswith("summary:"):
                total = int(line.split()[1])
    return self_cost, arcs, counts, total


def module_cost(self_cost, arcs, counts):
    """Cost of the module per entry kind, and its top functions."""

    def mod(fn):
        return fn is not None and fn[1].startswith(PREFIX)

    entries = collections.Counter()
    exits = collections.Counter()
    entry_calls = collections.Counter()
    exit_fns = exits_of(arcs)

    for (a, b), cost in arcs.items():
        if mod(b) and not mod(a):
            entries[b[1]] += cost
            entry_calls[b[1]] += counts[(a, b)]
        elif mod(a) and b in exit_fns:
            exits[(a[1], display(b))] += cost

    # the exits made beneath each module function, shared out among its
    # callers by the number of calls, to get an inclusive cost of its own

    callees = collections.defaultdict(list)
    calls_in = collections.Counter()
    for (a, b), cost in arcs.items():
        callees[a].append((b, cost, counts[(a, b)]))
        calls_in[b] += counts[(a, b)]

    memo = {}

    def below(fn, depth=0):
        if fn in memo:
            return memo[fn]
        memo[fn] = 0
        x = 0
        for b, cost, n in callees[fn]:
            if b == fn:
                continue
            if mod(fn) and b in exit_fns:
                x += cost
            elif mod(b) and calls_in[b] and depth < 50:
                x += below(b, depth + 1) * n / calls_in[b]
        memo[fn] = x
        return x

    own = {}
    for fn in set(self_cost) | set(a for a, _ in arcs):
        if not mod(fn):
            continue
        incl = self_cost[fn] + sum(c for b, c, _ in callees[fn] if b != fn)
        own[fn[1]] = incl - below(fn)

    return entries, entry_calls, exits, own, exit_fns


def display(fn):
    """A function's name; with its library when it has no symbol."""
    ob, name = fn
    if name.startswith("0x") and ob:
        return "%s in %s" % (name, os.path.basename(ob))
    return name


def send(port, n, stream, connections=1):
    """n requests spread over connections sent at once."""
    if connections <= 1:
        send_one(port, n, stream)
        return
    errors = []

    def client(k):
        try:
            send_one(port, n // connections + (k < n % connections), stream,
                     seed=7 + k)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,))
               for k in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def send_one(port, n, stream, keys=1000, seed=7):
    """n requests, one after another, on one keep-alive connection."""
    rnd = random.Random(seed)
    body = json.dumps({"model": "bench", "stream": stream, "messages": [
        {"role": "user", "content": "Say hello to the benchmark."}]})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        for i in range(n):
            headers = {"Authorization": "Bearer " + api_key(
                rnd.randint(1, keys)), "Content-Type": "application/json"}
            if stream:
                headers["X-Bench-Stream"] = "1"
            c.request("POST", "/v1/chat/completions", body, headers)
            r = c.getresponse()
            r.read()
            if r.status != 200:
                raise BenchError("request %d: status %d" % (i, r.status))
    finally:
        c.close()


def callgrind_run(inst, label, warmup, n, stream, connections):
    out = os.path.join(WORK, "callgrind")
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, "callgrind.%s" % label)
    for old in os.listdir(out):
        if old.startswith("callgrind.%s" % label):
            os.unlink(os.path.join(out, old))

    conf = inst.write_conf(master=False)
    vg = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=" + base,
         "--dump-instr=no", "--compress-strings=no", "--compress-pos=no",
         "/usr/sbin/nginx", "-p", inst.dir + "/",
         "-e", os.path.join(inst.dir, "logs", "error.log"), "-c", conf],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_port(inst.port, 120)
        send(inst.port, warmup, stream, connections)
        ctl = subprocess.run(["callgrind_control", "-z", str(vg.pid)],
                             capture_output=True, text=True, timeout=120)
        if ctl.returncode != 0:
            raise BenchError("callgrind_control -z: %s" % ctl.stdout)
        t = time.time()
        send(inst.port, n, stream, connections)
        elapsed = time.time() - t
        ctl = subprocess.run(["callgrind_control", "-d", str(vg.pid)],
                             capture_output=True, text=True, timeout=300)
        if ctl.returncode != 0:
            raise BenchError("callgrind_control -d: %s" % ctl.stdout)
    finally:
        vg.terminate()
        try:
            vg.wait(120)
        except subprocess.TimeoutExpired:
            vg.kill()
            vg.wait()

    dumps = sorted(p for p in os.listdir(out)
                   if p.startswith("callgrind.%s." % label))
    if not dumps:
        raise BenchError("no callgrind dump for %s" % label)
    return os.path.join(out, dumps[0]), elapsed


def suite_callgrind(args):
    ports = PORTS["callgrind"]
    run = os.path.join(WORK, "run-callgrind")
    module = copy_module(run)
    store = os.path.join(WORK, "store-callgrind")
    shutil.rmtree(store, ignore_errors=True)

    res = {"suite": "callgrind", "env": versions(), "runs": {},
           "settings": {"requests": args.requests,
                        "connections": args.cg_connections}}
    res["quiet"] = (wait_quiet(args.quiet_load, args.quiet_minutes)
                    if args.wait_quiet else None)
    res["start_load"] = loadavg()

    start_mock(run, ports["mock"], 1)

    metered = Nginx("cg-metered", "metered.conf.in", ports["metered"],
                    WORKERS=1, MOCK_PORT=ports["mock"], MODULE=module,
                    STORE=store, SIZE="1024m", SYNC="off")
    metered.start()
    create_subscribers(ports["metered"], 1, 1000)
    metered.stop()

    plain = Nginx("cg-plain", "plain.conf.in", ports["plain"], WORKERS=1,
                  MOCK_PORT=ports["mock"])
    metered.subs["SYNC"] = args.sync

    n = args.requests
    for stream in (False, True):
        kind = "stream" if stream else "chat"
        for inst in (plain, metered):
            label = "%s-%s" % (inst.name.split("-")[1], kind)
            say("callgrind: %s, %d requests" % (label, n))
            path, elapsed = callgrind_run(inst, label, 100, n, stream,
                                          args.cg_connections)
            self_cost, arcs, counts, total = parse(path)
            r = {"total_per_request": total / n, "dump": path,
                 "seconds": round(elapsed, 1)}
            if inst is metered:
                entries, entry_calls, exits, own, exit_fns = module_cost(
                    self_cost, arcs, counts)
                ex_filter = sum(c for (a, b), c in exits.items()
                                if a.endswith("_filter")
                                or a.endswith("_strip"))
                ex_other = sum(exits.values()) - ex_filter
                r["entries"] = {k: v / n for k, v in entries.items()}
                r["entry_calls"] = {k: v / n for k, v in entry_calls.items()}
                r["exits"] = {"%s -> %s" % k: v / n
                              for k, v in exits.items()}
                timer = entries.pop(PREFIX + "timer_handler", 0)
                r["timer_per_request"] = timer / n
                r["module_per_request"] = (sum(entries.values())
                                           - sum(exits.values())) / n
                filt = sum(v for k, v in entries.items()
                           if k.endswith("_filter"))
                r["groups"] = {
                    "filters": (filt - ex_filter) / n,
                    "rest": (sum(entries.values()) - filt - ex_other) / n,
                }
                r["top"] = sorted(((v / n, k) for k, v in own.items()),
                                  reverse=True)[:12]
                lib = collections.Counter()
                for (a, b), c in arcs.items():
                    if (a is not None and a[1].startswith(PREFIX)
                            and not b[1].startswith(PREFIX)
                            and b not in exit_fns):
                        lib[display(b)] += c
                r["library_calls"] = sorted(((v / n, k)
                                             for k, v in lib.items()),
                                            reverse=True)[:15]
            res["runs"][label] = r
    res["end_load"] = loadavg()
    return res


def report_callgrind(res):
    runs = res["runs"]
    n = res["settings"]["requests"]
    out = []
    rows = []
    for kind in ("chat", "stream"):
        p = runs["plain-%s" % kind]
        m = runs["metered-%s" % kind]
        rows.append([kind, "%.0f" % p["total_per_request"],
                     "%.0f" % m["total_per_request"],
                     "%.0f" % (m["total_per_request"]
                               - p["total_per_request"]),
                     "%.0f" % m["module_per_request"],
                     "%.0f" % m["groups"]["rest"],
                     "%.0f" % m["groups"]["filters"]])
    c = res["settings"].get("connections", 1)
    out.append("Instructions (Ir) per request, %d requests measured after "
               "100 to warm up, single process under callgrind, %s:"
               % (n, "one request at a time" if c == 1
                  else "%d connections sending at once" % c))
    out.append("")
    out.append(table(rows, ["request", "plain nginx, whole process",
                            "metered nginx, whole process", "difference",
                            "module (entry points, inclusive)",
                            "of which access, log, variables, cleanup",
                            "of which header and body filters"]))
    for kind in ("chat", "stream"):
        m = runs["metered-%s" % kind]
        out.append("")
        out.append("Entry points, %s (inclusive Ir per request, calls per "
                   "request; calls back into nginx not deducted here):"
                   % kind)
        out.append("")
        out.append(table([[k, "%.0f" % v, "%.2f" % m["entry_calls"][k]]
                          for k, v in sorted(m["entries"].items(),
                                             key=lambda x: -x[1])],
                         ["function", "Ir/request", "calls/request"]))
        out.append("")
        out.append("Top module functions, %s, by inclusive Ir per request "
                   "without calls back into nginx (callers include their "
                   "callees, so the list nests):" % kind)
        out.append("")
        out.append(table([[k, "%.0f" % v] for v, k in m["top"][:10]],
                         ["function", "Ir/request"]))
        out.append("")
        out.append("Library functions the module calls, %s (inclusive Ir "
                   "per request):" % kind)
        out.append("")
        out.append(table([[k, "%.0f" % v] for v, k in m["library_calls"][:10]],
                         ["function", "Ir/request"]))
    return "\n".join(out)
