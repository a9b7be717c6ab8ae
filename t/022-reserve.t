# Reservations: a request holds the most it may cost while it runs, so
# concurrent requests cannot overspend; a balance too small for the
# default output is met by asking the upstream for fewer tokens, and one
# too small for a single output token by 402.  The mock upstream listens
# on $TEST_NGINX_MOCK_PORT; t/TokenMeter/Metered.pm has the configuration.
#
# The request used throughout, {"role":"user","content":"Hello"}, counts
# 3 + 4 (one message) + ceil(9 / 4) = 10 input tokens, so kimi-k2.5
# (1 point per input token, 4 per output token, max_output=1000) reserves
# 10 + 1000 * 4 = 4010 points for it.  A request for "n" choices (or
# "best_of" tries) reserves the output allowance that many times; one
# with both max_tokens and max_completion_tokens reserves the larger.

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



=== TEST 12: "n" and "best_of" choices each get the whole output allowance
--- init
subscriber(paid => 1209);
--- http_config
    token_meter_lower_max_tokens off;
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: echo
--- request eval
[
    # 10 + 3 * 100 * 4 = 1210 points, one more than there are
    map({ ::chat(qq({"model":"kimi-k2.5",$_,"max_tokens":100,)
                 . '"messages":[{"role":"user","content":"Hello"}]}') }
        '"n":3', '"best_of":3', '"n":2,"best_of":3', '"n":3,"best_of":1'),
    # 10 + 2 * 100 * 4 = 810 points fit; the mock answers one choice of 5
    # tokens, 30 points
    ::chat('{"model":"kimi-k2.5","n":2,"best_of":null,"max_tokens":100,'
           . '"messages":[{"role":"user","content":"Hello"}]}'),
    # null is one choice: 410 points
    ::chat('{"model":"kimi-k2.5","n":null,"max_tokens":100,'
           . '"messages":[{"role":"user","content":"Hello"}]}'),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[(402) x 4, 200, 200, 200]
--- response_body_like eval
[
    (::exactly(::error_json("You exceeded your current quota: 1209 points"
                            . " are available.", "insufficient_quota",
                            "insufficient_quota"))) x 4,
    ::contains('"body": "{\"model\":\"kimi-k2.5\",\"n\":2,'
               . '\"best_of\":null,\"max_tokens\":100,'),
    ::contains('"body": "{\"model\":\"kimi-k2.5\",\"n\":null,'
               . '\"max_tokens\":100,'),
    ::balance_re(paid => 1149),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 13: lowering shares what the balance pays for among the choices
--- init
subscriber(paid => 110);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: echo
--- request eval
[
    # (110 - 10) / (4 * 3) = 8.3 output tokens per choice
    ::chat('{"model":"kimi-k2.5","n":3,'
           . '"messages":[{"role":"user","content":"Hello"}]}'),
    # 10 + 5 * 4 = 30 paid, 80 left: (80 - 10) / (4 * 5) = 3.5
    ::chat('{"model":"kimi-k2.5","n":2,"best_of":5,"max_tokens":500,'
           . '"messages":[{"role":"user","content":"Hello"}]}'),
    "GET /a/subscribers/sub_1",
    "GET /usage.log",
]
--- error_code eval
[200, 200, 200, 200]
--- response_body_like eval
[
    ::contains('"body": "{\"model\":\"kimi-k2.5\",\"n\":3,\"messages\":'
               . '[{\"role\":\"user\",\"content\":\"Hello\"}],'
               . '\"max_tokens\":8}",'),
    ::contains('"body": "{\"model\":\"kimi-k2.5\",\"n\":2,\"best_of\":5,'
               . '\"max_tokens\":3,\"messages\":'
               . '[{\"role\":\"user\",\"content\":\"Hello\"}]}",'),
    # 80 - (10 + 3 * 4)
    ::balance_re(paid => 58),
    ::exactly(::usage_line(200, 10, 0, 5, 30, 80, 'upstream')
              . ::usage_line(200, 10, 0, 3, 22, 58, 'upstream')),
]
--- error_log
token meter lowers max tokens from 1000 to 8 for sub_1
--- no_error_log
[error]
[alert]
[crit]



=== TEST 14: "n" and "best_of" must be whole numbers from 1 to 128
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
--- request eval
[
    map({ ::chat(qq({"model":"kimi-k2.5","n":$_,"messages":[]})) }
        0, 129, -1, '"2"', 1.5, 'true', '[2]'),
    map({ ::chat(qq({"model":"kimi-k2.5","best_of":$_,"messages":[]})) }
        0, 200),
    # the largest: 3 + 128 * 1 * 4 = 515 points reserved; the mock
    # reports 10 input tokens and 1 output token, 14 points
    ::chat('{"model":"kimi-k2.5","n":128,"best_of":128,"max_tokens":1,'
           . '"messages":[]}'),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[(400) x 9, 200, 200]
--- response_body_like eval
[
    (::exactly(::error_json('"n" must be an integer from 1 to 128.',
                            "invalid_request_error",
                            "invalid_request_error"))) x 7,
    (::exactly(::error_json('"best_of" must be an integer from 1 to 128.',
                            "invalid_request_error",
                            "invalid_request_error"))) x 2,
    qr/"completion_tokens": 1,/,
    ::balance_re(paid => 9986),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 15: max_tokens and max_completion_tokens together: the larger counts
Either may be the one the upstream honours: the larger is reserved, and
each one above the allowance is cut to it.
--- init
subscriber(paid => 4009);
--- http_config
    token_meter_lower_max_tokens off;
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: echo
--- request eval
[
    # the larger is cut to max_output: 10 + 1000 * 4 = 4010, too many
    ::chat('{"model":"kimi-k2.5","max_completion_tokens":50,'
           . '"max_tokens":2000,'
           . '"messages":[{"role":"user","content":"Hello"}]}'),
    ::chat('{"model":"kimi-k2.5","max_tokens":50,'
           . '"max_completion_tokens":2000,'
           . '"messages":[{"role":"user","content":"Hello"}]}'),
    # 10 + 999 * 4 = 4006 fits; the body goes as it was
    ::chat('{"model":"kimi-k2.5","max_completion_tokens":999,'
           . '"max_tokens":50,'
           . '"messages":[{"role":"user","content":"Hello"}]}'),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[402, 402, 200, 200]
--- response_body_like eval
[
    (::exactly(::error_json("You exceeded your current quota: 4009 points"
                            . " are available.", "insufficient_quota",
                            "insufficient_quota"))) x 2,
    ::contains('"body": "{\"model\":\"kimi-k2.5\",'
               . '\"max_completion_tokens\":999,\"max_tokens\":50,'
               . '\"messages\":[{\"role\":\"user\",\"content\":'
               . '\"Hello\"}]}",'),
    ::balance_re(paid => 3979),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 16: each limit above max_output is cut to it, the others are kept
--- init
subscriber(paid => 5030);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: echo
--- request eval
[
    # both above max_output: both cut to 1000; 4010 reserved, 30 paid
    ::chat('{"model":"kimi-k2.5","max_tokens":3000,'
           . '"max_completion_tokens":1500,'
           . '"messages":[{"role":"user","content":"Hello"}]}'),
    # only the one above max_output is cut
    ::chat('{"model":"kimi-k2.5","max_completion_tokens":2000,'
           . '"max_tokens":50,'
           . '"messages":[{"role":"user","content":"Hello"}]}'),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[200, 200, 200]
--- response_body_like eval
[
    ::contains('"body": "{\"model\":\"kimi-k2.5\",\"max_tokens\":1000,'
               . '\"max_completion_tokens\":1000,\"messages\":'
               . '[{\"role\":\"user\",\"content\":\"Hello\"}]}",'),
    ::contains('"body": "{\"model\":\"kimi-k2.5\",'
               . '\"max_completion_tokens\":1000,\"max_tokens\":50,'
               . '\"messages\":[{\"role\":\"user\",\"content\":'
               . '\"Hello\"}]}",'),
    ::balance_re(paid => 4970),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 17: a small balance lowers every limit above what it pays for
--- init
subscriber(paid => 1010);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: echo
--- request eval
[
    # 10 + 600 * 4 = 2410 needed: (1010 - 10) / 4 = 250 for both
    ::chat('{"model":"kimi-k2.5","max_completion_tokens":300,'
           . '"max_tokens":600,'
           . '"messages":[{"role":"user","content":"Hello"}]}'),
    # 30 paid, 980 left: (980 - 10) / 4 = 242; 100 is below that
    ::chat('{"model":"kimi-k2.5","max_completion_tokens":100,'
           . '"max_tokens":600,'
           . '"messages":[{"role":"user","content":"Hello"}]}'),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[200, 200, 200]
--- response_body_like eval
[
    ::contains('"body": "{\"model\":\"kimi-k2.5\",'
               . '\"max_completion_tokens\":250,\"max_tokens\":250,'
               . '\"messages\":[{\"role\":\"user\",\"content\":'
               . '\"Hello\"}]}",'),
    ::contains('"body": "{\"model\":\"kimi-k2.5\",'
               . '\"max_completion_tokens\":100,\"max_tokens\":242,'
               . '\"messages\":[{\"role\":\"user\",\"content\":'
               . '\"Hello\"}]}",'),
    ::balance_re(paid => 950),
]
--- error_log
token meter lowers max tokens from 600 to 250 for sub_1
--- no_error_log
[error]
[alert]
[crit]
