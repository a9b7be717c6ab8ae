package t::TokenMeter::Load;

# Load and bookkeeping for the reliability tests (t/070-conservation.t,
# t/071-crash.t, t/072-store-faults.t; t/080-hostile.t uses its HTTP
# client only):
#
#     use t::TokenMeter;
#     use t::TokenMeter::Load;
#
#     --- init
#     my $subs = load_subscribers(50, trial => 3000, paid => 1_000_000);
#     my $jobs = load_jobs(seed => 7, count => 3000, subs => $subs);
#     my $run = load_run(jobs => $jobs, clients => 64, deadline => 40);
#     load_verify(subs => $subs, run => $run);
#
# load_jobs() makes a fixed list of requests from a seed: plain and
# streamed chat, legacy completions, Responses and embeddings calls,
# clients that hang up in the middle of a stream, upstream errors, streams
# the upstream cuts, answers without usage, and purchases (some of them
# sent twice with the same payment reference).  load_run() forks that many
# clients, each sending its share of the list one request after another,
# over a new connection each time, and writes down what came back: the
# status, whether the answer was complete, and the X-Request-Id,
# X-Upstream and X-Worker headers the metered location adds.  Meanwhile
# the parent may act at given times (send nginx a signal, kill a worker).
# load_verify() then reads every subscriber and all of its usage records
# through the admin API and checks, with Test::More, that not a point was
# lost or made up.
#
# The metered location must add the three headers:
#
#     add_header X-Request-Id $token_meter_request_id always;
#     add_header X-Upstream $upstream_status always;
#     add_header X-Worker $pid always;
#
# A request passed admission exactly when X-Upstream is present: the
# module's own refusals (401, 402, 503 ...) never reach the upstream.
#
# Every client, and every wait in here, is bounded in time; clients still
# running at the deadline are killed (only those, by their pids).

use strict;
use warnings;

use Exporter 'import';
use Digest::SHA ();
use IO::Select ();
use IO::Socket::INET ();
use JSON::PP ();
use POSIX ();
use Test::More ();
use Time::HiRes ();

our @EXPORT = qw(load_subscribers load_jobs load_run load_verify
                 load_summary open_streams finish_streams expected_usage
                 reserved_total http_request admin_json nginx_master
                 nginx_workers process_alive wait_for error_log_text
                 $LoadAdminKey);

# The admin key of these tests; configurations name its hash as
# $TEST_NGINX_LOAD_ADMIN_HASH.
our $LoadAdminKey = 'tm-load-admin-7c2e5a90d14b3f68';

$ENV{TEST_NGINX_LOAD_ADMIN_HASH} =
    'sha256:' . Digest::SHA::sha256_hex($LoadAdminKey);

# Prices of the model in the configurations, in thousandths of a point.
our %Price = (input => 1000, cached => 250, output => 4000);

my $Json = JSON::PP->new->canonical;


# One HTTP/1.1 exchange over a new connection, bounded by "timeout"
# seconds in all.
#
#     http_request(method => 'POST', path => '/v1/chat/completions',
#                  headers => [Authorization => "Bearer $key"],
#                  body => $json, timeout => 20, hangup_after => 2);
#
# "hangup_after => N" closes the connection as soon as N "data:" events
# of the answer have come; "raw => $bytes" sends those bytes instead of a
# request made from the other options.  Returns a hash: status (0 when no
# status line came), headers (lower-case names), body (chunks joined),
# complete (the whole answer came: its length or its last chunk),
# hung_up, error.

sub http_request {
    my (%o) = @_;

    my $port = $o{port} // $ENV{TEST_NGINX_SERVER_PORT};
    my $timeout = $o{timeout} // 20;
    my $deadline = Time::HiRes::time() + $timeout;
    my $body = $o{body} // '';
    my %res = (status => 0, headers => {}, body => '', complete => 0,
               hung_up => 0, error => undef);

    my $sock = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
                                     PeerPort => $port, Proto => 'tcp',
                                     Timeout => $timeout);
    if (!$sock) {
        $res{error} = "connect: $!";
        return \%res;
    }

    my $method = $o{method} // 'GET';
    my $req = "$method " . ($o{path} // '/') . " HTTP/1.1\r\n"
              . "Host: localhost\r\nConnection: close\r\n";

    my @h = @{ $o{headers} || [] };

    while (my ($name, $value) = splice @h, 0, 2) {
        $req .= "$name: $value\r\n";
    }

    $req .= "Content-Length: " . length($body) . "\r\n"
        if length $body || $method eq 'POST';

    $req .= "\r\n$body";
    $req = $o{raw} if defined $o{raw};

    if (!write_all($sock, $req, $deadline)) {
        $res{error} = "write: $!";
        close $sock;
        return \%res;
    }

    my $sel = IO::Select->new($sock);
    my $raw = '';
    my ($head_len, $events);

    while (1) {
        my $left = $deadline - Time::HiRes::time();

        if ($left <= 0 || !$sel->can_read($left)) {
            $res{error} = 'timeout';
            last;
        }

        my $n = sysread $sock, my $buf, 65536;

        if (!defined $n) {
            $res{error} = "read: $!";
            last;
        }

        last if $n == 0;

        $raw .= $buf;

        if (!defined $head_len) {
            my $end = index $raw, "\r\n\r\n";
            $head_len = $end + 4 if $end >= 0;
        }

        if ($o{hangup_after} && defined $head_len) {
            $events = () = substr($raw, $head_len) =~ /^data:/mg;

            if ($events >= $o{hangup_after}) {
                $res{hung_up} = 1;
                last;
            }
        }
    }

    close $sock;

    return \%res unless defined $head_len;

    my ($status_line, @lines) = split /\r\n/, substr($raw, 0, $head_len - 4);

    ($res{status}) = $status_line =~ m{^HTTP/1\.[01] (\d{3})};
    $res{status} //= 0;

    for my $line (@lines) {
        my ($name, $value) = $line =~ /^([^:]+):\s*(.*)$/ or next;
        $res{headers}{lc $name} = $value;
    }

    my $rest = substr $raw, $head_len;
    my $h = $res{headers};

    if (($h->{'transfer-encoding'} // '') =~ /chunked/i) {
        @res{qw(body complete)} = dechunk($rest);

    } elsif (defined $h->{'content-length'}) {
        $res{body} = $rest;
        $res{complete} = length $rest >= $h->{'content-length'};

    } else {
        $res{body} = $rest;
        $res{complete} = !$res{error} && !$res{hung_up};
    }

    $res{complete} = 0 if $res{hung_up};

    return \%res;
}

sub write_all {
    my ($sock, $data, $deadline) = @_;
    my $sel = IO::Select->new($sock);
    my $off = 0;

    while ($off < length $data) {
        my $left = $deadline - Time::HiRes::time();
        return 0 if $left <= 0 || !$sel->can_write($left);

        my $n = syswrite $sock, $data, length($data) - $off, $off;
        return 0 unless $n;

        $off += $n;
    }

    return 1;
}

# Decodes a chunked body; also says whether the last chunk came.
sub dechunk {
    my ($text) = @_;
    my $out = '';

    while ($text =~ s/\A([0-9A-Fa-f]+)[^\r\n]*\r\n//) {
        my $size = hex $1;

        return ($out, 1) if $size == 0;
        return ($out, 0) if length $text < $size + 2;

        $out .= substr $text, 0, $size;
        substr($text, 0, $size + 2) = '';
    }

    return ($out, 0);
}

# An admin API call; dies unless the status is the expected one (when
# one is given).  Returns the decoded answer and the status.
sub admin_json {
    my ($method, $path, $body, $want) = @_;

    my $res = http_request(method => $method, path => $path,
                           headers => [Authorization
                                       => "Bearer $LoadAdminKey"],
                           body => defined $body ? $Json->encode($body)
                                                 : undef,
                           timeout => 10);

    die "$method $path: expected $want, got $res->{status}"
        . ($res->{error} ? " ($res->{error})" : '') . ": $res->{body}\n"
        if $want && $res->{status} != $want;

    my $json = eval { $Json->decode($res->{body}) };

    return wantarray ? ($json, $res->{status}) : $json;
}


# Creates subscribers sub_1 .. sub_N (in a store that has none yet) with
# imported keys, and buys "paid" points for each of them, except for the
# "poor" ones (with poor_every => 10: sub_10, sub_20 ...) that live on
# their trial grant and what they buy during the load.  Returns a list of
# hashes: id, key, msisdn, poor, start (trial and setup purchase).

sub load_subscribers {
    my ($n, %o) = @_;

    my $trial = $o{trial} // 0;
    my $paid = $o{paid} // 1_000_000;
    my @subs;

    for my $i (1 .. $n) {
        my $key = sprintf 'sk-tm-load-%04d-%s', $i,
                          substr(Digest::SHA::sha256_hex("load key $i"), 0,
                                 24);
        my $msisdn = sprintf '+86139%08d', 20260000 + $i;

        my $sub = admin_json('POST', '/admin/subscribers',
                             { msisdn => $msisdn, api_key => $key }, 201);

        die "expected sub_$i, got $sub->{id}\n" unless $sub->{id} eq "sub_$i";

        my $poor = $o{poor_every} && $i % $o{poor_every} == 0 ? 1 : 0;
        my $start = $trial;

        if (!$poor && $paid) {
            admin_json('POST', "/admin/subscribers/sub_$i/purchases",
                       { points => $paid, reference => "setup-sub_$i" },
                       201);
            $start += $paid;
        }

        push @subs, { id => "sub_$i", n => $i, key => $key,
                      msisdn => $msisdn, poor => $poor, start => $start };
    }

    return \@subs;
}


# The list of requests.  "mix" weighs the kinds; the default is what
# t/070-conservation.t uses.

our %DefaultMix = (
    chat => 20, stream => 20, stream_usage => 5, completion => 5,
    responses => 5, responses_stream => 5, embeddings => 4,
    hangup => 8, error500 => 6, cut => 6, cut_plain => 3, no_usage => 5,
    purchase => 5, replay => 3,
);

sub load_jobs {
    my (%o) = @_;

    my $subs = $o{subs};
    my $mix = $o{mix} || \%DefaultMix;
    my @kinds = sort keys %$mix;
    my $total = 0;
    $total += $mix->{$_} for @kinds;

    # a private generator, so that the list depends on the seed only
    my $state = $o{seed} || 1;
    my $rand = sub {
        $state = ($state * 1103515245 + 12345) % 2147483648;
        return int($state / 65536) % $_[0];
    };

    my (@jobs, @bought);

    for my $n (0 .. $o{count} - 1) {
        my $pick = $rand->($total);
        my $kind;

        for my $k (@kinds) {
            $kind = $k;
            last if ($pick -= $mix->{$k}) < 0;
        }

        my $sub = $subs->[$rand->(scalar @$subs)];

        my %job = (n => $n, kind => $kind, sub => $sub->{id},
                   key => $sub->{key});

        if ($kind eq 'purchase' || ($kind eq 'replay' && !@bought)) {
            $job{kind} = 'purchase';
            $job{points} = 1 + $rand->(1000);
            $job{reference} = "load-$n";
            push @bought, \%job;

        } elsif ($kind eq 'replay') {
            # the same payment again: same subscriber, amount, reference
            my $orig = $bought[$rand->(scalar @bought)];

            $job{sub} = $orig->{sub};
            $job{points} = $orig->{points};
            $job{reference} = $orig->{reference};

        } else {
            $job{prompt} = 1 + $rand->(60);
            $job{cached} = $rand->(4) == 0 ? $rand->($job{prompt} + 1) : 0;
            $job{completion} = 1 + $rand->(40);
            $job{max_tokens} = 8 + $rand->(57);
            $job{delay} = 1 + $rand->(4);

            if ($kind eq 'hangup') {
                $job{completion} = 30;
                $job{max_tokens} = 64;
                $job{delay} = 25;
            }

            $job{stream} = $kind =~ /stream|hangup|^cut$/ ? 1
                           : $kind =~ /error500|no_usage/ ? $rand->(2)
                           : 0;
        }

        push @jobs, \%job;
    }

    return \@jobs;
}

# The request a job sends: [path, headers, body].
sub job_request {
    my ($job) = @_;
    my $kind = $job->{kind};

    if ($kind eq 'purchase' || $kind eq 'replay') {
        return ["/admin/subscribers/$job->{sub}/purchases",
                [Authorization => "Bearer $LoadAdminKey"],
                $Json->encode({ points => $job->{points} + 0,
                                reference => $job->{reference} })];
    }

    my @h = (Authorization => "Bearer $job->{key}",
             'X-Mock-Prompt-Tokens' => $job->{prompt},
             'X-Mock-Cached-Tokens' => $job->{cached},
             'X-Mock-Completion-Tokens' => $job->{completion},
             'X-Mock-Delay-Ms' => $job->{delay});

    push @h, 'X-Mock-Mode' => 'error500' if $kind eq 'error500';
    push @h, 'X-Mock-Mode' => 'cut' if $kind =~ /^cut/;
    push @h, 'X-Mock-Mode' => 'no-usage' if $kind eq 'no_usage';

    my %body = (model => 'kimi-k2.5');
    my $path = '/v1/chat/completions';

    if ($kind eq 'embeddings') {
        $path = '/v1/embeddings';
        $body{input} = ["load job $job->{n}"];

    } elsif ($kind =~ /^responses/) {
        $path = '/v1/responses';
        $body{input} = "load job $job->{n}";
        $body{max_output_tokens} = $job->{max_tokens} + 0;

    } elsif ($kind eq 'completion') {
        $path = '/v1/completions';
        $body{prompt} = "load job $job->{n}";
        $body{max_tokens} = $job->{max_tokens} + 0;

    } else {
        $body{messages} = [{ role => 'user',
                             content => "load job $job->{n}" }];
        $body{max_tokens} = $job->{max_tokens} + 0;
    }

    $body{stream} = JSON::PP::true if $job->{stream};
    $body{stream_options} = { include_usage => JSON::PP::true }
        if $kind eq 'stream_usage';

    return [$path, \@h, $Json->encode(\%body)];
}


# Runs the jobs.  Options: jobs, clients, deadline (seconds), dir (where
# the clients write down their results), actions ([seconds, code] pairs,
# run in this process at those times after the start; an action may return
# a string to note in the run; one not due yet when the clients are done
# runs then, noted "after the load", so that no action is ever skipped),
# stop_status (once any client gets this status, the clients send no
# more).  Returns a hash: results (one per job that was sent, in job
# order), elapsed, killed (clients still running at the deadline), notes.

sub load_run {
    my (%o) = @_;

    my $jobs = $o{jobs};
    my $clients = $o{clients} || 64;
    my $deadline = $o{deadline} || 45;
    my $dir = $o{dir} // "$ENV{TEST_NGINX_STORE_DIR}/load";
    my @actions = sort { $a->[0] <=> $b->[0] } @{ $o{actions} || [] };

    mkdir $dir;
    unlink glob("$dir/client-*.jsonl"), "$dir/stop";

    my $start = Time::HiRes::time();
    my $stop_at = $start + $deadline;
    my %kids;

    for my $c (0 .. $clients - 1) {
        my @mine = grep { $_->{n} % $clients == $c } @$jobs;
        next unless @mine;

        my $pid = fork;
        die "fork() failed: $!\n" unless defined $pid;

        if ($pid == 0) {
            run_client("$dir/client-$c.jsonl", \@mine, $stop_at,
                       $o{stop_status}, "$dir/stop");
            POSIX::_exit(0);
        }

        $kids{$pid} = $c;
    }

    my @notes;

    while (%kids && Time::HiRes::time() < $stop_at + 5) {
        my $now = Time::HiRes::time() - $start;

        while (@actions && $actions[0][0] <= $now) {
            my $note = (shift @actions)->[1]->();
            push @notes, sprintf('%.2f s: %s', $now, $note) if $note;
        }

        while ((my $pid = waitpid(-1, POSIX::WNOHANG())) > 0) {
            delete $kids{$pid};
        }

        Time::HiRes::sleep(0.01);
    }

    my $killed = scalar keys %kids;

    # the clients that outlived the deadline, and nothing else
    kill 'KILL', keys %kids if %kids;
    waitpid $_, 0 for keys %kids;

    # a load that ended early must not leave, say, an upgrade half done
    for my $action (@actions) {
        my $note = $action->[1]->();
        push @notes, sprintf('%.2f s, after the load: %s',
                             Time::HiRes::time() - $start, $note) if $note;
    }

    my $elapsed = Time::HiRes::time() - $start;

    my @results;

    for my $file (glob "$dir/client-*.jsonl") {
        open my $fh, '<', $file or next;

        while (my $line = <$fh>) {
            push @results, eval { $Json->decode($line) } // next;
        }

        close $fh;
    }

    @results = sort { $a->{n} <=> $b->{n} } @results;

    return { results => \@results, elapsed => $elapsed, killed => $killed,
             notes => \@notes, jobs => scalar @$jobs };
}

sub run_client {
    my ($file, $jobs, $stop_at, $stop_status, $stop_file) = @_;

    open my $out, '>', $file or POSIX::_exit(1);
    $out->autoflush(1);

    for my $job (@$jobs) {
        last if Time::HiRes::time() > $stop_at;
        last if $stop_status && -e $stop_file;

        my ($path, $headers, $body) = @{ job_request($job) };
        my $start = Time::HiRes::time();

        my $res = http_request(
                      method => 'POST', path => $path, headers => $headers,
                      body => $body,
                      timeout => ($stop_at - Time::HiRes::time()) + 1,
                      hangup_after => $job->{kind} eq 'hangup' ? 2 : 0);

        my $h = $res->{headers};
        my %r = (%$job, status => $res->{status},
                 complete => $res->{complete} ? 1 : 0,
                 hung_up => $res->{hung_up}, error => $res->{error},
                 seconds => sprintf('%.3f', Time::HiRes::time() - $start),
                 request_id => $h->{'x-request-id'},
                 upstream => $h->{'x-upstream'},
                 worker => $h->{'x-worker'});

        delete $r{key};

        if ($stop_status && $res->{status} == $stop_status) {
            $r{answer} = $res->{body};

            if (open my $fh, '>', $stop_file) {
                close $fh;
            }
        }

        if ($job->{kind} eq 'purchase' || $job->{kind} eq 'replay') {
            $r{answer} = $res->{body};
        }

        print $out $Json->encode(\%r), "\n";
    }

    close $out;
}


# What a job should have cost, in points, when the upstream's usage was
# believed: [input, cached, output, cost].
sub expected_usage {
    my ($job) = @_;

    my $kind = $job->{kind};
    my $in = $job->{prompt};
    my $cached = $kind eq 'embeddings' ? 0 : $job->{cached};
    my $out = $kind eq 'embeddings' ? 0
              : $job->{completion} < $job->{max_tokens} ? $job->{completion}
              : $job->{max_tokens};

    my $milli = ($in - $cached) * $Price{input} + $cached * $Price{cached}
                + $out * $Price{output};

    return [$in, $cached, $out, int(($milli + 999) / 1000)];
}


# Reads the balance and all usage records of each subscriber and checks
# them against what the clients saw.  Options:
#
#   subs, run       from load_subscribers() and load_run()
#   lost_ok         code: true for a result that may lack its record (a
#                   request that was running in a worker killed on purpose)
#   name            prefix of the assertion names
#   access_log      a log of "$token_meter_request_id $token_meter_points"
#                   lines, checked against the records (a difference must
#                   have its notice in the error log)
#
# Returns a hash of figures for load_summary().

sub load_verify {
    my (%o) = @_;

    my $subs = $o{subs};
    my $results = $o{run}{results};
    my $lost_ok = $o{lost_ok} || sub { 0 };
    my $name = $o{name} ? "$o{name}: " : '';
    my %fig = (jobs => $o{run}{jobs}, sent => scalar @$results,
               elapsed => $o{run}{elapsed});
    my (%sub, %by_id, @problems);

    $sub{$_->{id}} = { %$_, credited => 0, admitted => {}, records => {} }
        for @$subs;

    # A request is settled in nginx's log phase, which may come a moment
    # after its client has read the whole answer (after a lingering
    # close): give the last ones that moment.
    wait_for(5, sub { reserved_total($subs) == 0 });

    # what the clients saw

    my %refs;

    for my $r (@$results) {
        $fig{slowest} = $r->{seconds}
            if ($r->{seconds} // 0) > ($fig{slowest} // 0);
        $fig{"kind $r->{kind}"}++;
        $fig{"status $r->{status}"}++;

        if ($r->{kind} eq 'purchase' || $r->{kind} eq 'replay') {
            push @{ $refs{$r->{reference}} }, $r;
            next;
        }

        if (!defined $r->{upstream}) {
            $fig{refused}++;
            push @problems, "job $r->{n}: status $r->{status} without"
                            . ' an answer from nginx ('
                            . ($r->{error} // 'no error') . ')'
                if $r->{status} == 0 && !$lost_ok->($r);
            next;
        }

        if (!defined $r->{request_id}) {
            push @problems, "job $r->{n}: no X-Request-Id";
            next;
        }

        $fig{admitted}++;
        $fig{'hung up'}++ if $r->{hung_up};
        $fig{incomplete}++ unless $r->{complete};
        $sub{$r->{sub}}{admitted}{$r->{request_id}} = $r;
        $by_id{$r->{request_id}} = $r;
    }

    for my $ref (sort keys %refs) {
        my @answers = @{ $refs{$ref} };
        my @new = grep { $_->{status} == 201 } @answers;
        my @replays = grep { $_->{status} == 200 } @answers;

        $fig{purchases}++;
        $fig{'purchase sends'} += @answers;

        if (@new != 1 || @new + @replays != @answers) {
            push @problems, "reference $ref: statuses "
                            . join(' ', map { $_->{status} } @answers)
                            . ", expected one 201 and 200 for the rest";
        }

        $sub{$answers[0]{sub}}{credited} += $answers[0]{points} if @new;
    }

    # what the store says

    my ($records, $charged) = (0, 0);
    my (%seen, @dup, @orphan, @missing, @bad_usage, @balance, @reserved);

    for my $id (map { $_->{id} } @$subs) {
        my $s = $sub{$id};
        my $got = admin_json('GET', "/admin/subscribers/$id", undef, 200);
        my $b = $got->{balance};
        my $grants = 0;

        $grants += $_->{points} for @{ $b->{grants} };

        my ($points, $cursor, $pages) = (0, undef, 0);

        while ($pages++ < 100) {
            my $page = admin_json('GET', "/admin/subscribers/$id/usage"
                                  . '?limit=1000'
                                  . ($cursor ? "&cursor=$cursor" : ''),
                                  undef, 200);

            for my $rec (@{ $page->{data} }) {
                my $rid = $rec->{request_id};

                push @dup, $rid if $seen{$rid}++;
                $records++;
                $points += $rec->{points};
                $s->{records}{$rid} = $rec;

                push @balance, "$id: record $rid charged $rec->{points}"
                    if $rec->{points} < 0 || $rec->{cost} < 0
                       || $rec->{points} > $rec->{cost};

                check_record($s, $by_id{$rid}, $rec, \@bad_usage)
                    if $by_id{$rid};
            }

            last unless $page->{has_more};
            $cursor = $page->{next_cursor};
        }

        $charged += $points;

        my $want = $s->{start} + $s->{credited} - $points;

        push @balance, "$id: start $s->{start} + bought $s->{credited}"
                       . " - charged $points = $want, but paid"
                       . " $b->{paid} + grants $grants = "
                       . ($b->{paid} + $grants)
            if $want != $b->{paid} + $grants;

        push @balance, "$id: paid $b->{paid} or grants $grants below zero"
            if $b->{paid} < 0 || grep { $_->{points} < 0 } @{ $b->{grants} };

        push @balance, "$id: $got->{expired_points} points expired"
            if $got->{expired_points};

        push @reserved, "$id: $b->{reserved} points reserved"
            if $b->{reserved} != 0;

        for my $rid (sort keys %{ $s->{admitted} }) {
            next if $s->{records}{$rid};

            if ($lost_ok->($s->{admitted}{$rid})) {
                $fig{'lost with the killed worker'}++;
                next;
            }

            my $r = $s->{admitted}{$rid};
            push @missing, "$id: job $r->{n} ($r->{kind}, status"
                           . " $r->{status}, worker $r->{worker}) $rid";
        }

        for my $rid (sort keys %{ $s->{records} }) {
            push @orphan, "$id: $rid" unless $s->{admitted}{$rid};
        }
    }

    $fig{records} = $records;
    $fig{charged} = $charged;

    # The log line of a request is written before its settlement is:
    # its points must be those of the record, unless nginx said otherwise
    # ("not the N its request was logged with") because the balance moved.

    my @unlike;

    if ($o{access_log}) {
        my %rec = map { %{ $_->{records} } } values %sub;
        my $said = error_log_text();

        open my $fh, '<', $o{access_log} or die "$o{access_log}: $!";

        while (my $line = <$fh>) {
            my ($rid, $points) = split ' ', $line;

            next unless defined $points && $points =~ /^\d+$/;

            my $r = $rec{$rid};

            if (!$r) {
                push @unlike, "$rid: logged $points points, has no record";
                next;
            }

            $fig{logged}++;

            next if $points == $r->{points}
                    || index($said, "charged $r->{points} points to"
                                    . " $r->{subscriber}, not the $points")
                       >= 0;

            push @unlike, "$rid: logged $points points, recorded"
                          . " $r->{points}";
        }

        report("${name}the access log has the points of each record",
               \@unlike);
    }

    report("${name}every admitted request has its usage record",
           \@missing);
    report("${name}no usage record without an admitted request", \@orphan);
    report("${name}no request is recorded twice", \@dup);
    report("${name}points are conserved: start + purchases - records"
           . " = paid + grants, never below zero", \@balance);
    report("${name}nothing stays reserved", \@reserved);
    report("${name}each record says what the upstream reported", \@bad_usage);
    report("${name}clients and purchases got the answers they should",
           \@problems);

    return \%fig;
}

sub check_record {
    my ($s, $r, $rec, $bad) = @_;

    my $kind = $r->{kind};
    my $what = "$s->{id}: job $r->{n} ($kind)";

    if ($rec->{status} != $r->{status} && !$r->{hung_up}) {
        push @$bad, "$what: status $rec->{status}, the client got"
                    . " $r->{status}";
    }

    if ($kind eq 'error500') {
        push @$bad, "$what: an upstream error cost $rec->{points}"
            if $rec->{points} != 0 || $rec->{cost} != 0;
        return;
    }

    if ($kind =~ /^cut|^no_usage$/) {
        push @$bad, "$what: usage_source $rec->{usage_source}"
            unless $rec->{usage_source} eq 'estimated';
        return;
    }

    # a client that hung up may or may not have let the usage arrive
    return if $kind eq 'hangup';

    if (!$r->{complete}) {
        push @$bad, "$what: the answer was not complete ($r->{status},"
                    . ' ' . ($r->{error} // 'no error') . ')';
        return;
    }

    if ($rec->{usage_source} ne 'upstream') {
        push @$bad, "$what: usage_source $rec->{usage_source}";
        return;
    }

    # a poor subscriber may have had max_tokens lowered, or its balance
    # may have run out: its charge is checked by conservation only
    return if $s->{poor};

    my ($in, $cached, $out, $cost) = @{ expected_usage($r) };

    if ($rec->{input_tokens} != $in || $rec->{cached_tokens} != $cached
        || $rec->{output_tokens} != $out || $rec->{cost} != $cost
        || $rec->{points} != $cost)
    {
        push @$bad, "$what: in $rec->{input_tokens} cached"
                    . " $rec->{cached_tokens} out $rec->{output_tokens}"
                    . " cost $rec->{cost} points $rec->{points}, expected"
                    . " $in $cached $out $cost $cost";
    }
}

sub report {
    my ($name, $problems) = @_;

    Test::More::ok(!@$problems, $name)
        or Test::More::diag(join "\n", grep { defined }
                            @$problems[0 .. 19],
                            @$problems > 20
                            ? '... and ' . (@$problems - 20) . ' more'
                            : ());
}

# One line of figures for the test output.
sub load_summary {
    my ($fig) = @_;

    my @names = ('jobs', 'sent', 'admitted', 'refused', 'records',
                 'charged', 'logged', 'hung up', 'incomplete', 'purchases',
                 'purchase sends', 'lost with the killed worker',
                 'slowest',
                 sort grep { /^(?:kind|status) / } keys %$fig);

    return join ', ', (map { "$_ $fig->{$_}" }
                       grep { defined $fig->{$_} } @names),
                      sprintf('load time %.1f s', $fig->{elapsed} // 0);
}


# Streams held open by the test itself, so that it knows which worker
# serves each of them before it acts.
#
#     my $streams = open_streams($subs, 24, delay => 100, tokens => 30);
#     kill 'KILL', $streams->[0]{worker};
#     finish_streams($streams, 15);
#
# open_streams() sends each request on its own connection and reads up to
# the end of the response head (5 s at most each): every stream has then
# passed admission, and its head says the request id and the worker.
# finish_streams() reads them all to the end, or until the seconds are
# over, and fills in status, complete, request_id, worker and body.

sub open_streams {
    my ($subs, $n, %o) = @_;
    my @streams;

    for my $i (0 .. $n - 1) {
        my $sub = $subs->[$i % @$subs];
        my $body = $Json->encode({
            model => 'kimi-k2.5', stream => JSON::PP::true,
            max_tokens => ($o{tokens} // 30) + 0,
            messages => [{ role => 'user', content => "stream $i" }] });

        my $sock = IO::Socket::INET->new(
                       PeerAddr => '127.0.0.1',
                       PeerPort => $ENV{TEST_NGINX_SERVER_PORT},
                       Proto => 'tcp', Timeout => 5)
            or die "cannot connect to nginx: $!\n";

        my $req = "POST /v1/chat/completions HTTP/1.1\r\n"
                  . "Host: localhost\r\nConnection: close\r\n"
                  . "Authorization: Bearer $sub->{key}\r\n"
                  . "X-Mock-Delay-Ms: " . ($o{delay} // 100) . "\r\n"
                  . "X-Mock-Completion-Tokens: " . ($o{tokens} // 30)
                  . "\r\nContent-Length: " . length($body) . "\r\n\r\n"
                  . $body;

        write_all($sock, $req, Time::HiRes::time() + 5)
            or die "cannot send stream $i: $!\n";

        my %s = (n => $i, sock => $sock, raw => '', sub => $sub->{id},
                 kind => 'stream', prompt => 10, cached => 0,
                 completion => $o{tokens} // 30,
                 max_tokens => $o{tokens} // 30);

        my $deadline = Time::HiRes::time() + 5;
        my $sel = IO::Select->new($sock);

        while ($s{raw} !~ /\r\n\r\n/) {
            my $left = $deadline - Time::HiRes::time();
            last if $left <= 0 || !$sel->can_read($left);
            last unless sysread $sock, my $buf, 65536;
            $s{raw} .= $buf;
        }

        die "stream $i: no response head within 5 s\n"
            unless $s{raw} =~ /\r\n\r\n/;

        ($s{worker}) = $s{raw} =~ /^X-Worker: (\d+)\r$/mi;
        ($s{request_id}) = $s{raw} =~ /^X-Request-Id: (\w+)\r$/mi;
        ($s{upstream}) = $s{raw} =~ /^X-Upstream: (\S+)\r$/mi;

        push @streams, \%s;
    }

    return \@streams;
}

sub finish_streams {
    my ($streams, $seconds) = @_;

    my $deadline = Time::HiRes::time() + $seconds;
    my %open = map { fileno($_->{sock}) => $_ } @$streams;
    my $sel = IO::Select->new(map { $_->{sock} } @$streams);

    while ($sel->count) {
        my $left = $deadline - Time::HiRes::time();
        last if $left <= 0;

        for my $sock ($sel->can_read($left)) {
            my $s = $open{fileno $sock};
            my $n = sysread $sock, my $buf, 65536;

            if ($n) {
                $s->{raw} .= $buf;
                next;
            }

            $sel->remove($sock);
        }
    }

    for my $s (@$streams) {
        close $s->{sock};
        delete $s->{sock};

        my ($head, $rest) = split /\r\n\r\n/, $s->{raw}, 2;

        ($s->{status}) = $head =~ m{^HTTP/1\.1 (\d+)};
        ($s->{body}, $s->{complete}) = dechunk($rest // '');
        $s->{complete} = $s->{complete} ? 1 : 0;
        delete $s->{raw};
    }

    return $streams;
}


# The points held in reservations, over all the subscribers given.
sub reserved_total {
    my ($subs) = @_;
    my $sum = 0;

    $sum += admin_json('GET', "/admin/subscribers/$_->{id}", undef, 200)
                ->{balance}{reserved} for @$subs;

    return $sum;
}


# nginx's processes, from its pid file and /proc.

# The whole error log of the nginx under test ('' when there is none).
sub error_log_text {
    open my $fh, '<', main::server_root() . '/logs/error.log' or return '';
    local $/;
    return <$fh>;
}

sub nginx_master {
    my ($file) = @_;

    $file //= main::server_root() . '/logs/nginx.pid';

    open my $fh, '<', $file or return undef;
    my $pid = <$fh>;
    close $fh;

    return $pid && $pid =~ /^(\d+)\s*$/ ? $1 : undef;
}

sub nginx_workers {
    my ($master) = @_;
    my @kids;

    for my $stat (glob '/proc/[0-9]*/stat') {
        open my $fh, '<', $stat or next;
        my $text = <$fh> // '';
        close $fh;

        push @kids, $1 if $text =~ /^(\d+) \(([^)]*)\) [^Z] (\d+) /
                          && $3 == $master;
    }

    return sort { $a <=> $b } @kids;
}

# Whether a process runs (a zombie has exited all the same).
sub process_alive {
    my ($pid) = @_;

    open my $fh, '<', "/proc/$pid/stat" or return 0;
    my $text = <$fh> // '';
    close $fh;

    return $text =~ /^\d+ \([^)]*\) [^Z]/ ? 1 : 0;
}

# Waits up to "seconds" for the code to return true; returns its value.
sub wait_for {
    my ($seconds, $code) = @_;
    my $deadline = Time::HiRes::time() + $seconds;

    while (1) {
        my $v = $code->();
        return $v if $v || Time::HiRes::time() > $deadline;
        Time::HiRes::sleep(0.05);
    }
}

1;
