# Hostile input, each with the exact answer: bodies that are not JSON or
# are built to hurt a parser (deep nesting, numbers beyond 64 bits,
# invalid UTF-8, duplicate keys), an upstream that reports absurd usage,
# a client that plants its own usage or asks for n answers, header
# injection and oversized requests, keys where they do not belong, and
# path tricks on the admin API and on metered paths.  The plain refusals
# (no key, a key in the query string, no model ...) are in
# t/021-errors.t, absurd usage in plain answers in t/024-settle.t; this
# file goes past them.
#
# The mock upstream listens on $TEST_NGINX_MOCK_PORT;
# t/TokenMeter/Metered.pm has the configuration: kimi-k2.5 at 1 point per
# input token and 4 per output token, at most 1000 output tokens; a block
# may ask the mock to echo what it got (X-Mock-Mode: echo).

use t::TokenMeter;
use t::TokenMeter::Metered;
use t::TokenMeter::Load qw(http_request);

metered_defaults();

# The answer to a body that jansson (Debian's libjansson4 2.14) cannot
# parse: where it stopped, line and column, in characters.  jansson's own
# text is not sent: it quotes the bytes it could not read.
sub not_json {
    my ($line, $column) = @_;

    return exactly(error_json('The request body is not valid JSON'
                              . " (line $line, column $column).",
                              'invalid_request_error',
                              'invalid_request_error'));
}

our $Auth = "Authorization: Bearer $Key\n";
our $AdminAuth = "Authorization: Bearer $AdminKey\n";

# A body whose "messages" hold an array nested $n deep.
sub nested {
    my ($n) = @_;

    return '{"model":"kimi-k2.5","messages":' . ('[' x $n) . (']' x $n)
           . '}';
}

# Raw bytes to nginx; [status, body].
sub raw {
    my ($bytes) = @_;
    my $res = http_request(raw => $bytes, timeout => 5);

    return [$res->{status}, $res->{body}];
}

sub post_raw_headers {
    my ($headers, $body) = @_;

    $body //= $Hello;

    return "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
           . "Connection: close\r\nContent-Length: " . length($body)
           . "\r\n$headers\r\n$body";
}

# A JSON request of exactly $size bytes, and the same as a chunked body
# of one chunk.
sub json_of {
    my ($size) = @_;

    my $head = '{"model":"kimi-k2.5","messages":[{"role":"user","content":"';
    my $tail = '"}]}';

    return $head . ('a' x ($size - length($head) - length($tail))) . $tail;
}

sub chunked_body {
    my $json = json_of(@_);

    return sprintf "%x\r\n%s\r\n0\r\n\r\n", length $json, $json;
}

# The stream of t/024-settle.t TEST 13: estimated at 10 input and 7
# output tokens, 38 points.
our $HelloStream = '{"model":"kimi-k2.5","stream":true,"messages":'
                   . '[{"role":"user","content":"Hello"}]}';

run_tests();

__DATA__

=== TEST 1: more bodies that are not JSON objects: 400, nothing charged
--- init
subscriber(paid => 10000);
--- more_headers eval
[($::Auth) x 7, ""]
--- request eval
[
    ::chat("\xef\xbb\xbf" . $::Hello),
    ::chat($::Hello . "\x00"),
    ::chat(qq({"model":"kimi-k2.5",\x00"messages":[]})),
    ::chat('{"model":"kimi-k2.5", /* a comment */ "messages":[]}'),
    ::chat(q({'model':'kimi-k2.5','messages':[]})),
    ::chat('{"model":"kimi-k2.5","messages":[],}'),
    ::chat('}'),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[(400) x 7, 200]
--- response_body_like eval
[
    # a byte order mark is one character
    ::not_json(1, 1),
    ::not_json(1, 69),
    ::not_json(1, 22),
    ::not_json(1, 23),
    ::not_json(1, 2),
    ::not_json(1, 36),
    ::not_json(1, 1),
    ::balance_re(paid => 10000),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: deep nesting is refused at once; 2000 levels are parsed, estimated
--- init
subscriber(paid => 0);
--- timeout: 2
--- more_headers eval
[($::Auth) x 4, ""]
--- request eval
[
    ::chat('[' x 100000),
    ::chat('{"a":' x 100000),
    ::chat(::nested(2100)),
    ::chat(::nested(2000)),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[400, 400, 400, 402, 200]
--- response_body_like eval
[
    # jansson stops at 2048 levels
    ::not_json(1, 2049),
    ::not_json(1, 10241),
    ::not_json(1, 2080),
    ::exactly(::error_json('You exceeded your current quota: 0 points are'
                           . ' available.', 'insufficient_quota',
                           'insufficient_quota')),
    ::balance_re(paid => 0),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: numbers beyond 64 bits; a max_tokens of 2^63-1 is cut to max_output
--- init
subscriber(paid => 10000);
--- more_headers eval
[($::Auth) x 4, $::Auth . "X-Mock-Mode: echo\n", ($::Auth) x 3, ""]
--- request eval
[
    ::chat('{"model":"kimi-k2.5","temperature":1e999,"messages":[]}'),
    ::chat('{"model":"kimi-k2.5","temperature":-1e999,"messages":[]}'),
    ::chat('{"model":"kimi-k2.5","seed":1180591620717411303424,'
           . '"messages":[]}'),
    ::chat('{"model":"kimi-k2.5","max_tokens":9223372036854775808,'
           . '"messages":[]}'),
    ::chat('{"model":"kimi-k2.5","max_tokens":9223372036854775807,'
           . '"messages":[]}'),
    ::chat('{"model":"kimi-k2.5","max_tokens":-9223372036854775808,'
           . '"messages":[]}'),
    ::chat('{"model":"kimi-k2.5","max_tokens":1e3,"messages":[]}'),
    ::chat('{"model":"kimi-k2.5","max_tokens":0,"messages":[]}'),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[(400) x 4, 200, (400) x 3, 200]
--- response_body_like eval
[
    ::not_json(1, 40),
    ::not_json(1, 41),
    ::not_json(1, 50),
    ::not_json(1, 53),
    qr/"json": \{\s*"model": "kimi-k2\.5",\s*"max_tokens": 1000,/,
    (::exactly(::error_json('"max_tokens" must be a positive integer.',
                            'invalid_request_error',
                            'invalid_request_error'))) x 3,
    ::balance_re(paid => 9970),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 4: a usage object the client plants in its request is not believed
--- init
subscriber(paid => 10000);
--- more_headers eval
[$::Auth . "X-Mock-Mode: echo\n", ""]
--- request eval
[
    ::chat('{"model":"kimi-k2.5","messages":[],'
           . '"usage":{"prompt_tokens":0,"completion_tokens":0}}'),
    "GET /usage.log",
]
--- response_body_like eval
[
    qr/"usage": \{\s*"prompt_tokens": 0,\s*"completion_tokens": 0\s*\}/,
    ::exactly(::usage_line(200, 10, 0, 5, 30, 9970, 'upstream')),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 5: absurd usage at the end of a stream: estimated, never negative
--- init
subscriber(paid => 10000);
--- more_headers eval
[
    (map { $::Auth . "X-Mock-Usage: $_\n" }
     '{"prompt_tokens":9223372036854775807,"completion_tokens":5}',
     '{"prompt_tokens":9223372036854775808,"completion_tokens":5}',
     '{"prompt_tokens":10,"completion_tokens":18446744073709551616}',
     '{"prompt_tokens":1e30,"completion_tokens":5}',
     '{"prompt_tokens":-1,"completion_tokens":5}',
     '{"prompt_tokens":10,"completion_tokens":"12"}',
     '{"prompt_tokens":0x10,"completion_tokens":5}',
     '{"prompt_tokens":10,"completion_tokens":5,"pad":"'
     . ('x' x 5000) . '"}'),
    "",
]
--- request eval
[(::chat($::HelloStream)) x 8, "GET /usage.log"]
--- error_code eval
[(200) x 9]
--- response_body_like eval
[
    (qr/data: \[DONE\]\n\n\z/) x 8,
    ::exactly(CORE::join '',
                         map { ::usage_line(200, 10, 0, 7, 38,
                                            10000 - 38 * $_, 'estimated') }
                         1 .. 8),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 6: usage of zero from the upstream is believed: the upstream is trusted
--- init
subscriber(paid => 10000);
--- more_headers eval
[$::Auth . "X-Mock-Usage: {\"prompt_tokens\":0,\"completion_tokens\":0}\n",
 ""]
--- request eval
[::chat($::Hello), "GET /usage.log"]
--- response_body_like eval
[
    qr/"completion_tokens":0/,
    ::exactly(::usage_line(200, 0, 0, 0, 0, 10000, 'upstream')),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 7: "n": 64 answers of 10 tokens: the reservation covers all 64
--- init
subscriber(paid => 2563);
--- more_headers eval
[
    ($::Auth . "X-Mock-Usage: {\"prompt_tokens\":3,"
     . "\"completion_tokens\":640}\n") x 2,
    "",
]
--- request eval
[
    # 3 + 64 * 10 * 4 = 2563 points reserved, and charged
    (::chat('{"model":"kimi-k2.5","n":64,"max_tokens":10,"messages":[]}'))
    x 2,
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[200, 402, 200]
--- response_body_like eval
[
    qr/"completion_tokens":640/,
    ::exactly(::error_json('You exceeded your current quota: 0 points are'
                           . ' available.', 'insufficient_quota',
                           'insufficient_quota')),
    ::balance_re(paid => 0),
]
--- no_error_log
the balance ran out
[error]
[alert]
[crit]



=== TEST 8: duplicate keys in the body: 400, as JSON that is not valid
Otherwise the module and the upstream might read different values from
the same body, which goes upstream untouched.
--- init
subscriber(paid => 10000);
--- more_headers eval
[($::Auth . "X-Mock-Mode: echo\n") x 3, ""]
--- request eval
[
    ::chat('{"model":"gpt-4o","model":"kimi-k2.5","messages":[]}'),
    ::chat('{"model":"kimi-k2.5","max_tokens":1000000,"max_tokens":1,'
           . '"messages":[]}'),
    ::chat('{"model":"kimi-k2.5","stream":false,"stream":true,'
           . '"messages":[]}'),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[400, 400, 400, 200]
--- response_body_like eval
[
    ::not_json(1, 25),
    ::not_json(1, 54),
    ::not_json(1, 44),
    ::balance_re(paid => 10000),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 9: invalid UTF-8 and forbidden escapes: 400; a 4-byte character is fine
--- init
subscriber(paid => 10000);
--- more_headers eval
[($::Auth) x 6, ""]
--- request eval
[
    map({ ::chat('{"model":"kimi-k2.5","messages":[{"role":"user",'
                 . qq("content":"$_"}]})) }
        "\xc0\xaf", "\xed\xa0\x80", '\\ud800', '\\u0000'),
    ::chat(qq({"model":"kimi-k2.5\xff","messages":[]})),
    ::chat(qq({"model":"kimi-k2.5","messages":[{"role":"user",)
           . qq("content":"\xf0\x9f\x98\x80"}]})),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[(400) x 5, 200, 200]
--- response_body_like eval
[
    ::not_json(1, 59),
    ::not_json(1, 59),
    ::not_json(1, 66),
    ::not_json(1, 66),
    ::not_json(1, 19),
    qr/"completion_tokens": 5,/,
    ::balance_re(paid => 9970),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 10: CR, LF and NUL in headers; CR LF in a model name comes back escaped
--- init
subscriber(paid => 10000);

my $bad = ::raw(::post_raw_headers("Authorization: Bearer $::Key\r"
                                   . "X-Evil: 1\r\n"));
is($bad->[0], 400, 'a bare CR in a header value: 400 from nginx');
like($bad->[1], qr{<title>400 Bad Request</title>}, 'its own page');

$bad = ::raw(::post_raw_headers("Authorization: Bearer $::Key\x00\r\n"));
is($bad->[0], 400, 'a NUL in a header value: 400 from nginx');

$bad = ::raw(::post_raw_headers("Authorization: Bearer $::Key\r\n"
                                . " X-Folded: 1\r\n"));
is($bad->[0], 400, 'a folded header line: 400 from nginx');

my $lf = ::raw(::post_raw_headers("Authorization: Bearer $::Key\n"
                                  . "X-Mock-Mode: echo\n"));
is($lf->[0], 200, 'a bare LF ends a header line, as CR LF does');
like($lf->[1], qr/"x-mock-mode": "echo"/,
     'and the next line is a header of its own');
unlike($lf->[1], qr/sk-test-/, 'the key did not go upstream');
--- more_headers eval
[$::Auth, ""]
--- request eval
[
    ::chat(qq({"model":"x\\r\\nX-Evil: 1\\"<b>","messages":[]})),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[404, 200]
--- response_body_like eval
[
    ::exactly('{"error":{"message":"The model \"x\r\nX-Evil: 1\\"<b>\"'
              . ' does not exist.","type":"invalid_request_error",'
              . '"param":null,"code":"model_not_found"}}' . "\n"),
    ::balance_re(paid => 9970),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 11: oversized headers, request line and bodies: token_meter_error
--- init
subscriber(paid => 10000);

my $res = ::raw(::post_raw_headers("Authorization: Bearer $::Key\r\n"
                                   . 'X-Big: ' . ('a' x 2000) . "\r\n"));
is($res->[0], 400, 'a 2 kB header line with 1 kB buffers: 400');

# nginx hands the error page a 400 for headers too large, as for a
# malformed request: the page cannot tell the two apart
is($res->[1], ::error_json('The request could not be read: it is'
                           . ' malformed, or its headers are too large.',
                           'invalid_request_error', 'invalid_request_error'),
   'the request could not be read');

$res = ::raw("POST /v1/chat/completions?" . ('a' x 2000) . " HTTP/1.1\r\n"
             . "Host: localhost\r\nConnection: close\r\n\r\n");
is($res->[0], 414, 'a 2 kB request line: 414');
is($res->[1], ::error_json('The request line is too long.',
                           'invalid_request_error', 'request_too_large'),
   'the request line is too long');

$res = ::raw(::post_raw_headers("Authorization: Bearer $::Key\r\n")
             =~ s/Content-Length: \d+/Content-Length: 99999999999999999999/r);
is($res->[0], 400, 'a Content-Length beyond 64 bits: 400');
is($res->[1], ::error_json('The request could not be read: it is'
                           . ' malformed, or its headers are too large.',
                           'invalid_request_error', 'invalid_request_error'),
   'the same answer');
--- config
    large_client_header_buffers 2 1k;

    # a location with a URI: nginx cannot send an error of the request
    # line (400, 414) to a named location ("empty URI in redirect")
    error_page 400 413 414 494 /token_meter_error;

    location /v1/chat/ {
        token_meter on;
        client_max_body_size 1k;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_pass http://$token_meter_upstream;
    }

    location = /token_meter_error {
        internal;
        token_meter_error;
    }
--- more_headers eval
[$::Auth, $::Auth . "Transfer-Encoding: chunked\n", ""]
--- request eval
[
    "POST /v1/chat/completions\n" . ::json_of(2048),
    "POST /v1/chat/completions\n" . ::chunked_body(1500),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[413, 413, 200]
--- response_body_like eval
[
    (::exactly(::error_json('The request body is too large.',
                            'invalid_request_error',
                            'request_too_large'))) x 2,
    ::balance_re(paid => 10000),
]
--- no_error_log
[alert]
[crit]



=== TEST 12: keys where they do not belong: 401
--- init
subscriber(paid => 10000);
--- more_headers eval
[
    "Authorization: Bearer $::AdminKey\n",
    "Authorization: Bearer \U$::Key\E\n",
    "Authorization: Bearer $::Key" . "x\n",
    "x-api-key: Bearer $::Key\n",
    "",
    "",
]
--- request eval
[
    (::chat($::Hello)) x 4,
    ::chat(qq({"model":"kimi-k2.5","api_key":"$::Key","messages":[]})),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[(401) x 5, 200]
--- response_body_like eval
[
    (::exactly(::error_json('Incorrect API key provided.',
                            'invalid_request_error',
                            'invalid_api_key'))) x 4,
    ::exactly(::error_json("You didn't provide an API key. Send it as"
                           . ' "Authorization: Bearer <key>" or in'
                           . ' "x-api-key".',
                           'invalid_request_error', 'invalid_api_key')),
    ::balance_re(paid => 10000),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 13: admin API: not the subscriber's key, nor in the query, nor more
--- init
subscriber(paid => 10000);
--- more_headers eval
[
    "Authorization: Bearer $::Key\n",
    "",
    "Authorization: Bearer $::AdminKey" . "0\n",
    "Authorization: Bearer " . substr($::AdminKey, 0, -1) . "\n",
    "Authorization: Bearer $::AdminKey\n",
]
--- request eval
[
    "GET /admin/subscribers/sub_1",
    "GET /admin/subscribers/sub_1?key=$::AdminKey&api_key=$::AdminKey",
    "GET /admin/subscribers/sub_1",
    "GET /admin/subscribers/sub_1",
    "GET /admin/subscribers/sub_1",
]
--- error_code eval
[401, 401, 401, 401, 200]
--- response_headers eval
[("WWW-Authenticate: Bearer") x 4, "!WWW-Authenticate"]
--- response_body_like eval
[
    (::exactly(::error_json('missing or wrong admin key',
                            'invalid_request_error',
                            'invalid_admin_key'))) x 4,
    ::balance_re(paid => 10000),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 14: admin path tricks: nginx normalizes first, the key is always asked
--- init
subscriber(paid => 10000);
--- more_headers eval
[
    "",
    ($::AdminAuth) x 12,
]
--- request eval
[
    "GET /admin/../admin/subscribers/sub_1",
    "GET /admin/../admin/subscribers/sub_1",
    "GET /admin//subscribers//sub_1",
    "GET /admin/%73ubscribers/sub_1",
    "GET /admin/subscribers%2Fsub_1",
    "GET /admin/%2e%2e/admin/subscribers/sub_1",
    "GET /v1/../admin/subscribers/sub_1",
    "GET /admin/subscribers/sub_1/",
    "GET /admin/subscribers/sub_01",
    "GET /admin/subscribers/sub_1;x",
    "GET /ADMIN/subscribers/sub_1",
    "GET /admin/../../etc/passwd",
    "GET /admin/subscribers/sub_1%00",
]
--- error_code eval
[401, (200) x 7, 404, 404, 404, 400, 400]
--- response_body_like eval
[
    qr/"code":"invalid_admin_key"/,
    (qr/^\{"id":"sub_1",/) x 7,
    # an id is written without leading zeros: sub_01 names nobody
    (map { ::exactly(::error_json(qq(no subscriber "$_"),
                                  'invalid_request_error',
                                  'subscriber_not_found')) }
     'sub_01', 'sub_1;x'),
    qr{<title>404 Not Found</title>},
    (qr{<title>400 Bad Request</title>}) x 2,
]
--- no_error_log
[alert]
[crit]



=== TEST 15: a URI the upstream could read differently is refused
nginx takes ";/embeddings" as part of the last path segment: the module
would see an embeddings call (no output reserved, no usage asked for in
the stream) while the upstream, sent the URI as it came, might drop the
";" parameter and serve a chat.
--- init
subscriber(paid => 10000);
--- more_headers eval
[($::Auth . "X-Mock-Mode: echo\n") x 2, ""]
--- request eval
[
    ::chat($::HelloStream, '/v1/chat/completions;/embeddings'),
    ::chat($::HelloStream, '/v1/chat/completions;v=1'),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[400, 400, 200]
--- response_body_like eval
[
    (::exactly(::error_json('Path parameters (";") are not accepted.',
                            'invalid_request_error',
                            'invalid_request_error'))) x 2,
    ::balance_re(paid => 10000),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 16: a long model name of two-byte characters: 404 in JSON, not a 500
The message that names the model is cut at 2048 bytes; cut inside a
character it is no longer UTF-8, and the JSON answer cannot be made.
--- init
subscriber(paid => 10000);
--- more_headers eval
[$::Auth, $::Auth, ""]
--- request eval
[
    ::chat('{"model":"' . ("\xc3\xa9" x 1018) . '","messages":[]}'),
    ::chat('{"model":"' . ("\xc3\xa9" x 1019) . '","messages":[]}'),
    "GET /a/subscribers/sub_1",
]
--- error_code eval
[404, 404, 200]
--- response_body_like eval
[
    (qr/\A\{"error":\{"message":"The model \\"(?:\xc3\xa9)+/) x 2,
    ::balance_re(paid => 10000),
]
--- no_error_log
[error]
[alert]
[crit]
