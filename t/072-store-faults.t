# Faults of the store, and what clients and the books see of them:
#
# - the map fills up under load (size=1m, filled by metered requests from
#   16 clients): once less than an eighth of it is left, new requests get
#   503 store_full with its exact body, and the log line says what to do;
#   the data written before is still there, every request that was served
#   is recorded and charged, and nothing stays reserved;
# - after a restart with a larger size= writes work again;
# - the store becomes read-only under a running nginx (chattr +i on
#   data.mdb: root ignores permission bits, not the immutable flag):
#   writes fail closed with 503 store_unavailable, no worker crashes,
#   reads go on, and it heals when the file is writable again;
# - the store directory is gone when workers start: 503, until it is
#   back, which the workers notice by themselves within seconds;
# - files that are not a store we can use stop nginx at start, with a
#   message that says why (t/002-store.t has the plain cases: a text file
#   as data.mdb, a foreign environment, an unknown schema version).
#
# The blocks run in order.  Each block with a store has its own
# directory under $TEST_NGINX_STORE_DIR.

use t::TokenMeter;
use t::TokenMeter::Load;
use t::TokenMeter::Store;

our $Dir = $ENV{TEST_NGINX_STORE_DIR};

master_on();
workers(2);
worker_connections(1024);
log_level('info');

# What the log says of a nearly full store, and of a store nginx may not
# write.
our $NearlyFullLine = qr/\[crit\] .*\Qtoken meter store "$Dir\/full" is\E
                         \Q nearly full, \E\d+\Q of 1048576 bytes used: new\E
                         \Q requests are refused; raise size= in\E
                         \Q token_meter_store and reload nginx\E/x;
our $FrozenLine = qq{token meter store "$Dir/read-only": }
                  . 'mdb_txn_commit() failed: Operation not permitted';

# The answers of a store that cannot be written.
our $MeteredFull = '{"error":{"message":"The metering store cannot be used'
    . ' now; please try again later.","type":"server_error","param":null,'
    . '"code":"store_full"}}' . "\n";
(our $MeteredUnavailable = $MeteredFull) =~ s/store_full/store_unavailable/;
our $AdminUnavailable = '{"error":{"message":"the token meter store cannot'
    . ' be used now","type":"server_error","param":null,'
    . '"code":"store_unavailable"}}' . "\n";


# Stores to be refused, made before any block runs.  A small valid store
# written by mdb_load (the schema record only) is the base of the damaged
# ones.

sub schema_store {
    my ($dir) = @_;
    mdb_load($dir, 'meta', '736368656d61' => '00000001');
    unlink "$dir/lock.mdb";
}

sub rewrite {
    my ($file, $code) = @_;

    open my $fh, '+<:raw', $file or die "cannot open $file: $!";
    local $/;
    my $data = <$fh>;
    $data = $code->($data);
    seek $fh, 0, 0;
    truncate $fh, 0;
    print $fh $data;
    close $fh or die "cannot write $file: $!";
}

# 64 KiB of bytes from a fixed seed
{
    my $state = 72;
    make_file("$Dir/random/data.mdb",
              join '', map { $state = ($state * 1103515245 + 12345)
                                      % 2147483648;
                             chr(($state >> 16) & 0xff) } 1 .. 65536);
}

make_file("$Dir/empty/data.mdb", '');

schema_store("$Dir/meta-zeroed");
rewrite("$Dir/meta-zeroed/data.mdb",
        sub { "\0" x 8192 . substr $_[0], 8192 });

schema_store("$Dir/one-page");
rewrite("$Dir/one-page/data.mdb", sub { substr $_[0], 0, 4096 });

schema_store("$Dir/pages-lost");
rewrite("$Dir/pages-lost/data.mdb", sub { substr $_[0], 0, 12288 });

schema_store("$Dir/pages-garbage");
rewrite("$Dir/pages-garbage/data.mdb",
        sub { substr($_[0], 0, 8192) . "\xab" x (length($_[0]) - 8192) });

File::Path::make_path("$Dir/data-is-dir/data.mdb");

# one of our database names, and one of somebody else's
mdb_load("$Dir/foreign-mixed", 'meta', '736368656d61' => '00000001');
mdb_load("$Dir/foreign-mixed", 'sessions', '6b6579' => '76616c7565');

# The store of TEST 1: 160 records of 4000 bytes, a page each, in one of
# our databases, where the module never looks them up; this leaves room
# for some hundreds of requests at size=1m, so that the fill is short.
mdb_load("$Dir/full", 'usage',
         map { sprintf('%08x', $_) => 'ab' x 4000 } 1 .. 160);

# a good store with a lock file of junk: the lock file holds no data
schema_store("$Dir/lock-junk");
make_file("$Dir/lock-junk/lock.mdb", "\xa5" x 8192);


our $MeteredConfig = <<'EOC';
    location /v1/ {
        token_meter on;
        add_header X-Request-Id $token_meter_request_id always;
        add_header X-Upstream $upstream_status always;
        add_header X-Worker $pid always;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_pass http://$token_meter_upstream;
    }

    location /admin/ {
        token_meter_admin;
        token_meter_admin_key $TEST_NGINX_LOAD_ADMIN_HASH;
    }
EOC

our $Upstream = <<'EOC';
    token_meter_trial 0;

    upstream mock {
        server 127.0.0.1:$TEST_NGINX_MOCK_PORT;
        keepalive 16;
    }

    token_meter_model kimi-k2.5 upstream=mock
                      input=1 cached=0.25 output=4 max_output=1000;
EOC

add_block_preprocessor(sub {
    my ($block) = @_;

    return if defined $block->must_die;

    $block->set_value('http_config', $block->http_config . $Upstream);
    $block->set_value('config', $MeteredConfig) unless defined $block->config;
    $block->set_value('more_headers',
                      "Authorization: Bearer $LoadAdminKey\n");
});

# chattr +i must never outlive the test: the store directory could not be
# removed, by us or by anyone
sub unfreeze {
    system("chattr -i '$Dir/read-only/data.mdb' 2>/dev/null")
        if -e "$Dir/read-only/data.mdb";
}

END { unfreeze() }

sub chat {
    my ($sub, %h) = @_;

    return http_request(method => 'POST', path => '/v1/chat/completions',
                        headers => [Authorization => "Bearer $sub->{key}",
                                    %h],
                        body => '{"model":"kimi-k2.5","messages":[]}',
                        timeout => 10);
}

# The end of GET /admin/subscribers/sub_N for a balance of paid points.
sub balance {
    my ($paid) = @_;

    return qr/"balance":\{"paid":$paid,"grants":\[\],"reserved":0,
              "available":$paid\}\}\n\z/x;
}

# An admin call that does not die: [status, decoded answer or undef].
sub admin_try {
    my ($method, $path, $body) = @_;

    my $res = http_request(method => $method, path => $path,
                           headers => [Authorization
                                       => "Bearer $LoadAdminKey"],
                           body => $body, timeout => 10);

    return [$res->{status}, eval { JSON::PP::decode_json($res->{body}) },
            $res->{body}];
}

sub balance_of {
    my $got = admin_try('GET', "/admin/subscribers/$_[0]");

    return $got->[0] == 200 ? $got->[1]{balance} : { status => $got->[0] };
}

no_shuffle();
run_tests();

__DATA__

=== TEST 1: the map fills up under load: 503 store_full, all served billed
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/full size=1m;
--- init
# sub_1 writes a little before the fill; sub_2 fills the store
$main::Full = load_subscribers(2, paid => 100_000_000);
is(chat($main::Full->[0])->{status}, 200, "sub_1's request $_")
    for 1 .. 3;
wait_for(5, sub { reserved_total($main::Full) == 0 });
$main::Early = admin_json('GET', '/admin/subscribers/sub_1', undef, 200);
$main::EarlyUsage = admin_json('GET', '/admin/subscribers/sub_1/usage',
                               undef, 200);
is(scalar @{ $main::EarlyUsage->{data} }, 3, 'sub_1 has three records');

my $run = load_run(
    jobs => load_jobs(seed => 7201, count => 8000,
                      subs => [$main::Full->[1]],
                      mix => { chat => 3, stream => 1 }),
    clients => 16, deadline => 40, stop_status => 503);

my ($full) = grep { $_->{status} == 503 } @{ $run->{results} };
is($run->{killed}, 0, 'the fill ended within 40 s');
ok($full, 'a request met the full store after '
          . scalar(grep { $_->{status} == 200 } @{ $run->{results} })
          . ' answers');
is($full && $full->{answer}, $::MeteredFull, 'with the exact answer');

my $fig = load_verify(subs => [$main::Full->[1]], run => $run,
                      name => 'full store');
diag(load_summary($fig));

my $unsettled = () = error_log_text() =~ /could not settle/g;
is($unsettled, 0, 'no request was served and then left unsettled');

is_deeply(scalar admin_json('GET', '/admin/subscribers/sub_1', undef, 200),
          $main::Early, "sub_1 reads as before the fill");
is_deeply(scalar admin_json('GET', '/admin/subscribers/sub_1/usage', undef,
                            200),
          $main::EarlyUsage, "sub_1's three records are intact");
--- request
GET /admin/subscribers/sub_1
--- response_body_like eval
::balance(99999910)
--- error_log eval
[
    $::NearlyFullLine,
    '[crit]',
]
--- no_error_log
is full at size=
could not settle
[alert]
[emerg]



=== TEST 2: size=2m: nothing stayed reserved, and writes work
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/full size=2m;
--- init
ok(wait_for(8, sub { reserved_total($main::Full) == 0 }),
   'nothing is reserved 8 s after the start');
is(chat($main::Full->[0])->{status}, 200, 'sub_1 is served');
is(chat($main::Full->[1])->{status}, 200, 'sub_2 is served');
wait_for(5, sub { reserved_total($main::Full) == 0 });
--- request
GET /admin/subscribers/sub_1
--- response_body_like eval
::balance(99999880)
--- no_error_log
created with schema version
[alert]
[crit]
[emerg]



=== TEST 3: data.mdb made immutable: writes fail closed, reads go on, it heals
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/read-only size=4m;
    token_meter_reservation_timeout 3s;
--- init
my $subs = load_subscribers(1, paid => 1_000_000);
my $file = "$::Dir/read-only/data.mdb";

is(chat($subs->[0])->{status}, 200, 'a request before');

# a stream of 10 tokens, 200 ms apart, admitted before the freeze
my $streams = open_streams($subs, 1, delay => 200, tokens => 10);
my $reserved = balance_of('sub_1')->{reserved};

SKIP: {
    if (system("chattr +i '$file' 2>/dev/null") != 0) {
        finish_streams($streams, 5);
        skip 'chattr +i does not work here', 13;
    }

    my $res = chat($subs->[0]);
    is($res->{status}, 503, 'a metered request: 503');
    is($res->{body}, $::MeteredUnavailable, 'store_unavailable');

    my $got = admin_try('POST', '/admin/subscribers/sub_1/purchases',
                        '{"points":5,"reference":"frozen-1"}');
    is($got->[0], 503, 'a purchase: 503');
    is($got->[2], $::AdminUnavailable, 'store_unavailable');

    $got = admin_try('GET', '/admin/subscribers/sub_1');
    is($got->[0], 200, 'reads go on');
    is($got->[1] && $got->[1]{balance}{reserved}, $reserved,
       'the running stream holds its reservation');

    finish_streams($streams, 10);
    ok($streams->[0]{complete}, 'the stream came to its end');

    unfreeze();

    is(chat($subs->[0])->{status}, 200, 'writable again: served');
    is(admin_try('POST', '/admin/subscribers/sub_1/purchases',
                 '{"points":5,"reference":"frozen-1"}')->[0], 201,
       'writable again: the purchase goes through');

    ok(wait_for(9, sub { (balance_of('sub_1')->{reserved} // -1) == 0 }),
       'the reservation of the failed settlement expires within 9 s');

    $got = admin_try('GET', '/admin/subscribers/sub_1/usage');
    my @records = $got->[1] ? @{ $got->[1]{data} } : ();
    my $charged = 0;
    $charged += $_->{points} for @records;

    is($got->[0], 200, 'the records can be read');
    # README, Limitations: a settlement that cannot be written is lost.
    # Under valgrind the stream may be settled only after the unfreeze.
    SKIP: {
        skip 'nginx under valgrind may settle after the unfreeze', 1
            if $ENV{TEST_NGINX_USE_VALGRIND};

        ok(!grep({ $_->{request_id} eq ($streams->[0]{request_id} // '') }
                 @records),
           'the stream that ended while data.mdb was immutable has no record');
    }
    is(balance_of('sub_1')->{paid}, 1_000_000 + 5 - $charged,
       'paid = bought - charged');
}
--- request
GET /admin/subscribers/sub_1
--- response_body_like: "reserved":0,
--- error_log eval
[
    qr/\[crit\] .*\Q$::FrozenLine\E/,
    '[crit]',
]
--- no_error_log
exited on signal
[emerg]



=== TEST 4: the store is gone when the workers start: 503 until it is back
The workers try to open it again every 10 seconds: once it is back, they
serve without a reload or a restart.
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/moved size=4m;
--- timeout: 5
--- init
my $subs = load_subscribers(1, paid => 1_000_000);
my $master = nginx_master();

is(chat($subs->[0])->{status}, 200, 'served while the store is there');

# settled in the log phase, a moment after the answer: wait for it, or the
# workers killed below would take the charge with them
ok(wait_for(5, sub { reserved_total($subs) == 0 }), 'and settled');

my $restart = sub {
    my @old = nginx_workers($master);
    kill 'KILL', @old;
    return wait_for(5, sub { my @w = nginx_workers($master);
                             @w == 2 && !grep { my $w = $_;
                                                grep { $_ == $w } @old } @w });
};

rename "$::Dir/moved", "$::Dir/moved.away" or die "rename: $!";
ok($restart->(), 'new workers started without the store');

my $res = chat($subs->[0]);
is($res->{status}, 503, 'a metered request: 503');
is($res->{body}, $::MeteredUnavailable, 'store_unavailable');

$res = http_request(method => 'GET', path => '/admin/subscribers/sub_1',
                    headers => [Authorization => "Bearer $LoadAdminKey"]);
is($res->{status}, 503, 'an admin read: 503');
is($res->{body}, $::AdminUnavailable, 'store_unavailable');
ok(!-e "$::Dir/moved", 'no empty store was made in its place');

rename "$::Dir/moved.away", "$::Dir/moved" or die "rename: $!";

# until both workers have served a request again
my @workers = nginx_workers($master);
my (%served, $paid);

ok(wait_for(25, sub {
       my $res = chat($subs->[0]);

       if ($res->{status} == 200) {
           $served{$res->{headers}{'x-worker'}} = 1;
           $paid += 30;
       }

       return keys %served == 2;
   }), 'both workers serve again within 25 s');

is_deeply([nginx_workers($master)], \@workers, 'the same workers');
ok(wait_for(5, sub { reserved_total($subs) == 0 }), 'all settled');
is(balance_of('sub_1')->{paid}, 1_000_000 - 30 - $paid,
   'every request served was charged');
--- request
GET /admin/subscribers/sub_1
--- response_body_like: "reserved":0,
--- error_log eval
[
    qq{token meter store "$::Dir/moved": mdb_env_open() failed: }
    . qq{No such file or directory},
    qq{token meter store "$::Dir/moved" is not open},
    '[alert]',
    '[crit]',
]
--- no_error_log
[emerg]



=== TEST 5: 64 KiB of random bytes as data.mdb
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/random size=1m;
--- config
--- must_die
--- error_log eval
qq{token meter store "$::Dir/random" cannot be opened: MDB_INVALID: }
. qq{File is not an LMDB file}
--- no_error_log
[error]
[alert]
[crit]



=== TEST 6: a store whose two meta pages were zeroed
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/meta-zeroed size=1m;
--- config
--- must_die
--- error_log eval
qq{token meter store "$::Dir/meta-zeroed" cannot be opened: MDB_INVALID: }
. qq{File is not an LMDB file}
--- no_error_log
[error]
[alert]
[crit]



=== TEST 7: a store cut to its first page
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/one-page size=1m;
--- config
--- must_die
--- error_log eval
qq{token meter store "$::Dir/one-page" cannot be opened: MDB_INVALID: }
. qq{File is not an LMDB file}
--- no_error_log
[error]
[alert]
[crit]



=== TEST 8: a store cut after its meta pages and one more
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/pages-lost size=1m;
--- config
--- must_die
--- error_log eval
qq{token meter store "$::Dir/pages-lost" has a data file of 12288 bytes, }
. qq{shorter than the 16384 bytes its pages need; restore it from a backup}
--- no_error_log
[error]
[alert]
[crit]



=== TEST 9: a store with good meta pages and garbage after them
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/pages-garbage size=1m;
--- config
--- must_die
--- error_log eval
qq{token meter store "$::Dir/pages-garbage" is corrupt: reading it killed }
. qq{the checking process with signal 7; restore it from a backup}
--- no_error_log
[error]
[alert]
[crit]



=== TEST 10: data.mdb is a directory
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/data-is-dir size=1m;
--- config
--- must_die
--- error_log eval
qq{token meter store "$::Dir/data-is-dir" cannot be opened: Is a directory}
--- no_error_log
[error]
[alert]
[crit]



=== TEST 11: an environment with one of our databases and one of another program
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/foreign-mixed size=1m;
--- config
--- must_die
--- error_log eval
qq{"$::Dir/foreign-mixed" is an LMDB environment of another program, }
. qq{not a token meter store}
--- no_error_log
[error]
[alert]
[crit]



=== TEST 12: an empty data.mdb is a lost store, not a new one
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/empty size=1m;
--- config
--- must_die
--- error_log eval
[
    '[emerg]',
    qq{token meter store "$::Dir/empty" has an empty data file; restore it}
    . ' from a backup, or remove it to start a new store',
]
--- no_error_log
created with schema version
[alert]
[crit]



=== TEST 13: a lock file of junk is rebuilt: the store opens and is written
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/lock-junk size=1m;
--- init
load_subscribers(1, paid => 100);
--- request
GET /admin/subscribers/sub_1
--- response_body_like eval
::balance(100)
--- no_error_log
created with schema version
[error]
[alert]
[crit]
