
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


#define NGX_HTTP_TOKEN_METER_PAGE_DEFAULT  100
#define NGX_HTTP_TOKEN_METER_PAGE_MAX      1000


typedef struct {
    ngx_str_t                   name;
    int64_t                     requests;
    int64_t                     input;
    int64_t                     cached;
    int64_t                     output;
    int64_t                     points;
} ngx_http_token_meter_model_sum_t;


typedef struct {
    ngx_str_node_t              node;
    u_char                      msisdn[NGX_HTTP_TOKEN_METER_MSISDN_LEN];
    int64_t                     purchases;
    int64_t                     fen;
    int64_t                     purchased;
    int64_t                     from_grants;
    int64_t                     from_paid;
    int64_t                     expired;
    int64_t                     requests;
    int64_t                     input;
    int64_t                     cached;
    int64_t                     output;
    ngx_array_t                 references;
    ngx_array_t                 models;
} ngx_http_token_meter_row_t;


typedef struct {
    ngx_pool_t                 *pool;
    ngx_rbtree_t                tree;
    ngx_rbtree_node_t           sentinel;
    ngx_array_t                 rows;
} ngx_http_token_meter_bill_t;


static ngx_int_t ngx_http_token_meter_arg(ngx_http_request_t *r, char *name,
    ngx_str_t *value);
static ngx_int_t ngx_http_token_meter_parse_time(ngx_str_t *s, int64_t *t);
static int64_t ngx_http_token_meter_days(int64_t y, int64_t m, int64_t d);
static json_t *ngx_http_token_meter_record_json(
    ngx_http_token_meter_record_t *rec);
static ngx_http_token_meter_row_t *ngx_http_token_meter_row(
    ngx_http_token_meter_bill_t *bill, u_char *msisdn);
static ngx_int_t ngx_http_token_meter_bill_usage(
    ngx_http_token_meter_txn_t *txn, ngx_http_token_meter_bill_t *bill,
    int64_t start, int64_t end);
static ngx_int_t ngx_http_token_meter_bill_purchases(
    ngx_http_token_meter_txn_t *txn, ngx_http_token_meter_bill_t *bill,
    int64_t start, int64_t end);
static ngx_int_t ngx_http_token_meter_bill_expired(
    ngx_http_token_meter_txn_t *txn, ngx_http_token_meter_bill_t *bill,
    int64_t start, int64_t end);
static int ngx_libc_cdecl ngx_http_token_meter_row_cmp(const void *a,
    const void *b);
static ngx_int_t ngx_http_token_meter_bill_json(ngx_http_request_t *r,
    ngx_http_token_meter_bill_t *bill, ngx_str_t *cycle, int64_t start,
    int64_t end);
static ngx_int_t ngx_http_token_meter_bill_csv(ngx_http_request_t *r,
    ngx_http_token_meter_bill_t *bill);
static u_char *ngx_http_token_meter_csv_field(u_char *p, ngx_str_t *s);
static u_char *ngx_http_token_meter_yuan(u_char *p, int64_t fen);


static char  *ngx_http_token_meter_sources[] = {
    "none", "upstream", "estimated"
};


/*
 * GET .../subscribers/{id}/usage?from=&to=&limit=&cursor=: the records of
 * one subscriber, oldest first; "cursor" continues after the last record
 * of the previous page.
 */

ngx_int_t
ngx_http_token_meter_usage_list(ngx_http_request_t *r,
    ngx_http_token_meter_txn_t *txn, uint64_t subscriber)
{
    u_char                          *p;
    json_t                          *json, *data, *rec;
    int64_t                          from, to, t;
    ngx_int_t                        rc, n, limit;
    ngx_str_t                        arg, k, v, cursor;
    ngx_uint_t                       i, count, more;
    ngx_http_token_meter_cursor_t   *cur;
    ngx_http_token_meter_record_t    record;
    u_char                           key[32], last[32];
    u_char                           hex[49];

    from = 0;
    to = -1;
    limit = NGX_HTTP_TOKEN_METER_PAGE_DEFAULT;

    if (ngx_http_token_meter_arg(r, "from", &arg) == NGX_OK
        && ngx_http_token_meter_parse_time(&arg, &from) != NGX_OK)
    {
        goto invalid;
    }

    if (ngx_http_token_meter_arg(r, "to", &arg) == NGX_OK
        && ngx_http_token_meter_parse_time(&arg, &to) != NGX_OK)
    {
        goto invalid;
    }

    if (ngx_http_token_meter_arg(r, "limit", &arg) == NGX_OK) {
        limit = ngx_atoi(arg.data, arg.len);

        if (limit < 1 || limit > NGX_HTTP_TOKEN_METER_PAGE_MAX) {
            goto invalid;
        }
    }

    ngx_http_token_meter_put_u64(key, subscriber);
    ngx_http_token_meter_put_u64(key + 8, (uint64_t) from * 1000);
    ngx_memzero(key + 16, 16);

    cursor.len = 0;

    if (ngx_http_token_meter_arg(r, "cursor", &cursor) == NGX_OK) {

        /* the cursor is the time and request id of the last record sent */

        if (cursor.len != 48) {
            goto invalid;
        }

        for (i = 0; i < 24; i++) {
            n = ngx_hextoi(cursor.data + 2 * i, 2);

            if (n == NGX_ERROR) {
                goto invalid;
            }

            key[8 + i] = (u_char) n;
        }
    }

    rc = ngx_http_token_meter_cursor_open(txn,
                                      NGX_HTTP_TOKEN_METER_DB_USAGE_SUBSCRIBER,
                                      &cur);
    if (rc != NGX_OK) {
        return ngx_http_token_meter_store_error(r, rc);
    }

    json = json_object();
    data = json_array();

    count = 0;
    more = 0;

    for (rc = ngx_http_token_meter_cursor_seek(cur, key, 32, &k, &v);
         rc == NGX_OK;
         rc = ngx_http_token_meter_cursor_next(cur, &k, &v))
    {
        if (k.len != 32 || ngx_memcmp(k.data, key, 8) != 0) {
            break;
        }

        if (cursor.len && ngx_memcmp(k.data, key, 32) == 0) {
            continue;
        }

        t = (int64_t) ngx_http_token_meter_get_u64(k.data + 8);

        if (to >= 0 && t >= to * 1000) {
            break;
        }

        if (count == (ngx_uint_t) limit) {
            more = 1;
            break;
        }

        rc = ngx_http_token_meter_get(txn, NGX_HTTP_TOKEN_METER_DB_USAGE,
                                      k.data + 16, 16, &v);
        if (rc != NGX_OK || v.len != sizeof(record)) {
            rc = NGX_ERROR;
            break;
        }

        ngx_memcpy(&record, v.data, sizeof(record));
        ngx_memcpy(last, k.data, 32);

        rec = ngx_http_token_meter_record_json(&record);

        if (rec == NULL || data == NULL
            || json_array_append_new(data, rec) != 0)
        {
            rc = NGX_ERROR;
            break;
        }

        count++;
    }

    ngx_http_token_meter_cursor_close(cur);

    if (rc == NGX_ERROR || rc == NGX_HTTP_TOKEN_METER_FULL) {
        if (json) {
            json_decref(json);
        }

        if (data) {
            json_decref(data);
        }

        return ngx_http_token_meter_store_error(r, rc);
    }

    ngx_http_token_meter_json_set(json, "object", json_string("list"));
    ngx_http_token_meter_json_set(json, "data", data);
    ngx_http_token_meter_json_set(json, "has_more", json_boolean(more));

    if (count) {
        p = ngx_hex_dump(hex, last + 8, 24);
        *p = '\0';
        ngx_http_token_meter_json_set(json, "next_cursor",
                                      json_string((char *) hex));

    } else {
        ngx_http_token_meter_json_set(json, "next_cursor", json_null());
    }

    if (json == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rc = ngx_http_token_meter_send_json(r, NGX_HTTP_OK, json);

    json_decref(json);

    return rc;

invalid:

    return ngx_http_token_meter_send_error(r, NGX_HTTP_BAD_REQUEST,
               "invalid_request_error", "invalid_query",
               "\"from\" and \"to\" take RFC 3339 times or Unix seconds, "
               "\"limit\" 1 to %d, \"cursor\" the \"next_cursor\" of a "
               "previous page", NGX_HTTP_TOKEN_METER_PAGE_MAX);
}


static json_t *
ngx_http_token_meter_record_json(ngx_http_token_meter_record_t *rec)
{
    u_char     *p;
    json_t     *json;
    ngx_tm_t    tm;
    u_char      buf[sizeof("2026-12-03T18:40:57.123Z")];
    u_char      id[32];

    json = json_object();

    ngx_hex_dump(id, rec->request_id, 16);

    ngx_gmtime((time_t) (rec->time / 1000), &tm);

    p = ngx_sprintf(buf, "%4d-%02d-%02dT%02d:%02d:%02d.%03LZ",
                    tm.ngx_tm_year, tm.ngx_tm_mon, tm.ngx_tm_mday,
                    tm.ngx_tm_hour, tm.ngx_tm_min, tm.ngx_tm_sec,
                    rec->time % 1000);

    ngx_http_token_meter_json_set(json, "request_id",
                                  json_stringn((char *) id, 32));
    ngx_http_token_meter_json_set(json, "time",
                                  json_stringn((char *) buf, p - buf));

    p = ngx_sprintf(buf, "sub_%uL", rec->subscriber);

    ngx_http_token_meter_json_set(json, "subscriber",
                                  json_stringn((char *) buf, p - buf));
    ngx_http_token_meter_json_set(json, "msisdn",
            json_stringn((char *) rec->msisdn,
                         ngx_strnlen(rec->msisdn,
                                     NGX_HTTP_TOKEN_METER_MSISDN_LEN)));
    ngx_http_token_meter_json_set(json, "model",
            json_stringn((char *) rec->model,
                         ngx_strnlen(rec->model, sizeof(rec->model))));
    ngx_http_token_meter_json_set(json, "input_tokens",
                                  json_integer(rec->input));
    ngx_http_token_meter_json_set(json, "cached_tokens",
                                  json_integer(rec->cached));
    ngx_http_token_meter_json_set(json, "output_tokens",
                                  json_integer(rec->output));
    ngx_http_token_meter_json_set(json, "cost", json_integer(rec->cost));
    ngx_http_token_meter_json_set(json, "points", json_integer(rec->points));
    ngx_http_token_meter_json_set(json, "points_from_grants",
                                  json_integer(rec->from_grants));
    ngx_http_token_meter_json_set(json, "points_from_paid",
                                  json_integer(rec->from_paid));
    ngx_http_token_meter_json_set(json, "usage_source",
            json_string(ngx_http_token_meter_sources[rec->source < 3
                                                     ? rec->source : 0]));

    if (ngx_http_token_meter_json_set(json, "status",
                                      json_integer(rec->status))
        != NGX_OK)
    {
        if (json) {
            json_decref(json);
        }

        return NULL;
    }

    return json;
}


/*
 * GET .../billing/YYYY-MM?format=csv|json: one row per MSISDN for the
 * billing cycle, a calendar month at the configured offset from UTC.
 */

ngx_int_t
ngx_http_token_meter_billing_export(ngx_http_request_t *r, ngx_str_t *cycle)
{
    u_char                             key[32];
    int64_t                            year, month, start, end;
    ngx_int_t                          rc, csv;
    ngx_str_t                          format;
    ngx_time_t                        *tp;
    ngx_http_token_meter_txn_t        *txn;
    ngx_http_token_meter_bill_t        bill;
    ngx_http_token_meter_main_conf_t  *tmcf;

    tmcf = ngx_http_get_module_main_conf(r, ngx_http_token_meter_module);

    if (cycle->len != 7 || cycle->data[4] != '-') {
        goto invalid;
    }

    year = ngx_atoi(cycle->data, 4);
    month = ngx_atoi(cycle->data + 5, 2);

    if (year < 1970 || month < 1 || month > 12) {
        goto invalid;
    }

    csv = 0;

    if (ngx_http_arg(r, (u_char *) "format", 6, &format) == NGX_OK) {
        if (format.len == 3 && ngx_strncmp(format.data, "csv", 3) == 0) {
            csv = 1;

        } else if (format.len != 4
                   || ngx_strncmp(format.data, "json", 4) != 0)
        {
            return ngx_http_token_meter_send_error(r, NGX_HTTP_BAD_REQUEST,
                       "invalid_request_error", "invalid_query",
                       "\"format\" is \"csv\" or \"json\"");
        }
    }

    /* the cycle's bounds in UTC milliseconds */

    start = (ngx_http_token_meter_days(year, month, 1) * 86400
             - tmcf->billing_offset) * 1000;

    end = (ngx_http_token_meter_days(month == 12 ? year + 1 : year,
                                     month == 12 ? 1 : month + 1, 1)
           * 86400 - tmcf->billing_offset) * 1000;

    ngx_memzero(&bill, sizeof(ngx_http_token_meter_bill_t));

    bill.pool = r->pool;

    ngx_rbtree_init(&bill.tree, &bill.sentinel, ngx_str_rbtree_insert_value);

    if (ngx_array_init(&bill.rows, r->pool, 64,
                       sizeof(ngx_http_token_meter_row_t *))
        != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rc = ngx_http_token_meter_txn_begin(tmcf->store, &txn, 0,
                                        r->connection->log);
    if (rc != NGX_OK) {
        return ngx_http_token_meter_store_error(r, rc);
    }

    rc = ngx_http_token_meter_bill_usage(txn, &bill, start, end);

    if (rc == NGX_OK) {
        rc = ngx_http_token_meter_bill_purchases(txn, &bill, start, end);
    }

    if (rc == NGX_OK) {
        rc = ngx_http_token_meter_bill_expired(txn, &bill, start, end);
    }

    ngx_http_token_meter_txn_abort(txn);

    if (rc != NGX_OK) {
        return ngx_http_token_meter_store_error(r, rc);
    }

    ngx_qsort(bill.rows.elts, bill.rows.nelts,
              sizeof(ngx_http_token_meter_row_t *),
              ngx_http_token_meter_row_cmp);

    /* remember the export, so that retention may prune the cycle later */

    if (ngx_http_token_meter_txn_begin(tmcf->store, &txn, 1,
                                       r->connection->log)
        == NGX_OK)
    {
        ngx_memcpy(key, "exported:", 9);
        ngx_memcpy(key + 9, cycle->data, 7);

        /* milliseconds, as the records' times are */

        tp = ngx_timeofday();
        ngx_http_token_meter_put_u64(key + 16,
                                     (uint64_t) tp->sec * 1000 + tp->msec);

        if (ngx_http_token_meter_put(txn, NGX_HTTP_TOKEN_METER_DB_META, key,
                                     16, key + 16, 8, 0)
            == NGX_OK)
        {
            (void) ngx_http_token_meter_txn_commit(txn);

        } else {
            ngx_http_token_meter_txn_abort(txn);
        }
    }

    ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                  "token meter admin: exported billing cycle %V, %ui rows",
                  cycle, bill.rows.nelts);

    if (csv) {
        return ngx_http_token_meter_bill_csv(r, &bill);
    }

    return ngx_http_token_meter_bill_json(r, &bill, cycle, start, end);

invalid:

    return ngx_http_token_meter_send_error(r, NGX_HTTP_NOT_FOUND,
                                           "invalid_request_error",
                                           "not_found",
                                           "billing cycles are named like "
                                           "\"2026-12\"");
}


static ngx_http_token_meter_row_t *
ngx_http_token_meter_row(ngx_http_token_meter_bill_t *bill, u_char *msisdn)
{
    uint32_t                     hash;
    ngx_str_t                    s;
    ngx_http_token_meter_row_t  *row, **slot;

    s.data = msisdn;
    s.len = ngx_strnlen(msisdn, NGX_HTTP_TOKEN_METER_MSISDN_LEN);

    hash = ngx_crc32_short(s.data, s.len);

    row = (ngx_http_token_meter_row_t *)
              ngx_str_rbtree_lookup(&bill->tree, &s, hash);

    if (row) {
        return row;
    }

    row = ngx_pcalloc(bill->pool, sizeof(ngx_http_token_meter_row_t));
    if (row == NULL) {
        return NULL;
    }

    ngx_memcpy(row->msisdn, msisdn, s.len);

    row->node.str.data = row->msisdn;
    row->node.str.len = s.len;
    row->node.node.key = hash;

    if (ngx_array_init(&row->references, bill->pool, 2, sizeof(ngx_str_t))
        != NGX_OK
        || ngx_array_init(&row->models, bill->pool, 2,
                          sizeof(ngx_http_token_meter_model_sum_t))
           != NGX_OK)
    {
        return NULL;
    }

    ngx_rbtree_insert(&bill->tree, &row->node.node);

    slot = ngx_array_push(&bill->rows);
    if (slot == NULL) {
        return NULL;
    }

    *slot = row;

    return row;
}


static ngx_int_t
ngx_http_token_meter_bill_usage(ngx_http_token_meter_txn_t *txn,
    ngx_http_token_meter_bill_t *bill, int64_t start, int64_t end)
{
    u_char                            *name;
    u_char                             key[8];
    ngx_int_t                          rc;
    ngx_str_t                          k, v;
    ngx_uint_t                         i;
    ngx_http_token_meter_row_t        *row;
    ngx_http_token_meter_cursor_t     *cur;
    ngx_http_token_meter_record_t      rec;
    ngx_http_token_meter_model_sum_t  *sum;

    rc = ngx_http_token_meter_cursor_open(txn,
                                          NGX_HTTP_TOKEN_METER_DB_USAGE_TIME,
                                          &cur);
    if (rc != NGX_OK) {
        return rc;
    }

    ngx_http_token_meter_put_u64(key, (uint64_t) start);

    for (rc = ngx_http_token_meter_cursor_seek(cur, key, 8, &k, &v);
         rc == NGX_OK;
         rc = ngx_http_token_meter_cursor_next(cur, &k, &v))
    {
        if (k.len != 24
            || (int64_t) ngx_http_token_meter_get_u64(k.data) >= end)
        {
            break;
        }

        rc = ngx_http_token_meter_get(txn, NGX_HTTP_TOKEN_METER_DB_USAGE,
                                      k.data + 8, 16, &v);
        if (rc != NGX_OK || v.len != sizeof(rec)) {
            rc = NGX_ERROR;
            break;
        }

        ngx_memcpy(&rec, v.data, sizeof(rec));

        row = ngx_http_token_meter_row(bill, rec.msisdn);
        if (row == NULL) {
            rc = NGX_ERROR;
            break;
        }

        row->requests++;
        row->from_grants += rec.from_grants;
        row->from_paid += rec.from_paid;
        row->input += rec.input;
        row->cached += rec.cached;
        row->output += rec.output;

        name = rec.model;
        sum = row->models.elts;

        for (i = 0; i < row->models.nelts; i++) {
            if (sum[i].name.len == ngx_strnlen(name, sizeof(rec.model))
                && ngx_strncmp(sum[i].name.data, name, sum[i].name.len) == 0)
            {
                break;
            }
        }

        if (i == row->models.nelts) {
            sum = ngx_array_push(&row->models);
            if (sum == NULL) {
                rc = NGX_ERROR;
                break;
            }

            ngx_memzero(sum, sizeof(ngx_http_token_meter_model_sum_t));

            sum->name.len = ngx_strnlen(name, sizeof(rec.model));
            sum->name.data = ngx_pnalloc(bill->pool, sum->name.len);
            if (sum->name.data == NULL) {
                rc = NGX_ERROR;
                break;
            }

            ngx_memcpy(sum->name.data, name, sum->name.len);

        } else {
            sum = &sum[i];
        }

        sum->requests++;
        sum->input += rec.input;
        sum->cached += rec.cached;
        sum->output += rec.output;
        sum->points += rec.points;
    }

    ngx_http_token_meter_cursor_close(cur);

    return (rc == NGX_OK || rc == NGX_DONE) ? NGX_OK : rc;
}


static ngx_int_t
ngx_http_token_meter_bill_purchases(ngx_http_token_meter_txn_t *txn,
    ngx_http_token_meter_bill_t *bill, int64_t start, int64_t end)
{
    ngx_int_t                         rc;
    ngx_str_t                         k, v, *ref;
    ngx_http_token_meter_row_t       *row;
    ngx_http_token_meter_cursor_t    *cur;
    ngx_http_token_meter_purchase_t   purchase;

    /* TODO: purchases are found by a full scan; index them by time */

    rc = ngx_http_token_meter_cursor_open(txn,
                                          NGX_HTTP_TOKEN_METER_DB_PURCHASES,
                                          &cur);
    if (rc != NGX_OK) {
        return rc;
    }

    for (rc = ngx_http_token_meter_cursor_seek(cur, NULL, 0, &k, &v);
         rc == NGX_OK;
         rc = ngx_http_token_meter_cursor_next(cur, &k, &v))
    {
        if (v.len < sizeof(purchase)) {
            continue;
        }

        ngx_memcpy(&purchase, v.data, sizeof(purchase));

        if (purchase.created * 1000 < start || purchase.created * 1000 >= end)
        {
            continue;
        }

        row = ngx_http_token_meter_row(bill, purchase.msisdn);
        if (row == NULL) {
            rc = NGX_ERROR;
            break;
        }

        row->purchased += purchase.points;

        if (purchase.fen < 0) {
            continue;
        }

        row->purchases++;
        row->fen += purchase.fen;

        ref = ngx_array_push(&row->references);
        if (ref == NULL) {
            rc = NGX_ERROR;
            break;
        }

        ref->len = k.len;
        ref->data = ngx_pnalloc(bill->pool, k.len);
        if (ref->data == NULL) {
            rc = NGX_ERROR;
            break;
        }

        ngx_memcpy(ref->data, k.data, k.len);
    }

    ngx_http_token_meter_cursor_close(cur);

    return (rc == NGX_OK || rc == NGX_DONE) ? NGX_OK : rc;
}


static ngx_int_t
ngx_http_token_meter_bill_expired(ngx_http_token_meter_txn_t *txn,
    ngx_http_token_meter_bill_t *bill, int64_t start, int64_t end)
{
    int64_t                             now;
    ngx_int_t                           rc;
    ngx_str_t                           k, v;
    ngx_http_token_meter_row_t         *row;
    ngx_http_token_meter_grant_t        grant;
    ngx_http_token_meter_cursor_t      *cur;
    ngx_http_token_meter_subscriber_t   sub;

    now = (int64_t) ngx_time() * 1000;

    rc = ngx_http_token_meter_cursor_open(txn, NGX_HTTP_TOKEN_METER_DB_GRANTS,
                                          &cur);
    if (rc != NGX_OK) {
        return rc;
    }

    for (rc = ngx_http_token_meter_cursor_seek(cur, NULL, 0, &k, &v);
         rc == NGX_OK;
         rc = ngx_http_token_meter_cursor_next(cur, &k, &v))
    {
        if (k.len != 24 || v.len != sizeof(grant)) {
            continue;
        }

        ngx_memcpy(&grant, v.data, sizeof(grant));

        /* a grant's unspent points expire in the cycle its expiry falls in */

        if (grant.left == 0 || grant.expires * 1000 < start
            || grant.expires * 1000 >= end || grant.expires * 1000 > now)
        {
            continue;
        }

        rc = ngx_http_token_meter_subscriber_get(txn,
                                        ngx_http_token_meter_get_u64(k.data),
                                        &sub);
        if (rc != NGX_OK) {
            break;
        }

        row = ngx_http_token_meter_row(bill, sub.msisdn);
        if (row == NULL) {
            rc = NGX_ERROR;
            break;
        }

        row->expired += grant.left;
    }

    ngx_http_token_meter_cursor_close(cur);

    return (rc == NGX_OK || rc == NGX_DONE) ? NGX_OK : rc;
}


static int ngx_libc_cdecl
ngx_http_token_meter_row_cmp(const void *a, const void *b)
{
    ngx_http_token_meter_row_t  *ra, *rb;

    ra = *(ngx_http_token_meter_row_t **) a;
    rb = *(ngx_http_token_meter_row_t **) b;

    return ngx_strncmp(ra->msisdn, rb->msisdn,
                       NGX_HTTP_TOKEN_METER_MSISDN_LEN);
}


static ngx_int_t
ngx_http_token_meter_bill_json(ngx_http_request_t *r,
    ngx_http_token_meter_bill_t *bill, ngx_str_t *cycle, int64_t start,
    int64_t end)
{
    u_char                             *p;
    json_t                             *json, *rows, *row, *refs, *models;
    json_t                             *model;
    ngx_int_t                           rc;
    ngx_str_t                          *ref;
    ngx_uint_t                          i, j;
    ngx_http_token_meter_row_t        **rp, *rw;
    ngx_http_token_meter_model_sum_t   *sum;
    int64_t                             total[7];
    u_char                              yuan[NGX_INT64_LEN + 4];

    ngx_memzero(total, sizeof(total));

    json = json_object();
    rows = json_array();

    rp = bill->rows.elts;

    for (i = 0; rows && i < bill->rows.nelts; i++) {
        rw = rp[i];

        row = json_object();
        refs = json_array();
        models = json_object();

        ref = rw->references.elts;

        for (j = 0; refs && j < rw->references.nelts; j++) {
            json_array_append_new(refs,
                                  ngx_http_token_meter_json_string(&ref[j]));
        }

        sum = rw->models.elts;

        for (j = 0; models && j < rw->models.nelts; j++) {
            model = json_pack("{s:I,s:I,s:I,s:I,s:I}",
                              "requests", (json_int_t) sum[j].requests,
                              "input_tokens", (json_int_t) sum[j].input,
                              "cached_tokens", (json_int_t) sum[j].cached,
                              "output_tokens", (json_int_t) sum[j].output,
                              "points", (json_int_t) sum[j].points);

            if (model == NULL
                || json_object_setn_new(models, (char *) sum[j].name.data,
                                        sum[j].name.len, model)
                   != 0)
            {
                json_decref(models);
                models = NULL;
            }
        }

        p = ngx_http_token_meter_yuan(yuan, rw->fen);

        ngx_http_token_meter_json_set(row, "msisdn",
                                      json_stringn((char *) rw->msisdn,
                                                   rw->node.str.len));
        ngx_http_token_meter_json_set(row, "purchase_count",
                                      json_integer(rw->purchases));
        ngx_http_token_meter_json_set(row, "purchase_yuan",
                                      json_stringn((char *) yuan, p - yuan));
        ngx_http_token_meter_json_set(row, "purchase_references", refs);
        ngx_http_token_meter_json_set(row, "purchased_points",
                                      json_integer(rw->purchased));
        ngx_http_token_meter_json_set(row, "points_from_grants",
                                      json_integer(rw->from_grants));
        ngx_http_token_meter_json_set(row, "points_from_paid",
                                      json_integer(rw->from_paid));
        ngx_http_token_meter_json_set(row, "points",
                              json_integer(rw->from_grants + rw->from_paid));
        ngx_http_token_meter_json_set(row, "expired_trial_points",
                                      json_integer(rw->expired));
        ngx_http_token_meter_json_set(row, "requests",
                                      json_integer(rw->requests));
        ngx_http_token_meter_json_set(row, "models", models);

        if (row == NULL || json_array_append_new(rows, row) != 0) {
            json_decref(rows);
            rows = NULL;
            break;
        }

        total[0] += rw->purchases;
        total[1] += rw->fen;
        total[2] += rw->purchased;
        total[3] += rw->from_grants;
        total[4] += rw->from_paid;
        total[5] += rw->expired;
        total[6] += rw->requests;
    }

    p = ngx_http_token_meter_yuan(yuan, total[1]);

    ngx_http_token_meter_json_set(json, "cycle",
                                  ngx_http_token_meter_json_string(cycle));
    ngx_http_token_meter_json_set(json, "from",
                                ngx_http_token_meter_json_time(start / 1000));
    ngx_http_token_meter_json_set(json, "to",
                                  ngx_http_token_meter_json_time(end / 1000));
    ngx_http_token_meter_json_set(json, "rows", rows);
    ngx_http_token_meter_json_set(json, "totals",
        json_pack("{s:I,s:s%,s:I,s:I,s:I,s:I,s:I,s:I}",
                  "purchase_count", (json_int_t) total[0],
                  "purchase_yuan", (char *) yuan, (size_t) (p - yuan),
                  "purchased_points", (json_int_t) total[2],
                  "points_from_grants", (json_int_t) total[3],
                  "points_from_paid", (json_int_t) total[4],
                  "points", (json_int_t) (total[3] + total[4]),
                  "expired_trial_points", (json_int_t) total[5],
                  "requests", (json_int_t) total[6]));

    if (json == NULL || rows == NULL) {
        if (json) {
            json_decref(json);
        }

        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rc = ngx_http_token_meter_send_json(r, NGX_HTTP_OK, json);

    json_decref(json);

    return rc;
}


static ngx_int_t
ngx_http_token_meter_bill_csv(ngx_http_request_t *r,
    ngx_http_token_meter_bill_t *bill)
{
    u_char                             *p;
    size_t                              len;
    ngx_buf_t                          *b;
    ngx_str_t                          *ref, s;
    ngx_uint_t                          i, j;
    ngx_http_token_meter_row_t        **rp, *rw;
    ngx_http_token_meter_model_sum_t   *sum;

    static u_char  header[] =
        "msisdn,purchase_count,purchase_yuan,purchase_references,"
        "purchased_points,points_from_grants,points_from_paid,points,"
        "expired_trial_points,requests,input_tokens,cached_tokens,"
        "output_tokens,tokens_by_model\r\n";

    /* an upper bound of the output: every field quoted, every quote doubled */

    len = sizeof(header);
    rp = bill->rows.elts;

    for (i = 0; i < bill->rows.nelts; i++) {
        rw = rp[i];
        len += 16 + 12 * (NGX_INT64_LEN + 1) + 8;

        ref = rw->references.elts;

        for (j = 0; j < rw->references.nelts; j++) {
            len += 2 * ref[j].len + 1;
        }

        sum = rw->models.elts;

        for (j = 0; j < rw->models.nelts; j++) {
            len += 2 * sum[j].name.len + 3 * (NGX_INT64_LEN + 1) + 1;
        }

        len += 8;
    }

    b = ngx_create_temp_buf(r->pool, len);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = ngx_cpymem(b->last, header, sizeof(header) - 1);

    for (i = 0; i < bill->rows.nelts; i++) {
        rw = rp[i];

        p = ngx_sprintf(p, "%*s,%L,", rw->node.str.len, rw->msisdn,
                        rw->purchases);
        p = ngx_http_token_meter_yuan(p, rw->fen);
        *p++ = ',';

        /* references and models are joined with ";" in one field each */

        s.data = p + 1;
        s.len = 0;

        ref = rw->references.elts;

        for (j = 0; j < rw->references.nelts; j++) {
            s.len += ref[j].len + (j ? 1 : 0);
        }

        s.data = ngx_pnalloc(r->pool, s.len + 1);
        if (s.data == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        s.len = 0;

        for (j = 0; j < rw->references.nelts; j++) {
            if (j) {
                s.data[s.len++] = ';';
            }

            ngx_memcpy(s.data + s.len, ref[j].data, ref[j].len);
            s.len += ref[j].len;
        }

        p = ngx_http_token_meter_csv_field(p, &s);

        p = ngx_sprintf(p, ",%L,%L,%L,%L,%L,%L,%L,%L,%L,",
                        rw->purchased, rw->from_grants, rw->from_paid,
                        rw->from_grants + rw->from_paid, rw->expired,
                        rw->requests, rw->input, rw->cached, rw->output);

        sum = rw->models.elts;

        len = 0;

        for (j = 0; j < rw->models.nelts; j++) {
            len += sum[j].name.len + 3 * (NGX_INT64_LEN + 1) + 1;
        }

        s.data = ngx_pnalloc(r->pool, len + 1);
        if (s.data == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        s.len = 0;

        for (j = 0; j < rw->models.nelts; j++) {
            s.len = ngx_sprintf(s.data + s.len, "%s%V=%L/%L/%L",
                                j ? ";" : "", &sum[j].name, sum[j].input,
                                sum[j].cached, sum[j].output)
                    - s.data;
        }

        p = ngx_http_token_meter_csv_field(p, &s);

        *p++ = '\r';
        *p++ = '\n';
    }

    b->last = p;

    return ngx_http_token_meter_send_buf(r, NGX_HTTP_OK,
                                         "text/csv; charset=utf-8", b);
}


/* RFC 4180: quote a field that holds a comma, a quote or a line break */

static u_char *
ngx_http_token_meter_csv_field(u_char *p, ngx_str_t *s)
{
    size_t  i;

    for (i = 0; i < s->len; i++) {
        if (s->data[i] == ',' || s->data[i] == '"' || s->data[i] == '\r'
            || s->data[i] == '\n')
        {
            break;
        }
    }

    if (i == s->len) {
        return ngx_cpymem(p, s->data, s->len);
    }

    *p++ = '"';

    for (i = 0; i < s->len; i++) {
        if (s->data[i] == '"') {
            *p++ = '"';
        }

        *p++ = s->data[i];
    }

    *p++ = '"';

    return p;
}


static u_char *
ngx_http_token_meter_yuan(u_char *p, int64_t fen)
{
    return ngx_sprintf(p, "%L.%02L", fen / 100, fen % 100);
}


/* a query argument, percent-decoded */

static ngx_int_t
ngx_http_token_meter_arg(ngx_http_request_t *r, char *name, ngx_str_t *value)
{
    u_char     *dst, *src;
    ngx_str_t   arg;

    if (ngx_http_arg(r, (u_char *) name, ngx_strlen(name), &arg) != NGX_OK) {
        return NGX_DECLINED;
    }

    value->data = ngx_pnalloc(r->pool, arg.len);
    if (value->data == NULL) {
        return NGX_ERROR;
    }

    dst = value->data;
    src = arg.data;

    ngx_unescape_uri(&dst, &src, arg.len, NGX_UNESCAPE_URI);

    value->len = dst - value->data;

    return NGX_OK;
}


/* RFC 3339 ("2026-12-03T18:40:57Z", "...+08:00", "2026-12-03"), or seconds */

static ngx_int_t
ngx_http_token_meter_parse_time(ngx_str_t *s, int64_t *t)
{
    u_char     *p, *last;
    int64_t     y, mo, d, h, mi, sec, off;
    ngx_int_t   n, oh, om;

    p = s->data;
    last = p + s->len;

    n = ngx_atoi(p, s->len);

    if (n != NGX_ERROR) {
        *t = n;
        return NGX_OK;
    }

    if (s->len < 10 || p[4] != '-' || p[7] != '-') {
        return NGX_ERROR;
    }

    y = ngx_atoi(p, 4);
    mo = ngx_atoi(p + 5, 2);
    d = ngx_atoi(p + 8, 2);

    if (y < 1970 || mo < 1 || mo > 12 || d < 1 || d > 31) {
        return NGX_ERROR;
    }

    h = 0;
    mi = 0;
    sec = 0;
    off = 0;

    p += 10;

    if (p < last) {
        if (last - p < 9 || (*p != 'T' && *p != 't' && *p != ' ')
            || p[3] != ':' || p[6] != ':')
        {
            return NGX_ERROR;
        }

        h = ngx_atoi(p + 1, 2);
        mi = ngx_atoi(p + 4, 2);
        sec = ngx_atoi(p + 7, 2);

        if (h < 0 || h > 23 || mi < 0 || mi > 59 || sec < 0 || sec > 60) {
            return NGX_ERROR;
        }

        p += 9;

        if (p < last && *p == '.') {
            for (p++; p < last && *p >= '0' && *p <= '9'; p++) {
                /* fractions of a second are dropped */
            }
        }

        if (last - p == 1 && (*p == 'Z' || *p == 'z')) {
            p++;

        } else if (last - p == 6 && (*p == '+' || *p == '-') && p[3] == ':') {
            oh = ngx_atoi(p + 1, 2);
            om = ngx_atoi(p + 4, 2);

            if (oh == NGX_ERROR || om == NGX_ERROR || oh > 23 || om > 59) {
                return NGX_ERROR;
            }

            off = (oh * 3600 + om * 60) * (*p == '-' ? -1 : 1);
            p += 6;
        }
    }

    if (p != last) {
        return NGX_ERROR;
    }

    *t = ngx_http_token_meter_days(y, mo, d) * 86400 + h * 3600 + mi * 60
         + sec - off;

    return NGX_OK;
}


/* days from 1970-01-01 to a date of the proleptic Gregorian calendar */

static int64_t
ngx_http_token_meter_days(int64_t y, int64_t m, int64_t d)
{
    int64_t  era, yoe, doy, doe;

    y -= (m <= 2);
    era = y / 400;
    yoe = y - era * 400;
    doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;

    return era * 146097 + doe - 719468;
}


/*
 * token_meter_retention: drops usage records older than the retention
 * whose billing cycle has been exported.  A batch at a time, so that one
 * write transaction stays short.  Balances, grants and purchases are
 * never touched.
 */

void
ngx_http_token_meter_prune(ngx_http_token_meter_main_conf_t *tmcf,
    ngx_log_t *log)
{
    int64_t                         t, before, year, month, local, next;
    ngx_int_t                       rc;
    ngx_str_t                       k, v;
    ngx_uint_t                      i, n;
    ngx_tm_t                        tm;
    ngx_http_token_meter_txn_t     *txn;
    ngx_http_token_meter_cursor_t  *cur;
    ngx_http_token_meter_record_t   rec;
    u_char                          key[32], name[16];
    u_char                          batch[256][24];

    if (tmcf->retention == 0) {
        return;
    }

    before = ((int64_t) ngx_time() - tmcf->retention) * 1000;

    if (ngx_http_token_meter_txn_begin(tmcf->store, &txn, 1, log) != NGX_OK) {
        return;
    }

    if (ngx_http_token_meter_cursor_open(txn,
                                         NGX_HTTP_TOKEN_METER_DB_USAGE_TIME,
                                         &cur)
        != NGX_OK)
    {
        ngx_http_token_meter_txn_abort(txn);
        return;
    }

    n = 0;

    rc = ngx_http_token_meter_cursor_seek(cur, NULL, 0, &k, &v);

    while (rc == NGX_OK && n < 256) {

        if (k.len != 24) {
            rc = ngx_http_token_meter_cursor_next(cur, &k, &v);
            continue;
        }

        t = (int64_t) ngx_http_token_meter_get_u64(k.data);

        if (t >= before) {
            break;
        }

        /* the cycle of the record, at the billing offset */

        local = t / 1000 + tmcf->billing_offset;
        ngx_gmtime((time_t) local, &tm);

        year = tm.ngx_tm_year;
        month = tm.ngx_tm_mon;

        ngx_memcpy(key, k.data, 24);

        ngx_sprintf(name, "exported:%04L-%02L", year, month);

        if (ngx_http_token_meter_get(txn, NGX_HTTP_TOKEN_METER_DB_META, name,
                                     16, &v)
            != NGX_OK
            || v.len != 8)
        {
            /* a cycle never exported is kept whole: go on with the next */

            next = (ngx_http_token_meter_days(month == 12 ? year + 1 : year,
                                              month == 12 ? 1 : month + 1, 1)
                    * 86400 - tmcf->billing_offset) * 1000;

            ngx_http_token_meter_put_u64(key, (uint64_t) next);

            rc = ngx_http_token_meter_cursor_seek(cur, key, 8, &k, &v);
            continue;
        }

        /* a record settled after the export is in no export yet */

        if (t < (int64_t) ngx_http_token_meter_get_u64(v.data)) {
            ngx_memcpy(batch[n++], key, 24);
        }

        rc = ngx_http_token_meter_cursor_seek(cur, key, 24, &k, &v);

        if (rc == NGX_OK) {
            rc = ngx_http_token_meter_cursor_next(cur, &k, &v);
        }
    }

    ngx_http_token_meter_cursor_close(cur);

    for (i = 0; i < n; i++) {
        rc = ngx_http_token_meter_get(txn, NGX_HTTP_TOKEN_METER_DB_USAGE,
                                      batch[i] + 8, 16, &v);

        if (rc == NGX_OK && v.len == sizeof(rec)) {
            ngx_memcpy(&rec, v.data, sizeof(rec));

            ngx_http_token_meter_put_u64(key, rec.subscriber);
            ngx_memcpy(key + 8, batch[i], 24);

            rc = ngx_http_token_meter_del(txn,
                                      NGX_HTTP_TOKEN_METER_DB_USAGE_SUBSCRIBER,
                                      key, 32);
            if (rc == NGX_OK || rc == NGX_DECLINED) {
                rc = ngx_http_token_meter_del(txn,
                                              NGX_HTTP_TOKEN_METER_DB_USAGE,
                                              batch[i] + 8, 16);
            }
        }

        if (rc == NGX_OK || rc == NGX_DECLINED) {
            rc = ngx_http_token_meter_del(txn,
                                          NGX_HTTP_TOKEN_METER_DB_USAGE_TIME,
                                          batch[i], 24);
        }

        if (rc != NGX_OK && rc != NGX_DECLINED) {
            ngx_http_token_meter_txn_abort(txn);
            return;
        }
    }

    if (n == 0) {
        ngx_http_token_meter_txn_abort(txn);
        return;
    }

    if (ngx_http_token_meter_txn_commit(txn) == NGX_OK) {
        ngx_log_error(NGX_LOG_NOTICE, log, 0,
                      "token meter pruned %ui usage records older than "
                      "the retention", n);
    }
}
