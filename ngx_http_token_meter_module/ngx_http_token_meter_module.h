
/*
 * Copyright (C) The ngx_http_token_meter_module authors
 */


#ifndef _NGX_HTTP_TOKEN_METER_MODULE_H_INCLUDED_
#define _NGX_HTTP_TOKEN_METER_MODULE_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_token_meter_store.h"


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
    ngx_uint_t                     index;
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

    ngx_event_t                    timer;
    ngx_msec_t                     last_sync;
    ngx_msec_t                     last_reader_check;
} ngx_http_token_meter_main_conf_t;


typedef struct {
    ngx_flag_t                     enable;
    ngx_flag_t                     admin;
    ngx_str_t                      admin_key;
} ngx_http_token_meter_loc_conf_t;


extern ngx_module_t  ngx_http_token_meter_module;


ngx_int_t ngx_http_token_meter_admin_handler(ngx_http_request_t *r);
char *ngx_http_token_meter_admin_key(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);

void ngx_http_token_meter_sha256(u_char *data, size_t len, u_char *digest);
ngx_int_t ngx_http_token_meter_random(u_char *buf, size_t len);
u_char *ngx_http_token_meter_time(u_char *p, time_t t);
ngx_int_t ngx_http_token_meter_parse_points(ngx_str_t *s, ngx_uint_t scale,
    int64_t *value);


#endif /* _NGX_HTTP_TOKEN_METER_MODULE_H_INCLUDED_ */
