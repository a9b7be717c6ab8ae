# Streamed answers: the module asks the upstream for usage on the
# client's behalf and takes that extra event out again, however the
# stream is cut into pieces and whatever the server-sent events look like;
# streams that end early are charged for what was seen.  The mock upstream
# listens on $TEST_NGINX_MOCK_PORT; t/TokenMeter/Metered.pm has the
# configuration.
#
# The mock reports 10 input and 5 output tokens unless told otherwise:
# 10 * 1 + 5 * 4 = 30 points at kimi-k2.5's prices.

use t::TokenMeter;
use t::TokenMeter::Metered;

use Digest::SHA ();

our @Pieces = ("Metered", " tokens", " flow", " from", " the", " mock",
               " upstream", ".");

# The client's request, and what the module sends upstream for it.
our $Body = '{"model":"kimi-k2.5","messages":[{"role":"user","content":'
            . '"Hello"}],"stream":true}';
our $Asked = '{"model":"kimi-k2.5","messages":[{"role":"user","content":'
             . '"Hello"}],"stream":true,"stream_options":'
             . '{"include_usage":true}}';

# The stream the mock sends for a chat request whose body reached it as
# $upstream_body, as the client should get it:
#
#     chat_stream(body => $Asked, usage_event => 0, eol => "\r\n")
sub chat_stream {
    my (%o) = @_;

    my $n = $o{tokens} // 5;
    my $eol = $o{eol} // "\n";
    my $id = substr Digest::SHA::sha256_hex(
                 "/v1/chat/completions\0$o{body}"), 0, 24;
    my $base = qq("id":"chatcmpl-$id","object":"chat.completion.chunk",)
               . qq("created":1735689600,"model":"kimi-k2.5");
    my $choice = sub {
        my ($delta, $finish) = @_;
        return qq({$base,"choices":[{"index":0,"delta":$delta,)
               . qq("logprobs":null,"finish_reason":$finish}],)
               . qq("usage":null});
    };

    my @events = ($choice->('{"role":"assistant","content":""}', 'null'));

    push @events, $choice->(qq({"content":"$Pieces[$_ % 8]"}), 'null')
        for 0 .. $n - 1;

    push @events, $choice->('{}', '"stop"');

    push @events, qq({$base,"choices":[],"usage":{"prompt_tokens":10,)
                  . qq("completion_tokens":$n,"total_tokens":)
                  . (10 + $n) . qq(,"prompt_tokens_details":)
                  . qq({"cached_tokens":0}}})
        if $o{usage_event};

    push @events, '[DONE]';

    return join '', map { "data: $_$eol$eol" } @events;
}

metered_defaults();
run_tests();

__DATA__

=== TEST 1: a stream: usage asked for upstream, its event kept from the client
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
--- request eval
[
    ::chat($::Body),
    "GET /a/subscribers/sub_1",
    "GET /usage.log",
]
--- error_code eval
[200, 200, 200]
--- response_headers eval
[
    "Content-Type: text/event-stream\nTransfer-Encoding: chunked\n"
    . "!Content-Length",
    "",
    "",
]
--- response_body_like eval
[
    ::exactly(::chat_stream(body => $::Asked)),
    ::balance_re(paid => 9970),
    ::exactly(::usage_line(200, 10, 0, 5, 30, 9970, 'upstream')),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: a client that asks for usage gets its usage event
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
--- request eval
[
    ::chat($::Asked),
    "GET /a/subscribers/sub_1",
    "GET /usage.log",
]
--- error_code eval
[200, 200, 200]
--- response_body_like eval
[
    ::exactly(::chat_stream(body => $::Asked, usage_event => 1)),
    ::balance_re(paid => 9970),
    ::exactly(::usage_line(200, 10, 0, 5, 30, 9970, 'upstream')),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: what the upstream is asked for, for each stream_options
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: echo
--- request eval
[
    ::chat('{"model":"kimi-k2.5","stream":true}'),
    ::chat('{"model":"kimi-k2.5","stream":true,'
           . '"stream_options":{"include_usage":false}}'),
    ::chat('{"model":"kimi-k2.5","stream":true,'
           . '"stream_options":{"continuous_usage_stats":false}}'),
    ::chat('{"model":"kimi-k2.5","stream":true,"stream_options":"yes"}'),
    # asked by the client: nothing to change
    ::chat('{"model":"kimi-k2.5", "stream":true,'
           . ' "stream_options":{"include_usage":true}}'),
    # not a stream: nothing to ask for
    ::chat('{"model":"kimi-k2.5","stream":false}'),
    ::chat('{"model":"kimi-k2.5","stream":"true"}'),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[(200) x 8]
--- response_body_like eval
[
    map({ ::contains('"body": "' . $_ . '",') }
        '{\"model\":\"kimi-k2.5\",\"stream\":true,'
        . '\"stream_options\":{\"include_usage\":true}}',
        '{\"model\":\"kimi-k2.5\",\"stream\":true,'
        . '\"stream_options\":{\"include_usage\":true}}',
        '{\"model\":\"kimi-k2.5\",\"stream\":true,'
        . '\"stream_options\":{\"continuous_usage_stats\":false,'
        . '\"include_usage\":true}}',
        '{\"model\":\"kimi-k2.5\",\"stream\":true,'
        . '\"stream_options\":{\"include_usage\":true}}',
        '{\"model\":\"kimi-k2.5\", \"stream\":true,'
        . ' \"stream_options\":{\"include_usage\":true}}',
        '{\"model\":\"kimi-k2.5\",\"stream\":false}',
        '{\"model\":\"kimi-k2.5\",\"stream\":\"true\"}'),
    ::balance_re(paid => 9790),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 4: a stream that comes one byte at a time
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: bytes
--- request eval
[
    ::chat($::Body),
    ::chat($::Asked),
    "GET /a/subscribers/sub_1",
    "GET /usage.log",
]
--- error_code eval
[200, 200, 200, 200]
--- response_body_like eval
[
    ::exactly(::chat_stream(body => $::Asked)),
    ::exactly(::chat_stream(body => $::Asked, usage_event => 1)),
    ::balance_re(paid => 9940),
    ::exactly(::usage_line(200, 10, 0, 5, 30, 9970, 'upstream')
              . ::usage_line(200, 10, 0, 5, 30, 9940, 'upstream')),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 5: events with CRLF line ends
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: crlf
--- request eval
[
    ::chat($::Body),
    ::chat($::Asked),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[200, 200, 200]
--- response_body_like eval
[
    ::exactly(::chat_stream(body => $::Asked, eol => "\r\n")),
    ::exactly(::chat_stream(body => $::Asked, usage_event => 1,
                            eol => "\r\n")),
    ::balance_re(paid => 9940),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 6: comments, ids and event names around and inside the events
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: comments
--- request eval
[
    ::chat($::Body),
    ::chat($::Asked),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[200, 200, 200]
--- response_body_like eval
[
    # comments are passed on as they come, so the one before the dropped
    # usage event stays, alone, before the comment of [DONE]
    qr/\A(?!.*"choices":\[\])(?!.*prompt_tokens)
       (?::\ keep-alive\n\nid:\ \d\nevent:\ message\n
        :\ between\ fields\ndata:\ [^\n]+\n\n){7}
       :\ keep-alive\n\n
       :\ keep-alive\n\nid:\ \d\nevent:\ message\n
        :\ between\ fields\ndata:\ \[DONE\]\n\n\z/xs,
    qr/\A(?::\ keep-alive\n\nid:\ \d\nevent:\ message\n:\ between\ fields\n
        data:\ [^\n]+\n\n){9}\z/xs,
    ::balance_re(paid => 9940),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 7: JSON spread over several data: lines
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: multiline
--- request eval
[
    ::chat($::Body),
    ::chat($::Asked),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[200, 200, 200]
--- response_body_like eval
[
    qr/\A(?!.*"choices": \[\])(?!.*prompt_tokens)
       (?:(?:data:\ ?[^\n]*\n)+\n){8}\z/xs,
    qr/\A(?=.*"choices":\ \[\],\ndata:\ ?"usage":)
       (?:(?:data:\ ?[^\n]*\n)+\n){9}\z/xs,
    ::balance_re(paid => 9940),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 8: all of it at once, one byte at a time
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: bytes, crlf, comments, multiline
X-Mock-Cached-Tokens: 8
--- request eval
[
    ::chat($::Body),
    "GET /a/subscribers/sub_1",
    "GET /usage.log",
]
--- error_code eval
[200, 200, 200]
--- response_body_like eval
[
    qr/\A(?!.*"choices": \[\])(?!.*prompt_tokens)
       (?::\ keep-alive\r\n\r\nid:\ \d\r\nevent:\ message\r\n
        :\ between\ fields\r\n(?:data:\ ?[^\r\n]*\r\n)+\r\n){7}
       :\ keep-alive\r\n\r\n
       :\ keep-alive\r\n\r\nid:\ \d\r\nevent:\ message\r\n
        :\ between\ fields\r\ndata:\ ?\[DONE\]\r\n\r\n\z/xs,
    # 2 + 8 * 0.25 + 5 * 4
    ::balance_re(paid => 9976),
    ::exactly(::usage_line(200, 10, 8, 5, 24, 9976, 'upstream')),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 9: a streamed legacy completion
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Completion-Tokens: 3
--- request eval
[
    ::chat('{"model":"kimi-k2.5","prompt":"Say","stream":true}',
           '/v1/completions'),
    "GET /usage.log",
]
--- error_code eval
[200, 200]
--- response_body_like eval
[
    qr/\A(?!.*"choices":\[\])(?!.*prompt_tokens)
       data:\ \{[^\n]*"text":"Metered"[^\n]*\}\n\n
       data:\ \{[^\n]*"text":"\ tokens"[^\n]*\}\n\n
       data:\ \{[^\n]*"text":"\ flow"[^\n]*\}\n\n
       data:\ \{[^\n]*"text":"",[^\n]*"finish_reason":"stop"[^\n]*\}\n\n
       data:\ \[DONE\]\n\n\z/xs,
    # 10 + 3 * 4
    ::exactly(::usage_line(200, 10, 0, 3, 22, 9978, 'upstream')),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 10: a long stream, as fast as it comes
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Completion-Tokens: 1000
X-Mock-Delay-Ms: 0
--- request eval
[
    ::chat($::Body),
    "GET /usage.log",
]
--- error_code eval
[200, 200]
--- response_body_like eval
[
    ::exactly(::chat_stream(body => $::Asked, tokens => 1000)),
    # 10 + 1000 * 4
    ::exactly(::usage_line(200, 10, 0, 1000, 4010, 5990, 'upstream')),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 11: a stream without usage is estimated from what was seen
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: no-usage
--- request eval
[
    ::chat($::Body),
    "GET /usage.log",
]
--- error_code eval
[200, 200]
--- response_body_like eval
[
    qr/\A(?!.*prompt_tokens)(?:data: \{[^\n]*\}\n\n){7}data: \[DONE\]\n\n\z/s,
    # "Metered tokens flow from the": 28 characters, 7 tokens
    ::exactly(::usage_line(200, 10, 0, 7, 38, 9962, 'estimated')),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 12: the upstream cuts the stream: what was seen is charged
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: cut
X-Mock-Completion-Tokens: 8
--- request eval
[
    # HTTP/1.0: the answer ends where the connection does
    ::chat($::Body, '/v1/chat/completions HTTP/1.0'),
    "GET /a/subscribers/sub_1",
    "GET /usage.log",
]
--- error_code eval
[200, 200, 200]
--- response_body_like eval
[
    qr/\A(?:data: \{[^\n]*\}\n\n){5}\z/s,
    ::balance_re(paid => 9966),
    # "Metered tokens flow from": 24 characters, 6 tokens
    ::exactly(::usage_line(200, 10, 0, 6, 34, 9966, 'estimated')),
]
--- error_log
upstream prematurely closed connection while reading upstream
--- no_error_log
[alert]
[crit]



=== TEST 13: the client hangs up before the first token: the input is charged
--- init
subscriber(paid => 10000);
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Delay-Ms: 3000
--- abort
--- timeout: 0.5
--- request eval
[
    ::chat($::Body, '/v1/chat/completions HTTP/1.0'),
    [{ value => "GET /usage.log", delay_before => 0.2 }],
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[200, 200, 200]
--- response_body_like eval
[
    qr/\Adata:\ \{[^\n]*"delta":\{"role":"assistant","content":""\}
       [^\n]*\}\n\n\z/x,
    ::exactly(::usage_line(200, 10, 0, 0, 10, 9990, 'estimated')),
    ::balance_re(paid => 9990),
]
--- error_log
client prematurely closed connection
--- no_error_log
[error]
[alert]
[crit]



=== TEST 14: the client hangs up after four tokens: those are charged
--- init
subscriber(paid => 10000);
my $s = post_request('/v1/chat/completions', $::Body,
                     'X-Mock-Delay-Ms' => 300,
                     'X-Mock-Completion-Tokens' => 20);
my $got = read_until($s, qr/(?:"content":"[^"]+".*){4}/s, 5);
die "four tokens did not come: $got\n"
    unless $got =~ /(?:"content":"[^"]+".*){4}/s;
close $s;
--- request eval
[
    [{ value => "GET /usage.log", delay_before => 0.2 }],
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[200, 200]
--- response_body_like eval
[
    # "Metered tokens flow from": 24 characters, 6 tokens
    ::exactly(::usage_line(200, 10, 0, 6, 34, 9966, 'estimated')),
    ::balance_re(paid => 9966),
]
--- error_log
client prematurely closed connection
--- no_error_log
[error]
[alert]
[crit]
