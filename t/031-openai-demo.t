# The official openai npm client against the demo itself, started as the
# README's quick start starts it (util/demo: nginx on 127.0.0.1:8080 with
# conf/demo.conf, the mock provider on 127.0.0.1:8091, subscriber sub_1).
# The client is the one of t/030-openai-client.t, given only the demo's
# base URL and the API key the demo printed.  Then Ctrl-C (SIGINT) must
# stop the demo and everything it started.
#
# The demo's ports are fixed; when something else listens on them (a demo
# left running, say), the file is skipped rather than fight it.

use t::TokenMeter;

use IO::Socket::INET ();
use IPC::Open3 ();
use JSON::PP ();
use POSIX ();
use Symbol ();
use Time::HiRes ();

my $Root = $t::TokenMeter::Root;
my $Output = "$ENV{TEST_NGINX_STORE_DIR}/demo.out";
my $Base = 'http://127.0.0.1:8080';

for my $port (8080, 8091) {
    Test::More::plan(skip_all => "127.0.0.1:$port is in use")
        if listening($port);
}

my $pid = fork() // die "fork: $!\n";

if ($pid == 0) {
    # a process group of its own, as a shell gives a foreground job
    POSIX::setpgid(0, 0);
    chdir $Root or POSIX::_exit(1);
    open STDOUT, '>', $Output or POSIX::_exit(1);
    open STDERR, '>&', \*STDOUT or POSIX::_exit(1);
    exec 'sh', 'util/demo' or POSIX::_exit(1);
}

my $key = wait_for_key(30);

ok($key, 'the demo printed an API key') or diag(slurp($Output));

SKIP: {
    skip 'the demo did not start', 9 unless $key;

    my ($status, $out, $err) = run_command('node',
                                           "$Root/t/openai/client.mjs",
                                           "$Base/v1", $key);

    is($status, 0, 'the client ran') or diag($err . $out);

    my $got = eval { JSON::PP::decode_json($out) } // {};

    is($got->{chat}{usage}{total_tokens}, 15, 'a chat completion');
    is_deeply([@{ $got->{chat_stream} }{qw(chunks usage_chunks)}], [7, 0],
              'a stream, without the usage event the module asked for');
    is($got->{chat_stream_usage}{usage_chunks}, 1,
       'a stream that asked for usage gets it');
    is($got->{embeddings}{count}, 2, 'embeddings');
    is($got->{responses}{status}, 'completed', 'a response');
    is($got->{unknown_model}{class}, 'NotFoundError',
       'an unknown model is the client\'s NotFoundError');
    is($got->{wrong_key}{class}, 'AuthenticationError',
       'a wrong key is the client\'s AuthenticationError');

    # 30 points for each chat call and response, 10 for the embeddings,
    # taken from the trial of 25,000,000
    my $admin = slurp("$Root/build/demo/admin-key") // '';
    chomp $admin;

    ($status, $out) = run_command('curl', '-sS',
                                  "$Base/admin/subscribers/sub_1",
                                  '-H', "Authorization: Bearer $admin");

    like($out, qr/"balance":\{"paid":2500000,"grants":\[\{"kind":"trial",
                  "points":24999840,[^}]*\}\],"reserved":0,/x,
         'the calls were paid for from the trial');
}

kill 'INT', -$pid;

my $gone = 0;

for (1 .. 100) {
    if (waitpid($pid, POSIX::WNOHANG()) == $pid) {
        $gone = 1;
        last;
    }

    Time::HiRes::sleep(0.1);
}

ok($gone, 'Ctrl-C stops the demo') or kill 'KILL', -$pid;
ok(wait_closed(8080) && wait_closed(8091),
   'nothing listens on its ports any more');

Test::More::done_testing();


sub listening {
    my ($port) = @_;

    return IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port,
                                 Proto => 'tcp', Timeout => 1) ? 1 : 0;
}

sub wait_closed {
    my ($port) = @_;

    for (1 .. 50) {
        return 1 unless listening($port);
        Time::HiRes::sleep(0.1);
    }

    return 0;
}

sub wait_for_key {
    my ($seconds) = @_;

    for (1 .. $seconds * 10) {
        my $text = slurp($Output) // '';

        # the demo prints the key before its curl lines; wait for those
        return $1 if $text =~ /curl / && $text =~ /^\s+(sk-tm-\S+)\s*$/m;
        return undef if waitpid($pid, POSIX::WNOHANG()) == $pid;

        Time::HiRes::sleep(0.1);
    }

    return undef;
}

sub run_command {
    my @cmd = @_;
    my $err = Symbol::gensym();
    my $child = IPC::Open3::open3(my $in, my $out, $err,
                                  'timeout', '60', @cmd);
    close $in;

    my $stdout = do { local $/; <$out> } // '';
    my $stderr = do { local $/; <$err> } // '';

    waitpid $child, 0;

    return ($?, $stdout, $stderr);
}

sub slurp {
    my ($file) = @_;

    open my $fh, '<', $file or return undef;
    local $/;
    return scalar <$fh>;
}
