package t::TokenMeter::Ledger;

# The common ground of the usage, billing, metrics and retention tests
# (t/04x-*.t): a configuration with two models on the mock upstream, and
# Perl helpers that drive nginx from --- init and read its answers back as
# data, for the checks that depend on what a run produced (request ids,
# times, cursors).
#
#     use t::TokenMeter;
#     use t::TokenMeter::Ledger;
#
#     ledger_defaults();
#     no_shuffle();
#     run_tests();
#
#     === TEST 1: ...
#     --- config
#     --- init
#     my $id = new_subscriber(paid => 10000);
#     my ($status, $request_id) = meter(model => 'kimi-k2.5');
#     is(scalar @{ usage_all($id) }, 1, 'one record');
#
# ledger_defaults() fills in every block that has a --- config section
# (an empty one will do); a block without one reuses the running nginx,
# which is what keeps the counters of t/044-metrics.t.  The defaults:
#
#   - one store for the whole file, $TEST_NGINX_STORE_DIR/store, 64 MB;
#   - 100 points per yuan ("12.34" buys 1234 points), no trial grant;
#   - kimi-k2.5 at 1 point per input token, 0.25 per cached input token,
#     4 per output token; qwen3-max at 2.4, 0.6 and 9.6; both on the mock;
#   - /v1/ metered, with an X-Request-Id header that carries
#     $token_meter_request_id; /v1/models, /v1/balance, /metrics;
#     /admin/ with the admin key, and /a/, which adds the admin key, for
#     the blocks' own requests.
#
# A block's --- http_config is appended to the default one; a directive it
# sets (token_meter_store, token_meter_trial, token_meter_points_per_yuan)
# replaces the default line.  Its --- config is appended to the default
# locations.

use strict;
use warnings;

use Exporter 'import';
use Digest::SHA ();
use HTTP::Tiny ();
use JSON::PP ();
use POSIX ();
use Time::HiRes ();

our @EXPORT = qw(ledger_defaults api admin_json new_subscriber meter
                 wait_settled usage_all usage_page metrics rfc3339
                 rfc3339_ms cycle_of cycle_bounds sum_records clone_record
                 sleep_to_next_second json_decode $AdminKey $Json);

our $AdminKey = 'tm-ledger-admin-5d0c7a91e38f46b2';
our $Json = JSON::PP->new->canonical;

my $Http = HTTP::Tiny->new(timeout => 10, keep_alive => 0);
my $Keys = 0;


sub default_http_config {
    my ($own) = @_;

    my %line = (
        token_meter_store =>
            'token_meter_store $TEST_NGINX_STORE_DIR/store size=64m;',
        token_meter_trial => 'token_meter_trial 0;',
        token_meter_points_per_yuan => 'token_meter_points_per_yuan 100;',
    );

    my $conf = '';

    for my $name (sort keys %line) {
        $conf .= "    $line{$name}\n" unless $own =~ /\b$name\b/;
    }

    return $conf . <<'EOC';

    upstream mock {
        server 127.0.0.1:$TEST_NGINX_MOCK_PORT;
        keepalive 8;
    }

    token_meter_model kimi-k2.5 upstream=mock
                      input=1 cached=0.25 output=4 max_output=1000;
    token_meter_model qwen3-max upstream=mock
                      input=2.4 cached=0.6 output=9.6 max_output=100;

EOC
}

sub default_config {
    my $hash = Digest::SHA::sha256_hex($AdminKey);

    return <<"EOC";
    location /v1/ {
        token_meter on;
        add_header X-Request-Id \$token_meter_request_id always;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_pass http://\$token_meter_upstream;
    }

    location = /v1/models {
        token_meter_models;
    }

    location = /v1/balance {
        token_meter_balance;
    }

    location = /metrics {
        token_meter_metrics;
    }

    location /admin/ {
        token_meter_admin;
        token_meter_admin_key sha256:$hash;
    }

    location /a/ {
        proxy_pass http://127.0.0.1:\$TEST_NGINX_SERVER_PORT/admin/;
        proxy_set_header Authorization "Bearer $AdminKey";
    }

EOC
}

sub ledger_defaults {
    main::add_block_preprocessor(sub {
        my ($block) = @_;

        return unless defined $block->config;

        my $http = $block->http_config // '';

        $block->set_value('http_config',
                          default_http_config($http) . $http);

        $block->set_value('config', default_config() . $block->config)
            unless $block->config =~ m{\blocation\s+/v1/\s};
    });
}


# HTTP from Perl, to the nginx under test.

# api($method, $uri, $body, Header => value, ...): a hash with status,
# content and headers (lower-case names), as HTTP::Tiny gives them.
sub api {
    my ($method, $uri, $body, %headers) = @_;

    my $port = $ENV{TEST_NGINX_SERVER_PORT};

    return $Http->request($method, "http://127.0.0.1:$port$uri", {
        headers => \%headers,
        defined $body ? (content => $body) : (),
    });
}

sub json_decode {
    my ($text) = @_;

    return $Json->decode($text);
}

# One admin API call; dies unless the status is the expected one (200 by
# default); returns the decoded answer.
sub admin_json {
    my ($method, $uri, $body, $want) = @_;

    my $res = api($method, "/admin$uri", $body,
                  Authorization => "Bearer $AdminKey",
                  'Content-Type' => 'application/json');

    $want //= 200;

    die "$method /admin$uri: expected $want, got $res->{status}:"
        . " $res->{content}\n" if $res->{status} != $want;

    return json_decode($res->{content});
}

# new_subscriber(msisdn => ..., key => ..., paid => N, yuan => "12.34",
# reference => ...): creates a subscriber with the given API key (made up
# from the MSISDN when not given) and buys what is asked; returns its id.
sub new_subscriber {
    my (%opt) = @_;

    my $msisdn = $opt{msisdn} // '+8613800138000';
    my $key = $opt{key} // 'sk-test-' . substr($msisdn, 1) . '-' . ++$Keys;

    my $sub = admin_json('POST', '/subscribers',
                         qq({"msisdn":"$msisdn","api_key":"$key"}), 201);
    my $id = $sub->{id};

    admin_json('POST', "/subscribers/$id/purchases",
               qq({"points":$opt{paid},"reference":"paid-$id"}), 201)
        if $opt{paid};

    admin_json('POST', "/subscribers/$id/purchases",
               qq({"yuan":"$opt{yuan}","reference":"$opt{reference}"}), 201)
        if $opt{yuan};

    return wantarray ? ($id, $key) : $id;
}

# meter(key => ..., model => ..., max_tokens => N, mock headers ...): one
# chat completion; returns the status, the request id nginx gave it and
# HTTP::Tiny's answer.  It returns once no reservation is open any more:
# nginx settles after sending the answer, and another worker may answer
# the next request before that.
#
#     meter(key => $key, model => 'qwen3-max', 'X-Mock-Mode' => 'no-usage')
sub meter {
    my (%opt) = @_;

    my $key = delete $opt{key};
    my $model = delete $opt{model} // 'kimi-k2.5';
    my $max = delete $opt{max_tokens} // 10;
    my $text = delete $opt{text} // 'How many tokens is this?';
    my $uri = delete $opt{uri} // '/v1/chat/completions';

    my $body = qq({"model":"$model","max_tokens":$max,)
               . qq("messages":[{"role":"user","content":"$text"}]});

    my $res = api('POST', $uri, $body,
                  'Content-Type' => 'application/json',
                  'X-Mock-Delay-Ms' => 0,
                  defined $key ? (Authorization => "Bearer $key") : (),
                  %opt);

    wait_settled();

    return ($res->{status}, $res->{headers}{'x-request-id'}, $res);
}

# Waits (up to 3 s) until no reservation is open.
sub wait_settled {
    for (1 .. 150) {
        return 1 if metrics()->{token_meter_reservations_open} == 0;
        Time::HiRes::sleep(0.02);
    }

    return 0;
}


# Usage records.

# One page of GET /admin/subscribers/{id}/usage with the given query.
sub usage_page {
    my ($id, $query) = @_;

    return admin_json('GET', "/subscribers/$id/usage"
                             . (defined $query ? "?$query" : ''));
}

# All records of a subscriber, oldest first, walking the pages.
sub usage_all {
    my ($id, $query) = @_;

    my @records;
    my $cursor;

    for (;;) {
        my $q = join '&', 'limit=1000', (defined $query ? $query : ()),
                          (defined $cursor ? "cursor=$cursor" : ());

        my $page = usage_page($id, $q);

        push @records, @{ $page->{data} };

        last unless $page->{has_more};
        $cursor = $page->{next_cursor};
    }

    return \@records;
}

# Sums of records, by MSISDN: what a billing row should say about usage.
sub sum_records {
    my (@records) = @_;

    my %row;

    for my $r (@records) {
        my $row = $row{ $r->{msisdn} } //= {
            requests => 0, points_from_grants => 0, points_from_paid => 0,
            points => 0, models => {},
        };

        $row->{requests}++;
        $row->{points_from_grants} += $r->{points_from_grants};
        $row->{points_from_paid} += $r->{points_from_paid};
        $row->{points} += $r->{points};

        my $m = $row->{models}{ $r->{model} } //= {
            requests => 0, input_tokens => 0, cached_tokens => 0,
            output_tokens => 0, points => 0,
        };

        $m->{requests}++;
        $m->{$_} += $r->{$_}
            for qw(input_tokens cached_tokens output_tokens points);
    }

    return \%row;
}


# The metrics page as a hash: 'name{labels}' => value.
sub metrics {
    my $res = api('GET', '/metrics');

    die "GET /metrics: $res->{status}\n" if $res->{status} != 200;

    my %m;

    for my $line (split /\n/, $res->{content}) {
        next if $line =~ /^#/;

        my ($series, $value) = $line =~ /^(\S+) (\S+)$/
            or die "GET /metrics: a line that is not a sample: $line\n";

        $m{$series} = $value;
    }

    return \%m;
}


# Times and billing cycles.

sub rfc3339 {
    my ($sec) = @_;

    return POSIX::strftime('%Y-%m-%dT%H:%M:%SZ', gmtime $sec);
}

# "2026-12-03T18:40:57.123Z" -> milliseconds since the epoch
sub rfc3339_ms {
    my ($text) = @_;

    my ($y, $mo, $d, $h, $mi, $s, $ms) =
        $text =~ /^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)\.(\d{3})Z$/
        or die "not a record time: $text\n";

    return (days($y, $mo, $d) * 86400 + $h * 3600 + $mi * 60 + $s) * 1000
           + $ms;
}

# The cycle ("2026-12") a time in milliseconds falls in at an offset from
# UTC in seconds.
sub cycle_of {
    my ($ms, $offset) = @_;

    return POSIX::strftime('%Y-%m',
                           gmtime(POSIX::floor($ms / 1000) + $offset));
}

# The bounds of a cycle at an offset, as the export shows them.
sub cycle_bounds {
    my ($cycle, $offset) = @_;

    my ($y, $m) = split /-/, $cycle;
    my ($ny, $nm) = $m == 12 ? ($y + 1, 1) : ($y, $m + 1);

    return (rfc3339(days($y, $m, 1) * 86400 - $offset),
            rfc3339(days($ny, $nm, 1) * 86400 - $offset));
}

# days from 1970-01-01 to a date
sub days {
    my ($y, $m, $d) = @_;

    $y -= $m <= 2 ? 1 : 0;

    my $era = POSIX::floor($y / 400);
    my $yoe = $y - $era * 400;
    my $doy = int((153 * ($m + ($m > 2 ? -3 : 9)) + 2) / 5) + $d - 1;
    my $doe = $yoe * 365 + int($yoe / 4) - int($yoe / 100) + $doy;

    return $era * 146097 + $doe - 719468;
}

# Sleeps until 50 ms after the next whole second, so that what happens
# next has a later second than what happened before.
sub sleep_to_next_second {
    my $now = Time::HiRes::time();

    Time::HiRes::sleep(POSIX::floor($now) + 1.05 - $now);
}


# Usage records with chosen times, for what real time cannot show (cycle
# boundaries, old records).  clone_record($store_dir, $record, time =>
# 'RFC 3339 with ms') copies a record the module wrote (as the usage API
# shows it) under a new request id and time, into the three usage
# databases of the running store; returns the new request id.
#
# It relies on the store's key layout (usage: request id; usage_time:
# time in ms, big-endian, then request id; usage_subscriber: subscriber id,
# time, request id, both big-endian) and finds the time and the request id
# inside the stored record by their values, so it does not depend on the
# record's field order.  It writes with mdb_load while nginx runs.  LMDB
# advises against mixing processes with and without a writable map (the
# module's and mdb_load's) because flushes may then not cover every write;
# the write lock and the data stay sound, and a test never loses power.

sub clone_record {
    my ($dir, $rec, %new) = @_;

    my $old_id = pack 'H*', $rec->{request_id};
    my $old_ms = rfc3339_ms($rec->{time});
    my $new_ms = rfc3339_ms($new{time});
    my $new_id = pack 'H*',
        substr(Digest::SHA::sha256_hex("$rec->{request_id} $new{time}"),
               0, 32);

    my ($value) = grep { $_->[0] eq $old_id } dump_pairs($dir, 'usage');
    die "clone_record: no record $rec->{request_id} in $dir\n"
        unless $value;

    my $v = $value->[1];
    my $le_old = pack 'Q<', $old_ms;

    (my $count = () = $v =~ /\Q$le_old\E/g) == 1
        or die "clone_record: the record's time is not found once\n";

    $v =~ s/\Q$le_old\E/pack 'Q<', $new_ms/e;
    $v =~ s/\Q$old_id\E/$new_id/ or die "clone_record: no request id\n";

    my ($bytime) = grep { substr($_->[0], 8) eq $old_id }
                   dump_pairs($dir, 'usage_time');
    my ($bysub) = grep { substr($_->[0], 16) eq $old_id }
                  dump_pairs($dir, 'usage_subscriber');

    die "clone_record: the record is not in the indexes\n"
        unless $bytime && $bysub;

    load_pairs($dir, 'usage', [$new_id, $v]);
    load_pairs($dir, 'usage_time',
             [pack('Q>', $new_ms) . $new_id, $bytime->[1]]);
    load_pairs($dir, 'usage_subscriber',
             [substr($bysub->[0], 0, 8) . pack('Q>', $new_ms) . $new_id,
              $bysub->[1]]);

    return unpack 'H*', $new_id;
}

# dump_pairs($dir, $db): the pairs of a named database, as [key, value]
# byte strings.
sub dump_pairs {
    my ($dir, $db) = @_;

    open my $fh, '-|', 'mdb_dump', '-s', $db, $dir
        or die "cannot run mdb_dump: $!";

    my (@pairs, $key, $header);

    $header = 1;

    while (my $line = <$fh>) {
        chomp $line;

        if ($header) {
            $header = 0 if $line eq 'HEADER=END';
            next;
        }

        last if $line eq 'DATA=END';

        my $bytes = pack 'H*', substr($line, 1);

        if (defined $key) {
            push @pairs, [$key, $bytes];
            undef $key;

        } else {
            $key = $bytes;
        }
    }

    close $fh or die "mdb_dump -s $db $dir failed (status $?)";

    return @pairs;
}

# load_pairs($dir, $db, [key, value], ...): writes the pairs into the named
# database of an existing environment (no map size: the store's stays).
sub load_pairs {
    my ($dir, $db, @pairs) = @_;

    open my $fh, '|-', 'mdb_load', '-s', $db, $dir
        or die "cannot run mdb_load: $!";

    print $fh "VERSION=3\nformat=bytevalue\ntype=btree\nHEADER=END\n";

    for my $p (@pairs) {
        print $fh ' ', unpack('H*', $p->[0]), "\n ",
                  unpack('H*', $p->[1]), "\n";
    }

    print $fh "DATA=END\n";

    close $fh or die "mdb_load -s $db $dir failed (status $?)";
}

1;
