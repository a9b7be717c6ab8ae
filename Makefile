# Builds ngx_http_token_meter_module.so against the system nginx (Debian's
# nginx-dev tree, configured with the distribution's own flags so that the
# module loads into /usr/sbin/nginx), or against any nginx source tree given
# as NGINX_SRC=.

SHELL := /bin/bash

NGINX_SRC ?= /usr/share/nginx/src
BUILD     ?= build
NGINX     ?= /usr/sbin/nginx
PROVE     ?= prove
TESTS     ?= t/

DEB_CC_OPT = -g -O2 -fstack-protector-strong -Wformat \
             -Werror=format-security -fPIC -Wdate-time -D_FORTIFY_SOURCE=2
DEB_LD_OPT = -Wl,-z,relro -Wl,-z,now -fPIC

# another compiler, and flags added to the compiler's and the linker's,
# as "make check-asan" uses them
MODULE_CC    ?=
EXTRA_CC_OPT ?=
EXTRA_LD_OPT ?=

MODULE  = $(BUILD)/modules/ngx_http_token_meter_module.so
TREE    = $(BUILD)/nginx
SOURCES = config $(wildcard ngx_http_token_meter_module/*.[ch])

MODULES_DIR   = /usr/lib/nginx/modules
AVAILABLE_DIR = /usr/share/nginx/modules-available
ENABLED_DIR   = /etc/nginx/modules-enabled

.PHONY: all deps install test demo clean fuzz fuzz-build \
        bench bench-scale bench-callgrind bench-profile check-asan \
        check-valgrind

all: $(MODULE)

deps:
	@sh util/install-deps

$(TREE)/objs/Makefile: config
	@sh util/install-deps
	rm -rf $(TREE)
	mkdir -p $(BUILD)
	cp -a $(NGINX_SRC) $(TREE)
	cd $(TREE) && if [ -f conf_flags ]; then \
	    . ./conf_flags && ./configure "$${NGX_CONF_FLAGS[@]}" \
	        --with-cc-opt="$(DEB_CC_OPT) $(EXTRA_CC_OPT)" \
	        --with-ld-opt="$(DEB_LD_OPT) $(EXTRA_LD_OPT)" \
	        $(if $(MODULE_CC),--with-cc=$(MODULE_CC)) \
	        --add-dynamic-module=$(CURDIR); \
	else \
	    ./configure --with-compat --with-debug --with-http_ssl_module \
	        --with-cc-opt="$(EXTRA_CC_OPT)" --with-ld-opt="$(EXTRA_LD_OPT)" \
	        $(if $(MODULE_CC),--with-cc=$(MODULE_CC)) \
	        --add-dynamic-module=$(CURDIR); \
	fi > configure.log 2>&1 || { cat configure.log; exit 1; }

$(MODULE): $(TREE)/objs/Makefile $(SOURCES)
	$(MAKE) -C $(TREE) -f objs/Makefile modules
	mkdir -p $(BUILD)/modules
	cp $(TREE)/objs/ngx_http_token_meter_module.so $(MODULE).tmp
	mv -f $(MODULE).tmp $(MODULE)

install: $(MODULE)
	install -m 644 $(MODULE) $(MODULES_DIR)/
	mkdir -p $(AVAILABLE_DIR) $(ENABLED_DIR)
	echo 'load_module modules/ngx_http_token_meter_module.so;' \
	    > $(AVAILABLE_DIR)/mod-http-token-meter.conf
	ln -sf $(AVAILABLE_DIR)/mod-http-token-meter.conf \
	    $(ENABLED_DIR)/60-mod-http-token-meter.conf

test: $(MODULE)
	$(PROVE) -I. -r $(TESTS)

demo: $(MODULE)
	sh util/demo


# libFuzzer targets for the scanners and parsers of
# ngx_http_token_meter_scan.c, which need nginx's headers but none of its
# code: each links the target, that one file and jansson.  "make fuzz"
# replays fuzz/regressions/ and then fuzzes each target for FUZZ_TIME
# seconds (util/fuzz).

FUZZ_CC      ?= clang
FUZZ_TIME    ?= 60
FUZZ_OUT     ?= $(BUILD)/fuzz
FUZZ_TARGETS  = sse json usage request
FUZZ_BINS     = $(addprefix $(FUZZ_OUT)/,$(FUZZ_TARGETS))
FUZZ_CFLAGS   = -g -O1 -fno-omit-frame-pointer \
                -fsanitize=fuzzer,address,undefined \
                -fno-sanitize-recover=undefined \
                -W -Wall -Wpointer-arith -Wno-unused-parameter -Werror
FUZZ_INCS     = -I$(TREE)/src/core -I$(TREE)/src/event \
                -I$(TREE)/src/event/modules -I$(TREE)/src/os/unix \
                -I$(TREE)/objs -Ingx_http_token_meter_module
SCAN          = ngx_http_token_meter_module/ngx_http_token_meter_scan

fuzz-build: $(FUZZ_BINS)

# the configured tree gives ngx_auto_config.h; it need not be up to date
$(FUZZ_BINS): $(FUZZ_OUT)/%: fuzz/%.c fuzz/fuzz.h $(SCAN).c $(SCAN).h \
              | $(TREE)/objs/Makefile
	mkdir -p $(FUZZ_OUT)
	$(FUZZ_CC) $(FUZZ_CFLAGS) $(FUZZ_INCS) -o $@ $< $(SCAN).c -ljansson

fuzz: $(FUZZ_BINS)
	FUZZ_OUT=$(FUZZ_OUT) FUZZ_TIME=$(FUZZ_TIME) sh util/fuzz $(FUZZ_TARGETS)



# The suite again, under AddressSanitizer and UBSan or under valgrind,
# each on its own port, server root and store directories (util/test-file)
# so that it can run next to "make test"; t/README says more.  Neither
# runs t/000-runner.t (the harness, with stock nginx), t/031-openai-demo.t
# (the demo, with the ordinary build) nor the fuzz file.

CHECK_TESTS   ?= $(filter-out t/000-runner.t t/031-openai-demo.t \
                              t/090-fuzz-regressions.t, \
                              $(wildcard t/[0-9]*.t))
CHECK_MODULES  = $(MODULES_DIR)/ndk_http_module.so \
                 $(MODULES_DIR)/ngx_http_echo_module.so

ASAN_CC       ?= clang
ASAN_BUILD    ?= build-asan
ASAN_PORT     ?= 1964
ASAN_SERVROOT ?= t/servroot-asan
ASAN_REPORTS   = $(CURDIR)/$(ASAN_BUILD)/reports
ASAN_FLAGS     = -fsanitize=address,undefined
ASAN_RTDIR     = $(shell $(ASAN_CC) -print-runtime-dir)

# clang, because its UBSan reports go through the ASan runtime and so to
# log_path, where gcc's separate UBSan runtime writes to nginx's stderr.
# Private aliases: the module's "ngx_modules" must not stand for nginx's
# own when ASan marks the ends of globals.  Leaks are left to
# check-valgrind: nginx leaks on purpose at exit.
check-asan:
	ASAN_OPTIONS=detect_leaks=0 $(MAKE) BUILD=$(ASAN_BUILD) \
	    MODULE_CC=$(ASAN_CC) \
	    EXTRA_CC_OPT="$(ASAN_FLAGS) -fno-omit-frame-pointer \
	                  -mllvm -asan-use-private-alias=1" \
	    EXTRA_LD_OPT="$(ASAN_FLAGS) -shared-libasan -Wl,-rpath,$(ASAN_RTDIR)"
	rm -rf $(ASAN_REPORTS)
	mkdir -p $(ASAN_REPORTS)
	ASAN_OPTIONS=log_path=$(ASAN_REPORTS)/asan:detect_leaks=0 \
	UBSAN_OPTIONS=print_stacktrace=1 \
	ASAN_CC=$(ASAN_CC) \
	TEST_NGINX_BINARY=$(CURDIR)/util/asan-nginx \
	TEST_NGINX_LOAD_MODULES="$(CHECK_MODULES) \
	    $(CURDIR)/$(ASAN_BUILD)/modules/ngx_http_token_meter_module.so" \
	TEST_NGINX_SERVER_PORT=$(ASAN_PORT) \
	TEST_NGINX_SERVROOT=$(CURDIR)/$(ASAN_SERVROOT) \
	TEST_STORE_ROOT=$(CURDIR)/t/tmp/check-asan \
	    $(PROVE) -I. --exec 'sh util/test-file' $(CHECK_TESTS); \
	status=$$?; \
	if [ -n "$$(ls -A $(ASAN_REPORTS))" ]; then \
	    cat $(ASAN_REPORTS)/*; \
	    echo "check-asan: sanitizer reports in $(ASAN_REPORTS)" >&2; \
	    exit 1; \
	fi; \
	exit $$status

VALGRIND_PORT ?= 1944
VALGRIND_SERVROOT ?= t/servroot-valgrind

# t/071-crash.t upgrades the binary, which cannot start under valgrind
VALGRIND_TESTS ?= $(filter-out t/071-crash.t, $(CHECK_TESTS))

check-valgrind: $(MODULE)
	TEST_NGINX_USE_VALGRIND=1 \
	TEST_NGINX_SERVER_PORT=$(VALGRIND_PORT) \
	TEST_NGINX_SERVROOT=$(CURDIR)/$(VALGRIND_SERVROOT) \
	TEST_STORE_ROOT=$(CURDIR)/t/tmp/check-valgrind \
	    $(PROVE) -I. --exec 'sh util/test-file' $(VALGRIND_TESTS)

# Benchmarks (bench/bench.py, docs/benchmarks.md): "make bench" compares
# the metered proxy with a plain proxy_pass in under five minutes;
# "make bench-scale" fills a large store first and takes much longer;
# "make bench-callgrind" counts the module's instructions per request;
# "make bench-profile" records the proxies' workers with perf.
# BENCH_FLAGS passes options, e.g. BENCH_FLAGS="--wait-quiet --doc
# docs/benchmarks.md --label final".

PYTHON      ?= python3
BENCH_FLAGS ?=

bench: $(MODULE)
	@sh util/install-deps
	$(PYTHON) bench/bench.py main $(BENCH_FLAGS)

bench-scale: $(MODULE)
	@sh util/install-deps
	$(PYTHON) bench/bench.py scale $(BENCH_FLAGS)

bench-callgrind: $(MODULE)
	@sh util/install-deps
	$(PYTHON) bench/bench.py callgrind $(BENCH_FLAGS)

bench-profile: $(MODULE)
	@sh util/install-deps
	$(PYTHON) bench/bench.py profile $(BENCH_FLAGS)

clean:
	rm -rf $(BUILD) $(ASAN_BUILD) t/servroot t/servroot-asan \
	    t/servroot-valgrind t/tmp
