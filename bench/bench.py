#!/usr/bin/env python3
"""The token meter's benchmarks: bench/bench.py <suite> [options].

Suites:

  main       "make bench": throughput and latency of the metered proxy
             against a plain proxy_pass in front of the same mock
             provider, streaming delays, settlements per second in each
             sync mode.  Under five minutes with the defaults.
  scale      "make bench-scale": a store with many subscribers and usage
             records against one with 1,000; bytes per subscriber and per
             record; worker memory over a longer run.
  callgrind  "make bench-callgrind": instructions per request spent in the
             module, from callgrind on a single-process nginx.
  profile    "make bench-profile": perf samples of the plain and the
             metered proxy's worker, by shared object and symbol.

Every nginx, wrk and client it starts listens on or talks to 127.0.0.1,
ports 9100-9199, and is stopped before it exits, also on an error or
Ctrl-C.  Work files go to build/bench/; results are printed as a table,
kept as JSON in build/bench/results/, and with --doc appended to
docs/benchmarks.md.

Only the Python 3 standard library is used; wrk, nginx, the echo module
and valgrind come from Debian packages (util/install-deps).
"""

import argparse
import atexit
import os
import shutil
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sse_timing  # noqa: E402
from benchlib import (BenchError, Nginx, PORTS, WORK,  # noqa: E402
                      append_doc, copy_module, create_subscribers,
                      env_block, f, fmt_run, interleaved, loadavg, med,
                      metrics, on_signal, save, say, start_mock, stop_all,
                      summarize, table, verdict, versions, wait_quiet, wrk)
from scale import suite_scale, report_scale  # noqa: E402
from callgrind import suite_callgrind, report_callgrind  # noqa: E402
from perfprofile import suite_profile, report_profile  # noqa: E402


# the main suite -------------------------------------------------------------

def suite_main(args):
    ports = PORTS["main"]
    run = os.path.join(WORK, "run")
    module = copy_module(run)
    store = os.path.join(WORK, "store-main")
    shutil.rmtree(store, ignore_errors=True)

    result = {"suite": "main", "env": versions(), "figures": {},
              "settings": {"duration": args.duration, "rounds": args.rounds,
                           "connections": args.connections,
                           "keys": args.keys, "sync": args.sync}}
    result["quiet"] = (wait_quiet(args.quiet_load, args.quiet_minutes)
                       if args.wait_quiet else None)
    result["start_load"] = loadavg()

    mock = start_mock(run, ports["mock"], os.cpu_count())
    plain = Nginx("plain", "plain.conf.in", ports["plain"], WORKERS=1,
                  MOCK_PORT=ports["mock"])
    metered = Nginx("metered", "metered.conf.in", ports["metered"],
                    WORKERS=1, MOCK_PORT=ports["mock"], MODULE=module,
                    STORE=store, SIZE="4096m", SYNC="off")

    plain.start()
    metered.start()

    t = time.time()
    create_subscribers(ports["metered"], 1, args.keys)
    say("created %d subscribers in %.1f s" % (args.keys, time.time() - t))

    d = args.duration
    c = args.connections

    def pair(workers, stream=False, seconds=d):
        return [
            ("plain", lambda: wrk(ports["plain"], c, workers, seconds,
                                  args.keys, stream, plain)),
            ("metered", lambda: wrk(ports["metered"], c, workers, seconds,
                                    args.keys, stream, metered)),
        ]

    def warm(workers, stream=False):
        def w(label):
            wrk(ports[label], c, workers, 1, args.keys, stream)
        return w

    for workers in (1, 2):
        plain.restart(WORKERS=workers)
        metered.restart(WORKERS=workers, SYNC=args.sync)
        key = "chat_%dw" % workers
        result["figures"][key] = summarize(interleaved(
            "chat completions, %d worker%s, %d connections, sync=%s"
            % (workers, "s" if workers > 1 else "", c, args.sync),
            args.rounds, pair(workers), warm(workers)))

    # streams: wrk for throughput, then the event timing client

    result["figures"]["stream_2w"] = summarize(interleaved(
        "streamed chat completions, 2 workers, %d connections" % c,
        args.rounds, pair(2, True, max(3, d // 2)), warm(2, True)))

    say("\n== stream timing: %d rounds of %d streams each way"
        % (args.rounds, args.streams))
    timing = []
    load = [loadavg()]
    for r in range(args.rounds):
        t = sse_timing.run(("127.0.0.1", ports["plain"]),
                           ("127.0.0.1", ports["metered"]),
                           args.streams, args.keys, seed=r + 1)
        if t["errors"]:
            raise BenchError("stream timing: %d errors" % t["errors"])
        say("  round %d  ttfb plain %.3f ms metered %.3f ms  "
            "added: first byte %.3f ms, per chunk %.3f ms"
            % (r + 1, t["plain"]["ttfb_ms"], t["metered"]["ttfb_ms"],
               t["added_ttfb_ms"], t["added_per_chunk_ms"]))
        timing.append(t)
    load.append(loadavg())
    result["figures"]["stream_timing"] = {
        "rounds": timing, "load": load,
        "summary": {
            "plain_ttfb_ms": med([t["plain"]["ttfb_ms"] for t in timing]),
            "metered_ttfb_ms": med([t["metered"]["ttfb_ms"]
                                    for t in timing]),
            "plain_gap_ms": med([t["plain"]["gap_ms"] for t in timing]),
            "metered_gap_ms": med([t["metered"]["gap_ms"] for t in timing]),
            "added_ttfb_ms": med([t["added_ttfb_ms"] for t in timing]),
            "added_per_chunk_ms": med([t["added_per_chunk_ms"]
                                       for t in timing]),
            "added_last_event_ms": med([t["added_last_event_ms"]
                                        for t in timing]),
        }}

    # settlements per second in each sync mode, one worker as above

    result["figures"]["sync"] = sync_modes(args, metered, ports, c)

    for inst in (plain, metered):
        bad = inst.errors()
        if bad:
            say("\n%s logged %d errors, the last:\n%s"
                % (inst.name, len(bad), "\n".join(bad[-5:])))
        result.setdefault("log_errors", {})[inst.name] = len(bad)

    stop_all()
    result["end_load"] = loadavg()
    return result


def sync_modes(args, metered, ports, c):
    modes = ["on", "100ms", "off"]
    say("\n== settlements per second by sync mode, 1 worker: %d rounds"
        % args.rounds)
    load = [loadavg()]
    res = {m: [] for m in modes}
    seconds = max(3, args.duration // 2)
    for r in range(args.rounds):
        for m in modes:
            metered.restart(WORKERS=1, SYNC=m)
            wrk(ports["metered"], c, 1, 1, args.keys)
            before = metrics(ports["metered"])
            t = time.time()
            run = wrk(ports["metered"], c, 1, seconds, args.keys,
                      inst=metered)
            elapsed = time.time() - t
            after = metrics(ports["metered"])
            n = (after["token_meter_settlement_seconds_count"]
                 - before["token_meter_settlement_seconds_count"])
            s = (after["token_meter_settlement_seconds_sum"]
                 - before["token_meter_settlement_seconds_sum"])
            run["settled_per_s"] = n / elapsed
            run["settle_txn_us"] = s * 1e6 / n if n else None
            run["load"] = loadavg()
            res[m].append(run)
            say("  round %d sync=%-6s %8.0f settled/s  write txn %6.1f us"
                "  %s" % (r + 1, m, run["settled_per_s"],
                          run["settle_txn_us"] or 0, fmt_run(run)))
    load.append(loadavg())
    summary = {m: {"settled_per_s": med([x["settled_per_s"]
                                         for x in res[m]]),
                   "settle_txn_us": med([x["settle_txn_us"]
                                         for x in res[m]]),
                   "p99_ms": med([x["p99_ms"] for x in res[m]]),
                   "cpu_us": med([x.get("cpu_us") for x in res[m]])}
               for m in modes}
    metered.restart(SYNC=args.sync)
    return {"rounds": res, "load": load, "summary": summary}


def report_main(res):
    figs = res["figures"]
    rows = []
    for key, name in (("chat_1w", "chat, 1 worker"),
                      ("chat_2w", "chat, 2 workers"),
                      ("stream_2w", "streamed chat, 2 workers")):
        fig = figs[key]
        p, m = fig["summary"]["plain"], fig["summary"]["metered"]
        rows.append([name + ": requests/s", f(p["rps"], "%.0f"),
                     f(m["rps"], "%.0f"), f(m["rps_ratio"]),
                     f(m["rps_ratio_rounds"]),
                     ">= 0.85" if key != "stream_2w" else "",
                     verdict(m["rps_ratio"], 0.85)
                     if key != "stream_2w" else "",
                     "%.2f-%.2f" % tuple(fig["load"])])
        rows.append([name + ": p99 ms", f(p["p99_ms"]), f(m["p99_ms"]),
                     f(m["p99_ratio"]), f(m["p99_ratio_rounds"]),
                     "<= 1.3" if key != "stream_2w" else "",
                     verdict(m["p99_ratio"], 1.3, False)
                     if key != "stream_2w" else "",
                     "%.2f-%.2f" % tuple(fig["load"])])
        rows.append([name + ": worker CPU us/request", f(p["cpu_us"], "%.1f"),
                     f(m["cpu_us"], "%.1f"),
                     f(m["cpu_us"] / p["cpu_us"]
                       if m["cpu_us"] and p["cpu_us"] else None),
                     "", "", "", "%.2f-%.2f" % tuple(fig["load"])])
    st = figs["stream_timing"]
    s = st["summary"]
    lo = "%.2f-%.2f" % tuple(st["load"])
    rows.append(["stream: time to first event, ms",
                 f(s["plain_ttfb_ms"], "%.3f"),
                 f(s["metered_ttfb_ms"], "%.3f"),
                 "%s ms" % f(s["added_ttfb_ms"], "%+.3f"), "", "< 1 ms added",
                 verdict(s["added_ttfb_ms"], 1.0, False), lo])
    rows.append(["stream: delay added per chunk, ms", "", "",
                 "%s ms" % f(s["added_per_chunk_ms"], "%+.3f"), "",
                 "< 1 ms", verdict(s["added_per_chunk_ms"], 1.0, False), lo])
    rows.append(["stream: gap between chunks, ms", f(s["plain_gap_ms"], "%.3f"),
                 f(s["metered_gap_ms"], "%.3f"), "", "", "", "", lo])
    head = ["figure", "plain", "metered", "metered/plain (of medians)",
            "median of round ratios", "target", "", "load avg"]
    out = [table(rows, head)]

    sy = figs["sync"]
    rows = [["sync=%s" % m, f(v["settled_per_s"], "%.0f"),
             f(v["settle_txn_us"], "%.1f"), f(v["p99_ms"]),
             f(v["cpu_us"], "%.1f")]
            for m, v in sy["summary"].items()]
    out.append("")
    out.append("Settlements per second (1 worker, %s connections, load "
               "%.2f-%.2f):" % (res["settings"]["connections"],
                                *sy["load"]))
    out.append("")
    out.append(table(rows, ["mode", "settled/s",
                            "write txn us (mean per settlement)",
                            "p99 ms", "worker CPU us/request"]))
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[2:]))
    ap.add_argument("suite", choices=("main", "scale", "callgrind",
                                      "profile"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=8,
                    help="seconds per wrk run (main)")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--streams", type=int, default=60,
                    help="streams each way per round (main)")
    ap.add_argument("--sync", default="100ms",
                    help="sync mode of the throughput figures (main)")
    ap.add_argument("--subscribers", type=int, default=1000000,
                    help="subscribers of the large store (scale)")
    ap.add_argument("--records", type=int, default=10000000,
                    help="usage records of the large store (scale)")
    ap.add_argument("--fill-minutes", type=float, default=40,
                    help="most time spent filling the large store (scale)")
    ap.add_argument("--rss-seconds", type=int, default=120,
                    help="length of the memory run (scale)")
    ap.add_argument("--requests", type=int, default=2000,
                    help="requests measured under callgrind")
    ap.add_argument("--cg-connections", type=int, default=1,
                    help="connections sending them at once (callgrind)")
    ap.add_argument("--wait-quiet", action="store_true",
                    help="wait for the 1-minute load average to fall "
                         "below --quiet-load first")
    ap.add_argument("--quiet-load", type=float, default=0.8)
    ap.add_argument("--quiet-minutes", type=float, default=40)
    ap.add_argument("--doc", help="append the figures to this markdown file")
    ap.add_argument("--label", default="",
                    help="a name for the figure set in --doc")
    args = ap.parse_args()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    atexit.register(stop_all)

    os.makedirs(WORK, exist_ok=True)
    started = time.time()

    try:
        if args.suite == "main":
            res = suite_main(args)
            text = report_main(res)
        elif args.suite == "scale":
            res = suite_scale(args)
            text = report_scale(res)
        elif args.suite == "callgrind":
            res = suite_callgrind(args)
            text = report_callgrind(res)
        else:
            res = suite_profile(args)
            text = report_profile(res)
    except BenchError as e:
        stop_all()
        say("bench: error: %s" % e)
        return 1
    finally:
        stop_all()

    res["elapsed_s"] = round(time.time() - started)
    say("\n" + env_block(res))
    say("")
    say(text)
    say("\n%s suite took %d s, waiting included" % (args.suite,
                                                   res["elapsed_s"]))
    save(res, args.suite, args)

    label = args.label or res["env"]["date"]
    append_doc(args, "%s: %s" % (args.suite, label),
               env_block(res) + "\n- took %d s, waiting included\n\n"
               % res["elapsed_s"] + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
