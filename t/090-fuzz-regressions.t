# The libFuzzer targets of fuzz/ build, every input kept in
# fuzz/regressions/ still passes, and a few seconds of fuzzing from the
# seed corpus find nothing.  "make fuzz" does the same at length; this
# keeps "make test" honest about the scanners between those runs.
#
# It needs clang with libFuzzer (Debian's clang and libclang-rt-14-dev)
# and no nginx.  FUZZ_TEST_TIME sets the seconds per target (default 3).

use strict;
use warnings;

use Cwd ();
use File::Basename ();
use File::Path ();
use Test::More;

my $root = Cwd::abs_path(File::Basename::dirname(__FILE__) . '/..');
my $cc = $ENV{FUZZ_CC} || 'clang';
my $time = $ENV{FUZZ_TEST_TIME} || 3;

chdir $root or die "cannot chdir to $root: $!\n";

plan skip_all => "$cc not found; the fuzz targets need clang with"
                 . " libFuzzer (Debian: clang, libclang-rt-14-dev)"
    unless grep { -x "$_/$cc" } split /:/, $ENV{PATH};

my @targets = sort map { File::Basename::basename($_, '.c') }
              glob 'fuzz/*.c';

# Each run builds its own binaries: files run at the same time, and other
# checkouts of the suite may too.
my $out = "$root/t/tmp/090-fuzz-regressions.$$";

File::Path::remove_tree($out);
File::Path::make_path($out);

my $log = `make -s fuzz-build FUZZ_CC=$cc FUZZ_OUT=$out 2>&1`;

is($?, 0, 'the fuzz targets build') or diag($log);

for my $t (@targets) {
    SKIP: {
        skip "$t: not built", 2 unless -x "$out/$t";

        my @kept = glob "fuzz/regressions/$t/*";
        my @seeds = glob "fuzz/corpus/$t/*";

        ok(@seeds > 0, "$t: has a seed corpus");

        # util/fuzz replays the regressions one by one, then fuzzes from
        # the seeds and the regressions, which runs every seed first.
        my $report = `FUZZ_OUT='$out' FUZZ_TIME=$time sh util/fuzz $t 2>&1`;
        my $status = $?;

        my ($done) = $report =~ /^fuzz: \Q$t\E: (#\d+\s+DONE.*)$/m;

        is($status, 0, "$t: " . @kept . " regression input(s) and "
                       . @seeds . " seed(s) pass, $time s of fuzzing"
                       . " finds nothing")
            or diag($report);

        note("$t: $done") if $done;
    }
}

File::Path::remove_tree($out) unless $ENV{TEST_NGINX_NO_CLEAN};

done_testing();
