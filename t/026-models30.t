# Many models behind one API: each request goes to its model's upstream
# and pays its model's prices.  The configuration is generated: 32 models
# on 32 upstreams, all of them the mock upstream on $TEST_NGINX_MOCK_PORT,
# which shows the X-Route header each request came with.
# t/TokenMeter/Metered.pm has the rest of the configuration.

use t::TokenMeter;
use t::TokenMeter::Metered;

# model-01 ... model-30 at n points per input token and 2n per output
# token on upstream up01 ... up30, and two whose names are prefixes of
# each other's, with prices that need decimals.
sub models_config {
    my ($extra) = @_;
    my $conf = '';

    for my $n (1 .. 30) {
        my $nn = sprintf '%02d', $n;

        $conf .= "    upstream up$nn {"
                 . " server 127.0.0.1:\$TEST_NGINX_MOCK_PORT; }\n"
                 . "    token_meter_model model-$nn upstream=up$nn"
                 . " input=$n output=" . 2 * $n . ";\n";
    }

    return $conf . <<'EOC' . ($extra // '');
    upstream upm { server 127.0.0.1:$TEST_NGINX_MOCK_PORT; }
    upstream upm1 { server 127.0.0.1:$TEST_NGINX_MOCK_PORT; }
    token_meter_model m upstream=upm input=0.5 output=0.75;
    token_meter_model m-1 upstream=upm1 input=100 output=200 cached=0.001;
EOC
}

our $Config = <<'EOC';
    location /v1/ {
        token_meter on;
        access_log html/usage.log usage;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header X-Route $token_meter_upstream;
        proxy_pass http://$token_meter_upstream;
    }

    location /admin/ {
        token_meter_admin;
        token_meter_admin_key
            sha256:$TEST_NGINX_ADMIN_HASH;
    }
EOC

sub routed {
    my ($model, $upstream) = @_;

    my $route = qq("x-route": "$upstream",);
    my $json = qq("json": {\n    "model": "$model");

    return qr/\Q$route\E.*\Q$json\E/s;
}

# the usage line of a request of 10 input and 5 output tokens
sub line {
    my ($model, $points, $balance, $cached) = @_;

    return "200 $model in=10 cached=" . ($cached // 0) . " out=5"
           . " points=$points balance=$balance upstream\n";
}

metered_defaults();
run_tests();

__DATA__

=== TEST 1: 32 models: each request reaches its upstream, at its prices
--- init
subscriber(paid => 1000000);
--- http_config eval
::models_config()
--- config eval
$::Config
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: echo
--- request eval
[
    map({ ::chat(qq({"model":"$_","messages":[]})) }
        qw(model-01 model-07 model-10 model-30 m m-1 model-1 model-31)),
    "GET /usage.log",
]
--- error_code eval
[(200) x 6, 404, 404, 200]
--- response_body_like eval
[
    ::routed('model-01', 'up01'),
    ::routed('model-07', 'up07'),
    ::routed('model-10', 'up10'),
    ::routed('model-30', 'up30'),
    ::routed('m', 'upm'),
    ::routed('m-1', 'upm1'),
    qr/"code":"model_not_found"/,
    qr/"code":"model_not_found"/,
    # model-n: 10 * n + 5 * 2n = 20n points; m: 5 + 3.75; m-1: 1000 + 1000
    ::exactly(::line('model-01', 20, 999980)
              . ::line('model-07', 140, 999840)
              . ::line('model-10', 200, 999640)
              . ::line('model-30', 600, 999040)
              . ::line('m', 9, 999031)
              . ::line('m-1', 2000, 997031)
              . "404 - in=- cached=- out=- points=- balance=- -\n" x 2),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: cached tokens at each model's own cached price
--- init
subscriber(paid => 1000000);
--- http_config eval
::models_config()
--- config eval
$::Config
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Cached-Tokens: 10
--- request eval
[
    map({ ::chat(qq({"model":"$_","messages":[]})) } qw(model-20 m m-1)),
    "GET /usage.log",
]
--- error_code eval
[200, 200, 200, 200]
--- response_body_like eval
[
    (qr/"cached_tokens": 10/) x 3,
    # cached at the input price unless cached= is given:
    # 10 * 20 + 5 * 40; 10 * 0.5 + 5 * 0.75; 10 * 0.001 + 5 * 200
    ::exactly(::line('model-20', 400, 999600, 10)
              . ::line('m', 9, 999591, 10)
              . ::line('m-1', 1001, 998590, 10)),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: 500 models more
--- init
subscriber(paid => 1000000);
--- http_config eval
::models_config(CORE::join '', map {
    "    token_meter_model vendor-$_/chat-model-v$_ upstream=up"
    . sprintf('%02d', $_ % 30 + 1) . " input=1 output=$_;\n"
} 1 .. 500)
--- config eval
$::Config
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: echo
--- request eval
[
    ::chat('{"model":"vendor-500/chat-model-v500","messages":[]}'),
    ::chat('{"model":"vendor-29/chat-model-v29","messages":[]}'),
    ::chat('{"model":"model-05","messages":[]}'),
    "GET /usage.log",
]
--- error_code eval
[200, 200, 200, 200]
--- response_body_like eval
[
    ::routed('vendor-500/chat-model-v500', 'up21'),
    ::routed('vendor-29/chat-model-v29', 'up30'),
    ::routed('model-05', 'up05'),
    # 10 + 5 * 500; 10 + 5 * 29; 10 * 5 + 5 * 10
    ::exactly("200 vendor-500/chat-model-v500 in=10 cached=0 out=5"
              . " points=2510 balance=997490 upstream\n"
              . "200 vendor-29/chat-model-v29 in=10 cached=0 out=5"
              . " points=155 balance=997335 upstream\n"
              . "200 model-05 in=10 cached=0 out=5 points=100"
              . " balance=997235 upstream\n"),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 4: a model with a long name, as some providers have them
--- init
subscriber(paid => 1000000);
--- http_config eval
::models_config(
    "    token_meter_model accounts/fireworks/models/"
    . "llama-v3p1-405b-instruct-long upstream=up05 input=3 output=3;\n")
--- config eval
$::Config
--- more_headers
Authorization: Bearer sk-test-0123456789abcdef
X-Mock-Mode: echo
--- request eval
[
    ::chat('{"model":"accounts/fireworks/models/'
           . 'llama-v3p1-405b-instruct-long","messages":[]}'),
    "GET /usage.log",
]
--- error_code eval
[200, 200]
--- response_body_like eval
[
    ::routed('accounts/fireworks/models/llama-v3p1-405b-instruct-long',
             'up05'),
    ::exactly("200 accounts/fireworks/models/llama-v3p1-405b-instruct-long"
              . " in=10 cached=0 out=5 points=45 balance=999955 upstream\n"),
]
--- no_error_log
[error]
[alert]
[crit]
