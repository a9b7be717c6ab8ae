
/*
 * Copyright (C) The ngx_http_token_meter_module authors
 */


#ifndef _NGX_HTTP_TOKEN_METER_FUZZ_H_INCLUDED_
#define _NGX_HTTP_TOKEN_METER_FUZZ_H_INCLUDED_


#include <stdio.h>
#include <stdlib.h>

#include "ngx_http_token_meter_scan.h"


/* the most tokens a count of usage may hold */
#define NGX_HTTP_TOKEN_METER_FUZZ_TOKENS  1000000000LL


/* what the targets share: a failed check stops the fuzzer with its input */

static ngx_inline void
ngx_http_token_meter_fuzz_check(int ok, const char *what)
{
    if (!ok) {
        fprintf(stderr, "token meter fuzz: %s\n", what);
        abort();
    }
}


/*
 * What ngx_http_token_meter_usage_parse() returned: an error, or counts
 * that ngx_http_token_meter_cost() can multiply without an overflow
 */

static ngx_inline void
ngx_http_token_meter_fuzz_check_usage(ngx_int_t rc,
    ngx_http_token_meter_usage_t *usage)
{
    if (rc != NGX_OK) {
        ngx_http_token_meter_fuzz_check(rc == NGX_ERROR,
                                        "usage parse returned junk");
        return;
    }

    ngx_http_token_meter_fuzz_check(
        usage->input >= 0 && usage->input <= NGX_HTTP_TOKEN_METER_FUZZ_TOKENS
        && usage->output >= 0
        && usage->output <= NGX_HTTP_TOKEN_METER_FUZZ_TOKENS
        && usage->cached >= 0 && usage->cached <= usage->input,
        "parsed usage out of bounds");
}


#endif /* _NGX_HTTP_TOKEN_METER_FUZZ_H_INCLUDED_ */
