# The official openai npm client (t/openai/, installed by
# util/install-deps) against nginx with the module and the mock upstream
# on $TEST_NGINX_MOCK_PORT: chat completions plain and streamed,
# embeddings and responses come out as the client expects them, errors
# come out as its error classes, and each call is paid for exactly.
#
# The client runs in the block's --- init, once nginx is up; its one line
# of JSON is written to html/openai.json, which the block's first request
# fetches, so that the block checks it like any answer.

use t::TokenMeter;
use t::TokenMeter::Metered;

use File::Spec ();
use IPC::Open3 ();
use Symbol ();

our $Root = File::Spec->rel2abs('.');
our $Client = "$Root/t/openai/client.mjs";

# Runs the client; dies with its stderr when it fails.
sub run_client {
    my $node = $ENV{TEST_NGINX_NODE} || 'node';
    my $base = "http://127.0.0.1:$ENV{TEST_NGINX_SERVER_PORT}/v1";

    die "t/openai/node_modules/openai is missing: run util/install-deps\n"
        unless -d "$Root/t/openai/node_modules/openai";

    my $err = Symbol::gensym();
    my $pid = IPC::Open3::open3(my $in, my $out, $err, 'timeout', '60',
                                $node, $Client, $base, $Key);
    close $in;

    my $stdout = do { local $/; <$out> } // '';
    my $stderr = do { local $/; <$err> } // '';

    waitpid $pid, 0;

    die "node $Client failed (status $?): $stderr$stdout\n" if $?;

    open my $fh, '>', main::html_dir() . '/openai.json' or die "$!\n";
    print $fh $stdout;
    close $fh;
}

metered_defaults();
run_tests();

__DATA__

=== TEST 1: the openai client gets what it expects, and each call is paid for
--- init
subscriber(paid => 10000);
run_client();
--- request eval
[
    "GET /openai.json",
    "GET /a/subscribers/sub_1",
    "GET /usage.log",
]
--- error_code eval
[200, 200, 200]
--- response_body_like eval
[
    ::exactly('{"chat":{"content":"Metered tokens flow from the",'
        . '"finish_reason":"stop","usage":{"prompt_tokens":10,'
        . '"completion_tokens":5,"total_tokens":15,'
        . '"prompt_tokens_details":{"cached_tokens":0}}},'
        # the usage event the module asked for on the client's behalf is
        # not seen: role, five tokens, finish
        . '"chat_stream":{"content":"Metered tokens flow from the",'
        . '"chunks":7,"usage_chunks":0,"usage":null},'
        . '"chat_stream_usage":{"content":"Metered tokens flow from the",'
        . '"chunks":8,"usage_chunks":1,"usage":{"prompt_tokens":10,'
        . '"completion_tokens":5,"total_tokens":15,'
        . '"prompt_tokens_details":{"cached_tokens":0}}},'
        . '"embeddings":{"count":2,"dimensions":8,'
        . '"usage":{"prompt_tokens":10,"total_tokens":10}},'
        . '"responses":{"text":"Metered tokens flow from the",'
        . '"status":"completed",'
        . '"usage":{"input_tokens":10,"output_tokens":5}},'
        . '"responses_stream":{"text":"Metered tokens flow from the",'
        . '"events":13,"usage":{"input_tokens":10,"output_tokens":5}},'
        . '"unknown_model":{"class":"NotFoundError","status":404,'
        . '"type":"invalid_request_error","code":"model_not_found"},'
        . '"wrong_key":{"class":"AuthenticationError","status":401,'
        . '"type":"invalid_request_error","code":"invalid_api_key"}}'
        . "\n"),
    # 30 + 30 + 30 + 10 + 30 + 30
    ::balance_re(paid => 9840),
    ::exactly(::usage_line(200, 10, 0, 5, 30, 9970, 'upstream')
              . ::usage_line(200, 10, 0, 5, 30, 9940, 'upstream')
              . ::usage_line(200, 10, 0, 5, 30, 9910, 'upstream')
              . ::usage_line(200, 10, 0, 0, 10, 9900, 'upstream')
              . ::usage_line(200, 10, 0, 5, 30, 9870, 'upstream')
              . ::usage_line(200, 10, 0, 5, 30, 9840, 'upstream')
              . "404 - in=- cached=- out=- points=- balance=- -\n"
              . "401 - in=- cached=- out=- points=- balance=- -\n"),
]
--- no_error_log
[error]
[alert]
[crit]
