# token_meter_store: the store is created with private permissions, what
# one nginx writes the next one reads (in every sync mode), and every store
# that cannot be used stops nginx with a message that says why.
#
# The blocks run in order and share $TEST_NGINX_STORE_DIR; each block with
# a --- config starts a new nginx.  must_die blocks expect "[emerg]" as
# well as the message: it is the level of configuration errors, and saying
# so keeps Test::Nginx from warning about the line.

use t::TokenMeter;
use t::TokenMeter::Expect;
use t::TokenMeter::Store;
use t::TokenMeter::Admin;

our $Dir = $ENV{TEST_NGINX_STORE_DIR};

# Stores that nginx must refuse, made before any block runs.

make_file("$Dir/plain-file", "not a directory\n");
make_file("$Dir/not-lmdb/data.mdb", "this is not an LMDB file\n" x 200);

# another program's data in the unnamed database: "key" => "value"
mdb_load("$Dir/foreign-main", undef, '6b6579' => '76616c7565');

# another program's named database "other"
mdb_load("$Dir/foreign-named", 'other', '6b6579' => '76616c7565');

# our layout, but "schema" is 7, a version from the future
mdb_load("$Dir/schema-7", 'meta', '736368656d61' => '00000007');

# our layout, but the schema record is two bytes long
mdb_load("$Dir/schema-short", 'meta', '736368656d61' => '0001');

# 600 records of 4000 bytes in one of our databases: about 2.4 MB
mdb_load("$Dir/big", 'usage',
         map { sprintf('%08x', $_) => 'ab' x 4000 } 1 .. 600);

no_shuffle();
run_tests();

__DATA__

=== TEST 1: the first start creates the store; a subscriber is written
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store;
--- config
    location /admin/ {
        token_meter_admin;
        token_meter_admin_key sha256:$TEST_NGINX_ADMIN_HASH;
    }
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
POST /admin/subscribers
{"msisdn":"+8613800138000","api_key":"sk-tm-test-alice-000000000000000001"}
--- error_code: 201
--- response_body_like eval
::json_re('{"id":"sub_1","msisdn":"+8613800138000","status":"active",'
    . '"created_at":"<time>","activated_at":"<time>","closed_at":null,'
    . '"keys":[{"key_id":"key_2e52d10ed9037788","created_at":"<time>",'
    . '"revoked_at":null}],"expired_points":0,"balance":{"paid":0,'
    . '"grants":[{"kind":"trial","points":25000000,"expires_at":"<time>"}],'
    . '"reserved":0,"available":25000000},'
    . '"api_key":"sk-tm-test-alice-000000000000000001",'
    . '"key_id":"key_2e52d10ed9037788"}')
--- error_log eval
qq{token meter store "$::Dir/store" created with schema version 1}
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: the store is private: directory 0700, files 0600
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store;
--- config
    location = /t {
        echo ok;
    }
--- init
# (--- init runs in the runner's package: call Test::More by its name)
Test::More::is(::mode_of("$::Dir/store"), '0700', 'the store is 0700');
Test::More::is(::mode_of("$::Dir/store/data.mdb"), '0600', 'data.mdb: 0600');
Test::More::is(::mode_of("$::Dir/store/lock.mdb"), '0600', 'lock.mdb: 0600');
--- request
GET /t
--- response_body
ok
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: after a restart the subscriber is still there
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store;
--- config
    location /admin/ {
        token_meter_admin;
        token_meter_admin_key sha256:$TEST_NGINX_ADMIN_HASH;
    }
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
GET /admin/subscribers/sub_1
--- response_body_like eval
::json_re('{"id":"sub_1","msisdn":"+8613800138000","status":"active",'
    . '"created_at":"<time>","activated_at":"<time>","closed_at":null,'
    . '"keys":[{"key_id":"key_2e52d10ed9037788","created_at":"<time>",'
    . '"revoked_at":null}],"expired_points":0,"balance":{"paid":0,'
    . '"grants":[{"kind":"trial","points":25000000,"expires_at":"<time>"}],'
    . '"reserved":0,"available":25000000}}')
--- no_error_log
created with schema version
[error]
[alert]
[crit]



=== TEST 4: sync=200ms: a purchase is written
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store sync=200ms;
--- config
    location /admin/ {
        token_meter_admin;
        token_meter_admin_key sha256:$TEST_NGINX_ADMIN_HASH;
    }
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
POST /admin/subscribers/sub_1/purchases
{"yuan":"10.00","reference":"store-pay-1"}
--- error_code: 201
--- response_body_like chomp
"points":2500000,.*"balance":\{"paid":2500000,
--- no_error_log
[error]
[alert]
[crit]



=== TEST 5: sync=off reads what sync=200ms wrote, and writes more
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store sync=off;
--- config
    location /admin/ {
        token_meter_admin;
        token_meter_admin_key sha256:$TEST_NGINX_ADMIN_HASH;
    }
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
POST /admin/subscribers/sub_1/purchases
{"yuan":"5.00","reference":"store-pay-2"}
--- error_code: 201
--- response_body_like chomp
"points":1250000,.*"balance":\{"paid":3750000,
--- no_error_log
[error]
[alert]
[crit]



=== TEST 6: a larger size= and the path with a trailing slash: same data
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store/ size=16m;
--- config
    location /admin/ {
        token_meter_admin;
        token_meter_admin_key sha256:$TEST_NGINX_ADMIN_HASH;
    }
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
GET /admin/subscribers?msisdn=%2B8613800138000
--- response_body_like chomp
^\{"id":"sub_1",.*"balance":\{"paid":3750000,.*"available":28750000\}\}$
--- no_error_log
created with schema version
[error]
[alert]
[crit]



=== TEST 7: a relative path is taken from the prefix; a new store is empty
--- http_config
    # under logs/, which the test runner removes with the server root
    token_meter_store logs/tm-store;
--- config
    location /admin/ {
        token_meter_admin;
        token_meter_admin_key sha256:$TEST_NGINX_ADMIN_HASH;
    }
--- more_headers
Authorization: Bearer tm-test-admin-key-6c1f0e9b2a7d
--- request
GET /admin/subscribers/sub_1
--- error_code: 404
--- response_body
{"error":{"message":"no subscriber \"sub_1\"","type":"invalid_request_error","param":null,"code":"subscriber_not_found"}}
--- error_log eval
qq{token meter store "$ENV{TEST_NGINX_SERVER_ROOT}/logs/tm-store" }
. qq{created with schema version 1}
--- no_error_log
[error]
[alert]
[crit]



=== TEST 8: size= below 1m
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/small size=512k;
--- config
--- must_die
--- error_log
[emerg]
"token_meter_store" directive size= must be at least 1m
--- no_error_log
[error]
[alert]
[crit]



=== TEST 9: size= that is not a size
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store size=abc;
--- config
--- must_die
--- error_log
[emerg]
invalid store size "size=abc"
--- no_error_log
[error]
[alert]
[crit]



=== TEST 10: an unknown sync mode
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store sync=maybe;
--- config
--- must_die
--- error_log
[emerg]
invalid sync mode "sync=maybe", expected on, off or an interval
--- no_error_log
[error]
[alert]
[crit]



=== TEST 11: a sync interval of zero is refused too
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store sync=0s;
--- config
--- must_die
--- error_log
[emerg]
invalid sync mode "sync=0s", expected on, off or an interval
--- no_error_log
[error]
[alert]
[crit]



=== TEST 12: an unknown parameter
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store foo=bar;
--- config
--- must_die
--- error_log
[emerg]
invalid parameter "foo=bar"
--- no_error_log
[error]
[alert]
[crit]



=== TEST 13: two stores
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store;
    token_meter_store $TEST_NGINX_STORE_DIR/store2;
--- config
--- must_die
--- error_log
[emerg]
"token_meter_store" directive is duplicate
--- no_error_log
[error]
[alert]
[crit]



=== TEST 14: the path is a regular file
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/plain-file;
--- config
--- must_die
--- error_log eval
[
    '[emerg]',
    qq{token meter store "$::Dir/plain-file" is not a directory},
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 15: the parent directory is missing
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/no-such-dir/store;
--- config
--- must_die
--- error_log eval
[
    '[emerg]',
    qq{cannot create token meter store "$::Dir/no-such-dir/store" }
    . qq{(2: No such file or directory)},
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 16: data.mdb is not an LMDB file
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/not-lmdb;
--- config
--- must_die
--- error_log eval
[
    '[emerg]',
    qq{token meter store "$::Dir/not-lmdb" cannot be opened: MDB_INVALID: }
    . qq{File is not an LMDB file},
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 17: an LMDB environment with data in its unnamed database
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/foreign-main;
--- config
--- must_die
--- error_log eval
[
    '[emerg]',
    qq{"$::Dir/foreign-main" is an LMDB environment of another program, }
    . qq{not a token meter store},
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 18: an LMDB environment with a named database that is not ours
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/foreign-named;
--- config
--- must_die
--- error_log eval
[
    '[emerg]',
    qq{"$::Dir/foreign-named" is an LMDB environment of another program, }
    . qq{not a token meter store},
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 19: a schema version this module does not know
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/schema-7;
--- config
--- must_die
--- error_log eval
[
    '[emerg]',
    qq{token meter store "$::Dir/schema-7" has schema version 7, }
    . qq{this module understands only version 1},
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 20: a schema record of the wrong length
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/schema-short;
--- config
--- must_die
--- error_log eval
[
    '[emerg]',
    qq{token meter store "$::Dir/schema-short" has a damaged schema record},
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 21: a store already larger than size=
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/big size=1m;
--- config
--- must_die
--- error_log eval
[
    '[emerg]',
    qr{token meter store "\Q$::Dir\E/big" already holds \d+ bytes, more than size=1048576},
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 22: the refused stores were left as they were
--- http_config
    token_meter_store $TEST_NGINX_STORE_DIR/store;
--- config
    location = /t {
        echo ok;
    }
--- init
Test::More::ok(!-e "$::Dir/small", 'size=512k created nothing');
Test::More::ok(!-e "$::Dir/no-such-dir", 'no parent was created');
Test::More::is(-s "$::Dir/plain-file", 16, 'the regular file is unchanged');
Test::More::like(`mdb_dump -p -s other $::Dir/foreign-named`,
                 qr/^ key\n value\n/m,
                 'the foreign database still holds its record');
Test::More::unlike(`mdb_dump -p $::Dir/foreign-named`, qr/^ meta\n/m,
                   'none of our databases was added to it');
--- request
GET /t
--- response_body
ok
--- no_error_log
[error]
[alert]
[crit]
