"""Where the metered proxy's worker spends its time, from perf.

"make bench-profile" (bench/bench.py profile) starts the mock provider,
the plain proxy and the metered proxy of the main suite (one worker each,
sync=100ms, 1,000 subscribers), and for each proxy records its worker with
"perf record -g" (software clock event, so it works in a virtual machine
without hardware counters) during a wrk run of --duration seconds.  It
reports the share of samples per shared object and the top symbols, and
keeps the perf.data files in build/bench/perf/ for "perf report".
"""

import os
import re
import shutil
import subprocess

from benchlib import (BenchError, Nginx, PORTS, WORK, copy_module,
                      create_subscribers, fmt_run, loadavg, say, start_mock,
                      table, versions, wait_quiet, wrk)


def perf_report(data, sort, limit):
    r = subprocess.run(["perf", "report", "-i", data, "--no-children",
                        "--sort", sort, "--stdio", "-g", "none"],
                       capture_output=True, text=True, timeout=600)
    rows = []
    for line in r.stdout.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(.*\S)", line)
        if m and not line.startswith("#"):
            rows.append((float(m.group(1)), re.sub(r"\s+", " ",
                                                   m.group(2))))
    return rows[:limit]


def suite_profile(args):
    ports = PORTS["main"]
    run = os.path.join(WORK, "run")
    module = copy_module(run)
    store = os.path.join(WORK, "store-profile")
    shutil.rmtree(store, ignore_errors=True)
    out = os.path.join(WORK, "perf")
    os.makedirs(out, exist_ok=True)

    res = {"suite": "profile", "env": versions(), "runs": {},
           "settings": {"duration": args.duration, "sync": args.sync}}
    res["quiet"] = (wait_quiet(args.quiet_load, args.quiet_minutes)
                    if args.wait_quiet else None)
    res["start_load"] = loadavg()

    start_mock(run, ports["mock"], os.cpu_count())
    plain = Nginx("plain", "plain.conf.in", ports["plain"], WORKERS=1,
                  MOCK_PORT=ports["mock"]).start()
    metered = Nginx("metered", "metered.conf.in", ports["metered"],
                    WORKERS=1, MOCK_PORT=ports["mock"], MODULE=module,
                    STORE=store, SIZE="4096m", SYNC="off").start()
    create_subscribers(ports["metered"], 1, args.keys)
    metered.restart(SYNC=args.sync)

    for inst in (plain, metered):
        wrk(inst.port, args.connections, 1, 2, args.keys)
        data = os.path.join(out, "perf-%s.data" % inst.name)
        rec = subprocess.Popen(
            ["perf", "record", "-F", "1999", "-g", "-o", data,
             "-p", str(inst.workers()[0]), "--", "sleep",
             str(args.duration)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        run_ = wrk(inst.port, args.connections, 1, args.duration, args.keys,
                   inst=inst)
        if rec.wait(timeout=args.duration + 60) != 0:
            raise BenchError("perf record failed: %s" % rec.stderr.read())
        say("  %-8s %s" % (inst.name, fmt_run(run_)))
        res["runs"][inst.name] = {
            "wrk": run_, "data": data,
            "dso": perf_report(data, "dso", 12),
            "symbols": perf_report(data, "dso,sym", 30),
        }
    res["end_load"] = loadavg()
    return res


def report_profile(res):
    out = []
    for name in ("plain", "metered"):
        r = res["runs"][name]
        out.append("%s proxy, 1 worker, %s; perf samples of its worker "
                   "by shared object:" % (name, fmt_run(r["wrk"]).strip()))
        out.append("")
        out.append(table([["%.1f%%" % p, d] for p, d in r["dso"]],
                         ["samples", "object"]))
        out.append("")
    out.append("metered worker, top symbols:")
    out.append("")
    out.append(table([["%.1f%%" % p, d]
                      for p, d in res["runs"]["metered"]["symbols"][:25]],
                     ["samples", "object and symbol"]))
    return "\n".join(out)
