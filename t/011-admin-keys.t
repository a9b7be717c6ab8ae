# Admin API: issuing, importing, listing and revoking API keys (key
# rotation), and the errors of those calls.  The blocks run in order on
# one store.
#
# Keys used here and their ids (key_ and the first 16 hex digits of the
# key's SHA-256):
#
#     sk-tm-test-alice-000000000000000001   key_2e52d10ed9037788
#     sk-tm-test-alice-000000000000000002   key_1735f38c96c16c9f
#     sk-tm-test-bob-00000000000000000001   key_5ce43e9e5c2521ae

use t::TokenMeter;
use t::TokenMeter::Expect;
use t::TokenMeter::Admin;

admin_defaults();

no_shuffle();
run_tests();

__DATA__

=== TEST 1: two subscribers, each with an imported key
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    "POST /admin/subscribers\n"
    . '{"msisdn":"+8613800138000",'
    . '"api_key":"sk-tm-test-alice-000000000000000001"}',
    "POST /admin/subscribers\n"
    . '{"msisdn":"+8613900139000",'
    . '"api_key":"sk-tm-test-bob-00000000000000000001"}',
]
--- error_code eval
[201, 201]
--- response_body_like eval
[
    qr/\A\{"id":"sub_1",.*"key_id":"key_2e52d10ed9037788"\}\n\z/,
    qr/\A\{"id":"sub_2",.*"key_id":"key_5ce43e9e5c2521ae"\}\n\z/,
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: a second key, imported
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
POST /admin/subscribers/sub_1/keys
{"api_key":"sk-tm-test-alice-000000000000000002"}
--- error_code: 201
--- response_headers
Content-Type: application/json
--- response_body_like eval
::json_re('{"subscriber":"sub_1","key_id":"key_1735f38c96c16c9f",'
    . '"api_key":"sk-tm-test-alice-000000000000000002",'
    . '"created_at":"<time>"}')
--- error_log
token meter admin: issued key key_1735f38c96c16c9f to sub_1
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: a new random key, with and without an empty JSON body
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    "POST /admin/subscribers/sub_2/keys",
    "POST /admin/subscribers/sub_2/keys\n{}",
]
--- error_code eval
[201, 201]
--- response_body_like eval
[
    (::json_re('{"subscriber":"sub_2","key_id":"<key_id>","api_key":"<key>",'
               . '"created_at":"<time>"}')) x 2
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 4: the subscriber lists both keys, in key id order
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
GET /admin/subscribers/sub_1
--- response_body_like eval
::json_re('{"id":"sub_1","msisdn":"+8613800138000","status":"active",'
    . '"created_at":"<time>","activated_at":"<time>","closed_at":null,'
    . '"keys":[{"key_id":"key_1735f38c96c16c9f","created_at":"<time>",'
    . '"revoked_at":null},{"key_id":"key_2e52d10ed9037788",'
    . '"created_at":"<time>","revoked_at":null}],"expired_points":0,'
    . '"balance":{"paid":0,"grants":[{"kind":"trial","points":25000000,'
    . '"expires_at":"<time>"}],"reserved":0,"available":25000000}}')
--- no_error_log
[error]
[alert]
[crit]



=== TEST 5: keys that cannot be added
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    # already a key of this subscriber
    "POST /admin/subscribers/sub_1/keys\n"
    . '{"api_key":"sk-tm-test-alice-000000000000000001"}',
    # already a key of another subscriber
    "POST /admin/subscribers/sub_1/keys\n"
    . '{"api_key":"sk-tm-test-bob-00000000000000000001"}',
    "POST /admin/subscribers/sub_1/keys\n" . '{"api_key":"too-short"}',
    "POST /admin/subscribers/sub_1/keys\n" . '{"api_key":""}',
    "POST /admin/subscribers/sub_999/keys",
]
--- error_code eval
[409, 409, 400, 400, 404]
--- response_body eval
[
    ('{"error":{"message":"this API key is in use or was revoked",'
     . '"type":"invalid_request_error","param":null,'
     . '"code":"key_exists"}}' . "\n") x 2,
    ('{"error":{"message":"\"api_key\" must be 20 to 128 letters, digits,'
     . ' \"-\", \"_\" or \".\"","type":"invalid_request_error",'
     . '"param":null,"code":"invalid_api_key"}}' . "\n") x 2,
    '{"error":{"message":"no subscriber \"sub_999\"",'
    . '"type":"invalid_request_error","param":null,'
    . '"code":"subscriber_not_found"}}' . "\n",
]
--- no_error_log
issued key
[error]
[alert]
[crit]



=== TEST 6: revoke the first key
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
DELETE /admin/subscribers/sub_1/keys/key_2e52d10ed9037788
--- response_body_like eval
::json_re('{"subscriber":"sub_1","key_id":"key_2e52d10ed9037788",'
    . '"revoked_at":"<time>"}')
--- error_log
token meter admin: revoked key key_2e52d10ed9037788 of sub_1
--- no_error_log
[error]
[alert]
[crit]



=== TEST 7: revoking again answers the same time, even a second later
--- config
    location /admin/ {
        token_meter_admin;
        token_meter_admin_key sha256:$TEST_NGINX_ADMIN_HASH;
    }

    location = /revoke-twice {
        echo_subrequest DELETE
            /admin/subscribers/sub_1/keys/key_2e52d10ed9037788;
        echo_sleep 1.1;
        echo_subrequest DELETE
            /admin/subscribers/sub_1/keys/key_2e52d10ed9037788;
    }
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
GET /revoke-twice
--- response_body_like eval
# \1: the second answer is the first one, byte for byte
qr/\A(\{"subscriber":"sub_1","key_id":"key_2e52d10ed9037788","revoked_at":"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"\}\n)\1\z/
--- no_error_log
[error]
[alert]
[crit]



=== TEST 8: keys that cannot be revoked
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    "DELETE /admin/subscribers/sub_1/keys/key_0000000000000000",
    "DELETE /admin/subscribers/sub_1/keys/nonsense",
    # bob's key is not one of alice's
    "DELETE /admin/subscribers/sub_1/keys/key_5ce43e9e5c2521ae",
    "DELETE /admin/subscribers/sub_999/keys/key_2e52d10ed9037788",
]
--- error_code eval
[404, 404, 404, 404]
--- response_body eval
[
    (map {
        '{"error":{"message":"subscriber sub_1 has no key \"' . $_ . '\"",'
        . '"type":"invalid_request_error","param":null,'
        . '"code":"key_not_found"}}' . "\n"
    } qw(key_0000000000000000 nonsense key_5ce43e9e5c2521ae)),
    '{"error":{"message":"no subscriber \"sub_999\"",'
    . '"type":"invalid_request_error","param":null,'
    . '"code":"subscriber_not_found"}}' . "\n",
]
--- no_error_log
revoked key
[error]
[alert]
[crit]



=== TEST 9: after the rotation the old key shows when it was revoked
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
GET /admin/subscribers/sub_1
--- response_body_like eval
::json_re('{"id":"sub_1","msisdn":"+8613800138000","status":"active",'
    . '"created_at":"<time>","activated_at":"<time>","closed_at":null,'
    . '"keys":[{"key_id":"key_1735f38c96c16c9f","created_at":"<time>",'
    . '"revoked_at":null},{"key_id":"key_2e52d10ed9037788",'
    . '"created_at":"<time>","revoked_at":"<time>"}],"expired_points":0,'
    . '"balance":{"paid":0,"grants":[{"kind":"trial","points":25000000,'
    . '"expires_at":"<time>"}],"reserved":0,"available":25000000}}')
--- no_error_log
[error]
[alert]
[crit]



=== TEST 10: a revoked key cannot be imported again, by anyone
A key is revoked because it may have leaked: whoever holds it must not
get it back into service under another account.
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    map({ "POST /admin/subscribers/$_/keys\n"
          . '{"api_key":"sk-tm-test-alice-000000000000000001"}' }
        qw(sub_1 sub_2)),
    "POST /admin/subscribers\n"
    . '{"msisdn":"+8613700137000",'
    . '"api_key":"sk-tm-test-alice-000000000000000001"}',
    "GET /admin/subscribers?msisdn=%2B8613700137000",
    "GET /admin/subscribers/sub_1",
]
--- error_code eval
[409, 409, 409, 404, 200]
--- response_body_like eval
[
    (::json_re('{"error":{"message":"this API key is in use or was revoked",'
               . '"type":"invalid_request_error","param":null,'
               . '"code":"key_exists"}}')) x 3,
    qr/"code":"subscriber_not_found"/,
    # still revoked, and still once
    ::json_re('{"id":"sub_1","msisdn":"+8613800138000","status":"active",'
        . '"created_at":"<time>","activated_at":"<time>","closed_at":null,'
        . '"keys":[{"key_id":"key_1735f38c96c16c9f","created_at":"<time>",'
        . '"revoked_at":null},{"key_id":"key_2e52d10ed9037788",'
        . '"created_at":"<time>","revoked_at":"<time>"}],"expired_points":0,'
        . '"balance":{"paid":0,"grants":[{"kind":"trial","points":25000000,'
        . '"expires_at":"<time>"}],"reserved":0,"available":25000000}}'),
]
--- no_error_log
issued key
created subscriber
[error]
[alert]
[crit]



=== TEST 11: closing a subscriber revokes all its keys
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
DELETE /admin/subscribers/sub_2
--- response_body_like eval
::json_re('{"id":"sub_2","msisdn":"+8613900139000","status":"closed",'
    . '"created_at":"<time>","activated_at":"<time>","closed_at":"<time>",'
    . '"keys":[{"key_id":"<key_id>","created_at":"<time>",'
    . '"revoked_at":"<time>"},{"key_id":"<key_id>","created_at":"<time>",'
    . '"revoked_at":"<time>"},{"key_id":"<key_id>","created_at":"<time>",'
    . '"revoked_at":"<time>"}],"expired_points":0,'
    . '"balance":{"paid":0,"grants":[{"kind":"trial","points":25000000,'
    . '"expires_at":"<time>"}],"reserved":0,"available":25000000}}')
--- no_error_log
[error]
[alert]
[crit]



=== TEST 12: a closed subscriber gets no new key; its keys stay revoked
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    "POST /admin/subscribers/sub_2/keys",
    "DELETE /admin/subscribers/sub_2/keys/key_5ce43e9e5c2521ae",
]
--- error_code eval
[409, 200]
--- response_body_like eval
[
    qr/\A\Q{"error":{"message":"subscriber sub_2 is closed","type":"invalid_request_error","param":null,"code":"subscriber_closed"}}\E\n\z/,
    ::json_re('{"subscriber":"sub_2","key_id":"key_5ce43e9e5c2521ae",'
              . '"revoked_at":"<time>"}'),
]
--- no_error_log
issued key
[error]
[alert]
[crit]



=== TEST 13: the keys of a closed subscriber are never free again
Closing revoked them; the MSISDN is free, the keys are not.
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    "POST /admin/subscribers\n"
    . '{"msisdn":"+8613900139000",'
    . '"api_key":"sk-tm-test-bob-00000000000000000001"}',
    "POST /admin/subscribers/sub_1/keys\n"
    . '{"api_key":"sk-tm-test-bob-00000000000000000001"}',
    "GET /admin/subscribers?msisdn=%2B8613900139000",
    # the refused creation used no subscriber id, and the MSISDN is free
    "POST /admin/subscribers\n" . '{"msisdn":"+8613900139000"}',
]
--- error_code eval
[409, 409, 404, 201]
--- response_body_like eval
[
    (::json_re('{"error":{"message":"this API key is in use or was revoked",'
               . '"type":"invalid_request_error","param":null,'
               . '"code":"key_exists"}}')) x 2,
    qr/"code":"subscriber_not_found"/,
    qr/\A\{"id":"sub_3","msisdn":"\+8613900139000",.*"keys":\[\{"key_id":"key_[0-9a-f]{16}","created_at":"[^"]+","revoked_at":null\}\],/,
]
--- no_error_log
issued key key_5ce43e9e5c2521ae
[error]
[alert]
[crit]



=== TEST 14: the keys survive a restart
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store;
    # a new nginx, with a different configuration
    token_meter_points_per_yuan 100;
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    "GET /admin/subscribers/sub_1",
    # revoked keys stay revoked across the restart
    map({ "POST /admin/subscribers/sub_1/keys\n" . qq({"api_key":"$_"}) }
        qw(sk-tm-test-alice-000000000000000001
           sk-tm-test-bob-00000000000000000001)),
]
--- error_code eval
[200, 409, 409]
--- response_body_like eval
[
    qr/"keys":\[\{"key_id":"key_1735f38c96c16c9f","created_at":"[^"]+","revoked_at":null\},\{"key_id":"key_2e52d10ed9037788","created_at":"[^"]+","revoked_at":"\d{4}-[^"]+"\}\]/,
    (qr/"code":"key_exists"/) x 2,
]
--- no_error_log
issued key
[error]
[alert]
[crit]
