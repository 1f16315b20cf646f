"""Kernel addresses to "function+0xoffset" from a kallsyms table (flowscope.kernel.kallsyms), as BCC's ksym names
them: the nearest function symbol at or below the address, the last listed of several at one address."""

from __future__ import annotations

from pathlib import Path

from flowscope.kernel.kallsyms import KernelSymbols

TABLE = """\
ffffffff81000000 T srso_alias_untrain_ret
ffffffff81000000 T _text
ffffffff81001000 t do_one_initcall
ffffffff81002000 D some_data
ffffffff81003000 W weak_function
ffffffffc0100000 t nf_hook_slow\t[nf_tables]
ffffffffc0100400 b module_bss\t[nf_tables]
"""


def symbols(tmp_path: Path, text: str = TABLE) -> KernelSymbols:
    path = tmp_path / "kallsyms"
    path.write_text(text)
    return KernelSymbols(path)


def test_names_and_offsets(tmp_path: Path) -> None:
    table = symbols(tmp_path)
    assert table.name(0xFFFFFFFF81000000) == "_text+0x0"
    assert table.name(0xFFFFFFFF81001234) == "do_one_initcall+0x234"
    # Data symbols are never a code location: the function before them is.
    assert table.name(0xFFFFFFFF81002010) == "do_one_initcall+0x1010"
    assert table.name(0xFFFFFFFF81003008) == "weak_function+0x8"
    # A module's symbol, without its module.
    assert table.name(0xFFFFFFFFC0100500) == "nf_hook_slow+0x500"


def test_below_every_symbol_or_zero_is_unknown(tmp_path: Path) -> None:
    table = symbols(tmp_path)
    assert table.name(0xFFFFFFFF80FFFFFF) is None
    assert table.name(0) is None


def test_hidden_addresses_name_nothing(tmp_path: Path) -> None:
    # What a reader without CAP_SYSLOG sees: every address 0.
    table = symbols(tmp_path, "0000000000000000 T _text\n0000000000000000 t do_one_initcall\n")
    assert table.name(0xFFFFFFFF81001234) is None
