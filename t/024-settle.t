# Settlement: what a request costs once it has ended.  Usage from the
# upstream, cached input at its own price, rounding up once per request,
# the trial grant spent before paid points, never more than the balance;
# no usage, broken usage or a compressed answer: an estimate; an upstream
# error without usage: nothing.  The mock upstream listens on
# $TEST_NGINX_MOCK_PORT; t/TokenMeter/Metered.pm has the configuration.
#
# The request used throughout counts 10 input tokens; the mock reports 10
# input and 5 output tokens, "Metered tokens flow from the", unless told
# otherwise.  kimi-k2.5: 1 point per input token, 0.25 per cached input
# token, 4 per output token.  An estimate counts the 28 characters of the
# answer as 7 output tokens: 10 + 7 * 4 = 38 points.

use t::TokenMeter;
use t::TokenMeter::Metered;

metered_defaults();
run_tests();

__DATA__

=== TEST 1: cached input tokens at the cached price
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Cached-Tokens: 8
--- request eval
[
    ::chat($::Hello),
    "GET /a/subscribers/sub_1",
    "GET /usage.log",
]
--- error_code eval
[200, 200, 200]
--- response_body_like eval
[
    qr/"cached_tokens": 8/,
    # 2 * 1 + 8 * 0.25 + 5 * 4
    ::balance_re(paid => 9976),
    ::exactly(::usage_line(200, 10, 8, 5, 24, 9976, 'upstream')),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: the cost is rounded up once, per request
--- init
subscriber(paid => 10000);
--- more_headers eval
[
    "Authorization: Bearer sk-test-0123456789abcdef\nX-Mock-Cached-Tokens: 1",
    "Authorization: Bearer sk-test-0123456789abcdef\nX-Mock-Cached-Tokens: 3",
    "Authorization: Bearer sk-test-0123456789abcdef\nX-Mock-Cached-Tokens: 4",
    "",
]
--- request eval
[
    (::chat($::Hello)) x 3,
    "GET /usage.log",
]
--- error_code eval
[200, 200, 200, 200]
--- response_body_like eval
[
    (qr/"completion_tokens": 5,/) x 3,
    # 9 + 0.25 + 20 = 29.25; 7 + 0.75 + 20 = 27.75; 6 + 1 + 20 = 27
    ::exactly(::usage_line(200, 10, 1, 5, 30, 9970, 'upstream')
              . ::usage_line(200, 10, 3, 5, 28, 9942, 'upstream')
              . ::usage_line(200, 10, 4, 5, 27, 9915, 'upstream')),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: a model without cached= charges cached tokens as input
--- init
subscriber(paid => 10000);
--- http_config
    token_meter_model plain upstream=mock input=2 output=3;
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Cached-Tokens: 8
--- request eval
[
    ::chat('{"model":"plain","messages":[{"role":"user","content":"Hello"}]}'),
    "GET /usage.log",
]
--- error_code eval
[200, 200]
--- response_body_like eval
[
    qr/"cached_tokens": 8/,
    # 10 * 2 + 5 * 3
    ::exactly("200 plain in=10 cached=8 out=5 points=35 balance=9965"
              . " upstream\n"),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 4: other ways of reporting cached tokens
--- init
subscriber(paid => 10000);
--- more_headers eval
[
    "Authorization: Bearer sk-test-0123456789abcdef\n"
    . 'X-Mock-Usage: {"prompt_tokens":10,"completion_tokens":5,'
    . '"prompt_cache_hit_tokens":8,"prompt_cache_miss_tokens":2}',
    # more cached than input: all input is cached
    "Authorization: Bearer sk-test-0123456789abcdef\n"
    . 'X-Mock-Usage: {"prompt_tokens":10,"completion_tokens":5,'
    . '"prompt_tokens_details":{"cached_tokens":50}}',
    "",
]
--- request eval
[
    (::chat($::Hello)) x 2,
    "GET /usage.log",
]
--- error_code eval
[200, 200, 200]
--- response_body_like eval
[
    (qr/"completion_tokens":5/) x 2,
    # 2 + 2 + 20; 2.5 + 20 = 22.5
    ::exactly(::usage_line(200, 10, 8, 5, 24, 9976, 'upstream')
              . ::usage_line(200, 10, 10, 5, 23, 9953, 'upstream')),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 5: the trial grant is spent first, then paid points
--- init
subscriber(paid => 100);
--- http_config
    token_meter_trial 50;
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
--- request eval
[
    ::chat($::Hello),
    "GET /a/subscribers/sub_1",
    ::chat($::Hello),
    "GET /a/subscribers/sub_1",
    "GET /usage.log",
]
--- error_code eval
[200, 200, 200, 200, 200]
--- response_body_like eval
[
    qr/"completion_tokens": 5,/,
    ::balance_re(trial => 20, paid => 100),
    qr/"completion_tokens": 5,/,
    # 20 from the grant, 10 paid
    qr/"balance":\{"paid":90,"grants":\[
       (?:\{"kind":"trial","points":0,"expires_at":"[^"]+"\})?
       \],"reserved":0,"available":90\}\}\n\z/x,
    ::exactly(::usage_line(200, 10, 0, 5, 30, 120, 'upstream')
              . ::usage_line(200, 10, 0, 5, 30, 90, 'upstream')),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 6: usage beyond the balance: the balance is charged, never more
--- init
subscriber(paid => 4010);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Prompt-Tokens: 5000
--- request eval
[
    ::chat($::Hello),
    "GET /a/subscribers/sub_1",
    "GET /usage.log",
]
--- error_code eval
[200, 200, 200]
--- response_body_like eval
[
    qr/"prompt_tokens": 5000,/,
    ::balance_re(paid => 0),
    # 5000 + 5 * 4 = 5020 owed
    ::exactly(::usage_line(200, 5000, 0, 5, 4010, 0, 'upstream')),
]
--- error_log
token meter charged 4010 of 5020 points to sub_1: the balance ran out
--- no_error_log
[error]
[alert]
[crit]



=== TEST 7: absurd but valid usage: the whole balance, never below zero
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Usage: {"prompt_tokens":1000000000,"completion_tokens":1000000000}
--- request eval
[
    ::chat($::Hello),
    "GET /a/subscribers/sub_1",
    "GET /usage.log",
]
--- error_code eval
[200, 200, 200]
--- response_body_like eval
[
    qr/"completion_tokens":1000000000/,
    ::balance_re(paid => 0),
    ::exactly(::usage_line(200, 1000000000, 0, 1000000000, 10000, 0,
                           'upstream')),
]
--- error_log
token meter charged 10000 of 5000000000 points to sub_1: the balance ran out
--- no_error_log
[error]
[alert]
[crit]



=== TEST 8: an upstream error without usage costs nothing
--- init
subscriber(paid => 10000);
--- more_headers eval
[
    "Authorization: Bearer sk-test-0123456789abcdef\nX-Mock-Mode: error500",
    "Authorization: Bearer sk-test-0123456789abcdef\nX-Mock-Mode: error429",
    "Authorization: Bearer sk-test-0123456789abcdef\n"
    . "X-Mock-Mode: error500\nX-Mock-Delay-Ms: 1",
    "",
    "",
]
--- request eval
[
    ::chat($::Hello),
    ::chat($::Hello),
    ::chat('{"model":"kimi-k2.5","stream":true,'
           . '"messages":[{"role":"user","content":"Hello"}]}'),
    "GET /a/subscribers/sub_1",
    "GET /usage.log",
]
--- error_code eval
[500, 429, 500, 200, 200]
--- response_headers eval
["", "Retry-After: 1", "", "", ""]
--- response_body_like eval
[
    qr/"message": "mock upstream failed on purpose",/,
    qr/"code": "rate_limit_exceeded"/,
    qr/"message": "mock upstream failed on purpose",/,
    ::balance_re(paid => 10000),
    ::exactly(::usage_line(500, 0, 0, 0, 0, 10000, 'estimated')
              . ::usage_line(429, 0, 0, 0, 0, 10000, 'estimated')
              . ::usage_line(500, 0, 0, 0, 0, 10000, 'estimated')),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 9: an answer without usage is estimated
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: no-usage
--- request eval
[
    ::chat($::Hello),
    "GET /a/subscribers/sub_1",
    "GET /usage.log",
]
--- error_code eval
[200, 200, 200]
--- response_body_like eval
[
    qr/\A(?!.*usage).*"content": "Metered tokens flow from the",/s,
    ::balance_re(paid => 9962),
    ::exactly(::usage_line(200, 10, 0, 7, 38, 9962, 'estimated')),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 10: the input estimate: every string of every input field
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: no-usage
--- request eval
[
    # messages: 3 elements; "system" 6 + 40 + "user" 4 + "assistant" 9
    # + "ok" 2 ASCII characters and 2 CJK ones; tools: "function" 8 + "f"
    # 1 + "abcd" 4 + "object" 6; functions: "g" 1; system: "Be brief" 8.
    # 3 + 3 * 4 + ceil(89 / 4) + 2 = 40; keys, numbers, the model and
    # other fields do not count.
    ::chat('{"model":"kimi-k2.5","temperature":0.5,"user":"someone",'
           . '"messages":[{"role":"system","content":"'
           . ('x' x 40) . '"},'
           . '{"role":"user","content":"你好"},'
           . '{"role":"assistant","content":"ok"}],'
           . '"tools":[{"type":"function","function":{"name":"f",'
           . '"description":"abcd","parameters":{"type":"object"}}}],'
           . '"functions":[{"name":"g"}],"system":"Be brief",'
           . '"max_tokens":100}'),
    "GET /usage.log",
]
--- error_code eval
[200, 200]
--- response_body_like eval
[
    qr/"content": "Metered tokens flow from the",/,
    # 40 + 7 * 4
    ::exactly(::usage_line(200, 40, 0, 7, 68, 9932, 'estimated')),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 11: an answer cut short by the upstream is estimated
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: cut
X-Mock-Completion-Tokens: 40
--- request eval
[
    ::chat($::Hello, '/v1/chat/completions HTTP/1.0'),
    "GET /usage.log",
]
--- error_code eval
[200, 200]
--- response_body_like eval
[
    qr/\A\{\n  "id": "chatcmpl-[^\n]*\n.*"content": "Metered/s,
    # the first 354 of the 709 bytes hold the first 120 characters of
    # the text: 30 tokens
    ::exactly(::usage_line(200, 10, 0, 30, 130, 9870, 'estimated')),
]
--- error_log
upstream prematurely closed connection
--- no_error_log
[alert]
[crit]



=== TEST 12: usage that makes no sense is not believed: estimated instead
--- init
subscriber(paid => 10000);
--- more_headers eval
[
    (map { "Authorization: Bearer sk-test-0123456789abcdef\n"
           . "X-Mock-Usage: $_" }
     '{"prompt_tokens":-5,"completion_tokens":5}',
     '{"prompt_tokens":10,"completion_tokens":-1}',
     '{"prompt_tokens":10,"completion_tokens":1000000001}',
     '{"prompt_tokens":99999999999999999999999,"completion_tokens":5}',
     '{"prompt_tokens":"10","completion_tokens":"5"}',
     '{"prompt_tokens":10.0,"completion_tokens":5}',
     '{"prompt_tokens":1e1,"completion_tokens":5}',
     '{"prompt_tokens":true,"completion_tokens":5}',
     '{"prompt_tokens":10,"completion_tokens":5,'
     . '"prompt_tokens_details":{"cached_tokens":-8}}',
     '{"prompt_tokens":10,"completion_tokens":5,'
     . '"prompt_tokens_details":{"cached_tokens":"8"}}',
     '{}',
     '{"total_tokens":15}',
     'null',
     '[10,5]',
     '"10 and 5"',
     '{"prompt_tokens":10,"completion_tokens":'),
    "",
]
--- request eval
[
    (::chat($::Hello)) x 16,
    "GET /usage.log",
]
--- error_code eval
[(200) x 17]
--- response_body_like eval
[
    (qr/"content": "Metered tokens flow from the",/) x 16,
    ::exactly(CORE::join '', map {
        ::usage_line(200, 10, 0, 7, 38, 10000 - 38 * $_, 'estimated')
    } 1 .. 16),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 13: made-up usage in a stream: estimated, and its event still dropped
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Usage: {"prompt_tokens":-10,"completion_tokens":-5}
--- request eval
[
    ::chat('{"model":"kimi-k2.5","stream":true,'
           . '"messages":[{"role":"user","content":"Hello"}]}'),
    "GET /usage.log",
]
--- error_code eval
[200, 200]
--- response_body_like eval
[
    qr/\A(?!.*"choices":\[\])(?!.*prompt_tokens)
       (?:data:\ \{[^\n]*"usage":null\}\n\n){7}data:\ \[DONE\]\n\n\z/xs,
    ::exactly(::usage_line(200, 10, 0, 7, 38, 9962, 'estimated')),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 14: a compressed answer: estimated, with a warning
--- init
subscriber(paid => 10000);
--- http_config
    log_format gzipped '$token_meter_output_tokens $body_bytes_sent'
                       ' $token_meter_points $token_meter_usage_source';
--- config
    location /v1/chat/ {
        token_meter on;
        access_log html/gzip.log gzipped;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        # against the module's wish, the upstream is asked to compress
        proxy_set_header Accept-Encoding gzip;
        proxy_pass http://$token_meter_upstream;
    }
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: gzip
--- request eval
[
    ::chat($::Hello),
    "GET /gzip.log",
]
--- error_code eval
[200, 200]
--- response_headers eval
["Content-Encoding: gzip", ""]
--- response_body_like eval
[
    qr/\A\x1f\x8b/,
    # every compressed byte counts as a character: output tokens are
    # ceil(bytes / 4), and 10 input tokens are estimated
    qr{\A(\d+)\ (\d+)\ (\d+)\ estimated\n\z
       (?(?{ $1 == int(($2 + 3) / 4) && $3 == 10 + 4 * $1 })|(*FAIL))}x,
]
--- error_log
token meter: upstream answer is compressed, its usage is estimated
--- no_error_log
[error]
[alert]
[crit]



=== TEST 15: usage with nested and look-alike fields is read right
--- init
subscriber(paid => 10000);
--- more_headers eval
[
    (map { "Authorization: Bearer sk-test-0123456789abcdef\n"
           . "X-Mock-Usage: $_" }
     # a nested object with the same names
     '{"prompt_tokens":10,"completion_tokens":5,"completion_tokens_details":'
     . '{"reasoning_tokens":3,"completion_tokens":999}}',
     # the details first, holding a name of the outer object
     '{"prompt_tokens_details":{"cached_tokens":8,"prompt_tokens":999},'
     . '"prompt_tokens":10,"completion_tokens":5}',
     # braces and quotes inside a string
     '{"prompt_tokens":10,"note":"}{\"completion_tokens\":999}",'
     . '"completion_tokens":5}',
     # blanks everywhere JSON allows them
     '{ "prompt_tokens" : 10 ,' . "\t" . '"completion_tokens" :5 ,'
     . ' "total_tokens":15 }'),
    "",
]
--- request eval
[
    (::chat($::Hello)) x 4,
    "GET /usage.log",
]
--- error_code eval
[(200) x 5]
--- response_body_like eval
[
    (qr/"content": "Metered tokens flow from the",/) x 4,
    ::exactly(::usage_line(200, 10, 0, 5, 30, 9970, 'upstream')
              . ::usage_line(200, 10, 8, 5, 24, 9946, 'upstream')
              . ::usage_line(200, 10, 0, 5, 30, 9916, 'upstream')
              . ::usage_line(200, 10, 0, 5, 30, 9886, 'upstream')),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 16: an upstream timeout answered by token_meter_error is settled too
The error page is an internal redirect, which clears the modules' request
contexts; the admitted request must still be settled: one record of 0
points, and nothing left reserved.
--- init
subscriber(paid => 10000);
--- config
    location = /v1/chat/completions {
        token_meter on;
        access_log html/usage.log usage;
        proxy_read_timeout 300ms;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        error_page 502 504 @token_meter_error;
        proxy_pass http://$token_meter_upstream;
    }

    location @token_meter_error {
        access_log html/usage.log usage;
        token_meter_error;
    }
--- more_headers eval
[
    "Authorization: Bearer sk-test-0123456789abcdef\n"
    . "X-Mock-Mode: slow-headers\nX-Mock-Delay-Ms: 1000",
    "Authorization: Bearer sk-test-0123456789abcdef",
    "",
    "",
]
--- request eval
[
    ::chat($::Hello),
    ::chat($::Hello),
    "GET /a/subscribers/sub_1",
    "GET /usage.log",
]
--- error_code eval
[504, 200, 200, 200]
--- response_body_like eval
[
    ::exactly(::error_json("The model's server did not answer in time.",
                           "server_error", "upstream_timeout")),
    qr/"completion_tokens": 5,/,
    ::balance_re(paid => 9970),
    ::exactly(::usage_line(504, 0, 0, 0, 0, 10000, 'estimated')
              . ::usage_line(200, 10, 0, 5, 30, 9970, 'upstream')),
]
--- error_log
upstream timed out
--- no_error_log
[alert]
[crit]
