# A reload (SIGHUP) keeps the store: the master checks it again while it
# loads the new configuration, the new workers open it, and what the old
# workers wrote is there.  The new configuration takes effect at once.

BEGIN {
    $ENV{TEST_NGINX_USE_HUP} = 1;
}

use t::TokenMeter;
use t::TokenMeter::Admin;

master_on();
workers(2);
no_shuffle();
run_tests();


sub master_pid {
    open my $fh, '<', server_root() . '/logs/nginx.pid'
        or die "cannot read the pid file: $!";
    my $pid = <$fh>;
    close $fh;

    chomp $pid;
    return $pid;
}


__DATA__

=== TEST 1: the first configuration creates a subscriber
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store;
--- config
    location /admin/ {
        token_meter_admin;
        token_meter_admin_key sha256:$TEST_NGINX_ADMIN_HASH;
    }
--- init
$main::first_master = ::master_pid();
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
POST /admin/subscribers
{"msisdn":"+8613800138000","api_key":"sk-tm-test-alice-000000000000000001"}
--- error_code: 201
--- response_body_like chomp
^\{"id":"sub_1",.*"available":25000000\},"api_key":
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: after a reload with a new rate: same store, new rate
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store;
    token_meter_points_per_yuan 100;
--- config
    location /admin/ {
        token_meter_admin;
        token_meter_admin_key sha256:$TEST_NGINX_ADMIN_HASH;
    }
--- init
# (--- init runs in the runner's package: call Test::More by its name)
Test::More::is(::master_pid(), $main::first_master,
               'the master survived the reload');
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
POST /admin/subscribers/sub_1/purchases
{"yuan":"1.00","reference":"reload-pay-1"}
--- error_code: 201
--- response_body_like chomp
^\{"reference":"reload-pay-1","subscriber":"sub_1","points":100,"yuan":"1\.00",.*"balance":\{"paid":100,
--- no_error_log
created with schema version
[error]
[alert]
[crit]



=== TEST 3: another reload, to sync=100ms: both writes are there
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store sync=100ms;
    token_meter_points_per_yuan 100;
--- config
    location /admin/ {
        token_meter_admin;
        token_meter_admin_key sha256:$TEST_NGINX_ADMIN_HASH;
    }
--- init
Test::More::is(::master_pid(), $main::first_master,
               'the master survived two reloads');
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    "GET /admin/subscribers/sub_1",
    "POST /admin/subscribers/sub_1/purchases\n"
    . '{"yuan":"1.00","reference":"reload-pay-1"}',
]
--- error_code eval
[200, 200]
--- response_body_like eval
[
    qr/^\{"id":"sub_1",.*"balance":\{"paid":100,.*"available":25000100\}\}\n\z/,
    qr/^\{"reference":"reload-pay-1",.*"points":100,/,
]
--- no_error_log
created with schema version
[error]
[alert]
[crit]
