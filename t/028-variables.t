# The $token_meter_* variables: in an access log, where the request is
# already settled, and in proxy_set_header, where it is not.  The mock
# upstream listens on $TEST_NGINX_MOCK_PORT; t/TokenMeter/Metered.pm has
# the configuration.

use t::TokenMeter;
use t::TokenMeter::Metered;

our $HttpConfig = <<'EOC';
    log_format all '$token_meter_subscriber|$token_meter_msisdn'
                   '|$token_meter_model|$token_meter_upstream'
                   '|$token_meter_input_tokens|$token_meter_cached_tokens'
                   '|$token_meter_output_tokens|$token_meter_points'
                   '|$token_meter_balance|$token_meter_usage_source'
                   '|$status';
EOC

our $Config = <<'EOC';
    location /v1/ {
        token_meter on;
        access_log html/all.log all;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header X-Subscriber $token_meter_subscriber;
        proxy_set_header X-Msisdn $token_meter_msisdn;
        proxy_set_header X-Model $token_meter_model;
        proxy_set_header X-Upstream $token_meter_upstream;
        proxy_pass http://$token_meter_upstream;
    }

    location /plain/ {
        access_log html/all.log all;
        proxy_pass http://mock/;
    }

    location /admin/ {
        token_meter_admin;
        token_meter_admin_key
            sha256:$TEST_NGINX_ADMIN_HASH;
    }
EOC

metered_defaults();
run_tests();

__DATA__

=== TEST 1: a request that went well, in the access log
--- init
subscriber(paid => 10000);
--- http_config eval
$::HttpConfig
--- config eval
$::Config
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Cached-Tokens: 8
--- request eval
[
    ::chat($::Hello),
    "GET /all.log",
]
--- error_code eval
[200, 200]
--- response_body_like eval
[
    qr/"cached_tokens": 8/,
    ::exactly("sub_1|+8613800138000|kimi-k2.5|mock|10|8|5|24|9976"
              . "|upstream|200\n"),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: an estimated request, a refused one and one not metered
--- init
subscriber(paid => 50);
--- http_config eval
$::HttpConfig
--- config eval
$::Config
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: no-usage
--- request eval
[
    # 10 + 7 * 4 estimated; 12 left
    ::chat($::Hello),
    # 12 points do not pay for the input and one output token
    ::chat($::Hello),
    ::chat('{"model":"kimi-k2.5","input":"x"}', '/plain/v1/embeddings'),
    "GET /all.log",
]
--- error_code eval
[200, 402, 200, 200]
--- response_body_like eval
[
    qr/"content": "Metered tokens flow from the"/,
    qr/"code":"insufficient_quota"/,
    qr/"object": "list"/,
    ::exactly("sub_1|+8613800138000|kimi-k2.5|mock|10|0|7|38|12|estimated|200\n"
              . "sub_1|+8613800138000|kimi-k2.5|mock|-|-|-|-|12|-|402\n"
              . "-|-|-|-|-|-|-|-|-|-|200\n"),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: who, what and where are known when the request goes upstream
--- init
subscriber(paid => 10000);
--- http_config eval
$::HttpConfig
--- config eval
$::Config
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: echo
--- request eval
::chat($::Hello)
--- response_body_like eval
::contains('"headers": {
    "x-subscriber": "sub_1",
    "x-msisdn": "+8613800138000",
    "x-model": "kimi-k2.5",
    "x-upstream": "mock",
    "host": "mock",')
--- no_error_log
[error]
[alert]
[crit]
