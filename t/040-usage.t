# The usage records of a subscriber, GET /admin/subscribers/{id}/usage:
# one record per settled request, oldest first, with the request id nginx
# gave the request; pages of "limit" records that "cursor" walks exactly
# once; "from" and "to" (exclusive) as Unix seconds or RFC 3339; 400
# invalid_query for a bad query and 404 for an unknown subscriber.
#
# The blocks run in order on one store.  The checks that depend on what
# the run produced (request ids, times, cursors) are made from --- init
# with Test::More; t/TokenMeter/Ledger.pm has the configuration and the
# helpers (the mock upstream listens on $TEST_NGINX_MOCK_PORT).

use t::TokenMeter;
use t::TokenMeter::Ledger;

ledger_defaults();
no_shuffle();
run_tests();

# the fields of a record but its time, as the block expects them
sub expect {
    my (%f) = @_;

    return {
        subscriber => 'sub_1', msisdn => '+8613800138000',
        model => 'kimi-k2.5', input_tokens => 10, cached_tokens => 0,
        output_tokens => 5, cost => 30, points => 30,
        points_from_grants => 0, points_from_paid => 30,
        usage_source => 'upstream', status => 200, %f,
    };
}

sub ids { [map { $_->{request_id} } @_] }

__DATA__

=== TEST 1: a record for each settled request, with what it cost
--- config
--- init
my $t0 = time;

($main::Key) = (new_subscriber(paid => 100000))[1];
($main::Key2) = (new_subscriber(msisdn => '+8613900139000',
                                paid => 100000))[1];

my @want;
my ($status, $id);

($status, $id) = meter(key => $main::Key);
push @want, [$status, $id, {}];

# 6 input at 1, 4 cached at 0.25, 5 output at 4: 27 points
($status, $id) = meter(key => $main::Key, 'X-Mock-Cached-Tokens' => 4);
push @want, [$status, $id, { cached_tokens => 4, cost => 27, points => 27,
                             points_from_paid => 27 }];

# 9 + 0.25 + 20 = 29.25: rounded up, once, for the request
($status, $id) = meter(key => $main::Key, 'X-Mock-Cached-Tokens' => 1);
push @want, [$status, $id, { cached_tokens => 1, cost => 30, points => 30,
                             points_from_paid => 30 }];

# 10 * 2.4 + 5 * 9.6 = 72
($status, $id) = meter(key => $main::Key, model => 'qwen3-max');
push @want, [$status, $id, { model => 'qwen3-max', cost => 72,
                             points => 72, points_from_paid => 72 }];

# an upstream error with no usage is recorded and not charged
($status, $id) = meter(key => $main::Key, 'X-Mock-Mode' => 'error500');
push @want, [$status, $id, { input_tokens => 0, output_tokens => 0,
                             cost => 0, points => 0, points_from_paid => 0,
                             usage_source => 'estimated', status => 500 }];

# the other subscriber's request is not in sub_1's list
($status, $id) = meter(key => $main::Key2);
my $other = $id;

my $t1 = time;

is_deeply([map { $_->[0] } @want], [200, 200, 200, 200, 500],
          'TEST 1: the statuses of the metered requests');

my $got = usage_all('sub_1');

is_deeply(ids(@$got), [map { $_->[1] } @want],
          'TEST 1: the records are those of the requests, oldest first,'
          . ' under their $token_meter_request_id');

for my $i (0 .. $#want) {
    my %rec = %{ $got->[$i] // {} };
    my $time = delete $rec{time} // '';

    is_deeply(\%rec, { %{ ::expect(%{ $want[$i][2] }) },
                       request_id => $want[$i][1] },
              "TEST 1: record $i");

    like($time, qr/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/,
         "TEST 1: record $i has an RFC 3339 time in UTC with ms");

    my $ms = $time =~ /Z$/ ? rfc3339_ms($time) : 0;

    ok($ms >= $t0 * 1000 && $ms < ($t1 + 1) * 1000,
       "TEST 1: record $i was made while the request ran");
}

my @times = map { $_->{time} } @$got;

is_deeply(\@times, [sort @times], 'TEST 1: the times do not go back');

is_deeply(ids(@{ usage_all('sub_2') }), [$other],
          'TEST 1: sub_2 has its own record only');
--- request
GET /a/subscribers/sub_1/usage?limit=1
--- response_headers
Content-Type: application/json
--- response_body_like eval
qr/\A\{"object":"list","data":\[\{"request_id":"[0-9a-f]{32}","time":"[0-9-]{10}T[0-9:]{8}\.[0-9]{3}Z","subscriber":"sub_1","msisdn":"\+8613800138000","model":"kimi-k2\.5","input_tokens":10,"cached_tokens":0,"output_tokens":5,"cost":30,"points":30,"points_from_grants":0,"points_from_paid":30,"usage_source":"upstream","status":200\}\],"has_more":true,"next_cursor":"[0-9a-f]{48}"\}\n\z/
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: pages of "limit" records walk all of them exactly once
--- init
my @sent = @{ ids(@{ usage_all('sub_1') }) };

# 101 records in all: one more than a page of the default size
for (1 .. 96) {
    my ($status, $id) = meter(key => $main::Key);
    push @sent, $id;
}

my $all = usage_all('sub_1');

is_deeply(ids(@$all), \@sent, 'TEST 2: 101 records, in the order sent');

my (@walked, @sizes, @more);
my $cursor;

for my $n (1 .. 10) {
    my $page = usage_page('sub_1', 'limit=25'
                          . (defined $cursor ? "&cursor=$cursor" : ''));
    my @data = @{ $page->{data} };

    push @walked, @data;
    push @sizes, scalar @data;
    push @more, $page->{has_more} ? 1 : 0;

    my $last = $data[-1];

    is($page->{next_cursor},
       sprintf('%016x', rfc3339_ms($last->{time})) . $last->{request_id},
       "TEST 2: page $n: next_cursor is the time (ms) and the id of its"
       . " last record");

    last unless $page->{has_more};
    $cursor = $page->{next_cursor};
}

is_deeply(\@sizes, [25, 25, 25, 25, 1], 'TEST 2: the page sizes');
is_deeply(\@more, [1, 1, 1, 1, 0], 'TEST 2: has_more on every page but'
                                   . ' the last');
is_deeply(ids(@walked), \@sent, 'TEST 2: every record once, in order');

my $end = usage_page('sub_1', 'cursor='
    . sprintf('%016x', rfc3339_ms($all->[-1]{time}))
    . $all->[-1]{request_id});

is_deeply([scalar @{ $end->{data} }, $end->{has_more} ? 1 : 0,
           $end->{next_cursor}], [0, 0, undef],
          'TEST 2: after the last record: no data, no more, no cursor');

# exactly as many records as the limit: sub_2's come next in the index,
# they do not count
my $exact = usage_page('sub_1', 'limit=101');

is_deeply([scalar @{ $exact->{data} }, $exact->{has_more} ? 1 : 0],
          [101, 0], 'TEST 2: limit=101 of 101: has_more is false');

my $big = usage_page('sub_1', 'limit=1000');

is(scalar @{ $big->{data} }, 101, 'TEST 2: limit=1000 gives them all');
--- request
GET /a/subscribers/sub_1/usage
--- response_body_like eval
qr/\A\{"object":"list","data":\[(?:\{"request_id":"[0-9a-f]{32}",[^{}]+\},?){100}\],"has_more":true,"next_cursor":"[0-9a-f]{48}"\}\n\z/
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: "from" and "to" in Unix seconds and RFC 3339; "to" is exclusive
--- init
my $key = (new_subscriber(msisdn => '+8613700137000', paid => 100000))[1];
my (@t1, @t2, @t3);

push @t1, (meter(key => $key))[1] for 1 .. 2;
sleep_to_next_second();
push @t2, (meter(key => $key))[1] for 1 .. 2;
sleep_to_next_second();
push @t3, (meter(key => $key))[1];

my $all = usage_all('sub_3');

is_deeply(ids(@$all), [@t1, @t2, @t3], 'TEST 3: five records');

# the whole seconds in which the second and the third group began
my $s2 = int(rfc3339_ms($all->[2]{time}) / 1000);
my $s3 = int(rfc3339_ms($all->[4]{time}) / 1000);

ok(rfc3339_ms($all->[1]{time}) < $s2 * 1000
   && rfc3339_ms($all->[3]{time}) < $s3 * 1000,
   'TEST 3: the groups are in different seconds');

my $z = rfc3339($s2);
(my $east = rfc3339($s2 + 8 * 3600)) =~ s/Z$/+08:00/;
(my $west = rfc3339($s2 - 5 * 3600 - 30 * 60)) =~ s/Z$/-05:30/;
(my $frac = $z) =~ s/Z$/.999Z/;
my $day = substr $all->[0]{time}, 0, 10;
my $next = substr rfc3339(int(rfc3339_ms($all->[4]{time}) / 1000)
                          + 86400), 0, 10;

my %want = (
    "from=$s2" => [@t2, @t3],
    "to=$s2" => [@t1],
    "from=$s2&to=$s3" => [@t2],
    "from=$z" => [@t2, @t3],
    "to=$z" => [@t1],
    "from=$east" => [@t2, @t3],
    "to=$west" => [@t1],
    "from=$frac" => [@t2, @t3],
    "from=$day" => [@t1, @t2, @t3],
    "to=$day" => [],
    "from=$next" => [],
    "from=$s3&to=$s2" => [],
    "from=0&to=1" => [],
);

for my $q (sort keys %want) {
    is_deeply(ids(@{ usage_all('sub_3', $q) }), $want{$q}, "TEST 3: $q");
}

my $page = usage_page('sub_3', "from=$s2&limit=1");

is_deeply([ids(@{ $page->{data} }), $page->{has_more} ? 1 : 0],
          [[$t2[0]], 1], 'TEST 3: "from" with a limit');
--- request
GET /a/subscribers/sub_3/usage?from=2000-01-01&to=2000-01-02
--- response_body
{"object":"list","data":[],"has_more":false,"next_cursor":null}
--- no_error_log
[error]
[alert]
[crit]



=== TEST 4: a bad query is refused with 400 invalid_query
--- request eval
[map { "GET /a/subscribers/sub_3/usage?$_" }
 'from=yesterday', 'from=2026-13-01', 'from=2026-12-32', 'to=2026-12',
 'from=2026-12-03T24:00:00Z', 'from=2026-12-03T10:00Z',
 'from=2026-12-03T10:00:00UTC', 'from=-1', 'to=', 'limit=0', 'limit=1001',
 'limit=', 'limit=2.5', 'limit=-3', 'cursor=abc', 'cursor=' . 'g' x 48,
 'cursor=' . '0' x 47, 'cursor=' . '0' x 49]
--- error_code eval
[(400) x 18]
--- response_body eval
[('{"error":{"message":"\"from\" and \"to\" take RFC 3339 times or Unix'
  . ' seconds, \"limit\" 1 to 1000, \"cursor\" the \"next_cursor\" of a'
  . ' previous page","type":"invalid_request_error","param":null,'
  . '"code":"invalid_query"}}' . "\n") x 18]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 5: an unknown subscriber is 404; no admin key, 401
--- request eval
["GET /a/subscribers/sub_99/usage", "GET /admin/subscribers/sub_1/usage"]
--- error_code eval
[404, 401]
--- response_body_like eval
[qr/\A\{"error":\{"message":"no subscriber \\"sub_99\\"","type":"invalid_request_error","param":null,"code":"subscriber_not_found"\}\}\n\z/,
 qr/"code":"invalid_admin_key"/]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 6: has_more is false when the records after the page are past "to"
--- init
# sub_3 has two records before $s2 and three after it
my $all = usage_all('sub_3');
my $s2 = int(rfc3339_ms($all->[2]{time}) / 1000);

my $page = usage_page('sub_3', "limit=2&to=$s2");

is(scalar @{ $page->{data} }, 2, 'TEST 6: the two records before "to"');
ok(!$page->{has_more}, 'TEST 6: and nothing more before "to"');

my $next = usage_page('sub_3', "limit=2&to=$s2&cursor="
                               . ($page->{next_cursor} // ''));

is(scalar @{ $next->{data} }, 0, 'TEST 6: the next page is empty');
--- request
GET /a/subscribers/sub_3/usage?limit=5
--- response_body_like eval
qr/"has_more":false,"next_cursor":"[0-9a-f]{48}"\}\n\z/
--- no_error_log
[error]
[alert]
[crit]



=== TEST 7: times may be percent-encoded, as URL encoders send them
--- init
my $all = usage_all('sub_3');
my $s2 = int(rfc3339_ms($all->[2]{time}) / 1000);

(my $z = rfc3339($s2)) =~ s/:/%3A/g;
(my $east = rfc3339($s2 + 8 * 3600)) =~ s/Z$/%2B08%3A00/;
$east =~ s/:/%3A/g;

for my $q ("from=$z", "from=$east") {
    my $res = api('GET', "/a/subscribers/sub_3/usage?$q");

    is($res->{status}, 200, "TEST 7: $q is accepted");
    is_deeply($res->{status} == 200
              ? ids(@{ json_decode($res->{content})->{data} }) : [],
              ids(@$all[2 .. 4]), "TEST 7: $q is the same time");
}
--- request
GET /a/subscribers/sub_3/usage?from=2000-01-01T00%3A00%3A00Z&limit=1
--- response_body_like eval
qr/\A\{"object":"list","data":\[\{"request_id"/
--- no_error_log
[error]
[alert]
[crit]



=== TEST 8: a UTC offset must be hours 00-23 and minutes 00-59 in digits
--- request eval
[map { "GET /a/subscribers/sub_3/usage?from=2026-12-03T10:00:00$_" }
 '+08:ab', '+08:6x', '+24:00', '-99:00', '+08:60']
--- error_code eval
[(400) x 5]
--- response_body_like eval
[(qr/"code":"invalid_query"/) x 5]
--- no_error_log
[error]
[alert]
[crit]
