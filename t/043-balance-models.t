# What a subscriber may ask without the admin key: its own balance
# (token_meter_balance, with its API key) and the model list with prices
# (token_meter_models, open to all).
#
# The blocks run in order on one store; trials of 1000 points last an
# hour.  t/TokenMeter/Ledger.pm has the configuration and the helpers (the
# mock upstream listens on $TEST_NGINX_MOCK_PORT).

use t::TokenMeter;
use t::TokenMeter::Ledger;

use IO::Socket::INET ();
use IO::Select ();

ledger_defaults();
no_shuffle();
run_tests();

# the balance answer of sub_1, +8613800138000
sub balance_re {
    my (%b) = @_;

    my $trial = $b{trial} // 1000;
    my $paid = $b{paid} // 500;
    my $reserved = $b{reserved} // '0';
    my $available = $b{available} // $trial + $paid;
    my $status = $b{status} // 'active';

    return qr/\A\{"paid":$paid,"grants":\[\{"kind":"trial","points":$trial,"expires_at":"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)"\}\],"reserved":$reserved,"available":$available,"object":"balance","subscriber":"sub_1","msisdn":"\+8613800138000","status":"$status","trial_expires_at":"\1"\}\n\z/;
}

# A streamed request that holds its reservation while its answer comes,
# a token every 300 ms; returns once the response head is in.  Keep-alive,
# so that nginx settles as soon as the answer is complete.
sub slow_request {
    my ($key) = @_;

    my $body = '{"model":"kimi-k2.5","max_tokens":5,"stream":true,'
               . '"messages":[]}';
    my $sock = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
                                     PeerPort => $ENV{TEST_NGINX_SERVER_PORT},
                                     Timeout => 5)
        or die "cannot connect: $!";

    print $sock "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                . "Authorization: Bearer $key\r\nX-Mock-Delay-Ms: 300\r\n"
                . "Content-Length: " . length($body) . "\r\n\r\n$body";

    read_until($sock, qr/\r\n\r\n/);

    return $sock;
}

# reads until the pattern matches what the socket gave so far
sub read_until {
    my ($sock, $re) = @_;

    my $sel = IO::Select->new($sock);

    ${*$sock}{got} //= '';

    while (${*$sock}{got} !~ $re && $sel->can_read(5)) {
        sysread($sock, my $buf, 65536) or last;
        ${*$sock}{got} .= $buf;
    }

    return ${*$sock}{got};
}

__DATA__

=== TEST 1: the balance, with the key as a Bearer token or in x-api-key
--- http_config
    token_meter_trial 1000 1h;
--- config
--- init
new_subscriber(key => 'sk-test-balance-one-0001', paid => 500);
--- more_headers eval
["Authorization: Bearer sk-test-balance-one-0001",
 "x-api-key: sk-test-balance-one-0001",
 "Authorization: bearer sk-test-balance-one-0001"]
--- request eval
["GET /v1/balance", "GET /v1/balance", "GET /v1/balance"]
--- response_headers eval
[("Content-Type: application/json") x 3]
--- response_body_like eval
[(::balance_re()) x 3]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: without a key, or with a wrong one, 401
--- more_headers eval
["", "Authorization: Bearer sk-test-balance-one-0002",
 "x-api-key: sk-test-balance-one-000", "Authorization: Basic c2s6eA=="]
--- request eval
[("GET /v1/balance") x 4]
--- error_code eval
[401, 401, 401, 401]
--- response_body eval
['{"error":{"message":"You didn\'t provide an API key.",'
 . '"type":"invalid_request_error","param":null,'
 . '"code":"invalid_api_key"}}' . "\n",
 ('{"error":{"message":"Incorrect API key provided.",'
  . '"type":"invalid_request_error","param":null,'
  . '"code":"invalid_api_key"}}' . "\n") x 2,
 '{"error":{"message":"You didn\'t provide an API key.",'
 . '"type":"invalid_request_error","param":null,'
 . '"code":"invalid_api_key"}}' . "\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: GET and HEAD only
--- more_headers
x-api-key: sk-test-balance-one-0001
--- request eval
["POST /v1/balance\n{}", "HEAD /v1/balance"]
--- error_code eval
[405, 200]
--- response_body eval
['{"error":{"message":"Use GET for the balance.",'
 . '"type":"invalid_request_error","param":null,'
 . '"code":"method_not_allowed"}}' . "\n", ""]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 4: spending takes the trial first; a running request is reserved
--- init
my ($status) = meter(key => 'sk-test-balance-one-0001');

is($status, 200, 'TEST 4: a metered request of 30 points');

my $slow = ::slow_request('sk-test-balance-one-0001');

my $res = api('GET', '/v1/balance', undef,
              'x-api-key' => 'sk-test-balance-one-0001');

like($res->{content}, qr/"reserved":[1-9]\d*,/,
     'TEST 4: points are reserved while a request runs');

my $answer = ::read_until($slow, qr/\r\n0\r\n\r\n\z/);

like($answer, qr{\AHTTP/1\.1 200 .*data: \[DONE\]}s,
     'TEST 4: the slow request ends well');

close $slow;
--- more_headers
x-api-key: sk-test-balance-one-0001
--- request
GET /v1/balance
--- response_body_like eval
::balance_re(trial => 940, available => 1440)
--- no_error_log
[error]
[alert]
[crit]



=== TEST 5: a suspended subscriber sees its balance and its status
--- init
admin_json('PATCH', '/subscribers/sub_1', '{"status":"suspended"}');
--- more_headers
x-api-key: sk-test-balance-one-0001
--- request
GET /v1/balance
--- response_body_like eval
::balance_re(trial => 940, available => 1440, status => 'suspended')
--- no_error_log
[error]
[alert]
[crit]



=== TEST 6: the key of a closed subscriber no longer works
--- init
admin_json('DELETE', '/subscribers/sub_1');
--- more_headers
x-api-key: sk-test-balance-one-0001
--- request
GET /v1/balance
--- error_code: 401
--- response_body_like eval
qr/"code":"invalid_api_key"/
--- no_error_log
[error]
[alert]
[crit]



=== TEST 7: without a trial, trial_expires_at is null
--- http_config
    token_meter_trial 0;
--- config
--- init
new_subscriber(msisdn => '+8613900139000', key => 'sk-test-balance-two-0001',
               paid => 77);
--- more_headers
Authorization: Bearer sk-test-balance-two-0001
--- request
GET /v1/balance
--- response_body
{"paid":77,"grants":[],"reserved":0,"available":77,"object":"balance","subscriber":"sub_2","msisdn":"+8613900139000","status":"active","trial_expires_at":null}
--- no_error_log
[error]
[alert]
[crit]



=== TEST 8: 405 answers say which methods are allowed
--- more_headers
Authorization: Bearer sk-test-balance-two-0001
--- request eval
["POST /v1/balance\n{}", "POST /v1/models\n{}", "POST /metrics\n{}"]
--- error_code eval
[405, 405, 405]
--- response_headers eval
[("Allow: GET, HEAD") x 3]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 9: the model list: configuration order, prices as strings
--- http_config
    upstream cheap {
        server 127.0.0.1:$TEST_NGINX_MOCK_PORT;
    }

    token_meter_model tiny-1 upstream=cheap upstream_model=tiny-1-0325
                      input=0.001 cached=0 output=12.5 max_output=7;
--- config
--- request eval
["GET /v1/models", "HEAD /v1/models"]
--- response_headers eval
["Content-Type: application/json", ""]
--- response_body eval
['{"object":"list","data":[{"id":"kimi-k2.5","object":"model","created":0,'
 . '"owned_by":"mock","max_output_tokens":1000,"pricing":{"input":"1",'
 . '"cached_input":"0.25","output":"4","unit":"points per token"}},'
 . '{"id":"qwen3-max","object":"model","created":0,"owned_by":"mock",'
 . '"max_output_tokens":100,"pricing":{"input":"2.4","cached_input":"0.6",'
 . '"output":"9.6","unit":"points per token"}},'
 . '{"id":"tiny-1","object":"model","created":0,"owned_by":"cheap",'
 . '"max_output_tokens":7,"pricing":{"input":"0.001","cached_input":"0",'
 . '"output":"12.5","unit":"points per token"}}]}' . "\n", ""]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 10: the model list needs no key, and ignores a wrong one
--- more_headers
Authorization: Bearer sk-nobody
--- request
GET /v1/models
--- response_body_like eval
qr/\A\{"object":"list","data":\[\{"id":"kimi-k2\.5",/
--- no_error_log
[error]
[alert]
[crit]
