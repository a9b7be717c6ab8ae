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

MODULE  = $(BUILD)/modules/ngx_http_token_meter_module.so
TREE    = $(BUILD)/nginx
SOURCES = config $(wildcard ngx_http_token_meter_module/*.[ch])

MODULES_DIR   = /usr/lib/nginx/modules
AVAILABLE_DIR = /usr/share/nginx/modules-available
ENABLED_DIR   = /etc/nginx/modules-enabled

.PHONY: all deps install test demo clean

all: $(MODULE)

deps:
	@sh util/install-deps

$(TREE)/Makefile: config
	@sh util/install-deps
	rm -rf $(TREE)
	mkdir -p $(BUILD)
	cp -a $(NGINX_SRC) $(TREE)
	cd $(TREE) && if [ -f conf_flags ]; then \
	    . ./conf_flags && ./configure "$${NGX_CONF_FLAGS[@]}" \
	        --with-cc-opt="$(DEB_CC_OPT)" --with-ld-opt="$(DEB_LD_OPT)" \
	        --add-dynamic-module=$(CURDIR); \
	else \
	    ./configure --with-compat --with-debug --with-http_ssl_module \
	        --add-dynamic-module=$(CURDIR); \
	fi > configure.log 2>&1 || { cat configure.log; exit 1; }

$(MODULE): $(TREE)/Makefile $(SOURCES)
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

clean:
	rm -rf $(BUILD) t/servroot t/tmp
