# token_meter_metrics: the Prometheus page.  After a mixed load (answers
# with usage, without usage, upstream errors, refusals of every kind) the
# counters agree with the usage records the requests left: per model and
# outcome, tokens by kind, points; refusals by reason; one settlement
# observed per record.  Two workers share the counters; a restart resets
# them, the records stay.
#
# The blocks run in order on one store.  t/TokenMeter/Ledger.pm has the
# configuration and the helpers (the mock upstream listens on
# $TEST_NGINX_MOCK_PORT).

use t::TokenMeter;
use t::TokenMeter::Ledger;

use IO::Select ();
use IO::Socket::INET ();
use t::TokenMeter::Load qw(http_request);

ledger_defaults();
master_on();
workers(2);
no_shuffle();
run_tests();

# What the counters of one model should say, from its records.
sub expected_from_records {
    my ($records) = @_;

    my %m;

    for my $r (@$records) {
        my $model = $r->{model};
        my $outcome = $r->{usage_source} eq 'upstream' ? 'upstream'
                      : $r->{status} >= 200 && $r->{status} < 300
                        ? 'estimated' : 'upstream_error';

        $m{qq(token_meter_requests_total{model="$model",outcome="$_"})} //= 0
            for qw(upstream estimated upstream_error);
        $m{qq(token_meter_requests_total{model="$model",outcome="$outcome"})}++;

        for my $kind (qw(input cached output)) {
            $m{qq(token_meter_tokens_total{model="$model",kind="$kind"})}
                += $r->{"${kind}_tokens"};
        }

        $m{qq(token_meter_points_total{model="$model"})} += $r->{points};
    }

    return \%m;
}

sub reasons {
    return qw(invalid_api_key account_suspended invalid_request_error
              model_not_found insufficient_quota store_unavailable
              request_too_large method_not_allowed store_full);
}

# The whole page when every counter is zero; the store's bytes in use are
# whatever they are.
sub zero_page_re {
    my $page = <<'EOP';
# HELP token_meter_requests_total Metered requests settled, by model and where the usage came from.
# TYPE token_meter_requests_total counter
token_meter_requests_total{model="kimi-k2.5",outcome="upstream"} 0
token_meter_requests_total{model="kimi-k2.5",outcome="estimated"} 0
token_meter_requests_total{model="kimi-k2.5",outcome="upstream_error"} 0
token_meter_requests_total{model="qwen3-max",outcome="upstream"} 0
token_meter_requests_total{model="qwen3-max",outcome="estimated"} 0
token_meter_requests_total{model="qwen3-max",outcome="upstream_error"} 0
# HELP token_meter_tokens_total Tokens settled, by model and kind.
# TYPE token_meter_tokens_total counter
token_meter_tokens_total{model="kimi-k2.5",kind="input"} 0
token_meter_tokens_total{model="kimi-k2.5",kind="cached"} 0
token_meter_tokens_total{model="kimi-k2.5",kind="output"} 0
token_meter_tokens_total{model="qwen3-max",kind="input"} 0
token_meter_tokens_total{model="qwen3-max",kind="cached"} 0
token_meter_tokens_total{model="qwen3-max",kind="output"} 0
# HELP token_meter_points_total Points charged, by model.
# TYPE token_meter_points_total counter
token_meter_points_total{model="kimi-k2.5"} 0
token_meter_points_total{model="qwen3-max"} 0
# HELP token_meter_rejections_total Requests refused before reaching an upstream, by reason.
# TYPE token_meter_rejections_total counter
EOP

    $page .= qq(token_meter_rejections_total{reason="$_"} 0\n) for ::reasons();

    $page .= <<'EOP';
# HELP token_meter_settlement_seconds Time spent settling a request in the store.
# TYPE token_meter_settlement_seconds histogram
EOP

    $page .= qq(token_meter_settlement_seconds_bucket{le="$_"} 0\n)
        for qw(0.000050 0.000100 0.000250 0.000500 0.001000 0.002500
               0.005000 0.010000 0.025000 +Inf);

    $page .= <<'EOP';
token_meter_settlement_seconds_sum 0.000000
token_meter_settlement_seconds_count 0
# HELP token_meter_store_bytes Size of the store's map and the part of it in use.
# TYPE token_meter_store_bytes gauge
token_meter_store_bytes{kind="size"} 67108864
token_meter_store_bytes{kind="used"} USED
# HELP token_meter_reservations_open Reservations of requests not yet settled.
# TYPE token_meter_reservations_open gauge
token_meter_reservations_open 0
EOP

    my $re = quotemeta $page;
    $re =~ s/USED/[1-9][0-9]*/;

    return qr/\A$re\z/;
}

__DATA__

=== TEST 1: after a mixed load the counters agree with the usage records
--- config
--- init
my ($s1, $k1) = new_subscriber(paid => 100000);

$main::Key = $k1;
my ($s2, $k2) = new_subscriber(msisdn => '+8613900139000');
my ($s3, $k3) = new_subscriber(msisdn => '+8613700137000', paid => 1000);

admin_json('PATCH', "/subscribers/$s3", '{"status":"suspended"}');

my @status;

push @status, (meter(key => $k1))[0] for 1 .. 4;
push @status, (meter(key => $k1, 'X-Mock-Cached-Tokens' => 4))[0];
push @status, (meter(key => $k1, model => 'qwen3-max'))[0] for 1 .. 2;
push @status, (meter(key => $k1, model => 'qwen3-max',
                     'X-Mock-Mode' => 'no-usage'))[0];
push @status, (meter(key => $k1, 'X-Mock-Mode' => 'error500'))[0] for 1 .. 2;
push @status, (meter(key => $k1, 'X-Mock-Mode' => 'error429'))[0];
push @status, (meter(key => $k1, 'X-Mock-Prompt-Tokens' => 1234,
                     'X-Mock-Completion-Tokens' => 7))[0];

# refusals: no key twice, a wrong key, an unknown model, a body that is
# not JSON, no points, a suspended subscriber, a GET
push @status, (meter())[0] for 1 .. 2;
push @status, (meter(key => 'sk-nobody-at-all'))[0];
push @status, (meter(key => $k1, model => 'gpt-0'))[0];
push @status, api('POST', '/v1/chat/completions', 'not json',
                  Authorization => "Bearer $k1")->{status};
push @status, (meter(key => $k2))[0];
push @status, (meter(key => $k3))[0];
push @status, api('GET', '/v1/chat/completions', undef,
                  Authorization => "Bearer $k1")->{status};

is_deeply(\@status, [(200) x 8, 500, 500, 429, 200,
                     401, 401, 401, 404, 400, 402, 403, 405],
          'TEST 1: the statuses of the load');

my @records = map { @{ usage_all($_) } } $s1, $s2, $s3;
my $want = ::expected_from_records(\@records);
my $got = metrics();

is_deeply({ map { $_ => $got->{$_} } keys %$want }, $want,
          'TEST 1: requests, tokens and points agree with the records');

is(scalar(grep { /^token_meter_(requests|tokens|points)_total\{/ }
           keys %$got), scalar(keys %$want),
   'TEST 1: and there are no others');

my %reasons = (invalid_api_key => 3, account_suspended => 1,
               invalid_request_error => 1, model_not_found => 1,
               insufficient_quota => 1, method_not_allowed => 1);

is_deeply({ map { $_ => $got->{qq(token_meter_rejections_total{reason="$_"})} }
            ::reasons() },
          { map { $_ => $reasons{$_} // 0 } ::reasons() },
          'TEST 1: refusals by reason');

is($got->{token_meter_settlement_seconds_count}, scalar @records,
   'TEST 1: one settlement observed per record');
is($got->{'token_meter_settlement_seconds_bucket{le="+Inf"}'},
   scalar @records, 'TEST 1: the +Inf bucket holds them all');

my @buckets = map { $got->{qq(token_meter_settlement_seconds_bucket{le="$_"})} }
              qw(0.000050 0.000100 0.000250 0.000500 0.001000 0.002500
                 0.005000 0.010000 0.025000 +Inf);

is_deeply(\@buckets, [sort { $a <=> $b } @buckets],
          'TEST 1: the buckets are cumulative');
ok($got->{token_meter_settlement_seconds_sum} > 0,
   'TEST 1: settling took some time');

my $used = $got->{'token_meter_store_bytes{kind="used"}'};

ok($used > 0 && $used % 4096 == 0 && $used < 67108864,
   "TEST 1: the store uses $used bytes, whole pages, less than its map");
is($got->{token_meter_reservations_open}, 0,
   'TEST 1: no reservation is left open');

# two workers, one set of counters: every answer says the same
my @pages = map { metrics() } 1 .. 8;

is_deeply(\@pages, [($got) x 8],
          'TEST 1: every worker shows the same counters');
--- request
GET /metrics
--- response_headers
Content-Type: text/plain; version=0.0.4; charset=utf-8
--- response_body_like eval
qr/\A# HELP token_meter_requests_total .*\n# TYPE token_meter_requests_total counter\n(?:token_meter_requests_total\{.*\n){6}# HELP token_meter_tokens_total .*\n# TYPE token_meter_tokens_total counter\n(?:token_meter_tokens_total\{.*\n){6}# HELP token_meter_points_total .*\n# TYPE token_meter_points_total counter\n(?:token_meter_points_total\{.*\n){2}# HELP token_meter_rejections_total .*\n# TYPE token_meter_rejections_total counter\n(?:token_meter_rejections_total\{.*\n){9}# HELP token_meter_settlement_seconds .*\n# TYPE token_meter_settlement_seconds histogram\n(?:token_meter_settlement_seconds_bucket\{.*\n){10}token_meter_settlement_seconds_sum \d+\.\d{6}\ntoken_meter_settlement_seconds_count 12\n# HELP token_meter_store_bytes .*\n# TYPE token_meter_store_bytes gauge\ntoken_meter_store_bytes\{kind="size"\} 67108864\ntoken_meter_store_bytes\{kind="used"\} \d+\n# HELP token_meter_reservations_open .*\n# TYPE token_meter_reservations_open gauge\ntoken_meter_reservations_open 0\n\z/
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: a request in progress holds an open reservation
--- init
my $body = '{"model":"kimi-k2.5","max_tokens":4,"stream":true,"messages":[]}';
my $sock = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
                                 PeerPort => $ENV{TEST_NGINX_SERVER_PORT},
                                 Timeout => 5)
    or die "cannot connect: $!";

print $sock "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
            . "Authorization: Bearer $main::Key\r\n"
            . "X-Mock-Delay-Ms: 250\r\nContent-Length: " . length($body)
            . "\r\n\r\n$body";

my $sel = IO::Select->new($sock);
my $got = '';

while ($got !~ /\r\n\r\n/ && $sel->can_read(5)) {
    sysread($sock, my $buf, 4096) or last;
    $got .= $buf;
}

is(metrics()->{token_meter_reservations_open}, 1,
   'TEST 2: one reservation while the answer streams');

while ($got !~ /\r\n0\r\n\r\n\z/ && $sel->can_read(5)) {
    sysread($sock, my $buf, 4096) or last;
    $got .= $buf;
}

close $sock;

like($got, qr/data: \[DONE\]/, 'TEST 2: the stream ends');

# the worker settles right after the last chunk; the other one may answer
# /metrics before that commit is done
for (1 .. 100) {
    last if metrics()->{token_meter_settlement_seconds_count} == 13;
    select undef, undef, undef, 0.02;
}
--- request
GET /metrics
--- response_body_like eval
qr/\ntoken_meter_settlement_seconds_count 13\n.*\ntoken_meter_reservations_open 0\n\z/s
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: a restart starts the counters again; the records stay
--- config
--- init
is(scalar @{ usage_all('sub_1') }, 13, 'TEST 3: the records are kept');
--- request
GET /metrics
--- response_body_like eval
::zero_page_re()
--- no_error_log
[error]
[alert]
[crit]



=== TEST 4: a body over client_max_body_size counts as request_too_large
nginx refuses it before the module sees it: by its Content-Length, or as
a chunked body arrives; with its own page or with token_meter_error.
--- config
    location = /v1/small {
        token_meter on;
        client_max_body_size 16;
        proxy_pass http://$token_meter_upstream;
    }

    location = /v1/small-json {
        token_meter on;
        client_max_body_size 16;
        error_page 413 @token_meter_error;
        proxy_pass http://$token_meter_upstream;
    }

    location @token_meter_error {
        token_meter_error;
    }
--- init
my $body = '{"model":"kimi-k2.5","max_tokens":10,"messages":[]}';
my @status;

for my $path ('/v1/small', '/v1/small-json') {
    push @status, api('POST', $path, $body,
                      Authorization => "Bearer $main::Key")->{status};

    push @status, http_request(raw => "POST $path HTTP/1.1\r\n"
        . "Host: localhost\r\nConnection: close\r\n"
        . "Authorization: Bearer $main::Key\r\n"
        . "Transfer-Encoding: chunked\r\n\r\n"
        . sprintf("%x\r\n%s\r\n0\r\n\r\n", length $body, $body),
        timeout => 5)->{status};
}

is_deeply(\@status, [413, 413, 413, 413], 'TEST 4: the bodies are refused');
--- request
GET /metrics
--- response_body_like eval
qr/^token_meter_rejections_total\{reason="request_too_large"\} 4\n/m
--- error_log
client intended to send too large body: 51 bytes
client intended to send too large chunked body
--- no_error_log
[alert]
[crit]
