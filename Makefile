# bpfwall — see README.md.  `make setup && make demo`, then `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
BPFWALL := $(VENV)/bin/bpfwall
APT_PACKAGES := clang llvm libbpf-dev bpftool iproute2 python3-venv python3-pyelftools \
                nftables python3-nftables python3-systemd \
                debootstrap systemd-container iperf3 python3-matplotlib

# The well-known usage: make FILTER='icmp || (udp && dst_port == 53)' BPFNAME=x load
FILTER ?= icmp || (udp && dst_port == 53) || (tcp && dst_port == 80)
BPFNAME ?= bpfwall-filter
DIRECTION ?= ingress
export FILTER BPFNAME DIRECTION

.PHONY: setup apt venv bpffs demo test test-unit bench load unload clean

setup: apt venv bpffs

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# Debian's python3 sees the python3-* packages (nftables, systemd); pyenv's does not.
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check 'pytest>=7' 'hypothesis>=6' 'pyelftools>=0.29'
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

bpffs:
	@mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

demo: venv bpffs
	$(PY) scripts/demo.py

# Every tier the machine supports: unit always; kernel and traffic tiers when root.
test: venv bpffs
	$(PY) -m pytest -q -p no:cacheprovider tests

test-unit: venv
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

bench: venv bpffs
	$(PY) bench/per_packet.py
	$(PY) bench/load_time.py

load: venv bpffs
	$(BPFWALL) load "$$BPFNAME" --ingress "$$FILTER" --egress "$$FILTER"
	$(BPFWALL) pin "$$BPFNAME" "$$DIRECTION" "/sys/fs/bpf/$$BPFNAME"
	@echo
	@echo "Pinned /sys/fs/bpf/$$BPFNAME ($$DIRECTION program for: $$FILTER)."
	@echo "Use it from a unit:      IP$$( [ "$$DIRECTION" = egress ] && echo Egress || echo Ingress )FilterPath=/sys/fs/bpf/$$BPFNAME"
	@echo "or run something with it: systemd-run -p IP$$( [ "$$DIRECTION" = egress ] && echo Egress || echo Ingress )FilterPath=/sys/fs/bpf/$$BPFNAME --scope CMD"
	@echo "Counters:                $(BPFWALL) stats $$BPFNAME     Remove: make BPFNAME=$$BPFNAME unload"

unload: venv
	-$(BPFWALL) unload "$$BPFNAME"
	rm -f "/sys/fs/bpf/$$BPFNAME"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
