
/*
 * Copyright (C) The ngx_http_token_meter_module authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include <jansson.h>

#include "ngx_http_token_meter_module.h"
#include "ngx_http_token_meter_json.h"


ngx_int_t
ngx_http_token_meter_send_json(ngx_http_request_t *r, ngx_uint_t status,
    json_t *json)
{
    char       *text;
    size_t      len;
    ngx_buf_t  *b;

    text = json_dumps(json, JSON_COMPACT);
    if (text == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    len = ngx_strlen(text);

    b = ngx_create_temp_buf(r->pool, len + 1);
    if (b == NULL) {
        free(text);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    b->last = ngx_cpymem(b->last, text, len);
    *b->last++ = '\n';

    free(text);

    return ngx_http_token_meter_send_buf(r, status, "application/json", b);
}


/* sends a whole answer that is in one buffer */

ngx_int_t
ngx_http_token_meter_send_buf(ngx_http_request_t *r, ngx_uint_t status,
    char *type, ngx_buf_t *b)
{
    ngx_int_t     rc;
    ngx_chain_t   out;

    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    r->headers_out.status = status;
    r->headers_out.content_length_n = b->last - b->pos;

    r->headers_out.content_type.data = (u_char *) type;
    r->headers_out.content_type.len = ngx_strlen(type);
    r->headers_out.content_type_len = r->headers_out.content_type.len;
    r->headers_out.content_type_lowcase = NULL;

    ngx_http_clear_accept_ranges(r);
    ngx_http_clear_last_modified(r);
    ngx_http_clear_etag(r);

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}


ngx_int_t
ngx_http_token_meter_send_error(ngx_http_request_t *r, ngx_uint_t status,
    const char *type, const char *code, const char *fmt, ...)
{
    va_list    args;
    ngx_int_t  rc;

    va_start(args, fmt);
    rc = ngx_http_token_meter_send_verror(r, status, type, code, fmt, args);
    va_end(args);

    return rc;
}


ngx_int_t
ngx_http_token_meter_send_verror(ngx_http_request_t *r, ngx_uint_t status,
    const char *type, const char *code, const char *fmt, va_list args)
{
    u_char     *p;
    json_t     *json;
    ngx_int_t   rc;
    u_char      message[NGX_MAX_ERROR_STR];

    p = ngx_vslprintf(message, message + sizeof(message), fmt, args);

    /* a message cut at the end of the buffer must not end mid-character */

    if (p == message + sizeof(message)) {
        while (p > message && (p[-1] & 0xc0) == 0x80) {
            p--;
        }

        if (p > message && p[-1] >= 0xc0) {
            p--;
        }
    }

    json = json_pack("{s:{s:s%,s:s,s:n,s:s}}",
                     "error",
                     "message", message, (size_t) (p - message),
                     "type", type,
                     "param",
                     "code", code);
    if (json == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rc = ngx_http_token_meter_send_json(r, status, json);

    json_decref(json);

    return rc;
}


json_t *
ngx_http_token_meter_json_string(ngx_str_t *s)
{
    return json_stringn((char *) s->data, s->len);
}


json_t *
ngx_http_token_meter_json_time(time_t t)
{
    u_char  *p, buf[sizeof("2026-12-03T18:40:57Z")];

    p = ngx_http_token_meter_time(buf, t);

    return json_stringn((char *) buf, p - buf);
}


/*
 * json_object_set_new() that tolerates a NULL value, so that building a
 * document can be checked once at the end instead of after every field
 */

ngx_int_t
ngx_http_token_meter_json_set(json_t *obj, const char *key, json_t *value)
{
    if (obj == NULL || value == NULL) {
        if (value) {
            json_decref(value);
        }

        return NGX_ERROR;
    }

    if (json_object_set_new(obj, key, value) != 0) {
        return NGX_ERROR;
    }

    return NGX_OK;
}


ngx_int_t
ngx_http_token_meter_allow(ngx_http_request_t *r, char *methods)
{
    ngx_table_elt_t  *h;

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "Allow");
    h->value.data = (u_char *) methods;
    h->value.len = ngx_strlen(methods);

    return NGX_OK;
}
