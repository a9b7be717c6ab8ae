
/*
 * Copyright (C) The ngx_http_token_meter_module authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_token_meter_module.h"
#include "ngx_http_token_meter_account.h"
#include "ngx_http_token_meter_json.h"


#define NGX_HTTP_TOKEN_METER_STAT_MODELS   512
#define NGX_HTTP_TOKEN_METER_NAME_MAX      64


/*
 * Counters live in a shared memory zone: every worker adds to them, and a
 * reload keeps them, since nginx hands a zone of the same name and size to
 * the new configuration.  Models are found by name, so a reload that adds
 * or removes models keeps the counters of the others.
 */

typedef struct {
    u_char                      name[NGX_HTTP_TOKEN_METER_NAME_MAX];
    size_t                      len;
    ngx_atomic_t                requests[3];
    ngx_atomic_t                tokens[3];
    ngx_atomic_t                points;
} ngx_http_token_meter_model_stat_t;


typedef struct {
    ngx_atomic_t                rejected[9];
    ngx_atomic_t                latency[10];
    ngx_atomic_t                latency_sum;
    ngx_atomic_t                latency_count;
    ngx_uint_t                  nmodels;
    ngx_http_token_meter_model_stat_t  model[NGX_HTTP_TOKEN_METER_STAT_MODELS];
} ngx_http_token_meter_stats_t;


static ngx_int_t ngx_http_token_meter_stats_init(ngx_shm_zone_t *zone,
    void *data);


static char  *ngx_http_token_meter_reasons[] = {
    "invalid_api_key",
    "account_suspended",
    "invalid_request_error",
    "model_not_found",
    "insufficient_quota",
    "store_unavailable",
    "request_too_large",
    "method_not_allowed",
    "store_full",
    NULL
};


static char  *ngx_http_token_meter_outcomes[] = {
    "upstream", "estimated", "upstream_error"
};


static char  *ngx_http_token_meter_kinds[] = {
    "input", "cached", "output"
};


/* upper bounds of the settlement latency buckets, in microseconds */

static ngx_uint_t  ngx_http_token_meter_buckets[] = {
    50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000
};


ngx_int_t
ngx_http_token_meter_metrics_zone(ngx_conf_t *cf,
    ngx_http_token_meter_main_conf_t *tmcf)
{
    ngx_str_t  name;

    ngx_str_set(&name, "token_meter_metrics");

    tmcf->stats_zone = ngx_shared_memory_add(cf, &name,
                           ngx_align(sizeof(ngx_http_token_meter_stats_t)
                                     + 8 * ngx_pagesize, ngx_pagesize),
                           &ngx_http_token_meter_module);
    if (tmcf->stats_zone == NULL) {
        return NGX_ERROR;
    }

    tmcf->stats_zone->init = ngx_http_token_meter_stats_init;
    tmcf->stats_zone->data = tmcf;

    return NGX_OK;
}


static ngx_int_t
ngx_http_token_meter_stats_init(ngx_shm_zone_t *zone, void *data)
{
    ngx_uint_t                         i, j;
    ngx_slab_pool_t                   *shpool;
    ngx_http_token_meter_model_t      *model;
    ngx_http_token_meter_stats_t      *stats;
    ngx_http_token_meter_main_conf_t  *tmcf, *old;

    tmcf = zone->data;
    shpool = (ngx_slab_pool_t *) zone->shm.addr;

    if (data) {
        old = data;
        stats = (ngx_http_token_meter_stats_t *) old->stats;

    } else if (zone->shm.exists) {
        stats = shpool->data;

    } else {
        stats = ngx_slab_calloc(shpool, sizeof(ngx_http_token_meter_stats_t));
        if (stats == NULL) {
            return NGX_ERROR;
        }

        shpool->data = stats;
    }

    tmcf->stats = stats;

    /* runs in the master, before workers exist: no lock is needed */

    model = tmcf->models.elts;

    for (i = 0; i < tmcf->models.nelts; i++) {

        for (j = 0; j < stats->nmodels; j++) {
            if (stats->model[j].len == model[i].name.len
                && ngx_strncmp(stats->model[j].name, model[i].name.data,
                               model[i].name.len)
                   == 0)
            {
                break;
            }
        }

        if (j == stats->nmodels) {
            if (j == NGX_HTTP_TOKEN_METER_STAT_MODELS
                || model[i].name.len > NGX_HTTP_TOKEN_METER_NAME_MAX)
            {
                model[i].stat = NGX_HTTP_TOKEN_METER_STAT_MODELS;
                continue;
            }

            ngx_memcpy(stats->model[j].name, model[i].name.data,
                       model[i].name.len);
            stats->model[j].len = model[i].name.len;
            stats->nmodels++;
        }

        model[i].stat = j;
    }

    return NGX_OK;
}


void
ngx_http_token_meter_count_rejected(ngx_http_request_t *r, const char *code)
{
    ngx_uint_t                         i;
    ngx_http_token_meter_stats_t      *stats;
    ngx_http_token_meter_main_conf_t  *tmcf;

    tmcf = ngx_http_get_module_main_conf(r, ngx_http_token_meter_module);

    stats = tmcf->stats;

    if (stats == NULL) {
        return;
    }

    for (i = 0; ngx_http_token_meter_reasons[i]; i++) {
        if (ngx_strcmp(code, ngx_http_token_meter_reasons[i]) == 0) {
            break;
        }
    }

    if (ngx_http_token_meter_reasons[i] == NULL) {
        i = 5;
    }

    (void) ngx_atomic_fetch_add(&stats->rejected[i], 1);
}


void
ngx_http_token_meter_count_settled(ngx_http_token_meter_main_conf_t *tmcf,
    ngx_http_token_meter_model_t *model, ngx_http_token_meter_record_t *rec,
    ngx_msec_int_t usec)
{
    ngx_uint_t                          i, outcome;
    ngx_http_token_meter_stats_t       *stats;
    ngx_http_token_meter_model_stat_t  *ms;

    stats = (ngx_http_token_meter_stats_t *) tmcf->stats;

    if (stats == NULL) {
        return;
    }

    for (i = 0; i < 9; i++) {
        if ((ngx_uint_t) usec <= ngx_http_token_meter_buckets[i]) {
            break;
        }
    }

    (void) ngx_atomic_fetch_add(&stats->latency[i], 1);
    (void) ngx_atomic_fetch_add(&stats->latency_sum, usec);
    (void) ngx_atomic_fetch_add(&stats->latency_count, 1);

    if (model->stat >= NGX_HTTP_TOKEN_METER_STAT_MODELS) {
        return;
    }

    ms = &stats->model[model->stat];

    if (rec->source == NGX_HTTP_TOKEN_METER_SOURCE_UPSTREAM) {
        outcome = 0;

    } else if (rec->status >= 200 && rec->status < 300) {
        outcome = 1;

    } else {
        outcome = 2;
    }

    (void) ngx_atomic_fetch_add(&ms->requests[outcome], 1);
    (void) ngx_atomic_fetch_add(&ms->tokens[0], rec->input);
    (void) ngx_atomic_fetch_add(&ms->tokens[1], rec->cached);
    (void) ngx_atomic_fetch_add(&ms->tokens[2], rec->output);
    (void) ngx_atomic_fetch_add(&ms->points, rec->points);
}


ngx_int_t
ngx_http_token_meter_metrics_handler(ngx_http_request_t *r)
{
    u_char                             *p;
    size_t                              len;
    uint64_t                            reservations, cumulative;
    ngx_int_t                           rc;
    ngx_buf_t                          *b;
    ngx_uint_t                          i, j;
    ngx_http_token_meter_stats_t       *stats;
    ngx_http_token_meter_store_stat_t   st;
    ngx_http_token_meter_model_stat_t  *ms;
    ngx_http_token_meter_main_conf_t   *tmcf;

    ngx_http_token_meter_flush();

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    if (r->method != NGX_HTTP_GET && r->method != NGX_HTTP_HEAD) {
        if (ngx_http_token_meter_allow(r, "GET, HEAD") != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        return ngx_http_token_meter_send_error(r, NGX_HTTP_NOT_ALLOWED,
                                               "invalid_request_error",
                                               "method_not_allowed",
                                               "Use GET for the metrics.");
    }

    tmcf = ngx_http_get_module_main_conf(r, ngx_http_token_meter_module);

    stats = (ngx_http_token_meter_stats_t *) tmcf->stats;

    len = 4096 + stats->nmodels * 2048;

    b = ngx_create_temp_buf(r->pool, len);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = b->last;

    p = ngx_cpymem(p, "# HELP token_meter_requests_total Metered requests "
                      "settled, by model and where the usage came from.\n"
                      "# TYPE token_meter_requests_total counter\n",
                   sizeof("# HELP token_meter_requests_total Metered "
                          "requests settled, by model and where the usage "
                          "came from.\n# TYPE token_meter_requests_total "
                          "counter\n") - 1);

    for (i = 0; i < stats->nmodels; i++) {
        ms = &stats->model[i];

        for (j = 0; j < 3; j++) {
            p = ngx_sprintf(p, "token_meter_requests_total{model=\"%*s\","
                            "outcome=\"%s\"} %uA\n", ms->len, ms->name,
                            ngx_http_token_meter_outcomes[j],
                            ms->requests[j]);
        }
    }

    p = ngx_sprintf(p, "# HELP token_meter_tokens_total Tokens settled, "
                    "by model and kind.\n"
                    "# TYPE token_meter_tokens_total counter\n");

    for (i = 0; i < stats->nmodels; i++) {
        ms = &stats->model[i];

        for (j = 0; j < 3; j++) {
            p = ngx_sprintf(p, "token_meter_tokens_total{model=\"%*s\","
                            "kind=\"%s\"} %uA\n", ms->len, ms->name,
                            ngx_http_token_meter_kinds[j], ms->tokens[j]);
        }
    }

    p = ngx_sprintf(p, "# HELP token_meter_points_total Points charged, "
                    "by model.\n"
                    "# TYPE token_meter_points_total counter\n");

    for (i = 0; i < stats->nmodels; i++) {
        ms = &stats->model[i];

        p = ngx_sprintf(p, "token_meter_points_total{model=\"%*s\"} %uA\n",
                        ms->len, ms->name, ms->points);
    }

    p = ngx_sprintf(p, "# HELP token_meter_rejections_total Requests "
                    "refused before reaching an upstream, by reason.\n"
                    "# TYPE token_meter_rejections_total counter\n");

    for (i = 0; ngx_http_token_meter_reasons[i]; i++) {
        p = ngx_sprintf(p, "token_meter_rejections_total{reason=\"%s\"} "
                        "%uA\n", ngx_http_token_meter_reasons[i],
                        stats->rejected[i]);
    }

    p = ngx_sprintf(p, "# HELP token_meter_settlement_seconds Time spent "
                    "settling a request in the store.\n"
                    "# TYPE token_meter_settlement_seconds histogram\n");

    cumulative = 0;

    for (i = 0; i < 10; i++) {
        cumulative += stats->latency[i];

        if (i < 9) {
            p = ngx_sprintf(p, "token_meter_settlement_seconds_bucket"
                            "{le=\"%ui.%06ui\"} %uL\n",
                            ngx_http_token_meter_buckets[i] / 1000000,
                            ngx_http_token_meter_buckets[i] % 1000000,
                            cumulative);

        } else {
            p = ngx_sprintf(p, "token_meter_settlement_seconds_bucket"
                            "{le=\"+Inf\"} %uL\n", cumulative);
        }
    }

    p = ngx_sprintf(p, "token_meter_settlement_seconds_sum %uA.%06uA\n"
                    "token_meter_settlement_seconds_count %uA\n",
                    stats->latency_sum / 1000000,
                    stats->latency_sum % 1000000, stats->latency_count);

    if (ngx_http_token_meter_store_stat(tmcf->store, &st) == NGX_OK) {
        p = ngx_sprintf(p, "# HELP token_meter_store_bytes Size of the "
                        "store's map and the part of it in use.\n"
                        "# TYPE token_meter_store_bytes gauge\n"
                        "token_meter_store_bytes{kind=\"size\"} %uz\n"
                        "token_meter_store_bytes{kind=\"used\"} %uz\n",
                        st.map_size, st.used);
    }

    if (ngx_http_token_meter_store_entries(tmcf->store,
                                          NGX_HTTP_TOKEN_METER_DB_RESERVATIONS,
                                          &reservations)
        == NGX_OK)
    {
        p = ngx_sprintf(p, "# HELP token_meter_reservations_open "
                        "Reservations of requests not yet settled.\n"
                        "# TYPE token_meter_reservations_open gauge\n"
                        "token_meter_reservations_open %uL\n", reservations);
    }

    b->last = p;

    return ngx_http_token_meter_send_buf(r, NGX_HTTP_OK,
                                         "text/plain; version=0.0.4; "
                                         "charset=utf-8", b);
}
