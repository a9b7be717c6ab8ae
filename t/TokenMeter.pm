package t::TokenMeter;

# What every test file of this project uses:
#
#     use t::TokenMeter;        # "no_plan" unless the file plans itself
#     run_tests();
#     __DATA__
#     === TEST 1: ...
#
# It sets the project's defaults in the environment, prepares a store
# directory for the file, starts the mock model upstream when the file
# needs it, and then hands the file to Test::Nginx::Socket when that is
# installed, or to the in-tree runner t::TokenMeter::Runner otherwise.
# t/README describes all of it.

use strict;
use warnings;

use Cwd ();
use Digest::SHA ();
use File::Basename ();
use File::Path ();
use IO::Socket::INET ();
use POSIX ();
use Time::HiRes ();


our ($Root, $Base, $StoreDir, $OwnStore, $MockPid, $MockLog);

my $MainPid = $$;

sub set_env_defaults {
    my $mods = '/usr/lib/nginx/modules';
    my $port = $ENV{TEST_NGINX_SERVER_PORT} || $ENV{TEST_NGINX_PORT}
               || 1984;

    $ENV{TEST_NGINX_BINARY} //= '/usr/sbin/nginx';
    $ENV{TEST_NGINX_LOAD_MODULES} //= join ' ',
        "$mods/ndk_http_module.so",
        "$mods/ngx_http_echo_module.so",
        "$Root/build/modules/ngx_http_token_meter_module.so";
    $ENV{TEST_NGINX_MOCK_PORT} //= $port + 10;

    # Each test file gets its own store directory; blocks share it, so
    # what one block writes the next one reads, across nginx restarts.
    (my $file = File::Basename::basename($0)) =~ s/\.t$//;
    $OwnStore = !defined $ENV{TEST_NGINX_STORE_DIR};
    $ENV{TEST_NGINX_STORE_DIR} //= "$Root/t/tmp/$file";
    $StoreDir = $ENV{TEST_NGINX_STORE_DIR};
}

# TEST_NGINX_TOKEN_METER_RUNNER: "in-tree" forces our runner, "test-nginx"
# insists on the real one; anything else takes the real one if present.
sub choose_base {
    my $want = $ENV{TEST_NGINX_TOKEN_METER_RUNNER} // '';

    return 't::TokenMeter::Runner' if $want eq 'in-tree';

    my $have = eval { require Test::Nginx::Socket; 1 };

    die "t::TokenMeter: TEST_NGINX_TOKEN_METER_RUNNER=test-nginx but"
        . " Test::Nginx::Socket does not load: $@" if $want eq 'test-nginx'
                                                     && !$have;

    return $have ? 'Test::Nginx::Socket' : 't::TokenMeter::Runner';
}


# A file that declares no plan gets "no_plan": counting assertions by hand
# is what the house style asks us not to do.
sub run_tests () {
    Test::More::plan('no_plan') unless Test::Builder->new->has_plan;

    no strict 'refs';
    &{"${Base}::run_tests"}();
}

sub sha256_hex {
    return Digest::SHA::sha256_hex(@_);
}


# Our own subs are compiled above this point on purpose: the base import
# below only brings in names the package does not define yet.
BEGIN {
    $Root = Cwd::abs_path(File::Basename::dirname(__FILE__) . '/..');

    set_env_defaults();

    $Base = choose_base();
    eval "require $Base; 1" or die $@;

    # Makes this package a subclass of the runner, so that "use
    # t::TokenMeter" exports the runner's functions as well as ours.
    $Base->import('-base');
}

# Test::Nginx keeps $ServerPort in Test::Nginx::Util and exports it to
# Test::Nginx::Socket; alias ours to whichever runner is in use.
{
    no strict 'refs';
    *ServerPort = \${"${Base}::ServerPort"};
}

our $ServerPort;

our @EXPORT = qw(run_tests sha256_hex $ServerPort);


# The store directory.

sub prepare_store_dir {
    File::Path::remove_tree($StoreDir) if $OwnStore && -d $StoreDir;
    File::Path::make_path($StoreDir);

    die "t::TokenMeter: cannot create $StoreDir\n" unless -d $StoreDir;
}

sub remove_store_dir {
    return if !$OwnStore || $ENV{TEST_NGINX_NO_CLEAN};

    File::Path::remove_tree($StoreDir);
}


# The mock model upstream.

# Starting the mock costs a Python start-up, so only files that refer to
# its port get one.
sub file_needs_mock {
    open my $fh, '<', $0 or return 0;
    local $/;
    my $text = <$fh>;
    close $fh;

    return index($text, 'TEST_NGINX_MOCK_PORT') >= 0;
}

sub start_mock {
    my $script = "$Root/t/mock/upstream.py";
    my $port = $ENV{TEST_NGINX_MOCK_PORT};
    my $python = $ENV{TEST_NGINX_PYTHON} || 'python3';

    return unless -f $script;

    die "t::TokenMeter: 127.0.0.1:$port is already taken; is a mock"
        . " upstream from another run still alive?\n" if port_open($port);

    $MockLog = "$StoreDir/mock-upstream.log";

    my $pid = fork // die "t::TokenMeter: fork() failed: $!\n";

    if ($pid == 0) {
        # its own process group, so that stopping it stops its children
        setpgrp(0, 0);

        open STDIN, '<', '/dev/null';
        open STDOUT, '>>', $MockLog;
        open STDERR, '>&', \*STDOUT;

        exec $python, $script, '--port', $port
            or print STDERR "cannot run $python: $!\n";
        POSIX::_exit(127);
    }

    $MockPid = $pid;

    my $deadline = Time::HiRes::time() + 5;

    while (Time::HiRes::time() < $deadline) {
        return if port_open($port);

        if (waitpid($pid, POSIX::WNOHANG()) == $pid) {
            undef $MockPid;
            die "t::TokenMeter: the mock upstream exited at start"
                . " (status $?); its output:\n" . mock_output();
        }

        Time::HiRes::sleep(0.05);
    }

    die "t::TokenMeter: the mock upstream did not listen on"
        . " 127.0.0.1:$port within 5 s; its output:\n" . mock_output();
}

sub stop_mock {
    return unless $MockPid;

    kill 'TERM', -$MockPid;

    for (1 .. 100) {
        return undef $MockPid if waitpid($MockPid, POSIX::WNOHANG());
        Time::HiRes::sleep(0.02);
    }

    kill 'KILL', -$MockPid;
    waitpid $MockPid, 0;
    undef $MockPid;
}

sub mock_output {
    open my $fh, '<', $MockLog or return "(none)\n";
    local $/;
    my $text = <$fh>;

    return length $text ? $text : "(none)\n";
}

sub port_open {
    my ($port) = @_;
    my $sock = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
                                     PeerPort => $port,
                                     Proto => 'tcp', Timeout => 1);
    return 0 unless $sock;

    close $sock;
    return 1;
}


prepare_store_dir();
start_mock() if file_needs_mock();

# Runs before the runner's own END (END blocks run in reverse order of
# definition); nginx may still hold the store open then, which is harmless
# for removed files.
END {
    if ($$ == $MainPid) {
        local $?;

        stop_mock();
        remove_store_dir();
    }
}

1;
