"""`flowscope doctor`: what this kernel supports, which probes run (and why the others do not), and whether
identity works."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from flowscope.cli.options import add_settings, config_from
from flowscope.kernel.catalog import ProbeStatus


def register(commands: Any) -> None:
    doctor = commands.add_parser("doctor", help="what this kernel supports and which probes run (and why not)")
    doctor.add_argument("-o", "--output", choices=("table", "json"), default="table")
    add_settings(doctor, "identity")
    doctor.set_defaults(run=run_doctor)


def probes_summary(probes: list[ProbeStatus]) -> list[dict[str, object]]:
    return [
        {"name": p.name, "active": p.active, "hook": p.hook, "reason": p.reason or None, "remedy": p.remedy or None}
        for p in probes
    ]


def doctor_report(host_root: str = "") -> dict[str, Any]:
    """What `doctor` reports of the kernel, the headers (the node's under `host_root` first) and the probes."""
    import platform

    from flowscope.kernel.features import probe_features
    from flowscope.kernel.headers import HeadersError, find_headers
    from flowscope.kernel.loader import LoaderError, LoadOptions, import_bcc, plan_families, probe_statuses
    from flowscope.kernel.offsets import drop_reasons_note

    root = os.geteuid() == 0
    features = probe_features(with_program_types=root)
    report: dict[str, Any] = {"kernel": platform.release(), "root": root, "features": features.to_dict()}
    try:
        headers = find_headers(host_root=host_root)
        report["headers"] = {"path": str(headers.path), "exact": headers.exact, "description": headers.description}
    except HeadersError as err:
        report["headers"] = {"error": str(err)}
    try:
        bcc = import_bcc()
        report["bcc"] = getattr(bcc, "__version__", "installed")
    except LoaderError as err:
        report["bcc"] = None
        report["bcc_error"] = str(err)
    options = LoadOptions(host_root=host_root)
    statuses = plan_families(features, options)
    report["events_transport"] = "ring buffer" if features.ringbuf else "perf buffer"
    report["drop_reasons"] = drop_reasons_note(features.btf)
    report["probes"] = probes_summary(probe_statuses(statuses))
    report["families"] = [
        {"name": s.family.name, "uses": hook_kind(s.family), "events": report["events_transport"]}
        for s in statuses
        if s.active
    ]
    if root and report.get("bcc") and "error" not in report["headers"]:
        report["load_check"], report["verifier"] = _load_check(options)
    elif not root:
        report["load_check"] = "skipped: not root (run `sudo flowscope doctor` to compile and load the probes)"
    return report


HOOK_KINDS = {"raw_tracepoint": "raw tracepoint", "tracepoint": "tracepoint", "kprobe": "kprobe", "tc": "tc clsact"}


def hook_kind(family: Any) -> str:
    """What a probe family attaches with (the first of its requirements that is a hook)."""
    return next((HOOK_KINDS[r.kind] for r in family.requires if r.kind in HOOK_KINDS), "")


def _load_check(options: Any) -> tuple[str, dict[str, Any] | None]:
    """Compiles (or takes from the compiled-object cache) and loads the runnable probes, without attaching
    tc, to prove they work here; the same compile step in a process of its own as `capture` runs. Returns
    the verdict and the verifier's report of each program."""
    from flowscope.kernel.compile_child import load
    from flowscope.kernel.loader import LoaderError

    try:
        loaded = load(options)
    except LoaderError as err:
        return f"failed: {err}", None
    loaded.close()
    verifier = {
        "object_cache": loaded.object_cache,
        "compile_seconds": loaded.compile_seconds,
        "compiler_warnings": loaded.compiler_warnings,
        "programs": loaded.verifier,
    }
    return "ok: the runnable probes compile and load", verifier


def run_doctor(args: argparse.Namespace) -> int:
    from flowscope.enrich.report import identity_lines, identity_report

    config = config_from(args)
    report = doctor_report(config.probes.host_root)
    report["identity"] = identity_report(config.identity)
    if args.output == "json":
        print(json.dumps(report, indent=2))
        return 0
    features = report["features"]
    lines = [
        f"kernel        {report['kernel']}",
        f"root          {'yes' if report['root'] else 'no'}",
        f"BTF           {features['btf'] or features['btf_error']}",
        f"tracefs       {features['tracefs'] or features['tracefs_note']}",
        f"bpffs         {'mounted' if features['bpffs'] else features['bpffs_note']}",
        f"headers       {report['headers'].get('description') or report['headers'].get('error')}",
        f"BCC           {report['bcc'] or report.get('bcc_error')}",
        f"events        {report['events_transport']}; batch map ops: {'yes' if features['batch_map_ops'] else 'no'}",
        f"kprobes       {'yes' if features['kprobes'] else 'no: ' + (features['kprobes_reason'] or '')}",
    ]
    if features["program_types"]:
        missing = sorted(name for name, ok in features["program_types"].items() if not ok)
        lines.append(f"prog types    unavailable: {', '.join(missing) or 'none'}")
    lines.append("probes")
    for probe in report["probes"]:
        state = "active" if probe["active"] else "unavailable"
        line = f"  {probe['name']:<22} {state:<12} {probe['hook']}"
        if not probe["active"]:
            line += f"\n  {'':<22} why: {probe['reason']}" + (f"; remedy: {probe['remedy']}" if probe["remedy"] else "")
        lines.append(line)
    lines.append(f"drop reasons  {report['drop_reasons']}")
    lines.append(f"load check    {report.get('load_check')}")
    lines += verifier_lines(report.get("verifier"), args.verbose)
    lines += identity_lines(report["identity"])
    print("\n".join(lines))
    return 0


def verifier_lines(verifier: dict[str, Any] | None, verbose: bool) -> list[str]:
    if not verifier:
        return []
    lines = [
        f"verifier      {len(verifier['programs'])} programs, compile step {verifier['compile_seconds']:.1f} s, "
        f"object cache {verifier['object_cache']}"
    ]
    for program in verifier["programs"]:
        verified = program["verified_instructions"]
        lines.append(
            f"  {program['name']:<36} {program['attach']:<36} {program['instructions']:>6} insns, "
            f"{verified if verified is not None else '?':>7} verified, {program['load_ms']:>7.1f} ms"
        )
    if verbose and verifier["object_cache"] == "hit":
        lines.append("compiler      not run: the compiled-object cache had these probes")
    elif verbose:
        lines.append(f"compiler      {verifier['compiler_warnings']} warnings (in the debug log above)")
    return lines
