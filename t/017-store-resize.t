# "nginx -t" with another size= must not disturb the nginx that runs on
# the same store: an operator checks a new configuration before reloading,
# and the check opens the store.  The check changes nothing in the store's
# file, the running worker keeps writing past the smaller size without
# being harmed, and afterwards the store holds all it was given.
#
# The store is filled to about 1.9 MB first, so that the 120 subscribers
# each block creates take it past 2m.

use t::TokenMeter;
use t::TokenMeter::Store;
use t::TokenMeter::Admin;

use File::Path ();

our $Dir = $ENV{TEST_NGINX_STORE_DIR};

# 470 records of 4000 bytes, a page each
mdb_load("$Dir/store", 'usage',
         map { sprintf('%08x', $_) => 'ab' x 4000 } 1 .. 470);

# what they are as loaded; nothing in this file writes usage records
our $UsageDump = usage_dump();

master_on();
workers(1);

add_block_preprocessor(sub {
    my ($block) = @_;
    my $n = $block->name =~ /TEST (\d+)/ ? $1 : 0;

    # 120 new subscribers, one after the other; MSISDNs differ per block
    my $grow = join '', map {
        sprintf "        echo_subrequest POST /admin/subscribers"
                . " -b '{\"msisdn\":\"+86138%02d%06d\"}';\n", $n, $_
    } 1 .. 120;

    $block->set_value(config => <<"EOC" . <<'EOC') if !defined $block->config;
    location = /grow {
$grow    }
EOC
    location /admin/ {
        token_meter_admin;
        token_meter_admin_key sha256:$TEST_NGINX_ADMIN_HASH;
    }
EOC
});

no_shuffle();
run_tests();


sub usage_dump {
    my $dump = `mdb_dump -s usage $Dir/store`;

    die "mdb_dump -s usage failed (status $?)" if $?;

    return $dump;
}

# Runs "nginx -t" on a configuration of its own that names the same store
# with the given size=; returns its exit status and output.
sub check_config {
    my ($size) = @_;
    my $prefix = "$Dir/check";

    File::Path::make_path("$prefix/conf", "$prefix/logs", "$prefix/temp");

    my $conf = join '', map { "load_module $_;\n" }
                        split ' ', $ENV{TEST_NGINX_LOAD_MODULES};

    $conf .= "error_log logs/error.log;\npid logs/nginx.pid;\n";
    $conf .= "user root;\n" if $> == 0;
    $conf .= "events {}\nhttp {\n";
    $conf .= "    ${_}_temp_path temp/$_;\n"
        for qw(client_body proxy fastcgi uwsgi scgi);
    $conf .= "    token_meter_store $Dir/store size=$size;\n}\n";

    make_file("$prefix/conf/nginx.conf", $conf);

    my $out = `$ENV{TEST_NGINX_BINARY} -t -p $prefix/ -c conf/nginx.conf 2>&1`;

    return ($? >> 8, $out);
}


__DATA__

=== TEST 1: a check with a smaller size= while nginx writes
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store size=8m;
--- init
my $file = "$::Dir/store/data.mdb";
my $size = -s $file;

Test::More::cmp_ok($size, '<', 2 * 1048576, 'data.mdb is below 2m');

my ($status, $out) = ::check_config('2m');
Test::More::is($status, 0, 'nginx -t with size=2m passes')
    or Test::More::diag($out);
Test::More::is(-s $file, $size, 'the check left the size of data.mdb alone');
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
GET /grow
--- response_body_like eval
qr/\A(?:\{"id":"sub_\d+","msisdn":"\+8613801\d{6}",[^\n]*\}\n){120}\z/
--- no_error_log
exited on signal
[error]
[alert]
[crit]



=== TEST 2: a check with a larger size= while nginx writes
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store size=8m;
--- init
my ($status, $out) = ::check_config('16m');
Test::More::is($status, 0, 'nginx -t with size=16m passes')
    or Test::More::diag($out);
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
GET /grow
--- response_body_like eval
qr/\A(?:\{"id":"sub_\d+","msisdn":"\+8613802\d{6}",[^\n]*\}\n){120}\z/
--- no_error_log
exited on signal
[error]
[alert]
[crit]



=== TEST 3: the store holds all of it: the records loaded, 240 subscribers
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store size=8m;
--- init
Test::More::is(::usage_dump(), $::UsageDump,
               'the 470 records are as they were loaded');
Test::More::cmp_ok(-s "$::Dir/store/data.mdb", '>', 2 * 1048576,
                   'data.mdb has grown past 2m');
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request eval
[
    "GET /admin/subscribers/sub_1",
    "GET /admin/subscribers/sub_240",
    "GET /admin/subscribers?msisdn=%2B8613801000120",
]
--- response_body_like eval
[
    qr/\A\{"id":"sub_1","msisdn":"\+8613801000001",/,
    qr/\A\{"id":"sub_240","msisdn":"\+8613802000120",/,
    qr/\A\{"id":"sub_120","msisdn":"\+8613801000120",/,
]
--- no_error_log
[error]
[alert]
[crit]
