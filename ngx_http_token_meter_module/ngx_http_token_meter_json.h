
/*
 * Copyright (C) The ngx_http_token_meter_module authors
 */


#ifndef _NGX_HTTP_TOKEN_METER_JSON_H_INCLUDED_
#define _NGX_HTTP_TOKEN_METER_JSON_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include <jansson.h>


ngx_int_t ngx_http_token_meter_send_json(ngx_http_request_t *r,
    ngx_uint_t status, json_t *json);
ngx_int_t ngx_http_token_meter_send_buf(ngx_http_request_t *r,
    ngx_uint_t status, char *type, ngx_buf_t *b);
ngx_int_t ngx_http_token_meter_send_error(ngx_http_request_t *r,
    ngx_uint_t status, const char *type, const char *code,
    const char *fmt, ...);
ngx_int_t ngx_http_token_meter_send_verror(ngx_http_request_t *r,
    ngx_uint_t status, const char *type, const char *code, const char *fmt,
    va_list args);
ngx_int_t ngx_http_token_meter_allow(ngx_http_request_t *r, char *methods);
json_t *ngx_http_token_meter_json_string(ngx_str_t *s);
json_t *ngx_http_token_meter_json_time(time_t t);
ngx_int_t ngx_http_token_meter_json_set(json_t *obj, const char *key,
    json_t *value);


#endif /* _NGX_HTTP_TOKEN_METER_JSON_H_INCLUDED_ */
