# The trial grant: given when a subscriber is created, once per MSISDN
# ever (closing and re-creating does not earn another), gone when it
# expires (the subscriber then shows the unused points as expired_points),
# and not given at all with "token_meter_trial 0".  The blocks run in
# order on one store; the trial lasts 2 seconds here, 20 under valgrind,
# which takes longer than that to restart nginx between the blocks.

use t::TokenMeter;
use t::TokenMeter::Expect;
use t::TokenMeter::Admin;

our $Trial = $ENV{TEST_NGINX_USE_VALGRIND} ? 20 : 2;

admin_defaults("    token_meter_trial 1000 ${Trial}s;\n");

no_shuffle();
run_tests();

__DATA__

=== TEST 1: two subscribers get the trial; one buys points too
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    "POST /admin/subscribers\n" . '{"msisdn":"+8613800138000"}',
    "POST /admin/subscribers\n" . '{"msisdn":"+8613700137000"}',
    "POST /admin/subscribers/sub_1/purchases\n"
    . '{"points":500,"reference":"trial-pay-1"}',
]
--- error_code eval
[201, 201, 201]
--- response_body_like eval
[
    qr/\A\{"id":"sub_1",.*"expired_points":0,"balance":\{"paid":0,"grants":\[\{"kind":"trial","points":1000,"expires_at":"[^"]+"\}\],"reserved":0,"available":1000\},/,
    qr/\A\{"id":"sub_2",.*"expired_points":0,"balance":\{"paid":0,"grants":\[\{"kind":"trial","points":1000,"expires_at":"[^"]+"\}\],"reserved":0,"available":1000\},/,
    qr/"balance":\{"paid":500,"grants":\[\{"kind":"trial","points":1000,"expires_at":"[^"]+"\}\],"reserved":0,"available":1500\}\}\n\z/,
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: a closed subscriber keeps its grant and its points
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
DELETE /admin/subscribers/sub_1
--- response_body_like eval
qr/\A\{"id":"sub_1","msisdn":"\+8613800138000","status":"closed",.*"expired_points":0,"balance":\{"paid":500,"grants":\[\{"kind":"trial","points":1000,"expires_at":"[^"]+"\}\],"reserved":0,"available":1500\}\}\n\z/
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: the same MSISDN again: a new subscriber without a trial
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
POST /admin/subscribers
{"msisdn":"+8613800138000"}
--- error_code: 201
--- response_body_like eval
::json_re('{"id":"sub_3","msisdn":"+8613800138000","status":"active",'
    . '"created_at":"<time>","activated_at":"<time>","closed_at":null,'
    . '"keys":[{"key_id":"<key_id>","created_at":"<time>",'
    . '"revoked_at":null}],"expired_points":0,"balance":{"paid":0,'
    . '"grants":[],"reserved":0,"available":0},'
    . '"api_key":"<key>","key_id":"<key_id>"}')
--- no_error_log
[error]
[alert]
[crit]



=== TEST 4: and again, after a restart: still no second trial
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    "DELETE /admin/subscribers/sub_3",
    "POST /admin/subscribers\n" . '{"msisdn":"+8613800138000"}',
]
--- error_code eval
[200, 201]
--- response_body_like eval
[
    qr/\A\{"id":"sub_3",.*"status":"closed",/,
    qr/\A\{"id":"sub_4",.*"expired_points":0,"balance":\{"paid":0,"grants":\[\],"reserved":0,"available":0\},/,
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 5: after expiry the trial is gone and counted as expired
--- init
# the trials of TEST 1 last $main::Trial seconds
sleep $main::Trial + 1;
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    "GET /admin/subscribers/sub_2",
    "GET /admin/subscribers/sub_1",
]
--- response_body_like eval
[
    qr/\A\{"id":"sub_2",.*"expired_points":1000,"balance":\{"paid":0,"grants":\[\],"reserved":0,"available":0\}\}\n\z/,
    # paid points do not expire
    qr/\A\{"id":"sub_1",.*"expired_points":1000,"balance":\{"paid":500,"grants":\[\],"reserved":0,"available":500\}\}\n\z/,
]
--- error_code eval
[200, 200]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 6: with "token_meter_trial 0" a new subscriber gets nothing
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store;
    token_meter_trial 0;
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
POST /admin/subscribers
{"msisdn":"+8613600136000"}
--- error_code: 201
--- response_body_like eval
qr/\A\{"id":"sub_5","msisdn":"\+8613600136000",.*"expired_points":0,"balance":\{"paid":0,"grants":\[\],"reserved":0,"available":0\},/
--- no_error_log
[error]
[alert]
[crit]



=== TEST 7: an MSISDN that never had a trial gets one when created again
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store;
    token_meter_trial 5000 1d;
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    "DELETE /admin/subscribers/sub_5",
    "POST /admin/subscribers\n" . '{"msisdn":"+8613600136000"}',
    # while this one had its trial long ago
    "DELETE /admin/subscribers/sub_4",
    "POST /admin/subscribers\n" . '{"msisdn":"+8613800138000"}',
]
--- error_code eval
[200, 201, 200, 201]
--- response_body_like eval
[
    qr/\A\{"id":"sub_5",.*"status":"closed",/,
    qr/\A\{"id":"sub_6",.*"expired_points":0,"balance":\{"paid":0,"grants":\[\{"kind":"trial","points":5000,"expires_at":"[^"]+"\}\],"reserved":0,"available":5000\},/,
    qr/\A\{"id":"sub_4",.*"status":"closed",/,
    qr/\A\{"id":"sub_7",.*"expired_points":0,"balance":\{"paid":0,"grants":\[\],"reserved":0,"available":0\},/,
]
--- no_error_log
[error]
[alert]
[crit]
