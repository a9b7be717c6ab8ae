package t::TokenMeter::Runner;

# The in-tree test runner: reads the Test::Nginx::Socket block format and
# behaves like that module for the sections this project uses, so that the
# same .t files pass or fail the same way under either.  t::TokenMeter picks
# this runner when Test::Nginx is not installed; t/README lists what it
# supports and where it differs.
#
# Written for this project; it shares no code with Test::Nginx.

use strict;
use warnings;

# "-base" (lower case) makes this package a Test::Base subclass without
# Spiffy's source filter, so the subs below are plain Perl.
use Test::Base -base;

use Errno ();
use File::Path qw(make_path remove_tree);
use File::Spec ();
use IO::Select ();
use IO::Socket::INET ();
use List::Util qw(shuffle);
use POSIX qw(:sys_wait_h);
use Time::HiRes qw(sleep time);


our @EXPORT = qw(
    run_tests run_test
    repeat_each no_shuffle no_long_string no_root_location
    master_on master_off master_process_enabled workers worker_connections
    log_level env_to_nginx add_block_preprocessor config_preamble
    server_port server_port_for_client server_addr server_name
    html_dir server_root timeout use_hup check_accum_error_log
    bail_out is_str
    add_cleanup_handler add_test_cleanup_handler add_response_body_check
);


# Settings; the environment variables keep their Test::Nginx meaning.

our $NginxBinary = $ENV{TEST_NGINX_BINARY} || 'nginx';
our $LoadModules = $ENV{TEST_NGINX_LOAD_MODULES} // '';
our $ServerPort = $ENV{TEST_NGINX_SERVER_PORT} || $ENV{TEST_NGINX_PORT}
                  || 1984;
our $ServerPortForClient = $ENV{TEST_NGINX_CLIENT_PORT} || $ServerPort;
our $ServerAddr = '127.0.0.1';
our $ServerName = 'localhost';
our $Timeout = $ENV{TEST_NGINX_TIMEOUT} || 3;
our $Sleep = $ENV{TEST_NGINX_SLEEP} || 0.015;
our $LogLevel = $ENV{TEST_NGINX_LOG_LEVEL} || 'debug';
our $MasterProcess = $ENV{TEST_NGINX_MASTER_PROCESS} || 'off';
our $Workers = 1;
our $WorkerConnections = 64;
our $RepeatEach = 1;
our $NoShuffle = $ENV{TEST_NGINX_NO_SHUFFLE} || 0;
our $NoRootLocation = 0;
our $NoLongString = 0;
our $CheckAccumErrLog = $ENV{TEST_NGINX_CHECK_ACCUM_ERR_LOG} || 0;
our $UseHup = $ENV{TEST_NGINX_USE_HUP} || 0;
our $UseValgrind = $ENV{TEST_NGINX_USE_VALGRIND} || 0;
our $NoClean = $ENV{TEST_NGINX_NO_CLEAN} || 0;
our $Verbose = $ENV{TEST_NGINX_VERBOSE} || 0;
our $ConfigPreamble = '';

our (@EnvToNginx, @BlockPreprocessors, @CleanupHandlers,
     @TestCleanupHandlers, @ResponseBodyChecks);

our $ServRoot = File::Spec->rel2abs($ENV{TEST_NGINX_SERVROOT}
                                    || 't/servroot');
$ENV{TEST_NGINX_SERVER_ROOT} = $ServRoot;

our $LogDir = "$ServRoot/logs";
our $ErrLogFile = "$LogDir/error.log";
our $AccLogFile = "$LogDir/access.log";
our $StderrFile = "$LogDir/nginx.stderr";
our $HtmlDir = "$ServRoot/html";
our $ConfDir = "$ServRoot/conf";
our $ConfFile = "$ConfDir/nginx.conf";
our $PidFile = "$LogDir/nginx.pid";

# Run state.

my $MainPid = $$;
my $FirstBlock = 1;
my $PrevConfig;
my $ChildPid;           # nginx in the foreground (valgrind), our child
my $ValgrindBlock;      # the first block the running valgrind nginx served
my $ConfigVersion = '';
my $ErrLogPos = 0;
my $NginxV;

# What a server root may hold; wiping one that holds anything else could
# remove somebody's real data when TEST_NGINX_SERVROOT points at the wrong
# place, so we refuse, as Test::Nginx does.
my $OwnEntries = qr/^(?:conf|logs|html|cache|\w+_temp|\w+_cache)$/;

# Sections this runner understands.  Anything else fails the block, so a
# typo or a Test::Nginx feature we lack never passes silently.
my %Supported = map { $_ => 1 } qw(
    config http_config main_config post_main_config server_name
    request raw_request raw_request_middle_delay pipelined_requests
    more_headers
    error_code error_code_like
    response_headers response_headers_like
    raw_response_headers_like raw_response_headers_unlike
    response_body response_body_like response_body_unlike ignore_response
    error_log no_error_log must_die
    timeout wait init post_setup_server_root log_level user_files
    abort shutdown curl skip_eval
    no_check_leak suppress_stderr no_mockeagain
    ONLY LAST SKIP
);

$SIG{INT} = sub { exit 130 } unless $SIG{INT};
$SIG{TERM} = sub { exit 143 } unless $SIG{TERM};


# Functions that test files call to change settings.

sub repeat_each (@) {
    $RepeatEach = shift if @_;
    return $RepeatEach;
}

sub no_shuffle () { $NoShuffle = 1 }

sub no_long_string () { $NoLongString = 1 }

sub no_root_location () { $NoRootLocation = 1 }

sub master_on () { $MasterProcess = 'on' }

sub master_off () { $MasterProcess = 'off' }

sub master_process_enabled (@) {
    return $MasterProcess unless @_;
    $MasterProcess = shift() ? 'on' : 'off';
}

sub workers (@) {
    return $Workers unless @_;
    $Workers = shift;
}

sub worker_connections (@) {
    return $WorkerConnections unless @_;
    $WorkerConnections = shift;
}

sub log_level (@) {
    return $LogLevel unless @_;
    $LogLevel = shift;
}

sub env_to_nginx (@) {
    die "env_to_nginx: no arguments\n" unless @_;

    for my $v (@_) {
        die "env_to_nginx: bad value \"$v\"\n"
            if $v !~ /^[A-Za-z_]/ || $v =~ /\n/;
        push @EnvToNginx, $v;
    }
}

sub add_block_preprocessor (&) { unshift @BlockPreprocessors, shift }

sub add_cleanup_handler ($) { unshift @CleanupHandlers, shift }

sub add_test_cleanup_handler ($) { unshift @TestCleanupHandlers, shift }

sub add_response_body_check ($) { push @ResponseBodyChecks, shift }

sub config_preamble ($) { $ConfigPreamble = shift }

sub server_port (@) {
    return $ServerPort unless @_;
    $ServerPort = shift;
}

sub server_port_for_client (@) {
    return $ServerPortForClient unless @_;
    $ServerPortForClient = shift;
}

sub server_addr (@) {
    return $ServerAddr unless @_;
    $ServerAddr = shift;
}

sub server_name (@) {
    return $ServerName unless @_;
    $ServerName = shift;
}

sub html_dir () { $HtmlDir }

sub server_root () { $ServRoot }

sub timeout (@) {
    return $Timeout unless @_;
    $Timeout = shift;
}

sub use_hup () { $UseHup = 1 }

sub check_accum_error_log () { $CheckAccumErrLog = 1 }

sub bail_out (@) {
    cleanup();
    Test::More::BAIL_OUT(join '', @_);
}


# The main loop.

sub run_tests () {
    $ENV{TEST_NGINX_SERVER_PORT} //= $ServerPort;

    check_nginx_binary();

    my @blocks = Test::Base::blocks();
    @blocks = shuffle @blocks unless $NoShuffle;

    for my $block (@blocks) {
        $_->($block) for @BlockPreprocessors;

        $block->set_value(name => "$0 " . $block->name);

        run_test($block);

        $_->($block) for @TestCleanupHandlers;
    }

    finish_valgrind('END');
    cleanup();
}

sub run_test ($) {
    my ($block) = @_;
    my $name = $block->name;

    return if defined $block->SKIP;
    return unless sections_supported($block);
    return if skipped_by_eval($block);

    local $LogLevel = $block->log_level if defined $block->log_level;

    my $config = expand_env(scalar $block->config, $name);

    if (defined $block->must_die) {
        run_must_die($block, $config);
        return;
    }

    return unless prepare_nginx($block, $config);

    if (defined $block->init) {
        eval_in_main(scalar $block->init)
            or die "$name - init failed: $@";
    }

    $ErrLogPos = 0;

    for my $rep (0 .. $RepeatEach - 1) {
        write_user_files($block) if $rep > 0;
        run_requests($block, $rep);
    }

    # valgrind's report waits until nginx stops: when the next block brings
    # a configuration of its own, or when the file ends
    $ValgrindBlock //= $block if $UseValgrind && !$UseHup;
}

sub finish_valgrind {
    my ($name) = @_;

    return unless $ValgrindBlock;

    stop_nginx($name);
    check_valgrind($ValgrindBlock);
    undef $ValgrindBlock;
}

sub sections_supported {
    my ($block) = @_;
    my @bad = grep { !$Supported{$_} }
              @{ $block->{_section_order}[0] || [] };

    return 1 unless @bad;

    fail($block->name . " - section \"--- $_\" is not supported by the"
         . " in-tree runner (see t/README)") for @bad;
    return 0;
}

# "--- skip_eval: N: perl code" skips the block's N tests when the code is
# true, as in Test::Nginx.
sub skipped_by_eval {
    my ($block) = @_;
    my $spec = $block->skip_eval;

    return 0 unless defined $spec;

    my ($n, $code) = $spec =~ /^\s*(\d+)\s*:\s*(.*)/s
        or die $block->name . " - bad --- skip_eval: $spec\n";

    my $skip = eval "package main; no strict; $code";
    die $block->name . " - skip_eval failed: $@" if $@;
    return 0 unless $skip;

    # once for each repetition, as the block's tests would have run
    for (1 .. $RepeatEach) {
        SKIP: { skip($block->name . " - skip_eval", $n) }
    }

    return 1;
}

sub eval_in_main {
    my ($code) = @_;
    my $ok = eval "package main; no strict; $code; 1";
    return $ok ? 1 : 0;
}


# nginx process management.

# Gets a running nginx with this block's configuration: reloads the running
# one when HUP mode allows it, otherwise starts a fresh one.
sub prepare_nginx {
    my ($block, $config) = @_;
    my $name = $block->name;

    if (!defined $config) {
        die "$name - no --- config section and no earlier block to reuse\n"
            unless defined $PrevConfig;

        # Test::Nginx reuses the running nginx for a block without
        # --- config; start one if it has gone
        return 1 if nginx_pid();
        $config = $PrevConfig;
    }

    finish_valgrind($name);

    $PrevConfig = $config;

    my $first = $FirstBlock;
    $FirstBlock = 0;

    my $pid = nginx_pid();

    if ($pid && $UseHup && !$first) {
        return reload_nginx($block, $config, $pid);
    }

    stop_nginx($name) if $pid || $first;

    setup_server_root(0);
    run_post_setup($block);
    write_user_files($block);
    write_config($block, $config);

    return start_nginx($block);
}

sub start_nginx {
    my ($block) = @_;
    my $name = $block->name;

    return start_nginx_valgrind($block) if $UseValgrind;

    # A port left in TIME_WAIT or an nginx still exiting can make bind()
    # fail for a moment; anything else is reported at once.
    my $deadline = time + 5;

    while (1) {
        my ($status, $stderr) = run_nginx_foreground();

        if ($status == 0) {
            return 1 if wait_for_pid_file(5);
            fail("$name - nginx started but wrote no pid file $PidFile");
            return 0;
        }

        if ($stderr =~ /Address already in use/ && time < $deadline) {
            sleep 0.1;
            next;
        }

        fail("$name - nginx failed to start (exit status "
             . ($status >> 8) . ")");
        diag("stderr of nginx:\n$stderr") if length $stderr;
        return 0;
    }
}

# Runs the nginx command and waits for it: with "daemon on" the command
# returns once nginx has read its configuration and forked.
sub run_nginx_foreground {
    my $pid = spawn([nginx_command()], stderr => $StderrFile);
    my $status = wait_child($pid, 30);

    if (!defined $status) {
        kill 'KILL', $pid;
        waitpid $pid, 0;
        $status = 255 << 8;
    }

    return ($status, slurp($StderrFile) // '');
}

sub start_nginx_valgrind {
    my ($block) = @_;
    my $name = $block->name;

    my @opts = $UseValgrind =~ /^\d+$/
               ? qw(--tool=memcheck --leak-check=full
                    --show-possibly-lost=no --num-callers=100
                    --gen-suppressions=all)
               : split ' ', $UseValgrind;

    for my $file ('valgrind.suppress', 't/valgrind.suppress') {
        push @opts, "--suppressions=$file" if -f $file;
    }

    push @opts, '--trace-children=yes' if master_wanted() eq 'on';

    my @cmd = ('valgrind', '-q', "--log-file=$LogDir/valgrind.%p.log",
               @opts, nginx_command());

    warn "$name\n";

    $ChildPid = spawn(\@cmd, stderr => $StderrFile, group => 1);

    # nginx runs in the foreground here, so readiness is the port, and
    # with a master process the pid file too, written after the port opens
    my $deadline = time + 60;

    while (time < $deadline) {
        return 1 if port_open($ServerAddr, $ServerPortForClient)
                    && (master_wanted() ne 'on' || -s $PidFile);

        if (waitpid($ChildPid, WNOHANG) == $ChildPid) {
            undef $ChildPid;
            fail("$name - nginx under valgrind exited at start");
            diag(slurp($StderrFile) // '');
            return 0;
        }

        sleep 0.1;
    }

    fail("$name - nginx under valgrind did not listen within 60 s");
    return 0;
}

sub nginx_command {
    my @cmd = ($NginxBinary);

    # -e (nginx 1.19.5+) sends the errors printed before the configuration
    # is read to our error.log instead of the compiled-in path.
    push @cmd, '-e', $ErrLogFile if nginx_version() >= 1_019_005;

    return (@cmd, '-p', "$ServRoot/", '-c', 'conf/nginx.conf');
}

# HUP mode: rewrite the configuration in place and let the running master
# reload it, as "nginx -s reload" does in production.
sub reload_nginx {
    my ($block, $config, $pid) = @_;
    my $name = $block->name;

    $ConfigVersion = random_string(12);

    setup_server_root(1);
    run_post_setup($block);
    write_user_files($block);
    write_config($block, $config);

    # USR1 first: the old error.log was just removed and nginx must open a
    # new one before it logs the reload.
    kill 'USR1', $pid;
    sleep $Sleep;
    kill 'HUP', $pid;
    sleep $Sleep * 3;

    return 1 if wait_for_config_version(valgrind_factor() * 10);

    fail("$name - nginx did not reload the configuration");
    diag(tail_of_file($ErrLogFile, 20));
    return 1;
}

# The extra server block written in HUP mode answers /ver with the version
# string of the configuration it belongs to.  Old workers may still accept
# a few connections after the reload, so wait for a run of new answers.
sub wait_for_config_version {
    my ($limit) = @_;
    my $deadline = time + $limit;
    my $good = 0;

    while (time < $deadline) {
        my $res = simple_get('Test-Nginx', '/ver');

        if ($res && defined $res->{body} && $res->{body} eq $ConfigVersion)
        {
            return 1 if ++$good >= 10;
            sleep 0.01;
            next;
        }

        $good = 0;
        sleep 0.05;
    }

    return 0;
}

sub stop_nginx {
    my ($name) = @_;
    my $pid = $ChildPid // nginx_pid();

    if (!$pid) {
        unlink $PidFile;
        return;
    }

    kill 'QUIT', $pid;

    my $limit = $UseValgrind ? 60 : $Timeout + 2;

    if (!wait_gone($pid, $limit)) {
        warn "$name - nginx $pid did not quit within $limit s, killing it\n";
        kill_tree($pid, 'KILL');
        wait_gone($pid, 2);
    }

    # Only a killed nginx leaves its pid file behind.
    unlink $PidFile;
    undef $ChildPid;
}

# The pid of the nginx that belongs to this server root, if it runs.
sub nginx_pid {
    my $pid = $ChildPid;

    if (!$pid) {
        my $text = slurp($PidFile) // '';
        ($pid) = $text =~ /^\s*(\d+)\s*$/;
    }

    return undef unless $pid && alive($pid);

    # A stale pid file (after a reboot, say) may name another program.
    my $cmdline = slurp("/proc/$pid/cmdline") // '';
    return $cmdline =~ /nginx|valgrind|memcheck/ ? $pid : undef;
}

sub alive {
    my ($pid) = @_;

    if (defined $ChildPid && $pid == $ChildPid) {
        return 0 if waitpid($pid, WNOHANG) == $pid;
    }

    return 0 unless kill 0, $pid;

    # A daemon is re-parented to a process that may never reap it; a zombie
    # has exited all the same.
    my $stat = slurp("/proc/$pid/stat") // '';
    return $stat =~ /^\d+ \(.*\) Z/s ? 0 : 1;
}

sub wait_gone {
    my ($pid, $limit) = @_;
    my $deadline = time + $limit;

    while (alive($pid)) {
        return 0 if time > $deadline;
        sleep 0.02;
    }

    return 1;
}

# Kills nginx and its workers: a daemonized nginx leads its own process
# group, and so does a valgrind child we started.
sub kill_tree {
    my ($pid, $sig) = @_;

    if (getpgrp($pid) == $pid) {
        kill $sig, -$pid;
        return;
    }

    kill $sig, $pid, child_pids($pid);
}

sub child_pids {
    my ($ppid) = @_;
    my @kids;

    for my $stat (glob '/proc/[0-9]*/stat') {
        my $text = slurp($stat) // next;
        push @kids, $1 if $text =~ /^(\d+) \(.*\) \S (\d+) /s && $2 == $ppid;
    }

    return @kids;
}

sub wait_for_pid_file {
    my ($limit) = @_;
    my $deadline = time + $limit;

    until (nginx_pid()) {
        return 0 if time > $deadline;
        sleep 0.01;
    }

    return 1;
}

sub check_valgrind {
    my ($block) = @_;
    my $report = '';

    for my $log (sort glob "$LogDir/valgrind.*.log") {
        my $text = slurp($log) // '';
        $report .= $text if $text =~ /\S/;
    }

    return unless length $report;

    fail($block->name . " - valgrind reported errors");
    diag(substr $report, 0, 20000);
}

sub valgrind_factor { $UseValgrind ? 6 : 1 }

sub master_wanted {
    return 'on' if $UseHup;
    return $MasterProcess;
}

sub check_nginx_binary {
    my $found = $NginxBinary =~ m{/}
                ? -x $NginxBinary
                : grep { -x "$_/$NginxBinary" } split /:/, $ENV{PATH} // '';

    die "cannot find the nginx binary \"$NginxBinary\";"
        . " set TEST_NGINX_BINARY\n" unless $found;
}

sub nginx_v_output {
    $NginxV //= `$NginxBinary -V 2>&1` // '';
    return $NginxV;
}

sub nginx_version {
    my ($a, $b, $c) = nginx_v_output() =~ m{nginx/(\d+)\.(\d+)\.(\d+)};
    return 0 unless defined $c;
    return $a * 1_000_000 + $b * 1_000 + $c;
}


# Server root and configuration.

sub setup_server_root {
    my ($keep_running) = @_;

    if ($keep_running) {
        empty_server_root_files($ServRoot);

    } elsif (-d $ServRoot) {
        wipe_server_root();
    }

    make_path($ServRoot, $LogDir, $HtmlDir, $ConfDir);
    spew("$HtmlDir/index.html",
         "<html><head><title>It works!</title></head>"
         . "<body>It works!</body></html>");
}

# HUP mode keeps the directories (and the pid file) of the running nginx
# and removes every other file, as a fresh start would.
sub empty_server_root_files {
    my ($dir) = @_;

    opendir my $dh, $dir or return;
    my @entries = grep { $_ ne '.' && $_ ne '..' } readdir $dh;
    closedir $dh;

    for my $entry (@entries) {
        my $path = "$dir/$entry";

        if (-d $path && !-l $path) {
            empty_server_root_files($path);
            next;
        }

        next if $path eq $PidFile;
        unlink $path or warn "cannot remove $path: $!\n";
    }
}

sub wipe_server_root {
    opendir my $dh, $ServRoot or die "cannot open $ServRoot: $!\n";
    my @entries = grep { $_ ne '.' && $_ ne '..' } readdir $dh;
    closedir $dh;

    my @foreign = grep { $_ !~ $OwnEntries } @entries;

    die "refusing to wipe $ServRoot: it holds @foreign;"
        . " is TEST_NGINX_SERVROOT right?\n" if @foreign;

    remove_tree($ServRoot, { error => \my $errors });
    die "cannot remove $ServRoot\n" if -d $ServRoot;
}

sub run_post_setup {
    my ($block) = @_;
    my $code = $block->post_setup_server_root;

    return unless defined $code;

    eval_in_main($code)
        or die $block->name . " - post_setup_server_root failed: $@";
}

# "--- user_files": ">>> name [date]" starts a file; a relative name is
# taken from the html directory, a date is [[CC]YY]MMDDhhmm[.ss] in GMT.
sub write_user_files {
    my ($block) = @_;
    my $files = $block->user_files;
    my $name = $block->name;

    return unless defined $files;

    if (!ref $files) {
        my @list;

        for my $line (split /^/m, $files) {
            if ($line =~ /^>>> (\S+)(?:\s+(.+?))?\s*$/) {
                push @list, [$1, '', $2];
                next;
            }

            die "$name - --- user_files must start with \">>> name\"\n"
                unless @list;
            $list[-1][1] .= $line;
        }

        $files = \@list;
    }

    die "$name - --- user_files must be a string or an array\n"
        unless ref $files eq 'ARRAY';

    for my $file (@$files) {
        my ($fname, $body, $date) = @$file;
        my $path = $fname =~ m{^/} ? $fname : "$HtmlDir/$fname";

        (my $dir = $path) =~ s{/[^/]*$}{};
        make_path($dir) if length $dir;

        spew($path, expand_env($body // '', $name));

        next unless defined $date;

        local $ENV{TZ} = 'GMT';
        system('touch', '-t', $date, $path) == 0
            or die "$name - cannot set the date of $path to $date\n";
    }
}

sub write_config {
    my ($block, $config) = @_;
    my $name = $block->name;

    my $http_config = expand_env($block->http_config // '', $name);
    my $main_config = expand_env($block->main_config // '', $name);
    my $post_main = expand_env($block->post_main_config // '', $name);
    my $server_name = $block->server_name // $ServerName;
    my $master = master_wanted();
    my $daemon = $UseValgrind ? 'off' : 'on';

    $server_name =~ s/\s+$//;
    $server_name =~ s/(['\\])/\\$1/g;

    my $conf = "# written by t/TokenMeter/Runner.pm for\n# $name\n\n";

    $conf .= "load_module $_;\n" for grep { length } split /\s+/,
                                                         $LoadModules;

    $conf .= <<"EOC";

worker_processes  $Workers;
daemon            $daemon;
master_process    $master;
error_log         $ErrLogFile $LogLevel;
pid               $PidFile;
EOC

    for my $var (@EnvToNginx) {
        $conf .= $var =~ /\s/ ? "env '$var';\n" : "env $var;\n";
    }

    $conf .= "\n$main_config\n\nhttp {\n    access_log $AccLogFile;\n";
    $conf .= temp_paths($http_config);

    $conf .= <<"EOC";

    default_type text/plain;
    keepalive_timeout 68000ms;

$http_config

    server {
        listen $ServerPort;
        server_name '$server_name';
        client_max_body_size 30M;

$ConfigPreamble

        # the block's --- config
$config
        # end of --- config

EOC

    $conf .= <<"EOC" unless $NoRootLocation;
        location / {
            root $HtmlDir;
            index index.html index.htm;
        }
EOC

    $conf .= "    }\n";

    $conf .= <<"EOC" if $UseHup;

    # lets the runner see which configuration answers after a reload
    server {
        listen $ServerPort;
        server_name 'Test-Nginx';

        location = /ver {
            return 200 '$ConfigVersion';
        }
    }
EOC

    $conf .= <<"EOC";
}

$post_main

events {
    accept_mutex off;
    worker_connections $WorkerConnections;
}
EOC

    # Workers would otherwise run as nobody and could not read the test
    # tree or write the store.
    $conf .= "\nuser root;\n" if $> == 0;

    spew($ConfFile, $conf);
}

sub temp_paths {
    my ($http_config) = @_;
    my $out = '';

    for my $kind (qw(client_body proxy fastcgi uwsgi scgi)) {
        next if $http_config =~ /\b${kind}_temp_path\b/;
        next if $kind ne 'client_body' && $kind ne 'proxy'
                && nginx_v_output() =~ /--without-http_${kind}_module/;

        $out .= "    ${kind}_temp_path $ServRoot/${kind}_temp;\n";
    }

    return $out;
}

sub expand_env {
    my ($text, $name) = @_;

    return $text if !defined $text || ref $text;

    $text =~ s{\$(TEST_NGINX_[_A-Z0-9]+)}{
        $ENV{$1} // die "$name - the environment has no $1\n"
    }ge;

    return $text;
}


# must_die: nginx has to refuse to start.

sub run_must_die {
    my ($block, $config) = @_;
    my $name = $block->name;
    my $expect = $block->must_die;

    die "$name - --- must_die needs a --- config section\n"
        unless defined $config;

    finish_valgrind($name);
    stop_nginx($name);
    undef $PrevConfig;
    $FirstBlock = 0;

    setup_server_root(0);
    run_post_setup($block);
    write_user_files($block);

    {
        # The start must fail on its own, not under valgrind or a master.
        local $UseValgrind = 0;
        local $UseHup = 0;
        write_config($block, $config);
    }

    for my $rep (0 .. $RepeatEach - 1) {
        unlink $ErrLogFile;
        $ErrLogPos = 0;

        my ($status, $stderr) = run_nginx_foreground();
        my $code = $status >> 8;

        if ($status & 127) {
            fail("$name - nginx was killed by signal " . ($status & 127));

        } elsif ($expect =~ /^\s*(\d+)\s*$/) {
            is($code, $1, "$name - die with the expected exit code");

        } else {
            isnt($status, 0, "$name - die as expected");
        }

        # The same message goes to stderr and to error.log; a log that
        # cannot be opened leaves only stderr.
        my @extra = split /^/m, $stderr;
        check_error_log($block, $rep, \@extra, 1);

        if ($status == 0) {
            warn "WARNING: $name - nginx must die but it does not;"
                 . " stopping it\n";
            wait_for_pid_file(2);
            stop_nginx($name);
        }
    }
}


# Requests.

sub run_requests {
    my ($block, $rep) = @_;
    my $name = $block->name;

    my $reqs = build_requests($block);
    my $timeout = parse_time(scalar $block->timeout) // $Timeout;
    my $pipelined = $block->pipelined_requests
                    ? scalar @{ $block->pipelined_requests } : 0;
    my $need_array = $pipelined ? 1 : @$reqs > 1;
    my $idx = 0;

    print_curl_command($block, $reqs->[0]) if defined $block->curl;

    for my $i (0 .. $#$reqs) {
        my $req = $reqs->[$i];
        my $left = http_exchange($block, $req->{pieces}, $timeout) // '';
        my $count = $pipelined || 1;

        for my $k (1 .. $count) {
            my ($res, $raw_headers);

            if (!defined $block->ignore_response) {
                ($res, $raw_headers, $left) =
                    parse_response($name, $left, $k == 1 && $req->{head});

                if (!$pipelined && defined $left && length $left) {
                    warn "WARNING: $name - unexpected extra bytes after"
                         . " the response: \"" . fmt_str($left) . "\"\n";
                }

                check_response($block, $res, $raw_headers, $idx, $rep,
                               $need_array);
            }

            $left //= '';

            if ($k < $count || $i < $#$reqs) {
                sleep $block->wait if $block->wait;
                check_error_log($block, $rep);
            }

            $idx++;
        }
    }

    sleep $block->wait if $block->wait;
    check_error_log($block, $rep);
}

# Turns the request sections into a list of requests, each a list of pieces
# to send ({value => bytes, delay_before => seconds}).
sub build_requests {
    my ($block) = @_;
    my $name = $block->name;
    my $more = $block->more_headers // '';

    if (defined(my $raw = $block->raw_request)) {
        my @pieces = ref $raw eq 'ARRAY' ? @$raw : ($raw);
        my $all = join '', @pieces;

        return [{ pieces => [map { +{ value => $_ } } @pieces],
                  head => is_head($all) }];
    }

    if (defined(my $list = $block->pipelined_requests)) {
        die "$name - --- pipelined_requests must be an array\n"
            unless ref $list eq 'ARRAY';

        my $all = '';

        for my $i (0 .. $#$list) {
            my $conn = $i == $#$list ? 'close' : 'keep-alive';
            my $text = expand_env($list->[$i], $name);
            $all .= build_request($name, [$text], more_for($more, $i, $name),
                                  $conn)->[0];
        }

        return [{ pieces => [{ value => $all }],
                  head => is_head($all) }];
    }

    my $request = $block->request;

    die "$name - no --- request section\n" unless defined $request;

    if (!ref $request) {
        # leading comment lines and blank space are not part of it
        1 while $request =~ s/^\s*#[^\n]+\s+|^\s+//s;
        $request = [$request];
    }

    die "$name - --- request must be a string or an array\n"
        unless ref $request eq 'ARRAY';

    my @reqs;

    for my $i (0 .. $#$request) {
        push @reqs, build_one_of_many($name, $request->[$i],
                                      more_for($more, $i, $name));
    }

    return \@reqs;
}

sub build_one_of_many {
    my ($name, $one, $more) = @_;

    if (!ref $one) {
        my $pieces = build_request($name, [$one], $more, 'close');
        return { pieces => [{ value => $pieces->[0] }],
                 head => is_head($one) };
    }

    die "$name - each request must be a string or an array of packets\n"
        unless ref $one eq 'ARRAY';

    my @values = map { ref $_ eq 'HASH' ? $_->{value} : $_ } @$one;
    my $pieces = build_request($name, \@values, $more, 'close');
    my @out;

    for my $j (0 .. $#$pieces) {
        my %piece = ref $one->[$j] eq 'HASH' ? %{ $one->[$j] } : ();
        $piece{value} = $pieces->[$j];
        push @out, \%piece;
    }

    return { pieces => \@out, head => is_head($values[0]) };
}

sub is_head {
    my ($request) = @_;

    return $request =~ /^\s*HEAD\s/ ? 1 : 0;
}

sub more_for {
    my ($more, $i, $name) = @_;

    return $more unless ref $more eq 'ARRAY';

    return $more->[$i]
        // die "$name - --- more_headers has no entry for request $i\n";
}

# Builds the bytes of one request from the "METHOD [URI [VERSION]]" line and
# the body after it, adding Host, Connection, --- more_headers and
# Content-Length the way Test::Nginx does.  A request given as packets is
# cut again at the matching places, so pauses fall where the test put them.
sub build_request {
    my ($name, $packets, $more, $conn) = @_;
    my $whole = join '', @$packets;

    my ($line) = $whole =~ /\A([^\n]*\n?)/;
    my $content = substr $whole, length $line;

    my ($meth, $uri, $ver) =
        $line =~ /^[ \t]*(\S+)(?:[ \t]+(\S+))?(?:[ \t]+(\S+))?[ \t\r]*\n?$/
        or die "$name - bad request line \"$line\";"
               . " it is METHOD [URI [VERSION]]\n";

    my ($headers, $chunked) = parse_more_headers($more);
    my $lead = 0;
    my $length = '';

    if (!$chunked && length $content
        && $headers !~ /(?:^|\n)Content-Length:/)
    {
        (my $body = $content) =~ s/^\s+//;
        $lead = length($content) - length($body);
        $body =~ s/\s+$//;
        $content = $body;
        $length = "Content-Length: " . length($content) . "\r\n";
    }

    my $head = join ' ', $meth, $uri // '/', $ver // 'HTTP/1.1';
    $head .= "\r\n";
    $head .= "Host: $ServerName\r\n" if $headers !~ /(?:^|\n)Host:/i;
    $head .= "Connection: $conn\r\n" if $headers !~ /(?:^|\n)Connection/i;
    $head .= "$headers$length\r\n";

    my $built = $head . $content;

    return [$built] if @$packets == 1;

    my @cuts;
    my $pos = 0;

    for my $p (@$packets[0 .. $#$packets - 1]) {
        $pos += length $p;

        my $cut = $pos <= length $line
                  ? ($pos < length $head ? $pos : length $head)
                  : length($head) + $pos - length($line) - $lead;

        $cut = length $head if $cut < length $head && $pos > length $line;
        $cut = length $built if $cut > length $built;
        push @cuts, $cut;
    }

    my @pieces;
    my $from = 0;

    for my $cut (@cuts, length $built) {
        $cut = $from if $cut < $from;
        push @pieces, substr $built, $from, $cut - $from;
        $from = $cut;
    }

    return \@pieces;
}

sub parse_more_headers {
    my ($more) = @_;
    my ($out, $chunked) = ('', 0);

    for my $line (split /\n+/, $more // '') {
        next if $line =~ /^\s*#/;

        my ($key, $val) = split /:\s*/, $line, 2;
        $val //= '';

        $chunked = 1 if lc $key eq 'transfer-encoding' && $val eq 'chunked';
        $out .= "$key: $val\r\n";
    }

    return ($out, $chunked);
}

# Sends the pieces on a new connection and reads until the server closes
# it.  Every wait is bounded by the timeout, so a silent server fails the
# test instead of hanging it.
sub http_exchange {
    my ($block, $pieces, $timeout) = @_;
    my $name = $block->name;
    my $middle = parse_time(scalar $block->raw_request_middle_delay);

    my $sock = connect_to_nginx($name) or return undef;
    $sock->blocking(0);

    local $SIG{PIPE} = 'IGNORE';

    my @todo = @$pieces;
    my ($out, $resp, $first, $shut) = ('', '', 1, 0);

    while (1) {
        if ($out eq '' && @todo) {
            my $piece = shift @todo;
            my $delay = $piece->{delay_before} // ($first ? 0 : $middle);

            sleep $delay if $delay;
            $out = $piece->{value} // '';
            $first = 0;
            next;
        }

        if ($out eq '' && !$shut) {
            $shut = 1;
            shutdown_socket($sock, scalar $block->shutdown);
        }

        my $rsel = IO::Select->new($sock);
        my $wsel = $out ne '' ? IO::Select->new($sock) : undef;

        $! = 0;
        my ($r, $w) = IO::Select->select($rsel, $wsel, undef, $timeout);

        if (!$r && !$w) {
            next if $!{EINTR};
            timed_out($block);
            last;
        }

        if ($w && @$w) {
            my $n = syswrite $sock, $out;

            if (defined $n) {
                substr($out, 0, $n) = '';

            } elsif (!$!{EAGAIN} && !$!{EWOULDBLOCK}) {
                # nginx may answer and close before reading everything
                ($out, @todo) = ('');
            }
        }

        if ($r && @$r) {
            my $n = sysread $sock, my $buf, 65536;

            if (!defined $n) {
                next if $!{EAGAIN} || $!{EWOULDBLOCK};
                warn "WARNING: $name - reading the response failed: $!\n";
                last;
            }

            last if $n == 0;
            $resp .= $buf;
        }
    }

    close $sock;
    return $resp;
}

sub shutdown_socket {
    my ($sock, $how) = @_;

    return unless defined $how;

    $how = 1 if $how !~ /\S/;
    shutdown $sock, $how;
}

sub timed_out {
    my ($block) = @_;

    # --- abort: the test closes the connection on purpose
    return if defined $block->abort;

    fail("ERROR: client socket timed out - " . $block->name);
}

sub connect_to_nginx {
    my ($name) = @_;
    my $deadline = time + 5 * valgrind_factor();

    while (1) {
        my $sock = IO::Socket::INET->new(PeerAddr => $ServerAddr,
                                         PeerPort => $ServerPortForClient,
                                         Proto => 'tcp',
                                         Timeout => $Timeout);
        return $sock if $sock;

        my $err = $!;

        # Retrying is for an nginx that is still starting, not a dead one.
        if (time > $deadline || !nginx_pid()) {
            fail("$name - Can't connect to $ServerAddr:$ServerPortForClient:"
                 . " $err (aborted)");
            return undef;
        }

        sleep 0.05;
    }
}

sub port_open {
    my ($addr, $port) = @_;
    my $sock = IO::Socket::INET->new(PeerAddr => $addr, PeerPort => $port,
                                     Proto => 'tcp', Timeout => 1);
    return 0 unless $sock;

    close $sock;
    return 1;
}

# A tiny GET for the runner's own use (the HUP version check).
sub simple_get {
    my ($host, $uri) = @_;

    my $sock = IO::Socket::INET->new(PeerAddr => $ServerAddr,
                                     PeerPort => $ServerPortForClient,
                                     Proto => 'tcp', Timeout => 1)
        or return undef;

    local $SIG{PIPE} = 'IGNORE';
    syswrite $sock, "GET $uri HTTP/1.0\r\nHost: $host\r\n\r\n";

    my $sel = IO::Select->new($sock);
    my $resp = '';

    while ($sel->can_read(2)) {
        my $n = sysread $sock, my $buf, 4096;
        last unless $n;
        $resp .= $buf;
    }

    close $sock;

    my ($res) = parse_response('version check', $resp, 0);
    return $res;
}

sub print_curl_command {
    my ($block, $req) = @_;
    my $raw = join '', map { $_->{value} } @{ $req->{pieces} };

    my ($head, $body) = split /\r\n\r\n/, $raw, 2;
    my ($line, @headers) = split /\r\n/, $head;
    my ($meth, $uri) = split ' ', $line;

    my @cmd = ('curl', '-i', '-sS', '-X', $meth);
    push @cmd, '-H', $_ for grep { !/^(?:Host|Connection|Content-Length):/i }
                            @headers;
    push @cmd, '--data-binary', $body if defined $body && length $body;
    push @cmd, "http://$ServerAddr:$ServerPortForClient$uri";

    warn '# ', join(' ', map { shell_quote($_) } @cmd), "\n";
}

sub shell_quote {
    my ($s) = @_;

    return $s if $s =~ m{^[-\w./:=@]+$};

    $s =~ s/'/'\\''/g;
    return "'$s'";
}


# Responses.

# Splits one response off the front of the bytes received.  Returns the
# response ({code, headers, body}), the raw header block and what is left
# (the next pipelined response).  A broken chunked body fails the test and
# gives no response, as in Test::Nginx.
sub parse_response {
    my ($name, $raw, $head_req) = @_;

    my ($head, $rest) = $raw =~ /\A(.*?\r\n)\r\n(.*)\z/s
                        ? ($1, $2) : ($raw, '');

    my ($status, @lines) = split /\r\n/, $head;
    my %res = (headers => [], body => '');

    ($res{code}) = ($status // '') =~ m{^HTTP/\d+(?:\.\d+)?\s+(\d{3})\b};

    for my $line (@lines) {
        push @{ $res{headers} }, [$1, $2]
            if $line =~ /^([^:\s]+)[ \t]*:[ \t]*(.*?)[ \t]*$/;
    }

    my $res = \%res;
    my $code = $res{code} // 0;
    my $te = res_header($res, 'Transfer-Encoding');
    my $len = res_header($res, 'Content-Length');

    if ($head_req || $code == 304 || $code == 204 || $code =~ /^1/) {
        return ($res, $head, $rest);
    }

    if (defined $te && $te =~ /\bchunked\b/i) {
        my ($body, $left) = decode_chunked($name, $rest, $res);
        return (undef, $head, undef) unless defined $body;

        $res{body} = $body;
        return ($res, $head, $left);
    }

    if (defined $len && $len =~ /^\d+$/) {
        if (length $rest < $len) {
            warn "WARNING: $name - response body truncated: $len expected,"
                 . " got " . length($rest) . "\n";
            $res{body} = $rest;
            return ($res, $head, '');
        }

        $res{body} = substr $rest, 0, $len;
        return ($res, $head, substr $rest, $len);
    }

    $res{body} = $rest;
    return ($res, $head, '');
}

sub decode_chunked {
    my ($name, $raw, $res) = @_;
    my $body = '';

    while (1) {
        if ($raw !~ /\G[ \t]*([0-9A-Fa-f]+)[^\r\n]*\r\n/gc) {
            my $what = pos $raw // 0;

            if ($what < length $raw) {
                fail("$name - invalid chunked body received: \""
                     . fmt_str(substr $raw, $what, 40) . "\"");
            } else {
                fail("$name - no last chunk found - \"" . fmt_str($raw)
                     . "\"");
            }

            return;
        }

        my $size = hex $1;

        if ($size == 0) {
            # skip trailer fields up to the empty line
            if ($raw !~ /\G(?:[^\r\n]+\r\n)*\r\n/gc) {
                fail("$name - invalid chunked body received"
                     . " (bad trailer or missing CRLF)");
                return;
            }

            return ($body, substr $raw, pos $raw);
        }

        my $at = pos $raw;

        if (length($raw) - $at < $size + 2
            || substr($raw, $at + $size, 2) ne "\r\n")
        {
            fail("$name - invalid chunked body received (chunk of $size"
                 . " bytes is short or lacks its CRLF)");
            return;
        }

        $body .= substr $raw, $at, $size;
        pos($raw) = $at + $size + 2;
    }
}

# The value of a response header; repeated fields are joined with ", ".
sub res_header {
    my ($res, $key) = @_;
    my @vals = map { $_->[1] } grep { lc $_->[0] eq lc $key }
               @{ $res->{headers} };

    return @vals ? join(', ', @vals) : undef;
}

sub check_response {
    my ($block, $res, $raw_headers, $idx, $rep, $need_array) = @_;

    check_error_code($block, $res, $idx, $need_array);
    check_raw_headers($block, $raw_headers // '', $idx, $need_array);
    check_headers($block, $res, $raw_headers // '', $idx, $need_array);
    check_body($block, $res, $idx, $rep, $need_array);
}

# The expected value for request number $idx: sections hold an array when
# the block sends several requests.
sub indexed {
    my ($block, $value, $idx, $need_array) = @_;

    if (ref $value eq 'ARRAY') {
        die $block->name . " - SHOULD NOT HAPPEN: index $idx of a single"
            . " value\n" if !$need_array && $idx;
        return $value->[$idx];
    }

    die $block->name . " - several requests are sent, so the expected"
        . " values must be arrays too\n" if $need_array;

    return $value;
}

sub check_error_code {
    my ($block, $res, $idx, $need_array) = @_;
    my $name = $block->name;
    my $got = ($res && $res->{code}) || '';

    if (defined $block->error_code_like) {
        my $pat = indexed($block, scalar $block->error_code_like, $idx,
                          $need_array);
        like($got, qr/$pat/sm, "$name - status code ok");

    } elsif (defined $block->error_code) {
        my $want = indexed($block, scalar $block->error_code, $idx,
                           $need_array);
        is($got, $want, "$name - status code ok");

    } else {
        is($got, 200, "$name - status code ok");
    }
}

sub check_raw_headers {
    my ($block, $raw, $idx, $need_array) = @_;
    my $name = $block->name;

    if (defined $block->raw_response_headers_like) {
        my $pat = indexed($block, scalar $block->raw_response_headers_like,
                          $idx, $need_array);
        like($raw, qr/$pat/s, "$name - raw resp headers like");
    }

    if (defined $block->raw_response_headers_unlike) {
        my $pat = indexed($block,
                          scalar $block->raw_response_headers_unlike,
                          $idx, $need_array);
        unlike($raw, qr/$pat/s, "$name - raw resp headers unlike");
    }
}

sub check_headers {
    my ($block, $res, $raw, $idx, $need_array) = @_;
    my $name = $block->name;

    if (defined $block->response_headers) {
        my $spec = indexed($block, scalar $block->response_headers, $idx,
                           $need_array);

        for my $h (parse_expected_headers($spec)) {
            my ($key, $val) = @$h;

            if (!defined $val) {
                unlike($raw, qr/^\s*\Q$key\E\s*:/ms,
                       "$name - header $key not present in the raw headers");
                next;
            }

            $val =~ s/\$ServerPort\b/$ServerPort/g;
            $val =~ s/\$ServerPortForClient\b/$ServerPortForClient/g;

            my $got = $res ? res_header($res, $key) : undef;
            is($got // '', $val, "$name - header $key ok");
        }

    } elsif (defined $block->response_headers_like) {
        my $spec = indexed($block, scalar $block->response_headers_like, $idx,
                           $need_array);

        for my $h (parse_expected_headers($spec)) {
            my ($key, $val) = @$h;
            my $got = $res ? res_header($res, $key) : undef;

            like($got // '', qr/^$val$/, "$name - header $key like ok");
        }
    }
}

# "Name: value" lines, and "!Name" for a header that must be absent.
sub parse_expected_headers {
    my ($spec) = @_;
    my @out;

    for my $line (split /\n/, $spec) {
        $line =~ s/^\s+|\s+$//g;
        next unless length $line;

        if ($line =~ s/^!\s*//) {
            push @out, [$line, undef];
            next;
        }

        my ($key, $val) = split /\s*:\s*/, $line, 2;
        push @out, [$key, $val // ''];
    }

    return @out;
}

sub check_body {
    my ($block, $res, $idx, $rep, $need_array) = @_;
    my $name = $block->name;
    my $got = $res ? $res->{body} : undef;

    if (defined $block->response_body) {
        my $expected = indexed($block, scalar $block->response_body, $idx,
                               $need_array);

        if (defined $expected && !ref $expected) {
            $expected =~ s/\$ServerPort\b/$ServerPort/g;
            $expected =~ s/\$ServerPortForClient\b/$ServerPortForClient/g;
            $expected = expand_env($expected, $name);
        }

        my $what = "(repeated req $rep, req $idx)";

        if (ref $expected eq 'Regexp') {
            like($got, $expected, "$name - response_body - like $what");
        } else {
            is_str($got, $expected,
                   "$name - response_body - response is expected $what");
        }

    } elsif (defined $block->response_body_like
             || defined $block->response_body_unlike)
    {
        my $type = defined $block->response_body_like ? 'like' : 'unlike';
        my $section = "response_body_$type";
        my $pat = indexed($block, scalar $block->$section, $idx, $need_array);

        $pat =~ s/\$ServerPort\b/$ServerPort/g unless ref $pat;
        $pat =~ s/\$ServerPortForClient\b/$ServerPortForClient/g
            unless ref $pat;

        my $summary = trim_summary($got);
        my $desc = "$name - response_body_$type - response is expected"
                   . " ($summary)";

        if ($type eq 'like') {
            like($got, qr/$pat/s, $desc);
        } else {
            unlike($got, qr/$pat/s, $desc);
        }
    }

    for my $check (@ResponseBodyChecks) {
        $check->($block, $got, $idx, $rep, 0);
    }
}

sub trim_summary {
    my ($s) = @_;

    return '' unless defined $s;

    $s =~ s/^\s+|\s+$//g;
    $s =~ s/\s+/ /g;
    return $s;
}


# The error log.

# Lines nginx wrote since the last look (or since the block started).
sub error_log_lines {
    # nginx logs some things after it has sent the response
    sleep $Sleep * 3;

    open my $fh, '<', $ErrLogFile or return [];

    seek $fh, $ErrLogPos, 0 if !$CheckAccumErrLog && $ErrLogPos;
    my @lines = <$fh>;
    $ErrLogPos = tell $fh unless $CheckAccumErrLog;
    close $fh;

    return \@lines;
}

sub check_error_log {
    my ($block, $rep, $extra, $dying) = @_;
    my $name = $block->name;
    my $lines = [@{ error_log_lines() }, @{ $extra || [] }];

    my %quiet;

    for my $sec (qw(error_log no_error_log)) {
        my $pats = $block->$sec;
        next unless defined $pats;

        for my $level (qw(alert crit emerg)) {
            $quiet{$level} = 1 if mentions($pats, "[$level");
        }
    }

    # A configuration error is the point of a must_die block.
    $quiet{emerg} = 1 if $dying;

    if (defined(my $pats = $block->error_log)) {
        expect_in_log($name, $lines, pattern_list($pats), $rep);
    }

    if (defined(my $pats = $block->no_error_log)) {
        expect_not_in_log($name, $lines, pattern_list($pats), $rep);
    }

    for my $line (@$lines) {
        if ($line =~ /\[(alert|crit|emerg)\]/ && !$quiet{$1}) {
            warn "WARNING: $name - " . fmt_str($line) . "\n";
        }

        if ($line =~ /\bAssertion .*?failed\b/) {
            chomp(my $copy = $line);
            fail("$name - $copy");
        }
    }
}

sub mentions {
    my ($val, $str) = @_;

    return index("$val", $str) >= 0 if !ref $val || ref $val eq 'Regexp';
    return scalar grep { mentions($_, $str) } @$val if ref $val eq 'ARRAY';
    return 0;
}

# A string section holds one pattern a line; eval may give a qr// or an
# array of strings and qr//s.  Strings match as substrings.
sub pattern_list {
    my ($pats) = @_;

    return [$pats] if ref $pats eq 'Regexp';
    return [grep { defined } @$pats] if ref $pats eq 'ARRAY';

    chomp $pats;
    return [grep { length } split /\n+/, $pats];
}

sub line_matches {
    my ($line, $pat) = @_;

    return ref $pat ? $line =~ $pat : index($line, $pat) >= 0;
}

sub expect_in_log {
    my ($name, $lines, $pats, $rep) = @_;

    for my $pat (@$pats) {
        if (grep { line_matches($_, $pat) } @$lines) {
            pass("$name - pattern \"$pat\" matches a line in error.log"
                 . " (req $rep)");
            next;
        }

        fail("$name - pattern \"$pat\" should match a line in error.log"
             . " (req $rep)");
    }
}

sub expect_not_in_log {
    my ($name, $lines, $pats, $rep) = @_;

    for my $pat (@$pats) {
        my $p = fmt_str($pat);
        my $hits = 0;

        for my $i (0 .. $#$lines) {
            next unless line_matches($lines->[$i], $pat);

            $hits++;

            fail("$name - pattern \"$p\" should not match any line in"
                 . " error.log but matches line \""
                 . fmt_str($lines->[$i]) . "\" (req $rep)");

            my @next = @$lines[$i + 1 .. min($i + 9, $#$lines)];
            diag("the lines that follow it:\n", @next) if @next;
        }

        pass("$name - pattern \"$p\" does not match a line in error.log"
             . " (req $rep)") unless $hits;
    }
}


# Comparison with readable diagnostics.

sub is_str (@) {
    my ($got, $expected, $desc) = @_;

    return like($got, $expected, $desc) if ref $expected eq 'Regexp';

    if (!defined $got || !defined $expected || $NoLongString) {
        return Test::More::is($got, $expected, $desc);
    }

    return pass($desc) if $got eq $expected;

    fail($desc);
    diag(describe_difference($got, $expected));
    return 0;
}

sub describe_difference {
    my ($got, $expected) = @_;

    my $at = 0;
    $at++ while $at < length $got && $at < length $expected
                && substr($got, $at, 1) eq substr($expected, $at, 1);

    my $text = "     got: \"" . show_chars($got) . "\"\n"
               . "expected: \"" . show_chars($expected) . "\"\n"
               . "first difference at byte $at: got \""
               . show_chars(substr $got, $at, 20) . "\", expected \""
               . show_chars(substr $expected, $at, 20) . "\"\n";

    if (($got =~ /\n./s || $expected =~ /\n./s)
        && eval { require Text::Diff; 1 })
    {
        $text .= "diff (- expected, + got):\n"
                 . Text::Diff::diff(\$expected, \$got, { STYLE => 'Unified' });
    }

    return $text;
}

sub show_chars {
    my ($s) = @_;

    $s = substr($s, 0, 2000) . '...' if length $s > 2000;
    $s =~ s/\\/\\\\/g;
    $s =~ s/\n/\\n/g;
    $s =~ s/\r/\\r/g;
    $s =~ s/\t/\\t/g;
    $s =~ s/([\x00-\x1f\x7f])/sprintf '\\x%02x', ord $1/ge;
    return $s;
}

sub fmt_str {
    my ($s) = @_;

    $s = "$s";
    chomp $s;
    $s =~ s/"/\\"/g;
    $s =~ s/\r/\\r/g;
    $s =~ s/\n/\\n/g;
    return $s;
}


# Small utilities.

sub spawn {
    my ($cmd, %opt) = @_;

    my $pid = fork // die "fork() failed: $!\n";

    if ($pid == 0) {
        setpgrp(0, 0) if $opt{group};

        open STDIN, '<', '/dev/null';
        open STDOUT, '>', '/dev/null';
        open STDERR, '>', $opt{stderr} // '/dev/null';

        exec { $cmd->[0] } @$cmd
            or print STDERR "cannot run $cmd->[0]: $!\n";
        POSIX::_exit(127);
    }

    return $pid;
}

sub wait_child {
    my ($pid, $limit) = @_;
    my $deadline = time + $limit;

    while (time < $deadline) {
        return $? if waitpid($pid, WNOHANG) == $pid;
        sleep 0.005;
    }

    return undef;
}

sub parse_time {
    my ($t) = @_;

    return undef unless defined $t;

    $t =~ s/^\s+|\s+$//g;
    return $1 / 1000 if $t =~ /^([\d.]+)ms$/;
    return $1 if $t =~ /^([\d.]+)s?$/;
    return $t;
}

sub min { $_[0] < $_[1] ? $_[0] : $_[1] }

sub random_string {
    my ($len) = @_;
    my @chars = ('a' .. 'z', 'A' .. 'Z', '0' .. '9');

    return join '', map { $chars[int rand @chars] } 1 .. $len;
}

sub slurp {
    my ($path) = @_;

    open my $fh, '<', $path or return undef;
    local $/;
    my $text = <$fh>;
    close $fh;

    return $text // '';
}

sub spew {
    my ($path, $text) = @_;

    open my $fh, '>', $path or die "cannot write $path: $!\n";
    binmode $fh;
    print $fh $text;
    close $fh or die "cannot write $path: $!\n";
}

sub tail_of_file {
    my ($path, $n) = @_;
    my @lines = split /^/m, slurp($path) // '';

    splice @lines, 0, @lines - $n if @lines > $n;
    return join '', @lines;
}

sub cleanup {
    $_->() for @CleanupHandlers;
}

END {
    if ($$ == $MainPid) {
        # keep the exit status Test::Builder is about to report
        local $?;

        cleanup();

        stop_nginx('END') if !$NoClean || $UseValgrind;
    }
}

1;
