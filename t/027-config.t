# The request path's directives: each wrong one stops nginx with its exact
# message; the limits themselves are accepted.  The upstreams point at the
# mock on $TEST_NGINX_MOCK_PORT.

use t::TokenMeter;
use t::TokenMeter::Metered;

our $Admin = <<'EOC';
    location /v1/ {
        token_meter on;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_pass http://$token_meter_upstream;
    }

    location /admin/ {
        token_meter_admin;
        token_meter_admin_key
            sha256:$TEST_NGINX_ADMIN_HASH;
    }
EOC

run_tests();

__DATA__

=== TEST 1: a model defined twice
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/c1 size=8m;
    upstream mock { server 127.0.0.1:$TEST_NGINX_MOCK_PORT; }
    token_meter_model kimi upstream=mock input=1 output=4;
    token_meter_model kimi upstream=mock input=2 output=8;
--- config
--- must_die
--- error_log
duplicate model "kimi"
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: max_output of zero
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/c2 size=8m;
    upstream mock { server 127.0.0.1:$TEST_NGINX_MOCK_PORT; }
    token_meter_model kimi upstream=mock input=1 output=4 max_output=0;
--- config
--- must_die
--- error_log
invalid max output "max_output=0"
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: max_output that is not a number
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/c3 size=8m;
    upstream mock { server 127.0.0.1:$TEST_NGINX_MOCK_PORT; }
    token_meter_model kimi upstream=mock input=1 output=4 max_output=4k;
--- config
--- must_die
--- error_log
invalid max output "max_output=4k"
--- no_error_log
[error]
[alert]
[crit]



=== TEST 4: max_output below zero
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/c4 size=8m;
    upstream mock { server 127.0.0.1:$TEST_NGINX_MOCK_PORT; }
    token_meter_model kimi upstream=mock input=1 output=4 max_output=-1;
--- config
--- must_die
--- error_log
invalid max output "max_output=-1"
--- no_error_log
[error]
[alert]
[crit]



=== TEST 5: a parameter the directive does not know
--- http_config
    token_meter_model kimi upstream=mock input=1 output=4 foo=1;
--- config
--- must_die
--- error_log
invalid parameter "foo=1"
--- no_error_log
[error]
[alert]
[crit]



=== TEST 6: a parameter without its "="
--- http_config
    token_meter_model kimi upstream mock input=1 output=4;
--- config
--- must_die
--- error_log
invalid parameter "upstream"
--- no_error_log
[error]
[alert]
[crit]



=== TEST 7: a price that is not a number
--- http_config
    token_meter_model kimi upstream=mock input=abc output=4;
--- config
--- must_die
--- error_log eval
'invalid price "input=abc", expected points per token with up to three'
. ' decimals, at most 10000'
--- no_error_log
[error]
[alert]
[crit]



=== TEST 8: a price above 10000
--- http_config
    token_meter_model kimi upstream=mock input=1 output=10000.001;
--- config
--- must_die
--- error_log eval
'invalid price "output=10000.001", expected points per token with up to three'
. ' decimals, at most 10000'
--- no_error_log
[error]
[alert]
[crit]



=== TEST 9: a price with four decimals
--- http_config
    token_meter_model kimi upstream=mock input=1 output=4 cached=0.0001;
--- config
--- must_die
--- error_log eval
'invalid price "cached=0.0001", expected points per token with up to three'
. ' decimals, at most 10000'
--- no_error_log
[error]
[alert]
[crit]



=== TEST 10: a negative price
--- http_config
    token_meter_model kimi upstream=mock input=-1 output=4;
--- config
--- must_die
--- error_log eval
'invalid price "input=-1", expected points per token with up to three'
. ' decimals, at most 10000'
--- no_error_log
[error]
[alert]
[crit]



=== TEST 11: an empty price
--- http_config
    token_meter_model kimi upstream=mock input= output=4;
--- config
--- must_die
--- error_log eval
'invalid price "input=", expected points per token with up to three'
. ' decimals, at most 10000'
--- no_error_log
[error]
[alert]
[crit]



=== TEST 12: a price with two decimal points
--- http_config
    token_meter_model kimi upstream=mock input=1.2.5 output=4;
--- config
--- must_die
--- error_log eval
'invalid price "input=1.2.5", expected points per token with up to three'
. ' decimals, at most 10000'
--- no_error_log
[error]
[alert]
[crit]



=== TEST 13: a model without upstream=
--- http_config
    token_meter_model kimi input=1 output=4;
--- config
--- must_die
--- error_log
model "kimi" needs upstream=, input= and output=
--- no_error_log
[error]
[alert]
[crit]



=== TEST 14: a model without input=
--- http_config
    upstream mock { server 127.0.0.1:$TEST_NGINX_MOCK_PORT; }
    token_meter_model kimi upstream=mock output=4 cached=0.25;
--- config
--- must_die
--- error_log
model "kimi" needs upstream=, input= and output=
--- no_error_log
[error]
[alert]
[crit]



=== TEST 15: a model without output=
--- http_config
    upstream mock { server 127.0.0.1:$TEST_NGINX_MOCK_PORT; }
    token_meter_model kimi upstream=mock input=1;
--- config
--- must_die
--- error_log
model "kimi" needs upstream=, input= and output=
--- no_error_log
[error]
[alert]
[crit]



=== TEST 16: a model on an upstream that does not exist: file and line
--- http_config
    upstream mock { server 127.0.0.1:$TEST_NGINX_MOCK_PORT; }
    token_meter_model kimi upstream=mock input=1 output=4;
    token_meter_model glm upstream=zhipu input=1 output=4;
--- config
--- must_die
--- error_log eval
qr{model "glm" names unknown upstream "zhipu" in \S+/conf/nginx\.conf:\d+$}
--- no_error_log
[error]
[alert]
[crit]



=== TEST 17: token_meter without a store
--- http_config
    upstream mock { server 127.0.0.1:$TEST_NGINX_MOCK_PORT; }
    token_meter_model kimi upstream=mock input=1 output=4;
--- config
    location /v1/ {
        token_meter on;
        proxy_pass http://$token_meter_upstream;
    }
--- must_die
--- error_log
"token_meter" needs "token_meter_store" in the http block
--- no_error_log
[error]
[alert]
[crit]



=== TEST 18: a quota status other than 402 and 429
--- http_config
    token_meter_quota_status 500;
--- config
--- must_die
--- error_log
invalid quota status "500", expected 402 or 429
--- no_error_log
[error]
[alert]
[crit]



=== TEST 19: a quota status that is not a number
--- http_config
    token_meter_quota_status payment;
--- config
--- must_die
--- error_log
invalid quota status "payment", expected 402 or 429
--- no_error_log
[error]
[alert]
[crit]



=== TEST 20: the quota status given twice
--- http_config
    token_meter_quota_status 429;
    token_meter_quota_status 402;
--- config
--- must_die
--- error_log
"token_meter_quota_status" directive is duplicate
--- no_error_log
[error]
[alert]
[crit]



=== TEST 21: token_meter_lower_max_tokens is on or off
--- http_config
    token_meter_lower_max_tokens yes;
--- config
--- must_die
--- error_log eval
'invalid value "yes" in "token_meter_lower_max_tokens" directive,'
. ' it must be "on" or "off"'
--- no_error_log
[error]
[alert]
[crit]



=== TEST 22: a reservation timeout that is not a time
--- http_config
    token_meter_reservation_timeout soon;
--- config
--- must_die
--- error_log
"token_meter_reservation_timeout" directive invalid value
--- no_error_log
[error]
[alert]
[crit]



=== TEST 23: models belong to the http block
--- config
    token_meter_model kimi upstream=mock input=1 output=4;
--- must_die
--- error_log
"token_meter_model" directive is not allowed here
--- no_error_log
[error]
[alert]
[crit]



=== TEST 24: a model needs more than a name
--- http_config
    token_meter_model kimi;
--- config
--- must_die
--- error_log
invalid number of arguments in "token_meter_model" directive
--- no_error_log
[error]
[alert]
[crit]



=== TEST 25: the limits are accepted; a free model costs nothing
--- init
subscriber(paid => 0);
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/c25 size=8m;
    token_meter_trial 0;
    token_meter_model free upstream=later input=0 output=0 max_output=1;
    token_meter_model dear upstream=later input=10000 output=10000
                      cached=0.001 max_output=10000000;
    token_meter_model fine upstream=later input=0.001 output=9999.999;
    # an upstream defined after the models that use it
    upstream later { server 127.0.0.1:$TEST_NGINX_MOCK_PORT; }
--- config eval
$::Admin
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
--- request eval
[
    ::chat('{"model":"free","messages":[]}'),
    ::chat('{"model":"dear","messages":[]}'),
    ::chat('{"model":"fine","messages":[]}'),
]
--- error_code eval
[200, 402, 402]
--- response_body_like eval
[
    qr/"completion_tokens": 5,/,
    (qr/"code":"insufficient_quota"/) x 2,
]
--- no_error_log
[error]
[alert]
[crit]
