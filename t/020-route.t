# The metered request path when all goes well: the answer comes back
# untouched, the subscriber pays exactly what the usage says, the model
# decides the upstream and the price, and neither the subscriber's key nor
# Accept-Encoding goes upstream.  The mock upstream listens on
# $TEST_NGINX_MOCK_PORT; t/TokenMeter/Metered.pm has the configuration.
#
# Prices of kimi-k2.5: 1 point per input token, 0.25 per cached input
# token, 4 per output token.  The mock reports 10 input and 5 output
# tokens unless told otherwise: 10 * 1 + 5 * 4 = 30 points.

use t::TokenMeter;
use t::TokenMeter::Metered;

use Digest::SHA ();

metered_defaults();
run_tests();

# The id the mock gives an answer: it depends on the path and the body
# that reached it.
sub answer_id {
    my ($path, $body) = @_;

    return substr Digest::SHA::sha256_hex("$path\0$body"), 0, 24;
}

__DATA__

=== TEST 1: a chat answer comes back byte for byte; 30 points are paid
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
--- request eval
[
    ::chat($::Hello),
    "GET /a/subscribers/sub_1",
    "GET /usage.log",
]
--- error_code eval
[200, 200, 200]
--- response_headers eval
["Content-Type: application/json\nContent-Length: 521", "", ""]
--- response_body eval
[
    '{
  "id": "chatcmpl-' . ::answer_id('/v1/chat/completions', $::Hello)
    . '",
  "object": "chat.completion",
  "created": 1735689600,
  "model": "kimi-k2.5",
  "choices": [
    {
      "index": 0,
      "message": {
        "role": "assistant",
        "content": "Metered tokens flow from the",
        "refusal": null
      },
      "logprobs": null,
      "finish_reason": "stop"
    }
  ],
  "usage": {
    "prompt_tokens": 10,
    "completion_tokens": 5,
    "total_tokens": 15,
    "prompt_tokens_details": {
      "cached_tokens": 0
    }
  }
}
',
    ::balance_re(paid => 9970),
    ::usage_line(200, 10, 0, 5, 30, 9970, 'upstream'),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: the key may come in x-api-key; "Bearer" in any case
--- init
subscriber(paid => 10000);
--- more_headers eval
[
    "x-api-key: sk-test-0123456789abcdef",
    "Authorization: bearer    sk-test-0123456789abcdef",
    "Authorization: BEARER sk-test-0123456789abcdef",
    "",
    "",
]
--- request eval
[
    ::chat($::Hello),
    ::chat($::Hello),
    ::chat($::Hello),
    "GET /a/subscribers/sub_1",
    "GET /usage.log",
]
--- error_code eval
[200, 200, 200, 200, 200]
--- response_body_like eval
[
    (qr/"content": "Metered tokens flow from the"/) x 3,
    ::balance_re(paid => 9910),
    ::exactly(::usage_line(200, 10, 0, 5, 30, 9970, 'upstream')
              . ::usage_line(200, 10, 0, 5, 30, 9940, 'upstream')
              . ::usage_line(200, 10, 0, 5, 30, 9910, 'upstream')),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: the subscriber's key and Accept-Encoding never reach the upstream
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
x-api-key: sk-test-0123456789abcdef
X-Api-Key: sk-test-0123456789abcdef
Accept-Encoding: gzip, deflate, br
X-Mock-Mode: echo
--- request eval
[
    ::chat($::Hello),
    "GET /usage.log",
]
--- error_code eval
[200, 200]
--- response_body_like eval
[
    qr/\A(?!.*sk-test)(?!.*(?i:authorization|api-key|accept-encoding)).*
       \Q"headers": {
    "host": "mock",
    "content-length": "68",
    "x-mock-mode": "echo"
  },\E/xs,
    ::usage_line(200, 10, 0, 5, 30, 9970, 'upstream'),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 4: the operator's own provider key goes upstream instead
--- init
subscriber(paid => 10000);
--- config
    location /v1/ {
        token_meter on;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Authorization "Bearer sk-provider-secret";
        proxy_pass http://$token_meter_upstream;
    }

    location /admin/ {
        token_meter_admin;
        token_meter_admin_key
            sha256:$TEST_NGINX_ADMIN_HASH;
    }
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: echo
--- request eval
::chat($::Hello)
--- response_body_like eval
qr/\A(?!.*sk-test).*\Q"authorization": "Bearer sk-provider-secret",\E/s
--- no_error_log
[error]
[alert]
[crit]



=== TEST 5: a body with nothing to change goes upstream byte for byte
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: echo
--- request eval
::chat('{ "messages" : [ {"content":"Hello","role":"user"} ],
  "temperature": 0.70, "model" : "kimi-k2.5", "max_tokens": 100 }')
--- response_body_like eval
::contains('"body": "{ \"messages\" : [ {\"content\":\"Hello\",'
           . '\"role\":\"user\"} ],\n  \"temperature\": 0.70,'
           . ' \"model\" : \"kimi-k2.5\", \"max_tokens\": 100 }",')
--- no_error_log
[error]
[alert]
[crit]



=== TEST 6: upstream_model= renames the model for the upstream, keeps the rest
--- init
subscriber(paid => 40000);
--- http_config
    token_meter_model kimi-latest upstream=mock input=2 output=8
                      upstream_model=kimi-k2.5-0905-preview;
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: echo
--- request eval
[
    ::chat('{"model":"kimi-latest","temperature":0.5,'
           . '"messages":[{"role":"user","content":"\u4f60\u597d"}],'
           . '"user":"u-17"}'),
    "GET /a/subscribers/sub_1",
    "GET /usage.log",
]
--- error_code eval
[200, 200, 200]
--- response_body_like eval
[
    ::contains('"json": {
    "model": "kimi-k2.5-0905-preview",
    "temperature": 0.5,
    "messages": [
      {
        "role": "user",
        "content": "\u4f60\u597d"
      }
    ],
    "user": "u-17"
  },
  "model": "kimi-k2.5-0905-preview",'),
    # 10 * 2 + 5 * 8 at kimi-latest's prices
    ::balance_re(paid => 39940),
    ::exactly("200 kimi-latest in=10 cached=0 out=5 points=60"
              . " balance=39940 upstream\n"),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 7: a legacy completion is metered the same way
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Prompt-Tokens: 7
X-Mock-Completion-Tokens: 3
--- request eval
[
    ::chat('{"model":"kimi-k2.5","prompt":"Say something"}',
           '/v1/completions'),
    "GET /a/subscribers/sub_1",
    "GET /usage.log",
]
--- error_code eval
[200, 200, 200]
--- response_body_like eval
[
    qr/"object": "text_completion",.*"text": "Metered tokens flow",/s,
    # 7 + 3 * 4
    ::balance_re(paid => 9981),
    ::exactly(::usage_line(200, 7, 0, 3, 19, 9981, 'upstream')),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 8: each key pays for itself
--- init
subscriber(paid => 10000);
subscriber(paid => 500, msisdn => '+8613900139000',
           key => 'sk-test-second-subscriber-key');
--- more_headers eval
[
    "Authorization: Bearer sk-test-0123456789abcdef",
    "Authorization: Bearer sk-test-second-subscriber-key\n"
    . "X-Mock-Completion-Tokens: 50",
    "",
    "",
    "",
]
--- request eval
[
    ::chat($::Hello),
    ::chat($::Hello),
    "GET /a/subscribers/sub_1",
    "GET /a/subscribers/sub_2",
    "GET /usage.log",
]
--- error_code eval
[200, 200, 200, 200, 200]
--- response_body_like eval
[
    qr/"completion_tokens": 5,/,
    qr/"completion_tokens": 50,/,
    ::balance_re(paid => 9970),
    # 10 + 50 * 4
    ::balance_re(paid => 290),
    ::exactly(::usage_line(200, 10, 0, 5, 30, 9970, 'upstream')
              . ::usage_line(200, 10, 0, 50, 210, 290, 'upstream')),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 9: token_meter is inherited, and off turns it off in a location
--- init
subscriber(paid => 10000);
--- config
    token_meter on;

    location /v1/ {
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_pass http://$token_meter_upstream;

        location /v1/free/ {
            token_meter off;
            proxy_pass http://mock/v1/;
        }
    }

    location /admin/ {
        token_meter_admin;
        token_meter_admin_key
            sha256:$TEST_NGINX_ADMIN_HASH;
    }

    location /a/ {
        token_meter off;
        proxy_pass http://127.0.0.1:$TEST_NGINX_SERVER_PORT/admin/;
        proxy_set_header Authorization
            "Bearer tm-meter-admin-4b7e19c03a5d8f26";
    }
--- more_headers eval
[
    "Authorization: Bearer sk-test-0123456789abcdef",
    "X-Mock-Mode: echo",
    "",
]
--- request eval
[
    ::chat($::Hello),
    # no key, and the model need not be known
    ::chat('{"model":"anything"}', '/v1/free/chat/completions'),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[200, 200, 200]
--- response_body_like eval
[
    qr/"completion_tokens": 5,/,
    qr/"path": "\/v1\/chat\/completions",/,
    ::balance_re(paid => 9970),
]
--- no_error_log
[error]
[alert]
[crit]
