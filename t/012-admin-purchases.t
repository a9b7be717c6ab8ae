# Admin API: purchases.  A payment reference is credited once: the same
# purchase sent again answers 200 with the first answer, byte for byte; a
# different purchase under a used reference is refused.  The blocks run in
# order on one store.

use t::TokenMeter;
use t::TokenMeter::Expect;
use t::TokenMeter::Admin;

admin_defaults();

no_shuffle();
run_tests();

__DATA__

=== TEST 1: two subscribers
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    "POST /admin/subscribers\n" . '{"msisdn":"+8613800138000"}',
    "POST /admin/subscribers\n" . '{"msisdn":"+8613900139000"}',
]
--- error_code eval
[201, 201]
--- response_body_like eval
[qr/\A\{"id":"sub_1",/, qr/\A\{"id":"sub_2",/]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: a purchase in yuan
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
POST /admin/subscribers/sub_1/purchases
{"yuan":"10.00","reference":"pay-1"}
--- error_code: 201
--- response_headers
Content-Type: application/json
--- response_body_like eval
::json_re('{"reference":"pay-1","subscriber":"sub_1","points":2500000,'
    . '"yuan":"10.00","created_at":"<time>","balance":{"paid":2500000,'
    . '"grants":[{"kind":"trial","points":25000000,"expires_at":"<time>"}],'
    . '"reserved":0,"available":27500000}}')
--- error_log
token meter admin: purchase "pay-1" credited 2500000 points to sub_1
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: the same purchase a second later: 200 and the first answer
--- config
    location /admin/ {
        token_meter_admin;
        token_meter_admin_key sha256:$TEST_NGINX_ADMIN_HASH;
    }

    # each purchase goes through a real HTTP request, so that its status
    # can be shown after its body
    location = /buy {
        internal;
        proxy_pass http://127.0.0.1:$TEST_NGINX_SERVER_PORT/admin/subscribers/sub_1/purchases;
        proxy_set_header Authorization
                         "Bearer tm-test-admin-key-6c1f0e9b2a7d";
        echo_after_body "<<$upstream_status>>";
    }

    location = /buy-twice {
        echo_subrequest POST /buy -b '{"yuan":"5.00","reference":"pay-2"}';
        echo_sleep 1.1;
        echo_subrequest POST /buy -b '{"yuan":"5.00","reference":"pay-2"}';
    }
--- request
GET /buy-twice
--- response_body_like eval
# \1: the second answer is the first one, created_at and balance included
qr/\A(\{"reference":"pay-2","subscriber":"sub_1","points":1250000,"yuan":"5\.00","created_at":"[^"]+","balance":\{"paid":3750000,[^\n]*\}\n)<<201>>\n\1<<200>>\n\z/
--- no_error_log
[error]
[alert]
[crit]



=== TEST 4: the replay credited nothing
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
GET /admin/subscribers/sub_1
--- response_body_like eval
qr/"balance":\{"paid":3750000,"grants":\[\{"kind":"trial","points":25000000,"expires_at":"[^"]+"\}\],"reserved":0,"available":28750000\}\}\n\z/
--- no_error_log
[error]
[alert]
[crit]



=== TEST 5: a purchase in points, and its replay
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    "POST /admin/subscribers/sub_1/purchases\n"
    . '{"points":1000,"reference":"pay-3"}',
    "POST /admin/subscribers/sub_1/purchases\n"
    . '{"reference":"pay-3","points":1000}',
]
--- error_code eval
[201, 200]
--- response_body_like eval
[
    (::json_re('{"reference":"pay-3","subscriber":"sub_1","points":1000,'
        . '"yuan":null,"created_at":"<time>","balance":{"paid":3751000,'
        . '"grants":[{"kind":"trial","points":25000000,'
        . '"expires_at":"<time>"}],"reserved":0,"available":28751000}}')) x 2
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 6: a used reference with another amount, form or subscriber
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    "POST /admin/subscribers/sub_1/purchases\n"
    . '{"yuan":"20.00","reference":"pay-1"}',
    # the same number of points, asked for as points instead of yuan
    "POST /admin/subscribers/sub_1/purchases\n"
    . '{"points":2500000,"reference":"pay-1"}',
    "POST /admin/subscribers/sub_2/purchases\n"
    . '{"yuan":"10.00","reference":"pay-1"}',
    "POST /admin/subscribers/sub_1/purchases\n"
    . '{"yuan":"1.00","reference":"pay-3"}',
]
--- error_code eval
[409, 409, 409, 409]
--- response_body eval
[
    (map {
        '{"error":{"message":"reference \"' . $_ . '\" was used for a'
        . ' different purchase","type":"invalid_request_error",'
        . '"param":null,"code":"reference_conflict"}}' . "\n"
    } qw(pay-1 pay-1 pay-1 pay-3))
]
--- no_error_log
credited
[error]
[alert]
[crit]



=== TEST 7: amounts that are not valid
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    map { "POST /admin/subscribers/sub_1/purchases\n$_" }
    # "yuan" is a string, but not a positive amount with two decimals
    '{"yuan":"10","reference":"bad"}',
    '{"yuan":"10.0","reference":"bad"}',
    '{"yuan":"10.000","reference":"bad"}',
    '{"yuan":".00","reference":"bad"}',
    '{"yuan":"0.00","reference":"bad"}',
    '{"yuan":"-1.00","reference":"bad"}',
    '{"yuan":"1,00","reference":"bad"}',
    '{"yuan":"ab.cd","reference":"bad"}',
    '{"yuan":"10000000000.01","reference":"bad"}',
    # "points" is an integer, but not a positive one within the limit
    '{"points":0,"reference":"bad"}',
    '{"points":-5,"reference":"bad"}',
    '{"points":1000000000000001,"reference":"bad"}',
    # neither of the two forms
    '{"yuan":10,"reference":"bad"}',
    '{"points":1.5,"reference":"bad"}',
    '{"points":"100","reference":"bad"}',
    '{"yuan":"1.00","points":250000,"reference":"bad"}',
    '{"reference":"bad"}',
]
--- error_code eval
[(400) x 17]
--- response_body eval
[
    ('{"error":{"message":"\"yuan\" must be a positive amount with two'
     . ' decimals, like \"10.00\"","type":"invalid_request_error",'
     . '"param":null,"code":"invalid_amount"}}' . "\n") x 9,
    ('{"error":{"message":"\"points\" must be a positive whole number",'
     . '"type":"invalid_request_error","param":null,'
     . '"code":"invalid_amount"}}' . "\n") x 3,
    ('{"error":{"message":"give either \"yuan\" as a string like \"10.00\"'
     . ' or \"points\" as a whole number","type":"invalid_request_error",'
     . '"param":null,"code":"invalid_amount"}}' . "\n") x 5,
]
--- no_error_log
credited
[error]
[alert]
[crit]



=== TEST 8: references that are not valid
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    map { "POST /admin/subscribers/sub_1/purchases\n$_" }
    '{"yuan":"1.00"}',
    '{"yuan":"1.00","reference":""}',
    '{"yuan":"1.00","reference":"pay 4"}',
    '{"yuan":"1.00","reference":"pay\t4"}',
    '{"yuan":"1.00","reference":"pay-\u00e9"}',
    '{"yuan":"1.00","reference":"' . ('r' x 129) . '"}',
    '{"yuan":"1.00","reference":4}',
    '{"yuan":"1.00","reference":null}',
]
--- error_code eval
[(400) x 8]
--- response_body eval
[
    ('{"error":{"message":"\"reference\" must be 1 to 128 printable ASCII'
     . ' characters without spaces","type":"invalid_request_error",'
     . '"param":null,"code":"invalid_reference"}}' . "\n") x 8
]
--- no_error_log
credited
[error]
[alert]
[crit]



=== TEST 9: a reference of 128 printable characters is fine
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
"POST /admin/subscribers/sub_1/purchases\n"
. '{"points":1,"reference":"' . ('~!#$%&()*+,-./:;<=>?@[]^_`{|}' x 4)
. ('r' x 12) . '"}'
--- error_code: 201
--- response_body_like eval
qr/\A\{"reference":"~!#\$%&\(\)\*\+,-\.\/:;<=>\?\@\[\]\^_`\{\|\}(?:[^"]{29}){3}r{12}","subscriber":"sub_1","points":1,"yuan":null,.*"paid":3751001,/
--- no_error_log
[error]
[alert]
[crit]



=== TEST 10: purchases for a closed subscriber are refused, old ones replay
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    "POST /admin/subscribers/sub_2/purchases\n"
    . '{"yuan":"2.00","reference":"pay-b1"}',
    "DELETE /admin/subscribers/sub_2",
    "POST /admin/subscribers/sub_2/purchases\n"
    . '{"yuan":"2.00","reference":"pay-b2"}',
    # a retry of a payment that went through is not an error
    "POST /admin/subscribers/sub_2/purchases\n"
    . '{"yuan":"2.00","reference":"pay-b1"}',
    "POST /admin/subscribers/sub_999/purchases\n"
    . '{"yuan":"2.00","reference":"pay-b3"}',
]
--- error_code eval
[201, 200, 409, 200, 404]
--- response_body_like eval
[
    qr/\A\{"reference":"pay-b1","subscriber":"sub_2","points":500000,/,
    qr/\A\{"id":"sub_2",.*"status":"closed",.*"paid":500000,/,
    qr/\A\Q{"error":{"message":"subscriber sub_2 is closed","type":"invalid_request_error","param":null,"code":"subscriber_closed"}}\E\n\z/,
    qr/\A\{"reference":"pay-b1","subscriber":"sub_2","points":500000,/,
    qr/\A\Q{"error":{"message":"no subscriber \"sub_999\"","type":"invalid_request_error","param":null,"code":"subscriber_not_found"}}\E\n\z/,
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 11: yuan are converted at the configured rate
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store;
    token_meter_points_per_yuan 100;
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
POST /admin/subscribers/sub_1/purchases
{"yuan":"1.23","reference":"pay-5"}
--- error_code: 201
--- response_body_like eval
qr/\A\{"reference":"pay-5","subscriber":"sub_1","points":123,"yuan":"1\.23",.*"paid":3751124,/
--- no_error_log
[error]
[alert]
[crit]



=== TEST 12: an amount in yuan that is not a whole number of points
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store;
    token_meter_points_per_yuan 1;
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    "POST /admin/subscribers/sub_1/purchases\n"
    . '{"yuan":"0.50","reference":"pay-6"}',
    "POST /admin/subscribers/sub_1/purchases\n"
    . '{"yuan":"3.00","reference":"pay-6"}',
]
--- error_code eval
[400, 201]
--- response_body_like eval
[
    qr/\A\Q{"error":{"message":"\"yuan\" must be a positive amount with two decimals, like \"10.00\"","type":"invalid_request_error","param":null,"code":"invalid_amount"}}\E\n\z/,
    qr/\A\{"reference":"pay-6","subscriber":"sub_1","points":3,"yuan":"3\.00",.*"paid":3751127,/,
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 13: after a restart a replay still answers the first answer
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
POST /admin/subscribers/sub_1/purchases
{"yuan":"10.00","reference":"pay-1"}
--- response_body_like eval
::json_re('{"reference":"pay-1","subscriber":"sub_1","points":2500000,'
    . '"yuan":"10.00","created_at":"<time>","balance":{"paid":2500000,'
    . '"grants":[{"kind":"trial","points":25000000,"expires_at":"<time>"}],'
    . '"reserved":0,"available":27500000}}')
--- no_error_log
credited
[error]
[alert]
[crit]
