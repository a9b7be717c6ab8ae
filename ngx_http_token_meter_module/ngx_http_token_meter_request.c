
/*
 * Copyright (C) The ngx_http_token_meter_module authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include <jansson.h>

#include "ngx_http_token_meter_module.h"
#include "ngx_http_token_meter_account.h"
#include "ngx_http_token_meter_json.h"


#define NGX_HTTP_TOKEN_METER_MAX_PRICE       10000000
#define NGX_HTTP_TOKEN_METER_DEFAULT_OUTPUT  4096


static ngx_int_t ngx_http_token_meter_authenticate(ngx_http_request_t *r,
    ngx_http_token_meter_ctx_t *ctx, ngx_str_t *key);
typedef struct {
    ngx_http_token_meter_ctx_t    *ctx;
    json_t                        *body;
    char                         **fields;
    char                          *default_field;
    int64_t                        requested;
    ngx_uint_t                     modified;
} ngx_http_token_meter_admission_t;


static ngx_int_t ngx_http_token_meter_request_id(ngx_http_request_t *r,
    ngx_http_token_meter_ctx_t *ctx);
static void ngx_http_token_meter_body_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_token_meter_admit(ngx_http_request_t *r,
    ngx_http_token_meter_ctx_t *ctx);
static void ngx_http_token_meter_reserved(ngx_http_request_t *r,
    ngx_int_t rc);
static void ngx_http_token_meter_continue(ngx_http_request_t *r,
    ngx_http_token_meter_ctx_t *ctx);
static ngx_int_t ngx_http_token_meter_fail(ngx_http_request_t *r,
    ngx_uint_t status, const char *type, const char *code, const char *fmt,
    ...);
static u_char *ngx_http_token_meter_read_body(ngx_http_request_t *r,
    size_t *len);
static ngx_int_t ngx_http_token_meter_rewrite_body(ngx_http_request_t *r,
    json_t *json);
static void ngx_http_token_meter_remove_header(ngx_http_request_t *r,
    char *name);
static ngx_int_t ngx_http_token_meter_cap_output(
    ngx_http_token_meter_admission_t *adm, int64_t limit,
    ngx_uint_t add);
static void ngx_http_token_meter_json_cleanup(void *data);
static void ngx_http_token_meter_ctx_anchor(void *data);
static ngx_int_t ngx_http_token_meter_ends_with(ngx_str_t *s, char *tail);




static char  *ngx_http_token_meter_chat_fields[] = {
    "max_completion_tokens",
    "max_tokens",
    NULL
};


static char  *ngx_http_token_meter_responses_fields[] = {
    "max_output_tokens",
    NULL
};


ngx_int_t
ngx_http_token_meter_access_handler(ngx_http_request_t *r)
{
    ngx_int_t                          rc;
    ngx_str_t                          key;
    ngx_pool_cleanup_t                *cln;
    ngx_http_token_meter_ctx_t        *ctx;
    ngx_http_token_meter_loc_conf_t   *tmlcf;

    if (r != r->main) {
        return NGX_DECLINED;
    }

    tmlcf = ngx_http_get_module_loc_conf(r, ngx_http_token_meter_module);

    if (!tmlcf->enable) {
        return NGX_DECLINED;
    }

    ctx = ngx_http_get_module_ctx(r, ngx_http_token_meter_module);

    if (ctx) {
        return ctx->phase_rc;
    }

    if (ngx_http_token_meter_get_ctx(r)) {
        /* an error page of a request metered already */
        return NGX_DECLINED;
    }

    ctx = ngx_pcalloc(r->pool, sizeof(ngx_http_token_meter_ctx_t));
    if (ctx == NULL) {
        return NGX_ERROR;
    }

    ctx->phase_rc = NGX_DONE;
    ctx->msisdn.data = ctx->msisdn_data;
    ctx->balance = -1;

    /* an internal redirect clears the context, the pool keeps it */

    cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == NULL) {
        return NGX_ERROR;
    }

    cln->handler = ngx_http_token_meter_ctx_anchor;
    cln->data = ctx;

    ngx_http_set_ctx(r, ctx, ngx_http_token_meter_module);

    if (ngx_http_token_meter_api_key(r, &key) != NGX_OK) {
        return ngx_http_token_meter_fail(r, NGX_HTTP_UNAUTHORIZED,
                   "invalid_request_error", "invalid_api_key",
                   "You didn't provide an API key. Send it as "
                   "\"Authorization: Bearer <key>\" or in \"x-api-key\".");
    }

    rc = ngx_http_token_meter_authenticate(r, ctx, &key);
    if (rc != NGX_OK) {
        return rc;
    }

    if (ngx_http_token_meter_request_id(r, ctx) != NGX_OK) {
        return NGX_ERROR;
    }

    /*
     * the endpoint is told by the end of the path: path parameters would
     * let the module meter one endpoint while the upstream serves another
     */

    if (ngx_strlchr(r->uri.data, r->uri.data + r->uri.len, ';') != NULL) {
        return ngx_http_token_meter_fail(r, NGX_HTTP_BAD_REQUEST,
                   "invalid_request_error", "invalid_request_error",
                   "Path parameters (\";\") are not accepted.");
    }

    if (r->method != NGX_HTTP_POST) {
        if (ngx_http_token_meter_allow(r, "POST") != NGX_OK) {
            return NGX_ERROR;
        }

        return ngx_http_token_meter_fail(r, NGX_HTTP_NOT_ALLOWED,
                   "invalid_request_error", "method_not_allowed",
                   "Only POST requests are metered here.");
    }

    rc = ngx_http_read_client_request_body(r,
                                           ngx_http_token_meter_body_handler);

    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        return rc;
    }

    ngx_http_finalize_request(r, NGX_DONE);

    return NGX_DONE;
}


ngx_int_t
ngx_http_token_meter_api_key(ngx_http_request_t *r, ngx_str_t *key)
{
    ngx_uint_t        i;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    if (ngx_http_token_meter_bearer(r->headers_in.authorization, key)
        == NGX_OK)
    {
        return NGX_OK;
    }

    part = &r->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */ ; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].key.len == sizeof("x-api-key") - 1
            && ngx_strncasecmp(h[i].lowcase_key, (u_char *) "x-api-key",
                               sizeof("x-api-key") - 1) == 0
            && h[i].value.len)
        {
            *key = h[i].value;
            return NGX_OK;
        }
    }

    return NGX_DECLINED;
}


static ngx_int_t
ngx_http_token_meter_authenticate(ngx_http_request_t *r,
    ngx_http_token_meter_ctx_t *ctx, ngx_str_t *key)
{
    ngx_int_t                           rc;
    ngx_http_token_meter_txn_t         *txn;
    ngx_http_token_meter_main_conf_t   *tmcf;
    ngx_http_token_meter_subscriber_t   sub;

    tmcf = ngx_http_get_module_main_conf(r, ngx_http_token_meter_module);

    rc = ngx_http_token_meter_txn_begin(tmcf->store, &txn, 0,
                                        r->connection->log);
    if (rc != NGX_OK) {
        goto store_failed;
    }

    rc = ngx_http_token_meter_key_find(txn, key, &ctx->subscriber);

    if (rc == NGX_OK) {
        rc = ngx_http_token_meter_subscriber_get(txn, ctx->subscriber, &sub);
    }

    ngx_http_token_meter_txn_abort(txn);

    if (rc == NGX_DECLINED) {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "token meter: unknown API key");

        return ngx_http_token_meter_fail(r, NGX_HTTP_UNAUTHORIZED,
                                         "invalid_request_error",
                                         "invalid_api_key",
                                         "Incorrect API key provided.");
    }

    if (rc != NGX_OK) {
        goto store_failed;
    }

    ctx->msisdn = ngx_http_token_meter_msisdn(&sub);
    ngx_memcpy(ctx->msisdn_data, ctx->msisdn.data, ctx->msisdn.len);
    ctx->msisdn.data = ctx->msisdn_data;

    if (sub.status != NGX_HTTP_TOKEN_METER_ACTIVE) {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "token meter: sub_%uL is suspended", sub.id);

        return ngx_http_token_meter_fail(r, NGX_HTTP_FORBIDDEN,
                                         "invalid_request_error",
                                         "account_suspended",
                                         "This account is suspended.");
    }

    return NGX_OK;

store_failed:

    return ngx_http_token_meter_fail(r, NGX_HTTP_SERVICE_UNAVAILABLE,
               "server_error",
               rc == NGX_HTTP_TOKEN_METER_FULL ? "store_full"
                                                : "store_unavailable",
               "The metering store cannot be used now; "
               "please try again later.");
}


/*
 * Settlement is keyed by a request id unique to the store: a random
 * prefix drawn once per process and a counter.  nginx's own $request_id
 * would cost a call to the random generator on every request.
 */

static ngx_int_t
ngx_http_token_meter_request_id(ngx_http_request_t *r,
    ngx_http_token_meter_ctx_t *ctx)
{
    static u_char    prefix[8];
    static uint64_t  counter;

    if (counter == 0
        && ngx_http_token_meter_random(prefix, sizeof(prefix)) != NGX_OK)
    {
        return NGX_ERROR;
    }

    ngx_memcpy(ctx->request_id, prefix, 8);
    ngx_http_token_meter_put_u64(ctx->request_id + 8, ++counter);

    return NGX_OK;
}


/*
 * Answers a metered request from the access phase with an error in the
 * OpenAI shape, before or after its body was read.
 */

static ngx_int_t
ngx_http_token_meter_fail(ngx_http_request_t *r, ngx_uint_t status,
    const char *type, const char *code, const char *fmt, ...)
{
    va_list                      args;
    ngx_int_t                    rc;
    ngx_http_token_meter_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_token_meter_module);

    if (r->request_body == NULL) {
        rc = ngx_http_discard_request_body(r);

        if (rc != NGX_OK) {
            return rc;
        }
    }

    ngx_http_token_meter_count_rejected(r, code);

    va_start(args, fmt);
    rc = ngx_http_token_meter_send_verror(r, status, type, code, fmt, args);
    va_end(args);

    ctx->phase_rc = NGX_DONE;

    ngx_http_finalize_request(r, rc);

    return NGX_DONE;
}


static void
ngx_http_token_meter_body_handler(ngx_http_request_t *r)
{
    ngx_int_t                    rc;
    ngx_http_token_meter_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_token_meter_module);

    rc = ngx_http_token_meter_admit(r, ctx);

    if (rc == NGX_AGAIN || rc == NGX_DONE) {
        return;
    }

    ngx_http_finalize_request(r, rc);
}


static ngx_int_t
ngx_http_token_meter_admit(ngx_http_request_t *r,
    ngx_http_token_meter_ctx_t *ctx)
{
    u_char                             *data;
    size_t                              len;
    json_t                             *json, *value, *options;
    ngx_int_t                           rc;
    ngx_str_t                           name;
    ngx_uint_t                          i, key, responses;
    json_error_t                        error;
    ngx_pool_cleanup_t                 *cln;
    ngx_http_token_meter_model_t       *model;
    ngx_http_token_meter_main_conf_t   *tmcf;
    ngx_http_token_meter_admission_t   *adm;

    tmcf = ngx_http_get_module_main_conf(r, ngx_http_token_meter_module);

    data = ngx_http_token_meter_read_body(r, &len);
    if (data == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    json = json_loadb((char *) data, len, JSON_REJECT_DUPLICATES, &error);

    if (json == NULL || !json_is_object(json)) {
        if (json) {
            json_decref(json);
        }

        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "token meter: request body is not a JSON object");

        /* jansson's own text may quote the bytes it could not read */

        if (json == NULL) {
            return ngx_http_token_meter_fail(r, NGX_HTTP_BAD_REQUEST,
                       "invalid_request_error", "invalid_request_error",
                       "The request body is not valid JSON (line %d, "
                       "column %d).", error.line, error.column);
        }

        return ngx_http_token_meter_fail(r, NGX_HTTP_BAD_REQUEST,
                   "invalid_request_error", "invalid_request_error",
                   "The request body is not a JSON object.");
    }

    cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == NULL) {
        json_decref(json);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    cln->handler = ngx_http_token_meter_json_cleanup;
    cln->data = json;

    value = json_object_get(json, "model");

    if (!json_is_string(value)) {
        return ngx_http_token_meter_fail(r, NGX_HTTP_BAD_REQUEST,
                   "invalid_request_error", "invalid_request_error",
                   "You must provide a model parameter.");
    }

    name.data = (u_char *) json_string_value(value);
    name.len = json_string_length(value);

    key = ngx_hash_key(name.data, name.len);

    model = ngx_hash_find(&tmcf->models_hash, key, name.data, name.len);

    if (model == NULL) {
        return ngx_http_token_meter_fail(r, NGX_HTTP_NOT_FOUND,
                   "invalid_request_error", "model_not_found",
                   "The model \"%V\" does not exist.", &name);
    }

    ctx->model = model;

    adm = ngx_pcalloc(r->pool, sizeof(ngx_http_token_meter_admission_t));
    if (adm == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    adm->ctx = ctx;
    adm->body = json;

    ctx->embeddings = ngx_http_token_meter_ends_with(&r->uri, "/embeddings");

    /* "n" choices (or "best_of" tries) each produce a whole answer */

    ctx->choices = 1;

    for (i = 0; i < 2; i++) {
        value = json_object_get(json, i ? "best_of" : "n");

        if (value == NULL || json_is_null(value)) {
            continue;
        }

        if (!json_is_integer(value) || json_integer_value(value) < 1
            || json_integer_value(value) > 128)
        {
            return ngx_http_token_meter_fail(r, NGX_HTTP_BAD_REQUEST,
                       "invalid_request_error", "invalid_request_error",
                       "\"%s\" must be an integer from 1 to 128.",
                       i ? "best_of" : "n");
        }

        ctx->choices = ngx_max(ctx->choices, json_integer_value(value));
    }
    responses = ngx_http_token_meter_ends_with(&r->uri, "/responses");

    ctx->input_estimate = ngx_http_token_meter_input_tokens(json);

    ctx->stream = json_is_true(json_object_get(json, "stream"));

    /*
     * The output allowance: what the client asked for, at most max_output.
     * Chat requests may carry both max_completion_tokens and max_tokens;
     * an upstream may honour either, so the larger one is reserved and
     * both are held to the allowance.
     */

    if (responses) {
        adm->fields = ngx_http_token_meter_responses_fields;
        adm->default_field = "max_output_tokens";

    } else {
        adm->fields = ngx_http_token_meter_chat_fields;
        adm->default_field = "max_tokens";
    }

    for (i = 0; adm->fields[i]; i++) {
        value = json_object_get(json, adm->fields[i]);

        if (value == NULL || json_is_null(value)) {
            continue;
        }

        if (!json_is_integer(value) || json_integer_value(value) < 1) {
            return ngx_http_token_meter_fail(r, NGX_HTTP_BAD_REQUEST,
                       "invalid_request_error", "invalid_request_error",
                       "\"%s\" must be a positive integer.", adm->fields[i]);
        }

        adm->requested = ngx_max(adm->requested, json_integer_value(value));
    }

    ctx->allowance = 0;

    if (!ctx->embeddings) {
        ctx->allowance = model->max_output;

        if (adm->requested && adm->requested < model->max_output) {
            ctx->allowance = adm->requested;
        }

        if (ngx_http_token_meter_cap_output(adm, model->max_output, 0)
            != NGX_OK)
        {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
    }

    if (model->upstream_model.len) {
        if (json_object_set_new(json, "model",
                    ngx_http_token_meter_json_string(&model->upstream_model))
            != 0)
        {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        adm->modified = 1;
    }

    /*
     * Streamed chat and completions carry usage only when asked for; the
     * Responses API always sends it.  When the module asks on the
     * client's behalf, it takes the extra usage chunk out again.
     */

    if (ctx->stream && !responses && !ctx->embeddings) {
        options = json_object_get(json, "stream_options");

        if (!json_is_true(json_object_get(options, "include_usage"))) {

            if (!json_is_object(options)) {
                options = json_object();

                if (options == NULL
                    || json_object_set_new(json, "stream_options", options)
                       != 0)
                {
                    return NGX_HTTP_INTERNAL_SERVER_ERROR;
                }
            }

            if (json_object_set_new(options, "include_usage", json_true())
                != 0)
            {
                return NGX_HTTP_INTERNAL_SERVER_ERROR;
            }

            ctx->strip_usage = 1;
            adm->modified = 1;
        }
    }

    ctx->admission = adm;

    rc = ngx_http_token_meter_reserve(r, ctx, ngx_http_token_meter_reserved);

    if (rc == NGX_AGAIN) {
        return NGX_AGAIN;
    }

    ngx_http_token_meter_reserved(r, rc);

    return NGX_DONE;
}


/* the second half of the admission, once the store has answered */

static void
ngx_http_token_meter_reserved(ngx_http_request_t *r, ngx_int_t rc)
{
    ngx_http_token_meter_ctx_t          *ctx;
    ngx_http_token_meter_admission_t    *adm;
    ngx_http_token_meter_main_conf_t    *tmcf;

    tmcf = ngx_http_get_module_main_conf(r, ngx_http_token_meter_module);

    ctx = ngx_http_get_module_ctx(r, ngx_http_token_meter_module);
    adm = ctx->admission;

    switch (rc) {

    case NGX_OK:
        break;

    case NGX_DECLINED:
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "token meter: sub_%uL has %L points, too few for "
                      "\"%V\"", ctx->subscriber, ctx->balance,
                      &ctx->model->name);

        (void) ngx_http_token_meter_fail(r, tmcf->quota_status,
                   "insufficient_quota", "insufficient_quota",
                   "You exceeded your current quota: %L points are "
                   "available.", ctx->balance);
        return;

    case NGX_HTTP_FORBIDDEN:
        (void) ngx_http_token_meter_fail(r, NGX_HTTP_FORBIDDEN,
                                         "invalid_request_error",
                                         "account_suspended",
                                         "This account is suspended.");
        return;

    default:
        (void) ngx_http_token_meter_fail(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                   "server_error",
                   rc == NGX_HTTP_TOKEN_METER_FULL ? "store_full"
                                                    : "store_unavailable",
                   "The metering store cannot be used now; "
                   "please try again later.");
        return;
    }

    ctx->admitted = 1;

    if (!ctx->embeddings
        && (adm->requested == 0 || ctx->allowance < adm->requested)
        && ctx->allowance < ctx->model->max_output)
    {
        /* the balance pays for less output than asked: ask for less */

        if (ngx_http_token_meter_cap_output(adm, ctx->allowance, 1) != NGX_OK)
        {
            ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
            return;
        }
    }

    if (adm->modified
        && ngx_http_token_meter_rewrite_body(r, adm->body) != NGX_OK)
    {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    /*
     * the subscriber's key stays here; compression is refused so that the
     * answer can be read on the way back
     */

    ngx_http_token_meter_remove_header(r, "authorization");
    ngx_http_token_meter_remove_header(r, "x-api-key");
    ngx_http_token_meter_remove_header(r, "accept-encoding");

    r->headers_in.authorization = NULL;
#if (NGX_HTTP_GZIP)
    r->headers_in.accept_encoding = NULL;
#endif

    ngx_http_token_meter_continue(r, ctx);
}


static void
ngx_http_token_meter_continue(ngx_http_request_t *r,
    ngx_http_token_meter_ctx_t *ctx)
{
    ctx->phase_rc = NGX_DECLINED;

    r->preserve_body = 1;
    r->write_event_handler = ngx_http_core_run_phases;

    ngx_http_core_run_phases(r);
}


static u_char *
ngx_http_token_meter_read_body(ngx_http_request_t *r, size_t *len)
{
    u_char       *data, *p;
    size_t        size;
    ssize_t       n;
    ngx_buf_t    *b;
    ngx_chain_t  *cl;

    if (r->request_body == NULL) {
        *len = 0;
        return (u_char *) "";
    }

    size = 0;

    for (cl = r->request_body->bufs; cl; cl = cl->next) {
        size += ngx_buf_size(cl->buf);
    }

    data = ngx_pnalloc(r->pool, size + 1);
    if (data == NULL) {
        return NULL;
    }

    p = data;

    for (cl = r->request_body->bufs; cl; cl = cl->next) {
        b = cl->buf;

        if (b->in_file) {
            n = ngx_read_file(b->file, p, b->file_last - b->file_pos,
                              b->file_pos);

            if (n != b->file_last - b->file_pos) {
                ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                              "token meter: cannot read the request body "
                              "from its temporary file");
                return NULL;
            }

            p += n;
            continue;
        }

        p = ngx_cpymem(p, b->pos, b->last - b->pos);
    }

    *len = p - data;

    return data;
}


static ngx_int_t
ngx_http_token_meter_rewrite_body(ngx_http_request_t *r, json_t *json)
{
    char         *text;
    size_t        len;
    ngx_buf_t    *b;
    ngx_chain_t  *cl;

    text = json_dumps(json, JSON_COMPACT);
    if (text == NULL) {
        return NGX_ERROR;
    }

    len = ngx_strlen(text);

    b = ngx_create_temp_buf(r->pool, len);
    if (b == NULL) {
        free(text);
        return NGX_ERROR;
    }

    b->last = ngx_cpymem(b->pos, text, len);
    b->last_buf = 1;

    free(text);

    cl = ngx_alloc_chain_link(r->pool);
    if (cl == NULL) {
        return NGX_ERROR;
    }

    cl->buf = b;
    cl->next = NULL;

    r->request_body->bufs = cl;
    r->request_body->buf = b;
    r->request_body->temp_file = NULL;

    r->headers_in.content_length_n = len;

    if (r->headers_in.content_length) {
        r->headers_in.content_length->value.data = ngx_pnalloc(r->pool,
                                                               NGX_OFF_T_LEN);
        if (r->headers_in.content_length->value.data == NULL) {
            return NGX_ERROR;
        }

        r->headers_in.content_length->value.len =
            ngx_sprintf(r->headers_in.content_length->value.data, "%uz", len)
            - r->headers_in.content_length->value.data;
    }

    return NGX_OK;
}


/* takes a request header out of the list that is passed upstream */

static void
ngx_http_token_meter_remove_header(ngx_http_request_t *r, char *name)
{
    size_t            len;
    ngx_uint_t        i;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    len = ngx_strlen(name);

    part = &r->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */ ; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].key.len != len
            || ngx_strncasecmp(h[i].lowcase_key, (u_char *) name, len) != 0)
        {
            continue;
        }

        ngx_memmove(&h[i], &h[i + 1],
                    (part->nelts - i - 1) * sizeof(ngx_table_elt_t));

        part->nelts--;
        i--;
    }
}


/*
 * Holds every max-tokens field the client sent to the limit; with "add",
 * a request that sent none gets one, so that the upstream stops there.
 */

static ngx_int_t
ngx_http_token_meter_cap_output(ngx_http_token_meter_admission_t *adm,
    int64_t limit, ngx_uint_t add)
{
    json_t      *value;
    ngx_uint_t   i, present;

    present = 0;

    for (i = 0; adm->fields[i]; i++) {
        value = json_object_get(adm->body, adm->fields[i]);

        if (value == NULL || json_is_null(value)) {
            continue;
        }

        present = 1;

        if (json_integer_value(value) <= limit) {
            continue;
        }

        if (json_object_set_new(adm->body, adm->fields[i],
                                json_integer(limit))
            != 0)
        {
            return NGX_ERROR;
        }

        adm->modified = 1;
    }

    if (present || !add) {
        return NGX_OK;
    }

    if (json_object_set_new(adm->body, adm->default_field,
                            json_integer(limit))
        != 0)
    {
        return NGX_ERROR;
    }

    adm->modified = 1;

    return NGX_OK;
}


static void
ngx_http_token_meter_json_cleanup(void *data)
{
    json_decref(data);
}


/*
 * The context of a metered request, also after an internal redirect
 * (error_page, say) has cleared the modules' contexts: it is found again
 * through the pool cleanup that the access handler left to anchor it.
 */

ngx_http_token_meter_ctx_t *
ngx_http_token_meter_get_ctx(ngx_http_request_t *r)
{
    ngx_pool_cleanup_t          *cln;
    ngx_http_token_meter_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_token_meter_module);

    if (ctx || r->uri_changes == NGX_HTTP_MAX_URI_CHANGES + 1) {
        return ctx;
    }

    for (cln = r->pool->cleanup; cln; cln = cln->next) {
        if (cln->handler == ngx_http_token_meter_ctx_anchor) {
            ctx = cln->data;
            ngx_http_set_ctx(r, ctx, ngx_http_token_meter_module);
            return ctx;
        }
    }

    return NULL;
}


static void
ngx_http_token_meter_ctx_anchor(void *data)
{
    /* a mark, nothing to free */
}


static ngx_int_t
ngx_http_token_meter_ends_with(ngx_str_t *s, char *tail)
{
    size_t  len;

    len = ngx_strlen(tail);

    return s->len >= len
           && ngx_strncmp(s->data + s->len - len, tail, len) == 0;
}


ngx_int_t
ngx_http_token_meter_log_handler(ngx_http_request_t *r)
{
    ngx_http_core_loc_conf_t         *clcf;
    ngx_http_token_meter_ctx_t       *ctx;
    ngx_http_token_meter_loc_conf_t  *tmlcf;

    if (r != r->main) {
        return NGX_OK;
    }

    ctx = ngx_http_token_meter_get_ctx(r);

    if (ctx == NULL || (!ctx->admitted && ctx->admin == NULL)) {

        /*
         * nginx refuses a body too large itself: by its length before the
         * module sees the request, or while the module reads it chunked;
         * its page may come from a token_meter_error location
         */

        if (r->headers_out.status != NGX_HTTP_REQUEST_ENTITY_TOO_LARGE) {
            return NGX_OK;
        }

        tmlcf = ngx_http_get_module_loc_conf(r, ngx_http_token_meter_module);
        clcf = ngx_http_get_module_loc_conf(r, ngx_http_core_module);

        if (ctx || tmlcf->enable
            || clcf->handler == ngx_http_token_meter_error_handler)
        {
            ngx_http_token_meter_count_rejected(r, "request_too_large");
        }

        return NGX_OK;
    }

    if (!ctx->admitted || ctx->settled) {
        return NGX_OK;
    }

    if (ctx->status == 0) {
        ctx->status = r->headers_out.status;
    }

    ngx_http_token_meter_filter_finish(r, ctx);

    (void) ngx_http_token_meter_settle(r, ctx);

    return NGX_OK;
}


/*
 * token_meter_model <name> upstream=<name> input=<points> output=<points>
 *     [cached=<points>] [max_output=<tokens>] [upstream_model=<name>]
 */

char *
ngx_http_token_meter_model(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_token_meter_main_conf_t  *tmcf = conf;

    int64_t                        *price;
    ngx_int_t                       n;
    ngx_str_t                      *value, s;
    ngx_uint_t                      i, j;
    ngx_http_token_meter_model_t   *model;

    static struct {
        char       *name;
        size_t      len;
    } prices[] = {
        { "input=", 6 },
        { "output=", 7 },
        { "cached=", 7 },
    };

    value = cf->args->elts;

    if (tmcf->models.elts == NULL
        && ngx_array_init(&tmcf->models, cf->pool, 32,
                          sizeof(ngx_http_token_meter_model_t))
           != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    model = tmcf->models.elts;

    for (i = 0; i < tmcf->models.nelts; i++) {
        if (model[i].name.len == value[1].len
            && ngx_strncmp(model[i].name.data, value[1].data, value[1].len)
               == 0)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "duplicate model \"%V\"", &value[1]);
            return NGX_CONF_ERROR;
        }
    }

    model = ngx_array_push(&tmcf->models);
    if (model == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(model, sizeof(ngx_http_token_meter_model_t));

    model->name = value[1];
    model->input = -1;
    model->output = -1;
    model->cached = -1;
    model->max_output = NGX_HTTP_TOKEN_METER_DEFAULT_OUTPUT;
    model->file = cf->conf_file->file.name;
    model->line = cf->conf_file->line;

    for (i = 2; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "upstream=", 9) == 0) {
            model->upstream.data = value[i].data + 9;
            model->upstream.len = value[i].len - 9;
            continue;
        }

        if (ngx_strncmp(value[i].data, "upstream_model=", 15) == 0) {
            model->upstream_model.data = value[i].data + 15;
            model->upstream_model.len = value[i].len - 15;
            continue;
        }

        if (ngx_strncmp(value[i].data, "max_output=", 11) == 0) {
            n = ngx_atoi(value[i].data + 11, value[i].len - 11);

            if (n <= 0 || n > 10000000) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid max output \"%V\"", &value[i]);
                return NGX_CONF_ERROR;
            }

            model->max_output = n;
            continue;
        }

        for (j = 0; j < 3; j++) {
            if (ngx_strncmp(value[i].data, prices[j].name, prices[j].len)
                == 0)
            {
                break;
            }
        }

        if (j == 3) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid parameter \"%V\"", &value[i]);
            return NGX_CONF_ERROR;
        }

        price = (j == 0) ? &model->input
                : (j == 1) ? &model->output : &model->cached;

        s.data = value[i].data + prices[j].len;
        s.len = value[i].len - prices[j].len;

        if (ngx_http_token_meter_parse_points(&s,
                                              NGX_HTTP_TOKEN_METER_PRICE_SCALE,
                                              price)
            != NGX_OK
            || *price > NGX_HTTP_TOKEN_METER_MAX_PRICE)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid price \"%V\", expected points per "
                               "token with up to three decimals, at most "
                               "10000", &value[i]);
            return NGX_CONF_ERROR;
        }
    }

    if (model->upstream.len == 0 || model->input < 0 || model->output < 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "model \"%V\" needs upstream=, input= and "
                           "output=", &value[1]);
        return NGX_CONF_ERROR;
    }

    if (model->cached < 0) {
        model->cached = model->input;
    }

    return NGX_CONF_OK;
}


ngx_int_t
ngx_http_token_meter_init_models(ngx_conf_t *cf,
    ngx_http_token_meter_main_conf_t *tmcf)
{
    size_t                          longest;
    ngx_uint_t                      i, j;
    ngx_hash_init_t                 hash;
    ngx_hash_key_t                 *key;
    ngx_array_t                     keys;
    ngx_http_upstream_srv_conf_t  **uscf;
    ngx_http_upstream_main_conf_t  *umcf;
    ngx_http_token_meter_model_t   *model;

    umcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_upstream_module);

    if (ngx_array_init(&keys, cf->temp_pool, 32, sizeof(ngx_hash_key_t))
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    model = tmcf->models.elts;
    uscf = umcf->upstreams.elts;
    longest = 0;

    for (i = 0; i < tmcf->models.nelts; i++) {

        for (j = 0; j < umcf->upstreams.nelts; j++) {
            if (uscf[j]->host.len == model[i].upstream.len
                && ngx_strncasecmp(uscf[j]->host.data,
                                   model[i].upstream.data,
                                   model[i].upstream.len)
                   == 0)
            {
                break;
            }
        }

        if (j == umcf->upstreams.nelts) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "model \"%V\" names unknown upstream \"%V\" "
                          "in %V:%ui", &model[i].name, &model[i].upstream,
                          &model[i].file, model[i].line);
            return NGX_ERROR;
        }

        key = ngx_array_push(&keys);
        if (key == NULL) {
            return NGX_ERROR;
        }

        longest = ngx_max(longest, model[i].name.len);

        key->key = model[i].name;
        key->key_hash = ngx_hash_key(model[i].name.data, model[i].name.len);
        key->value = &model[i];
    }

    hash.hash = &tmcf->models_hash;
    hash.key = ngx_hash_key;
    hash.max_size = 4096;
    hash.bucket_size = ngx_align(ngx_max(64, longest + 2 * sizeof(void *)
                                                 + 2),
                                 ngx_cacheline_size);
    hash.name = "token_meter_models_hash";
    hash.pool = cf->pool;
    hash.temp_pool = NULL;

    return ngx_hash_init(&hash, keys.elts, keys.nelts);
}
