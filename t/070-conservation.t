# Not a point lost or made up under load.  Fifty subscribers, 64 clients
# at once over two workers, a few thousand requests of every kind: plain
# and streamed chat, legacy completions, Responses and embeddings calls,
# clients that hang up in the middle of a stream, upstream errors (500),
# streams and plain answers the upstream cuts, answers without usage, and
# purchases arriving meanwhile, some of them sent twice with one payment
# reference.  Every tenth subscriber starts with its trial grant only, so
# it meets 402 and lowered max_tokens too.
#
# Afterwards, for every subscriber: trial + purchases - the points of its
# usage records = paid + grants left, exactly; nothing stays reserved;
# no balance is below zero; each request that passed admission (it
# reached the upstream: X-Upstream is set) has exactly one usage record,
# also when its client had gone; each purchase reference credited once.
# t/TokenMeter/Load.pm drives the clients and does the bookkeeping.
#
# The load runs from --- init, after nginx has started and before the
# block's own request; its clients are forked from the test and each one
# is bounded in time, as is the whole run.

use t::TokenMeter;
use t::TokenMeter::Load;

master_on();
workers(2);
worker_connections(1024);
log_level('info');
no_shuffle();
run_tests();

__DATA__

=== TEST 1: 3000 requests from 64 clients: every point is accounted for
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store size=64m;
    token_meter_trial 3000 1M;

    upstream mock {
        server 127.0.0.1:$TEST_NGINX_MOCK_PORT;
        keepalive 32;
    }

    token_meter_model kimi-k2.5 upstream=mock
                      input=1 cached=0.25 output=4 max_output=1000;

    log_format points '$token_meter_request_id $token_meter_points';
--- config
    location /v1/ {
        token_meter on;
        access_log logs/points.log points;
        add_header X-Request-Id $token_meter_request_id always;
        add_header X-Upstream $upstream_status always;
        add_header X-Worker $pid always;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_pass http://$token_meter_upstream;
    }

    location /admin/ {
        token_meter_admin;
        token_meter_admin_key $TEST_NGINX_LOAD_ADMIN_HASH;
    }
--- init
$main::Subs = load_subscribers(50, trial => 3000, paid => 200000,
                               poor_every => 10);
$main::Run = load_run(jobs => load_jobs(seed => 2026, count => 3000,
                                        subs => $main::Subs),
                      clients => 64, deadline => 60);
is($main::Run->{killed}, 0, 'all clients finished within 60 s');
is(scalar @{ $main::Run->{results} }, 3000, "all 3000 jobs were sent");
$main::Fig = load_verify(subs => $main::Subs, run => $main::Run,
                         access_log => server_root() . '/logs/points.log');
diag(load_summary($main::Fig));
ok($main::Fig->{$_}, "the load had $_")
    for 'hung up', 'kind cut', 'kind cut_plain', 'kind error500',
        'kind no_usage', 'kind replay', 'status 402', 'status 500';
--- more_headers eval
"Authorization: Bearer $::LoadAdminKey"
--- request
GET /admin/subscribers/sub_1
--- response_body_like: "reserved":0,
--- error_log
upstream prematurely closed connection
--- no_error_log
token meter released
could not settle
[alert]
[crit]
[emerg]



=== TEST 2: after a restart the store tells the same, to the point
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store size=64m;
    token_meter_trial 3000 1M;

    upstream mock {
        server 127.0.0.1:$TEST_NGINX_MOCK_PORT;
    }

    token_meter_model kimi-k2.5 upstream=mock
                      input=1 cached=0.25 output=4 max_output=1000;
--- config
    location /admin/ {
        token_meter_admin;
        token_meter_admin_key $TEST_NGINX_LOAD_ADMIN_HASH;
    }
--- init
my $again = load_verify(subs => $main::Subs, run => $main::Run,
                        name => 'after the restart');
is($again->{records}, $main::Fig->{records}, 'as many records as before');
is($again->{charged}, $main::Fig->{charged}, 'as many points charged');
--- more_headers eval
"Authorization: Bearer $::LoadAdminKey"
--- request
GET /admin/subscribers/sub_50
--- response_body_like: "reserved":0,
--- no_error_log
created with schema version
[error]
[alert]
[crit]
