
/*
 * Copyright (C) The ngx_http_token_meter_module authors
 */


/*
 * libFuzzer target: the usage parser, on any bytes.  It reads the object
 * the scanners cut out of an answer without allocating, so it is a small
 * JSON reader of its own: it must never read outside the text, and what
 * it accepts must keep ngx_http_token_meter_cost() from overflowing.
 *
 * For text that jansson reads as an object, jansson is the oracle for
 * what the parser's comment promises: the counts are "prompt_tokens" or
 * "input_tokens", "completion_tokens" or "output_tokens", "cached_tokens"
 * in "prompt_tokens_details" or "input_tokens_details", otherwise
 * "prompt_cache_hit_tokens"; null is absent; a count that is negative,
 * not an integer or above 10^9 invalidates the usage, and so does having
 * neither an input nor an output count.  The oracle leaves out what that
 * comment does not settle: a document that names both spellings of one
 * count, escaped keys, NUL bytes, "-0", and objects or arrays inside
 * the details object.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <jansson.h>

#include "fuzz.h"




static ngx_int_t ngx_http_token_meter_fuzz_expect(json_t *doc,
    ngx_http_token_meter_usage_t *usage);
static ngx_int_t ngx_http_token_meter_fuzz_count(json_t *obj, char *name,
    char *other, int64_t *value);
static ngx_uint_t ngx_http_token_meter_fuzz_flat(json_t *obj);


int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    u_char                        *text;
    json_t                        *doc;
    ngx_int_t                      rc, expect;
    ngx_http_token_meter_usage_t   usage, want;

    /* a block of the exact size: a read past the text is caught */

    text = malloc(size ? size : 1);
    ngx_http_token_meter_fuzz_check(text != NULL, "out of memory");
    ngx_memcpy(text, data, size);

    rc = ngx_http_token_meter_usage_parse(text, size, &usage);

    free(text);

    ngx_http_token_meter_fuzz_check_usage(rc, &usage);

    /*
     * jansson skips NUL bytes between tokens and reads "-0" as 0, where
     * the parser, rightly, sees a count that is not a plain number
     */

    if (memchr(data, '\\', size) != NULL || memchr(data, '\0', size) != NULL
        || memmem(data, size, "-0", 2) != NULL)
    {
        return 0;
    }

    doc = json_loadb((const char *) data, size, JSON_REJECT_DUPLICATES,
                     NULL);

    if (doc == NULL) {
        return 0;
    }

    expect = ngx_http_token_meter_fuzz_expect(doc, &want);

    json_decref(doc);

    if (expect == NGX_DECLINED) {
        return 0;
    }

    ngx_http_token_meter_fuzz_check(rc == expect,
                                    rc == NGX_OK
                                    ? "accepted a usage object jansson "
                                      "finds invalid"
                                    : "refused a valid usage object");

    if (rc == NGX_OK) {
        ngx_http_token_meter_fuzz_check(usage.input == want.input
                                        && usage.cached == want.cached
                                        && usage.output == want.output,
                                        "counts differ from jansson's");
    }

    return 0;
}


/*
 * What the parser should say about a document, read with jansson;
 * NGX_DECLINED when the document is outside what the oracle covers.
 */

static ngx_int_t
ngx_http_token_meter_fuzz_expect(json_t *doc,
    ngx_http_token_meter_usage_t *usage)
{
    json_t     *details, *other;
    int64_t     hits;
    ngx_int_t   rc, input, output, cached;

    if (!json_is_object(doc)) {
        return NGX_ERROR;
    }

    if ((json_object_get(doc, "prompt_tokens")
         && json_object_get(doc, "input_tokens"))
        || (json_object_get(doc, "completion_tokens")
            && json_object_get(doc, "output_tokens")))
    {
        return NGX_DECLINED;
    }

    details = json_object_get(doc, "prompt_tokens_details");
    other = json_object_get(doc, "input_tokens_details");

    if (json_is_object(details) && json_is_object(other)) {
        return NGX_DECLINED;
    }

    if (!json_is_object(details)) {
        details = other;
    }

    if (json_is_object(details) && !ngx_http_token_meter_fuzz_flat(details)) {
        return NGX_DECLINED;
    }

    ngx_memzero(usage, sizeof(ngx_http_token_meter_usage_t));

    input = ngx_http_token_meter_fuzz_count(doc, "prompt_tokens",
                                            "input_tokens", &usage->input);
    output = ngx_http_token_meter_fuzz_count(doc, "completion_tokens",
                                             "output_tokens", &usage->output);

    hits = 0;
    rc = ngx_http_token_meter_fuzz_count(doc, "prompt_cache_hit_tokens",
                                         NULL, &hits);

    cached = NGX_DECLINED;

    if (json_is_object(details)) {
        cached = ngx_http_token_meter_fuzz_count(details, "cached_tokens",
                                                 NULL, &usage->cached);
    }

    if (input == NGX_ERROR || output == NGX_ERROR || rc == NGX_ERROR
        || cached == NGX_ERROR)
    {
        return NGX_ERROR;
    }

    if (input != NGX_OK && output != NGX_OK) {
        return NGX_ERROR;
    }

    if (cached != NGX_OK && rc == NGX_OK) {
        usage->cached = hits;
    }

    if (usage->cached > usage->input) {
        usage->cached = usage->input;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_token_meter_fuzz_count(json_t *obj, char *name, char *other,
    int64_t *value)
{
    json_t      *v;
    json_int_t   n;

    v = json_object_get(obj, name);

    if (v == NULL && other != NULL) {
        v = json_object_get(obj, other);
    }

    if (v == NULL || json_is_null(v)) {
        return NGX_DECLINED;
    }

    if (!json_is_integer(v)) {
        return NGX_ERROR;
    }

    n = json_integer_value(v);

    if (n < 0 || n > NGX_HTTP_TOKEN_METER_FUZZ_TOKENS) {
        return NGX_ERROR;
    }

    *value = n;

    return NGX_OK;
}


static ngx_uint_t
ngx_http_token_meter_fuzz_flat(json_t *obj)
{
    json_t      *v;
    const char  *k;

    json_object_foreach(obj, k, v) {
        if (json_is_object(v) || json_is_array(v)) {
            return 0;
        }
    }

    return 1;
}
