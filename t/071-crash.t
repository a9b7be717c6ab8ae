# Crashes and restarts under load: a worker killed with SIGKILL in the
# middle of streams, a reload (SIGHUP) and a binary upgrade (USR2, then
# QUIT to the old master) while 64 clients keep sending.  Nothing may be
# charged twice or lost:
#
# - after SIGKILL, the requests of the dead worker have no usage record
#   and cost nothing; the sweep (worker 0, every 2 s) gives their
#   reservations back, and everything else is settled as usual;
# - a reload or an upgrade loses no usage record and no purchase: the old
#   workers finish their requests and settle them before they exit.
#
# Each block has its own store, so that its subscribers are sub_1 ...;
# t/TokenMeter/Load.pm drives the clients and checks the books.  The
# metered location says in X-Worker which worker served a request.

use t::TokenMeter;
use t::TokenMeter::Load;

master_on();
workers(2);
worker_connections(1024);
log_level('info');

add_block_preprocessor(sub {
    my ($block) = @_;
    my ($n) = $block->name =~ /TEST (\d+)/;

    $block->set_value('http_config', <<"EOC" . <<'EOC');
    token_meter_store \$TEST_NGINX_STORE_DIR/store$n size=64m;
EOC
    token_meter_trial 0;

    upstream mock {
        server 127.0.0.1:$TEST_NGINX_MOCK_PORT;
        keepalive 32;
    }

    token_meter_model kimi-k2.5 upstream=mock
                      input=1 cached=0.25 output=4 max_output=1000;
EOC

    $block->set_value('config', <<'EOC');
    location /v1/ {
        token_meter on;
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
EOC

    $block->set_value('more_headers',
                      "Authorization: Bearer $LoadAdminKey\n");
});

# The jobs of the load blocks: no hang-ups or purchases when a worker is
# killed (a purchase the worker committed just before it died would have
# no answer to count it by), all kinds otherwise.
our %CrashMix = (chat => 20, stream => 20, stream_usage => 5,
                 completion => 5, responses => 5, responses_stream => 5,
                 embeddings => 4, error500 => 6, cut => 6, no_usage => 5);

no_shuffle();
run_tests();

__DATA__

=== TEST 1: SIGKILL to a worker in the middle of 24 slow streams
--- init
my $subs = load_subscribers(4, paid => 1_000_000);

# 24 streams of 30 tokens, 100 ms apart: 3 s each
my $streams = open_streams($subs, 24, delay => 100, tokens => 30);

my %on;
$on{$_->{worker}}++ for @$streams;
my ($victim) = sort { $on{$b} <=> $on{$a} || $a <=> $b } keys %on;
my $master = nginx_master();

diag("streams per worker: "
     . join(', ', map { "$_: $on{$_}" } sort keys %on)
     . "; killing $victim");

kill 'KILL', $victim;
finish_streams($streams, 15);

my @dead = grep { $_->{worker} == $victim } @$streams;
is(scalar(grep { $_->{complete} } @dead), 0,
   "the $on{$victim} streams of the killed worker were cut short");
is(scalar(grep { !$_->{complete} && $_->{worker} != $victim } @$streams),
   0, 'the streams of the other worker came to their end');

ok(wait_for(8, sub { reserved_total($subs) == 0 }),
   'the sweep released the reservations within 8 s');

my $log = error_log_text();
my $release = 'token meter released \d+ reserved points of sub_\d: '
              . 'the worker process that held them exited';
my $released = () = $log =~ /$release/g;
is($released, scalar @dead, 'one release for each stream of the dead worker');
like($log, qr/worker process $victim exited on signal 9/,
     'the master saw the worker die');

my $fig = load_verify(subs => $subs,
                      run => { results => $streams, jobs => 24 },
                      lost_ok => sub { $_[0]{worker} == $victim });
diag(load_summary($fig));
is($fig->{'lost with the killed worker'}, scalar @dead,
   'no record for the requests of the killed worker, and no charge');

my @workers = nginx_workers($master);
is(scalar @workers, 2, 'the master started a new worker');
ok(!grep({ $_ == $victim } @workers), 'the killed worker is gone');
--- request
GET /admin/subscribers/sub_1
--- response_body_like: "reserved":0,
--- error_log
exited on signal 9
[alert]
--- no_error_log
could not settle
[crit]
[emerg]



=== TEST 2: SIGKILL to a worker under load from 64 clients
--- init
my $subs = load_subscribers(20, paid => 1_000_000);
my $master = nginx_master();
my $victim;

my $run = load_run(
    jobs => load_jobs(seed => 71, count => 1500, subs => $subs,
                      mix => \%main::CrashMix),
    clients => 64, deadline => 60,
    actions => [[1.5, sub {
        ($victim) = nginx_workers($master);
        kill 'KILL', $victim;
        return "killed worker $victim";
    }]]);

diag(join '; ', @{ $run->{notes} });
is($run->{killed}, 0, 'all clients finished within 60 s');
ok(wait_for(8, sub { reserved_total($subs) == 0 }),
   'the sweep released the reservations within 8 s');

my $fig = load_verify(subs => $subs, run => $run,
                      lost_ok => sub { $_[0]{worker}
                                       && $_[0]{worker} == $victim
                                       || !$_[0]{status} });
diag(load_summary($fig));
# a request the worker held died with it: after its answer began
# (admitted, no record), or before (the client got no answer at all)
ok($fig->{'lost with the killed worker'} || $fig->{'status 0'},
   'some requests died with the worker');
--- request
GET /admin/subscribers/sub_1
--- response_body_like: "reserved":0,
--- error_log
exited on signal 9
[alert]
--- no_error_log
could not settle
[crit]
[emerg]



=== TEST 3: two reloads (SIGHUP) under load lose no record and no purchase
--- init
my $subs = load_subscribers(30, trial => 0, paid => 300_000,
                            poor_every => 10);
my $master = nginx_master();
my @before = nginx_workers($master);

my $run = load_run(
    jobs => load_jobs(seed => 72, count => 1500, subs => $subs),
    clients => 64, deadline => 60,
    actions => [map { my $t = $_;
                      [$t, sub { kill 'HUP', $master; "SIGHUP at $t s" }] }
                0.5, 1.5]);

diag(join '; ', @{ $run->{notes} });
is($run->{killed}, 0, 'all clients finished within 60 s');
unlike($run->{notes}[0] // '', qr/after the load/,
       'the first reload came during the load');
is(nginx_master(), $master, 'the same master');
ok(wait_for(10, sub { my @w = nginx_workers($master);
                      @w == 2 && !grep { my $o = $_; grep { $_ == $o } @w }
                                       @before }),
   'two new workers, the old ones gone');

my $fig = load_verify(subs => $subs, run => $run);
diag(load_summary($fig));
--- request
GET /admin/subscribers/sub_1
--- response_body_like: "reserved":0,
--- error_log
reconfiguring
--- no_error_log
token meter released
could not settle
[alert]
[crit]
[emerg]



=== TEST 4: a binary upgrade (USR2, then QUIT to the old master) under load
The new binary gets only the environment that "env" passes on; "make
check-asan" loads its sanitizer runtime with LD_PRELOAD.
--- main_config
    env LD_PRELOAD;
    env ASAN_OPTIONS;
    env UBSAN_OPTIONS;
--- init
my $subs = load_subscribers(30, trial => 0, paid => 300_000,
                            poor_every => 10);
my $old = nginx_master();
my $pidfile = server_root() . '/logs/nginx.pid';
my $new;

my $run = load_run(
    jobs => load_jobs(seed => 73, count => 1500, subs => $subs),
    clients => 64, deadline => 60,
    actions => [
        [0.5, sub { kill 'USR2', $old; "USR2 to $old" }],
        [1.5, sub {
            $new = wait_for(3, sub { my $p = nginx_master();
                                     $p && $p != $old ? $p : 0 });
            return "no new master" unless $new;
            kill 'QUIT', $old;
            return "new master $new, QUIT to $old";
        }]]);

diag(join '; ', @{ $run->{notes} });
is($run->{killed}, 0, 'all clients finished within 60 s');
unlike($run->{notes}[0] // '', qr/after the load/,
       'the upgrade began during the load');
ok($new, 'the new binary started a master');
ok(wait_for(10, sub { !process_alive($old) }), 'the old master is gone');
ok(!-e "$pidfile.oldbin", 'its pid file too');
is(scalar(my @w = nginx_workers($new // 0)), 2,
   'the new master has two workers');

my $fig = load_verify(subs => $subs, run => $run);
diag(load_summary($fig));
--- request
GET /admin/subscribers/sub_1
--- response_body_like: "reserved":0,
--- no_error_log
token meter released
could not settle
[alert]
[crit]
[emerg]
