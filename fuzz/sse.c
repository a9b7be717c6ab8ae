
/*
 * Copyright (C) The ngx_http_token_meter_module authors
 */


/*
 * libFuzzer target: the server-sent events scanner, driven the way the
 * body filter drives it, with an event handler that parses the captured
 * usage object as the filter does.
 *
 * Input: the first byte modulo 9 is a count n, the next n bytes give the
 * sizes (1 to 256) of the pieces the rest of the input is cut into, in
 * turn.  The stream is scanned twice, once in those pieces and once in a
 * single buffer, and both scans must see the same events, the same text
 * and the same usage: what a subscriber pays must not depend on where
 * the network happened to cut the answer.  Every piece is a heap block
 * of its own exact size, so that AddressSanitizer catches a read past
 * the end of a buffer.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <jansson.h>

#include "fuzz.h"


#define NGX_HTTP_TOKEN_METER_FUZZ_SPLITS  8


typedef struct {
    size_t                        fed;
    uint64_t                      events;
    uint64_t                      usages;
    uint64_t                      digest;
    ngx_http_token_meter_text_t   text;
} ngx_http_token_meter_fuzz_run_t;


static void ngx_http_token_meter_fuzz_scan(ngx_http_token_meter_fuzz_run_t *run,
    const uint8_t *data, size_t len, const uint8_t *sizes, size_t n);
static void ngx_http_token_meter_fuzz_event(void *data,
    ngx_http_token_meter_json_scan_t *json);
static uint64_t ngx_http_token_meter_fuzz_mix(uint64_t h, const void *p,
    size_t len);


int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t                           n;
    ngx_http_token_meter_fuzz_run_t  whole, pieces;

    if (size == 0) {
        return 0;
    }

    n = data[0] % (NGX_HTTP_TOKEN_METER_FUZZ_SPLITS + 1);

    if (size < 1 + n) {
        return 0;
    }

    ngx_http_token_meter_fuzz_scan(&whole, data + 1 + n, size - 1 - n,
                                   NULL, 0);
    ngx_http_token_meter_fuzz_scan(&pieces, data + 1 + n, size - 1 - n,
                                   data + 1, n);

    ngx_http_token_meter_fuzz_check(whole.events == pieces.events,
                                    "event count depends on the split");
    ngx_http_token_meter_fuzz_check(whole.usages == pieces.usages,
                                    "usage count depends on the split");
    ngx_http_token_meter_fuzz_check(whole.digest == pieces.digest,
                                    "events differ with the split");
    ngx_http_token_meter_fuzz_check(
        whole.text.ascii == pieces.text.ascii
        && whole.text.other == pieces.text.other,
        "text counted depends on the split");

    return 0;
}


/*
 * Scans the stream in pieces whose sizes come from "sizes" in turn, or
 * in one piece when there are none, as the body filter does: the scanner
 * stops after each event and is called again on the rest of the buffer.
 */

static void
ngx_http_token_meter_fuzz_scan(ngx_http_token_meter_fuzz_run_t *run,
    const uint8_t *data, size_t len, const uint8_t *sizes, size_t n)
{
    u_char                           *buf, *p, *q, *last;
    size_t                            off, chunk, i;
    ngx_http_token_meter_sse_scan_t  *sse;

    ngx_memzero(run, sizeof(ngx_http_token_meter_fuzz_run_t));
    run->digest = 14695981039346656037ULL;

    /* the scanner state is large: on the heap, as in the module's pool */

    sse = malloc(sizeof(ngx_http_token_meter_sse_scan_t));
    ngx_http_token_meter_fuzz_check(sse != NULL, "out of memory");

    ngx_http_token_meter_sse_scan_init(sse);

    for (off = 0, i = 0; off < len; off += chunk, i++) {
        chunk = n ? (size_t) sizes[i % n] + 1 : len;
        chunk = ngx_min(chunk, len - off);

        buf = malloc(chunk);
        ngx_http_token_meter_fuzz_check(buf != NULL, "out of memory");
        ngx_memcpy(buf, data + off, chunk);

        last = buf + chunk;

        for (p = buf; p < last; p = q) {
            q = ngx_http_token_meter_sse_scan(sse, p, last,
                                              ngx_http_token_meter_fuzz_event,
                                              run);

            /* the body filter loops until the buffer is used up */

            ngx_http_token_meter_fuzz_check(q > p && q <= last,
                                            "scanner did not advance");
        }

        free(buf);
    }

    run->fed = len;

    /* an unfinished event counts as the filter's finish handler counts it */

    ngx_http_token_meter_fuzz_check(sse->json.text.ascii >= 0
                                    && sse->json.text.other >= 0,
                                    "negative text count");

    run->text.ascii += sse->json.text.ascii;
    run->text.other += sse->json.text.other;

    ngx_http_token_meter_fuzz_check(
        run->text.ascii + run->text.other <= (int64_t) len,
        "more characters counted than bytes given");

    ngx_http_token_meter_fuzz_check(
        ngx_http_token_meter_text_tokens(&run->text) <= (int64_t) len,
        "more tokens estimated than bytes given");

    free(sse);
}


static void
ngx_http_token_meter_fuzz_event(void *data,
    ngx_http_token_meter_json_scan_t *json)
{
    u_char                            flags[2], last;
    ngx_int_t                         rc;
    ngx_http_token_meter_usage_t      usage;
    ngx_http_token_meter_fuzz_run_t  *run = data;

    run->events++;

    ngx_http_token_meter_fuzz_check(json->text.ascii >= 0
                                    && json->text.other >= 0,
                                    "negative text count");

    run->text.ascii += json->text.ascii;
    run->text.other += json->text.other;

    flags[0] = json->captured;
    flags[1] = json->choice;

    run->digest = ngx_http_token_meter_fuzz_mix(run->digest, &json->text,
                                                sizeof(json->text));
    run->digest = ngx_http_token_meter_fuzz_mix(run->digest, flags,
                                                sizeof(flags));

    if (!json->captured) {
        return;
    }

    /* a capture starts at "{" and ends at the bracket that closes it */

    ngx_http_token_meter_fuzz_check(
        json->usage_len >= 2
        && json->usage_len <= NGX_HTTP_TOKEN_METER_USAGE_MAX,
        "captured usage length out of bounds");

    last = json->usage[json->usage_len - 1];

    ngx_http_token_meter_fuzz_check(json->usage[0] == '{'
                                    && (last == '}' || last == ']'),
                                    "captured usage is not bracketed");

    run->digest = ngx_http_token_meter_fuzz_mix(run->digest, json->usage,
                                                json->usage_len);

    rc = ngx_http_token_meter_usage_parse(json->usage, json->usage_len,
                                          &usage);

    run->digest = ngx_http_token_meter_fuzz_mix(run->digest, &rc,
                                                sizeof(ngx_int_t));

    ngx_http_token_meter_fuzz_check_usage(rc, &usage);

    if (rc != NGX_OK) {
        return;
    }

    run->usages++;
    run->digest = ngx_http_token_meter_fuzz_mix(run->digest, &usage,
                                                sizeof(usage));
}


/* FNV-1a: a cheap way to compare two sequences of events */

static uint64_t
ngx_http_token_meter_fuzz_mix(uint64_t h, const void *p, size_t len)
{
    const u_char  *c, *last;

    for (c = p, last = c + len; c < last; c++) {
        h = (h ^ *c) * 1099511628211ULL;
    }

    return h;
}
