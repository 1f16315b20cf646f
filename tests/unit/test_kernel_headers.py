"""Kernel headers for BCC, found in fake roots under tmp_path: the system's own (`own_root`, an image's or a
plain host's /) and, with host_root, the node's directories mounted beside it, whose symlinks (Debian's are
absolute: /lib/modules/R/build -> /usr/src/linux-headers-R) resolve under the host root, never the container's /."""

import os
from pathlib import Path

import pytest

from flowscope.cli.options import load_options
from flowscope.config import load
from flowscope.kernel.headers import HeadersError, find_headers, resolve_under, version_tuple


def make_tree(path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return path


def symlink(link: Path, target: str) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


def linked(link: Path) -> Path:
    """Where a symlink of a merged tree points (cp -as writes DIR/./NAME)."""
    return Path(os.readlink(link))


def debian_headers(root: Path, release: str, modules: bool = False) -> None:
    """Debian's split: generated headers in usr/src/linux-headers-<release>, sources in ...-common; with `modules`,
    the linux-image package's lib/modules/<release>/build and source, absolute symlinks into /usr/src."""
    common = release.rsplit("-", 1)[0] + "-common"
    src = root / "usr" / "src"
    make_tree(src / f"linux-headers-{release}", {"Makefile": "", "include/generated/autoconf.h": f"/* {release} */\n"})
    make_tree(src / f"linux-headers-{common}", {"Makefile": "", "include/linux/kconfig.h": f"/* {common} */\n"})
    if modules:
        symlink(root / "lib/modules" / release / "build", f"/usr/src/linux-headers-{release}")
        symlink(root / "lib/modules" / release / "source", f"/usr/src/linux-headers-{common}")


def test_running_kernel_headers_are_used_as_they_are(tmp_path: Path) -> None:
    own = tmp_path / "own"
    make_tree(own / "lib/modules/6.18.1/build", {"include/linux/kconfig.h": ""})
    headers = find_headers("6.18.1", cache_dir=tmp_path / "cache", own_root=own)
    assert headers.exact
    assert headers.path == own / "lib/modules/6.18.1/build"
    assert headers.bcc_kernel_source is None  # where BCC looks itself


def test_nearest_debian_headers_are_merged_for_bcc(tmp_path: Path) -> None:
    own = tmp_path / "own"
    debian_headers(own, "6.1.0-56-amd64")
    debian_headers(own, "5.10.0-30-amd64")
    headers = find_headers("6.18.44-custom", cache_dir=tmp_path / "cache", own_root=own)
    assert not headers.exact
    assert headers.path == tmp_path / "cache" / "6.1.0-56-amd64"
    assert headers.bcc_kernel_source == str(headers.path)
    # One tree holding both halves, as BCC expects.
    assert (headers.path / "include/linux/kconfig.h").read_text() == "/* 6.1.0-56-common */\n"
    assert (headers.path / "include/generated/autoconf.h").read_text() == "/* 6.1.0-56-amd64 */\n"
    assert headers.description == (
        f"nearest installed headers 6.1.0-56-amd64 ({own}/usr/src/linux-headers-6.1.0-56-amd64) for kernel "
        f"6.18.44-custom (prepared at {headers.path}); structure offsets come from BTF"
    )


def test_merged_tree_is_reused(tmp_path: Path) -> None:
    own = tmp_path / "own"
    debian_headers(own, "6.1.0-56-amd64")
    first = find_headers("6.18.0", cache_dir=tmp_path / "cache", own_root=own)
    marker = first.path / "marker"
    marker.write_text("kept")
    second = find_headers("6.18.0", cache_dir=tmp_path / "cache", own_root=own)
    assert second.path == first.path and marker.read_text() == "kept"


def test_a_tree_merged_by_an_earlier_flowscope_is_kept(tmp_path: Path) -> None:
    """Its stamp names the lib/modules links, not the trees they lead to: the same trees, so not made again."""
    own, cache = tmp_path / "own", tmp_path / "cache"
    debian_headers(own, "6.1.0-57-amd64")
    symlink(own / "lib/modules/6.1.0-57-amd64/build", "../../../usr/src/linux-headers-6.1.0-57-amd64")
    symlink(own / "lib/modules/6.1.0-57-amd64/source", "../../../usr/src/linux-headers-6.1.0-57-common")
    earlier = make_tree(cache / "6.1.0-57-amd64", {"marker": "kept"})
    (earlier / ".flowscope-complete").write_text(
        f"{own}/lib/modules/6.1.0-57-amd64/build\n{own}/lib/modules/6.1.0-57-amd64/source\n"
    )
    headers = find_headers("6.18.0", cache_dir=cache, own_root=own)
    assert headers.path == earlier and (earlier / "marker").read_text() == "kept"


def test_closest_minor_wins_within_the_major(tmp_path: Path) -> None:
    own = tmp_path / "own"
    debian_headers(own, "6.1.0-56-amd64")
    debian_headers(own, "6.12.0-1-amd64")
    debian_headers(own, "5.19.0-1-amd64")
    headers = find_headers("6.10.3", cache_dir=tmp_path / "cache", own_root=own)
    assert headers.path.name == "6.12.0-1-amd64"


def test_no_headers_is_one_clear_sentence(tmp_path: Path) -> None:
    with pytest.raises(HeadersError, match=r"no kernel headers are installed for kernel 6\.18\.0; install"):
        find_headers("6.18.0", host_root=str(tmp_path / "host"), cache_dir=tmp_path / "cache", own_root=tmp_path)


def test_version_tuple() -> None:
    assert version_tuple("6.18.44-fc-v669") == (6, 18, 44)
    assert version_tuple("6.1.0-56-amd64") == (6, 1, 0)
    assert version_tuple("5.4") == (5, 4, 0)
    assert version_tuple("unknown") == ()


# ---- under a host root -----------------------------------------------------------------------------------------


def test_symlinks_resolve_under_the_root_as_in_a_chroot(tmp_path: Path) -> None:
    host = tmp_path / "host"
    make_tree(host / "usr/src/linux-headers-6.1.0-57-amd64", {"Makefile": ""})
    symlink(host / "lib/modules/6.1.0-57-amd64/build", "/usr/src/linux-headers-6.1.0-57-amd64")  # absolute
    symlink(host / "lib/modules/6.1.0-57-amd64/up", "../../../../../../../usr/src")  # `..` stops at the root
    symlink(host / "usr/src/current", "linux-headers-6.1.0-57-amd64")  # relative, in its directory
    symlink(host / "lib/modules/6.1.0-57-amd64/current", "/usr/src/current")  # a chain of both kinds
    symlink(host / "usr/src/loop-a", "loop-b")
    symlink(host / "usr/src/loop-b", "/usr/src/loop-a")
    tree = host / "usr/src/linux-headers-6.1.0-57-amd64"
    assert resolve_under(host, "/lib/modules/6.1.0-57-amd64/build") == tree
    assert resolve_under(host, "/lib/modules/6.1.0-57-amd64/build/Makefile") == tree / "Makefile"
    assert resolve_under(host, "/lib/modules/6.1.0-57-amd64/up/linux-headers-6.1.0-57-amd64") == tree
    assert resolve_under(host, "/lib/modules/6.1.0-57-amd64/current") == tree
    assert resolve_under(host, "/usr/src/absent/../current") == tree
    assert not resolve_under(host, "/usr/src/loop-a").is_dir()  # a loop ends, as no directory
    assert resolve_under(Path("/"), f"{host}/usr/src/current") == tree  # under /: the plain walk


def test_the_nodes_own_headers_come_first_resolved_under_the_host_root(tmp_path: Path) -> None:
    host, image, cache = tmp_path / "host", tmp_path / "image", tmp_path / "cache"
    debian_headers(host, "6.18.5-1-amd64", modules=True)
    debian_headers(image, "6.1.0-57-amd64", modules=True)  # the image's fallback
    headers = find_headers("6.18.5-1-amd64", host_root=str(host), cache_dir=cache, own_root=image)
    assert headers.exact
    # BCC looks in the container's /lib/modules, where the node's are not: it is pointed at a merged tree
    assert (headers.path, headers.bcc_kernel_source) == (cache / "6.18.5-1-amd64", str(cache / "6.18.5-1-amd64"))
    assert headers.description == f"running kernel's headers ({host}/usr/src/linux-headers-6.18.5-1-amd64)"
    kconfig, autoconf = headers.path / "include/linux/kconfig.h", headers.path / "include/generated/autoconf.h"
    assert linked(kconfig) == host / "usr/src/linux-headers-6.18.5-1-common/include/linux/kconfig.h"
    assert linked(autoconf) == host / "usr/src/linux-headers-6.18.5-1-amd64/include/generated/autoconf.h"
    assert (kconfig.read_text(), autoconf.read_text()) == ("/* 6.18.5-1-common */\n", "/* 6.18.5-1-amd64 */\n")


def test_a_node_without_usr_src_falls_back_to_the_images_headers(tmp_path: Path) -> None:
    """The node has its kernel's modules and the build link of an older linux-image package, but no /usr/src (the
    chart's mount of it is then an empty directory): the link dangles under the host root, and the image's headers,
    of the release the link names, are the nearest. Neither the node's nor found through the node's link."""
    host, image, cache = tmp_path / "host", tmp_path / "image", tmp_path / "cache"
    symlink(host / "lib/modules/6.1.0-57-amd64/build", "/usr/src/linux-headers-6.1.0-57-amd64")
    make_tree(host / "lib/modules/6.18.5-1-amd64", {"modules.dep": ""})
    (host / "usr/src").mkdir(parents=True)
    debian_headers(image, "6.1.0-57-amd64", modules=True)
    headers = find_headers("6.18.5-1-amd64", host_root=str(host), cache_dir=cache, own_root=image)
    assert (headers.exact, headers.path, headers.bcc_kernel_source) == (False, cache / "6.1.0-57-amd64",
                                                                       str(cache / "6.1.0-57-amd64"))  # fmt: skip
    assert f"({image}/usr/src/linux-headers-6.1.0-57-amd64)" in headers.description
    kconfig = headers.path / "include/linux/kconfig.h"
    assert linked(kconfig) == image / "usr/src/linux-headers-6.1.0-57-common/include/linux/kconfig.h"
    no_mounts = find_headers("6.18.5-1-amd64", host_root=str(tmp_path / "absent"), cache_dir=cache, own_root=image)
    assert no_mounts.path == headers.path  # no host directories at all: the same


def test_the_nodes_headers_win_over_the_images_of_the_same_release(tmp_path: Path) -> None:
    host, image, cache = tmp_path / "host", tmp_path / "image", tmp_path / "cache"
    debian_headers(host, "6.1.0-57-amd64")  # headers without the kernel's modules: nearest, not the running one's
    debian_headers(image, "6.1.0-57-amd64", modules=True)
    autoconf = cache / "6.1.0-57-amd64" / "include/generated/autoconf.h"
    from_host = find_headers("6.18.5-1-amd64", host_root=str(host), cache_dir=cache, own_root=image)
    assert (from_host.path, from_host.exact) == (cache / "6.1.0-57-amd64", False)
    assert linked(autoconf) == host / "usr/src/linux-headers-6.1.0-57-amd64/include/generated/autoconf.h"
    # the same cache directory without the host root: made again of the image's trees, not the node's
    from_image = find_headers("6.18.5-1-amd64", cache_dir=cache, own_root=image)
    assert from_image.path == from_host.path
    assert linked(autoconf) == image / "usr/src/linux-headers-6.1.0-57-amd64/include/generated/autoconf.h"


def test_the_host_root_setting_reaches_the_probes_load_options() -> None:
    assert load_options(load(environ={"FLOWSCOPE_HOST_ROOT": "/host"})).host_root == "/host"
    assert load_options(load(environ={})).host_root == ""  # default: the system's own / only, as before
