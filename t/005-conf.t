# Every example under conf/ passes "nginx -t" and starts, as an installed
# system would run it: each gets a prefix of its own with modules/ holding
# the modules its load_module lines name.  For the test, its listen ports
# are moved to one of the suite's, and temporary files into the prefix
# where the example leaves them at nginx's compiled-in places, so that
# nothing outside the prefix is touched.
#
# conf/minimal.conf is then used: a subscriber is created and read back
# with the admin key its comments name.

use t::TokenMeter;
use t::TokenMeter::Store;

use File::Basename ();
use File::Copy ();
use File::Path ();
use IO::Socket::INET ();
use Time::HiRes ();

my $Root = $t::TokenMeter::Root;
my $Nginx = $ENV{TEST_NGINX_BINARY};
my $Port = server_port() + 3;

# the modules of the suite, by file name
my %Module = map { File::Basename::basename($_) => $_ }
             split ' ', $ENV{TEST_NGINX_LOAD_MODULES};

# Files that an example includes and that its tools would write beside it,
# by example.  A new example that needs more must be added here.
my %Extra = (
    demo => {
        # util/demo writes a random admin key's hash here
        'demo-admin-key.conf' => "token_meter_admin_key\n    sha256:"
            . sha256_hex('replace-this-admin-key') . ";\n",
    },
);

my @examples = sort glob "$Root/conf/*.conf";

ok(scalar @examples, 'there are examples under conf/');

for my $conf (@examples) {
    my $name = File::Basename::basename($conf, '.conf');
    my $prefix = "$ENV{TEST_NGINX_STORE_DIR}/$name";

    prepare_prefix($conf, $prefix, $Extra{$name} // {});

    my ($status, $out) = nginx($prefix, '-t');

    is($status, 0, "$name: nginx -t passes") or diag($out);
    like($out, qr/test is successful/, "$name: nginx -t says so");

    ($status, $out) = nginx($prefix);

    is($status, 0, "$name: nginx starts") or diag($out);

    my $pid = wait_for_pid("$prefix/logs/nginx.pid");

    ok($pid, "$name: nginx wrote its pid file") or next;

    try_minimal($prefix) if $name eq 'minimal';

    ($status, $out) = nginx($prefix, '-s', 'quit');

    is($status, 0, "$name: nginx -s quit") or diag($out);
    ok(wait_gone($pid), "$name: nginx has stopped") or kill 'KILL', $pid;

    my $log = slurp("$prefix/logs/error.log");

    unlike($log, qr/\[(?:emerg|alert|crit|error)\]/,
           "$name: no errors logged") or diag($log);
}

Test::More::done_testing();


sub try_minimal {
    my ($prefix) = @_;
    my $auth = "Authorization: Bearer replace-this-admin-key\r\n";

    my $res = http("POST /admin/subscribers HTTP/1.0\r\n$auth"
                   . "Content-Length: 27\r\n\r\n"
                   . '{"msisdn":"+8613800138000"}');

    like($res, qr{\AHTTP/1\.1 201 .*\r\n\r\n\{"id":"sub_1",}s,
         'minimal: the admin API creates a subscriber');

    $res = http("GET /admin/subscribers/sub_1 HTTP/1.0\r\n$auth\r\n");

    like($res, qr{\AHTTP/1\.1 200 .*"available":25000000\}\}\n\z}s,
         'minimal: and reads it back');

    $res = http("GET /admin/subscribers/sub_1 HTTP/1.0\r\n\r\n");

    like($res, qr{\AHTTP/1\.1 401 }, 'minimal: not without the admin key');

    my $store = "$prefix/token_meter";

    is(mode_of($store), '0700', 'minimal: the store is in the prefix, 0700');
    is(mode_of("$store/data.mdb"), '0600', 'minimal: data.mdb is 0600');

    SKIP: {
        skip 'nginx does not run as root here', 1 if $> != 0;

        # no "user" directive: the workers run as nobody
        is((stat $store)[4], scalar getpwnam('nobody'),
           'minimal: the store belongs to the worker user');
    }
}

sub prepare_prefix {
    my ($conf, $prefix, $extra) = @_;

    File::Path::remove_tree($prefix);
    File::Path::make_path("$prefix/conf", "$prefix/logs", "$prefix/modules",
                          "$prefix/temp");

    # workers that are not root must reach the store under the prefix
    chmod 0755, $prefix;

    my $text = slurp($conf);

    while ($text =~ /^\s*load_module\s+modules\/(\S+?);/mg) {
        my $so = $Module{$1} // die "no module $1 in TEST_NGINX_LOAD_MODULES";
        symlink $so, "$prefix/modules/$1" or die "symlink $1: $!";
    }

    $text =~ s/^(\s*listen\s+)\S+;/${1}127.0.0.1:$Port;/mg;

    my $temp = join '', map { "    ${_}_temp_path temp/$_;\n" }
                        grep { $text !~ /^\s*${_}_temp_path\s/m }
                        qw(client_body proxy fastcgi uwsgi scgi);

    $text =~ s/^http \{\n/http {\n$temp/m or die "$conf has no http block";

    # the parents of relative temporary paths, as an installer makes them
    while ($text =~ /^\s*\w+_temp_path\s+([^\/\s;][^\s;]*)\/[^\/\s;]+;/mg) {
        File::Path::make_path("$prefix/$1");
    }

    for my $file (keys %$extra) {
        make_file("$prefix/conf/$file", $extra->{$file});
    }

    open my $fh, '>', "$prefix/conf/nginx.conf" or die "$prefix: $!";
    print $fh $text;
    close $fh;
}

# Runs nginx with the prefix and its nginx.conf; returns the exit status
# and what it printed.
sub nginx {
    my ($prefix, @args) = @_;

    my $out = `$Nginx -p $prefix/ -c conf/nginx.conf @args 2>&1`;

    return ($? >> 8, $out);
}

sub http {
    my ($request) = @_;

    my $sock = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
                                     PeerPort => $Port, Proto => 'tcp',
                                     Timeout => 3)
        or return "cannot connect to 127.0.0.1:$Port: $!";

    print $sock $request;

    local $/;
    my $res = <$sock>;
    close $sock;

    return $res // '';
}

sub wait_for_pid {
    my ($file) = @_;

    for (1 .. 250) {
        my $text = slurp($file);
        return $1 if defined $text && $text =~ /^(\d+)$/m && kill 0, $1;
        Time::HiRes::sleep(0.02);
    }

    return undef;
}

sub wait_gone {
    my ($pid) = @_;

    for (1 .. 250) {
        return 1 unless kill 0, $pid;

        # a daemon that is not our child may linger as a zombie
        my $stat = slurp("/proc/$pid/stat") // '';
        return 1 if $stat =~ /^\d+ \(.*\) Z/s;

        Time::HiRes::sleep(0.02);
    }

    return 0;
}

sub slurp {
    my ($path) = @_;

    open my $fh, '<', $path or return undef;
    local $/;
    my $text = <$fh>;
    close $fh;

    return $text;
}
