
/*
 * Copyright (C) The ngx_http_token_meter_module authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include <jansson.h>
#include <openssl/crypto.h>

#include "ngx_http_token_meter_module.h"
#include "ngx_http_token_meter_account.h"
#include "ngx_http_token_meter_json.h"


#define NGX_HTTP_TOKEN_METER_MAX_REFERENCE  128
#define NGX_HTTP_TOKEN_METER_MAX_SEGMENTS   4

#define NGX_HTTP_TOKEN_METER_WRITE          1
#define NGX_HTTP_TOKEN_METER_OPEN_ONLY      3


typedef enum {
    NGX_HTTP_TOKEN_METER_ROUTE_SUBSCRIBERS = 0,
    NGX_HTTP_TOKEN_METER_ROUTE_SUBSCRIBER,
    NGX_HTTP_TOKEN_METER_ROUTE_KEYS,
    NGX_HTTP_TOKEN_METER_ROUTE_KEY,
    NGX_HTTP_TOKEN_METER_ROUTE_PURCHASES,
    NGX_HTTP_TOKEN_METER_ROUTE_USAGE,
    NGX_HTTP_TOKEN_METER_ROUTE_BILLING
} ngx_http_token_meter_route_e;


typedef struct {
    ngx_uint_t                  route;
    ngx_str_t                   segment[NGX_HTTP_TOKEN_METER_MAX_SEGMENTS];
    uint64_t                    id;
    json_t                     *body;
    ngx_int_t                   rc;
} ngx_http_token_meter_admin_ctx_t;


typedef ngx_int_t (*ngx_http_token_meter_admin_pt)(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx);


typedef struct {
    ngx_uint_t                  segments;
    char                       *name[NGX_HTTP_TOKEN_METER_MAX_SEGMENTS];
    char                       *allow;
} ngx_http_token_meter_route_t;


static ngx_int_t ngx_http_token_meter_admin_fail(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx, ngx_uint_t status,
    const char *code, const char *fmt, ...);
static ngx_int_t ngx_http_token_meter_admin_auth(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx);
static ngx_int_t ngx_http_token_meter_admin_route(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx);
static void ngx_http_token_meter_admin_body(ngx_http_request_t *r);
static ngx_int_t ngx_http_token_meter_admin_run(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx);
static ngx_int_t ngx_http_token_meter_admin_open(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx, ngx_uint_t flags,
    ngx_http_token_meter_txn_t **txnp,
    ngx_http_token_meter_subscriber_t *sub);
static ngx_int_t ngx_http_token_meter_admin_commit(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx, ngx_http_token_meter_txn_t *txn,
    ngx_int_t rc, json_t *json);
static ngx_int_t ngx_http_token_meter_admin_405(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx, char *allow);

static ngx_int_t ngx_http_token_meter_admin_create(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx);
static ngx_int_t ngx_http_token_meter_admin_lookup(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx);
static ngx_int_t ngx_http_token_meter_admin_get(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx);
static ngx_int_t ngx_http_token_meter_admin_patch(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx);
static ngx_int_t ngx_http_token_meter_admin_delete(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx);
static ngx_int_t ngx_http_token_meter_admin_key_create(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx);
static ngx_int_t ngx_http_token_meter_admin_key_revoke(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx);
static ngx_int_t ngx_http_token_meter_admin_purchase(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx);
static ngx_int_t ngx_http_token_meter_admin_usage(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx);
static ngx_int_t ngx_http_token_meter_admin_billing(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx);

static ngx_int_t ngx_http_token_meter_admin_subscriber(ngx_http_request_t *r,
    ngx_http_token_meter_txn_t *txn, ngx_http_token_meter_admin_ctx_t *ctx,
    ngx_http_token_meter_subscriber_t *sub);
static ngx_int_t ngx_http_token_meter_admin_import_key(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx, ngx_str_t *key);
static json_t *ngx_http_token_meter_subscriber_json(
    ngx_http_token_meter_txn_t *txn, ngx_http_token_meter_subscriber_t *sub,
    time_t now);
static json_t *ngx_http_token_meter_id_json(uint64_t id);


static ngx_http_token_meter_route_t  ngx_http_token_meter_routes[] = {
    { 1, { "subscribers", NULL, NULL, NULL }, "GET, POST" },
    { 2, { "subscribers", "", NULL, NULL }, "GET, PATCH, DELETE" },
    { 3, { "subscribers", "", "keys", NULL }, "POST" },
    { 4, { "subscribers", "", "keys", "" }, "DELETE" },
    { 3, { "subscribers", "", "purchases", NULL }, "POST" },
    { 3, { "subscribers", "", "usage", NULL }, "GET" },
    { 2, { "billing", "", NULL, NULL }, "GET" },
    { 0, { NULL, NULL, NULL, NULL }, NULL }
};


static char  *ngx_http_token_meter_status_names[] = {
    "", "active", "suspended", "closed"
};


ngx_int_t
ngx_http_token_meter_admin_handler(ngx_http_request_t *r)
{
    ngx_int_t                          rc;
    ngx_http_core_loc_conf_t          *clcf;
    ngx_http_token_meter_ctx_t        *rctx;
    ngx_http_token_meter_admin_ctx_t  *ctx;

    /* what this worker settled so far is written before it is read */

    ngx_http_token_meter_flush();

    rctx = ngx_pcalloc(r->pool, sizeof(ngx_http_token_meter_ctx_t));
    if (rctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx = ngx_pcalloc(r->pool, sizeof(ngx_http_token_meter_admin_ctx_t));
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rctx->admin = ctx;

    ngx_http_set_ctx(r, rctx, ngx_http_token_meter_module);

    if (ngx_http_token_meter_admin_auth(r, ctx) != NGX_OK
        || ngx_http_token_meter_admin_route(r, ctx) != NGX_OK)
    {
        return ctx->rc;
    }

    if (r->method != NGX_HTTP_POST && r->method != NGX_HTTP_PATCH) {
        rc = ngx_http_discard_request_body(r);
        if (rc != NGX_OK) {
            return rc;
        }

        return ngx_http_token_meter_admin_run(r, ctx);
    }

    clcf = ngx_http_get_module_loc_conf(r, ngx_http_core_module);

    if (r->headers_in.content_length_n > (off_t) clcf->client_body_buffer_size)
    {
        (void) ngx_http_token_meter_admin_fail(r, ctx,
                                       NGX_HTTP_REQUEST_ENTITY_TOO_LARGE,
                                       "body_too_large",
                                       "request body is larger than %uz bytes",
                                       clcf->client_body_buffer_size);
        return ctx->rc;
    }

    r->request_body_in_single_buf = 1;

    rc = ngx_http_read_client_request_body(r,
                                           ngx_http_token_meter_admin_body);

    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        return rc;
    }

    return NGX_DONE;
}


/*
 * Sends an error and keeps what sending returned for the content handler:
 * the steps below answer NGX_DECLINED when they have responded already.
 */

static ngx_int_t
ngx_http_token_meter_admin_fail(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx, ngx_uint_t status,
    const char *code, const char *fmt, ...)
{
    va_list    args;
    ngx_int_t  rc;

    /* an unread body must not be taken for the next request */

    if (r->request_body == NULL) {
        rc = ngx_http_discard_request_body(r);

        if (rc != NGX_OK) {
            ctx->rc = rc;
            return NGX_DECLINED;
        }
    }

    va_start(args, fmt);
    ctx->rc = ngx_http_token_meter_send_verror(r, status,
                                               "invalid_request_error", code,
                                               fmt, args);
    va_end(args);

    return NGX_DECLINED;
}


static ngx_int_t
ngx_http_token_meter_admin_auth(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx)
{
    u_char                            hash[32];
    ngx_str_t                         key;
    ngx_table_elt_t                  *h;
    ngx_http_token_meter_loc_conf_t  *tmlcf;

    tmlcf = ngx_http_get_module_loc_conf(r, ngx_http_token_meter_module);

    if (ngx_http_token_meter_bearer(r->headers_in.authorization, &key)
        != NGX_OK)
    {
        goto denied;
    }

    ngx_http_token_meter_sha256(key.data, key.len, hash);

    if (CRYPTO_memcmp(hash, tmlcf->admin_key.data, 32) == 0) {
        return NGX_OK;
    }

denied:

    ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                  "token meter admin: missing or wrong admin key");

    h = ngx_list_push(&r->headers_out.headers);
    if (h != NULL) {
        h->hash = 1;
        ngx_str_set(&h->key, "WWW-Authenticate");
        ngx_str_set(&h->value, "Bearer");
        r->headers_out.www_authenticate = h;
    }

    return ngx_http_token_meter_admin_fail(r, ctx, NGX_HTTP_UNAUTHORIZED,
                                           "invalid_admin_key",
                                           "missing or wrong admin key");
}


static ngx_int_t
ngx_http_token_meter_admin_route(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx)
{
    u_char                        *p, *last, *start;
    ngx_str_t                      id;
    ngx_uint_t                     n, i, j;
    ngx_http_core_loc_conf_t      *clcf;
    ngx_http_token_meter_route_t  *route;

    clcf = ngx_http_get_module_loc_conf(r, ngx_http_core_module);

    p = r->uri.data;
    last = r->uri.data + r->uri.len;

    if (r->uri.len >= clcf->name.len
        && ngx_strncmp(p, clcf->name.data, clcf->name.len) == 0)
    {
        p += clcf->name.len;
    }

    n = 0;

    while (p < last) {

        if (*p == '/') {
            p++;
            continue;
        }

        if (n == NGX_HTTP_TOKEN_METER_MAX_SEGMENTS) {
            goto not_found;
        }

        start = p;

        while (p < last && *p != '/') {
            p++;
        }

        ctx->segment[n].data = start;
        ctx->segment[n].len = p - start;
        n++;
    }

    for (i = 0; ngx_http_token_meter_routes[i].segments; i++) {
        route = &ngx_http_token_meter_routes[i];

        if (route->segments != n) {
            continue;
        }

        for (j = 0; j < n; j++) {
            if (route->name[j][0] == '\0') {
                continue;
            }

            if (ctx->segment[j].len != ngx_strlen(route->name[j])
                || ngx_strncmp(ctx->segment[j].data, route->name[j],
                               ctx->segment[j].len)
                   != 0)
            {
                break;
            }
        }

        if (j == n) {
            break;
        }
    }

    route = &ngx_http_token_meter_routes[i];

    if (route->segments == 0) {
        goto not_found;
    }

    ctx->route = i;

    switch (i) {

    case NGX_HTTP_TOKEN_METER_ROUTE_SUBSCRIBERS:
        if (r->method != NGX_HTTP_GET && r->method != NGX_HTTP_POST) {
            return ngx_http_token_meter_admin_405(r, ctx, route->allow);
        }
        break;

    case NGX_HTTP_TOKEN_METER_ROUTE_SUBSCRIBER:
        if (r->method != NGX_HTTP_GET && r->method != NGX_HTTP_PATCH
            && r->method != NGX_HTTP_DELETE)
        {
            return ngx_http_token_meter_admin_405(r, ctx, route->allow);
        }
        break;

    case NGX_HTTP_TOKEN_METER_ROUTE_KEY:
        if (r->method != NGX_HTTP_DELETE) {
            return ngx_http_token_meter_admin_405(r, ctx, route->allow);
        }
        break;

    case NGX_HTTP_TOKEN_METER_ROUTE_USAGE:
    case NGX_HTTP_TOKEN_METER_ROUTE_BILLING:
        if (r->method != NGX_HTTP_GET) {
            return ngx_http_token_meter_admin_405(r, ctx, route->allow);
        }
        break;

    default: /* KEYS, PURCHASES */
        if (r->method != NGX_HTTP_POST) {
            return ngx_http_token_meter_admin_405(r, ctx, route->allow);
        }
    }

    if (n < 2 || i == NGX_HTTP_TOKEN_METER_ROUTE_BILLING) {
        return NGX_OK;
    }

    /* subscriber ids look like "sub_42" */

    id = ctx->segment[1];

    if (id.len > 4 && ngx_strncmp(id.data, "sub_", 4) == 0
        && id.data[4] != '0')
    {
        ctx->id = 0;

        for (p = id.data + 4; p < id.data + id.len; p++) {
            if (*p < '0' || *p > '9' || ctx->id > 100000000000000ULL) {
                ctx->id = 0;
                break;
            }

            ctx->id = ctx->id * 10 + (*p - '0');
        }

        if (ctx->id) {
            return NGX_OK;
        }
    }

    return ngx_http_token_meter_admin_fail(r, ctx, NGX_HTTP_NOT_FOUND,
                                           "subscriber_not_found",
                                           "no subscriber \"%V\"", &id);

not_found:

    return ngx_http_token_meter_admin_fail(r, ctx, NGX_HTTP_NOT_FOUND,
                                           "not_found",
                                           "no admin route for \"%V\"",
                                           &r->uri);
}


static ngx_int_t
ngx_http_token_meter_admin_405(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx, char *allow)
{
    if (ngx_http_token_meter_allow(r, allow) != NGX_OK) {
        ctx->rc = NGX_HTTP_INTERNAL_SERVER_ERROR;
        return NGX_DECLINED;
    }

    return ngx_http_token_meter_admin_fail(r, ctx, NGX_HTTP_NOT_ALLOWED,
                                           "method_not_allowed",
                                           "method %V is not allowed here",
                                           &r->method_name);
}


static void
ngx_http_token_meter_admin_body(ngx_http_request_t *r)
{
    size_t                             len;
    u_char                            *p;
    json_t                            *json;
    ngx_buf_t                         *b;
    ngx_int_t                          rc;
    ngx_chain_t                       *cl;
    json_error_t                       error;
    ngx_http_core_loc_conf_t          *clcf;
    ngx_http_token_meter_ctx_t        *rctx;
    ngx_http_token_meter_admin_ctx_t  *ctx;

    rctx = ngx_http_get_module_ctx(r, ngx_http_token_meter_module);
    ctx = rctx->admin;

    clcf = ngx_http_get_module_loc_conf(r, ngx_http_core_module);

    len = 0;

    if (r->request_body) {
        for (cl = r->request_body->bufs; cl; cl = cl->next) {
            len += ngx_buf_size(cl->buf);
        }
    }

    if (r->request_body == NULL || r->request_body->temp_file
        || len > clcf->client_body_buffer_size)
    {
        rc = ngx_http_token_meter_send_error(r,
                   NGX_HTTP_REQUEST_ENTITY_TOO_LARGE, "invalid_request_error",
                   "body_too_large",
                   "request body is larger than %uz bytes",
                   clcf->client_body_buffer_size);
        ngx_http_finalize_request(r, rc);
        return;
    }

    if (len == 0) {
        ctx->body = json_object();

    } else {
        p = ngx_pnalloc(r->pool, len);
        if (p == NULL) {
            ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
            return;
        }

        len = 0;

        for (cl = r->request_body->bufs; cl; cl = cl->next) {
            b = cl->buf;
            ngx_memcpy(p + len, b->pos, b->last - b->pos);
            len += b->last - b->pos;
        }

        json = json_loadb((char *) p, len, JSON_REJECT_DUPLICATES, &error);

        if (json == NULL || !json_is_object(json)) {
            if (json) {
                json_decref(json);
            }

            rc = ngx_http_token_meter_send_error(r, NGX_HTTP_BAD_REQUEST,
                                                 "invalid_request_error",
                                                 "invalid_json",
                                                 "request body is not "
                                                 "a JSON object");
            ngx_http_finalize_request(r, rc);
            return;
        }

        ctx->body = json;
    }

    rc = ngx_http_token_meter_admin_run(r, ctx);

    ngx_http_finalize_request(r, rc);
}


static ngx_int_t
ngx_http_token_meter_admin_run(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx)
{
    ngx_int_t                      rc;
    ngx_http_token_meter_admin_pt  handler;

    switch (ctx->route) {

    case NGX_HTTP_TOKEN_METER_ROUTE_SUBSCRIBERS:
        handler = (r->method == NGX_HTTP_POST)
                  ? ngx_http_token_meter_admin_create
                  : ngx_http_token_meter_admin_lookup;
        break;

    case NGX_HTTP_TOKEN_METER_ROUTE_SUBSCRIBER:
        handler = (r->method == NGX_HTTP_GET)
                  ? ngx_http_token_meter_admin_get
                  : (r->method == NGX_HTTP_PATCH)
                    ? ngx_http_token_meter_admin_patch
                    : ngx_http_token_meter_admin_delete;
        break;

    case NGX_HTTP_TOKEN_METER_ROUTE_KEYS:
        handler = ngx_http_token_meter_admin_key_create;
        break;

    case NGX_HTTP_TOKEN_METER_ROUTE_KEY:
        handler = ngx_http_token_meter_admin_key_revoke;
        break;

    case NGX_HTTP_TOKEN_METER_ROUTE_USAGE:
        handler = ngx_http_token_meter_admin_usage;
        break;

    case NGX_HTTP_TOKEN_METER_ROUTE_BILLING:
        handler = ngx_http_token_meter_admin_billing;
        break;

    default: /* NGX_HTTP_TOKEN_METER_ROUTE_PURCHASES */
        handler = ngx_http_token_meter_admin_purchase;
    }

    rc = handler(r, ctx);

    if (ctx->body) {
        json_decref(ctx->body);
        ctx->body = NULL;
    }

    return rc;
}


static ngx_int_t
ngx_http_token_meter_admin_create(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx)
{
    json_t                             *json, *value;
    time_t                              now;
    u_char                              key_id[NGX_HTTP_TOKEN_METER_KEY_ID_LEN];
    u_char                              buf[NGX_HTTP_TOKEN_METER_KEY_LEN];
    ngx_int_t                           rc;
    ngx_str_t                           msisdn, key, id;
    ngx_http_token_meter_txn_t         *txn;
    ngx_http_token_meter_main_conf_t   *tmcf;
    ngx_http_token_meter_subscriber_t   sub;

    tmcf = ngx_http_get_module_main_conf(r, ngx_http_token_meter_module);

    value = json_object_get(ctx->body, "msisdn");

    if (!json_is_string(value)) {
        return ngx_http_token_meter_send_error(r, NGX_HTTP_BAD_REQUEST,
                                               "invalid_request_error",
                                               "invalid_msisdn",
                                               "\"msisdn\" is required");
    }

    msisdn.data = (u_char *) json_string_value(value);
    msisdn.len = json_string_length(value);

    if (ngx_http_token_meter_msisdn_valid(&msisdn) != NGX_OK) {
        return ngx_http_token_meter_send_error(r, NGX_HTTP_BAD_REQUEST,
                   "invalid_request_error", "invalid_msisdn",
                   "\"msisdn\" must be in E.164 form, like \"+8613800138000\"");
    }

    key.data = buf;
    key.len = 0;

    if (ngx_http_token_meter_admin_import_key(r, ctx, &key) != NGX_OK) {
        return ctx->rc;
    }

    now = ngx_time();

    rc = ngx_http_token_meter_txn_begin(tmcf->store, &txn, 1,
                                        r->connection->log);
    if (rc != NGX_OK) {
        return ngx_http_token_meter_store_error(r, rc);
    }

    rc = ngx_http_token_meter_subscriber_create(txn, tmcf, &msisdn, now, &sub);

    if (rc == NGX_BUSY) {
        ngx_http_token_meter_txn_abort(txn);
        return ngx_http_token_meter_send_error(r, NGX_HTTP_CONFLICT,
                                               "invalid_request_error",
                                               "msisdn_exists",
                                               "\"%V\" already has a "
                                               "subscriber", &msisdn);
    }

    if (rc == NGX_OK) {
        rc = ngx_http_token_meter_key_create(txn, sub.id, &key, now, key_id);

        if (rc == NGX_BUSY) {
            ngx_http_token_meter_txn_abort(txn);
            return ngx_http_token_meter_send_error(r, NGX_HTTP_CONFLICT,
                                                   "invalid_request_error",
                                                   "key_exists",
                                                   "this API key is in use or "
                                                   "was revoked");
        }
    }

    json = NULL;

    if (rc == NGX_OK) {
        json = ngx_http_token_meter_subscriber_json(txn, &sub, now);
        rc = (json == NULL) ? NGX_ERROR : NGX_OK;
    }

    if (ngx_http_token_meter_admin_commit(r, ctx, txn, rc, json) != NGX_OK) {
        return ctx->rc;
    }

    id.data = key_id;
    id.len = NGX_HTTP_TOKEN_METER_KEY_ID_LEN;

    ngx_http_token_meter_json_set(json, "api_key",
                                  ngx_http_token_meter_json_string(&key));
    ngx_http_token_meter_json_set(json, "key_id",
                                  ngx_http_token_meter_json_string(&id));

    ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                  "token meter admin: created subscriber sub_%uL for \"%V\"",
                  sub.id, &msisdn);

    rc = ngx_http_token_meter_send_json(r, NGX_HTTP_CREATED, json);

    json_decref(json);

    return rc;
}


static ngx_int_t
ngx_http_token_meter_admin_lookup(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx)
{
    u_char      *dst, *src;
    ngx_str_t    arg, msisdn;

    if (ngx_http_arg(r, (u_char *) "msisdn", 6, &arg) != NGX_OK) {
        return ngx_http_token_meter_send_error(r, NGX_HTTP_BAD_REQUEST,
                                               "invalid_request_error",
                                               "invalid_msisdn",
                                               "the \"msisdn\" query "
                                               "parameter is required");
    }

    /* "+" must arrive as %2B; a literal "+" in a query means a space */

    msisdn.data = ngx_pnalloc(r->pool, arg.len);
    if (msisdn.data == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    dst = msisdn.data;
    src = arg.data;

    ngx_unescape_uri(&dst, &src, arg.len, NGX_UNESCAPE_URI);

    msisdn.len = dst - msisdn.data;

    if (msisdn.len && msisdn.data[0] == ' ') {
        msisdn.data[0] = '+';
    }

    if (ngx_http_token_meter_msisdn_valid(&msisdn) != NGX_OK) {
        return ngx_http_token_meter_send_error(r, NGX_HTTP_BAD_REQUEST,
                   "invalid_request_error", "invalid_msisdn",
                   "\"msisdn\" must be in E.164 form, like \"+8613800138000\"");
    }

    ctx->id = 0;
    ctx->segment[0] = msisdn;

    return ngx_http_token_meter_admin_get(r, ctx);
}


static ngx_int_t
ngx_http_token_meter_admin_get(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx)
{
    json_t                             *json;
    ngx_int_t                           rc;
    ngx_http_token_meter_txn_t         *txn;
    ngx_http_token_meter_main_conf_t   *tmcf;
    ngx_http_token_meter_subscriber_t   sub;

    tmcf = ngx_http_get_module_main_conf(r, ngx_http_token_meter_module);

    rc = ngx_http_token_meter_txn_begin(tmcf->store, &txn, 0,
                                        r->connection->log);
    if (rc != NGX_OK) {
        return ngx_http_token_meter_store_error(r, rc);
    }

    if (ctx->id == 0) {
        rc = ngx_http_token_meter_subscriber_find(txn, &ctx->segment[0],
                                                  &ctx->id);
        if (rc == NGX_DECLINED) {
            ngx_http_token_meter_txn_abort(txn);
            return ngx_http_token_meter_send_error(r, NGX_HTTP_NOT_FOUND,
                                                   "invalid_request_error",
                                                   "subscriber_not_found",
                                                   "no subscriber for \"%V\"",
                                                   &ctx->segment[0]);
        }

        if (rc != NGX_OK) {
            ngx_http_token_meter_txn_abort(txn);
            return ngx_http_token_meter_store_error(r, rc);
        }
    }

    if (ngx_http_token_meter_admin_subscriber(r, txn, ctx, &sub) != NGX_OK) {
        ngx_http_token_meter_txn_abort(txn);
        return ctx->rc;
    }

    json = ngx_http_token_meter_subscriber_json(txn, &sub, ngx_time());

    ngx_http_token_meter_txn_abort(txn);

    if (json == NULL) {
        return ngx_http_token_meter_store_error(r, NGX_ERROR);
    }

    rc = ngx_http_token_meter_send_json(r, NGX_HTTP_OK, json);

    json_decref(json);

    return rc;
}


static ngx_int_t
ngx_http_token_meter_admin_patch(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx)
{
    json_t                             *json, *value;
    const char                         *status;
    ngx_int_t                           rc;
    ngx_uint_t                          code;
    ngx_http_token_meter_txn_t         *txn;
    ngx_http_token_meter_subscriber_t   sub;

    value = json_object_get(ctx->body, "status");
    status = json_string_value(value);

    if (status != NULL && ngx_strcmp(status, "active") == 0) {
        code = NGX_HTTP_TOKEN_METER_ACTIVE;

    } else if (status != NULL && ngx_strcmp(status, "suspended") == 0) {
        code = NGX_HTTP_TOKEN_METER_SUSPENDED;

    } else {
        return ngx_http_token_meter_send_error(r, NGX_HTTP_BAD_REQUEST,
                                               "invalid_request_error",
                                               "invalid_status",
                                               "\"status\" must be \"active\" "
                                               "or \"suspended\"");
    }

    if (ngx_http_token_meter_admin_open(r, ctx, NGX_HTTP_TOKEN_METER_OPEN_ONLY,
                                        &txn, &sub)
        != NGX_OK)
    {
        return ctx->rc;
    }

    sub.status = code;

    rc = ngx_http_token_meter_subscriber_put(txn, &sub);

    json = NULL;

    if (rc == NGX_OK) {
        json = ngx_http_token_meter_subscriber_json(txn, &sub, ngx_time());
        rc = (json == NULL) ? NGX_ERROR : NGX_OK;
    }

    if (ngx_http_token_meter_admin_commit(r, ctx, txn, rc, json) != NGX_OK) {
        return ctx->rc;
    }

    ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                  "token meter admin: subscriber sub_%uL is now %s",
                  sub.id, status);

    rc = ngx_http_token_meter_send_json(r, NGX_HTTP_OK, json);

    json_decref(json);

    return rc;
}


static ngx_int_t
ngx_http_token_meter_admin_delete(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx)
{
    json_t                             *json;
    time_t                              now;
    ngx_int_t                           rc;
    ngx_http_token_meter_txn_t         *txn;
    ngx_http_token_meter_subscriber_t   sub;

    now = ngx_time();

    if (ngx_http_token_meter_admin_open(r, ctx, NGX_HTTP_TOKEN_METER_WRITE,
                                        &txn, &sub)
        != NGX_OK)
    {
        return ctx->rc;
    }

    rc = NGX_OK;

    if (sub.status != NGX_HTTP_TOKEN_METER_CLOSED) {
        rc = ngx_http_token_meter_subscriber_close(txn, &sub, now);
    }

    json = NULL;

    if (rc == NGX_OK) {
        json = ngx_http_token_meter_subscriber_json(txn, &sub, now);
        rc = (json == NULL) ? NGX_ERROR : NGX_OK;
    }

    if (ngx_http_token_meter_admin_commit(r, ctx, txn, rc, json) != NGX_OK) {
        return ctx->rc;
    }

    ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                  "token meter admin: closed subscriber sub_%uL", sub.id);

    rc = ngx_http_token_meter_send_json(r, NGX_HTTP_OK, json);

    json_decref(json);

    return rc;
}


static ngx_int_t
ngx_http_token_meter_admin_key_create(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx)
{
    json_t                             *json;
    time_t                              now;
    u_char                              key_id[NGX_HTTP_TOKEN_METER_KEY_ID_LEN];
    u_char                              buf[NGX_HTTP_TOKEN_METER_KEY_LEN];
    ngx_int_t                           rc;
    ngx_str_t                           key, id;
    ngx_http_token_meter_txn_t         *txn;
    ngx_http_token_meter_subscriber_t   sub;

    key.data = buf;
    key.len = 0;

    if (ngx_http_token_meter_admin_import_key(r, ctx, &key) != NGX_OK) {
        return ctx->rc;
    }

    now = ngx_time();

    if (ngx_http_token_meter_admin_open(r, ctx, NGX_HTTP_TOKEN_METER_OPEN_ONLY,
                                        &txn, &sub)
        != NGX_OK)
    {
        return ctx->rc;
    }

    rc = ngx_http_token_meter_key_create(txn, sub.id, &key, now, key_id);

    if (rc == NGX_BUSY) {
        ngx_http_token_meter_txn_abort(txn);
        return ngx_http_token_meter_send_error(r, NGX_HTTP_CONFLICT,
                                               "invalid_request_error",
                                               "key_exists",
                                               "this API key is in use or "
                                               "was revoked");
    }

    if (ngx_http_token_meter_admin_commit(r, ctx, txn, rc, NULL) != NGX_OK) {
        return ctx->rc;
    }

    id.data = key_id;
    id.len = NGX_HTTP_TOKEN_METER_KEY_ID_LEN;

    json = json_object();

    ngx_http_token_meter_json_set(json, "subscriber",
                                  ngx_http_token_meter_id_json(sub.id));
    ngx_http_token_meter_json_set(json, "key_id",
                                  ngx_http_token_meter_json_string(&id));
    ngx_http_token_meter_json_set(json, "api_key",
                                  ngx_http_token_meter_json_string(&key));
    ngx_http_token_meter_json_set(json, "created_at",
                                  ngx_http_token_meter_json_time(now));

    if (json == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                  "token meter admin: issued key %V to sub_%uL", &id, sub.id);

    rc = ngx_http_token_meter_send_json(r, NGX_HTTP_CREATED, json);

    json_decref(json);

    return rc;
}


static ngx_int_t
ngx_http_token_meter_admin_key_revoke(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx)
{
    json_t                             *json;
    int64_t                             revoked;
    ngx_int_t                           rc;
    ngx_http_token_meter_txn_t         *txn;
    ngx_http_token_meter_subscriber_t   sub;

    if (ngx_http_token_meter_admin_open(r, ctx, NGX_HTTP_TOKEN_METER_WRITE,
                                        &txn, &sub)
        != NGX_OK)
    {
        return ctx->rc;
    }

    rc = ngx_http_token_meter_key_revoke(txn, sub.id, &ctx->segment[3],
                                         ngx_time(), &revoked);

    if (rc == NGX_DECLINED) {
        ngx_http_token_meter_txn_abort(txn);
        return ngx_http_token_meter_send_error(r, NGX_HTTP_NOT_FOUND,
                                               "invalid_request_error",
                                               "key_not_found",
                                               "subscriber sub_%uL has no "
                                               "key \"%V\"", sub.id,
                                               &ctx->segment[3]);
    }

    if (ngx_http_token_meter_admin_commit(r, ctx, txn, rc, NULL) != NGX_OK) {
        return ctx->rc;
    }

    json = json_object();

    ngx_http_token_meter_json_set(json, "subscriber",
                                  ngx_http_token_meter_id_json(sub.id));
    ngx_http_token_meter_json_set(json, "key_id",
                            ngx_http_token_meter_json_string(&ctx->segment[3]));
    ngx_http_token_meter_json_set(json, "revoked_at",
                            ngx_http_token_meter_json_time((time_t) revoked));

    if (json == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                  "token meter admin: revoked key %V of sub_%uL",
                  &ctx->segment[3], sub.id);

    rc = ngx_http_token_meter_send_json(r, NGX_HTTP_OK, json);

    json_decref(json);

    return rc;
}


static ngx_int_t
ngx_http_token_meter_admin_purchase(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx)
{
    char                               *text;
    json_t                             *json, *value, *yuan, *points;
    time_t                              now;
    int64_t                             fen, amount;
    ngx_int_t                           rc;
    ngx_str_t                           reference, s, result;
    ngx_uint_t                          i;
    ngx_http_token_meter_txn_t         *txn;
    ngx_http_token_meter_purchase_t     purchase, old;
    ngx_http_token_meter_main_conf_t   *tmcf;
    ngx_http_token_meter_subscriber_t   sub;

    tmcf = ngx_http_get_module_main_conf(r, ngx_http_token_meter_module);

    value = json_object_get(ctx->body, "reference");

    reference.data = (u_char *) json_string_value(value);
    reference.len = reference.data ? json_string_length(value) : 0;

    for (i = 0; i < reference.len; i++) {
        if (reference.data[i] <= 0x20 || reference.data[i] >= 0x7f) {
            break;
        }
    }

    if (reference.len == 0
        || reference.len > NGX_HTTP_TOKEN_METER_MAX_REFERENCE
        || i != reference.len)
    {
        return ngx_http_token_meter_send_error(r, NGX_HTTP_BAD_REQUEST,
                   "invalid_request_error", "invalid_reference",
                   "\"reference\" must be 1 to 128 printable ASCII "
                   "characters without spaces");
    }

    yuan = json_object_get(ctx->body, "yuan");
    points = json_object_get(ctx->body, "points");

    fen = -1;
    amount = 0;

    if (yuan && !points && json_is_string(yuan)) {

        /* "10.00": whole yuan and exactly two decimals */

        s.data = (u_char *) json_string_value(yuan);
        s.len = json_string_length(yuan);

        if (s.len < 4 || s.data[s.len - 3] != '.'
            || ngx_http_token_meter_parse_points(&s, 100, &fen) != NGX_OK
            || fen <= 0 || fen > 1000000000000LL)
        {
            fen = 0;
        }

        amount = fen * tmcf->points_per_yuan / 100;

        if (fen == 0 || amount <= 0
            || (fen * tmcf->points_per_yuan) % 100 != 0)
        {
            return ngx_http_token_meter_send_error(r, NGX_HTTP_BAD_REQUEST,
                       "invalid_request_error", "invalid_amount",
                       "\"yuan\" must be a positive amount with two "
                       "decimals, like \"10.00\"");
        }

    } else if (points && !yuan && json_is_integer(points)) {
        amount = json_integer_value(points);

        if (amount <= 0 || amount > NGX_HTTP_TOKEN_METER_MAX_POINTS) {
            return ngx_http_token_meter_send_error(r, NGX_HTTP_BAD_REQUEST,
                       "invalid_request_error", "invalid_amount",
                       "\"points\" must be a positive whole number");
        }

    } else {
        return ngx_http_token_meter_send_error(r, NGX_HTTP_BAD_REQUEST,
                   "invalid_request_error", "invalid_amount",
                   "give either \"yuan\" as a string like \"10.00\" "
                   "or \"points\" as a whole number");
    }

    now = ngx_time();

    if (ngx_http_token_meter_admin_open(r, ctx, NGX_HTTP_TOKEN_METER_WRITE,
                                        &txn, &sub)
        != NGX_OK)
    {
        return ctx->rc;
    }

    /*
     * A payment reference is credited once: the check and the credit are
     * in one write transaction, which LMDB runs one at a time across all
     * workers, so retries racing each other cannot both credit.
     */

    rc = ngx_http_token_meter_purchase_get(txn, &reference, &old, &result);

    if (rc == NGX_OK) {
        if (old.subscriber != sub.id || old.points != amount
            || old.fen != fen)
        {
            ngx_http_token_meter_txn_abort(txn);
            return ngx_http_token_meter_send_error(r, NGX_HTTP_CONFLICT,
                       "invalid_request_error", "reference_conflict",
                       "reference \"%V\" was used for a different purchase",
                       &reference);
        }

        json = json_loadb((char *) result.data, result.len, 0, NULL);

        ngx_http_token_meter_txn_abort(txn);

        if (json == NULL) {
            return ngx_http_token_meter_store_error(r, NGX_ERROR);
        }

        rc = ngx_http_token_meter_send_json(r, NGX_HTTP_OK, json);

        json_decref(json);

        return rc;
    }

    if (rc != NGX_DECLINED) {
        ngx_http_token_meter_txn_abort(txn);
        return ngx_http_token_meter_store_error(r, rc);
    }

    if (sub.status == NGX_HTTP_TOKEN_METER_CLOSED) {
        ngx_http_token_meter_txn_abort(txn);
        return ngx_http_token_meter_send_error(r, NGX_HTTP_CONFLICT,
                                               "invalid_request_error",
                                               "subscriber_closed",
                                               "subscriber sub_%uL is closed",
                                               sub.id);
    }

    if (sub.paid > NGX_HTTP_TOKEN_METER_MAX_POINTS - amount) {
        ngx_http_token_meter_txn_abort(txn);
        return ngx_http_token_meter_send_error(r, NGX_HTTP_BAD_REQUEST,
                   "invalid_request_error", "invalid_amount",
                   "the balance would exceed %L points",
                   NGX_HTTP_TOKEN_METER_MAX_POINTS);
    }

    sub.paid += amount;
    sub.purchased += amount;

    rc = ngx_http_token_meter_subscriber_put(txn, &sub);

    json = NULL;
    text = NULL;

    if (rc == NGX_OK) {
        json = json_object();

        ngx_http_token_meter_json_set(json, "reference",
                                 ngx_http_token_meter_json_string(&reference));
        ngx_http_token_meter_json_set(json, "subscriber",
                                      ngx_http_token_meter_id_json(sub.id));
        ngx_http_token_meter_json_set(json, "points", json_integer(amount));

        if (fen >= 0) {
            ngx_http_token_meter_json_set(json, "yuan", json_incref(yuan));

        } else {
            ngx_http_token_meter_json_set(json, "yuan", json_null());
        }

        ngx_http_token_meter_json_set(json, "created_at",
                                      ngx_http_token_meter_json_time(now));

        value = ngx_http_token_meter_subscriber_json(txn, &sub, now);

        if (value) {
            ngx_http_token_meter_json_set(json, "balance",
                                  json_incref(json_object_get(value,
                                                              "balance")));
            json_decref(value);
        }

        text = json ? json_dumps(json, JSON_COMPACT) : NULL;
        rc = (text == NULL || value == NULL) ? NGX_ERROR : NGX_OK;
    }

    if (rc == NGX_OK) {
        ngx_memzero(&purchase, sizeof(purchase));

        purchase.subscriber = sub.id;
        purchase.points = amount;
        purchase.fen = fen;
        purchase.created = now;
        ngx_memcpy(purchase.msisdn, sub.msisdn,
                   NGX_HTTP_TOKEN_METER_MSISDN_LEN);

        result.data = (u_char *) text;
        result.len = ngx_strlen(text);

        rc = ngx_http_token_meter_purchase_put(txn, &reference, &purchase,
                                               &result);
    }

    if (text) {
        free(text);
    }

    if (ngx_http_token_meter_admin_commit(r, ctx, txn, rc, json) != NGX_OK) {
        return ctx->rc;
    }

    ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                  "token meter admin: purchase \"%V\" credited %L points "
                  "to sub_%uL", &reference, amount, sub.id);

    rc = ngx_http_token_meter_send_json(r, NGX_HTTP_CREATED, json);

    json_decref(json);

    return rc;
}


static ngx_int_t
ngx_http_token_meter_admin_usage(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx)
{
    ngx_int_t                           rc;
    ngx_http_token_meter_txn_t         *txn;
    ngx_http_token_meter_main_conf_t   *tmcf;
    ngx_http_token_meter_subscriber_t   sub;

    tmcf = ngx_http_get_module_main_conf(r, ngx_http_token_meter_module);

    rc = ngx_http_token_meter_txn_begin(tmcf->store, &txn, 0,
                                        r->connection->log);
    if (rc != NGX_OK) {
        return ngx_http_token_meter_store_error(r, rc);
    }

    rc = ngx_http_token_meter_admin_subscriber(r, txn, ctx, &sub);

    if (rc != NGX_OK) {
        ngx_http_token_meter_txn_abort(txn);
        return ctx->rc;
    }

    rc = ngx_http_token_meter_usage_list(r, txn, sub.id);

    ngx_http_token_meter_txn_abort(txn);

    return rc;
}


static ngx_int_t
ngx_http_token_meter_admin_billing(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx)
{
    return ngx_http_token_meter_billing_export(r, &ctx->segment[1]);
}


/*
 * Starts a transaction and reads the subscriber the path names; with
 * NGX_HTTP_TOKEN_METER_OPEN_ONLY a closed account is refused with 409.
 */

static ngx_int_t
ngx_http_token_meter_admin_open(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx, ngx_uint_t flags,
    ngx_http_token_meter_txn_t **txnp, ngx_http_token_meter_subscriber_t *sub)
{
    ngx_int_t                          rc;
    ngx_http_token_meter_main_conf_t  *tmcf;

    tmcf = ngx_http_get_module_main_conf(r, ngx_http_token_meter_module);

    rc = ngx_http_token_meter_txn_begin(tmcf->store, txnp,
                                        flags & NGX_HTTP_TOKEN_METER_WRITE,
                                        r->connection->log);
    if (rc != NGX_OK) {
        ctx->rc = ngx_http_token_meter_store_error(r, rc);
        return NGX_DECLINED;
    }

    if (ngx_http_token_meter_admin_subscriber(r, *txnp, ctx, sub) != NGX_OK) {
        ngx_http_token_meter_txn_abort(*txnp);
        return NGX_DECLINED;
    }

    if ((flags & NGX_HTTP_TOKEN_METER_OPEN_ONLY)
        == NGX_HTTP_TOKEN_METER_OPEN_ONLY
        && sub->status == NGX_HTTP_TOKEN_METER_CLOSED)
    {
        ngx_http_token_meter_txn_abort(*txnp);

        return ngx_http_token_meter_admin_fail(r, ctx, NGX_HTTP_CONFLICT,
                                               "subscriber_closed",
                                               "subscriber sub_%uL is closed",
                                               sub->id);
    }

    return NGX_OK;
}


/* commits what a call changed, or undoes it; a failure answers 503 */

static ngx_int_t
ngx_http_token_meter_admin_commit(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx, ngx_http_token_meter_txn_t *txn,
    ngx_int_t rc, json_t *json)
{
    if (rc == NGX_OK) {
        rc = ngx_http_token_meter_txn_commit(txn);

    } else {
        ngx_http_token_meter_txn_abort(txn);
    }

    if (rc == NGX_OK) {
        return NGX_OK;
    }

    if (json) {
        json_decref(json);
    }

    ctx->rc = ngx_http_token_meter_store_error(r, rc);

    return NGX_DECLINED;
}


static ngx_int_t
ngx_http_token_meter_admin_subscriber(ngx_http_request_t *r,
    ngx_http_token_meter_txn_t *txn, ngx_http_token_meter_admin_ctx_t *ctx,
    ngx_http_token_meter_subscriber_t *sub)
{
    ngx_int_t  rc;

    rc = ngx_http_token_meter_subscriber_get(txn, ctx->id, sub);

    if (rc == NGX_DECLINED) {
        return ngx_http_token_meter_admin_fail(r, ctx, NGX_HTTP_NOT_FOUND,
                                               "subscriber_not_found",
                                               "no subscriber \"sub_%uL\"",
                                               ctx->id);
    }

    if (rc != NGX_OK) {
        ctx->rc = ngx_http_token_meter_store_error(r, rc);
        return NGX_DECLINED;
    }

    return NGX_OK;
}


/*
 * An operator moving subscribers from another system may bring their
 * existing keys along as "api_key"; otherwise a random key is made.
 */

static ngx_int_t
ngx_http_token_meter_admin_import_key(ngx_http_request_t *r,
    ngx_http_token_meter_admin_ctx_t *ctx, ngx_str_t *key)
{
    json_t  *value;
    size_t   i, len;
    u_char  *p, c;

    value = json_object_get(ctx->body, "api_key");

    if (value == NULL) {
        return NGX_OK;
    }

    p = (u_char *) json_string_value(value);
    len = p ? json_string_length(value) : 0;

    for (i = 0; i < len; i++) {
        c = p[i];

        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
              || (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.'))
        {
            break;
        }
    }

    if (len < 20 || len > 128 || i != len) {
        return ngx_http_token_meter_admin_fail(r, ctx, NGX_HTTP_BAD_REQUEST,
                   "invalid_api_key",
                   "\"api_key\" must be 20 to 128 letters, digits, "
                   "\"-\", \"_\" or \".\"");
    }

    key->data = p;
    key->len = len;

    return NGX_OK;
}


ngx_int_t
ngx_http_token_meter_store_error(ngx_http_request_t *r, ngx_int_t rc)
{
    if (rc == NGX_HTTP_TOKEN_METER_FULL) {
        return ngx_http_token_meter_send_error(r,
                   NGX_HTTP_SERVICE_UNAVAILABLE, "server_error", "store_full",
                   "the token meter store is full");
    }

    return ngx_http_token_meter_send_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                           "server_error",
                                           "store_unavailable",
                                           "the token meter store cannot be "
                                           "used now");
}


json_t *
ngx_http_token_meter_balance_json(ngx_http_token_meter_balance_t *balance)
{
    json_t      *json, *grants, *grant;
    ngx_uint_t   i;

    grants = json_array();

    for (i = 0; grants && i < balance->ngrants; i++) {
        grant = json_object();

        ngx_http_token_meter_json_set(grant, "kind", json_string("trial"));
        ngx_http_token_meter_json_set(grant, "points",
                                      json_integer(balance->grant[i].left));
        ngx_http_token_meter_json_set(grant, "expires_at",
                    ngx_http_token_meter_json_time(balance->grant[i].expires));

        if (grant == NULL || json_array_append_new(grants, grant) != 0) {
            json_decref(grants);
            return NULL;
        }
    }

    json = json_object();

    ngx_http_token_meter_json_set(json, "paid", json_integer(balance->paid));
    ngx_http_token_meter_json_set(json, "grants", grants);
    ngx_http_token_meter_json_set(json, "reserved",
                                  json_integer(balance->reserved));

    if (ngx_http_token_meter_json_set(json, "available",
                                      json_integer(balance->available))
        != NGX_OK)
    {
        if (json) {
            json_decref(json);
        }

        return NULL;
    }

    return json;
}


static json_t *
ngx_http_token_meter_subscriber_json(ngx_http_token_meter_txn_t *txn,
    ngx_http_token_meter_subscriber_t *sub, time_t now)
{
    json_t                           *json, *keys, *key;
    ngx_str_t                         msisdn, id;
    ngx_uint_t                        i;
    ngx_pool_t                       *pool;
    ngx_array_t                       list;
    ngx_http_token_meter_key_info_t  *info;
    ngx_http_token_meter_balance_t    balance;

    if (ngx_http_token_meter_balance(txn, sub, now, &balance) != NGX_OK) {
        return NULL;
    }

    pool = ngx_create_pool(1024, ngx_cycle->log);
    if (pool == NULL) {
        return NULL;
    }

    if (ngx_array_init(&list, pool, 4,
                       sizeof(ngx_http_token_meter_key_info_t))
        != NGX_OK
        || ngx_http_token_meter_key_list(txn, sub->id, &list) != NGX_OK)
    {
        ngx_destroy_pool(pool);
        return NULL;
    }

    keys = json_array();
    info = list.elts;

    for (i = 0; keys && i < list.nelts; i++) {
        id.data = info[i].key_id;
        id.len = NGX_HTTP_TOKEN_METER_KEY_ID_LEN;

        key = json_object();

        ngx_http_token_meter_json_set(key, "key_id",
                                      ngx_http_token_meter_json_string(&id));
        ngx_http_token_meter_json_set(key, "created_at",
                          ngx_http_token_meter_json_time(info[i].created));
        ngx_http_token_meter_json_set(key, "revoked_at",
                          info[i].revoked
                          ? ngx_http_token_meter_json_time(info[i].revoked)
                          : json_null());

        if (key == NULL || json_array_append_new(keys, key) != 0) {
            json_decref(keys);
            keys = NULL;
        }
    }

    ngx_destroy_pool(pool);

    msisdn = ngx_http_token_meter_msisdn(sub);

    json = json_object();

    ngx_http_token_meter_json_set(json, "id",
                                  ngx_http_token_meter_id_json(sub->id));
    ngx_http_token_meter_json_set(json, "msisdn",
                                  ngx_http_token_meter_json_string(&msisdn));
    ngx_http_token_meter_json_set(json, "status",
                   json_string(ngx_http_token_meter_status_names[sub->status]));
    ngx_http_token_meter_json_set(json, "created_at",
                                  ngx_http_token_meter_json_time(sub->created));
    ngx_http_token_meter_json_set(json, "activated_at",
                                ngx_http_token_meter_json_time(sub->activated));
    ngx_http_token_meter_json_set(json, "closed_at",
                                  sub->closed
                                  ? ngx_http_token_meter_json_time(sub->closed)
                                  : json_null());
    ngx_http_token_meter_json_set(json, "keys", keys);
    ngx_http_token_meter_json_set(json, "expired_points",
                                  json_integer(balance.expired));

    if (ngx_http_token_meter_json_set(json, "balance",
                                  ngx_http_token_meter_balance_json(&balance))
        != NGX_OK)
    {
        if (json) {
            json_decref(json);
        }

        return NULL;
    }

    return json;
}


static json_t *
ngx_http_token_meter_id_json(uint64_t id)
{
    u_char  *p, buf[sizeof("sub_") + NGX_INT64_LEN];

    p = ngx_sprintf(buf, "sub_%uL", id);

    return json_stringn((char *) buf, p - buf);
}


char *
ngx_http_token_meter_admin_key(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_token_meter_loc_conf_t *tmlcf = conf;

    ngx_int_t   n;
    ngx_str_t  *value;
    ngx_uint_t  i;

    if (tmlcf->admin_key.data) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (value[1].len != 7 + 64
        || ngx_strncmp(value[1].data, "sha256:", 7) != 0)
    {
        goto invalid;
    }

    tmlcf->admin_key.data = ngx_pnalloc(cf->pool, 32);
    if (tmlcf->admin_key.data == NULL) {
        return NGX_CONF_ERROR;
    }

    tmlcf->admin_key.len = 32;

    for (i = 0; i < 32; i++) {
        n = ngx_hextoi(value[1].data + 7 + 2 * i, 2);

        if (n == NGX_ERROR) {
            goto invalid;
        }

        tmlcf->admin_key.data[i] = (u_char) n;
    }

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid admin key \"%V\", expected \"sha256:\" and "
                       "64 hex digits", &value[1]);

    return NGX_CONF_ERROR;
}
