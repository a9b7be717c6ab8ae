# The Responses API (/v1/responses, plain and streamed, usage as
# input_tokens and output_tokens, max_output_tokens) and embeddings (no
# output, so only the input is reserved).  The mock upstream listens on
# $TEST_NGINX_MOCK_PORT; t/TokenMeter/Metered.pm has the configuration.
#
# {"input":"Hello"} counts 3 + ceil(5 / 4) = 5 input tokens.  The mock
# reports 10 input and 5 output tokens, "Metered tokens flow from the",
# unless told otherwise: 10 * 1 + 5 * 4 = 30 points at kimi-k2.5's prices.

use t::TokenMeter;
use t::TokenMeter::Metered;

# the events of a streamed answer of five tokens, in order
our @Events = (qw(response.created response.in_progress
                  response.output_item.added response.content_part.added),
               ('response.output_text.delta') x 5,
               qw(response.output_text.done response.content_part.done
                  response.output_item.done));

# An SSE event of the Responses API: its name, then its JSON.
sub event_re {
    my ($name) = @_;

    return "event: \Q$name\E\ndata: \\{\"type\":\"\Q$name\E\",[^\\n]*\\}\n\n";
}

metered_defaults();
run_tests();

__DATA__

=== TEST 1: a response: input_tokens and output_tokens are paid for
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
--- request eval
[
    ::chat('{"model":"kimi-k2.5","input":"Hello"}', '/v1/responses'),
    "GET /a/subscribers/sub_1",
    "GET /usage.log",
]
--- error_code eval
[200, 200, 200]
--- response_body_like eval
[
    qr/"object":\ "response",.*"status":\ "completed",
       .*"text":\ "Metered\ tokens\ flow\ from\ the",
       .*"input_tokens":\ 10,/sx,
    ::balance_re(paid => 9970),
    ::exactly(::usage_line(200, 10, 0, 5, 30, 9970, 'upstream')),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: cached input in input_tokens_details
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Cached-Tokens: 8
--- request eval
[
    ::chat('{"model":"kimi-k2.5","input":"Hello"}', '/v1/responses'),
    "GET /usage.log",
]
--- error_code eval
[200, 200]
--- response_body_like eval
[
    qr/"cached_tokens": 8/,
    ::exactly(::usage_line(200, 10, 8, 5, 24, 9976, 'upstream')),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: a streamed response: every event passes, usage from the last
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Cached-Tokens: 4
--- request eval
[
    ::chat('{"model":"kimi-k2.5","input":"Hello","stream":true}',
           '/v1/responses'),
    "GET /usage.log",
]
--- error_code eval
[200, 200]
--- response_headers eval
["Content-Type: text/event-stream", ""]
--- response_body_like eval
[
    do {
        my $re = CORE::join '', map { ::event_re($_) } @::Events;
        my $usage = '"usage":{"input_tokens":10,"input_tokens_details":'
                    . '{"cached_tokens":4},"output_tokens":5,';
        my $last = "event: response\\.completed\ndata: [^\\n]*\Q$usage\E";
        qr/\A$re$last[^\n]*\n\n\z/;
    },
    # 6 + 4 * 0.25 + 5 * 4
    ::exactly(::usage_line(200, 10, 4, 5, 27, 9973, 'upstream')),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 4: a streamed response is not asked for stream_options
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: echo
--- request eval
::chat('{"model":"kimi-k2.5","input":"Hello","stream":true}',
       '/v1/responses')
--- response_body_like eval
::contains('"body": "{\"model\":\"kimi-k2.5\",\"input\":\"Hello\",'
           . '\"stream\":true}",')
--- no_error_log
[error]
[alert]
[crit]



=== TEST 5: max_output_tokens is what a small balance lowers
--- init
subscriber(paid => 105);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: echo
--- request eval
[
    # (105 - 5) / 4 = 25 output tokens
    ::chat('{"model":"kimi-k2.5","input":"Hello"}', '/v1/responses'),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[200, 200]
--- response_body_like eval
[
    ::contains('"body": "{\"model\":\"kimi-k2.5\",\"input\":\"Hello\",'
               . '\"max_output_tokens\":25}",'),
    ::balance_re(paid => 75),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 6: a stream stopped by max_output_tokens ends in response.incomplete
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
--- request eval
[
    ::chat('{"model":"kimi-k2.5","input":"Hello","stream":true,'
           . '"max_output_tokens":2}', '/v1/responses'),
    "GET /usage.log",
]
--- error_code eval
[200, 200]
--- response_body_like eval
[
    qr/event: response\.incomplete\ndata: [^\n]*"output_tokens":2,[^\n]*\n\n\z/,
    # 10 + 2 * 4
    ::exactly(::usage_line(200, 10, 0, 2, 18, 9982, 'upstream')),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 7: a streamed response cut short: the deltas seen are charged
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: cut
X-Mock-Completion-Tokens: 8
--- request eval
[
    ::chat('{"model":"kimi-k2.5","input":"Hello","stream":true}',
           '/v1/responses HTTP/1.0'),
    "GET /usage.log",
]
--- error_code eval
[200, 200]
--- response_body_like eval
[
    do {
        my $re = CORE::join '', map { ::event_re($_) } @::Events[0 .. 7];
        qr/\A$re\z/;
    },
    # estimated: 5 input tokens, "Metered tokens flow from" is 6 tokens
    ::exactly(::usage_line(200, 5, 0, 6, 29, 9971, 'estimated')),
]
--- error_log
upstream prematurely closed connection
--- no_error_log
[alert]
[crit]



=== TEST 8: a response without usage: the text is counted once
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: no-usage
--- request eval
[
    ::chat('{"model":"kimi-k2.5","input":"Hello"}', '/v1/responses'),
    ::chat('{"model":"kimi-k2.5","input":"Hello","stream":true}',
           '/v1/responses'),
    "GET /usage.log",
]
--- error_code eval
[200, 200, 200]
--- response_body_like eval
[
    qr/"text": "Metered tokens flow from the"/,
    qr/event: response\.completed\n/,
    # 5 input tokens and "Metered tokens flow from the", 7 tokens; the
    # stream repeats the whole text in four events after the deltas, but
    # it was generated once
    ::exactly(::usage_line(200, 5, 0, 7, 33, 9967, 'estimated')
              . ::usage_line(200, 5, 0, 7, 33, 9934, 'estimated')),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 9: input and instructions are counted, without the per-message tokens
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: no-usage
--- request eval
[
    # "user" 4 + "input_text" 10 + "Hello there" 11 + "Be brief" 8:
    # 3 + ceil(33 / 4) = 12
    ::chat('{"model":"kimi-k2.5","instructions":"Be brief",'
           . '"input":[{"role":"user","content":[{"type":"input_text",'
           . '"text":"Hello there"}]}]}', '/v1/responses'),
    "GET /usage.log",
]
--- error_code eval
[200, 200]
--- response_body_like eval
[
    qr/"text": "Metered tokens flow from the"/,
    ::exactly(::usage_line(200, 12, 0, 7, 40, 9960, 'estimated')),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 10: embeddings: the input is paid for, there is no output
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Prompt-Tokens: 7
--- request eval
[
    ::chat('{"model":"kimi-k2.5","input":["first text","second text"]}',
           '/v1/embeddings'),
    "GET /a/subscribers/sub_1",
    "GET /usage.log",
]
--- error_code eval
[200, 200, 200]
--- response_body_like eval
[
    qr/\A\{\n\ \ "object":\ "list",\n\ \ "data":\ \[\n
       .*"index":\ 1,.*"prompt_tokens":\ 7,/sx,
    ::balance_re(paid => 9993),
    ::exactly(::usage_line(200, 7, 0, 0, 7, 9993, 'upstream')),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 11: embeddings reserve the estimated input: one token too many, 402
--- init
subscriber(paid => 6);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
--- request eval
[
    # 3 + ceil(13 / 4) = 7 points to reserve
    ::chat('{"model":"kimi-k2.5","input":"hello world!!"}', '/v1/embeddings'),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[402, 200]
--- response_body_like eval
[
    ::exactly(::error_json("You exceeded your current quota: 6 points are"
                           . " available.", "insufficient_quota",
                           "insufficient_quota")),
    ::balance_re(paid => 6),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 12: embeddings that fit the reservation but not the usage
--- init
subscriber(paid => 6);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
--- request eval
[
    # 3 + ceil(12 / 4) = 6 points reserved; the mock reports 10 tokens,
    # and 6 points are all there is
    ::chat('{"model":"kimi-k2.5","input":"hello world!"}', '/v1/embeddings'),
    ::chat('{"model":"kimi-k2.5","input":"x"}', '/v1/embeddings'),
    "GET /a/subscribers/sub_1",
    "GET /usage.log",
]
--- error_code eval
[200, 402, 200, 200]
--- response_body_like eval
[
    qr/"prompt_tokens": 10,/,
    ::exactly(::error_json("You exceeded your current quota: 0 points are"
                           . " available.", "insufficient_quota",
                           "insufficient_quota")),
    ::balance_re(paid => 0),
    ::exactly(::usage_line(200, 10, 0, 0, 6, 0, 'upstream')
              . "402 kimi-k2.5 in=- cached=- out=- points=- balance=0 -\n"),
]
--- error_log
token meter charged 6 of 10 points to sub_1: the balance ran out
--- no_error_log
[error]
[alert]
[crit]



=== TEST 13: embeddings without usage: the estimated input
--- init
subscriber(paid => 100);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: no-usage
--- request eval
[
    ::chat('{"model":"kimi-k2.5","input":"hello world!"}', '/v1/embeddings'),
    "GET /usage.log",
]
--- error_code eval
[200, 200]
--- response_body_like eval
[
    qr/\A(?!.*usage)/s,
    ::exactly(::usage_line(200, 6, 0, 0, 6, 94, 'estimated')),
]
--- no_error_log
[error]
[alert]
[crit]
