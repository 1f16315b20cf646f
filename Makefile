# One entry point for a fresh Debian 12 / Ubuntu host, as root:
#   make top    set up, then run `flowscope top`
#   make test   set up (with test dependencies), then run the whole test suite
#   make setup  set up only (idempotent; quick when everything is there)
#   make bench  set up (with test dependencies), then run the benchmarks and rewrite docs/benchmarks.md
#   make image    the agent's OCI image (build/image/oci, tag latest) from Debian packages and this repository
#   make install  flowscope under /opt/flowscope, its systemd unit, /etc/flowscope/agent.yaml (DESTDIR= for a root)
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
SYSTEM_PYTHON := /usr/bin/python3
# What the agent needs on the host: BCC (compiler + Python bindings), bpftool, kernel headers, tc/ip,
# iptables (the NETFILTER_DROP reasons it names are about rules users inspect with it).
RUNTIME_PACKAGES := python3-bpfcc bpfcc-tools bpftool iproute2 iptables python3-venv ethtool
# What the tests add: traffic generators and packet capture for ground truth.
# ClickHouse (18.16) and ZooKeeper: the flow store's tests start their own instances; so do the metrics
# tests with Prometheus (promtool lints /metrics and the rules).
TEST_PACKAGES := iperf3 tshark tcpreplay procps systemd clickhouse-server clickhouse-client zookeeper prometheus
# What the deploy tests add: the image's builders and runtime (mmdebstrap, umoci, runc), openssl to read the
# chart's certificates, Go and sprig for the chart's renderer (Debian has no Helm), systemd-nspawn for `make install`.
DEPLOY_PACKAGES := mmdebstrap umoci runc golang-go golang-github-masterminds-sprig-dev \
	golang-gopkg-yaml.v2-dev systemd-container openssl
# What the kernel matrix adds: qemu boots Debian's kernels, busybox is their initramfs, kmod lists modules.
MATRIX_PACKAGES := qemu-system-x86 busybox-static kmod
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup setup-test system-packages test-packages top test kernel-matrix bench lint clean image install

# System packages are checked every time (dpkg-query is quick); the venv is brought up to date when
# pyproject.toml or requirements.lock changes. Python packages install at the lock's exact versions
# (scripts/lock regenerates it).
LOCK := requirements.lock
PIP_INSTALL := $(PY) -m pip install --quiet --disable-pip-version-check -c $(LOCK)
setup: system-packages .stamp-venv

setup-test: setup test-packages .stamp-venv-test

# Kernel headers: the package for the running kernel when the distribution has it, else the
# distribution's default headers (flowscope prepares the nearest ones for BCC at start).
system-packages:
	@scripts/install-packages $(RUNTIME_PACKAGES)
	@scripts/install-kernel-headers

test-packages: system-packages
	@scripts/install-packages $(TEST_PACKAGES) $(DEPLOY_PACKAGES)

.stamp-venv: pyproject.toml $(LOCK)
	@scripts/make-venv $(VENV) $(SYSTEM_PYTHON)
	$(PIP_INSTALL) -e .
	@touch $@

.stamp-venv-test: .stamp-venv pyproject.toml $(LOCK)
	$(PIP_INSTALL) -e '.[test]'
	@touch $@

top: setup
	$(VENV)/bin/flowscope top $(ARGS)

test: setup-test
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The kernel_matrix tests inside Debian's own 6.1 and 6.12 kernels under qemu (scripts/kernel-matrix;
# ARGS="--kernel 6.12 --budget 1500 -- -k drops" passes its flags and, after --, pytest's).
kernel-matrix: setup-test
	@scripts/install-packages $(MATRIX_PACKAGES)
	scripts/kernel-matrix $(ARGS)

# Benchmarks (root, about 15 minutes): prints figures and ratios, rewrites docs/benchmarks.md. The tools a
# plain-host user would pick instead run beside flowscope on the same traffic.
BENCH_PACKAGES := pmacct softflowd
bench: setup-test
	@scripts/install-packages $(BENCH_PACKAGES)
	$(PY) -m bench.run $(ARGS)

lint: setup-test
	$(VENV)/bin/ruff check flowscope exporters ui tests bench
	$(VENV)/bin/ruff format --check flowscope exporters ui tests bench

# The agent's image: a Debian 12 root filesystem (mmdebstrap) with flowscope from requirements.lock,
# assembled by umoci into build/image/oci (2.5 min here with Debian's packages cached).
image:
	@scripts/install-packages mmdebstrap umoci python3-venv
	scripts/build-image build/image

# The plain-host install: a venv at $(PREFIX) with flowscope from the lock, the unit, the default config and
# the data directory, all under $(DESTDIR) (empty: this host). `systemctl enable --now flowscope` starts it.
PREFIX := /opt/flowscope
# With DESTDIR, the root must already have RUNTIME_PACKAGES (e.g. an mmdebstrap tree of them).
install:
	$(if $(DESTDIR),,@$(MAKE) --no-print-directory system-packages)
	scripts/install-host "$(DESTDIR)" "$(PREFIX)"

clean:
	rm -rf $(VENV) .stamp-* build
