# Nothing secret is logged: not the admin key, not a wrong admin key, not
# an API key (imported, generated or unknown), at any log level, and no
# API key is passed to the model upstream.
#
# At debug level nginx itself logs every request header, so the
# Authorization and x-api-key headers show up in its "http header:" lines.
# That is nginx, not this module, and happens only when an operator asks
# for debug logs; the debug blocks below skip those lines and fail on any
# other line that holds a secret, such as "http proxy header:" lines,
# which would mean the key was sent upstream.
#
# Generated API keys start with "sk-tm-", and so do the imported ones
# used here, so "sk-tm-" finds them all.

use t::TokenMeter;
use t::TokenMeter::Expect;
use t::TokenMeter::Admin;

# Any line holding a secret, except nginx's own "http header:" lines.
our $Secret = qr/^(?!.*\bhttp header: ").*(?:tm-test-admin-key-6c1f0e9b2a7d|wrong-admin-key-0123456789|sk-tm-)/;

# The admin calls of TEST 1 (n = 1) and TEST 2 (n = 2), as [headers,
# request]; each creates subscriber sub_n with keys of its own.
sub admin_calls {
    my ($n) = @_;
    my ($k1, $k2) = map { "sk-tm-test-secret-$n-00000000000000$_" } 1, 2;

    return [
        ['', "POST /admin/subscribers\n"
             . qq{{"msisdn":"+861380013800$n","api_key":"$k1"}}],
        ['', "POST /admin/subscribers/sub_$n/keys\n"
             . qq{{"api_key":"$k2"}}],
        ['', "POST /admin/subscribers/sub_$n/keys"],
        ['', "POST /admin/subscribers/sub_$n/keys\n"
             . qq{{"api_key":"$k1"}}],
        ['', "POST /admin/subscribers/sub_$n/keys\n"
             . qq{{"api_key":"sk-tm-test bad key $n 0000000000"}}],
        ['', "DELETE /admin/subscribers/sub_$n/keys/" . key_id($k2)],
        ["Authorization: Bearer wrong-admin-key-0123456789\n",
         "POST /admin/subscribers\n" . '{"msisdn":"+8613900139000"}'],
        ["X-Api-Key: tm-test-admin-key-6c1f0e9b2a7d\n",
         "GET /admin/subscribers/sub_$n"],
    ];
}

our $AdminAuth = "Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d\n";

add_block_preprocessor(sub {
    my ($block) = @_;

    $block->set_value(http_config => <<'EOC') if !defined $block->http_config;
    token_meter_store $TEST_NGINX_STORE_DIR/store;

    upstream mock {
        server 127.0.0.1:$TEST_NGINX_MOCK_PORT;
    }

    token_meter_model mock-model upstream=mock input=1 output=4;
EOC

    $block->set_value(config => <<'EOC') if !defined $block->config;
    location /admin/ {
        token_meter_admin;
        token_meter_admin_key sha256:$TEST_NGINX_ADMIN_HASH;
    }

    location /v1/ {
        token_meter on;

        # the mock answers with the request it got
        proxy_set_header X-Mock-Mode echo;
        proxy_pass http://$token_meter_upstream;
    }
EOC
});

no_shuffle();
run_tests();

__DATA__

=== TEST 1: admin calls with keys, logged at level info
--- log_level: info
--- more_headers eval
[map { $_->[0] || $::AdminAuth } @{ ::admin_calls(1) }]
--- request eval
[map { $_->[1] } @{ ::admin_calls(1) }]
--- error_code eval
[201, 201, 201, 409, 400, 200, 401, 401]
--- response_body_like eval
[
    qr/"api_key":"sk-tm-test-secret-1-000000000000001"/,
    qr/"api_key":"sk-tm-test-secret-1-000000000000002"/,
    qr/"api_key":"sk-tm-[A-Za-z0-9_-]{43}"/,
    qr/"code":"key_exists"/,
    qr/"code":"invalid_api_key"/,
    qr/"revoked_at":"/,
    qr/"code":"invalid_admin_key"/,
    qr/"code":"invalid_admin_key"/,
]
--- no_error_log
tm-test-admin-key-6c1f0e9b2a7d
wrong-admin-key-0123456789
an error_log at level debug
sk-tm-
[error]
[alert]
[crit]



=== TEST 2: the same calls for another subscriber, logged at level debug
--- log_level: debug
--- more_headers eval
[map { $_->[0] || $::AdminAuth } @{ ::admin_calls(2) }]
--- request eval
[map { $_->[1] } @{ ::admin_calls(2) }]
--- error_code eval
[201, 201, 201, 409, 400, 200, 401, 401]
--- response_body_like eval
[
    qr/"api_key":"sk-tm-test-secret-2-000000000000001"/,
    qr/"api_key":"sk-tm-test-secret-2-000000000000002"/,
    qr/"api_key":"sk-tm-[A-Za-z0-9_-]{43}"/,
    qr/"code":"key_exists"/,
    qr/"code":"invalid_api_key"/,
    qr/"revoked_at":"/,
    qr/"code":"invalid_admin_key"/,
    qr/"code":"invalid_admin_key"/,
]
--- no_error_log eval
[$::Secret, '[error]', '[alert]', '[crit]']



=== TEST 3: the debug log does have nginx's header lines: the filter works
The module warns of them when nginx starts with a debug log.
--- log_level: debug
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
GET /admin/subscribers/sub_1
--- error_log
http header: "Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d"
token meter: an error_log at level debug gets every request header
--- no_error_log eval
[$::Secret, '[error]', '[alert]', '[crit]']



=== TEST 4: metered calls, logged at level info: no key in the log or upstream
--- log_level: info
--- more_headers eval
[
    "Authorization: Bearer sk-tm-test-secret-1-000000000000001",
    "x-api-key: sk-tm-test-secret-1-000000000000001",
    "Authorization: Bearer sk-tm-test-unknown-0000000000000001",
    # revoked in TEST 1
    "Authorization: Bearer sk-tm-test-secret-1-000000000000002",
]
--- request eval
[
    ("POST /v1/chat/completions\n"
     . '{"model":"mock-model","messages":[{"role":"user","content":"hi"}]}')
    x 4
]
--- error_code eval
[200, 200, 401, 401]
--- response_body_like eval
[
    (qr/\A(?:(?!sk-tm-).)*"path": "\/v1\/chat\/completions"(?:(?!sk-tm-).)*\z/s)
    x 2,
    (qr/"code":"invalid_api_key"/) x 2,
]
--- no_error_log
sk-tm-
[error]
[alert]
[crit]



=== TEST 5: metered calls, logged at level debug
--- log_level: debug
--- more_headers eval
[
    "Authorization: Bearer sk-tm-test-secret-1-000000000000001",
    "x-api-key: sk-tm-test-secret-1-000000000000001",
    "Authorization: Bearer sk-tm-test-unknown-0000000000000001",
]
--- request eval
[
    ("POST /v1/chat/completions\n"
     . '{"model":"mock-model","messages":[{"role":"user","content":"hi"}]}')
    x 3
]
--- error_code eval
[200, 200, 401]
--- response_body_like eval
[
    (qr/\A(?:(?!sk-tm-).)*"path": "\/v1\/chat\/completions"(?:(?!sk-tm-).)*\z/s)
    x 2,
    qr/"code":"invalid_api_key"/,
]
--- no_error_log eval
[$::Secret, '[error]', '[alert]', '[crit]']
