from pathlib import Path

import pytest

from flowscope.kernel.headers import HeadersError, find_headers, version_tuple


def make_tree(path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return path


def debian_headers(src: Path, release: str) -> None:
    """Debian's split: generated headers in linux-headers-<release>, sources in ...-common."""
    common = release.rsplit("-", 1)[0] + "-common"
    make_tree(src / f"linux-headers-{release}", {"Makefile": "", "include/generated/autoconf.h": "#define X 1\n"})
    make_tree(src / f"linux-headers-{common}", {"Makefile": "", "include/linux/kconfig.h": "/* kconfig */\n"})


def test_running_kernel_headers_are_used_as_they_are(tmp_path: Path) -> None:
    modules = tmp_path / "modules"
    make_tree(modules / "6.18.1" / "build", {"include/linux/kconfig.h": ""})
    headers = find_headers("6.18.1", modules, tmp_path / "src", tmp_path / "cache")
    assert headers.exact
    assert headers.path == modules / "6.18.1" / "build"
    assert headers.bcc_kernel_source is None


def test_nearest_debian_headers_are_merged_for_bcc(tmp_path: Path) -> None:
    src = tmp_path / "src"
    debian_headers(src, "6.1.0-56-amd64")
    debian_headers(src, "5.10.0-30-amd64")
    headers = find_headers("6.18.44-custom", tmp_path / "modules", src, tmp_path / "cache")
    assert not headers.exact
    assert headers.path == tmp_path / "cache" / "6.1.0-56-amd64"
    assert headers.bcc_kernel_source == str(headers.path)
    # One tree holding both halves, as BCC expects.
    assert (headers.path / "include/linux/kconfig.h").read_text() == "/* kconfig */\n"
    assert (headers.path / "include/generated/autoconf.h").read_text() == "#define X 1\n"
    assert "6.1.0-56-amd64" in headers.description and "BTF" in headers.description


def test_merged_tree_is_reused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    debian_headers(src, "6.1.0-56-amd64")
    first = find_headers("6.18.0", tmp_path / "modules", src, tmp_path / "cache")
    marker = first.path / "marker"
    marker.write_text("kept")
    second = find_headers("6.18.0", tmp_path / "modules", src, tmp_path / "cache")
    assert second.path == first.path and marker.read_text() == "kept"


def test_closest_minor_wins_within_the_major(tmp_path: Path) -> None:
    src = tmp_path / "src"
    debian_headers(src, "6.1.0-56-amd64")
    debian_headers(src, "6.12.0-1-amd64")
    debian_headers(src, "5.19.0-1-amd64")
    headers = find_headers("6.10.3", tmp_path / "modules", src, tmp_path / "cache")
    assert headers.path.name == "6.12.0-1-amd64"


def test_no_headers_is_one_clear_sentence(tmp_path: Path) -> None:
    with pytest.raises(HeadersError, match=r"no kernel headers are installed for kernel 6\.18\.0; install"):
        find_headers("6.18.0", tmp_path / "modules", tmp_path / "src", tmp_path / "cache")


def test_version_tuple() -> None:
    assert version_tuple("6.18.44-fc-v669") == (6, 18, 44)
    assert version_tuple("6.1.0-56-amd64") == (6, 1, 0)
    assert version_tuple("5.4") == (5, 4, 0)
    assert version_tuple("unknown") == ()
