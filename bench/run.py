"""`make bench`: runs every benchmark of bench/ in turn, then rewrites docs/benchmarks.md from their results.

Each benchmark is a process of its own (python -m bench.<name>) in its own process group, with a time
limit; one that fails or overruns is reported in the document as not measured, with the reason, and
the others still run. Results of earlier runs are removed first, so the document never mixes runs.

    sudo .venv/bin/python -m bench.run [--only dataplane,accuracy]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench import lab, report

ROOT = Path(__file__).resolve().parent.parent
# name: time limit in seconds (the sum bounds a whole `make bench`: about 14 minutes)
BENCHMARKS = {
    "dataplane": 200,
    "accuracy": 45,
    "map_drain": 75,
    "events": 110,
    "identity": 30,
    "agent": 180,  # seven runs: idle; 10k and 100k flows, each without and with the flow log and as `flowscope agent`
    "top_refresh": 45,  # written by the TUI's engineers (bench/top_refresh.py); run when present
    "clickhouse": 150,
    "flowlog": 420,  # one hour of 10k flows/s written (36M rows), then read: about 4 minutes here
    "jsonl": 40,
    "alternatives": 150,
    "prometheus": 120,
    "grpc_api": 100,  # 75 s here
}


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def run_one(name: str, limit: float) -> dict:
    if not (ROOT / "bench" / f"{name}.py").exists():
        return {"status": "absent", "reason": f"bench/{name}.py does not exist yet"}
    (lab.RESULTS_DIR / f"{name}.json").unlink(missing_ok=True)
    lab.log(f"== {name} (limit {limit:.0f} s)")
    load_before, started = load_average(), time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", f"bench.{name}"], cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    tail: list[str] = []

    def echo() -> None:  # the benchmark's progress lines, shown as they come, the last ones kept
        assert process.stderr is not None
        for line in process.stderr:
            sys.stderr.write(line)
            tail[:] = [*tail[-14:], line.rstrip()]

    echoing = threading.Thread(target=echo, daemon=True)
    echoing.start()
    timed_out = False
    try:
        process.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(process.pid, signal.SIGINT)  # the benchmark removes its lab on the way out
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    echoing.join(timeout=5)
    entry = {
        "elapsed_s": round(time.monotonic() - started, 1),
        "load_before": load_before,
        "load_after": load_average(),
    }
    if timed_out:
        entry.update(status="timeout", reason=f"stopped after its {limit:.0f} s limit")
    elif process.returncode != 0 or not (lab.RESULTS_DIR / f"{name}.json").exists():
        entry.update(status="failed", reason=next((t for t in reversed(tail) if t.strip()), "no output"), tail=tail)
    else:
        entry["status"] = "ok"
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated benchmarks to run (the document is rewritten from all results)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the benchmarks load BPF programs and create network namespaces; run `sudo make bench`.")
    chosen = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"no benchmark named {unknown[0]}; the benchmarks are {', '.join(BENCHMARKS)}.")
    lab.RESULTS_DIR.mkdir(exist_ok=True)
    run_file = lab.RESULTS_DIR / "run.json"
    previous = json.loads(run_file.read_text()) if args.only and run_file.exists() else {"scripts": {}}
    started = time.monotonic()
    scripts = previous["scripts"]
    for name in chosen:
        scripts[name] = run_one(name, BENCHMARKS[name])
    run = {
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "elapsed_s": round(time.monotonic() - started, 1),
        "command": "sudo make bench" if not args.only else f"sudo .venv/bin/python -m bench.run --only {args.only}",
        "machine": report.machine(),
        "scripts": scripts,
    }
    run_file.write_text(json.dumps(run, indent=2) + "\n")
    path = report.write()
    lab.log(f"bench: {run['elapsed_s']:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
