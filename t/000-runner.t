# Tests the test harness itself, so that a green suite means something.
#
# First it runs the fixture files in t/selftest/ with the in-tree runner
# forced: each but passing.t-fixture holds one wrong expectation and must
# make the runner fail, for the right reason.  Then the blocks below use
# every feature our suites rely on, and must pass under either runner.
#
# Only stock nginx and the echo module are used, so this file runs before
# the token meter module builds.

BEGIN {
    $ENV{TEST_NGINX_LOAD_MODULES} =
        '/usr/lib/nginx/modules/ngx_http_echo_module.so';
}

use t::TokenMeter 'no_plan';

use IO::Socket::INET ();
use POSIX ();
use Time::HiRes ();

# [fixture, expected outcome, a line its output must hold, extra env]
my @fixtures = (
    ['passing', 'pass', qr/^ok \d+ - .*TEST 2: .* - status code ok$/m],
    ['wrong-status', 'fail', qr/^not ok \d+ - .* - status code ok$/m],
    ['wrong-body', 'fail',
     qr/^not ok \d+ - .* - response_body - response is expected/m],
    ['wrong-header', 'fail',
     qr/^not ok \d+ - .* - header X-Sent not present in the raw headers$/m],
    ['missing-error-log', 'fail',
     qr/^not ok \d+ - .* - pattern "this line is never logged" should/m],
    ['unexpected-error-log', 'fail',
     qr/^not ok \d+ - .* - pattern "\[error\]" should not match any line/m],
    ['must-die-lives', 'fail', qr/^not ok \d+ - .* - die as expected$/m],
    ['client-timeout', 'fail', qr/^not ok \d+ - ERROR: client socket timed/m],
    ['unknown-section', 'fail',
     qr/^not ok \d+ - .* section "--- respones_body" is not supported/m],
    ['reload', 'fail', qr/^not ok \d+ - the master survived the reload$/m],
    ['reload', 'pass', qr/^ok \d+ - the master survived the reload$/m,
     { TEST_NGINX_USE_HUP => 1 }],
);

for my $f (@fixtures) {
    check_fixture(@$f);
}

# The fixture's mock listens on its server port + 10; nothing may be left
# listening there once the fixture has ended.
SKIP: {
    skip 'no t/mock/upstream.py yet', 3 unless -f 't/mock/upstream.py';

    check_fixture('mock', 'pass', qr/^ok \d+ - .* - response_body - /m);

    my $port = server_port() + 11;
    my $sock = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
                                     PeerPort => $port, Proto => 'tcp');
    ok(!$sock, "the fixture's mock upstream is gone from port $port");
}

no_shuffle();
run_tests();


sub check_fixture {
    my ($name, $outcome, $expect, $env) = @_;
    my $file = "t/selftest/$name.t-fixture";
    my $label = "fixture $name" . ($env ? ' with ' . join(' ', %$env) : '');
    my $out = "$ENV{TEST_NGINX_STORE_DIR}/$name.out";

    my $status = run_fixture($file, $out, $env || {});

    open my $fh, '<', $out or die "cannot read $out: $!";
    my $output = do { local $/; <$fh> };
    close $fh;

    my $ok = $outcome eq 'pass'
             ? is($status, 0, "$label passes")
             : isnt($status, 0, "$label fails");

    $ok = like($output, $expect, "$label reports the expected line") && $ok;

    diag("output of $file:\n$output") unless $ok;
}

# Runs one fixture in a child perl with the in-tree runner, on its own port
# and server root, so that it cannot disturb this file's nginx.  Returns its
# exit status; a fixture that hangs is stopped and counts as a failure.
sub run_fixture {
    my ($file, $out, $env) = @_;

    my $pid = fork // die "fork() failed: $!";

    if ($pid == 0) {
        delete $ENV{$_} for grep { /^TEST_NGINX_/ && !/^TEST_NGINX_(?:
                                       BINARY|SLEEP|VERBOSE)$/x } keys %ENV;

        $ENV{TEST_NGINX_TOKEN_METER_RUNNER} = 'in-tree';
        $ENV{TEST_NGINX_SERVER_PORT} = server_port() + 1;
        $ENV{TEST_NGINX_SERVROOT} = 't/servroot-selftest';
        $ENV{TEST_NGINX_LOAD_MODULES} =
            '/usr/lib/nginx/modules/ngx_http_echo_module.so';
        $ENV{$_} = $env->{$_} for keys %$env;

        open STDOUT, '>', $out or POSIX::_exit(126);
        open STDERR, '>&', \*STDOUT or POSIX::_exit(126);

        exec $^X, '-I.', $file or POSIX::_exit(127);
    }

    my $deadline = Time::HiRes::time() + 60;

    while (Time::HiRes::time() < $deadline) {
        return $? >> 8 if waitpid($pid, POSIX::WNOHANG()) == $pid;
        Time::HiRes::sleep(0.02);
    }

    # TERM lets the fixture's END blocks stop its nginx
    kill 'TERM', $pid;
    waitpid $pid, 0;
    return 255;
}

__DATA__

=== TEST 1: a GET answered by echo, with headers present and absent
--- config
    location = /t {
        echo hello;
    }
--- request
GET /t
--- response_headers
Content-Type: text/plain
!X-Not-Sent
--- response_body
hello
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: more_headers reach nginx, Host defaults to localhost
--- config
    location = /t {
        echo "foo=$http_x_foo bar=$http_x_bar host=$host";
    }
--- more_headers
X-Foo: 1
# a comment line is not a header
X-Bar: two words
--- request
GET /t
--- response_body
foo=1 bar=two words host=localhost
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: an array of requests, each on a new connection
--- config
    location = /a {
        echo "a $connection_requests";
    }
    location = /gone {
        return 404;
    }
--- request eval
["GET /a", "GET /gone", "GET /a"]
--- error_code eval
[200, 404, 200]
--- response_body_like eval
["^a 1\n\\z", "404 Not Found", "^a 1\n\\z"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 4: pipelined requests share one connection
--- config
    location = /p {
        echo "req $connection_requests $arg_n";
    }
--- pipelined_requests eval
["GET /p?n=x", "GET /p?n=y", "GET /p?n=z"]
--- response_body eval
["req 1 x\n", "req 2 y\n", "req 3 z\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 5: a request body after the request line gets a Content-Length
--- config
    location = /echo {
        echo_read_request_body;
        echo "$http_content_length:$request_body";
    }
--- request
POST /echo
plain body
--- response_body
10:plain body
--- no_error_log
[error]
[alert]
[crit]



=== TEST 6: a chunked request body is sent as written
--- config
    location = /echo {
        echo_read_request_body;
        echo_request_body;
    }
--- more_headers
Transfer-Encoding: chunked
--- request eval
"POST /echo
5\r
hello\r
6\r
 world\r
0\r
\r
"
--- response_body chomp
hello world
--- no_error_log
[error]
[alert]
[crit]



=== TEST 7: a chunked response is decoded
--- config
    location = /c {
        echo -n "first ";
        echo_flush;
        echo "second";
    }
--- request
GET /c
--- response_headers
Transfer-Encoding: chunked
--- response_body
first second
--- no_error_log
[error]
[alert]
[crit]



=== TEST 8: response_body_like and response_headers_like
--- config
    location = /pid {
        echo "worker $pid";
    }
--- request
GET /pid
--- response_headers_like
Content-Type: text/pl\w+
--- response_body_like
^worker \d+$
--- no_error_log
[error]
[alert]
[crit]



=== TEST 9: http_config and main_config land in their contexts
--- main_config
    worker_rlimit_nofile 1024;
--- http_config
    map $uri $from_http {
        default "set in http";
    }
--- config
    location = /t {
        echo $from_http;
    }
--- request
GET /t
--- response_body
set in http
--- no_error_log
[error]
[alert]
[crit]



=== TEST 10: environment variables are expanded in the configuration
--- config
    location = /port {
        echo "listening on $TEST_NGINX_SERVER_PORT";
    }
--- request
GET /port
--- response_body
listening on $TEST_NGINX_SERVER_PORT
--- no_error_log
[error]
[alert]
[crit]



=== TEST 11: error_log finds strings and regexes; an expected [error]
--- config
--- request
GET /missing.html?a=1
--- error_code: 404
--- error_log eval
[
    'http request line: "GET /missing.html?a=1 HTTP/1.1"',
    qr/open\(\) ".*?missing\.html" failed \(2: No such file/,
]
--- no_error_log
[alert]
[crit]



=== TEST 12: an unknown directive stops nginx with its exact message
--- config
    location = /t {
        foo_bar on;
    }
--- must_die
--- error_log
unknown directive "foo_bar"
--- no_error_log
[error]
[alert]
[crit]



=== TEST 13: user_files are served; init runs before the requests
--- config
--- user_files
>>> greeting.txt
hello from a user file
--- init
open my $fh, '>', html_dir() . '/late.txt' or die "late.txt: $!";
print $fh "written by init\n";
close $fh;
--- request eval
["GET /greeting.txt", "GET /late.txt"]
--- response_body eval
["hello from a user file\n", "written by init\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 14: a block without --- config reuses the running nginx
--- request
GET /greeting.txt
--- response_body
hello from a user file
--- no_error_log
[error]
[alert]
[crit]



=== TEST 15: raw_request is sent byte for byte
--- config
    location = /t {
        echo "proto $server_protocol";
    }
--- raw_request eval
"GET /t HTTP/1.0\r\nHost: localhost\r\n\r\n"
--- response_body
proto HTTP/1.0
--- no_error_log
[error]
[alert]
[crit]



=== TEST 16: HEAD gets headers only
--- config
    location = /t {
        echo hello;
    }
--- request
HEAD /t
--- response_body
--- no_error_log
[error]
[alert]
[crit]



=== TEST 17: abort ends a slow request at the timeout; wait catches its late log
--- config
    location = /slow {
        echo_sleep 0.5;
        echo late;
    }
--- request
GET /slow
--- timeout: 0.2
--- abort
--- ignore_response
--- wait: 0.5
--- error_log
echo sleep event handler: "/slow?"
--- no_error_log
[error]
[alert]
[crit]
