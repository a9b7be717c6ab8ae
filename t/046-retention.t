# token_meter_retention: every 10 seconds worker 0 deletes usage records
# older than the retention whose billing cycle has been exported; records
# of a cycle nobody exported stay.  Balances and purchases are not
# touched; an export of a pruned cycle no longer shows what was pruned.
#
# Old records are made by copying a real one to chosen times (see
# clone_record in t/TokenMeter/Ledger.pm).  TEST 3 waits for the first
# pruning round, about 10 seconds after nginx starts.  The blocks run in
# order on one store (the mock upstream listens on $TEST_NGINX_MOCK_PORT).
# t/047-retention-export.t is about records made after an export.

use t::TokenMeter;
use t::TokenMeter::Ledger;

use POSIX ();
use Time::HiRes ();

ledger_defaults();
no_shuffle();
run_tests();

# Waits until the error log shows the n-th pruning round since nginx
# started; returns how many records that round deleted.
sub wait_for_prune {
    my ($n) = @_;

    my $log = server_root() . '/logs/error.log';
    my $deadline = Time::HiRes::time() + 15;

    while (Time::HiRes::time() < $deadline) {
        open my $fh, '<', $log or die "cannot read $log: $!";
        my @rounds = map { /token meter pruned (\d+) usage records/ ? $1 : () }
                     <$fh>;
        close $fh;

        return $rounds[$n - 1] if @rounds >= $n;

        Time::HiRes::sleep(0.25);
    }

    return undef;
}

sub ids_of { [map { $_->{request_id} } @{ usage_all($_[0]) }] }

__DATA__

=== TEST 1: the retention is a time
--- http_config
    token_meter_retention forever;
--- config
--- must_die
--- error_log
"token_meter_retention" directive invalid value
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: it is set in the http block only
--- http_config
--- config
    token_meter_retention 30d;
--- must_die
--- error_log
"token_meter_retention" directive is not allowed here
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: old records of exported cycles go, others stay
--- http_config
    token_meter_retention 1s;
--- config
--- init
(undef, my $key) = new_subscriber(paid => 100000);

meter(key => $key);

my $a1 = usage_all('sub_1')->[0];
my $dir = "$ENV{TEST_NGINX_STORE_DIR}/store";

$main::A1 = $a1->{request_id};
$main::X1 = clone_record($dir, $a1, time => '2025-05-15T12:00:00.000Z');
$main::Y1 = clone_record($dir, $a1, time => '2025-06-15T12:00:00.000Z');

$main::Cycle = POSIX::strftime('%Y-%m', gmtime);

# 2025-05 and the current cycle are exported; 2025-06 is not
admin_json('GET', '/billing/2025-05');
is(api("GET", "/a/billing/$main::Cycle?format=csv")->{status}, 200,
   "TEST 3: the current cycle is exported as CSV");

# a request settled after its cycle was exported
meter(key => $key);

$main::B = usage_all('sub_1')->[-1]{request_id};

is_deeply(::ids_of('sub_1'), [$main::X1, $main::Y1, $main::A1, $main::B],
          'TEST 3: four records before the pruning');

my $pruned = ::wait_for_prune(1);

is($pruned, 2, 'TEST 3: a pruning round within 15 s deletes two records');

is_deeply(::ids_of('sub_1'), [$main::Y1, $main::B],
          'TEST 3: the exported ones are gone, 2025-06 and the one made'
          . ' after the export are kept');
--- request
GET /a/billing/2025-05
--- response_body_like eval
qr/\A\{"cycle":"2025-05","from":"2025-05-01T00:00:00Z","to":"2025-06-01T00:00:00Z","rows":\[\],/
--- error_log
token meter pruned 2 usage records older than the retention
--- no_error_log
[error]
[alert]
[crit]
