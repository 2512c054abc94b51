"""Where the test suite's CPU goes: every process's CPU time, sampled once a second while `make test` runs,
attributed to the pytest-xdist worker whose test started it (PYTEST_XDIST_WORKER, inherited by every
process a test starts: stages, Ray's daemons and workers, servers) and to a role read from its command line
(`stage:evaluate`, `ray:RayTrainWorker`, `raylet`, `mlflow`, ...). Ray workers show `ray:IDLE` while they start.
The xdist workers' own (in-process) CPU shows as gw `none`.

    python benchmarks/suite_profile.py record suite.jsonl &          # then, beside it:
    GENFORGE_TEST_TIMES=times.jsonl make test
    python benchmarks/suite_profile.py report suite.jsonl times.jsonl [--tests 15]
    python benchmarks/suite_profile.py durations times.jsonl > tests/durations.json   # the suite's test order

`report` prints the CPU-seconds per role and per test (a process's CPU counts for the test running on its xdist
worker at that second). Processes that live under a second are missed; the sampler itself costs ~1% of a core.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import time

TICK = os.sysconf("SC_CLK_TCK")
ROLES = ("gcs_server", "raylet", "dashboard", "log_monitor", "runtime_env", "moto_server", "chrom", "uvicorn", "gunicorn", "mlflow", "dvc",
         "pytest", "ray start", "default_worker", "monitor.py")  # fmt: skip


def role(cmdline: str) -> str:
    if cmdline.startswith("ray::"):
        return "ray:" + cmdline.split()[0][5:].split(".")[0]
    stage = re.search(r"pipelines\.(\w+)", cmdline)
    if stage and "default_worker" not in cmdline:
        return "stage:" + stage.group(1)
    return next((name for name in ROLES if name in cmdline), "other:" + cmdline[:40])


def busy_seconds() -> float:
    """The whole machine's busy CPU-seconds since boot (/proc/stat: all but idle and iowait)."""
    fields = [int(v) for v in open("/proc/stat").read().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / TICK


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (e.g. "AMD EPYC"; platform.processor() is empty on Linux), else
    platform.processor(), else "?"."""
    cpuinfo = "/proc/cpuinfo"
    lines = open(cpuinfo).read().splitlines() if os.path.exists(cpuinfo) else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor() or "?")


def process_cpu(pid: str) -> tuple[str, float, str] | None:
    """("pid:start time", CPU-seconds so far (user + system), command line) of a live process, or None once it
    is gone. pids are reused, so the start time is part of the key; an exiting process has no command line."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    return f"{pid}:{fields[19]}", (int(fields[11]) + int(fields[12])) / TICK, cmdline


def record(out_path: str, interval: float) -> None:
    seen: dict[str, list] = {}  # "pid:starttime" -> [xdist worker, role]
    last: dict[str, float] = {}
    with open(out_path, "a", buffering=1) as out:
        while True:
            now, totals = time.time(), collections.Counter()
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or (found := process_cpu(pid)) is None:
                    continue
                key, cpu, cmdline = found
                if key not in seen:
                    try:
                        match = re.search(rb"PYTEST_XDIST_WORKER=(\w+)", open(f"/proc/{pid}/environ", "rb").read())
                    except OSError:
                        continue
                    seen[key] = [match.group(1).decode() if match else "none", None]
                if cmdline:  # Ray workers retitle themselves; an exiting process has none
                    seen[key][1] = role(cmdline)
                delta, last[key] = cpu - last.get(key, 0.0), cpu
                if delta > 0:
                    totals[(seen[key][0], seen[key][1] or "?")] += delta
            for (worker, name), cpu in totals.items():
                out.write(json.dumps({"t": round(now, 1), "gw": worker, "role": name, "cpu": round(cpu, 2)}) + "\n")
            time.sleep(interval)


def report(samples_path: str, times_path: str, top_tests: int) -> None:
    samples = [json.loads(line) for line in open(samples_path)]
    tests = [row for row in map(json.loads, open(times_path)) if "worker" in row]
    start, end = min(t["start"] for t in tests), max(t["end"] for t in tests)
    by_worker = collections.defaultdict(list)
    for t in tests:
        by_worker[t["worker"]].append(t)

    def test_at(worker: str, when: float) -> str:
        return next((t["test"] for t in by_worker.get(worker, []) if t["start"] - 1 <= when <= t["end"] + 1), f"{worker}: between tests")

    roles, per_test, per_test_role = collections.Counter(), collections.Counter(), collections.defaultdict(collections.Counter)
    for s in samples:
        if not start <= s["t"] <= end + 2:
            continue
        roles[(s["gw"] if s["gw"] == "none" else "test", s["role"])] += s["cpu"]
        if s["gw"] != "none":
            name = test_at(s["gw"], s["t"])
            per_test[name] += s["cpu"]
            per_test_role[name][s["role"]] += s["cpu"]
    print(f"wall {end - start:.0f} s, sampled CPU {sum(roles.values()):.0f} CPU-s")
    print("CPU-s by role (started by a test, or 'none': the xdist workers themselves and anything else):")
    for (where, name), cpu in roles.most_common(30):
        print(f"  {cpu:8.1f}  {where:5s} {name}")
    print(f"CPU-s of the processes each test started (top {top_tests}):")
    for name, cpu in per_test.most_common(top_tests):
        print(f"  {cpu:8.1f}  {name[-110:]}")
        print("            " + ", ".join(f"{r} {c:.0f}" for r, c in per_test_role[name].most_common(6)))


def without_xdist_group(nodeid: str) -> str:
    """A test's id without the "@group" pytest-xdist appends to the tests of an xdist_group (tests/conftest.py reads
    tests/durations.json by it too)."""
    return nodeid.rsplit("@", 1)[0] if nodeid.rfind("@") > nodeid.rfind("]") else nodeid


def durations(times_path: str) -> None:
    """Each test's wall-clock seconds in a recorded run, as JSON: conftest.py starts the longest first."""
    tests = [row for row in map(json.loads, open(times_path)) if "worker" in row]
    seconds = {without_xdist_group(t["test"]): round(t["end"] - t["start"], 1) for t in tests}
    print(json.dumps(dict(sorted(seconds.items())), indent=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("out")
    rec.add_argument("--interval", type=float, default=1.0)
    rep = sub.add_parser("report")
    rep.add_argument("samples")
    rep.add_argument("times")
    rep.add_argument("--tests", type=int, default=15)
    sub.add_parser("durations").add_argument("times")
    args = parser.parse_args()
    if args.command == "record":
        record(args.out, args.interval)
    elif args.command == "report":
        report(args.samples, args.times, args.tests)
    else:
        durations(args.times)


if __name__ == "__main__":
    main()
