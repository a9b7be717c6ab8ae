# Concurrent admin calls across two workers.  Twenty identical purchases
# (one payment reference) sent at once must credit once: exactly one 201,
# nineteen 200 replays of it.  Twenty creations of one MSISDN at once must
# make one subscriber.
#
# The requests go out as parallel subrequests, each proxied over its own
# new connection to a second server of this nginx.  That server listens
# with "reuseport", so the kernel spreads the connections over both
# workers, which take them at the same time.  /buy and /create print the
# status after each answer and the pid of the worker that gave it.

use t::TokenMeter;
use t::TokenMeter::Admin;

master_on();
workers(2);

$ENV{TEST_NGINX_RACE_PORT} = server_port() + 2;

add_block_preprocessor(sub {
    my ($block) = @_;

    $block->set_value(http_config => <<'EOC') if !defined $block->http_config;
    token_meter_store $TEST_NGINX_STORE_DIR/store;

    server {
        listen 127.0.0.1:$TEST_NGINX_RACE_PORT reuseport;

        location /admin/ {
            token_meter_admin;
            token_meter_admin_key sha256:$TEST_NGINX_ADMIN_HASH;
            add_header X-Worker $pid always;
        }
    }
EOC

    my $twenty = sub { join '', map { "        $_[0]\n" } 1 .. 20 };

    $block->set_value(config => <<"EOC" . <<'EOC') if !defined $block->config;
    location = /race-purchase {
${\ $twenty->(q{echo_subrequest_async POST /buy -b '{"yuan":"1.00","reference":"race-1"}';}) }
    }

    location = /race-create {
${\ $twenty->(q{echo_subrequest_async POST /create -b '{"msisdn":"+8613900139000"}';}) }
    }
EOC
    location /admin/ {
        token_meter_admin;
        token_meter_admin_key sha256:$TEST_NGINX_ADMIN_HASH;
    }

    location = /buy {
        internal;
        proxy_pass http://127.0.0.1:$TEST_NGINX_RACE_PORT/admin/subscribers/sub_1/purchases;
        proxy_set_header Authorization
                         "Bearer tm-test-admin-key-6c1f0e9b2a7d";
        echo_after_body "<<$upstream_status $upstream_http_x_worker>>";
    }

    location = /create {
        internal;
        proxy_pass http://127.0.0.1:$TEST_NGINX_RACE_PORT/admin/subscribers;
        proxy_set_header Authorization
                         "Bearer tm-test-admin-key-6c1f0e9b2a7d";
        echo_after_body "<<$upstream_status $upstream_http_x_worker>>";
    }
EOC
});

no_shuffle();
run_tests();

__DATA__

=== TEST 1: a subscriber
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
POST /admin/subscribers
{"msisdn":"+8613800138000"}
--- error_code: 201
--- response_body_like eval
qr/\A\{"id":"sub_1",/
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: twenty identical purchases at once: one 201, nineteen replays
--- request
GET /race-purchase
--- response_body_like eval
qr/\A
    # exactly one of the twenty is a 201
    (?= (?: (?!<<201\ ) . )* <<201\ (?: (?!<<201\ ) . )* \z )
    # both workers answered
    (?= .* <<\d+\ (\d+)>> .* <<\d+\ (?!\1>>)\d+>> )
    # and all twenty answers are the same bytes, crediting 1.00 yuan once
    ( \{"reference":"race-1","subscriber":"sub_1","points":250000,
        "yuan":"1\.00","created_at":"[^"]+",
        "balance":\{"paid":250000,[^\n]*\}\n )
    <<20[01]\ \d+>>\n
    (?: \2 <<20[01]\ \d+>>\n ){19}
\z/xs
--- error_log
token meter admin: purchase "race-1" credited 250000 points to sub_1
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: the balance holds one purchase
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
GET /admin/subscribers/sub_1
--- response_body_like eval
qr/"balance":\{"paid":250000,"grants":\[\{"kind":"trial","points":25000000,"expires_at":"[^"]+"\}\],"reserved":0,"available":25250000\}\}\n\z/
--- no_error_log
[error]
[alert]
[crit]



=== TEST 4: twenty creations of one MSISDN at once: one subscriber
--- request
GET /race-create
--- response_body_like eval
qr/\A
    # exactly one of the twenty is a 201
    (?= (?: (?!<<201\ ) . )* <<201\ (?: (?!<<201\ ) . )* \z )
    # both workers answered
    (?= .* <<\d+\ (\d+)>> .* <<\d+\ (?!\1>>)\d+>> )
    (?:
        (?: \{"id":"sub_2","msisdn":"\+8613900139000",[^\n]*\}\n
            <<201\ \d+>>\n )
      | (?: \Q{"error":{"message":"\"+8613900139000\" already has a subscriber","type":"invalid_request_error","param":null,"code":"msisdn_exists"}}\E\n
            <<409\ \d+>>\n )
    ){20}
\z/xs
--- no_error_log
[error]
[alert]
[crit]



=== TEST 5: the nineteen refused creations used no subscriber id
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    "GET /admin/subscribers?msisdn=%2B8613900139000",
    "POST /admin/subscribers\n" . '{"msisdn":"+8613700137000"}',
]
--- error_code eval
[200, 201]
--- response_body_like eval
[qr/\A\{"id":"sub_2","msisdn":"\+8613900139000",/, qr/\A\{"id":"sub_3",/]
--- no_error_log
[error]
[alert]
[crit]
