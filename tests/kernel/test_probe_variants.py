"""The kprobe variants of the drop, TCP and connection probes, for kernels without the tracepoints: this
kernel cannot attach kprobes (CONFIG_KPROBES is off), but it compiles them with the running kernel's BTF
offsets and its verifier accepts every program, as a kernel with kprobes would load them."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowscope.kernel.catalog import SKB_DROP_KPROBE, SOCK_STATE_KPROBE, TCP_EVENTS_KPROBE
from flowscope.kernel.features import probe_features
from flowscope.kernel.headers import export_for_bcc, find_headers
from flowscope.kernel.loader import LoadOptions, cflags_for, import_bcc, module_text, plan_families

BPF_PROG_TYPE_KPROBE = 2
VARIANTS = [SKB_DROP_KPROBE, TCP_EVENTS_KPROBE, SOCK_STATE_KPROBE]
EXPECTED = {
    "kprobe__sk_skb_reason_drop",
    "kprobe____tcp_retransmit_skb",
    "kretprobe____tcp_retransmit_skb",
    "kprobe__tcp_retransmit_skb",
    "kretprobe__tcp_retransmit_skb",
    "kprobe__tcp_rcv_established",
    "kprobe__tcp_reset",
    "kprobe__tcp_v4_send_reset",
    "kprobe__tcp_v6_send_reset",
    "kprobe__tcp_send_active_reset",
    "kprobe__tcp_set_state",
    "kprobe__inet_sk_set_state",
}


def test_kprobe_variants_are_reported_unavailable_here() -> None:
    statuses = {s.family.name: s for s in plan_families(probe_features(), LoadOptions())}
    for variant in VARIANTS:
        assert not statuses[variant.name].active
        assert statuses[variant.replaces].active


@pytest.mark.parametrize("perf", [False, True])
def test_kprobe_variants_compile_and_pass_the_verifier(monkeypatch: pytest.MonkeyPatch, perf: bool) -> None:
    bcc = import_bcc()
    export_for_bcc(find_headers())
    # BCC attaches kprobe__* functions when it loads a module; this kernel has no kprobes to attach to.
    monkeypatch.setattr(bcc.BPF, "_trace_autoload", lambda _self: None)
    features = probe_features()
    module = bcc.BPF(
        text=module_text(VARIANTS).encode(), cflags=cflags_for(VARIANTS, features, LoadOptions(perf_events=perf))
    )
    try:
        names = {
            bcc.lib.bpf_function_name(module.module, i).decode()
            for i in range(bcc.lib.bpf_num_functions(module.module))
        }
        programs = {name for name in names if name.startswith(("kprobe__", "kretprobe__"))}
        assert programs == EXPECTED
        for name in sorted(programs):
            fd = module.load_func(name.encode(), bcc.BPF.KPROBE).fd
            # The kernel's own record of the program: a kprobe program the verifier walked.
            fields = dict(line.split(":\t", 1) for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines())
            assert int(fields["prog_type"]) == BPF_PROG_TYPE_KPROBE and int(fields["verified_insns"]) > 0, name
    finally:
        module.cleanup()
