# Admin API: creating, finding, suspending and closing subscribers, and
# every error of those calls.  The blocks run in order on one store.

use t::TokenMeter;
use t::TokenMeter::Expect;
use t::TokenMeter::Admin;

admin_defaults();

no_shuffle();
run_tests();

__DATA__

=== TEST 1: create a subscriber with an imported key
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
POST /admin/subscribers
{"msisdn":"+8613800138000","api_key":"sk-tm-test-alice-000000000000000001"}
--- error_code: 201
--- response_headers
Content-Type: application/json
--- response_body_like eval
::json_re('{"id":"sub_1","msisdn":"+8613800138000","status":"active",'
    . '"created_at":"<time>","activated_at":"<time>","closed_at":null,'
    . '"keys":[{"key_id":"key_2e52d10ed9037788","created_at":"<time>",'
    . '"revoked_at":null}],"expired_points":0,"balance":{"paid":0,'
    . '"grants":[{"kind":"trial","points":25000000,"expires_at":"<time>"}],'
    . '"reserved":0,"available":25000000},'
    . '"api_key":"sk-tm-test-alice-000000000000000001",'
    . '"key_id":"key_2e52d10ed9037788"}')
--- error_log
token meter admin: created subscriber sub_1 for "+8613800138000"
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: create a subscriber with a new random key
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
POST /admin/subscribers
{"msisdn":"+8613900139000"}
--- error_code: 201
--- response_body_like eval
::json_re('{"id":"sub_2","msisdn":"+8613900139000","status":"active",'
    . '"created_at":"<time>","activated_at":"<time>","closed_at":null,'
    . '"keys":[{"key_id":"<key_id>","created_at":"<time>",'
    . '"revoked_at":null}],"expired_points":0,"balance":{"paid":0,'
    . '"grants":[{"kind":"trial","points":25000000,"expires_at":"<time>"}],'
    . '"reserved":0,"available":25000000},'
    . '"api_key":"<key>","key_id":"<key_id>"}')
--- error_log
token meter admin: created subscriber sub_2 for "+8613900139000"
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: an MSISDN that already has an open subscriber
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
POST /admin/subscribers
{"msisdn":"+8613800138000"}
--- error_code: 409
--- response_body
{"error":{"message":"\"+8613800138000\" already has a subscriber","type":"invalid_request_error","param":null,"code":"msisdn_exists"}}
--- no_error_log
created subscriber
[error]
[alert]
[crit]



=== TEST 4: MSISDNs that are not E.164, and a missing one
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    # no plus sign
    "POST /admin/subscribers\n" . '{"msisdn":"8613800138001"}',
    # country code starting with 0
    "POST /admin/subscribers\n" . '{"msisdn":"+0613800138001"}',
    # 6 digits
    "POST /admin/subscribers\n" . '{"msisdn":"+123456"}',
    # 16 digits
    "POST /admin/subscribers\n" . '{"msisdn":"+1234567890123456"}',
    "POST /admin/subscribers\n" . '{"msisdn":"+86 13800138001"}',
    "POST /admin/subscribers\n" . '{"msisdn":"+86-13800138001"}',
    "POST /admin/subscribers\n" . '{"msisdn":""}',
    "POST /admin/subscribers\n" . '{"msisdn":8613800138001}',
    "POST /admin/subscribers\n" . '{"msisdn":null}',
    "POST /admin/subscribers\n" . '{}',
]
--- error_code eval
[(400) x 10]
--- response_body eval
[
    ('{"error":{"message":"\"msisdn\" must be in E.164 form, like'
     . ' \"+8613800138000\"","type":"invalid_request_error","param":null,'
     . '"code":"invalid_msisdn"}}' . "\n") x 7,
    ('{"error":{"message":"\"msisdn\" is required",'
     . '"type":"invalid_request_error","param":null,'
     . '"code":"invalid_msisdn"}}' . "\n") x 3,
]
--- no_error_log
created subscriber
[error]
[alert]
[crit]



=== TEST 5: the shortest and the longest E.164 numbers
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    "POST /admin/subscribers\n" . '{"msisdn":"+1234567"}',
    "POST /admin/subscribers\n" . '{"msisdn":"+123456789012345"}',
]
--- error_code eval
[201, 201]
--- response_body_like eval
[
    qr/\A\{"id":"sub_3","msisdn":"\+1234567","status":"active",/,
    qr/\A\{"id":"sub_4","msisdn":"\+123456789012345","status":"active",/,
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 6: imported keys that are too short, too long or hold other characters
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    # 19 characters
    "POST /admin/subscribers\n"
    . '{"msisdn":"+8613700137000","api_key":"sk-tm-0123456789abc"}',
    # 129 characters
    "POST /admin/subscribers\n"
    . '{"msisdn":"+8613700137000","api_key":"' . ('k' x 129) . '"}',
    "POST /admin/subscribers\n"
    . '{"msisdn":"+8613700137000","api_key":"sk-tm-0123456789 abcdef"}',
    "POST /admin/subscribers\n"
    . '{"msisdn":"+8613700137000","api_key":"sk-tm-0123456789/abcdef"}',
    "POST /admin/subscribers\n"
    . '{"msisdn":"+8613700137000","api_key":"sk-tm-0123456789\u00e9abcdef"}',
    "POST /admin/subscribers\n"
    . '{"msisdn":"+8613700137000","api_key":12345}',
    "POST /admin/subscribers\n"
    . '{"msisdn":"+8613700137000","api_key":null}',
    "GET /admin/subscribers?msisdn=%2B8613700137000",
]
--- error_code eval
[(400) x 7, 404]
--- response_body eval
[
    ('{"error":{"message":"\"api_key\" must be 20 to 128 letters, digits,'
     . ' \"-\", \"_\" or \".\"","type":"invalid_request_error",'
     . '"param":null,"code":"invalid_api_key"}}' . "\n") x 7,
    '{"error":{"message":"no subscriber for \"+8613700137000\"",'
    . '"type":"invalid_request_error","param":null,'
    . '"code":"subscriber_not_found"}}' . "\n",
]
--- no_error_log
created subscriber
[error]
[alert]
[crit]



=== TEST 7: imported keys of 20 and of 128 characters are taken as they are
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    "POST /admin/subscribers\n"
    . '{"msisdn":"+8613700137001","api_key":"sk-tm-0123456789.a_Z"}',
    "POST /admin/subscribers\n"
    . '{"msisdn":"+8613700137002","api_key":"' . ('k' x 128) . '"}',
]
--- error_code eval
[201, 201]
--- response_body_like eval
[
    ::json_re('{"id":"sub_5","msisdn":"+8613700137001","status":"active",'
        . '"created_at":"<time>","activated_at":"<time>","closed_at":null,'
        . '"keys":[{"key_id":"' . ::key_id('sk-tm-0123456789.a_Z') . '",'
        . '"created_at":"<time>","revoked_at":null}],"expired_points":0,'
        . '"balance":{"paid":0,"grants":[{"kind":"trial","points":25000000,'
        . '"expires_at":"<time>"}],"reserved":0,"available":25000000},'
        . '"api_key":"sk-tm-0123456789.a_Z",'
        . '"key_id":"' . ::key_id('sk-tm-0123456789.a_Z') . '"}'),
    qr/\A\{"id":"sub_6",.*"api_key":"k{128}","key_id":"\Q${\ ::key_id('k' x 128)}\E"\}\n\z/,
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 8: a key that is in use already: nothing is created
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    "POST /admin/subscribers\n"
    . '{"msisdn":"+8613700137003",'
    . '"api_key":"sk-tm-test-alice-000000000000000001"}',
    "GET /admin/subscribers?msisdn=%2B8613700137003",
    # the aborted creation used no subscriber id
    "POST /admin/subscribers\n" . '{"msisdn":"+8613700137003"}',
]
--- error_code eval
[409, 404, 201]
--- response_body_like eval
[
    qr/\A\Q{"error":{"message":"this API key is in use or was revoked","type":"invalid_request_error","param":null,"code":"key_exists"}}\E\n\z/,
    qr/"code":"subscriber_not_found"/,
    qr/\A\{"id":"sub_7","msisdn":"\+8613700137003",/,
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 9: get a subscriber by id
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
GET /admin/subscribers/sub_1
--- response_headers
Content-Type: application/json
--- response_body_like eval
::json_re('{"id":"sub_1","msisdn":"+8613800138000","status":"active",'
    . '"created_at":"<time>","activated_at":"<time>","closed_at":null,'
    . '"keys":[{"key_id":"key_2e52d10ed9037788","created_at":"<time>",'
    . '"revoked_at":null}],"expired_points":0,"balance":{"paid":0,'
    . '"grants":[{"kind":"trial","points":25000000,"expires_at":"<time>"}],'
    . '"reserved":0,"available":25000000}}')
--- no_error_log
[error]
[alert]
[crit]



=== TEST 10: find a subscriber by MSISDN
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    "GET /admin/subscribers?msisdn=%2B8613800138000",
    # a literal "+" in a query string means a space, and is taken as "+"
    "GET /admin/subscribers?msisdn=+8613800138000",
    "GET /admin/subscribers?foo=1&msisdn=%2B8613800138000&bar=2",
    "GET /admin/subscribers?msisdn=%2B8613000000000",
    "GET /admin/subscribers",
    "GET /admin/subscribers?msisdn=",
    "GET /admin/subscribers?msisdn=8613800138000",
]
--- error_code eval
[200, 200, 200, 404, 400, 400, 400]
--- response_body_like eval
[
    (qr/\A\{"id":"sub_1","msisdn":"\+8613800138000",.*\}\}\n\z/) x 3,
    qr/\A\Q{"error":{"message":"no subscriber for \"+8613000000000\"","type":"invalid_request_error","param":null,"code":"subscriber_not_found"}}\E\n\z/,
    qr/\A\Q{"error":{"message":"the \"msisdn\" query parameter is required","type":"invalid_request_error","param":null,"code":"invalid_msisdn"}}\E\n\z/,
    (qr/\A\Q{"error":{"message":"\"msisdn\" must be in E.164 form, like \"+8613800138000\"","type":"invalid_request_error","param":null,"code":"invalid_msisdn"}}\E\n\z/) x 2,
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 11: subscribers that do not exist
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    "GET /admin/subscribers/sub_999",
    "GET /admin/subscribers/sub_0",
    "GET /admin/subscribers/bogus",
    # sub_1 exists; these only read like it
    "GET /admin/subscribers/sub_01",
    "GET /admin/subscribers/sub_001",
    "PATCH /admin/subscribers/sub_01\n" . '{"status":"suspended"}',
    "DELETE /admin/subscribers/sub_01",
    "PATCH /admin/subscribers/sub_999\n" . '{"status":"active"}',
    "DELETE /admin/subscribers/sub_999",
]
--- error_code eval
[(404) x 9]
--- response_body eval
[
    map {
        '{"error":{"message":"no subscriber \"' . $_ . '\"",'
        . '"type":"invalid_request_error","param":null,'
        . '"code":"subscriber_not_found"}}' . "\n"
    } qw(sub_999 sub_0 bogus sub_01 sub_001 sub_01 sub_01 sub_999 sub_999)
]
--- no_error_log
is now suspended
closed subscriber
[error]
[alert]
[crit]



=== TEST 12: suspend a subscriber
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
PATCH /admin/subscribers/sub_1
{"status":"suspended"}
--- response_body_like eval
::json_re('{"id":"sub_1","msisdn":"+8613800138000","status":"suspended",'
    . '"created_at":"<time>","activated_at":"<time>","closed_at":null,'
    . '"keys":[{"key_id":"key_2e52d10ed9037788","created_at":"<time>",'
    . '"revoked_at":null}],"expired_points":0,"balance":{"paid":0,'
    . '"grants":[{"kind":"trial","points":25000000,"expires_at":"<time>"}],'
    . '"reserved":0,"available":25000000}}')
--- error_log
token meter admin: subscriber sub_1 is now suspended
--- no_error_log
[error]
[alert]
[crit]



=== TEST 13: the suspension is stored
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
GET /admin/subscribers/sub_1
--- response_body_like eval
qr/\A\{"id":"sub_1","msisdn":"\+8613800138000","status":"suspended",/
--- no_error_log
[error]
[alert]
[crit]



=== TEST 14: a suspended subscriber can be activated again
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
PATCH /admin/subscribers/sub_1
{"status":"active"}
--- response_body_like eval
qr/\A\{"id":"sub_1","msisdn":"\+8613800138000","status":"active",/
--- error_log
token meter admin: subscriber sub_1 is now active
--- no_error_log
[error]
[alert]
[crit]



=== TEST 15: a status that cannot be set
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    "PATCH /admin/subscribers/sub_1\n" . '{"status":"closed"}',
    "PATCH /admin/subscribers/sub_1\n" . '{"status":"Active"}',
    "PATCH /admin/subscribers/sub_1\n" . '{"status":1}',
    "PATCH /admin/subscribers/sub_1\n" . '{}',
    "PATCH /admin/subscribers/sub_1",
]
--- error_code eval
[(400) x 5]
--- response_body eval
[
    ('{"error":{"message":"\"status\" must be \"active\" or \"suspended\"",'
     . '"type":"invalid_request_error","param":null,'
     . '"code":"invalid_status"}}' . "\n") x 5
]
--- no_error_log
is now
[error]
[alert]
[crit]



=== TEST 16: close a subscriber: keys revoked
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
DELETE /admin/subscribers/sub_2
--- response_body_like eval
::json_re('{"id":"sub_2","msisdn":"+8613900139000","status":"closed",'
    . '"created_at":"<time>","activated_at":"<time>",'
    . '"closed_at":"<time>","keys":[{"key_id":"<key_id>",'
    . '"created_at":"<time>","revoked_at":"<time>"}],'
    . '"expired_points":0,"balance":{"paid":0,"grants":[{"kind":"trial",'
    . '"points":25000000,"expires_at":"<time>"}],"reserved":0,'
    . '"available":25000000}}')
--- error_log
token meter admin: closed subscriber sub_2
--- no_error_log
[error]
[alert]
[crit]



=== TEST 17: the MSISDN is free; the closed subscriber can be read, not changed
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    "GET /admin/subscribers?msisdn=%2B8613900139000",
    "GET /admin/subscribers/sub_2",
    "PATCH /admin/subscribers/sub_2\n" . '{"status":"active"}',
    "PATCH /admin/subscribers/sub_2\n" . '{"status":"suspended"}',
    "DELETE /admin/subscribers/sub_2",
]
--- error_code eval
[404, 200, 409, 409, 200]
--- response_body_like eval
[
    qr/"code":"subscriber_not_found"/,
    qr/\A\{"id":"sub_2","msisdn":"\+8613900139000","status":"closed",/,
    (qr/\A\Q{"error":{"message":"subscriber sub_2 is closed","type":"invalid_request_error","param":null,"code":"subscriber_closed"}}\E\n\z/) x 2,
    qr/\A\{"id":"sub_2","msisdn":"\+8613900139000","status":"closed",/,
]
--- no_error_log
is now
[error]
[alert]
[crit]



=== TEST 18: all of it survives a restart
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store;
    # a new nginx, with a different configuration
    token_meter_points_per_yuan 100;
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    "GET /admin/subscribers/sub_1",
    "GET /admin/subscribers/sub_2",
    "GET /admin/subscribers?msisdn=%2B8613700137003",
]
--- error_code eval
[200, 200, 200]
--- response_body_like eval
[
    qr/\A\{"id":"sub_1","msisdn":"\+8613800138000","status":"active",/,
    qr/\A\{"id":"sub_2","msisdn":"\+8613900139000","status":"closed",.*"revoked_at":"\d{4}-/,
    qr/\A\{"id":"sub_7","msisdn":"\+8613700137003","status":"active",/,
]
--- no_error_log
[error]
[alert]
[crit]
