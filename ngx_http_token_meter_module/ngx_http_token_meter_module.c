
/*
 * Copyright (C) The ngx_http_token_meter_module authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include <ndk.h>

#include "ngx_http_token_meter_module.h"


#define NGX_HTTP_TOKEN_METER_TIMER        1000
#define NGX_HTTP_TOKEN_METER_READER_CHECK 60000
#define NGX_HTTP_TOKEN_METER_SWEEP        2000
#define NGX_HTTP_TOKEN_METER_PRUNE        10000
#define NGX_HTTP_TOKEN_METER_REOPEN       10000


static ngx_int_t ngx_http_token_meter_set_yuan(ngx_http_request_t *r,
    ngx_str_t *res, ngx_http_variable_value_t *v);
static void ngx_http_token_meter_timer_handler(ngx_event_t *ev);

static void *ngx_http_token_meter_create_main_conf(ngx_conf_t *cf);
static char *ngx_http_token_meter_init_main_conf(ngx_conf_t *cf, void *conf);
static void *ngx_http_token_meter_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_token_meter_merge_loc_conf(ngx_conf_t *cf,
    void *parent, void *child);

static char *ngx_http_token_meter_store_directive(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_token_meter_points_per_yuan(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_token_meter_trial(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_token_meter_content(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_token_meter_billing_offset(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_token_meter_quota_status(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);

static ngx_int_t ngx_http_token_meter_preconfiguration(ngx_conf_t *cf);
static ngx_int_t ngx_http_token_meter_postconfiguration(ngx_conf_t *cf);

static void ngx_http_token_meter_check_debug_log(ngx_conf_t *cf);
static ngx_int_t ngx_http_token_meter_init_module(ngx_cycle_t *cycle);
static ngx_int_t ngx_http_token_meter_init_process(ngx_cycle_t *cycle);
static void ngx_http_token_meter_exit_process(ngx_cycle_t *cycle);


static ndk_set_var_t  ngx_http_token_meter_set_yuan_filter = {
    NDK_SET_VAR_VALUE,
    (void *) ngx_http_token_meter_set_yuan,
    1,
    NULL
};


static ngx_command_t  ngx_http_token_meter_commands[] = {

    { ngx_string("token_meter_store"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE123,
      ngx_http_token_meter_store_directive,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("token_meter_points_per_yuan"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_http_token_meter_points_per_yuan,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("token_meter_trial"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE12,
      ngx_http_token_meter_trial,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("token_meter_model"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_2MORE,
      ngx_http_token_meter_model,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("token_meter_quota_status"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_http_token_meter_quota_status,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("token_meter_lower_max_tokens"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_token_meter_main_conf_t, lower_max_tokens),
      NULL },

    { ngx_string("token_meter_reservation_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_sec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_token_meter_main_conf_t, reservation_timeout),
      NULL },

    { ngx_string("token_meter"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_token_meter_loc_conf_t, enable),
      NULL },

    { ngx_string("token_meter_admin"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_token_meter_content,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      ngx_http_token_meter_admin_handler },

    { ngx_string("token_meter_balance"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_token_meter_content,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      ngx_http_token_meter_balance_handler },

    { ngx_string("token_meter_models"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_token_meter_content,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      ngx_http_token_meter_models_handler },

    { ngx_string("token_meter_error"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_token_meter_content,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      ngx_http_token_meter_error_handler },

    { ngx_string("token_meter_metrics"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_token_meter_content,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      ngx_http_token_meter_metrics_handler },

    { ngx_string("token_meter_billing_offset"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_http_token_meter_billing_offset,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("token_meter_retention"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_sec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_token_meter_main_conf_t, retention),
      NULL },

    { ngx_string("token_meter_admin_key"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_token_meter_admin_key,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("set_token_meter_yuan"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_SIF_CONF
          |NGX_HTTP_LOC_CONF|NGX_HTTP_LIF_CONF|NGX_CONF_TAKE2,
      ndk_set_var_value,
      0,
      0,
      &ngx_http_token_meter_set_yuan_filter },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_token_meter_module_ctx = {
    ngx_http_token_meter_preconfiguration, /* preconfiguration */
    ngx_http_token_meter_postconfiguration, /* postconfiguration */

    ngx_http_token_meter_create_main_conf, /* create main configuration */
    ngx_http_token_meter_init_main_conf,   /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_token_meter_create_loc_conf,  /* create location configuration */
    ngx_http_token_meter_merge_loc_conf    /* merge location configuration */
};


ngx_module_t  ngx_http_token_meter_module = {
    NGX_MODULE_V1,
    &ngx_http_token_meter_module_ctx,      /* module context */
    ngx_http_token_meter_commands,         /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    ngx_http_token_meter_init_module,      /* init module */
    ngx_http_token_meter_init_process,     /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_token_meter_exit_process,     /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


/*
 * set_token_meter_yuan $var <points>: points as yuan with two decimals,
 * rounded down, at the configured rate; empty when the value is not a
 * whole number of points
 */

static ngx_int_t
ngx_http_token_meter_set_yuan(ngx_http_request_t *r, ngx_str_t *res,
    ngx_http_variable_value_t *v)
{
    int64_t                            points, fen;
    ngx_str_t                          s;
    ngx_http_token_meter_main_conf_t  *tmcf;

    tmcf = ngx_http_get_module_main_conf(r, ngx_http_token_meter_module);

    s.data = v->data;
    s.len = v->len;

    if (ngx_http_token_meter_parse_points(&s, 1, &points) != NGX_OK) {
        res->len = 0;
        return NGX_OK;
    }

    /* points * 100 cannot overflow: points are below 10^15 */

    fen = points * 100 / tmcf->points_per_yuan;

    res->data = ngx_pnalloc(r->pool, NGX_INT64_LEN + 3);
    if (res->data == NULL) {
        return NGX_ERROR;
    }

    res->len = ngx_sprintf(res->data, "%L.%02L", fen / 100, fen % 100)
               - res->data;

    return NGX_OK;
}


static void
ngx_http_token_meter_timer_handler(ngx_event_t *ev)
{
    ngx_msec_t                         interval;
    ngx_http_token_meter_main_conf_t  *tmcf;

    tmcf = ev->data;

    /*
     * a store that could not be opened when the worker started is tried
     * again, so that the worker recovers once the store is back
     */

    if (!ngx_http_token_meter_store_is_open(tmcf->store)) {

        if (ngx_current_msec - tmcf->last_sweep >= NGX_HTTP_TOKEN_METER_REOPEN
            && !(ngx_exiting || ngx_quit || ngx_terminate))
        {
            tmcf->last_sweep = ngx_current_msec;
            (void) ngx_http_token_meter_store_open(tmcf->store, ev->log);
        }

        goto next;
    }

    interval = ngx_http_token_meter_store_sync_interval(tmcf->store);

    if (interval != 0 && interval != NGX_HTTP_TOKEN_METER_SYNC_OFF
        && ngx_current_msec - tmcf->last_sync >= interval)
    {
        tmcf->last_sync = ngx_current_msec;
        (void) ngx_http_token_meter_store_sync(tmcf->store);
    }

    /* one worker releases what dead or stuck requests left reserved */

    if (ngx_worker == 0
        && ngx_current_msec - tmcf->last_sweep >= NGX_HTTP_TOKEN_METER_SWEEP)
    {
        tmcf->last_sweep = ngx_current_msec;
        ngx_http_token_meter_sweep(tmcf, ev->log);
    }

    if (ngx_worker == 0 && tmcf->retention
        && ngx_current_msec - tmcf->last_prune >= NGX_HTTP_TOKEN_METER_PRUNE)
    {
        tmcf->last_prune = ngx_current_msec;
        ngx_http_token_meter_prune(tmcf, ev->log);
    }

    if (ngx_current_msec - tmcf->last_reader_check
        >= NGX_HTTP_TOKEN_METER_READER_CHECK)
    {
        tmcf->last_reader_check = ngx_current_msec;
        ngx_http_token_meter_store_reader_check(tmcf->store);
    }

next:

    if (ngx_exiting || ngx_quit || ngx_terminate) {
        return;
    }

    interval = NGX_HTTP_TOKEN_METER_TIMER;

    if (ngx_http_token_meter_store_sync_interval(tmcf->store) != 0
        && ngx_http_token_meter_store_sync_interval(tmcf->store) < interval)
    {
        interval = ngx_http_token_meter_store_sync_interval(tmcf->store);
    }

    ngx_add_timer(ev, interval);
}


static void *
ngx_http_token_meter_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_token_meter_main_conf_t  *tmcf;

    tmcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_token_meter_main_conf_t));
    if (tmcf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     tmcf->store = NULL;
     *     tmcf->store_path = { 0, NULL };
     */

    tmcf->points_per_yuan = NGX_CONF_UNSET;
    tmcf->trial_points = NGX_CONF_UNSET;
    tmcf->trial_validity = NGX_CONF_UNSET;
    tmcf->quota_status = NGX_CONF_UNSET_UINT;
    tmcf->lower_max_tokens = NGX_CONF_UNSET;
    tmcf->reservation_timeout = NGX_CONF_UNSET;
    tmcf->billing_offset = NGX_CONF_UNSET;
    tmcf->retention = NGX_CONF_UNSET;

    return tmcf;
}


static char *
ngx_http_token_meter_init_main_conf(ngx_conf_t *cf, void *conf)
{
    ngx_http_token_meter_main_conf_t  *tmcf = conf;

    ngx_conf_init_value(tmcf->points_per_yuan, 250000);
    ngx_conf_init_value(tmcf->trial_points, 25000000);
    ngx_conf_init_value(tmcf->trial_validity, 30 * 86400);
    ngx_conf_init_uint_value(tmcf->quota_status, 402);
    ngx_conf_init_value(tmcf->lower_max_tokens, 1);
    ngx_conf_init_value(tmcf->reservation_timeout, 3600);
    ngx_conf_init_value(tmcf->billing_offset, 0);
    ngx_conf_init_value(tmcf->retention, 0);

    return NGX_CONF_OK;
}


static void *
ngx_http_token_meter_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_token_meter_loc_conf_t  *tmlcf;

    tmlcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_token_meter_loc_conf_t));
    if (tmlcf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     tmlcf->content = NULL;
     *     tmlcf->content_name = { 0, NULL };
     *     tmlcf->admin_key = { 0, NULL };
     */

    tmlcf->enable = NGX_CONF_UNSET;

    return tmlcf;
}


static char *
ngx_http_token_meter_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_token_meter_loc_conf_t *prev = parent;
    ngx_http_token_meter_loc_conf_t *conf = child;

    ngx_http_token_meter_main_conf_t  *tmcf;

    ngx_conf_merge_value(conf->enable, prev->enable, 0);
    ngx_conf_merge_str_value(conf->admin_key, prev->admin_key, "");

    tmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_token_meter_module);

    if (conf->enable && tmcf->store == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"token_meter\" needs "
                           "\"token_meter_store\" in the http block");
        return NGX_CONF_ERROR;
    }

    if (conf->content == NULL) {
        return NGX_CONF_OK;
    }

    /* these locations answer themselves and are never metered */

    conf->enable = 0;

    if (tmcf->store == NULL
        && conf->content != ngx_http_token_meter_models_handler
        && conf->content != ngx_http_token_meter_error_handler)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%V\" needs \"token_meter_store\" in the "
                           "http block", &conf->content_name);
        return NGX_CONF_ERROR;
    }

    if (conf->content == ngx_http_token_meter_admin_handler
        && conf->admin_key.len == 0)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"token_meter_admin\" needs "
                           "\"token_meter_admin_key\"");
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_token_meter_store_directive(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_token_meter_main_conf_t  *tmcf = conf;

    off_t        offset;
    size_t       size;
    ngx_str_t   *value, path, s;
    ngx_msec_t   sync;
    ngx_uint_t   i;

    if (tmcf->store) {
        return "is duplicate";
    }

    value = cf->args->elts;

    path = value[1];

    if (path.len == 0) {
        return "has an empty path";
    }

    if (ngx_conf_full_name(cf->cycle, &path, 0) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    while (path.len > 1 && path.data[path.len - 1] == '/') {
        path.len--;
    }

    size = 1024 * 1024 * 1024;
    sync = 0;

    for (i = 2; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "size=", 5) == 0) {
            s.data = value[i].data + 5;
            s.len = value[i].len - 5;

            /* ngx_parse_offset() knows "g" as well as "k" and "m" */

            offset = ngx_parse_offset(&s);
            size = (size_t) offset;

            if (offset == NGX_ERROR || (off_t) size != offset) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid store size \"%V\"", &value[i]);
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "sync=", 5) == 0) {
            s.data = value[i].data + 5;
            s.len = value[i].len - 5;

            if (s.len == 2 && ngx_strncmp(s.data, "on", 2) == 0) {
                sync = 0;

            } else if (s.len == 3 && ngx_strncmp(s.data, "off", 3) == 0) {
                sync = NGX_HTTP_TOKEN_METER_SYNC_OFF;

            } else {
                sync = ngx_parse_time(&s, 0);

                if (sync == (ngx_msec_t) NGX_ERROR || sync == 0) {
                    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                       "invalid sync mode \"%V\", expected "
                                       "on, off or an interval", &value[i]);
                    return NGX_CONF_ERROR;
                }
            }

            continue;
        }

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid parameter \"%V\"", &value[i]);
        return NGX_CONF_ERROR;
    }

    tmcf->store = ngx_http_token_meter_store_create(cf->pool, &path, size,
                                                    sync);
    if (tmcf->store == NULL) {
        return NGX_CONF_ERROR;
    }

    tmcf->store_path = path;

    /* a message returned here is shown after the directive's name */

    return ngx_http_token_meter_store_check(tmcf->store, cf);
}


static char *
ngx_http_token_meter_points_per_yuan(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_token_meter_main_conf_t  *tmcf = conf;

    ngx_int_t   n;
    ngx_str_t  *value;

    if (tmcf->points_per_yuan != NGX_CONF_UNSET) {
        return "is duplicate";
    }

    value = cf->args->elts;

    n = ngx_atoi(value[1].data, value[1].len);

    if (n <= 0 || n > 1000000000) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid points per yuan \"%V\", expected a whole "
                           "number from 1 to 1000000000", &value[1]);
        return NGX_CONF_ERROR;
    }

    tmcf->points_per_yuan = n;

    return NGX_CONF_OK;
}


static char *
ngx_http_token_meter_trial(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_token_meter_main_conf_t  *tmcf = conf;

    int64_t     points;
    time_t      validity;
    ngx_str_t  *value;

    if (tmcf->trial_points != NGX_CONF_UNSET) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (ngx_http_token_meter_parse_points(&value[1], 1, &points) != NGX_OK) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid trial points \"%V\", expected a whole "
                           "number of points", &value[1]);
        return NGX_CONF_ERROR;
    }

    validity = 30 * 86400;

    if (cf->args->nelts == 3) {
        validity = ngx_parse_time(&value[2], 1);

        if (validity == (time_t) NGX_ERROR || validity == 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid trial validity \"%V\"", &value[2]);
            return NGX_CONF_ERROR;
        }
    }

    tmcf->trial_points = points;
    tmcf->trial_validity = validity;

    return NGX_CONF_OK;
}


static char *
ngx_http_token_meter_content(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_token_meter_loc_conf_t *tmlcf = conf;

    ngx_http_core_loc_conf_t  *clcf;

    if (tmlcf->content) {
        return "is duplicate";
    }

    tmlcf->content = (ngx_http_handler_pt) cmd->post;
    tmlcf->content_name = cmd->name;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = tmlcf->content;

    return NGX_CONF_OK;
}


/* token_meter_billing_offset +08:00 */

static char *
ngx_http_token_meter_billing_offset(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_token_meter_main_conf_t  *tmcf = conf;

    u_char     *p;
    ngx_int_t   h, m;
    ngx_str_t  *value;

    if (tmcf->billing_offset != NGX_CONF_UNSET) {
        return "is duplicate";
    }

    value = cf->args->elts;
    p = value[1].data;

    if (value[1].len != 6 || (p[0] != '+' && p[0] != '-') || p[3] != ':') {
        goto invalid;
    }

    h = ngx_atoi(p + 1, 2);
    m = ngx_atoi(p + 4, 2);

    if (h == NGX_ERROR || m == NGX_ERROR || h > 14 || m > 59) {
        goto invalid;
    }

    tmcf->billing_offset = (h * 3600 + m * 60) * (p[0] == '-' ? -1 : 1);

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid billing offset \"%V\", expected a UTC "
                       "offset like \"+08:00\"", &value[1]);

    return NGX_CONF_ERROR;
}


static char *
ngx_http_token_meter_quota_status(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_token_meter_main_conf_t  *tmcf = conf;

    ngx_int_t   n;
    ngx_str_t  *value;

    if (tmcf->quota_status != NGX_CONF_UNSET_UINT) {
        return "is duplicate";
    }

    value = cf->args->elts;

    n = ngx_atoi(value[1].data, value[1].len);

    if (n != 402 && n != 429) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid quota status \"%V\", expected 402 or 429",
                           &value[1]);
        return NGX_CONF_ERROR;
    }

    tmcf->quota_status = n;

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_token_meter_preconfiguration(ngx_conf_t *cf)
{
    return ngx_http_token_meter_add_variables(cf);
}


static ngx_int_t
ngx_http_token_meter_postconfiguration(ngx_conf_t *cf)
{
    ngx_uint_t                         n;
    ngx_http_handler_pt               *h, *first;
    ngx_http_core_main_conf_t         *cmcf;
    ngx_http_token_meter_main_conf_t  *tmcf;

    tmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_token_meter_module);

    if (ngx_http_token_meter_init_models(cf, tmcf) != NGX_OK) {
        return NGX_ERROR;
    }

    if (tmcf->store
        && ngx_http_token_meter_metrics_zone(cf, tmcf) != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (tmcf->store) {
        ngx_http_token_meter_check_debug_log(cf);
    }

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_ACCESS_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_token_meter_access_handler;

    /*
     * settle before the access log is written, so that the log can show
     * what was charged: our handler goes first in the log phase
     */

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_LOG_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    first = cmcf->phases[NGX_HTTP_LOG_PHASE].handlers.elts;
    n = cmcf->phases[NGX_HTTP_LOG_PHASE].handlers.nelts;

    ngx_memmove(&first[1], &first[0], (n - 1) * sizeof(ngx_http_handler_pt));
    first[0] = ngx_http_token_meter_log_handler;

    return ngx_http_token_meter_filter_init(cf);
}


/*
 * nginx itself writes every request header to a debug log, the keys in
 * "Authorization" and "x-api-key" among them; the module cannot keep them
 * out, so it says so when the main or the http error_log is at debug.
 */

static void
ngx_http_token_meter_check_debug_log(ngx_conf_t *cf)
{
#if (NGX_DEBUG)
    ngx_log_t                 *log;
    ngx_http_core_loc_conf_t  *clcf;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

    log = clcf->error_log ? clcf->error_log : &cf->cycle->new_log;

    for ( /* void */ ; log; log = log->next) {
        if (log->log_level & NGX_LOG_DEBUG_ALL) {
            ngx_log_error(NGX_LOG_WARN, cf->log, 0,
                          "token meter: an error_log at level debug gets "
                          "every request header, API keys and the admin "
                          "key among them; keep it at info or above where "
                          "the keys are real");
            return;
        }
    }
#endif
}


static ngx_int_t
ngx_http_token_meter_init_module(ngx_cycle_t *cycle)
{
    ngx_core_conf_t                   *ccf;
    ngx_http_token_meter_main_conf_t  *tmcf;

    tmcf = ngx_http_cycle_get_module_main_conf(cycle,
                                               ngx_http_token_meter_module);
    if (tmcf == NULL || tmcf->store == NULL) {
        return NGX_OK;
    }

    ccf = (ngx_core_conf_t *) ngx_get_conf(cycle->conf_ctx, ngx_core_module);

    return ngx_http_token_meter_store_chown(tmcf->store, ccf->user,
                                            ccf->group, cycle->log);
}


static ngx_int_t
ngx_http_token_meter_init_process(ngx_cycle_t *cycle)
{
    ngx_http_token_meter_main_conf_t  *tmcf;

    tmcf = ngx_http_cycle_get_module_main_conf(cycle,
                                               ngx_http_token_meter_module);
    if (tmcf == NULL || tmcf->store == NULL) {
        return NGX_OK;
    }

    if (ngx_process != NGX_PROCESS_WORKER
        && ngx_process != NGX_PROCESS_SINGLE)
    {
        return NGX_OK;
    }

    /*
     * a store that cannot be opened leaves the worker running: metered
     * requests then fail closed with 503 and the log says why
     */

    (void) ngx_http_token_meter_store_open(tmcf->store, cycle->log);

    tmcf->timer.handler = ngx_http_token_meter_timer_handler;
    tmcf->timer.data = tmcf;
    tmcf->timer.log = cycle->log;
    tmcf->timer.cancelable = 1;

    tmcf->last_sync = ngx_current_msec;
    tmcf->last_reader_check = ngx_current_msec;
    tmcf->last_sweep = ngx_current_msec;
    tmcf->last_prune = ngx_current_msec;

    ngx_add_timer(&tmcf->timer, NGX_HTTP_TOKEN_METER_TIMER);

    return NGX_OK;
}


static void
ngx_http_token_meter_exit_process(ngx_cycle_t *cycle)
{
    ngx_http_token_meter_main_conf_t  *tmcf;

    ngx_http_token_meter_sha256_free();

    tmcf = ngx_http_cycle_get_module_main_conf(cycle,
                                               ngx_http_token_meter_module);
    if (tmcf == NULL || tmcf->store == NULL) {
        return;
    }

    ngx_http_token_meter_flush();

    ngx_http_token_meter_store_close(tmcf->store);
}
