package t::TokenMeter::Expect;

# Helpers for the expected values of test blocks:
#
#     --- response_body_like eval
#     ::json_re('{"id":"sub_1","created_at":"<time>"}')
#
# json_re() turns an expected JSON answer into a regex that matches it byte
# for byte, followed by the newline the module ends its answers with, except
# for these placeholders:
#
#     <time>      any RFC 3339 time in UTC, 2026-12-03T18:40:57Z
#     <key>       an API key made by the module, sk-tm- and 43 characters
#     <key_id>    any key id, key_ and 16 hex digits
#
# (Sections marked "eval" are run in another package, hence the "::".)

use strict;
use warnings;

use Exporter 'import';

our @EXPORT = qw(json_re key_id);

my %Placeholder = (
    '<time>'   => '\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ',
    '<key>'    => 'sk-tm-[A-Za-z0-9_-]{43}',
    '<key_id>' => 'key_[0-9a-f]{16}',
);

sub json_re {
    my ($json) = @_;

    my $re = join '', map { $Placeholder{$_} // quotemeta $_ }
                      split /(<time>|<key>|<key_id>)/, $json;

    return qr/\A$re\n\z/;
}

# The public id of an API key: "key_" and the first 16 hex digits of the
# key's SHA-256.
sub key_id {
    my ($key) = @_;

    require Digest::SHA;
    return 'key_' . substr Digest::SHA::sha256_hex($key), 0, 16;
}

1;
