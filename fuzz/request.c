
/*
 * Copyright (C) The ngx_http_token_meter_module authors
 */


/*
 * libFuzzer target: what the module does with every request body before
 * it reserves points: jansson parses it as the access handler does, and
 * ngx_http_token_meter_input_tokens() estimates its input.  The same
 * bytes then go through the character counter behind the estimates.
 *
 * The estimate is what the reservation multiplies by the input price, so
 * it must stay positive and bounded by the size of the body: 3 tokens,
 * 4 per message (a message takes at least 2 bytes with its comma) and
 * at most one token per byte of text.
 *
 * ngx_http_token_meter_cost() itself is not called: it lives in the
 * ledger, next to the store and request code, and does not link without
 * the nginx runtime.  The bounds it relies on are checked on the usage
 * parser's results by the "usage" target instead.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <jansson.h>

#include "fuzz.h"




int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    json_t                       *json;
    int64_t                       tokens;
    json_error_t                  error;
    ngx_http_token_meter_text_t   text;

    json = json_loadb((const char *) data, size, 0, &error);

    if (json != NULL) {

        if (json_is_object(json)) {
            tokens = ngx_http_token_meter_input_tokens(json);

            ngx_http_token_meter_fuzz_check(tokens >= 3,
                                            "input estimate below 3");
            ngx_http_token_meter_fuzz_check(tokens
                                            <= 3 + 4 + 3 * (int64_t) size,
                                            "input estimate larger than "
                                            "the body allows");
        }

        json_decref(json);
    }

    ngx_memzero(&text, sizeof(ngx_http_token_meter_text_t));

    ngx_http_token_meter_text_count(&text, (u_char *) data, size);

    ngx_http_token_meter_fuzz_check(text.ascii >= 0 && text.other >= 0
                                    && text.ascii + text.other
                                       <= (int64_t) size,
                                    "more characters than bytes");

    ngx_http_token_meter_fuzz_check(
        ngx_http_token_meter_text_tokens(&text) <= (int64_t) size,
        "more tokens than bytes");

    return 0;
}
