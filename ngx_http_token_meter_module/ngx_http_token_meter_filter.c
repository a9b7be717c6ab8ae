
/*
 * Copyright (C) The ngx_http_token_meter_module authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_token_meter_module.h"


/* the most of one event held back while deciding whether to drop it */
#define NGX_HTTP_TOKEN_METER_HELD_MAX  16384


static ngx_int_t ngx_http_token_meter_header_filter(ngx_http_request_t *r);
static ngx_int_t ngx_http_token_meter_body_filter(ngx_http_request_t *r,
    ngx_chain_t *in);
static ngx_int_t ngx_http_token_meter_strip(ngx_http_request_t *r,
    ngx_http_token_meter_ctx_t *ctx, ngx_chain_t *in);
static ngx_int_t ngx_http_token_meter_emit(ngx_http_request_t *r,
    ngx_http_token_meter_ctx_t *ctx, ngx_chain_t ***last, u_char *p,
    size_t len);
static void ngx_http_token_meter_event(void *data,
    ngx_http_token_meter_json_scan_t *json);
static void ngx_http_token_meter_usage(ngx_http_token_meter_ctx_t *ctx,
    ngx_http_token_meter_json_scan_t *json);


static ngx_http_output_header_filter_pt  ngx_http_next_header_filter;
static ngx_http_output_body_filter_pt    ngx_http_next_body_filter;


ngx_int_t
ngx_http_token_meter_filter_init(ngx_conf_t *cf)
{
    ngx_http_next_header_filter = ngx_http_top_header_filter;
    ngx_http_top_header_filter = ngx_http_token_meter_header_filter;

    ngx_http_next_body_filter = ngx_http_top_body_filter;
    ngx_http_top_body_filter = ngx_http_token_meter_body_filter;

    return NGX_OK;
}


static ngx_int_t
ngx_http_token_meter_header_filter(ngx_http_request_t *r)
{
    ngx_str_t                   *type;
    ngx_http_token_meter_ctx_t  *ctx;

    if (r != r->main) {
        return ngx_http_next_header_filter(r);
    }

    ctx = ngx_http_token_meter_get_ctx(r);

    if (ctx == NULL || !ctx->admitted || ctx->sse || ctx->json
        || ctx->passthrough)
    {
        return ngx_http_next_header_filter(r);
    }

    ctx->status = r->headers_out.status;

    if (r->headers_out.content_encoding
        && r->headers_out.content_encoding->value.len
        && ngx_strcasecmp(r->headers_out.content_encoding->value.data,
                          (u_char *) "identity")
           != 0)
    {
        /* the upstream compressed the answer although it was not asked to */

        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "token meter: upstream answer is compressed, "
                      "its usage is estimated");

        ctx->encoded = 1;
        ctx->passthrough = 1;

        return ngx_http_next_header_filter(r);
    }

    type = &r->headers_out.content_type;

    if (type->len >= sizeof("text/event-stream") - 1
        && ngx_strncasecmp(type->data, (u_char *) "text/event-stream",
                           sizeof("text/event-stream") - 1)
           == 0)
    {
        ctx->sse = ngx_palloc(r->pool,
                              sizeof(ngx_http_token_meter_sse_scan_t));
        if (ctx->sse == NULL) {
            return NGX_ERROR;
        }

        ngx_http_token_meter_sse_scan_init(ctx->sse);

        /* events go to the client as they come, whatever proxy_buffering */

        if (r->upstream) {
            r->upstream->buffering = 0;
        }

        if (ctx->strip_usage) {
            ngx_http_clear_content_length(r);
        }

        return ngx_http_next_header_filter(r);
    }

    ctx->strip_usage = 0;

    ctx->json = ngx_palloc(r->pool, sizeof(ngx_http_token_meter_json_scan_t));
    if (ctx->json == NULL) {
        return NGX_ERROR;
    }

    ngx_http_token_meter_json_scan_init(ctx->json);

    return ngx_http_next_header_filter(r);
}


static ngx_int_t
ngx_http_token_meter_body_filter(ngx_http_request_t *r, ngx_chain_t *in)
{
    u_char                      *p;
    ngx_buf_t                   *b;
    ngx_chain_t                 *cl;
    ngx_http_token_meter_ctx_t  *ctx;

    if (r != r->main || in == NULL) {
        return ngx_http_next_body_filter(r, in);
    }

    ctx = ngx_http_token_meter_get_ctx(r);

    if (ctx == NULL || !ctx->admitted || ctx->settled) {
        return ngx_http_next_body_filter(r, in);
    }

    if (ctx->sse && ctx->strip_usage) {
        return ngx_http_token_meter_strip(r, ctx, in);
    }

    for (cl = in; cl; cl = cl->next) {
        b = cl->buf;

        if (ngx_buf_special(b) || !ngx_buf_in_memory(b)) {
            continue;
        }

        if (ctx->encoded) {
            ctx->seen.ascii += b->last - b->pos;
            continue;
        }

        if (ctx->json) {
            ngx_http_token_meter_json_scan(ctx->json, b->pos, b->last);
            continue;
        }

        if (ctx->sse) {
            for (p = b->pos; p < b->last; /* void */ ) {
                p = ngx_http_token_meter_sse_scan(ctx->sse, p, b->last,
                                                 ngx_http_token_meter_event,
                                                 ctx);
            }
        }
    }

    return ngx_http_next_body_filter(r, in);
}


/*
 * Passes events on as they complete, and drops the usage-only event that
 * the module asked the upstream for on the client's behalf.  Only the
 * bytes of an event not yet complete are held back: a client cannot use
 * part of an event anyway.
 */

static ngx_int_t
ngx_http_token_meter_strip(ngx_http_request_t *r,
    ngx_http_token_meter_ctx_t *ctx, ngx_chain_t *in)
{
    u_char        *p, *q;
    size_t         len;
    ngx_int_t      rc;
    ngx_buf_t     *b, *held;
    ngx_chain_t   *out, **last, *cl, *tl;

    out = NULL;
    last = &out;

    if (ctx->held == NULL) {
        ctx->held = ngx_create_temp_buf(r->pool,
                                        NGX_HTTP_TOKEN_METER_HELD_MAX);
        if (ctx->held == NULL) {
            return NGX_ERROR;
        }
    }

    held = ctx->held;

    for (cl = in; cl; cl = cl->next) {
        b = cl->buf;

        if (ngx_buf_in_memory(b) && !ngx_buf_special(b)) {

            for (p = b->pos; p < b->last; p = q) {

                q = ngx_http_token_meter_sse_scan(ctx->sse, p, b->last,
                                                  ngx_http_token_meter_event,
                                                  ctx);

                if (ctx->event_done) {
                    ctx->event_done = 0;

                    if (!ctx->event_strip) {
                        if (ngx_http_token_meter_emit(r, ctx, &last,
                                                      held->pos,
                                                      held->last - held->pos)
                            != NGX_OK
                            || ngx_http_token_meter_emit(r, ctx, &last, p,
                                                         q - p)
                               != NGX_OK)
                        {
                            return NGX_ERROR;
                        }
                    }

                    held->pos = held->start;
                    held->last = held->start;
                    continue;
                }

                /* the event goes on past this buffer */

                len = q - p;

                if ((size_t) (held->end - held->last) < len) {

                    /* too long to be a usage event: stop holding it */

                    if (ngx_http_token_meter_emit(r, ctx, &last, held->pos,
                                                  held->last - held->pos)
                        != NGX_OK
                        || ngx_http_token_meter_emit(r, ctx, &last, p, len)
                           != NGX_OK)
                    {
                        return NGX_ERROR;
                    }

                    held->pos = held->start;
                    held->last = held->start;
                    continue;
                }

                held->last = ngx_cpymem(held->last, p, len);
            }

            b->pos = b->last;
        }

        if (b->last_buf || b->flush || b->last_in_chain) {

            if (b->last_buf && held->last > held->pos) {
                if (ngx_http_token_meter_emit(r, ctx, &last, held->pos,
                                              held->last - held->pos)
                    != NGX_OK)
                {
                    return NGX_ERROR;
                }

                held->pos = held->start;
                held->last = held->start;
            }

            tl = ngx_chain_get_free_buf(r->pool, &ctx->free);
            if (tl == NULL) {
                return NGX_ERROR;
            }

            tl->buf->tag = (ngx_buf_tag_t) &ngx_http_token_meter_module;
            tl->buf->pos = tl->buf->start;
            tl->buf->last = tl->buf->start;
            tl->buf->temporary = 0;
            tl->buf->memory = 0;
            tl->buf->last_buf = b->last_buf;
            tl->buf->last_in_chain = b->last_in_chain;
            tl->buf->flush = 1;
            tl->buf->sync = 1;

            *last = tl;
            last = &tl->next;
        }
    }

    if (out == NULL) {
        return NGX_OK;
    }

    rc = ngx_http_next_body_filter(r, out);

    ngx_chain_update_chains(r->pool, &ctx->free, &ctx->busy, &out,
                            (ngx_buf_tag_t) &ngx_http_token_meter_module);

    return rc;
}


static ngx_int_t
ngx_http_token_meter_emit(ngx_http_request_t *r,
    ngx_http_token_meter_ctx_t *ctx, ngx_chain_t ***last, u_char *p,
    size_t len)
{
    size_t        size;
    ngx_buf_t    *b;
    ngx_chain_t  *cl;

    if (len == 0) {
        return NGX_OK;
    }

    cl = ngx_chain_get_free_buf(r->pool, &ctx->free);
    if (cl == NULL) {
        return NGX_ERROR;
    }

    b = cl->buf;

    if (b->start == NULL || (size_t) (b->end - b->start) < len) {
        size = ngx_max(len, 4096);

        b->start = ngx_palloc(r->pool, size);
        if (b->start == NULL) {
            return NGX_ERROR;
        }

        b->end = b->start + size;
    }

    b->pos = b->start;
    b->last = ngx_cpymem(b->pos, p, len);
    b->temporary = 1;
    b->memory = 0;
    b->last_buf = 0;
    b->last_in_chain = 0;
    b->flush = 0;
    b->sync = 0;
    b->tag = (ngx_buf_tag_t) &ngx_http_token_meter_module;

    **last = cl;
    *last = &cl->next;

    return NGX_OK;
}


static void
ngx_http_token_meter_event(void *data, ngx_http_token_meter_json_scan_t *json)
{
    ngx_http_token_meter_ctx_t  *ctx = data;

    ctx->event_done = 1;
    ctx->event_strip = 0;

    /*
     * Responses API streams repeat the text of their ".delta" events in
     * ".done" and "response.completed" events: only deltas are counted
     */

    if (!ctx->sse->repeat) {
        ctx->seen.ascii += json->text.ascii;
        ctx->seen.other += json->text.other;
    }

    if (!json->captured) {
        return;
    }

    ngx_http_token_meter_usage(ctx, json);

    /*
     * the usage-only chunk has no choices, content chunks keep theirs; it
     * goes even when its usage cannot be believed
     */

    if (ctx->strip_usage && !json->choice) {
        ctx->event_strip = 1;
    }
}


static void
ngx_http_token_meter_usage(ngx_http_token_meter_ctx_t *ctx,
    ngx_http_token_meter_json_scan_t *json)
{
    ngx_http_token_meter_usage_t  usage;

    if (ngx_http_token_meter_usage_parse(json->usage, json->usage_len, &usage)
        == NGX_OK)
    {
        ctx->usage = usage;
        ctx->usage_found = 1;
    }
}


/*
 * Called when the request ends, also when the client went away before
 * the answer did: takes in what the scanners saw of an unfinished answer.
 */

void
ngx_http_token_meter_filter_finish(ngx_http_request_t *r,
    ngx_http_token_meter_ctx_t *ctx)
{
    if (ctx->json) {
        ctx->seen.ascii += ctx->json->text.ascii;
        ctx->seen.other += ctx->json->text.other;

        if (ctx->json->captured && !ctx->usage_found) {
            ngx_http_token_meter_usage(ctx, ctx->json);
        }

        ctx->json = NULL;
    }

    if (ctx->sse) {
        ctx->seen.ascii += ctx->sse->json.text.ascii;
        ctx->seen.other += ctx->sse->json.text.other;
        ctx->sse = NULL;
    }
}
