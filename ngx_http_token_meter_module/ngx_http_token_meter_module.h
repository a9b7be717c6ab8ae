
/*
 * Copyright (C) The ngx_http_token_meter_module authors
 */


#ifndef _NGX_HTTP_TOKEN_METER_MODULE_H_INCLUDED_
#define _NGX_HTTP_TOKEN_METER_MODULE_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_token_meter_store.h"
#include "ngx_http_token_meter_scan.h"


/* prices are kept in thousandths of a point per token */
#define NGX_HTTP_TOKEN_METER_PRICE_SCALE  1000

#define NGX_HTTP_TOKEN_METER_MAX_POINTS   1000000000000000LL


typedef struct {
    ngx_str_t                      name;
    ngx_str_t                      upstream;
    ngx_str_t                      upstream_model;
    int64_t                        input;
    int64_t                        cached;
    int64_t                        output;
    int64_t                        max_output;
    ngx_str_t                      file;
    ngx_uint_t                     line;
    ngx_uint_t                     stat;
} ngx_http_token_meter_model_t;


typedef struct {
    ngx_http_token_meter_store_t  *store;
    ngx_str_t                      store_path;

    int64_t                        points_per_yuan;
    int64_t                        trial_points;
    time_t                         trial_validity;

    ngx_array_t                    models;
    ngx_hash_t                     models_hash;
    ngx_hash_keys_arrays_t        *models_keys;

    ngx_uint_t                     quota_status;
    ngx_flag_t                     lower_max_tokens;
    time_t                         reservation_timeout;
    time_t                         billing_offset;
    time_t                         retention;

    ngx_shm_zone_t                *stats_zone;
    void                          *stats;

    ngx_event_t                    timer;
    ngx_msec_t                     last_sweep;
    ngx_msec_t                     last_prune;
    ngx_msec_t                     last_sync;
    ngx_msec_t                     last_reader_check;
} ngx_http_token_meter_main_conf_t;


typedef struct {
    ngx_flag_t                     enable;
    ngx_http_handler_pt            content;
    ngx_str_t                      content_name;
    ngx_str_t                      admin_key;
} ngx_http_token_meter_loc_conf_t;


typedef enum {
    NGX_HTTP_TOKEN_METER_SOURCE_NONE = 0,
    NGX_HTTP_TOKEN_METER_SOURCE_UPSTREAM,
    NGX_HTTP_TOKEN_METER_SOURCE_ESTIMATED
} ngx_http_token_meter_source_e;


typedef struct ngx_http_token_meter_ctx_s  ngx_http_token_meter_ctx_t;

typedef void (*ngx_http_token_meter_resume_pt)(ngx_http_request_t *r,
    ngx_int_t rc);


struct ngx_http_token_meter_ctx_s {
    ngx_int_t                      phase_rc;

    /* a request waiting for the batch that holds its reservation */
    ngx_queue_t                    queue;
    ngx_http_request_t            *request;
    ngx_http_token_meter_resume_pt resume;
    ngx_int_t                      reserve_rc;

    ngx_http_token_meter_model_t  *model;

    uint64_t                       subscriber;
    ngx_str_t                      msisdn;
    u_char                         msisdn_data[16];
    u_char                         request_id[16];

    int64_t                        input_estimate;
    int64_t                        allowance;
    int64_t                        choices;
    int64_t                        reserved;
    int64_t                        balance;

    ngx_http_token_meter_usage_t   usage;
    ngx_uint_t                     source;
    int64_t                        points;
    int64_t                        from_grants;
    int64_t                        from_paid;
    ngx_uint_t                     status;

    ngx_http_token_meter_text_t    seen;
    ngx_http_token_meter_sse_scan_t  *sse;
    ngx_http_token_meter_json_scan_t *json;

    void                          *admission;
    void                          *admin;
    ngx_buf_t                     *held;
    ngx_chain_t                   *free;
    ngx_chain_t                   *busy;

    unsigned                       embeddings:1;
    unsigned                       stream:1;
    unsigned                       strip_usage:1;
    unsigned                       admitted:1;
    unsigned                       settled:1;
    unsigned                       usage_found:1;
    unsigned                       event_done:1;
    unsigned                       event_strip:1;
    unsigned                       encoded:1;
    unsigned                       passthrough:1;
};


extern ngx_module_t  ngx_http_token_meter_module;


ngx_int_t ngx_http_token_meter_admin_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_token_meter_access_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_token_meter_balance_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_token_meter_models_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_token_meter_error_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_token_meter_metrics_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_token_meter_metrics_zone(ngx_conf_t *cf,
    ngx_http_token_meter_main_conf_t *tmcf);
void ngx_http_token_meter_count_rejected(ngx_http_request_t *r,
    const char *code);
void ngx_http_token_meter_prune(ngx_http_token_meter_main_conf_t *tmcf,
    ngx_log_t *log);
ngx_int_t ngx_http_token_meter_api_key(ngx_http_request_t *r,
    ngx_str_t *key);
ngx_int_t ngx_http_token_meter_log_handler(ngx_http_request_t *r);
ngx_http_token_meter_ctx_t *ngx_http_token_meter_get_ctx(
    ngx_http_request_t *r);
ngx_int_t ngx_http_token_meter_filter_init(ngx_conf_t *cf);
void ngx_http_token_meter_filter_finish(ngx_http_request_t *r,
    ngx_http_token_meter_ctx_t *ctx);
ngx_int_t ngx_http_token_meter_add_variables(ngx_conf_t *cf);
char *ngx_http_token_meter_model(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
ngx_int_t ngx_http_token_meter_init_models(ngx_conf_t *cf,
    ngx_http_token_meter_main_conf_t *tmcf);

ngx_int_t ngx_http_token_meter_reserve(ngx_http_request_t *r,
    ngx_http_token_meter_ctx_t *ctx, ngx_http_token_meter_resume_pt resume);
ngx_int_t ngx_http_token_meter_settle(ngx_http_request_t *r,
    ngx_http_token_meter_ctx_t *ctx);
void ngx_http_token_meter_flush(void);
void ngx_http_token_meter_sweep(ngx_http_token_meter_main_conf_t *tmcf,
    ngx_log_t *log);
int64_t ngx_http_token_meter_cost(ngx_http_token_meter_model_t *model,
    ngx_http_token_meter_usage_t *usage);
char *ngx_http_token_meter_admin_key(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);

void ngx_http_token_meter_sha256(u_char *data, size_t len, u_char *digest);
void ngx_http_token_meter_sha256_free(void);
ngx_int_t ngx_http_token_meter_random(u_char *buf, size_t len);
u_char *ngx_http_token_meter_time(u_char *p, time_t t);
ngx_int_t ngx_http_token_meter_bearer(ngx_table_elt_t *h, ngx_str_t *token);
ngx_int_t ngx_http_token_meter_parse_points(ngx_str_t *s, ngx_uint_t scale,
    int64_t *value);


#endif /* _NGX_HTTP_TOKEN_METER_MODULE_H_INCLUDED_ */
