# The billing export, GET /admin/billing/YYYY-MM?format=json|csv: one row
# per MSISDN for the cycle (a calendar month, in UTC here), with what was
# bought in yuan (the phone-bill items), all points bought, the points
# spent from grants and from paid points, the trial points that expired
# unspent, and the usage by model.  The rows add up to the usage records
# of the cycle, to the point.
#
# The blocks run in order on one store.  The current month is the cycle
# under test; 100 points per yuan; trials of 1000 points last 2 seconds.
# t/TokenMeter/Ledger.pm has the configuration and the helpers (the mock
# upstream listens on $TEST_NGINX_MOCK_PORT).

use t::TokenMeter;
use t::TokenMeter::Ledger;

use POSIX ();

ledger_defaults();
no_shuffle();
run_tests();

# the current cycle, and its bounds in UTC
sub cycle { POSIX::strftime('%Y-%m', gmtime) }

sub cycle_json {
    my ($cycle, $rows, $totals) = @_;
    my ($from, $to) = cycle_bounds($cycle, 0);

    return qq({"cycle":"$cycle","from":"$from","to":"$to","rows":[$rows],)
           . qq("totals":$totals}\n);
}

sub row_json {
    my (%r) = @_;

    my $models = join ',', map {
        my ($name, @v) = @$_;
        qq("$name":{"requests":$v[0],"input_tokens":$v[1],)
        . qq("cached_tokens":$v[2],"output_tokens":$v[3],"points":$v[4]})
    } @{ $r{models} // [] };

    my $refs = join ',', map { my $s = $_; $s =~ s/"/\\"/g; qq("$s") }
                         @{ $r{refs} // [] };

    return qq({"msisdn":"$r{msisdn}","purchase_count":) . ($r{count} // 0)
           . qq(,"purchase_yuan":") . ($r{yuan} // '0.00')
           . qq(","purchase_references":[$refs],"purchased_points":)
           . ($r{purchased} // 0)
           . qq(,"points_from_grants":) . ($r{grants} // 0)
           . qq(,"points_from_paid":) . ($r{paid} // 0)
           . qq(,"points":) . (($r{grants} // 0) + ($r{paid} // 0))
           . qq(,"expired_trial_points":) . ($r{expired} // 0)
           . qq(,"requests":) . ($r{requests} // 0)
           . qq(,"models":{$models}});
}

sub totals_json {
    my (%t) = @_;

    return qq({"purchase_count":$t{count},"purchase_yuan":"$t{yuan}",)
           . qq("purchased_points":$t{purchased},)
           . qq("points_from_grants":$t{grants},)
           . qq("points_from_paid":$t{paid},)
           . qq("points":) . ($t{grants} + $t{paid})
           . qq(,"expired_trial_points":$t{expired},)
           . qq("requests":$t{requests}});
}

sub csv_header {
    return 'msisdn,purchase_count,purchase_yuan,purchase_references,'
        . 'purchased_points,points_from_grants,points_from_paid,points,'
        . 'expired_trial_points,requests,input_tokens,cached_tokens,'
        . "output_tokens,tokens_by_model\r\n";
}

__DATA__

=== TEST 1: purchases, usage and expired trials of four subscribers
--- http_config
    token_meter_trial 1000 2s;
--- config
--- init
my ($ka, $kb, $kc, $kd);

# A buys twice in yuan and once in points, and spends its whole trial
# and 52 paid points
(undef, $ka) = new_subscriber(msisdn => '+8613800138000');
admin_json('POST', '/subscribers/sub_1/purchases',
           '{"yuan":"12.34","reference":"pay-a1"}', 201);
admin_json('POST', '/subscribers/sub_1/purchases',
           '{"yuan":"0.50","reference":"pay,\"a2\""}', 201);
admin_json('POST', '/subscribers/sub_1/purchases',
           '{"points":500,"reference":"pts-a"}', 201);

# B buys in yuan and never uses its trial
(undef, $kb) = new_subscriber(msisdn => '+8613700137000', yuan => '5.00',
                             reference => 'pay-b1');

# C spends 30 of its trial
(undef, $kc) = new_subscriber(msisdn => '+8613900139000');

# D buys points, not yuan: not a phone-bill item
(undef, $kd) = new_subscriber(msisdn => '+8613600136000');
admin_json('POST', '/subscribers/sub_4/purchases',
           '{"points":2000,"reference":"pts-d"}', 201);

my @status;

push @status, (meter(key => $ka))[0];                                # 30
push @status, (meter(key => $ka, 'X-Mock-Cached-Tokens' => 1))[0];   # 30
push @status, (meter(key => $ka, model => 'qwen3-max'))[0];          # 72
push @status, (meter(key => $ka, 'X-Mock-Prompt-Tokens' => 900))[0]; # 920
push @status, (meter(key => $ka, 'X-Mock-Mode' => 'error500'))[0];   # 0
push @status, (meter(key => $kc))[0];                                # 30

is_deeply(\@status, [200, 200, 200, 200, 500, 200],
          'TEST 1: the metered requests');

# before the trials expire, nothing has expired
my $early = admin_json('GET', '/billing/' . ::cycle());

is_deeply([map { $_->{expired_trial_points} } @{ $early->{rows} }],
          [0, 0, 0, 0], 'TEST 1: no trial points expire before the expiry');

sleep 2.2;
--- request eval
"GET /a/billing/" . ::cycle()
--- response_headers
Content-Type: application/json
--- response_body eval
::cycle_json(::cycle(),
    CORE::join(',',
        ::row_json(msisdn => '+8613600136000', purchased => 2000,
                   expired => 1000),
        ::row_json(msisdn => '+8613700137000', count => 1, yuan => '5.00',
                   refs => ['pay-b1'], purchased => 500, expired => 1000),
        ::row_json(msisdn => '+8613800138000', count => 2, yuan => '12.84',
                   refs => ['pay,"a2"', 'pay-a1'], purchased => 1784,
                   grants => 1000, paid => 52, requests => 5,
                   models => [['kimi-k2.5', 4, 920, 1, 15, 980],
                              ['qwen3-max', 1, 10, 0, 5, 72]]),
        ::row_json(msisdn => '+8613900139000', grants => 30, requests => 1,
                   expired => 970,
                   models => [['kimi-k2.5', 1, 10, 0, 5, 30]])),
    ::totals_json(count => 3, yuan => '17.84', purchased => 4284,
                  grants => 1030, paid => 52, expired => 2970,
                  requests => 6))
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: the same cycle as CSV: CRLF lines, RFC 4180 quoting
--- request eval
"GET /a/billing/" . ::cycle() . "?format=csv"
--- response_headers
Content-Type: text/csv; charset=utf-8
--- response_body eval
::csv_header()
. "+8613600136000,0,0.00,,2000,0,0,0,1000,0,0,0,0,\r\n"
. "+8613700137000,1,5.00,pay-b1,500,0,0,0,1000,0,0,0,0,\r\n"
. "+8613800138000,2,12.84,\"pay,\"\"a2\"\";pay-a1\",1784,1000,52,1052,0,5,"
  . "930,1,20,kimi-k2.5=920/1/15;qwen3-max=10/0/5\r\n"
. "+8613900139000,0,0.00,,0,30,0,30,970,1,10,0,5,kimi-k2.5=10/0/5\r\n"
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: the rows add up to the usage records and to the subscribers
--- init
my $bill = admin_json('GET', '/billing/' . ::cycle());
my @records = map { @{ usage_all("sub_$_") } } 1 .. 4;
my $sums = sum_records(@records);

my $rows = 0;

for my $row (@{ $bill->{rows} }) {
    my $want = $sums->{ $row->{msisdn} } // {
        requests => 0, points_from_grants => 0, points_from_paid => 0,
        points => 0, models => {},
    };

    is_deeply({ map { $_ => $row->{$_} } keys %$want }, $want,
              "TEST 3: $row->{msisdn}: the row is the sum of its records");

    is($row->{points}, $row->{points_from_grants} + $row->{points_from_paid},
       "TEST 3: $row->{msisdn}: points = from grants + from paid");

    $rows++;
}

is($rows, 4, 'TEST 3: one row per MSISDN with anything in the cycle');

for my $field (qw(purchase_count purchased_points points_from_grants
                  points_from_paid points expired_trial_points requests))
{
    my $sum = 0;
    $sum += $_->{$field} for @{ $bill->{rows} };

    is($bill->{totals}{$field}, $sum, "TEST 3: totals.$field is the sum");
}

my $points = 0;
$points += $_->{points} for @records;

is($bill->{totals}{points}, $points,
   'TEST 3: the points of the cycle are those of all its records');

# what is left on the accounts: bought - spent from paid; expired trials
my $sub1 = admin_json('GET', '/subscribers/sub_1');

is($sub1->{balance}{paid}, 1784 - 52,
   'TEST 3: sub_1 has what it bought less what it spent from paid points');

my $sub2 = admin_json('GET', '/subscribers/sub_2');

is($sub2->{expired_points}, 1000,
   'TEST 3: sub_2 shows the expired trial points the export bills');

# a closed subscriber stays on the bill of the cycle
admin_json('DELETE', '/subscribers/sub_3');
--- request eval
"GET /a/billing/" . ::cycle() . "?format=csv"
--- response_body_like eval
qr/\r\n\+8613900139000,0,0\.00,,0,30,0,30,970,1,10,0,5,kimi-k2\.5=10\/0\/5\r\n\z/
--- no_error_log
[error]
[alert]
[crit]



=== TEST 4: a cycle with nothing in it
--- request eval
["GET /a/billing/2025-02", "GET /a/billing/2025-02?format=csv",
 "GET /a/billing/2024-12?format=json"]
--- response_body eval
[::cycle_json('2025-02', '', ::totals_json(count => 0, yuan => '0.00',
     purchased => 0, grants => 0, paid => 0, expired => 0, requests => 0)),
 ::csv_header(),
 ::cycle_json('2024-12', '', ::totals_json(count => 0, yuan => '0.00',
     purchased => 0, grants => 0, paid => 0, expired => 0, requests => 0))]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 5: a cycle that is not YYYY-MM is 404; a bad format is 400
--- request eval
[(map { "GET /a/billing/$_" } '2026-13', '2026-00', '2026-1', '26-12',
                               '2026-12-01', '1969-12', '2026_12', 'latest'),
 "GET /a/billing/2026-12?format=xml"]
--- error_code eval
[(404) x 8, 400]
--- response_body eval
[('{"error":{"message":"billing cycles are named like \"2026-12\"",'
  . '"type":"invalid_request_error","param":null,"code":"not_found"}}'
  . "\n") x 8,
 '{"error":{"message":"\"format\" is \"csv\" or \"json\"",'
 . '"type":"invalid_request_error","param":null,"code":"invalid_query"}}'
 . "\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 6: the export needs the admin key, and GET
--- request eval
["GET /admin/billing/2026-12", "POST /a/billing/2026-12\n{}"]
--- error_code eval
[401, 405]
--- response_body_like eval
[qr/"code":"invalid_admin_key"/, qr/"code":"method_not_allowed"/]
--- no_error_log
[error]
[alert]
[crit]
