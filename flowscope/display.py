"""Records as people read them: missing values, endpoints, and numbers (the TUI; the plain `-o table`
outputs print raw numbers for scripts)."""

from __future__ import annotations

import pandas as pd

from flowscope.coverage import Coverage

MISSING = "-"


def missing(value: object) -> bool:
    """Null, NA or NaN: a value no probe measured."""
    return value is None or (not isinstance(value, str | dict | list | tuple) and bool(pd.isna(value)))


def endpoint(ip: object, port: object) -> str:
    """An address and port as tools print them: 10.0.0.2:80, [fd00::2]:80; MISSING for no address."""
    address = MISSING if missing(ip) or ip == "" else f"[{ip}]" if ":" in str(ip) else str(ip)
    return address if missing(port) or int(port) < 0 else f"{address}:{int(port)}"


def side_name(ip: object, namespace: object = None, pod: object = None) -> object:
    """What names one end of a flow for a person: namespace/pod where the pod is known (hubble's habit), else
    its address."""
    if missing(pod) or pod == "":
        return ip
    return pod if missing(namespace) or namespace == "" else f"{namespace}/{pod}"


def named_endpoint(ip: object, port: object, namespace: object = None, pod: object = None) -> str:
    """shop/checkout-7d9f:8443 where the pod is known, else 10.0.0.2:8443 / [fd00::2]:8443."""
    return endpoint(side_name(ip, namespace, pod), port)


def _scaled(value: object, units: tuple[str, ...], step: float = 1000.0) -> str:
    """3 significant figures at most: 999, 1.23k, 12.3k, 123k, 1.23M ...; MISSING for a missing value."""
    if missing(value):
        return MISSING
    number = float(value)  # type: ignore[arg-type]
    for unit in units:
        if abs(number) < step or unit == units[-1]:
            if unit == units[0] and number.is_integer():
                return f"{int(number)}{unit}"
            digits = 2 if abs(number) < 10 else 1 if abs(number) < 100 else 0
            return f"{number:.{digits}f}{unit}"
        number /= step
    raise AssertionError("unreachable")


def bytes_rate(value: object) -> str:
    return _scaled(value, (" B/s", " kB/s", " MB/s", " GB/s", " TB/s"))


def rate(value: object) -> str:
    return _scaled(value, ("/s", "k/s", "M/s", "G/s"))


def count(value: object) -> str:
    return _scaled(value, ("", "k", "M", "G"))


def byte_count(value: object) -> str:
    return _scaled(value, (" B", " kB", " MB", " GB", " TB"))


def duration_us(value: object) -> str:
    if missing(value):
        return MISSING
    micros = float(value)
    if micros < 1000:
        return f"{micros:.0f}µs"
    if micros < 1_000_000:
        return f"{micros / 1000:.3g}ms"
    return f"{micros / 1_000_000:.3g}s"


FORMATTERS = {"bytes_rate": bytes_rate, "rate": rate, "count": count, "duration": duration_us}


def coverage_text(coverage: Coverage) -> str:
    produced, lost = coverage.produced, coverage.lost
    if produced == 0:
        return "coverage -"
    share = 100.0 * (produced - lost) / produced
    return f"coverage {share:.1f}% (lost {lost:,} of {produced:,})"


def seconds(value: float) -> str:
    """A duration as a person reads it: 2s, 1s for 1.02401, 0.5s, 1.5s (tenths at most)."""
    return f"{round(value, 1):g}s"


def clock(time: pd.Timestamp | None) -> str:
    if time is None or pd.isna(time):
        return "--:--:--"
    return pd.Timestamp(time).tz_convert("UTC").strftime("%H:%M:%S")
