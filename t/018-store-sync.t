# sync=<time>: each worker flushes the store from a thread of its own, so
# that the event loop never waits for the disk; sync=on and sync=off need
# no such thread.  The worker's threads are read from /proc/self/task,
# listed by nginx itself; a reload (SIGHUP) makes the old workers stop
# their thread and exit, and what they wrote is there afterwards.

BEGIN {
    $ENV{TEST_NGINX_USE_HUP} = 1;
}

use t::TokenMeter;
use t::TokenMeter::Admin;

admin_defaults();
master_on();
workers(1);
no_shuffle();
run_tests();

__DATA__

=== TEST 1: sync=50ms: the worker runs a second thread
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store sync=50ms;
--- config
    location /task/ {
        alias /proc/self/task/;
        autoindex on;
    }
--- request
GET /task/
--- response_body_like eval
qr{^(?:(?!href="\d).)*href="\d+/"
    (?:(?!href="\d).)*href="\d+/"
    (?:(?!href="\d).)*$}sx
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: a subscriber written with sync=50ms
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store sync=50ms;
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
POST /admin/subscribers
{"msisdn":"+8613800138018"}
--- error_code: 201
--- response_body_like chomp
^\{"id":"sub_1",
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: after a reload to sync=on: the subscriber is there, one thread
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store sync=on;
--- config
    location /admin/ {
        token_meter_admin;
        token_meter_admin_key sha256:$TEST_NGINX_ADMIN_HASH;
    }

    location /task/ {
        alias /proc/self/task/;
        autoindex on;
    }
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
["GET /admin/subscribers/sub_1", "GET /task/"]
--- response_body_like eval
['^\{"id":"sub_1",.*"msisdn":"\+8613800138018"',
 qr{^(?:(?!href="\d).)*href="\d+/"(?:(?!href="\d).)*$}s]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 4: sync=off: one thread
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store sync=off;
--- config
    location /task/ {
        alias /proc/self/task/;
        autoindex on;
    }
--- request
GET /task/
--- response_body_like eval
qr{^(?:(?!href="\d).)*href="\d+/"(?:(?!href="\d).)*$}s
--- no_error_log
[error]
[alert]
[crit]
