# Every way a metered request is refused before it goes upstream: the
# status, the exact OpenAI-shaped error, and that the refusal costs
# nothing and leaves nothing reserved.  The mock upstream listens on
# $TEST_NGINX_MOCK_PORT; t/TokenMeter/Metered.pm has the configuration.

use t::TokenMeter;
use t::TokenMeter::Metered;

metered_defaults();
run_tests();

__DATA__

=== TEST 1: no key: 401 invalid_api_key
--- init
subscriber(paid => 10000);
--- more_headers eval
[
    "",
    "Authorization: Basic c2stdGVzdDpzZWNyZXQ=",
    "Authorization: Bearer",
    "Authorization: Bearer    ",
    "x-api-key:",
    "Authorization: sk-test-0123456789abcdef",
    "",
]
--- request eval
[
    (::chat('{"model":"kimi-k2.5","messages":[]}')) x 5,
    ::chat('{"model":"kimi-k2.5","messages":[]}'),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[(401) x 6, 200]
--- response_headers eval
[("Content-Type: application/json") x 6, ""]
--- response_body_like eval
[
    (::exactly(::error_json("You didn't provide an API key. Send it as"
                            . ' "Authorization: Bearer <key>" or in'
                            . ' "x-api-key".',
                            "invalid_request_error", "invalid_api_key")))
    x 6,
    ::balance_re(paid => 10000),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: a key in the query string is not taken
--- init
subscriber(paid => 10000);
--- request eval
[
    ::chat('{"model":"kimi-k2.5","messages":[]}',
           '/v1/chat/completions?api_key=sk-test-0123456789abcdef'),
    ::chat('{"model":"kimi-k2.5","messages":[]}',
           '/v1/chat/completions?key=sk-test-0123456789abcdef'
           . '&x-api-key=sk-test-0123456789abcdef'),
]
--- error_code eval
[401, 401]
--- response_body eval
[
    (::error_json("You didn't provide an API key. Send it as"
                  . ' "Authorization: Bearer <key>" or in "x-api-key".',
                  "invalid_request_error", "invalid_api_key")) x 2
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: a key nobody has: 401, and nothing is read further
--- init
subscriber(paid => 10000);
--- more_headers eval
[
    "Authorization: Bearer sk-test-0123456789abcdeF",
    "x-api-key: sk-test-0123456789abcde",
    # a wrong key with a body that is not even JSON
    "Authorization: Bearer sk-nobody-has-this-key-000000",
    # a wrong key on GET: the key is checked first
    "Authorization: Bearer sk-nobody-has-this-key-000000",
    "",
]
--- request eval
[
    ::chat('{"model":"kimi-k2.5","messages":[]}'),
    ::chat('{"model":"kimi-k2.5","messages":[]}'),
    ::chat('not json'),
    "GET /v1/models",
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[401, 401, 401, 401, 200]
--- response_body_like eval
[
    (::exactly(::error_json("Incorrect API key provided.",
                            "invalid_request_error", "invalid_api_key")))
    x 4,
    ::balance_re(paid => 10000),
]
--- error_log
token meter: unknown API key
--- no_error_log
[error]
[alert]
[crit]



=== TEST 4: a revoked key and the key of a closed subscriber: 401
--- init
subscriber(paid => 10000);
subscriber(paid => 10000, msisdn => '+8613900139000',
           key => 'sk-test-second-subscriber-key');
admin('DELETE', '/admin/subscribers/sub_1/keys/key_'
      . substr(Digest::SHA::sha256_hex($Key), 0, 16), undef, 200);
admin('DELETE', '/admin/subscribers/sub_2', undef, 200);
--- more_headers eval
[
    "Authorization: Bearer sk-test-0123456789abcdef",
    "Authorization: Bearer sk-test-second-subscriber-key",
]
--- request eval
[
    ::chat('{"model":"kimi-k2.5","messages":[]}'),
    ::chat('{"model":"kimi-k2.5","messages":[]}'),
]
--- error_code eval
[401, 401]
--- response_body eval
[
    (::error_json("Incorrect API key provided.",
                  "invalid_request_error", "invalid_api_key")) x 2
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 5: a suspended subscriber: 403 account_suspended; active again: 200
--- init
subscriber(paid => 10000);
admin('PATCH', '/admin/subscribers/sub_1', '{"status":"suspended"}', 200);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
--- request eval
[
    ::chat('{"model":"kimi-k2.5","messages":[]}'),
    "PATCH /a/subscribers/sub_1\n" . '{"status":"active"}',
    ::chat('{"model":"kimi-k2.5","messages":[]}'),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[403, 200, 200, 200]
--- response_body_like eval
[
    ::exactly(::error_json("This account is suspended.",
                           "invalid_request_error", "account_suspended")),
    qr/"status":"active"/,
    qr/"completion_tokens": 5,/,
    ::balance_re(paid => 9970),
]
--- error_log
token meter: sub_1 is suspended
--- no_error_log
[error]
[alert]
[crit]



=== TEST 6: only POST is metered: 405 method_not_allowed
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
--- request eval
[
    "GET /v1/chat/completions",
    "PUT /v1/chat/completions\n" . '{"model":"kimi-k2.5","messages":[]}',
    "DELETE /v1/chat/completions",
    "OPTIONS /v1/chat/completions",
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[405, 405, 405, 405, 200]
--- response_body_like eval
[
    (::exactly(::error_json("Only POST requests are metered here.",
                            "invalid_request_error",
                            "method_not_allowed"))) x 4,
    ::balance_re(paid => 10000),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 7: a body larger than client_max_body_size: 413 request_too_large
nginx refuses such a body before the module sees it; the token_meter_error
page gives that refusal the OpenAI shape.
--- init
subscriber(paid => 10000);
--- config
    location /v1/chat/ {
        token_meter on;
        client_max_body_size 66;
        error_page 413 @token_meter_error;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_pass http://$token_meter_upstream;
    }

    location @token_meter_error {
        token_meter_error;
    }
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
--- request eval
[
    # 67 bytes.  nginx itself logs "client intended to send too large
    # body" at the error level, so [error] is not checked below.
    ::chat('{"model":"kimi-k2.5","messages":'
           . '[{"role":"user","content":"Hi!!"}]}'),
    # 66 bytes
    ::chat('{"model":"kimi-k2.5","messages":'
           . '[{"role":"user","content":"Hi!"}]}'),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[413, 200, 200]
--- response_body_like eval
[
    ::exactly(::error_json("The request body is too large.",
                           "invalid_request_error", "request_too_large")),
    qr/"completion_tokens": 5,/,
    ::balance_re(paid => 9970),
]
--- no_error_log
[alert]
[crit]



=== TEST 8: a body that is not a JSON object: 400
A body that jansson cannot read is answered with where it stopped
reading, as line and column (characters, not bytes); JSON that is not
an object is answered as such.
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
--- request eval
[
    ::chat('model=kimi-k2.5'),
    ::chat('[{"model":"kimi-k2.5"}]'),
    ::chat('"kimi-k2.5"'),
    ::chat('null'),
    ::chat('42'),
    ::chat('{"model":"kimi-k2.5","messages":[]'),
    ::chat('{"model":"kimi-k2.5"} {"model":"kimi-k2.5"}'),
    ::chat(qq({"model":"kimi-k2.5","x":"\xff\xfe"})),
    "POST /v1/chat/completions",
    # the third line, after two two-byte characters
    ::chat(qq({"model":"kimi-k2.5",\n "messages":[],\n)
           . qq( "x":"\xc3\xa9\xc3\xa9" ]})),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[(400) x 10, 200]
--- response_body_like eval
[
    (map { ::exactly(::error_json("The request body is not valid JSON"
                                  . " (line 1, column $_).",
                                  "invalid_request_error",
                                  "invalid_request_error")) } 5),
    ::exactly(::error_json("The request body is not a JSON object.",
                           "invalid_request_error",
                           "invalid_request_error")),
    # a bare string, null or number is not a JSON text to jansson
    (map { ::exactly(::error_json("The request body is not valid JSON"
                                  . " (line 1, column $_).",
                                  "invalid_request_error",
                                  "invalid_request_error")) }
     11, 4, 2, 34, 23, 26, 0),
    ::exactly(::error_json("The request body is not valid JSON"
                           . " (line 3, column 11).",
                           "invalid_request_error",
                           "invalid_request_error")),
    ::balance_re(paid => 10000),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 9: no model, or a model that is not a string: 400
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
--- request eval
[
    ::chat('{}'),
    ::chat('{"messages":[{"role":"user","content":"Hello"}]}'),
    ::chat('{"model":null}'),
    ::chat('{"model":7}'),
    ::chat('{"model":["kimi-k2.5"]}'),
    ::chat('{"Model":"kimi-k2.5"}'),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[(400) x 6, 200]
--- response_body_like eval
[
    (::exactly(::error_json("You must provide a model parameter.",
                            "invalid_request_error",
                            "invalid_request_error"))) x 6,
    ::balance_re(paid => 10000),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 10: a model that is not configured: 404 model_not_found
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
--- request eval
[
    ::chat('{"model":"gpt-9"}'),
    ::chat('{"model":"KIMI-K2.5"}'),
    ::chat('{"model":"kimi-k2.5 "}'),
    ::chat('{"model":"kimi-k2"}'),
    ::chat('{"model":""}'),
    ::chat('{"model":"say \"hi\" \\\\ <b>"}'),
    # an escaped name is the same name
    ::chat('{"model":"kimi\u002dk2.5","messages":[]}'),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[(404) x 6, 200, 200]
--- response_body_like eval
[
    (map {
        ::exactly(::error_json(qq{The model "$_" does not exist.},
                               "invalid_request_error", "model_not_found"))
     } ('gpt-9', 'KIMI-K2.5', 'kimi-k2.5 ', 'kimi-k2', '',
        'say "hi" \\ <b>')),
    qr/"completion_tokens": 5,/,
    ::balance_re(paid => 9970),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 11: max_tokens that is not a positive integer: 400
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
--- request eval
[
    ::chat('{"model":"kimi-k2.5","max_tokens":0}'),
    ::chat('{"model":"kimi-k2.5","max_tokens":-1}'),
    ::chat('{"model":"kimi-k2.5","max_tokens":"100"}'),
    ::chat('{"model":"kimi-k2.5","max_tokens":1.5}'),
    ::chat('{"model":"kimi-k2.5","max_tokens":100.0}'),
    ::chat('{"model":"kimi-k2.5","max_tokens":true}'),
    ::chat('{"model":"kimi-k2.5","max_tokens":[100]}'),
    ::chat('{"model":"kimi-k2.5","max_completion_tokens":0}'),
    ::chat('{"model":"kimi-k2.5","max_tokens":100,'
           . '"max_completion_tokens":"all"}'),
    ::chat('{"model":"kimi-k2.5","max_output_tokens":0}', '/v1/responses'),
    ::chat('{"model":"kimi-k2.5","max_output_tokens":{}}', '/v1/responses'),
    # null is the same as leaving it out
    ::chat('{"model":"kimi-k2.5","max_tokens":null}'),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[(400) x 11, 200, 200]
--- response_body_like eval
[
    (::exactly(::error_json('"max_tokens" must be a positive integer.',
                            "invalid_request_error",
                            "invalid_request_error"))) x 7,
    (::exactly(::error_json('"max_completion_tokens" must be a positive'
                            . ' integer.', "invalid_request_error",
                            "invalid_request_error"))) x 2,
    (::exactly(::error_json('"max_output_tokens" must be a positive'
                            . ' integer.', "invalid_request_error",
                            "invalid_request_error"))) x 2,
    qr/"completion_tokens": 5,/,
    # the mock counts the input as 10 tokens whatever it is
    ::balance_re(paid => 9970),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 12: no points at all: 402 insufficient_quota
--- init
subscriber(paid => 0);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
--- request eval
[
    ::chat($::Hello),
    ::chat('{"model":"kimi-k2.5","input":"Hello"}', '/v1/embeddings'),
    ::chat('{"model":"kimi-k2.5","input":"Hello"}', '/v1/responses'),
    "GET /a/subscribers/sub_1",
    "GET /usage.log",
]
--- error_code eval
[402, 402, 402, 200, 200]
--- response_body_like eval
[
    (::exactly(::error_json("You exceeded your current quota: 0 points are"
                            . " available.", "insufficient_quota",
                            "insufficient_quota"))) x 3,
    ::balance_re(paid => 0),
    # nothing is settled for a request that was never admitted
    ::exactly("402 kimi-k2.5 in=- cached=- out=- points=- balance=0 -\n"
              x 3),
]
--- error_log
token meter: sub_1 has 0 points, too few for "kimi-k2.5"
--- no_error_log
[error]
[alert]
[crit]



=== TEST 13: token_meter_quota_status 429
--- init
subscriber(paid => 5);
--- http_config
    token_meter_quota_status 429;
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
--- request eval
[
    ::chat($::Hello),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[429, 200]
--- response_body_like eval
[
    ::exactly(::error_json("You exceeded your current quota: 5 points are"
                           . " available.", "insufficient_quota",
                           "insufficient_quota")),
    ::balance_re(paid => 5),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 14: a path with parameters (";"): 400, before the body is read
The module tells the kind of call by the end of the path; an upstream
that drops ";" parameters would serve another kind than the one metered.
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
--- request eval
[
    ::chat($::Hello, '/v1/chat/completions;/embeddings'),
    ::chat($::Hello, '/v1/chat;v=2/completions'),
    ::chat($::Hello, '/v1/chat/completions;'),
    # nginx decodes %3B before the module sees the path
    ::chat($::Hello, '/v1/chat/completions%3B/embeddings'),
    # in the query string it is no path parameter
    ::chat($::Hello, '/v1/chat/completions?a=1;b=2'),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[(400) x 4, 200, 200]
--- response_body_like eval
[
    (::exactly(::error_json('Path parameters (";") are not accepted.',
                            "invalid_request_error",
                            "invalid_request_error"))) x 4,
    qr/"completion_tokens": 5,/,
    ::balance_re(paid => 9970),
]
--- no_error_log
[error]
[alert]
[crit]
