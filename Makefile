# keygate — the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
CONF ?= conf/demo.yaml
MOCK_ADDR ?= 127.0.0.1:18000

.PHONY: run test deps fmt lint unit build release bench clean

## deps: install what the build and tests need that a fresh machine lacks:
## cmake (pingora's zlib-ng); the deploy kit's checkers, which the tests require: promtool
## (Debian's `prometheus` package), systemd-analyze (`systemd`) and `shellcheck`;
## and the `openai` Python SDK (the upgrade test's keep-alive client).
deps:
	@missing=""; \
	command -v cmake >/dev/null || missing="$$missing cmake"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	command -v shellcheck >/dev/null || missing="$$missing shellcheck"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if command -v apt-get >/dev/null; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "please install:$$missing (cmake; promtool from Prometheus; systemd-analyze; shellcheck)" >&2; exit 1; fi; \
	fi
	@python3 -c "import openai" 2>/dev/null || { echo "installing the openai Python SDK (upgrade test client)"; \
	  python3 -m pip install -q openai 2>/dev/null || python3 -m pip install -q --break-system-packages openai; }

build: deps
	$(CARGO) build --release --workspace --bins

## run: start the mock OpenAI upstream and keygate with the demo config (no API keys needed).
run: build
	@install -d -m 0700 /tmp/keygate-demo
	@target/release/keygate-mock --listen $(MOCK_ADDR) --name demo \
	  --key sk-demo-alpha=ok --key sk-demo-bravo=ok \
	  --key sk-demo-charlie=rate_limit:retry_after=5:first=2 & \
	  MOCK=$$!; trap "kill $$MOCK 2>/dev/null" EXIT INT TERM; \
	  sleep 0.3; \
	  echo; echo "keygate on http://127.0.0.1:8080 — try:"; \
	  echo "  curl -s localhost:8080/v1/chat/completions -H 'content-type: application/json' -d '{\"model\":\"gpt-4o-mini\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}'"; \
	  echo "  curl -s localhost:18000/_mock/stats   # which keys the mock saw"; \
	  echo "  curl -s localhost:9091/metrics | grep keygate_keys   # key states"; echo; \
	  DEMO_KEY_A=sk-demo-alpha DEMO_KEY_B=sk-demo-bravo DEMO_KEY_C=sk-demo-charlie \
	  RUST_LOG=$${RUST_LOG:-info} target/release/keygate -c $(CONF)

fmt:
	$(CARGO) fmt --all -- --check

lint: deps
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## test: everything CI runs — formatting, lints, unit and integration tests.
test: deps fmt lint
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
	  $(CARGO) nextest run --workspace --all-targets --no-fail-fast; \
	else \
	  echo "cargo-nextest not found (cargo install cargo-nextest --locked); using cargo test"; \
	  $(CARGO) test --workspace --all-targets --no-fail-fast; \
	fi

## bench: criterion micro-benchmarks, then bench/load.py, bench/scale.py and bench/instructions.py
## (results in BENCHMARKS.md). load.py and instructions.py also measure keygate as built at
## BASELINE (any git revision, HEAD~1 unless set) in the same run, and report the difference
## (build kept in target/bench-baseline/); `make bench BASELINE=` skips that comparison.
BASELINE ?= HEAD~1
bench: deps
	$(CARGO) bench --bench hot_paths
	python3 bench/load.py $(if $(BASELINE),--baseline $(BASELINE)) $(BENCH_ARGS)
	python3 bench/scale.py $(SCALE_ARGS)
	python3 bench/instructions.py $(if $(BASELINE),--baseline $(BASELINE))

clean:
	$(CARGO) clean
