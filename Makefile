# bpfwall — see README.md.  `make setup && make demo`, then `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
BPFWALL := $(VENV)/bin/bpfwall
# bcc, the second compiler (--compiler bcc), compiles against kernel headers; a kernel without a
# headers package of its own (a cloud or custom one) gets the distribution kernel's (bcc_build.py).
DEB_ARCH := $(shell dpkg --print-architecture 2>/dev/null || echo amd64)
# `make deb` (debian/control's Build-Depends) and its checks: lintian, man (man-db) renders the
# pages, bash drives the completion (python3-argcomplete), pip builds the wheel offline in a
# plain venv from Debian's setuptools and wheel wheels (tests/package/test_pip_venv.py).
DEB_BUILD_PACKAGES := debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools \
                      python3-argcomplete dpkg-dev fakeroot lintian man-db groff-base bash-completion \
                      python3-setuptools-whl python3-wheel-whl
APT_PACKAGES := clang llvm libbpf-dev bpftool iproute2 python3-venv python3-pyelftools \
                nftables python3-nftables python3-systemd \
                python3-prometheus-client \
                debootstrap systemd-container iperf3 python3-matplotlib tmux \
                python3-bpfcc linux-headers-$(DEB_ARCH) \
                $(DEB_BUILD_PACKAGES)

# The well-known usage: make FILTER='icmp || (udp && dst_port == 53)' BPFNAME=x load
FILTER ?= icmp || (udp && dst_port == 53) || (tcp && dst_port == 80)
BPFNAME ?= bpfwall-filter
DIRECTION ?= ingress
export FILTER BPFNAME DIRECTION

.PHONY: help setup apt venv bpffs rootfs demo test test-unit bench load unload clean install install-units uninstall deb
.DEFAULT_GOAL := help

# Bare `make` installs nothing: it says what the targets do.
help:
	@echo "bpfwall — targets (see README.md):"
	@echo "  make setup       install what bpfwall needs (apt packages as root, .venv, bpffs mount)"
	@echo "  make demo        a real cgroup, a real filter, real packets passing and dropping"
	@echo "  make test        ruff, then every test tier this machine supports"
	@echo "  make test-unit   the tests that need no root"
	@echo "  make bench       the benchmarks (bench/)"
	@echo "  make FILTER='icmp || udp && dst_port == 53' BPFNAME=x [DIRECTION=egress] load"
	@echo "                   compile FILTER, pin it as /sys/fs/bpf/BPFNAME for IP*FilterPath="
	@echo "  make BPFNAME=x unload"
	@echo "  make deb [DEB_DIR=.]   the Debian package (then: apt install ./bpfwall_*_all.deb)"
	@echo "  make install [PREFIX=/usr/local] / make uninstall"

# One line per step and how long it took, then the total (apt's own output is kept quiet; its
# errors still show).
setup:
	@start=$$(date +%s); $(MAKE) -s --no-print-directory apt venv bpffs && \
	echo "setup: done in $$(( $$(date +%s) - start )) s"

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -z "$$missing" ]; then echo "setup: apt packages: all $(words $(APT_PACKAGES)) installed"; exit 0; fi; \
	t=$$(date +%s); echo "setup: apt-get update …"; apt-get update -qq || exit $$?; \
	echo "setup: apt-get update: $$(( $$(date +%s) - t )) s"; \
	t=$$(date +%s); echo "setup: installing $$(echo $$missing | wc -w) packages: $$(echo $$missing) …"; \
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null || exit $$?; \
	echo "setup: apt-get install: $$(( $$(date +%s) - t )) s"

# Debian's python3 sees the python3-* packages (nftables, systemd); pyenv's does not.
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	@echo "setup: building $(VENV) (pytest, hypothesis, pyelftools, ruff; bpfwall in editable mode) …"
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check 'pytest>=7' 'hypothesis>=6' 'pyelftools>=0.29' ruff
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

bpffs:
	@mountpoint -q /sys/fs/bpf || { mount -t bpf -o mode=0700 bpf /sys/fs/bpf && echo "setup: mounted bpffs on /sys/fs/bpf"; }

demo: venv bpffs
	$(PY) scripts/demo.py

# Lint first (pyflakes and bugbear rules, see pyproject.toml), then every tier the machine
# supports: unit always; kernel, traffic and systemd tiers when root.
test: venv bpffs rootfs
	$(VENV)/bin/ruff check
	$(PY) -m pytest -q -p no:cacheprovider tests

# The Debian rootfs the systemd tests boot with systemd-nspawn (built once, ~1 min, then reused
# from /var/cache/bpfwall-test); only root can run those tests, so only root builds it.
rootfs: venv
	@if [ "$$(id -u)" = 0 ]; then $(PY) tests/systemd/rootfs.py; fi

test-unit: venv
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

bench: venv bpffs
	$(PY) bench/per_packet.py
	$(PY) bench/slice_guard.py   # a slice default's guard beside a unit's program
	$(PY) bench/monitor_rate.py  # drop events a second bpfwall monitor shows (~20 s)
	$(PY) bench/load_time.py
	$(PY) bench/compilers.py     # cold compile and per-packet cost, clang vs bcc
	$(PY) bench/scale.py         # stats/list/reload with 100 vs 10,000 cgroups, 100 attached
	$(PY) bench/watch_reaction.py
	$(PY) bench/watch_rss.py
	$(PY) bench/watch_window.py
	$(PY) bench/watch_once.py     # watch --once, 100 distinct units, warm and cold (~2 min)
	$(PY) bench/throughput.py    # ~7 min: iperf3 with 1/100/1,000 units, bpf vs nft vs a linear nft list

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

# make deb [DEB_DIR=.]: the Debian package (debian/), built from a copy of the tree (git's
# tracked and untracked-but-not-ignored files) so the checkout stays clean, then checked by
# lintian. Install it with `apt install ./bpfwall_*_all.deb`.
DEB_DIR ?= .
deb:
	@# Debian's python3 builds it, whatever python3 comes first in PATH (pyenv's lacks its modules).
	@stage=$$(mktemp -d) && trap 'rm -rf "$$stage"' EXIT && mkdir "$$stage/src" && \
	git ls-files -z -co --exclude-standard | tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$$stage/src" && \
	echo "dpkg-buildpackage -b (log: make deb V=1)" && \
	(cd "$$stage/src" && PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b $(if $(V),,>"$$stage/build.log" 2>&1)) || { tail -40 "$$stage/build.log"; exit 1; }; \
	lintian --fail-on error,warning --info "$$stage"/bpfwall_*.changes && \
	cp "$$stage"/bpfwall_*_all.deb "$(DEB_DIR)/" && ls "$(DEB_DIR)"/bpfwall_*_all.deb

# make install [DESTDIR=/tmp/stage] [PREFIX=/usr/local]: the package into $(PREFIX)/lib/bpfwall
# (run by Debian's /usr/bin/python3, which sees python3-pyelftools/-nftables/-systemd; no venv,
# so the tree is relocatable), bpf/port_filter.c inside the package where build.source_dir()
# finds it, the launcher $(PREFIX)/bin/bpfwall, the units, and the examples. The example policy
# goes to /etc/bpfwall as 50-example.toml.example: only *.toml files are read, so nothing is
# policed until you copy it to a .toml name. `make uninstall` removes it all but your policy.
PREFIX ?= /usr/local
SYSCONFDIR ?= /etc
UNITDIR ?= $(PREFIX)/lib/systemd/system
LIBDIR := $(PREFIX)/lib/bpfwall
DOCDIR := $(PREFIX)/share/doc/bpfwall
define LAUNCHER
#!/usr/bin/python3 -I
# bpfwall, installed by `make install`: the package lives in ../lib/bpfwall beside this file.
import os, sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "lib", "bpfwall"))
from bpfwall.cli import main
sys.exit(main())
endef
export LAUNCHER

install: venv
	rm -rf "$(DESTDIR)$(LIBDIR)"
	@# pip builds in the source tree it is given: give it a copy, not the shared checkout.
	stage=$$(mktemp -d) && cp -r pyproject.toml README.md bpfwall bpf "$$stage" && \
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation --no-compile \
		--target "$(DESTDIR)$(LIBDIR)" "$$stage"; rc=$$?; rm -rf "$$stage"; exit $$rc
	rm -rf "$(DESTDIR)$(LIBDIR)/bin" "$(DESTDIR)$(LIBDIR)/share"  # pip's script and data file: placed below
	install -D -m 0644 bpf/port_filter.c "$(DESTDIR)$(LIBDIR)/bpfwall/bpf/port_filter.c"
	/usr/bin/python3 -m compileall -q -d "$(LIBDIR)" "$(DESTDIR)$(LIBDIR)" >/dev/null
	install -d "$(DESTDIR)$(PREFIX)/bin"
	printf '%s\n' "$$LAUNCHER" > "$(DESTDIR)$(PREFIX)/bin/bpfwall"
	chmod 0755 "$(DESTDIR)$(PREFIX)/bin/bpfwall"
	$(MAKE) --no-print-directory install-units
	install -d "$(DESTDIR)$(DOCDIR)/examples/policy" "$(DESTDIR)$(DOCDIR)/examples/units/nginx.service.d" \
		"$(DESTDIR)$(DOCDIR)/examples/units/bpfwall.service.d"
	install -m 0644 README.md "$(DESTDIR)$(DOCDIR)/README.md"
	$(PY) -m bpfwall.manpage "$(DESTDIR)$(PREFIX)/share/man/pages" >/dev/null
	install -D -m 0644 "$(DESTDIR)$(PREFIX)/share/man/pages/bpfwall.1" "$(DESTDIR)$(PREFIX)/share/man/man1/bpfwall.1"
	install -D -m 0644 "$(DESTDIR)$(PREFIX)/share/man/pages/bpfwall.toml.5" "$(DESTDIR)$(PREFIX)/share/man/man5/bpfwall.toml.5"
	rm -r "$(DESTDIR)$(PREFIX)/share/man/pages"
	install -m 0644 examples/policy/*.toml "$(DESTDIR)$(DOCDIR)/examples/policy/"
	install -m 0644 units/examples/nginx.service "$(DESTDIR)$(DOCDIR)/examples/units/"
	install -m 0644 units/examples/nginx.service.d/bpfwall.conf "$(DESTDIR)$(DOCDIR)/examples/units/nginx.service.d/"
	install -m 0644 units/examples/bpfwall.service.d/nft-hybrid.conf "$(DESTDIR)$(DOCDIR)/examples/units/bpfwall.service.d/"
	install -d -m 0755 "$(DESTDIR)$(SYSCONFDIR)/bpfwall"
	for f in examples/policy/*.toml; do \
		t="$(DESTDIR)$(SYSCONFDIR)/bpfwall/$$(basename "$$f").example"; \
		[ -e "$$t" ] || install -m 0644 "$$f" "$$t"; done
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "installed $(PREFIX)/bin/bpfwall; units in $(UNITDIR); policy in $(SYSCONFDIR)/bpfwall"

# The units with this install's paths written into them (units/ says /usr/local; the Debian
# package's build runs this with PREFIX=/usr UNITDIR=/lib/systemd/system).
UNITS := bpfwall.service bpfwall@.service bpfwall-metrics.service bpfwall-metrics.timer
install-units:
	install -d "$(DESTDIR)$(UNITDIR)"
	for u in $(UNITS); do \
		sed -e 's|/usr/local/bin/bpfwall|$(PREFIX)/bin/bpfwall|g' -e 's|/usr/local/share/doc/bpfwall|$(DOCDIR)|g' \
			"units/$$u" > "$(DESTDIR)$(UNITDIR)/$$u" && chmod 0644 "$(DESTDIR)$(UNITDIR)/$$u"; done

uninstall:
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl disable --now bpfwall.service || true; fi
	rm -rf "$(DESTDIR)$(LIBDIR)" "$(DESTDIR)$(DOCDIR)"
	rm -f "$(DESTDIR)$(PREFIX)/share/man/man1/bpfwall.1" "$(DESTDIR)$(PREFIX)/share/man/man5/bpfwall.toml.5"
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl disable --now bpfwall-metrics.timer || true; fi
	rm -f "$(DESTDIR)$(PREFIX)/bin/bpfwall" "$(DESTDIR)$(UNITDIR)/bpfwall.service" "$(DESTDIR)$(UNITDIR)/bpfwall@.service" \
		"$(DESTDIR)$(UNITDIR)/bpfwall-metrics.service" "$(DESTDIR)$(UNITDIR)/bpfwall-metrics.timer"
	for f in examples/policy/*.toml; do rm -f "$(DESTDIR)$(SYSCONFDIR)/bpfwall/$$(basename "$$f").example"; done
	-rmdir "$(DESTDIR)$(SYSCONFDIR)/bpfwall" 2>/dev/null
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
