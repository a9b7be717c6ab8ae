# Admin API at the HTTP level: the admin key, unknown routes, wrong
# methods, bodies that are not JSON objects or are too large, and the
# connection after an error.

use t::TokenMeter;
use t::TokenMeter::Expect;
use t::TokenMeter::Admin;

admin_defaults();

no_shuffle();
run_tests();

__DATA__

=== TEST 1: no admin key
--- request
GET /admin/subscribers/sub_1
--- error_code: 401
--- response_headers
WWW-Authenticate: Bearer
Content-Type: application/json
--- response_body
{"error":{"message":"missing or wrong admin key","type":"invalid_request_error","param":null,"code":"invalid_admin_key"}}
--- error_log
token meter admin: missing or wrong admin key
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: a wrong admin key
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7e
--- request
POST /admin/subscribers
{"msisdn":"+8613800138000"}
--- error_code: 401
--- response_headers
WWW-Authenticate: Bearer
--- response_body
{"error":{"message":"missing or wrong admin key","type":"invalid_request_error","param":null,"code":"invalid_admin_key"}}
--- error_log
token meter admin: missing or wrong admin key
--- no_error_log
created subscriber
[error]
[alert]
[crit]



=== TEST 3: the key must come as a bearer token, exactly
--- more_headers eval
[
    "Authorization: Basic dG0tdGVzdC1hZG1pbi1rZXktNmMxZjBlOWIyYTdk",
    "Authorization: Bearer",
    "Authorization: Bearer ",
    "Authorization: tm-test-admin-key-6c1f0e9b2a7d",
    "Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7",
    "Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7dd",
    "X-Api-Key: tm-test-admin-key-6c1f0e9b2a7d",
]
--- request eval
[("GET /admin/subscribers/sub_1") x 7]
--- error_code eval
[(401) x 7]
--- response_body eval
[
    ('{"error":{"message":"missing or wrong admin key",'
     . '"type":"invalid_request_error","param":null,'
     . '"code":"invalid_admin_key"}}' . "\n") x 7
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 4: the scheme is case-insensitive; spaces before the key are skipped
--- more_headers eval
[
    "Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d",
    "Authorization: bearer tm-test-admin-key-6c1f0e9b2a7d",
    "Authorization: BEARER   tm-test-admin-key-6c1f0e9b2a7d",
]
--- request eval
[("GET /admin/subscribers/sub_1") x 3]
--- error_code eval
[(404) x 3]
--- response_body eval
[
    ('{"error":{"message":"no subscriber \"sub_1\"",'
     . '"type":"invalid_request_error","param":null,'
     . '"code":"subscriber_not_found"}}' . "\n") x 3
]
--- no_error_log
wrong admin key
[error]
[alert]
[crit]



=== TEST 5: the key is checked before the route: no route is revealed
--- request eval
["GET /admin/", "GET /admin/nothing", "PUT /admin/subscribers"]
--- error_code eval
[401, 401, 401]
--- response_body_like eval
[(qr/"code":"invalid_admin_key"/) x 3]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 6: unknown routes
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    "GET /admin/",
    "GET /admin/nothing",
    "GET /admin/subscriber",
    "GET /admin/subscribers/sub_1/other",
    "POST /admin/subscribers/sub_1/keys/key_2e52d10ed9037788/more",
    "GET /admin/subscribers/sub_1/keys/key_2e52d10ed9037788/x/y",
]
--- error_code eval
[(404) x 6]
--- response_body eval
[
    map {
        '{"error":{"message":"no admin route for \"' . $_ . '\"",'
        . '"type":"invalid_request_error","param":null,'
        . '"code":"not_found"}}' . "\n"
    } qw(/admin/ /admin/nothing /admin/subscriber
         /admin/subscribers/sub_1/other
         /admin/subscribers/sub_1/keys/key_2e52d10ed9037788/more
         /admin/subscribers/sub_1/keys/key_2e52d10ed9037788/x/y)
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 7: methods a route does not take: 405 and the Allow header
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    "PUT /admin/subscribers\n{}",
    "DELETE /admin/subscribers",
    "POST /admin/subscribers/sub_1\n{}",
    "PUT /admin/subscribers/sub_1\n{}",
    "GET /admin/subscribers/sub_1/keys",
    "PATCH /admin/subscribers/sub_1/keys/key_2e52d10ed9037788\n{}",
    "GET /admin/subscribers/sub_1/purchases",
    "DELETE /admin/subscribers/sub_1/purchases",
]
--- error_code eval
[(405) x 8]
--- response_headers eval
[
    ("Allow: GET, POST\nContent-Type: application/json") x 2,
    ("Allow: GET, PATCH, DELETE\nContent-Type: application/json") x 2,
    "Allow: POST\nContent-Type: application/json",
    "Allow: DELETE\nContent-Type: application/json",
    ("Allow: POST\nContent-Type: application/json") x 2,
]
--- response_body eval
[
    map {
        '{"error":{"message":"method ' . $_ . ' is not allowed here",'
        . '"type":"invalid_request_error","param":null,'
        . '"code":"method_not_allowed"}}' . "\n"
    } qw(PUT DELETE POST PUT GET PATCH GET DELETE)
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 8: the admin API answers under any location prefix
--- config
    location /ops/token-meter/ {
        token_meter_admin;
        token_meter_admin_key sha256:$TEST_NGINX_ADMIN_HASH;
    }
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    "POST /ops/token-meter/subscribers\n" . '{"msisdn":"+8613800138000"}',
    "GET /ops/token-meter/subscribers/sub_1/",
    "GET /ops/token-meter/admin/subscribers/sub_1",
]
--- error_code eval
[201, 200, 404]
--- response_body_like eval
[
    qr/\A\{"id":"sub_1","msisdn":"\+8613800138000",/,
    qr/\A\{"id":"sub_1","msisdn":"\+8613800138000",/,
    qr/"code":"not_found"/,
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 9: bodies that are not JSON objects
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    "POST /admin/subscribers\nmsisdn=+8613900139000",
    "POST /admin/subscribers\n" . '{"msisdn":"+8613900139000"',
    "POST /admin/subscribers\n" . '["+8613900139000"]',
    "POST /admin/subscribers\n" . '"+8613900139000"',
    "POST /admin/subscribers\nnull",
    # a name given twice is refused, not guessed at
    "POST /admin/subscribers\n"
    . '{"msisdn":"+8613900139000","msisdn":"+8613900139001"}',
    "POST /admin/subscribers/sub_1/purchases\n"
    . '{"yuan":"1.00","reference":"x"} trailing',
    "PATCH /admin/subscribers/sub_1\nsuspended",
]
--- error_code eval
[(400) x 8]
--- response_body eval
[
    ('{"error":{"message":"request body is not a JSON object",'
     . '"type":"invalid_request_error","param":null,'
     . '"code":"invalid_json"}}' . "\n") x 8
]
--- no_error_log
created subscriber
credited
is now
[error]
[alert]
[crit]



=== TEST 10: a body larger than client_body_buffer_size, announced
--- config
    location /admin/ {
        client_body_buffer_size 1k;
        token_meter_admin;
        token_meter_admin_key sha256:$TEST_NGINX_ADMIN_HASH;
    }
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
"POST /admin/subscribers\n"
. '{"msisdn":"+8613900139000","padding":"' . ('x' x 1100) . '"}'
--- error_code: 413
--- response_body
{"error":{"message":"request body is larger than 1024 bytes","type":"invalid_request_error","param":null,"code":"body_too_large"}}
--- no_error_log
created subscriber
[error]
[alert]
[crit]



=== TEST 11: a body larger than client_body_buffer_size, chunked
--- config
    location /admin/ {
        client_body_buffer_size 1k;
        token_meter_admin;
        token_meter_admin_key sha256:$TEST_NGINX_ADMIN_HASH;
    }
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
Transfer-Encoding: chunked
--- request eval
my $body = '{"msisdn":"+8613900139000","padding":"' . ('x' x 1100) . '"}';
"POST /admin/subscribers\n"
. sprintf("%x\r\n%s\r\n0\r\n\r\n", length $body, $body)
--- error_code: 413
--- response_body
{"error":{"message":"request body is larger than 1024 bytes","type":"invalid_request_error","param":null,"code":"body_too_large"}}
--- no_error_log
created subscriber
[error]
[alert]
[crit]



=== TEST 12: a body just within client_body_buffer_size is read
--- config
    location /admin/ {
        client_body_buffer_size 1k;
        token_meter_admin;
        token_meter_admin_key sha256:$TEST_NGINX_ADMIN_HASH;
    }
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
my $head = '{"msisdn":"+8613900139001","padding":"';
"POST /admin/subscribers\n" . $head . ('x' x (1024 - length($head) - 2)) . '"}'
--- error_code: 201
--- response_body_like eval
qr/\A\{"id":"sub_\d+","msisdn":"\+8613900139001",/
--- no_error_log
[error]
[alert]
[crit]



=== TEST 13: after a refused request with a body, the connection goes on
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- pipelined_requests eval
[
    # 405: the body was never read, and must not be taken for a request
    "POST /admin/subscribers/sub_1\n" . '{"status":"active"}',
    "GET /admin/subscribers/sub_1",
    # 404 for the route
    "POST /admin/nothing\n" . '{"msisdn":"+8613900139009"}',
    "GET /admin/subscribers/sub_1",
]
--- error_code eval
[405, 200, 404, 200]
--- response_body_like eval
[
    qr/"code":"method_not_allowed"/,
    qr/\A\{"id":"sub_1",/,
    qr/"code":"not_found"/,
    qr/\A\{"id":"sub_1",/,
]
--- no_error_log
client sent invalid
[error]
[alert]
[crit]



=== TEST 14: after a wrong admin key with a body, the connection goes on
--- more_headers
Authorization: Bearer wrong-admin-key-0000000000000
--- pipelined_requests eval
[
    "POST /admin/subscribers\n" . '{"msisdn":"+8613900139009"}',
    "GET /admin/subscribers/sub_1",
]
--- error_code eval
[401, 401]
--- response_body_like eval
[
    qr/"code":"invalid_admin_key"/,
    qr/"code":"invalid_admin_key"/,
]
--- no_error_log
client sent invalid
[error]
[alert]
[crit]
