
/*
 * Copyright (C) The ngx_http_token_meter_module authors
 */


/*
 * libFuzzer target: the incremental JSON scanner that reads answers that
 * are not streamed, and the usage parser on what it captured.
 *
 * Input: as for the SSE target, the first byte modulo 9 is a count n and
 * the next n bytes give the sizes of the pieces the document is cut
 * into; the scan in pieces must equal the scan in one buffer.
 *
 * For documents that jansson accepts, jansson is the oracle: when the
 * document is an object with a "usage" object at the top level, the
 * scanner must have captured exactly that object.  The oracle stays out
 * of what the scanner leaves out by design: escaped keys (the scanner
 * compares keys as they are written), documents larger than the capture
 * buffer, and usage found inside "response" (the Responses API), which
 * the SSE target covers.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <jansson.h>

#include "fuzz.h"


#define NGX_HTTP_TOKEN_METER_FUZZ_SPLITS  8


static ngx_http_token_meter_json_scan_t *ngx_http_token_meter_fuzz_scan(
    const uint8_t *data, size_t len, const uint8_t *sizes, size_t n);
static void ngx_http_token_meter_fuzz_usage(
    ngx_http_token_meter_json_scan_t *s);
static void ngx_http_token_meter_fuzz_oracle(
    ngx_http_token_meter_json_scan_t *s, const uint8_t *data, size_t len);


int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t                             n, len;
    const uint8_t                     *doc;
    ngx_http_token_meter_json_scan_t  *whole, *pieces;

    if (size == 0) {
        return 0;
    }

    n = data[0] % (NGX_HTTP_TOKEN_METER_FUZZ_SPLITS + 1);

    if (size < 1 + n) {
        return 0;
    }

    doc = data + 1 + n;
    len = size - 1 - n;

    whole = ngx_http_token_meter_fuzz_scan(doc, len, NULL, 0);
    pieces = ngx_http_token_meter_fuzz_scan(doc, len, data + 1, n);

    ngx_http_token_meter_fuzz_check(
        whole->text.ascii == pieces->text.ascii
        && whole->text.other == pieces->text.other,
        "text counted depends on the split");

    ngx_http_token_meter_fuzz_check(whole->captured == pieces->captured
                                    && whole->choice == pieces->choice
                                    && whole->overflow == pieces->overflow,
                                    "scanner flags depend on the split");

    if (whole->captured) {
        ngx_http_token_meter_fuzz_check(
            whole->usage_len == pieces->usage_len
            && ngx_memcmp(whole->usage, pieces->usage, whole->usage_len) == 0,
            "captured usage depends on the split");

        ngx_http_token_meter_fuzz_usage(whole);
    }

    ngx_http_token_meter_fuzz_oracle(whole, doc, len);

    free(whole);
    free(pieces);

    return 0;
}


static ngx_http_token_meter_json_scan_t *
ngx_http_token_meter_fuzz_scan(const uint8_t *data, size_t len,
    const uint8_t *sizes, size_t n)
{
    u_char                            *buf;
    size_t                             off, chunk, i;
    ngx_http_token_meter_json_scan_t  *s;

    s = malloc(sizeof(ngx_http_token_meter_json_scan_t));
    ngx_http_token_meter_fuzz_check(s != NULL, "out of memory");

    ngx_http_token_meter_json_scan_init(s);

    /* the module allocates the scanner uninitialized, past "usage_len" */

    s->usage_len = 0;

    for (off = 0, i = 0; off < len; off += chunk, i++) {
        chunk = n ? (size_t) sizes[i % n] + 1 : len;
        chunk = ngx_min(chunk, len - off);

        /* a block of the exact size: reads past the piece are caught */

        buf = malloc(chunk);
        ngx_http_token_meter_fuzz_check(buf != NULL, "out of memory");
        ngx_memcpy(buf, data + off, chunk);

        ngx_http_token_meter_json_scan(s, buf, buf + chunk);

        free(buf);
    }

    ngx_http_token_meter_fuzz_check(s->text.ascii >= 0 && s->text.other >= 0
                                    && s->text.ascii + s->text.other
                                       <= (int64_t) len,
                                    "text count out of bounds");

    ngx_http_token_meter_fuzz_check(s->usage_len
                                    <= NGX_HTTP_TOKEN_METER_USAGE_MAX,
                                    "capture ran past its buffer");

    return s;
}


static void
ngx_http_token_meter_fuzz_usage(ngx_http_token_meter_json_scan_t *s)
{
    u_char                        last;
    ngx_int_t                     rc;
    ngx_http_token_meter_usage_t  usage;

    ngx_http_token_meter_fuzz_check(s->usage_len >= 2,
                                    "captured usage too short");

    last = s->usage[s->usage_len - 1];

    ngx_http_token_meter_fuzz_check(s->usage[0] == '{'
                                    && (last == '}' || last == ']'),
                                    "captured usage is not bracketed");

    rc = ngx_http_token_meter_usage_parse(s->usage, s->usage_len, &usage);

    ngx_http_token_meter_fuzz_check_usage(rc, &usage);
}


static void
ngx_http_token_meter_fuzz_oracle(ngx_http_token_meter_json_scan_t *s,
    const uint8_t *data, size_t len)
{
    json_t  *doc, *usage, *got;

    if (len >= NGX_HTTP_TOKEN_METER_USAGE_MAX
        || memchr(data, '\\', len) != NULL)
    {
        return;
    }

    /* with a repeated key jansson keeps the last, the scanner the first */

    doc = json_loadb((const char *) data, len, JSON_REJECT_DUPLICATES, NULL);

    if (doc == NULL) {
        return;
    }

    if (!json_is_object(doc) || json_object_get(doc, "response") != NULL) {
        json_decref(doc);
        return;
    }

    usage = json_object_get(doc, "usage");

    if (!json_is_object(usage)) {
        ngx_http_token_meter_fuzz_check(!s->captured,
                                        "captured a usage object that the "
                                        "document does not have");
        json_decref(doc);
        return;
    }

    ngx_http_token_meter_fuzz_check(s->captured,
                                    "missed the top-level usage object");

    got = json_loadb((const char *) s->usage, s->usage_len, 0, NULL);

    ngx_http_token_meter_fuzz_check(got != NULL && json_equal(got, usage),
                                    "captured something else than the "
                                    "usage object");

    json_decref(got);
    json_decref(doc);
}
