
/*
 * Copyright (C) The ngx_http_token_meter_module authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_token_meter_module.h"
#include "ngx_http_token_meter_account.h"


/*
 * Reservation and settlement.  Both are called through functions that
 * may answer later (NGX_AGAIN, then the resume handler), so that a store
 * shared between edges can be put behind them; the LMDB store always
 * answers at once.
 */


static ngx_int_t ngx_http_token_meter_settle_txn(ngx_http_request_t *r,
    ngx_http_token_meter_ctx_t *ctx, int64_t cost, int64_t *available);
static ngx_int_t ngx_http_token_meter_record_put(
    ngx_http_token_meter_txn_t *txn, ngx_http_token_meter_record_t *rec);
static ngx_int_t ngx_http_token_meter_release(
    ngx_http_token_meter_txn_t *txn, u_char *request_id,
    ngx_http_token_meter_reservation_t *res);


int64_t
ngx_http_token_meter_cost(ngx_http_token_meter_model_t *model,
    ngx_http_token_meter_usage_t *usage)
{
    int64_t  milli;

    /* tokens are below 10^9 and prices below 10^7: no overflow */

    milli = (usage->input - usage->cached) * model->input
            + usage->cached * model->cached
            + usage->output * model->output;

    return (milli + NGX_HTTP_TOKEN_METER_PRICE_SCALE - 1)
           / NGX_HTTP_TOKEN_METER_PRICE_SCALE;
}


ngx_int_t
ngx_http_token_meter_reserve(ngx_http_request_t *r,
    ngx_http_token_meter_ctx_t *ctx, ngx_http_token_meter_resume_pt resume)
{
    int64_t                              input, need, afford;
    time_t                               now;
    ngx_int_t                            rc;
    ngx_http_token_meter_txn_t          *txn;
    ngx_http_token_meter_model_t        *model;
    ngx_http_token_meter_balance_t       balance;
    ngx_http_token_meter_main_conf_t    *tmcf;
    ngx_http_token_meter_subscriber_t    sub;
    ngx_http_token_meter_reservation_t   res;

    /*
     * TODO: a reservation costs a write transaction of its own; kept in
     * shared memory instead, it would leave LMDB one write per request
     * (docs/benchmarks.md, Suggestions)
     */

    tmcf = ngx_http_get_module_main_conf(r, ngx_http_token_meter_module);

    model = ctx->model;
    now = ngx_time();

    /*
     * A request admitted must be settled: new requests are refused while
     * the store has less room left than its settlements may take
     */

    if (ngx_http_token_meter_store_room(tmcf->store, r->connection->log)
        != NGX_OK)
    {
        return NGX_HTTP_TOKEN_METER_FULL;
    }

    rc = ngx_http_token_meter_txn_begin(tmcf->store, &txn, 1,
                                        r->connection->log);
    if (rc != NGX_OK) {
        return rc;
    }

    rc = ngx_http_token_meter_subscriber_get(txn, ctx->subscriber, &sub);
    if (rc != NGX_OK) {
        goto failed;
    }

    if (sub.status != NGX_HTTP_TOKEN_METER_ACTIVE) {
        rc = NGX_HTTP_FORBIDDEN;
        goto failed;
    }

    rc = ngx_http_token_meter_balance(txn, &sub, now, &balance);
    if (rc != NGX_OK) {
        goto failed;
    }

    input = ctx->input_estimate * model->input;

    /* each of "n" choices may take the whole allowance */

    need = (input + ctx->allowance * ctx->choices * model->output
            + NGX_HTTP_TOKEN_METER_PRICE_SCALE - 1)
           / NGX_HTTP_TOKEN_METER_PRICE_SCALE;

    if (need > balance.available) {

        if (ctx->embeddings || !tmcf->lower_max_tokens || model->output == 0)
        {
            rc = NGX_DECLINED;
            goto failed;
        }

        /* the most output the balance pays for, after the input */

        afford = (balance.available * NGX_HTTP_TOKEN_METER_PRICE_SCALE
                  - input) / (model->output * ctx->choices);

        if (afford < 1) {
            rc = NGX_DECLINED;
            goto failed;
        }

        ngx_log_debug3(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                       "token meter lowers max tokens from %L to %L "
                       "for sub_%uL", ctx->allowance, afford, sub.id);

        ctx->allowance = afford;

        need = (input + afford * ctx->choices * model->output
                + NGX_HTTP_TOKEN_METER_PRICE_SCALE - 1)
               / NGX_HTTP_TOKEN_METER_PRICE_SCALE;
    }

    sub.reserved += need;

    rc = ngx_http_token_meter_subscriber_put(txn, &sub);
    if (rc != NGX_OK) {
        goto failed;
    }

    res.subscriber = sub.id;
    res.points = need;
    res.created = now;
    res.deadline = now + tmcf->reservation_timeout;
    res.pid = ngx_pid;

    rc = ngx_http_token_meter_put(txn, NGX_HTTP_TOKEN_METER_DB_RESERVATIONS,
                                  ctx->request_id, 16, &res, sizeof(res), 1);
    if (rc != NGX_OK) {
        goto failed;
    }

    rc = ngx_http_token_meter_txn_commit(txn);
    if (rc != NGX_OK) {
        return rc;
    }

    ctx->reserved = need;
    ctx->balance = balance.available - need;

    ngx_log_debug3(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "token meter reserved %L points for sub_%uL, %L left",
                   need, sub.id, ctx->balance);

    return NGX_OK;

failed:

    ngx_http_token_meter_txn_abort(txn);

    if (rc == NGX_DECLINED) {
        ctx->balance = balance.available;
    }

    return rc;
}


ngx_int_t
ngx_http_token_meter_settle(ngx_http_request_t *r,
    ngx_http_token_meter_ctx_t *ctx)
{
    int64_t          cost, available;
    ngx_int_t        rc;
    struct timespec  start, stop;

    if (ctx->settled || !ctx->admitted) {
        return NGX_OK;
    }

    ctx->settled = 1;

    if (ctx->usage_found) {
        ctx->source = NGX_HTTP_TOKEN_METER_SOURCE_UPSTREAM;

    } else if (ctx->status >= 200 && ctx->status < 300) {

        /*
         * the upstream answered but gave no usage, or the answer was cut:
         * charge the estimated input and the output seen so far
         */

        ctx->source = NGX_HTTP_TOKEN_METER_SOURCE_ESTIMATED;
        ctx->usage.input = ctx->input_estimate;
        ctx->usage.cached = 0;
        ctx->usage.output = ctx->embeddings
                            ? 0 : ngx_http_token_meter_text_tokens(&ctx->seen);

    } else {
        /* an error, or no answer at all: nothing is charged */
        ctx->source = NGX_HTTP_TOKEN_METER_SOURCE_ESTIMATED;
        ngx_memzero(&ctx->usage, sizeof(ngx_http_token_meter_usage_t));
    }

    cost = ngx_http_token_meter_cost(ctx->model, &ctx->usage);

    clock_gettime(CLOCK_MONOTONIC, &start);

    rc = ngx_http_token_meter_settle_txn(r, ctx, cost, &available);

    clock_gettime(CLOCK_MONOTONIC, &stop);

    if (rc == NGX_DONE) {
        return NGX_OK;
    }

    if (rc != NGX_OK) {

        /* TODO: keep a settlement that cannot be written, and retry it */

        ngx_log_error(NGX_LOG_CRIT, r->connection->log, 0,
                      "token meter could not settle request for sub_%uL: "
                      "its reservation of %L points stays until the sweep "
                      "releases it, and %L points are not charged",
                      ctx->subscriber, ctx->reserved, cost);
        return rc;
    }

    ctx->balance = available - ctx->points;

    ngx_http_token_meter_count_settled(r, ctx,
                       (stop.tv_sec - start.tv_sec) * 1000000
                       + (stop.tv_nsec - start.tv_nsec) / 1000);

    if (ctx->points < cost) {
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "token meter charged %L of %L points to sub_%uL: "
                      "the balance ran out", ctx->points, cost,
                      ctx->subscriber);
    }

    ngx_log_debug6(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "token meter settled sub_%uL: in %L cached %L out %L, "
                   "%L points, %L left", ctx->subscriber, ctx->usage.input,
                   ctx->usage.cached, ctx->usage.output, ctx->points,
                   ctx->balance);

    return NGX_OK;
}


static ngx_int_t
ngx_http_token_meter_settle_txn(ngx_http_request_t *r,
    ngx_http_token_meter_ctx_t *ctx, int64_t cost, int64_t *available)
{
    int64_t                              charge;
    ngx_int_t                            rc;
    ngx_str_t                            v;
    ngx_time_t                          *tp;
    ngx_http_token_meter_txn_t          *txn;
    ngx_http_token_meter_record_t        rec;
    ngx_http_token_meter_balance_t       balance;
    ngx_http_token_meter_main_conf_t    *tmcf;
    ngx_http_token_meter_subscriber_t    sub;
    ngx_http_token_meter_reservation_t   res;

    /*
     * TODO: settle the requests that end in one turn of the event loop in
     * one write transaction
     */

    tmcf = ngx_http_get_module_main_conf(r, ngx_http_token_meter_module);

    rc = ngx_http_token_meter_txn_begin(tmcf->store, &txn, 1,
                                        r->connection->log);
    if (rc != NGX_OK) {
        return rc;
    }

    /* a request is settled once: its record is keyed by the request id */

    rc = ngx_http_token_meter_get(txn, NGX_HTTP_TOKEN_METER_DB_USAGE,
                                  ctx->request_id, 16, &v);
    if (rc == NGX_OK) {
        ngx_http_token_meter_txn_abort(txn);
        return NGX_DONE;
    }

    if (rc != NGX_DECLINED) {
        goto failed;
    }

    rc = ngx_http_token_meter_release(txn, ctx->request_id, &res);
    if (rc != NGX_OK && rc != NGX_DECLINED) {
        goto failed;
    }

    rc = ngx_http_token_meter_subscriber_get(txn, ctx->subscriber, &sub);
    if (rc != NGX_OK) {
        goto failed;
    }

    rc = ngx_http_token_meter_balance(txn, &sub, ngx_time(), &balance);
    if (rc != NGX_OK) {
        goto failed;
    }

    /* never below zero: the reservation covered all but a wrong estimate */

    charge = ngx_min(cost, balance.available);

    ngx_memzero(&rec, sizeof(ngx_http_token_meter_record_t));

    if (charge > 0) {
        rc = ngx_http_token_meter_debit(txn, &sub, charge, ngx_time(),
                                        &rec.from_grants, &rec.from_paid);
        if (rc != NGX_OK) {
            goto failed;
        }

        rc = ngx_http_token_meter_subscriber_put(txn, &sub);
        if (rc != NGX_OK) {
            goto failed;
        }
    }

    ngx_memcpy(rec.request_id, ctx->request_id, 16);
    rec.subscriber = sub.id;
    tp = ngx_timeofday();
    rec.time = (int64_t) tp->sec * 1000 + tp->msec;
    rec.input = ctx->usage.input;
    rec.cached = ctx->usage.cached;
    rec.output = ctx->usage.output;
    rec.cost = cost;
    rec.points = rec.from_grants + rec.from_paid;
    rec.status = (uint32_t) ctx->status;
    rec.source = (uint32_t) ctx->source;
    ngx_memcpy(rec.msisdn, sub.msisdn, NGX_HTTP_TOKEN_METER_MSISDN_LEN);
    ngx_memcpy(rec.model, ctx->model->name.data,
               ngx_min(ctx->model->name.len, sizeof(rec.model)));

    rc = ngx_http_token_meter_record_put(txn, &rec);
    if (rc != NGX_OK) {
        goto failed;
    }

    rc = ngx_http_token_meter_txn_commit(txn);
    if (rc != NGX_OK) {
        return rc;
    }

    ctx->points = rec.points;
    ctx->from_grants = rec.from_grants;
    ctx->from_paid = rec.from_paid;
    *available = balance.available;

    return NGX_OK;

failed:

    ngx_http_token_meter_txn_abort(txn);

    return rc;
}


static ngx_int_t
ngx_http_token_meter_record_put(ngx_http_token_meter_txn_t *txn,
    ngx_http_token_meter_record_t *rec)
{
    u_char     key[32], sub[8];
    ngx_int_t  rc;

    rc = ngx_http_token_meter_put(txn, NGX_HTTP_TOKEN_METER_DB_USAGE,
                                  rec->request_id, 16, rec,
                                  sizeof(ngx_http_token_meter_record_t), 1);
    if (rc != NGX_OK) {
        return rc;
    }

    ngx_http_token_meter_put_u64(sub, rec->subscriber);

    ngx_http_token_meter_put_u64(key, (uint64_t) rec->time);
    ngx_memcpy(key + 8, rec->request_id, 16);

    rc = ngx_http_token_meter_put(txn, NGX_HTTP_TOKEN_METER_DB_USAGE_TIME,
                                  key, 24, sub, 8, 0);
    if (rc != NGX_OK) {
        return rc;
    }

    ngx_http_token_meter_put_u64(key, rec->subscriber);
    ngx_http_token_meter_put_u64(key + 8, (uint64_t) rec->time);
    ngx_memcpy(key + 16, rec->request_id, 16);

    return ngx_http_token_meter_put(txn,
                                    NGX_HTTP_TOKEN_METER_DB_USAGE_SUBSCRIBER,
                                    key, 32, "", 0, 0);
}


/*
 * Deletes a reservation and gives its points back to the subscriber.
 * NGX_DECLINED: there is none (the sweep released it already).
 */

static ngx_int_t
ngx_http_token_meter_release(ngx_http_token_meter_txn_t *txn,
    u_char *request_id, ngx_http_token_meter_reservation_t *res)
{
    ngx_int_t                           rc;
    ngx_str_t                           v;
    ngx_http_token_meter_subscriber_t   sub;

    rc = ngx_http_token_meter_get(txn, NGX_HTTP_TOKEN_METER_DB_RESERVATIONS,
                                  request_id, 16, &v);
    if (rc != NGX_OK) {
        return rc;
    }

    if (v.len != sizeof(ngx_http_token_meter_reservation_t)) {
        return NGX_ERROR;
    }

    ngx_memcpy(res, v.data, sizeof(ngx_http_token_meter_reservation_t));

    rc = ngx_http_token_meter_del(txn, NGX_HTTP_TOKEN_METER_DB_RESERVATIONS,
                                  request_id, 16);
    if (rc != NGX_OK) {
        return rc;
    }

    rc = ngx_http_token_meter_subscriber_get(txn, res->subscriber, &sub);
    if (rc == NGX_DECLINED) {
        return NGX_OK;
    }

    if (rc != NGX_OK) {
        return rc;
    }

    sub.reserved -= res->points;

    if (sub.reserved < 0) {
        sub.reserved = 0;
    }

    return ngx_http_token_meter_subscriber_put(txn, &sub);
}


/*
 * Releases the reservations of requests that will never be settled: those
 * of a worker process that no longer exists, and those past their
 * deadline.  Runs in one worker.
 */

void
ngx_http_token_meter_sweep(ngx_http_token_meter_main_conf_t *tmcf,
    ngx_log_t *log)
{
    time_t                               now;
    ngx_int_t                            rc;
    ngx_str_t                            k, v;
    ngx_uint_t                           i, n, dead[64];
    ngx_http_token_meter_txn_t          *txn;
    ngx_http_token_meter_cursor_t       *cur;
    ngx_http_token_meter_reservation_t   res;
    u_char                               id[64][16];

    if (ngx_http_token_meter_txn_begin(tmcf->store, &txn, 1, log) != NGX_OK) {
        return;
    }

    if (ngx_http_token_meter_cursor_open(txn,
                                         NGX_HTTP_TOKEN_METER_DB_RESERVATIONS,
                                         &cur)
        != NGX_OK)
    {
        ngx_http_token_meter_txn_abort(txn);
        return;
    }

    /* collect first, release after: deleting under a cursor moves it */

    now = ngx_time();
    n = 0;

    for (rc = ngx_http_token_meter_cursor_seek(cur, NULL, 0, &k, &v);
         rc == NGX_OK && n < 64;
         rc = ngx_http_token_meter_cursor_next(cur, &k, &v))
    {
        if (k.len != 16 || v.len != sizeof(res)) {
            continue;
        }

        ngx_memcpy(&res, v.data, sizeof(res));

        dead[n] = (res.pid != ngx_pid && kill((ngx_pid_t) res.pid, 0) == -1
                   && ngx_errno == NGX_ESRCH);

        if (dead[n] || res.deadline <= now) {
            ngx_memcpy(id[n], k.data, 16);
            n++;
        }
    }

    ngx_http_token_meter_cursor_close(cur);

    if (n == 0) {
        ngx_http_token_meter_txn_abort(txn);
        return;
    }

    for (i = 0; i < n; i++) {
        rc = ngx_http_token_meter_release(txn, id[i], &res);
        if (rc != NGX_OK) {
            ngx_http_token_meter_txn_abort(txn);
            return;
        }

        ngx_log_error(NGX_LOG_NOTICE, log, 0,
                      "token meter released %L reserved points of sub_%uL: "
                      "%s", res.points, res.subscriber,
                      dead[i] ? "the worker process that held them exited"
                              : "the reservation expired");
    }

    (void) ngx_http_token_meter_txn_commit(txn);
}
