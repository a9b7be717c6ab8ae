# token_meter_billing_offset: a billing cycle is a calendar month at a
# fixed offset from UTC, so the same instant can belong to different
# cycles at different offsets.
#
# Real time cannot be moved, so this is shown two ways.  TEST 7 and 8 make
# a record now and work out in Perl which cycle it belongs to at +14:00
# and at -12:00 (the two differ only within 14 hours of a month's end, so
# then the record must move; at other times the bounds of the cycle must
# still move by the offset).  TEST 9 and 10 copy a real record to two
# chosen instants a millisecond apart on either side of 2025-12-01T00:00
# at +08:00 and show both exports and the usage listing.
#
# The blocks from TEST 7 on run in order on one store; nginx restarts with
# each offset.  t/TokenMeter/Ledger.pm has the configuration and the
# helpers (the mock upstream listens on $TEST_NGINX_MOCK_PORT).

use t::TokenMeter;
use t::TokenMeter::Ledger;

ledger_defaults();
no_shuffle();
run_tests();

sub bill_re {
    my ($cycle, $offset) = @_;
    my ($from, $to) = cycle_bounds($cycle, $offset);

    return qr/\A\{"cycle":"$cycle","from":"$from","to":"$to","rows":\[/;
}

# the row of one MSISDN in an export, undef when it has none
sub row_of {
    my ($bill, $msisdn) = @_;

    my ($row) = grep { $_->{msisdn} eq $msisdn } @{ $bill->{rows} };

    return $row;
}

__DATA__

=== TEST 1: an offset without a sign is refused
--- http_config
    token_meter_billing_offset 08:00;
--- config
--- must_die
--- error_log
invalid billing offset "08:00", expected a UTC offset like "+08:00"
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: an hour of one digit is refused
--- http_config
    token_meter_billing_offset +8:00;
--- config
--- must_die
--- error_log
invalid billing offset "+8:00", expected a UTC offset like "+08:00"
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: more than 14 hours is refused
--- http_config
    token_meter_billing_offset -15:00;
--- config
--- must_die
--- error_log
invalid billing offset "-15:00", expected a UTC offset like "+08:00"
--- no_error_log
[error]
[alert]
[crit]



=== TEST 4: 60 minutes is refused
--- http_config
    token_meter_billing_offset +08:60;
--- config
--- must_die
--- error_log
invalid billing offset "+08:60", expected a UTC offset like "+08:00"
--- no_error_log
[error]
[alert]
[crit]



=== TEST 5: a time zone name is not an offset
--- http_config
    token_meter_billing_offset Asia/Shanghai;
--- config
--- must_die
--- error_log
invalid billing offset "Asia/Shanghai", expected a UTC offset like "+08:00"
--- no_error_log
[error]
[alert]
[crit]



=== TEST 6: the offset is set once, in the http block
--- http_config
    token_meter_billing_offset +08:00;
    token_meter_billing_offset +09:00;
--- config
--- must_die
--- error_log
"token_meter_billing_offset" directive is duplicate
--- no_error_log
[error]
[alert]
[crit]



=== TEST 7: at +14:00 a record made now is in the cycle of now + 14 h
--- http_config
    token_meter_billing_offset +14:00;
--- config
--- init
(undef, $main::Key) = new_subscriber(paid => 100000);

my ($status) = meter(key => $main::Key);

is($status, 200, 'TEST 7: a metered request');

$main::Rec = usage_all('sub_1')->[0];

my $ms = rfc3339_ms($main::Rec->{time});

$main::East = cycle_of($ms, 14 * 3600);
$main::West = cycle_of($ms, -12 * 3600);

Test::More::note("the record of $main::Rec->{time} is in $main::East"
                 . " at +14:00 and in $main::West at -12:00");

my $bill = admin_json('GET', "/billing/$main::East");
my @bounds = cycle_bounds($main::East, 14 * 3600);

is_deeply([$bill->{from}, $bill->{to}], \@bounds,
          "TEST 7: $main::East at +14:00 runs from $bounds[0] to $bounds[1]");

is(::row_of($bill, '+8613800138000')->{requests}, 1,
   "TEST 7: the record is in $main::East");

SKIP: {
    skip 'now + 14 h and now - 12 h are in the same month', 1
        if $main::East eq $main::West;

    ok(!::row_of(admin_json('GET', "/billing/$main::West"),
                 '+8613800138000'),
       "TEST 7: and not in $main::West at +14:00");
}
--- request
GET /a/billing/2026-12
--- response_body_like eval
::bill_re('2026-12', 14 * 3600)
--- no_error_log
[error]
[alert]
[crit]



=== TEST 8: at -12:00 the same record is in the cycle of now - 12 h
--- http_config
    token_meter_billing_offset -12:00;
--- config
--- init
my $bill = admin_json('GET', "/billing/$main::West");
my @bounds = cycle_bounds($main::West, -12 * 3600);

is_deeply([$bill->{from}, $bill->{to}], \@bounds,
          "TEST 8: $main::West at -12:00 runs from $bounds[0] to $bounds[1]");

is(::row_of($bill, '+8613800138000')->{requests}, 1,
   "TEST 8: the record is in $main::West");

SKIP: {
    skip 'now + 14 h and now - 12 h are in the same month', 1
        if $main::East eq $main::West;

    ok(!::row_of(admin_json('GET', "/billing/$main::East"),
                 '+8613800138000'),
       "TEST 8: and not in $main::East at -12:00");
}

# the bounds of the two offsets are 26 hours apart
my @east = cycle_bounds($main::West, 14 * 3600);

is(rfc3339_ms($bounds[0] =~ s/Z$/.000Z/r)
   - rfc3339_ms($east[0] =~ s/Z$/.000Z/r), 26 * 3600 * 1000,
   'TEST 8: -12:00 starts a cycle 26 hours after +14:00');
--- request
GET /a/billing/2026-12
--- response_body_like eval
::bill_re('2026-12', -12 * 3600)
--- no_error_log
[error]
[alert]
[crit]



=== TEST 9: at +08:00, 1 ms apart across 2025-12-01T00:00 local
--- http_config
    token_meter_billing_offset +08:00;
--- config
--- init
my ($id, $key) = new_subscriber(msisdn => '+8613900139000', paid => 1000);

meter(key => $key);

my $template = usage_all($id)->[0];
my $dir = "$ENV{TEST_NGINX_STORE_DIR}/store";

# 2025-11-30T23:59:59.999+08:00 and 2025-12-01T00:00:00.000+08:00
$main::Before = clone_record($dir, $template,
                             time => '2025-11-30T15:59:59.999Z');
$main::After = clone_record($dir, $template,
                            time => '2025-11-30T16:00:00.000Z');

is_deeply([map { $_->{request_id} }
           @{ usage_all($id, 'to=2025-12-01T00:00:00+08:00') }],
          [$main::Before], 'TEST 9: "to" excludes the instant itself');

is_deeply([map { $_->{request_id} }
           @{ usage_all($id, 'from=2025-12-01T00:00:00+08:00'
                             . '&to=2026-01-01') }],
          [$main::After], 'TEST 9: "from" includes it');
--- request eval
["GET /a/billing/2025-11", "GET /a/billing/2025-12?format=csv"]
--- response_body eval
['{"cycle":"2025-11","from":"2025-10-31T16:00:00Z",'
 . '"to":"2025-11-30T16:00:00Z","rows":[{"msisdn":"+8613900139000",'
 . '"purchase_count":0,"purchase_yuan":"0.00","purchase_references":[],'
 . '"purchased_points":0,"points_from_grants":0,"points_from_paid":30,'
 . '"points":30,"expired_trial_points":0,"requests":1,"models":{'
 . '"kimi-k2.5":{"requests":1,"input_tokens":10,"cached_tokens":0,'
 . '"output_tokens":5,"points":30}}}],"totals":{"purchase_count":0,'
 . '"purchase_yuan":"0.00","purchased_points":0,"points_from_grants":0,'
 . '"points_from_paid":30,"points":30,"expired_trial_points":0,'
 . '"requests":1}}' . "\n",
 "msisdn,purchase_count,purchase_yuan,purchase_references,"
 . "purchased_points,points_from_grants,points_from_paid,points,"
 . "expired_trial_points,requests,input_tokens,cached_tokens,"
 . "output_tokens,tokens_by_model\r\n"
 . "+8613900139000,0,0.00,,0,0,30,30,0,1,10,0,5,kimi-k2.5=10/0/5\r\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 10: in UTC both are in 2025-11
--- config
--- request eval
["GET /a/billing/2025-11?format=csv", "GET /a/billing/2025-12?format=csv"]
--- response_body eval
["msisdn,purchase_count,purchase_yuan,purchase_references,"
 . "purchased_points,points_from_grants,points_from_paid,points,"
 . "expired_trial_points,requests,input_tokens,cached_tokens,"
 . "output_tokens,tokens_by_model\r\n"
 . "+8613900139000,0,0.00,,0,0,60,60,0,2,20,0,10,kimi-k2.5=20/0/10\r\n",
 "msisdn,purchase_count,purchase_yuan,purchase_references,"
 . "purchased_points,points_from_grants,points_from_paid,points,"
 . "expired_trial_points,requests,input_tokens,cached_tokens,"
 . "output_tokens,tokens_by_model\r\n"]
--- no_error_log
[error]
[alert]
[crit]
