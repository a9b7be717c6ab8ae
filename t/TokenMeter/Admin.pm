package t::TokenMeter::Admin;

# The admin key of the files that test the store and the admin API
# (t/00x-*.t, t/01x-*.t), and the configuration most of their blocks
# share:
#
#     use t::TokenMeter;
#     use t::TokenMeter::Admin;
#
#     admin_defaults();
#     run_tests();
#
# Loading it sets $TEST_NGINX_ADMIN_HASH to the SHA-256 of the admin key
# "tm-test-admin-key-6c1f0e9b2a7d", for the admin locations of blocks.
# admin_defaults() gives each block that has no --- http_config of its own
# the store $TEST_NGINX_STORE_DIR/store, followed by the http
# configuration passed to it if any, and each block that has no --- config
# of its own the admin API under /admin/.

use strict;
use warnings;

use Exporter 'import';
use Digest::SHA ();

our @EXPORT = qw(admin_defaults);

$ENV{TEST_NGINX_ADMIN_HASH} =
    Digest::SHA::sha256_hex('tm-test-admin-key-6c1f0e9b2a7d');

sub admin_defaults {
    my ($http) = @_;

    $http = '    token_meter_store $TEST_NGINX_STORE_DIR/store;' . "\n"
            . ($http // '');

    main::add_block_preprocessor(sub {
        my ($block) = @_;

        $block->set_value(http_config => $http)
            if !defined $block->http_config;

        $block->set_value(config => <<'EOC') if !defined $block->config;
    location /admin/ {
        token_meter_admin;
        token_meter_admin_key sha256:$TEST_NGINX_ADMIN_HASH;
    }
EOC
    });
}

1;
