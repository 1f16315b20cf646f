"""flowscope beside what a user of a plain Linux host would pick instead, on the same traffic in one run:
pmacctd (pmacct: libpcap flow accounting) and softflowd (a libpcap NetFlow probe), both from Debian.

tcpreplay sends the same pcap through fsb0a as fast as it can for each tool in turn (and once with no tool,
the baseline): FLOWS distinct IPv4/UDP flows of 60-byte frames, each seen LOOPS times. A packet capture
(dumpcap, then tshark) runs beside each tool, the reference every tool's per-flow counts are compared to.
For each tool: tcpreplay's packet rate against the baseline's (the throughput ratio), the tool's CPU
seconds (utime + stime from /proc, with its child processes) per million packets (flowscope counts in the
kernel, in the sender's context, so its cost shows in the throughput ratio rather than in its process),
the packets it counted against the capture, and
the flows whose packet count equals the capture's exactly. Bytes differ by convention (flowscope and the
capture count the frame, 60 bytes; pmacct and NetFlow the IP packet, 46), so each tool's bytes are checked
against the capture's in its own convention.
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from bench import lab
from bench.accuracy import start_capture, stop_capture

FRAME, IP_PACKET = 60, 46


def captured(path: Path) -> pd.DataFrame:
    """Per source port (every flow has its own), packets seen by the capture."""
    out = subprocess.run(
        ["tshark", "-r", str(path), "-Y", f"udp.dstport == {lab.UDP_SINK_PORT}", "-T", "fields", "-e", "udp.srcport"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    return pd.Series([int(p) for p in out], dtype="int64").value_counts().rename("packets").rename_axis("port")


def run_flowscope(directory: Path) -> tuple[subprocess.Popen, callable]:
    out = directory / "flowscope.jsonl"
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("flowscope")), "capture", "-i", lab.VETH_CLIENT, "--interval", "1",
         "-o", "jsonl", "--file", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out.exists() and '"type":"interval"' in out.read_text()):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("flowscope capture did not start")
        time.sleep(0.2)

    def counts() -> pd.DataFrame:
        from flowscope.formats.jsonl import open_replay

        flows = pd.concat([b.flows for b in open_replay(str(out))], ignore_index=True)
        mine = flows[(flows["direction"] == "egress") & (flows["dst_port"] == lab.UDP_SINK_PORT)]
        summed = mine.groupby(mine["src_port"].astype("int64"))[["packets", "bytes"]].sum()
        return summed.rename_axis("port").astype("int64")

    return process, counts


def run_pmacctd(directory: Path) -> tuple[subprocess.Popen, callable]:
    table = directory / "pmacct.csv"
    config = directory / "pmacctd.conf"
    config.write_text(
        f"daemonize: false\npcap_interface: {lab.VETH_CLIENT}\n"
        "aggregate: src_host, dst_host, src_port, dst_port, proto\n"
        f"plugins: print\nprint_output: csv\nprint_output_file: {table}\nprint_output_file_append: true\n"
        "print_refresh_time: 1\nplugin_buffer_size: 102400\nplugin_pipe_size: 10240000\n"
    )
    process = subprocess.Popen(["pmacctd", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2)  # libpcap opens the interface

    def counts() -> pd.DataFrame:
        frame = pd.read_csv(table, dtype=str)
        frame = frame[frame["SRC_IP"] != "SRC_IP"]  # each appended refresh repeats the header
        frame = frame[frame["DST_PORT"].astype("int64") == lab.UDP_SINK_PORT]
        counts = frame[["PACKETS", "BYTES"]].astype("int64").set_axis(["packets", "bytes"], axis=1)
        return counts.groupby(frame["SRC_PORT"].astype("int64").to_numpy()).sum().rename_axis("port")

    return process, counts


FLOW_LINE = re.compile(
    r"\]:(\d+) <> \[[^\]]+\]:(\d+) proto:17 octets>:(\d+) packets>:(\d+) octets<:(\d+) packets<:(\d+)"
)


def run_softflowd(directory: Path) -> tuple[subprocess.Popen, callable]:
    control = directory / "softflowd.ctl"
    # Exports go to a loopback port nothing listens on; the flows are read from its control socket.
    process = subprocess.Popen(
        ["softflowd", "-d", "-i", lab.VETH_CLIENT, "-n", "127.0.0.1:9995", "-c", str(control), "-m", "100000",
         "-t", "maxlife=3600", "-t", "udp=3600"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(2)

    def counts() -> pd.DataFrame:
        dump = subprocess.run(["softflowctl", "-c", str(control), "dump-flows"], capture_output=True, text=True).stdout
        rows = []
        for match in FLOW_LINE.finditer(dump):
            a, b, out_bytes, out_packets, in_bytes, in_packets = (int(x) for x in match.groups())
            port, packets, octets = (a, out_packets, out_bytes) if b == lab.UDP_SINK_PORT else (b, in_packets, in_bytes)
            rows.append({"port": port, "packets": packets, "bytes": octets})
        frame = pd.DataFrame(rows, columns=["port", "packets", "bytes"])
        return frame.groupby("port")[["packets", "bytes"]].sum().astype("int64")

    return process, counts


TOOLS = {
    "flowscope": (run_flowscope, FRAME),
    "pmacctd": (run_pmacctd, IP_PACKET),
    "softflowd": (run_softflowd, IP_PACKET),
}


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its children (pmacctd runs its plugins as child processes)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    total = lab.cpu_seconds(pid)
    for child in children:
        try:
            total += lab.cpu_seconds(child)
        except (OSError, ValueError):
            continue  # gone meanwhile
    return total


def one_run(name: str, pcap: Path, loops: int, directory: Path) -> dict:
    capture_path = directory / f"{name}.pcapng"
    process, counts = (None, None)
    if name != "baseline":
        process, counts = TOOLS[name][0](directory)
    capture = start_capture(capture_path)
    cpu_before = tree_cpu_seconds(process.pid) if process else 0.0
    replay = lab.tcpreplay(pcap, loops=loops)
    output, _ = replay.communicate(timeout=600)
    sent, rate = lab.tcpreplay_rate(output)
    time.sleep(2.5)  # the tools' next refresh or interval holds the last packets
    cpu = (tree_cpu_seconds(process.pid) - cpu_before) if process else 0.0
    seen = stop_capture(capture)
    result = {"tool": name, "sent": sent, "pps": round(rate), "capture": seen}
    if process is None:
        return result
    tool = counts()
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
    reference = captured(capture_path)
    joined = pd.DataFrame({"reference": reference}).join(tool, how="outer").fillna(0).astype("int64")
    per_packet = TOOLS[name][1]
    result |= {
        "cpu_s": round(cpu, 2),
        "cpu_s_per_million_packets": round(cpu / max(sent, 1) * 1e6, 2),
        "packets_counted": int(joined["packets"].sum()),
        "packets_captured": int(joined["reference"].sum()),
        "flows_exact": int((joined["packets"] == joined["reference"]).sum()),
        "flows": len(joined),
        "bytes_as_counted_exact": bool((joined["bytes"] == joined["packets"] * per_packet).all()),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=2000)
    parser.add_argument("--loops", type=int, default=500, help="times tcpreplay sends the pcap (packets per flow)")
    args = parser.parse_args()
    lab.require_tools("tcpreplay", "dumpcap", "tshark", "pmacctd", "softflowd", "softflowctl")
    runs = []
    with lab.lab(), lab.udp_sink(), tempfile.TemporaryDirectory(prefix="fsbench-alt-") as name:
        directory = Path(name)
        pcap = lab.write_udp_flows_pcap(directory / "flows.pcap", args.flows)
        for tool in ("baseline", "flowscope", "pmacctd", "softflowd"):
            result = one_run(tool, pcap, args.loops, directory)
            runs.append(result)
            if tool == "baseline":
                lab.log(f"baseline: tcpreplay {result['pps']:,} packets/s, capture {result['capture']}")
                continue
            result["throughput_ratio"] = round(result["pps"] / runs[0]["pps"], 3)
            lab.log(
                f"{tool}: tcpreplay {result['pps']:,} packets/s (x{result['throughput_ratio']} of the baseline), "
                f"CPU {result['cpu_s']} s ({result['cpu_s_per_million_packets']} s per million packets), counted "
                f"{result['packets_counted']:,} of {result['packets_captured']:,} captured packets, "
                f"{result['flows_exact']} of {result['flows']} flows exact, bytes as counted exact: "
                f"{result['bytes_as_counted_exact']}"
            )
    lab.save("alternatives", {"flows": args.flows, "loops": args.loops, "runs": runs})


if __name__ == "__main__":
    main()
