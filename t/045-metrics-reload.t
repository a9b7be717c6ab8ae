# The metrics counters live in shared memory that a reload hands to the
# new workers: after "nginx -s reload" (SIGHUP to the same master) they
# go on from where they were; a model added by the reload starts at zero.
#
# Every block reloads the running nginx (use_hup); they run in order on
# one store.  t/TokenMeter/Ledger.pm has the configuration and the
# helpers (the mock upstream listens on $TEST_NGINX_MOCK_PORT).

use t::TokenMeter;
use t::TokenMeter::Ledger;

ledger_defaults();
use_hup();
no_shuffle();
run_tests();

sub master_pid {
    open my $fh, '<', server_root() . '/logs/nginx.pid' or return 0;
    my $pid = <$fh>;

    return $pid ? $pid + 0 : 0;
}

__DATA__

=== TEST 1: some traffic before the reload
--- config
--- init
(undef, $main::Key) = new_subscriber(paid => 100000);

meter(key => $main::Key) for 1 .. 3;
meter(key => $main::Key, model => 'qwen3-max');
meter(key => 'sk-nobody');

$main::Master = ::master_pid();

ok($main::Master, 'TEST 1: nginx runs with a master process');
--- request
GET /metrics
--- response_body_like eval
qr/^token_meter_requests_total\{model="kimi-k2\.5",outcome="upstream"\} 3\n.*^token_meter_requests_total\{model="qwen3-max",outcome="upstream"\} 1\n.*^token_meter_points_total\{model="kimi-k2\.5"\} 90\n.*^token_meter_rejections_total\{reason="invalid_api_key"\} 1\n.*^token_meter_settlement_seconds_count 4\n/ms
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: a reload that adds a model keeps the counters of the others
--- http_config
    token_meter_model deepseek-chat upstream=mock
                      input=0.5 cached=0.05 output=2 max_output=100;
--- config
--- init
is(::master_pid(), $main::Master, 'TEST 2: the same master: a reload');

meter(key => $main::Key);
meter(key => $main::Key, model => 'deepseek-chat');
--- request
GET /metrics
--- response_body_like eval
qr/\A# HELP token_meter_requests_total .*\n# TYPE .*\ntoken_meter_requests_total\{model="kimi-k2\.5",outcome="upstream"\} 4\n.*\ntoken_meter_requests_total\{model="qwen3-max",outcome="upstream"\} 1\n.*\ntoken_meter_requests_total\{model="deepseek-chat",outcome="upstream"\} 1\n.*^token_meter_points_total\{model="kimi-k2\.5"\} 120\n^token_meter_points_total\{model="qwen3-max"\} 72\n^token_meter_points_total\{model="deepseek-chat"\} 15\n.*^token_meter_rejections_total\{reason="invalid_api_key"\} 1\n.*^token_meter_settlement_seconds_count 6\n/ms
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: and another reload loses nothing either
--- http_config
    token_meter_model deepseek-chat upstream=mock
                      input=0.5 cached=0.05 output=2 max_output=100;
--- config
    location = /other {
        return 204;
    }
--- init
is(::master_pid(), $main::Master, 'TEST 3: still the same master');
--- request
GET /metrics
--- response_body_like eval
qr/^token_meter_requests_total\{model="kimi-k2\.5",outcome="upstream"\} 4\n.*^token_meter_requests_total\{model="deepseek-chat",outcome="upstream"\} 1\n.*^token_meter_tokens_total\{model="deepseek-chat",kind="output"\} 5\n.*^token_meter_rejections_total\{reason="invalid_api_key"\} 1\n.*^token_meter_settlement_seconds_count 6\n/ms
--- no_error_log
[error]
[alert]
[crit]
