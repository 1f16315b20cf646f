"""What doctor and the capture summary say about identity."""

import functools

from flowscope import enrich
from flowscope.config import IdentityConfig
from flowscope.enrich.node import NodeScanner
from flowscope.enrich.report import identity_lines, identity_report, identity_summary
from tests.settings import identity_settings


def args(*argv: str) -> IdentityConfig:
    return identity_settings(*argv)


def test_doctor_lists_the_sources_in_use(tmp_path, monkeypatch):
    # The node's cgroups: one kubelet pod with two containers (and no processes, so no pod netns).
    cgroups = tmp_path / "cgroup"
    pod_dir = cgroups / "kubepods.slice" / "kubepods-pod1a2b3c4d_0000_4111_8222_333344445555.slice"
    for container in ("ab" * 32, "cd" * 32):
        (pod_dir / f"cri-containerd-{container}.scope").mkdir(parents=True)
    monkeypatch.setattr(enrich, "NodeScanner", functools.partial(NodeScanner, cgroup_root=str(cgroups)))
    metadata = tmp_path / "names.yaml"
    metadata.write_text("pods: [{namespace: shop, name: a, ips: [10.0.0.1]}]\nnodes: [{name: n1, ips: [10.0.1.1]}]\n")
    report = identity_report(args("--metadata", str(metadata), "--node-name", "n1"))
    assert identity_lines(report) == [
        "identity      node name n1; deleted pods named for 60 s",
        f"  node        ok           cgroup v2 at {cgroups}: 1 pods, 2 containers, 0 pod netns, 0 pod interfaces",
        "  kubernetes  off          not in a pod and no --kubeconfig",
        f"  static      loaded       {metadata}: 1 pods, 1 nodes",
    ]


def test_doctor_reports_a_bad_source_in_one_line(tmp_path):
    report = identity_report(args("--metadata", str(tmp_path / "missing.yaml")))
    assert identity_lines(report) == [
        f"identity      error: cannot read metadata file {tmp_path / 'missing.yaml'}: No such file or directory."
    ]


def test_the_capture_summary_counts_named_sides_by_source_and_misses():
    report = {"resolved": {"cgroup": 10, "ip": 5}, "unresolved": 3, "misses": {"ip_unknown": 3}}
    assert identity_summary(report) == "identity: 15 of 18 sides named (cgroup 10, ip 5); misses: ip_unknown 3"
    assert identity_summary({"resolved": {}, "unresolved": 0, "misses": {}}) == "identity: 0 of 0 sides named"
