# The module loads, every directive is accepted in the contexts the
# README gives, and set_token_meter_yuan turns points into yuan.

use t::TokenMeter;
use t::TokenMeter::Admin;

no_shuffle();
run_tests();

__DATA__

=== TEST 1: every directive in one configuration, and nginx answers
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store size=8m sync=on;
    token_meter_points_per_yuan 250000;
    token_meter_trial 25000000 1M;
    token_meter_admin_key sha256:$TEST_NGINX_ADMIN_HASH;
--- config
    location = /t {
        echo ok;
    }

    location /admin/ {
        token_meter_admin;
    }
--- request
GET /t
--- response_body
ok
--- error_log eval
qq{token meter store "$ENV{TEST_NGINX_STORE_DIR}/store" created with schema }
. qq{version 1}
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: the admin location answers, and asks for its key
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store;
--- config
    location /admin/ {
        token_meter_admin;
        token_meter_admin_key sha256:$TEST_NGINX_ADMIN_HASH;
    }
--- request
GET /admin/subscribers?msisdn=%2B8613800138000
--- error_code: 401
--- response_headers
WWW-Authenticate: Bearer
Content-Type: application/json
--- response_body
{"error":{"message":"missing or wrong admin key","type":"invalid_request_error","param":null,"code":"invalid_admin_key"}}
--- no_error_log
created with schema version
[error]
[alert]
[crit]



=== TEST 3: points as yuan at the default 250000 points per yuan
--- config
    location = /yuan {
        set_token_meter_yuan $a 2500000;
        set_token_meter_yuan $b 1;
        set_token_meter_yuan $c 0;
        set_token_meter_yuan $d 249999;
        set_token_meter_yuan $e 250000;
        set_token_meter_yuan $f 2502499;
        set_token_meter_yuan $g 1000000000000000;
        echo "$a $b $c $d $e $f $g";
    }
--- request
GET /yuan
--- response_body
10.00 0.00 0.00 0.99 1.00 10.00 4000000000.00
--- no_error_log
[error]
[alert]
[crit]



=== TEST 4: anything but a whole number of points gives an empty string
--- config
    location = /yuan {
        set_token_meter_yuan $a $arg_p;
        echo "[$a]";
    }
--- request eval
[
    "GET /yuan?p=2500000",
    "GET /yuan?p=",
    "GET /yuan",
    "GET /yuan?p=1.5",
    "GET /yuan?p=-5",
    "GET /yuan?p=12x",
    "GET /yuan?p=%2B5",
    "GET /yuan?p=1000000000000001",
]
--- response_body eval
[
    "[10.00]\n",
    "[]\n",
    "[]\n",
    "[]\n",
    "[]\n",
    "[]\n",
    "[]\n",
    "[]\n",
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 5: the rate follows token_meter_points_per_yuan
--- http_config
    token_meter_points_per_yuan 100;
--- config
    location = /yuan {
        set_token_meter_yuan $a 12345;
        set_token_meter_yuan $b 1;
        set_token_meter_yuan $c 99;
        echo "$a $b $c";
    }
--- request
GET /yuan
--- response_body
123.45 0.01 0.99
--- no_error_log
[error]
[alert]
[crit]



=== TEST 6: set_token_meter_yuan in server context and inside "if"
--- http_config
    token_meter_points_per_yuan 1000;
--- config
    set_token_meter_yuan $in_server 1500;

    location = /yuan {
        set $in_if none;

        if ($arg_p) {
            set_token_meter_yuan $in_if $arg_p;
        }

        echo "$in_server [$in_if]";
    }
--- request eval
["GET /yuan?p=2001", "GET /yuan"]
--- response_body eval
["1.50 [2.00]\n", "1.50 [none]\n"]
--- no_error_log
[error]
[alert]
[crit]
