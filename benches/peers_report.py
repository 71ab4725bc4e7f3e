#!/usr/bin/env python3
"""Helper of benches/peers.sh (standard library only).

  peers_report.py free-port
      a TCP port on 127.0.0.1 that was free a moment ago
  peers_report.py qmp SOCKET COMMAND [ARGUMENTS-JSON]
      one QMP command; prints its return value as JSON
  peers_report.py mirror-wait SOCKET JOB ready|concluded SECONDS
      polls until the block job is READY and actively synced (ready) or gone through
      to CONCLUDED (concluded); fails after SECONDS
  peers_report.py record RESULTS ROUND TARGET WORKLOAD FIO_JSON
      takes the figures out of one fio JSON output and appends them to RESULTS
  peers_report.py report RESULTS [--json] [--meta KEY=VALUE]...
      medians over the rounds, ratios of ours and ours-pair against their peers
"""
import json
import socket
import statistics
import sys
import time

# (workload, figure, label, higher is better): the figures the ratios are taken of.
HEADLINES = [
    ("rw4k_qd32", "iops", "IOPS", True),
    ("rw4k_qd1", "p50_us", "p50 us", False),
    ("rw4k_qd1", "p99_us", "p99 us", False),
    ("seq1m", "mib_s", "MiB/s", True),
    ("rr4k_qd32", "iops", "IOPS", True),
    ("rw4k_flush32", "iops", "IOPS", True),
]
FIGURES = ["iops", "mib_s", "mean_us", "p50_us", "p99_us"]
OURS = ["ours", "ours-pair"]
BASELINES = ["nbdkit", "qemu-nbd", "mirror", "raw"]


def fail(message):
    sys.stderr.write("peers_report.py: %s\n" % message)
    sys.exit(1)


# ----------------------------------------------------------------------------- QMP


class Qmp:
    def __init__(self, path, timeout=30.0):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.file = self.sock.makefile("rw")
        self._read()  # the greeting
        self.call("qmp_capabilities")

    def _read(self):
        line = self.file.readline()
        if not line:
            fail("QMP: the connection closed")
        return json.loads(line)

    def call(self, command, arguments=None):
        message = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self.file.write(json.dumps(message) + "\n")
        self.file.flush()
        while True:  # events may come before the answer; the socket timeout bounds this
            answer = self._read()
            if "event" in answer:
                continue
            if "error" in answer:
                fail("QMP %s: %s" % (command, answer["error"].get("desc", answer["error"])))
            return answer["return"]

    def close(self):
        self.sock.close()


def block_job(qmp, job):
    for entry in qmp.call("query-block-jobs"):
        if entry.get("device") == job:
            return entry
    return None


def mirror_wait(path, job, state, seconds):
    deadline = time.monotonic() + float(seconds)
    qmp = Qmp(path)
    try:
        while True:
            jobs = {j["id"]: j for j in qmp.call("query-jobs")}
            entry = jobs.get(job)
            if entry is None:
                fail("block job %s is gone" % job)
            if entry.get("error"):
                fail("block job %s failed: %s" % (job, entry["error"]))
            if state == "ready" and entry["status"] == "ready":
                block = block_job(qmp, job)
                if (
                    block
                    and block.get("ready")
                    and block.get("actively-synced")
                    and block.get("offset") == block.get("len")
                    and block.get("io-status", "ok") == "ok"
                ):
                    print(json.dumps(block))
                    return
            if state == "concluded" and entry["status"] == "concluded":
                print(json.dumps(entry))
                return
            if time.monotonic() >= deadline:
                fail("block job %s not %s after %ss: %s" % (job, state, seconds, entry))
            time.sleep(0.1)
    finally:
        qmp.close()


# ----------------------------------------------------------------------------- fio


def figures_of(path, workload):
    with open(path) as f:
        text = f.read()
    try:
        document = json.loads(text[text.index("{"):])  # fio may print a warning first
        job = document["jobs"][0]
    except (ValueError, KeyError, IndexError) as error:
        fail("%s is not fio JSON output: %s" % (path, error))
    if job.get("error"):
        fail("fio reported error %s in %s" % (job["error"], path))
    side = job["read" if workload.startswith("rr") else "write"]
    if side["total_ios"] <= 0:
        fail("fio completed no request in %s" % path)
    latency = side["lat_ns"]
    percentiles = latency.get("percentile", {})
    figures = {
        "iops": side["iops"],
        "mib_s": side["bw_bytes"] / 1048576.0,
        "mean_us": latency["mean"] / 1000.0,
        "p50_us": percentiles.get("50.000000", 0) / 1000.0,
        "p99_us": percentiles.get("99.000000", 0) / 1000.0,
        "requests": side["total_ios"],
    }
    flushes = job.get("sync", {})
    if flushes.get("total_ios"):
        figures["flushes"] = flushes["total_ios"]
        figures["flush_mean_us"] = flushes["lat_ns"]["mean"] / 1000.0
        figures["writes_per_flush"] = side["total_ios"] / float(flushes["total_ios"])
    return figures


def record(results, round_, target, workload, path):
    figures = figures_of(path, workload)
    if workload == "rw4k_flush32" and not figures.get("flushes"):
        fail("no FLUSH completed in %s" % path)
    line = {"round": int(round_), "target": target, "workload": workload, "figures": figures}
    with open(results, "a") as f:
        f.write(json.dumps(line) + "\n")
    sys.stderr.write(
        "  %-9s %-12s %9.0f IOPS %8.1f MiB/s  p50 %7.1f us  p99 %7.1f us\n"
        % (target, workload, figures["iops"], figures["mib_s"], figures["p50_us"], figures["p99_us"])
    )


# ----------------------------------------------------------------------------- report


def load(results):
    samples = {}  # (target, workload) -> figure -> [values, round order]
    with open(results) as f:
        for line in f:
            entry = json.loads(line)
            cell = samples.setdefault((entry["target"], entry["workload"]), {})
            for figure, value in entry["figures"].items():
                cell.setdefault(figure, []).append(value)
    return samples


def build(results, meta):
    samples = load(results)
    targets = [t for t in meta["targets"].split(",") if t]
    workloads = [w for w in meta["workloads"].split(",") if w]
    figures = {}
    for target in targets:
        for workload in workloads:
            cell = samples.get((target, workload))
            if cell is None:
                fail("no figures for %s / %s" % (target, workload))
            entry = {name: statistics.median(values) for name, values in cell.items()}
            entry["samples"] = cell
            figures.setdefault(target, {})[workload] = entry
    ratios = {}
    for ours in [t for t in OURS if t in targets]:
        for baseline in [b for b in BASELINES if b in targets]:
            row = {}
            for workload, figure, _, _ in HEADLINES:
                if workload in workloads:
                    value = figures[ours][workload][figure]
                    base = figures[baseline][workload][figure]
                    row["%s_%s" % (workload, figure)] = value / base if base else None
            ratios.setdefault(ours, {})[baseline] = row
    document = {"tool": "benches/peers.sh"}
    for key, value in meta.items():
        if key in ("targets", "workloads"):
            document[key] = [v for v in value.split(",") if v]
        elif key in ("size_bytes", "runtime_s", "ramp_s", "repeat", "flush_qd"):
            document[key] = int(value)
        elif key.startswith("note_"):
            if key[5:] in targets:
                document.setdefault("notes", {})[key[5:]] = value
        else:
            document[key] = value
    document["figures"] = figures
    document["ratios"] = ratios
    document["ratio_keys"] = [
        {"key": "%s_%s" % (w, f), "workload": w, "figure": f, "label": "%s %s" % (w, l), "higher_is_better": h}
        for w, f, l, h in HEADLINES
        if w in workloads
    ]
    return document


def number(value, decimals):
    return "-" if value is None else "%.*f" % (decimals, value)


def spread(cell, figure):
    values = cell["samples"].get(figure, [])
    middle = statistics.median(values) if values else 0
    return "%.0f%%" % (100.0 * (max(values) - min(values)) / middle) if len(values) > 1 and middle else "-"


def table(rows, left=2):
    """Prints rows of strings in columns: the first `left` aligned left, the rest right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(w) if i < left else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        print("  ".join(cells).rstrip())


def size_text(size):
    return "%.2f GiB" % (size / 2.0**30) if size >= 2**30 else "%d MiB" % (size // 2**20)


def print_text(doc):
    repeat = doc["repeat"]
    rounds = "median of %d interleaved rounds" % repeat if repeat > 1 else "one round"
    print(
        "peers.sh: %s; %s image files; each workload %d s after a %d s ramp, one fio client"
        % (rounds, size_text(doc["size_bytes"]), doc["runtime_s"], doc["ramp_s"])
    )
    print("command: %s" % doc.get("command", "?"))
    print("commit:  %s" % doc.get("commit", "?"))
    print("tools:   %s" % doc.get("versions", "?"))
    print()
    headline = {w: f for w, f, _, _ in HEADLINES if f != "p99_us"}
    rows = [["target", "workload", "IOPS", "MiB/s", "mean us", "p50 us", "p99 us", "spread"]]
    for target in doc["targets"]:
        for workload in doc["workloads"]:
            cell = doc["figures"][target][workload]
            rows.append(
                [target, workload, number(cell["iops"], 0), number(cell["mib_s"], 1)]
                + [number(cell[f], 1) for f in ("mean_us", "p50_us", "p99_us")]
                + [spread(cell, headline[workload])]
            )
    table(rows)
    if repeat > 1:
        print("(spread: (max - min) / median over the rounds, of IOPS, MiB/s for seq1m, p50 for rw4k_qd1)")
    if "rw4k_flush32" in doc["workloads"]:
        print()
        print("rw4k_flush32 at iodepth %d: FLUSH requests in the window, writes per FLUSH, mean FLUSH latency"
              % doc.get("flush_qd", 1))
        rows = [["target", "FLUSHes", "writes/FLUSH", "FLUSH us"]]
        for target in doc["targets"]:
            cell = doc["figures"][target]["rw4k_flush32"]
            rows.append(
                [target, number(cell.get("flushes"), 0)]
                + [number(cell.get(f), 1) for f in ("writes_per_flush", "flush_mean_us")]
            )
        table(rows, left=1)
    if doc["ratios"]:
        baselines = [b for b in BASELINES if b in doc["targets"]]
        print()
        print("ratios within this run (IOPS and MiB/s: above 1x is faster; latency: below 1x is faster)")
        rows = [["target", "figure"] + ["vs %s" % b for b in baselines]]
        for ours, against in doc["ratios"].items():
            for key in doc["ratio_keys"]:
                values = [against[b][key["key"]] for b in baselines]
                rows.append([ours, key["label"]] + ["-" if v is None else "%.2fx" % v for v in values])
        table(rows)
    print()
    print("what each row promises:")
    for target in doc["targets"]:
        print("  %-10s %s" % (target, doc.get("notes", {}).get(target, "")))


def report(args):
    results, rest = args[0], args[1:]
    as_json = "--json" in rest
    meta = {}
    i = 0
    while i < len(rest):
        if rest[i] == "--meta":
            key, _, value = rest[i + 1].partition("=")
            meta[key] = value
            i += 2
        else:
            i += 1
    doc = build(results, meta)
    if as_json:
        json.dump(doc, sys.stdout, indent=1)
        print()
    else:
        print_text(doc)


def main(argv):
    if not argv:
        fail(__doc__)
    command, args = argv[0], argv[1:]
    if command == "free-port":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            print(s.getsockname()[1])
    elif command == "qmp" and len(args) in (2, 3):
        qmp = Qmp(args[0])
        try:
            print(json.dumps(qmp.call(args[1], json.loads(args[2]) if len(args) == 3 else None)))
        finally:
            qmp.close()
    elif command == "mirror-wait" and len(args) == 4 and args[2] in ("ready", "concluded"):
        mirror_wait(*args)
    elif command == "record" and len(args) == 5:
        record(*args)
    elif command == "report" and args:
        report(args)
    else:
        fail(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
