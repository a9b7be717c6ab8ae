# Wrong arguments to the directives other than token_meter_store stop
# nginx with the exact message; the store's own errors are in 002-store.t.
# The blocks expect "[emerg]" as well: it is the level of configuration
# errors, and saying so keeps Test::Nginx from warning about the line.

use t::TokenMeter;
use t::TokenMeter::Admin;

no_shuffle();
run_tests();

__DATA__

=== TEST 1: points per yuan of zero
--- http_config
    token_meter_points_per_yuan 0;
--- config
--- must_die
--- error_log
[emerg]
invalid points per yuan "0", expected a whole number from 1 to 1000000000
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: points per yuan that is not a number
--- http_config
    token_meter_points_per_yuan 2.5;
--- config
--- must_die
--- error_log
[emerg]
invalid points per yuan "2.5", expected a whole number from 1 to 1000000000
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: points per yuan above the limit
--- http_config
    token_meter_points_per_yuan 1000000001;
--- config
--- must_die
--- error_log
[emerg]
invalid points per yuan "1000000001", expected a whole number from 1 to 1000000000
--- no_error_log
[error]
[alert]
[crit]



=== TEST 4: the upper limit itself is accepted
--- http_config
    token_meter_points_per_yuan 1000000000;
--- config
    location = /yuan {
        set_token_meter_yuan $y 1500000000;
        echo $y;
    }
--- request
GET /yuan
--- response_body
1.50
--- no_error_log
[error]
[alert]
[crit]



=== TEST 5: trial points that are not a whole number
--- http_config
    token_meter_trial x;
--- config
--- must_die
--- error_log
[emerg]
invalid trial points "x", expected a whole number of points
--- no_error_log
[error]
[alert]
[crit]



=== TEST 6: trial points with decimals
--- http_config
    token_meter_trial 10.5 1d;
--- config
--- must_die
--- error_log
[emerg]
invalid trial points "10.5", expected a whole number of points
--- no_error_log
[error]
[alert]
[crit]



=== TEST 7: a trial validity that is not a time
--- http_config
    token_meter_trial 1000 x;
--- config
--- must_die
--- error_log
[emerg]
invalid trial validity "x"
--- no_error_log
[error]
[alert]
[crit]



=== TEST 8: a trial validity of zero
--- http_config
    token_meter_trial 1000 0;
--- config
--- must_die
--- error_log
[emerg]
invalid trial validity "0"
--- no_error_log
[error]
[alert]
[crit]



=== TEST 9: token_meter_points_per_yuan given twice
--- http_config
    token_meter_points_per_yuan 100;
    token_meter_points_per_yuan 100;
--- config
--- must_die
--- error_log
[emerg]
"token_meter_points_per_yuan" directive is duplicate
--- no_error_log
[error]
[alert]
[crit]



=== TEST 10: token_meter_trial given twice
--- http_config
    token_meter_trial 1000 1d;
    token_meter_trial 2000 1d;
--- config
--- must_die
--- error_log
[emerg]
"token_meter_trial" directive is duplicate
--- no_error_log
[error]
[alert]
[crit]



=== TEST 11: an admin key without the "sha256:" prefix
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store;
--- config
    location /admin/ {
        token_meter_admin;
        token_meter_admin_key
            eeb1ab6083df119878411ccdf509acf92c49170f5526809e55ac79293f1a51c5;
    }
--- must_die
--- error_log
[emerg]
invalid admin key "eeb1ab6083df119878411ccdf509acf92c49170f5526809e55ac79293f1a51c5", expected "sha256:" and 64 hex digits
--- no_error_log
[error]
[alert]
[crit]



=== TEST 12: an admin key with 63 hex digits
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store;
--- config
    location /admin/ {
        token_meter_admin;
        token_meter_admin_key
            sha256:eeb1ab6083df119878411ccdf509acf92c49170f5526809e55ac79293f1a51c;
    }
--- must_die
--- error_log
[emerg]
invalid admin key "sha256:eeb1ab6083df119878411ccdf509acf92c49170f5526809e55ac79293f1a51c", expected "sha256:" and 64 hex digits
--- no_error_log
[error]
[alert]
[crit]



=== TEST 13: an admin key with a character that is not hex
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store;
--- config
    location /admin/ {
        token_meter_admin;
        token_meter_admin_key
            sha256:eeb1ab6083df119878411ccdf509acf92c49170f5526809e55ac79293f1a51cg;
    }
--- must_die
--- error_log
[emerg]
invalid admin key "sha256:eeb1ab6083df119878411ccdf509acf92c49170f5526809e55ac79293f1a51cg", expected "sha256:" and 64 hex digits
--- no_error_log
[error]
[alert]
[crit]



=== TEST 14: the admin API without a key
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store;
--- config
    location /admin/ {
        token_meter_admin;
    }
--- must_die
--- error_log
[emerg]
"token_meter_admin" needs "token_meter_admin_key"
--- no_error_log
[error]
[alert]
[crit]



=== TEST 15: the admin API without a store
--- config
    location /admin/ {
        token_meter_admin;
        token_meter_admin_key sha256:$TEST_NGINX_ADMIN_HASH;
    }
--- must_die
--- error_log
[emerg]
"token_meter_admin" needs "token_meter_store" in the http block
--- no_error_log
[error]
[alert]
[crit]



=== TEST 16: the admin key is inherited from the server level
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store;
--- config
    token_meter_admin_key sha256:$TEST_NGINX_ADMIN_HASH;

    location /admin/ {
        token_meter_admin;
    }
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
GET /admin/subscribers/sub_1
--- error_code: 404
--- response_body
{"error":{"message":"no subscriber \"sub_1\"","type":"invalid_request_error","param":null,"code":"subscriber_not_found"}}
--- no_error_log
[error]
[alert]
[crit]



=== TEST 17: the innermost admin key wins
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store;
    token_meter_admin_key sha256:$TEST_NGINX_ADMIN_HASH;
--- config
    location /admin/ {
        token_meter_admin;

        # the SHA-256 of "another-admin-key-000000"
        token_meter_admin_key
            sha256:d305daa3306b3392b9d3f6e5a4ec821d1382c74d5f29bccc27456d5732d7eeb5;
    }
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
GET /admin/subscribers/sub_1
--- error_code: 401
--- response_body
{"error":{"message":"missing or wrong admin key","type":"invalid_request_error","param":null,"code":"invalid_admin_key"}}
--- error_log
token meter admin: missing or wrong admin key
--- no_error_log
[error]
[alert]
[crit]
