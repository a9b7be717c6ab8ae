# A full store: the write that does not fit is refused with 503
# store_full and a log line that says what to do, reads go on, and after
# size= is raised writes work again.  A store that is nearly full refuses
# new metered requests, with 503 store_full, before any write fails.  The
# blocks run in order; the mock upstream listens on $TEST_NGINX_MOCK_PORT.

use t::TokenMeter;
use t::TokenMeter::Store;
use t::TokenMeter::Admin;

use HTTP::Tiny ();

# A store that is nearly full at size=1m: one of our databases holds 239
# records of 4000 bytes, a page each.  nginx still starts with it, and the
# first new subscriber no longer fits.
mdb_load("$ENV{TEST_NGINX_STORE_DIR}/store", 'usage',
         map { sprintf('%08x', $_) => 'ab' x 4000 } 1 .. 239);

add_block_preprocessor(sub {
    my ($block) = @_;

    $block->set_value(config => <<'EOC') if !defined $block->config;
    location /admin/ {
        token_meter_admin;
        token_meter_admin_key sha256:$TEST_NGINX_ADMIN_HASH;
    }
EOC
});

our $ApiKey = 'sk-test-nearly-full-0000000001';

our $MeteredFull = '{"error":{"message":"The metering store cannot be used'
    . ' now; please try again later.","type":"server_error","param":null,'
    . '"code":"store_full"}}' . "\n";

our $MeteredConfig = <<'EOC';
    location /v1/ {
        token_meter on;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_pass http://$token_meter_upstream;
    }

    location = /metrics {
        token_meter_metrics;
    }

    location /admin/ {
        token_meter_admin;
        token_meter_admin_key sha256:$TEST_NGINX_ADMIN_HASH;
    }
EOC

# The http block of the metered blocks, with the store at this size=.
sub metered_http {
    my ($size) = @_;

    return <<"EOC" . <<'EOC';
    token_meter_store \$TEST_NGINX_STORE_DIR/store size=$size;
EOC
    token_meter_trial 0;

    upstream mock {
        server 127.0.0.1:$TEST_NGINX_MOCK_PORT;
    }

    token_meter_model kimi-k2.5 upstream=mock input=1 output=4
                      max_output=1000;
EOC
}

# 64k more than the store's high-water mark now, in bytes: room for a few
# admin writes, and less than the room kept for settlements.
sub nearly_full_size {
    my $stat = `mdb_stat -e $ENV{TEST_NGINX_STORE_DIR}/store`;

    my ($pages) = $stat =~ /Number of pages used: (\d+)/
        or die "mdb_stat says nothing of the pages used:\n$stat";
    my ($psize) = $stat =~ /Page size: (\d+)/;

    return $pages * $psize + 65536;
}

sub admin {
    my ($method, $path, $body) = @_;

    return HTTP::Tiny->new(timeout => 5)->request($method,
        "http://127.0.0.1:$ENV{TEST_NGINX_SERVER_PORT}$path",
        { headers => { Authorization
                           => 'Bearer tm-test-admin-key-6c1f0e9b2a7d' },
          defined $body ? (content => $body) : () });
}

sub metered {
    return HTTP::Tiny->new(timeout => 5)->request('POST',
        "http://127.0.0.1:$ENV{TEST_NGINX_SERVER_PORT}/v1/chat/completions",
        { headers => { Authorization => "Bearer $ApiKey" },
          content => '{"model":"kimi-k2.5","messages":'
                     . '[{"role":"user","content":"Hello"}]}' });
}

no_shuffle();
run_tests();

__DATA__

=== TEST 1: a write that does not fit
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store size=1m;
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
POST /admin/subscribers
{"msisdn":"+8613800138000"}
--- error_code: 503
--- response_headers
Content-Type: application/json
--- response_body
{"error":{"message":"the token meter store is full","type":"server_error","param":null,"code":"store_full"}}
--- error_log eval
qr/\[crit\] .*token meter store "\Q$ENV{TEST_NGINX_STORE_DIR}\E\/store" is full at size=1048576: raise size= in token_meter_store and reload nginx/
--- no_error_log
created subscriber
[error]
[alert]



=== TEST 2: reads still work in a full store
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store size=1m;
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
GET /admin/subscribers?msisdn=%2B8613800138000
--- error_code: 404
--- response_body
{"error":{"message":"no subscriber for \"+8613800138000\"","type":"invalid_request_error","param":null,"code":"subscriber_not_found"}}
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: with a larger size= the write goes through
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store size=2m;
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
POST /admin/subscribers
{"msisdn":"+8613800138000"}
--- error_code: 201
--- response_body_like eval
qr/\A\{"id":"sub_1","msisdn":"\+8613800138000",/
--- no_error_log
[error]
[alert]
[crit]



=== TEST 4: the store has grown past 1m: size=1m is refused now
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store size=1m;
--- must_die
--- error_log eval
[
    '[emerg]',
    qr/token meter store "\Q$ENV{TEST_NGINX_STORE_DIR}\E\/store" already holds \d+ bytes, more than size=1048576/,
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 5: nearly full: new metered requests are refused, admin calls go on
New requests are refused while the store's high-water mark leaves less
than an eighth of the map (128k at least) free, so that the requests
already admitted can always be settled.  size= is set 64k above what the
store holds, and so below that.
--- http_config eval
::metered_http(::nearly_full_size())
--- config eval
$::MeteredConfig
--- init
my $admin = ::admin('POST', '/admin/subscribers',
                    '{"msisdn":"+8613900139000","api_key":"' . $::ApiKey
                    . '"}');
Test::More::is($admin->{status}, 201, 'a subscriber can still be created');

my @refused = map { ::metered()->{content} } 1 .. 2;
Test::More::is_deeply(\@refused, [($::MeteredFull) x 2],
                      'two requests, two refusals');

open my $fh, '<', server_root() . '/logs/error.log'
    or die "cannot read the error log: $!";
my $lines = grep { /is nearly full/ } <$fh>;
Test::More::is($lines, 1, 'the store is said to be nearly full once');
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
GET /metrics
--- response_body_like eval
qr/^token_meter_rejections_total\{reason="store_full"\} 2\n/m
--- error_log eval
[
    qr/\[crit\] .*token meter store "\Q$ENV{TEST_NGINX_STORE_DIR}\E\/store" is nearly full, \d+ of \d+ bytes used: new requests are refused; raise size= in token_meter_store and reload nginx/,
    '[crit]',
]
--- no_error_log
[error]
[alert]



=== TEST 6: with room again, the next request is served and billed
--- http_config eval
::metered_http('4m')
--- config eval
$::MeteredConfig
--- init
Test::More::is(::admin('POST', '/admin/subscribers/sub_2/purchases',
                       '{"points":4010,"reference":"room-again"}')->{status},
               201, 'points bought');

my $res = ::metered();
Test::More::is($res->{status}, 200, 'the request is served');
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
GET /admin/subscribers/sub_2/usage
--- response_body_like eval
qr/\A\{"object":"list","data":\[\{"request_id":"[0-9a-f]{32}",[^{}]*"model":"kimi-k2\.5","input_tokens":10,"cached_tokens":0,"output_tokens":5,"cost":30,"points":30,[^{}]*"usage_source":"upstream","status":200\}\],"has_more":false,"next_cursor":"[0-9a-f]{48}"\}\n\z/
--- no_error_log
is nearly full
[error]
[alert]
[crit]
