# keygate — the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
CONF ?= conf/demo.yaml
MOCK_ADDR ?= 127.0.0.1:18000

.PHONY: run test deps fmt lint unit build release bench fuzz clean

## deps: install what the build and tests need that a fresh machine lacks:
## cmake (pingora's zlib-ng); the deploy kit's checkers, which the tests require: promtool
## (Debian's `prometheus` package), systemd-analyze (`systemd`) and `shellcheck`;
## the `openai` Python SDK (the upgrade test's keep-alive client) and the `anthropic` one
## (the native Anthropic route's SDK test); redis-server and redis-cli (Debian's `redis-server` and
## `redis-tools`: the shared-state tests start real Redis servers and clusters); Debian's `chromium`
## (the admin status page's browser test, tests/admin_page.rs, drives it headless).
deps:
	@missing=""; \
	command -v cmake >/dev/null || missing="$$missing cmake"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	command -v shellcheck >/dev/null || missing="$$missing shellcheck"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v redis-cli >/dev/null || missing="$$missing redis-tools"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if command -v apt-get >/dev/null; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "please install:$$missing (cmake; promtool from Prometheus; systemd-analyze; shellcheck; redis-server and redis-cli; chromium)" >&2; exit 1; fi; \
	fi
	@python3 -c "import openai" 2>/dev/null || { echo "installing the openai Python SDK (upgrade test client)"; \
	  python3 -m pip install -q openai 2>/dev/null || python3 -m pip install -q --break-system-packages openai; }
	@python3 -c "import anthropic" 2>/dev/null || { echo "installing the anthropic Python SDK (Anthropic route test client)"; \
	  python3 -m pip install -q anthropic 2>/dev/null || python3 -m pip install -q --break-system-packages anthropic; }

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
	  echo "  curl -s localhost:9091/metrics | grep keygate_keys   # key states"; \
	  echo "  open http://127.0.0.1:9092/admin/   # status page (any token in the demo)"; echo; \
	  DEMO_KEY_A=sk-demo-alpha DEMO_KEY_B=sk-demo-bravo DEMO_KEY_C=sk-demo-charlie \
	  DEMO_MASTER_KEY=$${DEMO_MASTER_KEY:-00000000000000000000000000000000000000000000000000000000000000de} \
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

## bench: criterion micro-benchmarks, then bench/load.py, bench/scale.py, bench/instructions.py,
## bench/anthropic.py, bench/shared.py (keygate with and without `redis:` on a redis-server it
## starts, and how fast a cooldown reaches another instance), bench/affinity.py (`affinity: prompt`:
## 1 000 prompts, repeats on one key, spread, a key leaving and coming back) and bench/headroom.py
## (upstream 429s near the keys' limits, round_robin against headroom) and bench/objects.py (a file
## workflow over two accounts: requests that reach the wrong account) (results in BENCHMARKS.md). load.py
## and instructions.py also measure keygate as built at
## BASELINE (any git revision, HEAD~1 unless set) in the same run, and report the difference
## (build kept in target/bench-baseline/); `make bench BASELINE=` skips that comparison.
BASELINE ?= HEAD~1
bench: deps
	$(CARGO) bench --bench hot_paths
	python3 bench/load.py $(if $(BASELINE),--baseline $(BASELINE)) $(BENCH_ARGS)
	python3 bench/scale.py $(SCALE_ARGS)
	python3 bench/instructions.py $(if $(BASELINE),--baseline $(BASELINE))
	python3 bench/anthropic.py
	python3 bench/shared.py --no-build
	python3 bench/affinity.py
	python3 bench/headroom.py --no-build
	python3 bench/objects.py

## fuzz: every fuzz target (tests/fuzz) under libFuzzer, coverage-guided, FUZZ_SECONDS each
## (FUZZ_TARGETS to pick some). Stable Rust: the harness is built with sanitizer-coverage
## instrumentation flags (no nightly, no sanitizers) into target/fuzz/; libFuzzer itself is C++
## compiled by the libfuzzer-sys crate (g++). The corpus grows in target/fuzz/corpus/<target>/
## from the seeds in tests/fuzz/seeds/<target>/ (and the example configs); a crashing input is
## saved in target/fuzz/crashes/<target>/ and fails the run. `make test` runs the same targets
## briefly with proptest (tests/fuzz/tests/short_runs.rs).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= config headers json_body multipart usage error_body
# Same files as CONFIG_EXAMPLES in tests/fuzz/src/seeds.rs.
FUZZ_CONFIG_SEEDS := conf/demo.yaml conf/openai.yaml deploy/docker/keygate.yaml deploy/systemd/keygate.yaml
FUZZ_DIR := target/fuzz
FUZZ_RUSTFLAGS := --cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
  -Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks

fuzz: deps
	@command -v c++ >/dev/null || { echo "installing g++ (libFuzzer is C++)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends g++ >/dev/null; }
	@# The host triple as --target keeps the flags off build scripts and proc macros.
	@host=$$(rustc -vV | sed -n 's/^host: //p'); \
	RUSTFLAGS="$(FUZZ_RUSTFLAGS)" CARGO_TARGET_DIR=$(FUZZ_DIR) CARGO_PROFILE_RELEASE_LTO=false \
	  $(CARGO) build --release -p keygate-fuzz --features libfuzzer --bin keygate-fuzz --target $$host || exit 1; \
	bin=$(FUZZ_DIR)/$$host/release/keygate-fuzz; failed=""; \
	for t in $(FUZZ_TARGETS); do \
	  corpus=$(FUZZ_DIR)/corpus/$$t; crashes=$(FUZZ_DIR)/crashes/$$t; mkdir -p $$corpus $$crashes; \
	  if [ $$t = config ]; then for f in $(FUZZ_CONFIG_SEEDS); do cp $$f $$corpus/example-$$(echo $$f | tr / -); done; fi; \
	  echo "== fuzz $$t for $(FUZZ_SECONDS) s"; \
	  KEYGATE_FUZZ_TARGET=$$t $$bin $$corpus tests/fuzz/seeds/$$t -max_total_time=$(FUZZ_SECONDS) \
	    -timeout=20 -rss_limit_mb=2048 -max_len=16384 -dict=tests/fuzz/fuzz.dict -print_final_stats=1 \
	    -artifact_prefix=$$crashes/ $(FUZZ_ARGS) > $(FUZZ_DIR)/$$t.log 2>&1; rc=$$?; \
	  grep -E '^#[0-9]+.*DONE|stat::number_of_executed_units|stat::average_exec_per_sec|stat::peak_rss_mb' $(FUZZ_DIR)/$$t.log | sed 's/^/   /'; \
	  echo "   corpus: $$(ls $$corpus | wc -l) inputs, coverage: $$(grep -oE 'cov: [0-9]+' $(FUZZ_DIR)/$$t.log | tail -1)"; \
	  if [ $$rc -ne 0 ]; then \
	    failed="$$failed $$t"; echo "   FAILED (exit $$rc): log $(FUZZ_DIR)/$$t.log"; \
	    grep -E 'panicked at|^(SUMMARY|==[0-9]+== ERROR)' $(FUZZ_DIR)/$$t.log | head -5 | sed 's/^/   /'; \
	    for c in $$(grep -oE "Test unit written to [^ ]+" $(FUZZ_DIR)/$$t.log | sed 's/Test unit written to //'); do \
	      echo "   input saved in $$c; replay: KEYGATE_FUZZ_TARGET=$$t $$bin $$c"; done; \
	  fi; \
	done; \
	if [ -n "$$failed" ]; then echo "fuzzing found failures in:$$failed" >&2; exit 1; fi; \
	echo "fuzz: no failures in $(FUZZ_TARGETS)"

clean:
	$(CARGO) clean
