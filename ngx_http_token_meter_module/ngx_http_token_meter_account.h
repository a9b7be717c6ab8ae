
/*
 * Copyright (C) The ngx_http_token_meter_module authors
 */


#ifndef _NGX_HTTP_TOKEN_METER_ACCOUNT_H_INCLUDED_
#define _NGX_HTTP_TOKEN_METER_ACCOUNT_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include <jansson.h>

#include "ngx_http_token_meter_module.h"


#define NGX_HTTP_TOKEN_METER_MSISDN_LEN   16
#define NGX_HTTP_TOKEN_METER_KEY_ID_LEN   20
#define NGX_HTTP_TOKEN_METER_KEY_LEN      49
#define NGX_HTTP_TOKEN_METER_MAX_GRANTS   8

#define NGX_HTTP_TOKEN_METER_ACTIVE       1
#define NGX_HTTP_TOKEN_METER_SUSPENDED    2
#define NGX_HTTP_TOKEN_METER_CLOSED       3

#define NGX_HTTP_TOKEN_METER_GRANT_TRIAL  1


/* the stored forms: fixed layouts, copied out of the map before use */

typedef struct {
    uint64_t                    id;
    int64_t                     created;
    int64_t                     activated;
    int64_t                     closed;
    int64_t                     paid;
    int64_t                     reserved;
    int64_t                     purchased;
    int64_t                     spent_grants;
    int64_t                     spent_paid;
    uint32_t                    status;
    u_char                      msisdn[NGX_HTTP_TOKEN_METER_MSISDN_LEN];
} ngx_http_token_meter_subscriber_t;


typedef struct {
    uint64_t                    id;
    int64_t                     points;
    int64_t                     left;
    int64_t                     granted;
    int64_t                     expires;
    uint32_t                    kind;
} ngx_http_token_meter_grant_t;


typedef struct {
    u_char                      key_id[NGX_HTTP_TOKEN_METER_KEY_ID_LEN];
    int64_t                     created;
    int64_t                     revoked;
} ngx_http_token_meter_key_info_t;


typedef struct {
    uint64_t                    subscriber;
    int64_t                     points;
    int64_t                     fen;
    int64_t                     created;
    u_char                      msisdn[NGX_HTTP_TOKEN_METER_MSISDN_LEN];
} ngx_http_token_meter_purchase_t;


/* a usage record, written once when a metered request is settled */

typedef struct {
    u_char                      request_id[16];
    uint64_t                    subscriber;
    int64_t                     time;
    int64_t                     input;
    int64_t                     cached;
    int64_t                     output;
    int64_t                     cost;
    int64_t                     points;
    int64_t                     from_grants;
    int64_t                     from_paid;
    uint32_t                    status;
    uint32_t                    source;
    u_char                      msisdn[NGX_HTTP_TOKEN_METER_MSISDN_LEN];
    u_char                      model[64];
} ngx_http_token_meter_record_t;


typedef struct {
    uint64_t                    subscriber;
    int64_t                     points;
    int64_t                     created;
    int64_t                     deadline;
    int64_t                     pid;
} ngx_http_token_meter_reservation_t;


typedef struct {
    int64_t                     paid;
    int64_t                     grants;
    int64_t                     expired;
    int64_t                     reserved;
    int64_t                     available;
    ngx_uint_t                  ngrants;
    ngx_http_token_meter_grant_t  grant[NGX_HTTP_TOKEN_METER_MAX_GRANTS];
} ngx_http_token_meter_balance_t;


void ngx_http_token_meter_count_settled(
    ngx_http_token_meter_main_conf_t *tmcf,
    ngx_http_token_meter_model_t *model, ngx_http_token_meter_record_t *rec,
    ngx_msec_int_t usec);
ngx_int_t ngx_http_token_meter_msisdn_valid(ngx_str_t *msisdn);
ngx_str_t ngx_http_token_meter_msisdn(
    ngx_http_token_meter_subscriber_t *sub);

ngx_int_t ngx_http_token_meter_subscriber_get(ngx_http_token_meter_txn_t *txn,
    uint64_t id, ngx_http_token_meter_subscriber_t *sub);
ngx_int_t ngx_http_token_meter_subscriber_put(ngx_http_token_meter_txn_t *txn,
    ngx_http_token_meter_subscriber_t *sub);
ngx_int_t ngx_http_token_meter_subscriber_find(
    ngx_http_token_meter_txn_t *txn, ngx_str_t *msisdn, uint64_t *id);
ngx_int_t ngx_http_token_meter_subscriber_create(
    ngx_http_token_meter_txn_t *txn, ngx_http_token_meter_main_conf_t *tmcf,
    ngx_str_t *msisdn, time_t now, ngx_http_token_meter_subscriber_t *sub);
ngx_int_t ngx_http_token_meter_subscriber_close(
    ngx_http_token_meter_txn_t *txn, ngx_http_token_meter_subscriber_t *sub,
    time_t now);

ngx_int_t ngx_http_token_meter_key_create(ngx_http_token_meter_txn_t *txn,
    uint64_t subscriber, ngx_str_t *key, time_t now, u_char *key_id);
ngx_int_t ngx_http_token_meter_key_revoke(ngx_http_token_meter_txn_t *txn,
    uint64_t subscriber, ngx_str_t *key_id, time_t now, int64_t *revoked);
ngx_int_t ngx_http_token_meter_key_find(ngx_http_token_meter_txn_t *txn,
    ngx_str_t *key, uint64_t *subscriber);
ngx_int_t ngx_http_token_meter_key_list(ngx_http_token_meter_txn_t *txn,
    uint64_t subscriber, ngx_array_t *keys);

ngx_int_t ngx_http_token_meter_balance(ngx_http_token_meter_txn_t *txn,
    ngx_http_token_meter_subscriber_t *sub, time_t now,
    ngx_http_token_meter_balance_t *balance);
ngx_int_t ngx_http_token_meter_debit(ngx_http_token_meter_txn_t *txn,
    ngx_http_token_meter_subscriber_t *sub, int64_t points, time_t now,
    int64_t *from_grants, int64_t *from_paid);

ngx_int_t ngx_http_token_meter_purchase_get(ngx_http_token_meter_txn_t *txn,
    ngx_str_t *reference, ngx_http_token_meter_purchase_t *purchase,
    ngx_str_t *result);
ngx_int_t ngx_http_token_meter_purchase_put(ngx_http_token_meter_txn_t *txn,
    ngx_str_t *reference, ngx_http_token_meter_purchase_t *purchase,
    ngx_str_t *result);

ngx_int_t ngx_http_token_meter_usage_list(ngx_http_request_t *r,
    ngx_http_token_meter_txn_t *txn, uint64_t subscriber);
ngx_int_t ngx_http_token_meter_billing_export(ngx_http_request_t *r,
    ngx_str_t *cycle);
ngx_int_t ngx_http_token_meter_store_error(ngx_http_request_t *r,
    ngx_int_t rc);
json_t *ngx_http_token_meter_balance_json(
    ngx_http_token_meter_balance_t *balance);


#endif /* _NGX_HTTP_TOKEN_METER_ACCOUNT_H_INCLUDED_ */
