
/*
 * Copyright (C) The ngx_http_token_meter_module authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_token_meter_module.h"


typedef enum {
    NGX_HTTP_TOKEN_METER_VAR_UPSTREAM = 0,
    NGX_HTTP_TOKEN_METER_VAR_SUBSCRIBER,
    NGX_HTTP_TOKEN_METER_VAR_MSISDN,
    NGX_HTTP_TOKEN_METER_VAR_MODEL,
    NGX_HTTP_TOKEN_METER_VAR_INPUT,
    NGX_HTTP_TOKEN_METER_VAR_CACHED,
    NGX_HTTP_TOKEN_METER_VAR_OUTPUT,
    NGX_HTTP_TOKEN_METER_VAR_POINTS,
    NGX_HTTP_TOKEN_METER_VAR_BALANCE,
    NGX_HTTP_TOKEN_METER_VAR_SOURCE,
    NGX_HTTP_TOKEN_METER_VAR_REQUEST_ID
} ngx_http_token_meter_var_e;


static ngx_int_t ngx_http_token_meter_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);


static ngx_http_variable_t  ngx_http_token_meter_vars[] = {

    { ngx_string("token_meter_upstream"), NULL,
      ngx_http_token_meter_variable, NGX_HTTP_TOKEN_METER_VAR_UPSTREAM,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("token_meter_subscriber"), NULL,
      ngx_http_token_meter_variable, NGX_HTTP_TOKEN_METER_VAR_SUBSCRIBER,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("token_meter_msisdn"), NULL,
      ngx_http_token_meter_variable, NGX_HTTP_TOKEN_METER_VAR_MSISDN,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("token_meter_model"), NULL,
      ngx_http_token_meter_variable, NGX_HTTP_TOKEN_METER_VAR_MODEL,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("token_meter_input_tokens"), NULL,
      ngx_http_token_meter_variable, NGX_HTTP_TOKEN_METER_VAR_INPUT,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("token_meter_cached_tokens"), NULL,
      ngx_http_token_meter_variable, NGX_HTTP_TOKEN_METER_VAR_CACHED,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("token_meter_output_tokens"), NULL,
      ngx_http_token_meter_variable, NGX_HTTP_TOKEN_METER_VAR_OUTPUT,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("token_meter_points"), NULL,
      ngx_http_token_meter_variable, NGX_HTTP_TOKEN_METER_VAR_POINTS,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("token_meter_balance"), NULL,
      ngx_http_token_meter_variable, NGX_HTTP_TOKEN_METER_VAR_BALANCE,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("token_meter_usage_source"), NULL,
      ngx_http_token_meter_variable, NGX_HTTP_TOKEN_METER_VAR_SOURCE,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("token_meter_request_id"), NULL,
      ngx_http_token_meter_variable, NGX_HTTP_TOKEN_METER_VAR_REQUEST_ID,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

      ngx_http_null_variable
};


ngx_int_t
ngx_http_token_meter_add_variables(ngx_conf_t *cf)
{
    ngx_http_variable_t  *var, *v;

    for (v = ngx_http_token_meter_vars; v->name.len; v++) {
        var = ngx_http_add_variable(cf, &v->name, v->flags);
        if (var == NULL) {
            return NGX_ERROR;
        }

        var->get_handler = v->get_handler;
        var->data = v->data;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_token_meter_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    u_char                      *p;
    int64_t                      n;
    ngx_str_t                    s;
    ngx_http_token_meter_ctx_t  *ctx;

    ctx = ngx_http_token_meter_get_ctx(r->main);

    /* a refused request may know its subscriber but not its model */

    if (ctx == NULL || ctx->subscriber == 0
        || (ctx->model == NULL && data != NGX_HTTP_TOKEN_METER_VAR_SUBSCRIBER
            && data != NGX_HTTP_TOKEN_METER_VAR_MSISDN))
    {
        v->not_found = 1;
        return NGX_OK;
    }

    s.len = 0;
    n = -1;

    switch (data) {

    case NGX_HTTP_TOKEN_METER_VAR_UPSTREAM:
        s = ctx->model->upstream;
        break;

    case NGX_HTTP_TOKEN_METER_VAR_SUBSCRIBER:
        p = ngx_pnalloc(r->pool, sizeof("sub_") - 1 + NGX_INT64_LEN);
        if (p == NULL) {
            return NGX_ERROR;
        }

        s.data = p;
        s.len = ngx_sprintf(p, "sub_%uL", ctx->subscriber) - p;
        break;

    case NGX_HTTP_TOKEN_METER_VAR_MSISDN:
        s = ctx->msisdn;
        break;

    case NGX_HTTP_TOKEN_METER_VAR_MODEL:
        s = ctx->model->name;
        break;

    case NGX_HTTP_TOKEN_METER_VAR_SOURCE:
        if (ctx->source == NGX_HTTP_TOKEN_METER_SOURCE_UPSTREAM) {
            ngx_str_set(&s, "upstream");

        } else if (ctx->source == NGX_HTTP_TOKEN_METER_SOURCE_ESTIMATED) {
            ngx_str_set(&s, "estimated");
        }

        break;

    case NGX_HTTP_TOKEN_METER_VAR_REQUEST_ID:
        p = ngx_pnalloc(r->pool, 32);
        if (p == NULL) {
            return NGX_ERROR;
        }

        s.data = p;
        s.len = ngx_hex_dump(p, ctx->request_id, 16) - p;
        break;

    case NGX_HTTP_TOKEN_METER_VAR_BALANCE:
        n = ctx->balance;
        break;

    default:

        /* token counts and points are known once the request is settled */

        if (!ctx->settled) {
            break;
        }

        n = (data == NGX_HTTP_TOKEN_METER_VAR_INPUT) ? ctx->usage.input
            : (data == NGX_HTTP_TOKEN_METER_VAR_CACHED) ? ctx->usage.cached
            : (data == NGX_HTTP_TOKEN_METER_VAR_OUTPUT) ? ctx->usage.output
            : ctx->points;
    }

    if (n >= 0) {
        p = ngx_pnalloc(r->pool, NGX_INT64_LEN);
        if (p == NULL) {
            return NGX_ERROR;
        }

        s.data = p;
        s.len = ngx_sprintf(p, "%L", n) - p;
    }

    if (s.len == 0) {
        v->not_found = 1;
        return NGX_OK;
    }

    v->data = s.data;
    v->len = s.len;
    v->valid = 1;
    v->no_cacheable = 1;
    v->not_found = 0;

    return NGX_OK;
}
