"""Real servers for the integration tests: Debian's clickhouse-server (an extra instance with the packaged
config and overrides), ZooKeeper and Prometheus, each on free loopback ports with its own temporary directory, started
and stopped by the test that uses it (never a system service)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.error import URLError
from urllib.parse import urlencode
from urllib.request import urlopen
from xml.sax.saxutils import escape

import yaml

from tests.waiting import wait_for

CLICKHOUSE_CONFIG = Path("/etc/clickhouse-server/config.xml")
ZOOKEEPER_LIB = Path("/usr/share/java")
START_TIMEOUT = 90.0  # a cold start on a loaded CI machine


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def stop_group(process: subprocess.Popen | None) -> None:
    """Stops a server started in a session of its own: SIGTERM to its group, SIGKILL if it lingers."""
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)


@dataclass
class User:
    name: str
    password: str = ""


USERS_XML = """<yandex>
  <profiles><default><max_memory_usage>4000000000</max_memory_usage></default></profiles>
  <users>{users}</users>
  <quotas><default></default></quotas>
</yandex>
"""
USER_XML = """<{name}><password_sha256_hex>{digest}</password_sha256_hex>
  <networks><ip>127.0.0.1</ip><ip>::1</ip></networks><profile>default</profile><quota>default</quota></{name}>"""


@dataclass
class ClickHouse:
    """One clickhouse-server: `start()`, `stop()`, `kill()`; `url(user)` for flowscope's --clickhouse."""

    root: Path
    users: list[User] = field(default_factory=lambda: [User("default")])
    include: str = ""  # the <yandex> body of an include_from file: remote_servers, zookeeper, macros
    tcp_port: int = 0
    http_port: int = 0
    interserver_port: int = 0
    prefix: list[str] = field(default_factory=list)  # e.g. ip netns exec NAME: the server lives in a lab namespace
    process: subprocess.Popen | None = None

    def start(self) -> ClickHouse:
        if shutil.which("clickhouse-server") is None:
            raise ServerError("clickhouse-server missing: make setup-test installs it")
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        users = "".join(
            USER_XML.format(name=u.name, digest=hashlib.sha256(u.password.encode()).hexdigest()) for u in self.users
        )
        (self.root / "users.xml").write_text(USERS_XML.format(users=users))
        (self.root / "include.xml").write_text(f"<yandex>{self.include}</yandex>")
        # The packaged config, reading its substitutions (cluster, ZooKeeper, macros) from this server's own
        # file: include_from is read while the config is preprocessed, before command-line overrides apply.
        packaged = CLICKHOUSE_CONFIG.read_text()
        (self.root / "config.xml").write_text(
            packaged.replace("<yandex>", f"<yandex>\n    <include_from>{self.root}/include.xml</include_from>", 1)
        )
        if self.tcp_port:  # ports chosen by the caller (a cluster's servers name each other's)
            return self.start_again()
        for _attempt in range(3):  # a port taken between free_port() and the bind: new ports
            self.tcp_port, self.http_port, self.interserver_port = free_port(), free_port(), free_port()
            if self._launch():
                return self
        raise ServerError("clickhouse-server found no free port in three tries")

    def start_again(self) -> ClickHouse:
        """Starts the server once more on its ports and data (after stop() or kill())."""
        if not self._launch():
            raise ServerError(f"clickhouse-server could not take its port {self.tcp_port} again")
        return self

    def _launch(self) -> bool:
        """Runs the server; False when one of its ports was taken."""
        self.http_port = self.http_port or free_port()
        self.interserver_port = interserver = self.interserver_port or free_port()
        argv = [
            "clickhouse-server", f"--config-file={self.root}/config.xml", "--",
            f"--tcp_port={self.tcp_port}", f"--http_port={self.http_port}",
            f"--interserver_http_port={interserver}", "--interserver_http_host=127.0.0.1",
            f"--path={self.root}/", f"--tmp_path={self.root}/tmp/", "--listen_host=127.0.0.1",
            f"--logger.log={self.root}/log", f"--logger.errorlog={self.root}/err",
            f"--users_config={self.root}/users.xml",
        ]  # fmt: skip
        log = open(self.root / "stdout", "ab")  # noqa: SIM115 - the server's own output, kept with it
        self.process = subprocess.Popen(
            [*self.prefix, *argv], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        try:
            wait_for(self._up, START_TIMEOUT, "clickhouse-server accepting connections")
            return True
        except AssertionError:
            errors = (self.root / "err").read_text(errors="replace") if (self.root / "err").exists() else ""
            self.stop()
            if "Address already in use" not in errors:
                raise ServerError(f"clickhouse-server did not start: {errors[-2000:]}") from None
            return False

    def _up(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError("clickhouse-server exited")
        if self.prefix:  # its loopback is not this one: ask it through the namespace
            try:
                return self.query("SELECT 1").strip() == "1"
            except ServerError:
                return False
        return listening(self.tcp_port) and listening(self.http_port)

    def query(self, sql: str, user: User | None = None) -> str:
        user = user or self.users[0]
        argv = ["clickhouse-client", f"--config-file={self.client_config(user)}", "--host=127.0.0.1",
                f"--port={self.tcp_port}", "-q", sql]  # fmt: skip
        result = subprocess.run([*self.prefix, *argv], capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise ServerError(f"{sql!r}: {result.stderr.strip()}")
        return result.stdout

    def client_config(self, user: User) -> Path:
        """A clickhouse-client config file (readable by its owner only) with the user and password: a password on
        the command line would show in ps. (clickhouse-client 18.16 reads `user` and `password` from it; it has
        no password variable in the environment.)"""
        digest = hashlib.sha256(f"{user.name}\0{user.password}".encode()).hexdigest()[:16]
        path = self.root / f"client-{digest}.xml"
        if not path.exists():
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(
                    f"<config><user>{escape(user.name)}</user><password>{escape(user.password)}</password></config>\n"
                )
        return path

    def url(self, user: User | None = None, database: str = "flowscope", password: bool = True) -> str:
        user = user or self.users[0]
        secret = f":{user.password}" if password and user.password else ""
        return f"clickhouse://{user.name}{secret}@127.0.0.1:{self.tcp_port}/{database}"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
        if not self.prefix:
            wait_for(lambda: not listening(self.tcp_port), 30, "the killed server's port to close")


@dataclass
class ZooKeeper:
    root: Path
    port: int = 0
    process: subprocess.Popen | None = None

    def start(self) -> ZooKeeper:
        jars = sorted(str(p) for p in ZOOKEEPER_LIB.glob("*.jar"))
        if not any("zookeeper" in Path(j).name for j in jars):
            raise ServerError("ZooKeeper missing: make setup-test installs the zookeeper package")
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = self.root / "zoo.cfg"
        config.write_text(
            f"tickTime=2000\ndataDir={self.root}/data\nclientPort={self.port}\nclientPortAddress=127.0.0.1\n"
            "admin.enableServer=false\n4lw.commands.whitelist=ruok,srvr\n"
        )
        log = open(self.root / "stdout", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            ["java", "-cp", ":".join(jars), f"-Dzookeeper.log.dir={self.root}", "-Xmx256m",
             "org.apache.zookeeper.server.quorum.QuorumPeerMain", str(config)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()
        # Serving sessions, not only up ("imok" comes earlier): ClickHouse 18.16 crashes on a handshake that a
        # ZooKeeper still starting drops.
        wait_for(lambda: "Mode: standalone" in self._ask(b"srvr"), START_TIMEOUT, "ZooKeeper serving")
        return self

    def _ask(self, command: bytes) -> str:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"ZooKeeper exited: {(self.root / 'stdout').read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as connection:
                connection.sendall(command)
                answer = b""
                while chunk := connection.recv(4096):
                    answer += chunk
                return answer.decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        stop_group(self.process)


def wait_until_queryable(server: ClickHouse, sql: str, expected: str, timeout: float = 60.0) -> None:
    wait_for(lambda: server.query(sql).strip() == expected, timeout, f"{sql!r} to answer {expected!r}")


@dataclass
class Prometheus:
    """Debian's prometheus on a free loopback port with its own data directory, scraping `targets` (HOST:PORT of
    /metrics, plaintext) every `scrape_interval` and evaluating `rule_files` as often. `query()` asks its HTTP
    API; start() returns once /-/ready answers. With a `prefix` (ip netns exec NAME) it lives in a lab namespace
    and is asked through it."""

    root: Path
    targets: list[str]
    scrape_interval: str = "1s"
    rule_files: list[Path] = field(default_factory=list)
    prefix: list[str] = field(default_factory=list)
    port: int = 0
    process: subprocess.Popen | None = None

    def start(self) -> Prometheus:
        if shutil.which("prometheus") is None:
            raise ServerError("prometheus missing: make setup-test installs it")
        config = {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [{"job_name": "flowscope", "static_configs": [{"targets": self.targets}]}],
        }
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "prometheus.yml").write_text(yaml.safe_dump(config))
        for _attempt in range(3):  # a port taken between free_port() and the bind: another one
            self.port = free_port()
            log = open(self.root / "log", "ab")  # noqa: SIM115 - the server's own output, kept with it
            self.process = subprocess.Popen(
                [*self.prefix, "prometheus", f"--config.file={self.root}/prometheus.yml",
                 f"--storage.tsdb.path={self.root}/data", f"--web.listen-address=127.0.0.1:{self.port}",
                 "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            log.close()
            try:
                wait_for(self._ready, START_TIMEOUT, "prometheus ready")
                return self
            except AssertionError:
                self.stop()
                if "address already in use" not in (self.root / "log").read_text(errors="replace"):
                    raise ServerError(f"prometheus did not start: {(self.root / 'log').read_text()[-2000:]}") from None
        raise ServerError("prometheus found no free port in three tries")

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError("prometheus exited")
        try:
            self._get("/-/ready")
        except (URLError, OSError, ServerError):
            return False
        return True

    def _get(self, path: str) -> bytes:
        url = f"http://127.0.0.1:{self.port}{path}"
        if not self.prefix:
            with urlopen(url, timeout=30) as answer:
                return answer.read()
        fetch = "import sys, urllib.request; sys.stdout.buffer.write(urllib.request.urlopen(sys.argv[1]).read())"
        result = subprocess.run([*self.prefix, sys.executable, "-c", fetch, url], capture_output=True, timeout=60)
        if result.returncode != 0:
            raise ServerError(f"GET {path}: {result.stderr.decode(errors='replace')[-500:]}")
        return result.stdout

    def api(self, path: str, **params: Any) -> Any:
        body = json.loads(self._get(f"/api/v1/{path}?{urlencode(params)}"))
        if body["status"] != "success":
            raise ServerError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str, **params: Any) -> list[dict]:
        """The instant vector (or scalar) `expr` gives now, or at `time=`."""
        data = self.api("query", query=expr, **params)
        return data["result"] if data["resultType"] in ("vector", "matrix") else [{"value": data["result"]}]

    def value(self, expr: str) -> float | None:
        """The one sample `expr` gives now, or None when it gives none."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, f"{expr}: {result}"
        return float(result[0]["value"][1])

    def stop(self) -> None:
        stop_group(self.process)
