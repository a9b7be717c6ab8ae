# Reservations: a request holds the most it may cost while it runs, so
# concurrent requests cannot overspend; a balance too small for the
# default output is met by asking the upstream for fewer tokens, and one
# too small for a single output token by 402.  The mock upstream listens
# on $TEST_NGINX_MOCK_PORT; t/TokenMeter/Metered.pm has the configuration.
#
# The request used throughout, {"role":"user","content":"Hello"}, counts
# 3 + 4 (one message) + ceil(9 / 4) = 10 input tokens, so kimi-k2.5
# (1 point per input token, 4 per output token, max_output=1000) reserves
# 10 + 1000 * 4 = 4010 points for it.

use t::TokenMeter;
use t::TokenMeter::Metered;

# the request with blanks in it, as a client may send it
our $Spaced = '{"model": "kimi-k2.5", "messages":'
              . ' [{"role": "user", "content": "Hello"}]}';

metered_defaults();
run_tests();

__DATA__

=== TEST 1: a request holds its reservation while it runs
--- init
subscriber(paid => 10000);
# five output tokens, 250 ms apart
$main::Slow = post_request('/v1/chat/completions',
    '{"model":"kimi-k2.5","stream":true,'
    . '"messages":[{"role":"user","content":"Hello"}]}',
    'X-Mock-Delay-Ms' => 250);
--- request eval
[
    "GET /a/subscribers/sub_1",
    [{ value => "GET /a/subscribers/sub_1", delay_before => 2 }],
]
--- error_code eval
[200, 200]
--- response_body_like eval
[
    ::balance_re(paid => 10000, reserved => 4010),
    ::balance_re(paid => 9970),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: a second request while the first holds the balance: 402
--- init
subscriber(paid => 4020);
$main::Slow = post_request('/v1/chat/completions',
    '{"model":"kimi-k2.5","stream":true,'
    . '"messages":[{"role":"user","content":"Hello"}]}',
    'X-Mock-Delay-Ms' => 250);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: echo
--- request eval
[
    # 4020 - 4010 = 10 points left: the input alone, no output token
    ::chat($::Hello),
    "GET /a/subscribers/sub_1",
    # the first request has ended and paid 30 points: 3990 left, which
    # pays for (3990 - 10) / 4 = 995 output tokens
    [{ value => ::chat($::Hello),
       delay_before => 2 }],
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[402, 200, 200, 200]
--- response_body_like eval
[
    ::exactly(::error_json("You exceeded your current quota: 10 points are"
                           . " available.", "insufficient_quota",
                           "insufficient_quota")),
    ::balance_re(paid => 4020, reserved => 4010),
    ::contains('"body": "{\"model\":\"kimi-k2.5\",\"messages\":'
               . '[{\"role\":\"user\",\"content\":\"Hello\"}],'
               . '\"max_tokens\":995}",'),
    ::balance_re(paid => 3960),
]
--- error_log
token meter: sub_1 has 10 points, too few for "kimi-k2.5"
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: a small balance lowers max_tokens to what it pays for
--- init
subscriber(paid => 110);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: echo
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
    # (110 - 10) / 4 = 25 output tokens
    ::contains('"body": "{\"model\":\"kimi-k2.5\",\"messages\":'
               . '[{\"role\":\"user\",\"content\":\"Hello\"}],'
               . '\"max_tokens\":25}",'),
    ::balance_re(paid => 80),
    ::exactly(::usage_line(200, 10, 0, 5, 30, 80, 'upstream')),
]
--- error_log
token meter lowers max tokens from 1000 to 25 for sub_1
--- no_error_log
[error]
[alert]
[crit]



=== TEST 4: a max below max_output is kept; one above it is cut to max_output
--- init
subscriber(paid => 10110);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: echo
--- request eval
[
    # 10 + 500 * 4 = 2010 points reserved: the body is not touched
    ::chat('{"model":"kimi-k2.5","max_completion_tokens":500,'
           . '"messages":[{"role":"user","content":"Hello"}]}'),
    # asked for 2600, above max_output: 1000 is asked for, and reserved
    ::chat('{"model":"kimi-k2.5","max_tokens":2600,'
           . '"messages":[{"role":"user","content":"Hello"}]}'),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[200, 200, 200]
--- response_body_like eval
[
    ::contains('"body": "{\"model\":\"kimi-k2.5\",'
               . '\"max_completion_tokens\":500,\"messages\":'
               . '[{\"role\":\"user\",\"content\":\"Hello\"}]}",'),
    ::contains('"body": "{\"model\":\"kimi-k2.5\",\"max_tokens\":1000,'
               . '\"messages\":[{\"role\":\"user\",\"content\":'
               . '\"Hello\"}]}",'),
    ::balance_re(paid => 10050),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 5: max_completion_tokens lowered keeps its name
--- init
subscriber(paid => 110);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: echo
--- request eval
[
    ::chat('{"model":"kimi-k2.5","max_completion_tokens":500,'
           . '"messages":[{"role":"user","content":"Hello"}]}'),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[200, 200]
--- response_body_like eval
[
    ::contains('"body": "{\"model\":\"kimi-k2.5\",'
               . '\"max_completion_tokens\":25,\"messages\":'
               . '[{\"role\":\"user\",\"content\":\"Hello\"}]}",'),
    ::balance_re(paid => 80),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 6: exactly enough for max_output: the body is not touched
--- init
subscriber(paid => 4010);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: echo
--- request eval
[
    ::chat($::Spaced),
    "GET /a/subscribers/sub_1",
    # 3980 left: (3980 - 10) / 4 = 992.5
    ::chat($::Spaced),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[200, 200, 200, 200]
--- response_body_like eval
[
    ::contains('"body": "{\"model\": \"kimi-k2.5\", \"messages\": '
               . '[{\"role\": \"user\", \"content\": \"Hello\"}]}",'),
    ::balance_re(paid => 3980),
    ::contains('"max_tokens": 992'),
    ::balance_re(paid => 3950),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 7: one output token affordable: max_tokens 1
--- init
subscriber(paid => 14);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: echo
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
    # the mock answers with no more than max_tokens: 10 + 1 * 4 points
    ::contains('"max_tokens": 1'),
    ::balance_re(paid => 0),
    ::exactly(::usage_line(200, 10, 0, 1, 14, 0, 'upstream')),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 8: not even one output token affordable: 402
--- init
subscriber(paid => 13);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: echo
--- request eval
[
    ::chat($::Hello),
    ::chat('{"model":"kimi-k2.5","max_tokens":1,'
           . '"messages":[{"role":"user","content":"Hello"}]}'),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[402, 402, 200]
--- response_body_like eval
[
    (::exactly(::error_json("You exceeded your current quota: 13 points are"
                            . " available.", "insufficient_quota",
                            "insufficient_quota"))) x 2,
    ::balance_re(paid => 13),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 9: token_meter_lower_max_tokens off: 402 instead
--- init
subscriber(paid => 4009);
--- http_config
    token_meter_lower_max_tokens off;
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: echo
--- request eval
[
    ::chat($::Hello),
    # what the client asks for is reserved, and that fits
    ::chat('{"model":"kimi-k2.5","max_tokens":999,'
           . '"messages":[{"role":"user","content":"Hello"}]}'),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[402, 200, 200]
--- response_body_like eval
[
    ::exactly(::error_json("You exceeded your current quota: 4009 points"
                           . " are available.", "insufficient_quota",
                           "insufficient_quota")),
    ::contains('"max_tokens": 999'),
    ::balance_re(paid => 3979),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 10: prices with decimals: the reservation is rounded up once
--- init
subscriber(paid => 1504);
--- http_config
    token_meter_model cheap upstream=mock input=0.333 output=1.5
                      max_output=1000;
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: echo
--- request eval
[
    # 10 * 0.333 + 1000 * 1.5 = 1503.33, so 1504 points
    ::chat('{"model":"cheap","messages":[{"role":"user","content":"Hello"}]}'),
    # paid 10 * 0.333 + 5 * 1.5 = 10.83, so 11 points: 1493 left, and
    # (1493 - 3.33) / 1.5 = 993.1
    ::chat('{"model":"cheap","messages":[{"role":"user","content":"Hello"}]}'),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[200, 200, 200]
--- response_body_like eval
[
    ::contains('"body": "{\"model\":\"cheap\",\"messages\":'
               . '[{\"role\":\"user\",\"content\":\"Hello\"}]}",'),
    ::contains('"max_tokens": 993'),
    ::balance_re(paid => 1482),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 11: a reservation past token_meter_reservation_timeout is released
--- init
subscriber(paid => 10000);
# five output tokens, 1.2 s apart
$main::Slow = post_request('/v1/chat/completions',
    '{"model":"kimi-k2.5","stream":true,'
    . '"messages":[{"role":"user","content":"Hello"}]}',
    'X-Mock-Delay-Ms' => 1200);
--- http_config
    token_meter_reservation_timeout 1s;
--- timeout: 5
--- request eval
[
    # the sweep runs every 2 s
    [{ value => "GET /a/subscribers/sub_1", delay_before => 4.5 }],
    # the request still pays when it ends
    [{ value => "GET /a/subscribers/sub_1", delay_before => 2.5 }],
]
--- error_code eval
[200, 200]
--- response_body_like eval
[
    ::balance_re(paid => 10000),
    ::balance_re(paid => 9970),
]
--- error_log
token meter released 4010 reserved points of sub_1: the reservation expired
--- no_error_log
[error]
[alert]
[crit]
