
/*
 * Copyright (C) The ngx_http_token_meter_module authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_token_meter_module.h"
#include "ngx_http_token_meter_account.h"


/*
 * Reservation and settlement.  The requests of one turn of the event loop
 * share one write transaction: a reservation waits for it (the request
 * resumes once it is committed), a settlement is worked out in the log
 * phase on a read transaction, so that the log line carries its figures,
 * and written with the others.  A batch that cannot be committed is
 * written again one request at a time, so that one bad entry costs only
 * itself.
 */


#define NGX_HTTP_TOKEN_METER_BATCH  128


typedef struct {
    ngx_http_token_meter_main_conf_t    *tmcf;
    uint64_t                             subscriber;

    /* a reservation: its request is ctx->request */
    ngx_http_token_meter_ctx_t          *ctx;
    int64_t                              allowance;
    int64_t                              points;
    int64_t                              available;

    /* a settlement */
    ngx_http_token_meter_model_t        *model;
    ngx_http_token_meter_record_t        record;
    int64_t                              logged;

    ngx_int_t                            rc;
} ngx_http_token_meter_entry_t;


typedef struct {
    ngx_uint_t                           n;
    ngx_event_t                          event;
    ngx_queue_t                          admitted;
    ngx_http_token_meter_entry_t         entry[NGX_HTTP_TOKEN_METER_BATCH];
} ngx_http_token_meter_batch_t;


static ngx_uint_t ngx_http_token_meter_pending(uint64_t subscriber);
static ngx_http_token_meter_entry_t *ngx_http_token_meter_enqueue(
    ngx_http_token_meter_main_conf_t *tmcf, uint64_t subscriber);
static void ngx_http_token_meter_flush_handler(ngx_event_t *ev);
static ngx_int_t ngx_http_token_meter_write(
    ngx_http_token_meter_main_conf_t *tmcf,
    ngx_http_token_meter_entry_t *entry, ngx_uint_t n);
static ngx_int_t ngx_http_token_meter_apply(ngx_http_token_meter_txn_t *txn,
    ngx_http_token_meter_entry_t *entry);
static ngx_int_t ngx_http_token_meter_reserve_txn(
    ngx_http_token_meter_txn_t *txn, ngx_http_token_meter_entry_t *entry);
static ngx_int_t ngx_http_token_meter_settle_txn(
    ngx_http_token_meter_txn_t *txn, ngx_http_token_meter_entry_t *entry);
static void ngx_http_token_meter_settled(ngx_http_token_meter_entry_t *entry,
    ngx_msec_int_t usec);
static ngx_int_t ngx_http_token_meter_preview(ngx_http_request_t *r,
    ngx_http_token_meter_ctx_t *ctx, int64_t cost,
    ngx_http_token_meter_record_t *rec);
static ngx_int_t ngx_http_token_meter_record_put(
    ngx_http_token_meter_txn_t *txn, ngx_http_token_meter_record_t *rec);
static ngx_int_t ngx_http_token_meter_charge(ngx_http_token_meter_txn_t *txn,
    u_char *request_id, uint64_t subscriber, int64_t cost,
    ngx_uint_t release, ngx_http_token_meter_subscriber_t *sub,
    ngx_http_token_meter_balance_t *balance, int64_t *charge);
static ngx_int_t ngx_http_token_meter_reservation(
    ngx_http_token_meter_txn_t *txn, u_char *request_id, ngx_uint_t del,
    ngx_http_token_meter_reservation_t *res);
static ngx_int_t ngx_http_token_meter_release(
    ngx_http_token_meter_txn_t *txn, u_char *request_id,
    ngx_http_token_meter_reservation_t *res);


static ngx_http_token_meter_batch_t  ngx_http_token_meter_batch;


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
    ngx_http_token_meter_entry_t      *entry;
    ngx_http_token_meter_main_conf_t  *tmcf;

    tmcf = ngx_http_get_module_main_conf(r, ngx_http_token_meter_module);

    /*
     * A request admitted must be settled: new requests are refused while
     * the store has less room left than its settlements may take
     */

    if (ngx_http_token_meter_store_room(tmcf->store, r->connection->log)
        != NGX_OK)
    {
        return NGX_HTTP_TOKEN_METER_FULL;
    }

    ctx->request = r;
    ctx->resume = resume;

    entry = ngx_http_token_meter_enqueue(tmcf, ctx->subscriber);
    entry->ctx = ctx;

    return NGX_AGAIN;
}


ngx_int_t
ngx_http_token_meter_settle(ngx_http_request_t *r,
    ngx_http_token_meter_ctx_t *ctx)
{
    int64_t                             cost;
    ngx_time_t                         *tp;
    ngx_http_token_meter_entry_t       *entry;
    ngx_http_token_meter_record_t       rec;
    ngx_http_token_meter_main_conf_t   *tmcf;

    if (ctx->settled || !ctx->admitted) {
        return NGX_OK;
    }

    ctx->settled = 1;

    tmcf = ngx_http_get_module_main_conf(r, ngx_http_token_meter_module);

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

    /*
     * The figures are worked out on what is committed: a request of the
     * same subscriber still waiting in the batch would change them
     */

    if (ngx_http_token_meter_pending(ctx->subscriber)) {
        ngx_http_token_meter_flush();
    }

    ngx_memzero(&rec, sizeof(ngx_http_token_meter_record_t));

    ngx_memcpy(rec.request_id, ctx->request_id, 16);
    rec.subscriber = ctx->subscriber;
    tp = ngx_timeofday();
    rec.time = (int64_t) tp->sec * 1000 + tp->msec;
    rec.input = ctx->usage.input;
    rec.cached = ctx->usage.cached;
    rec.output = ctx->usage.output;
    rec.cost = cost;
    rec.status = (uint32_t) ctx->status;
    rec.source = (uint32_t) ctx->source;
    ngx_memcpy(rec.model, ctx->model->name.data,
               ngx_min(ctx->model->name.len, sizeof(rec.model)));

    entry = ngx_http_token_meter_enqueue(tmcf, ctx->subscriber);

    entry->model = ctx->model;
    entry->record = rec;
    entry->logged = -1;

    if (ngx_http_token_meter_preview(r, ctx, cost, &entry->record) == NGX_OK) {
        entry->logged = ctx->points;
    }

    return NGX_OK;
}


/*
 * A request of the subscriber waits in the batch: its figures are not in
 * the store yet
 */

static ngx_uint_t
ngx_http_token_meter_pending(uint64_t subscriber)
{
    ngx_uint_t                     i;
    ngx_http_token_meter_batch_t  *batch;

    batch = &ngx_http_token_meter_batch;

    for (i = 0; i < batch->n; i++) {
        if (batch->entry[i].subscriber == subscriber) {
            return 1;
        }
    }

    return 0;
}


static ngx_http_token_meter_entry_t *
ngx_http_token_meter_enqueue(ngx_http_token_meter_main_conf_t *tmcf,
    uint64_t subscriber)
{
    ngx_http_token_meter_entry_t  *entry;
    ngx_http_token_meter_batch_t  *batch;

    batch = &ngx_http_token_meter_batch;

    if (batch->n == NGX_HTTP_TOKEN_METER_BATCH
        || (batch->n && batch->entry[0].tmcf != tmcf))
    {
        ngx_http_token_meter_flush();
    }

    entry = &batch->entry[batch->n++];

    ngx_memzero(entry, sizeof(ngx_http_token_meter_entry_t));

    entry->tmcf = tmcf;
    entry->subscriber = subscriber;

    if (batch->event.handler == NULL) {
        batch->event.handler = ngx_http_token_meter_flush_handler;
        batch->event.log = ngx_cycle->log;
        ngx_queue_init(&batch->admitted);
    }

    if (!batch->event.posted) {
        ngx_post_event(&batch->event, &ngx_posted_events);
    }

    return entry;
}


/*
 * The end of the event loop turn: the batch is written, and the requests
 * whose reservations it held go on.  They go on only from here, never
 * from inside another request's handler that wrote the batch early.
 */

static void
ngx_http_token_meter_flush_handler(ngx_event_t *ev)
{
    ngx_queue_t                   *q;
    ngx_connection_t              *c;
    ngx_http_request_t            *r;
    ngx_http_token_meter_ctx_t    *ctx;
    ngx_http_token_meter_batch_t  *batch;

    batch = &ngx_http_token_meter_batch;

    ngx_http_token_meter_flush();

    /* a request that goes on may fill a new batch, written next turn */

    while (!ngx_queue_empty(&batch->admitted)) {
        q = ngx_queue_head(&batch->admitted);
        ngx_queue_remove(q);

        ctx = ngx_queue_data(q, ngx_http_token_meter_ctx_t, queue);
        r = ctx->request;
        c = r->connection;

        ctx->resume(r, ctx->reserve_rc);

        ngx_http_run_posted_requests(c);
    }
}


/*
 * Writes what the batch holds.  Called at the end of the event loop
 * turn, and before anything that must see every settlement made so far.
 */

void
ngx_http_token_meter_flush(void)
{
    ngx_uint_t                         i, n;
    struct timespec                    start, stop;
    ngx_msec_int_t                     usec;
    ngx_http_token_meter_ctx_t        *ctx;
    ngx_http_token_meter_batch_t      *batch;
    ngx_http_token_meter_entry_t      *entry;
    ngx_http_token_meter_main_conf_t  *tmcf;

    batch = &ngx_http_token_meter_batch;

    n = batch->n;

    if (n == 0) {
        return;
    }

    entry = batch->entry;
    tmcf = entry[0].tmcf;

    clock_gettime(CLOCK_MONOTONIC, &start);

    if (ngx_http_token_meter_write(tmcf, entry, n) != NGX_OK) {

        /* one at a time, so that what can be written is */

        for (i = 0; i < n; i++) {
            (void) ngx_http_token_meter_write(tmcf, &entry[i], 1);
        }
    }

    clock_gettime(CLOCK_MONOTONIC, &stop);

    usec = (stop.tv_sec - start.tv_sec) * 1000000
           + (stop.tv_nsec - start.tv_nsec) / 1000;

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, ngx_cycle->log, 0,
                   "token meter wrote %ui entries in %M us", n, usec);

    batch->n = 0;

    for (i = 0; i < n; i++) {

        if (entry[i].ctx == NULL) {
            ngx_http_token_meter_settled(&entry[i], usec);
            continue;
        }

        ctx = entry[i].ctx;

        if (entry[i].rc == NGX_OK) {
            ctx->allowance = entry[i].allowance;
            ctx->reserved = entry[i].points;
            ctx->balance = entry[i].available - entry[i].points;

            ngx_log_debug3(NGX_LOG_DEBUG_HTTP,
                           ctx->request->connection->log, 0,
                           "token meter reserved %L points for sub_%uL, "
                           "%L left", ctx->reserved, ctx->subscriber,
                           ctx->balance);

        } else if (entry[i].rc == NGX_DECLINED) {
            ctx->balance = entry[i].available;
        }

        ctx->reserve_rc = entry[i].rc;

        ngx_queue_insert_tail(&batch->admitted, &ctx->queue);
    }

    if (!ngx_queue_empty(&batch->admitted) && !batch->event.posted) {
        ngx_post_event(&batch->event, &ngx_posted_events);
    }
}


/*
 * Writes entries in one transaction.  A failure of the store leaves them
 * unwritten and is returned; each entry has its own answer in rc.
 */

static ngx_int_t
ngx_http_token_meter_write(ngx_http_token_meter_main_conf_t *tmcf,
    ngx_http_token_meter_entry_t *entry, ngx_uint_t n)
{
    ngx_int_t                    rc;
    ngx_uint_t                   i, changed;
    ngx_http_token_meter_txn_t  *txn;

    rc = ngx_http_token_meter_txn_begin(tmcf->store, &txn, 1, ngx_cycle->log);
    if (rc != NGX_OK) {
        goto failed;
    }

    changed = 0;

    for (i = 0; i < n; i++) {
        rc = ngx_http_token_meter_apply(txn, &entry[i]);

        switch (rc) {

        case NGX_OK:
            changed = 1;
            break;

        case NGX_DECLINED:
        case NGX_DONE:
        case NGX_HTTP_FORBIDDEN:
            break;

        default:
            ngx_http_token_meter_txn_abort(txn);
            goto failed;
        }

        entry[i].rc = rc;
    }

    if (!changed) {
        ngx_http_token_meter_txn_abort(txn);
        return NGX_OK;
    }

    rc = ngx_http_token_meter_txn_commit(txn);
    if (rc == NGX_OK) {
        return NGX_OK;
    }

failed:

    for (i = 0; i < n; i++) {
        entry[i].rc = NGX_ERROR;
    }

    return rc;
}


static ngx_int_t
ngx_http_token_meter_apply(ngx_http_token_meter_txn_t *txn,
    ngx_http_token_meter_entry_t *entry)
{
    if (entry->ctx) {
        return ngx_http_token_meter_reserve_txn(txn, entry);
    }

    return ngx_http_token_meter_settle_txn(txn, entry);
}


static ngx_int_t
ngx_http_token_meter_reserve_txn(ngx_http_token_meter_txn_t *txn,
    ngx_http_token_meter_entry_t *entry)
{
    int64_t                              input, need, afford;
    time_t                               now;
    ngx_int_t                            rc;
    ngx_http_token_meter_ctx_t          *ctx;
    ngx_http_token_meter_model_t        *model;
    ngx_http_token_meter_balance_t       balance;
    ngx_http_token_meter_subscriber_t    sub;
    ngx_http_token_meter_reservation_t   res;

    ctx = entry->ctx;
    model = ctx->model;
    now = ngx_time();

    rc = ngx_http_token_meter_subscriber_get(txn, ctx->subscriber, &sub);
    if (rc != NGX_OK) {
        return rc;
    }

    if (sub.status != NGX_HTTP_TOKEN_METER_ACTIVE) {
        return NGX_HTTP_FORBIDDEN;
    }

    rc = ngx_http_token_meter_balance(txn, &sub, now, &balance);
    if (rc != NGX_OK) {
        return rc;
    }

    entry->available = balance.available;
    entry->allowance = ctx->allowance;

    input = ctx->input_estimate * model->input;

    /* each of "n" choices may take the whole allowance */

    need = (input + ctx->allowance * ctx->choices * model->output
            + NGX_HTTP_TOKEN_METER_PRICE_SCALE - 1)
           / NGX_HTTP_TOKEN_METER_PRICE_SCALE;

    if (need > balance.available) {

        if (ctx->embeddings || !entry->tmcf->lower_max_tokens
            || model->output == 0)
        {
            return NGX_DECLINED;
        }

        /* the most output the balance pays for, after the input */

        afford = (balance.available * NGX_HTTP_TOKEN_METER_PRICE_SCALE
                  - input) / (model->output * ctx->choices);

        if (afford < 1) {
            return NGX_DECLINED;
        }

        ngx_log_debug3(NGX_LOG_DEBUG_HTTP, ngx_cycle->log, 0,
                       "token meter lowers max tokens from %L to %L "
                       "for sub_%uL", ctx->allowance, afford, sub.id);

        entry->allowance = afford;

        need = (input + afford * ctx->choices * model->output
                + NGX_HTTP_TOKEN_METER_PRICE_SCALE - 1)
               / NGX_HTTP_TOKEN_METER_PRICE_SCALE;
    }

    sub.reserved += need;

    rc = ngx_http_token_meter_subscriber_put(txn, &sub);
    if (rc != NGX_OK) {
        return rc;
    }

    res.subscriber = sub.id;
    res.points = need;
    res.created = now;
    res.deadline = now + entry->tmcf->reservation_timeout;
    res.pid = ngx_pid;

    rc = ngx_http_token_meter_put(txn, NGX_HTTP_TOKEN_METER_DB_RESERVATIONS,
                                  ctx->request_id, 16, &res, sizeof(res), 1);
    if (rc != NGX_OK) {
        return rc;
    }

    entry->points = need;

    return NGX_OK;
}


static ngx_int_t
ngx_http_token_meter_settle_txn(ngx_http_token_meter_txn_t *txn,
    ngx_http_token_meter_entry_t *entry)
{
    int64_t                              charge;
    ngx_int_t                            rc;
    ngx_str_t                            v;
    ngx_http_token_meter_record_t       *rec;
    ngx_http_token_meter_balance_t       balance;
    ngx_http_token_meter_subscriber_t    sub;

    rec = &entry->record;

    /* a request is settled once: its record is keyed by the request id */

    rc = ngx_http_token_meter_get(txn, NGX_HTTP_TOKEN_METER_DB_USAGE,
                                  rec->request_id, 16, &v);
    if (rc == NGX_OK) {
        return NGX_DONE;
    }

    if (rc != NGX_DECLINED) {
        return rc;
    }

    rc = ngx_http_token_meter_charge(txn, rec->request_id, rec->subscriber,
                                     rec->cost, 1, &sub, &balance, &charge);
    if (rc != NGX_OK) {
        return rc;
    }

    rec->from_grants = 0;
    rec->from_paid = 0;

    if (charge > 0) {
        rc = ngx_http_token_meter_debit(txn, &sub, charge, ngx_time(),
                                        &rec->from_grants, &rec->from_paid);
        if (rc != NGX_OK) {
            return rc;
        }
    }

    rc = ngx_http_token_meter_subscriber_put(txn, &sub);
    if (rc != NGX_OK) {
        return rc;
    }

    rec->points = rec->from_grants + rec->from_paid;
    ngx_memcpy(rec->msisdn, sub.msisdn, NGX_HTTP_TOKEN_METER_MSISDN_LEN);

    return ngx_http_token_meter_record_put(txn, rec);
}


static void
ngx_http_token_meter_settled(ngx_http_token_meter_entry_t *entry,
    ngx_msec_int_t usec)
{
    ngx_http_token_meter_record_t  *rec;

    rec = &entry->record;

    if (entry->rc == NGX_DONE) {
        return;
    }

    if (entry->rc != NGX_OK) {

        /* TODO: keep a settlement that cannot be written, and retry it */

        ngx_log_error(NGX_LOG_CRIT, ngx_cycle->log, 0,
                      "token meter could not settle request for sub_%uL: "
                      "its reservation stays until the sweep releases it, "
                      "and %L points are not charged", rec->subscriber,
                      rec->cost);
        return;
    }

    ngx_http_token_meter_count_settled(entry->tmcf, entry->model, rec, usec);

    if (rec->points < rec->cost) {
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "token meter charged %L of %L points to sub_%uL: "
                      "the balance ran out", rec->points, rec->cost,
                      rec->subscriber);
    }

    if (entry->logged >= 0 && entry->logged != rec->points) {
        ngx_log_error(NGX_LOG_NOTICE, ngx_cycle->log, 0,
                      "token meter charged %L points to sub_%uL, not the %L "
                      "its request was logged with: the balance changed "
                      "meanwhile", rec->points, rec->subscriber,
                      entry->logged);
    }

    ngx_log_debug6(NGX_LOG_DEBUG_HTTP, ngx_cycle->log, 0,
                   "token meter settled sub_%uL: in %L cached %L out %L, "
                   "%L points of %L", rec->subscriber, rec->input,
                   rec->cached, rec->output, rec->points, rec->cost);
}


/*
 * What the settlement will charge, read from the committed store for the
 * request's variables and log line: the same steps as the settlement
 * itself, without writing.
 */

static ngx_int_t
ngx_http_token_meter_preview(ngx_http_request_t *r,
    ngx_http_token_meter_ctx_t *ctx, int64_t cost,
    ngx_http_token_meter_record_t *rec)
{
    int64_t                              charge;
    ngx_int_t                            rc;
    ngx_http_token_meter_txn_t          *txn;
    ngx_http_token_meter_balance_t       balance;
    ngx_http_token_meter_main_conf_t    *tmcf;
    ngx_http_token_meter_subscriber_t    sub;

    tmcf = ngx_http_get_module_main_conf(r, ngx_http_token_meter_module);

    rc = ngx_http_token_meter_txn_begin(tmcf->store, &txn, 0,
                                        r->connection->log);
    if (rc != NGX_OK) {
        return rc;
    }

    rc = ngx_http_token_meter_charge(txn, ctx->request_id, ctx->subscriber,
                                     cost, 0, &sub, &balance, &charge);

    ngx_http_token_meter_txn_abort(txn);

    if (rc != NGX_OK) {
        return rc;
    }

    /* grants first, as the debit takes them */

    ctx->from_grants = ngx_min(charge, balance.grants);
    ctx->from_paid = charge - ctx->from_grants;
    ctx->points = charge;
    ctx->balance = balance.available - charge;

    ngx_memcpy(rec->msisdn, sub.msisdn, NGX_HTTP_TOKEN_METER_MSISDN_LEN);

    return NGX_OK;
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
 * The subscriber as it stands once the request's reservation is given
 * back, its balance then, and what "cost" comes to against it: never
 * below zero, since the reservation covered all but a wrong estimate.
 * With "release" the reservation is deleted as well; the caller stores
 * the subscriber.  The settlement and the log phase's preview of it both
 * take these steps, so that they come to the same charge.
 */

static ngx_int_t
ngx_http_token_meter_charge(ngx_http_token_meter_txn_t *txn,
    u_char *request_id, uint64_t subscriber, int64_t cost,
    ngx_uint_t release, ngx_http_token_meter_subscriber_t *sub,
    ngx_http_token_meter_balance_t *balance, int64_t *charge)
{
    ngx_int_t                           rc;
    ngx_http_token_meter_reservation_t  res;

    rc = ngx_http_token_meter_reservation(txn, request_id, release, &res);

    if (rc == NGX_DECLINED) {
        /* the sweep released it already */
        res.points = 0;

    } else if (rc != NGX_OK) {
        return rc;
    }

    rc = ngx_http_token_meter_subscriber_get(txn, subscriber, sub);
    if (rc != NGX_OK) {
        return rc;
    }

    sub->reserved = ngx_max(sub->reserved - res.points, 0);

    rc = ngx_http_token_meter_balance(txn, sub, ngx_time(), balance);
    if (rc != NGX_OK) {
        return rc;
    }

    *charge = ngx_max(ngx_min(cost, balance->available), 0);

    return NGX_OK;
}


/*
 * Reads a request's reservation, and with "del" deletes it.
 * NGX_DECLINED: there is none.
 */

static ngx_int_t
ngx_http_token_meter_reservation(ngx_http_token_meter_txn_t *txn,
    u_char *request_id, ngx_uint_t del,
    ngx_http_token_meter_reservation_t *res)
{
    ngx_int_t  rc;
    ngx_str_t  v;

    rc = ngx_http_token_meter_get(txn, NGX_HTTP_TOKEN_METER_DB_RESERVATIONS,
                                  request_id, 16, &v);
    if (rc != NGX_OK) {
        return rc;
    }

    if (v.len != sizeof(ngx_http_token_meter_reservation_t)) {
        return NGX_ERROR;
    }

    ngx_memcpy(res, v.data, sizeof(ngx_http_token_meter_reservation_t));

    if (!del) {
        return NGX_OK;
    }

    return ngx_http_token_meter_del(txn, NGX_HTTP_TOKEN_METER_DB_RESERVATIONS,
                                    request_id, 16);
}


/*
 * Deletes a reservation and gives its points back to the subscriber.
 * NGX_DECLINED: there is none.
 */

static ngx_int_t
ngx_http_token_meter_release(ngx_http_token_meter_txn_t *txn,
    u_char *request_id, ngx_http_token_meter_reservation_t *res)
{
    ngx_int_t                           rc;
    ngx_http_token_meter_subscriber_t   sub;

    rc = ngx_http_token_meter_reservation(txn, request_id, 1, res);
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

    sub.reserved = ngx_max(sub.reserved - res->points, 0);

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
