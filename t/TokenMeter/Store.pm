package t::TokenMeter::Store;

# Makes store directories for tests, before nginx sees them: LMDB
# environments written with mdb_load (Debian's lmdb-utils), and plain
# files where a store should be.

use strict;
use warnings;

use Exporter 'import';
use File::Path ();

our @EXPORT = qw(mdb_load make_file mode_of);

# mdb_load($dir, $db, $hex_key => $hex_value, ...): writes the pairs into
# the named database $db of the environment in $dir, or into its unnamed
# database when $db is undef.  The map is 16 MB, room enough for tests.
sub mdb_load {
    my ($dir, $db, @pairs) = @_;

    File::Path::make_path($dir);

    open my $fh, '|-', 'mdb_load', (defined $db ? ('-s', $db) : ()), $dir
        or die "cannot run mdb_load: $!";

    print $fh "VERSION=3\nformat=bytevalue\ntype=btree\n"
              . "mapsize=16777216\nHEADER=END\n";

    while (my ($k, $v) = splice @pairs, 0, 2) {
        print $fh " $k\n $v\n";
    }

    print $fh "DATA=END\n";

    close $fh or die "mdb_load into $dir failed (status $?)";
}

sub make_file {
    my ($path, $text) = @_;

    (my $dir = $path) =~ s{/[^/]+$}{};
    File::Path::make_path($dir);

    open my $fh, '>', $path or die "cannot write $path: $!";
    print $fh $text;
    close $fh or die "cannot write $path: $!";
}

# The permission bits of a file as four octal digits, "missing" if it
# does not exist.
sub mode_of {
    my ($path) = @_;
    my @st = stat $path or return 'missing';

    return sprintf '%04o', $st[2] & 07777;
}

1;
