# The log format of conf/access-log.conf (the example itself is started
# by t/005-conf.t): its line for a metered request holds the same request
# id, subscriber, MSISDN, model, tokens, points and usage source as the
# usage record the request left, the upstream of the model and the balance
# after settlement; for refused requests the variables that do not apply
# are empty: all of them without a valid key, all but the subscriber and
# the MSISDN before the model is known.
#
# The log_format statement is read from the example, so the test follows
# it.  t/TokenMeter/Ledger.pm has the configuration and the helpers (the
# mock upstream listens on $TEST_NGINX_MOCK_PORT).

use t::TokenMeter;
use t::TokenMeter::Ledger;

ledger_defaults();
no_shuffle();
run_tests();

# the log_format statement of conf/access-log.conf
sub example_log_format {
    my $file = "$t::TokenMeter::Root/conf/access-log.conf";

    open my $fh, '<', $file or die "cannot read $file: $!";
    local $/;
    my $text = <$fh>;

    my ($statement) = $text =~ /^(\s*log_format\s.*?;)\s*$/ms
        or die "no log_format in $file";

    return "$statement\n";
}

# the lines of logs/token-meter.log for the metered requests, decoded
sub log_lines {
    my $file = server_root() . '/logs/token-meter.log';

    open my $fh, '<', $file or die "cannot read $file: $!";

    return [map { json_decode($_) } grep { m{"request":"POST /v1/} } <$fh>];
}

__DATA__

=== TEST 1: every metered request has a line that matches its record
--- http_config eval
::example_log_format()
--- config
    location = /v1/chat/completions {
        token_meter on;
        access_log logs/token-meter.log token_meter;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_pass http://$token_meter_upstream;
    }
--- init
my ($id, $key) = new_subscriber(paid => 1000);

my @status = map { (meter(key => $key, %$_))[0] }
    {}, { model => 'qwen3-max' }, { 'X-Mock-Cached-Tokens' => 3 },
    { 'X-Mock-Mode' => 'error500' };

is_deeply(\@status, [200, 200, 200, 500], 'TEST 1: four metered requests');

my $records = usage_all($id);
my $lines = ::log_lines();

is(scalar @$lines, 4, 'TEST 1: four lines');

my $balance = 1000;

for my $i (0 .. 3) {
    my $r = $records->[$i];
    my $l = $lines->[$i] // {};

    $balance -= $r->{points};

    is_deeply({ map { $_ => $l->{$_} }
                qw(request_id subscriber msisdn model input_tokens
                   cached_tokens output_tokens points usage_source upstream
                   balance status) },
              { request_id => $r->{request_id}, subscriber => $id,
                msisdn => $r->{msisdn}, model => $r->{model},
                input_tokens => $r->{input_tokens},
                cached_tokens => $r->{cached_tokens},
                output_tokens => $r->{output_tokens},
                points => $r->{points}, usage_source => $r->{usage_source},
                upstream => 'mock', balance => $balance,
                status => $r->{status} },
              "TEST 1: line $i is its record");
}
--- request
GET /a/subscribers/sub_1
--- response_body_like eval
qr/"balance":\{"paid":870,/
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: refused requests: only what was known by then
--- init
new_subscriber(msisdn => '+8613900139000', key => 'sk-test-poor-0000000001');

my @status = map { (meter(%$_))[0] }
    {}, { key => 'sk-test-poor-0000000001' },
    { key => 'sk-test-poor-0000000001', model => 'gpt-0' };

is_deeply(\@status, [401, 402, 404], 'TEST 2: three refusals');

my @lines = @{ ::log_lines() }[4 .. 6];
my @fields = qw(subscriber msisdn model upstream input_tokens cached_tokens
                output_tokens points balance usage_source);

# no key: nothing is known
is_deeply({ map { $_ => $lines[0]{$_} } @fields, 'request_id' },
          { map { $_ => '' } @fields, 'request_id' },
          'TEST 2: no key: every variable is empty');

# no points: the subscriber, the model and the balance are known
is_deeply({ map { $_ => $lines[1]{$_} } @fields },
          { (map { $_ => '' } @fields), subscriber => 'sub_2',
            msisdn => '+8613900139000', model => 'kimi-k2.5',
            upstream => 'mock', balance => 0 },
          'TEST 2: no points: who, which model, and the balance');

like($lines[1]{request_id}, qr/^[0-9a-f]{32}$/,
     'TEST 2: a request id, though no record has it');

# an unknown model: who asked, nothing else
is_deeply({ map { $_ => $lines[2]{$_} } @fields, 'request_id' },
          { (map { $_ => '' } @fields, 'request_id'),
            subscriber => 'sub_2', msisdn => '+8613900139000' },
          'TEST 2: unknown model: the subscriber and the MSISDN only');

is(scalar @{ usage_all('sub_2') }, 0, 'TEST 2: refusals leave no record');
--- request
GET /a/subscribers/sub_2/usage
--- response_body
{"object":"list","data":[],"has_more":false,"next_cursor":null}
--- no_error_log
[error]
[alert]
[crit]
