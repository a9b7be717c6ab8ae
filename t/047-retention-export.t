# token_meter_retention and exports of a cycle that is still running: an
# export covers the records settled up to that moment, so a record
# settled after the last export of its cycle has not been billed yet and
# must not be pruned, however old it gets.  Pruning takes records only:
# the points spent on them stay spent, and an export of the cycle made
# after the pruning no longer shows them.
#
# TEST 1 waits for the first pruning round, about 10 seconds after nginx
# starts (the mock upstream listens on $TEST_NGINX_MOCK_PORT; see
# t/TokenMeter/Ledger.pm).

use t::TokenMeter;
use t::TokenMeter::Ledger;

use POSIX ();
use Time::HiRes ();

ledger_defaults();
no_shuffle();
run_tests();

# Waits for the first pruning round since nginx started; returns how many
# records it deleted.
sub wait_for_prune {
    my $log = server_root() . '/logs/error.log';
    my $deadline = Time::HiRes::time() + 15;

    while (Time::HiRes::time() < $deadline) {
        open my $fh, '<', $log or die "cannot read $log: $!";
        my ($n) = map { /token meter pruned (\d+) usage records/ ? $1 : () }
                  <$fh>;
        close $fh;

        return $n if defined $n;

        Time::HiRes::sleep(0.25);
    }

    return undef;
}

sub ids_of { [map { $_->{request_id} } @{ usage_all($_[0]) }] }

__DATA__

=== TEST 1: a record settled after the export of its cycle is kept
--- http_config
    token_meter_retention 1s;
--- config
--- init
(undef, $main::Key) = new_subscriber(paid => 100000);

meter(key => $main::Key);

my $a1 = usage_all('sub_1')->[0];

$main::A1 = $a1->{request_id};
$main::X1 = clone_record("$ENV{TEST_NGINX_STORE_DIR}/store", $a1,
                         time => '2025-05-15T12:00:00.000Z');

my $cycle = POSIX::strftime('%Y-%m', gmtime);

admin_json('GET', '/billing/2025-05');
admin_json('GET', "/billing/$cycle");

meter(key => $main::Key);

$main::B = usage_all('sub_1')->[-1]{request_id};

is_deeply(::ids_of('sub_1'), [$main::X1, $main::A1, $main::B],
          'TEST 1: three records before the pruning');

is(::wait_for_prune(), 2,
   'TEST 1: the first round deletes the two records that were exported');

is_deeply(::ids_of('sub_1'), [$main::B],
          'TEST 1: the record settled after the export stays');

is(admin_json('GET', '/subscribers/sub_1')->{balance}{paid}, 100000 - 60,
   'TEST 1: the points spent stay spent');
--- request
GET /a/billing/2025-05
--- response_body_like eval
qr/\A\{"cycle":"2025-05","from":"2025-05-01T00:00:00Z","to":"2025-06-01T00:00:00Z","rows":\[\],/
--- no_error_log
[error]
[alert]
[crit]
