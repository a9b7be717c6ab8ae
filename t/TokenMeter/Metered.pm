package t::TokenMeter::Metered;

# The common ground of the request path tests (t/02x-*.t, t/030-*.t):
#
#     use t::TokenMeter;
#     use t::TokenMeter::Metered;
#
#     metered_defaults();
#     run_tests();
#
#     === TEST 1: ...
#     --- init
#     subscriber(paid => 10000);
#     --- more_headers
#     Authorization: Bearer sk-test-0123456789abcdef
#     --- request eval
#     [::chat($::Hello), "GET /a/subscribers/sub_1", "GET /usage.log"]
#
# metered_defaults() gives every block a store of its own (so blocks do
# not depend on each other and may run in any order), the mock upstream,
# the model kimi-k2.5 at 1 point per input token, 0.25 per cached input
# token and 4 per output token, at most 1000 output tokens, a metered
# /v1/ location that writes a usage line to html/usage.log (served as
# GET /usage.log), and /a/, a door to the admin API that adds the admin
# key, so that a block's requests can all carry the subscriber's key.
# $TEST_NGINX_ADMIN_HASH is the admin key's hash, for blocks that write
# their own admin location.
#
# Error log checks see all of the block's log, not only the lines of the
# last request (check_accum_error_log()), so an expected line must come
# from the block's first request.
#
# A block's own --- http_config is appended to the default one unless it
# sets token_meter_store itself; its own --- config is appended unless it
# has a "location /v1/" itself.

use strict;
use warnings;

use Exporter 'import';
use Digest::SHA ();
use HTTP::Tiny ();
use IO::Select ();
use IO::Socket::INET ();
use Time::HiRes ();

our @EXPORT = qw(metered_defaults subscriber admin chat usage_line
                 balance_re exactly contains error_json post_request
                 read_until $AdminKey $Key $Msisdn $Hello);

our $AdminKey = 'tm-meter-admin-4b7e19c03a5d8f26';
our $Key = 'sk-test-0123456789abcdef';
our $Msisdn = '+8613800138000';

# The request most blocks send: 3 + 4 (one message) + ceil(9 / 4) = 10
# input tokens by the module's estimate.
our $Hello = '{"model":"kimi-k2.5","messages":'
             . '[{"role":"user","content":"Hello"}]}';

# the body of the last admin() answer
our $AdminLast;

$ENV{TEST_NGINX_ADMIN_HASH} = Digest::SHA::sha256_hex($AdminKey);

# what GET /usage.log shows of one metered request
our $UsageFormat = '$status $token_meter_model'
    . ' in=$token_meter_input_tokens cached=$token_meter_cached_tokens'
    . ' out=$token_meter_output_tokens points=$token_meter_points'
    . ' balance=$token_meter_balance $token_meter_usage_source';

sub default_http_config {
    my ($tag, $own) = @_;

    # no trial grant, so that balances are paid points only, unless the
    # block sets one
    my $trial = $own =~ /\btoken_meter_trial\b/ ? ''
                : "    token_meter_trial 0;\n";

    return <<"EOC";
    token_meter_store \$TEST_NGINX_STORE_DIR/$tag size=64m;
$trial
    upstream mock {
        server 127.0.0.1:\$TEST_NGINX_MOCK_PORT;
        keepalive 8;
    }

    token_meter_model kimi-k2.5 upstream=mock
                      input=1 cached=0.25 output=4 max_output=1000;

    log_format usage '$UsageFormat';
EOC
}

sub default_config {
    return <<"EOC";
    location /v1/ {
        token_meter on;
        access_log html/usage.log usage;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_pass http://\$token_meter_upstream;
    }

    location /admin/ {
        token_meter_admin;
        token_meter_admin_key sha256:\$TEST_NGINX_ADMIN_HASH;
    }

    location /a/ {
        proxy_pass http://127.0.0.1:\$TEST_NGINX_SERVER_PORT/admin/;
        proxy_set_header Authorization "Bearer $AdminKey";
    }
EOC
}

sub metered_defaults {

    # Error log checks see the whole log of the block: a block sends
    # several requests, and the line it expects may come from any of them
    # (each block starts a fresh nginx with a fresh log).
    main::check_accum_error_log();

    main::add_block_preprocessor(sub {
        my ($block) = @_;

        my ($n) = $block->name =~ /^TEST\s+(\d+)/;
        my $tag = 'b' . ($n // 0);

        my $http = $block->http_config;

        if (!defined $http || $http !~ /\btoken_meter_store\b/) {
            $block->set_value('http_config',
                              default_http_config($tag, $http // '')
                              . ($http // ''));
        }

        my $config = $block->config;

        if (!defined $config || $config !~ m{\blocation\s+/v1/\s}) {
            $block->set_value('config',
                              default_config() . ($config // ''));
        }
    });
}


# For --- init: creates sub_1 with the test key and buys it some points.
#
#     subscriber(paid => 10000);
#     subscriber(paid => 0, msisdn => '+8613900139000', key => '...');

sub subscriber {
    my (%opt) = @_;

    my $msisdn = $opt{msisdn} // $Msisdn;
    my $key = $opt{key} // $Key;

    admin('POST', '/admin/subscribers',
          qq({"msisdn":"$msisdn","api_key":"$key"}), 201);

    my ($id) = $AdminLast =~ /"id":"(sub_\d+)"/;

    admin('POST', "/admin/subscribers/$id/purchases",
          qq({"points":$opt{paid},"reference":"setup-$id"}), 201)
        if $opt{paid};

    return $id;
}

# One admin API call from Perl; dies unless the status is the expected one.
sub admin {
    my ($method, $uri, $body, $want) = @_;

    my $port = $ENV{TEST_NGINX_SERVER_PORT};
    my $res = HTTP::Tiny->new(timeout => 5)->request($method,
        "http://127.0.0.1:$port$uri",
        {
            headers => { Authorization => "Bearer $AdminKey",
                         'Content-Type' => 'application/json' },
            defined $body ? (content => $body) : (),
        });

    $AdminLast = $res->{content} // '';

    die "$method $uri: expected $want, got $res->{status}:"
        . " $res->{content}\n" if $want && $res->{status} != $want;

    return $res->{content};
}


# For --- init: a request that is still going on while the block's own
# requests are made.  Sends a POST with the subscriber's key and waits
# until the response head has come, so that the request has been admitted
# and holds its reservation.  Returns the socket; read_until() reads more.
# The connection is kept alive, so that nginx ends the request as soon as
# the answer is sent, whether or not the test reads it: with "close" it
# would wait for the client to read the answer and close (lingering
# close), and only then settle.
#
#     $main::Slow = post_request('/v1/chat/completions', $json,
#                                'X-Mock-Delay-Ms' => 300);

sub post_request {
    my ($uri, $body, @headers) = @_;

    my $sock = IO::Socket::INET->new(
                   PeerAddr => '127.0.0.1',
                   PeerPort => $ENV{TEST_NGINX_SERVER_PORT},
                   Proto => 'tcp', Timeout => 5)
        or die "cannot connect to nginx: $!\n";

    my $head = "POST $uri HTTP/1.1\r\nHost: localhost\r\n"
               . "Authorization: Bearer $Key\r\n"
               . "Content-Length: " . length($body) . "\r\n"
               . "Connection: keep-alive\r\n";

    while (my ($name, $value) = splice @headers, 0, 2) {
        $head .= "$name: $value\r\n";
    }

    $sock->autoflush(1);
    print $sock "$head\r\n$body";

    my $got = read_until($sock, qr/\r\n\r\n/, 5);

    die "no response head within 5 s: \"$got\"\n"
        unless $got =~ /\r\n\r\n/;

    return $sock;
}

# Reads from the socket until what was read matches the pattern, the
# peer closes, or the seconds are over; returns all that was read, also
# what earlier calls read from the same socket.
sub read_until {
    my ($sock, $re, $seconds) = @_;

    my $deadline = Time::HiRes::time() + $seconds;
    my $sel = IO::Select->new($sock);

    ${*$sock}{tm_read} //= '';

    while (${*$sock}{tm_read} !~ $re) {
        my $left = $deadline - Time::HiRes::time();
        last if $left <= 0 || !$sel->can_read($left);

        my $n = sysread $sock, my $buf, 65536;
        last unless $n;

        ${*$sock}{tm_read} .= $buf;
    }

    return ${*$sock}{tm_read};
}


# A POST of a JSON body to a metered endpoint, for --- request eval.
sub chat {
    my ($body, $uri) = @_;

    return "POST " . ($uri // '/v1/chat/completions') . "\n" . $body;
}

# The line GET /usage.log shows for one request.
sub usage_line {
    my ($status, $in, $cached, $out, $points, $balance, $source) = @_;

    return "$status kimi-k2.5 in=$in cached=$cached out=$out"
           . " points=$points balance=$balance $source\n";
}

# For response_body_like arrays: the whole body, exactly.
sub exactly {
    my ($text) = @_;

    return qr/\A\Q$text\E\z/;
}

# The body of an error answer, in the OpenAI shape.
sub error_json {
    my ($message, $type, $code) = @_;

    $message =~ s/(["\\])/\\$1/g;

    return qq({"error":{"message":"$message","type":"$type",)
           . qq("param":null,"code":"$code"}}\n);
}

# For response_body_like: the text somewhere in the body.
sub contains {
    my ($text) = @_;

    return qr/\Q$text\E/;
}

# Matches the end of GET /admin/subscribers/sub_N: the balance.
#
#     balance_re(paid => 9970)
#     balance_re(paid => 100, reserved => 4010, trial => 500)

sub balance_re {
    my (%b) = @_;

    my $paid = $b{paid} // 0;
    my $reserved = $b{reserved} // 0;
    my $trial = $b{trial};
    my $grants = defined $trial
        ? '\[\{"kind":"trial","points":' . $trial
          . ',"expires_at":"[0-9TZ:-]+"\}\]'
        : '\[\]';
    my $available = ($trial // 0) + $paid - $reserved;

    return qr/"balance":\{"paid":$paid,"grants":$grants,
              "reserved":$reserved,"available":$available\}\}\n\z/x;
}

1;
