"""The scale suite: a large store against a small one.

"make bench-scale" (bench/bench.py scale):

1. Fills build/bench/store-scale/ with --subscribers subscribers (each with
   an imported key and a purchase, through the admin API) and
   --records usage records, unless an earlier run left that many there.
   The records are written by the module itself: wrk sends metered chat
   completions, spread over all the keys, to a second server of the same
   nginx whose metered location answers from memory with the echo module
   (bench/conf/fill.conf.in), with sync=off and two workers.  This is the
   access, filter and log handler path of every metered request, without
   the hop to an upstream.  Filling stops after --fill-minutes, and what
   was reached is reported as it is.
2. Measures the metered proxy of the main suite (bench/conf/metered.conf.in,
   one worker, 32 connections, sync=100ms) on that store and on a fresh
   store of 1,000 subscribers, in interleaved rounds: keys spread over all
   subscribers of the large store, and over the first 1,000 of them.
3. Reads the store's pages per database with mdb_stat, for bytes per
   subscriber and per usage record.
4. Runs the large store under load for --rss-seconds with two workers and
   samples each worker's memory every 10 seconds.
"""

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import threading
import time

from benchlib import (BenchError, Nginx, PORTS, WORK, BENCH, copy_module,
                      create_subscribers, f, interleaved, loadavg,
                      memory, say, start_mock, summarize, table, versions,
                      wait_quiet, wrk)


def mdb_stat(store):
    """Pages and entries of every database of a store, from mdb_stat."""
    r = subprocess.run(["mdb_stat", "-a", "-e", store], capture_output=True,
                       text=True, timeout=600)
    if r.returncode != 0:
        raise BenchError("mdb_stat %s: %s" % (store, r.stderr))
    out = {"_env": {}}
    db = None
    for line in r.stdout.splitlines():
        m = re.match(r"Status of (\S+)", line)
        if m:
            db = m.group(1)
            out[db] = {}
            continue
        m = re.match(r"\s*([A-Za-z ]+):\s*(\d+)$", line)
        if not m:
            continue
        k, v = m.group(1).strip().lower(), int(m.group(2))
        if db is None:
            out["_env"][k] = v
        else:
            out[db][k] = v
    return out


def entries(store, db):
    r = subprocess.run(["mdb_stat", "-s", db, store], capture_output=True,
                       text=True, timeout=600)
    m = re.search(r"Entries:\s*(\d+)", r.stdout)
    return int(m.group(1)) if m else 0


def db_bytes(st, name):
    d = st.get(name, {})
    return ((d.get("branch pages", 0) + d.get("leaf pages", 0)
             + d.get("overflow pages", 0)) * st["_env"]["page size"])


SUBSCRIBER_DBS = ("subscribers", "keys", "key_ids", "msisdns", "purchases",
                  "grants", "trials")
RECORD_DBS = ("usage", "usage_time", "usage_subscriber")


def evict(store):
    """Drops the store's file from the page cache, and nothing else."""
    fd = os.open(os.path.join(store, "data.mdb"), os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def folios(pid, name="data.mdb"):
    """How much of the store a process has mapped sits in large folios.

    Reads the page table of the process (/proc/PID/pagemap) over its map
    of the store and the flags of each page frame (/proc/kpageflags, root
    only): a page of a large folio is a compound head or tail page.
    """
    try:
        vmas = []
        with open("/proc/%d/maps" % pid) as fp:
            for line in fp:
                if line.rstrip().endswith("/" + name):
                    a, b = line.split()[0].split("-")
                    vmas.append((int(a, 16), int(b, 16)))
        present = heads = tails = 0
        with open("/proc/%d/pagemap" % pid, "rb") as pm, \
                open("/proc/kpageflags", "rb") as kf:
            for a, b in vmas:
                pm.seek(a // 4096 * 8)
                left = (b - a) // 4096
                while left:
                    n = min(left, 1 << 16)
                    left -= n
                    for (e,) in struct.iter_unpack("<Q", pm.read(8 * n)):
                        pfn = e & ((1 << 55) - 1)
                        if not e >> 63 or not pfn:
                            continue
                        present += 1
                        kf.seek(pfn * 8)
                        (fl,) = struct.unpack("<Q", kf.read(8))
                        heads += (fl >> 15) & 1
                        tails += (fl >> 16) & 1
    except OSError:
        return None
    return {"mapped_pages": present, "large_folio_pages": heads + tails,
            "large_folios": heads,
            "pages_per_large_folio": round((heads + tails) / heads, 1)
            if heads else 0}


def fill_admin(port, mode, first, last, threads=2, conns=32, limit=1800):
    """Runs bench/lua/fill.lua until every thread has sent its share."""
    cmd = ["wrk", "-t%d" % threads, "-c%d" % conns, "-d%ds" % limit,
           "--timeout", "30s", "-s", os.path.join(BENCH, "lua", "fill.lua"),
           "http://127.0.0.1:%d" % port, "--", mode, str(first), str(last),
           str(threads)]
    t = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    done = 0
    timer = threading.Timer(limit + 30, p.kill)
    timer.start()
    try:
        for line in p.stderr:
            if "FILL-DONE" in line:
                done += 1
                if done == threads:
                    # let the last answers arrive, then end wrk
                    time.sleep(1)
                    p.send_signal(signal.SIGINT)
                    break
        out, _ = p.communicate(timeout=60)
    finally:
        timer.cancel()
    elapsed = time.time() - t
    n = last - first + 1
    say("  %s %d..%d: %.0f s, %.0f per second"
        % (mode, first, last, elapsed, n / elapsed))
    return elapsed


def fill(args, ports, module, store, size):
    state_path = store + ".json"
    state = {}
    if os.path.exists(state_path):
        with open(state_path) as fp:
            state = json.load(fp)

    if state.get("subscribers", 0) > args.subscribers:
        raise BenchError("%s holds %d subscribers, more than --subscribers "
                         "%d; remove it to start again"
                         % (store, state["subscribers"], args.subscribers))

    inst = Nginx("scale-fill", "fill.conf.in", ports["metered"], WORKERS=2,
                 MOCK_PORT=ports["mock"], MODULE=module, STORE=store,
                 SIZE=size, LOADER_PORT=ports["loader"])
    inst.start()

    t0 = time.time()
    log = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "filled": False}
    n = args.subscribers

    for mode, db in (("create", "subscribers"), ("purchase", "purchases")):
        for attempt in range(3):
            have = entries(store, db)
            if have >= n:
                break
            say("filling: %d %s of %d" % (have, db, n))
            log["filled"] = True
            log["%s_s" % mode] = log.get("%s_s" % mode, 0) + fill_admin(
                ports["metered"], mode, 1, n)
        if entries(store, db) < n:
            raise BenchError("could not fill %d %s" % (n, db))

    deadline = t0 + args.fill_minutes * 60
    records = entries(store, "usage")
    rate = []
    while records < args.records and time.time() < deadline - 10:
        log["filled"] = True
        seconds = int(min(60, deadline - time.time()))
        t = time.time()
        wrk(ports["loader"], 64, 2, seconds, n, inst=None,
            allow_status=True)
        now_records = entries(store, "usage")
        rate.append((now_records - records) / (time.time() - t))
        records = now_records
        say("  records: %d of %d, %.0f per second, %.1f minutes left"
            % (records, args.records, rate[-1],
               (deadline - time.time()) / 60))

    log["record_rates"] = [round(r) for r in rate]
    log["minutes"] = round((time.time() - t0) / 60, 1)
    bad = inst.errors()
    inst.stop()
    if bad:
        say("the filling nginx logged %d errors, the last:\n%s"
            % (len(bad), "\n".join(bad[-5:])))

    state = {"subscribers": n, "records": records}
    with open(state_path, "w") as fp:
        json.dump(state, fp)
    return log


def rss_run(args, inst, keys, seconds):
    """Memory of each worker, every 10 s, while wrk runs."""
    cmd = ["wrk", "-t2", "-c32", "-d%ds" % seconds, "--timeout", "10s",
           "-s", os.path.join(BENCH, "lua", "chat.lua"),
           "http://127.0.0.1:%d" % inst.port, "--", str(keys)]
    samples = []
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        while True:
            t = time.time() - t0
            row = {"t": round(t)}
            for w in sorted(inst.workers()):
                row[w] = memory(w)
            samples.append(row)
            if p.poll() is not None or t >= seconds:
                break
            time.sleep(max(0, 10 - (time.time() - t0 - t)))
        out, err = p.communicate(timeout=seconds + 60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    m = re.search(r"^BENCH (\{.*\})$", out, re.M)
    summary = json.loads(m.group(1)) if m else {}
    return {"samples": samples, "wrk": summary}


def suite_scale(args):
    ports = PORTS["scale"]
    run = os.path.join(WORK, "run-scale")
    module = copy_module(run)
    big = os.path.join(WORK, "store-scale")
    small = os.path.join(WORK, "store-scale-small")
    size = "%dm" % (32 * 1024)

    res = {"suite": "scale", "env": versions(),
           "settings": {"subscribers": args.subscribers,
                        "records": args.records,
                        "fill_minutes": args.fill_minutes,
                        "duration": args.duration, "rounds": args.rounds,
                        "rss_seconds": args.rss_seconds}}

    start_mock(run, ports["mock"], os.cpu_count())

    say("== filling the large store (sync=off, 2 workers)")
    res["fill"] = fill(args, ports, module, big, size)

    res["quiet"] = (wait_quiet(args.quiet_load, args.quiet_minutes)
                    if args.wait_quiet else None)
    res["start_load"] = loadavg()

    st = mdb_stat(big)
    res["store"] = st
    subs = st["subscribers"]["entries"]
    recs = st["usage"]["entries"]
    data = os.stat(os.path.join(big, "data.mdb"))
    res["measured_with"] = {"subscribers": subs, "records": recs,
                            "used_bytes": st["_env"]["number of pages used"]
                            * st["_env"]["page size"],
                            "file_bytes": data.st_size,
                            "disk_bytes": data.st_blocks * 512}

    shutil.rmtree(small, ignore_errors=True)
    small_inst = Nginx("scale-small", "metered.conf.in", ports["small"],
                       WORKERS=1, MOCK_PORT=ports["mock"], MODULE=module,
                       STORE=small, SIZE=size, SYNC="off")
    small_inst.start()
    create_subscribers(ports["small"], 1, 1000)
    small_inst.restart(SYNC="100ms")

    big_inst = Nginx("scale-big", "metered.conf.in", ports["metered"],
                     WORKERS=1, MOCK_PORT=ports["mock"], MODULE=module,
                     STORE=big, SIZE=size, SYNC="100ms")
    big_inst.start()

    d, c = args.duration, args.connections
    variants = [
        ("small", lambda: wrk(ports["small"], c, 1, d, 1000,
                              inst=small_inst)),
        ("large", lambda: wrk(ports["metered"], c, 1, d, subs,
                              inst=big_inst)),
        ("large, 1k keys", lambda: wrk(ports["metered"], c, 1, d, 1000,
                                       inst=big_inst)),
    ]

    def warm(label):
        port, keys = ((ports["small"], 1000) if label == "small"
                      else (ports["metered"], subs))
        wrk(port, c, 1, 2, keys)

    title = ("metered chat completions, 1 worker, %d connections, "
             "sync=100ms: store of %d subscribers and %d records against "
             "1,000 subscribers" % (c, subs, recs))
    res["figure"] = summarize(interleaved(
        title + ", %s" % ("right after filling" if res["fill"]["filled"]
                          else "store filled by an earlier run"),
        args.rounds, variants, warm), base="small")
    res["folios_after"] = folios(big_inst.workers()[0])

    # the same once the store's pages have been read back from disk
    big_inst.stop()
    evict(big)
    big_inst.start()
    res["figure_evicted"] = summarize(interleaved(
        title + ", its file dropped from the page cache first",
        args.rounds, variants, warm), base="small")
    res["folios_evicted"] = folios(big_inst.workers()[0])

    small_inst.stop()

    say("\n== worker memory over %d s, 2 workers, large store, sync=off"
        % args.rss_seconds)
    big_inst.restart(WORKERS=2, SYNC="off")
    res["rss"] = rss_run(args, big_inst, subs, args.rss_seconds)
    res["rss"]["load"] = loadavg()
    for row in res["rss"]["samples"]:
        say("  %4d s  %s" % (row["t"], "  ".join(
            "worker %s: rss %d KiB (anon %d, file %d)" % (
                w, m["VmRSS"], m["RssAnon"], m["RssFile"])
            for w, m in row.items() if w != "t")))
    big_inst.stop()
    res["end_load"] = loadavg()
    return res


def report_scale(res):
    out = []
    mw = res["measured_with"]
    out.append("Store: %d subscribers, %d usage records, %.2f GB of pages "
               "in use (data.mdb: %.2f GB on disk, %.1f GB apparent, as "
               "large as the map) (%s)."
               % (mw["subscribers"], mw["records"], mw["used_bytes"] / 1e9,
                  mw["disk_bytes"] / 1e9, mw["file_bytes"] / 1e9,
                          "filled to the target" if mw["records"]
                          >= res["settings"]["records"]
                          else "fewer records than the target of %d: "
                               "filling stopped after %s minutes"
                               % (res["settings"]["records"],
                                  res["settings"]["fill_minutes"])))
    out.append("")
    for key, fol in (("figure", "folios_after"),
                     ("figure_evicted", "folios_evicted")):
        fig = res[key]
        s = fig["summary"]
        rows = []
        for label in ("small", "large", "large, 1k keys"):
            v = s[label]
            rows.append([label, f(v["rps"], "%.0f"), f(v.get("rps_ratio")),
                         f(v.get("rps_ratio_rounds")), f(v["p99_ms"]),
                         f(v.get("p99_ratio")), f(v["cpu_us"], "%.1f")])
        out.append("Throughput, %s (load average %.2f-%.2f):"
                   % (fig["title"], fig["load"][0], fig["load"][1]))
        out.append("")
        out.append(table(rows, ["store / keys", "requests/s",
                                "ratio to small (of medians)",
                                "median of round ratios", "p99 ms",
                                "p99 ratio", "worker CPU us/request"]))
        fo = res.get(fol)
        if fo:
            out.append("")
            out.append("Afterwards the worker had %d pages of the large "
                       "store mapped, %d of them in %d large folios "
                       "(%.1f pages each on average)."
                       % (fo["mapped_pages"], fo["large_folio_pages"],
                          fo["large_folios"],
                          fo["pages_per_large_folio"]))
        out.append("")

    st = res["store"]
    sub_bytes = sum(db_bytes(st, d) for d in SUBSCRIBER_DBS)
    rec_bytes = sum(db_bytes(st, d) for d in RECORD_DBS)
    rows = [[d, st[d]["entries"], st[d]["tree depth"],
             "%.1f" % (db_bytes(st, d) / 2 ** 20),
             "%.0f" % (db_bytes(st, d) / st[d]["entries"])
             if st[d]["entries"] else ""]
            for d in SUBSCRIBER_DBS + RECORD_DBS if d in st]
    out.append("Store pages by database (mdb_stat -a; page %d bytes; %d "
               "pages in use):" % (st["_env"]["page size"],
                                   st["_env"].get("number of pages used",
                                                  0)))
    out.append("")
    out.append(table(rows, ["database", "entries", "depth", "MiB",
                            "bytes per entry"]))
    out.append("")
    out.append("Bytes per subscriber (its record, key, key id, MSISDN and "
               "one purchase): %.0f.  Bytes per usage record (the record "
               "and its two indexes): %.0f."
               % (sub_bytes / mw["subscribers"], rec_bytes / mw["records"]))

    rss = res["rss"]
    rows = []
    for row in rss["samples"]:
        cells = [str(row["t"])]
        for w, m in sorted((k, v) for k, v in row.items() if k != "t"):
            cells.append("%d / %d / %d" % (m["VmRSS"], m["RssAnon"],
                                           m["RssFile"]))
        rows.append(cells)
    n = max(len(r) for r in rows) - 1
    out.append("")
    w = rss.get("wrk", {})
    out.append("Worker memory, KiB as RSS / anonymous / file-backed (the "
               "store's map), 2 workers, 32 connections, keys over the "
               "large store, %d requests, load average %.2f at the end:"
               % (w.get("requests", 0), rss["load"]))
    out.append("")
    out.append(table(rows, ["s"] + ["worker %d" % (i + 1)
                                    for i in range(n)]))
    return "\n".join(out)
