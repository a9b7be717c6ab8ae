
/*
 * Copyright (C) The ngx_http_token_meter_module authors
 */


#ifndef _NGX_HTTP_TOKEN_METER_SCAN_H_INCLUDED_
#define _NGX_HTTP_TOKEN_METER_SCAN_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <jansson.h>


#define NGX_HTTP_TOKEN_METER_USAGE_MAX   4096
#define NGX_HTTP_TOKEN_METER_DEPTH_MAX   64
#define NGX_HTTP_TOKEN_METER_KEY_MAX     24


/* text seen, for estimates: ASCII characters and other characters */

typedef struct {
    int64_t                     ascii;
    int64_t                     other;
} ngx_http_token_meter_text_t;


typedef struct {
    int64_t                     input;
    int64_t                     cached;
    int64_t                     output;
} ngx_http_token_meter_usage_t;


/*
 * An incremental JSON scanner: it is fed a document in pieces of any size
 * and keeps no more than a key prefix and the "usage" object.  It counts
 * the characters of the string values that carry generated text, and
 * keeps the text of the "usage" object, found at the top level or inside
 * a top-level "response" object (the Responses API).
 */

typedef struct {
    ngx_uint_t                  state;
    ngx_uint_t                  depth;
    uint64_t                    arrays;
    ngx_uint_t                  key_len;
    u_char                      key[NGX_HTTP_TOKEN_METER_KEY_MAX];
    u_char                      top_key[NGX_HTTP_TOKEN_METER_KEY_MAX];
    ngx_uint_t                  top_key_len;
    ngx_uint_t                  hex;

    unsigned                    counting:1;
    unsigned                    is_key:1;
    unsigned                    capturing:1;
    unsigned                    captured:1;
    unsigned                    overflow:1;
    unsigned                    in_choices:1;
    unsigned                    choice:1;
    unsigned                    unicode_other:1;

    ngx_uint_t                  capture_depth;
    ngx_http_token_meter_text_t  text;

    /* the fields from here on are not cleared between documents */
    size_t                      usage_len;
    u_char                      usage[NGX_HTTP_TOKEN_METER_USAGE_MAX];
} ngx_http_token_meter_json_scan_t;


/*
 * A server-sent events scanner: splits a stream given in pieces of any
 * size into events (any line ending, comments, several "data:" lines),
 * and feeds each event's data to a JSON scanner.
 */

typedef struct {
    ngx_uint_t                  state;
    ngx_uint_t                  field_len;
    u_char                      field[8];
    unsigned                    cr:1;
    unsigned                    data_lines:1;
    unsigned                    repeat:1;
    unsigned                    event_name:1;
    unsigned                    name_dot:1;
    ngx_uint_t                  name_len;
    u_char                      name[8];

    ngx_http_token_meter_json_scan_t  json;
} ngx_http_token_meter_sse_scan_t;


typedef void (*ngx_http_token_meter_event_pt)(void *data,
    ngx_http_token_meter_json_scan_t *json);


void ngx_http_token_meter_json_scan_init(
    ngx_http_token_meter_json_scan_t *s);
void ngx_http_token_meter_json_scan(ngx_http_token_meter_json_scan_t *s,
    u_char *p, u_char *last);

void ngx_http_token_meter_sse_scan_init(ngx_http_token_meter_sse_scan_t *s);
u_char *ngx_http_token_meter_sse_scan(ngx_http_token_meter_sse_scan_t *s,
    u_char *p, u_char *last, ngx_http_token_meter_event_pt handler,
    void *data);

ngx_int_t ngx_http_token_meter_usage_parse(u_char *text, size_t len,
    ngx_http_token_meter_usage_t *usage);
int64_t ngx_http_token_meter_text_tokens(ngx_http_token_meter_text_t *text);
int64_t ngx_http_token_meter_input_tokens(json_t *body);
void ngx_http_token_meter_text_count(ngx_http_token_meter_text_t *text,
    u_char *p, size_t len);


#endif /* _NGX_HTTP_TOKEN_METER_SCAN_H_INCLUDED_ */
